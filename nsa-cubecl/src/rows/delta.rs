//! `delta = rowsum(dO * O)`: the per-row statistic both backward kernels of a branch read,
//! and the row layout it shares with the gated sum's backward pass ([`crate::rows::gated_sum`]).

use cubecl::prelude::*;

/// How a row kernel lays rows of `vectors` vectors (`[B, T, H, d_v]` read in vectors of
/// `N`) onto cubes: `units_per_row` consecutive units share a row, unit `u` of a row taking
/// its vectors `u, u + units_per_row, ..`, so a plane reads consecutive memory; a cube
/// holds `rows_per_cube` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RowLayout {
    /// Vectors per row, `d_v / N`.
    pub vectors: usize,
    /// Units sharing a row.
    pub units_per_row: usize,
    /// Rows per cube.
    pub rows_per_cube: usize,
}

impl RowLayout {
    /// Units per cube, at most.
    const MAX_UNITS: usize = 256;

    /// The layout for rows of `vectors` vectors.
    pub fn new(vectors: usize) -> Self {
        let units_per_row = vectors.clamp(1, Self::MAX_UNITS);
        Self {
            vectors,
            units_per_row,
            rows_per_cube: Self::MAX_UNITS / units_per_row,
        }
    }

    /// Units per cube.
    pub fn units(&self) -> usize {
        self.units_per_row * self.rows_per_cube
    }
}

/// This unit's row of `[rows, vectors]` and its first vector in the row.
#[cube]
pub fn unit_row(#[comptime] layout: RowLayout) -> (usize, usize) {
    let row = ABSOLUTE_POS / layout.units_per_row;
    (row, ABSOLUTE_POS % layout.units_per_row)
}

/// Sum `count` of the row's units' partial sums, written to `partials` at
/// `[count, cube units]` (`k * units + unit`), in a fixed order: a row's first unit calls
/// it after a cube barrier, and gets the total of partial `k`.
#[cube]
pub fn row_total(partials: &SharedMemory<f32>, k: usize, #[comptime] layout: RowLayout) -> f32 {
    let first = k * layout.units() + UNIT_POS as usize;
    let mut sum = 0.0f32;
    #[unroll]
    for u in 0..layout.units_per_row {
        sum += partials[first + u];
    }
    sum
}

/// Whether this unit is the first of its row.
#[cube]
pub fn row_leader(#[comptime] layout: RowLayout) -> bool {
    UNIT_POS as usize % layout.units_per_row == 0
}

/// `sum(a * b)` over two vectors, in f32.
#[cube]
pub fn vector_dot<F: Float, N: Size>(a: Vector<F, N>, b: Vector<F, N>) -> f32 {
    let mut sum = 0.0f32;
    #[unroll]
    for e in 0..N::value() {
        sum += f32::cast_from(a[e]) * f32::cast_from(b[e]);
    }
    sum
}

/// `d_o`, `o: [B, T, H, d_v]` (contiguous, read in vectors of `N`) -> `delta: [B, T, H]`
/// f32 (contiguous), rows laid out by `layout`, summed in f32 in a fixed order.
#[cube(launch_unchecked, address_type = "dynamic")]
pub fn delta_kernel<F: Float, N: Size>(
    d_o: &Tensor<Vector<F, N>>,
    o: &Tensor<Vector<F, N>>,
    delta: &mut Tensor<f32>,
    #[comptime] layout: RowLayout,
) {
    let mut partials = SharedMemory::<f32>::new(comptime!(layout.units()));
    let (row, first) = unit_row(layout);
    let active = row < delta.len();
    let mut sum = 0.0f32;
    if active {
        let mut i = first;
        while i < layout.vectors {
            let at = row * layout.vectors + i;
            sum += vector_dot(d_o[at], o[at]);
            i += layout.units_per_row;
        }
    }
    partials[UNIT_POS as usize] = sum;
    sync_cube();
    if active && row_leader(layout) {
        delta[row] = row_total(&partials, 0, layout);
    }
}
