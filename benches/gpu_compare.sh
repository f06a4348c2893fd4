#!/usr/bin/env bash
# Our forward and backward benchmark and the anchors in one command on a CUDA machine, with
# the peak GPU memory of each benchmark process. BENCHMARKS.md records its output.
#
# Needs:
# - `nsa-bench`, built with `cargo build --release -p nsa-benches`. The script takes
#   $NSA_BENCH if set, else `nsa-bench` (or `nsa-bench.gz`) next to this script, else the
#   repository's `target/release/nsa-bench`.
# - `anchors/` next to this script (`benches/anchors/` in the repository): the anchor
#   scripts, with the fla wheel downloaded into it (see anchors/README.md). If
#   `anchors/flash_nsa/` is there too, flash-nsa is timed last.
# - python3 with torch (CUDA) and triton, and nvidia-smi.
#
# Run from anywhere: `bash benches/gpu_compare.sh`. The script can also be copied into a
# folder with `nsa-bench.gz` and `anchors/` and run there (for a machine without cargo).
set -u
source "$(dirname "$0")/find_bench.sh"
anchors="$here/anchors"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
peak() { # peak memory.used (MiB, whole card) while "$@" runs, sampled every 100 ms
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$scratch/mem.log" &
  local sampler=$!
  "$@" 2>&1 | grep "^| [0-9]"
  kill $sampler; sleep 0.2
  echo "peak GPU memory (MiB, whole process): $(sort -n "$scratch/mem.log" | tail -1)"
}
for T in 8192 16384 32768 65536; do
  peak "$bench" --seq-lens $T --warmup 1 --reps 5
done
for T in 8192 16384 32768 65536; do
  peak "$bench" --phase backward --seq-lens $T --warmup 1 --reps 3
done

# Anchors: fla's Triton NSA and FlashAttention-2 (PyTorch SDPA), from the local fla wheel.
python3 -m pip install -q --no-index --no-deps --target "$scratch/site" "$anchors"/*.whl
PYTHONPATH="$scratch/site" timeout 300 python3 "$anchors/fla_nsa_bench.py" \
  --T 8192 16384 32768 65536 --HQ 64 --H 4 --D 128 2>&1 | tail -12
if [ -d "$anchors/flash_nsa" ]; then
  PYTHONPATH="$anchors:$scratch/site" timeout 300 python3 "$anchors/flash_nsa_bench.py" \
    --T 8192 16384 32768 65536 2>&1 | tail -12
fi
