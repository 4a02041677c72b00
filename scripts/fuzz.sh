#!/usr/bin/env bash
# Runs every fuzz target (cargo-fuzz / libFuzzer; needs the nightly toolchain) for the given
# seconds each: `scripts/fuzz.sh 600` for a real run, `scripts/fuzz.sh 10` (the default) for
# the smoke run scripts/test.sh does. Installs cargo-fuzz if missing. A crash fails the run
# and leaves its input in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs=${1:-10}
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "fuzz: skipped: no nightly toolchain (rustup toolchain install nightly)"
  exit 0
fi
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cargo +nightly fuzz build -O
for t in $(cargo +nightly fuzz list); do
  mkdir -p "corpus/$t"
  out=$(cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 2>&1) || { echo "$out" | tail -n 30; echo "fuzz: $t FAILED"; exit 1; }
  echo "fuzz: $t ok: $(echo "$out" | grep -E '^Done [0-9]+ runs' | tail -n 1)"
done
