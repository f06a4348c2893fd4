//! Backward pass, key side: `dK` and `dV` of one branch from the saved row log-sum-exp.
//!
//! One cube owns a tile of `tile_keys` key rows of one `(batch, KV head)` and walks the
//! queries that see them, in chunks of `units` positions: each unit checks one position
//! (for the selection branch: whether its group selected the tile's block, one bit of the
//! selection bitmap of [`crate::bitmap`], the selection inverted on the device without
//! atomics), a prefix sum compacts the positions that
//! do into a list, and the list's `(position, head)` rows go through in steps of `rows` rows:
//! `P = exp(S - lse)`, `dS = P * (dP - delta)`, `dV += P^T dO`, `dK += scale * dS^T Q`.
//! Every output is a fixed-order sum (deterministic).

use cubecl::prelude::*;

use crate::bitmap::bitmap_selects;
use crate::keys::{first_query, index_max, index_min, query_end, query_sees, KeySet};
use crate::mma::{
    copy_vector, load_key_value_rows, plane_first_row, rows_barrier, wait_rows, MmaTileConfig, MMA,
    PLANE,
};
use crate::register_tile::{
    accumulate_tile_rows, fast_exp, fragment_slot, lane_rows, plane_row_fragments,
    plane_row_products, store_lane_pairs, zero_pairs, AccPair, Pair,
};
use crate::tile::{cube_tiles_at, head_rows, load_rows};

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

/// The positions `chunk .. min(chunk + units, end)` that see the key tile starting at
/// `first_key` of `(b, kv_head)`, in order, into `positions`; returns how many. Each unit
/// checks one position (for the selection branch: whether its group selected the tile's
/// block, in `bitmap`); an inclusive prefix sum of the flags gives each taken position its rank: per
/// plane with plane ops plus the earlier planes' totals when `plane_ops` (32-lane planes),
/// Hillis-Steele over the cube otherwise. Every unit must call it (it synchronizes the
/// cube).
#[cube]
#[allow(clippy::too_many_arguments)]
fn compact_positions<I: Int>(
    chunk: usize,
    end: usize,
    bitmap: &Tensor<I>,
    b: usize,
    kv_head: usize,
    first_key: usize,
    takes: &mut SharedMemory<u32>,
    positions: &mut SharedMemory<u32>,
    #[comptime] units: usize,
    #[comptime] keys: KeySet,
    #[comptime] plane_ops: bool,
) -> usize {
    let unit = UNIT_POS as usize;
    let block = first_key / comptime!(keys.select_block());
    let column = b * bitmap.stride(0) + kv_head * bitmap.stride(1);
    let t = chunk + unit;
    let mut take = 0u32;
    if t < end {
        take = 1;
        // Nested: `&&` does not short-circuit in kernels, and the other branches pass a
        // placeholder `bitmap`.
        if comptime!(keys.is_selected()) {
            if !bitmap_selects::<I>(bitmap, column, t, block) {
                take = 0;
            }
        }
    }
    let (rank, count) = if comptime!(plane_ops) {
        // takes[p]: how many positions plane p takes.
        let plane = unit / PLANE;
        let in_plane = plane_inclusive_sum(take);
        if unit % PLANE == PLANE - 1 {
            takes[plane] = in_plane;
        }
        sync_cube();
        let mut rank = in_plane;
        let mut count = 0u32;
        #[unroll]
        for p in 0..comptime!(units / PLANE) {
            let total = takes[p];
            if p < plane {
                rank += total;
            }
            count += total;
        }
        (rank, count)
    } else {
        takes[unit] = take;
        sync_cube();
        let mut offset = 1usize;
        while offset < units {
            let mut before = 0u32;
            if unit >= offset {
                before = takes[unit - offset];
            }
            sync_cube();
            takes[unit] += before;
            sync_cube();
            offset *= 2;
        }
        (takes[unit], takes[units - 1])
    };
    if take == 1 {
        positions[rank as usize - 1] = t as u32;
    }
    sync_cube();
    count as usize
}

