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

    /// Output columns each lane accumulates.
    pub fn half_width(&self) -> usize {
        self.d_v / 2
    }

    /// Row stride of the f32 scratch, which holds a row of scores or of `P V`: four words
    /// of padding, so the lanes reading a column of rows hit different banks.
    pub fn scratch_stride(&self) -> usize {
        self.tile_keys.max(self.d_v) + 4
    }

    /// Bytes of shared memory of the tile for inputs of `elem_bytes` bytes.
    pub fn shared_bytes(&self, elem_bytes: usize) -> usize {
        let rows = self.rows();
        let inputs =
            rows * self.d_k + self.tile_keys * (self.d_k + self.d_v) + rows * self.tile_keys;
        elem_bytes * inputs + 4 * rows * self.scratch_stride()
    }
}

/// The tile's shared memory.
#[derive(CubeType)]
pub struct MmaTile<F: Float> {
    /// `[rows, d_k]`.
    pub queries: SharedMemory<F>,
    /// `[tile_keys, d_k]`.
    pub keys: SharedMemory<F>,
    /// `[tile_keys, d_v]`.
    pub values: SharedMemory<F>,
    /// Softmax probabilities `[rows, tile_keys]`.
    pub probs: SharedMemory<F>,
    /// Scores or `P V` in f32, `[rows, scratch_stride]`.
    pub scratch: SharedMemory<f32>,
}

/// Allocates the tile's shared memory.
#[cube]
pub fn mma_tile_new<F: Float>(#[comptime] cfg: MmaTileConfig) -> MmaTile<F> {
    MmaTile::<F> {
        queries: SharedMemory::<F>::new(comptime!(cfg.rows() * cfg.d_k)),
        keys: SharedMemory::<F>::new(comptime!(cfg.tile_keys * cfg.d_k)),
        values: SharedMemory::<F>::new(comptime!(cfg.tile_keys * cfg.d_v)),
        probs: SharedMemory::<F>::new(comptime!(cfg.rows() * cfg.tile_keys)),
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
/// tensor read in vectors of `N` along its contiguous last dim) into the `rows` packed rows
/// of `dst`; zeros past `valid`. Each unit issues all its loads before its stores, so
/// their latencies overlap.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_vector_rows<F: Float, N: Size>(
    src: &Tensor<Vector<F, N>>,
    at: Rows,
    first_row: usize,
    valid: usize,
    dst: &mut SharedMemory<F>,
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
            let value = loaded[step];
            let out = idx * width;
            #[unroll]
            for e in 0..width {
                dst[out + e] = value[e];
            }
        }
    }
}

/// Copies the cube's query rows of `q: [B, T, H, d_k]` (vectors of `N`) into the tile,
/// zeros for padding rows.
#[cube]
pub fn load_queries<F: Float, N: Size>(
    q: &Tensor<Vector<F, N>>,
    b: usize,
    t0: usize,
    kv_head: usize,
    tile: &mut MmaTile<F>,
    #[comptime] cfg: MmaTileConfig,
) {
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
        #[unroll]
        for e in 0..width {
            tile.queries[idx * width + e] = value[e];
        }
        idx += cfg.units();
    }
}

/// `C[16, 16 n_tiles] = A[16, 16 k_tiles] B` on this plane's tensor cores. `A` is row-major
/// at `a_start` (`a_stride` apart); `B[k, n]` is row-major (`b_stride` apart) or, when
/// `transposed`, stored as rows `n` of `k` values; `C` is written f32 row-major at
/// `c_start`. Every lane of the plane must call it.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn plane_product<F: Float>(
    a: &SharedMemory<F>,
    a_start: usize,
    #[comptime] a_stride: usize,
    b: &SharedMemory<F>,
    #[comptime] b_stride: usize,
    #[comptime] transposed: bool,
    c: &mut SharedMemory<f32>,
    c_start: usize,
    #[comptime] c_stride: usize,
    #[comptime] n_tiles: usize,
    #[comptime] k_tiles: usize,
) {
    let b_layout = comptime!(if transposed {
        MatrixLayout::ColMajor
    } else {
        MatrixLayout::RowMajor
    });
    let a_span = comptime!((MMA - 1) * a_stride + MMA);
    let b_span = comptime!((MMA - 1) * b_stride + MMA);
    let c_span = comptime!((MMA - 1) * c_stride + MMA);
    #[unroll]
    for n in 0..n_tiles {
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
            let a_at = a_start + k * MMA;
            let lhs = Matrix::<F>::from_slice(
                MatrixIdent::A,
                MMA,
                MMA,
                MMA,
                MatrixLayout::RowMajor,
                &a.slice(a_at, a_at + a_span),
                a_stride as u32,
            );
            let b_at = comptime!(if transposed {
                n * MMA * b_stride + k * MMA
            } else {
                k * MMA * b_stride + n * MMA
            });
            let rhs = Matrix::<F>::from_slice(
                MatrixIdent::B,
                MMA,
                MMA,
                MMA,
                b_layout,
                &b.slice(b_at, b_at + b_span),
                b_stride as u32,
            );
            cmma::execute::<F, F, f32, f32>(&lhs, &rhs, &acc, &acc);
        }
        let c_at = c_start + n * MMA;
        cmma::store(
            &mut c.slice_mut(c_at, c_at + c_span),
            &acc,
            c_stride as u32,
            MatrixLayout::RowMajor,
        );
    }
}

/// Scores of this plane's query rows against the keys in the tile, unscaled, into the
/// plane's rows of the scratch.
#[cube]
pub fn plane_scores<F: Float>(tile: &mut MmaTile<F>, #[comptime] cfg: MmaTileConfig) {
    let first = plane_first_row();
    plane_product::<F>(
        &tile.queries,
        first * cfg.d_k,
        cfg.d_k,
        &tile.keys,
        cfg.d_k,
        true,
        &mut tile.scratch,
        first * cfg.scratch_stride(),
        cfg.scratch_stride(),
        comptime!(cfg.tile_keys / MMA),
        comptime!(cfg.d_k / MMA),
    );
}

