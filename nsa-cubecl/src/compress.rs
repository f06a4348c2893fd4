//! Compressed attention (Eq. 7-8) fused with block scoring (Eq. 9-10) and top-n selection
//! (Eq. 11): per query group, the selection-block scores live in shared memory only.

use cubecl::prelude::*;

use crate::keys::{key_range, KeySet};
use crate::tile::{
    attend_range, cube_position, group_rows, head_rows, load_rows, state_finish, state_new,
    tile_scores, TileConfig, NEG_BIG,
};

/// Score that forces a block into the selection.
const FORCED: f32 = 1.0e30;

/// Block sizes and selection counts (comptime).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SelectionConfig {
    /// Compression block `l`.
    pub compress_block: usize,
    /// Compression stride `d`.
    pub compress_stride: usize,
    /// Selection block `l'`.
    pub select_block: usize,
    /// Selected blocks `n`.
    pub n_selected: usize,
    /// Forced leading blocks.
    pub n_initial: usize,
    /// Forced local blocks.
    pub n_local: usize,
    /// Capacity of the shared block-score buffer, at least `ceil(T / l')`.
    pub max_blocks: usize,
}

impl SelectionConfig {
    /// The compressed keys' attention pattern.
    pub fn key_set(&self) -> KeySet {
        KeySet::Compressed {
            block: self.compress_block,
            stride: self.compress_stride,
        }
    }
}

/// `q: [B, T, H, d_k]`, `k_cmp: [B, N_cmp, H_kv, d_k]`, `v_cmp: [B, N_cmp, H_kv, d_v]` ->
/// `o: [B, T, H, d_v]`, `lse: [B, H, T]` (f32), `selected: [B, H_kv, T, n]` (ascending
/// block indices, -1 padded).
///
/// Query `t` sees compression block `i` iff `i*d + l - 1 <= t`. After the attention pass a
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
        let (_, visible) = key_range(t, k_cmp.shape(1), comptime!(sel.key_set()));

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

        // Selection-block scores: candidates are the blocks j with j * l' <= t.
        let candidates = t / sel.select_block + 1;
        let mut j = unit;
        while j < candidates {
            block_scores[j] = 0.0;
            j += units;
        }
        sync_cube();
        let mut row = 0usize;
        while row < visible {
            let valid = min(visible - row, cfg.tile_keys);
            // Keys of this tile into shared memory (values are not needed here).
            load_rows::<F>(
                k_cmp,
                k_at,
                row,
                valid,
                &mut keys,
                cfg.tile_keys,
                cfg.d_k,
                cfg.key_stride(),
                cfg.units(),
            );
            sync_cube();
            tile_scores::<F>(
                q,
                q_at,
                &keys,
                valid,
                scale,
                &mut scores,
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
                        p += (scores[g * cfg.tile_keys + key] - row_lse[g]).exp();
                    }
                }
                probs[key] = p;
                key += units;
            }
            sync_cube();
            // Each selection block touched by the tile is summed by one unit.
            let first_block = row * sel.compress_stride / sel.select_block;
            let last_start = (row + valid - 1) * sel.compress_stride;
            let last_block = min(
                (last_start + sel.compress_block - 1) / sel.select_block,
                candidates - 1,
            );
            let mut j = first_block + unit;
            while j <= last_block {
                let block_start = j * sel.select_block;
                let mut total = 0.0f32;
                for r in 0..valid {
                    let start = (row + r) * sel.compress_stride;
                    if start < block_start + sel.select_block
                        && start + sel.compress_block > block_start
                    {
                        total += probs[r];
                    }
                }
                block_scores[j] += total;
                j += units;
            }
            sync_cube();
            row += cfg.tile_keys;
        }

        // Forced blocks: the first n_initial and the n_local ending at t's own block.
        let own = t / sel.select_block;
        let mut j = unit;
        while j < candidates {
            if j < sel.n_initial || (j <= own && j + sel.n_local > own) {
                block_scores[j] = FORCED;
            }
            j += units;
        }
        sync_cube();

        // Top-n, one block per round: each unit scans its strided share, unit 0 reduces.
        let mut chosen = Array::<i32>::new(sel.n_selected);
        #[unroll]
        for round in 0..sel.n_selected {
            let mut best = f32::new(NEG_BIG);
            let mut best_j = 0u32;
            let mut j = unit;
            while j < candidates {
                if block_scores[j] > best {
                    best = block_scores[j];
                    best_j = j as u32;
                }
                j += units;
            }
            best_score[unit] = best;
            best_block[unit] = best_j;
            sync_cube();
            if unit == 0 {
                let mut win = f32::new(NEG_BIG);
                let mut win_j = 0u32;
                for u in 0..units {
                    let score = best_score[u];
                    if score > win || (score == win && score > NEG_BIG && best_block[u] < win_j) {
                        win = score;
                        win_j = best_block[u];
                    }
                }
                if win > NEG_BIG {
                    chosen[round] = win_j as i32;
                    block_scores[win_j as usize] = NEG_BIG;
                } else {
                    chosen[round] = -1;
                }
            }
            sync_cube();
        }

        // Ascending order, empty slots (-1) last.
        if unit == 0 {
            let base = b * selected.stride(0) + head * selected.stride(1) + t * selected.stride(2);
            for slot in 0..sel.n_selected {
                let mut pick = slot;
                for other in slot + 1..sel.n_selected {
                    let a = chosen[other];
                    let c = chosen[pick];
                    if a >= 0 && (c < 0 || a < c) {
                        pick = other;
                    }
                }
                let value = chosen[pick];
                chosen[pick] = chosen[slot];
                chosen[slot] = value;
                selected[base + slot * selected.stride(3)] = I::cast_from(value);
            }
        }
    }
}
