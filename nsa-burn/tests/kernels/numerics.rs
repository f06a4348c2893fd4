//! Numerics at the edges, on the kernels and the reference alike: inputs scaled to 1e4 (1e2 in f16),
//! gates saturated at 0 and 1, and a NaN in one query position.

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use nsa_burn::{nsa_attention, NsaBackend};

use crate::cases::Case;
use crate::common::relative_error;
use crate::data::{case_inputs, floats, operator_input, reference, tensor};

/// The operator's output `[B, T, H, d_v]` on `B` (in `dtype`) and on the reference, for
/// inputs `[q, k, v, k_cmp, v_cmp, gates]`.
fn outputs<B: NsaBackend>(
    case: &Case,
    inputs: &[TensorData; 6],
    dtype: DType,
    device: &B::Device,
) -> (Vec<f32>, Vec<f32>) {
    let present = |d: &TensorData| d.num_elements() > 0;
    let got = nsa_attention(
        operator_input(
            inputs
                .each_ref()
                .map(|d| present(d).then(|| tensor::<B>(d, dtype, device))),
        ),
        &case.config,
    );
    let want = nsa_attention(
        operator_input(inputs.each_ref().map(|d| present(d).then(|| reference(d)))),
        &case.config,
    );
    (
        floats(got.output.cast(DType::F32).into_data()),
        floats(want.output.into_data()),
    )
}

/// [`case_inputs`] with the queries, keys and values times `scale`.
fn inputs(case: &Case, dtype: DType, scale: f32) -> [TensorData; 6] {
    let mut inputs = case_inputs(case, dtype);
    for data in inputs.iter_mut().take(5) {
        *data =
            (Tensor::<Flex, 4>::from_data(data.clone(), &Default::default()) * scale).into_data();
    }
    inputs
}

/// Inputs scaled to 1e4 (1e2 in f16, whose largest value is 65504: values of 1e4 times a
/// normal draw, summed over three branches, do not fit) give finite outputs everywhere
/// (scores near 1e8, 1e4 in f16, go through the softmax's running maximum, never through
/// `exp` unshifted).
pub fn check_large_inputs<B: NsaBackend>(case: &Case, dtype: DType, device: &B::Device) {
    let scale = if dtype == DType::F16 { 1e2 } else { 1e4 };
    let (got, want) = outputs::<B>(case, &inputs(case, dtype, scale), dtype, device);
    assert!(
        got.iter().all(|x| x.is_finite()),
        "{case:?} {dtype:?}: kernels give non-finite outputs for inputs of {scale:e}"
    );
    assert!(
        want.iter().all(|x| x.is_finite()),
        "{case:?}: the reference gives non-finite outputs for inputs of {scale:e}"
    );
}

/// Gates of exactly 0 and 1 (each branch alone, and all three at 1) match the reference.
pub fn check_saturated_gates<B: NsaBackend>(case: &Case, dtype: DType, device: &B::Device) {
    let mut inputs = inputs(case, dtype, 1.0);
    let [batch, seq, heads] = [case.batch, case.seq, case.heads];
    for gates in [
        [1.0, 0.0, 0.0],
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
        [1.0, 1.0, 1.0],
    ] {
        let values: Vec<f32> = (0..batch * seq * heads).flat_map(|_| gates).collect();
        inputs[5] = TensorData::new(values, [batch, seq, heads, 3]);
        let (got, want) = outputs::<B>(case, &inputs, dtype, device);
        let error = relative_error(&got, &want);
        let tolerance = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        assert!(
            error < tolerance,
            "{case:?} {dtype:?}: gates {gates:?}: relative error {error:e}"
        );
    }
}

/// A NaN in the queries at one position stays there: every other position's output is
/// finite and matches the reference (the position's own output is NaN on both).
pub fn check_nan_query<B: NsaBackend>(case: &Case, dtype: DType, device: &B::Device) {
    let mut inputs = inputs(case, dtype, 1.0);
    // Batch element 0, position `bad`, head 0, first dimension.
    let bad = case.seq / 2;
    let mut q = floats(inputs[0].clone());
    q[bad * case.heads * case.d_k] = f32::NAN;
    inputs[0] = TensorData::new(q, [case.batch, case.seq, case.heads, case.d_k]);
    let (got, want) = outputs::<B>(case, &inputs, dtype, device);
    let width = case.heads * case.d_v;
    let tolerance = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
    for row in 0..case.batch * case.seq {
        let (g, w) = (
            &got[row * width..(row + 1) * width],
            &want[row * width..(row + 1) * width],
        );
        if row == bad {
            assert!(
                g.iter().any(|x| x.is_nan()) && w.iter().any(|x| x.is_nan()),
                "{case:?} {dtype:?}: position {bad} read a NaN query and must show it"
            );
        } else {
            let error = relative_error(g, w);
            assert!(
                error < tolerance,
                "{case:?} {dtype:?}: row {row}, which reads no NaN, has relative error {error:e}"
            );
        }
    }
}

/// The numerics checks on one small case with every branch active.
pub fn check_numerics<B: NsaBackend>(dtype: DType, device: &B::Device) {
    let case = Case {
        batch: 2,
        seq: 100,
        heads: 4,
        kv_heads: 2,
        d_k: 32,
        d_v: 16,
        config: crate::cases::small(),
    };
    check_large_inputs::<B>(&case, dtype, device);
    check_saturated_gates::<B>(&case, dtype, device);
    check_nan_query::<B>(&case, dtype, device);
}
