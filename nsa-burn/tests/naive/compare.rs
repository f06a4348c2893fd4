//! Comparing the library with the naive model: relative errors, and selections that may
//! differ only on f32 near-ties.

use std::collections::BTreeSet;

use crate::model::{self, Array, AttentionInputs, Sparsity};

/// Largest relative L2 error accepted.
pub const TOLERANCE: f64 = 1e-5;

/// Largest relative gap between the f64 scores of blocks that the library and the naive
/// selection disagree on, for the disagreement to count as an f32 rounding near-tie.
pub const TIE_TOLERANCE: f64 = 1e-5;

/// `||actual - expected||_2 / ||expected||_2`; NaN if either holds a NaN (or an infinity),
/// 0 when both are all zeros.
pub fn relative_error(actual: &Array, expected: &Array) -> f64 {
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
pub fn within(what: &str, error: f64) -> Result<f64, String> {
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
pub fn reconcile(
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
pub enum Ties {
    /// Accept near-ties: the library's f32 scores may order nearly equal blocks differently.
    NearTiesAllowed,
    /// Demand identical selections: for inputs whose scores are exactly equal in every
    /// precision, so the documented tie rule (lower index first) alone decides.
    Exact,
}

/// Compares the library's selection `[B, H_kv, T, n]` with the naive one and returns the
/// selection the naive output should use (the naive one, with accepted near-ties replaced
/// by the library's) and the number of near-ties, or an error listing the disagreements.
pub fn check_selection(
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
