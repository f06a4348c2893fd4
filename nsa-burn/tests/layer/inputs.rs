//! Inputs at the edges: empty dimensions, mixed or unsupported dtypes, configuration values
//! whose arithmetic overflows, windows beyond the sequence, and a record saved with other
//! settings. Each is a typed error naming the field or tensor, or a defined result.

use burn::backend::Wgpu;
use burn::module::Module;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::{DType, Tensor};
use nsa_burn::{
    nsa_attention, try_nsa_attention, BranchKv, NsaAttentionConfig, NsaBackend, NsaConfigError,
    NsaError, NsaInput, NsaRecord,
};

use crate::{device, normal, operator_input, small_config, values, B};

fn config() -> NsaAttentionConfig {
    NsaAttentionConfig::new()
        .with_compress_block(4)
        .with_compress_stride(2)
        .with_select_block(8)
}

/// Operator inputs with `batch`, `seq`, `heads`, `kv_heads`, `d_k`, `d_v` as given.
fn input(dims: [usize; 6]) -> NsaInput<B> {
    let [batch, seq, heads, kv_heads, d_k, d_v] = dims;
    let kv = |len| BranchKv {
        k: normal([batch, len, kv_heads, d_k]),
        v: normal([batch, len, kv_heads, d_v]),
    };
    let blocks = config().num_compressed_blocks(seq);
    NsaInput {
        q: normal([batch, seq, heads, d_k]),
        compressed: (blocks > 0).then(|| kv(blocks)),
        selected: kv(seq),
        window: kv(seq),
        gates: normal([batch, seq, heads, 3]),
    }
}

fn shape_error_on(result: Result<impl std::fmt::Debug, NsaError>, tensor: &str) {
    match result {
        Err(NsaError::Shape(error)) => {
            assert_eq!(error.tensor, tensor, "{error}");
            assert!(error.to_string().contains("at least 1"), "{error}");
        }
        other => panic!("expected a shape error on `{tensor}`, got {other:?}"),
    }
}

#[test]
fn empty_dimensions_are_shape_errors() {
    assert!(try_nsa_attention(input([1, 20, 2, 1, 4, 4]), &config()).is_ok());
    for (dims, tensor) in [
        ([0, 20, 2, 1, 4, 4], "q"),
        ([1, 0, 2, 1, 4, 4], "q"),
        ([1, 20, 0, 1, 4, 4], "q"),
        ([1, 20, 2, 1, 0, 4], "q"),
        ([1, 20, 2, 0, 4, 4], "selected.v"),
        ([1, 20, 2, 1, 4, 0], "selected.v"),
    ] {
        shape_error_on(try_nsa_attention(input(dims), &config()), tensor);
    }
    let layer = small_config().init::<B>(&device());
    for dims in [[0, 5, 24], [1, 0, 24], [1, 5, 23]] {
        shape_error_on(layer.try_forward(normal(dims)), "x");
    }
    let forward = std::panic::AssertUnwindSafe(|| layer.forward(normal([1, 0, 24])));
    let panic =
        std::panic::catch_unwind(forward).expect_err("forward must panic where try_forward errs");
    let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        text.contains("`x`") && text.contains("at least 1"),
        "{text}"
    );
}

#[test]
fn every_float_input_must_have_the_queries_dtype() {
    let cast = |tensor: Tensor<B, 4>, dtype| tensor.cast(dtype);
    let mut window = input([1, 20, 2, 1, 4, 4]);
    window.window.v = cast(window.window.v, DType::F64);
    let mut gates = input([1, 20, 2, 1, 4, 4]);
    gates.gates = cast(gates.gates, DType::F16);
    let mut compressed = input([1, 20, 2, 1, 4, 4]);
    let blocks = compressed.compressed.as_mut().unwrap();
    blocks.k = cast(blocks.k.clone(), DType::F64);
    for (input, tensor) in [
        (window, "window.v"),
        (gates, "gates"),
        (compressed, "compressed.k"),
    ] {
        match try_nsa_attention(input, &config()) {
            Err(error @ NsaError::MixedDType { .. }) => {
                assert!(error.to_string().contains(tensor), "{error}");
                assert!(
                    matches!(error, NsaError::MixedDType { tensor: t, q_dtype: DType::F32, .. } if t == tensor)
                );
            }
            other => panic!("expected a dtype error on `{tensor}`, got {other:?}"),
        }
    }
}

