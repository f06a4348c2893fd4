//! Backward pass, query side, on tensor cores: `dQ` of one branch from the saved row
//! log-sum-exp (`dS = P * (dP - delta)`, `dQ = scale * dS K`), walking the same key tiles as
//! the branch's forward kernel so each row's gradient is a fixed-order sum.

use cubecl::prelude::barrier::Barrier;
use cubecl::prelude::*;

use crate::common::geometry::{cube_positions, delta_at, head_rows, Rows};
use crate::common::keys::{index_min, key_range, KeySet};
use crate::common::selection::selected_tile;
use crate::tensor_core::fragments::{
    fast_exp, lane_key_ranges, lane_rows, plane_has_rows, plane_row_products, plane_score_tiles,
    plane_tile_unmasked, register_load_rows, zero_pairs, AccPair, LaneRanges, Pair,
};
use crate::tensor_core::layout::{load_key_value_rows, row_position, rows_barrier, MmaTileConfig};
use crate::tensor_core::softmax::{
    accumulate_tile_rows, lane_row_lse, score_gradients, store_lane_rows,
};

/// One key tile of [`grad_query_mma_kernel`]: loads `valid` key and value rows from
/// `first`, computes `S = Q K^T` and `dP = dO V^T` on register fragments, `dS = P (dP -
/// delta)` per lane (each row masked to its range) and `acc += dS K`. Every unit must call
/// it (it synchronizes the cube).
#[cube]
#[allow(clippy::too_many_arguments)]
fn grad_query_mma_tile<F: Float, N: Size>(
    k: &Tensor<Vector<F, N>>,
    k_at: Rows,
    v: &Tensor<Vector<F, N>>,
    v_at: Rows,
    first: usize,
    valid: usize,
    ranges: &LaneRanges,
    scale: f32,
    row_lse: &Array<f32>,
    row_delta: &Array<f32>,
    queries: &Array<Pair<F>>,
    out_grads: &Array<Pair<F>>,
    inputs: &mut SharedMemory<Vector<F, N>>,
    barrier: &Shared<Barrier>,
    acc: &mut Array<AccPair>,
    #[comptime] cfg: MmaTileConfig,
) {
    load_key_value_rows::<F, N>(
        k,
        k_at,
        v,
        v_at,
        first,
        valid,
        inputs,
        barrier,
        cfg.tile_keys,
        cfg.values_at(),
        cfg,
    );
    if plane_has_rows(cfg) {
        let scores = plane_score_tiles::<F, N>(inputs, queries, 0usize, cfg);
        let grads = plane_row_products::<F, N>(
            inputs,
            out_grads,
            0usize,
            cfg.values_at(),
            cfg.value_stride(),
            cfg.d_v,
            cfg,
        );
        let mut score_grads = Array::<Pair<F>>::new(comptime!(cfg.tile_keys / 8 * 2));
        if plane_tile_unmasked(ranges, first, valid, cfg) {
            score_gradients::<F>(
                &scores,
                &grads,
                first,
                valid,
                ranges,
                scale,
                row_lse,
                row_delta,
                &mut score_grads,
                cfg,
                false,
            );
        } else {
            score_gradients::<F>(
                &scores,
                &grads,
                first,
                valid,
                ranges,
                scale,
                row_lse,
                row_delta,
                &mut score_grads,
                cfg,
                true,
            );
        }
        accumulate_tile_rows::<F, N>(
            inputs,
            &score_grads,
            0usize,
            0usize,
            cfg.key_stride(),
            cfg.d_k,
            acc,
            cfg,
        );
    }
    sync_cube();
}

