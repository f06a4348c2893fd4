#!/usr/bin/env bash
# One decoding step in one command on a CUDA machine: `nsa-bench --phase decode` (the
# operator's step, and a layer's step through its cache) at batch 1 and 32, beside dense
# decoding over the same context (PyTorch SDPA, anchors/dense_decode_bench.py).
# BENCHMARKS.md records its output.
#
# Needs `nsa-bench` (see find_bench.sh), `anchors/` next to this script, python3 with torch
# (CUDA), and nvidia-smi. Run from anywhere: `bash benches/gpu_decode.sh`.
set -u
source "$(dirname "$0")/find_bench.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
# The layer's step prefills its cache with one forward pass over the whole batch first, so
# batch 32 stays at short contexts (the paper's layer in f32 at 32 x 16k tokens needs more
# memory than one card has).
decode() { # batch, then the context lengths
  local batch=$1; shift
  echo "== nsa-bench decode, batch $batch"
  timeout 300 "$bench" --phase decode --batch "$batch" --seq-lens "$@" --warmup 2 --reps 10 \
    2>&1 | grep "^| "
}
decode 1 4096 16384 65536 131072
decode 32 4096 8192
echo "== dense decoding (PyTorch SDPA)"
timeout 300 python3 "$here/anchors/dense_decode_bench.py" --T 4096 16384 65536 131072 --B 1
timeout 300 python3 "$here/anchors/dense_decode_bench.py" --T 4096 8192 --B 32
