//! The backend extension trait: one forward method per NSA branch and one for their gated
//! sum, and the backward kernels when a backend has them. The default methods run the
//! reference ([`crate::reference`]); Burn's CubeCL backends (`Cuda`, `Wgpu`, `Rocm`, with or
//! without fusion) override them with the kernels of `nsa-cubecl`, and `Autodiff<B>`
//! records each branch (and the gated sum) as one operation whose backward pass calls `B`'s
//! backward kernels (see `autodiff.rs`).

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Int, Tensor, TensorMetadata, TensorPrimitive};

use crate::reference::{compressed_attention, selected_attention, window_attention, Attended};
use crate::NsaAttentionConfig;
use nsa_cubecl::{AttentionShape, CallPlan, PlanError};

fn float<B: Backend>(tensor: FloatTensor<B>) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(tensor))
}

fn primitive<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> FloatTensor<B> {
    tensor.into_primitive().tensor()
}

fn attended<B: Backend>(attended: Attended<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    (primitive(attended.output), primitive(attended.lse))
}

/// Position of the first query when the queries `q: [B, T, ..]` are the last `T` of the key
/// rows `k: [B, L, ..]` (the selection and window branches; 0 for self-attention).
pub(crate) fn last_rows_start<T: TensorMetadata>(q: &T, k: &T) -> usize {
    k.shape()[1] - q.shape()[1]
}

/// What the backward pass of one branch reads: its float inputs, its output and the row
/// log-sum-exp of its forward pass.
#[derive(Debug, Clone)]
pub struct BranchSaved<B: Backend> {
    /// Queries `[B, T, H, d_k]`.
    pub q: FloatTensor<B>,
    /// The branch's keys `[B, L, H_kv, d_k]` (`L = N_cmp` for the compression branch).
    pub k: FloatTensor<B>,
    /// The branch's values `[B, L, H_kv, d_v]`.
    pub v: FloatTensor<B>,
    /// The branch output `[B, T, H, d_v]`.
    pub output: FloatTensor<B>,
    /// Row log-sum-exp `[B, H, T]` f32.
    pub lse: FloatTensor<B>,
}

/// Gradients of one branch's float inputs, shaped like them.
#[derive(Debug, Clone)]
pub struct BranchGrads<B: Backend> {
    /// `[B, T, H, d_k]`.
    pub q: FloatTensor<B>,
    /// `[B, L, H_kv, d_k]`.
    pub k: FloatTensor<B>,
    /// `[B, L, H_kv, d_v]`.
    pub v: FloatTensor<B>,
}

/// Compressed attention in the reference (the trait's default).
pub(crate) fn reference_compressed<B: Backend>(
    q: FloatTensor<B>,
    k_cmp: FloatTensor<B>,
    v_cmp: FloatTensor<B>,
    query_start: usize,
    config: &NsaAttentionConfig,
) -> (FloatTensor<B>, FloatTensor<B>, IntTensor<B>) {
    let (attended_cmp, selected) = compressed_attention(
        float::<B>(q),
        float(k_cmp),
        float(v_cmp),
        query_start,
        config,
    );
    let (o, lse) = attended(attended_cmp);
    (o, lse, selected.into_primitive())
}

/// Selected-block attention in the reference (the trait's default).
pub(crate) fn reference_selected<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    selected: IntTensor<B>,
    config: &NsaAttentionConfig,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let selected = Tensor::<B, 4, Int>::from_primitive(selected);
    attended(selected_attention(
        float::<B>(q),
        float(k),
        float(v),
        selected,
        config,
    ))
}

/// Sliding-window attention in the reference (the trait's default).
pub(crate) fn reference_window<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    config: &NsaAttentionConfig,
) -> (FloatTensor<B>, FloatTensor<B>) {
    attended(window_attention(float::<B>(q), float(k), float(v), config))
}

/// The gated sum (Eq. 5) in Burn ops (the trait's default).
pub(crate) fn reference_gated_sum<B: Backend>(parts: GatedSum<B>) -> FloatTensor<B> {
    let gates = float::<B>(parts.gates);
    let gate = |branch: usize| gates.clone().narrow(3, branch, 1);
    let output = float::<B>(parts.compressed) * gate(0)
        + float::<B>(parts.selected) * gate(1)
        + float::<B>(parts.window) * gate(2);
    primitive(output)
}

