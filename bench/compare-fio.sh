#!/usr/bin/env bash
# Runs equivalent workloads with rbench and fio side by side and prints the
# ratio rbench/fio of each: throughput for sequential 1 MiB I/O (buffered
# and direct), IOPS for 4 KiB random direct I/O at depth 1 (psync) and 16
# (io_uring), all with 2 threads each owning half of one file, and CPU
# seconds per GiB (user+sys of each tool's whole process, measured the same
# way). Both tools do the same fixed amount of work; they alternate and each
# workload repeats REPEAT times, and medians are compared (the spread,
# min-max over the repeats, is printed beside each), because a shared
# virtual disk's speed drifts. The page cache is dropped before every run.
# Targets: the root disk and a loop-mounted ext4 (its loop device in
# direct-I/O mode, so the host's page cache under the image file serves
# nothing) with direct I/O only: buffered runs there would measure the page
# cache, as a file that fits in memory does; and a tmpfs, where buffered
# and direct are both memory. The last line holds the worst ratio of each
# kind over all targets (for cpu_per_gib lower is better, so the worst is
# the highest).
#
# fio gets page-aligned buffers, as rbench's are: with its default
# alignment its buffered reads copy into a misaligned buffer (on a tmpfs
# at a quarter of the speed).
#
# Each line also gives the median of the rounds' own ratios (the two tools
# run back to back in a round, so this one follows the disk's drift less)
# and in how many rounds rbench was at least as fast as fio.
#
#   bench/compare-fio.sh [RBENCH]      as root; env SIZE=1g REPEAT=3
#                                      ONLY=rand_read_qd16,... (some workloads)
set -euo pipefail
cd "$(dirname "$0")/.."
rbench=${1:-target/release/rbench}
[ "$(id -u)" -eq 0 ] || { echo "run as root (loop mount, drop caches)" >&2; exit 2; }
command -v fio >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null; }
[ -x "$rbench" ] || cargo build --release -q -p rbench

work=$(mktemp -d /var/tmp/compare-fio.XXXXXX)
shm=$(mktemp -d /dev/shm/compare-fio.XXXXXX)
cleanup() {
  umount "$work/ext4" 2>/dev/null || true
  [ -z "${loopdev:-}" ] || losetup -d "$loopdev" 2>/dev/null || true
  rm -rf "$work" "$shm"
}
trap cleanup EXIT
truncate -s 4G "$work/ext4.img"
mkfs.ext4 -q -F "$work/ext4.img"
mkdir -p "$work/ext4" "$work/root"
loopdev=$(losetup --direct-io=on --show -f "$work/ext4.img")
mount "$loopdev" "$work/ext4"

RBENCH=$rbench python3 - root="$work/root" ext4="$work/ext4" tmpfs="$shm:buffered" <<'PY'
import json, os, resource, statistics, subprocess, sys

rbench = os.environ["RBENCH"]
size = os.environ.get("SIZE", "1g")
repeat = int(os.environ.get("REPEAT", "3"))
units = {"k": 10, "m": 20, "g": 30}
size_bytes = int(size[:-1]) << units[size[-1].lower()] if size[-1].lower() in units else int(size)
half = size_bytes // 2

