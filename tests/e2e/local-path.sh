#!/usr/bin/env bash
# overlays/local-path on the kit's cluster, applied as README says plus only
# the cluster's quirks (tests/e2e/local-path/). Run by tests/e2e/run.sh, which
# starts the cluster and builds the image. Checks, with figures:
#   - registration with the kubelet; the README's worked example (filesystem)
#     and a block volume, data written and read back;
#   - expansion of directory, image and block volumes to a clean PVC status;
#   - snapshot create, restore, delete (content finalizer gone); clone;
#   - the node plugin pod deleted under running pods: data kept, and the new
#     plugin publishes, expands and unstages them;
#   - a kubelet restart; a PVC deleted while its pod runs; a Bound PV deleted
#     by hand (data kept until Released);
#   - a burst of 20 PVCs with pods (creation to Running, p50 and max);
#   - zero leaks after deletion, and no 403 for our service accounts.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/e2e/lib.sh
kit=${KIT:-../shared/k8s/cluster.sh}
denied_before=$(denials)

# --- install exactly as README says (plus the quirks) ---
kubectl apply -k tests/e2e/local-path >/dev/null
kubectl -n rcsi-system rollout status ds/rcsi-node --timeout=120s >/dev/null
t=$(now)
registered() { kubectl get csinode -o jsonpath='{.items[0].spec.drivers[*].name}' | grep -q local.rcsi.io; }
wait_for 60 "local.rcsi.io never registered with the kubelet" registered
ok "registered with the kubelet"
wait_for 60 "no CSIStorageCapacity published" \
  sh -c 'kubectl -n rcsi-system get csistoragecapacities -o name | grep -q .'
owner=$(kubectl -n rcsi-system get csistoragecapacities -o jsonpath='{.items[0].metadata.ownerReferences[0].kind}')
[ "$owner" = DaemonSet ] || fail "CSIStorageCapacity owner is '$owner', not the DaemonSet"
ok "CSIStorageCapacity published, owned by the DaemonSet"

# --- the README's worked example, literally (plus imagePullPolicy: Never) ---
ex=$(mktemp -d)
awk '/^A worked example:/{f=1} f&&/^```yaml/{g=1; next} g&&/^```/{exit} g' README.md > "$ex/example.yaml"
grep -q 'kind: Pod' "$ex/example.yaml" || fail "no worked example found in README.md"
cat > "$ex/kustomization.yaml" <<'EOF'
resources: [example.yaml]
patches:
  - target: {kind: Pod}
    patch: |-
      - op: add
        path: /spec/containers/0/imagePullPolicy
        value: Never
EOF
t=$(now)
kubectl apply -k "$ex" >/dev/null
kubectl wait pod/writer --for=condition=Ready --timeout=180s >/dev/null
figure "worked example (ext4 image, RWOP, fsGroup): apply to Running $(since "$t") s"
got=$(kubectl exec writer -- sh -c 'cat /data/hello; stat -c %g /data/hello')
[ "$got" = "$(printf 'hello\n2000')" ] || fail "worked example read back: $got"
ok "worked example: data written and read back with group 2000"

# --- a block volume and a directory volume ---
{
  claim e2e-blk rcsi-local-file 64Mi Block
  claim e2e-dir rcsi-local 64Mi
  pod e2e-blk-pod e2e-blk 'echo hello-blk | dd of=/dev/xvda conv=sync bs=512 2>/dev/null && sleep 3600' block
  pod e2e-dir-pod e2e-dir 'echo hello-dir > /data/f && sleep 3600'
} | apply_ready - "block + directory claims with pods" e2e-blk-pod e2e-dir-pod
[ "$(kubectl exec e2e-blk-pod -- head -c 9 /dev/xvda)" = hello-blk ] || fail "block data"
[ "$(kubectl exec e2e-dir-pod -- cat /data/f)" = hello-dir ] || fail "directory data"
ok "block and directory volumes: data written and read back"

# --- expansion, all the way to a clean PVC status ---
s=$(resize e2e-dir 128Mi 120) || fail "directory volume resize never finished"
figure "expansion, directory volume in use: $s s to a clean status"
s=$(resize e2e-blk 128Mi 120) || fail "block volume resize never finished"
size=$(kubectl exec e2e-blk-pod -- blockdev --getsize64 /dev/xvda)
[ "$size" = $((128 << 20)) ] || fail "the pod sees $size bytes after the block resize"
figure "expansion, block volume in use: $s s to a clean status, the pod sees 128Mi"
# An ext4 image in use cannot grow online here (no CAP_SYS_RESOURCE): it grows
# at the next stage, so the pod is recreated.
kubectl patch pvc data -p '{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}' >/dev/null
sleep 5
t=$(now)
# Its shell ignores SIGTERM: without a short grace period this waits 30 s.
kubectl delete pod writer --grace-period=1 --wait=true >/dev/null
deleted=$(since "$t")
t=$(now)
kubectl kustomize "$ex" | python3 -c '
import sys, yaml
print(yaml.safe_dump([d for d in yaml.safe_load_all(sys.stdin) if d["kind"] == "Pod"][0]))' |
  kubectl apply -f - >/dev/null
