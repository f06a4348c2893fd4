//! What the tensor-core kernels share: the comptime [`MmaTileConfig`], the cube's row
//! layout and the vector loaders that stage query, key and value rows in shared memory
//! (key and value tiles by asynchronous copies, [`load_vector_rows()`]). The
//! matrix products themselves run on register fragments ([`crate::tensor_core::fragments`]).
//! Runtimes without tensor cores (lavapipe) run the portable tile ([`crate::portable::tile`]).
//!
//! A cube holds `rows = 16 * planes` query rows: the `G` query heads of `positions`
//! consecutive query positions of one KV head (row `r` is head `r % G` of position
//! `t0 + r / G`; rows from `positions * G` on, and rows past the sequence, are padding).
//! Plane `p` owns rows `16 p .. 16 p + 16`. Keys and values stream through shared memory
//! `tile_keys` rows at a time, as vectors in the input precision, each row padded by
//! [`ROW_PAD`] elements. The key-side backward kernel uses the same layout with the roles
//! swapped: key rows on the planes, query rows streaming.

use cubecl::prelude::barrier::{copy_async_checked, Barrier};
use cubecl::prelude::*;

use crate::common::geometry::Rows;
use crate::common::keys::{key_range, KeySet};

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

    /// Where the values start in the input buffer (elements): after the keys.
    pub fn values_at(&self) -> usize {
        self.tile_keys * self.key_stride()
    }

    /// Elements of one key tile's keys and values (values from [`Self::values_at`]).
    pub fn tile_elems(&self) -> usize {
        self.values_at() + self.tile_keys * self.value_stride()
    }

    /// Elements of the input buffer: the cube's query (or output-gradient) rows first, then
    /// a tile's keys and values in the same space.
    pub fn input_elems(&self) -> usize {
        (self.rows() * self.key_stride().max(self.value_stride())).max(self.tile_elems())
    }

    /// Bytes of the input buffer for inputs of `elem_bytes` bytes.
    pub fn input_bytes(&self, elem_bytes: usize) -> usize {
        elem_bytes * self.input_elems()
    }
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

/// Starts copying `valid` rows from `first_row` of `src` (one KV head of a `[B, L, H_kv, dim]`
/// tensor read in vectors of `N` along its contiguous last dim) into the `rows` rows of
/// `dst` from element `dst_at`, `dim + ROW_PAD` elements apart; zeros past `valid`. The
/// copies are asynchronous (`cp.async`): they go from global to shared memory without
/// passing through registers, and the copy itself writes the zeros. The `units` copying
/// units are numbered by `unit`; every one of them must call it, then [`wait_rows()`]
/// before any unit reads `dst`.
#[cube]
#[allow(clippy::too_many_arguments)]
pub fn load_vector_rows<F: Float, N: Size>(
    src: &Tensor<Vector<F, N>>,
    at: Rows,
    first_row: usize,
    valid: usize,
    dst: &mut SharedMemory<Vector<F, N>>,
    unit: usize,
    #[comptime] dst_at: usize,
    #[comptime] rows: usize,
    #[comptime] dim: usize,
    #[comptime] units: usize,
) {
    let width = src.vector_size();
    let per_row = comptime!(dim / width);
    let count = comptime!(rows * per_row);
    #[unroll]
    for step in 0..comptime!(count.div_ceil(units)) {
        let idx = unit + step * units;
        if idx < count {
            let row = idx / per_row;
            let from = (at.base + (first_row + row) * at.row_stride) / width + idx % per_row;
            let to = comptime!(dst_at / width) + idx + row * comptime!(ROW_PAD / width);
            copy_vector::<F, N>(src, from, row < valid, dst, to);
        }
    }
}

/// Starts the asynchronous copy of vector `from` of `src` to vector `to` of `dst`, or, when
/// not `inside`, of zeros (the copy zero-fills without reading `from`).
#[cube]
pub fn copy_vector<F: Float, N: Size>(
    src: &Tensor<Vector<F, N>>,
    from: usize,
    inside: bool,
    dst: &mut SharedMemory<Vector<F, N>>,
    to: usize,
) {
    let copy_elems = comptime!(src.vector_size() as u32);
    copy_async_checked(
        &src.slice(from, from + select(inside, 1usize, 0usize)),
        &mut dst.slice_mut(to, to + 1),
        copy_elems,
    );
}

/// Waits until the copies of [`load_vector_rows()`] since the last wait of the units that
/// arrive at `barrier` (the whole cube for [`rows_barrier()`]) have landed in shared memory,
/// and synchronizes those units.
#[cube]
pub fn wait_rows(barrier: &Shared<Barrier>) {
    barrier.commit_copy_async();
    barrier.arrive_and_wait();
}

/// The cube's barrier for [`wait_rows()`]: every unit must create it, before any load.
#[cube]
pub fn rows_barrier() -> Shared<Barrier> {
    Barrier::shared(CUBE_DIM, UNIT_POS == 0)
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

/// Whether column `col` of a tile starting at key row `first` with `valid` loaded rows is a
/// key of the range `[start, end)`.
#[cube]
pub fn key_in_range(col: usize, first: usize, valid: usize, start: usize, end: usize) -> bool {
    let key = first + col;
    col < valid && key >= start && key < end
}

/// Loads `valid` key rows and value rows from `first` into `rows` rows of `dst`: keys from
/// element 0 ([`MmaTileConfig::key_stride`] apart), values from element `values_at`
/// ([`MmaTileConfig::value_stride`] apart); zeros past `valid`. Every unit must call it: it
/// waits for the copies at `barrier` (which synchronizes the cube).
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
    barrier: &Shared<Barrier>,
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
        UNIT_POS as usize,
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
        UNIT_POS as usize,
        values_at,
        rows,
        cfg.d_v,
        cfg.units(),
    );
    wait_rows(barrier);
}
