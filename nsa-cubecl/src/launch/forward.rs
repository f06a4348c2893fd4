//! The forward kernels of the three branches.

use cubecl::prelude::*;
use cubecl::CubeElement;

use super::{address_type, mma_grid, portable_grid, twice, MMA_VECTOR};
use crate::common::keys::KeySet;
use crate::plan::{AttentionPlan, CompressedPlan, GatedSelectionPlan, Path};
use crate::portable::compress::compressed_attention_kernel;
use crate::portable::select::selected_attention_kernel;
use crate::portable::window::window_attention_kernel;
use crate::tensor_core::layout::MmaTileConfig;
use crate::tensor_core::range::range_attention_mma_kernel;
use crate::tensor_core::scores::compressed_scores_mma_kernel;
use crate::tensor_core::select::{selected_attention_mma_kernel, GatedRest, GatedRestLaunch};

/// One branch's attention: `q: [B, T, H, d_k]`, its keys `k: [B, L, H_kv, d_k]` and values
/// `v: [B, L, H_kv, d_v]` -> `o: [B, T, H, d_v]` and the rows' log-sum-exp `lse: [B, H, T]`
/// (f32). All contiguous.
pub struct AttentionArgs<R: Runtime> {
    /// Queries.
    pub q: TensorArg<R>,
    /// The branch's keys.
    pub k: TensorArg<R>,
    /// The branch's values.
    pub v: TensorArg<R>,
    /// Output.
    pub o: TensorArg<R>,
    /// Row log-sum-exp.
    pub lse: TensorArg<R>,
}

impl<R: Runtime> AttentionArgs<R> {
    /// Every tensor, for [`address_type`].
    fn all(&self) -> [&TensorArg<R>; 5] {
        [&self.q, &self.k, &self.v, &self.o, &self.lse]
    }

    /// Every tensor and `selected`, for [`address_type`].
    fn with<'a>(&'a self, selected: &'a TensorArg<R>) -> [&'a TensorArg<R>; 6] {
        [&self.q, &self.k, &self.v, &self.o, &self.lse, selected]
    }
}

/// What the selection kernel sums its own output with in the gated sum (Eq. 5): the
/// compression and window branches' outputs `[B, T, H, d_v]` and the gates `[B, T, H, 3]`
/// in the outputs' type, contiguous.
pub struct GatedRestArgs<R: Runtime> {
    /// The compression branch's output.
    pub compressed: TensorArg<R>,
    /// The window branch's output.
    pub window: TensorArg<R>,
    /// The gates, in the order (compressed, selected, window).
    pub gates: TensorArg<R>,
}

/// [`range_attention_mma_kernel()`] over `plan`'s keys with `tile`.
fn launch_range<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    plan: &AttentionPlan,
    tile: MmaTileConfig,
    args: AttentionArgs<R>,
) {
    let (count, dim) = mma_grid(client, &plan.shape, &tile);
    let addresses = address_type(&args.all());
    // SAFETY: every index the kernel forms stays inside its tensors for these shapes (rows
    // past `valid` and padding rows are never read), as the parity tests check.
    unsafe {
        range_attention_mma_kernel::launch_unchecked::<F, R>(
            client, count, dim, addresses, MMA_VECTOR, args.q, args.k, args.v, args.o, args.lse,
            plan.scale, tile, plan.keys,
        );
    }
}

/// Sliding-window attention (`k`, `v` of `L >= T` rows, the queries the last `T` of them), as
/// [`crate::plan::plan_window`] planned it.
pub fn launch_window<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    plan: &AttentionPlan,
    args: AttentionArgs<R>,
) {
    let KeySet::Window { size } = plan.keys else {
        panic!("launch_window takes a window plan, got {:?}", plan.keys)
    };
    match plan.path {
        Path::TensorCore(tile) => launch_range::<R, F>(client, plan, tile, args),
        Path::Portable(tile) => {
            let (count, dim) = portable_grid(client, &plan.shape, &tile);
            window_attention_kernel::launch::<F, R>(
                client,
                count,
                dim,
                address_type(&args.all()),
                args.q,
                args.k,
                args.v,
                args.o,
                args.lse,
                plan.scale,
                tile,
                size,
            );
        }
    }
}

