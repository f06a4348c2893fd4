//! The attention tile on register fragments: `mma.sync` m16n8k16 through CubeCL's manual
//! MMA, for the tensor-core path of every kernel (the three forward kernels, `dQ`, and
//! `dK`/`dV` with the roles of queries and keys swapped).
//!
//! The cube is laid out as in [`crate::mma`] (plane `p` owns rows `16 p .. 16 p + 16`, the
//! other side's rows stream through shared memory), but nothing of a row's attention leaves
//! the registers: lane `l` of a plane holds, of every 16 x 8 accumulator, rows `g = l / 4`
//! and `g + 8` at columns `2 (l % 4)` and `2 (l % 4) + 1` (the PTX fragment layout). Scores,
//! the online softmax and the output accumulators stay there; the probabilities (or score
//! gradients) of two neighbouring 8-column score tiles are exactly the `A` fragment of the
//! next product over those 16 rows, so they go in without a round trip through shared
//! memory. Rows are read from shared memory with `ldmatrix` (transposed where the product
//! needs it); the 8-element row padding of [`MmaTileConfig`] keeps those reads free of bank
//! conflicts.

use cubecl::cmma::{MatrixIdent, MmaDefinition};
use cubecl::features::EnumSet;
use cubecl::prelude::barrier::Barrier;
use cubecl::prelude::*;

use crate::keys::{index_min, KeySet};
use crate::mma::{
    key_in_range, load_key_value_rows, plane_first_row, row_key_range, row_position,
    stage_group_rows, MmaTileConfig, MMA, PLANE, ROW_PAD,
};
use crate::tile::{Rows, NEG_BIG};

/// Two 16-bit inputs in one 32-bit register.
pub type Pair<F> = Vector<F, Const<2>>;
/// Two f32 accumulator entries of one row.
pub type AccPair = Vector<f32, Const<2>>;

/// Columns of one `mma` output tile (m16 n8 k16).
const N8: usize = 8;

/// How far (in natural-log units) a row's maximum may grow before the online softmax
/// rescales the row: until then the row's probabilities are taken against its older,
/// smaller maximum and reach at most `e^8`, which f32 sums and f16/bf16 fragments hold
/// without loss. Most tiles then skip the rescale of the output accumulators.
const RESCALE_SLACK: f32 = 8.0;

/// Floating-point modes of the tensor-core kernels: `exp` and `ln` compile to the
/// hardware approximations (`__expf`, `__logf`, a few ulp in f32, far below the f16/bf16
/// inputs' precision). The kernels never take `exp` of a masked score, so no NaN or
/// infinity reaches them.
pub fn fast_exp() -> EnumSet<FastMath> {
    FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf
}

/// The m16n8k16 `mma` on `F` with f32 accumulation.
#[cube]
fn mma_definition<F: Float>() -> MmaDefinition<F, F, f32> {
    MmaDefinition::<F, F, f32>::new(MMA, N8, MMA)
}

/// This lane's index in its plane.
#[cube]
pub fn lane() -> usize {
    UNIT_POS as usize % PLANE
}

/// `ldmatrix.x4` (`.trans` when `transpose`): four 8x8 matrices of 16-bit values from
/// shared memory, lanes `8 m .. 8 m + 8` pointing at the rows of matrix `m`; this lane's row
/// starts at vector `lane_at` of `buffer` plus `offset` elements (a multiple of the vector
/// width, 16 bytes). The lane's part stays one register across calls and the comptime part
/// folds into the instruction.
#[cube]
fn load_x4<F: Float, N: Size>(
    buffer: &SharedMemory<Vector<F, N>>,
    lane_at: usize,
    #[comptime] offset: usize,
    #[comptime] transpose: bool,
) -> Array<Pair<F>> {
    let width = N::value();
    let start = lane_at + comptime!(offset / width);
    let definition = mma_definition::<F>();
    definition.load_matrix::<Vector<F, N>, Const<2>>(
        &buffer.slice(start, start + 1),
        MatrixIdent::A,
        4usize,
        transpose,
    )
}

/// `acc[2 tile ..= 2 tile + 1] += a b` for the 4-register `A` fragment `a` and the
/// `B` fragment `b0, b1`.
#[cube]
fn mma_into<F: Float>(
    a: &Array<Pair<F>>,
    b0: Pair<F>,
    b1: Pair<F>,
    acc: &mut Array<AccPair>,
    #[comptime] tile: usize,
) {
    let definition = mma_definition::<F>();
    let mut b = Array::<Pair<F>>::new(2usize);
    b[0] = b0;
    b[1] = b1;
    let mut c = Array::<AccPair>::new(2usize);
    c[0] = acc[2 * tile];
    c[1] = acc[2 * tile + 1];
    definition.execute_inplace(a, &b, &mut c);
    acc[2 * tile] = c[0];
    acc[2 * tile + 1] = c[1];
}

