#!/usr/bin/env bash
# Builds linkerd2-proxy at a pinned release tag, as its release does (`--release`: LTO, tokio
# metrics on), with the stable toolchain here, into target/linkerd2-proxy/linkerd2-proxy, where
# mesh-bench finds it. Idempotent: a binary built from the same tag is kept.
#
#   benches/build-linkerd2-proxy.sh [LINKERD2_PROXY_REPO [LINKERD_KUBERT_REPO]]
#
# Each repository is a clone (bare or not) or a URL; by default the GitHub ones. The proxy
# takes two crates from linkerd-kubert by git; a local clone of it is used in their place, so
# the build needs no network but the crate registry. Takes 15-25 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=release/v2.366.0
PROXY_REPO=${1:-https://github.com/linkerd/linkerd2-proxy.git}
KUBERT_REPO=${2:-https://github.com/linkerd/linkerd-kubert.git}
OUT=target/linkerd2-proxy
SRC=target/linkerd2-proxy-src
# Outside the source tree, which is checked out afresh, so that a rebuild is incremental.
BUILD=target/linkerd2-proxy-build

if [[ -x $OUT/linkerd2-proxy && "$(cat "$OUT/TAG" 2>/dev/null)" == "$TAG" ]]; then
    echo "linkerd2-proxy $TAG already built: $OUT/linkerd2-proxy"
    exit 0
fi

# A local path is read in place; a URL is cloned at the tag.
checkout() {
    local repo=$1 dest=$2
    rm -rf "$dest"
    mkdir -p "$dest"
    if [[ -d $repo ]]; then
        git -C "$repo" archive "$TAG" | tar -x -C "$dest"
    else
        git clone --quiet --depth 1 --branch "$TAG" "$repo" "$dest"
    fi
}
checkout "$PROXY_REPO" "$SRC"

# The pinned toolchain is not installed here (and cannot be downloaded); the stable one is.
rm -f "$SRC/rust-toolchain.toml"
if [[ -d $KUBERT_REPO ]]; then
    kubert=$(cd "$KUBERT_REPO" && pwd)
    sed -i "s#https://github.com/linkerd/linkerd-kubert.git#file://$kubert#" \
        "$SRC/Cargo.toml" "$SRC/Cargo.lock"
fi

# As the proxy's Dockerfile builds it, without `-D warnings` (a newer compiler warns more).
RUSTFLAGS="-A deprecated --cfg tokio_unstable" CARGO_INCREMENTAL=0 \
    cargo build --release --manifest-path "$SRC/Cargo.toml" --target-dir "$BUILD" -p linkerd2-proxy

mkdir -p "$OUT"
cp "$BUILD/release/linkerd2-proxy" "$OUT/linkerd2-proxy"
# Stripped as its release is (`just build`), the debug info kept beside it.
objcopy --only-keep-debug "$OUT/linkerd2-proxy" "$OUT/linkerd2-proxy.dbg"
objcopy --strip-unneeded "$OUT/linkerd2-proxy"
objcopy --add-gnu-debuglink="$OUT/linkerd2-proxy.dbg" "$OUT/linkerd2-proxy"
echo "$TAG" >"$OUT/TAG"
echo "linkerd2-proxy $TAG: $OUT/linkerd2-proxy"
