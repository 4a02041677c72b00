#!/usr/bin/env bash
# The local quick start: builds the mesh (release) and starts it on this machine with the
# example services, via `meshctl demo`. Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/../.."
./scripts/install-build-deps.sh
cargo build --release --workspace --bins
exec target/release/meshctl demo "$@"
