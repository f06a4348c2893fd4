//! The tensor-core online-softmax tile: the attention of [`crate::tile`] with both matrix
//! products (`Q K^T` and `P V`) on 16x16x16 `cmma` tiles, for runtimes that have them
//! (CUDA; lavapipe does not, and runs the portable tile).
//!
//! A cube holds `rows = 16 * planes` query rows: the `G` query heads of `positions`
//! consecutive query positions of one KV head (row `r` is head `r % G` of position
//! `t0 + r / G`; rows from `positions * G` on, and rows past the sequence, are padding).
//! Plane `p` owns rows `16 p .. 16 p + 16`; its lane `2 r + h` keeps row `r`'s running
//! max, running sum and output columns `h * d_v / 2 ..` in f32 registers. Keys and values
//! stream through shared memory `tile_keys` rows at a time, in the input precision; scores
//! and `P V` products pass through an f32 scratch, where each lane reads its row.

use cubecl::cmma::{self, Matrix, MatrixIdent, MatrixLayout};
use cubecl::prelude::*;

use crate::keys::{key_range, KeySet};
use crate::tile::{Rows, NEG_BIG};

/// Side of a tensor-core tile.
pub const MMA: usize = 16;
/// Lanes of a plane (warp) the tile is laid out for.
pub const PLANE: usize = 32;
/// Elements of padding after each row of a shared input buffer, so the 16 rows of a
/// fragment load fall in different banks (a multiple of the vector width).
const ROW_PAD: usize = 8;

/// Comptime shape of the tensor-core tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MmaTileConfig {
    /// Query heads per KV head, `G`.
    pub group: usize,
    /// Query/key head dimension (a multiple of 16).
    pub d_k: usize,
    /// Value head dimension (a multiple of 16).
    pub d_v: usize,
    /// Key rows per tile (a multiple of 16).
    pub tile_keys: usize,
    /// Planes per cube; each owns 16 query rows.
    pub planes: usize,
    /// Query positions per cube (`positions * G <= 16 * planes`).
    pub positions: usize,
}

impl MmaTileConfig {
    /// Query rows per cube.
    pub fn rows(&self) -> usize {
        MMA * self.planes
    }

    /// Units per cube.
    pub fn units(&self) -> usize {
        PLANE * self.planes
    }

    /// Row stride, in elements, of the query and key rows in shared memory.
    pub fn key_stride(&self) -> usize {
        self.d_k + ROW_PAD
    }

    /// Row stride, in elements, of the value rows in shared memory.
    pub fn value_stride(&self) -> usize {
        self.d_v + ROW_PAD
    }

    /// Row stride, in elements, of the probabilities in shared memory.
    pub fn probs_stride(&self) -> usize {
        self.tile_keys + ROW_PAD
    }

    /// Row stride of the f32 scratch, which holds a row of scores or a [`CHUNK`] of output
    /// columns: four words of padding, so the lanes reading a column of rows hit different
    /// banks.
    pub fn scratch_stride(&self) -> usize {
        self.tile_keys.max(CHUNK) + 4
    }

    /// Where the values start in the input buffer (elements): after the keys.
    pub fn values_at(&self) -> usize {
        self.tile_keys * self.key_stride()
    }

    /// Elements of the input buffer: the cube's query rows first, then a tile's keys and
    /// values in the same space.
    pub fn input_elems(&self) -> usize {
        (self.rows() * self.key_stride())
            .max(self.values_at() + self.tile_keys * self.value_stride())
    }

    /// Output columns chunks of [`CHUNK`] (the last may be half full).
    pub fn out_chunks(&self) -> usize {
        self.d_v.div_ceil(CHUNK)
    }

    /// Bytes of shared memory of the tile for inputs of `elem_bytes` bytes.
    pub fn shared_bytes(&self, elem_bytes: usize) -> usize {
        elem_bytes * (self.input_elems() + self.rows() * self.probs_stride())
            + 4 * self.rows() * self.scratch_stride()
    }
}

/// Output columns that pass through the scratch at a time: two fragments.
const CHUNK: usize = 2 * MMA;

