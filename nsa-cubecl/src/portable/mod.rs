//! The portable kernels: every device, every float type. One cube per `(batch, KV head,
//! query position)` (for the key side, per tile of key rows; while decoding, per part of a
//! query row's keys), the online softmax on the tile of [`tile`], one file per kind of key
//! walk and pass.

pub mod compress;
pub mod grad_key;
pub mod grad_query;
pub mod range;
pub mod select;
pub mod tile;
