#!/usr/bin/env bash
# End-to-end benchmark: starts tansu + moto, runs examples/e2e_bench.rs (release build), stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${STRATA_CACHE:-$HOME/.cache/strata}"
scripts/services.sh start
trap 'scripts/services.sh stop' EXIT
set -a; source "$CACHE/services/env"; set +a
cargo run --release --quiet --features demo --example e2e_bench
