#!/usr/bin/env bash
# A real NFS server for tests: nfs-ganesha (VFS FSAL) on 127.0.0.1, NFSv3 and
# NFSv4.x, fixed ports (NFS 2049, MOUNT 20048) so clients never need the
# portmapper. rpcbind runs in its own network namespace: ganesha registers
# with it through /run/rpcbind.sock, and nothing listens on port 111 here.
#
#   tests/backends/nfs.sh start DIR   start; prints `export VAR=...` lines
#   tests/backends/nfs.sh stop DIR    stop every process it started, remove DIR
#   tests/backends/nfs.sh restart DIR kill ganesha and start it again (same export)
#
# Two exports, /export and /export2 (for tests that must not share one).
# Exports: NFS_SERVER, NFS_SHARE, NFS_EXPORT_DIR (the exported directory on
# this host), NFS_SHARE2, NFS_EXPORT2_DIR, NFS_PORT, NFS_MOUNT_PORT, NFS_SC_PARAMS_FILE (StorageClass
# parameters for a volume on this server), NFS_PID.
set -euo pipefail
. "$(dirname "$0")/apt.sh"

packages=(nfs-ganesha nfs-ganesha-vfs rpcbind nfs-common)
nfs_port=${NFS_PORT:-2049}
mount_port=${NFS_MOUNT_PORT:-20048}

install() {
  apt_install "${packages[@]}"
}

# Waits until something accepts TCP connections on 127.0.0.1:$1.
wait_port() {
  local i
  for i in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  return 1
}

# The ganesha EXPORT block of DIR/NAME, exported as /NAME.
export_block() {
  cat <<BLOCK
EXPORT {
  Export_Id = $1;
  Path = "$dir/$2";
  Pseudo = /$2;
  Access_Type = RW;
  Squash = No_Root_Squash;
  SecType = sys;
  Protocols = 3, 4;
  Transports = TCP;
  # Tests also change files on this host, behind the server's back: never
  # answer from cached attributes.
  Attr_Expiration_Time = 0;
  FSAL { Name = VFS; }
}
BLOCK
}

# Starts ganesha with DIR's configuration and waits until it listens.
run_ganesha() {
  local dir=$1
  ganesha.nfsd -f "$dir/ganesha.conf" -L "$dir/log/ganesha.log" -p "$dir/ganesha.pid" -N NIV_WARN
  if ! wait_port "$nfs_port" || ! wait_port "$mount_port"; then
    echo "ganesha did not start listening on $nfs_port/$mount_port" >&2
    cat "$dir/log/ganesha.log" >&2
    return 1
  fi
}

# Kills ganesha (SIGKILL, as a crash) and starts it again on the same
# export: for reconnection tests. Prints the new NFS_PID.
restart() {
  local dir=$1 pid
  pid=$(cat "$dir/ganesha.pid")
  kill -9 "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.02; done
  run_ganesha "$dir"
  echo "export NFS_PID=$(cat "$dir/ganesha.pid")"
}

start() {
  local dir=$1
  install
  mkdir -p "$dir"/{export,export2,recovery,log}
  dir=$(cd "$dir" && pwd)
  if (exec 3<>"/dev/tcp/127.0.0.1/$nfs_port") 2>/dev/null; then
    echo "port $nfs_port is already in use: another NFS server runs here" >&2
    exit 1
  fi
  # rpcbind: reuse a running one, else start one confined to a private
  # network namespace (Debian's rpcbind crashes when bound to 127.0.0.1 only).
  if [ ! -S /run/rpcbind.sock ] || ! pgrep -x rpcbind >/dev/null; then
    rm -f /run/rpcbind.sock /run/rpcbind.lock
    mkdir -p /run/rpcbind
    unshare -n --fork sh -c 'ip link set lo up 2>/dev/null; exec rpcbind -f -w' \
      > "$dir/log/rpcbind.log" 2>&1 &
    echo $! > "$dir/rpcbind.pid"
    for _ in $(seq 1 100); do [ -S /run/rpcbind.sock ] && break; sleep 0.02; done
    [ -S /run/rpcbind.sock ] || { echo "rpcbind did not start" >&2; cat "$dir/log/rpcbind.log" >&2; exit 1; }
  fi
  cat > "$dir/ganesha.conf" <<CONF
NFS_CORE_PARAM {
  Bind_addr = 127.0.0.1;
  NFS_Port = $nfs_port;
  MNT_Port = $mount_port;
  Protocols = 3, 4;
  Enable_NLM = false;
  Enable_RQUOTA = false;
  Mount_Path_Pseudo = true;
}
NFSv4 {
  Graceless = true;
  RecoveryBackend = fs;
  RecoveryRoot = "$dir/recovery";
}
NFS_KRB5 { Active_krb5 = false; }
LOG { Default_Log_Level = WARN; }
$(export_block 1 export)
$(export_block 2 export2)
CONF
  run_ganesha "$dir" || { stop "$dir"; exit 1; }
  cat > "$dir/sc-params.yaml" <<YAML
server: 127.0.0.1
share: /export
YAML
  cat <<ENV
export NFS_SERVER=127.0.0.1
export NFS_SHARE=/export
export NFS_EXPORT_DIR=$dir/export
export NFS_SHARE2=/export2
export NFS_EXPORT2_DIR=$dir/export2
export NFS_PORT=$nfs_port
export NFS_MOUNT_PORT=$mount_port
export NFS_SC_PARAMS_FILE=$dir/sc-params.yaml
export NFS_PID=$(cat "$dir/ganesha.pid")
ENV
}

# Kills the process in pid file $1 and waits until it is gone.
kill_pidfile() {
  local pid
  [ -f "$1" ] || return 0
  pid=$(cat "$1")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

stop() {
  local dir=$1
  [ -d "$dir" ] || return 0
  kill_pidfile "$dir/ganesha.pid"
  if [ -f "$dir/rpcbind.pid" ]; then
    # The unshare wrapper's child is rpcbind itself.
    pkill -P "$(cat "$dir/rpcbind.pid")" 2>/dev/null || true
    kill_pidfile "$dir/rpcbind.pid"
    rm -f /run/rpcbind.sock /run/rpcbind.lock
  fi
  rm -rf "$dir"
}

case "${1:-}" in
  start) [ $# -eq 2 ] || { echo "usage: $0 start DIR" >&2; exit 2; }; start "$2" ;;
  stop) [ $# -eq 2 ] || { echo "usage: $0 stop DIR" >&2; exit 2; }; stop "$2" ;;
  restart) [ $# -eq 2 ] || { echo "usage: $0 restart DIR" >&2; exit 2; }; restart "$2" ;;
  install) install ;;
  *) echo "usage: $0 start DIR | stop DIR | restart DIR | install" >&2; exit 2 ;;
esac
