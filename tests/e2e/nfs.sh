#!/usr/bin/env bash
# manifests/overlays/nfs on the kit's cluster (tests/e2e/nfs/ holds only the
# cluster's quirks) against a real nfs-ganesha on 127.0.0.1: claims are
# provisioned, snapshotted, restored, cloned, expanded and deleted through
# the controller Deployment (two replicas, one leader) and the rcsi
# provisioner, with every directory checked on the export; the leader's
# Lease moves when it is deleted. Pods do not mount the volumes: this host's
# kernel has no NFS client (the node plugin's mounts are tested in the node
# VM), so the node plugin is only checked to register. Run by run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/e2e/lib.sh
denied_before=$(denials)
lease=rcsi-provisioner-nfs-rcsi-io
nfs=$WORKDIR/nfs-server
tests/backends/nfs.sh stop "$nfs" >/dev/null 2>&1 || true
eval "$(tests/backends/nfs.sh start "$nfs")"
trap 'kubectl delete -k tests/e2e/nfs --wait=false >/dev/null 2>&1 || true; tests/backends/nfs.sh stop "$nfs"' EXIT
export="$NFS_EXPORT_DIR"

t=$(now)
kubectl apply -k tests/e2e/nfs >/dev/null
kubectl -n rcsi-system rollout status deploy/rcsi-controller --timeout=180s >/dev/null
kubectl -n rcsi-system rollout status ds/rcsi-node --timeout=180s >/dev/null
wait_for 60 "the node plugin never registered nfs.rcsi.io" \
  sh -c "kubectl get csinode -o jsonpath='{.items[*].spec.drivers[*].name}' | grep -qw nfs.rcsi.io"
figure "nfs: overlay applied, controller and node plugin ready, registered in $(since "$t") s"

dir_of() { # the volume directory of claim $1 on the export
  echo "$export/default/$1-$(kubectl get pvc "$1" -o jsonpath='{.spec.volumeName}')"
}
bound() { wait_for 60 "claim $1 never bound" sh -c "[ \"\$(kubectl get pvc $1 -o jsonpath={.status.phase})\" = Bound ]"; }

t=$(now)
claim data rcsi-nfs 1Gi Filesystem ReadWriteMany | kubectl apply -f - >/dev/null
bound data
figure "nfs: claim bound in $(since "$t") s"
d=$(dir_of data)
[ -d "$d" ] || fail "no directory $d on the export"
[ "$(stat -c %a "$d")" = 777 ] || fail "$d has mode $(stat -c %a "$d"), not the StorageClass's 0777"
echo "written before the snapshot" > "$d/file"

figure "nfs: snapshot ready in $(snapshot snap data rcsi-nfs) s"
echo "written after the snapshot" > "$d/file"
t=$(now)
{
  claim restored rcsi-nfs 1Gi Filesystem ReadWriteMany \
    "  dataSource: {name: snap, kind: VolumeSnapshot, apiGroup: snapshot.storage.k8s.io}"
  claim cloned rcsi-nfs 1Gi Filesystem ReadWriteMany "  dataSource: {name: data, kind: PersistentVolumeClaim}"
} | kubectl apply -f - >/dev/null
bound restored
bound cloned
figure "nfs: restore and clone bound in $(since "$t") s"
[ "$(cat "$(dir_of restored)/file")" = "written before the snapshot" ] || fail "the restored volume does not hold the snapshot's data"
[ "$(cat "$(dir_of cloned)/file")" = "written after the snapshot" ] || fail "the clone does not hold the source's data"

figure "nfs: expansion to 2Gi in $(resize data 2Gi 60) s"

# Two replicas, one leader; deleting it hands the Lease over.
holder() { kubectl -n rcsi-system get lease "$lease" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null; }
pods() { kubectl -n rcsi-system get pod -l app.kubernetes.io/name=rcsi-controller -o jsonpath='{.items[*].metadata.name}'; }
first=$(holder)
echo " $(pods) " | grep -q " $first " || fail "lease holder $first is not a replica: $(pods)"
t=$(now)
kubectl -n rcsi-system delete pod "$first" --wait=false >/dev/null
wait_for 90 "the lease never moved from $first" sh -c "h=\$(kubectl -n rcsi-system get lease $lease -o jsonpath='{.spec.holderIdentity}'); [ -n \"\$h\" ] && [ \"\$h\" != $first ]"
figure "nfs: leader $first deleted, $(holder) took the lease in $(since "$t") s"

# The new leader deletes everything: no directory, record or copy is left.
dirs="$(dir_of data) $(dir_of restored) $(dir_of cloned)"
t=$(now)
kubectl delete volumesnapshot snap --wait=false >/dev/null
kubectl delete pvc data restored cloned --wait=false >/dev/null
wait_for 90 "PVs left: $(kubectl get pv --no-headers 2>/dev/null)" sh -c '[ -z "$(kubectl get pv --no-headers 2>/dev/null)" ]'
wait_for 60 "snapshot contents left" sh -c '[ -z "$(kubectl get volumesnapshotcontent --no-headers 2>/dev/null)" ]'
figure "nfs: three claims and a snapshot deleted in $(since "$t") s"
for x in $dirs; do [ ! -e "$x" ] || fail "$x is still on the export"; done
left=$(find "$export/.rcsi" -mindepth 2 2>/dev/null | head)
[ -z "$left" ] || fail "records or copies left on the export: $left"

d=$(($(denials) - denied_before))
[ "$d" -eq 0 ] || fail "nfs: $d API requests of rcsi-system service accounts were denied (403)"
kubectl delete -k tests/e2e/nfs --wait=true >/dev/null
ok "nfs: provision, snapshot, restore, clone, expand, leader handover, delete; no 403"
