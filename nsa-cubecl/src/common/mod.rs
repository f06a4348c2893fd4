//! What the portable and tensor-core kernels share: attention patterns, selection rules,
//! grid order and row addressing, the selection bitmap and the key side's query walk.

pub mod bitmap;
pub mod geometry;
pub mod key_walk;
pub mod keys;
pub mod selection;
