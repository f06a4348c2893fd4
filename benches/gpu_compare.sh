#!/usr/bin/env bash
# Our forward and backward benchmark and the anchors in one GPU-machine command, with the
# peak GPU memory of each benchmark process. Run from a folder holding `nsa-bench.gz` (or
# `nsa-bench`, built with `cargo build -p nsa-benches`) and `anchors/` (see
# ../shared/anchors/README.md): `bash gpu_compare.sh`. BENCHMARKS.md records its output.
set -u
cd "$(dirname "$0")"
gunzip -f nsa-bench.gz 2>/dev/null; chmod +x nsa-bench
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
peak() { # peak memory.used (MiB) while "$@" runs
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > /tmp/mem.log &
  local sampler=$!
  "$@" 2>&1 | grep "^| [0-9]"
  kill $sampler; sleep 0.2
  echo "peak GPU memory (MiB, whole process): $(sort -n /tmp/mem.log | tail -1)"
}
for T in 8192 16384 32768 65536; do
  peak ./nsa-bench --seq-lens $T --warmup 1 --reps 5
done
for T in 8192 16384 32768 65536; do
  peak ./nsa-bench --phase backward --seq-lens $T --warmup 1 --reps 3
done
python3 -m pip install -q --no-index --no-deps --target /tmp/site anchors/*.whl
PYTHONPATH=/tmp/site timeout 300 python3 anchors/fla_nsa_bench.py --T 8192 16384 32768 65536 --HQ 64 --H 4 --D 128 2>&1 | tail -12
