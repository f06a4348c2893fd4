//! Backward pass, key side, on the portable tile: `dK` and `dV` of one branch from the saved
//! row log-sum-exp.
//!
//! One cube owns a tile of `tile_keys` key rows of one `(batch, KV head)` and walks the
//! queries that see them, in chunks of `units` positions ([`crate::common::key_walk`]: for
//! the selection branch, one bit of the selection bitmap of [`crate::common::bitmap`] per
//! position), and the list's `(position, head)` rows go through in steps of `rows` rows:
//! `P = exp(S - lse)`, `dS = P * (dP - delta)`, `dV += P^T dO`, `dK += scale * dS^T Q`.
//! Every output is a fixed-order sum (deterministic).
//!
//! Every loop inside a step is unrolled, so that a step costs one iteration of the step
//! loop: Mesa's llvmpipe (lavapipe) ends all loops of an invocation once they have run
//! 65,535 iterations together, returning wrong values without an error, and a key tile
//! seen by many query rows (all compressed keys, with `G = 64` and a few thousand
//! positions) walks thousands of steps.

use cubecl::prelude::*;

use crate::common::geometry::{cube_tiles_at, head_rows, recomputed_probability};
use crate::common::key_walk::{compact_positions, load_row_stats};
use crate::common::keys::{first_query, index_min, query_end, query_sees, KeySet};
use crate::portable::tile::load_rows;

/// Comptime shape of the key-side backward cube.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyTileConfig {
    /// Query heads per KV head, `G`.
    pub group: usize,
    /// Query/key head dimension.
    pub d_k: usize,
    /// Value head dimension.
    pub d_v: usize,
    /// Key rows per cube.
    pub tile_keys: usize,
    /// `(position, head)` query rows per step.
    pub rows: usize,
    /// Units per cube (also the query positions checked per chunk).
    pub units: usize,
}

impl KeyTileConfig {
    /// Outputs each unit accumulates for `dim` values per key row,
    /// `ceil(tile_keys * dim / units)` (`dim` is `d_k` for `dK`, `d_v` for `dV`).
    pub fn width(&self, dim: usize) -> usize {
        (self.tile_keys * dim).div_ceil(self.units)
    }

    /// f32 words of shared memory: keys, values, query and output-gradient rows (all
    /// padded by one word), probabilities and score gradients, row statistics, position list.
    pub fn shared_words(&self) -> usize {
        let padded = self.d_k + 1 + self.d_v + 1;
        (self.tile_keys + self.rows) * padded
            + 2 * self.rows * self.tile_keys
            + 3 * self.rows
            + 2 * self.units
    }
}

/// Shared memory of the cube.
#[derive(CubeType)]
struct KeyTile {
    keys: SharedMemory<f32>,
    values: SharedMemory<f32>,
    queries: SharedMemory<f32>,
    grads: SharedMemory<f32>,
    probs: SharedMemory<f32>,
    score_grads: SharedMemory<f32>,
    row_lse: SharedMemory<f32>,
    row_delta: SharedMemory<f32>,
    /// Query position + 1 of each row of the step, 0 for an empty row.
    row_position: SharedMemory<u32>,
    /// Whether each position of the chunk sees the tile, then the running count.
    takes: SharedMemory<u32>,
    /// Positions of the chunk that see the tile, in order.
    positions: SharedMemory<u32>,
}

/// Copies the step's query rows `first_row .. first_row + cfg.rows` (row `r` of the list is
/// position `positions[r / G]`, head `r % G` of the group; rows past `rows` are zero) of
/// `src: [B, T, H, dim]` into `dst` as f32 rows `dim + 1` words apart.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_step_rows<F: Float>(
    src: &Tensor<F>,
    positions: &SharedMemory<u32>,
    first_row: usize,
    rows: usize,
    b: usize,
    kv_head: usize,
    dst: &mut SharedMemory<f32>,
    #[comptime] dim: usize,
    #[comptime] cfg: KeyTileConfig,
) {
    #[unroll]
    for i in 0..comptime!((cfg.rows * dim).div_ceil(cfg.units)) {
        let idx = UNIT_POS as usize + i * cfg.units;
        if idx < comptime!(cfg.rows * dim) {
            let r = idx / dim;
            let c = idx % dim;
            let row = first_row + r;
            let mut value = 0.0f32;
            if row < rows {
                let t = positions[row / cfg.group] as usize;
                let h = kv_head * cfg.group + row % cfg.group;
                value = f32::cast_from(
                    src[b * src.stride(0)
                        + t * src.stride(1)
                        + h * src.stride(2)
                        + c * src.stride(3)],
                );
            }
            dst[r * (dim + 1) + c] = value;
        }
    }
}

