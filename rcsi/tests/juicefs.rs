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
    // Bad arguments exit here, before a backend is started and left running.
    let _ = libtest_mimic::Arguments::from_args();
    let b = match Backend::start("juicefs") {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let kill = {
        let mut secret = b.secrets("JUICEFS_SECRETS_FILE")["NodePublishVolumeSecret"].clone();
        // A filesystem of its own, so killing its mounts touches no other trial.
        let url = b.var("JUICEFS_REDIS_URL");
        let own_db = format!("{}2", url.trim_end_matches(char::is_numeric));
        secret.insert("name".into(), "rcsi-kill".into());
        secret.insert("metaurl".into(), own_db.clone());
        secret.insert(
            "bucket".into(),
            format!("{}-kill/", b.var("JUICEFS_BUCKET_DIR")),
        );
        libtest_mimic::Trial::test("juicefs/redis::kill-plugin-and-mounts", move || {
            tokio::runtime::Runtime::new()
                .expect("runtime")
                .block_on(kill_plugin_and_mounts(secret, own_db))
                .map_err(|e| format!("{e:#}").into())
        })
    };
    let fixed = {
        let secret = b.secrets("JUICEFS_SECRETS_FILE")["NodePublishVolumeSecret"].clone();
        libtest_mimic::Trial::test("juicefs/redis::static-volumes", move || {
            tokio::runtime::Runtime::new()
                .expect("runtime")
                .block_on(static_volumes(secret))
                .map_err(|e| format!("{e:#}").into())
        })
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
        vec![kill, fixed],
    )
    .exit_code();
    drop(b);
    code
}

/// The juicefs processes of the node's mounts of the filesystem at `url`
/// (not the controller's).
fn node_daemons(url: &str) -> Vec<nix::unistd::Pid> {
    let out = std::process::Command::new("pgrep")
        .args(["-f", &format!("juicefs mount .*{url} .*/mounts/")])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .map(nix::unistd::Pid::from_raw)
        .collect()
}

