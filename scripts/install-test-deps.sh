#!/usr/bin/env bash
# Installs what the end-to-end tests need beyond Rust, idempotently: Debian's Chromium (the
# dashboard test drives it headless). Needs root for apt-get; without root it only says what
# is missing (the dashboard test then fails, naming this script).
set -euo pipefail
if command -v chromium >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-test-deps: chromium is missing; run this script as root to install it" >&2
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
chromium --version
