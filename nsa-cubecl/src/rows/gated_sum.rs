//! The gated sum of the three branch outputs (Eq. 5),
//! `o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`, and its backward pass, each one
//! pass over memory. The tensor-core selection kernel can finish the same sum in its
//! epilogue ([`crate::tensor_core::select::GatedRest`]).

use cubecl::prelude::*;

use crate::rows::delta::{row_leader, row_total, unit_row, vector_dot, RowLayout};

/// Branches summed.
const BRANCHES: usize = 3;

/// `o_cmp`, `o_slc`, `o_win: [B, T, H, d_v]`, `gates: [B, T, H, 3]` (all contiguous) ->
/// `o: [B, T, H, d_v]`, one unit per vector of `o` (`vectors` per row), summed in f32.
#[cube(launch_unchecked, address_type = "dynamic")]
pub fn gated_sum_kernel<F: Float, N: Size>(
    o_cmp: &Tensor<Vector<F, N>>,
    o_slc: &Tensor<Vector<F, N>>,
    o_win: &Tensor<Vector<F, N>>,
    gates: &Tensor<F>,
    o: &mut Tensor<Vector<F, N>>,
    #[comptime] vectors: usize,
) {
    let at = ABSOLUTE_POS;
    if at < o.len() {
        let gate = at / vectors * BRANCHES;
        let sum = weighted(o_cmp[at], gates[gate])
            + weighted(o_slc[at], gates[gate + 1])
            + weighted(o_win[at], gates[gate + 2]);
        o[at] = Vector::cast_from(sum);
    }
}

/// `g * x` in f32.
#[cube]
fn weighted<F: Float, N: Size>(x: Vector<F, N>, g: F) -> Vector<f32, N> {
    Vector::<f32, N>::cast_from(x) * Vector::new(f32::cast_from(g))
}

/// Backward of [`gated_sum_kernel()`]: `d_o: [B, T, H, d_v]` and the forward inputs ->
/// `d_cmp`, `d_slc`, `d_win: [B, T, H, d_v]` (`g_b * dO`) and `d_gates: [B, T, H, 3]`
/// (`rowsum(dO * o_b)`, summed in f32 in a fixed order). Rows laid out by `layout`; all
/// tensors contiguous.
#[cube(launch_unchecked, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
pub fn gated_sum_backward_kernel<F: Float, N: Size>(
    d_o: &Tensor<Vector<F, N>>,
    o_cmp: &Tensor<Vector<F, N>>,
    o_slc: &Tensor<Vector<F, N>>,
    o_win: &Tensor<Vector<F, N>>,
    gates: &Tensor<F>,
    d_cmp: &mut Tensor<Vector<F, N>>,
    d_slc: &mut Tensor<Vector<F, N>>,
    d_win: &mut Tensor<Vector<F, N>>,
    d_gates: &mut Tensor<F>,
    #[comptime] layout: RowLayout,
) {
    let mut partials = SharedMemory::<f32>::new(comptime!(BRANCHES * layout.units()));
    let (row, first) = unit_row(layout);
    let active = row * BRANCHES < gates.len();
    let mut dots = Array::<f32>::new(BRANCHES);
    #[unroll]
    for b in 0..BRANCHES {
        dots[b] = 0.0;
    }
    if active {
        let g_cmp = Vector::<F, N>::new(gates[row * BRANCHES]);
        let g_slc = Vector::<F, N>::new(gates[row * BRANCHES + 1]);
        let g_win = Vector::<F, N>::new(gates[row * BRANCHES + 2]);
        let mut i = first;
        while i < layout.vectors {
            let at = row * layout.vectors + i;
            let grad = d_o[at];
            d_cmp[at] = grad * g_cmp;
            d_slc[at] = grad * g_slc;
            d_win[at] = grad * g_win;
            dots[0] += vector_dot(grad, o_cmp[at]);
            dots[1] += vector_dot(grad, o_slc[at]);
            dots[2] += vector_dot(grad, o_win[at]);
            i += layout.units_per_row;
        }
    }
    #[unroll]
    for b in 0..BRANCHES {
        partials[b * layout.units() + UNIT_POS as usize] = dots[b];
    }
    sync_cube();
    if active && row_leader(layout) {
        #[unroll]
        for b in 0..BRANCHES {
            d_gates[row * BRANCHES + b] = F::cast_from(row_total(&partials, b, layout));
        }
    }
}
