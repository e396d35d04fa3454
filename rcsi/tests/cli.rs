//! The command line: each driver's flags appear only with that driver.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn rcsi(args: &[&str]) -> (bool, String) {
    rcsi_with_libs(args, None)
}

/// Runs rcsi with `libs` searched first for shared libraries.
fn rcsi_with_libs(args: &[&str], libs: Option<&Path>) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rcsi"));
    if let Some(dir) = libs {
        cmd.env("LD_LIBRARY_PATH", dir);
    }
    let out = cmd
        .args(args)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn driver_flags_show_only_with_their_driver() {
    let (ok, plain) = rcsi(&["node", "--help"]);
    assert!(ok, "{plain}");
    assert!(!plain.contains("--base-path"), "{plain}");
    assert!(plain.contains("--driver NAME --help") && plain.contains("local-path"));

    let (ok, local) = rcsi(&["node", "--driver", "local-path", "--help"]);
    assert!(ok, "{local}");
    for flag in [
        "--base-path",
        "--max-volumes",
        "--reserved-bytes",
        "--node-id",
    ] {
        assert!(local.contains(flag), "{flag} missing:\n{local}");
    }
    let (_, eq_form) = rcsi(&["node", "--help", "--driver=local-path"]);
    assert!(eq_form.contains("--base-path"), "{eq_form}");

    let (ok, unknown) = rcsi(&["node", "--driver", "nfs-typo", "--help"]);
    assert!(
        !ok && unknown.contains("possible values: local-path"),
        "{unknown}"
    );
    // A flag of a driver that was not named is refused.
    let (ok, stray) = rcsi(&[
        "node",
        "--endpoint",
        "unix:///tmp/rcsi-cli-test.sock",
        "--node-id",
        "n",
        "--base-path",
        "/tmp/x",
    ]);
    assert!(!ok && stray.contains("--base-path"), "{stray}");
}

#[test]
fn local_path_has_no_separate_controller() {
    let (ok, text) = rcsi(&[
        "controller",
        "--driver",
        "local-path",
        "--endpoint",
        "unix:///tmp/rcsi-cli-test-ctl.sock",
    ]);
    assert!(!ok);
    assert!(
        text.contains("its controller runs inside `rcsi node`"),
        "{text}"
    );
    assert!(!Path::new("/tmp/rcsi-cli-test-ctl.sock").exists());
}

