//! The library against an independent naive NSA (`naive/model.rs`: per-query loops in `f64`,
//! written from `the project specification `shared/NSA.md``, sharing no code with `nsa_burn`).
//!
//! Every run draws fresh random weights and inputs on the Flex (CPU, f32) backend, seeded
//! from the system time; set `NSA_TEST_SEED=<u64>` to replay a run (each failure message
//! prints the seed). Each case checks:
//! - the selected blocks `[B, H_kv, T, n]` are identical (see [`reconcile`] for f32 near-ties);
//! - the output (and, for the layer, the gates) agree to `||a - b||_2 / ||b||_2 < 1e-5`,
//!   where a NaN anywhere is a failure.
//!
//! The layer tests take the weights out of the `Nsa` module through its public fields and
//! run the naive layer on the same `x`; the operator tests feed random projected heads,
//! compressed keys/values and gates to `nsa_attention` directly.

#[path = "naive/model.rs"]
mod model;

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use burn::backend::Flex;
use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor};
use model::{Array, AttentionInputs, Sparsity};
use nsa_burn::{
    nsa_attention, BranchKv, CompressorKind, KvSharing, Nsa, NsaAttentionConfig, NsaConfig,
    NsaInput,
};

/// Largest relative L2 error accepted.
const TOLERANCE: f64 = 1e-5;

/// Largest relative gap between the f64 scores of blocks that the library and the naive
/// selection disagree on, for the disagreement to count as an f32 rounding near-tie.
const TIE_TOLERANCE: f64 = 1e-5;

// ---------------------------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------------------------

/// Flex keeps one global RNG; tests run on parallel threads, so every seeded section
/// (seed, init, first read of each lazily initialised parameter, random inputs) holds this.
static RNG: Mutex<()> = Mutex::new(());

/// The run's base seed: `NSA_TEST_SEED`, else the system time.
fn base_seed() -> u64 {
    match std::env::var("NSA_TEST_SEED") {
        Ok(seed) => seed.trim().parse().expect("NSA_TEST_SEED must be a u64"),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock before 1970")
            .as_nanos() as u64,
    }
}

/// A per-case seed derived from the base seed and the case label (SplitMix64 finaliser over
/// an FNV-1a hash), so a replay with the same base seed reproduces every case.
fn case_seed(base: u64, label: &str) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for byte in label.bytes() {
        hash = (hash ^ byte as u64).wrapping_mul(0x100_0000_01b3);
    }
    let mut z = base ^ hash;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Runs `f` with the Flex RNG seeded with `seed`, exclusive of other tests' random draws.
fn seeded<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    let _guard = RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    Flex::seed(&Default::default(), seed);
    f()
}

// ---------------------------------------------------------------------------------------
// Reading tensors and weights into the naive model
// ---------------------------------------------------------------------------------------

fn to_array<const D: usize>(tensor: Tensor<Flex, D>) -> Array {
    let shape = tensor.dims().to_vec();
    let data = tensor.into_data().convert::<f64>().to_vec::<f64>().unwrap();
    Array::new(shape, data)
}

fn to_indices(tensor: Tensor<Flex, 4, Int>) -> Vec<i64> {
    tensor.into_data().convert::<i64>().to_vec::<i64>().unwrap()
}

fn param_vec<const D: usize>(param: &Param<Tensor<Flex, D>>) -> Vec<f64> {
    to_array(param.val()).data
}

fn to_linear(linear: &burn::nn::Linear<Flex>) -> model::Linear {
    let [d_in, d_out] = linear.weight.dims();
    model::Linear {
        d_in,
        d_out,
        weight: param_vec(&linear.weight),
        bias: linear.bias.as_ref().map(param_vec),
    }
}

fn to_compressor(compressor: &nsa_burn::Compressor<Flex>) -> Option<model::CompressorMlp> {
    compressor.mlp.as_ref().map(|mlp| model::CompressorMlp {
        position: param_vec(&mlp.position),
        hidden: to_linear(&mlp.hidden),
        output: to_linear(&mlp.output),
    })
}

/// Every weight of `nsa` (reading each parameter also forces its lazy initialisation).
fn to_layer(nsa: &Nsa<Flex>, config: &NsaConfig) -> model::Layer {
    model::Layer {
        n_heads: config.n_heads,
        n_kv_heads: config.n_kv_heads,
        d_k: config.d_k,
        d_v: config.d_v,
        query: to_linear(&nsa.query),
        kv: nsa
            .kv
            .iter()
            .map(|kv| (to_linear(&kv.key), to_linear(&kv.value)))
            .collect(),
        compress_key: to_compressor(&nsa.compress_key),
        compress_value: to_compressor(&nsa.compress_value),
        gate_hidden: nsa.gate.hidden.as_ref().map(to_linear),
        gate_output: to_linear(&nsa.gate.output),
        output: to_linear(&nsa.output),
    }
}

