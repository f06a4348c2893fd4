//! The forward kernels of the three branches.

use cubecl::prelude::*;
use cubecl::CubeElement;

use super::rows::launch_merge_key_splits;
use super::{address_type, mma_grid, portable_grid, twice, MMA_VECTOR};
use crate::common::keys::KeySet;
use crate::config::AttentionShape;
use crate::plan::{AttentionPlan, CompressedPlan, GatedSelectionPlan, Path};
use crate::portable::compress::{compressed_attention_kernel, compressed_selection_kernel};
use crate::portable::range::range_attention_kernel;
use crate::portable::select::selected_attention_kernel;
use crate::portable::tile::TileConfig;
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
    /// The parts' buffers, shaped as the plan's `split_shapes`, when the plan splits the
    /// keys; `None` otherwise.
    pub splits: Option<SplitArgs<R>>,
}

/// The buffers of a forward pass split over its keys: each part's output
/// `[S * B, T, H, d_v]` and log-sum-exp `[S * B, H, T]`, f32, contiguous.
pub struct SplitArgs<R: Runtime> {
    /// The parts' outputs.
    pub o: TensorArg<R>,
    /// The parts' log-sum-exps.
    pub lse: TensorArg<R>,
}

impl<R: Runtime> AttentionArgs<R> {
    /// Every tensor, and `extra`, for [`address_type`].
    fn all<'a>(&'a self, extra: Option<&'a TensorArg<R>>) -> Vec<&'a TensorArg<R>> {
        let mut all = vec![&self.q, &self.k, &self.v, &self.o, &self.lse];
        if let Some(parts) = &self.splits {
            all.extend([&parts.o, &parts.lse]);
        }
        all.extend(extra);
        all
    }
}

/// Where a portable forward kernel writes its rows: the outputs themselves, or, when the
/// plan splits the keys, the parts' buffers, merged into the outputs afterwards.
enum Rows<R: Runtime> {
    Direct(TensorArg<R>, TensorArg<R>),
    Split(SplitArgs<R>, PendingMerge<R>),
}

/// The merge still to run after a split kernel: the parts' buffers and the outputs.
struct PendingMerge<R: Runtime> {
    parts: SplitArgs<R>,
    o: TensorArg<R>,
    lse: TensorArg<R>,
}

impl<R: Runtime> Rows<R> {
    /// Splits `args`' outputs from its split buffers, which must be there exactly when
    /// `splits > 1`.
    fn of(o: TensorArg<R>, lse: TensorArg<R>, parts: Option<SplitArgs<R>>, splits: usize) -> Self {
        assert_eq!(
            parts.is_some(),
            splits > 1,
            "split buffers are passed exactly when the plan splits the keys ({splits} parts)"
        );
        match parts {
            None => Rows::Direct(o, lse),
            Some(parts) => {
                let (kernel_o, merge_o) = twice(parts.o);
                let (kernel_lse, merge_lse) = twice(parts.lse);
                let merge = PendingMerge {
                    parts: SplitArgs {
                        o: merge_o,
                        lse: merge_lse,
                    },
                    o,
                    lse,
                };
                let kernel = SplitArgs {
                    o: kernel_o,
                    lse: kernel_lse,
                };
                Rows::Split(kernel, merge)
            }
        }
    }
}

impl<R: Runtime> PendingMerge<R> {
    fn launch<F: Float + CubeElement>(self, client: &ComputeClient<R>, shape: &AttentionShape) {
        launch_merge_key_splits::<R, F>(client, shape, self.parts, self.o, self.lse);
    }
}

/// The first query's position as the portable kernels take it.
fn query_start_arg(shape: &AttentionShape) -> u32 {
    u32::try_from(shape.query_start).expect("query positions fit in 32 bits")
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
    let addresses = address_type(&args.all(None));
    // SAFETY: every index the kernel forms stays inside its tensors for these shapes (rows
    // past `valid` and padding rows are never read), as the parity tests check.
    unsafe {
        range_attention_mma_kernel::launch_unchecked::<F, R>(
            client, count, dim, addresses, MMA_VECTOR, args.q, args.k, args.v, args.o, args.lse,
            plan.scale, tile, plan.keys,
        );
    }
}

/// [`range_attention_kernel()`] over `plan`'s keys with `tile`, writing rows of `O` to `o`
/// and `lse` (`plan.splits * B` batch rows).
#[allow(clippy::too_many_arguments)]
fn launch_range_rows<R: Runtime, F: Float + CubeElement, O: Float + CubeElement>(
    client: &ComputeClient<R>,
    plan: &AttentionPlan,
    tile: TileConfig,
    addresses: AddressType,
    q: TensorArg<R>,
    k: TensorArg<R>,
    v: TensorArg<R>,
    rows: SplitArgs<R>,
) {
    let (count, dim) = portable_grid(client, &plan.shape, &tile, plan.splits);
    range_attention_kernel::launch::<F, O, R>(
        client,
        count,
        dim,
        addresses,
        q,
        k,
        v,
        rows.o,
        rows.lse,
        plan.scale,
        query_start_arg(&plan.shape),
        tile,
        plan.keys,
    );
}

/// [`range_attention_kernel()`] on the portable `tile`, split and merged as `plan` says.
fn launch_range_portable<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    plan: &AttentionPlan,
    tile: TileConfig,
    args: AttentionArgs<R>,
) {
    let addresses = address_type(&args.all(None));
    let (q, k, v) = (args.q, args.k, args.v);
    match Rows::of(args.o, args.lse, args.splits, plan.splits) {
        Rows::Direct(o, lse) => {
            let rows = SplitArgs { o, lse };
            launch_range_rows::<R, F, F>(client, plan, tile, addresses, q, k, v, rows);
        }
        Rows::Split(parts, merge) => {
            launch_range_rows::<R, F, f32>(client, plan, tile, addresses, q, k, v, parts);
            merge.launch::<F>(client, &plan.shape);
        }
    }
}