/// SIGKILL the node plugin while volumes are published and a writer is
/// running: the writer sees no error, the mounts and their daemons stay.
/// Then kill the filesystem's juicefs processes: the plugin mounts it
/// again, re-binds every target, and the volume condition says so.
async fn kill_plugin_and_mounts(
    secret: std::collections::HashMap<String, String>,
    url: String,
) -> anyhow::Result<()> {
    use anyhow::{Context, ensure};
    use csi_core::csi::{self, volume_capability as vc};
    use rcsi_tests::Driver;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    let mut inst = plugin().start().await?;
    let connect = |inst: &dyn rcsi_tests::Instance| {
        let ep = inst.endpoint();
        async move {
            let ch = csi_core::client::connect(&ep).await?;
            anyhow::Ok((
                csi::controller_client::ControllerClient::new(ch.clone()),
                csi::node_client::NodeClient::new(ch),
            ))
        }
    };
    let (mut ctl, mut node) = connect(inst.as_ref()).await?;
    let scratch = tempfile::tempdir()?;
    let cap = csi::VolumeCapability {
        access_type: Some(vc::AccessType::Mount(Default::default())),
        access_mode: Some(vc::AccessMode {
            mode: vc::access_mode::Mode::MultiNodeMultiWriter as i32,
        }),
    };
    let mut vols = Vec::new();
    for name in ["kill-a", "kill-b"] {
        let v = ctl
            .create_volume(csi::CreateVolumeRequest {
                name: name.into(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: 256 << 20,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![cap.clone()],
                secrets: secret.clone(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .volume
            .context("no volume")?;
        vols.push(v);
    }
    // a at two targets, b at one.
    let targets: Vec<(usize, std::path::PathBuf)> = [(0, "a1"), (0, "a2"), (1, "b1")]
        .into_iter()
        .map(|(v, t)| (v, scratch.path().join(t)))
        .collect();
    let publish = |v: &csi::Volume, t: &std::path::Path| csi::NodePublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        target_path: t.display().to_string(),
        volume_capability: Some(cap.clone()),
        volume_context: v.volume_context.clone(),
        secrets: secret.clone(),
        ..Default::default()
    };
    for (v, t) in &targets {
        node.node_publish_volume(publish(&vols[*v], t)).await?;
    }
    let daemons = node_daemons(&url);
    ensure!(!daemons.is_empty(), "no juicefs daemon for the node mount");

    let stop = Arc::new(AtomicBool::new(false));
    let w = rcsi_tests::writer(targets[0].1.join("log"), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    inst.crash().await.context("restarting the plugin")?;
    let (mut ctl, mut node) = connect(inst.as_ref()).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let written = w
        .join()
        .expect("writer")
        .map_err(|e| anyhow::anyhow!("the writer failed across the plugin kill: {e}"))?;
    ensure!(written > 0, "the writer wrote nothing");
    ensure!(
        node_daemons(&url) == daemons,
        "the juicefs daemons changed across the plugin kill"
    );
    for (v, t) in &targets {
        node.node_publish_volume(publish(&vols[*v], t))
            .await
            .context("publish again after the restart")?;
    }
    let stats = |v: &csi::Volume, t: &std::path::Path| csi::NodeGetVolumeStatsRequest {
        volume_id: v.volume_id.clone(),
        volume_path: t.display().to_string(),
        staging_target_path: String::new(),
    };
    let c = node
        .node_get_volume_stats(stats(&vols[0], &targets[0].1))
        .await?
        .into_inner()
        .volume_condition
        .unwrap_or_default();
    ensure!(!c.abnormal, "after the plugin restart: {}", c.message);
    eprintln!("plugin SIGKILL: the writer made {written} bytes durable without an error");

    // Kill the filesystem's mount processes: every target dies with them.
    for pid in &daemons {
        let _ = nix::sys::signal::kill(*pid, nix::sys::signal::Signal::SIGKILL);
    }
    let killed = Instant::now();
    let alive = |p: &std::path::Path| std::fs::read_dir(p).is_ok();
    while !targets.iter().all(|(_, t)| alive(t)) {
        ensure!(
            killed.elapsed() < Duration::from_secs(20),
            "targets not usable 20 s after the juicefs processes died"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "juicefs killed: all targets usable again after {:?}",
        killed.elapsed()
    );
    let log = std::fs::metadata(targets[0].1.join("log"))?.len();
    ensure!(
        log >= written,
        "the log has {log} bytes, {written} were made durable"
    );
    std::fs::write(targets[1].1.join("after"), b"healed")?;
    ensure!(
        std::fs::read(targets[0].1.join("after"))? == b"healed",
        "targets of one volume differ"
    );
    std::fs::write(targets[2].1.join("after"), b"healed")?;
    let c = node
        .node_get_volume_stats(stats(&vols[0], &targets[0].1))
        .await?
        .into_inner()
        .volume_condition
        .unwrap_or_default();
    ensure!(
        c.abnormal && c.message.contains("mounted it again"),
        "condition after the heal: {c:?}"
    );
    eprintln!("condition: {}", c.message);

    for (v, t) in &targets {
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: vols[*v].volume_id.clone(),
            target_path: t.display().to_string(),
        })
        .await?;
    }
    let released = Instant::now();
    while !node_daemons(&url).is_empty() {
        ensure!(
            released.elapsed() < Duration::from_secs(10),
            "the node mount's daemons outlived its last target"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for v in &vols {
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            secrets: secret.clone(),
        })
        .await?;
    }
    inst.stop().await
}

/// Static volumes: any handle with the directory in the `path` attribute
/// (and `/` for the whole filesystem) publishes that directory; a handle
/// with no `path` is NotFound, a missing directory NotFound, a `path` that
/// climbs out InvalidArgument.
async fn static_volumes(secret: std::collections::HashMap<String, String>) -> anyhow::Result<()> {
    use anyhow::{Context, ensure};
    use csi_core::csi::{self, volume_capability as vc};
    use rcsi_tests::Driver;
    let mut inst = plugin().start().await?;
    let ch = csi_core::client::connect(&inst.endpoint()).await?;
    let mut ctl = csi::controller_client::ControllerClient::new(ch.clone());
    let mut node = csi::node_client::NodeClient::new(ch);
    let scratch = tempfile::tempdir()?;
    let cap = csi::VolumeCapability {
        access_type: Some(vc::AccessType::Mount(Default::default())),
        access_mode: Some(vc::AccessMode {
            mode: vc::access_mode::Mode::MultiNodeMultiWriter as i32,
        }),
    };
    // A provisioned volume gives the static ones an existing directory.
    let v = ctl
        .create_volume(csi::CreateVolumeRequest {
            name: "static-source".into(),
            volume_capabilities: vec![cap.clone()],
            secrets: secret.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .context("no volume")?;
    let rw = scratch.path().join("rw");
    let mut req = csi::NodePublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        target_path: rw.display().to_string(),
        volume_capability: Some(cap.clone()),
        volume_context: v.volume_context.clone(),
        secrets: secret.clone(),
        ..Default::default()
    };
    node.node_publish_volume(req.clone()).await?;
    std::fs::write(rw.join("shared"), b"from the provisioned volume")?;
    let code = |r: Result<tonic::Response<csi::NodePublishVolumeResponse>, tonic::Status>| {
        r.map(drop).map_err(|s| s.code())
    };
    let target = scratch.path().join("static");
    req.volume_id = "team-data-handle".into();
    req.target_path = target.display().to_string();
    req.readonly = true;
    req.volume_context = [("path".to_owned(), "/static-source".to_owned())].into();
    node.node_publish_volume(req.clone())
        .await
        .context("a static volume")?;
    ensure!(
        std::fs::read(target.join("shared"))? == b"from the provisioned volume",
        "the static volume does not show the directory"
    );
    ensure!(
        std::fs::write(target.join("x"), b"").is_err(),
        "a read-only static volume is writable"
    );
    let whole = scratch.path().join("whole");
    let mut r = req.clone();
    r.target_path = whole.display().to_string();
    r.volume_context = [("path".to_owned(), "/".to_owned())].into();
    node.node_publish_volume(r)
        .await
        .context("the whole filesystem")?;
    ensure!(
        whole.join("static-source/shared").exists(),
        "the whole filesystem is not shown"
    );
    for (tag, path, want) in [
        ("no path", None, tonic::Code::NotFound),
        (
            "a missing directory",
            Some("/no-such-dir"),
            tonic::Code::NotFound,
        ),
        (
            "a path climbing out",
            Some("/a/../../etc"),
            tonic::Code::InvalidArgument,
        ),
    ] {
        let mut r = req.clone();
        r.target_path = scratch.path().join("refused").display().to_string();
        r.volume_context = path
            .map(|p| [("path".to_owned(), p.to_owned())].into())
            .unwrap_or_default();
        let got = code(node.node_publish_volume(r).await);
        ensure!(got == Err(want), "{tag}: {got:?}");
    }
    for (id, t) in [
        ("team-data-handle", &target),
        ("team-data-handle", &whole),
        (v.volume_id.as_str(), &rw),
    ] {
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: t.display().to_string(),
        })
        .await?;
    }
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        secrets: secret,
    })
    .await?;
    inst.stop().await
}
