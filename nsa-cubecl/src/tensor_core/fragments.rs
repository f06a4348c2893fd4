//! Register fragments of the tensor-core kernels: `mma.sync` m16n8k16 through CubeCL's
//! manual MMA, the `ldmatrix` loads that feed it, and which keys each lane's accumulator
//! entries stand for.
//!
//! The cube is laid out as in [`crate::tensor_core::layout`] (plane `p` owns rows
//! `16 p .. 16 p + 16`, the other side's rows stream through shared memory), but nothing of
//! a row's attention leaves the registers: lane `l` of a plane holds, of every 16 x 8
//! accumulator, rows `g = l / 4` and `g + 8` at columns `2 (l % 4)` and `2 (l % 4) + 1`
//! (the PTX fragment layout). The probabilities (or score gradients) of two neighbouring
//! 8-column score tiles are exactly the `A` fragment of the next product over those 16
//! rows, so they go in without a round trip through shared memory. Rows are read from
//! shared memory with `ldmatrix` (transposed where the product needs it); the 8-element row
//! padding of [`MmaTileConfig`] keeps those reads free of bank conflicts.

use cubecl::cmma::{MatrixIdent, MmaDefinition};
use cubecl::features::EnumSet;
use cubecl::prelude::*;

use crate::common::keys::KeySet;
use crate::tensor_core::layout::{
    key_in_range, plane_first_row, row_key_range, stage_group_rows, MmaTileConfig, MMA, PLANE,
    ROW_PAD,
};

/// Two 16-bit inputs in one 32-bit register.
pub type Pair<F> = Vector<F, Const<2>>;
/// Two f32 accumulator entries of one row.
pub type AccPair = Vector<f32, Const<2>>;

/// Columns of one `mma` output tile (m16 n8 k16).
pub(crate) const N8: usize = 8;

/// How far (in natural-log units) a row's maximum may grow before the online softmax
/// rescales the row: until then the row's probabilities are taken against its older,
/// smaller maximum and reach at most `e^8`, which f32 sums and f16/bf16 fragments hold
/// without loss. Most tiles then skip the rescale of the output accumulators.
pub(crate) const RESCALE_SLACK: f32 = 8.0;

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
pub(crate) fn load_x4<F: Float, N: Size>(
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
pub(crate) fn mma_into<F: Float>(
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
pub(crate) fn a_fragment<F: Float>(
    frags: &Array<Pair<F>>,
    #[comptime] step: usize,
) -> Array<Pair<F>> {
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
