//! Compressed attention (Eq. 7-8) fused with block scoring (Eq. 9-10) and top-n selection
//! (Eq. 11) on the portable tile: per query group, the selection-block scores live in
//! shared memory only. When a decoding step splits the attention over cubes
//! ([`crate::portable::range`]), [`compressed_selection_kernel()`] scores and selects from
//! the merged log-sum-exp. The tensor-core path runs the same branch as two kernels,
//! [`crate::tensor_core::range`] (attention) and [`crate::tensor_core::scores`] (scoring
//! and top-n).

use cubecl::prelude::*;

use crate::common::geometry::{
    cube_position, group_rows, head_rows, lse_at, recomputed_probability, Rows, NEG_BIG,
};
use crate::common::keys::{index_min, key_range};
use crate::common::selection::{
    add_key_probabilities, ascending_slot, beats, force_blocks, strided_best, tile_block_keys,
    tile_blocks, SelectionConfig,
};
use crate::portable::tile::{
    attend_range, load_rows, state_finish, state_new, tile_scores, TileConfig,
};

/// `q: [B, T, H, d_k]` (positions `query_start .. query_start + T`),
/// `k_cmp: [B, N_cmp, H_kv, d_k]`, `v_cmp: [B, N_cmp, H_kv, d_v]` -> `o: [B, T, H, d_v]`,
/// `lse: [B, H, T]` (f32), `selected: [B, H_kv, T, n]` (ascending block indices, -1
/// padded).
///
/// The query at position `p` sees compression block `i` iff `i*d + l - 1 <= p`. After the attention pass a
/// second pass recomputes each visible block's scores, turns them into probabilities with
/// the row log-sum-exp, sums them over the group (Eq. 10) and adds them to every selection
/// block the compression block overlaps (Eq. 9, overlap reading). Top-n then takes the
/// forced blocks and the highest scores, ties to the lower index.
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn compressed_attention_kernel<F: Float, I: Int>(
    q: &Tensor<F>,
    k_cmp: &Tensor<F>,
    v_cmp: &Tensor<F>,
    o: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    selected: &mut Tensor<I>,
    scale: f32,
    query_start: u32,
    #[comptime] cfg: TileConfig,
    #[comptime] sel: SelectionConfig,
) {
    let mut keys = SharedMemory::<f32>::new(comptime!(cfg.tile_keys * cfg.key_stride()));
    let mut values = SharedMemory::<f32>::new(comptime!(cfg.tile_keys * cfg.d_v));
    let mut scores = SharedMemory::<f32>::new(comptime!(cfg.group * cfg.tile_keys));
    let mut row_lse = SharedMemory::<f32>::new(cfg.group);
    let mut probs = SharedMemory::<f32>::new(cfg.tile_keys);
    let mut block_scores = SharedMemory::<f32>::new(sel.max_blocks);
    let mut best_score = SharedMemory::<f32>::new(comptime!(cfg.units()));
    let mut best_block = SharedMemory::<u32>::new(comptime!(cfg.units()));
    let (b, head, t, active) = cube_position(q.shape(0), k_cmp.shape(2), q.shape(1));
    if active {
        let unit = UNIT_POS as usize;
        let units = comptime!(cfg.units());
        let q_at = group_rows::<F>(q, b, t, head, cfg.group);
        let k_at = head_rows::<F>(k_cmp, b, head);
        let v_at = head_rows::<F>(v_cmp, b, head);
        let position = t + usize::cast_from(query_start);
        let (_, visible) = key_range(position, k_cmp.shape(1), comptime!(sel.key_set()));

        // Attention over the visible compressed keys.
        let mut state = state_new(cfg);
        attend_range::<F>(
            q,
            q_at,
            k_cmp,
            k_at,
            v_cmp,
            v_at,
            0,
            visible,
            scale,
            &mut state,
            &mut keys,
            &mut values,
            &mut scores,
            cfg,
        );
        state_finish::<F>(&state, o, lse, b, t, head, cfg);
        if unit % cfg.parts == 0 {
            row_lse[unit / cfg.parts] = state[0] + state[1].ln();
        }

        score_blocks::<F>(
            q,
            q_at,
            k_cmp,
            k_at,
            visible,
            position,
            scale,
            &row_lse,
            &mut keys,
            &mut scores,
            &mut probs,
            &mut block_scores,
            cfg,
            sel,
        );

        let out = b * selected.stride(0) + head * selected.stride(1) + t * selected.stride(2);
        pick_blocks::<I>(
            &mut block_scores,
            0,
            position,
            &mut best_score,
            &mut best_block,
            selected,
            out,
            units,
            sel,
        );
    }
}