fn sparsity(config: &NsaAttentionConfig) -> Sparsity {
    Sparsity {
        l: config.compress_block,
        stride: config.compress_stride,
        l_sel: config.select_block,
        n: config.n_selected,
        n_initial: config.n_initial_blocks,
        n_local: config.n_local_blocks,
        window: config.window,
        scale: config.softmax_scale,
    }
}

// ---------------------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------------------

/// `||actual - expected||_2 / ||expected||_2`; NaN if either holds a NaN (or an infinity),
/// 0 when both are all zeros.
fn relative_error(actual: &Array, expected: &Array) -> f64 {
    assert_eq!(actual.shape, expected.shape, "shapes differ");
    if actual
        .data
        .iter()
        .chain(&expected.data)
        .any(|x| !x.is_finite())
    {
        return f64::NAN;
    }
    let diff: f64 = actual
        .data
        .iter()
        .zip(&expected.data)
        .map(|(a, b)| (a - b) * (a - b))
        .sum();
    let norm: f64 = expected.data.iter().map(|b| b * b).sum();
    if diff == 0.0 {
        0.0
    } else {
        (diff / norm).sqrt()
    }
}

/// Checks `error < TOLERANCE` (false for NaN); returns `error`.
fn within(what: &str, error: f64) -> Result<f64, String> {
    if error < TOLERANCE {
        Ok(error)
    } else {
        Err(format!(
            "{what}: relative L2 error {error:e} (limit {TOLERANCE:e})"
        ))
    }
}

/// Decides whether the library's selection `actual` for query `t` may stand in for the
/// naive one `expected` (both `[n]`, ascending, -1 padded).
///
/// They must be equal, except for an f32 near-tie: the library computes the block scores in
/// f32, so when two blocks' scores are within rounding of each other it may legitimately
/// pick the other one. That is accepted only when the library's list is well-formed
/// (ascending, distinct candidates, same count), it contains every forced block, and all
/// the blocks on which the two lists differ have f64 naive scores within `TIE_TOLERANCE`
/// (relative to the largest of them; plus 1e-30 absolute for f32 underflow) of each other.
/// The caller then uses the library's blocks for that query in the naive output, so the
/// query's output is still compared, given the library's (equally valid) choice.
fn reconcile(
    expected: &[i64],
    actual: &[i64],
    scores: &[f64],
    t: usize,
    sp: &Sparsity,
) -> Result<(), String> {
    if expected == actual {
        return Ok(());
    }
    let valid = |list: &[i64]| list.iter().copied().filter(|&j| j >= 0).collect::<Vec<_>>();
    let (want, got) = (valid(expected), valid(actual));
    let well_formed = got.len() == want.len()
        && actual[got.len()..].iter().all(|&j| j == -1)
        && got.windows(2).all(|w| w[0] < w[1])
        && got.iter().all(|&j| (j as usize) * sp.l_sel <= t);
    if !well_formed {
        return Err("malformed or wrong count".into());
    }
    let (want, got): (BTreeSet<i64>, BTreeSet<i64>) =
        (want.into_iter().collect(), got.into_iter().collect());
    if let Some(j) = want.difference(&got).find(|&&j| sp.forced(j as usize, t)) {
        return Err(format!("forced block {j} missing"));
    }
    let differing: Vec<f64> = want
        .symmetric_difference(&got)
        .map(|&j| scores[j as usize])
        .collect();
    let max = differing.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let min = differing.iter().cloned().fold(f64::INFINITY, f64::min);
    if max - min <= TIE_TOLERANCE * max.abs() + 1e-30 {
        Ok(())
    } else {
        Err(format!(
            "differing blocks' scores span [{min:e}, {max:e}], not a near-tie"
        ))
    }
}

/// Whether [`check_selection`] may accept f32 near-ties (see [`reconcile`]).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ties {
    /// Accept near-ties: the library's f32 scores may order nearly equal blocks differently.
    NearTiesAllowed,
    /// Demand identical selections: for inputs whose scores are exactly equal in every
    /// precision, so the spec's tie rule (lower index first) alone decides.
    Exact,
}

