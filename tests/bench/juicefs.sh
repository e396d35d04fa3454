#!/usr/bin/env bash
# JuiceFS node figures on this machine, with real JuiceFS (redis metadata,
# file storage from tests/backends/juicefs.sh): NodePublishVolume to a
# writable target for the first volume of a filesystem and the next ones,
# the resident memory of the plugin and of the filesystem's juicefs mount,
# and rbench sequential and metadata runs through a published volume (a
# bind mount) next to the same runs on the juicefs mount directly.
#   tests/bench/juicefs.sh [VOLUMES]
set -euo pipefail
cd "$(dirname "$0")/../.."
volumes=${1:-10}
cargo build --release -q -p rcsi -p rbench
cargo build --release -q -p rcsi-tests --bin publish-bench
bin=target/release
work=$(mktemp -d /tmp/rcsi-juicefs-bench.XXXXXX)
plugin=
cleanup() {
  [ -z "$plugin" ] || kill "$plugin" 2>/dev/null || true
  tests/backends/juicefs.sh stop "$work/backend" >/dev/null 2>&1 || true
  grep -o "$work/[^ ]*" /proc/self/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
eval "$(tests/backends/juicefs.sh start "$work/backend")"
"$bin/rcsi" node --driver juicefs --endpoint "unix://$work/csi.sock" --node-id bench \
  --serve-controller --state-dir "$work/state" > "$work/plugin.log" 2>&1 &
plugin=$!
for _ in $(seq 100); do [ -S "$work/csi.sock" ] && break; sleep 0.05; done
idle=$(awk '/VmRSS/ {print $2}' "/proc/$plugin/status")
echo "plugin idle RSS: $idle kB"

out=$("$bin/publish-bench" --endpoint "unix://$work/csi.sock" --volumes "$volumes" \
  --params "$JUICEFS_SC_PARAMS_FILE" --secrets "$JUICEFS_SECRETS_FILE" --scratch "$work" \
  --pid "$plugin" --helpers "$work/state/mounts/" --keep)
echo "$out"
target=$(echo "$out" | sed -n 's/^kept: .* target=//p')
mnt=$(echo "$work"/state/mounts/*-*[0-9a-f])
direct=$mnt/bench-direct
mkdir -p "$direct"
for where in "$target" "$direct"; do
  echo "== rbench through ${where/$work/WORK}"
  mkdir -p "$where/meta"
  "$bin/rbench" -w -r -t 1 -s 512m -b 1m --progress never "$where/seq"
  "$bin/rbench" -d -w -r --stat -F -D -t 2 -n 4 -N 250 -s 4k -b 4k --progress never "$where/meta"
done
