//! The online softmax on register fragments, used by every tensor-core kernel: the rows'
//! running maxima, sums and output accumulators ([`RegisterState`]), the tile step that
//! folds a key tile into them, the score gradients of the backward pass, and the stores of
//! outputs and log-sum-exp.

use cubecl::prelude::barrier::Barrier;
use cubecl::prelude::*;

use crate::common::geometry::{lse_at, recomputed_probability, Rows, NEG_BIG};
use crate::common::keys::index_min;
use crate::tensor_core::fragments::{
    a_fragment, entry_in_range, fragment_slot, lane, lane_rows, load_x4, mma_into, plane_has_rows,
    plane_score_tiles, plane_tile_unmasked, zero_pairs, AccPair, LaneRanges, Pair, N8,
    RESCALE_SLACK,
};
use crate::tensor_core::layout::{load_key_value_rows, row_position, MmaTileConfig, MMA};

/// A plane's running attention state for this lane's two rows: the row maxima, this lane's
/// share of the row sums, and the unnormalized output rows (`d_v / 8` accumulator tiles).
#[derive(CubeType)]
pub struct RegisterState {
    pub max: Array<f32>,
    pub sum: Array<f32>,
    pub out: Array<AccPair>,
}

/// Fresh state: maxima [`NEG_BIG`], sums 0, output 0.
#[cube]
pub fn register_state_new(#[comptime] cfg: MmaTileConfig) -> RegisterState {
    let mut max = Array::<f32>::new(2usize);
    let mut sum = Array::<f32>::new(2usize);
    #[unroll]
    for half in 0..2usize {
        max[half] = NEG_BIG;
        sum[half] = 0.0;
    }
    RegisterState {
        max,
        sum,
        out: zero_pairs(comptime!(cfg.d_v / N8 * 2)),
    }
}

/// `x` reduced over the four lanes that share a row (`op` max when `is_max`, sum otherwise).
#[cube]
fn row_reduce(x: f32, #[comptime] is_max: bool) -> f32 {
    let mut value = x;
    #[unroll]
    for mask in 1..3u32 {
        let other = plane_shuffle_xor(value, mask);
        if comptime!(is_max) {
            value = max(value, other);
        } else {
            value += other;
        }
    }
    value
}

/// Online-softmax step of this lane's two rows over the score tiles: the rows' maxima,
/// sums and outputs updated, and the probabilities (masked to each row's range when
/// `masked`) written to `probs` as the `A` fragments of `P V` (`tile_keys / 16` steps of
/// four registers, flat). A row is rescaled to a new maximum only when some row of the
/// plane grew by more than [`RESCALE_SLACK`].
#[cube]
#[allow(clippy::too_many_arguments)]
fn softmax_tiles<F: Float>(
    scores: &Array<AccPair>,
    state: &mut RegisterState,
    first: usize,
    valid: usize,
    ranges: &LaneRanges,
    scale: f32,
    probs: &mut Array<Pair<F>>,
    #[comptime] cfg: MmaTileConfig,
    #[comptime] masked: bool,
) {
    let tiles = comptime!(cfg.tile_keys / N8);
    let mut tile_max = Array::<f32>::new(2usize);
    let mut grows = false;
    #[unroll]
    for half in 0..2usize {
        // The maximum of the unscaled scores (`scale > 0`), scaled once.
        let mut raw_max = f32::new(NEG_BIG);
        #[unroll]
        for tile in 0..tiles {
            #[unroll]
            for e in 0..2usize {
                if entry_in_range(ranges, first, valid, tile, half, e, masked) {
                    raw_max = max(raw_max, scores[2 * tile + half][e]);
                }
            }
        }
        raw_max = row_reduce(raw_max, true);
        let mut scaled = f32::new(NEG_BIG);
        if raw_max > NEG_BIG {
            scaled = raw_max * scale;
        }
        tile_max[half] = scaled;
        grows = grows || scaled > state.max[half] + RESCALE_SLACK;
    }
    if plane_any(grows) {
        #[unroll]
        for half in 0..2usize {
            let old_max = state.max[half];
            let new_max = max(old_max, tile_max[half]);
            let mut correction = 1.0f32;
            // A row that attended nothing yet has nothing to rescale.
            if old_max > NEG_BIG {
                correction = (old_max - new_max).exp();
            }
            state.max[half] = new_max;
            state.sum[half] *= correction;
            #[unroll]
            for tile in 0..comptime!(cfg.d_v / N8) {
                state.out[2 * tile + half] = state.out[2 * tile + half] * AccPair::new(correction);
            }
        }
    }
    #[unroll]
    for half in 0..2usize {
        let row_max = state.max[half];
        let mut sum = state.sum[half];
        #[unroll]
        for tile in 0..tiles {
            let mut pair = Pair::<F>::empty();
            #[unroll]
            for e in 0..2usize {
                let mut p = 0.0f32;
                if entry_in_range(ranges, first, valid, tile, half, e, masked) {
                    p = (scores[2 * tile + half][e] * scale - row_max).exp();
                }
                sum += p;
                pair[e] = F::cast_from(p);
            }
            probs[comptime!(fragment_slot(tile, half))] = pair;
        }
        state.sum[half] = sum;
    }
}