/// The tile's shared memory. Query, key and value rows are stored in vectors of `N`
/// (whole rows, so every fragment starts on a vector).
#[derive(CubeType)]
pub struct MmaTile<F: Float, N: Size> {
    /// The cube's query rows `[rows, d_k]` until they are in fragments, then a key tile
    /// `[tile_keys, d_k]` followed by its values `[tile_keys, d_v]` (from
    /// [`MmaTileConfig::values_at`]).
    pub inputs: SharedMemory<Vector<F, N>>,
    /// Softmax probabilities `[rows, tile_keys]`.
    pub probs: SharedMemory<F>,
    /// Scores or `P V` in f32, `[rows, scratch_stride]`.
    pub scratch: SharedMemory<f32>,
}

/// Allocates the tile's shared memory.
#[cube]
pub fn mma_tile_new<F: Float, N: Size>(#[comptime] cfg: MmaTileConfig) -> MmaTile<F, N> {
    let width = N::value();
    MmaTile::<F, N> {
        inputs: SharedMemory::<Vector<F, N>>::new(comptime!(cfg.input_elems() / width)),
        probs: SharedMemory::<F>::new(comptime!(cfg.rows() * cfg.probs_stride())),
        scratch: SharedMemory::<f32>::new(comptime!(cfg.rows() * cfg.scratch_stride())),
    }
}

/// This lane's query row in the cube and which half of the row's columns it owns.
#[cube]
pub fn lane_row() -> (usize, usize) {
    let plane = UNIT_POS as usize / PLANE;
    let lane = UNIT_POS as usize % PLANE;
    (plane * MMA + lane / 2, lane % 2)
}

/// The first row of this unit's plane.
#[cube]
fn plane_first_row() -> usize {
    (UNIT_POS as usize / PLANE) * MMA
}

/// The query position of cube row `row` and whether the row is a real query (not padding).
#[cube]
pub fn row_position(
    row: usize,
    t0: usize,
    seq: usize,
    #[comptime] cfg: MmaTileConfig,
) -> (usize, bool) {
    let position = t0 + row / cfg.group;
    (position, row < cfg.positions * cfg.group && position < seq)
}

/// The key rows `[start, end)` cube row `row` attends (empty for padding rows).
#[cube]
pub fn row_key_range(
    row: usize,
    t0: usize,
    seq: usize,
    n_keys: usize,
    #[comptime] keys: KeySet,
    #[comptime] cfg: MmaTileConfig,
) -> (usize, usize) {
    let (position, real) = row_position(row, t0, seq, cfg);
    let mut start = 0usize;
    let mut end = 0usize;
    if real {
        let (first, last) = key_range(position, n_keys, keys);
        start = first;
        end = last;
    }
    (start, end)
}

/// Copies `valid` rows from `first_row` of `src` (one KV head of a `[B, L, H_kv, dim]`
/// tensor read in vectors of `N` along its contiguous last dim) into the `rows` rows of
/// `dst` from element `dst_at`, `dim + ROW_PAD` elements apart; zeros past `valid`. Each unit issues all its loads before its stores, so
/// their latencies overlap.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_vector_rows<F: Float, N: Size>(
    src: &Tensor<Vector<F, N>>,
    at: Rows,
    first_row: usize,
    valid: usize,
    dst: &mut SharedMemory<Vector<F, N>>,
    #[comptime] dst_at: usize,
    #[comptime] rows: usize,
    #[comptime] dim: usize,
    #[comptime] units: usize,
) {
    let width = src.vector_size();
    let per_row = comptime!(dim / width);
    let count = comptime!(rows * per_row);
    let steps = comptime!(count.div_ceil(units));
    let mut loaded = Array::<Vector<F, N>>::new(steps);
    #[unroll]
    for step in 0..steps {
        let idx = UNIT_POS as usize + step * units;
        let row = idx / per_row;
        let mut value = Vector::<F, N>::from_int(0);
        if row < valid {
            value = src[(at.base + (first_row + row) * at.row_stride) / width + idx % per_row];
        }
        loaded[step] = value;
    }
    #[unroll]
    for step in 0..steps {
        let idx = UNIT_POS as usize + step * units;
        if idx < count {
            dst[comptime!(dst_at / width) + idx + (idx / per_row) * comptime!(ROW_PAD / width)] =
                loaded[step];
        }
    }
}

