#!/usr/bin/env bash
# Installs what building the mesh needs beyond Rust, idempotently: protoc and its well-known
# types (the etcd-client crate's build script runs protoc on etcd's protos, which import
# google/protobuf/*.proto). Needs root for apt-get; without root it says what is missing.
set -euo pipefail
missing=()
command -v protoc >/dev/null || missing+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-build-deps: missing ${missing[*]}; run this script as root (or apt-get install them) before building" >&2
  exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-build-deps: installed ${missing[*]}"
