//! Block scoring (Eq. 9-10) and top-n block selection (Eq. 11).

use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};

use super::position_grid;
use crate::NsaAttentionConfig;

/// The compression blocks `first..=last` that overlap selection block `j` (Eq. 9, overlap
/// reading), among the first `visible`; `None` when none of them does.
///
/// The paper prints the index `(l'/d) * j - m - n`, which mostly points at the previous
/// selection block. This project reads Eq. 9 as: selection block `j` (keys
/// `[j*l', (j+1)*l')`) scores the sum of `p_cmp[i]` over every compression block `i` (keys
/// `[i*d, i*d + l)`) whose span intersects it. With `l = d = l'` this is `p_slc = p_cmp`.
fn overlapping_blocks(
    j: usize,
    visible: usize,
    config: &NsaAttentionConfig,
) -> Option<(usize, usize)> {
    let (block, stride, select) = (
        config.compress_block,
        config.compress_stride,
        config.select_block,
    );
    let start = j * select;
    // i * d + l > start and i * d < start + l'.
    let first = if start >= block {
        (start - block) / stride + 1
    } else {
        0
    };
    let last = ((start + select - 1) / stride).min(visible.checked_sub(1)?);
    (first <= last).then_some((first, last))
}

/// Selection-block scores (Eq. 9, overlap reading): `probs: [R, N]`, the group-summed
/// probabilities of the first `N` compression blocks -> `[R, N_slc]`, block `j` scoring
/// `((p[i0] + p[i1]) + ..)` over the compression blocks `i0 < i1 < ..` that overlap it
/// (see [`overlapping_blocks`]).
///
/// The sum runs left to right, one compression block at a time, as the kernels add them: so
/// blocks whose overlapping compression blocks have equal probabilities (equal keys) tie
/// exactly, in every implementation, and the tie rule of [`top_n_blocks`] decides them
/// alike everywhere.
pub fn block_scores<B: Backend>(
    probs: Tensor<B, 2>,
    num_selection: usize,
    config: &NsaAttentionConfig,
) -> Tensor<B, 2> {
    let [rows, visible] = probs.dims();
    let device = probs.device();
    let spans: Vec<Option<(usize, usize)>> = (0..num_selection)
        .map(|j| overlapping_blocks(j, visible, config))
        .collect();
    let widest = spans
        .iter()
        .flatten()
        .map(|(first, last)| last - first + 1)
        .max()
        .unwrap_or(0);
    let mut scores = Tensor::<B, 2>::zeros([rows, num_selection], (&device, probs.dtype()));
    for offset in 0..widest {
        // Block j's `offset`-th overlapping compression block, or none.
        let (index, valid): (Vec<i64>, Vec<bool>) = spans
            .iter()
            .map(|span| match span {
                Some((first, last)) if first + offset <= *last => ((first + offset) as i64, true),
                _ => (0, false),
            })
            .unzip();
        let index =
            Tensor::<B, 1, Int>::from_data(TensorData::new(index, [num_selection]), &device);
        let unused: Vec<bool> = valid.iter().map(|valid| !valid).collect();
        let unused =
            Tensor::<B, 1, Bool>::from_data(TensorData::new(unused, [num_selection]), &device)
                .reshape([1, num_selection])
                .expand([rows, num_selection]);
        scores = scores + probs.clone().select(1, index).mask_fill(unused, 0.0);
    }
    scores
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