/// The operands of the gated sum (Eq. 5), or their gradients (shaped like them).
#[derive(Debug, Clone)]
pub struct GatedSum<B: Backend> {
    /// Compressed branch output `[B, T, H, d_v]`.
    pub compressed: FloatTensor<B>,
    /// Selection branch output `[B, T, H, d_v]`.
    pub selected: FloatTensor<B>,
    /// Window branch output `[B, T, H, d_v]`.
    pub window: FloatTensor<B>,
    /// Gates `[B, T, H, 3]` (compressed, selected, window).
    pub gates: FloatTensor<B>,
}

/// What the selection branch sums its output with in
/// [`NsaBackend::nsa_selected_gated_sum`]: the other two branches' outputs and the gates.
#[derive(Debug, Clone)]
pub struct GatedRest<B: Backend> {
    /// Compressed branch output `[B, T, H, d_v]`.
    pub compressed: FloatTensor<B>,
    /// Window branch output `[B, T, H, d_v]`.
    pub window: FloatTensor<B>,
    /// Gates `[B, T, H, 3]` (compressed, selected, window).
    pub gates: FloatTensor<B>,
}

/// [`NsaBackend::nsa_selected`], then [`NsaBackend::nsa_gated_sum`] of its output with
/// `rest` (the trait's default for [`NsaBackend::nsa_selected_gated_sum`]).
pub(crate) fn selected_then_gated_sum<B: NsaBackend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    selected: IntTensor<B>,
    rest: GatedRest<B>,
    config: &NsaAttentionConfig,
) -> FloatTensor<B> {
    let (output, _) = B::nsa_selected(q, k, v, selected, config);
    B::nsa_gated_sum(GatedSum {
        compressed: rest.compressed,
        selected: output,
        window: rest.window,
        gates: rest.gates,
    })
}

/// The backward passes of the three branches on a backend that has them as kernels.
/// Each takes what the branch's forward pass saved and the gradient `[B, T, H, d_v]` of its
/// output; the selection branch also takes the selected blocks `[B, H_kv, T, n]`.
pub struct NsaBackward<B: Backend> {
    /// Gradients of `q`, `k_cmp` and `v_cmp` (the selection is not differentiated).
    pub compressed: BranchBackwardFn<B>,
    /// Gradients of `q`, `k` and `v` of the selection branch.
    pub selected: SelectedBackwardFn<B>,
    /// Gradients of `q`, `k` and `v` of the window branch.
    pub window: BranchBackwardFn<B>,
    /// Gradients of the gated sum's operands.
    pub gated_sum: GatedSumBackwardFn<B>,
}

/// The gated sum's backward pass: its operands and the gradient `[B, T, H, d_v]` of its
/// output -> the operands' gradients.
pub type GatedSumBackwardFn<B> = fn(GatedSum<B>, FloatTensor<B>) -> GatedSum<B>;

/// A branch's backward pass: saved tensors, output gradient, config -> input gradients.
pub type BranchBackwardFn<B> =
    fn(BranchSaved<B>, FloatTensor<B>, &NsaAttentionConfig) -> BranchGrads<B>;

/// The selection branch's backward pass, which also reads the selected blocks.
pub type SelectedBackwardFn<B> =
    fn(BranchSaved<B>, IntTensor<B>, FloatTensor<B>, &NsaAttentionConfig) -> BranchGrads<B>;

/// A backend that runs the three NSA branches. Shapes are checked by
/// [`crate::nsa_attention`] before these are called. Every forward method also returns the
/// row log-sum-exp `[B, H, T]` (f32) of the branch's scaled scores, which its backward
/// method reads. The queries may sit at an offset into longer keys (a cache's prefill or
/// decoding step): then they are the last `T` of the `T_k` positions, and only the forward
/// pass runs in kernels (`Autodiff` differentiates such calls in the reference).
pub trait NsaBackend: Backend {
    /// Whether this backend's NSA operations take float tensors of `dtype`. The default
    /// (the reference in Burn ops) takes every float dtype the backend has; the CubeCL
    /// kernels take f32, f16 and bf16. [`crate::try_nsa_attention`] asks before it runs.
    fn nsa_supports_dtype(dtype: DType) -> bool {
        dtype.is_float()
    }

