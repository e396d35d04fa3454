#!/usr/bin/env bash
# manifests/overlays/juicefs on the kit's cluster (tests/e2e/juicefs/ holds
# only the cluster's quirks) against a real JuiceFS (redis on 127.0.0.1 for
# metadata and data): a claim is provisioned with its quota, mounted by a
# pod that writes continuously, and the node plugin is killed (SIGKILL) and
# restarted by the kubelet: the writer sees no error and the juicefs process
# stays, outside the plugin's cgroups. Then the juicefs process is killed:
# the plugin mounts the filesystem again and re-binds the pod's volume,
# which a container mounting it with mountPropagation: HostToContainer sees.
# Expansion raises the quota; deletion removes the directory and releases
# the node's mount. Run by run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/e2e/lib.sh
denied_before=$(denials)
backend=$WORKDIR/juicefs-backend
view=$WORKDIR/juicefs-view
meta=redis://127.0.0.1:16379/4
tests/backends/juicefs.sh stop "$backend" >/dev/null 2>&1 || true
eval "$(tests/backends/juicefs.sh start "$backend")"
cleanup() {
  kubectl delete pod writer --wait=false >/dev/null 2>&1 || true
  kubectl delete -k tests/e2e/juicefs --wait=false >/dev/null 2>&1 || true
  umount -l "$view" 2>/dev/null || true
  tests/backends/juicefs.sh stop "$backend"
  rmdir /sys/fs/cgroup/*/rcsi-juicefs /sys/fs/cgroup/rcsi-juicefs 2>/dev/null || true
}
trap cleanup EXIT

t=$(now)
kubectl apply -k tests/e2e/juicefs >/dev/null
kubectl -n rcsi-system rollout status deploy/rcsi-controller --timeout=180s >/dev/null
kubectl -n rcsi-system rollout status ds/rcsi-node --timeout=180s >/dev/null
wait_for 60 "the node plugin never registered juicefs.rcsi.io" \
  sh -c "kubectl get csinode -o jsonpath='{.items[*].spec.drivers[*].name}' | grep -qw juicefs.rcsi.io"
figure "juicefs: overlay applied, controller and node plugin ready, registered in $(since "$t") s"

t=$(now)
claim data rcsi-juicefs 1Gi Filesystem ReadWriteMany | kubectl apply -f - >/dev/null
wait_for 60 "claim data never bound" sh -c "[ \"\$(kubectl get pvc data -o jsonpath={.status.phase})\" = Bound ]"
figure "juicefs: claim bound (filesystem formatted, quota set) in $(since "$t") s"
dir=default/data-$(kubectl get pvc data -o jsonpath='{.spec.volumeName}')
quota() { juicefs quota get "$meta" --path "/$dir" 2>/dev/null | grep -F "/$dir"; }
quota | grep -q '1.0 GiB' || fail "no 1 GiB quota on /$dir: $(quota)"
mkdir -p "$view"
juicefs mount -d --no-usage-report "$meta" "$view" >/dev/null 2>&1
[ -d "$view/$dir" ] || fail "no directory /$dir in the filesystem"

# A writer that appends a line every 50 ms and reports every failed write;
# HostToContainer lets it see the volume when the plugin re-binds it.
t=$(now)
pod writer data 'i=0; while true; do i=$((i+1)); echo $i >> /data/log || echo write-error $i; sleep 0.05; done' \
  "" HostToContainer | kubectl apply -f - >/dev/null
kubectl wait --for=condition=Ready --timeout=120s pod/writer >/dev/null
figure "juicefs: writer pod Running $(since "$t") s after it was created"
lines() { wc -l < "$view/$dir/log"; }
errors() { kubectl logs writer | grep -c write-error || true; }
# [j]: the pattern must not match the shell that runs pgrep.
daemons() { pgrep -f "[j]uicefs mount .*$meta .*/mounts/" | sort | tr '\n' ' '; }
grows() { local n; n=$(lines); wait_for 20 "the writer stopped writing" sh -c "[ \$(wc -l < '$view/$dir/log') -gt $((n + 20)) ]"; }
grows
before=$(daemons)
[ -n "$before" ] || fail "no juicefs process for the node's mount"
in_cgroup rcsi-juicefs $before

# SIGKILL the node plugin; the kubelet restarts its container.
s=$(kill_plugin juicefs)
figure "juicefs: node plugin SIGKILLed and ready again in $s s"
grows
[ "$(errors)" = 0 ] || fail "the writer saw $(errors) failed writes across the plugin restart"
[ "$(daemons)" = "$before" ] || fail "the juicefs processes changed across the plugin restart: $before -> $(daemons)"
[ "$(kubectl get pod writer -o jsonpath='{.status.containerStatuses[0].restartCount}')" = 0 ] || fail "the writer restarted"
ok "juicefs: the writer kept writing without an error through a plugin SIGKILL; the mount process stayed"

# Kill the mount processes: the plugin mounts again and re-binds the target.
kill -9 $before
t=$(now)
n=$(lines)
wait_for 60 "the writer never wrote again after the juicefs processes died" \
  sh -c "[ \$(wc -l < '$view/$dir/log') -gt $((n + 20)) ]"
figure "juicefs: mount processes killed; the writer writes again after $(since "$t") s ($(errors) writes failed meanwhile)"
[ -n "$(daemons)" ] || fail "no juicefs process after the heal"

figure "juicefs: expansion to 2Gi in $(resize data 2Gi 60) s"
quota | grep -q '2.0 GiB' || fail "the quota was not raised: $(quota)"

kubectl delete pod writer --wait=true --timeout=60s >/dev/null
wait_for 30 "the node's juicefs mount outlived its last volume" sh -c "! pgrep -f '[j]uicefs mount .*$meta .*/mounts/'"
t=$(now)
kubectl delete pvc data --wait=true --timeout=60s >/dev/null
wait_for 60 "the PV of data was not deleted" sh -c "[ -z \"\$(kubectl get pv --no-headers 2>/dev/null)\" ]"
figure "juicefs: claim deleted, PV gone in $(since "$t") s"
[ ! -e "$view/$dir" ] || fail "/$dir is still in the filesystem"
[ "$(denials)" = "$denied_before" ] || fail "the API server denied the service accounts $(($(denials) - denied_before)) requests"
kubectl delete -k tests/e2e/juicefs --wait=true --timeout=120s >/dev/null
ok "juicefs"
