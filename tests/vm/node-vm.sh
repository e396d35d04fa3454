#!/usr/bin/env bash
# Runs a command inside a throw-away node VM: Debian's kernel under qemu
# (software emulation), the host's / shared read-only over 9p with a tmpfs
# overlay, and WORKDIR shared read-write at the same path. The kernel has
# what the host kernel lacks (quotas, nfs, rbd, ceph), so node paths that
# need kernel features are tested for real here.
#
#   tests/vm/node-vm.sh install                 install qemu, the kernel and busybox
#   tests/vm/node-vm.sh run WORKDIR CMD [ARG..]  run CMD as root in the VM; exits with its status
#
# RCSI_VM_FORWARD="PORT.." makes those ports of the host's 127.0.0.1 reachable
# at the guest's 127.0.0.1 (NFS, Ceph), through slirp with restrict=on.
#
# Console output goes to WORKDIR/console.log; CMD's output to stdout.
set -euo pipefail
. "$(dirname "$0")/../backends/apt.sh"

packages=(qemu-system-x86 linux-image-amd64 busybox-static kmod cpio socat iproute2)
# The guest-side address whose connections qemu hands to the host (RCSI_VM_FORWARD).
guestfwd=10.0.2.100
cache=${RCSI_VM_CACHE:-/var/tmp/rcsi-node-vm}

install() {
  apt_install "${packages[@]}"
}

kernel_version() {
  ls /lib/modules | grep -E -- '-amd64$' | sort -V | tail -n 1
}

build_initramfs() {
  local kver=$1 out=$2 root
  root=$(mktemp -d)
  mkdir -p "$root"/{bin,proc,sys,dev,lower,upper,newroot,mods}
  cp /bin/busybox "$root/bin/busybox"
  : > "$root/mods/order"
  # Modules for virtio, 9p and overlay, in dependency order.
  for m in virtio_pci 9pnet_virtio 9p overlay; do modprobe -S "$kver" --show-depends "$m"; done |
    awk '$1 == "insmod" { print $2 }' | while read -r ko; do
      name=$(basename "$ko")
      [ -e "$root/mods/$name" ] && continue
      case "$ko" in
        *.xz) xz -dc "$ko" > "$root/mods/${name%.xz}"; name=${name%.xz} ;;
        *.zst) zstd -qdc "$ko" > "$root/mods/${name%.zst}"; name=${name%.zst} ;;
        *) cp "$ko" "$root/mods/$name" ;;
      esac
      echo "$name" >> "$root/mods/order"
    done
  cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod /mods/$m 2>/dev/null; done
work=$(sed -n 's/.*rcsi.work=\([^ ]*\).*/\1/p' /proc/cmdline)
for i in 1 2 3 4 5 6 7 8 9 10; do
  mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /lower && break
  sleep 0.5
done
grep -q ' /lower ' /proc/mounts || { echo "rcsi node VM: cannot mount the host root"; echo o > /proc/sysrq-trigger; }
mount -t tmpfs -o size=80% tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mount -t tmpfs tmpfs /newroot/tmp
mount -t tmpfs tmpfs /newroot/run
mkdir -p "/newroot$work"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 work "/newroot$work"
exec chroot /newroot /bin/sh "$work/.vm-run.sh"
INIT
  chmod +x "$root/init"
  mkdir -p "$(dirname "$out")"
  (cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out.tmp"
  mv "$out.tmp" "$out"
  rm -rf "$root"
}

run() {
  local work=$1; shift
  work=$(cd "$work" && pwd)
  local kver initrd
  kver=$(kernel_version)
  [ -n "$kver" ] || { echo "no Debian kernel under /lib/modules: run $0 install" >&2; exit 2; }
  initrd="$cache/initrd-$kver.img"
  [ -s "$initrd" ] || build_initramfs "$kver" "$initrd"
  rm -f "$work/.vm-rc" "$work/.vm-out"
  {
    echo "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root"
    # The kernel cannot load modules for a chrooted root on its own.
    echo 'modprobe -a loop ext4 xfs btrfs quota_v2 fuse 2>/dev/null'
    if [ -n "${RCSI_VM_FORWARD:-}" ]; then
      # Host services on 127.0.0.1: each port is relayed by a socat in the
      # guest to the slirp guestfwd address, whose host side connects to
      # 127.0.0.1 of the host (qemu's -netdev below).
      echo 'modprobe -a virtio_net nfs nfsv3 nfsv4 rbd ceph 2>/dev/null; modprobe nbd nbds_max=16 2>/dev/null'
      echo 'ip link set lo up'
      echo 'for n in /sys/class/net/*; do n=${n##*/}; [ "$n" = lo ] && continue; ip link set "$n" up; ip addr add 10.0.2.15/24 dev "$n"; break; done'
      for p in $RCSI_VM_FORWARD; do
        echo "socat TCP4-LISTEN:$p,bind=127.0.0.1,fork,reuseaddr TCP4:$guestfwd:$p >/dev/null 2>&1 &"
      done
    fi
    printf 'cd %q\n' "$PWD"
    for v in $(compgen -e | grep -E '^(RCSI_|RUST_)'); do printf 'export %s=%q\n' "$v" "${!v}"; done
    printf '%q ' "$@"; echo '> '"$work"'/.vm-out 2>&1'
    echo 'echo $? > '"$work"'/.vm-rc'
    echo 'sync; echo o > /proc/sysrq-trigger; sleep 30'
  } > "$work/.vm-run.sh"
  local net=(-nic none)
  if [ -n "${RCSI_VM_FORWARD:-}" ]; then
    local fwd="user,id=n0,restrict=on" p
    for p in $RCSI_VM_FORWARD; do
      fwd+=",guestfwd=tcp:$guestfwd:$p-cmd:socat - TCP4:127.0.0.1:$p"
    done
    net=(-netdev "$fwd" -device virtio-net-pci,netdev=n0)
  fi
  timeout "${RCSI_VM_TIMEOUT:-1800}" qemu-system-x86_64 "${net[@]}" \
    -accel tcg,thread=multi,tb-size=256 -cpu max -m "${RCSI_VM_MEMORY:-1536}" -smp 2 \
    -nographic -no-reboot -nodefaults -serial "file:$work/console.log" \
    -kernel "/boot/vmlinuz-$kver" -initrd "$initrd" \
    -append "console=ttyS0 panic=-1 quiet rcsi.work=$work" \
    -fsdev local,id=hostroot,path=/,security_model=passthrough,readonly=on,multidevs=remap \
    -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
    -fsdev local,id=work,path="$work",security_model=passthrough,multidevs=remap \
    -device virtio-9p-pci,fsdev=work,mount_tag=work || true
  [ -f "$work/.vm-out" ] && cat "$work/.vm-out"
  if [ ! -f "$work/.vm-rc" ]; then
    echo "the node VM did not finish its command; console:" >&2
    tail -n 30 "$work/console.log" >&2
    exit 1
  fi
  exit "$(cat "$work/.vm-rc")"
}

case "${1:-}" in
  install) install ;;
  run) shift; [ $# -ge 2 ] || { echo "usage: $0 run WORKDIR CMD [ARG..]" >&2; exit 2; }; run "$@" ;;
  *) echo "usage: $0 install | run WORKDIR CMD [ARG..]" >&2; exit 2 ;;
esac
