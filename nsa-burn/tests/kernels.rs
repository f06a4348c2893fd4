//! The CubeCL kernels against the reference: every branch, on fresh random inputs, for the
//! configurations and edge cases of the reference tests.
//!
//! - wgpu: always built. Without an adapter the test is skipped with a message, unless
//!   `NSA_REQUIRE_GPU_ADAPTER` is set (CI sets it, with Mesa lavapipe installed), in which
//!   case it fails.
//! - CUDA: built with `--features test-cuda` (run on the GPU machine), in f32, f16 and bf16.
//!
//! The kernels run on Burn's default backend types (`Wgpu`, `Cuda`: fusion on); the
//! reference runs on Flex in f32 on the same values (rounded to the kernel's dtype first).

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Int, Tensor, TensorData, TensorPrimitive};
use nsa_burn::reference::{compressed_attention, selected_attention, window_attention};
use nsa_burn::{nsa_attention, BranchKv, NsaAttentionConfig, NsaBackend, NsaInput};

/// One parity case: head layout, sizes and block settings.
#[derive(Debug, Clone, Copy)]
struct Case {
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    d_k: usize,
    d_v: usize,
    config: NsaAttentionConfig,
}

/// Small blocks so short sequences hit every branch: l = 8, d = 4, l' = 16, n = 4, w = 24.
fn small() -> NsaAttentionConfig {
    NsaAttentionConfig::new()
        .with_compress_block(8)
        .with_compress_stride(4)
        .with_select_block(16)
        .with_n_selected(4)
        .with_window(24)
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    // G in {1, 2, 16}, d_k != d_v, batch 2, T across the block edges.
    for (heads, kv_heads) in [(2, 2), (4, 2), (16, 1)] {
        for seq in [1, 7, 8, 9, 100, 300] {
            cases.push(Case {
                batch: 2,
                seq,
                heads,
                kv_heads,
                d_k: 16,
                d_v: 8,
                config: small(),
            });
        }
    }
    // Fewer blocks than n, l = d = l', forced-block variants, the paper's block sizes and
    // head dims, G = 64.
    let base = Case {
        batch: 1,
        seq: 200,
        heads: 4,
        kv_heads: 1,
        d_k: 32,
        d_v: 32,
        config: small(),
    };
    cases.push(Case {
        seq: 40,
        config: small().with_n_selected(8),
        ..base
    });
    cases.push(Case {
        config: small().with_compress_block(16).with_compress_stride(16),
        ..base
    });
    cases.push(Case {
        config: small()
            .with_n_initial_blocks(2)
            .with_n_local_blocks(0)
            .with_n_selected(5),
        ..base
    });
    cases.push(Case {
        seq: 700,
        heads: 8,
        kv_heads: 2,
        d_k: 64,
        d_v: 128,
        config: NsaAttentionConfig::new().with_window(96),
        ..base
    });
    cases.push(Case {
        heads: 64,
        kv_heads: 1,
        d_k: 16,
        d_v: 16,
        seq: 70,
        ..base
    });
    cases
}

/// `||a - b||_2 / ||b||_2`, infinite when either holds a NaN.
fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        if x.is_nan() || y.is_nan() {
            return f64::INFINITY;
        }
        diff += (x as f64 - y as f64).powi(2);
        norm += (y as f64).powi(2);
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

fn floats(data: TensorData) -> Vec<f32> {
    data.convert::<f32>().to_vec().unwrap()
}

fn ints(data: TensorData) -> Vec<i64> {
    data.convert::<i64>().to_vec().unwrap()
}

/// Random `shape` rounded to `dtype`, as f32 data.
fn random(shape: [usize; 4], dtype: DType) -> TensorData {
    let x = Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &Default::default());
    x.cast(dtype).cast(DType::F32).into_data()
}

/// The operator's input from `[q, k, v, k_cmp, v_cmp, gates]` (the same keys and values
/// for the selected and window branches; no compressed keys when they are empty, `None`).
fn operator_input<Bk: Backend>(tensors: [Option<Tensor<Bk, 4>>; 6]) -> NsaInput<Bk> {
    let [q, k, v, k_cmp, v_cmp, gates] = tensors;
    let (k, v) = (k.expect("k"), v.expect("v"));
    NsaInput {
        q: q.expect("q"),
        compressed: k_cmp.zip(v_cmp).map(|(k, v)| BranchKv { k, v }),
        selected: BranchKv {
            k: k.clone(),
            v: v.clone(),
        },
        window: BranchKv { k, v },
        gates: gates.expect("gates"),
    }
}

/// `data` on `B` in `dtype`.
fn tensor<B: NsaBackend>(data: &TensorData, dtype: DType, device: &B::Device) -> Tensor<B, 4> {
    Tensor::<B, 4>::from_data(data.clone(), device).cast(dtype)
}

fn on<B: NsaBackend>(
    data: &TensorData,
    dtype: DType,
    device: &B::Device,
) -> B::FloatTensorPrimitive {
    tensor::<B>(data, dtype, device).into_primitive().tensor()
}

fn back<B: NsaBackend>(tensor: B::FloatTensorPrimitive) -> TensorData {
    Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(tensor))
        .cast(DType::F32)
        .into_data()
}

fn reference(data: &TensorData) -> Tensor<Flex, 4> {
    Tensor::from_data(data.clone(), &Default::default())
}

