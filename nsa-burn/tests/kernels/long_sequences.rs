//! Helpers of `cuda_long_sequences_use_64_bit_offsets`: every branch forward and backward
//! on the kernels, and where two results differ (CUDA only).

use burn::tensor::{Int, Tensor, TensorPrimitive};
use nsa_burn::{BranchSaved, NsaAttentionConfig, NsaBackend};

use crate::data::ints;

/// The long-sequence inputs `q, k, v, k_cmp, v_cmp, dO`, each `[B, ., ., d]`.
pub type LongInputs<B> = [Tensor<B, 4>; 6];

/// One branch (0 compressed, 1 selected, 2 window) forward and backward on the kernels:
/// its output, log-sum-exp, input gradients and (compressed branch) selected blocks, named.
pub fn branch_results<B: NsaBackend>(
    inputs: &LongInputs<B>,
    branch: usize,
    config: &NsaAttentionConfig,
) -> Vec<(&'static str, Tensor<B, 4>)> {
    let [q, k, v, k_cmp, v_cmp, d_o] = inputs;
    let backward = B::nsa_backward().expect("this backend has backward kernels");
    let float = |x: &Tensor<B, 4>| x.clone().into_primitive().tensor();
    let compressed = || B::nsa_compressed(float(q), float(k_cmp), float(v_cmp), 0, config);
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
pub fn mismatch(
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