/// Sliding-window attention (`k`, `v` of `L >= T` rows, the queries the last `T` of them), as
/// [`crate::plan::plan_window`] planned it.
pub fn launch_window<R: Runtime, F: Float + CubeElement>(
    client: &ComputeClient<R>,
    plan: &AttentionPlan,
    args: AttentionArgs<R>,
) {
    let KeySet::Window { .. } = plan.keys else {
        panic!("launch_window takes a window plan, got {:?}", plan.keys)
    };
    match plan.path {
        Path::TensorCore(tile) => launch_range::<R, F>(client, plan, tile, args),
        Path::Portable(tile) => launch_range_portable::<R, F>(client, plan, tile, args),
    }
}

/// [`selected_attention_kernel()`] with `tile`, writing rows of `O` to `rows`
/// (`plan.splits * B` batch rows).
#[allow(clippy::too_many_arguments)]
fn launch_selected_rows<
    R: Runtime,
    F: Float + CubeElement,
    O: Float + CubeElement,
    I: Int + CubeElement,
>(
    client: &ComputeClient<R>,
    plan: &AttentionPlan,
    tile: TileConfig,
    addresses: AddressType,
    q: TensorArg<R>,
    k: TensorArg<R>,
    v: TensorArg<R>,
    selected: TensorArg<R>,
    rows: SplitArgs<R>,
) {
    let (count, dim) = portable_grid(client, &plan.shape, &tile, plan.splits);
    selected_attention_kernel::launch::<F, O, I, R>(
        client,
        count,
        dim,
        addresses,
        q,
        k,
        v,
        selected,
        rows.o,
        rows.lse,
        plan.scale,
        query_start_arg(&plan.shape),
        tile,
        plan.keys.select_block(),
    );
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
            let addresses = address_type(&args.all(Some(&selected)));
            let (q, k, v) = (args.q, args.k, args.v);
            match Rows::of(args.o, args.lse, args.splits, plan.splits) {
                Rows::Direct(o, lse) => launch_selected_rows::<R, F, F, I>(
                    client,
                    plan,
                    tile,
                    addresses,
                    q,
                    k,
                    v,
                    selected,
                    SplitArgs { o, lse },
                ),
                Rows::Split(parts, merge) => {
                    launch_selected_rows::<R, F, f32, I>(
                        client, plan, tile, addresses, q, k, v, selected, parts,
                    );
                    merge.launch::<F>(client, &plan.shape);
                }
            }
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
    let addresses = address_type(&args.all(Some(&selected)));
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

/// The compression branch's two passes over one set of tensors: the attention pass's
/// arguments, which write `o` and `lse`, and the `q`, `k` and `lse` the scoring pass reads.
fn two_passes<R: Runtime>(args: AttentionArgs<R>) -> (AttentionArgs<R>, [TensorArg<R>; 3]) {
    let (q, q_again) = twice(args.q);
    let (k, k_again) = twice(args.k);
    let (lse, lse_again) = twice(args.lse);
    let pass = AttentionArgs {
        q,
        k,
        v: args.v,
        o: args.o,
        lse,
        splits: args.splits,
    };
    (pass, [q_again, k_again, lse_again])
}

/// Compressed attention with block scoring and top-n: `args.k`, `args.v` the compressed
/// keys and values `[B, N_cmp, H_kv, d]` -> also `selected: [B, H_kv, T, n]` Int (ascending
/// block indices, -1 padded) for queries at positions `plan.shape.query_start ..`, as
/// [`crate::plan::plan_compressed`] planned it: on tensor cores an attention pass and a
/// scoring pass; on the portable tile one fused kernel, or, when the plan splits the keys,
/// the attention split and merged and then the scoring pass.
pub fn launch_compressed<R: Runtime, F: Float + CubeElement, I: Int + CubeElement>(
    client: &ComputeClient<R>,
    plan: &CompressedPlan,
    args: AttentionArgs<R>,
    selected: TensorArg<R>,
) {
    let addresses = address_type(&args.all(Some(&selected)));
    match plan.path {
        Path::TensorCore(tiles) => {
            let (pass, [q_again, k_again, lse_again]) = two_passes(args);
            let attention = plan.attention_pass(Path::TensorCore(tiles.attention));
            launch_range::<R, F>(client, &attention, tiles.attention, pass);
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
        Path::Portable(tile) if plan.splits > 1 => {
            let (pass, [q_again, k_again, lse_again]) = two_passes(args);
            let attention = plan.attention_pass(Path::Portable(tile));
            launch_range_portable::<R, F>(client, &attention, tile, pass);
            let (count, dim) = portable_grid(client, &plan.shape, &tile, 1);
            compressed_selection_kernel::launch::<F, I, R>(
                client,
                count,
                dim,
                addresses,
                q_again,
                k_again,
                lse_again,
                selected,
                plan.scale,
                query_start_arg(&plan.shape),
                tile,
                plan.selection,
            );
        }
        Path::Portable(tile) => {
            let (count, dim) = portable_grid(client, &plan.shape, &tile, 1);
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
                query_start_arg(&plan.shape),
                tile,
                plan.selection,
            );
        }
    }
}
