//! The CubeCL kernels against the reference: every branch, on fresh random inputs, for the
//! configurations and edge cases of the reference tests.
//!
//! - Forward: each branch's output and row log-sum-exp, the selected blocks, and the whole
//!   operator. Backward: the gradient of every operator input under `Autodiff<B>` (the
//!   backward kernels) against `Autodiff<Flex>` (the reference's autodiff).
//! - wgpu: always built. Without an adapter the test is skipped with a message, unless
//!   `NSA_REQUIRE_GPU_ADAPTER` is set (CI sets it, with Mesa lavapipe installed), in which
//!   case it fails.
//! - CUDA: built with `--features test-cuda` (run on the GPU machine), in f32, f16 and bf16,
//!   and a sequence long enough for 64-bit offsets.
//!
//! The kernels run on Burn's default backend types (`Wgpu`, `Cuda`: fusion on); the
//! reference runs on Flex in f32 on the same values (rounded to the kernel's dtype first).

mod common;

use burn::backend::{Autodiff, Flex, Wgpu};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Distribution, Int, Tensor, TensorData, TensorPrimitive};
use common::relative_error;
use nsa_burn::reference::{
    compressed_attention, selected_attention, window_attention, EMPTY_ROW_LSE,
};
#[cfg(feature = "test-cuda")]
use nsa_burn::BranchSaved;
use nsa_burn::{nsa_attention, BranchKv, GatedSum, NsaAttentionConfig, NsaBackend, NsaInput};

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
        config: small().with_select_block(64),
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
    // Head dims the tensor-core kernels take, at G = 1, 8 and 12: the compression
    // branch's scoring pass sums groups over lanes (G dividing 16) or over segments of
    // four rows spanning planes (G = 12).
    for (heads, kv_heads) in [(2, 2), (8, 1), (12, 1)] {
        cases.push(Case {
            heads,
            kv_heads,
            d_k: 32,
            d_v: 16,
            seq: 300,
            ..base
        });
    }
    // The widest head dims, d_k != d_v both ways (G = 4 and G = 16).
    cases.push(Case {
        seq: 150,
        d_k: 192,
        d_v: 256,
        ..base
    });
    cases.push(Case {
        seq: 150,
        heads: 16,
        d_k: 256,
        d_v: 192,
        ..base
    });
    // G = 16 on the paper's blocks, T not a multiple of the positions a tensor-core
    // selection cube holds: neighbouring positions share their forced blocks' tiles.
    cases.push(Case {
        seq: 1111,
        heads: 16,
        d_k: 32,
        d_v: 16,
        config: NsaAttentionConfig::new(),
        ..base
    });
    // Long enough (T > 2048) that the tensor-core key-side backward splits the queries of
    // the compressed keys and of the initial selection block over several cubes.
    cases.push(Case {
        batch: 2,
        seq: 4500,
        heads: 16,
        kv_heads: 1,
        d_k: 32,
        d_v: 16,
        config: small(),
    });
    cases
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

    // Each branch on its own, log-sum-exp included.
    let (o_cmp, lse_cmp, selected) = B::nsa_compressed(
        on::<B>(&q, dtype, device),
        on::<B>(&k_cmp, dtype, device),
        on::<B>(&v_cmp, dtype, device),
        &config,
    );
    let selected_data = Tensor::<B, 4, Int>::from_primitive(selected.clone()).into_data();
    let (o_slc, lse_slc) = B::nsa_selected(
        on::<B>(&q, dtype, device),
        on::<B>(&k, dtype, device),
        on::<B>(&v, dtype, device),
        selected,
        &config,
    );
    let (o_win, lse_win) = B::nsa_window(
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
    for (name, (kernel, kernel_lse), expected) in [
        ("compressed", (o_cmp, lse_cmp), ref_cmp),
        ("selected", (o_slc, lse_slc), ref_slc),
        ("window", (o_win, lse_win), ref_win),
    ] {
        let error = compare(
            case,
            dtype,
            name,
            back::<B>(kernel),
            expected.output.into_data(),
        );
        let lse = Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(kernel_lse)).into_data();
        let lse_error = compare_lse(case, dtype, name, lse, expected.lse.into_data());
        worst = worst.max(error).max(lse_error);
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

/// [`compare`] for row log-sum-exps, over the rows that attend some key; rows that attend
/// none must be [`EMPTY_ROW_LSE`] on both sides (they would swamp the norm).
fn compare_lse(case: &Case, dtype: DType, name: &str, got: TensorData, want: TensorData) -> f64 {
    let (got, want) = (floats(got), floats(want));
    let empty = |x: f32| x <= EMPTY_ROW_LSE / 2.0;
    for (row, (&g, &w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            empty(g),
            empty(w),
            "{case:?} {dtype:?}: {name} row {row} lse {g} vs reference {w}"
        );
    }
    let (got, want): (Vec<f32>, Vec<f32>) = got
        .into_iter()
        .zip(want)
        .filter(|&(_, w)| !empty(w))
        .unzip();
    let shape = [got.len()];
    compare(
        case,
        dtype,
        &format!("{name} log-sum-exp"),
        TensorData::new(got, shape),
        TensorData::new(want, shape),
    )
}

/// The gradients of the operator's inputs `[q, k, v, k_cmp, v_cmp, gates]` (`None` for an
/// empty input) for the loss `sum(output * weights)`, computed on `B` in `dtype`.
fn operator_gradients<B: AutodiffBackend + NsaBackend>(
    inputs: [&TensorData; 6],
    weights: &TensorData,
    config: &NsaAttentionConfig,
    dtype: DType,
    device: &B::Device,
) -> [Option<TensorData>; 6] {
    let leaves = inputs.map(|data| {
        (data.num_elements() > 0).then(|| {
            let inner = Tensor::<B::InnerBackend, 4>::from_data(data.clone(), device).cast(dtype);
            Tensor::<B, 4>::from_inner(inner).require_grad()
        })
    });
    let output = nsa_attention(operator_input(leaves.clone()), config).output;
    let weights = Tensor::<B, 4>::from_data(weights.clone(), device).cast(dtype);
    let grads = (output * weights).sum().backward();
    leaves.map(|leaf| {
        leaf.map(|leaf| {
            leaf.grad(&grads)
                .expect("every input gets a gradient")
                .cast(DType::F32)
                .into_data()
        })
    })
}

/// Which branch [`branch_gradients`] differentiates.
#[derive(Debug, Clone, Copy)]
enum Branch {
    Compressed,
    Selected,
    Window,
}

/// The gradients of one branch's `[q, k, v]` for the loss `sum(output * weights)`, computed
/// on `B` in `dtype` through its [`NsaBackend`] method; `selected` feeds the selection branch.
fn branch_gradients<B: AutodiffBackend + NsaBackend>(
    branch: Branch,
    inputs: [&TensorData; 3],
    selected: &TensorData,
    weights: &TensorData,
    config: &NsaAttentionConfig,
    dtype: DType,
    device: &B::Device,
) -> [TensorData; 3] {
    let leaves = inputs.map(|data| {
        let inner = Tensor::<B::InnerBackend, 4>::from_data(data.clone(), device).cast(dtype);
        Tensor::<B, 4>::from_inner(inner).require_grad()
    });
    let [q, k, v] = leaves.clone().map(|x| x.into_primitive().tensor());
    let output = match branch {
        Branch::Compressed => B::nsa_compressed(q, k, v, config).0,
        Branch::Selected => {
            let selected = Tensor::<B, 4, Int>::from_data(selected.clone(), device);
            B::nsa_selected(q, k, v, selected.into_primitive(), config).0
        }
        Branch::Window => B::nsa_window(q, k, v, config).0,
    };
    let output = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(output));
    let weights = Tensor::<B, 4>::from_data(weights.clone(), device).cast(dtype);
    let grads = (output * weights).sum().backward();
    leaves.map(|leaf| {
        leaf.grad(&grads)
            .expect("every input gets a gradient")
            .cast(DType::F32)
            .into_data()
    })
}

