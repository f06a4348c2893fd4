//! The CubeCL kernels against the reference: every branch, on fresh random inputs, for the
//! configurations and edge cases of the reference tests.
//!
//! - Forward: each branch's output and row log-sum-exp, the selected blocks, and the whole
//!   operator; tied block scores (equal keys) select alike; large inputs stay finite,
//!   saturated gates match, a NaN query stays at its position. Backward: the gradient of every operator input under `Autodiff<B>` (the
//!   backward kernels) against `Autodiff<Flex>` (the reference's autodiff), and two
//!   identical backward runs bitwise equal. A randomized sweep of configurations, forward
//!   and backward. Packed documents against each document alone (`common/packed.rs`);
//!   cached prefill and decoding against the full forward (`common/cache.rs`).
//! - wgpu: always built. When the build finds no Vulkan driver the wgpu tests are marked
//!   ignored (see `nsa-burn/build.rs`), unless `NSA_REQUIRE_GPU_ADAPTER` is set (CI sets it,
//!   with Mesa lavapipe installed); a test that gets no working adapter fails.
//! - CUDA: built with `--features test-cuda` (run on the GPU machine), in f32, f16 and bf16,
//!   and a sequence long enough for 64-bit offsets.
//!
//! The kernels run on Burn's default backend types (`Wgpu`, `Cuda`: fusion on); the
//! reference runs on Flex in f32 on the same values (rounded to the kernel's dtype first).
//!
//! Files: `kernels/cases.rs` (the cases), `kernels/data.rs` (moving data between backends),
//! `kernels/forward.rs`, `kernels/gradients.rs`, `kernels/gated_sum.rs` (the checks) and
//! `kernels/long_sequences.rs` (64-bit offsets, CUDA only), `kernels/sweep.rs` (random
//! configurations from a printed seed), `kernels/numerics.rs` (large inputs, saturated
//! gates, a NaN query); the tests are here.

mod common;

#[path = "kernels/cases.rs"]
mod cases;
#[path = "kernels/data.rs"]
mod data;
#[path = "kernels/forward.rs"]
mod forward;
#[path = "kernels/gated_sum.rs"]
mod gated_sum;
#[path = "kernels/gradients.rs"]
mod gradients;
#[cfg(feature = "test-cuda")]
#[path = "kernels/long_sequences.rs"]
mod long_sequences;
#[path = "kernels/numerics.rs"]
mod numerics;
#[path = "kernels/sweep.rs"]
mod sweep;

use burn::backend::{Autodiff, Wgpu};
use burn::tensor::DType;
#[cfg(feature = "test-cuda")]
use burn::tensor::Distribution;
use burn::tensor::Tensor;
use cases::{selected_cases, Kernels};
use common::cache::{cache_cases, check_cached};
use common::packed::{check_packed, PackedCase};
use forward::{check_case, check_offset_case, check_tied_selection};
use gated_sum::check_gated_sum;
use gradients::{check_deterministic, check_gradient_cases};
#[cfg(feature = "test-cuda")]
use long_sequences::{branch_results, mismatch, LongInputs};
#[cfg(feature = "test-cuda")]
use nsa_burn::NsaAttentionConfig;
use nsa_burn::{
    try_nsa_attention, BranchKv, NsaBackend, NsaError, NsaInput, PlanError, PortableUnavailable,
};
use sweep::{sweep, SweepLimits};

fn check_all<B: NsaBackend>(kernels: Kernels, device: &B::Device, dtype: DType) {
    let cases = selected_cases(kernels);
    let mut worst = 0.0f64;
    for case in &cases {
        worst = worst.max(check_case::<B>(case, dtype, device));
    }
    for case in cases::tied_cases(kernels) {
        check_tied_selection::<B>(&case, dtype, device);
    }
    numerics::check_numerics::<B>(dtype, device);
    println!(
        "{dtype:?}: {} cases, worst relative error {worst:e}",
        cases.len()
    );
}

