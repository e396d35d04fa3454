//! rbench end to end on real files: a temp dir, a tmpfs and a loop-mounted ext4.

use assert_cmd::Command;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn rbench() -> Command {
    Command::cargo_bin("rbench").unwrap()
}

fn results(json: &Path) -> Vec<Value> {
    serde_json::from_slice::<Vec<Value>>(&std::fs::read(json).unwrap()).unwrap()
}

/// Runs rbench with `args`, `--json` and `target`; returns its results.
fn run_json(args: &[&str], target: impl AsRef<Path>) -> Vec<Value> {
    let json = tempfile::NamedTempFile::new().unwrap();
    rbench()
        .args(args)
        .arg("--json")
        .arg(json.path())
        .arg(target.as_ref())
        .assert()
        .success();
    results(json.path())
}

fn phase<'a>(rs: &'a [Value], name: &str) -> &'a Value {
    rs.iter()
        .find(|r| r["phase"] == name)
        .unwrap_or_else(|| panic!("no {name} phase"))
}

fn tree_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

/// Runs a failing command and returns its single stderr line.
fn fails_with_one_line(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn dir_mode_counts_add_up_and_delete_leaves_nothing() {
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("t");
    std::fs::create_dir(&target).unwrap();
    let rs = run_json(
        &[
            "-d", "-w", "-r", "--stat", "-F", "-D", "-t", "3", "-n", "2", "-N", "5", "-s", "256k",
            "-b", "64k", "--verify",
        ],
        &target,
    );
    let files = 3 * 2 * 5;
    for p in ["WRITE", "READ"] {
        let r = phase(&rs, p);
        assert_eq!(r["last"]["bytes"], files * 256 * 1024, "{p}");
        assert_eq!(r["last"]["entries"], files, "{p}");
        assert_eq!(r["last"]["ops"], files * 4, "{p}: 4 blocks per file");
        assert_eq!(r["latency"]["count"], files * 4);
        assert!(
            r["latency"]["p99_us"].as_f64().unwrap() >= r["latency"]["p50_us"].as_f64().unwrap()
        );
        assert!(r["cpu_s"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(
        phase(&rs, "MKDIRS")["last"]["entries"],
        3 * 3,
        "3 thread dirs + 6 dirs"
    );
    for p in ["STAT", "RMFILES"] {
        let r = phase(&rs, p);
        assert_eq!(r["last"]["entries"], files, "{p}");
        // Timed in clock ticks, reported in µs: none longer than the phase.
        assert_eq!(r["latency"]["count"], files, "{p}");
        let (p50, max) = (
            r["latency"]["p50_us"].as_f64(),
            r["latency"]["max_us"].as_f64(),
        );
        let elapsed_us = r["last"]["elapsed_ms"].as_f64().unwrap() * 1e3;
        assert!(p50.unwrap() > 0.0, "{p}: {}", r["latency"]);
        assert!(
            max.unwrap() <= elapsed_us,
            "{p}: {} in {elapsed_us} µs",
            r["latency"]
        );
    }
    assert!(
        tree_is_empty(&target),
        "delete phases must leave the tree empty"
    );
}

#[test]
fn file_mode_io_uring_random_verify_and_csv() {
    let d = tempfile::tempdir().unwrap();
    let json = d.path().join("r.json");
    let csv = d.path().join("r.csv");
    let target = d.path().join("data[1-2]");
    for depth in ["1", "16"] {
        rbench()
            .args([
                "-w",
                "-r",
                "-t",
                "2",
                "-s",
                "4m",
                "-b",
                "4k",
                "--rand",
                "--verify",
                "--iodepth",
                depth,
            ])
            .arg("--json")
            .arg(&json)
            .arg("--csv")
            .arg(&csv)
            .arg(target.to_str().unwrap())
            .assert()
            .success();
        let rs = results(&json);
        for p in ["WRITE", "READ"] {
            assert_eq!(
                phase(&rs, p)["last"]["bytes"],
                (2 * 4) << 20,
                "{p} at depth {depth}: both files, whole range"
            );
            assert_eq!(phase(&rs, p)["last"]["ops"], 2 * 1024);
        }
    }
    assert_eq!(
        std::fs::metadata(d.path().join("data1")).unwrap().len(),
        4 << 20
    );
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    assert!(lines.next().unwrap().starts_with("label,phase,iteration"));
    assert_eq!(
        lines.count(),
        4,
        "two runs of two phases appended under one header"
    );
    assert!(text.contains("lat_p9999_us"));
}

#[test]
fn verify_catches_corruption() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("f");
    rbench()
        .args(["-w", "-s", "1m", "-b", "64k"])
        .arg(&f)
        .assert()
        .success();
    let mut data = std::fs::read(&f).unwrap();
    let good = data[300_000];
    data[300_000] ^= 0xff;
    std::fs::write(&f, data).unwrap();
    let out = rbench()
        .args(["-r", "--verify", "-s", "1m", "-b", "64k"])
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    let at = format!(
        "{} at offset 300000 (byte 37856 of the block at 262144): expected 0x{:02x}, found 0x{:02x}",
        f.display(),
        good,
        good ^ 0xff
    );
    assert!(
        err.contains("verify failed: 1 block(s)") && err.contains(&at),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // More bad blocks: each reported, the run stops at the limit.
    let mut data = std::fs::read(&f).unwrap();
    for at in [0usize, 70_000, 140_000, 600_000] {
        data[at] ^= 0x01;
    }
    std::fs::write(&f, data).unwrap();
    let out = rbench()
        .args([
            "-r",
            "--verify",
            "--verifylimit",
            "3",
            "-s",
            "1m",
            "-b",
            "64k",
        ])
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.matches("rbench: verify: ").count(), 3, "{err}");
    assert!(err.contains("verify failed: 3 block(s)"), "{err}");
    assert!(
        err.contains("at offset 0 (byte 0 of the block at 0)"),
        "{err}"
    );
    assert!(
        !err.contains("offset 300000"),
        "stopped at the third: {err}"
    );
}

#[test]
fn time_limit_stops_a_phase() {
    let d = tempfile::tempdir().unwrap();
    let r = &run_json(
        &["-w", "-s", "100g", "-b", "1m", "--timelimit", "1"],
        d.path().join("sparse"),
    )[0];
    assert_eq!(r["time_limited"], true);
    let ms = r["last"]["elapsed_ms"].as_f64().unwrap();
    assert!((900.0..5000.0).contains(&ms), "{ms} ms");
}

#[test]
fn bad_input_is_one_line_exit_2_and_touches_nothing() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path();
    for args in [
        vec!["-w", "-s", "12q"],
        vec!["-w", "-s", "1m", "-t", "0"],
        vec!["-w", "-s", "1m", "-b", "4m"],
        vec!["-w", "-s", "1m", "-b", "0"],
        vec!["-w", "-s", "1000k", "-b", "64k"],
        vec!["-w", "-s", "1m", "--iodepth", "0"],
        vec!["-s", "1m"],
        vec!["-w", "-s", "1m", "--blockvarpct", "50", "--verify"],
        vec!["-w", "-s", "1m", "--no-such-flag"],
    ] {
        let err = fails_with_one_line(rbench().args(&args).arg(t));
        assert!(err.starts_with("rbench: "), "{err}");
    }
    let missing = t.join("missing/dir/file");
    let err = fails_with_one_line(rbench().args(["-w", "-s", "1m"]).arg(&missing));
    assert!(err.contains("does not exist"), "{err}");
    assert!(tree_is_empty(t), "bad input created files");
}

/// A ramfs mount (which refuses O_DIRECT), removed when dropped.
struct Ramfs(tempfile::TempDir);

impl Ramfs {
    fn new() -> Self {
        let d = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "ramfs", "ramfs"])
            .arg(d.path())
            .status()
            .unwrap();
        assert!(ok.success(), "mounting a ramfs needs root");
        Self(d)
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

#[test]
fn direct_where_refused_is_a_clean_error() {
    let fs = Ramfs::new();
    let err = fails_with_one_line(
        rbench()
            .args(["-w", "-s", "1m", "-b", "4k", "--direct"])
            .arg(fs.0.path()),
    );
    assert!(err.contains("refuses O_DIRECT"), "{err}");
    assert!(
        tree_is_empty(fs.0.path()),
        "no probe or data file may be left"
    );
}

#[test]
fn tmpfs_buffered_and_direct() {
    let d = tempfile::tempdir_in("/dev/shm").unwrap();
    rbench()
        .args(["-w", "-r", "-F", "-s", "1m", "-b", "4k", "--verify"])
        .arg(d.path())
        .assert()
        .success();
    // tmpfs takes O_DIRECT since Linux 6.6; older kernels refuse it cleanly.
    let probe = d.path().join("probe");
    let accepts = {
        use std::os::unix::fs::OpenOptionsExt;
        let r = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .custom_flags(libc::O_DIRECT)
            .open(&probe);
        let _ = std::fs::remove_file(&probe);
        r.is_ok()
    };
    let mut cmd = rbench();
    cmd.args(["-w", "-r", "-s", "1m", "-b", "4k", "--direct", "--verify"])
        .arg(d.path());
    if accepts {
        cmd.assert().success();
    } else {
        let err = fails_with_one_line(&mut cmd);
        assert!(err.contains("O_DIRECT"), "{err}");
    }
}

/// An ext4 filesystem on a loop device, mounted until dropped.
struct LoopExt4 {
    dir: tempfile::TempDir,
}

impl LoopExt4 {
    fn new() -> Self {
        assert!(
            std::fs::metadata("/dev/loop-control").is_ok(),
            "loop devices are required for this test"
        );
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(256 << 20)
            .unwrap();
        let ok = |c: &mut std::process::Command| assert!(c.status().unwrap().success(), "{c:?}");
        ok(std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img));
        std::fs::create_dir(dir.path().join("mnt")).unwrap();
        ok(std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(dir.path().join("mnt")));
        Self { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for LoopExt4 {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.path())
            .status();
    }
}

#[test]
fn direct_io_on_loop_mounted_ext4() {
    let fs = LoopExt4::new();
    let rs = run_json(
        &[
            "-w",
            "-r",
            "-F",
            "-t",
            "2",
            "-N",
            "4",
            "-s",
            "2m",
            "-b",
            "16k",
            "--direct",
            "--iodepth",
            "8",
            "--verify",
        ],
        fs.path(),
    );
    assert_eq!(phase(&rs, "READ")["last"]["bytes"], (2 * 4 * 2) << 20);
    let err = fails_with_one_line(
        rbench()
            .args(["-w", "-s", "1000k", "-b", "1000", "--direct"])
            .arg(fs.path()),
    );
    assert!(err.contains("multiples of"), "{err}");
}

#[test]
fn mixed_reads_rate_limits_and_file_options() {
    let d = tempfile::tempdir().unwrap();
    let json = d.path().join("r.json");
    let f = d.path().join("f");
    rbench()
        .args([
            "-w",
            "-r",
            "-t",
            "2",
            "-s",
            "64m",
            "-b",
            "64k",
            "--rwmixpct",
            "25",
            "--prealloc",
            "--trunc",
        ])
        .args(["--fadvise", "seq", "--limitread", "32m", "--json"])
        .arg(&json)
        .arg(&f)
        .assert()
        .success();
    let rs = results(&json);
    let (w, m) = (phase(&rs, "WRITE"), phase(&rs, "RWMIXREAD"));
    let blocks = 1024;
    let (wo, mo) = (
        w["last"]["ops"].as_u64().unwrap(),
        m["last"]["ops"].as_u64().unwrap(),
    );
    assert_eq!(wo + mo, blocks, "every block is either written or read");
    assert!(
        (150..350).contains(&mo),
        "{mo} of {blocks} blocks read at 25%"
    );
    // 64 MiB read by 2 threads limited to 32 MiB/s each: about one second.
    let r = phase(&rs, "READ");
    let ms = r["last"]["elapsed_ms"].as_f64().unwrap();
    assert!(
        (900.0..2500.0).contains(&ms),
        "{ms} ms for a rate-limited read"
    );
    let rate = r["last"]["mib_per_s"].as_f64().unwrap();
    assert!(rate <= 66.0, "{rate} MiB/s exceeds 2 x 32 MiB/s");
    assert!(
        !r["series"].as_array().unwrap().is_empty(),
        "throughput over time is recorded"
    );
    assert_eq!(std::fs::metadata(&f).unwrap().len(), 64 << 20);
}

#[test]
fn chart_and_live_views() {
    let d = tempfile::tempdir().unwrap();
    let svg = d.path().join("c.svg");
    let out = rbench()
        .args([
            "-w",
            "-r",
            "-s",
            "128m",
            "-b",
            "1m",
            "--limitwrite",
            "256m",
            "--progress",
            "always",
            "--chart",
        ])
        .arg(&svg)
        .arg(d.path().join("f"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    // The full-screen view: alternate screen in and out, figures, a row per thread.
    assert!(err.starts_with("\x1b[?1049h"), "{err:?}");
    assert!(err.trim_end().ends_with("\x1b[?1049l\x1b[?25h"), "{err:?}");
    for want in [
        "rbench  WRITE  iteration 1",
        "% done",
        "rbench CPU",
        "current",
        "average",
    ] {
        assert!(err.contains(want), "{want} expected: {err:?}");
    }
    assert!(
        err.contains("Thread  Done") && err.contains("\r\n     0 "),
        "{err:?}"
    );
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
    assert!(text.contains("WRITE (iteration 1") && text.contains("READ (iteration 1"));
    assert!(text.matches("<rect").count() > 3, "histogram bars drawn");
    assert!(text.contains("<path d=\"M"), "throughput line drawn");
    // One line instead, redrawn in place.
    let slow = ["-w", "-s", "64m", "-b", "1m", "--limitwrite", "256m"];
    let line = rbench()
        .args(slow)
        .args(["--progress", "always", "--live1"])
        .arg(d.path().join("g"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&line.stderr);
    assert!(err.starts_with("\r\x1b[2KWRITE "), "{err:?}");
    assert!(err.contains("% ") && err.contains("threads done") && !err.contains("1049h"));
    // Not a terminal and not asked, or --nolive: nothing.
    for extra in [&[][..], &["--progress", "always", "--nolive"][..]] {
        let quiet = rbench()
            .args(slow)
            .args(extra)
            .arg(d.path().join("g"))
            .output()
            .unwrap();
        assert!(quiet.stderr.is_empty(), "{extra:?}");
    }
}

#[test]
fn rate_limit_paces_the_run() {
    // A 1 ms-per-block schedule on a fast tmpfs: latencies stay near the
    // I/O time, yet the run takes as long as the schedule says. (The Pacer
    // unit test checks that stalls are charged from the schedule.)
    let d = tempfile::tempdir_in("/dev/shm").unwrap();
    let r = &run_json(
        &["-w", "-s", "2m", "-b", "4k", "--limitwrite", "4m"],
        d.path().join("f"),
    )[0];
    let ms = r["last"]["elapsed_ms"].as_f64().unwrap();
    assert!(
        (400.0..1500.0).contains(&ms),
        "512 blocks at 1024 blocks/s take ~0.5 s, took {ms} ms"
    );
    assert!(r["latency"]["p50_us"].as_f64().unwrap() < 1000.0);
}

#[test]
fn phases_run_in_elbenchos_order() {
    let d = tempfile::tempdir().unwrap();
    // Asked for in another order: they still run as elbencho runs them.
    let rs = run_json(
        &[
            "-D", "-F", "-r", "--stat", "-w", "-d", "-s", "8k", "-b", "4k",
        ],
        d.path(),
    );
    let order: Vec<&str> = rs.iter().map(|r| r["phase"].as_str().unwrap()).collect();
    assert_eq!(
        order,
        ["MKDIRS", "WRITE", "STAT", "READ", "RMFILES", "RMDIRS"]
    );
}

#[test]
fn small_files_shrink_the_default_block_and_say_so() {
    let d = tempfile::tempdir().unwrap();
    let json = tempfile::NamedTempFile::new().unwrap();
    let out = rbench()
        .args(["-w", "-r", "-N", "3", "-s", "4k", "--json"])
        .arg(json.path())
        .arg(d.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.starts_with("note: block size set to the file size 4K"),
        "{stdout}"
    );
    let rs = results(json.path());
    assert_eq!(phase(&rs, "WRITE")["block_size"], 4096);
    assert_eq!(phase(&rs, "READ")["last"]["ops"], 3, "one block per file");
    // A block given explicitly is never changed.
    let err = fails_with_one_line(rbench().args(["-w", "-s", "4k", "-b", "1m"]).arg(d.path()));
    assert!(
        err.contains("block size 1M is larger than the file size 4K"),
        "{err}"
    );
}

#[test]
fn missing_arguments_are_named() {
    let err = fails_with_one_line(&mut rbench());
    assert!(err.starts_with("rbench: missing <PATH>"), "{err}");
    let err = fails_with_one_line(rbench().arg("k8s"));
    assert!(
        err.contains("missing --storageclass <STORAGECLASS>, <WORKLOAD>"),
        "{err}"
    );
}

#[test]
fn resfile_accumulates_runs_and_elbencho_file_options_work() {
    let d = tempfile::tempdir().unwrap();
    let (res, json, csv) = (
        d.path().join("res.txt"),
        d.path().join("r.json"),
        d.path().join("r.csv"),
    );
    let target = d.path().join("t");
    std::fs::create_dir(&target).unwrap();
    for label in ["one", "two"] {
        let out = rbench()
            .args(["-w", "-s", "64k", "--label", label, "--resfile"])
            .arg(&res)
            .arg("--jsonfile")
            .arg(&json)
            .arg("--csvfile")
            .arg(&csv)
            .arg(&target)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8(out.stdout).unwrap();
        let text = std::fs::read_to_string(&res).unwrap();
        assert!(
            text.ends_with(&format!("{stdout}\n")),
            "the tables as printed: {text}"
        );
    }
    let text = std::fs::read_to_string(&res).unwrap();
    let heads: Vec<&str> = text.lines().filter(|l| l.starts_with("# ")).collect();
    assert_eq!(heads.len(), 2, "{text}");
    assert!(
        heads[1].contains(" UTC: ") && heads[1].contains("--label two"),
        "{text}"
    );
    assert_eq!(text.matches("WRITE ").count(), 2);
    assert_eq!(results(&json)[0]["label"], "two", "--jsonfile is --json");
    let rows = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(rows.lines().count(), 3, "header and a row per run: {rows}");
}

#[test]
fn metadata_phases_name_the_file_they_fail_on() {
    let d = tempfile::tempdir().unwrap();
    rbench()
        .args(["-d", "-w", "-s", "0", "-N", "3"])
        .arg(d.path())
        .assert()
        .success();
    std::fs::remove_file(d.path().join("t0/d0/f1")).unwrap();
    for op in ["--stat", "-F"] {
        let out = rbench()
            .args([op, "-N", "3"])
            .arg(d.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8(out.stderr).unwrap();
        let want = format!("{}: No such file", d.path().join("t0/d0/f1").display());
        assert!(err.contains(&want), "{op}: {err}");
    }
}

#[test]
fn short_help_with_examples_and_the_full_reference() {
    let out = rbench().arg("--help").output().unwrap();
    assert!(out.status.success());
    let short = String::from_utf8(out.stdout).unwrap();
    let options: Vec<&str> = short
        .lines()
        .filter(|l| l.trim_start().starts_with('-'))
        .filter(|l| !l.contains("--help") && !l.contains("--version"))
        .collect();
    assert_eq!(options.len(), 10, "the ten most used: {options:#?}");
    assert!(short.lines().count() < 50, "{short}");
    for want in [
        "Examples:",
        "/dev/sdb",
        "--hosts",
        "--limitwrite",
        "-d mkdirs",
        "--help-all",
    ] {
        assert!(short.contains(want), "{want}: {short}");
    }
    assert!(!short.contains("--fadvise"));
    let out = rbench().arg("--help-all").output().unwrap();
    let full = String::from_utf8(out.stdout).unwrap();
    for want in [
        "--fadvise",
        "--verifylimit",
        "--resfile",
        "--live1",
        "--nolive",
        "[alias: --jsonfile]",
        "Units:",
        "4KiB and 4KB are all 4096 bytes",
    ] {
        assert!(full.contains(want), "{want}: {full}");
    }
    assert_eq!(
        rbench().arg("-h").output().unwrap().stdout,
        short.as_bytes()
    );
}
