//! Project tasks, run as `cargo xtask <task>`.
//!
//! No task exists yet: `cargo xtask bench` (the benchmark matrix over backends, dtypes,
//! sequence lengths and phases) arrives with the CubeCL kernels it measures.

fn main() {
    let task = std::env::args().nth(1);
    eprintln!(
        "cargo xtask: no task `{}` yet; `bench` arrives with the CubeCL kernels",
        task.as_deref().unwrap_or("")
    );
    std::process::exit(2);
}
