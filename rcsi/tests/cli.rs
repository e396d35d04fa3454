//! The command line: each driver's flags appear only with that driver.

use std::process::Command;

fn rcsi(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rcsi"))
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
    assert!(!std::path::Path::new("/tmp/rcsi-cli-test-ctl.sock").exists());
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