/// Registers `4 step .. 4 step + 4` of the flat fragment list `frags`.
#[cube]
fn a_fragment<F: Float>(frags: &Array<Pair<F>>, #[comptime] step: usize) -> Array<Pair<F>> {
    let mut a = Array::<Pair<F>>::new(4usize);
    #[unroll]
    for i in 0..4usize {
        a[i] = frags[4 * step + i];
    }
    a
}

/// `count` zeroed accumulator pairs.
#[cube]
pub fn zero_pairs(#[comptime] count: usize) -> Array<AccPair> {
    let mut acc = Array::<AccPair>::new(count);
    #[unroll]
    for i in 0..count {
        acc[i] = AccPair::new(0.0);
    }
    acc
}

/// This plane's 16 rows of `dim` values in `buffer` (from element `at`, `stride` apart) as
/// `A` fragments: `dim / 16` steps of four registers, flat.
#[cube]
pub fn plane_row_fragments<F: Float, N: Size>(
    buffer: &SharedMemory<Vector<F, N>>,
    #[comptime] at: usize,
    #[comptime] stride: usize,
    #[comptime] dim: usize,
) -> Array<Pair<F>> {
    let lane = lane();
    let row = plane_first_row() + lane % MMA;
    let lane_at = (row * stride + lane / MMA * N8) / N::value();
    let mut frags = Array::<Pair<F>>::new(comptime!(dim / MMA * 4));
    #[unroll]
    for step in 0..comptime!(dim / MMA) {
        let regs = load_x4::<F, N>(buffer, lane_at, comptime!(at + step * MMA), false);
        #[unroll]
        for i in 0..4usize {
            frags[4 * step + i] = regs[i];
        }
    }
    frags
}

/// Copies the cube's rows of `x: [B, T, H, dim]` (queries or output gradients) into
/// `inputs` and returns this plane's as [`plane_row_fragments()`]. Every unit must call it (it
/// synchronizes the cube); `inputs` is free again when it returns.
#[cube]
pub fn register_load_rows<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    b: usize,
    t0: usize,
    kv_head: usize,
    inputs: &mut SharedMemory<Vector<F, N>>,
    #[comptime] dim: usize,
    #[comptime] cfg: MmaTileConfig,
) -> Array<Pair<F>> {
    stage_group_rows::<F, N>(x, b, t0, kv_head, inputs, dim, cfg);
    let rows = plane_row_fragments::<F, N>(inputs, 0usize, comptime!(dim + ROW_PAD), dim);
    sync_cube();
    rows
}

/// `A B^T` of this plane's 16 rows (`frags`, `dim` wide) against the tile's `tile_keys`
/// rows in `inputs` (from vector `base` plus element `at`, `stride` apart): `tile_keys / 8`
/// accumulator tiles of two pairs (rows `g` and `g + 8`). The scores `Q K^T` (unscaled),
/// and `dO V^T` in the backward pass.
#[cube]
pub fn plane_row_products<F: Float, N: Size>(
    inputs: &SharedMemory<Vector<F, N>>,
    frags: &Array<Pair<F>>,
    base: usize,
    #[comptime] at: usize,
    #[comptime] stride: usize,
    #[comptime] dim: usize,
    #[comptime] cfg: MmaTileConfig,
) -> Array<AccPair> {
    let lane = lane();
    let mut products = zero_pairs(comptime!(cfg.tile_keys / N8 * 2));
    // Matrices: rows 0-7 | dims 0-7, rows 0-7 | dims 8-15, rows 8-15 | dims 0-7, ...
    let row = lane / MMA * N8 + lane % N8;
    let col = (lane / N8) % 2 * N8;
    let lane_at = base + (row * stride + col) / N::value();
    #[unroll]
    for rows in 0..comptime!(cfg.tile_keys / MMA) {
        #[unroll]
        for step in 0..comptime!(dim / MMA) {
            let offset = comptime!(at + rows * MMA * stride + step * MMA);
            let regs = load_x4::<F, N>(inputs, lane_at, offset, false);
            let a = a_fragment::<F>(frags, step);
            mma_into::<F>(&a, regs[0], regs[1], &mut products, comptime!(2 * rows));
            mma_into::<F>(&a, regs[2], regs[3], &mut products, comptime!(2 * rows + 1));
        }
    }
    products
}