/// Runs every branch of `case` on `B` in `dtype` and on the reference; returns the worst
/// relative error, and panics if the selected blocks differ.
fn check_case<B: NsaBackend>(case: &Case, dtype: DType, device: &B::Device) -> f64 {
    let Case {
        batch,
        seq,
        heads,
        kv_heads,
        d_k,
        d_v,
        config,
    } = *case;
    let blocks = config.num_compressed_blocks(seq);
    let q = random([batch, seq, heads, d_k], dtype);
    let k = random([batch, seq, kv_heads, d_k], dtype);
    let v = random([batch, seq, kv_heads, d_v], dtype);
    let k_cmp = random([batch, blocks, kv_heads, d_k], dtype);
    let v_cmp = random([batch, blocks, kv_heads, d_v], dtype);
    let gates = Tensor::<Flex, 4>::random(
        [batch, seq, heads, 3],
        Distribution::Uniform(0.0, 1.0),
        &Default::default(),
    )
    .into_data();

    // The whole operator, gates included (with `compressed: None` when T < l).
    // Empty tensors stay on the host: the CUDA runtime rejects zero-byte uploads.
    let all = [&q, &k, &v, &k_cmp, &v_cmp, &gates];
    let upload = |d: &TensorData| (d.num_elements() > 0).then(|| tensor::<B>(d, dtype, device));
    let got = nsa_attention(operator_input(all.map(upload)), &config);
    let want = nsa_attention(
        operator_input(all.map(|d| (d.num_elements() > 0).then(|| reference(d)))),
        &config,
    );
    assert_eq!(
        ints(got.selected_blocks.into_data()),
        ints(want.selected_blocks.into_data()),
        "{case:?} {dtype:?}: selected blocks differ (whole operator)"
    );
    let mut worst = compare(
        case,
        dtype,
        "whole operator",
        got.output.cast(DType::F32).into_data(),
        want.output.into_data(),
    );
    if blocks == 0 {
        return worst;
    }

    // Each branch on its own.
    let (o_cmp, selected) = B::nsa_compressed(
        on::<B>(&q, dtype, device),
        on::<B>(&k_cmp, dtype, device),
        on::<B>(&v_cmp, dtype, device),
        &config,
    );
    let selected_data = Tensor::<B, 4, Int>::from_primitive(selected.clone()).into_data();
    let o_slc = B::nsa_selected(
        on::<B>(&q, dtype, device),
        on::<B>(&k, dtype, device),
        on::<B>(&v, dtype, device),
        selected,
        &config,
    );
    let o_win = B::nsa_window(
        on::<B>(&q, dtype, device),
        on::<B>(&k, dtype, device),
        on::<B>(&v, dtype, device),
        &config,
    );

    let (ref_cmp, ref_selected) =
        compressed_attention(reference(&q), reference(&k_cmp), reference(&v_cmp), &config);
    assert_eq!(
        ints(selected_data),
        ints(ref_selected.clone().into_data()),
        "{case:?} {dtype:?}: selected blocks differ"
    );
    let ref_slc = selected_attention(
        reference(&q),
        reference(&k),
        reference(&v),
        ref_selected,
        &config,
    );
    let ref_win = window_attention(reference(&q), reference(&k), reference(&v), &config);
    for (name, kernel, expected) in [
        ("compressed", o_cmp, ref_cmp),
        ("selected", o_slc, ref_slc),
        ("window", o_win, ref_win),
    ] {
        let error = compare(case, dtype, name, back::<B>(kernel), expected.into_data());
        worst = worst.max(error);
    }
    worst
}

/// Relative error of `got` against `want`, asserted below the dtype's tolerance.
fn compare(case: &Case, dtype: DType, name: &str, got: TensorData, want: TensorData) -> f64 {
    let error = relative_error(&floats(got), &floats(want));
    let tolerance = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
    assert!(
        error < tolerance,
        "{case:?} {dtype:?}: {name} relative error {error:e} (tolerance {tolerance:e})"
    );
    error
}

fn check_all<B: NsaBackend>(device: &B::Device, dtype: DType) {
    let mut worst = 0.0f64;
    for case in cases() {
        worst = worst.max(check_case::<B>(&case, dtype, device));
    }
    println!(
        "{dtype:?}: {} cases, worst relative error {worst:e}",
        cases().len()
    );
}

/// Whether the backend's device can run a tiny computation (the runtime panics without a
/// driver or adapter).
fn device_answers<B: NsaBackend>(device: &B::Device) -> bool {
    let device = device.clone();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        Tensor::<B, 1>::ones([4], &device).sum().into_data();
    }))
    .is_ok()
}

#[test]
fn wgpu_kernels_match_the_reference() {
    type B = burn::backend::Wgpu;
    let device = Default::default();
    if !device_answers::<B>(&device) {
        let required = std::env::var_os("NSA_REQUIRE_GPU_ADAPTER").is_some();
        assert!(
            !required,
            "no wgpu adapter, and NSA_REQUIRE_GPU_ADAPTER is set"
        );
        eprintln!("skipped: no wgpu adapter (set NSA_REQUIRE_GPU_ADAPTER to make this fail)");
        return;
    }
    check_all::<B>(&device, DType::F32);
}

#[cfg(feature = "test-cuda")]
#[test]
fn cuda_kernels_match_the_reference() {
    type B = burn::backend::Cuda;
    let device = Default::default();
    assert!(device_answers::<B>(&device), "no CUDA device");
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        check_all::<B>(&device, dtype);
    }
}