/// Copies the cube's query rows of `q: [B, T, H, d_k]` (vectors of `N`) into the tile,
/// zeros for padding rows, and returns this plane's rows as tensor-core fragments
/// ([`query_fragments`]). Every unit must call it (it synchronizes the cube).
#[cube]
pub fn load_queries<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    b: usize,
    t0: usize,
    kv_head: usize,
    tile: &mut MmaTile<F, N>,
    #[comptime] cfg: MmaTileConfig,
) -> Sequence<Matrix<F>> {
    let width = q.vector_size();
    let per_row = comptime!(cfg.d_k / width);
    let count = comptime!(cfg.rows() * per_row);
    let seq = q.shape(1);
    let mut idx = UNIT_POS as usize;
    while idx < count {
        let row = idx / per_row;
        let (position, real) = row_position(row, t0, seq, cfg);
        let mut value = Vector::<F, N>::from_int(0);
        if real {
            let head = kv_head * cfg.group + row % cfg.group;
            let at = b * q.stride(0) + position * q.stride(1) + head * q.stride(2);
            value = q[at / width + idx % per_row];
        }
        tile.inputs[idx + row * comptime!(ROW_PAD / width)] = value;
        idx += cfg.units();
    }
    sync_cube();
    let fragments = query_fragments::<F, N>(tile, cfg);
    // The key tiles reuse the query rows' memory.
    sync_cube();
    fragments
}

/// Elements a 16x16 fragment spans in a row-major buffer `stride` apart.
fn fragment_span(stride: usize) -> usize {
    (MMA - 1) * stride + MMA
}

/// The 16x16 `A` or `B` fragment of the rows in `buffer` (vectors of `N`) whose first
/// element is `at` (a multiple of `N`), rows `stride` elements apart.
#[cube]
fn load_fragment<F: Float, N: Size>(
    buffer: &SharedMemory<Vector<F, N>>,
    at: usize,
    #[comptime] stride: usize,
    #[comptime] ident: MatrixIdent,
    #[comptime] layout: MatrixLayout,
) -> Matrix<F> {
    let width = N::value();
    let fragment = unsafe { Matrix::<F>::uninitialized(ident, MMA, MMA, MMA, layout) };
    let start = at / width;
    cmma::load(
        &fragment,
        &buffer.slice(start, start + comptime!(fragment_span(stride) / width)),
        stride as u32,
    );
    fragment
}

/// This plane's query rows as tensor-core `A` fragments, one per 16 dims of `d_k`, loaded
/// once per cube (the queries must be in the tile and the cube synchronized).
#[cube]
fn query_fragments<F: Float, N: Size>(
    tile: &MmaTile<F, N>,
    #[comptime] cfg: MmaTileConfig,
) -> Sequence<Matrix<F>> {
    let first = plane_first_row();
    let mut fragments = Sequence::new();
    #[unroll]
    for k in 0..comptime!(cfg.d_k / MMA) {
        let at = first * cfg.key_stride() + k * MMA;
        fragments.push(load_fragment::<F, N>(
            &tile.inputs,
            at,
            cfg.key_stride(),
            MatrixIdent::A,
            MatrixLayout::RowMajor,
        ));
    }
    fragments
}

/// Scores `[16, tile_keys]` of this plane's query rows against the keys in the tile,
/// unscaled, into the plane's rows of the scratch.
#[cube]
pub fn plane_scores<F: Float, N: Size>(
    tile: &mut MmaTile<F, N>,
    queries: &Sequence<Matrix<F>>,
    #[comptime] cfg: MmaTileConfig,
) {
    let first = plane_first_row();
    #[unroll]
    for n in 0..comptime!(cfg.tile_keys / MMA) {
        let acc = Matrix::<f32>::from_value(
            MatrixIdent::Accumulator,
            MMA,
            MMA,
            MMA,
            MatrixLayout::Undefined,
            0.0,
        );
        #[unroll]
        for k in 0..comptime!(cfg.d_k / MMA) {
            // Keys stored as rows are K^T in column-major order.
            let at = comptime!(n * MMA * cfg.key_stride() + k * MMA);
            let keys = load_fragment::<F, N>(
                &tile.inputs,
                at,
                cfg.key_stride(),
                MatrixIdent::B,
                MatrixLayout::ColMajor,
            );
            cmma::execute::<F, F, f32, f32>(queries.index(k), &keys, &acc, &acc);
        }
        let at = first * cfg.scratch_stride() + n * MMA;
        cmma::store(
            &mut tile
                .scratch
                .slice_mut(at, at + comptime!(fragment_span(cfg.scratch_stride()))),
            &acc,
            cfg.scratch_stride() as u32,
            MatrixLayout::RowMajor,
        );
    }
}

