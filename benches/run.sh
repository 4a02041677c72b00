#!/usr/bin/env bash
# Load benchmarks: the mesh's sidecar pair vs Envoy's vs a direct connection, in one run.
# Installs its tools (idempotent), builds the release binaries with the profile-guided sidecar
# (scripts/build-release.sh, the build the images ship), writes target/bench-results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-bench-tools.sh
./scripts/build-release.sh
exec target/release/mesh-bench --proxy target/pgo/mesh-proxy "$@"