/// `dS = P (dP - delta)` with `P = exp(S scale - lse)` for this lane's two rows (each
/// masked to its range when `masked`; the tile starts at key row `first`, `valid` rows
/// loaded), written to `frags` as the `A` fragments of `dS K`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn score_gradients<F: Float>(
    scores: &Array<AccPair>,
    grads: &Array<AccPair>,
    first: usize,
    valid: usize,
    ranges: &LaneRanges,
    scale: f32,
    row_lse: &Array<f32>,
    row_delta: &Array<f32>,
    frags: &mut Array<Pair<F>>,
    #[comptime] cfg: MmaTileConfig,
    #[comptime] masked: bool,
) {
    let tiles = comptime!(cfg.tile_keys / N8);
    #[unroll]
    for half in 0..2usize {
        #[unroll]
        for tile in 0..tiles {
            let mut pair = Pair::<F>::empty();
            #[unroll]
            for e in 0..2usize {
                let mut ds = 0.0f32;
                if entry_in_range(ranges, first, valid, tile, half, e, masked) {
                    let p =
                        recomputed_probability(scores[2 * tile + half][e] * scale, row_lse[half]);
                    ds = p * (grads[2 * tile + half][e] - row_delta[half]);
                }
                pair[e] = F::cast_from(ds);
            }
            frags[comptime!(fragment_slot(tile, half))] = pair;
        }
    }
}

/// `acc += W R`: the `A` fragments `weights` (this plane's rows against the tile's
/// `tile_keys` rows) times the tile's rows `[tile_keys, dim]` in `inputs` (from vector
/// `base` plus element `at`, `stride` apart), read transposed. `P V` in the forward pass,
/// `dS K` for `dQ`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn accumulate_tile_rows<F: Float, N: Size>(
    inputs: &SharedMemory<Vector<F, N>>,
    weights: &Array<Pair<F>>,
    base: usize,
    #[comptime] at: usize,
    #[comptime] stride: usize,
    #[comptime] dim: usize,
    acc: &mut Array<AccPair>,
    #[comptime] cfg: MmaTileConfig,
) {
    let lane = lane();
    // Matrices: rows 0-7 | dims 0-7, rows 8-15 | dims 0-7, rows 0-7 | dims 8-15, ...
    let row_in_step = (lane / N8) % 2 * N8 + lane % N8;
    let col = lane / MMA * N8;
    let lane_at = base + (row_in_step * stride + col) / N::value();
    #[unroll]
    for step in 0..comptime!(cfg.tile_keys / MMA) {
        let a = a_fragment::<F>(weights, step);
        #[unroll]
        for dims in 0..comptime!(dim / MMA) {
            let offset = comptime!(at + step * MMA * stride + dims * MMA);
            let regs = load_x4::<F, N>(inputs, lane_at, offset, true);
            mma_into::<F>(&a, regs[0], regs[1], acc, comptime!(2 * dims));
            mma_into::<F>(&a, regs[2], regs[3], acc, comptime!(2 * dims + 1));
        }
    }
}