/// A plane's running attention state: each lane's row max and sum (`stats`) and the
/// plane's unnormalized output rows `[16, d_v]` in tensor-core accumulators.
#[derive(CubeType)]
pub struct MmaState {
    pub stats: Array<f32>,
    pub out: Sequence<Matrix<f32>>,
}

/// Fresh state: max [`NEG_BIG`], sum 0, output 0.
#[cube]
pub fn mma_state_new(#[comptime] cfg: MmaTileConfig) -> MmaState {
    let mut stats = Array::<f32>::new(2usize);
    stats[0] = NEG_BIG;
    stats[1] = 0.0;
    let mut out = Sequence::new();
    #[unroll]
    for _ in 0..comptime!(cfg.d_v / MMA) {
        out.push(Matrix::<f32>::from_value(
            MatrixIdent::Accumulator,
            MMA,
            MMA,
            MMA,
            MatrixLayout::Undefined,
            0.0,
        ));
    }
    MmaState { stats, out }
}

/// The row log-sum-exp of a finished state ([`NEG_BIG`] for a row that attended nothing).
#[cube]
pub fn mma_state_lse(state: &MmaState) -> f32 {
    let mut lse = f32::new(NEG_BIG);
    if state.stats[1] > 0.0 {
        lse = state.stats[0] + state.stats[1].ln();
    }
    lse
}

/// Stores output fragments `2 chunk` and `2 chunk + 1` (those that exist) to this plane's
/// rows of the scratch, columns `0..32`; the plane must be synchronized before its lanes
/// read them. Lane `(row, half)` then owns columns `16 half .. 16 half + 16` of the chunk,
/// if they exist ([`owns_columns`]).
#[cube]
fn store_out_chunk<F: Float, N: Size>(
    tile: &mut MmaTile<F, N>,
    state: &MmaState,
    #[comptime] chunk: usize,
    #[comptime] cfg: MmaTileConfig,
) {
    let first = plane_first_row() * cfg.scratch_stride();
    #[unroll]
    for j in 0..2usize {
        if comptime!(2 * chunk + j < cfg.d_v / MMA) {
            let at = first + j * MMA;
            cmma::store(
                &mut tile
                    .scratch
                    .slice_mut(at, at + comptime!(fragment_span(cfg.scratch_stride()))),
                state.out.index(comptime!(2 * chunk + j)),
                cfg.scratch_stride() as u32,
                MatrixLayout::RowMajor,
            );
        }
    }
}

/// Whether this lane's 16 columns of output chunk `chunk` exist.
#[cube]
fn owns_columns(half: usize, #[comptime] chunk: usize, #[comptime] cfg: MmaTileConfig) -> bool {
    2 * chunk + half < cfg.d_v / MMA
}

/// Multiplies each row of the plane's output accumulators by its lane's `correction`,
/// chunk by chunk through the scratch. Every lane of the plane must call it.
#[cube]
fn rescale_out<F: Float, N: Size>(
    tile: &mut MmaTile<F, N>,
    state: &mut MmaState,
    correction: f32,
    #[comptime] cfg: MmaTileConfig,
) {
    let (row, half) = lane_row();
    let own = row * cfg.scratch_stride() + half * MMA;
    let first = plane_first_row() * cfg.scratch_stride();
    #[unroll]
    for chunk in 0..cfg.out_chunks() {
        store_out_chunk::<F, N>(tile, state, chunk, cfg);
        sync_plane();
        if owns_columns(half, chunk, cfg) {
            #[unroll]
            for i in 0..MMA {
                tile.scratch[own + i] *= correction;
            }
        }
        sync_plane();
        #[unroll]
        for j in 0..2usize {
            if comptime!(2 * chunk + j < cfg.d_v / MMA) {
                let at = first + j * MMA;
                cmma::load_with_layout(
                    state.out.index(comptime!(2 * chunk + j)),
                    &tile
                        .scratch
                        .slice(at, at + comptime!(fragment_span(cfg.scratch_stride()))),
                    cfg.scratch_stride() as u32,
                    MatrixLayout::RowMajor,
                );
            }
        }
        sync_plane();
    }
}