#[test]
#[cfg_attr(
    nsa_no_gpu_adapter,
    ignore = "no Vulkan driver found at build time (e.g. install mesa-vulkan-drivers; see nsa-burn/build.rs)"
)]
fn wgpu_kernels_match_the_reference() {
    let device = common::wgpu_device();
    check_all::<Wgpu>(Kernels::Portable, &device, DType::F32);
}

/// The gradients of [`cases::portable_gradient_cases`] (the 700-position one included; the
/// tensor-core tiling cases of [`cases::tensor_core_cases`] run on CUDA), in two tests that
/// the test harness runs side by side. Two lavapipe limits shaped the portable key-side
/// kernel: it summed per-unit output arrays wrongly once they reached 16 entries (the
/// key-side cube takes more units instead, see `KEY_GRAD_WIDTH` in `nsa_cubecl::launch`),
/// and llvmpipe ends all loops of an invocation after 65,535 iterations in total, which the
/// `d_k = 256, d_v = 192`, G = 16 case passed (its inner dot-product loops are unrolled now;
/// [`wgpu_long_key_walks_match_the_reference`] walks 163,840 query rows per key tile).
fn check_wgpu_gradients(half: usize) {
    let device = common::wgpu_device();
    let cases = cases::portable_gradient_cases();
    let middle = cases.len().div_ceil(2);
    let cases = if half == 0 {
        cases[..middle].to_vec()
    } else {
        cases[middle..].to_vec()
    };
    check_gradient_cases::<Autodiff<Wgpu>>(cases, &device, DType::F32);
}

/// The first half of [`check_wgpu_gradients`].
#[test]
#[cfg_attr(
    nsa_no_gpu_adapter,
    ignore = "no Vulkan driver found at build time (e.g. install mesa-vulkan-drivers; see nsa-burn/build.rs)"
)]
fn wgpu_kernel_gradients_match_the_reference() {
    check_wgpu_gradients(0);
}

/// The second half of [`check_wgpu_gradients`].
#[test]
#[cfg_attr(
    nsa_no_gpu_adapter,
    ignore = "no Vulkan driver found at build time (e.g. install mesa-vulkan-drivers; see nsa-burn/build.rs)"
)]
fn wgpu_kernel_gradients_match_the_reference_second_half() {
    check_wgpu_gradients(1);
}

/// Random valid configurations (a few here; `NSA_SWEEP_CASES` for more), forward and
/// backward, small enough for lavapipe.
#[test]
#[cfg_attr(
    nsa_no_gpu_adapter,
    ignore = "no Vulkan driver found at build time (e.g. install mesa-vulkan-drivers; see nsa-burn/build.rs)"
)]
fn wgpu_random_configurations_match_the_reference() {
    let device = common::wgpu_device();
    let limits = SweepLimits {
        max_seq: 200,
        max_heads: 8,
        max_batch: 2,
    };
    sweep::<Autodiff<Wgpu>>(3, limits, &[DType::F32], &device);
}

/// A key tile seen by 163,840 query rows (see [`cases::long_key_walk`]).
#[test]
#[cfg_attr(
    nsa_no_gpu_adapter,
    ignore = "no Vulkan driver found at build time (e.g. install mesa-vulkan-drivers; see nsa-burn/build.rs)"
)]
fn wgpu_long_key_walks_match_the_reference() {
    let device = common::wgpu_device();
    check_gradient_cases::<Autodiff<Wgpu>>(vec![cases::long_key_walk()], &device, DType::F32);
}