#[test]
fn kernel_backends_take_f32_f16_and_bf16_only() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        assert!(<Wgpu as NsaBackend>::nsa_supports_dtype(dtype), "{dtype:?}");
    }
    for dtype in [DType::F64, DType::I32, DType::U8] {
        assert!(
            !<Wgpu as NsaBackend>::nsa_supports_dtype(dtype),
            "{dtype:?}"
        );
    }
    // The reference takes every float dtype.
    assert!(<B as NsaBackend>::nsa_supports_dtype(DType::F64));
    assert!(!<B as NsaBackend>::nsa_supports_dtype(DType::I64));
}

#[test]
fn overflowing_config_values_are_typed_errors() {
    let forced = config()
        .with_n_initial_blocks(usize::MAX)
        .with_n_local_blocks(2);
    assert!(matches!(
        forced.validate(),
        Err(NsaConfigError::ForcedBlocksExceedSelected { .. })
    ));
    // Finite in f64 but not a positive finite f32: infinite, or 0 once rounded.
    for value in [1e300, 1e-60, f64::NAN, f64::INFINITY, 0.0] {
        let scaled = config().with_softmax_scale(Some(value));
        match scaled.validate() {
            Err(NsaConfigError::InvalidSoftmaxScale { value: got }) => {
                assert!(got == value || value.is_nan())
            }
            other => panic!("scale {value}: expected InvalidSoftmaxScale, got {other:?}"),
        }
    }
    assert!(config().with_softmax_scale(Some(1e30)).validate().is_ok());
}

#[test]
fn a_window_beyond_the_sequence_is_full_causal_attention() {
    let seq = 40;
    let full = config().with_window(seq);
    let input = operator_input(&full, seq, |i| i as f32 * 0.1);
    let expected = nsa_attention(input.clone(), &full).output;
    for window in [seq + 1, u32::MAX as usize, usize::MAX] {
        let output = nsa_attention(input.clone(), &full.with_window(window)).output;
        let diff = (output - expected.clone()).abs().max().into_scalar();
        assert!(diff <= 1e-6, "window {window}: differs by {diff}");
    }
    assert!(values(expected.reshape([1, seq, 8]))
        .iter()
        .all(|x| x.is_finite()));
}

#[test]
fn a_record_saved_with_other_settings_is_detected() {
    let saved = small_config().init::<B>(&device());
    let x = normal([1, 30, 24]);
    // Run it first: parameters initialise lazily, and a clone taken before would draw
    // its own values.
    let expected = saved.forward(x.clone());
    let bytes = BinBytesRecorder::<FullPrecisionSettings>::default()
        .record(saved.clone().into_record(), ())
        .unwrap();
    let load = |config: nsa_burn::NsaConfig| {
        let record: NsaRecord<B> = BinBytesRecorder::<FullPrecisionSettings>::default()
            .load(bytes.clone(), &device())
            .unwrap();
        config.init::<B>(&device()).load_record(record)
    };
    let same = load(small_config());
    let diff = (same.forward(x.clone()) - expected)
        .abs()
        .max()
        .into_scalar();
    assert!(diff <= 1e-6, "the reloaded layer differs by {diff}");
    for (config, field) in [
        (small_config().with_n_selected(5), "n_selected"),
        (small_config().with_window(32), "window"),
        (
            small_config().with_softmax_scale(Some(0.5)),
            "softmax_scale",
        ),
    ] {
        match load(config).try_forward(x.clone()) {
            Err(error @ NsaError::SettingsMismatch { .. }) => {
                assert!(error.to_string().contains(field), "{error}");
            }
            other => panic!("expected a settings mismatch on `{field}`, got {other:?}"),
        }
    }
}
