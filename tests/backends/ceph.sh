#!/usr/bin/env bash
# A real single-node Ceph for tests (Debian's ceph 16.2): one mon, one mgr
# with only its always-on modules, one memstore OSD and one MDS,
# cephx on, everything on 127.0.0.1 and under DIR.
#
#   tests/backends/ceph.sh start DIR   start (retried once); prints `export VAR=...` lines
#   tests/backends/ceph.sh stop DIR    kill every daemon and fuse process of DIR, remove DIR
#   tests/backends/ceph.sh install     install the packages
#
# Exports: CEPH_CONF, CEPH_KEYRING (client.admin), CEPH_FSID, CEPH_MON_HOST,
# CEPH_PORTS (every port the daemons listen on, for relays), CEPH_CONFIG_FILE
# (the ceph-csi cluster map: [{clusterID, monitors}]), CEPH_SECRETS_FILE
# (userID/userKey of client.csi for every call kind), CEPH_RBD_SC_PARAMS_FILE
# and CEPHFS_SC_PARAMS_FILE (StorageClass parameters selecting the mounters
# that work on this host: rbd-fuse and ceph-fuse).
set -euo pipefail
. "$(dirname "$0")/apt.sh"
# The standard ports: clients infer the protocol (v1 on 6789, v2 on 3300)
# from a bare host:port, as ceph-csi's cluster maps write them.
v1=${CEPH_MON_PORT:-6789}
v2=${CEPH_MON_V2_PORT:-3300}
cluster_id=rcsi-test

install() {
  apt_install ceph-mon ceph-mgr ceph-mgr-modules-core ceph-osd ceph-mds ceph-fuse rbd-fuse \
    rbd-nbd ceph-common librados2 librbd1 uuid-runtime
}