/// A call no kernel path fits is a typed error naming the device limit, before anything
/// runs: a group of 4096 query heads needs more units than one cube holds (the portable
/// kernels give each head of a group a unit; head dims of 4 rule out tensor cores).
#[test]
#[cfg_attr(
    nsa_no_gpu_adapter,
    ignore = "no Vulkan driver found at build time (e.g. install mesa-vulkan-drivers; see nsa-burn/build.rs)"
)]
fn wgpu_calls_no_kernel_fits_are_typed_errors() {
    let device = common::wgpu_device();
    let (seq, heads, dim) = (4, 4096, 4);
    let tensor = |shape: [usize; 4]| Tensor::<Wgpu, 4>::zeros(shape, &device);
    let kv = || BranchKv {
        k: tensor([1, seq, 1, dim]),
        v: tensor([1, seq, 1, dim]),
    };
    let input = NsaInput {
        q: tensor([1, seq, heads, dim]),
        compressed: None,
        selected: kv(),
        window: kv(),
        gates: tensor([1, seq, heads, 3]),
    };
    match try_nsa_attention(input, &cases::small()) {
        Err(NsaError::Kernels(PlanError::PortableUnavailable {
            portable: PortableUnavailable::UnitsPerCube { needed, max },
            tensor_core,
        })) => {
            assert_eq!(needed, heads);
            assert!(max < heads);
            assert!(tensor_core.is_some());
        }
        other => panic!("expected a units-per-cube error, got {other:?}"),
    }
}

/// Packed documents against each document alone on the reference: two rows, lengths off
/// every block size, a document shorter than `l`, a one-token document, G = 3 and
/// `d_k != d_v`. Few distinct lengths: each compiles kernels of its own, slow on a CPU
/// adapter.
fn packed_case() -> PackedCase {
    PackedCase {
        rows: 2,
        seq: 50,
        lengths: vec![25, 25, 1, 49],
        heads: 6,
        kv_heads: 2,
        d_k: 16,
        d_v: 8,
        config: cases::small(),
    }
}

/// [`packed_case`], then hundreds of short documents at G = 16 with tensor-core head dims.
#[cfg(feature = "test-cuda")]
fn cuda_packed_cases() -> Vec<PackedCase> {
    let lengths: Vec<usize> = (0..300).map(|i| 1 + (i * 7) % 23).collect();
    vec![
        packed_case(),
        PackedCase {
            rows: 1,
            seq: lengths.iter().sum(),
            lengths,
            heads: 16,
            kv_heads: 1,
            d_k: 32,
            d_v: 16,
            config: cases::small(),
        },
    ]
}

#[test]
#[cfg_attr(
    nsa_no_gpu_adapter,
    ignore = "no Vulkan driver found at build time (e.g. install mesa-vulkan-drivers; see nsa-burn/build.rs)"
)]
fn wgpu_packed_documents_match_each_document_alone() {
    let device = common::wgpu_device();
    check_packed::<Autodiff<Wgpu>>(&packed_case(), DType::F32, &device);
}

/// Queries at an offset into longer keys (a cache's calls) against the reference, on wgpu.
#[test]
#[cfg_attr(
    nsa_no_gpu_adapter,
    ignore = "no Vulkan driver found at build time (e.g. install mesa-vulkan-drivers; see nsa-burn/build.rs)"
)]
fn wgpu_queries_at_an_offset_match_the_reference() {
    let device = common::wgpu_device();
    for case in cases::offset_cases() {
        check_offset_case::<Wgpu>(&case, DType::F32, &device);
    }
}

/// Cached prefill and decoding against the full forward, on wgpu: every call runs the
/// kernels (`common/cache.rs`).
#[test]
#[cfg_attr(
    nsa_no_gpu_adapter,
    ignore = "no Vulkan driver found at build time (e.g. install mesa-vulkan-drivers; see nsa-burn/build.rs)"
)]
fn wgpu_cached_decoding_matches_the_full_forward() {
    let device = common::wgpu_device();
    for case in cache_cases(&[8, 17], 3) {
        check_cached::<Wgpu>(&case, &device, 1e-4);
    }
}

/// Bitwise-equal gradients from two identical runs, on a case where every branch has
/// several query groups per key (G = 16) and batch 2.
#[test]
#[cfg_attr(
    nsa_no_gpu_adapter,
    ignore = "no Vulkan driver found at build time (e.g. install mesa-vulkan-drivers; see nsa-burn/build.rs)"
)]
fn wgpu_kernel_gradients_are_deterministic() {
    let device = common::wgpu_device();
    let case = cases::cases()
        .into_iter()
        .find(|case| case.heads == 16 && case.seq == 300)
        .expect("a G = 16, T = 300 case");
    check_deterministic::<Autodiff<Wgpu>>(&case, DType::F32, &device);
}

