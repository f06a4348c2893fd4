//! The whole operator (Eq. 5) in the reference: the three branches and their gated sum in
//! Burn ops, on any backend, whichever kernels it has.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};

use super::{compressed_attention, selected_attention, window_attention};
use crate::attention::first_block_only;
use crate::backend::{reference_gated_sum, GatedSum};
use crate::{NsaAttentionConfig, NsaError, NsaInput, NsaOutput};

/// [`crate::try_nsa_attention`] computed by the reference on any backend: the same inputs
/// (queries at an offset included), checks and typed errors (except that every float dtype
/// is taken), and the same outputs up to rounding. On a backend with kernels this is the
/// independent answer to check them against on the device itself, for sequences too long to
/// move to the CPU; under `Autodiff` it is differentiable. See the module docs for its
/// memory use.
///
/// Shapes as [`crate::nsa_attention`]: `q: [B, T, H, d_k]`, `compressed:
/// [B, N_cmp, H_kv, d_k | d_v]` (or `None` when `T_k < l`), `selected: [B, T_k, H_kv,
/// d_k | d_v]`, `window: [B, L_w, H_kv, d_k | d_v]`, `gates: [B, T, H, 3]` ->
/// `output: [B, T, H, d_v]`, `selected_blocks: [B, H_kv, T, n]`.
pub fn operator<B: Backend>(
    input: NsaInput<B>,
    config: &NsaAttentionConfig,
) -> Result<NsaOutput<B>, NsaError> {
    config.validate()?;
    input.check(config)?;
    input.check_same_dtype()?;
    let query_start = input.query_start();
    let q = input.q;
    let (o_cmp, selected_blocks) = match input.compressed {
        Some(compressed) => {
            let (attended, blocks) =
                compressed_attention(q.clone(), compressed.k, compressed.v, query_start, config);
            (Some(attended.output), blocks)
        }
        None => (None, first_block_only(&input.selected, q.dims()[1], config)),
    };
    let o_slc = selected_attention(
        q.clone(),
        input.selected.k,
        input.selected.v,
        selected_blocks.clone(),
        config,
    )
    .output;
    let o_win = window_attention(q, input.window.k, input.window.v, config).output;
    // Without compression blocks the compressed branch is exactly zero.
    let o_cmp = o_cmp.unwrap_or_else(|| o_win.zeros_like());
    let float = |t: Tensor<B, 4>| t.into_primitive().tensor();
    let output = reference_gated_sum::<B>(GatedSum {
        compressed: float(o_cmp),
        selected: float(o_slc),
        window: float(o_win),
        gates: float(input.gates),
    });
    Ok(NsaOutput {
        output: Tensor::from_primitive(TensorPrimitive::Float(output)),
        selected_blocks,
    })
}