/// [`grad_query_kernel()`] on tensor cores (register fragments, see
/// [`crate::register_tile`]): one cube per `(b, KV head, cfg.positions query positions)`
/// (one position for the selection branch), its rows' `Q` and `dO` held as fragments and
/// `dQ` in accumulators, walking the same key tiles as the forward kernel.
#[cube(launch_unchecked, address_type = "dynamic", fast_math = fast_exp())]
#[allow(clippy::too_many_arguments)]
pub fn grad_query_mma_kernel<F: Float, I: Int, N: Size>(
    q: &Tensor<Vector<F, N>>,
    k: &Tensor<Vector<F, N>>,
    v: &Tensor<Vector<F, N>>,
    d_o: &Tensor<Vector<F, N>>,
    delta: &Tensor<f32>,
    lse: &Tensor<f32>,
    selected: &Tensor<I>,
    dq: &mut Tensor<F>,
    scale: f32,
    #[comptime] cfg: MmaTileConfig,
    #[comptime] keys: KeySet,
) {
    let width = N::value();
    let mut inputs = SharedMemory::<Vector<F, N>>::new(comptime!(cfg.input_elems() / width));
    let barrier = rows_barrier();
    let seq = q.shape(1);
    let (b, kv_head, t0, active) = cube_positions(q.shape(0), k.shape(2), seq, cfg.positions);
    if active {
        let queries = register_load_rows::<F, N>(q, b, t0, kv_head, &mut inputs, cfg.d_k, cfg);
        let out_grads = register_load_rows::<F, N>(d_o, b, t0, kv_head, &mut inputs, cfg.d_v, cfg);
        let k_at = head_rows::<Vector<F, N>>(k, b, kv_head);
        let v_at = head_rows::<Vector<F, N>>(v, b, kv_head);
        let (low, _) = lane_rows();
        let ranges = lane_key_ranges(t0, seq, k.shape(1), keys, cfg);
        let row_lse = lane_row_lse(lse, b, t0, kv_head, cfg);
        let mut row_delta = Array::<f32>::new(2usize);
        #[unroll]
        for half in 0..2usize {
            let row = low + half * 8;
            let (position, real) = row_position(row, t0, seq, cfg);
            let head = kv_head * cfg.group + row % cfg.group;
            row_delta[half] = 0.0;
            if real {
                row_delta[half] = delta[delta_at(delta, b, position, head)];
            }
        }
        let mut acc = zero_pairs(comptime!(cfg.d_k / 8 * 2));
        if comptime!(keys.is_selected()) {
            let block = comptime!(keys.select_block());
            let slots =
                b * selected.stride(0) + kv_head * selected.stride(1) + t0 * selected.stride(2);
            for slot in 0..selected.shape(3) {
                let index = i32::cast_from(selected[slots + slot * selected.stride(3)]);
                #[unroll]
                for part in 0..comptime!(block.div_ceil(cfg.tile_keys)) {
                    let (first, valid) = selected_tile(index, part, t0, block, cfg.tile_keys);
                    // Uniform over the cube: every row is position t0.
                    if valid > 0 {
                        grad_query_mma_tile::<F, N>(
                            k,
                            k_at,
                            v,
                            v_at,
                            first,
                            valid,
                            &ranges,
                            scale,
                            &row_lse,
                            &row_delta,
                            &queries,
                            &out_grads,
                            &mut inputs,
                            &barrier,
                            &mut acc,
                            cfg,
                        );
                    }
                }
            }
        } else {
            let last_position = index_min(t0 + cfg.positions, seq) - 1;
            let (first_key, _) = key_range(t0, k.shape(1), keys);
            let (_, last_key) = key_range(last_position, k.shape(1), keys);
            let mut first = first_key;
            while first < last_key {
                let valid = index_min(last_key - first, cfg.tile_keys);
                grad_query_mma_tile::<F, N>(
                    k,
                    k_at,
                    v,
                    v_at,
                    first,
                    valid,
                    &ranges,
                    scale,
                    &row_lse,
                    &row_delta,
                    &queries,
                    &out_grads,
                    &mut inputs,
                    &barrier,
                    &mut acc,
                    cfg,
                );
                first += cfg.tile_keys;
            }
        }
        let mut factor = Array::<f32>::new(2usize);
        factor[0] = scale;
        factor[1] = scale;
        store_lane_rows::<F>(&acc, &factor, dq, b, t0, kv_head, cfg.d_k, cfg);
    }
}
