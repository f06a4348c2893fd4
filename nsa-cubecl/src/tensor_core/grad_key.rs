//! Backward pass, key side, on tensor cores: `dK` and `dV` of one branch, with the roles of
//! queries and keys swapped (key rows on the planes, query rows streaming), walking the
//! queries as [`crate::common::key_walk`] lists them.

use cubecl::prelude::*;

use crate::common::geometry::{cube_tiles_at, head_rows, recomputed_probability};
use crate::common::key_walk::{compact_positions, load_row_stats};
use crate::common::keys::{first_query, index_max, index_min, query_end, query_sees, KeySet};
use crate::tensor_core::fragments::{
    fast_exp, fragment_slot, lane_rows, plane_row_fragments, plane_row_products, zero_pairs,
    AccPair, Pair,
};
use crate::tensor_core::layout::{
    copy_vector, load_key_value_rows, plane_first_row, rows_barrier, wait_rows, MmaTileConfig, MMA,
};
use crate::tensor_core::softmax::{accumulate_tile_rows, store_lane_pairs};

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
/// queries are split: the grid repeats `splits` times (1 when nothing is split), copy `s`
/// walks only the query positions `s * split_positions ..` (`split_positions` of them)
/// and writes its unscaled sums to `partial: [splits * B, split_keys, H_kv, d_k + d_v]`
/// f32, which [`sum_key_splits_kernel()`] adds up in a fixed order. The other key rows run in copy 0
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
    splits: u32,
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
    // The grid's copies, given by the launch: when no key row is split, `partial` is a
    // one-element stand-in whose shape says nothing.
    let splits = usize::cast_from(splits);
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
                    p = recomputed_probability(scores[2 * tile + half][e] * scale, row_lse[col]);
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
