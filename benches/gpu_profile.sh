#!/usr/bin/env bash
# Nsight Compute's detailed sections (throughput, occupancy, warp stalls, source counters) of
# every tensor-core kernel of one forward + backward at T (default 64k), on the GPU machine.
# Run from a folder holding `nsa-bench.gz` (or `nsa-bench`, built with
# `cargo build -p nsa-benches`): `bash gpu_profile.sh [T]`. The report goes to
# `$OUT/ncu_details.txt` (or the current folder without `$OUT`).
set -u
cd "$(dirname "$0")"
gunzip -f nsa-bench.gz 2>/dev/null; chmod +x nsa-bench
T=${1:-65536}
REPORT=${OUT:-.}/ncu_details.txt
ncu --set detailed --section WarpStateStats --section SourceCounters -k regex:mma \
  --launch-count 9 ./nsa-bench --phase backward --seq-lens "$T" --warmup 0 --reps 1 \
  > "$REPORT" 2>&1
grep -E "^  [a-z_]+.*\(|Duration|Registers Per|Achieved Occupancy|Issue Slots Busy" "$REPORT"