/// `out += P V` on the tensor cores: this plane's probabilities in the tile times the
/// values in the tile.
#[cube]
fn accumulate_values<F: Float, N: Size>(
    tile: &MmaTile<F, N>,
    state: &mut MmaState,
    #[comptime] cfg: MmaTileConfig,
) {
    let first = plane_first_row() * cfg.probs_stride();
    #[unroll]
    for k in 0..comptime!(cfg.tile_keys / MMA) {
        let at = first + k * MMA;
        let probs = Matrix::<F>::from_slice(
            MatrixIdent::A,
            MMA,
            MMA,
            MMA,
            MatrixLayout::RowMajor,
            &tile
                .probs
                .slice(at, at + comptime!(fragment_span(cfg.probs_stride()))),
            cfg.probs_stride() as u32,
        );
        #[unroll]
        for n in 0..comptime!(cfg.d_v / MMA) {
            let at = comptime!(cfg.values_at() + k * MMA * cfg.value_stride() + n * MMA);
            let values = load_fragment::<F, N>(
                &tile.inputs,
                at,
                cfg.value_stride(),
                MatrixIdent::B,
                MatrixLayout::RowMajor,
            );
            cmma::execute::<F, F, f32, f32>(
                &probs,
                &values,
                state.out.index(n),
                state.out.index(n),
            );
        }
    }
}

/// Whether column `col` of a tile starting at key row `first` with `valid` loaded rows is a
/// key of the range `[start, end)`.
#[cube]
pub fn key_in_range(col: usize, first: usize, valid: usize, start: usize, end: usize) -> bool {
    let key = first + col;
    col < valid && key >= start && key < end
}

/// How far (natural log) a row's max may fall behind the true max before the output is
/// rescaled: probabilities stay below `e^8`, harmless in f32 sums and f16/bf16 tiles, and
/// most tiles skip the rescale.
const RESCALE_MARGIN: f32 = 8.0;

/// Online-softmax step of this lane's half row: masks the scores in the scratch, writes the
/// probabilities to the tile in the input precision and updates the max and sum. The max
/// only moves when the tile's exceeds it by [`RESCALE_MARGIN`]; returns the factor the
/// row's output must be multiplied by (1 when it did not move).
#[cube]
#[allow(clippy::too_many_arguments)]
fn softmax_step<F: Float, N: Size>(
    tile: &mut MmaTile<F, N>,
    state: &mut MmaState,
    first: usize,
    valid: usize,
    start: usize,
    end: usize,
    scale: f32,
    #[comptime] cfg: MmaTileConfig,
) -> f32 {
    let (row, half) = lane_row();
    let cols = comptime!(cfg.tile_keys / 2);
    let scores = row * cfg.scratch_stride();
    let mut tile_max = f32::new(NEG_BIG);
    #[unroll]
    for i in 0..cols {
        let col = half * cols + i;
        if key_in_range(col, first, valid, start, end) {
            tile_max = max(tile_max, tile.scratch[scores + col] * scale);
        }
    }
    tile_max = max(tile_max, plane_shuffle_xor(tile_max, 1));
    let old_max = state.stats[0];
    let mut new_max = old_max;
    let mut correction = 1.0f32;
    if tile_max > old_max + RESCALE_MARGIN {
        new_max = tile_max;
        // A row that attended nothing yet has nothing to rescale.
        if old_max > NEG_BIG {
            correction = (old_max - new_max).exp();
        }
    }
    let mut sum = 0.0f32;
    #[unroll]
    for i in 0..cols {
        let col = half * cols + i;
        let mut p = 0.0f32;
        if key_in_range(col, first, valid, start, end) {
            p = (tile.scratch[scores + col] * scale - new_max).exp();
        }
        sum += p;
        tile.probs[row * cfg.probs_stride() + col] = F::cast_from(p);
    }
    sum += plane_shuffle_xor(sum, 1);
    state.stats[0] = new_max;
    state.stats[1] = state.stats[1] * correction + sum;
    correction
}

