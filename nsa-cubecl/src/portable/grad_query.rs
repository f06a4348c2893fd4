//! Backward pass, query side, on the portable tile: `dQ` of one branch from the saved row
//! log-sum-exp.
//!
//! With `P = exp(S - lse)` the forward probabilities, `dP = dO V^T` and
//! `delta = rowsum(dO * O)`: `dS = P * (dP - delta)` and `dQ = scale * dS K`. The cube of
//! `(b, KV head, t)` walks the same keys as the forward kernel of the branch, in the same
//! tiles, so the gradient of every query row is a fixed-order sum (deterministic).

use cubecl::prelude::*;

use crate::common::geometry::{
    cube_position, delta_at, group_rows, head_rows, lse_at, recomputed_probability, Rows,
};
use crate::common::keys::{index_min, key_range, KeySet};
use crate::common::selection::selected_tile;
use crate::portable::tile::{load_key_values, tile_scores, TileConfig};

/// Shared-memory rows of one key tile and the scores the tile step needs.
#[derive(CubeType)]
struct GradQueryTile {
    keys: SharedMemory<f32>,
    values: SharedMemory<f32>,
    scores: SharedMemory<f32>,
    grads: SharedMemory<f32>,
}

/// The row statistics of unit `(head, part)`: its query row's log-sum-exp and `delta`.
#[derive(CubeType, Clone, Copy)]
struct RowStats {
    lse: f32,
    delta: f32,
}

/// Folds the key rows `first_row .. first_row + valid` into this unit's share of `dQ / scale`.
/// Every unit of the cube must call it (it synchronizes the cube).
#[cube]
#[allow(clippy::too_many_arguments)]
fn grad_query_tile<F: Float>(
    q: &Tensor<F>,
    q_at: Rows,
    d_o: &Tensor<F>,
    d_o_at: Rows,
    k: &Tensor<F>,
    k_at: Rows,
    v: &Tensor<F>,
    v_at: Rows,
    first_row: usize,
    valid: usize,
    scale: f32,
    stats: RowStats,
    acc: &mut Array<f32>,
    tile: &mut GradQueryTile,
    #[comptime] cfg: TileConfig,
) {
    let value_stride = comptime!(cfg.d_v + 1);
    load_key_values::<F>(
        k,
        k_at,
        v,
        v_at,
        first_row,
        valid,
        &mut tile.keys,
        &mut tile.values,
        value_stride,
        cfg,
    );
    sync_cube();
    tile_scores::<F>(
        q,
        q_at,
        &tile.keys,
        valid,
        scale,
        &mut tile.scores,
        cfg.d_k,
        cfg.key_stride(),
        cfg,
    );
    tile_scores::<F>(
        d_o,
        d_o_at,
        &tile.values,
        valid,
        1.0,
        &mut tile.grads,
        cfg.d_v,
        value_stride,
        cfg,
    );
    sync_cube();
    let head = UNIT_POS as usize / cfg.parts;
    let part = UNIT_POS as usize % cfg.parts;
    let row = head * cfg.tile_keys;
    for key in 0..valid {
        let p = recomputed_probability(tile.scores[row + key], stats.lse);
        let ds = p * (tile.grads[row + key] - stats.delta);
        #[unroll]
        for i in 0..comptime!(cfg.query_width()) {
            let col = part + i * cfg.parts;
            if col < cfg.d_k {
                acc[i] += ds * tile.keys[key * cfg.key_stride() + col];
            }
        }
    }
    sync_cube();
}

/// `q: [B, T, H, d_k]`, `k: [B, L, H_kv, d_k]`, `v: [B, L, H_kv, d_v]` (the branch's keys),
/// `d_o: [B, T, H, d_v]`, `delta: [B, T, H]` f32 (`rowsum(dO * O)`), `lse: [B, H, T]` f32,
/// `selected: [B, H_kv, T, n]` (read by [`KeySet::Selected`] only) -> `dq: [B, T, H, d_k]`.
/// One cube per `(b, KV head, t)`; for the selection branch `tile_keys` divides `l'`.
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn grad_query_kernel<F: Float, I: Int>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    d_o: &Tensor<F>,
    delta: &Tensor<f32>,
    lse: &Tensor<f32>,
    selected: &Tensor<I>,
    dq: &mut Tensor<F>,
    scale: f32,
    #[comptime] cfg: TileConfig,
    #[comptime] keys: KeySet,
) {
    let mut tile = GradQueryTile {
        keys: SharedMemory::<f32>::new(comptime!(cfg.tile_keys * cfg.key_stride())),
        values: SharedMemory::<f32>::new(comptime!(cfg.tile_keys * (cfg.d_v + 1))),
        scores: SharedMemory::<f32>::new(comptime!(cfg.group * cfg.tile_keys)),
        grads: SharedMemory::<f32>::new(comptime!(cfg.group * cfg.tile_keys)),
    };
    let (b, kv_head, t, active) = cube_position(q.shape(0), k.shape(2), q.shape(1));
    if active {
        let q_at = group_rows::<F>(q, b, t, kv_head, cfg.group);
        let d_o_at = group_rows::<F>(d_o, b, t, kv_head, cfg.group);
        let k_at = head_rows::<F>(k, b, kv_head);
        let v_at = head_rows::<F>(v, b, kv_head);
        let head = UNIT_POS as usize / cfg.parts;
        let part = UNIT_POS as usize % cfg.parts;
        let row_head = kv_head * cfg.group + head;
        let stats = RowStats {
            lse: lse[lse_at(lse, b, row_head, t)],
            delta: delta[delta_at(delta, b, t, row_head)],
        };
        let mut acc = Array::<f32>::new(comptime!(cfg.query_width()));
        #[unroll]
        for i in 0..comptime!(cfg.query_width()) {
            acc[i] = 0.0;
        }
        if comptime!(keys.is_selected()) {
            let block = comptime!(keys.select_block());
            let slots =
                b * selected.stride(0) + kv_head * selected.stride(1) + t * selected.stride(2);
            // Uniform loops, as in the forward kernel: the block index only sets `valid`.
            for slot in 0..selected.shape(3) {
                let index = i32::cast_from(selected[slots + slot * selected.stride(3)]);
                #[unroll]
                for part_of_block in 0..comptime!(block / cfg.tile_keys) {
                    let (first, valid) =
                        selected_tile(index, part_of_block, t, block, cfg.tile_keys);
                    grad_query_tile::<F>(
                        q, q_at, d_o, d_o_at, k, k_at, v, v_at, first, valid, scale, stats,
                        &mut acc, &mut tile, cfg,
                    );
                }
            }
        } else {
            let (start, end) = key_range(t, k.shape(1), keys);
            let mut row = start;
            while row < end {
                let valid = index_min(end - row, cfg.tile_keys);
                grad_query_tile::<F>(
                    q, q_at, d_o, d_o_at, k, k_at, v, v_at, row, valid, scale, stats, &mut acc,
                    &mut tile, cfg,
                );
                row += cfg.tile_keys;
            }
        }
        let dq_at = group_rows::<F>(dq, b, t, kv_head, cfg.group);
        #[unroll]
        for i in 0..comptime!(cfg.query_width()) {
            let col = part + i * cfg.parts;
            if col < cfg.d_k {
                dq[dq_at.base + head * dq_at.head_stride + col * dq_at.dim_stride] =
                    F::cast_from(acc[i] * scale);
            }
        }
    }
}