/// The statistics of the step's rows `first_row .. first_row + step_rows` of the position
/// list (row `r` is position `positions[r / G]`, head `r % G`): position + 1 (0 past
/// `rows`), `lse` and `delta`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_row_stats(
    lse: &Tensor<f32>,
    delta: &Tensor<f32>,
    positions: &SharedMemory<u32>,
    first_row: usize,
    rows: usize,
    b: usize,
    kv_head: usize,
    row_position: &mut SharedMemory<u32>,
    row_lse: &mut SharedMemory<f32>,
    row_delta: &mut SharedMemory<f32>,
    #[comptime] step_rows: usize,
    #[comptime] group: usize,
    #[comptime] units: usize,
) {
    let mut r = UNIT_POS as usize;
    while r < step_rows {
        let row = first_row + r;
        let mut position = 0u32;
        let mut value_lse = 0.0f32;
        let mut value_delta = 0.0f32;
        if row < rows {
            let t = positions[row / group] as usize;
            let h = kv_head * group + row % group;
            position = (t + 1) as u32;
            value_lse = lse[b * lse.stride(0) + h * lse.stride(1) + t * lse.stride(2)];
            value_delta = delta[b * delta.stride(0) + t * delta.stride(1) + h * delta.stride(2)];
        }
        row_position[r] = position;
        row_lse[r] = value_lse;
        row_delta[r] = value_delta;
        r += units;
    }
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
    let mut idx = UNIT_POS as usize;
    while idx < comptime!(cfg.rows * dim) {
        let r = idx / dim;
        let c = idx % dim;
        let row = first_row + r;
        let mut value = 0.0f32;
        if row < rows {
            let t = positions[row / cfg.group] as usize;
            let h = kv_head * cfg.group + row % cfg.group;
            value = f32::cast_from(
                src[b * src.stride(0) + t * src.stride(1) + h * src.stride(2) + c * src.stride(3)],
            );
        }
        dst[r * (dim + 1) + c] = value;
        idx += cfg.units;
    }
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
                    let mut idx = unit;
                    while idx < comptime!(cfg.rows * cfg.tile_keys) {
                        let r = idx / cfg.tile_keys;
                        let key = idx % cfg.tile_keys;
                        let position = tile.row_position[r] as usize;
                        let mut p = 0.0f32;
                        let mut ds = 0.0f32;
                        if position > 0 && key < n_keys {
                            if query_sees(position - 1, first_key + key, keys) {
                                // Unrolled (here and in `accumulate`): Mesa's llvmpipe
                                // (lavapipe) ends every loop of an invocation once all of
                                // them together have run 65,535 iterations, and a key tile
                                // seen by thousands of query rows got past that.
                                let mut score = 0.0f32;
                                #[unroll]
                                for c in 0..cfg.d_k {
                                    score += tile.queries[r * key_stride + c]
                                        * tile.keys[key * key_stride + c];
                                }
                                let mut dp = 0.0f32;
                                #[unroll]
                                for c in 0..cfg.d_v {
                                    dp += tile.grads[r * value_stride + c]
                                        * tile.values[key * value_stride + c];
                                }
                                p = (score * scale - tile.row_lse[r]).exp();
                                ds = p * (dp - tile.row_delta[r]);
                            }
                        }
                        tile.probs[idx] = p;
                        tile.score_grads[idx] = ds;
                        idx += cfg.units;
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

/// Copies the step's query-side rows `first_row .. first_row + step_rows` of the position
/// list (row `r` is position `positions[r / G]`, head `r % G`; zeros past `rows`) of
/// `src: [B, T, H, dim]` (vectors of `N`) into `dst` from element `dst_at`, rows
/// `dim + pad` elements apart, with asynchronous copies like [`load_vector_rows()`] (wait
/// with [`wait_rows()`]).
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_step_vectors<F: Float, N: Size>(
    src: &Tensor<Vector<F, N>>,
    positions: &SharedMemory<u32>,
    first_row: usize,
    rows: usize,
    b: usize,
    kv_head: usize,
    dst: &mut SharedMemory<Vector<F, N>>,
    #[comptime] dst_at: usize,
    #[comptime] stride: usize,
    #[comptime] dim: usize,
    #[comptime] cfg: MmaTileConfig,
) {
    let width = src.vector_size();
    let per_row = comptime!(dim / width);
    let count = comptime!(cfg.tile_keys * per_row);
    #[unroll]
    for step in 0..comptime!(count.div_ceil(cfg.units())) {
        let idx = UNIT_POS as usize + step * cfg.units();
        if idx < count {
            let r = idx / per_row;
            let row = first_row + r;
            let inside = row < rows;
            // Rows past `rows` copy nothing (zero fill) from the first listed row.
            let listed = select(inside, row, 0usize);
            let t = positions[listed / cfg.group] as usize;
            let h = kv_head * cfg.group + listed % cfg.group;
            let from =
                (b * src.stride(0) + t * src.stride(1) + h * src.stride(2)) / width + idx % per_row;
            let to = comptime!(dst_at / width) + r * comptime!(stride / width) + idx % per_row;
            copy_vector::<F, N>(src, from, inside, dst, to);
        }
    }
}

/// [`grad_key_value_kernel()`] on tensor cores (register fragments, see
/// [`crate::register_tile`]). Here the cube's `16 * planes` *rows* are key rows (plane `p`
/// owns 16 of them, kept in shared memory) and `cfg.tile_keys` is the number of query rows
/// per step. Per step, with the step's `Q` and `dO` rows in shared memory: `S^T = K Q^T`
/// and `dP^T = V dO^T`, `P^T` and `dS^T = P^T (dP^T - delta)` in registers, then
/// `dV += P^T dO` and `dK += dS^T Q` into accumulators. For the selection branch the key
/// rows lie in one selection block.
///
/// Key rows below `split_keys` (those every later query may see: all compressed keys, the
/// forced initial selection blocks) would leave a few cubes with most of the work, so their
/// queries are split: the grid repeats `splits` times, copy `s` walks only the query
/// positions `s * split_positions ..` (`split_positions` of them) and writes its unscaled
/// sums to `partial: [splits * B, split_keys, H_kv, d_k + d_v]` f32, which
/// [`sum_key_splits_kernel()`] adds up in a fixed order. The other key rows run in copy 0
/// over all their queries and write `dk` and `dv` directly.
#[cube(launch_unchecked, address_type = "dynamic", fast_math = fast_exp())]
#[allow(clippy::too_many_arguments)]
pub fn grad_key_value_mma_kernel<F: Float, I: Int, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    d_o: &Tensor<Vector<F, N>>,
    delta: &Tensor<f32>,
    lse: &Tensor<f32>,
    bitmap: &Tensor<I>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    partial: &mut Tensor<f32>,
    scale: f32,
    split_positions: u32,
    split_keys: u32,
    #[comptime] cfg: MmaTileConfig,
    #[comptime] keys: KeySet,
) {
    let width = N::value();
    let key_rows = cfg.rows();
    let steps = cfg.tile_keys;
    // The step's query rows, then its output-gradient rows.
    let mut inputs = SharedMemory::<Vector<F, N>>::new(comptime!(cfg.input_elems() / width));
    // The cube's key rows, then its value rows.
    let mut own_rows = SharedMemory::<Vector<F, N>>::new(comptime!(
        key_rows * (cfg.key_stride() + cfg.value_stride()) / width
    ));
    let mut row_lse = SharedMemory::<f32>::new(steps);
    let mut row_delta = SharedMemory::<f32>::new(steps);
    let mut row_position = SharedMemory::<u32>::new(steps);
    let mut takes = SharedMemory::<u32>::new(comptime!(cfg.units()));
    let mut positions = SharedMemory::<u32>::new(comptime!(cfg.units()));
    let barrier = rows_barrier();

    let n_keys_total = k.shape(1);
    let batch = q.shape(0);
    let tiles = (n_keys_total + key_rows - 1) / key_rows;
    let grid = batch * k.shape(2) * tiles;
    let split = CUBE_POS / grid;
    let (b, kv_head, tile_index, inside) = cube_tiles_at(CUBE_POS % grid, batch, k.shape(2), tiles);
    let first_key = tile_index * key_rows;
    let split_positions = usize::cast_from(split_positions);
    let split_keys = usize::cast_from(split_keys);
    let is_split = first_key < split_keys;
    let splits = partial.shape(0) / batch;
    // Unsplit tiles run in copy 0 only.
    let active = inside && split < splits && (is_split || split == 0);
    if active {
        let seq = q.shape(1);
        let n_keys = index_min(key_rows, n_keys_total - first_key);
        let values_at = comptime!(key_rows * cfg.key_stride());
        load_key_value_rows::<F, N>(
            k,
            head_rows::<Vector<F, N>>(k, b, kv_head),
            v,
            head_rows::<Vector<F, N>>(v, b, kv_head),
            first_key,
            n_keys,
            &mut own_rows,
            &barrier,
            key_rows,
            values_at,
            cfg,
        );
        let mut acc_k = zero_pairs(comptime!(cfg.d_k / 8 * 2));
        let mut acc_v = zero_pairs(comptime!(cfg.d_v / 8 * 2));
        let (low, high) = lane_rows();
        let plane_keys = plane_first_row() < n_keys;
        let mut begin = first_query(first_key, keys);
        let mut end = query_end(first_key + n_keys - 1, seq, keys);
        if is_split {
            begin = index_max(begin, split * split_positions);
            end = index_min(end, (split + 1) * split_positions);
        }
        let mut chunk = begin;
        while chunk < end {
            let count = compact_positions::<I>(
                chunk,
                end,
                bitmap,
                b,
                kv_head,
                first_key,
                &mut takes,
                &mut positions,
                cfg.units(),
                keys,
                true,
            );
            let rows = count * cfg.group;
            let mut first_row = 0usize;
            while first_row < rows {
                load_step_vectors::<F, N>(
                    q,
                    &positions,
                    first_row,
                    rows,
                    b,
                    kv_head,
                    &mut inputs,
                    0usize,
                    cfg.key_stride(),
                    cfg.d_k,
                    cfg,
                );
                load_step_vectors::<F, N>(
                    d_o,
                    &positions,
                    first_row,
                    rows,
                    b,
                    kv_head,
                    &mut inputs,
                    cfg.values_at(),
                    cfg.value_stride(),
                    cfg.d_v,
                    cfg,
                );
                load_row_stats(
                    lse,
                    delta,
                    &positions,
                    first_row,
                    rows,
                    b,
                    kv_head,
                    &mut row_position,
                    &mut row_lse,
                    &mut row_delta,
                    steps,
                    cfg.group,
                    cfg.units(),
                );
                wait_rows(&barrier);
                // Uniform over the plane.
                if plane_keys {
                    // S^T = K Q^T and dP^T = V dO^T: key rows against the step's query rows.
                    let own_keys =
                        plane_row_fragments::<F, N>(&own_rows, 0usize, cfg.key_stride(), cfg.d_k);
                    let scores = plane_row_products::<F, N>(
                        &inputs,
                        &own_keys,
                        0usize,
                        0usize,
                        cfg.key_stride(),
                        cfg.d_k,
                        cfg,
                    );
                    let own_values = plane_row_fragments::<F, N>(
                        &own_rows,
                        values_at,
                        cfg.value_stride(),
                        cfg.d_v,
                    );
                    let grads = plane_row_products::<F, N>(
                        &inputs,
                        &own_values,
                        0usize,
                        cfg.values_at(),
                        cfg.value_stride(),
                        cfg.d_v,
                        cfg,
                    );
                    let mut probs = Array::<Pair<F>>::new(comptime!(cfg.tile_keys / 8 * 2));
                    let mut score_grads = Array::<Pair<F>>::new(comptime!(cfg.tile_keys / 8 * 2));
                    if plane_step_unmasked(first_key, n_keys, &row_position, cfg, keys) {
                        transposed_gradients::<F>(
                            &scores,
                            &grads,
                            first_key,
                            n_keys,
                            &row_position,
                            &row_lse,
                            &row_delta,
                            scale,
                            &mut probs,
                            &mut score_grads,
                            cfg,
                            keys,
                            false,
                        );
                    } else {
                        transposed_gradients::<F>(
                            &scores,
                            &grads,
                            first_key,
                            n_keys,
                            &row_position,
                            &row_lse,
                            &row_delta,
                            scale,
                            &mut probs,
                            &mut score_grads,
                            cfg,
                            keys,
                            true,
                        );
                    }
                    // dV += P^T dO, dK += dS^T Q.
                    accumulate_tile_rows::<F, N>(
                        &inputs,
                        &probs,
                        0usize,
                        cfg.values_at(),
                        cfg.value_stride(),
                        cfg.d_v,
                        &mut acc_v,
                        cfg,
                    );
                    accumulate_tile_rows::<F, N>(
                        &inputs,
                        &score_grads,
                        0usize,
                        0usize,
                        cfg.key_stride(),
                        cfg.d_k,
                        &mut acc_k,
                        cfg,
                    );
                }
                sync_cube();
                first_row += steps;
            }
            chunk += cfg.units();
        }
        // This lane's key rows, g and g + 8 of its plane.
        let mut real = Array::<bool>::new(2usize);
        real[0] = low < n_keys;
        real[1] = high < n_keys;
        let mut unit_factor = Array::<f32>::new(2usize);
        unit_factor[0] = 1.0;
        unit_factor[1] = 1.0;
        if is_split {
            let out = (split * batch + b) * partial.stride(0)
                + (first_key + low) * partial.stride(1)
                + kv_head * partial.stride(2);
            let high_out = out + 8 * partial.stride(1);
            store_lane_pairs::<f32>(&acc_k, &unit_factor, partial, out, high_out, &real, cfg.d_k);
            let dv_at = cfg.d_k * partial.stride(3);
            store_lane_pairs::<f32>(
                &acc_v,
                &unit_factor,
                partial,
                out + dv_at,
                high_out + dv_at,
                &real,
                cfg.d_v,
            );
        } else {
            let mut key_factor = Array::<f32>::new(2usize);
            key_factor[0] = scale;
            key_factor[1] = scale;
            let dk_out =
                b * dk.stride(0) + (first_key + low) * dk.stride(1) + kv_head * dk.stride(2);
            store_lane_pairs::<F>(
                &acc_k,
                &key_factor,
                dk,
                dk_out,
                dk_out + 8 * dk.stride(1),
                &real,
                cfg.d_k,
            );
            let dv_out =
                b * dv.stride(0) + (first_key + low) * dv.stride(1) + kv_head * dv.stride(2);
            store_lane_pairs::<F>(
                &acc_v,
                &unit_factor,
                dv,
                dv_out,
                dv_out + 8 * dv.stride(1),
                &real,
                cfg.d_v,
            );
        }
    }
}

/// `P^T` and `dS^T = P^T (dP^T - delta)` of this lane's two key rows (`first_key + g`,
/// `+ g + 8` of its plane; rows from `n_keys` on are padding) against the step's query rows
/// (column `c` is the query row with position `row_position[c] - 1`, 0 for none, and
/// statistics `row_lse[c]`, `row_delta[c]`), masked to the pairs the branch attends when
/// `masked`, written to `probs` and `score_grads` as the `A` fragments of `P^T dO` and
/// `dS^T Q`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn transposed_gradients<F: Float>(
    scores: &Array<AccPair>,
    grads: &Array<AccPair>,
    first_key: usize,
    n_keys: usize,
    row_position: &SharedMemory<u32>,
    row_lse: &SharedMemory<f32>,
    row_delta: &SharedMemory<f32>,
    scale: f32,
    probs: &mut Array<Pair<F>>,
    score_grads: &mut Array<Pair<F>>,
    #[comptime] cfg: MmaTileConfig,
    #[comptime] keys: KeySet,
    #[comptime] masked: bool,
) {
    let (low, _) = lane_rows();
    let tiles = comptime!(cfg.tile_keys / 8);
    #[unroll]
    for half in 0..2usize {
        let row = low + half * 8;
        let key = first_key + row;
        #[unroll]
        for tile in 0..tiles {
            let mut p_pair = Pair::<F>::empty();
            let mut ds_pair = Pair::<F>::empty();
            #[unroll]
            for e in 0..2usize {
                let col = tile * 8 + UNIT_POS as usize % 4 * 2 + e;
                let mut p = 0.0f32;
                let mut ds = 0.0f32;
                let mut inside = true;
                if comptime!(masked) {
                    let position = row_position[col] as usize;
                    // Nested: `&&` does not short-circuit.
                    inside = false;
                    if position > 0 && row < n_keys {
                        inside = query_sees(position - 1, key, keys);
                    }
                }
                if inside {
                    p = (scores[2 * tile + half][e] * scale - row_lse[col]).exp();
                    ds = p * (grads[2 * tile + half][e] - row_delta[col]);
                }
                p_pair[e] = F::cast_from(p);
                ds_pair[e] = F::cast_from(ds);
            }
            probs[comptime!(fragment_slot(tile, half))] = p_pair;
            score_grads[comptime!(fragment_slot(tile, half))] = ds_pair;
        }
    }
}

