//! `cargo xtask bench`: builds the `nsa-bench` binary (`benches/`) in release mode, runs it
//! once per (backend, dtype, phase) of the matrix and collects the JSON each run writes
//! (`nsa-bench --json`).
//!
//! Each run measures every sequence length: per-branch times and the whole operator's
//! (forward: compressed + top-n, selected, window, NSA forward total; backward: the backward
//! kernels per branch and the operator's forward + backward under autodiff). Every number
//! is a median of synchronized runs (`--reps`, after `--warmup`). The dense baseline
//! (FlashAttention-2) and fla's Triton NSA are not in this matrix: they come from the
//! Python anchors, side by side with ours, in `benches/gpu_compare.sh`. Token-by-token
//! decoding is not measured: the layer has no decode path yet.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

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
    /// Phases: forward, backward, decode (one decoding step after a context of each length;
    /// see `nsa-bench --phase decode`), packed-forward, packed-backward.
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
    /// without it the task builds one in release mode with the backends' features.
    #[arg(long)]
    pub bench_bin: Option<PathBuf>,
}

/// What `nsa-bench --json` writes, as far as the matrix needs it.
#[derive(Debug, Deserialize)]
struct BenchReport {
    backend: String,
    dtype: String,
    phase: String,
    results: Vec<BenchResult>,
}

/// One number of an `nsa-bench` run.
#[derive(Debug, Deserialize)]
struct BenchResult {
    seq_len: usize,
    series: String,
    ms: f64,
}

impl BenchReport {
    /// The run's numbers as measurements of the matrix.
    fn into_measurements(self) -> impl Iterator<Item = Measurement> {
        self.results.into_iter().map(move |result| Measurement {
            backend: self.backend.clone(),
            dtype: self.dtype.clone(),
            phase: self.phase.clone(),
            seq_len: result.seq_len,
            series: result.series,
            ms: result.ms,
        })
    }
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
        (
            "phase",
            &args.phases,
            &[
                "forward",
                "backward",
                "decode",
                "packed-forward",
                "packed-backward",
            ][..],
        ),
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
                let run = BenchRun {
                    backend,
                    dtype,
                    phase,
                };
                results.extend(run.execute(&bin, args)?.into_measurements());
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

/// The workspace's root folder (this crate's parent).
fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lies in the workspace")
}

/// Builds `nsa-bench` in release mode with the features of `backends` and returns its path.
fn build_bench(backends: &[String]) -> Result<PathBuf, String> {
    let features = backends.join(",");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .args([
            "build",
            "--release",
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
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    Ok(target.join("release").join("nsa-bench"))
}

/// One (backend, dtype, phase) of the matrix.
struct BenchRun<'a> {
    backend: &'a str,
    dtype: &'a str,
    phase: &'a str,
}

impl BenchRun<'_> {
    /// Runs `bin` on this part of the matrix and reads the JSON it writes.
    fn execute(&self, bin: &Path, args: &BenchArgs) -> Result<BenchReport, String> {
        let BenchRun {
            backend,
            dtype,
            phase,
        } = *self;
        let json = std::env::temp_dir().join(format!(
            "nsa-bench-{}-{backend}-{dtype}-{phase}.json",
            std::process::id()
        ));
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
            .arg("--json")
            .arg(&json)
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
        let text = std::fs::read_to_string(&json)
            .map_err(|e| format!("cannot read {}: {e}", json.display()))?;
        // The numbers are read: the file is of no further use.
        let _ = std::fs::remove_file(&json);
        serde_json::from_str(&text)
            .map_err(|e| format!("unexpected JSON from nsa-bench in {}: {e}", json.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_bench_report() {
        let json = r#"{
  "backend": "cuda",
  "dtype": "bf16",
  "phase": "forward",
  "heads": 64,
  "kv_heads": 4,
  "d_k": 128,
  "d_v": 128,
  "warmup": 1,
  "reps": 3,
  "results": [
    { "seq_len": 8192, "series": "selected", "ms": 3.36 },
    { "seq_len": 16384, "series": "NSA forward total", "ms": 14.34 }
  ]
}"#;
        let report: BenchReport = serde_json::from_str(json).unwrap();
        let rows: Vec<Measurement> = report.into_measurements().collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].backend, "cuda");
        assert_eq!(rows[0].phase, "forward");
        assert_eq!(rows[0].series, "selected");
        assert_eq!(rows[0].seq_len, 8192);
        assert_eq!(rows[0].ms, 3.36);
        assert_eq!(rows[1].series, "NSA forward total");
        assert_eq!(rows[1].seq_len, 16384);
    }

    #[test]
    fn a_report_without_results_is_an_error() {
        let json = r#"{ "backend": "cuda", "dtype": "bf16", "phase": "forward" }"#;
        assert!(serde_json::from_str::<BenchReport>(json).is_err());
    }
}
