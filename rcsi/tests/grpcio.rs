//! Interop with a non-Go gRPC client: Python grpcio at its default settings
//! (it sends the percent-encoded socket path as `:authority`) calls the CSI
//! socket and the kubelet registration socket of `rcsi node`.
//! CI installs grpcio and grpcio-tools from PyPI (`.ci/run`).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn python_grpcio_client_is_served_on_unix_sockets() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = tempfile::tempdir().unwrap();
    let stubs = dir.path().join("stubs");
    std::fs::create_dir(&stubs).unwrap();
    let stubs_made = Command::new("python3")
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(root.join("proto"))
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .args(["csi.proto", "pluginregistration.proto"])
        .output()
        .expect("running python3");
    assert!(
        stubs_made.status.success(),
        "generating Python stubs failed (pip install grpcio grpcio-tools): {}",
        String::from_utf8_lossy(&stubs_made.stderr)
    );

    let sock = dir.path().join("csi.sock");
    let reg_dir = dir.path().join("registry");
    let mut driver = Command::new(env!("CARGO_BIN_EXE_rcsi"))
        .args(["node", "--driver", "local-path", "--node-id", "interop"])
        .arg(format!("--endpoint=unix://{}", sock.display()))
        .arg(format!("--base-path={}", dir.path().join("base").display()))
        .arg(format!("--kubelet-registration-path={}", sock.display()))
        .arg(format!("--registration-dir={}", reg_dir.display()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let reg_sock = reg_dir.join("local.rcsi.io-reg.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(sock.exists() && reg_sock.exists()) {
        assert!(Instant::now() < deadline, "driver did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = Command::new("python3")
        .arg(root.join("tests/interop/grpcio_client.py"))
        .args([&stubs, &sock, &reg_sock])
        .output()
        .unwrap();
    let _ = driver.kill();
    let _ = driver.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("all calls answered"),
        "grpcio client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
