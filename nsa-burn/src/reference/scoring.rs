//! Block scoring (Eq. 9-10) and top-n block selection (Eq. 11).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

use super::position_grid;
use crate::NsaAttentionConfig;

/// Which compression blocks overlap which selection blocks (Eq. 9, overlap reading).
///
/// The paper prints the index `(l'/d) * j - m - n`, which mostly points at the previous
/// selection block. This project reads Eq. 9 as: selection block `j` (keys
/// `[j*l', (j+1)*l')`) scores the sum of `p_cmp[i]` over every compression block `i` (keys
/// `[i*d, i*d + l)`) whose span intersects it. With `l = d = l'` this is `p_slc = p_cmp`.
///
/// Returns `[N_cmp, N_slc]`, 1.0 where compression block `i` overlaps selection block `j`.
pub fn block_overlap<B: Backend>(
    num_compressed: usize,
    num_selection: usize,
    config: &NsaAttentionConfig,
    device: &B::Device,
) -> Tensor<B, 2> {
    let (i, j) = position_grid::<B>((0, num_compressed), (0, num_selection), device);
    let cmp_start = i.mul_scalar(config.compress_stride as i64);
    let slc_start = j.mul_scalar(config.select_block as i64);
    cmp_start
        .clone()
        .lower(slc_start.clone().add_scalar(config.select_block as i64))
        .bool_and(
            cmp_start
                .add_scalar(config.compress_block as i64)
                .greater(slc_start),
        )
        .float()
}

/// Top-n selection blocks for the queries `start..start + C` (Eq. 11).
///
/// Candidates of query `t` are the blocks `j` with `j * l' <= t`. The first
/// `n_initial_blocks` blocks and the `n_local_blocks` blocks ending at the one holding `t`
/// are always taken (when they are candidates); the other slots go to the highest
/// `scores`, ties to the lower block index. With fewer than `n` candidates, all are taken.
///
/// `scores: [B, H_kv, C, N_slc]` (group-summed block scores, not differentiated) ->
/// `[B, H_kv, C, n]` Int: the selected block indices in ascending order, padded with -1.
pub fn top_n_blocks<B: Backend>(
    scores: Tensor<B, 4>,
    start: usize,
    config: &NsaAttentionConfig,
) -> Tensor<B, 4, Int> {
    let [batch, kv_heads, chunk, blocks] = scores.dims();
    let device = scores.device();
    let n = config.n_selected;
    let shape = [batch, kv_heads, chunk, blocks];
    let broadcast =
        |grid: Tensor<B, 2, burn::tensor::Bool>| grid.reshape([1, 1, chunk, blocks]).expand(shape);

    let (t, j) = position_grid::<B>((start, start + chunk), (0, blocks), &device);
    let own_block = t.clone().div_scalar(config.select_block as i64);
    let candidate = j
        .clone()
        .mul_scalar(config.select_block as i64)
        .lower_equal(t);
    let initial = j.clone().lower_elem(config.n_initial_blocks as i64);
    let local = j.clone().lower_equal(own_block.clone()).bool_and(
        j.clone()
            .add_scalar(config.n_local_blocks as i64)
            .greater(own_block),
    );
    let forced = broadcast(initial.bool_or(local).bool_and(candidate.clone()));
    let candidate = broadcast(candidate);

    if blocks <= n {
        // Every candidate is taken; the candidates 0..=t/l' are a prefix, so the indices are
        // already ascending with the padding at the end.
        let j = j.reshape([1, 1, chunk, blocks]).expand(shape);
        let indices = j.mask_fill(candidate.bool_not(), -1);
        if blocks == n {
            return indices;
        }
        let padding = Tensor::full([batch, kv_heads, chunk, n - blocks], -1, &device);
        return Tensor::cat(vec![indices, padding], 3);
    }
    let key = scores
        .detach()
        .mask_fill(forced, f32::INFINITY)
        .mask_fill(candidate.clone().bool_not(), f32::NEG_INFINITY);
    // The n-th largest key; everything above it is in, and of the keys equal to it the
    // lowest-indexed ones fill the remaining slots. (A full sort rather than `topk`, which
    // burn-autodiff does not implement for float tensors.)
    let nth = key
        .clone()
        .sort_descending(3)
        .narrow(3, n - 1, 1)
        .expand(shape);
    let above = key.clone().greater(nth.clone());
    let tied = key.equal(nth);
    let slots_left = above
        .clone()
        .int()
        .sum_dim(3)
        .neg()
        .add_scalar(n as i64)
        .expand(shape);
    let tie_rank = tied.clone().int().cumsum(3);
    let selected = above
        .bool_or(tied.bool_and(tie_rank.lower_equal(slots_left)))
        .bool_and(candidate);

    // Sort the selected indices ascending: topk of (N_slc - j) over the selected blocks,
    // 0 for the others, then map back; 0 becomes the padding -1.
    let j = j.reshape([1, 1, chunk, blocks]).expand(shape);
    let key = j
        .neg()
        .add_scalar(blocks as i64)
        .mask_fill(selected.bool_not(), 0);
    let top = key.topk(n, 3);
    top.clone()
        .neg()
        .add_scalar(blocks as i64)
        .mask_fill(top.equal_elem(0), -1)
}
