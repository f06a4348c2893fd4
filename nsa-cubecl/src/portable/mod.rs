//! The portable kernels: every device, every float type. One cube per `(batch, KV head,
//! query position)` (for the key side, per tile of key rows), the online softmax on the
//! tile of [`tile`], one file per branch and pass.

pub mod compress;
pub mod grad_key;
pub mod grad_query;
pub mod select;
pub mod tile;
pub mod window;