#[test]
#[cfg_attr(
    nsa_no_gpu_adapter,
    ignore = "no Vulkan driver found at build time (e.g. install mesa-vulkan-drivers; see nsa-burn/build.rs)"
)]
fn wgpu_gated_sum_matches_the_reference() {
    let device = common::wgpu_device();
    check_gated_sum::<Autodiff<Wgpu>>(&device, DType::F32);
}

/// f32, f16 and bf16, or only the one `NSA_KERNEL_DTYPE` names (`f32`, `f16`, `bf16`).
#[cfg(feature = "test-cuda")]
fn cuda_dtypes() -> Vec<DType> {
    let all = [
        ("f32", DType::F32),
        ("f16", DType::F16),
        ("bf16", DType::BF16),
    ];
    match std::env::var("NSA_KERNEL_DTYPE") {
        Ok(name) => all
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|&(_, dtype)| dtype)
            .collect(),
        Err(_) => all.map(|(_, dtype)| dtype).to_vec(),
    }
}

#[cfg(feature = "test-cuda")]
#[test]
fn cuda_kernels_match_the_reference() {
    type B = burn::backend::Cuda;
    let device = Default::default();
    assert!(common::device_answers::<B>(&device), "no CUDA device");
    for dtype in cuda_dtypes() {
        check_all::<B>(Kernels::All, &device, dtype);
    }
}

/// Random valid configurations up to `T = 2000` and `H = 64`, in each dtype
/// (`NSA_SWEEP_CASES`, default 30; `NSA_SWEEP_SEED` reruns a sweep).
#[cfg(feature = "test-cuda")]
#[test]
fn cuda_random_configurations_match_the_reference() {
    type B = burn::backend::Cuda;
    let device = Default::default();
    assert!(common::device_answers::<B>(&device), "no CUDA device");
    let limits = SweepLimits {
        max_seq: 2000,
        max_heads: 64,
        max_batch: 2,
    };
    sweep::<Autodiff<B>>(30, limits, &cuda_dtypes(), &device);
}

/// Bitwise-equal gradients from two identical runs, every case, in each dtype.
#[cfg(feature = "test-cuda")]
#[test]
fn cuda_kernel_gradients_are_deterministic() {
    type B = burn::backend::Cuda;
    let device = Default::default();
    assert!(common::device_answers::<B>(&device), "no CUDA device");
    for dtype in cuda_dtypes() {
        let cases = selected_cases(Kernels::All);
        for case in &cases {
            check_deterministic::<Autodiff<B>>(case, dtype, &device);
        }
        println!("{dtype:?}: {} cases deterministic", cases.len());
    }
}

#[cfg(feature = "test-cuda")]
#[test]
fn cuda_packed_documents_match_each_document_alone() {
    type B = burn::backend::Cuda;
    let device = Default::default();
    assert!(common::device_answers::<B>(&device), "no CUDA device");
    for dtype in cuda_dtypes() {
        for case in cuda_packed_cases() {
            check_packed::<Autodiff<B>>(&case, dtype, &device);
        }
    }
}

/// Queries at an offset into longer keys (a cache's calls) against the reference, on CUDA
/// in each dtype (the portable kernels run them).
#[cfg(feature = "test-cuda")]
#[test]
fn cuda_queries_at_an_offset_match_the_reference() {
    type B = burn::backend::Cuda;
    let device = Default::default();
    assert!(common::device_answers::<B>(&device), "no CUDA device");
    for dtype in cuda_dtypes() {
        let mut worst = 0.0f64;
        for case in cases::offset_cases() {
            worst = worst.max(check_offset_case::<B>(&case, dtype, &device));
        }
        println!("{dtype:?}: queries at an offset, worst relative error {worst:e}");
    }
}

