#!/usr/bin/env bash
# Register guard: the registers per thread of every tensor-core kernel of one forward +
# backward at T (default 8192), read with Nsight Compute, against the budgets in
# register_budget.txt. Prints one line per kernel and fails when a kernel is over its
# budget or a budgeted kernel did not run. Needs `ncu` and `nsa-bench` (see find_bench.sh).
# Run: `bash benches/gpu_registers.sh [T]`.
set -euo pipefail
source "$(dirname "$0")/find_bench.sh"
T=${1:-8192}
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
ncu --clock-control none --csv --metrics launch__registers_per_thread -k regex:mma \
  "$bench" --phase backward --seq-lens "$T" --warmup 0 --reps 1 > "$report" 2>/dev/null
python3 - "$here/register_budget.txt" "$report" <<'PY'
import csv, sys
budget = {}
for line in open(sys.argv[1]):
    line = line.split("#")[0].split()
    if line:
        budget[line[0]] = int(line[1])
rows = [r for r in csv.reader(l for l in open(sys.argv[2]) if l.startswith('"'))]
header, rows = rows[0], rows[1:]
name, value = header.index("Kernel Name"), header.index("Metric Value")
seen = {}
for row in rows:
    kernel = next((k for k in budget if k in row[name]), None)
    if kernel is None:
        print(f"no budget for kernel {row[name][:80]}")
        sys.exit(1)
    seen[kernel] = max(seen.get(kernel, 0), int(float(row[value].replace(",", ""))))
failed = False
for kernel, limit in budget.items():
    used = seen.get(kernel)
    status = "missing" if used is None else ("ok" if used <= limit else "OVER BUDGET")
    failed |= status != "ok"
    print(f"{kernel:32} {used if used is not None else '-':>4} / {limit:>3}  {status}")
sys.exit(1 if failed else 0)
PY
