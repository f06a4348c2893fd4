//! Backward parity: the gradient of every operator input, and of each branch's inputs on
//! its own, under `Autodiff<B>` (the backward kernels) against `Autodiff<Flex>`.

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Int, Tensor, TensorData, TensorPrimitive};
use nsa_burn::reference::compressed_attention;
use nsa_burn::{nsa_attention, NsaAttentionConfig, NsaBackend};

use crate::cases::Case;
use crate::common::relative_error;
use crate::data::{case_inputs, floats, operator_input, random, reference};

/// The gradients of the operator's inputs `[q, k, v, k_cmp, v_cmp, gates]` (`None` for an
/// empty input) for the loss `sum(output * weights)`, computed on `B` in `dtype`.
pub fn operator_gradients<B: AutodiffBackend + NsaBackend>(
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
pub enum Branch {
    Compressed,
    Selected,
    Window,
}

/// The gradients of one branch's `[q, k, v]` for the loss `sum(output * weights)`, computed
/// on `B` in `dtype` through its [`NsaBackend`] method; `selected` feeds the selection branch.
pub fn branch_gradients<B: AutodiffBackend + NsaBackend>(
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
        Branch::Compressed => B::nsa_compressed(q, k, v, 0, config).0,
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

/// Fresh random operator inputs `[q, k, v, k_cmp, v_cmp, gates]` of `case` (`k_cmp` and
/// `v_cmp` empty when `T < l`) and loss weights `[B, T, H, d_v]`, rounded to `dtype`.
pub fn gradient_inputs(case: &Case, dtype: DType) -> ([TensorData; 6], TensorData) {
    let weights = random([case.batch, case.seq, case.heads, case.d_v], dtype);
    (case_inputs(case, dtype), weights)
}

/// Gradients of every operator input of `case` on `B` (the backward kernels) against the
/// reference's autodiff on Flex; returns the worst relative error.
pub fn check_gradients<B: AutodiffBackend + NsaBackend>(
    case: &Case,
    dtype: DType,
    device: &B::Device,
) -> f64 {
    let config = case.config;
    let blocks = config.num_compressed_blocks(case.seq);
    let (inputs, weights) = gradient_inputs(case, dtype);
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
            compressed_attention(reference(q), reference(k_cmp), reference(v_cmp), 0, &config);
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
pub fn check_gradient_cases<B: AutodiffBackend + NsaBackend>(
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

/// Two identical backward runs of `case` on `B` give bitwise-equal gradients (the kernels
/// reduce in a fixed order, with no atomics).
pub fn check_deterministic<B: AutodiffBackend + NsaBackend>(
    case: &Case,
    dtype: DType,
    device: &B::Device,
) {
    let (inputs, weights) = gradient_inputs(case, dtype);
    let inputs = [0, 1, 2, 3, 4, 5].map(|i| &inputs[i]);
    let run = || operator_gradients::<B>(inputs, &weights, &case.config, dtype, device);
    let (first, second) = (run(), run());
    let names = ["q", "k", "v", "k_cmp", "v_cmp", "gates"];
    for (name, pair) in names.into_iter().zip(first.into_iter().zip(second)) {
        if let (Some(first), Some(second)) = pair {
            let bits = |data: TensorData| -> Vec<u32> {
                floats(data).into_iter().map(f32::to_bits).collect()
            };
            assert!(
                bits(first) == bits(second),
                "{case:?} {dtype:?}: the gradient of {name} differs between two identical runs"
            );
        }
    }
}
