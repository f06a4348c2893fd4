//! Seeding Flex's random numbers per case, and running labelled cases.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use burn::backend::Flex;
use burn::tensor::backend::Backend;

/// Flex keeps one global RNG; tests run on parallel threads, so every seeded section
/// (seed, init, first read of each lazily initialised parameter, random inputs) holds this.
pub static RNG: Mutex<()> = Mutex::new(());

/// The run's base seed: `NSA_TEST_SEED`, else the system time.
pub fn base_seed() -> u64 {
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
pub fn case_seed(base: u64, label: &str) -> u64 {
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
pub fn seeded<T>(seed: u64, f: impl FnOnce() -> T) -> T {
    let _guard = RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    Flex::seed(&Default::default(), seed);
    f()
}

/// What a passing case reports: its relative errors and the near-ties it accepted.
pub type CaseResult = Result<String, String>;

/// A labelled case, run with its seed.
pub type Case = (String, Box<dyn Fn(u64) -> CaseResult>);

/// Runs every case, prints a line per case and panics listing every failure.
pub fn run_cases(test: &str, cases: Vec<Case>) {
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
