#!/usr/bin/env bash
# Resident memory per idle relayed connection: sluice vs HAProxy, same run, same backend.
# Opens N connections through each edge (each sends a real captured tunnel ClientHello and
# reads the backend's greeting), holds them, and reports the edge's RSS delta / N.
# Interim tool until the benchmark issue's load generator lands. Needs: python3, haproxy.
set -euo pipefail
cd "$(dirname "$0")"
N="${N:-5000}"
ulimit -n 20000
cargo build --release --manifest-path ../../Cargo.toml >/dev/null
python3 backend.py 29001 & BP=$!
../../target/release/sluice run --config sluice.toml 2>/dev/null & SP=$!
HP=""
if command -v haproxy >/dev/null; then haproxy -f haproxy.cfg -db >/dev/null 2>&1 & HP=$!; fi
trap 'kill $BP $SP $HP 2>/dev/null || true' EXIT
sleep 1
echo "date: $(date -u +%F) commit: $(git rev-parse --short HEAD) nproc: $(nproc) N=$N"
python3 hold.py sluice 28444 "$N" "$SP"
[ -n "$HP" ] && python3 hold.py haproxy 28443 "$N" "$HP"
