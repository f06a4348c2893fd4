//! The gated sum (Eq. 5) on its own: output and operand gradients against the reference's
//! Burn ops.

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use nsa_burn::{GatedSum, NsaBackend};

use crate::common::relative_error;
use crate::data::{floats, random, tensor};

/// The gated sum (Eq. 5) on `B` in `dtype`: its output and the gradients of its four
/// operands `[o_cmp, o_slc, o_win, gates]` for the loss `sum(output * weights)`, as f32.
pub fn gated_sum_results<B: AutodiffBackend + NsaBackend>(
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
pub fn check_gated_sum<B: AutodiffBackend + NsaBackend>(device: &B::Device, dtype: DType) {
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
