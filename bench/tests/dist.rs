//! Distributed mode with several services on 127.0.0.1 ports sharing one
//! directory, as hosts would share a filesystem.

use assert_cmd::Command;
use serde_json::Value;
use std::net::TcpListener;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A service process, killed when dropped.
struct Service {
    child: Child,
    port: u16,
}

impl Service {
    /// A service that may work under `root`.
    fn start(secret: &str, root: &std::path::Path) -> Self {
        let port = free_port();
        let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("rbench"))
            .args([
                "--service",
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--secret",
                secret,
            ])
            .arg(root)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "service did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, port }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hosts(services: &[&Service]) -> String {
    services
        .iter()
        .map(|s| s.addr())
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn three_services_add_up_and_report_per_host() {
    let d = tempfile::tempdir().unwrap();
    let s: Vec<Service> = (0..3).map(|_| Service::start("s3cr3t", d.path())).collect();
    let json = d.path().join("r.json");
    let out = Command::cargo_bin("rbench")
        .unwrap()
        .args([
            "-d", "-w", "-r", "-F", "-D", "-t", "2", "-n", "1", "-N", "4", "-s", "256k", "-b",
            "64k", "--verify",
        ])
        .args([
            "--hosts",
            &hosts(&s.iter().collect::<Vec<_>>()),
            "--secret",
            "s3cr3t",
            "--json",
        ])
        .arg(&json)
        .arg("--resfile")
        .arg(d.path().join("res.txt"))
        .arg(d.path().join("tree").tap_mkdir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.matches("host 127.0.0.1:").count(),
        3 * 5,
        "a line per host per phase:\n{text}"
    );
    let res = std::fs::read_to_string(d.path().join("res.txt")).unwrap();
    assert!(res.contains(&*text), "the tables as printed: {res}");
    assert!(
        res.contains("--secret ***") && !res.contains("s3cr3t"),
        "the secret is not kept: {res}"
    );
    let rs: Vec<Value> = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let write = rs.iter().find(|r| r["phase"] == "WRITE").unwrap();
    assert_eq!(write["threads"], 6);
    assert_eq!(
        write["last"]["bytes"],
        3 * 2 * 4 * 256 * 1024,
        "every host wrote its own files"
    );
    assert_eq!(
        write["latency"]["count"],
        3 * 2 * 4 * 4,
        "histograms of all hosts merged"
    );
    let per_host = write["hosts"].as_array().unwrap();
    assert_eq!(per_host.len(), 3);
    for h in per_host {
        assert_eq!(h["last"]["bytes"], 2 * 4 * 256 * 1024);
    }
    let read = rs.iter().find(|r| r["phase"] == "READ").unwrap();
    assert_eq!(
        read["last"]["bytes"], write["last"]["bytes"],
        "verified reads of everything written"
    );
    assert!(
        std::fs::read_dir(d.path().join("tree"))
            .unwrap()
            .next()
            .is_none(),
        "ranks kept hosts apart and cleaned up"
    );
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for std::path::PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

fn one_line_failure(args: &[&str], code: i32) -> String {
    let out = Command::cargo_bin("rbench")
        .unwrap()
        .args(args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(code), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    err
}

#[test]
fn wrong_secret_unreachable_host_and_bad_remote_input() {
    let d = tempfile::tempdir().unwrap();
    let s = Service::start("right", d.path());
    let dir = d.path().to_str().unwrap();
    let err = one_line_failure(
        &[
            "-w",
            "-s",
            "1m",
            "--hosts",
            &s.addr(),
            "--secret",
            "wrong",
            dir,
        ],
        2,
    );
    assert!(err.contains("wrong secret"), "{err}");
    let nobody = format!("127.0.0.1:{}", free_port());
    let err = one_line_failure(
        &[
            "-w",
            "-s",
            "1m",
            "--hosts",
            &format!("{},{nobody}", s.addr()),
            "--secret",
            "right",
            dir,
        ],
        1,
    );
    assert!(
        err.contains(&nobody) && err.contains("unreachable"),
        "{err}"
    );
    let err = one_line_failure(
        &[
            "-w",
            "-s",
            "1m",
            "-b",
            "4m",
            "--hosts",
            &s.addr(),
            "--secret",
            "right",
            dir,
        ],
        2,
    );
    assert!(
        err.contains(&s.addr()) && err.contains("larger than the file size"),
        "{err}"
    );
    // The service keeps serving after sessions that failed.
    Command::cargo_bin("rbench")
        .unwrap()
        .args([
            "-w",
            "-s",
            "1m",
            "--hosts",
            &s.addr(),
            "--secret",
            "right",
            dir,
        ])
        .assert()
        .success();
}

#[test]
fn a_host_dying_mid_run_is_a_clean_error() {
    let d = tempfile::tempdir().unwrap();
    let mut s = Service::start("k", d.path());
    let child = std::process::Command::new(assert_cmd::cargo::cargo_bin("rbench"))
        .args([
            "-w",
            "-s",
            "100g",
            "-b",
            "1m",
            "--timelimit",
            "20",
            "--hosts",
            &s.addr(),
            "--secret",
            "k",
        ])
        .arg(d.path().join("big"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    s.child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("disconnected during WRITE") || err.contains("connection lost during WRITE"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn services_work_only_under_their_paths_and_never_see_the_secret() {
    let root = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let s = Service::start("k", root.path());
    let args = |dir: &std::path::Path| -> Vec<String> {
        [
            "-w",
            "-s",
            "64k",
            "-b",
            "4k",
            "--hosts",
            &s.addr(),
            "--secret",
            "k",
        ]
        .map(String::from)
        .into_iter()
        .chain([dir.display().to_string()])
        .collect()
    };
    let a = args(elsewhere.path());
    let err = one_line_failure(&a.iter().map(String::as_str).collect::<Vec<_>>(), 2);
    assert!(
        err.contains("outside the paths this service works on"),
        "{err}"
    );
    assert!(
        std::fs::read_dir(elsewhere.path())
            .unwrap()
            .next()
            .is_none()
    );
    // A symlink inside the root that leads out of it is outside too.
    let link = root.path().join("out");
    std::os::unix::fs::symlink(elsewhere.path(), &link).unwrap();
    let a = args(&link);
    let err = one_line_failure(&a.iter().map(String::as_str).collect::<Vec<_>>(), 2);
    assert!(err.contains("outside"), "{err}");
    let inside = root.path().join("in");
    std::fs::create_dir(&inside).unwrap();
    let a = args(&inside);
    Command::cargo_bin("rbench")
        .unwrap()
        .args(&a)
        .assert()
        .success();

    // On the wire: a challenge, then an HMAC; the secret itself never travels.
    use std::io::{BufRead, BufReader, Write};
    let conn = std::net::TcpStream::connect(s.addr()).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let challenge: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(challenge["type"], "challenge");
    assert_eq!(challenge["nonce"].as_str().unwrap().len(), 64);
    // Replaying a proof made for another challenge fails.
    let mut out = conn;
    writeln!(
        out,
        r#"{{"type":"hello","proof":"{}","args":["-w","-s","64k","-b","4k","{}"],"rank":0,"hosts":1}}"#,
        "00".repeat(32),
        inside.display()
    )
    .unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("wrong secret"), "{line}");
}

#[test]
fn a_service_beyond_loopback_needs_a_secret_and_paths() {
    let d = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::cargo_bin("rbench")
            .unwrap()
            .env_remove("RBENCH_SECRET")
            .args(args)
            .timeout(Duration::from_secs(5))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let dir = d.path().to_str().unwrap();
    let port = free_port().to_string();
    let (code, err) = run(&["--service", "--bind", "0.0.0.0", "--port", &port, dir]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--secret"), "{err}");
    let (code, err) = run(&["--service", "--port", &port]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("PATH"), "{err}");
}

#[test]
fn the_coordinator_says_when_the_block_is_shrunk_to_small_files() {
    let d = tempfile::tempdir().unwrap();
    let s = Service::start("s3cr3t", d.path());
    let out = Command::cargo_bin("rbench")
        .unwrap()
        .args(["-w", "-N", "2", "-s", "8k", "--hosts", &hosts(&[&s])])
        .args(["--secret", "s3cr3t"])
        .arg(d.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("note: block size set to the file size 8K"),
        "{text}"
    );
}
