#!/usr/bin/env bash
# Counts the system calls one sidecar makes per request under load: how well it batches its
# writes. Kernel tracepoints (perf), not strace, which slows the proxy and so changes how much
# each write carries.
#
#   benches/syscalls.sh <topology> <load> [service-account]
#   benches/syscalls.sh mesh-1 grpc               # the backend sidecar, one proxy
#   benches/syscalls.sh mesh grpc web             # the outbound sidecar of the mTLS pair
#
# It runs `mesh-bench --only <topology> --loads <load>` from target/release, counts the
# sidecar's send, write and read calls for 4 s once the load runs, and divides by the change in
# its `mesh_requests_total` over the same window. Installs perf if missing (apt-get, root).
set -euo pipefail
cd "$(dirname "$0")/.."
topology=${1:?topology: mesh-1 or mesh}
load=${2:?load: h1, h2, grpc or fixed}
who=${3:-backend}
if ! command -v perf >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The sidecar the images ship (profile-guided, scripts/build-release.sh) if it is built.
proxy=target/release/mesh-proxy
[ -x target/pgo/mesh-proxy ] && proxy=target/pgo/mesh-proxy
echo "sidecar: $proxy" >&2
target/release/mesh-bench --proxy "$proxy" --secs 14 --fixed-secs 14 --only "$topology" --loads "$load" --out "$work/table.md" \
  > "$work/bench.log" 2>&1 &
bench=$!
# The timed run, not the warm-up before it: oha with the run's duration.
for _ in $(seq 1 240); do
  pgrep -f "oha .*-z 14s" >/dev/null && break
  sleep 0.25
done
pgrep -f "oha .*-z 14s" >/dev/null || { echo "the load never started" >&2; cat "$work/bench.log" >&2; exit 1; }
sleep 2
pid=$(pgrep -f "mesh-proxy .*--service-account $who " | head -1)
[ -n "$pid" ] || { echo "no $who sidecar" >&2; exit 1; }
# The admin listener is the one of the sidecar's ports that serves its metrics.
metrics=""
for port in $(ss -ltnpH | grep "pid=$pid," | awk '{print $4}' | sed 's/.*://'); do
  # Not `curl | grep -q`: under pipefail, grep leaving early fails curl (SIGPIPE) and the test.
  page=$(curl -sf -m 1 "http://127.0.0.1:$port/metrics" || true)
  if grep -q '^mesh_requests_total' <<<"$page"; then
    metrics="http://127.0.0.1:$port/metrics"
    break
  fi
done
[ -n "$metrics" ] || { echo "no metrics endpoint for $who" >&2; exit 1; }
requests() { curl -sf "$metrics" | awk '/^mesh_requests_total/ {s += $NF} END {print s}'; }
before=$(requests)
perf stat -x, -o "$work/stat.csv" \
  -e syscalls:sys_enter_sendto,syscalls:sys_enter_writev,syscalls:sys_enter_write \
  -e syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait \
  -p "$pid" -- sleep 4
after=$(requests)
wait "$bench" || true
n=$((after - before))
[ "$n" -gt 0 ] || { echo "no requests counted" >&2; exit 1; }
echo "$who sidecar, $topology, $load: $n requests in 4 s"
awk -F, -v n="$n" '$3 ~ /syscalls/ {sub("syscalls:sys_enter_", "", $3); printf "  %-10s %.3f per request\n", $3, $1 / n}' "$work/stat.csv"
