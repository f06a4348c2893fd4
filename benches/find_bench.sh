# Sourced by the GPU scripts: sets $bench to the `nsa-bench` binary to run, built with
# `cargo build --release -p nsa-benches`: $NSA_BENCH if set, else `nsa-bench` (or
# `nsa-bench.gz`) next to the scripts, else the repository's `target/release/nsa-bench`.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -n "${NSA_BENCH:-}" ]; then
  bench="$NSA_BENCH"
elif [ -e "$here/nsa-bench.gz" ] || [ -e "$here/nsa-bench" ]; then
  gunzip -f "$here/nsa-bench.gz" 2>/dev/null
  bench="$here/nsa-bench"
else
  bench="$here/../target/release/nsa-bench"
fi
[ -f "$bench" ] || { echo "no nsa-bench at $bench: build it with cargo build --release -p nsa-benches" >&2; exit 1; }
chmod +x "$bench"
