#!/usr/bin/env bash
# Counts the instructions one sidecar executes per request, under callgrind: deterministic,
# unlike CPU time on a shared VM, so a change to the request path can be measured to ~1%.
#
#   benches/callgrind.sh <topology> <load> [service-account] [out-file]
#   benches/callgrind.sh mesh-1 grpc                 # the backend sidecar, one proxy
#   benches/callgrind.sh mesh grpc web               # the outbound sidecar of the mTLS pair
#   PROXY=/tmp/other/mesh-proxy benches/callgrind.sh mesh grpc web   # another build of it
#
# It runs `mesh-bench --only <topology> --loads <load>` from target/release with every
# mesh-proxy started under valgrind, zeroes the counters once the load runs, dumps them 10 s
# later, and divides by the requests the proxy finished in that window. Installs valgrind if
# missing (apt-get, root). The per-function profile is left in the out file for
# callgrind_annotate or benches/callgrind_per_request.py.
set -euo pipefail
cd "$(dirname "$0")/.."
topology=${1:?topology: mesh-1 or mesh}
load=${2:?load: h1, h2, grpc or fixed}
who=${3:-backend}
out=${4:-target/callgrind.$topology.$load.$who.out}
if ! command -v valgrind >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi
bin=$PWD/target/release
# The sidecar the images ship (profile-guided, scripts/build-release.sh) if it is built.
proxy=$bin/mesh-proxy
[ -x "$PWD/target/pgo/mesh-proxy" ] && proxy=$PWD/target/pgo/mesh-proxy
# Or another build, to compare two (PROXY=/path/to/mesh-proxy).
proxy=${PROXY:-$proxy}
echo "sidecar: $proxy" >&2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# mesh-bench starts the binaries beside its own (resolved) path: a copy of it, links to the
# others, and a mesh-proxy that is valgrind running the real one.
cp "$bin/mesh-bench" "$work/"
for b in mesh-example mesh-control-plane meshctl; do ln -s "$bin/$b" "$work/$b"; done
cat > "$work/mesh-proxy" <<WRAP
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file=$work/cg.%p "$proxy" "\$@"
WRAP
chmod +x "$work/mesh-proxy"
"$work/mesh-bench" --secs 25 --fixed-secs 25 --only "$topology" --loads "$load" --out "$work/table.md" \
  > "$work/bench.log" 2>&1 &
bench=$!
pid=""
for _ in $(seq 1 60); do
  pid=$(pgrep -f "valgrind.*--service-account $who " | head -1 || true)
  [ -n "$pid" ] && break
  sleep 0.5
done
[ -n "$pid" ] || { echo "no $who sidecar started" >&2; cat "$work/bench.log" >&2; exit 1; }
# The timed run, not the warm-ups before it (1 s of HTTP/1.1 through every topology, which
# would be counted as requests too): oha with the run's duration.
for _ in $(seq 1 240); do
  pgrep -f "oha .*-z 25s" >/dev/null && break
  sleep 0.25
done
pgrep -f "oha .*-z 25s" >/dev/null || { echo "the load never started" >&2; cat "$work/bench.log" >&2; exit 1; }
sleep 2
callgrind_control -z "$pid" >/dev/null 2>&1
sleep 10
callgrind_control -d "$pid" >/dev/null 2>&1
wait "$bench" || true
cp "$(ls "$work"/cg."$pid".* | head -1)" "$out"
python3 benches/callgrind_per_request.py "$out"
