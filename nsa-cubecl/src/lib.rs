//! CubeCL kernels for Native Sparse Attention (NSA), generic over the CubeCL runtime and
//! free of Burn types: `nsa-burn` launches them on Burn's CubeCL backends.
//!
//! Two implementations of every kernel, chosen per call in [`launch`]:
//!
//! - the **tensor-core** kernels ([`register_tile`], layout in [`mma`]): on devices with
//!   m16n8k16 `mma` for the input type with f32 accumulation and 32-lane planes (CUDA,
//!   f16/bf16), head dims multiples of 16. A cube holds the `G` query heads of one or more
//!   consecutive positions of one KV head (the paper's group-centric layout), one plane per
//!   16 rows; `Q K^T`, `P V` and the backward products run on tensor cores with scores,
//!   probabilities and accumulators in registers.
//! - the **portable** kernels ([`tile`]): everywhere else (f32, lavapipe and other devices
//!   without `mma`), or when `NSA_PORTABLE_KERNELS` is set. One cube per
//!   `(batch, KV head, query position)` with register-blocked dot products.
//!
//! Both walk the same keys in the same order and share the attention patterns of [`keys`],
//! the selection scoring and top-n of [`compress`], and the on-device selection inversion of
//! [`bitmap`] and [`grad_key`].

pub mod bitmap;
pub mod compress;
pub mod delta;
pub mod gated_sum;
pub mod grad_key;
pub mod grad_query;
pub mod keys;
pub mod launch;
pub mod mma;
pub mod range;
pub mod register_tile;
pub mod select;
pub mod tile;
pub mod window;

pub use compress::SelectionConfig;
pub use keys::KeySet;
pub use launch::{
    key_grad_split, launch_compressed, launch_delta, launch_gated_sum, launch_gated_sum_backward,
    launch_grad_key_value, launch_grad_query, launch_selected, launch_selected_gated_sum,
    launch_selection_bitmap, launch_sum_key_splits, launch_window, mma_tile_config,
    selection_bitmap_shape, selection_sums_gates, tile_config, AttentionShape, GradArgs,
    KeyGradSplit, PORTABLE_KERNELS_VAR,
};
pub use mma::MmaTileConfig;
pub use tile::TileConfig;
