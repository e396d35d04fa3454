#!/usr/bin/env bash
# End-to-end run of overlays/local-path on the one-node cluster of
# ../shared/k8s (root): builds the image from a release rcsi, applies the
# overlay as README says plus only the cluster's quirks
# (tests/e2e/local-path/kustomization.yaml), then checks with figures:
#   - the plugin registers with the kubelet (CSINode lists local.rcsi.io);
#   - a pod with an ext4 image volume (RWOP), a directory volume and a raw
#     block volume writes and reads its data; time from apply to Running;
#   - deleting a Bound PV by hand while its pod writes keeps the data
#     (the driver refuses DeleteVolume of a mounted volume);
#   - after the node plugin pod is replaced, the old pod's volumes are still
#     readable, and deleting the pod unstages them (no loop device left);
#   - deleting the claims leaves no PV, volume directory, image, loop or mount.
# Usage: tests/e2e/local-path.sh RCSI_BINARY [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:?usage: $0 RCSI_BINARY [WORKDIR]}
export WORKDIR=${2:-/var/tmp/k8s-test}
kit=../shared/k8s/cluster.sh
fail() { echo "e2e: FAILED: $*" >&2; exit 1; }

"$kit" install >&2 || true
for p in mmdebstrap umoci skopeo; do
  command -v "$p" >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$p" >&2
done
eval "$("$kit" up "$WORKDIR")"
rootfs=$WORKDIR/rcsi-rootfs
[ -d "$rootfs" ] || "$kit" debian-rootfs "$rootfs" util-linux,mount,e2fsprogs,xfsprogs >&2
install -m755 "$bin" "$rootfs/usr/local/bin/rcsi"
"$kit" image rcsi example.test/rcsi:e2e "$rootfs" /usr/local/bin/rcsi >&2

kubectl apply -k tests/e2e/local-path >/dev/null
kubectl -n rcsi-system rollout status ds/rcsi-node --timeout=120s >/dev/null
for _ in $(seq 60); do
  kubectl get csinode -o jsonpath='{.items[0].spec.drivers[*].name}' | grep -q local.rcsi.io && break
  sleep 1
done
kubectl get csinode -o jsonpath='{.items[0].spec.drivers[*].name}' | grep -q local.rcsi.io ||
  fail "local.rcsi.io never registered with the kubelet"
echo "e2e: registered with the kubelet"

t0=$(date +%s.%N)
kubectl apply -f tests/e2e/workload.yaml >/dev/null
kubectl wait pod/e2e-app --for=condition=Ready --timeout=180s >/dev/null
echo "e2e: 3 PVCs + pod to Running in $(echo "$(date +%s.%N) - $t0" | bc) s"
got=$(kubectl exec e2e-app -- sh -c 'cat /data/f /dir/f; head -c 9 /dev/xvda')
[ "$got" = "$(printf 'hello-file\nhello-dir\nhello-blk')" ] || fail "data read back: $got"

pv=$(kubectl get pvc e2e-dir -o jsonpath='{.spec.volumeName}')
kubectl delete pv "$pv" --wait=false >/dev/null
sleep 5
kubectl exec e2e-app -- sh -c 'cat /dir/f && echo more >> /dir/f' | grep -q hello-dir ||
  fail "the data of a mounted volume went with its PV"
echo "e2e: a Bound PV deleted by hand kept its data while mounted"

kubectl -n rcsi-system delete pod -l app.kubernetes.io/name=rcsi-node --wait=true >/dev/null
kubectl -n rcsi-system rollout status ds/rcsi-node --timeout=120s >/dev/null
kubectl exec e2e-app -- sh -c 'cat /data/f; head -c 9 /dev/xvda' | grep -q hello-blk ||
  fail "volumes unreadable after the node plugin restarted"
kubectl delete pod e2e-app --timeout=120s >/dev/null
losetup -a | grep -q /var/lib/rcsi/local && fail "loop devices left after unstage: $(losetup -a)"
echo "e2e: node plugin restarted under a running pod; unstage detached every loop device"

kubectl delete -f tests/e2e/workload.yaml --ignore-not-found --wait=false >/dev/null
for _ in $(seq 60); do
  [ -z "$(kubectl get pv --no-headers 2>/dev/null)" ] && break
  sleep 1
done
[ -z "$(kubectl get pv --no-headers 2>/dev/null)" ] || fail "PVs left: $(kubectl get pv)"
[ -z "$(ls -A /var/lib/rcsi/local/volumes)" ] || fail "volume data left: $(ls -A /var/lib/rcsi/local/volumes)"
grep -q local.rcsi.io /proc/self/mountinfo && fail "mounts left"
echo "e2e: 1 passed, 0 failed"