/// Attends one key tile: loads `valid` key and value rows from `first`, scores them against
/// the cube's query rows on the tensor cores and folds them into this lane's state, row
/// by row masked to the row's `[start, end)`. Every unit must call it (it synchronizes the
/// cube); `valid` may be anything from 0 to `tile_keys`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn mma_attend_tile<F: Float, N: Size>(
    k: &Tensor<Vector<F, N>>,
    k_at: Rows,
    v: &Tensor<Vector<F, N>>,
    v_at: Rows,
    first: usize,
    valid: usize,
    start: usize,
    end: usize,
    scale: f32,
    queries: &Sequence<Matrix<F>>,
    tile: &mut MmaTile<F, N>,
    state: &mut MmaState,
    #[comptime] cfg: MmaTileConfig,
) {
    load_vector_rows::<F, N>(
        k,
        k_at,
        first,
        valid,
        &mut tile.inputs,
        0usize,
        cfg.tile_keys,
        cfg.d_k,
        cfg.units(),
    );
    load_vector_rows::<F, N>(
        v,
        v_at,
        first,
        valid,
        &mut tile.inputs,
        cfg.values_at(),
        cfg.tile_keys,
        cfg.d_v,
        cfg.units(),
    );
    sync_cube();
    // A plane whose rows are all padding only helps load (uniform over the plane).
    if plane_first_row() < comptime!(cfg.positions * cfg.group) {
        plane_scores::<F, N>(tile, queries, cfg);
        sync_plane();
        let correction = softmax_step::<F, N>(tile, state, first, valid, start, end, scale, cfg);
        // Uniform over the plane.
        if plane_any(correction < 1.0) {
            rescale_out::<F, N>(tile, state, correction, cfg);
        }
        sync_plane();
        accumulate_values::<F, N>(tile, state, cfg);
    }
    sync_cube();
}

/// Attends the key rows `first..last` (a range the whole cube agrees on) tile by tile, each
/// row masked to its own `[start, end)`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn mma_attend_range<F: Float, N: Size>(
    k: &Tensor<Vector<F, N>>,
    k_at: Rows,
    v: &Tensor<Vector<F, N>>,
    v_at: Rows,
    first: usize,
    last: usize,
    start: usize,
    end: usize,
    scale: f32,
    queries: &Sequence<Matrix<F>>,
    tile: &mut MmaTile<F, N>,
    state: &mut MmaState,
    #[comptime] cfg: MmaTileConfig,
) {
    let mut row = first;
    while row < last {
        let valid = min(last - row, cfg.tile_keys);
        mma_attend_tile::<F, N>(
            k, k_at, v, v_at, row, valid, start, end, scale, queries, tile, state, cfg,
        );
        row += cfg.tile_keys;
    }
}

/// Writes this plane's output rows to `o: [B, T, H, d_v]` (`out / sum`, 0 for an empty
/// row; each lane its half row) and, from the lane of the first half, the row's
/// log-sum-exp to `lse: [B, H, T]`. Every lane must call it; it uses the scratch.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn mma_state_finish<F: Float, N: Size>(
    state: &MmaState,
    tile: &mut MmaTile<F, N>,
    o: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    b: usize,
    t0: usize,
    kv_head: usize,
    #[comptime] cfg: MmaTileConfig,
) {
    let (row, half) = lane_row();
    let (position, real) = row_position(row, t0, o.shape(1), cfg);
    let head = kv_head * cfg.group + row % cfg.group;
    let sum = state.stats[1];
    let mut inverse = 0.0f32;
    if sum > 0.0 {
        inverse = 1.0 / sum;
    }
    let out = b * o.stride(0) + position * o.stride(1) + head * o.stride(2);
    let own = row * cfg.scratch_stride() + half * MMA;
    #[unroll]
    for chunk in 0..cfg.out_chunks() {
        store_out_chunk::<F, N>(tile, state, chunk, cfg);
        sync_plane();
        if real && owns_columns(half, chunk, cfg) {
            #[unroll]
            for i in 0..MMA {
                let col = chunk * CHUNK + half * MMA + i;
                o[out + col * o.stride(3)] = F::cast_from(tile.scratch[own + i] * inverse);
            }
        }
        sync_plane();
    }
    if real && half == 0 {
        lse[b * lse.stride(0) + head * lse.stride(1) + position * lse.stride(2)] =
            mma_state_lse(state);
    }
}