# Every port a daemon of DIR listens on.
ports() {
  local dir=$1 pids
  pids=$(cat "$dir"/run/*.pid 2>/dev/null | tr '\n' ',' | sed 's/,$//')
  [ -n "$pids" ] || return 0
  ss -Htlnp 2>/dev/null | awk -v pids=",$pids," '
    { if (match($0, /pid=[0-9]+/)) { p = substr($0, RSTART + 4, RLENGTH - 4); if (index(pids, "," p ",")) { split($4, a, ":"); print a[length(a)] } } }' |
    sort -un | tr '\n' ' '
}

start_once() {
  local dir=$1 fsid conf c osd_uuid osd_key id key
  mkdir -p "$dir"/{mon,mgr,osd0,mds,run,log,mgr-modules}
  dir=$(cd "$dir" && pwd)
  conf=$dir/ceph.conf
  c=(-c "$conf")
  fsid=$(uuidgen)
  # Only the modules the mgr always runs (the drivers use volumes and
  # rbd_support); loading all of them takes 16 s.
  for m in balancer crash devicehealth orchestrator pg_autoscaler progress rbd_support \
    status telemetry volumes; do
    ln -sfn "/usr/share/ceph/mgr/$m" "$dir/mgr-modules/$m"
  done
  ln -sf /usr/share/ceph/mgr/mgr_module.py /usr/share/ceph/mgr/mgr_util.py "$dir/mgr-modules/"
  cat > "$conf" <<CONF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
keyring = $dir/keyring
run dir = $dir/run
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 1
mon data avail crit = 0
paxos propose interval = 0.1
osd objectstore = memstore
memstore device bytes = 4294967296
mgr module path = $dir/mgr-modules
mgr initial modules = volumes status
[mon.a]
mon data = $dir/mon
[mgr.x]
mgr data = $dir/mgr
keyring = $dir/mgr/keyring
[osd.0]
osd data = $dir/osd0
keyring = $dir/osd0/keyring
[mds.a]
mds data = $dir/mds
keyring = $dir/mds/keyring
CONF
  ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *'
  ceph-authtool --create-keyring "$dir/keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *'
  ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/keyring"
  monmaptool --create --addv a "[v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]" --fsid "$fsid" "$dir/monmap" >/dev/null
  ceph-mon "${c[@]}" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring"
  ceph-mon "${c[@]}" -i a
  ceph "${c[@]}" --connect-timeout 15 auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' \
    mds 'allow *' -o "$dir/mgr/keyring"
  ceph-mgr "${c[@]}" -i x
  osd_uuid=$(uuidgen)
  osd_key=$(ceph-authtool --gen-print-key)
  echo "{\"cephx_secret\": \"$osd_key\"}" > "$dir/osd0/secret.json"
  id=$(ceph "${c[@]}" osd new "$osd_uuid" -i "$dir/osd0/secret.json")
  [ "$id" = 0 ] || { echo "unexpected osd id $id" >&2; return 1; }
  ceph-authtool --create-keyring "$dir/osd0/keyring" --name osd.0 --add-key "$osd_key"
  ceph-osd "${c[@]}" -i 0 --mkfs --osd-uuid "$osd_uuid" 2>/dev/null
  ceph-osd "${c[@]}" -i 0
  ceph "${c[@]}" auth get-or-create mds.a mon 'allow profile mds' osd 'allow rwx' mds 'allow' \
    mgr 'allow profile mds' -o "$dir/mds/keyring"
  ceph-mds "${c[@]}" -i a
  ceph "${c[@]}" osd pool create rbd 16 >/dev/null 2>&1
  rbd "${c[@]}" pool init rbd
  ceph "${c[@]}" osd pool create cephfs_metadata 8 >/dev/null 2>&1
  ceph "${c[@]}" osd pool create cephfs_data 16 >/dev/null 2>&1
  ceph "${c[@]}" fs new cephfs cephfs_metadata cephfs_data >/dev/null 2>&1
  # The drivers' user: what ceph-csi documents for RBD and CephFS.
  key=$(ceph "${c[@]}" auth get-or-create-key client.csi \
    mon 'profile rbd, allow r' osd 'profile rbd, allow rw tag cephfs *=*' \
    mgr 'profile rbd, allow rw' mds 'allow rw')
  for _ in $(seq 1 120); do
    ceph "${c[@]}" health 2>/dev/null | grep -q HEALTH_OK && break
    sleep 0.5
  done
  ceph "${c[@]}" health | grep -q HEALTH_OK || { ceph "${c[@]}" health detail >&2; return 1; }
  ceph "${c[@]}" fs status cephfs 2>/dev/null | grep -q active || { echo "no active MDS" >&2; return 1; }

  printf '[{"clusterID": "%s", "monitors": ["127.0.0.1:%s"]}]\n' "$cluster_id" "$v1" > "$dir/config.json"
  {
    local kind
    for kind in CreateVolumeSecret DeleteVolumeSecret ControllerExpandVolumeSecret \
      ControllerValidateVolumeCapabilitiesSecret CreateSnapshotSecret DeleteSnapshotSecret \
      ListSnapshotsSecret GetSnapshotSecret NodeStageVolumeSecret NodePublishVolumeSecret NodeExpandVolumeSecret; do
      printf '%s:\n  userID: csi\n  userKey: "%s"\n' "$kind" "$key"
    done
  } > "$dir/secrets.yaml"
  chmod 600 "$dir/secrets.yaml" "$dir/keyring"
  printf 'clusterID: %s\npool: rbd\nimageFeatures: layering\nmounter: rbd-fuse\n' "$cluster_id" > "$dir/rbd-params.yaml"
  printf 'clusterID: %s\nfsName: cephfs\nmounter: fuse\n' "$cluster_id" > "$dir/cephfs-params.yaml"
  cat > "$dir/env" <<ENV
export CEPH_CONF=$conf
export CEPH_KEYRING=$dir/keyring
export CEPH_FSID=$fsid
export CEPH_MON_HOST=127.0.0.1:$v1
export CEPH_PORTS="$(ports "$dir")"
export CEPH_CONFIG_FILE=$dir/config.json
export CEPH_SECRETS_FILE=$dir/secrets.yaml
export CEPH_RBD_SC_PARAMS_FILE=$dir/rbd-params.yaml
export CEPHFS_SC_PARAMS_FILE=$dir/cephfs-params.yaml
ENV
}

stop() {
  local dir=$1 m pid
  [ -d "$dir" ] || return 0
  dir=$(cd "$dir" && pwd)
  # The FUSE clients (only one test cluster runs at a time: its ports are
  # fixed): killed first, so nothing waits on them; then loop devices over
  # their files detached and their mounts removed.
  local mounts
  mounts=$(awk '$0 ~ /fuse\.(ceph-fuse|rbd-fuse)/ { print $5 }' /proc/self/mountinfo | sort -r)
  pkill -9 -x rbd-fuse 2>/dev/null || true
  pkill -9 -x ceph-fuse 2>/dev/null || true
  for m in $mounts; do
    for l in $(losetup -a | awk -F: -v m="$m/" 'index($0, m) { print $1 }'); do
      losetup -d "$l" 2>/dev/null || true
    done
    umount -l "$m" 2>/dev/null || true
  done
  pkill -9 -f -- "-c $dir/ceph.conf" 2>/dev/null || true
  pkill -9 -f -- "$dir/ceph.conf" 2>/dev/null || true
  for pid in $(cat "$dir"/run/*.pid 2>/dev/null); do
    kill -9 "$pid" 2>/dev/null || true
  done
  for _ in $(seq 1 50); do
    pgrep -f -- "$dir/ceph.conf" >/dev/null || break
    sleep 0.1
  done
  rm -rf "$dir"
}

start() {
  local dir=$1
  install
  if (exec 3<>"/dev/tcp/127.0.0.1/$v1") 2>/dev/null; then
    echo "port $v1 is already in use (set CEPH_MON_PORT)" >&2
    exit 1
  fi
  # start-once runs as its own process, so `set -e` holds inside it; the
  # daemons it starts must not hold our stdout (a caller reads it to the
  # end), and the tools' chatter (some of it shows keys) goes nowhere.
  mkdir -p "$dir"
  if ! "$0" start-once "$dir" >/dev/null 2>"$dir/start.err"; then
    echo "ceph did not start; retrying once: $(tail -3 "$dir/start.err")" >&2
    stop "$dir"
    mkdir -p "$dir"
    "$0" start-once "$dir" >/dev/null 2>"$dir/start.err" || { cat "$dir/start.err" >&2; stop "$dir"; exit 1; }
  fi
  cat "$dir/env"
}

case ${1:-} in
  start) start "${2:?usage: $0 start DIR}" ;;
  start-once) start_once "$2" ;;
  stop) stop "${2:?usage: $0 stop DIR}" ;;
  install) install ;;
  *) echo "usage: $0 start DIR | stop DIR | install" >&2; exit 2 ;;
esac
