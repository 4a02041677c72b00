#!/usr/bin/env bash
# Installs what the build (scripts/install-build-deps.sh: protoc) and the end-to-end tests need
# beyond Rust, idempotently: Debian's Chromium (the dashboard test drives it headless), iptables
# (the interception tests run `mesh-proxy init` in network namespaces) and etcd (the
# multi-replica tests start a real one). Needs root for apt-get; without root it only says what is
# missing (the tests that need it then fail or skip, naming this script).
set -euo pipefail
"$(dirname "$0")/install-build-deps.sh"
. "$(dirname "$0")/apt-install.sh"
missing=()
command -v chromium >/dev/null || missing+=(chromium fonts-dejavu-core)
command -v iptables-restore >/dev/null || missing+=(iptables)
command -v ip >/dev/null || missing+=(iproute2)
command -v etcd >/dev/null || missing+=(etcd-server)
apt_install install-test-deps "${missing[@]}"
