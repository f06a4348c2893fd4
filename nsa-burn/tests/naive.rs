//! The library against an independent naive NSA (`naive/model/`: per-query loops in `f64`,
//! following the algorithm as documented in `docs/algorithm.md`, sharing no code with
//! `nsa_burn`).
//!
//! Every run draws fresh random weights and inputs on the Flex (CPU, f32) backend, seeded
//! from the system time; set `NSA_TEST_SEED=<u64>` to replay a run (each failure message
//! prints the seed). Each case checks:
//! - the selected blocks `[B, H_kv, T, n]` are identical (see [`compare::reconcile`] for f32
//!   near-ties);
//! - the output (and, for the layer, the gates) agree to `||a - b||_2 / ||b||_2 < 1e-5`,
//!   where a NaN anywhere is a failure.
//!
//! The layer tests take the weights out of the `Nsa` module through its public fields and
//! run the naive layer on the same `x`; the operator tests feed random projected heads,
//! compressed keys/values and gates to `nsa_attention` directly.
//!
//! Files: `naive/model/` (the naive NSA), `naive/runner.rs` (seeds, running labelled
//! cases), `naive/convert.rs` (tensors and weights into the naive model),
//! `naive/compare.rs` (errors and selections), `naive/layer_case.rs` and
//! `naive/operator_case.rs` (one case of each kind); the tests are here.

#[path = "naive/compare.rs"]
mod compare;
#[path = "naive/convert.rs"]
mod convert;
#[path = "naive/layer_case.rs"]
mod layer_case;
#[path = "naive/model/mod.rs"]
mod model;
#[path = "naive/operator_case.rs"]
mod operator_case;
#[path = "naive/runner.rs"]
mod runner;

use compare::reconcile;
use layer_case::{base_config, layer_cases, SEQS};
use model::Sparsity;
use nsa_burn::{CompressorKind, KvSharing, NsaAttentionConfig};
use operator_case::OperatorCase;
use runner::{run_cases, CaseResult};

// ---------------------------------------------------------------------------------------
// The layer against the naive layer
// ---------------------------------------------------------------------------------------

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
