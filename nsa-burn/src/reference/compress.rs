//! Compression branch (Eq. 7-8) fused with block scoring and top-n selection (Eq. 9-11).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use super::{
    block_scores, group_heads, grouped_masked_attention, heads_first, lse_heads, position_grid,
    query_chunks, top_n_blocks, ungroup_heads, Attended, EMPTY_ROW_LSE,
};
use crate::NsaAttentionConfig;

/// Attention over the compressed keys, and the blocks each query group selects.
///
/// Query `t` sees compression block `i` once the block has ended: `i*d + l - 1 <= t`.
/// Queries with `t < l - 1` see none: their output is exactly 0 and their selection falls
/// back to the forced blocks. The attention probabilities `p_cmp` (Eq. 8) are summed over
/// the `G` heads of each group (Eq. 10) and over the compression blocks overlapping each
/// selection block ([`block_scores`], Eq. 9) to score the selection blocks, which then go
/// through [`top_n_blocks`]. Scores are computed chunk by chunk and never stored whole.
///
/// The queries sit at positions `query_start..query_start + T` (`query_start = 0` for
/// self-attention; queries at an offset into a longer sequence, as a cache serves them,
/// pass their first position).
///
/// `q: [B, T, H, d_k]`, `k_cmp: [B, N_cmp, H_kv, d_k]`, `v_cmp: [B, N_cmp, H_kv, d_v]` with
/// `N_cmp = config.num_compressed_blocks(query_start + T)` -> (`o_cmp: [B, T, H, d_v]` with
/// its row log-sum-exp `[B, H, T]`, `selected: [B, H_kv, T, n]` Int, ascending, padded with
/// -1).
pub fn compressed_attention<B: Backend>(
    q: Tensor<B, 4>,
    k_cmp: Tensor<B, 4>,
    v_cmp: Tensor<B, 4>,
    query_start: usize,
    config: &NsaAttentionConfig,
) -> (Attended<B>, Tensor<B, 4, Int>) {
    let [batch, seq, heads, d_k] = q.dims();
    let [_, num_compressed, kv_heads, d_v] = v_cmp.dims();
    let group = heads / kv_heads;
    let device = q.device();
    let dtype = q.dtype();
    let scale = config.scale(d_k);
    let num_selection = config.num_selection_blocks(query_start + seq);
    let (block, stride) = (config.compress_block, config.compress_stride);

    let q = group_heads(q, kv_heads);
    let k_cmp = heads_first(k_cmp);
    let v_cmp = heads_first(v_cmp);
    let mut outputs = Vec::new();
    let mut row_lse = Vec::new();
    let mut selections = Vec::new();
    for (start, end) in query_chunks(seq, config.query_chunk) {
        let len = end - start;
        // The chunk's query positions.
        let (first, last) = (query_start + start, query_start + end);
        // Blocks that have ended by the chunk's last query.
        let visible = config.num_compressed_blocks(last).min(num_compressed);
        let (o, lse, scores) = if visible == 0 {
            (
                Tensor::zeros([batch, kv_heads, len, group, d_v], (&device, dtype)),
                Tensor::full(
                    [batch, kv_heads, len, group],
                    EMPTY_ROW_LSE,
                    (&device, dtype),
                ),
                Tensor::zeros([batch, kv_heads, len, num_selection], (&device, dtype)),
            )
        } else {
            let q_chunk =
                q.clone()
                    .narrow(2, start, len)
                    .reshape([batch, kv_heads, len * group, d_k]);
            let (t, i) = position_grid::<B>((first, last), (0, visible), &device);
            let block_end = i
                .clone()
                .mul_scalar(stride as i64)
                .add_scalar(block as i64 - 1);
            let sees_block = block_end.lower_equal(t.clone());
            // A query that sees no block attends block 0 and is then zeroed, so the softmax
            // never meets an all-masked row (which would give NaN).
            let blind = t.lower_elem(block as i64 - 1);
            let allowed = sees_block.bool_or(blind.clone().bool_and(i.equal_elem(0)));
            let (o, probs, lse) = grouped_masked_attention(
                q_chunk,
                k_cmp.clone().narrow(2, 0, visible),
                v_cmp.clone().narrow(2, 0, visible),
                allowed,
                scale,
            );
            let blind_rows = blind
                .narrow(1, 0, 1)
                .reshape([1, 1, len, 1, 1])
                .expand([batch, kv_heads, len, group, 1]);
            let o = o.reshape([batch, kv_heads, len, group, d_v]).mask_fill(
                blind_rows
                    .clone()
                    .expand([batch, kv_heads, len, group, d_v]),
                0.0,
            );
            let lse = lse.reshape([batch, kv_heads, len, group]).mask_fill(
                blind_rows.clone().reshape([batch, kv_heads, len, group]),
                EMPTY_ROW_LSE,
            );
            let group_probs = probs
                .detach()
                .reshape([batch, kv_heads, len, group, visible])
                .mask_fill(
                    blind_rows.expand([batch, kv_heads, len, group, visible]),
                    0.0,
                )
                .sum_dim(3)
                .reshape([batch * kv_heads * len, visible]);
            let scores = block_scores(group_probs, num_selection, config).reshape([
                batch,
                kv_heads,
                len,
                num_selection,
            ]);
            (o, lse, scores)
        };
        outputs.push(o);
        row_lse.push(lse);
        selections.push(top_n_blocks(scores, first, config));
    }
    (
        Attended {
            output: ungroup_heads(Tensor::cat(outputs, 2)),
            lse: lse_heads(Tensor::cat(row_lse, 2)),
        },
        Tensor::cat(selections, 2),
    )
}
