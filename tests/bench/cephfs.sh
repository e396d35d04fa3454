#!/usr/bin/env bash
# CephFS controller figures on this machine, against the test Ceph of
# tests/backends/ceph.sh: csi-bench create+delete pairs (a subvolume with
# its quota, the journal entry, and their removal) with 1 and 16 clients,
# and the controller's resident memory.
#   tests/bench/cephfs.sh [PAIRS]
set -euo pipefail
cd "$(dirname "$0")/../.."
pairs=${1:-400}
cargo build --release -q -p rcsi
cargo build --release -q -p rcsi-tests --bin csi-bench
bin=target/release
work=$(mktemp -d /tmp/rcsi-cephfs-bench.XXXXXX)
ctl=
cleanup() {
  [ -z "$ctl" ] || kill "$ctl" 2>/dev/null || true
  tests/backends/ceph.sh stop "$work/backend" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
eval "$(tests/backends/ceph.sh start "$work/backend")"
"$bin/rcsi" controller --driver cephfs --endpoint "unix://$work/csi.sock" \
  --ceph-config "$CEPH_CONFIG_FILE" > "$work/controller.log" 2>&1 &
ctl=$!
for _ in $(seq 100); do [ -S "$work/csi.sock" ] && break; sleep 0.05; done
echo "controller idle RSS: $(awk '/VmRSS/ {print $2}' "/proc/$ctl/status") kB"
params=()
while IFS=': ' read -r k v; do
  [ -n "$k" ] && params+=(--param "$k=$v")
done < "$CEPHFS_SC_PARAMS_FILE"
for clients in 1 16; do
  echo "== $clients client(s)"
  "$bin/csi-bench" --endpoint "unix://$work/csi.sock" --clients "$clients" --ops "$pairs" \
    --pid "$ctl" --secrets "$CEPH_SECRETS_FILE" --prefix "bench-$clients" "${params[@]}"
done
