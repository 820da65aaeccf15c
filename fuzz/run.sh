#!/usr/bin/env bash
# Run every fuzz target for a bounded time, starting from its seeds and past regressions.
#   fuzz/run.sh [seconds per target, default 30] [target...]
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`). The machine's toolchain is stable:
# RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags, and --sanitizer none keeps it to what
# stable rustc can build (coverage-guided fuzzing, debug assertions, no ASan; sluice forbids
# unsafe code outside splice.rs, so ASan would find little). A failing input is left in
# fuzz/artifacts/<target>/; copy it into fuzz/regressions/<target>/ with the fix.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-30}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(client_hello proxy_header route_config quic_initial)
export RUSTC_BOOTSTRAP=1
cargo fuzz build --sanitizer none
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "$work/$t"
  dirs=("$work/$t" "seeds/$t")
  [ -d "regressions/$t" ] && dirs+=("regressions/$t")
  echo "== fuzz $t for ${seconds}s"
  if ! cargo fuzz run --sanitizer none "$t" "${dirs[@]}" -- \
      -max_total_time="$seconds" -print_final_stats=1 2>"$work/$t.log"; then
    tail -n 40 "$work/$t.log"
    echo "fuzz $t FAILED: the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "$work/$t.log" | tail -n 2
done
