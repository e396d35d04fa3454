#!/usr/bin/env bash
# CephFS figures on this machine, against the test Ceph of
# tests/backends/ceph.sh: csi-bench create+delete pairs (a subvolume with
# its quota, the journal entry, and their removal) with 1 and 16 clients
# and the controller's resident memory; then the node plugin with the
# ceph-fuse mounter (the host has no ceph module): NodePublishVolume times
# and the resident memory of the plugin and of the ceph-fuse processes with
# VOLUMES volumes published.
#   tests/bench/cephfs.sh [PAIRS] [VOLUMES]
set -euo pipefail
cd "$(dirname "$0")/../.."
pairs=${1:-400}
volumes=${2:-20}
cargo build --release -q -p rcsi
cargo build --release -q -p rcsi-tests --bin csi-bench --bin publish-bench
bin=target/release
work=$(mktemp -d /tmp/rcsi-cephfs-bench.XXXXXX)
ctl=
plugin=
cleanup() {
  [ -z "$ctl" ] || kill "$ctl" 2>/dev/null || true
  [ -z "$plugin" ] || kill "$plugin" 2>/dev/null || true
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
kill "$ctl"
ctl=
"$bin/rcsi" node --driver cephfs --endpoint "unix://$work/node.sock" --node-id bench \
  --serve-controller --ceph-config "$CEPH_CONFIG_FILE" --state-dir "$work/state" \
  > "$work/plugin.log" 2>&1 &
plugin=$!
for _ in $(seq 100); do [ -S "$work/node.sock" ] && break; sleep 0.05; done
echo "node plugin idle RSS: $(awk '/VmRSS/ {print $2}' "/proc/$plugin/status") kB"
"$bin/publish-bench" --endpoint "unix://$work/node.sock" --volumes "$volumes" --size 268435456 \
  --params "$CEPHFS_SC_PARAMS_FILE" --secrets "$CEPH_SECRETS_FILE" --scratch "$work" \
  --pid "$plugin" --helpers ceph-fuse
