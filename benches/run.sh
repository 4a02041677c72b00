#!/usr/bin/env bash
# Load benchmarks: the mesh's sidecar pair vs Envoy's vs a direct connection, in one run.
# Installs its tools (idempotent), builds release binaries, writes target/bench-results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-build-deps.sh
./scripts/install-bench-tools.sh
cargo build --release --workspace --bins
exec target/release/mesh-bench "$@"