/// Gradients of every operator input of `case` on `B` (the backward kernels) against the
/// reference's autodiff on Flex; returns the worst relative error.
fn check_gradients<B: AutodiffBackend + NsaBackend>(
    case: &Case,
    dtype: DType,
    device: &B::Device,
) -> f64 {
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
    let inputs = [
        random([batch, seq, heads, d_k], dtype),
        random([batch, seq, kv_heads, d_k], dtype),
        random([batch, seq, kv_heads, d_v], dtype),
        random([batch, blocks, kv_heads, d_k], dtype),
        random([batch, blocks, kv_heads, d_v], dtype),
        Tensor::<Flex, 4>::random(
            [batch, seq, heads, 3],
            Distribution::Uniform(0.0, 1.0),
            &Default::default(),
        )
        .into_data(),
    ];
    let weights = random([batch, seq, heads, d_v], dtype);
    let inputs = [0, 1, 2, 3, 4, 5].map(|i| &inputs[i]);
    let got = operator_gradients::<B>(inputs, &weights, &config, dtype, device);
    let want = operator_gradients::<Autodiff<Flex>>(
        inputs,
        &weights,
        &config,
        DType::F32,
        &Default::default(),
    );
    let tolerance = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
    let names = ["q", "k", "v", "k_cmp", "v_cmp", "gates"];
    let mut errors: Vec<(String, f64)> = names
        .into_iter()
        .zip(got.into_iter().zip(want))
        .filter_map(|(name, pair)| match pair {
            (Some(got), Some(want)) => Some((
                name.to_string(),
                relative_error(&floats(got), &floats(want)),
            )),
            _ => None,
        })
        .collect();
    // Each branch alone, the selection branch on the reference's selection.
    if blocks > 0 {
        let [q, k, v, k_cmp, v_cmp, _] = inputs;
        let (_, selected) =
            compressed_attention(reference(q), reference(k_cmp), reference(v_cmp), &config);
        let selected = selected.into_data();
        for (branch, [q, k, v]) in [
            (Branch::Compressed, [q, k_cmp, v_cmp]),
            (Branch::Selected, [q, k, v]),
            (Branch::Window, [q, k, v]),
        ] {
            let got = branch_gradients::<B>(
                branch,
                [q, k, v],
                &selected,
                &weights,
                &config,
                dtype,
                device,
            );
            let want = branch_gradients::<Autodiff<Flex>>(
                branch,
                [q, k, v],
                &selected,
                &weights,
                &config,
                DType::F32,
                &Default::default(),
            );
            for (name, (got, want)) in ["q", "k", "v"].into_iter().zip(got.into_iter().zip(want)) {
                let error = relative_error(&floats(got), &floats(want));
                errors.push((format!("{branch:?} {name}"), error));
            }
        }
    }
    assert!(
        errors.iter().all(|&(_, error)| error < tolerance),
        "{case:?} {dtype:?}: gradient relative errors {errors:?} (tolerance {tolerance:e})"
    );
    errors.iter().map(|&(_, error)| error).fold(0.0, f64::max)
}

