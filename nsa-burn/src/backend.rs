//! The backend extension trait: one method per NSA branch. The default methods run the
//! reference ([`crate::reference`]); Burn's CubeCL backends (`Cuda`, `Wgpu`, `Rocm`, with or
//! without fusion) override them with the kernels of `nsa-cubecl`.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Int, Tensor, TensorPrimitive};

use crate::reference::{compressed_attention, selected_attention, window_attention};
use crate::NsaAttentionConfig;

fn float<B: Backend>(tensor: FloatTensor<B>) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(tensor))
}

/// A backend that runs the three NSA branches. Shapes are checked by
/// [`crate::nsa_attention`] before these are called.
pub trait NsaBackend: Backend {
    /// Compressed attention and top-n selection (see [`compressed_attention`]).
    ///
    /// `q: [B, T, H, d_k]`, `k_cmp: [B, N_cmp, H_kv, d_k]`, `v_cmp: [B, N_cmp, H_kv, d_v]`
    /// with `N_cmp >= 1` ([`crate::nsa_attention`] handles `T < l` itself) ->
    /// (`o_cmp: [B, T, H, d_v]`, `selected: [B, H_kv, T, n]` Int).
    fn nsa_compressed(
        q: FloatTensor<Self>,
        k_cmp: FloatTensor<Self>,
        v_cmp: FloatTensor<Self>,
        config: &NsaAttentionConfig,
    ) -> (FloatTensor<Self>, IntTensor<Self>) {
        let (o, selected) =
            compressed_attention(float::<Self>(q), float(k_cmp), float(v_cmp), config);
        (o.into_primitive().tensor(), selected.into_primitive())
    }

    /// Selected-block attention (see [`selected_attention`]).
    ///
    /// `q: [B, T, H, d_k]`, `k: [B, T, H_kv, d_k]`, `v: [B, T, H_kv, d_v]`,
    /// `selected: [B, H_kv, T, n]` Int -> `[B, T, H, d_v]`.
    fn nsa_selected(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        selected: IntTensor<Self>,
        config: &NsaAttentionConfig,
    ) -> FloatTensor<Self> {
        let selected = Tensor::<Self, 4, Int>::from_primitive(selected);
        selected_attention(float::<Self>(q), float(k), float(v), selected, config)
            .into_primitive()
            .tensor()
    }

    /// Sliding-window attention (see [`window_attention`]).
    ///
    /// `q: [B, T, H, d_k]`, `k: [B, T, H_kv, d_k]`, `v: [B, T, H_kv, d_v]` -> `[B, T, H, d_v]`.
    fn nsa_window(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        config: &NsaAttentionConfig,
    ) -> FloatTensor<Self> {
        window_attention(float::<Self>(q), float(k), float(v), config)
            .into_primitive()
            .tensor()
    }
}

/// The CPU backend runs the reference.
impl NsaBackend for Flex {}

/// Under autodiff every backend runs the differentiable reference for now; the backward
/// kernels that let `Autodiff<B>` train on the forward kernels are not written yet.
impl<B: NsaBackend, C: CheckpointStrategy> NsaBackend for Autodiff<B, C> {}
