#!/usr/bin/env bash
# overlays/local-path-sidecars on the kit's cluster (csi-provisioner and
# csi-snapshotter in node-deployment mode, node-driver-registrar,
# livenessprobe; the kit's sidecar images), applied as README says plus only
# the cluster's quirks (tests/e2e/local-path-sidecars/). Run by run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/e2e/lib.sh
denied_before=$(denials)

kubectl apply -k tests/e2e/local-path-sidecars >/dev/null
kubectl -n rcsi-system rollout status ds/rcsi-node --timeout=180s >/dev/null
registered() { kubectl get csinode -o jsonpath='{.items[0].spec.drivers[*].name}' | grep -q local.rcsi.io; }
wait_for 60 "local.rcsi.io never registered through node-driver-registrar" registered
ok "sidecars: registered through node-driver-registrar"

w=$(mktemp -d)
{
  claim sc-data rcsi-local-file 64Mi
  claim sc-blk rcsi-local-file 64Mi Block
  pod sc-pod sc-data 'echo hello-sidecars > /data/f && sleep 3600'
  pod sc-blk-pod sc-blk 'echo hello-blk | dd of=/dev/xvda conv=sync bs=512 2>/dev/null && sleep 3600' block
} > "$w/app.yaml"
apply_ready "$w/app.yaml" "sidecars: image + block claims with pods" sc-pod sc-blk-pod
[ "$(kubectl exec sc-pod -- cat /data/f)" = hello-sidecars ] || fail "sidecars: data read back"
[ "$(kubectl exec sc-blk-pod -- head -c 9 /dev/xvda)" = hello-blk ] || fail "sidecars: block data"

s=$(snapshot sc-snap sc-data)
figure "sidecars: snapshot of a mounted image volume ready in $s s"
{
  claim sc-restored rcsi-local-file 64Mi Filesystem ReadWriteOnce \
    '  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: sc-snap}'
  pod sc-restored-pod sc-restored 'sleep 3600'
} > "$w/restore.yaml"
apply_ready "$w/restore.yaml" "" sc-restored-pod
[ "$(kubectl exec sc-restored-pod -- cat /data/f)" = hello-sidecars ] || fail "sidecars: restored data"
kubectl delete volumesnapshot sc-snap --timeout=60s >/dev/null || fail "sidecars: deleting the snapshot hangs"
ok "sidecars: provision, block, snapshot, restore, snapshot delete"

# Liveness goes through the livenessprobe sidecar: the node plugin stays up.
restarts=$(kubectl -n rcsi-system get pod -l app.kubernetes.io/name=rcsi-node \
  -o jsonpath='{.items[0].status.containerStatuses[?(@.name=="rcsi")].restartCount}')
[ "$restarts" = 0 ] || fail "sidecars: the rcsi container restarted $restarts times"

kubectl delete -f "$w/restore.yaml" -f "$w/app.yaml" --wait=true >/dev/null
wait_for 120 "sidecars: PVs left" sh -c '[ -z "$(kubectl get pv --no-headers 2>/dev/null)" ]'
no_leaks
d=$(($(denials) - denied_before))
[ "$d" -eq 0 ] || fail "sidecars: $d API requests of rcsi-system service accounts were denied (403)"
ok "sidecars: nothing left, no 403"
kubectl delete -k tests/e2e/local-path-sidecars --wait=true >/dev/null
rm -rf "$w"
echo "e2e: overlays/local-path-sidecars passed"