/// Block scoring (Eq. 9-10) and top-n (Eq. 11) alone, for a compression branch whose
/// attention ran split over its keys ([`crate::portable::range`]): `q: [B, T, H, d_k]` at
/// positions `query_start .. query_start + T`, `k_cmp: [B, N_cmp, H_kv, d_k]` and the rows'
/// log-sum-exp `lse: [B, H, T]` (f32) -> `selected: [B, H_kv, T, n]` (ascending block
/// indices, -1 padded). One cube per `(b, KV head, t)`.
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn compressed_selection_kernel<F: Float, I: Int>(
    q: &Tensor<F>,
    k_cmp: &Tensor<F>,
    lse: &Tensor<f32>,
    selected: &mut Tensor<I>,
    scale: f32,
    query_start: u32,
    #[comptime] cfg: TileConfig,
    #[comptime] sel: SelectionConfig,
) {
    let mut keys = SharedMemory::<f32>::new(comptime!(cfg.tile_keys * cfg.key_stride()));
    let mut scores = SharedMemory::<f32>::new(comptime!(cfg.group * cfg.tile_keys));
    let mut row_lse = SharedMemory::<f32>::new(cfg.group);
    let mut probs = SharedMemory::<f32>::new(cfg.tile_keys);
    let mut block_scores = SharedMemory::<f32>::new(sel.max_blocks);
    let mut best_score = SharedMemory::<f32>::new(comptime!(cfg.units()));
    let mut best_block = SharedMemory::<u32>::new(comptime!(cfg.units()));
    let (b, head, t, active) = cube_position(q.shape(0), k_cmp.shape(2), q.shape(1));
    if active {
        let unit = UNIT_POS as usize;
        let q_at = group_rows::<F>(q, b, t, head, cfg.group);
        let k_at = head_rows::<F>(k_cmp, b, head);
        let position = t + usize::cast_from(query_start);
        let (_, visible) = key_range(position, k_cmp.shape(1), comptime!(sel.key_set()));
        if unit < cfg.group {
            row_lse[unit] = lse[lse_at(lse, b, head * cfg.group + unit, t)];
        }
        sync_cube();
        score_blocks::<F>(
            q,
            q_at,
            k_cmp,
            k_at,
            visible,
            position,
            scale,
            &row_lse,
            &mut keys,
            &mut scores,
            &mut probs,
            &mut block_scores,
            cfg,
            sel,
        );
        let out = b * selected.stride(0) + head * selected.stride(1) + t * selected.stride(2);
        pick_blocks::<I>(
            &mut block_scores,
            0,
            position,
            &mut best_score,
            &mut best_block,
            selected,
            out,
            comptime!(cfg.units()),
            sel,
        );
    }
}