/// Compares the library's selection `[B, H_kv, T, n]` with the naive one and returns the
/// selection the naive output should use (the naive one, with accepted near-ties replaced
/// by the library's) and the number of near-ties, or an error listing the disagreements.
fn check_selection(
    inputs: &AttentionInputs,
    library: &[i64],
    sp: &Sparsity,
    ties_mode: Ties,
) -> Result<(Vec<i64>, usize), String> {
    let (batch, seq, _, kv_heads, _, _) = inputs.dims();
    let expected_len = batch * kv_heads * seq * sp.n;
    if library.len() != expected_len {
        return Err(format!(
            "selected_blocks has {} entries, expected B*H_kv*T*n = {expected_len}",
            library.len()
        ));
    }
    let scores = model::block_scores(inputs, sp);
    let mut resolved = Vec::with_capacity(expected_len);
    let (mut ties, mut errors) = (0, Vec::new());
    for b in 0..batch {
        for g in 0..kv_heads {
            for t in 0..seq {
                let row = scores.vec(&[b, g, t]);
                let expected = model::select(row, t, sp);
                let slot = ((b * kv_heads + g) * seq + t) * sp.n;
                let actual = &library[slot..slot + sp.n];
                let verdict = match ties_mode {
                    Ties::NearTiesAllowed => reconcile(&expected, actual, row, t, sp),
                    Ties::Exact if expected == actual => Ok(()),
                    Ties::Exact => Err("exact ties must go to the lower index".into()),
                };
                match verdict {
                    Ok(()) => {
                        ties += usize::from(expected != actual);
                        resolved.extend_from_slice(actual);
                    }
                    Err(why) => {
                        errors.push(format!(
                            "b={b} kv_head={g} t={t}: library {actual:?}, naive {expected:?} ({why}); \
                             naive scores {row:?}"
                        ));
                        resolved.extend_from_slice(&expected);
                    }
                }
            }
        }
    }
    if errors.is_empty() {
        Ok((resolved, ties))
    } else {
        let shown = errors.len().min(5);
        Err(format!(
            "{} queries select different blocks; first {shown}:\n  {}",
            errors.len(),
            errors[..shown].join("\n  ")
        ))
    }
}

/// What a passing case reports: its relative errors and the near-ties it accepted.
type CaseResult = Result<String, String>;

/// A labelled case, run with its seed.
type Case = (String, Box<dyn Fn(u64) -> CaseResult>);

