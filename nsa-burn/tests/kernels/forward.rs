//! Forward parity: the whole operator and each branch on its own (output, row
//! log-sum-exp, selected blocks) against the reference.

use burn::tensor::{DType, Int, Tensor, TensorData, TensorPrimitive};
use nsa_burn::reference::{
    compressed_attention, selected_attention, window_attention, EMPTY_ROW_LSE,
};
use nsa_burn::{nsa_attention, BranchKv, NsaBackend, NsaInput};

use crate::cases::{Case, OffsetCase};
use crate::common::relative_error;
use crate::data::{back, case_inputs, floats, ints, on, operator_input, reference, tensor};

/// Runs every branch of `case` on `B` in `dtype` and on the reference; returns the worst
/// relative error, and panics if the selected blocks differ.
pub fn check_case<B: NsaBackend>(case: &Case, dtype: DType, device: &B::Device) -> f64 {
    let config = case.config;
    let blocks = config.num_compressed_blocks(case.seq);
    let [q, k, v, k_cmp, v_cmp, gates] = case_inputs(case, dtype);

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
        0,
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

    let (ref_cmp, ref_selected) = compressed_attention(
        reference(&q),
        reference(&k_cmp),
        reference(&v_cmp),
        0,
        &config,
    );
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

/// The whole operator with its queries at an offset, as a cache calls it: the last
/// `case.queries` of the `case.keys.seq` positions against all of their keys, the window
/// branch given only its last `case.window_rows` keys; on `B` (its kernels) and on the
/// reference. Returns the relative error and panics if the selected blocks differ.
pub fn check_offset_case<B: NsaBackend>(
    case: &OffsetCase,
    dtype: DType,
    device: &B::Device,
) -> f64 {
    let [q, k, v, k_cmp, v_cmp, gates] = case_inputs(&case.keys, dtype);
    let last = |data: &TensorData, rows: usize| {
        let all = reference(data);
        let len = all.dims()[1];
        all.narrow(1, len - rows, rows).into_data()
    };
    let (q, gates) = (last(&q, case.queries), last(&gates, case.queries));
    let (k_win, v_win) = (last(&k, case.window_rows), last(&v, case.window_rows));
    let compressed = (k_cmp.num_elements() > 0).then_some((&k_cmp, &v_cmp));
    let got = nsa_attention(
        NsaInput {
            q: tensor::<B>(&q, dtype, device),
            compressed: compressed.map(|(k, v)| BranchKv {
                k: tensor::<B>(k, dtype, device),
                v: tensor::<B>(v, dtype, device),
            }),
            selected: BranchKv {
                k: tensor::<B>(&k, dtype, device),
                v: tensor::<B>(&v, dtype, device),
            },
            window: BranchKv {
                k: tensor::<B>(&k_win, dtype, device),
                v: tensor::<B>(&v_win, dtype, device),
            },
            gates: tensor::<B>(&gates, dtype, device),
        },
        &case.keys.config,
    );
    let want = nsa_attention(
        NsaInput {
            q: reference(&q),
            compressed: compressed.map(|(k, v)| BranchKv {
                k: reference(k),
                v: reference(v),
            }),
            selected: BranchKv {
                k: reference(&k),
                v: reference(&v),
            },
            window: BranchKv {
                k: reference(&k_win),
                v: reference(&v_win),
            },
            gates: reference(&gates),
        },
        &case.keys.config,
    );
    assert_eq!(
        ints(got.selected_blocks.into_data()),
        ints(want.selected_blocks.into_data()),
        "{case:?} {dtype:?}: selected blocks differ (queries at an offset)"
    );
    compare(
        &case.keys,
        dtype,
        &format!("queries at an offset ({case:?})"),
        got.output.cast(DType::F32).into_data(),
        want.output.into_data(),
    )
}

/// Ties: every compressed key equal, so that for each query every visible compressed key
/// has the same probability and the selection blocks with as many overlapping keys score
/// exactly alike. The kernels and the reference must pick the same blocks (the lower index
/// among equal scores), with overlapping blocks (`l = 8`, `d = 4`, `l' = 16`: each block
/// sums five compressed keys, split over two key tiles for some blocks).
pub fn check_tied_selection<B: NsaBackend>(case: &Case, dtype: DType, device: &B::Device) {
    let config = case.config;
    let [q, _, _, k_cmp, v_cmp, _] = case_inputs(case, dtype);
    // Every compressed key equal to the first.
    let k_cmp = reference(&k_cmp);
    let k_cmp = k_cmp
        .clone()
        .narrow(1, 0, 1)
        .expand(k_cmp.dims())
        .into_data();
    let (_, _, selected) = B::nsa_compressed(
        on::<B>(&q, dtype, device),
        on::<B>(&k_cmp, dtype, device),
        on::<B>(&v_cmp, dtype, device),
        0,
        &config,
    );
    let (_, want) = compressed_attention(
        reference(&q),
        reference(&k_cmp),
        reference(&v_cmp),
        0,
        &config,
    );
    assert_eq!(
        ints(Tensor::<B, 4, Int>::from_primitive(selected).into_data()),
        ints(want.into_data()),
        "{case:?} {dtype:?}: tied block scores select different blocks"
    );
}

/// Relative error of `got` against `want`, asserted below the dtype's tolerance.
pub fn compare(case: &Case, dtype: DType, name: &str, got: TensorData, want: TensorData) -> f64 {
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
pub fn compare_lse(
    case: &Case,
    dtype: DType,
    name: &str,
    got: TensorData,
    want: TensorData,
) -> f64 {
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
