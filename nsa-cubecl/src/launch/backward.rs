//! The backward pass of one branch, in the order its steps depend on each other:
//! `delta = rowsum(dO * O)`, for the selection branch the selection inverted into a bitmap,
//! the query side (`dQ`), the key side (`dK`, `dV`) and the sum of its split copies.

use cubecl::calculate_cube_count_elemwise;
use cubecl::prelude::*;
use cubecl::CubeElement;

use super::{address_type, elementwise_grid, mma_grid, portable_grid, MMA_VECTOR};
use crate::common::bitmap::{selection_bitmap_kernel, WORD_BITS};
use crate::config::AttentionShape;
use crate::plan::{AttentionPlan, BranchBackwardPlan, KeyGradSplit, Path};
use crate::portable::grad_key::grad_key_value_kernel;
use crate::portable::grad_query::grad_query_kernel;
use crate::rows::key_splits::sum_key_splits_kernel;
use crate::tensor_core::grad_key::grad_key_value_mma_kernel;
use crate::tensor_core::grad_query::grad_query_mma_kernel;

use super::rows::launch_delta;

/// The selection branch's block indices and the buffer their inversion goes to.
pub struct SelectionArgs<R: Runtime> {
    /// `[B, H_kv, T, n]` Int, as the forward pass selected.
    pub selected: TensorArg<R>,
    /// [`BranchBackwardPlan::bitmap_shape`], the same Int type: written, then read by the
    /// key side.
    pub bitmap: TensorArg<R>,
}

/// Tensors of one branch's backward pass, all contiguous. Float tensors are in the input
/// type `F` unless said otherwise.
pub struct BranchBackwardArgs<R: Runtime> {
    /// Queries `[B, T, H, d_k]`.
    pub q: TensorArg<R>,
    /// The branch's keys `[B, L, H_kv, d_k]`.
    pub k: TensorArg<R>,
    /// The branch's values `[B, L, H_kv, d_v]`.
    pub v: TensorArg<R>,
    /// The branch's forward output `[B, T, H, d_v]`.
    pub output: TensorArg<R>,
    /// The forward rows' log-sum-exp `[B, H, T]`, f32.
    pub lse: TensorArg<R>,
    /// Gradient of the branch output, `[B, T, H, d_v]`.
    pub d_o: TensorArg<R>,
    /// Buffer of [`BranchBackwardPlan::delta_shape`], f32.
    pub delta: TensorArg<R>,
    /// For the selection branch (exactly when the plan has a bitmap shape).
    pub selection: Option<SelectionArgs<R>>,
    /// Buffer of [`BranchBackwardPlan::partial_shape`], f32, when the plan has one.
    pub partial: Option<TensorArg<R>>,
    /// Output `dQ`, `[B, T, H, d_k]`.
    pub dq: TensorArg<R>,
    /// Output `dK`, `[B, L, H_kv, d_k]`.
    pub dk: TensorArg<R>,
    /// Output `dV`, `[B, L, H_kv, d_v]`.
    pub dv: TensorArg<R>,
}

/// The backward pass of one branch as [`crate::plan::plan_branch_backward`] planned it.
/// Every output is a fixed-order sum: two runs give bitwise-equal gradients.
pub fn launch_branch_backward<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    plan: &BranchBackwardPlan,
    args: BranchBackwardArgs<R>,
) {
    let query = &plan.query;
    let shape = &query.shape;
    let (d_o, d_o_again) = super::twice(args.d_o);
    let (delta, delta_again) = super::twice(args.delta);
    launch_delta::<R, F>(client, shape, d_o, args.output, delta);
    let (delta, delta_again) = super::twice(delta_again);
    let (selected, bitmap) = match args.selection {
        Some(selection) => {
            let (bitmap, bitmap_again) = super::twice(selection.bitmap);
            let (selected, selected_again) = super::twice(selection.selected);
            launch_selection_bitmap::<R, I>(client, shape, selected, bitmap);
            (selected_again, bitmap_again)
        }
        None => (unread::<R, I>(client), unread::<R, I>(client)),
    };
    let (q, q_again) = super::twice(args.q);
    let (k, k_again) = super::twice(args.k);
    let (v, v_again) = super::twice(args.v);
    let (lse, lse_again) = super::twice(args.lse);
    let (d_o, d_o_last) = super::twice(d_o_again);
    let inputs = QueryInputs {
        q,
        k,
        v,
        d_o,
        delta,
        lse,
    };
    launch_grad_query::<R, F, I>(client, query, inputs, selected, args.dq);
    let inputs = QueryInputs {
        q: q_again,
        k: k_again,
        v: v_again,
        d_o: d_o_last,
        delta: delta_again,
        lse: lse_again,
    };
    match plan.key {
        Path::TensorCore((tile, split)) => {
            let (dk, dk_again) = super::twice(args.dk);
            let (dv, dv_again) = super::twice(args.dv);
            let (partial, partial_again) = match args.partial {
                Some(partial) => super::twice(partial),
                None => (unread::<R, f32>(client), unread::<R, f32>(client)),
            };
            let cube_dim = CubeDim::new_1d(tile.units() as u32);
            let cubes =
                split.splits * shape.batch * shape.kv_heads * query.key_rows.div_ceil(tile.rows());
            let count = calculate_cube_count_elemwise(client, cubes * tile.units(), cube_dim);
            let addresses = address_type(&inputs.with(&[&bitmap, &dk, &dv, &partial]));
            // SAFETY: as for the forward tensor-core kernels.
            unsafe {
                grad_key_value_mma_kernel::launch_unchecked::<F, I, R>(
                    client,
                    count,
                    cube_dim,
                    addresses,
                    MMA_VECTOR,
                    inputs.q,
                    inputs.k,
                    inputs.v,
                    inputs.d_o,
                    inputs.delta,
                    inputs.lse,
                    bitmap,
                    dk,
                    dv,
                    partial,
                    query.scale,
                    split.splits as u32,
                    split.positions as u32,
                    split.keys as u32,
                    tile,
                    query.keys,
                );
            }
            launch_sum_key_splits::<R, F>(client, query, split, partial_again, dk_again, dv_again);
        }
        Path::Portable(tile) => {
            let cube_dim = CubeDim::new_1d(tile.units as u32);
            let cubes = shape.batch * shape.kv_heads * query.key_rows.div_ceil(tile.tile_keys);
            let count = calculate_cube_count_elemwise(client, cubes * tile.units, cube_dim);
            let addresses = address_type(&inputs.with(&[&bitmap, &args.dk, &args.dv]));
            grad_key_value_kernel::launch::<F, I, R>(
                client,
                count,
                cube_dim,
                addresses,
                inputs.q,
                inputs.k,
                inputs.v,
                inputs.d_o,
                inputs.delta,
                inputs.lse,
                bitmap,
                args.dk,
                args.dv,
                query.scale,
                tile,
                query.keys,
            );
        }
    }
}