/// Adds `weights^T rows` to this unit's outputs: output `(key, c)` (unit `u` owns
/// `u, u + units, ..` of the `tile_keys * dim` outputs) gains
/// `sum_r weights[r, key] * rows[r, c]`, with `weights` `[rows, tile_keys]` and `rows`
/// `[rows, dim]` (`dim + 1` words apart) in shared memory.
#[cube]
fn accumulate<F: Float>(
    acc: &mut Array<f32>,
    weights: &SharedMemory<f32>,
    rows: &SharedMemory<f32>,
    #[comptime] dim: usize,
    #[comptime] cfg: KeyTileConfig,
) {
    let unit = UNIT_POS as usize;
    #[unroll]
    for i in 0..comptime!(cfg.width(dim)) {
        let idx = unit + i * cfg.units;
        if idx < comptime!(cfg.tile_keys * dim) {
            let key = idx / dim;
            let c = idx % dim;
            let mut sum = 0.0f32;
            #[unroll]
            for r in 0..cfg.rows {
                sum += weights[r * cfg.tile_keys + key] * rows[r * (dim + 1) + c];
            }
            acc[i] += sum;
        }
    }
}

/// Writes this unit's outputs times `scale` to the key rows `first_key ..
/// first_key + n_keys` of `out: [B, L, H_kv, dim]` at `(b, kv_head)`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store<F: Float>(
    out: &mut Tensor<F>,
    b: usize,
    kv_head: usize,
    first_key: usize,
    n_keys: usize,
    acc: &Array<f32>,
    scale: f32,
    #[comptime] dim: usize,
    #[comptime] cfg: KeyTileConfig,
) {
    let at = head_rows::<F>(out, b, kv_head);
    let unit = UNIT_POS as usize;
    #[unroll]
    for i in 0..comptime!(cfg.width(dim)) {
        let idx = unit + i * cfg.units;
        let key = idx / dim;
        if idx < comptime!(cfg.tile_keys * dim) && key < n_keys {
            let c = idx % dim;
            out[at.base + (first_key + key) * at.row_stride + c * at.dim_stride] =
                F::cast_from(acc[i] * scale);
        }
    }
}

