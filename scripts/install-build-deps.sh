#!/usr/bin/env bash
# Installs what building the mesh needs beyond Rust, idempotently: protoc and its well-known
# types (the etcd-client crate's build script runs protoc on etcd's protos, which import
# google/protobuf/*.proto). Needs root for apt-get; without root it says what is missing and
# fails, since the build would.
set -euo pipefail
. "$(dirname "$0")/apt-install.sh"
missing=()
command -v protoc >/dev/null || missing+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
MISSING_STATUS=1 apt_install install-build-deps "${missing[@]}"