kubectl wait pod/writer --for=condition=Ready --timeout=180s >/dev/null
wait_for 120 "image volume resize never finished: $(kubectl get pvc data -o jsonpath='{.status}')" resize_done data 2Gi
kb=$(kubectl exec writer -- df -k /data | awk 'NR==2{print $2}')
[ "$kb" -gt $((1800 * 1024)) ] || fail "the image filesystem has $kb KiB after growing to 2Gi"
figure "expansion, ext4 image volume: pod deleted in $deleted s, recreated to a clean status in $(since "$t") s, ${kb} KiB filesystem"
ok "expansion: directory, block and image volumes reach a clean status"

# --- snapshots, restore, clone ---
s=$(snapshot e2e-snap e2e-dir)
figure "snapshot of a directory volume in use: ready in $s s"
{
  claim e2e-restored rcsi-local 128Mi Filesystem ReadWriteOnce \
    '  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: e2e-snap}'
  claim e2e-clone rcsi-local 128Mi Filesystem ReadWriteOnce \
    '  dataSource: {kind: PersistentVolumeClaim, name: e2e-dir}'
  pod e2e-restored-pod e2e-restored 'cat /data/f && sleep 3600'
  pod e2e-clone-pod e2e-clone 'cat /data/f && sleep 3600'
} > "$ex/restore.yaml"
apply_ready "$ex/restore.yaml" "restore + clone with pods" e2e-restored-pod e2e-clone-pod
[ "$(kubectl exec e2e-restored-pod -- cat /data/f)" = hello-dir ] || fail "restored data"
[ "$(kubectl exec e2e-clone-pod -- cat /data/f)" = hello-dir ] || fail "cloned data"
content=$(kubectl get volumesnapshot e2e-snap -o jsonpath='{.status.boundVolumeSnapshotContentName}')
t=$(now)
kubectl delete volumesnapshot e2e-snap --timeout=60s >/dev/null || fail "deleting the VolumeSnapshot hangs"
wait_for 60 "content $content never went away" sh -c "! kubectl get volumesnapshotcontent $content"
[ -z "$(ls -A /var/lib/rcsi/local/snapshots)" ] || fail "snapshot data left after delete"
figure "snapshot delete (VolumeSnapshot and content gone, data removed): $(since "$t") s"
kubectl delete -f "$ex/restore.yaml" --wait=true >/dev/null
ok "snapshot create, restore, delete; clone"

# --- the node plugin pod is replaced under running pods ---
t=$(now)
kubectl -n rcsi-system delete pod -l app.kubernetes.io/name=rcsi-node --wait=true >/dev/null
kubectl -n rcsi-system rollout status ds/rcsi-node --timeout=120s >/dev/null
wait_for 60 "re-registration" registered
figure "node plugin pod replaced and registered again: $(since "$t") s"
[ "$(kubectl exec e2e-dir-pod -- cat /data/f)" = hello-dir ] || fail "directory data after plugin restart"
[ "$(kubectl exec e2e-blk-pod -- head -c 9 /dev/xvda)" = hello-blk ] || fail "block data after plugin restart"
# The new plugin publishes the staged block volume to a second pod, expands and unstages it.
pod e2e-blk-pod2 e2e-blk 'sleep 3600' block | apply_ready - "" e2e-blk-pod2
[ "$(kubectl exec e2e-blk-pod2 -- head -c 9 /dev/xvda)" = hello-blk ] || fail "second publish of the staged block volume"
s=$(resize e2e-blk 192Mi 120) || fail "block resize after the plugin restart never finished"
figure "block volume expanded after the plugin restart: $s s"
kubectl delete pod e2e-blk-pod e2e-blk-pod2 --wait=true >/dev/null
handle=$(kubectl get pv "$(kubectl get pvc e2e-blk -o jsonpath='{.spec.volumeName}')" -o jsonpath='{.spec.csi.volumeHandle}')
[ -n "$handle" ] || fail "no volume handle for e2e-blk"
! losetup -a | grep -q "/$handle" ||
  fail "the block volume's loop device survived its unstage"
ok "node plugin replaced: data kept; publish, expand and unstage work"

# --- a kubelet restart ---
t=$(now)
pkill -f "$WORKDIR/bin/kubelet" || fail "no kubelet to restart"
sleep 2
eval "$("$kit" up "$WORKDIR" 2>/dev/null)"
wait_for 120 "node not Ready after the kubelet restart" kubectl wait node --all --for=condition=Ready --timeout=1s
[ "$(kubectl exec e2e-dir-pod -- cat /data/f)" = hello-dir ] || fail "directory data after the kubelet restart"
pod e2e-after-kubelet e2e-dir 'cat /data/f && sleep 3600' | apply_ready - "" e2e-after-kubelet
figure "kubelet restarted, node Ready and a new pod on an existing volume Running: $(since "$t") s"
kubectl delete pod e2e-after-kubelet --wait=true >/dev/null
ok "kubelet restart"

