//! Every configuration rule and wrong shape is a typed error naming the field or tensor.

use nsa_burn::{
    nsa_attention, try_nsa_attention, NsaAttentionConfig, NsaConfig, NsaConfigError, NsaError,
};

use crate::{device, normal, operator_input, small_config, B};

#[test]
fn every_config_rule_is_a_typed_error_naming_the_field() {
    let ok = small_config();
    assert_eq!(ok.validate(), Ok(()));
    let cases: Vec<(NsaConfig, NsaConfigError, &str)> = vec![
        (
            ok.clone().with_n_selected(0),
            NsaConfigError::Zero {
                field: "n_selected",
            },
            "`n_selected` must be at least 1",
        ),
        (
            NsaConfig::new(0, 4, 2, 8, 6),
            NsaConfigError::Zero { field: "d_model" },
            "`d_model`",
        ),
        (
            NsaConfig::new(24, 4, 3, 8, 6),
            NsaConfigError::NotDivisible {
                dividend: "n_heads",
                dividend_value: 4,
                divisor: "n_kv_heads",
                divisor_value: 3,
            },
            "`n_kv_heads` (3) must divide `n_heads` (4)",
        ),
        (
            ok.clone().with_compress_stride(3),
            NsaConfigError::NotDivisible {
                dividend: "compress_block",
                dividend_value: 8,
                divisor: "compress_stride",
                divisor_value: 3,
            },
            "`compress_stride` (3) must divide `compress_block` (8)",
        ),
        (
            ok.clone()
                .with_compress_block(8)
                .with_compress_stride(8)
                .with_select_block(12),
            NsaConfigError::NotDivisible {
                dividend: "select_block",
                dividend_value: 12,
                divisor: "compress_stride",
                divisor_value: 8,
            },
            "`compress_stride` (8) must divide `select_block` (12)",
        ),
        (
            ok.clone().with_compress_block(32).with_select_block(16),
            NsaConfigError::CompressBlockExceedsSelectBlock {
                compress_block: 32,
                select_block: 16,
            },
            "`compress_block` (32) must not exceed `select_block` (16)",
        ),
        (
            ok.clone().with_n_selected(2),
            NsaConfigError::ForcedBlocksExceedSelected {
                n_initial_blocks: 1,
                n_local_blocks: 2,
                n_selected: 2,
            },
            "must not exceed `n_selected` (2)",
        ),
        (
            ok.clone().with_softmax_scale(Some(-1.0)),
            NsaConfigError::InvalidSoftmaxScale { value: -1.0 },
            "`softmax_scale` must be finite and positive",
        ),
        (
            ok.clone().with_gate_hidden(Some(0)),
            NsaConfigError::Zero {
                field: "gate_hidden",
            },
            "`gate_hidden`",
        ),
        (
            ok.clone().with_compressor_hidden(Some(0)),
            NsaConfigError::Zero {
                field: "compressor_hidden",
            },
            "`compressor_hidden`",
        ),
        (
            ok.clone().with_window(0),
            NsaConfigError::Zero { field: "window" },
            "`window`",
        ),
        (
            ok.clone().with_query_chunk(0),
            NsaConfigError::Zero {
                field: "query_chunk",
            },
            "`query_chunk`",
        ),
    ];
    for (config, error, message) in cases {
        assert_eq!(config.validate(), Err(error.clone()));
        assert_eq!(config.try_init::<B>(&device()).err(), Some(error.clone()));
        assert!(
            error.to_string().contains(message),
            "{error} lacks {message}"
        );
        let panic = std::panic::catch_unwind(|| config.init::<B>(&device()))
            .expect_err("init must panic on an invalid config");
        let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(text.contains(message), "panic `{text}` lacks {message}");
    }
}

#[test]
fn wrong_shapes_are_errors_naming_the_tensor() {
    let config = NsaAttentionConfig::new()
        .with_compress_block(4)
        .with_compress_stride(2)
        .with_select_block(8);
    let good = || operator_input(&config, 20, |_| 0.0);
    assert!(try_nsa_attention(good(), &config).is_ok());

    let mut wrong_blocks = good();
    wrong_blocks.compressed.as_mut().unwrap().k = normal([1, 3, 1, 4]);
    let mut missing_blocks = good();
    missing_blocks.compressed = None;
    let mut wrong_dim = good();
    wrong_dim.window.v = normal([1, 20, 1, 5]);
    let mut wrong_gates = good();
    wrong_gates.gates = normal([1, 20, 2, 2]);
    let mut wrong_group = good();
    wrong_group.q = normal([1, 20, 3, 4]);
    wrong_group.gates = normal([1, 20, 3, 3]);
    wrong_group.selected.v = normal([1, 20, 2, 4]);
    for (input, tensor) in [
        (wrong_blocks, "compressed.k"),
        (missing_blocks, "compressed"),
        (wrong_dim, "window.v"),
        (wrong_gates, "gates"),
        (wrong_group, "q"),
    ] {
        match try_nsa_attention(input, &config) {
            Err(NsaError::Shape(error)) => {
                assert_eq!(error.tensor, tensor, "{error}");
                assert!(error.to_string().contains(tensor));
            }
            other => panic!("expected a shape error on {tensor}, got {other:?}"),
        }
    }
    let bad = config.with_select_block(7);
    assert!(matches!(
        try_nsa_attention(good(), &bad),
        Err(NsaError::Config(NsaConfigError::NotDivisible { .. }))
    ));
    let panic = std::panic::catch_unwind(|| {
        let mut input = good();
        input.gates = normal([1, 20, 2, 2]);
        nsa_attention(input, &config)
    })
    .expect_err("nsa_attention must panic on a bad shape");
    let text = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        text.contains("`gates`") && text.contains("[B, T, H, 3]"),
        "{text}"
    );
}

#[test]
#[should_panic(expected = "expected [B, T, d_model] with d_model = 24")]
fn forward_rejects_the_wrong_model_width() {
    small_config()
        .init::<B>(&device())
        .forward(normal([1, 5, 23]));
}
