#!/usr/bin/env bash
# Runs every test: installs what the tests need (idempotent), format and lint checks, unit
# tests, then the end-to-end tests (which build and start the real binaries on loopback), then
# a 10-second smoke run of each fuzz target. Safe to run repeatedly. Ends with one total line.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# Fuzz smoke run: every fuzz target for 10 s (nightly; real runs: scripts/fuzz.sh 600).
set +e
./scripts/fuzz.sh 10
fuzz=$?
set -e
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "all tests: %d passed, %d failed\n", p, f }' "$log"
[ "$status" -eq 0 ] || exit "$status"
exit "$fuzz"
