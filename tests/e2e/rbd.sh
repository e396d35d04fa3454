#!/usr/bin/env bash
# manifests/overlays/rbd on the kit's cluster (tests/e2e/rbd/ holds only the
# cluster's quirks) against a real Ceph 16.2 on 127.0.0.1
# (tests/backends/ceph.sh): a claim is provisioned as an image, mapped by
# rbd-fuse, formatted and mounted into a pod that writes continuously; the
# node plugin is killed (SIGKILL) and restarted by the kubelet: the writer
# sees no error and rbd-fuse stays, outside the plugin's cgroups. Then
# rbd-fuse is killed: the plugin maps the image again, mounts the
# filesystem again and binds it over the pod's volume, which the writer
# (mounting it with mountPropagation: HostToContainer) writes to again. A
# snapshot is restored into a second pod with the data checked, the claim
# grows online, and everything is deleted: no image, trash entry, journal
# key, rbd-fuse process, loop device or mount is left. Run by run.sh.
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
  kubectl kustomize tests/e2e/rbd |
    sed -e "s|@CLUSTER_ID@|$cluster_id|g" -e "s|@MONITOR@|$CEPH_MON_HOST|g" -e "s|@USER_KEY@|$key|g"
}
cleanup() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    echo "rbd: the plugins' last log lines:" >&2
    kubectl -n rcsi-system logs ds/rcsi-node --tail=40 >&2 || true
    kubectl -n rcsi-system logs deploy/rcsi-controller -c rcsi-controller --tail=20 >&2 || true
    # E2E_KEEP=1 keeps the failed state (and the Ceph cluster) to look at.
    [ "${E2E_KEEP:-0}" = 1 ] && return
  fi
  kubectl delete pod writer reader --wait=false >/dev/null 2>&1 || true
  render | kubectl delete -f - --wait=false >/dev/null 2>&1 || true
  tests/backends/ceph.sh stop "$backend"
  rmdir /sys/fs/cgroup/*/rcsi-rbd /sys/fs/cgroup/rcsi-rbd 2>/dev/null || true
}
trap cleanup EXIT
rbd() { command rbd -c "$CEPH_CONF" "$@"; }

t=$(now)
render | kubectl apply -f - >/dev/null
kubectl -n rcsi-system rollout status deploy/rcsi-controller --timeout=180s >/dev/null
kubectl -n rcsi-system rollout status ds/rcsi-node --timeout=180s >/dev/null
wait_for 60 "the node plugin never registered rbd.rcsi.io" \
  sh -c "kubectl get csinode -o jsonpath='{.items[*].spec.drivers[*].name}' | grep -qw rbd.rcsi.io"
figure "rbd: overlay applied, controller and node plugin ready, registered in $(since "$t") s"

bound() { wait_for 60 "claim $1 never bound" sh -c "[ \"\$(kubectl get pvc $1 -o jsonpath={.status.phase})\" = Bound ]"; }
image_of() { kubectl get pv "$(kubectl get pvc "$1" -o jsonpath='{.spec.volumeName}')" -o jsonpath='{.spec.csi.volumeAttributes.imageName}'; }
t=$(now)
claim data rcsi-rbd 1Gi | kubectl apply -f - >/dev/null
bound data
figure "rbd: claim bound (image created) in $(since "$t") s"
image=$(image_of data)
rbd info "rbd/$image" | grep -q 'size 1 GiB' || fail "image rbd/$image is not 1 GiB: $(rbd info "rbd/$image")"

# A writer that appends a line every 50 ms and reports every failed write;
# HostToContainer lets it see the volume when the plugin binds it again.
t=$(now)
pod writer data 'i=0; while true; do i=$((i+1)); echo $i >> /data/log || echo write-error $i; sleep 0.05; done' \
  "" HostToContainer | kubectl apply -f - >/dev/null
kubectl wait --for=condition=Ready --timeout=120s pod/writer >/dev/null
figure "rbd: writer pod Running $(since "$t") s after it was created (image mapped, formatted, mounted)"
lines() { kubectl exec writer -- wc -l /data/log | cut -d' ' -f1; }
errors() { kubectl logs writer | grep -c write-error || true; }
grows() {
  local n
  n=$(lines)
  wait_for 20 "the writer stopped writing" sh -c "[ \$(kubectl exec writer -- wc -l /data/log | cut -d' ' -f1) -gt $((n + 20)) ]"
}
grows
before=$(pgrep -x rbd-fuse | sort | tr '\n' ' ')
[ -n "$before" ] || fail "no rbd-fuse process maps the image"
in_cgroup rcsi-rbd $before

# SIGKILL the node plugin; the kubelet restarts its container.
s=$(kill_plugin rbd)
figure "rbd: node plugin SIGKILLed and ready again in $s s"
grows
[ "$(errors)" = 0 ] || fail "the writer saw $(errors) failed writes across the plugin restart"
[ "$(pgrep -x rbd-fuse | sort | tr '\n' ' ')" = "$before" ] || fail "rbd-fuse changed across the plugin restart: $before -> $(pgrep -x rbd-fuse | tr '\n' ' ')"
[ "$(kubectl get pod writer -o jsonpath='{.status.containerStatuses[0].restartCount}')" = 0 ] || fail "the writer restarted"
ok "rbd: the writer kept writing without an error through a plugin SIGKILL; rbd-fuse stayed"

# Kill rbd-fuse: the healer maps and mounts the volume again. Buffered
# writes into the dead filesystem may still succeed, so the proof is the
# container's /data turning into a new filesystem (device) that grows.
fsdev() { kubectl exec writer -- stat -c %D /data 2>/dev/null || true; }
old_dev=$(fsdev)
kill -9 $before
t=$(now)
wait_for 60 "no new rbd-fuse after the old one was killed" sh -c \
  "p=\$(pgrep -x rbd-fuse | sort | tr '\n' ' '); [ -n \"\$p\" ] && [ \"\$p\" != '$before' ]"
wait_for 60 "the writer's /data is still the dead filesystem ($old_dev)" sh -c \
  "d=\$(kubectl exec writer -- stat -c %D /data 2>/dev/null) && [ -n \"\$d\" ] && [ \"\$d\" != '$old_dev' ]"
grows
figure "rbd: rbd-fuse SIGKILLed; the writer writes to the volume mounted again after $(since "$t") s ($(errors) writes failed meanwhile)"
after=$(pgrep -x rbd-fuse | sort | tr '\n' ' ')
in_cgroup rcsi-rbd $after
failed=$(errors)

# A snapshot of the volume in use, restored into a second claim and pod.
kubectl exec writer -- sh -c 'echo snapshot-marker > /data/marker && sync'
figure "rbd: snapshot ready in $(snapshot snap data rcsi-rbd) s"
t=$(now)
claim restored rcsi-rbd 1Gi Filesystem ReadWriteOnce \
  "  dataSource: {name: snap, kind: VolumeSnapshot, apiGroup: snapshot.storage.k8s.io}" | kubectl apply -f - >/dev/null
bound restored
pod reader restored 'cat /data/marker; sleep 3600' | kubectl apply -f - >/dev/null
kubectl wait --for=condition=Ready --timeout=120s pod/reader >/dev/null
figure "rbd: restore bound and mounted in $(since "$t") s"
[ "$(kubectl exec reader -- cat /data/marker)" = snapshot-marker ] || fail "the restored volume does not hold the snapshot's data"

# Online growth: the image, then xfs while the writer writes.
# NodeExpandVolume comes with the kubelet's next sync of the pod, which an
# update of the pod brings forward.
figure "rbd: expansion to 2Gi (image, then the mounted xfs once the kubelet syncs the annotated pod) in $(resize data 2Gi 120 writer) s"
size=$(kubectl exec writer -- df -k /data | awk 'NR == 2 {print $2}')
[ "$size" -gt $((1900 * 1024)) ] || fail "the mounted filesystem has $size KiB after growing to 2Gi"
rbd info "rbd/$image" | grep -q 'size 2 GiB' || fail "image rbd/$image did not grow"
[ "$(errors)" = "$failed" ] || fail "the writer saw $(($(errors) - failed)) failed writes after the heal"

t=$(now)
kubectl delete pod writer reader --wait=true --timeout=60s >/dev/null
wait_for 30 "rbd-fuse outlived the volumes' pods" sh -c '! pgrep -x rbd-fuse'
kubectl delete volumesnapshot snap --wait=false >/dev/null
kubectl delete pvc data restored --wait=false >/dev/null
wait_for 90 "PVs left: $(kubectl get pv --no-headers 2>/dev/null)" sh -c '[ -z "$(kubectl get pv --no-headers 2>/dev/null)" ]'
wait_for 60 "snapshot contents left" sh -c '[ -z "$(kubectl get volumesnapshotcontent --no-headers 2>/dev/null)" ]'
figure "rbd: pods, two claims and a snapshot deleted in $(since "$t") s"
left=$(
  rbd ls rbd
  rbd trash ls rbd
  rados -c "$CEPH_CONF" -p rbd listomapkeys csi.volumes.rcsi 2>/dev/null
  rados -c "$CEPH_CONF" -p rbd listomapkeys csi.snaps.rcsi 2>/dev/null
  rados -c "$CEPH_CONF" -p rbd ls | grep -E '^csi\.(volume|snap)\.' || true
)
[ -z "$left" ] || fail "left in pool rbd: $left"
! losetup -a | grep -q '/fuse/' || fail "loop devices left: $(losetup -a | grep /fuse/)"
! grep -q 'rbd.rcsi.io' /proc/self/mountinfo || fail "mounts left: $(grep rbd.rcsi.io /proc/self/mountinfo)"
[ "$(denials)" = "$denied_before" ] || fail "the API server denied the service accounts $(($(denials) - denied_before)) requests"
render | kubectl delete -f - --wait=true --timeout=120s >/dev/null
ok "rbd"
