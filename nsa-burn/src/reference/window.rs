//! Sliding-window branch: query `t` attends keys `max(0, t - w + 1) ..= t`.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::{
    group_heads, grouped_masked_attention, heads_first, lse_heads, position_grid, query_chunks,
    ungroup_heads, Attended,
};
use crate::NsaAttentionConfig;

/// Causal sliding-window attention.
///
/// `q: [B, T, H, d_k]`, `k: [B, T, H_kv, d_k]`, `v: [B, T, H_kv, d_v]` -> output
/// `[B, T, H, d_v]` and row log-sum-exp `[B, H, T]`. Shapes are not checked here;
/// [`crate::nsa_attention`] checks them.
pub fn window_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    config: &NsaAttentionConfig,
) -> Attended<B> {
    let [batch, seq, heads, d_k] = q.dims();
    let kv_heads = k.dims()[2];
    let d_v = v.dims()[3];
    let group = heads / kv_heads;
    let device = q.device();
    let scale = config.scale(d_k);
    let window = config.window_span(seq);

    let q = group_heads(q, kv_heads);
    let k = heads_first(k);
    let v = heads_first(v);
    let chunks = query_chunks(seq, config.query_chunk)
        .map(|(start, end)| {
            let len = end - start;
            let key_start = (start + 1).saturating_sub(window);
            let q_chunk =
                q.clone()
                    .narrow(2, start, len)
                    .reshape([batch, kv_heads, len * group, d_k]);
            let k_chunk = k.clone().narrow(2, key_start, end - key_start);
            let v_chunk = v.clone().narrow(2, key_start, end - key_start);
            // Key p is visible to query t iff t - w < p <= t.
            let (t, p) = position_grid::<B>((start, end), (key_start, end), &device);
            let allowed = p
                .clone()
                .lower_equal(t.clone())
                .bool_and(p.add_scalar(window as i64).greater(t));
            let (o, _, lse) = grouped_masked_attention(q_chunk, k_chunk, v_chunk, allowed, scale);
            (
                o.reshape([batch, kv_heads, len, group, d_v]),
                lse.reshape([batch, kv_heads, len, group]),
            )
        })
        .unzip::<_, _, Vec<_>, Vec<_>>();
    Attended {
        output: ungroup_heads(Tensor::cat(chunks.0, 2)),
        lse: lse_heads(Tensor::cat(chunks.1, 2)),
    }
}