/// `q: [B, T, H, d_k]`, `k: [B, L, H_kv, d_k]`, `v: [B, L, H_kv, d_v]` (the branch's keys),
/// `d_o: [B, T, H, d_v]`, `delta: [B, T, H]` f32, `lse: [B, H, T]` f32,
/// `bitmap: [B, H_kv, n_blocks, ceil(T / 32)]` (the selection bitmap of
/// [`crate::bitmap::selection_bitmap_kernel()`], read by [`KeySet::Selected`] only) ->
/// `dk: [B, L, H_kv, d_k]`, `dv: [B, L, H_kv, d_v]`. One cube per
/// `(b, KV head, tile of key rows)`; for the selection branch `tile_keys` divides `l'`.
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn grad_key_value_kernel<F: Float, I: Int>(
    q: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    d_o: &Tensor<F>,
    delta: &Tensor<f32>,
    lse: &Tensor<f32>,
    bitmap: &Tensor<I>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    scale: f32,
    #[comptime] cfg: KeyTileConfig,
    #[comptime] keys: KeySet,
) {
    let key_stride = comptime!(cfg.d_k + 1);
    let value_stride = comptime!(cfg.d_v + 1);
    let mut tile = KeyTile {
        keys: SharedMemory::<f32>::new(comptime!(cfg.tile_keys * (cfg.d_k + 1))),
        values: SharedMemory::<f32>::new(comptime!(cfg.tile_keys * (cfg.d_v + 1))),
        queries: SharedMemory::<f32>::new(comptime!(cfg.rows * (cfg.d_k + 1))),
        grads: SharedMemory::<f32>::new(comptime!(cfg.rows * (cfg.d_v + 1))),
        probs: SharedMemory::<f32>::new(comptime!(cfg.rows * cfg.tile_keys)),
        score_grads: SharedMemory::<f32>::new(comptime!(cfg.rows * cfg.tile_keys)),
        row_lse: SharedMemory::<f32>::new(cfg.rows),
        row_delta: SharedMemory::<f32>::new(cfg.rows),
        row_position: SharedMemory::<u32>::new(cfg.rows),
        takes: SharedMemory::<u32>::new(cfg.units),
        positions: SharedMemory::<u32>::new(cfg.units),
    };
    let unit = UNIT_POS as usize;
    let n_keys_total = k.shape(1);
    let tiles = (n_keys_total + cfg.tile_keys - 1) / cfg.tile_keys;
    let (b, kv_head, tile_index, active) = cube_tiles_at(CUBE_POS, q.shape(0), k.shape(2), tiles);
    let first_key = tile_index * cfg.tile_keys;
    if active {
        let seq = q.shape(1);
        let n_keys = index_min(cfg.tile_keys, n_keys_total - first_key);
        load_rows::<F, f32>(
            k,
            head_rows::<F>(k, b, kv_head),
            first_key,
            n_keys,
            &mut tile.keys,
            cfg.tile_keys,
            cfg.d_k,
            key_stride,
            cfg.units,
        );
        load_rows::<F, f32>(
            v,
            head_rows::<F>(v, b, kv_head),
            first_key,
            n_keys,
            &mut tile.values,
            cfg.tile_keys,
            cfg.d_v,
            value_stride,
            cfg.units,
        );
        let mut acc_k = zeros(comptime!(cfg.width(cfg.d_k)));
        let mut acc_v = zeros(comptime!(cfg.width(cfg.d_v)));
        let begin = first_query(first_key, keys);
        let end = query_end(first_key + n_keys - 1, seq, keys);
        let mut chunk = begin;
        while chunk < end {
            let count = compact_positions::<I>(
                chunk,
                end,
                bitmap,
                b,
                kv_head,
                first_key,
                &mut tile.takes,
                &mut tile.positions,
                cfg.units,
                keys,
                false,
            );
            let rows = count * cfg.group;
            let mut first_row = 0usize;
            while first_row < rows {
                // Query and output-gradient rows of the step, with their statistics.
                if first_row < rows {
                    load_step_rows::<F>(
                        q,
                        &tile.positions,
                        first_row,
                        rows,
                        b,
                        kv_head,
                        &mut tile.queries,
                        cfg.d_k,
                        cfg,
                    );
                    load_step_rows::<F>(
                        d_o,
                        &tile.positions,
                        first_row,
                        rows,
                        b,
                        kv_head,
                        &mut tile.grads,
                        cfg.d_v,
                        cfg,
                    );
                    load_row_stats(
                        lse,
                        delta,
                        &tile.positions,
                        first_row,
                        rows,
                        b,
                        kv_head,
                        &mut tile.row_position,
                        &mut tile.row_lse,
                        &mut tile.row_delta,
                        cfg.rows,
                        cfg.group,
                        cfg.units,
                    );
                }
                sync_cube();
                // P and dS of every (row, key) pair of the step.
                if first_row < rows {
                    #[unroll]
                    for i in 0..comptime!((cfg.rows * cfg.tile_keys).div_ceil(cfg.units)) {
                        let idx = unit + i * cfg.units;
                        if idx < comptime!(cfg.rows * cfg.tile_keys) {
                            score_pair(&mut tile, idx, first_key, n_keys, scale, cfg, keys);
                        }
                    }
                }
                sync_cube();
                // dV += P^T dO and dK += dS^T Q on this unit's outputs.
                if first_row < rows {
                    accumulate::<F>(&mut acc_v, &tile.probs, &tile.grads, cfg.d_v, cfg);
                    accumulate::<F>(&mut acc_k, &tile.score_grads, &tile.queries, cfg.d_k, cfg);
                }
                sync_cube();
                first_row += cfg.rows;
            }
            chunk += cfg.units;
        }
        store::<F>(
            dk, b, kv_head, first_key, n_keys, &acc_k, scale, cfg.d_k, cfg,
        );
        store::<F>(dv, b, kv_head, first_key, n_keys, &acc_v, 1.0, cfg.d_v, cfg);
    }
}

/// `P` and `dS` of the step's pair `idx` (row `idx / tile_keys`, key `idx % tile_keys`),
/// 0 where the row is empty or does not see the key.
#[cube]
fn score_pair(
    tile: &mut KeyTile,
    idx: usize,
    first_key: usize,
    n_keys: usize,
    scale: f32,
    #[comptime] cfg: KeyTileConfig,
    #[comptime] keys: KeySet,
) {
    let key_stride = comptime!(cfg.d_k + 1);
    let value_stride = comptime!(cfg.d_v + 1);
    let r = idx / cfg.tile_keys;
    let key = idx % cfg.tile_keys;
    let position = tile.row_position[r] as usize;
    let mut p = 0.0f32;
    let mut ds = 0.0f32;
    if position > 0 && key < n_keys {
        if query_sees(position - 1, first_key + key, keys) {
            let mut score = 0.0f32;
            #[unroll]
            for c in 0..cfg.d_k {
                score += tile.queries[r * key_stride + c] * tile.keys[key * key_stride + c];
            }
            let mut dp = 0.0f32;
            #[unroll]
            for c in 0..cfg.d_v {
                dp += tile.grads[r * value_stride + c] * tile.values[key * value_stride + c];
            }
            p = recomputed_probability(score * scale, tile.row_lse[r]);
            ds = p * (dp - tile.row_delta[r]);
        }
    }
    tile.probs[idx] = p;
    tile.score_grads[idx] = ds;
}

/// A register array of `len` zeros.
#[cube]
fn zeros(#[comptime] len: usize) -> Array<f32> {
    let mut array = Array::<f32>::new(len);
    #[unroll]
    for i in 0..len {
        array[i] = 0.0;
    }
    array
}
