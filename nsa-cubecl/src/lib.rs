//! CubeCL kernels for Native Sparse Attention (NSA), generic over the CubeCL runtime and
//! free of Burn types: `nsa-burn` launches them on Burn's CubeCL backends.
//!
//! Every kernel runs one cube per `(batch, KV head, query position)` holding the group's
//! `G` query heads (the paper's group-centric layout) and streams keys through the shared
//! online-softmax tile of [`tile`].

pub mod compress;
pub mod grad_key;
pub mod grad_query;
pub mod keys;
pub mod launch;
pub mod mma;
pub mod select;
pub mod tile;
pub mod window;

pub use compress::SelectionConfig;
pub use keys::KeySet;
pub use launch::{
    launch_compressed, launch_grad_key_value, launch_grad_query, launch_selected, launch_window,
    mma_tile_config, tile_config, AttentionShape, GradArgs, PORTABLE_KERNELS_VAR,
};
pub use mma::MmaTileConfig;
pub use tile::TileConfig;
