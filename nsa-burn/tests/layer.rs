//! Behaviour of the NSA layer on burn-flex: causality, the selection rules, gradients
//! against finite differences, and every configuration and shape error.
//! (The comparison with an independent naive implementation lives in `naive.rs`.)

use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Distribution, Int, Tensor, TensorData};
use nsa_burn::*;

type B = Flex;
type AD = Autodiff<Flex>;

fn device() -> <B as burn::tensor::backend::BackendTypes>::Device {
    Default::default()
}

fn normal<const D: usize>(shape: [usize; D]) -> Tensor<B, D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device())
}

fn values(tensor: Tensor<B, 3>) -> Vec<f64> {
    tensor.into_data().convert::<f64>().to_vec().unwrap()
}

fn indices(tensor: Tensor<B, 4, Int>) -> (Vec<i64>, [usize; 4]) {
    let dims = tensor.dims();
    (tensor.into_data().convert::<i64>().to_vec().unwrap(), dims)
}

/// Small blocks so a short sequence exercises every branch: l = 8, d = 4, l' = 16,
/// n = 4 (1 initial + 2 local forced), w = 24.
fn small_config() -> NsaConfig {
    NsaConfig::new(24, 4, 2, 8, 6)
        .with_compress_block(8)
        .with_compress_stride(4)
        .with_select_block(16)
        .with_n_selected(4)
        .with_window(24)
        .with_query_chunk(16)
}

#[test]
fn causal_no_output_depends_on_a_later_position() {
    let seq = 100;
    let nsa = small_config().init::<B>(&device());
    let x = normal([1, seq, 24]);
    let base = values(nsa.forward(x.clone()));
    for changed in [0, 1, 37, 64, 99] {
        let bump = Tensor::<B, 1>::from_floats([5.0], &device())
            .reshape([1, 1, 1])
            .expand([1, 1, 24]);
        let x2 = x.clone().slice_assign(
            [0..1, changed..changed + 1, 0..24],
            x.clone().slice([0..1, changed..changed + 1, 0..24]) + bump,
        );
        let out = values(nsa.forward(x2));
        for t in 0..seq {
            let row = t * 24..(t + 1) * 24;
            let diff = base[row.clone()]
                .iter()
                .zip(&out[row])
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            if t < changed {
                assert!(
                    diff <= 1e-6,
                    "output at t={t} moved by {diff} when x[{changed}] changed"
                );
            } else if t == changed {
                assert!(diff > 0.0, "output at t={t} ignores its own input");
            }
        }
    }
}

/// Operator inputs with chosen compressed keys: `boost[i]` is added along the all-ones
/// direction of compressed key `i`, and all queries are all-ones, so `boost` orders the
/// compressed-attention scores.
fn operator_input(
    config: &NsaAttentionConfig,
    seq: usize,
    boost: impl Fn(usize) -> f32,
) -> NsaInput<B> {
    let (heads, kv_heads, dim) = (2, 1, 4);
    let blocks = config.num_compressed_blocks(seq);
    let kv = |len| BranchKv {
        k: normal([1, len, kv_heads, dim]),
        v: normal([1, len, kv_heads, dim]),
    };
    let compressed = (blocks > 0).then(|| {
        let boosts: Vec<f32> = (0..blocks).map(&boost).collect();
        BranchKv {
            k: Tensor::<B, 1>::from_floats(boosts.as_slice(), &device())
                .reshape([1, blocks, 1, 1])
                .expand([1, blocks, kv_heads, dim]),
            v: normal([1, blocks, kv_heads, dim]),
        }
    });
    NsaInput {
        q: Tensor::ones([1, seq, heads, dim], &device()),
        compressed,
        selected: kv(seq),
        window: kv(seq),
        gates: Tensor::ones([1, seq, heads, 3], &device()),
    }
}

fn selection(
    config: &NsaAttentionConfig,
    seq: usize,
    boost: impl Fn(usize) -> f32,
) -> Vec<Vec<i64>> {
    let out = nsa_attention(operator_input(config, seq, boost), config);
    let (flat, [_, _, t, n]) = indices(out.selected_blocks);
    (0..t).map(|t| flat[t * n..(t + 1) * n].to_vec()).collect()
}