/// [`check_gradients`] over `cases`.
fn check_gradient_cases<B: AutodiffBackend + NsaBackend>(
    cases: Vec<Case>,
    device: &B::Device,
    dtype: DType,
) {
    let mut worst = 0.0f64;
    for case in &cases {
        worst = worst.max(check_gradients::<B>(case, dtype, device));
    }
    println!(
        "{dtype:?} gradients: {} cases, worst relative error {worst:e}",
        cases.len()
    );
}

/// [`cases`], or only case `i` when `NSA_KERNEL_CASE=i` is set (to debug one).
fn selected_cases() -> Vec<Case> {
    let cases = cases();
    match std::env::var("NSA_KERNEL_CASE") {
        Ok(index) => {
            let index: usize = index.parse().expect("NSA_KERNEL_CASE is a case index");
            vec![cases[index]]
        }
        Err(_) => cases,
    }
}

fn check_all<B: NsaBackend>(device: &B::Device, dtype: DType) {
    let mut worst = 0.0f64;
    for case in selected_cases() {
        worst = worst.max(check_case::<B>(&case, dtype, device));
    }
    println!(
        "{dtype:?}: {} cases, worst relative error {worst:e}",
        selected_cases().len()
    );
}

#[test]
fn wgpu_kernels_match_the_reference() {
    if let Some(device) = common::wgpu_device() {
        check_all::<Wgpu>(&device, DType::F32);
    }
}

