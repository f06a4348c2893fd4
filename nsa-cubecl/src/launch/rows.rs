//! The row kernels: `delta` of the backward pass and the gated sum (Eq. 5), forward and
//! backward. They read `[B, T, H, d_v]` rows as vectors of the widest of 4, 2, 1 elements
//! dividing `d_v`.

use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::*;
use cubecl::CubeElement;

use super::{address_type, elementwise_grid};
use crate::config::AttentionShape;
use crate::rows::delta::{delta_kernel, RowLayout};
use crate::rows::gated_sum::{gated_sum_backward_kernel, gated_sum_kernel};
use crate::rows::query_splits::merge_key_splits_kernel;

/// The gated sum's operands, contiguous in `F`: the branch outputs `[B, T, H, d_v]` in the
/// order (compressed, selected, window) and the gates `[B, T, H, 3]` in the same order.
pub struct GatedSumArgs<R: Runtime> {
    /// The three branch outputs.
    pub outputs: [TensorArg<R>; 3],
    /// The gates.
    pub gates: TensorArg<R>,
}

/// Elements per vector of the row kernels: the widest of 4, 2, 1 dividing `d_v`.
fn row_vector(d_v: usize) -> usize {
    [4, 2, 1]
        .into_iter()
        .find(|width| d_v.is_multiple_of(*width))
        .unwrap_or(1)
}

/// The row layout of `[B, T, H, d_v]` for the row kernels, its vector width, and its grid.
fn row_grid<R: Runtime>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
) -> (RowLayout, usize, CubeCount, CubeDim) {
    let vector = row_vector(shape.d_v);
    let layout = RowLayout::new(shape.d_v / vector);
    let rows = shape.batch * shape.seq * shape.heads;
    let cube_dim = CubeDim::new_1d(layout.units() as u32);
    let count = calculate_cube_count_elemwise(client, rows * layout.units_per_row, cube_dim);
    (layout, vector, count, cube_dim)
}

/// `delta = rowsum(dO * O)`: `d_o`, `o: [B, T, H, d_v]` contiguous in `F` ->
/// `delta: [B, T, H]` f32, contiguous.
pub(super) fn launch_delta<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    d_o: TensorArg<R>,
    o: TensorArg<R>,
    delta: TensorArg<R>,
) {
    let (layout, vector, count, cube_dim) = row_grid(client, shape);
    let addresses = address_type(&[&d_o, &o, &delta]);
    // SAFETY: `layout.units_per_row` units per row of `[B, T, H]`, guarded by the row count;
    // each reads vectors of its own row of `d_o` and `o`.
    unsafe {
        delta_kernel::launch_unchecked::<F, R>(
            client, count, cube_dim, addresses, vector, d_o, o, delta, layout,
        );
    }
}

/// The gated sum (Eq. 5) -> `o: [B, T, H, d_v]` in `F`. Only `batch`, `seq`, `heads` and
/// `d_v` of `shape` are read.
pub fn launch_gated_sum<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    args: GatedSumArgs<R>,
    o: TensorArg<R>,
) {
    let vector = row_vector(shape.d_v);
    let vectors = shape.d_v / vector;
    let (count, cube_dim) =
        elementwise_grid(client, shape.batch * shape.seq * shape.heads * vectors);
    let [o_cmp, o_slc, o_win] = args.outputs;
    let addresses = address_type(&[&o_cmp, &o_slc, &o_win, &args.gates, &o]);
    // SAFETY: one unit per vector of `o`, guarded by its length; the inputs have its shape
    // and `gates` three elements per row.
    unsafe {
        gated_sum_kernel::launch_unchecked::<F, R>(
            client, count, cube_dim, addresses, vector, o_cmp, o_slc, o_win, args.gates, o, vectors,
        );
    }
}

/// The merge of a forward pass split over its keys: the parts' `o: [S * B, T, H, d_v]` and
/// `lse: [S * B, H, T]` (f32) -> `o: [B, T, H, d_v]` in `F` and `lse: [B, H, T]` f32, all
/// contiguous.
pub(super) fn launch_merge_key_splits<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    parts: super::SplitArgs<R>,
    o: TensorArg<R>,
    lse: TensorArg<R>,
) {
    let elements = shape.batch * shape.seq * shape.heads * shape.d_v;
    let (count, cube_dim) = elementwise_grid(client, elements);
    let addresses = address_type(&[&parts.o, &parts.lse, &o, &lse]);
    merge_key_splits_kernel::launch::<F, R>(
        client, count, cube_dim, addresses, parts.o, parts.lse, o, lse,
    );
}

/// Backward of [`launch_gated_sum`]: `d_o: [B, T, H, d_v]` -> the branch outputs'
/// gradients `grads` (`[B, T, H, d_v]` each, same order) and the gates' `d_gates:
/// [B, T, H, 3]`, all contiguous in `F`.
pub fn launch_gated_sum_backward<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    d_o: TensorArg<R>,
    args: GatedSumArgs<R>,
    grads: [TensorArg<R>; 3],
    d_gates: TensorArg<R>,
) {
    let (layout, vector, count, cube_dim) = row_grid(client, shape);
    let [o_cmp, o_slc, o_win] = args.outputs;
    let [d_cmp, d_slc, d_win] = grads;
    let addresses = address_type(&[
        &d_o,
        &o_cmp,
        &o_slc,
        &o_win,
        &args.gates,
        &d_cmp,
        &d_slc,
        &d_win,
        &d_gates,
    ]);
    // SAFETY: as for `launch_delta`; every tensor has the shape of `d_o` or of `gates`.
    unsafe {
        gated_sum_backward_kernel::launch_unchecked::<F, R>(
            client, count, cube_dim, addresses, vector, d_o, o_cmp, o_slc, o_win, args.gates,
            d_cmp, d_slc, d_win, d_gates, layout,
        );
    }
}