/// What both sides of the backward pass read.
struct QueryInputs<R: Runtime> {
    q: TensorArg<R>,
    k: TensorArg<R>,
    v: TensorArg<R>,
    d_o: TensorArg<R>,
    delta: TensorArg<R>,
    lse: TensorArg<R>,
}

impl<R: Runtime> QueryInputs<R> {
    /// These tensors and `others`, for [`address_type`].
    fn with<'a>(&'a self, others: &[&'a TensorArg<R>]) -> Vec<&'a TensorArg<R>> {
        let mut all = vec![&self.q, &self.k, &self.v, &self.d_o, &self.delta, &self.lse];
        all.extend_from_slice(others);
        all
    }
}

/// A one-element tensor of `E` for a kernel argument that the plan's branch never reads
/// (the selection of the compression and window branches, an unsplit key side's partial
/// sums).
fn unread<R: Runtime, E: CubeElement>(client: &ComputeClient<R>) -> TensorArg<R> {
    let handle = client.empty(core::mem::size_of::<E>());
    // SAFETY: one element, shape and strides of one element per dimension.
    unsafe { TensorArg::from_raw_parts(handle, [1usize; 4].into(), [1usize; 4].into()) }
}

/// The selection inverted ([`selection_bitmap_kernel()`]): `selected: [B, H_kv, T, n]` ->
/// the bitmap of [`BranchBackwardPlan::bitmap_shape`], both contiguous Int tensors of `I`.
fn launch_selection_bitmap<R: Runtime, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    shape: &AttentionShape,
    selected: TensorArg<R>,
    bitmap: TensorArg<R>,
) {
    let units = shape.batch * shape.kv_heads * shape.seq.div_ceil(WORD_BITS);
    let (count, cube_dim) = elementwise_grid(client, units);
    let addresses = address_type(&[&selected, &bitmap]);
    selection_bitmap_kernel::launch::<I, R>(client, count, cube_dim, addresses, selected, bitmap);
}

/// The query side: `dq: [B, T, H, d_k]`.
fn launch_grad_query<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    plan: &AttentionPlan,
    inputs: QueryInputs<R>,
    selected: TensorArg<R>,
    dq: TensorArg<R>,
) {
    let shape = &plan.shape;
    let addresses = address_type(&inputs.with(&[&selected, &dq]));
    match plan.path {
        Path::TensorCore(tile) => {
            let (count, dim) = mma_grid(client, shape, &tile);
            // SAFETY: as for the forward tensor-core kernels.
            unsafe {
                grad_query_mma_kernel::launch_unchecked::<F, I, R>(
                    client,
                    count,
                    dim,
                    addresses,
                    MMA_VECTOR,
                    inputs.q,
                    inputs.k,
                    inputs.v,
                    inputs.d_o,
                    inputs.delta,
                    inputs.lse,
                    selected,
                    dq,
                    plan.scale,
                    tile,
                    plan.keys,
                );
            }
        }
        Path::Portable(tile) => {
            let (count, dim) = portable_grid(client, shape, &tile, 1);
            grad_query_kernel::launch::<F, I, R>(
                client,
                count,
                dim,
                addresses,
                inputs.q,
                inputs.k,
                inputs.v,
                inputs.d_o,
                inputs.delta,
                inputs.lse,
                selected,
                dq,
                plan.scale,
                tile,
                plan.keys,
            );
        }
    }
}

/// Adds up the split copies of the tensor-core key side: `partial` -> key rows
/// `0..split.keys` of `dk` and `dv`. Nothing to do when nothing was split.
fn launch_sum_key_splits<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    plan: &AttentionPlan,
    split: KeyGradSplit,
    partial: TensorArg<R>,
    dk: TensorArg<R>,
    dv: TensorArg<R>,
) {
    if split.keys == 0 {
        return;
    }
    let shape = &plan.shape;
    let outputs = shape.batch * split.keys * shape.kv_heads * (shape.d_k + shape.d_v);
    let (count, cube_dim) = elementwise_grid(client, outputs);
    let addresses = address_type(&[&partial, &dk, &dv]);
    sum_key_splits_kernel::launch::<F, R>(
        client, count, cube_dim, addresses, partial, dk, dv, plan.scale, shape.d_k, shape.d_v,
    );
}
