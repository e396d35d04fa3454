#!/usr/bin/env bash
# manifests/overlays/cephfs on the kit's cluster (tests/e2e/cephfs/ holds only
# the cluster's quirks) against a real Ceph 16.2 on 127.0.0.1
# (tests/backends/ceph.sh): a ReadWriteMany claim is provisioned as a
# subvolume with its size as quota, mounted by ceph-fuse and shared by a
# writer and a reader pod; the node plugin is killed (SIGKILL) and restarted
# by the kubelet: the writer sees no error and ceph-fuse stays, outside the
# plugin's cgroups. Then ceph-fuse is killed: the plugin mounts the volume
# again and binds it over the pods' volumes (the writer mounts it with
# mountPropagation: HostToContainer). A snapshot is restored into a new
# claim, the claim grows, and everything is deleted: no subvolume, snapshot,
# journal key, ceph-fuse process or mount is left. Run by run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/e2e/lib.sh
denied_before=$(denials)
backend=$WORKDIR/ceph-backend
tests/backends/ceph.sh stop "$backend" >/dev/null 2>&1 || true
eval "$(tests/backends/ceph.sh start "$backend")"
cluster_id=$(grep -o '"clusterID": "[^"]*"' "$CEPH_CONFIG_FILE" | cut -d'"' -f4)
key=$(awk '/^NodeStageVolumeSecret:/ {f = 1} f && /userKey:/ {gsub(/"/, "", $2); print $2; exit}' "$CEPH_SECRETS_FILE")
render() {
  kubectl kustomize tests/e2e/cephfs |
    sed -e "s|@CLUSTER_ID@|$cluster_id|g" -e "s|@MONITOR@|$CEPH_MON_HOST|g" -e "s|@USER_KEY@|$key|g"
}
cleanup() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    echo "cephfs: the plugins' last log lines:" >&2
    kubectl -n rcsi-system logs ds/rcsi-node --tail=40 >&2 || true
    kubectl -n rcsi-system logs deploy/rcsi-controller -c rcsi-controller --tail=20 >&2 || true
    # E2E_KEEP=1 keeps the failed state (and the Ceph cluster) to look at.
    [ "${E2E_KEEP:-0}" = 1 ] && return
  fi
  kubectl delete pod writer reader restorer --wait=false >/dev/null 2>&1 || true
  render | kubectl delete -f - --wait=false >/dev/null 2>&1 || true
  tests/backends/ceph.sh stop "$backend"
  rmdir /sys/fs/cgroup/*/rcsi-cephfs /sys/fs/cgroup/rcsi-cephfs 2>/dev/null || true
}
trap cleanup EXIT
ceph() { command ceph -c "$CEPH_CONF" "$@"; }

t=$(now)
render | kubectl apply -f - >/dev/null
kubectl -n rcsi-system rollout status deploy/rcsi-controller --timeout=180s >/dev/null
kubectl -n rcsi-system rollout status ds/rcsi-node --timeout=180s >/dev/null
wait_for 60 "the node plugin never registered cephfs.rcsi.io" \
  sh -c "kubectl get csinode -o jsonpath='{.items[*].spec.drivers[*].name}' | grep -qw cephfs.rcsi.io"
figure "cephfs: overlay applied, controller and node plugin ready, registered in $(since "$t") s"

bound() { wait_for 60 "claim $1 never bound" sh -c "[ \"\$(kubectl get pvc $1 -o jsonpath={.status.phase})\" = Bound ]"; }
subvolume_of() { kubectl get pv "$(kubectl get pvc "$1" -o jsonpath='{.spec.volumeName}')" -o jsonpath='{.spec.csi.volumeAttributes.subvolumeName}'; }
t=$(now)
claim data rcsi-cephfs 1Gi Filesystem ReadWriteMany | kubectl apply -f - >/dev/null
bound data
figure "cephfs: claim bound (subvolume created) in $(since "$t") s"
sub=$(subvolume_of data)
quota() { ceph fs subvolume info cephfs "$sub" csi -f json | python3 -c 'import json, sys; print(json.load(sys.stdin)["bytes_quota"])'; }
[ "$(quota)" = $((1 << 30)) ] || fail "subvolume $sub has quota $(quota), not 1 GiB"

# A writer that appends a line every 50 ms and reports every failed write;
# HostToContainer lets it see the volume when the plugin binds it again.
t=$(now)
pod writer data 'i=0; while true; do i=$((i+1)); echo $i >> /data/log || echo write-error $i; sleep 0.05; done' \
  "" HostToContainer | kubectl apply -f - >/dev/null
pod reader data 'sleep 3600' | kubectl apply -f - >/dev/null
kubectl wait --for=condition=Ready --timeout=120s pod/writer pod/reader >/dev/null
figure "cephfs: writer and reader pods Running $(since "$t") s after they were created (one ceph-fuse mount, two binds)"
lines() { kubectl exec "${1:-writer}" -- wc -l /data/log | cut -d' ' -f1; }
errors() { kubectl logs writer | grep -c write-error || true; }
grows() {
  local n
  n=$(lines)
  wait_for 20 "the writer stopped writing" sh -c "[ \$(kubectl exec writer -- wc -l /data/log | cut -d' ' -f1) -gt $((n + 20)) ]"
}
grows
[ "$(lines reader)" -gt 0 ] || fail "the reader does not see the writer's file"
before=$(pgrep -x ceph-fuse | sort | tr '\n' ' ')
[ "$(echo $before | wc -w)" = 1 ] || fail "not one ceph-fuse for the volume: $before"
in_cgroup rcsi-cephfs $before

s=$(kill_plugin cephfs)
figure "cephfs: node plugin SIGKILLed and ready again in $s s"
grows
[ "$(errors)" = 0 ] || fail "the writer saw $(errors) failed writes across the plugin restart"
[ "$(pgrep -x ceph-fuse | sort | tr '\n' ' ')" = "$before" ] || fail "ceph-fuse changed across the plugin restart: $before -> $(pgrep -x ceph-fuse | tr '\n' ' ')"
[ "$(kubectl get pod writer -o jsonpath='{.status.containerStatuses[0].restartCount}')" = 0 ] || fail "the writer restarted"
ok "cephfs: the writer kept writing without an error through a plugin SIGKILL; ceph-fuse stayed"

# Kill ceph-fuse: the healer mounts the volume again; the proof is the
# writer's /data turning into a new mount (device) that grows.
fsdev() { kubectl exec writer -- stat -c %D /data 2>/dev/null || true; }
old_dev=$(fsdev)
kill -9 $before
t=$(now)
wait_for 60 "no new ceph-fuse after the old one was killed" sh -c \
  "p=\$(pgrep -x ceph-fuse | sort | tr '\n' ' '); [ -n \"\$p\" ] && [ \"\$p\" != '$before' ]"
wait_for 60 "the writer's /data is still the dead mount ($old_dev)" sh -c \
  "d=\$(kubectl exec writer -- stat -c %D /data 2>/dev/null) && [ -n \"\$d\" ] && [ \"\$d\" != '$old_dev' ]"
grows
figure "cephfs: ceph-fuse SIGKILLed; the writer writes to the volume mounted again after $(since "$t") s ($(errors) writes failed meanwhile)"
in_cgroup rcsi-cephfs $(pgrep -x ceph-fuse)
failed=$(errors)

kubectl exec writer -- sh -c 'echo snapshot-marker > /data/marker && sync'
figure "cephfs: snapshot ready in $(snapshot snap data rcsi-cephfs) s"
t=$(now)
claim restored rcsi-cephfs 1Gi Filesystem ReadWriteMany \
  "  dataSource: {name: snap, kind: VolumeSnapshot, apiGroup: snapshot.storage.k8s.io}" | kubectl apply -f - >/dev/null
bound restored
pod restorer restored 'cat /data/marker; sleep 3600' | kubectl apply -f - >/dev/null
kubectl wait --for=condition=Ready --timeout=120s pod/restorer >/dev/null
figure "cephfs: restore (a clone of the snapshot) bound and mounted in $(since "$t") s"
[ "$(kubectl exec restorer -- cat /data/marker)" = snapshot-marker ] || fail "the restored volume does not hold the snapshot's data"

# Growth is the quota only: no node step, the pods see it at once.
figure "cephfs: expansion to 2Gi in $(resize data 2Gi 60) s"
[ "$(quota)" = $((2 << 30)) ] || fail "subvolume $sub has quota $(quota) after growing to 2Gi"
size=$(kubectl exec writer -- df -k /data | awk 'NR == 2 {print $2}')
[ "$size" -gt $((1900 * 1024)) ] || fail "the pod sees $size KiB after growing to 2Gi"
[ "$(errors)" = "$failed" ] || fail "the writer saw $(($(errors) - failed)) failed writes after the heal"

t=$(now)
kubectl delete pod writer reader restorer --wait=true --timeout=60s >/dev/null
wait_for 30 "ceph-fuse outlived the volumes' pods" sh -c '! pgrep -x ceph-fuse'
kubectl delete volumesnapshot snap --wait=false >/dev/null
kubectl delete pvc data restored --wait=false >/dev/null
wait_for 90 "PVs left: $(kubectl get pv --no-headers 2>/dev/null)" sh -c '[ -z "$(kubectl get pv --no-headers 2>/dev/null)" ]'
wait_for 60 "snapshot contents left" sh -c '[ -z "$(kubectl get volumesnapshotcontent --no-headers 2>/dev/null)" ]'
figure "cephfs: pods, two claims and a snapshot deleted in $(since "$t") s"
left=$(
  ceph fs subvolume ls cephfs csi -f json | python3 -c 'import json, sys; [print(s["name"]) for s in json.load(sys.stdin)]'
  rados -c "$CEPH_CONF" -p cephfs_metadata -N csi listomapkeys csi.volumes.rcsi 2>/dev/null
  rados -c "$CEPH_CONF" -p cephfs_metadata -N csi listomapkeys csi.snaps.rcsi 2>/dev/null
)
[ -z "$left" ] || fail "left in filesystem cephfs: $left"
! grep -q 'cephfs.rcsi.io' /proc/self/mountinfo || fail "mounts left: $(grep cephfs.rcsi.io /proc/self/mountinfo)"
[ "$(denials)" = "$denied_before" ] || fail "the API server denied the service accounts $(($(denials) - denied_before)) requests"
render | kubectl delete -f - --wait=true --timeout=120s >/dev/null
ok "cephfs"