/// Every case, the 700- and 4500-position ones included. Two lavapipe limits shaped the
/// portable key-side kernel: it summed per-unit output arrays wrongly once they reached 16
/// entries (the key-side cube takes more units instead, see `KEY_GRAD_WIDTH` in
/// `nsa_cubecl::launch`), and llvmpipe ends all loops of an invocation after 65,535
/// iterations in total, which the `d_k = 256, d_v = 192`, G = 16 case passed (its inner
/// dot-product loops are unrolled now).
#[test]
fn wgpu_kernel_gradients_match_the_reference() {
    if let Some(device) = common::wgpu_device() {
        check_gradient_cases::<Autodiff<Wgpu>>(selected_cases(), &device, DType::F32);
    }
}

/// The gated sum (Eq. 5) on `B` in `dtype`: its output and the gradients of its four
/// operands `[o_cmp, o_slc, o_win, gates]` for the loss `sum(output * weights)`, as f32.
fn gated_sum_results<B: AutodiffBackend + NsaBackend>(
    operands: &[TensorData; 4],
    weights: &TensorData,
    dtype: DType,
    device: &B::Device,
) -> Vec<TensorData> {
    let leaves = operands
        .each_ref()
        .map(|data| tensor::<B>(data, dtype, device).require_grad());
    let float = |t: &Tensor<B, 4>| t.clone().into_primitive().tensor();
    let [compressed, selected, window, gates] = leaves.each_ref().map(float);
    let output = B::nsa_gated_sum(GatedSum {
        compressed,
        selected,
        window,
        gates,
    });
    let output = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(output));
    let grads = (output.clone() * tensor::<B>(weights, dtype, device))
        .sum()
        .backward();
    let mut results = vec![output.cast(DType::F32).into_data()];
    for leaf in &leaves {
        let grad = leaf.grad(&grads).expect("every operand gets a gradient");
        results.push(grad.cast(DType::F32).into_data());
    }
    results
}

/// The gated sum's kernels against the reference's Burn ops, forward and backward, at value
/// head dims that take each vector width of the row kernels (1, 2, 4) and several units'
/// rows per cube.
fn check_gated_sum<B: AutodiffBackend + NsaBackend>(device: &B::Device, dtype: DType) {
    let tolerance = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
    let names = ["output", "d o_cmp", "d o_slc", "d o_win", "d gates"];
    for d_v in [5, 6, 12, 128] {
        let shape = [2, 7, 3, d_v];
        let operands = [
            random(shape, dtype),
            random(shape, dtype),
            random(shape, dtype),
            random([2, 7, 3, 3], dtype),
        ];
        let weights = random(shape, dtype);
        let got = gated_sum_results::<B>(&operands, &weights, dtype, device);
        let want = gated_sum_results::<Autodiff<Flex>>(
            &operands,
            &weights,
            DType::F32,
            &Default::default(),
        );
        for ((name, got), want) in names.iter().zip(got).zip(want) {
            let error = relative_error(&floats(got), &floats(want));
            assert!(
                error < tolerance,
                "gated sum, d_v = {d_v}, {dtype:?}: {name} relative error {error:e} \
                 (tolerance {tolerance:e})"
            );
        }
    }
}

#[test]
fn wgpu_gated_sum_matches_the_reference() {
    if let Some(device) = common::wgpu_device() {
        check_gated_sum::<Autodiff<Wgpu>>(&device, DType::F32);
    }
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
        check_all::<B>(&device, dtype);
    }
}

