#!/usr/bin/env bash
# RBD node figures on this machine, with the test Ceph of
# tests/backends/ceph.sh and the rbd-fuse mounter (the host has no rbd or
# nbd module): NodePublishVolume to a writable target for the first and the
# next volumes, and the resident memory of the plugin and of the rbd-fuse
# processes with VOLUMES volumes published.
#   tests/bench/rbd.sh [VOLUMES] [SIZE_BYTES]
set -euo pipefail
cd "$(dirname "$0")/../.."
volumes=${1:-20}
size=${2:-268435456}
cargo build --release -q -p rcsi
cargo build --release -q -p rcsi-tests --bin publish-bench
bin=target/release
work=$(mktemp -d /tmp/rcsi-rbd-bench.XXXXXX)
plugin=
cleanup() {
  [ -z "$plugin" ] || kill "$plugin" 2>/dev/null || true
  tests/backends/ceph.sh stop "$work/backend" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
eval "$(tests/backends/ceph.sh start "$work/backend")"
"$bin/rcsi" node --driver rbd --endpoint "unix://$work/csi.sock" --node-id bench \
  --serve-controller --ceph-config "$CEPH_CONFIG_FILE" --state-dir "$work/state" \
  > "$work/plugin.log" 2>&1 &
plugin=$!
for _ in $(seq 100); do [ -S "$work/csi.sock" ] && break; sleep 0.05; done
idle=$(awk '/VmRSS/ {print $2}' "/proc/$plugin/status")
echo "plugin idle RSS: $idle kB"
"$bin/publish-bench" --endpoint "unix://$work/csi.sock" --volumes "$volumes" --size "$size" \
  --params "$CEPH_RBD_SC_PARAMS_FILE" --secrets "$CEPH_SECRETS_FILE" --scratch "$work" \
  --pid "$plugin" --helpers rbd-fuse
