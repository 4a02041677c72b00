#!/usr/bin/env bash
# Runs every test: format and lint checks, unit tests, then the end-to-end tests (which build
# and start the real binaries on loopback). Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