def cpu_of(cmd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")

def run_rbench(path, rw, bs, direct, depth, rand, out):
    cmd = [rbench, "-w" if rw == "write" else "-r", "-t", "2", "-s", size, "-b", bs,
           "--progress", "never", "--json", out]
    if direct: cmd.append("--direct")
    if depth > 1: cmd += ["--iodepth", str(depth)]
    if rand: cmd.append("--rand")
    cpu = cpu_of(cmd + [path])
    r = [x for x in json.load(open(out)) if x["phase"] == ("WRITE" if rw == "write" else "READ")][0]["last"]
    return r["mib_per_s"], r["iops"], r["bytes"], cpu

def run_fio(path, rw, bs, direct, depth, rand, out):
    cmd = ["fio", "--name=cmp", f"--filename={path}", f"--bs={bs}", "--numjobs=2", f"--size={half}",
           f"--offset_increment={half}", "--group_reporting", "--output-format=json", f"--output={out}",
           "--randrepeat=0", f"--rw={'rand' if rand else ''}{rw}", f"--direct={int(direct)}",
           "--iomem_align=4096"]
    cmd += [f"--ioengine=io_uring", f"--iodepth={depth}"] if depth > 1 else ["--ioengine=psync"]
    cpu = cpu_of(cmd)
    j = json.load(open(out))["jobs"][0][rw]
    return j["bw_bytes"] / 1048576, j["iops"], j["io_bytes"], cpu

workloads = [
    ("seq_write", "write", "1m", False, 1, False),
    ("seq_read", "read", "1m", False, 1, False),
    ("seq_write_direct", "write", "1m", True, 1, False),
    ("seq_read_direct", "read", "1m", True, 1, False),
    ("rand_read_qd1", "read", "4k", True, 1, True),
    ("rand_write_qd1", "write", "4k", True, 1, True),
    ("rand_read_qd16", "read", "4k", True, 16, True),
    ("rand_write_qd16", "write", "4k", True, 16, True),
]
only = [k for k in os.environ.get("ONLY", "").split(",") if k]
unknown = set(only) - {w[0] for w in workloads}
if unknown:
    sys.exit(f"ONLY: unknown workloads {sorted(unknown)}; known: {[w[0] for w in workloads]}")
worst = {}
def keep(kind, value, lower_is_better=False):
    if kind not in worst or (value > worst[kind] if lower_is_better else value < worst[kind]):
        worst[kind] = value

def spread(values):
    return f"{min(values):.0f}-{max(values):.0f}"

for target in sys.argv[1:]:
    name, d = target.split("=", 1)
    d, _, buffered = d.partition(":")
    path = os.path.join(d, "data")
    print(f"== {name} ({d}), {size} per run, median of {repeat}"
          f"{'' if buffered else ', direct I/O only'}", flush=True)
    for kind, rw, bs, direct, depth, rand in workloads:
        if (not direct and not buffered) or (only and kind not in only):
            continue
        if rw == "read" and not os.path.exists(path):
            subprocess.run([rbench, "-w", "-t", "2", "-s", size, "-b", "1m", "--progress", "never", path],
                           check=True, stdout=subprocess.DEVNULL)
        res = {"rbench": [], "fio": []}
        for i in range(repeat):
            order = [("fio", run_fio), ("rbench", run_rbench)]
            if i % 2: order.reverse()
            for tool, fn in order:
                drop_caches()
                res[tool].append(fn(path, rw, bs, direct, depth, rand, os.path.join(d, f"{tool}.json")))
        med = {t: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v),
                   sum(x[3] for x in v) / (sum(x[2] for x in v) / 2**30)) for t, v in res.items()}
        ratio = med["rbench"][1] / med["fio"][1] if rand else med["rbench"][0] / med["fio"][0]
        cpu_ratio = med["rbench"][2] / med["fio"][2]
        keep(kind.replace("_direct", ""), ratio)
        keep("cpu_per_gib", cpu_ratio, lower_is_better=True)
        r, f = med["rbench"], med["fio"]
        col = 1 if rand else 0
        unit = "IOPS" if rand else "MiB/s"
        rs, fs = (spread([x[col] for x in res[t]]) for t in ("rbench", "fio"))
        per_round = [a[col] / b[col] for a, b in zip(res["rbench"], res["fio"])]
        rounds = statistics.median(per_round)
        ahead = sum(x >= 1 for x in per_round)
        print(f"  {kind:<17} rbench {r[col]:9.0f} {unit} ({rs}) {r[2]:6.3f} CPU s/GiB | "
              f"fio {f[col]:9.0f} {unit} ({fs}) {f[2]:6.3f} CPU s/GiB | ratio {ratio:.3f} "
              f"(rounds {rounds:.3f}, ahead in {ahead}/{repeat}) cpu {cpu_ratio:.3f}",
              flush=True)
    for leftover in ("data", "rbench.json", "fio.json"):
        try: os.remove(os.path.join(d, leftover))
        except FileNotFoundError: pass

keys = ["seq_write", "seq_read", "rand_read_qd1", "rand_write_qd1", "rand_read_qd16", "rand_write_qd16", "cpu_per_gib"]
print(" ".join(f"{k}={worst[k]:.3f}" for k in keys if k in worst))
PY