# --- a PVC deleted while its pod runs ---
kubectl delete pvc e2e-dir --wait=false >/dev/null
sleep 3
[ "$(kubectl get pvc e2e-dir -o jsonpath='{.status.phase}')" = Bound ] || fail "the claim went while in use"
kubectl exec e2e-dir-pod -- sh -c 'echo still >> /data/f' || fail "write to a claim being deleted"
pv=$(kubectl get pvc e2e-dir -o jsonpath='{.spec.volumeName}')
kubectl delete pod e2e-dir-pod --wait=true >/dev/null
wait_for 60 "PV $pv of the deleted claim never went away" sh -c "! kubectl get pv $pv"
ok "a PVC deleted while its pod ran stayed until the pod went, then its volume was deleted"

# --- a Bound PV deleted by hand ---
{
  claim e2e-keep rcsi-local 64Mi
  pod e2e-keep-pod e2e-keep 'echo kept > /data/f && sleep 3600'
} | apply_ready - "" e2e-keep-pod
pv=$(kubectl get pvc e2e-keep -o jsonpath='{.spec.volumeName}')
kubectl delete pv "$pv" --wait=false >/dev/null
sleep 5
kubectl exec e2e-keep-pod -- sh -c 'cat /data/f && echo more >> /data/f' | grep -q kept ||
  fail "the data of a Bound PV went when the PV was deleted"
handle=$(kubectl get pv "$pv" -o jsonpath='{.spec.csi.volumeHandle}')
[ -d "/var/lib/rcsi/local/volumes/${handle: -1}/$handle" ] ||
  fail "the volume directory of a Bound PV went"
kubectl delete pod e2e-keep-pod --wait=true >/dev/null
kubectl delete pvc e2e-keep --wait=false >/dev/null
wait_for 60 "the hand-deleted PV never went after its claim was released" sh -c "! kubectl get pv $pv"
ok "a Bound PV deleted by hand kept its data until Released, then was deleted"

# --- a burst of 20 claims with pods ---
for i in $(seq 20); do
  claim "burst-$i" rcsi-local 16Mi
  pod "burst-$i" "burst-$i" "echo $i > /data/f && sleep 3600"
done > "$ex/burst.yaml"
# Calls of CSI method $1 that ended with message $2 ("ok" or "failed").
rpcs() {
  kubectl -n rcsi-system logs ds/rcsi-node -c rcsi | grep "\"method\":\"$1\"" |
    grep -c "\"message\":\"$2\"" || true
}
conflicts() { kubectl -n rcsi-system logs ds/rcsi-node -c provisioner | grep -ci conflict || true; }
deletes_before=$(rpcs DeleteVolume ok)
refused_before=$(rpcs DeleteVolume failed)
conflicts_before=$(conflicts)
t=$(now)
apply_ready "$ex/burst.yaml" "" $(for i in $(seq 20); do echo "burst-$i"; done)
all=$(since "$t")
times=$(for i in $(seq 20); do ready_after "burst-$i"; done)
figure "burst of 20 PVCs + pods: all Running in $all s; PVC-to-Running p50 $(echo "$times" | percentile 50) s, max $(echo "$times" | percentile 100) s"
t=$(now)
kubectl delete -f "$ex/burst.yaml" --wait=true >/dev/null
wait_for 120 "burst PVs left" sh -c '! kubectl get pv --no-headers 2>/dev/null | grep -q burst-'
figure "burst cleanup: $(since "$t") s"
sleep 2
# A volume still mounted is refused (FailedPrecondition) and retried; each
# volume is deleted exactly once.
d=$(($(rpcs DeleteVolume ok) - deletes_before))
[ "$d" -eq 20 ] || fail "$d successful DeleteVolume calls for the 20 burst volumes"
figure "burst cleanup: DeleteVolume failed (and was retried) $(($(rpcs DeleteVolume failed) - refused_before)) times"
c=$(($(conflicts) - conflicts_before))
[ "$c" -eq 0 ] || fail "$c conflict warnings from the provisioner during the burst"
ok "burst: one successful DeleteVolume per volume, no conflict warnings"

# --- everything else goes; nothing is left ---
kubectl delete -k "$ex" --wait=true >/dev/null
kubectl delete pvc e2e-blk --wait=true >/dev/null
wait_for 120 "PVs left after deleting every claim" sh -c '[ -z "$(kubectl get pv --no-headers 2>/dev/null)" ]'
no_leaks
ok "no PV, volume, snapshot, loop device or mount left"
d=$(($(denials) - denied_before))
[ "$d" -eq 0 ] || fail "$d API requests of rcsi-system service accounts were denied (403)"
ok "no 403 for rcsi-system service accounts in the audit log"
kubectl delete -k tests/e2e/local-path --wait=true >/dev/null
rm -rf "$ex"
echo "e2e: overlays/local-path passed"
