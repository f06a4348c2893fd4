//! `delta = rowsum(dO * O)`: the per-row statistic both backward kernels of a branch read.

use cubecl::prelude::*;

/// `d_o`, `o: [B, T, H, d_v]` (contiguous, read in vectors of `N`) -> `delta: [B, T, H]`
/// f32 (any layout with unit-free `[B, T, H]` strides), one unit per row, summed in f32 in
/// a fixed order.
#[cube(launch_unchecked, address_type = "dynamic")]
pub fn delta_kernel<F: Float, N: Size>(
    d_o: &Tensor<Vector<F, N>>,
    o: &Tensor<Vector<F, N>>,
    delta: &mut Tensor<f32>,
    #[comptime] d_v: usize,
) {
    let width = N::value();
    let per_row = comptime!(d_v / width);
    let heads = delta.shape(2);
    let seq = delta.shape(1);
    let row = ABSOLUTE_POS;
    if row < delta.shape(0) * seq * heads {
        let mut sum = 0.0f32;
        #[unroll]
        for i in 0..per_row {
            let a = d_o[row * per_row + i];
            let b = o[row * per_row + i];
            #[unroll]
            for e in 0..width {
                sum += f32::cast_from(a[e]) * f32::cast_from(b[e]);
            }
        }
        let h = row % heads;
        let t = (row / heads) % seq;
        let batch = row / (heads * seq);
        delta[batch * delta.stride(0) + t * delta.stride(1) + h * delta.stride(2)] = sum;
    }
}
