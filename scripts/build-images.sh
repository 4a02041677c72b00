#!/usr/bin/env bash
# Builds the mesh's container images with podman, without a Docker daemon and without pulling
# anything: each image is FROM scratch, holding the binaries, the shared libraries `ldd` lists
# for them, and (the proxy) iptables for `mesh-proxy init`, all taken from this machine.
#
#   scripts/build-images.sh [BIN_DIR]     # default: target/release
#
# Tags are the workspace version, the ones meshctl install and the injector reference:
#   mesh-proxy:<version>          mesh-proxy (entrypoint); `init` installs the redirect (root,
#                                 NET_ADMIN); the proxy runs as uid 2102
#   mesh-control-plane:<version>  mesh-control-plane (entrypoint) and meshctl; uid 65532
#   mesh-example:<version>        the example app (tests and the demo)
# deploy/docker/Dockerfile builds the same images with a real Docker from the Rust image.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
bin="${1:-$root/target/release}"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)"
command -v podman >/dev/null || { echo "build-images: podman missing (scripts/install-test-deps.sh installs it)" >&2; exit 1; }
for b in mesh-proxy mesh-control-plane meshctl mesh-example; do
  [ -x "$bin/$b" ] || { echo "build-images: $bin/$b missing (build it first)" >&2; exit 1; }
done
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Copies the libraries a program loads into a root filesystem, at their own paths.
libs() {
  local rootfs="$1" f="$2" lib
  for lib in $(ldd "$f" 2>/dev/null | grep -o '/[^ ]*' || true); do
    [ -e "$rootfs$lib" ] || cp --parents -L "$lib" "$rootfs"
  done
}

# Copies files into a root filesystem at their own paths, with their libraries.
add() {
  local rootfs="$1" f; shift
  for f in "$@"; do
    cp --parents -L "$f" "$rootfs"
    libs "$rootfs" "$f"
  done
}

# A root filesystem with the binaries under /usr/local/bin and the directories programs expect.
rootfs() {
  local dir="$work/$1" b; shift
  mkdir -p "$dir/rootfs/usr/local/bin" "$dir/rootfs/tmp" "$dir/rootfs/run" "$dir/rootfs/etc"
  chmod 1777 "$dir/rootfs/tmp"
  for b in "$@"; do
    install -m 0755 "$bin/$b" "$dir/rootfs/usr/local/bin/$b"
    libs "$dir/rootfs" "$bin/$b"
  done
  echo "root:x:0:0:root:/:/sbin/nologin" > "$dir/rootfs/etc/passwd"
  echo "root:x:0:" > "$dir/rootfs/etc/group"
}

build() {
  local name="$1" user="$2" entry="$3"
  cat > "$work/$name/Containerfile" <<EOF
FROM scratch
COPY rootfs/ /
USER $user
ENTRYPOINT ["/usr/local/bin/$entry"]
EOF
  podman build --quiet --tag "$name:$version" --file "$work/$name/Containerfile" "$work/$name" >/dev/null
  echo "build-images: $name:$version"
}

rootfs mesh-proxy mesh-proxy
# iptables (nft backend) with its extensions, for `mesh-proxy init`.
add "$work/mesh-proxy/rootfs" /usr/sbin/xtables-nft-multi /etc/protocols
for ext in /usr/lib/x86_64-linux-gnu/xtables/*.so; do add "$work/mesh-proxy/rootfs" "$ext"; done
for t in iptables iptables-restore iptables-save ip6tables ip6tables-restore ip6tables-save; do
  ln -sf xtables-nft-multi "$work/mesh-proxy/rootfs/usr/sbin/$t"
done
echo "mesh-proxy:x:2102:2102::/:/sbin/nologin" >> "$work/mesh-proxy/rootfs/etc/passwd"
build mesh-proxy 2102:2102 mesh-proxy

rootfs mesh-control-plane mesh-control-plane meshctl
build mesh-control-plane 65532:65532 mesh-control-plane

rootfs mesh-example mesh-example
build mesh-example 65532:65532 mesh-example