/// The quick start (root: it mounts): every step of the volume's life,
/// the benchmark's phases on the published volume, nothing left behind.
#[test]
fn demo_walks_a_volume_through_its_life_and_benchmarks_it() {
    let (ok, text) = rcsi(&["demo"]);
    assert!(ok, "{text}");
    for n in 1..=11 {
        assert!(
            text.contains(&format!("[{n}] ")),
            "step {n} missing:\n{text}"
        );
    }
    for phase in ["WRITE", "STAT", "READ", "RMFILES", "RMDIRS"] {
        assert!(
            text.lines().any(|l| l.starts_with(phase)),
            "{phase} missing:\n{text}"
        );
    }
    assert!(text.contains("demo complete"), "{text}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains("rcsi-demo"), "mounts left:\n{mounts}");
}

/// librados and librbd are loaded at run time: without them the Ceph drivers
/// refuse to start and name the package to install, and the others serve.
#[test]
fn only_the_ceph_drivers_need_the_ceph_libraries() {
    // An empty file where the loader looks first stands for a broken or
    // missing library.
    let none = tempfile::tempdir().unwrap();
    for lib in ["librados.so.2", "librbd.so.1"] {
        std::fs::write(none.path().join(lib), b"").unwrap();
    }
    let sock = none.path().join("csi.sock");
    let endpoint = format!("unix://{}", sock.display());
    for args in [
        vec!["node", "--driver", "rbd", "--node-id", "n"],
        vec!["controller", "--driver", "rbd"],
        vec!["node", "--driver", "cephfs", "--node-id", "n"],
        vec!["controller", "--driver", "cephfs"],
    ] {
        let mut args = args;
        args.extend(["--endpoint", &endpoint]);
        let (ok, text) = rcsi_with_libs(&args, Some(none.path()));
        assert!(!ok, "{args:?} started:\n{text}");
        assert!(
            text.contains("cannot load librados.so.2") && text.contains("install librados2"),
            "{args:?}:\n{text}"
        );
        assert!(!sock.exists());
    }

    // librados present, librbd not: only RBD needs it.
    let no_rbd = tempfile::tempdir().unwrap();
    std::fs::write(no_rbd.path().join("librbd.so.1"), b"").unwrap();
    let (ok, text) = rcsi_with_libs(
        &[
            "node",
            "--driver",
            "rbd",
            "--node-id",
            "n",
            "--endpoint",
            &endpoint,
        ],
        Some(no_rbd.path()),
    );
    assert!(
        !ok && text.contains("cannot load librbd.so.1") && text.contains("install librbd1"),
        "{text}"
    );

    // local-path serves without either.
    let base = none.path().join("base");
    let mut plugin = Command::new(env!("CARGO_BIN_EXE_rcsi"))
        .env("LD_LIBRARY_PATH", none.path())
        .args([
            "node",
            "--driver",
            "local-path",
            "--node-id",
            "n",
            "--endpoint",
            &endpoint,
        ])
        .arg("--base-path")
        .arg(&base)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() && Instant::now() < deadline {
        assert!(plugin.try_wait().unwrap().is_none(), "local-path exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let served = sock.exists();
    plugin.kill().unwrap();
    plugin.wait().unwrap();
    assert!(served, "local-path did not serve within 20 s");
}

/// Starts a node plugin of `driver` with `dir_flag` on `dir`, then a second
/// one on the same directory: the second exits with an error naming it and
/// the first goes on serving.
fn second_plugin_refused(driver: &str, dir_flag: &str, role: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    // The Ceph plugins need a cluster map; they contact no monitor to start.
    let map = tmp.path().join("clusters.json");
    std::fs::write(&map, r#"[{"clusterID":"c1","monitors":["127.0.0.1:1"]}]"#).unwrap();
    let ceph = ["rbd", "cephfs"].contains(&driver);
    let args = |sock: &str| {
        let endpoint = format!("unix://{}", tmp.path().join(sock).display());
        [
            "node",
            "--driver",
            driver,
            "--node-id",
            "n1",
            dir_flag,
            dir.to_str().unwrap(),
            "--endpoint",
        ]
        .map(String::from)
        .into_iter()
        .chain([endpoint])
        .chain(ceph.then(|| format!("--ceph-config={}", map.display())))
        .collect::<Vec<_>>()
    };
    let mut first = Command::new(env!("CARGO_BIN_EXE_rcsi"))
        .args(args("first.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let sock = tmp.path().join("first.sock");
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{driver}: no socket"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = args("second.sock");
    let (ok, text) = rcsi(&second.iter().map(String::as_str).collect::<Vec<_>>());
    let alive = first.try_wait().unwrap().is_none();
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(
        !ok,
        "{driver}: a second plugin started on {}",
        dir.display()
    );
    let want = format!(
        "{} is in use by another rcsi process (pid {} on ",
        dir.display(),
        first.id()
    );
    assert!(text.contains(&want), "{driver}: {text}");
    assert!(text.contains(&format!("must not share a {role}")), "{text}");
    assert!(alive, "{driver}: the first plugin died");
    assert!(
        sock.exists(),
        "{driver}: the first plugin's socket was removed"
    );
    assert!(!tmp.path().join("second.sock").exists());
}

#[test]
fn a_second_node_plugin_on_a_directory_in_use_is_refused() {
    let others: Vec<_> = ["juicefs", "rbd", "cephfs"]
        .into_iter()
        .map(|d| {
            std::thread::spawn(move || second_plugin_refused(d, "--state-dir", "state directory"))
        })
        .collect();
    second_plugin_refused("local-path", "--base-path", "base path");
    for t in others {
        t.join().unwrap();
    }
}

/// Process ids of `pid`'s children (its single thread's).
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

#[test]
fn as_pid_1_it_reaps_orphans_and_passes_sigterm_on() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "needs root (pid namespace)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("csi.sock");
    // The first process of a new pid namespace, as in a container.
    let mut ns = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount-proc",
            env!("CARGO_BIN_EXE_rcsi"),
        ])
        .args([
            "node",
            "--driver",
            "local-path",
            "--node-id",
            "n1",
            "--base-path",
        ])
        .arg(tmp.path().join("base"))
        .arg(format!("--endpoint=unix://{}", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "no socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    let init = children(ns.id())[0];
    let rcsi = children(init);
    assert_eq!(rcsi.len(), 1, "pid 1 runs rcsi as its one child");
    // A shell entering the namespace leaves a helper behind each time,
    // which pid 1 inherits.
    for _ in 0..3 {
        let ok = Command::new("nsenter")
            .args([
                "-t",
                &init.to_string(),
                "-p",
                "-m",
                "sh",
                "-c",
                "sleep 0.2 & exit 0",
            ])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let start = Instant::now();
    loop {
        let now = children(init);
        if now == rcsi && start.elapsed() > Duration::from_millis(300) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "orphans left under pid 1: {now:?} (rcsi is {rcsi:?})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SIGTERM to pid 1 reaches rcsi, which shuts down as it should.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(init as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = ns.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!sock.exists(), "rcsi did not shut down cleanly");
}
