#!/usr/bin/env bash
# Release build of every binary, with the sidecar optimised from a profile of its own request
# paths (profile-guided optimisation):
#   1. every binary, release (target/release/);
#   2. an instrumented mesh-proxy (cargo profile pgo-gen, target/pgo-gen/);
#   3. a training run: target/release/pgo-train starts the mesh with that sidecar and sends
#      HTTP/1.1, HTTP/2 and gRPC through the mTLS pair and through one sidecar (~20 s);
#   4. the sidecar compiled with the profile it recorded: target/pgo/mesh-proxy, the one to
#      ship and to benchmark.
# Extra arguments go to every cargo build (e.g. --locked). Needs rustup's llvm-tools component
# (llvm-profdata, to merge the profile), which it adds if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-build-deps.sh
cargo build --release --workspace --bins "$@"

host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
  rustup component add llvm-tools
fi
[ -x "$profdata" ] || { echo "build-release: no llvm-profdata at $profdata" >&2; exit 1; }

profiles=$PWD/target/pgo-profiles
mkdir -p "$profiles"
# The sidecar is built on its own (-p mesh-proxy): built with the workspace it would get the
# features other crates turn on, among them tracing's `log` (kube-client), which adds ~9% to
# its instructions per request.
RUSTFLAGS="-Cprofile-generate=$profiles" \
  cargo build --profile pgo-gen -p mesh-proxy --bin mesh-proxy "$@"
# Only the training run's profiles: the instrumented build scripts wrote some too.
rm -rf "$profiles"/*
LLVM_PROFILE_FILE="$profiles/%p.profraw" \
  target/release/pgo-train --proxy target/pgo-gen/mesh-proxy
"$profdata" merge -o "$profiles/merged.profdata" "$profiles"/*.profraw
# Named by its content, so that a new profile rebuilds every crate (cargo does not track the
# file, only the flags that name it).
sum=$(sha256sum "$profiles/merged.profdata" | cut -c1-16)
mv "$profiles/merged.profdata" "$profiles/$sum.profdata"
RUSTFLAGS="-Cprofile-use=$profiles/$sum.profdata" \
  cargo build --profile pgo -p mesh-proxy --bin mesh-proxy "$@"
echo "build-release: target/pgo/mesh-proxy (profile-guided), other binaries in target/release/"
