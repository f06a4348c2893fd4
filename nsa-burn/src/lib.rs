//! Native Sparse Attention (Yuan et al., "Native Sparse Attention: Hardware-Aligned and
//! Natively Trainable Sparse Attention", 2025) as a Burn module.
//!
//! - [`NsaConfig`] / [`Nsa`]: the layer, used like `burn::nn` layers.
//! - [`nsa_attention`]: the attention operator on projected heads (queries, per-branch
//!   keys/values, gates), returning the output and the selected blocks.
//! - [`NsaCache`] / [`Nsa::forward_cached`]: prefill in chunks and token-by-token decoding
//!   that give what one forward pass over the whole sequence gives.
//! - [`nsa_attention_packed`] / [`Documents`]: the operator over packed documents
//!   (`cu_seqlens`), each attended to as if it were alone.
//! - [`reference`]: the operator in plain Burn tensor ops, differentiable on every backend.
//! - [`NsaBackend`]: the backend extension trait the operator dispatches through; Burn's
//!   CubeCL backends (`Cuda`, `Wgpu`, `Rocm`, fused or not) run the `nsa-cubecl` forward
//!   and backward kernels, Flex runs the reference, and `Autodiff<B>` trains on whatever
//!   `B` runs.

mod attention;
mod autodiff;
mod backend;
mod cache;
mod compressor;
mod config;
mod cube_backend;
mod fusion;
mod gate;
mod module;
mod packed;
pub mod reference;
mod settings;

pub use attention::{
    nsa_attention, try_nsa_attention, BranchKv, NsaError, NsaInput, NsaOutput, NsaShapeError,
};
pub use backend::{
    BranchBackwardFn, BranchGrads, BranchSaved, GatedRest, GatedSum, GatedSumBackwardFn,
    NsaBackend, NsaBackward, SelectedBackwardFn,
};
pub use cache::{NsaCache, NsaCacheConfig, NsaCacheError};
pub use compressor::{Compressor, CompressorMlp};
pub use config::{CompressorKind, KvSharing, NsaAttentionConfig, NsaConfig, NsaConfigError};
pub use gate::Gate;
pub use module::{KvProjection, Nsa, NsaForward, NsaRecord};
pub use nsa_cubecl::Strategy as KernelStrategy;
pub use nsa_cubecl::{
    AttentionShape, CallPlan, Path as KernelPath, PlanError, PortableUnavailable,
    TensorCoreUnavailable,
};
pub use packed::{nsa_attention_packed, try_nsa_attention_packed, Documents, DocumentsError};
pub use settings::{NsaSettings, NsaSettingsRecord};

/// The README's code compiles and runs as a doctest, so its snippet cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