/// Runs every case, prints a line per case and panics listing every failure.
fn run_cases(test: &str, cases: Vec<Case>) {
    let base = base_seed();
    let mut failures = Vec::new();
    for (label, case) in cases {
        let seed = case_seed(base, &label);
        match case(seed) {
            Ok(report) => println!("{test} / {label}: ok, {report}"),
            Err(why) => failures.push(format!("{label} (seed {seed}): {why}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{test}: {} case(s) failed (replay with NSA_TEST_SEED={base}):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// The layer against the naive layer
// ---------------------------------------------------------------------------------------

const D_MODEL: usize = 32;
const BATCH: usize = 2;

/// The small-block base configuration: `l = 8`, `d = 4`, `l' = 16`, `n = 4` (1 initial +
/// 2 local), `w = 24`, `d_k = 16 != d_v = 8`, MLP compressor, independent K/V.
fn base_config(heads: usize, kv_heads: usize) -> NsaConfig {
    NsaConfig::new(D_MODEL, heads, kv_heads, 16, 8)
        .with_compress_block(8)
        .with_compress_stride(4)
        .with_select_block(16)
        .with_n_selected(4)
        .with_n_initial_blocks(1)
        .with_n_local_blocks(2)
        .with_window(24)
}

/// One layer case: a fresh layer and `x: [BATCH, seq, d_model]`; the library's
/// `forward_detailed` against the naive layer on the extracted weights.
fn layer_case(config: &NsaConfig, seq: usize, seed: u64) -> CaseResult {
    let device = Default::default();
    let (nsa, layer, x) = seeded(seed, || {
        let nsa = config.init::<Flex>(&device);
        let layer = to_layer(&nsa, config);
        let x = Tensor::<Flex, 3>::random(
            [BATCH, seq, D_MODEL],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        (nsa, layer, x)
    });
    let projections = match config.kv_sharing {
        KvSharing::Independent => 3,
        KvSharing::Shared => 1,
    };
    if layer.kv.len() != projections {
        return Err(format!(
            "{:?} needs {projections} K/V projections, the layer has {}",
            config.kv_sharing,
            layer.kv.len()
        ));
    }
    let sp = sparsity(nsa.attention_config());
    let result = nsa.forward_detailed(x.clone());

    let x = to_array(x);
    let inputs = model::layer_inputs(&x, &layer, &sp);
    let gate_error = within(
        "gates",
        relative_error(&to_array(result.gates), &inputs.gates),
    )?;

    let selection = to_indices(result.selected_blocks);
    let (selection, ties) = check_selection(&inputs, &selection, &sp, Ties::NearTiesAllowed)?;
    let naive = model::output_projection(&model::attention(&inputs, &selection, &sp), &layer);
    let error = within(
        "layer output",
        relative_error(&to_array(result.output), &naive),
    )?;
    Ok(format!(
        "output error {error:.1e}, gate error {gate_error:.1e}, {ties} near-ties"
    ))
}

/// Layer cases for each `(label, config)` at each sequence length.
fn layer_cases(configs: Vec<(String, NsaConfig)>, seqs: &[usize]) -> Vec<Case> {
    let mut cases: Vec<Case> = Vec::new();
    for (label, config) in configs {
        for &seq in seqs {
            let config = config.clone();
            cases.push((
                format!("{label}, T={seq}"),
                Box::new(move |seed| layer_case(&config, seq, seed)),
            ));
        }
    }
    cases
}

/// Sequence lengths around every edge of the base config (`l - 1 = 7`, `l = 8`, `l + 1`,
/// `l' = 16`, `l' + 1`) and long enough for many candidate blocks (`T / l' = 6, 18`).
const SEQS: &[usize] = &[1, 7, 8, 9, 16, 17, 100, 300];

/// Base config at group sizes G = 1 (2/2 heads), 2 (4/2) and 16 (16/1).
#[test]
fn layer_group_sizes_and_lengths() {
    let configs = [(2, 2), (4, 2), (16, 1)]
        .into_iter()
        .map(|(h, h_kv)| (format!("H={h} H_kv={h_kv}"), base_config(h, h_kv)))
        .collect();
    run_cases("layer_group_sizes_and_lengths", layer_cases(configs, SEQS));
}

/// One option changed at a time from the base config (H = 4, H_kv = 2).
#[test]
fn layer_variants() {
    let base = || base_config(4, 2);
    let configs = vec![
        (
            "mean pooling".to_string(),
            base().with_compressor(CompressorKind::MeanPool),
        ),
        (
            "shared K/V".to_string(),
            base().with_kv_sharing(KvSharing::Shared),
        ),
        (
            "gate hidden 12".to_string(),
            base().with_gate_hidden(Some(12)),
        ),
        (
            "softmax scale 0.9".to_string(),
            base().with_softmax_scale(Some(0.9)),
        ),
        ("query chunk 7".to_string(), base().with_query_chunk(7)),
        (
            "compressor hidden 24".to_string(),
            base().with_compressor_hidden(Some(24)),
        ),
        (
            "2 initial + 1 local of n=5".to_string(),
            base()
                .with_n_selected(5)
                .with_n_initial_blocks(2)
                .with_n_local_blocks(1),
        ),
        (
            "no forced blocks".to_string(),
            base().with_n_initial_blocks(0).with_n_local_blocks(0),
        ),
        ("window 1".to_string(), base().with_window(1)),
        ("window 512 > T".to_string(), base().with_window(512)),
        (
            "l = d = l' = 16, mean pooling".to_string(),
            base()
                .with_compress_block(16)
                .with_compress_stride(16)
                .with_select_block(16)
                .with_compressor(CompressorKind::MeanPool),
        ),
        (
            "mean pooling, shared K/V, gate hidden, scale, chunk 7, G=16".to_string(),
            base_config(16, 1)
                .with_compressor(CompressorKind::MeanPool)
                .with_kv_sharing(KvSharing::Shared)
                .with_gate_hidden(Some(12))
                .with_softmax_scale(Some(0.4))
                .with_query_chunk(7),
        ),
    ];
    run_cases("layer_variants", layer_cases(configs, &[15, 16, 100, 300]));
}

// ---------------------------------------------------------------------------------------
// The attention operator against the naive operator
// ---------------------------------------------------------------------------------------

/// One test of the operator on random inputs.
#[derive(Debug, Clone)]
struct OperatorCase {
    label: &'static str,
    config: NsaAttentionConfig,
    batch: usize,
    seq: usize,
    heads: usize,
    kv_heads: usize,
    d_k: usize,
    d_v: usize,
    /// All compressed keys zero: every visible compressed block gets the same logit, so
    /// with `l = d = l'` and `G <= 2` every candidate's score is the same number in every
    /// precision and the selection must follow the tie rule exactly ([`Ties::Exact`]).
    zero_compressed_keys: bool,
}

impl OperatorCase {
    /// A case of `config` at these sizes, with random compressed keys.
    #[allow(clippy::too_many_arguments)]
    fn new(
        label: &'static str,
        config: NsaAttentionConfig,
        batch: usize,
        seq: usize,
        heads: usize,
        kv_heads: usize,
        d_k: usize,
        d_v: usize,
    ) -> Self {
        Self {
            label,
            config,
            batch,
            seq,
            heads,
            kv_heads,
            d_k,
            d_v,
            zero_compressed_keys: false,
        }
    }

    /// Random `q`, compressed and raw keys/values (standard normal) and gates (uniform in
    /// `[0, 1]`), fed to `nsa_attention` directly and to the naive operator.
    fn run(&self, seed: u64) -> CaseResult {
        let Self {
            config,
            batch,
            seq,
            heads,
            kv_heads,
            d_k,
            d_v,
            ..
        } = *self;
        let device = Default::default();
        let n_cmp = config.num_compressed_blocks(seq);
        let normal = Distribution::Normal(0.0, 1.0);
        let mut input = seeded(seed, || {
            let random = |shape: [usize; 4]| Tensor::<Flex, 4>::random(shape, normal, &device);
            let k_cmp = if self.zero_compressed_keys {
                Tensor::zeros([batch, n_cmp, kv_heads, d_k], &device)
            } else {
                random([batch, n_cmp, kv_heads, d_k])
            };
            NsaInput {
                q: random([batch, seq, heads, d_k]),
                compressed: Some(BranchKv {
                    k: k_cmp,
                    v: random([batch, n_cmp, kv_heads, d_v]),
                }),
                selected: BranchKv {
                    k: random([batch, seq, kv_heads, d_k]),
                    v: random([batch, seq, kv_heads, d_v]),
                },
                window: BranchKv {
                    k: random([batch, seq, kv_heads, d_k]),
                    v: random([batch, seq, kv_heads, d_v]),
                },
                gates: Tensor::random(
                    [batch, seq, heads, 3],
                    Distribution::Uniform(0.0, 1.0),
                    &device,
                ),
            }
        });
        let inputs = AttentionInputs {
            q: to_array(input.q.clone()),
            k_cmp: to_array(input.compressed.as_ref().expect("built above").k.clone()),
            v_cmp: to_array(input.compressed.as_ref().expect("built above").v.clone()),
            k_slc: to_array(input.selected.k.clone()),
            v_slc: to_array(input.selected.v.clone()),
            k_win: to_array(input.window.k.clone()),
            v_win: to_array(input.window.v.clone()),
            gates: to_array(input.gates.clone()),
        };
        // The operator takes `None` when no compression block exists (T < l).
        if n_cmp == 0 {
            input.compressed = None;
        }
        let sp = sparsity(&config);
        let result = nsa_attention(input, &config);
        let ties_mode = if self.zero_compressed_keys {
            Ties::Exact
        } else {
            Ties::NearTiesAllowed
        };
        let selection = to_indices(result.selected_blocks);
        let (selection, ties) = check_selection(&inputs, &selection, &sp, ties_mode)?;
        let naive = model::attention(&inputs, &selection, &sp);
        let error = within(
            "attention output",
            relative_error(&to_array(result.output), &naive),
        )?;
        Ok(format!("output error {error:.1e}, {ties} near-ties"))
    }
}

#[test]
fn operator_matches_naive() {
    let small = NsaAttentionConfig::new()
        .with_compress_block(8)
        .with_compress_stride(4)
        .with_select_block(16)
        .with_n_selected(4)
        .with_window(24);
    let equal_blocks = small.with_compress_block(16).with_compress_stride(16);
    let cases = vec![
        OperatorCase::new("small blocks, G=2", small, 2, 300, 4, 2, 16, 8),
        OperatorCase::new("small blocks, G=1", small, 2, 9, 2, 2, 16, 8),
        OperatorCase::new("small blocks, G=16", small, 1, 200, 16, 1, 8, 12),
        // ceil(40 / 16) = 3 blocks exist, n = 4: every query takes all its candidates.
        OperatorCase::new("fewer blocks than n (3 < 4)", small, 2, 40, 4, 2, 16, 8),
        // 7 blocks < n = 8 even at the last query.
        OperatorCase::new(
            "fewer blocks than n (7 < 8)",
            small.with_n_selected(8),
            2,
            100,
            4,
            2,
            16,
            8,
        ),
        // T < l: no compressed block at all, N_cmp = 0.
        OperatorCase::new("no compressed blocks", small, 2, 5, 4, 2, 16, 8),
        OperatorCase::new("l = d = l' = 16", equal_blocks, 2, 200, 4, 2, 16, 8),
        OperatorCase::new(
            "scale 0.8, chunk 5, n=6 with 2+3 forced",
            small
                .with_softmax_scale(Some(0.8))
                .with_query_chunk(5)
                .with_n_selected(6)
                .with_n_initial_blocks(2)
                .with_n_local_blocks(3),
            2,
            257,
            4,
            2,
            16,
            8,
        ),
        OperatorCase::new(
            "paper's l=32 d=16 l'=64, n=4, w=100",
            small
                .with_compress_block(32)
                .with_compress_stride(16)
                .with_select_block(64)
                .with_window(100),
            1,
            600,
            4,
            1,
            16,
            16,
        ),
        // Exact ties: one free slot (n = 4, 1 + 2 forced) among equally scored blocks must go
        // to the lowest free index, block 1.
        OperatorCase {
            zero_compressed_keys: true,
            ..OperatorCase::new(
                "exact ties, l = d = l', G=2",
                equal_blocks,
                2,
                150,
                4,
                2,
                16,
                8,
            )
        },
        OperatorCase {
            zero_compressed_keys: true,
            ..OperatorCase::new(
                "exact ties, no forced blocks, G=1",
                equal_blocks.with_n_initial_blocks(0).with_n_local_blocks(0),
                1,
                150,
                2,
                2,
                16,
                8,
            )
        },
    ];
    let cases = cases
        .into_iter()
        .map(|case| {
            let label = format!(
                "{}: B={} T={} H={} H_kv={} d_k={} d_v={}",
                case.label, case.batch, case.seq, case.heads, case.kv_heads, case.d_k, case.d_v
            );
            let run: Box<dyn Fn(u64) -> CaseResult> = Box::new(move |seed| case.run(seed));
            (label, run)
        })
        .collect();
    run_cases("operator_matches_naive", cases);
}

/// [`reconcile`] itself: it accepts only well-formed near-ties that keep the forced blocks.
#[test]
fn reconcile_accepts_only_near_ties() {
    let sp = Sparsity {
        l: 8,
        stride: 4,
        l_sel: 16,
        n: 4,
        n_initial: 1,
        n_local: 2,
        window: 24,
        scale: None,
    };
    // t = 100: candidates 0..=6, forced 0, 5, 6; one free slot.
    let t = 100;
    let scores = [0.5, 0.2, 0.3, 0.3 * (1.0 - 1e-7), 0.1, 0.6, 0.7];
    let expected = model::select(&scores, t, &sp);
    assert_eq!(expected, vec![0, 2, 5, 6]);
    assert!(reconcile(&expected, &[0, 2, 5, 6], &scores, t, &sp).is_ok());
    // Block 3 scores within 1e-7 of block 2: an f32 near-tie.
    assert!(reconcile(&expected, &[0, 3, 5, 6], &scores, t, &sp).is_ok());
    // Block 1 scores 0.2 against 0.3: a real error.
    assert!(reconcile(&expected, &[0, 1, 5, 6], &scores, t, &sp).is_err());
    // A forced block dropped, a wrong count, a non-candidate, unsorted.
    assert!(reconcile(&expected, &[0, 2, 3, 6], &scores, t, &sp).is_err());
    assert!(reconcile(&expected, &[0, 5, 6, -1], &scores, t, &sp).is_err());
    assert!(reconcile(&expected, &[0, 2, 5, 7], &scores, t, &sp).is_err());
    assert!(reconcile(&expected, &[2, 0, 5, 6], &scores, t, &sp).is_err());
}

/// The naive `erf` against known values, so the naive GELU can be trusted.
#[test]
fn naive_erf_is_accurate() {
    for (x, expected) in [
        (0.0, 0.0),
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (2.0, 0.995_322_265_018_952_7),
        (2.5, 0.999_593_047_982_555),
        (3.0, 0.999_977_909_503_001_4),
        (-1.5, -0.966_105_146_475_310_7),
    ] {
        let got = model::erf(x);
        assert!(
            (got - expected).abs() < 1e-13,
            "erf({x}) = {got}, expected {expected}"
        );
    }
}
