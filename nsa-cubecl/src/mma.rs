//! The tensor-core tile of the backward kernels (`dO V^T`, `dS K`, `P^T dO`, `dS^T Q` and
//! the recomputed `Q K^T` on 16x16x16 `cmma` tiles), and what every tensor-core kernel
//! shares: the comptime [`MmaTileConfig`], the cube's row layout and the vector loaders of
//! query, key and value rows. The forward kernels compute on register fragments instead
//! ([`crate::register_tile`]). Runtimes without tensor cores (lavapipe) run the portable
//! tile ([`crate::tile`]).
//!
//! A cube holds `rows = 16 * planes` query rows: the `G` query heads of `positions`
//! consecutive query positions of one KV head (row `r` is head `r % G` of position
//! `t0 + r / G`; rows from `positions * G` on, and rows past the sequence, are padding).
//! Plane `p` owns rows `16 p .. 16 p + 16`: their query fragments and accumulators stay in
//! the plane's registers for the whole key walk, and its lane `2 r + h` works on half of
//! row `r`. Keys and values stream through shared memory `tile_keys` rows at a time, as
//! vectors in the input precision; scores pass through an f32 scratch, and probabilities
//! go back to shared memory in the input precision for the next product. The key-side
//! backward kernel uses the same tile with the roles swapped: key rows on the planes, query
//! rows streaming.

use cubecl::cmma::{self, Matrix, MatrixIdent, MatrixLayout};
use cubecl::prelude::*;

use crate::keys::{key_range, KeySet};
use crate::tile::Rows;

/// Side of a tensor-core tile.
pub const MMA: usize = 16;
/// Lanes of a plane (warp) the tile is laid out for.
pub const PLANE: usize = 32;
/// Elements of padding after each row of a shared input buffer, so the 16 rows of a
/// fragment load fall in different banks (a multiple of the vector width).
pub const ROW_PAD: usize = 8;

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

    /// Bytes of the input buffer alone (all the register-fragment forward tile of
    /// [`crate::register_tile`] needs) for inputs of `elem_bytes` bytes.
    pub fn input_bytes(&self, elem_bytes: usize) -> usize {
        elem_bytes * self.input_elems()
    }

    /// Bytes of shared memory of the whole tile for inputs of `elem_bytes` bytes.
    pub fn shared_bytes(&self, elem_bytes: usize) -> usize {
        self.input_bytes(elem_bytes)
            + elem_bytes * self.rows() * self.probs_stride()
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
/// `N`) into `inputs`, `dim + ROW_PAD` elements apart, zeros for padding rows. Every unit
/// must call it (it synchronizes the cube).
#[cube]
pub fn stage_group_rows<F: Float, N: Size>(
    x: &Tensor<Vector<F, N>>,
    b: usize,
    t0: usize,
    kv_head: usize,
    inputs: &mut SharedMemory<Vector<F, N>>,
    #[comptime] dim: usize,
    #[comptime] cfg: MmaTileConfig,
) {
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
        inputs[idx + row * comptime!(ROW_PAD / width)] = value;
        idx += cfg.units();
    }
    sync_cube();
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