    /// Plans every kernel an operator call of `shape` in `dtype` would launch on `device`,
    /// forward and backward, without launching any: `Ok(Some(plan))` says which path
    /// (tensor-core or portable, with its tile) each kernel takes, `Err` names the device
    /// limit that no path fits, and `Ok(None)` means the backend runs the reference (the
    /// default). [`crate::try_nsa_attention`] plans before it runs; `dtype` must be one
    /// [`NsaBackend::nsa_supports_dtype`] accepts.
    fn nsa_plan(
        device: &Self::Device,
        dtype: DType,
        shape: AttentionShape,
        config: &NsaAttentionConfig,
    ) -> Result<Option<CallPlan>, PlanError> {
        let _ = (device, dtype, shape, config);
        Ok(None)
    }

    /// Compressed attention and top-n selection (see [`compressed_attention`]).
    ///
    /// `q: [B, T, H, d_k]` at positions `query_start .. query_start + T` (0 for causal
    /// self-attention), `k_cmp: [B, N_cmp, H_kv, d_k]`, `v_cmp: [B, N_cmp, H_kv, d_v]`
    /// with `N_cmp >= 1` ([`crate::nsa_attention`] handles `T_k < l` itself) ->
    /// (`o_cmp: [B, T, H, d_v]`, `lse: [B, H, T]`, `selected: [B, H_kv, T, n]` Int).
    fn nsa_compressed(
        q: FloatTensor<Self>,
        k_cmp: FloatTensor<Self>,
        v_cmp: FloatTensor<Self>,
        query_start: usize,
        config: &NsaAttentionConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, IntTensor<Self>) {
        reference_compressed::<Self>(q, k_cmp, v_cmp, query_start, config)
    }

    /// Selected-block attention (see [`selected_attention`]).
    ///
    /// `q: [B, T, H, d_k]`, `k: [B, T_k, H_kv, d_k]`, `v: [B, T_k, H_kv, d_v]` with
    /// `T_k >= T` (the queries are the last `T` positions),
    /// `selected: [B, H_kv, T, n]` Int -> (`[B, T, H, d_v]`, `lse: [B, H, T]`).
    fn nsa_selected(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        selected: IntTensor<Self>,
        config: &NsaAttentionConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference_selected::<Self>(q, k, v, selected, config)
    }

    /// Sliding-window attention (see [`window_attention`]).
    ///
    /// `q: [B, T, H, d_k]`, `k: [B, L, H_kv, d_k]`, `v: [B, L, H_kv, d_v]` with `L >= T`
    /// (the last `L` keys; the queries are the last `T` positions) ->
    /// (`[B, T, H, d_v]`, `lse: [B, H, T]`).
    fn nsa_window(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        config: &NsaAttentionConfig,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference_window::<Self>(q, k, v, config)
    }

    /// The gated sum of the branch outputs (Eq. 5):
    /// `g_cmp * o_cmp + g_slc * o_slc + g_win * o_win` -> `[B, T, H, d_v]` (see [`GatedSum`]
    /// for the shapes).
    fn nsa_gated_sum(parts: GatedSum<Self>) -> FloatTensor<Self> {
        reference_gated_sum::<Self>(parts)
    }

    /// Selected-block attention summed with the other branches under the gates (Eq. 5):
    /// `g_cmp * o_cmp + g_slc * o_slc + g_win * o_win -> [B, T, H, d_v]`, with `o_slc` the
    /// output of [`Self::nsa_selected`] on `q`, `k`, `v`, `selected` (same shapes) and
    /// `o_cmp`, `o_win` and the gates from `rest`. The default runs [`Self::nsa_selected`]
    /// and then [`Self::nsa_gated_sum`] (so `Autodiff` records both); the tensor-core
    /// kernels sum the gates at the end of the selection kernel, and `o_slc` never reaches
    /// memory.
    fn nsa_selected_gated_sum(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        selected: IntTensor<Self>,
        rest: GatedRest<Self>,
        config: &NsaAttentionConfig,
    ) -> FloatTensor<Self> {
        selected_then_gated_sum::<Self>(q, k, v, selected, rest, config)
    }

    /// The backward kernels, if this backend has them. With them, `Autodiff<Self>` records
    /// each branch as one operation whose backward pass calls them; without (the default),
    /// `Autodiff<Self>` differentiates the reference in Burn ops.
    fn nsa_backward() -> Option<NsaBackward<Self>> {
        None
    }
}

/// The CPU backend runs the reference, forward and backward.
impl NsaBackend for Flex {}
