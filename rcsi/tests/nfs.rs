//! The CSI conformance suite against `nfs.rcsi.io` with a real NFS server
//! (nfs-ganesha from `tests/backends/nfs.sh`): the controller on this host
//! (it mounts nothing), the node plugin's kernel mounts in the node VM.

use rcsi_tests::{CommandDriver, Profile, run_suite};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// A running ganesha, stopped when dropped.
struct Ganesha {
    dir: tempfile::TempDir,
    env: HashMap<String, String>,
}

impl Ganesha {
    fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("rcsi-nfs-").tempdir()?;
        let out = Command::new(script())
            .arg("start")
            .arg(dir.path())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "tests/backends/nfs.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Ok(Self { dir, env })
    }

    fn var(&self, k: &str) -> String {
        self.env.get(k).cloned().unwrap_or_default()
    }

    /// StorageClass parameters from NFS_SC_PARAMS_FILE (`key: value` lines).
    fn parameters(&self) -> HashMap<String, String> {
        std::fs::read_to_string(self.var("NFS_SC_PARAMS_FILE"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect()
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/backends/nfs.sh")
}

fn controller(g: &Ganesha) -> Arc<CommandDriver> {
    Arc::new(CommandDriver {
        program: env!("CARGO_BIN_EXE_rcsi").into(),
        args: [
            "controller",
            "--driver",
            "nfs",
            "--endpoint",
            "unix://{endpoint}",
            "--nfs-port",
            &g.var("NFS_PORT"),
            "--nfs-mount-port",
            &g.var("NFS_MOUNT_PORT"),
            "--nfs-call-timeout",
            "5",
        ]
        .map(String::from)
        .to_vec(),
        break_volume: None,
        state_root: None,
    })
}

fn main() -> std::process::ExitCode {
    let g = Ganesha::start().expect("a real NFS server (nfs-ganesha)");
    let profile = Profile {
        name: "nfs/controller".into(),
        parameters: g.parameters(),
        volume_size: 32 << 20,
        host_data: Some(PathBuf::from(g.var("NFS_EXPORT_DIR"))),
        ids_hold_paths: true,
        shared_stats: true,
        ..Default::default()
    };
    let conclusion = run_suite(
        vec![(controller(&g), profile)],
        rcsi_tests::cases::all(),
        vec![],
    );
    drop(g);
    conclusion.exit_code()
}
