//! The tensor-core online-softmax tile: the attention of [`crate::tile`] with its matrix
//! products (`Q K^T`, `P V`, and in the backward pass `dO V^T`, `dS K`, `P^T dO`, `dS^T Q`)
//! on 16x16x16 `cmma` tiles, for runtimes that have them (CUDA; lavapipe does not, and runs
//! the portable tile).
//!
//! A cube holds `rows = 16 * planes` query rows: the `G` query heads of `positions`
//! consecutive query positions of one KV head (row `r` is head `r % G` of position
//! `t0 + r / G`; rows from `positions * G` on, and rows past the sequence, are padding).
//! Plane `p` owns rows `16 p .. 16 p + 16`: their query fragments and output accumulators
//! stay in the plane's registers for the whole key walk, and its lane `2 r + h` keeps row
//! `r`'s running max and sum. Keys and values stream through shared memory `tile_keys` rows
//! at a time, as vectors in the input precision; scores pass through an f32 scratch where
//! each lane reads half of its row, and the probabilities go back to shared memory in the
//! input precision for the `P V` product. The key-side backward kernel uses the same tile
//! with the roles swapped: key rows on the planes, query rows streaming.

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
    /// Key rows per tile (a multiple of 16); query rows per step in the key-side kernel.
    pub tile_keys: usize,
    /// Planes per cube; each owns 16 query rows (key rows in the key-side kernel).
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

    /// Row stride of the f32 scratch, which holds a row of scores or a 32-column chunk of output
    /// columns: four words of padding, so the lanes reading a column of rows hit different
    /// banks.
    pub fn scratch_stride(&self) -> usize {
        self.tile_keys.max(CHUNK) + 4
    }

    /// Where the values start in the input buffer (elements): after the keys.
    pub fn values_at(&self) -> usize {
        self.tile_keys * self.key_stride()
    }

    /// Elements of the input buffer: the cube's query (or output-gradient) rows first, then
    /// a tile's keys and values in the same space.
    pub fn input_elems(&self) -> usize {
        (self.rows() * self.key_stride().max(self.value_stride()))
            .max(self.values_at() + self.tile_keys * self.value_stride())
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
pub fn plane_first_row() -> usize {
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

/// Copies the cube's rows of `x: [B, T, H, dim]` (queries or output gradients, vectors of
/// `N`) into the tile's input buffer, zeros for padding rows, and returns this plane's rows
/// as tensor-core `A` fragments, one per 16 of `dim`. Every unit must call it (it
/// synchronizes the cube); the input buffer is free again when it returns.
#[cube]
pub fn load_group_rows<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    b: usize,
    t0: usize,
    kv_head: usize,
    tile: &mut MmaTile<F, N>,
    #[comptime] dim: usize,
    #[comptime] cfg: MmaTileConfig,
) -> Sequence<Matrix<F>> {
    let width = x.vector_size();
    let per_row = comptime!(dim / width);
    let count = comptime!(cfg.rows() * per_row);
    let seq = x.shape(1);
    let mut idx = UNIT_POS as usize;
    while idx < count {
        let row = idx / per_row;
        let (position, real) = row_position(row, t0, seq, cfg);
        let mut value = Vector::<F, N>::from_int(0);
        if real {
            let head = kv_head * cfg.group + row % cfg.group;
            let at = b * x.stride(0) + position * x.stride(1) + head * x.stride(2);
            value = x[at / width + idx % per_row];
        }
        tile.inputs[idx + row * comptime!(ROW_PAD / width)] = value;
        idx += cfg.units();
    }
    sync_cube();
    let stride = comptime!(dim + ROW_PAD);
    let fragments = plane_fragments::<F, N>(&tile.inputs, plane_first_row() * stride, stride, dim);
    // Key tiles reuse the buffer.
    sync_cube();
    fragments
}

/// This plane's 16 rows of `dim` values in `buffer` (from element `at`, `stride` apart) as
/// tensor-core `A` fragments, one per 16 values.
#[cube]
pub fn plane_fragments<F: Float, N: Size>(
    buffer: &SharedMemory<Vector<F, N>>,
    at: usize,
    #[comptime] stride: usize,
    #[comptime] dim: usize,
) -> Sequence<Matrix<F>> {
    let mut fragments = Sequence::new();
    #[unroll]
    for k in 0..comptime!(dim / MMA) {
        fragments.push(load_fragment::<F, N>(
            buffer,
            at + k * MMA,
            stride,
            MatrixIdent::A,
            MatrixLayout::RowMajor,
        ));
    }
    fragments
}

/// `count` zeroed tensor-core accumulators.
#[cube]
pub fn zero_accumulators(#[comptime] count: usize) -> Sequence<Matrix<f32>> {
    let mut acc = Sequence::new();
    #[unroll]
    for _ in 0..count {
        acc.push(Matrix::<f32>::from_value(
            MatrixIdent::Accumulator,
            MMA,
            MMA,
            MMA,
            MatrixLayout::Undefined,
            0.0,
        ));
    }
    acc
}

/// [`load_group_rows()`] of the queries `q: [B, T, H, d_k]`.
#[cube]
pub fn load_queries<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    b: usize,
    t0: usize,
    kv_head: usize,
    tile: &mut MmaTile<F, N>,
    #[comptime] cfg: MmaTileConfig,
) -> Sequence<Matrix<F>> {
    load_group_rows::<F, N>(q, b, t0, kv_head, tile, cfg.d_k, cfg)
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

/// `C = A B^T` for this plane, `[16, tile_keys]`: `A` its row fragments (`k_tiles` of
/// them), `B` the tile's rows in `inputs` from element `at`, `stride` apart; `C` in f32 to
/// the plane's rows of `dst` (`scratch_stride` apart). Scores are `Q K^T`; the backward
/// pass also takes `dO V^T`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn plane_row_products<F: Float, N: Size>(
    inputs: &SharedMemory<Vector<F, N>>,
    fragments: &Sequence<Matrix<F>>,
    #[comptime] at: usize,
    #[comptime] stride: usize,
    #[comptime] k_tiles: usize,
    dst: &mut SharedMemory<f32>,
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
        for k in 0..k_tiles {
            // Rows stored one after another are B^T in column-major order.
            let rows = load_fragment::<F, N>(
                inputs,
                comptime!(at + n * MMA * stride + k * MMA),
                stride,
                MatrixIdent::B,
                MatrixLayout::ColMajor,
            );
            cmma::execute::<F, F, f32, f32>(fragments.index(k), &rows, &acc, &acc);
        }
        let out = first * cfg.scratch_stride() + n * MMA;
        cmma::store(
            &mut dst.slice_mut(out, out + comptime!(fragment_span(cfg.scratch_stride()))),
            &acc,
            cfg.scratch_stride() as u32,
            MatrixLayout::RowMajor,
        );
    }
}