/// Selected-block attention over `selected: [B, H_kv, T, n]` Int (block indices, -1 for an
/// empty slot; `k`, `v` of `T_k >= T` rows, the queries the last `T` of them), as
/// [`crate::plan::plan_selected`] planned it.
pub fn launch_selected<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    plan: &AttentionPlan,
    args: AttentionArgs<R>,
    selected: TensorArg<R>,
) {
    let select_block = plan.keys.select_block();
    match plan.path {
        Path::TensorCore(tile) => launch_selected_mma::<R, F, I>(
            client,
            plan,
            tile,
            args,
            selected,
            ComptimeOptionArgs::None,
        ),
        Path::Portable(tile) => {
            let (count, dim) = portable_grid(client, &plan.shape, &tile);
            selected_attention_kernel::launch::<F, I, R>(
                client,
                count,
                dim,
                address_type(&args.with(&selected)),
                args.q,
                args.k,
                args.v,
                selected,
                args.o,
                args.lse,
                plan.scale,
                tile,
                select_block,
            );
        }
    }
}

/// Selected-block attention that finishes the gated sum (Eq. 5): as [`launch_selected`],
/// but `args.o` receives `g_cmp * o_cmp + g_slc * o_slc + g_win * o_win` and the selection
/// output itself is never written.
pub fn launch_selected_gated_sum<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    plan: &GatedSelectionPlan,
    args: AttentionArgs<R>,
    selected: TensorArg<R>,
    rest: GatedRestArgs<R>,
) {
    let rest = GatedRestLaunch::new(rest.compressed, rest.window, rest.gates);
    launch_selected_mma::<R, F, I>(
        client,
        &plan.attention,
        plan.tile,
        args,
        selected,
        ComptimeOptionArgs::Some(rest),
    );
}

/// [`selected_attention_mma_kernel()`], with or without the gated-sum epilogue.
fn launch_selected_mma<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    plan: &AttentionPlan,
    tile: MmaTileConfig,
    args: AttentionArgs<R>,
    selected: TensorArg<R>,
    rest: ComptimeOptionArgs<GatedRest<F>, R>,
) {
    let (count, dim) = mma_grid(client, &plan.shape, &tile);
    // The gated sum's operands (`rest`) have the shape of `o` or fewer elements.
    let addresses = address_type(&args.with(&selected));
    // SAFETY: every index the kernel forms stays inside its tensors for these shapes (rows
    // past `valid` and padding rows are never read), as the parity tests check.
    unsafe {
        selected_attention_mma_kernel::launch_unchecked::<F, I, R>(
            client,
            count,
            dim,
            addresses,
            MMA_VECTOR,
            args.q,
            args.k,
            args.v,
            selected,
            rest,
            args.o,
            args.lse,
            plan.scale,
            tile,
            plan.keys.select_block(),
        );
    }
}

/// Compressed attention with block scoring and top-n: `args.k`, `args.v` the compressed
/// keys and values `[B, N_cmp, H_kv, d]` -> also `selected: [B, H_kv, T, n]` Int (ascending
/// block indices, -1 padded) for queries at positions `plan.shape.query_start ..`, as
/// [`crate::plan::plan_compressed`] planned it.
pub fn launch_compressed<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    plan: &CompressedPlan,
    args: AttentionArgs<R>,
    selected: TensorArg<R>,
) {
    let addresses = address_type(&args.with(&selected));
    match plan.path {
        Path::TensorCore(tiles) => {
            let (q, q_again) = twice(args.q);
            let (lse, lse_again) = twice(args.lse);
            let (k, k_again) = twice(args.k);
            // The attention pass writes `o` and `lse`, which the scoring pass reads.
            let pass = AttentionArgs {
                q,
                k,
                v: args.v,
                o: args.o,
                lse,
            };
            launch_range::<R, F>(
                client,
                &plan.attention_pass(tiles.attention),
                tiles.attention,
                pass,
            );
            let (count, dim) = mma_grid(client, &plan.shape, &tiles.scoring);
            // SAFETY: as for the attention pass.
            unsafe {
                compressed_scores_mma_kernel::launch_unchecked::<F, I, R>(
                    client,
                    count,
                    dim,
                    addresses,
                    MMA_VECTOR,
                    q_again,
                    k_again,
                    lse_again,
                    selected,
                    plan.scale,
                    tiles.scoring,
                    plan.selection,
                );
            }
        }
        Path::Portable(tile) => {
            let (count, dim) = portable_grid(client, &plan.shape, &tile);
            let query_start =
                u32::try_from(plan.shape.query_start).expect("query positions fit in 32 bits");
            compressed_attention_kernel::launch::<F, I, R>(
                client,
                count,
                dim,
                addresses,
                args.q,
                args.k,
                args.v,
                args.o,
                args.lse,
                selected,
                plan.scale,
                query_start,
                tile,
                plan.selection,
            );
        }
    }
}
