//! The CSI conformance suite against `juicefs.rcsi.io` with real JuiceFS
//! (redis metadata and sqlite3 metadata, `--storage file`, from
//! `tests/backends/juicefs.sh`), controller and node in one process on
//! this host over FUSE.

use rcsi_tests::{Backend, CommandDriver, Profile, run_suite};
use std::path::Path;
use std::sync::Arc;

fn plugin() -> Arc<CommandDriver> {
    Arc::new(CommandDriver {
        program: env!("CARGO_BIN_EXE_rcsi").into(),
        args: [
            "node",
            "--driver",
            "juicefs",
            "--endpoint",
            "unix://{endpoint}",
            "--node-id",
            "juicefs-node",
            "--serve-controller",
            "--state-dir",
            "{state}",
            "--stats-cache",
            "0",
            "--check-interval",
            "1",
        ]
        .map(String::from)
        .to_vec(),
        break_volume: Some(break_juicefs_volume),
        state_root: None,
    })
}

/// Removes a volume's directory behind the driver's back, through the
/// controller's mount of its filesystem.
fn break_juicefs_volume(state: &Path, volume_id: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let id = rcsi_juicefs::id::VolumeId::parse(volume_id).context("not a juicefs.rcsi.io id")?;
    for m in std::fs::read_dir(state.join("controller"))?.flatten() {
        let rec = m
            .path()
            .join(".rcsi/volumes")
            .join(id.uuid.simple().to_string());
        if let Ok(b) = std::fs::read(&rec) {
            let r: rcsi_juicefs::records::Record = serde_json::from_slice(&b)?;
            return Ok(std::fs::remove_dir_all(m.path().join(r.path))?);
        }
    }
    anyhow::bail!("no record of {volume_id}")
}

fn profile(name: &str, b: &Backend, secrets: &str) -> Profile {
    Profile {
        name: name.into(),
        parameters: b.params("JUICEFS_SC_PARAMS_FILE"),
        secrets: b.secrets(secrets),
        volume_size: 64 << 20,
        enforces_size: true,
        online_expansion: true,
        // Clients load quotas at their heartbeat (12 s) and flush usage
        // every few seconds.
        stats_settle: std::time::Duration::from_secs(20),
        ..Default::default()
    }
}

fn main() -> std::process::ExitCode {
    let b = match Backend::start("juicefs") {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = run_suite(
        vec![
            (
                plugin(),
                profile("juicefs/redis", &b, "JUICEFS_SECRETS_FILE"),
            ),
            (
                plugin(),
                profile("juicefs/sqlite", &b, "JUICEFS_SQLITE_SECRETS_FILE"),
            ),
        ],
        rcsi_tests::cases::all(),
        vec![],
    )
    .exit_code();
    drop(b);
    code
}