/// Scores `Q K^T` of this plane's query rows against the keys in the tile, unscaled, into
/// the plane's rows of the scratch.
#[cube]
pub fn plane_scores<F: Float, N: Size>(
    tile: &mut MmaTile<F, N>,
    queries: &Sequence<Matrix<F>>,
    #[comptime] cfg: MmaTileConfig,
) {
    plane_row_products::<F, N>(
        &tile.inputs,
        queries,
        0usize,
        cfg.key_stride(),
        comptime!(cfg.d_k / MMA),
        &mut tile.scratch,
        cfg,
    );
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
    MmaState {
        stats,
        out: zero_accumulators(comptime!(cfg.d_v / MMA)),
    }
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

/// Stores fragments `2 chunk` and `2 chunk + 1` of `acc` (of `dim / 16`; those that
/// exist) to this plane's rows of the scratch, columns `0..32`; the plane must be
/// synchronized before its lanes read them. Lane `(row, half)` then owns columns
/// `16 half .. 16 half + 16` of the chunk, if they exist ([`owns_columns()`]).
#[cube]
fn store_chunk<F: Float, N: Size>(
    tile: &mut MmaTile<F, N>,
    acc: &Sequence<Matrix<f32>>,
    #[comptime] chunk: usize,
    #[comptime] dim: usize,
    #[comptime] cfg: MmaTileConfig,
) {
    let first = plane_first_row() * cfg.scratch_stride();
    #[unroll]
    for j in 0..2usize {
        if comptime!(2 * chunk + j < dim / MMA) {
            let at = first + j * MMA;
            cmma::store(
                &mut tile
                    .scratch
                    .slice_mut(at, at + comptime!(fragment_span(cfg.scratch_stride()))),
                acc.index(comptime!(2 * chunk + j)),
                cfg.scratch_stride() as u32,
                MatrixLayout::RowMajor,
            );
        }
    }
}

/// Whether this lane's 16 columns of chunk `chunk` of a `dim`-wide row exist.
#[cube]
fn owns_columns(half: usize, #[comptime] chunk: usize, #[comptime] dim: usize) -> bool {
    2 * chunk + half < dim / MMA
}

/// Writes this plane's rows `acc * factor` to `x` (`dim` values per row), chunk by chunk
/// through the scratch: each lane its row's `factor`, at `x[out + col * x.stride(3)]`, if
/// its row is `real`. Every lane of the plane must call it.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn store_rows<F: Float, N: Size, E: Float>(
    tile: &mut MmaTile<F, N>,
    acc: &Sequence<Matrix<f32>>,
    factor: f32,
    x: &mut Tensor<E>,
    out: usize,
    real: bool,
    #[comptime] dim: usize,
    #[comptime] cfg: MmaTileConfig,
) {
    let (row, half) = lane_row();
    let own = row * cfg.scratch_stride() + half * MMA;
    #[unroll]
    for chunk in 0..comptime!(dim.div_ceil(CHUNK)) {
        store_chunk::<F, N>(tile, acc, chunk, dim, cfg);
        sync_plane();
        if real && owns_columns(half, chunk, dim) {
            #[unroll]
            for i in 0..MMA {
                let col = chunk * CHUNK + half * MMA + i;
                x[out + col * x.stride(3)] = E::cast_from(tile.scratch[own + i] * factor);
            }
        }
        sync_plane();
    }
}

