//! The generation example runs end to end on flex, and its cached steps equal the full
//! forward pass (`--check` exits with an error otherwise).

use std::process::Command;

#[test]
fn generation_with_the_cache_matches_the_full_forward() {
    let output = Command::new(env!("CARGO_BIN_EXE_nsa-generate"))
        .args(["--device", "flex", "--preset", "small", "--layers", "2"])
        .args(["--prompt-len", "100", "--chunk", "30", "--new-tokens", "12"])
        .args(["--batch", "2", "--check"])
        .output()
        .expect("the example starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "nsa-generate failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("generated tokens identical"), "{stdout}");
}