#[cfg(feature = "test-cuda")]
#[test]
fn cuda_kernel_gradients_match_the_reference() {
    type B = burn::backend::Cuda;
    let device = Default::default();
    assert!(common::device_answers::<B>(&device), "no CUDA device");
    for dtype in cuda_dtypes() {
        check_gradient_cases::<Autodiff<B>>(selected_cases(), &device, dtype);
        check_gated_sum::<Autodiff<B>>(&device, dtype);
    }
}

/// The long-sequence inputs `q, k, v, k_cmp, v_cmp, dO`, each `[B, ., ., d]`.
#[cfg(feature = "test-cuda")]
type LongInputs<B> = [Tensor<B, 4>; 6];

/// One branch (0 compressed, 1 selected, 2 window) forward and backward on the kernels:
/// its output, log-sum-exp, input gradients and (compressed branch) selected blocks, named.
#[cfg(feature = "test-cuda")]
fn branch_results<B: NsaBackend>(
    inputs: &LongInputs<B>,
    branch: usize,
    config: &NsaAttentionConfig,
) -> Vec<(&'static str, Tensor<B, 4>)> {
    let [q, k, v, k_cmp, v_cmp, d_o] = inputs;
    let backward = B::nsa_backward().expect("this backend has backward kernels");
    let float = |x: &Tensor<B, 4>| x.clone().into_primitive().tensor();
    let compressed = || B::nsa_compressed(float(q), float(k_cmp), float(v_cmp), config);
    let (keys, values) = if branch == 0 { (k_cmp, v_cmp) } else { (k, v) };
    let saved = |output: &B::FloatTensorPrimitive, lse: &B::FloatTensorPrimitive| BranchSaved {
        q: float(q),
        k: float(keys),
        v: float(values),
        output: output.clone(),
        lse: lse.clone(),
    };
    let mut results = Vec::new();
    let (output, lse, grads) = match branch {
        0 => {
            let (output, lse, selected) = compressed();
            let selected = Tensor::<B, 4, Int>::from_primitive(selected).float();
            results.push(("selected blocks", selected));
            let grads = (backward.compressed)(saved(&output, &lse), float(d_o), config);
            (output, lse, grads)
        }
        1 => {
            let (_, _, selected) = compressed();
            let (output, lse) =
                B::nsa_selected(float(q), float(k), float(v), selected.clone(), config);
            let grads = (backward.selected)(saved(&output, &lse), selected, float(d_o), config);
            (output, lse, grads)
        }
        _ => {
            let (output, lse) = B::nsa_window(float(q), float(k), float(v), config);
            let grads = (backward.window)(saved(&output, &lse), float(d_o), config);
            (output, lse, grads)
        }
    };
    let tensor = |x| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(x));
    let lse = Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(lse)).unsqueeze_dim(3);
    results.extend([
        ("output", tensor(output)),
        ("lse", lse),
        ("dq", tensor(grads.q)),
        ("dk", tensor(grads.k)),
        ("dv", tensor(grads.v)),
    ]);
    results
}

/// Where `a` and `b` (`[1, X, Y, Z]`) differ: how many elements, and the first and last
/// index along dims 1 and 2 holding one (empty when they agree bitwise).
#[cfg(feature = "test-cuda")]
fn mismatch(
    a: Tensor<burn::backend::Cuda, 4>,
    b: Tensor<burn::backend::Cuda, 4>,
) -> Option<String> {
    let differ = a.not_equal(b);
    if differ.clone().any().into_scalar() == 0 {
        return None;
    }
    let differ = differ.int();
    let count = ints(differ.clone().sum().into_data())[0];
    let span = |counts: Vec<i64>| {
        let first = counts.iter().position(|&c| c != 0);
        let last = counts.iter().rposition(|&c| c != 0);
        format!("{first:?}..={last:?} of {}", counts.len())
    };
    let along_1 = ints(differ.clone().sum_dim(3).sum_dim(2).into_data());
    let along_2 = ints(differ.sum_dim(3).sum_dim(1).into_data());
    Some(format!(
        "{count} elements differ, dim 1 {}, dim 2 {}",
        span(along_1),
        span(along_2)
    ))
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