/// Attends one key tile: loads `valid` key and value rows from `first` into `inputs`,
/// scores them against this plane's query rows and folds them into this lane's state, each
/// row masked to its own range. Every unit must call it (it synchronizes the cube); `valid`
/// may be anything from 0 to `tile_keys`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn register_attend_tile<F: Float, N: Size>(
    k: &Tensor<Vector<F, N>>,
    k_at: Rows,
    v: &Tensor<Vector<F, N>>,
    v_at: Rows,
    first: usize,
    valid: usize,
    ranges: &LaneRanges,
    scale: f32,
    queries: &Array<Pair<F>>,
    inputs: &mut SharedMemory<Vector<F, N>>,
    barrier: &Shared<Barrier>,
    state: &mut RegisterState,
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
        register_attend_loaded::<F, N>(
            inputs, 0usize, first, valid, ranges, scale, queries, state, cfg,
        );
    }
    sync_cube();
}

/// Folds a key tile already in shared memory into this lane's state: its keys from vector
/// `base` of `inputs` ([`MmaTileConfig::key_stride`] apart), its values
/// [`MmaTileConfig::values_at`] elements later; the tile starts at key row `first` and
/// holds `valid` rows. Each row is masked to its own range. Plane-level only: no cube
/// barrier.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn register_attend_loaded<F: Float, N: Size>(
    inputs: &SharedMemory<Vector<F, N>>,
    base: usize,
    first: usize,
    valid: usize,
    ranges: &LaneRanges,
    scale: f32,
    queries: &Array<Pair<F>>,
    state: &mut RegisterState,
    #[comptime] cfg: MmaTileConfig,
) {
    let scores = plane_score_tiles::<F, N>(inputs, queries, base, cfg);
    let mut probs = Array::<Pair<F>>::new(comptime!(cfg.tile_keys / N8 * 2));
    if plane_tile_unmasked(ranges, first, valid, cfg) {
        softmax_tiles::<F>(
            &scores, state, first, valid, ranges, scale, &mut probs, cfg, false,
        );
    } else {
        softmax_tiles::<F>(
            &scores, state, first, valid, ranges, scale, &mut probs, cfg, true,
        );
    }
    accumulate_tile_rows::<F, N>(
        inputs,
        &probs,
        base,
        cfg.values_at(),
        cfg.value_stride(),
        cfg.d_v,
        &mut state.out,
        cfg,
    );
}

/// Attends the key rows `first..last` (a range the whole cube agrees on) tile by tile.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn register_attend_range<F: Float, N: Size>(
    k: &Tensor<Vector<F, N>>,
    k_at: Rows,
    v: &Tensor<Vector<F, N>>,
    v_at: Rows,
    first: usize,
    last: usize,
    ranges: &LaneRanges,
    scale: f32,
    queries: &Array<Pair<F>>,
    inputs: &mut SharedMemory<Vector<F, N>>,
    barrier: &Shared<Barrier>,
    state: &mut RegisterState,
    #[comptime] cfg: MmaTileConfig,
) {
    let mut row = first;
    while row < last {
        let valid = index_min(last - row, cfg.tile_keys);
        register_attend_tile::<F, N>(
            k, k_at, v, v_at, row, valid, ranges, scale, queries, inputs, barrier, state, cfg,
        );
        row += cfg.tile_keys;
    }
}

/// Writes this lane's two rows of `acc` (`dim / 8` accumulator tiles), row `half` times
/// `factor[half]`, to `x[out + col * x.stride(3)]` with `out` `low_out` for row `g` and
/// `high_out` for row `g + 8`, each only if `real[half]`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn store_lane_pairs<E: Float>(
    acc: &Array<AccPair>,
    factor: &Array<f32>,
    x: &mut Tensor<E>,
    low_out: usize,
    high_out: usize,
    real: &Array<bool>,
    #[comptime] dim: usize,
) {
    let col = lane() % 4 * 2;
    #[unroll]
    for half in 0..2usize {
        let mut out = low_out;
        if comptime!(half == 1) {
            out = high_out;
        }
        if real[half] {
            #[unroll]
            for tile in 0..comptime!(dim / N8) {
                let pair = acc[2 * tile + half];
                #[unroll]
                for e in 0..2usize {
                    x[out + (tile * N8 + col + e) * x.stride(3)] =
                        E::cast_from(pair[e] * factor[half]);
                }
            }
        }
    }
}