#[test]
fn forced_blocks_are_always_selected_and_top_scores_fill_the_rest() {
    // l = d = 4, l' = 8: compression block 2j and 2j+1 lie inside selection block j.
    let config = NsaAttentionConfig::new()
        .with_compress_block(4)
        .with_compress_stride(4)
        .with_select_block(8)
        .with_n_selected(5)
        .with_query_chunk(7);
    // Compression blocks of selection blocks 3 and 6 score far above all others, and block 3
    // above block 6.
    let picks = selection(&config, 96, |i| match i / 2 {
        3 => 20.0,
        6 => 10.0,
        _ => 0.0,
    });
    for (t, picked) in picks.iter().enumerate() {
        let own = (t / 8) as i64;
        let mut expected: Vec<i64> = vec![0];
        expected.extend((own - 1).max(1)..=own);
        // Blocks 3 and 6 once they are visible (their first compression block has ended)
        // and not already forced.
        for (block, first_cmp_end) in [(3i64, 3 * 8 + 3), (6, 6 * 8 + 3)] {
            if t >= first_cmp_end && !expected.contains(&block) {
                expected.push(block);
            }
        }
        expected.sort();
        let chosen: Vec<i64> = picked.iter().copied().filter(|&j| j >= 0).collect();
        // Any slot left over goes to a tied zero-boost block; only inclusion is checked.
        for block in &expected {
            assert!(
                chosen.contains(block),
                "t={t}: {block} missing from {chosen:?}"
            );
        }
        assert!(
            chosen.windows(2).all(|w| w[0] < w[1]),
            "t={t}: not ascending {picked:?}"
        );
        assert!(
            chosen.iter().all(|&j| j <= own),
            "t={t}: future block in {picked:?}"
        );
    }
}

#[test]
fn ties_break_toward_the_lower_block_index() {
    // All compressed keys equal: every visible selection block scores the same.
    let config = NsaAttentionConfig::new()
        .with_compress_block(4)
        .with_compress_stride(4)
        .with_select_block(4)
        .with_n_selected(4)
        .with_n_local_blocks(1)
        .with_query_chunk(16);
    let picks = selection(&config, 64, |_| 0.0);
    for (t, picked) in picks.iter().enumerate() {
        let own = (t / 4) as i64;
        let expected: Vec<i64> = if own < 4 {
            (0..=own).chain(std::iter::repeat(-1)).take(4).collect()
        } else {
            // Forced 0 and own, then the two lowest tied blocks 1 and 2.
            vec![0, 1, 2, own]
        };
        assert_eq!(picked, &expected, "t={t}");
    }
}

#[test]
fn fewer_blocks_than_n_takes_all_and_pads() {
    let config = NsaAttentionConfig::new()
        .with_compress_block(4)
        .with_compress_stride(2)
        .with_select_block(8)
        .with_n_selected(6)
        .with_query_chunk(5);
    let picks = selection(&config, 30, |i| i as f32);
    for (t, picked) in picks.iter().enumerate() {
        let own = (t / 8) as i64;
        let expected: Vec<i64> = (0..=own).chain(std::iter::repeat(-1)).take(6).collect();
        assert_eq!(picked, &expected, "t={t}");
    }
}

#[test]
fn queries_that_see_no_compressed_block_get_exactly_zero() {
    let config = NsaAttentionConfig::new()
        .with_compress_block(8)
        .with_compress_stride(4)
        .with_select_block(8)
        .with_n_selected(3)
        .with_query_chunk(3);
    for seq in [1, 5, 7, 8, 20] {
        let mut input = operator_input(&config, seq, |i| i as f32);
        input.q = normal([1, seq, 2, 4]);
        // Only the compression branch.
        let gates = Tensor::<B, 1>::from_floats([1.0, 0.0, 0.0], &device());
        input.gates = gates.reshape([1, 1, 1, 3]).expand([1, seq, 2, 3]);
        let out = nsa_attention(input, &config).output;
        let flat: Vec<f64> = out.into_data().convert::<f64>().to_vec().unwrap();
        assert!(
            flat.iter().all(|x| x.is_finite()),
            "T={seq}: non-finite output"
        );
        for t in 0..seq {
            let row = &flat[t * 8..(t + 1) * 8];
            if t < 7 {
                assert!(
                    row.iter().all(|&x| x == 0.0),
                    "T={seq} t={t}: {row:?} should be 0"
                );
            } else {
                assert!(row.iter().any(|&x| x != 0.0), "T={seq} t={t}: sees block 0");
            }
        }
    }
}

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
#[should_panic(expected = "x must be [batch, T, d_model] with d_model = 24")]
fn forward_rejects_the_wrong_model_width() {
    small_config()
        .init::<B>(&device())
        .forward(normal([1, 5, 23]));
}

/// Casts every float parameter to f64 (as a fresh leaf that requires a gradient).
struct ToF64;

impl<Bk: AutodiffBackend> ModuleMapper<Bk> for ToF64 {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<Bk, D>>) -> Param<Tensor<Bk, D>> {
        param.map(|t| t.cast(DType::F64).detach().require_grad())
    }
}

/// For every parameter: its id, a random direction `u` and the directional derivative
/// `<grad, u>` of the loss.
struct DirectionalGradients<'a> {
    grads: &'a <AD as AutodiffBackend>::Gradients,
    found: Vec<(ParamId, TensorData, f64)>,
}