/// Cached prefill and decoding against the full forward, on CUDA in f32. Burn's CUDA
/// matmul takes f32 inputs on TF32 tensor cores (10-bit mantissas), and a layer's
/// projections of one token and of the whole sequence round differently, so the outputs
/// agree to about 1e-3 here, not 1e-5; the attention itself is held to 1e-5 by
/// [`cuda_queries_at_an_offset_match_the_reference`].
#[cfg(feature = "test-cuda")]
#[test]
fn cuda_cached_decoding_matches_the_full_forward() {
    type B = burn::backend::Cuda;
    let device = Default::default();
    assert!(common::device_answers::<B>(&device), "no CUDA device");
    let mut worst = 0.0f64;
    for case in cache_cases(&[1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 23, 24, 25, 40], 9) {
        worst = worst.max(check_cached::<B>(&case, &device, 5e-3));
    }
    println!("cached decoding: worst relative error {worst:e}");
}

#[cfg(feature = "test-cuda")]
#[test]
fn cuda_kernel_gradients_match_the_reference() {
    type B = burn::backend::Cuda;
    let device = Default::default();
    assert!(common::device_answers::<B>(&device), "no CUDA device");
    for dtype in cuda_dtypes() {
        check_gradient_cases::<Autodiff<B>>(selected_cases(Kernels::All), &device, dtype);
        check_gated_sum::<Autodiff<B>>(&device, dtype);
    }
}

/// 64-bit offsets. With `B = 2`, `T = 140000`, `H = 128`, `d = 128` the queries hold
/// 4.6e9 elements, past 32-bit offsets, while one batch element (2.3e9) is not: the
/// kernels run on 64-bit offsets for the pair and on 32-bit ones for the second element
/// alone (a view of the pair's buffers: Burn's `cat` rejects tensors past 2^32 elements).
/// The kernels are deterministic, so the second element's outputs, log-sum-exp, selected
/// blocks and gradients must agree bitwise between the two calls. bf16, paper block sizes,
/// every branch forward and backward, one branch at a time (about 55 GB of GPU memory).
/// Its first run found the 64-bit kernels failing to compile (CUDA's ambiguous integer
/// `min`, see `nsa_cubecl::keys::index_min`).
#[cfg(feature = "test-cuda")]
#[test]
fn cuda_long_sequences_use_64_bit_offsets() {
    type B = burn::backend::Cuda;
    let device = Default::default();
    assert!(common::device_answers::<B>(&device), "no CUDA device");
    let (seq, heads, kv_heads, dim) = (140_000, 128, 8, 128);
    let config = NsaAttentionConfig::new();
    let blocks = config.num_compressed_blocks(seq);
    let shapes = [
        [2, seq, heads, dim],
        [2, seq, kv_heads, dim],
        [2, seq, kv_heads, dim],
        [2, blocks, kv_heads, dim],
        [2, blocks, kv_heads, dim],
        [2, seq, heads, dim],
    ];
    let random = |shape: [usize; 4]| {
        Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device).cast(DType::BF16)
    };
    let pair: LongInputs<B> = shapes.map(random);
    let single: LongInputs<B> = pair.clone().map(|x| x.narrow(0, 1, 1));
    let mut failures = Vec::new();
    for (branch, name) in ["compressed", "selected", "window"].into_iter().enumerate() {
        let single = branch_results(&single, branch, &config);
        let pair = branch_results(&pair, branch, &config);
        for ((what, pair), (_, single)) in pair.into_iter().zip(single) {
            if let Some(how) = mismatch(pair.narrow(0, 1, 1), single) {
                failures.push(format!("{name} {what}: {how}"));
            }
        }
        println!("{name}: T = {seq}, B = 2 (64-bit offsets) against B = 1 (32-bit) done");
    }
    assert!(
        failures.is_empty(),
        "batch element 1 differs between 64- and 32-bit offsets:\n{}",
        failures.join("\n")
    );
}
