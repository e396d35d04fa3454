# Helpers for the end-to-end scripts (sourced). Needs KUBECONFIG set.

fail() {
  echo "e2e: FAILED: $*" >&2
  exit 1
}
ok() { echo "e2e: ok: $*"; }
# A figure for the closing note: printed and kept in $FIGURES.
figure() {
  echo "e2e: figure: $*"
  echo "$*" >> "${FIGURES:-/dev/null}"
}
now() { date +%s.%N; }
since() { printf '%.1f' "$(echo "$(now) - $1" | bc)"; }

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every second.
wait_for() {
  local n=$1 what=$2
  shift 2
  for _ in $(seq "$n"); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 1
  done
  fail "$what (after ${n}s)"
}

# A claim NAME of CLASS and SIZE (mode Filesystem or Block; access mode).
claim() {
  local name=$1 class=$2 size=$3 mode=${4:-Filesystem} access=${5:-ReadWriteOnce} extra=${6:-}
  cat <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $name}
spec:
  storageClassName: $class
  accessModes: [$access]
  volumeMode: $mode
  resources: {requests: {storage: $size}}
$extra
---
EOF
}

# A busybox pod NAME running SCRIPT with claim CLAIM at /data, or at
# /dev/xvda if BLOCK=block; PROPAGATION sets the mount's mountPropagation.
pod() {
  local name=$1 claim=$2 script=$3 block=${4:-} propagation=${5:-None}
  local mount="volumeMounts: [{name: v, mountPath: /data, mountPropagation: $propagation}]"
  [ "$block" = block ] && mount="volumeDevices: [{name: v, devicePath: /dev/xvda}]"
  cat <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $name}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: docker.io/library/busybox:latest
      imagePullPolicy: Never
      command: [sh, -c, '$script']
      $mount
  volumes:
    - {name: v, persistentVolumeClaim: {claimName: $claim}}
---
EOF
}

# apply_ready FILE DESCRIPTION POD...: applies FILE (- for stdin) and waits until
# the pods are Ready; a non-empty DESCRIPTION records the time as a figure.
apply_ready() {
  local file=$1 what=$2 t
  shift 2
  t=$(now)
  kubectl apply -f "$file" >/dev/null
  kubectl wait --for=condition=Ready --timeout=300s "${@/#/pod/}" >/dev/null
  [ -z "$what" ] || figure "$what: apply to Running $(since "$t") s"
}

# snapshot NAME CLAIM [CLASS]: a VolumeSnapshot of CLAIM in CLASS (default
# rcsi-local), waited for until ready; prints the seconds it took.
snapshot() {
  local t
  t=$(now)
  kubectl apply -f - >/dev/null <<EOF
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: $1}
spec:
  volumeSnapshotClassName: ${3:-rcsi-local}
  source: {persistentVolumeClaimName: $2}
EOF
  wait_for 90 "snapshot $1 never ready" \
    sh -c "[ \"\$(kubectl get volumesnapshot $1 -o jsonpath={.status.readyToUse})\" = true ]"
  since "$t"
}

# True when claim NAME reports SIZE with no resize in progress or failed.
resize_done() {
  local out
  out=$(kubectl get pvc "$1" -o jsonpath='{.status.capacity.storage}|{.status.allocatedResourceStatuses}|{.status.conditions}')
  [ "$out" = "$2||" ]
}

# resize NAME SIZE SECONDS [POD]: asks for SIZE and waits for a clean status;
# prints the time. The kubelet grows a mounted filesystem when it next syncs
# the pod (its resync is about a minute): once the claim waits for that, POD
# is annotated, an update that makes the kubelet sync it at once.
resize() {
  local t poked=
  t=$(now)
  kubectl patch pvc "$1" -p "{\"spec\":{\"resources\":{\"requests\":{\"storage\":\"$2\"}}}}" >/dev/null
  for _ in $(seq "$3"); do
    resize_done "$1" "$2" && { since "$t"; return 0; }
    if [ -n "${4:-}" ] && [ -z "$poked" ] &&
      kubectl get pvc "$1" -o jsonpath='{.status.conditions[*].type}' | grep -q FileSystemResizePending; then
      kubectl annotate pod "$4" --overwrite "e2e.rcsi.io/resync=$(now)" >/dev/null
      poked=1
    fi
    sleep 1
  done
  kubectl get pvc "$1" -o jsonpath='{.status}' >&2
  echo >&2
  return 1
}

# Percentile P (0-100) of numbers on stdin.
percentile() {
  sort -n | awk -v p="$1" '{a[NR]=$1} END {i=int((NR-1)*p/100)+1; print a[i]}'
}

# Seconds from a pod's creation to its Ready condition.
ready_after() {
  kubectl get pod "$1" -o jsonpath='{.metadata.creationTimestamp} {.status.conditions[?(@.type=="Ready")].lastTransitionTime}' |
    { read -r c r; echo $(($(date -d "$r" +%s) - $(date -d "$c" +%s))); }
}

# 403 answers the API server gave the service accounts in rcsi-system.
denials() {
  grep '"code":403' "$WORKDIR/logs/audit.log" 2>/dev/null | grep -c 'system:serviceaccount:rcsi-system:' || true
}

# local-path's loop devices: backing files under the base path (in a shard
# directory, or directly in volumes/ for volumes made before shards), or
# under /volumes when attached from a plugin container that is gone.
LOOP_PATTERN='/var/lib/rcsi/local/volumes/([0-9a-f]/)?lv-|\(/volumes/([0-9a-f]/)?lv-'

# Prints what local-path keeps under volumes/ besides its empty shard directories.
volume_data() {
  find /var/lib/rcsi/local/volumes -mindepth 1 ! -regex '.*/volumes/[0-9a-f]' 2>/dev/null || true
}

# Fails when any volume, image, loop device or mount of local-path is left.
no_leaks() {
  local base=/var/lib/rcsi/local
  [ -z "$(kubectl get pv --no-headers 2>/dev/null)" ] || fail "PVs left: $(kubectl get pv --no-headers)"
  [ -z "$(volume_data)" ] || fail "volume data left: $(volume_data)"
  [ -z "$(ls -A $base/snapshots 2>/dev/null)" ] || fail "snapshot data left: $(ls -A $base/snapshots)"
  ! losetup -a | grep -Eq "$LOOP_PATTERN" || fail "loop devices left: $(losetup -a | grep -E "$LOOP_PATTERN")"
  ! grep -q "local.rcsi.io" /proc/self/mountinfo || fail "mounts left: $(grep local.rcsi.io /proc/self/mountinfo)"
}

# in_cgroup CGROUP PID...: fails unless each process is in the host cgroup CGROUP.
in_cgroup() {
  local cg=$1 p
  shift
  for p in "$@"; do
    grep -q ":/$cg\$" "/proc/$p/cgroup" || fail "process $p is not in the $cg cgroup: $(cat "/proc/$p/cgroup")"
  done
}

# kill_plugin DRIVER: SIGKILLs the node plugin serving DRIVER and waits until
# the kubelet has restarted its container; prints the seconds it took.
kill_plugin() {
  local pod t
  pod=$(kubectl -n rcsi-system get pod -l app.kubernetes.io/name=rcsi-node -o jsonpath='{.items[0].metadata.name}')
  t=$(now)
  kill -9 "$(pgrep -f "rcsi node .*--driver=$1")"
  wait_for 60 "the node plugin was not restarted" sh -c \
    "[ \"\$(kubectl -n rcsi-system get pod $pod -o jsonpath='{.status.containerStatuses[0].restartCount}/{.status.containerStatuses[0].ready}')\" = 1/true ]"
  since "$t"
}
