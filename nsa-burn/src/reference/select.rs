//! Selection branch (Eq. 12): attention over the blocks each query group selected.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use super::{
    group_heads, heads_first, lse_heads, masked_softmax, query_chunks, ungroup_heads, Attended,
};
use crate::NsaAttentionConfig;

/// Attention over the concatenated selected blocks, causally masked inside the block that
/// holds the query. All `G` heads of a group attend the same blocks.
///
/// `q: [B, T, H, d_k]`, `k: [B, T_k, H_kv, d_k]`, `v: [B, T_k, H_kv, d_v]` with
/// `T_k >= T`, `selected: [B, H_kv, T, n]` Int (block indices, -1 for an empty slot; every
/// query needs at least one block starting at or before it, as [`super::top_n_blocks`]
/// guarantees) -> output `[B, T, H, d_v]` and row log-sum-exp `[B, H, T]`. The queries are
/// the last `T` positions of the `T_k` keys (`T_k = T` for self-attention).
pub fn selected_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    selected: Tensor<B, 4, Int>,
    config: &NsaAttentionConfig,
) -> Attended<B> {
    let [batch, seq, heads, d_k] = q.dims();
    let [_, key_len, kv_heads, d_v] = v.dims();
    // Position of query 0.
    let query_start = key_len - seq;
    let n = selected.dims()[3];
    let group = heads / kv_heads;
    let block = config.select_block;
    let num_blocks = config.num_selection_blocks(key_len);
    let device = q.device();
    let scale = config.scale(d_k);

    // Keys and values as rows of whole blocks: [B * H_kv * N_slc, l' * d].
    let blocked = |x: Tensor<B, 4>| {
        let [_, _, _, dim] = x.dims();
        let x = heads_first(x);
        let padding = num_blocks * block - key_len;
        let x = if padding == 0 {
            x
        } else {
            let zeros = Tensor::zeros([batch, kv_heads, padding, dim], (&device, x.dtype()));
            Tensor::cat(vec![x, zeros], 2)
        };
        x.reshape([batch * kv_heads * num_blocks, block * dim])
    };
    let k_blocks = blocked(k);
    let v_blocks = blocked(v);
    // First block row of each (batch, KV head).
    let head_base = Tensor::<B, 1, Int>::arange(0..(batch * kv_heads) as i64, &device)
        .mul_scalar(num_blocks as i64)
        .reshape([batch, kv_heads, 1, 1]);
    let offsets =
        Tensor::<B, 1, Int>::arange(0..block as i64, &device).reshape([1, 1, 1, 1, block]);

    let q = group_heads(q, kv_heads);
    let chunks = query_chunks(seq, config.query_chunk)
        .map(|(start, end)| {
            let len = end - start;
            let keys = n * block;
            let indices = selected.clone().narrow(2, start, len);
            let filled = indices.clone().greater_equal_elem(0);
            let indices = indices.mask_fill(filled.clone().bool_not(), 0);
            let rows = (indices.clone() + head_base.clone().expand([batch, kv_heads, len, n]))
                .reshape([batch * kv_heads * len * n]);
            let k_sel = k_blocks
                .clone()
                .select(0, rows.clone())
                .reshape([batch, kv_heads, len, keys, d_k]);
            let v_sel = v_blocks
                .clone()
                .select(0, rows)
                .reshape([batch, kv_heads, len, keys, d_v]);
            // Key position of every gathered slot, and whether query t may attend it.
            let position = (indices
                .mul_scalar(block as i64)
                .reshape([batch, kv_heads, len, n, 1])
                + offsets.clone().expand([batch, kv_heads, len, n, block]))
            .reshape([batch, kv_heads, len, keys]);
            let first = (query_start + start) as i64;
            let t = Tensor::<B, 1, Int>::arange(first..first + len as i64, &device)
                .reshape([1, 1, len, 1])
                .expand([batch, kv_heads, len, keys]);
            let filled = filled
                .reshape([batch, kv_heads, len, n, 1])
                .expand([batch, kv_heads, len, n, block])
                .reshape([batch, kv_heads, len, keys]);
            let allowed = position
                .lower_equal(t)
                .bool_and(filled)
                .reshape([batch, kv_heads, len, 1, keys])
                .expand([batch, kv_heads, len, group, keys]);
            let q_chunk = q.clone().narrow(2, start, len);
            let scores = q_chunk.matmul(k_sel.swap_dims(3, 4)).mul_scalar(scale);
            let (probs, lse) = masked_softmax(scores, allowed);
            (
                probs.matmul(v_sel),
                lse.reshape([batch, kv_heads, len, group]),
            )
        })
        .unzip::<_, _, Vec<_>, Vec<_>>();
    Attended {
        output: ungroup_heads(Tensor::cat(chunks.0, 2)),
        lse: lse_heads(Tensor::cat(chunks.1, 2)),
    }
}
