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
/// `q: [B, T, H, d_k]`, `k: [B, L, H_kv, d_k]`, `v: [B, L, H_kv, d_v]` with `L >= T` ->
/// output `[B, T, H, d_v]` and row log-sum-exp `[B, H, T]`. The keys end where the queries
/// end: query `i` sits at key `L - T + i`. `L = T` is self-attention; queries at an offset
/// into a longer sequence pass the last `L` keys, at least `min(T_k, T + w - 1)` of the
/// `T_k` keys so that every key a query reaches is among them. Shapes are not checked
/// here; [`crate::nsa_attention`] checks them.
pub fn window_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    config: &NsaAttentionConfig,
) -> Attended<B> {
    let [batch, seq, heads, d_k] = q.dims();
    let [_, keys, kv_heads, _] = k.dims();
    let d_v = v.dims()[3];
    let group = heads / kv_heads;
    let device = q.device();
    let scale = config.scale(d_k);
    let window = config.window_span(keys);
    // Key index of query 0.
    let offset = keys - seq;

    let q = group_heads(q, kv_heads);
    let k = heads_first(k);
    let v = heads_first(v);
    let chunks = query_chunks(seq, config.query_chunk)
        .map(|(start, end)| {
            let len = end - start;
            let (first, last) = (offset + start, offset + end);
            let key_start = (first + 1).saturating_sub(window);
            let q_chunk =
                q.clone()
                    .narrow(2, start, len)
                    .reshape([batch, kv_heads, len * group, d_k]);
            let k_chunk = k.clone().narrow(2, key_start, last - key_start);
            let v_chunk = v.clone().narrow(2, key_start, last - key_start);
            // Key p is visible to query t iff t - w < p <= t.
            let (t, p) = position_grid::<B>((first, last), (key_start, last), &device);
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
