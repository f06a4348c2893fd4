//! Project tasks, run as `cargo xtask <task>`.
//!
//! - `bench`: the benchmark matrix over backends, dtypes, sequence lengths and phases,
//!   written as JSON, CSV and SVG plots (see [`bench::BenchArgs`]).

mod bench;
mod report;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Runs `nsa-bench` over a matrix of backends, dtypes, sequence lengths and phases and
    /// writes `bench.json`, `bench.csv` and one SVG plot per (backend, dtype, phase).
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Bench(args) => bench::run(&args),
    };
    if let Err(message) = result {
        eprintln!("cargo xtask: {message}");
        std::process::exit(1);
    }
}
