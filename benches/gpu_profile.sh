#!/usr/bin/env bash
# Nsight Compute's detailed sections (throughput, occupancy, warp stalls, source counters) of
# every tensor-core kernel of one forward + backward at T (default 64k), on a CUDA machine
# with `ncu`.
#
# Needs `nsa-bench`, built with `cargo build --release -p nsa-benches`: $NSA_BENCH if set,
# else `nsa-bench` (or `nsa-bench.gz`) next to this script, else the repository's
# `target/release/nsa-bench`. Run: `bash benches/gpu_profile.sh [T]`. The report goes to
# `$OUT/ncu_details.txt` when $OUT is set, else to `ncu_details.txt` in the current folder;
# the script prints each kernel's duration, registers, occupancy and issue-slot use from it.
set -u
source "$(dirname "$0")/find_bench.sh"
T=${1:-65536}
REPORT=${OUT:-.}/ncu_details.txt
ncu --set detailed --section WarpStateStats --section SourceCounters -k regex:mma \
  --launch-count 9 "$bench" --phase backward --seq-lens "$T" --warmup 0 --reps 1 \
  > "$REPORT" 2>&1
grep -E "^  [a-z_]+.*\(|Duration|Registers Per|Achieved Occupancy|Issue Slots Busy" "$REPORT"