/// Fresh row state of a lane: `[max, sum, acc_0 .. acc_{d_v / 2})`.
#[cube]
pub fn mma_state_new(#[comptime] cfg: MmaTileConfig) -> Array<f32> {
    let mut state = Array::<f32>::new(comptime!(cfg.half_width() + 2));
    state[0] = NEG_BIG;
    #[unroll]
    for i in 0..comptime!(cfg.half_width() + 1) {
        state[i + 1] = 0.0;
    }
    state
}

/// The row log-sum-exp of a finished state ([`NEG_BIG`] for a row that attended nothing).
#[cube]
pub fn mma_state_lse(state: &Array<f32>) -> f32 {
    let mut lse = f32::new(NEG_BIG);
    if state[1] > 0.0 {
        lse = state[0] + state[1].ln();
    }
    lse
}

/// Whether column `col` of a tile starting at key row `first` with `valid` loaded rows is a
/// key of the range `[start, end)`.
#[cube]
pub fn key_in_range(col: usize, first: usize, valid: usize, start: usize, end: usize) -> bool {
    let key = first + col;
    col < valid && key >= start && key < end
}

/// Online-softmax step of this lane's half row: masks the scores in the scratch, writes the
/// probabilities to the tile in the input precision and rescales the state.
#[cube]
#[allow(clippy::too_many_arguments)]
fn softmax_step<F: Float>(
    tile: &mut MmaTile<F>,
    state: &mut Array<f32>,
    first: usize,
    valid: usize,
    start: usize,
    end: usize,
    scale: f32,
    #[comptime] cfg: MmaTileConfig,
) {
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
    let new_max = max(state[0], tile_max);
    let correction = (state[0] - new_max).exp();
    let mut sum = 0.0f32;
    #[unroll]
    for i in 0..cols {
        let col = half * cols + i;
        let mut p = 0.0f32;
        if key_in_range(col, first, valid, start, end) {
            p = (tile.scratch[scores + col] * scale - new_max).exp();
        }
        sum += p;
        tile.probs[row * cfg.tile_keys + col] = F::cast_from(p);
    }
    sum += plane_shuffle_xor(sum, 1);
    state[0] = new_max;
    state[1] = state[1] * correction + sum;
    #[unroll]
    for i in 0..cfg.half_width() {
        state[i + 2] *= correction;
    }
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
    tile: &mut MmaTile<F>,
    state: &mut Array<f32>,
    #[comptime] cfg: MmaTileConfig,
) {
    load_vector_rows::<F, N>(
        k,
        k_at,
        first,
        valid,
        &mut tile.keys,
        cfg.tile_keys,
        cfg.d_k,
        cfg.units(),
    );
    load_vector_rows::<F, N>(
        v,
        v_at,
        first,
        valid,
        &mut tile.values,
        cfg.tile_keys,
        cfg.d_v,
        cfg.units(),
    );
    sync_cube();
    plane_scores::<F>(tile, cfg);
    sync_plane();
    softmax_step::<F>(tile, state, first, valid, start, end, scale, cfg);
    sync_plane();
    let plane_row = plane_first_row();
    plane_product::<F>(
        &tile.probs,
        plane_row * cfg.tile_keys,
        cfg.tile_keys,
        &tile.values,
        cfg.d_v,
        false,
        &mut tile.scratch,
        plane_row * cfg.scratch_stride(),
        cfg.scratch_stride(),
        comptime!(cfg.d_v / MMA),
        comptime!(cfg.tile_keys / MMA),
    );
    sync_plane();
    let (row, half) = lane_row();
    let products = row * cfg.scratch_stride() + half * cfg.half_width();
    #[unroll]
    for i in 0..cfg.half_width() {
        state[i + 2] += tile.scratch[products + i];
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
    tile: &mut MmaTile<F>,
    state: &mut Array<f32>,
    #[comptime] cfg: MmaTileConfig,
) {
    let mut row = first;
    while row < last {
        let valid = min(last - row, cfg.tile_keys);
        mma_attend_tile::<F, N>(
            k, k_at, v, v_at, row, valid, start, end, scale, tile, state, cfg,
        );
        row += cfg.tile_keys;
    }
}

/// Writes this lane's half of its row of `o: [B, T, H, d_v]` (`acc / sum`, 0 for an empty
/// row) and, from the lane of the first half, the row's log-sum-exp to `lse: [B, H, T]`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn mma_state_finish<F: Float>(
    state: &Array<f32>,
    o: &mut Tensor<F>,
    lse: &mut Tensor<f32>,
    b: usize,
    t0: usize,
    kv_head: usize,
    #[comptime] cfg: MmaTileConfig,
) {
    let (row, half) = lane_row();
    let (position, real) = row_position(row, t0, o.shape(1), cfg);
    if real {
        let head = kv_head * cfg.group + row % cfg.group;
        let sum = state[1];
        let mut inverse = 0.0f32;
        if sum > 0.0 {
            inverse = 1.0 / sum;
        }
        let out = b * o.stride(0) + position * o.stride(1) + head * o.stride(2);
        #[unroll]
        for i in 0..cfg.half_width() {
            let col = half * cfg.half_width() + i;
            o[out + col * o.stride(3)] = F::cast_from(state[i + 2] * inverse);
        }
        if half == 0 {
            lse[b * lse.stride(0) + head * lse.stride(1) + position * lse.stride(2)] =
                mma_state_lse(state);
        }
    }
}