/// [`store_lane_pairs()`] to this lane's cube rows of `x: [B, T, H, dim]` (padding rows
/// skipped).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn store_lane_rows<F: Float>(
    acc: &Array<AccPair>,
    factor: &Array<f32>,
    x: &mut Tensor<F>,
    b: usize,
    t0: usize,
    kv_head: usize,
    #[comptime] dim: usize,
    #[comptime] cfg: MmaTileConfig,
) {
    let (low, _) = lane_rows();
    let mut real = Array::<bool>::new(2usize);
    let mut outs = Array::<usize>::new(2usize);
    #[unroll]
    for half in 0..2usize {
        let row = low + half * N8;
        let (position, row_real) = row_position(row, t0, x.shape(1), cfg);
        let head = kv_head * cfg.group + row % cfg.group;
        real[half] = row_real;
        outs[half] = row_at(x, b, position, head);
    }
    store_lane_pairs::<F>(acc, factor, x, outs[0], outs[1], &real, dim);
}

/// Where row `(b, position, head)` of a `[B, T, H, _]` tensor starts.
#[cube]
pub fn row_at<F: Float>(x: &Tensor<F>, b: usize, position: usize, head: usize) -> usize {
    b * x.stride(0) + position * x.stride(1) + head * x.stride(2)
}

/// Writes this lane's two output rows to `o: [B, T, H, d_v]` (`out / sum`, 0 for an empty
/// row) and, from the row's first lane, their log-sum-exp to `lse: [B, H, T]`
/// ([`register_state_lse()`]). Every lane must call it.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn register_state_finish<F: Float>(
    state: &RegisterState,
    o: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    b: usize,
    t0: usize,
    kv_head: usize,
    #[comptime] cfg: MmaTileConfig,
) {
    let inverse = register_state_lse(state, lse, b, t0, kv_head, cfg);
    store_lane_rows::<F>(&state.out, &inverse, o, b, t0, kv_head, cfg.d_v, cfg);
}

/// Writes, from each row's first lane, the log-sum-exp of this lane's two rows to
/// `lse: [B, H, T]` ([`NEG_BIG`] for a row that attended nothing) and returns the rows'
/// output factors `1 / sum` (0 for an empty row). Every lane must call it (it reduces the
/// row sums over the row's lanes).
#[cube]
pub fn register_state_lse(
    state: &RegisterState,
    lse: &mut Tensor<f32>,
    b: usize,
    t0: usize,
    kv_head: usize,
    #[comptime] cfg: MmaTileConfig,
) -> Array<f32> {
    let (low, _) = lane_rows();
    let mut inverse = Array::<f32>::new(2usize);
    #[unroll]
    for half in 0..2usize {
        let sum = row_reduce(state.sum[half], false);
        let row = low + half * N8;
        let (position, real) = row_position(row, t0, lse.shape(2), cfg);
        let mut row_lse = f32::new(NEG_BIG);
        inverse[half] = 0.0;
        if sum > 0.0 {
            inverse[half] = 1.0 / sum;
            row_lse = state.max[half] + sum.ln();
        }
        if real && lane() % 4 == 0 {
            let head = kv_head * cfg.group + row % cfg.group;
            lse[lse_at(lse, b, head, position)] = row_lse;
        }
    }
    inverse
}

/// The log-sum-exp `lse: [B, H, T]` of this lane's two rows (`g` and `g + 8` of its plane;
/// 0 for padding rows, which no key reaches).
#[cube]
pub fn lane_row_lse(
    lse: &Tensor<f32>,
    b: usize,
    t0: usize,
    kv_head: usize,
    #[comptime] cfg: MmaTileConfig,
) -> Array<f32> {
    let (low, _) = lane_rows();
    let mut row_lse = Array::<f32>::new(2usize);
    #[unroll]
    for half in 0..2usize {
        let row = low + half * N8;
        let (position, real) = row_position(row, t0, lse.shape(2), cfg);
        row_lse[half] = 0.0;
        if real {
            let head = kv_head * cfg.group + row % cfg.group;
            row_lse[half] = lse[lse_at(lse, b, head, position)];
        }
    }
    row_lse
}
