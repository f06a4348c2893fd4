//! CubeCL kernels for Native Sparse Attention (NSA), generic over the CubeCL runtime and
//! free of Burn types: `nsa-burn` plans and launches them on Burn's CubeCL backends.
//!
//! A call goes through three steps:
//!
//! 1. [`config`]: the call's sizes ([`AttentionShape`]) and the NSA settings
//!    ([`NsaKernelConfig`], with the field names of the layer's attention config).
//! 2. [`plan`]: for each step of the call, which implementation runs and with which
//!    comptime tile, or why a requested implementation cannot ([`PlanError`]).
//! 3. [`launch`]: the launches a plan describes, tensors grouped in argument structs.
//!
//! The kernels themselves, one implementation path per module:
//!
//! - [`common`]: what both paths use: which keys a query attends ([`common::keys`]), the
//!   selection rules of Eq. 9-11 ([`common::selection`]), the grid order and row addressing
//!   ([`common::geometry`]), the selection inverted for the key side ([`common::bitmap`])
//!   and the key side's walk over queries ([`common::key_walk`]).
//! - [`tensor_core`]: on devices with m16n8k16 `mma` for the input type with f32
//!   accumulation and 32-lane planes (CUDA, f16/bf16), head dims multiples of 16. A cube
//!   holds the `G` query heads of one or more consecutive positions of one KV head (the
//!   paper's group-centric layout), one plane per 16 rows; `Q K^T`, `P V` and the backward
//!   products run on tensor cores with scores, probabilities and accumulators in registers
//!   ([`tensor_core::fragments`], [`tensor_core::softmax`]).
//! - [`portable`]: everywhere else (f32, lavapipe and other devices without `mma`). One
//!   cube per `(batch, KV head, query position)` with register-blocked dot products
//!   ([`portable::tile`]).
//! - [`rows`]: row-wise kernels with no attention tile: `delta`, the gated sum (Eq. 5), the
//!   sum of the key side's split copies and the merge of key splits of the forward pass.
//!
//! Both paths walk the same keys in the same order, so they select the same blocks and sum
//! every gradient in a fixed order.

pub mod common;
pub mod config;
pub mod launch;
pub mod plan;
pub mod portable;
pub mod rows;
pub mod tensor_core;

pub use common::geometry::EMPTY_ROW_LSE;
pub use common::keys::KeySet;
pub use config::{AttentionShape, NsaKernelConfig};
pub use launch::{
    launch_branch_backward, launch_compressed, launch_gated_sum, launch_gated_sum_backward,
    launch_selected, launch_selected_gated_sum, launch_window, AttentionArgs, BranchBackwardArgs,
    GatedRestArgs, GatedSumArgs, SelectionArgs, SplitArgs,
};
pub use plan::{
    plan_branch_backward, plan_call, plan_compressed, plan_selected, plan_window, AttentionPlan,
    BranchBackwardPlan, CallPlan, CompressedPlan, GatedSelectionPlan, Path, PlanError,
    PortableUnavailable, Strategy, TensorCoreUnavailable, PORTABLE_KERNELS_VAR,
};