/// The scores `Q K^T` (unscaled) of this plane's rows against the tile's keys (from vector
/// `base` of `inputs`).
#[cube]
pub fn plane_score_tiles<F: Float, N: Size>(
    inputs: &SharedMemory<Vector<F, N>>,
    queries: &Array<Pair<F>>,
    base: usize,
    #[comptime] cfg: MmaTileConfig,
) -> Array<AccPair> {
    plane_row_products::<F, N>(
        inputs,
        queries,
        base,
        0usize,
        cfg.key_stride(),
        cfg.d_k,
        cfg,
    )
}

/// Index in a flat `A` fragment list of the pair of row `half` from score tile `tile`:
/// score tiles `2 s` and `2 s + 1` are fragment `s`, registers (g, lo), (g + 8, lo),
/// (g, hi), (g + 8, hi).
pub fn fragment_slot(tile: usize, half: usize) -> usize {
    (tile / 2) * 4 + (tile % 2) * 2 + half
}

/// The key rows `[start, end)` of this lane's two rows (`g` and `g + 8` of its plane).
#[derive(CubeType, Clone, Copy)]
pub struct LaneRanges {
    pub start_low: usize,
    pub end_low: usize,
    pub start_high: usize,
    pub end_high: usize,
}

/// The key ranges of this lane's two rows (`g` and `g + 8` of its plane) in a cube whose
/// first position is `t0` (`n_keys` key rows exist; padding rows get empty ranges).
#[cube]
pub fn lane_key_ranges(
    t0: usize,
    seq: usize,
    n_keys: usize,
    #[comptime] keys: KeySet,
    #[comptime] cfg: MmaTileConfig,
) -> LaneRanges {
    let (low, high) = lane_rows();
    let (start_low, end_low) = row_key_range(low, t0, seq, n_keys, keys, cfg);
    let (start_high, end_high) = row_key_range(high, t0, seq, n_keys, keys, cfg);
    LaneRanges {
        start_low,
        end_low,
        start_high,
        end_high,
    }
}

/// The cube rows of this lane: `g` and `g + 8` of its plane.
#[cube]
pub fn lane_rows() -> (usize, usize) {
    let low = plane_first_row() + lane() / 4;
    (low, low + N8)
}

/// Row `half`'s (0: `g`, 1: `g + 8`) key range.
#[cube]
fn range_of(ranges: &LaneRanges, #[comptime] half: usize) -> (usize, usize) {
    if comptime!(half == 0) {
        (ranges.start_low, ranges.end_low)
    } else {
        (ranges.start_high, ranges.end_high)
    }
}

/// Whether entry `e` of score tile `tile`, row `half`, needs no masking: `true` when the
/// tile needs no masks (`masked` off), else whether the entry is a key of that row's range
/// (tile starting at key row `first`, `valid` rows loaded).
#[cube]
pub fn entry_in_range(
    ranges: &LaneRanges,
    first: usize,
    valid: usize,
    #[comptime] tile: usize,
    #[comptime] half: usize,
    #[comptime] e: usize,
    #[comptime] masked: bool,
) -> bool {
    let mut inside = true;
    if comptime!(masked) {
        let (start, end) = range_of(ranges, half);
        let col = tile * N8 + lane() % 4 * 2 + e;
        inside = key_in_range(col, first, valid, start, end);
    }
    inside
}

/// Whether no entry of the tile (key rows `first..first + tile_keys`, `valid` loaded) needs
/// its mask: every row is loaded and inside both rows' ranges of every lane of the plane
/// (uniform over the plane). Most tiles are: only those at a range's edges are not.
#[cube]
pub fn plane_tile_unmasked(
    ranges: &LaneRanges,
    first: usize,
    valid: usize,
    #[comptime] cfg: MmaTileConfig,
) -> bool {
    let last = first + cfg.tile_keys;
    let low = first >= ranges.start_low && last <= ranges.end_low;
    let high = first >= ranges.start_high && last <= ranges.end_high;
    plane_all(valid == cfg.tile_keys && low && high)
}

/// Whether this plane holds query rows (a plane of padding rows only helps load; uniform
/// over the plane).
#[cube]
pub fn plane_has_rows(#[comptime] cfg: MmaTileConfig) -> bool {
    plane_first_row() < comptime!(cfg.positions * cfg.group)
}

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
                    let p = (scores[2 * tile + half][e] * scale - row_lse[half]).exp();
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
            lse[b * lse.stride(0) + head * lse.stride(1) + position * lse.stride(2)] = row_lse;
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
            row_lse[half] =
                lse[b * lse.stride(0) + head * lse.stride(1) + position * lse.stride(2)];
        }
    }
    row_lse
}
