//! A naive Native Sparse Attention in `f64`, written from the algorithm as documented in
//! `docs/algorithm.md` alone.
//!
//! Everything here is plain `Vec<f64>` arithmetic with explicit loops over batch, position,
//! head and key: no Burn, and nothing shared with `nsa_burn` (its `reference` module in
//! particular). It is slow on purpose; its only job is to be obviously right.
//!
//! Conventions: arrays are row-major; the shape of each one is written next to it. `B` is the
//! batch, `T` the sequence length, `H` / `H_kv` the query / key-value heads, `G = H / H_kv`,
//! `N_cmp` the number of compression blocks and `N_slc` the number of selection blocks.
//!
//! Files: `math.rs` (arrays, affine layers, activations), `layer.rs` (projections,
//! compressors, gates), `attention.rs` (block scores, top-n selection, the three branches).

mod attention;
mod layer;
mod math;

pub use attention::{attention, block_scores, select, AttentionInputs, Sparsity};
pub use layer::{layer_inputs, output_projection, CompressorMlp, Layer};
pub use math::{erf, Array, Linear};