/// [`store_rows()`] to the cube's group rows of `x: [B, T, H, dim]` (padding rows skipped).
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn store_group_rows<F: Float, N: Size>(
    tile: &mut MmaTile<F, N>,
    acc: &Sequence<Matrix<f32>>,
    factor: f32,
    x: &mut Tensor<F>,
    b: usize,
    t0: usize,
    kv_head: usize,
    #[comptime] dim: usize,
    #[comptime] cfg: MmaTileConfig,
) {
    let (row, _) = lane_row();
    let (position, real) = row_position(row, t0, x.shape(1), cfg);
    let head = kv_head * cfg.group + row % cfg.group;
    let out = b * x.stride(0) + position * x.stride(1) + head * x.stride(2);
    store_rows::<F, N, F>(tile, acc, factor, x, out, real, dim, cfg);
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
    for chunk in 0..comptime!(cfg.d_v.div_ceil(CHUNK)) {
        store_chunk::<F, N>(tile, &state.out, chunk, cfg.d_v, cfg);
        sync_plane();
        if owns_columns(half, chunk, cfg.d_v) {
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

/// `acc += P B` on the tensor cores: this plane's rows of the tile's `probs` (`[16,
/// tile_keys]`, input precision) times the tile's rows `[tile_keys, 16 n]` in `inputs` from
/// element `at`, `stride` apart. `P V` in the forward pass, `dS K` for `dQ`.
#[cube]
pub fn accumulate_products<F: Float, N: Size>(
    probs: &SharedMemory<F>,
    inputs: &SharedMemory<Vector<F, N>>,
    #[comptime] at: usize,
    #[comptime] stride: usize,
    acc: &mut Sequence<Matrix<f32>>,
    #[comptime] n_tiles: usize,
    #[comptime] cfg: MmaTileConfig,
) {
    let first = plane_first_row() * cfg.probs_stride();
    #[unroll]
    for k in 0..comptime!(cfg.tile_keys / MMA) {
        let p_at = first + k * MMA;
        let lhs = Matrix::<F>::from_slice(
            MatrixIdent::A,
            MMA,
            MMA,
            MMA,
            MatrixLayout::RowMajor,
            &probs.slice(p_at, p_at + comptime!(fragment_span(cfg.probs_stride()))),
            cfg.probs_stride() as u32,
        );
        #[unroll]
        for n in 0..n_tiles {
            let rhs = load_fragment::<F, N>(
                inputs,
                comptime!(at + k * MMA * stride + n * MMA),
                stride,
                MatrixIdent::B,
                MatrixLayout::RowMajor,
            );
            cmma::execute::<F, F, f32, f32>(&lhs, &rhs, acc.index(n), acc.index(n));
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

/// Loads `valid` key rows and value rows from `first` into `rows` rows of `dst`: keys from
/// element 0 ([`MmaTileConfig::key_stride`] apart), values from element `values_at`
/// ([`MmaTileConfig::value_stride`] apart); zeros past `valid`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_key_value_rows<F: Float, N: Size>(
    k: &Tensor<Vector<F, N>>,
    k_at: Rows,
    v: &Tensor<Vector<F, N>>,
    v_at: Rows,
    first: usize,
    valid: usize,
    dst: &mut SharedMemory<Vector<F, N>>,
    #[comptime] rows: usize,
    #[comptime] values_at: usize,
    #[comptime] cfg: MmaTileConfig,
) {
    load_vector_rows::<F, N>(
        k,
        k_at,
        first,
        valid,
        dst,
        0usize,
        rows,
        cfg.d_k,
        cfg.units(),
    );
    load_vector_rows::<F, N>(
        v,
        v_at,
        first,
        valid,
        dst,
        values_at,
        rows,
        cfg.d_v,
        cfg.units(),
    );
}

/// [`load_key_value_rows()`] of one key tile into the tile's input buffer, then a cube
/// barrier.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_key_value_tile<F: Float, N: Size>(
    k: &Tensor<Vector<F, N>>,
    k_at: Rows,
    v: &Tensor<Vector<F, N>>,
    v_at: Rows,
    first: usize,
    valid: usize,
    tile: &mut MmaTile<F, N>,
    #[comptime] cfg: MmaTileConfig,
) {
    load_key_value_rows::<F, N>(
        k,
        k_at,
        v,
        v_at,
        first,
        valid,
        &mut tile.inputs,
        cfg.tile_keys,
        cfg.values_at(),
        cfg,
    );
    sync_cube();
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
    load_key_value_tile::<F, N>(k, k_at, v, v_at, first, valid, tile, cfg);
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
        accumulate_products::<F, N>(
            &tile.probs,
            &tile.inputs,
            cfg.values_at(),
            cfg.value_stride(),
            &mut state.out,
            comptime!(cfg.d_v / MMA),
            cfg,
        );
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
    let sum = state.stats[1];
    let mut inverse = 0.0f32;
    if sum > 0.0 {
        inverse = 1.0 / sum;
    }
    store_group_rows::<F, N>(tile, &state.out, inverse, o, b, t0, kv_head, cfg.d_v, cfg);
    let (row, half) = lane_row();
    let (position, real) = row_position(row, t0, o.shape(1), cfg);
    let head = kv_head * cfg.group + row % cfg.group;
    if real && half == 0 {
        lse[b * lse.stride(0) + head * lse.stride(1) + position * lse.stride(2)] =
            mma_state_lse(state);
    }
}
