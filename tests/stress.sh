#!/usr/bin/env bash
# The whole suite, N times in a row, with stress-ng keeping every core busy beside it: timing
# that a loaded machine breaks shows up as failures here, counted per test.
#   tests/stress.sh [runs, default 20]      (Debian: apt-get install stress-ng)
# Prints one line per run and, at the end, every test that failed and how often.
set -uo pipefail
cd "$(dirname "$0")/.."
runs="${1:-20}"
log=$(mktemp -d)
cargo nextest run --workspace --locked --no-run >/dev/null 2>&1 || { echo "build failed" >&2; exit 1; }
stress-ng --cpu "$(nproc)" --timeout 0 --quiet &
load=$!
trap 'kill $load 2>/dev/null' EXIT
failed_runs=0
for i in $(seq 1 "$runs"); do
  start=$SECONDS
  if cargo nextest run --workspace --locked >"$log/run$i.txt" 2>&1; then
    status=ok
  else
    status=FAILED
    failed_runs=$((failed_runs + 1))
  fi
  summary=$(grep -E "^ *Summary" "$log/run$i.txt" | tail -n 1 | sed 's/^ *//')
  echo "run $i/$runs: $status in $((SECONDS - start)) s: $summary"
done
echo "== $failed_runs of $runs runs failed; failures by test:"
grep -hE "^ *(FAIL|TIMEOUT|SIGSEGV|SIGABRT) \[" "$log"/run*.txt | sed -E 's/.*\] +//' | sort | uniq -c | sort -rn
echo "(logs in $log)"
[ "$failed_runs" = 0 ]
