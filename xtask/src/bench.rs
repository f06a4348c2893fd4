//! `cargo xtask bench`: runs the `nsa-bench` binary (`benches/`) once per (backend, dtype,
//! phase) of the matrix and collects its tables.
//!
//! Each run prints one row per sequence length: per-branch times and the whole operator's
//! (forward: compressed + top-n, selected, window, NSA forward total; backward: the backward
//! kernels per branch and the operator's forward + backward under autodiff). Every number
//! is a median of synchronized runs (`--reps`, after `--warmup`). The dense baseline
//! (FlashAttention-2) and fla's Triton NSA are not in this matrix: they come from the
//! Python anchors, side by side with ours, in `benches/gpu_compare.sh`. Token-by-token
//! decoding is not measured: the layer has no decode path yet.

use std::path::PathBuf;
use std::process::Command;

use serde::Serialize;

use crate::report;

/// The matrix and where its results go.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Backends: cuda, wgpu.
    #[arg(long, num_args = 1.., default_values = ["cuda"])]
    pub backends: Vec<String>,
    /// Element types: f32, f16, bf16.
    #[arg(long, num_args = 1.., default_values = ["bf16"])]
    pub dtypes: Vec<String>,
    /// Sequence lengths.
    #[arg(long, num_args = 1.., default_values_t = [8192usize, 16384, 32768, 65536])]
    pub seq_lens: Vec<usize>,
    /// Phases: forward, backward.
    #[arg(long, num_args = 1.., default_values = ["forward", "backward"])]
    pub phases: Vec<String>,
    /// Untimed runs before timing (the first compiles the kernels).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed runs; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Folder for `bench.json`, `bench.csv` and the plots.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// A prebuilt `nsa-bench` binary (for a machine without cargo, e.g. the GPU machine);
    /// without it the task builds one with the backends' features.
    #[arg(long)]
    pub bench_bin: Option<PathBuf>,
}

/// One number of the matrix.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub backend: String,
    pub dtype: String,
    pub phase: String,
    pub seq_len: usize,
    /// The table column, e.g. `selected` or `NSA forward total`.
    pub series: String,
    /// Median time in milliseconds.
    pub ms: f64,
}

pub fn run(args: &BenchArgs) -> Result<(), String> {
    for (what, values, allowed) in [
        ("backend", &args.backends, &["cuda", "wgpu"][..]),
        ("dtype", &args.dtypes, &["f32", "f16", "bf16"][..]),
        ("phase", &args.phases, &["forward", "backward"][..]),
    ] {
        if let Some(bad) = values.iter().find(|v| !allowed.contains(&v.as_str())) {
            return Err(format!("--{what}s: `{bad}` is not one of {allowed:?}"));
        }
    }
    let bin = match &args.bench_bin {
        Some(bin) => bin.clone(),
        None => build_bench(&args.backends)?,
    };
    let mut results = Vec::new();
    for backend in &args.backends {
        for dtype in &args.dtypes {
            for phase in &args.phases {
                eprintln!("cargo xtask bench: {backend} {dtype} {phase}");
                let table = run_bench(&bin, args, backend, dtype, phase)?;
                results.extend(parse_table(&table, backend, dtype, phase)?);
            }
        }
    }
    report::write_all(&args.out, &results)?;
    eprintln!(
        "cargo xtask bench: {} numbers in {}",
        results.len(),
        args.out.display()
    );
    Ok(())
}

/// Builds `nsa-bench` with the features of `backends` and returns its path.
fn build_bench(backends: &[String]) -> Result<PathBuf, String> {
    let features = backends.join(",");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "-p",
            "nsa-benches",
            "--no-default-features",
            "--features",
        ])
        .arg(&features)
        .status()
        .map_err(|e| format!("cannot run cargo to build nsa-bench: {e}"))?;
    if !status.success() {
        return Err(format!(
            "building nsa-bench with features `{features}` failed"
        ));
    }
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    Ok(PathBuf::from(target).join("debug").join("nsa-bench"))
}

/// Runs one (backend, dtype, phase) of the matrix and returns its standard output.
fn run_bench(
    bin: &PathBuf,
    args: &BenchArgs,
    backend: &str,
    dtype: &str,
    phase: &str,
) -> Result<String, String> {
    let output = Command::new(bin)
        .args(["--backend", backend, "--dtype", dtype, "--phase", phase])
        .args([
            "--warmup",
            &args.warmup.to_string(),
            "--reps",
            &args.reps.to_string(),
        ])
        .arg("--seq-lens")
        .args(args.seq_lens.iter().map(usize::to_string))
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
        return Err(format!(
            "{} failed for {backend} {dtype} {phase}:\n{}",
            bin.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The rows of `nsa-bench`'s markdown table: a header `| T | <series> (ms) | ...`, a rule,
/// then one row per sequence length.
fn parse_table(
    table: &str,
    backend: &str,
    dtype: &str,
    phase: &str,
) -> Result<Vec<Measurement>, String> {
    let cells = |line: &str| -> Vec<String> {
        line.trim()
            .trim_matches('|')
            .split('|')
            .map(|cell| cell.trim().to_string())
            .collect()
    };
    let mut lines = table.lines().filter(|line| line.starts_with('|'));
    let header = lines
        .next()
        .ok_or_else(|| format!("nsa-bench printed no table for {backend} {dtype} {phase}"))?;
    let series: Vec<String> = cells(header)
        .into_iter()
        .skip(1)
        .map(|name| name.trim_end_matches("(ms)").trim().to_string())
        .collect();
    let mut results = Vec::new();
    for line in lines.filter(|line| !line.starts_with("|-")) {
        let row = cells(line);
        let seq_len = row[0]
            .parse()
            .map_err(|_| format!("unexpected row from nsa-bench: {line}"))?;
        for (name, cell) in series.iter().zip(&row[1..]) {
            let ms = cell
                .parse()
                .map_err(|_| format!("unexpected number `{cell}` from nsa-bench: {line}"))?;
            results.push(Measurement {
                backend: backend.to_string(),
                dtype: dtype.to_string(),
                phase: phase.to_string(),
                seq_len,
                series: name.clone(),
                ms,
            });
        }
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_bench_table() {
        let table = "\
| T | compressed + top-n (ms) | selected (ms) | window (ms) | NSA forward total (ms) |
|---|---|---|---|---|
| 8192 | 1.41 | 3.36 | 0.99 | 6.63 |
| 16384 | 3.66 | 6.77 | 1.84 | 14.34 |
";
        let rows = parse_table(table, "cuda", "bf16", "forward").unwrap();
        assert_eq!(rows.len(), 8);
        assert_eq!(rows[1].series, "selected");
        assert_eq!(rows[1].seq_len, 8192);
        assert_eq!(rows[1].ms, 3.36);
        assert_eq!(rows[7].series, "NSA forward total");
        assert_eq!(rows[7].seq_len, 16384);
    }

    #[test]
    fn a_table_without_rows_is_an_error_only_without_a_header() {
        assert!(parse_table("no table", "cuda", "bf16", "forward").is_err());
        let header_only = "| T | selected (ms) |\n|---|---|\n";
        assert!(parse_table(header_only, "cuda", "bf16", "forward")
            .unwrap()
            .is_empty());
    }
}