/// Whether every pair of this plane's key rows and the step's query rows is attended, so
/// [`transposed_gradients()`] needs no masks: all `tile_keys` rows are real and the
/// earliest query sees the plane's last key and the latest query its first (the patterns
/// of [`KeySet`] are bands in `(position, key)`). Uniform over the plane.
#[cube]
fn plane_step_unmasked(
    first_key: usize,
    n_keys: usize,
    row_position: &SharedMemory<u32>,
    #[comptime] cfg: MmaTileConfig,
    #[comptime] keys: KeySet,
) -> bool {
    let earliest = row_position[0] as usize;
    let latest = row_position[comptime!(cfg.tile_keys - 1)] as usize;
    let key_low = first_key + plane_first_row();
    let key_high = key_low + MMA - 1;
    let mut unmasked = false;
    // Nested: `&&` does not short-circuit (and `earliest - 1` needs `earliest > 0`).
    if earliest > 0 && latest > 0 && key_high < first_key + n_keys {
        unmasked =
            query_sees(earliest - 1, key_high, keys) && query_sees(latest - 1, key_low, keys);
    }
    unmasked
}

/// Adds up the split copies of [`grad_key_value_mma_kernel()`]:
/// `partial: [splits * B, split_keys, H_kv, d_k + d_v]` f32 -> the key rows
/// `0..split_keys` of `dk: [B, L, H_kv, d_k]` (times `scale`) and `dv: [B, L, H_kv, d_v]`,
/// one unit per output, copies summed in order (deterministic).
#[cube(launch, address_type = "dynamic")]
pub fn sum_key_splits_kernel<F: Float>(
    partial: &Tensor<f32>,
    dk: &mut Tensor<F>,
    dv: &mut Tensor<F>,
    scale: f32,
    #[comptime] d_k: usize,
    #[comptime] d_v: usize,
) {
    let batch = dk.shape(0);
    let split_keys = partial.shape(1);
    let kv_heads = partial.shape(2);
    let width = comptime!(d_k + d_v);
    let idx = ABSOLUTE_POS;
    if idx < batch * split_keys * kv_heads * width {
        let col = idx % width;
        let kv_head = (idx / width) % kv_heads;
        let key = (idx / (width * kv_heads)) % split_keys;
        let b = idx / (width * kv_heads * split_keys);
        let at = key * partial.stride(1) + kv_head * partial.stride(2) + col * partial.stride(3);
        let mut sum = 0.0f32;
        for split in 0..partial.shape(0) / batch {
            sum += partial[(split * batch + b) * partial.stride(0) + at];
        }
        if col < d_k {
            let out = b * dk.stride(0) + key * dk.stride(1) + kv_head * dk.stride(2);
            dk[out + col * dk.stride(3)] = F::cast_from(sum * scale);
        } else {
            let out = b * dv.stride(0) + key * dv.stride(1) + kv_head * dv.stride(2);
            dv[out + (col - d_k) * dv.stride(3)] = F::cast_from(sum);
        }
    }
}