/// Eq. 9-10 for the query group at key position `position`: zeroes the scores of its
/// candidate selection blocks (`j * l' <= position`) in `block_scores`, then walks the `visible` compressed keys tile by tile, recomputes each
/// key's probability from the rows' log-sum-exp `row_lse` (one per query head of the group),
/// sums it over the group and adds it to every candidate block the key overlaps. The whole
/// cube calls it; it uses `keys`, `scores` and `probs` as scratch.
#[cube]
#[allow(clippy::too_many_arguments)]
fn score_blocks<F: Float>(
    q: &Tensor<F>,
    q_at: Rows,
    k_cmp: &Tensor<F>,
    k_at: Rows,
    visible: usize,
    position: usize,
    scale: f32,
    row_lse: &SharedMemory<f32>,
    keys: &mut SharedMemory<f32>,
    scores: &mut SharedMemory<f32>,
    probs: &mut SharedMemory<f32>,
    block_scores: &mut SharedMemory<f32>,
    #[comptime] cfg: TileConfig,
    #[comptime] sel: SelectionConfig,
) {
    let unit = UNIT_POS as usize;
    let units = comptime!(cfg.units());
    // Candidates are the blocks j with j * l' <= p.
    let candidates = position / sel.select_block + 1;
    let mut j = unit;
    while j < candidates {
        block_scores[j] = 0.0;
        j += units;
    }
    sync_cube();
    let mut row = 0usize;
    while row < visible {
        let valid = index_min(visible - row, cfg.tile_keys);
        // Keys of this tile into shared memory (values are not needed here).
        load_rows::<F, f32>(
            k_cmp,
            k_at,
            row,
            valid,
            keys,
            cfg.tile_keys,
            cfg.d_k,
            cfg.key_stride(),
            cfg.units(),
        );
        sync_cube();
        tile_scores::<F>(
            q,
            q_at,
            keys,
            valid,
            scale,
            scores,
            cfg.d_k,
            cfg.key_stride(),
            cfg,
        );
        sync_cube();
        // p_cmp summed over the group, per compression block of the tile.
        let mut key = unit;
        while key < cfg.tile_keys {
            let mut p = 0.0f32;
            if key < valid {
                #[unroll]
                for g in 0..cfg.group {
                    p += recomputed_probability(scores[g * cfg.tile_keys + key], row_lse[g]);
                }
            }
            probs[key] = p;
            key += units;
        }
        sync_cube();
        // Each selection block touched by the tile is summed by one unit.
        let (first_block, last_block) = tile_blocks(row, valid, candidates, sel);
        let mut j = first_block + unit;
        while j <= last_block {
            let (lo, hi) = tile_block_keys(row, valid, j, sel);
            let (first, end) = (lo - row, hi - row);
            block_scores[j] = add_key_probabilities(
                block_scores[j],
                probs,
                0usize,
                first,
                end,
                comptime!(1usize),
                comptime!(0usize),
            );
            j += units;
        }
        sync_cube();
        row += cfg.tile_keys;
    }
}

/// Eq. 11 for the query at position `t` over the candidate scores `block_scores[at..]`:
/// forces the first `n_initial_blocks` blocks and the `n_local_blocks` ending at `t`'s own, takes the `n`
/// highest (ties to the lower index) and writes them ascending, `-1` padded, to
/// `selected[out..]` (`stride(3)` apart). The whole cube calls it; it clobbers the scores.
#[cube]
#[allow(clippy::too_many_arguments)]
fn pick_blocks<I: Int>(
    block_scores: &mut SharedMemory<f32>,
    at: usize,
    t: usize,
    best_score: &mut SharedMemory<f32>,
    best_block: &mut SharedMemory<u32>,
    selected: &mut Tensor<I>,
    out: usize,
    #[comptime] units: usize,
    #[comptime] sel: SelectionConfig,
) {
    let unit = UNIT_POS as usize;
    let candidates = t / sel.select_block + 1;
    force_blocks(block_scores, at, t, unit, units, sel);
    sync_cube();

    // One block per round: each unit scans its strided share, unit 0 reduces.
    let mut chosen = Array::<i32>::new(sel.n_selected);
    #[unroll]
    for round in 0..sel.n_selected {
        let (best, best_j) = strided_best(block_scores, at, unit, candidates, units);
        best_score[unit] = best;
        best_block[unit] = best_j;
        sync_cube();
        if unit == 0 {
            let mut win = f32::new(NEG_BIG);
            let mut win_j = 0u32;
            for u in 0..units {
                if beats(best_score[u], best_block[u], win, win_j) {
                    win = best_score[u];
                    win_j = best_block[u];
                }
            }
            if win > NEG_BIG {
                chosen[round] = win_j as i32;
                block_scores[at + win_j as usize] = NEG_BIG;
            } else {
                chosen[round] = -1;
            }
        }
        sync_cube();
    }

    if unit == 0 {
        #[unroll]
        for i in 0..sel.n_selected {
            let slot = ascending_slot(&chosen, i, sel.n_selected);
            selected[out + slot * selected.stride(3)] = I::cast_from(chosen[i]);
        }
    }
}