impl ModuleVisitor<AD> for DirectionalGradients<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
        let grad = param
            .val()
            .grad(self.grads)
            .expect("every parameter gets a gradient");
        let direction = grad.random_like(Distribution::Normal(0.0, 1.0));
        let derivative = scalar((grad * direction.clone()).sum());
        self.found
            .push((param.id, direction.into_data(), derivative));
    }
}

/// Adds `step * direction` to the parameter `target`.
struct Perturb<'a> {
    target: ParamId,
    direction: &'a TensorData,
    step: f64,
}

impl ModuleMapper<B> for Perturb<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let tensor = if id == self.target {
            let direction =
                Tensor::<B, D>::from_data(self.direction.clone(), (&tensor.device(), DType::F64));
            tensor + direction.mul_scalar(self.step)
        } else {
            tensor
        };
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// The value of a one-element tensor at full precision (`into_scalar` gives the backend's
/// default element type, f32 on Flex).
fn scalar(tensor: Tensor<B, 1>) -> f64 {
    tensor
        .into_data()
        .iter::<f64>()
        .next()
        .expect("one element")
}

/// Whether an autodiff derivative matches a central difference: relative error below 1e-5,
/// with an absolute floor of 1e-7 for the difference's round-off (key biases, for one, have
/// an exactly zero gradient: softmax ignores a shift shared by a row).
fn derivatives_agree(analytic: f64, numeric: f64) -> bool {
    (analytic - numeric).abs() <= 1e-5 * numeric.abs() + 1e-7
}

#[test]
fn gradients_match_finite_differences_for_the_input_and_every_parameter() {
    // Tiny f64 layer with every optional part: MLP compressor, gate hidden layer,
    // independent K/V, T not a multiple of any block, batch 2, chunk not dividing T.
    let config = NsaConfig::new(8, 4, 2, 6, 4)
        .with_compress_block(4)
        .with_compress_stride(2)
        .with_select_block(8)
        .with_n_selected(4)
        .with_window(6)
        .with_compressor_hidden(Some(5))
        .with_gate_hidden(Some(3))
        .with_query_chunk(5);
    // T = 41: six selection blocks for n = 4, so top-n really chooses.
    let (batch, seq) = (2, 41);
    let f64_dev = (&device(), DType::F64);
    let nsa = config.init::<AD>(&device()).map(&mut ToF64);
    let x = Tensor::<B, 3>::random([batch, seq, 8], Distribution::Normal(0.0, 1.0), f64_dev);
    let weights = Tensor::<B, 3>::random([batch, seq, 8], Distribution::Normal(0.0, 1.0), f64_dev);
    let loss = |module: &Nsa<B>, x: Tensor<B, 3>| -> f64 {
        scalar((module.forward(x) * weights.clone()).sum())
    };

    let x_ad = Tensor::<AD, 3>::from_inner(x.clone()).require_grad();
    let out = nsa.forward(x_ad.clone());
    let grads = (out * Tensor::from_inner(weights.clone())).sum().backward();
    let mut visitor = DirectionalGradients {
        grads: &grads,
        found: Vec::new(),
    };
    nsa.visit(&mut visitor);
    let params = visitor.found;
    assert!(
        params.len() >= 20,
        "expected every parameter, found {}",
        params.len()
    );

    let inner = nsa.valid();
    let step = 1e-6;
    for (id, direction, analytic) in &params {
        let shifted = |sign: f64| {
            let module = inner.clone().map(&mut Perturb {
                target: *id,
                direction,
                step: sign * step,
            });
            loss(&module, x.clone())
        };
        let numeric = (shifted(1.0) - shifted(-1.0)) / (2.0 * step);
        assert!(
            derivatives_agree(*analytic, numeric),
            "parameter {id}: autodiff {analytic}, finite differences {numeric}"
        );
    }

    let x_grad = x_ad.grad(&grads).expect("input gradient");
    let direction = x_grad.random_like(Distribution::Normal(0.0, 1.0));
    let analytic = scalar((x_grad * direction.clone()).sum());
    let numeric = (loss(&inner, x.clone() + direction.clone().mul_scalar(step))
        - loss(&inner, x - direction.mul_scalar(step)))
        / (2.0 * step);
    assert!(
        derivatives_agree(analytic, numeric),
        "input: autodiff {analytic}, finite differences {numeric}"
    );
}

#[test]
fn backward_runs_through_autodiff_flex_in_f32() {
    let nsa = small_config().init::<AD>(&device());
    // T = 100: seven selection blocks for n = 4, so top-n runs under autodiff.
    let x = Tensor::<AD, 3>::random([2, 100, 24], Distribution::Normal(0.0, 1.0), &device())
        .require_grad();
    let grads = nsa.forward(x.clone()).powi_scalar(2).mean().backward();
    let grad = x.grad(&grads).expect("input gradient");
    let grad: Vec<f32> = grad.into_data().to_vec().unwrap();
    assert!(grad.iter().all(|g| g.is_finite()));
    assert!(grad.iter().any(|&g| g != 0.0));
}
