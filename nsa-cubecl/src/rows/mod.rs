//! Row-wise kernels with no attention tile: `delta = rowsum(dO * O)`, the gated sum of the
//! branches (Eq. 5) forward and backward, and the sum of the key side's split copies.

pub mod delta;
pub mod gated_sum;
pub mod key_splits;
