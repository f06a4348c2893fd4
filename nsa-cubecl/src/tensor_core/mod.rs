//! The tensor-core kernels: m16n8k16 `mma` on register fragments ([`fragments`]), the
//! online softmax in registers ([`softmax`]), the cube layout and asynchronous loaders
//! ([`layout`]), and one file per kernel. Nothing here uses the portable path.

pub mod fragments;
pub mod grad_key;
pub mod grad_query;
pub mod layout;
pub mod range;
pub mod scores;
pub mod select;
pub mod softmax;
