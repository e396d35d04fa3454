//! The CSI conformance suite against `nfs.rcsi.io` with a real NFS server
//! (nfs-ganesha from `tests/backends/nfs.sh`): the controller on this host
//! (it mounts nothing), the node plugin's kernel mounts in the node VM.

use rcsi_tests::{Backend, CommandDriver, Profile, node_vm_trial, run_suite};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

fn controller(g: &Backend) -> Arc<CommandDriver> {
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

/// The node plugin (serving the controller too) as it runs in the node VM,
/// where the host's ganesha is relayed to the guest's 127.0.0.1.
fn node_plugin() -> Arc<CommandDriver> {
    Arc::new(CommandDriver {
        program: env!("CARGO_BIN_EXE_rcsi").into(),
        args: [
            "node",
            "--driver",
            "nfs",
            "--endpoint",
            "unix://{endpoint}",
            "--node-id",
            "node-vm",
            "--serve-controller",
            "--nfs-port",
            "2049",
            "--nfs-mount-port",
            "20048",
            "--nfs-call-timeout",
            "10",
            "--mount-timeout",
            "30",
            "--stats-timeout",
            "5",
            "--stats-cache",
            "1",
        ]
        .map(String::from)
        .to_vec(),
        break_volume: Some(break_nfs_volume),
        state_root: None,
    })
}

/// Removes a volume's directory on the server behind the driver's back
/// (through a mount of its export), so its mounts turn stale.
fn break_nfs_volume(_state: &Path, volume_id: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let v = rcsi_nfs::id::VolumeId::parse(volume_id).context("not an nfs.rcsi.io volume id")?;
    let m = tempfile::tempdir()?;
    let device = format!("{}:{}", v.server, v.share);
    let ok = Command::new("mount")
        .args(["-t", "nfs", "-o", "nfsvers=4.2", &device])
        .arg(m.path())
        .status()?
        .success();
    anyhow::ensure!(ok, "cannot mount {device}");
    let removed = std::fs::remove_dir_all(m.path().join(&v.sub_dir));
    let _ = Command::new("umount").arg(m.path()).status();
    Ok(removed?)
}

fn node_profile(name: &str, extra: &[(&str, &str)]) -> Profile {
    let parameters: HashMap<String, String> = [("server", "127.0.0.1"), ("share", "/export")]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Profile {
        name: name.into(),
        parameters,
        volume_size: 32 << 20,
        ids_hold_paths: true,
        shared_stats: true,
        ..Default::default()
    }
}

/// Inside the node VM: kernel NFSv4.2 and NFSv3 mounts of the host's ganesha,
/// one trial at a time (the VM's default): hung-server stops the relays
/// that every mount uses.
fn in_node_vm() -> std::process::ExitCode {
    let hung = libtest_mimic::Trial::test("nfs/node-v4.2::hung-server", || {
        tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(hung_server())
            .map_err(|e| format!("{e:#}").into())
    });
    let fixed = libtest_mimic::Trial::test("nfs/node-v4.2::static-and-inline", || {
        tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(static_and_inline())
            .map_err(|e| format!("{e:#}").into())
    });
    run_suite(
        vec![
            (
                node_plugin(),
                node_profile("nfs/node-v4.2", &[("nfsvers", "4.2")]),
            ),
            (
                node_plugin(),
                node_profile(
                    "nfs/node-v3",
                    &[
                        ("share", "/export2"),
                        ("nfsvers", "3"),
                        (
                            "mountOptions",
                            "nolock,proto=tcp,port=2049,mountport=20048,mountproto=tcp",
                        ),
                    ],
                ),
            ),
        ],
        // The controller's own cases ran on the host (the same client code);
        // the copies and growth are checked again through kernel mounts.
        rcsi_tests::cases::all()
            .into_iter()
            .filter(|c| !c.node_free || rcsi_tests::cases::NEED_DATA.contains(&c.name))
            .collect(),
        vec![fixed, hung],
    )
    .exit_code()
}

/// Stops (SIGSTOP) the guest's relays to the server, so every NFS request
/// hangs as with a dead server, until `resume`.
fn relays(resume: bool) {
    let sig = if resume { "-CONT" } else { "-STOP" };
    let _ = Command::new("pkill").args([sig, "-x", "socat"]).status();
}

/// The live (not zombie) `mount` and `mount.nfs*` processes, as
/// "pid (name) state".
fn mount_helpers() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec!["/proc unreadable".into()];
    };
    dir.flatten()
        .filter_map(|e| {
            e.file_name().to_str()?.parse::<u32>().ok()?;
            // "pid (comm) state ..."
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let (head, tail) = stat.rsplit_once(") ")?;
            let comm = head.split_once(" (")?.1;
            let live = !tail.starts_with('Z');
            let state = tail.split(' ').next().unwrap_or("?");
            (live && (comm == "mount" || comm.starts_with("mount.nfs")))
                .then(|| format!("{head}) {state}"))
        })
        .collect()
}

/// A server that stops answering while volumes are mounted: stats report
/// an abnormal condition within the stats bound (and a second call does not
/// wait again), Probe answers, a stage fails within the mount bound,
/// unpublish and unstage finish (forced, then lazy), and everything works
/// again once the server answers.
async fn hung_server() -> anyhow::Result<()> {
    use anyhow::{Context, ensure};
    use csi_core::csi::{self, node_client::NodeClient, volume_capability as vc};
    use rcsi_tests::Driver;
    use std::time::{Duration, Instant};
    let mut inst = node_plugin().start().await?;
    let ch = csi_core::client::connect(&inst.endpoint()).await?;
    let mut ctl = csi::controller_client::ControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch.clone());
    let mut ident = csi::identity_client::IdentityClient::new(ch);
    let scratch = tempfile::tempdir()?;
    let cap = csi::VolumeCapability {
        access_type: Some(vc::AccessType::Mount(Default::default())),
        access_mode: Some(vc::AccessMode {
            mode: vc::access_mode::Mode::MultiNodeMultiWriter as i32,
        }),
    };
    let profile = node_profile("hung", &[("nfsvers", "4.2")]);
    let mut vols = Vec::new();
    for name in ["hung-a", "hung-b", "hung-c"] {
        let v = ctl
            .create_volume(csi::CreateVolumeRequest {
                name: name.into(),
                volume_capabilities: vec![cap.clone()],
                parameters: profile.parameters.clone(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .volume
            .context("no volume")?;
        vols.push(v);
    }
    let paths = |i: usize| {
        (
            scratch.path().join(format!("s{i}")).display().to_string(),
            scratch.path().join(format!("t{i}")).display().to_string(),
        )
    };
    let stage = |i: usize, v: &csi::Volume| csi::NodeStageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: paths(i).0,
        volume_capability: Some(cap.clone()),
        volume_context: v.volume_context.clone(),
        ..Default::default()
    };
    for (i, v) in vols.iter().enumerate().take(2) {
        node.node_stage_volume(stage(i, v)).await?;
        node.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: paths(i).0,
            target_path: paths(i).1,
            volume_capability: Some(cap.clone()),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        })
        .await?;
    }
    let stats = |i: usize, v: &csi::Volume| csi::NodeGetVolumeStatsRequest {
        volume_id: v.volume_id.clone(),
        volume_path: paths(i).1,
        staging_target_path: String::new(),
    };
    let r = node
        .node_get_volume_stats(stats(0, &vols[0]))
        .await?
        .into_inner();
    ensure!(
        !r.volume_condition.unwrap_or_default().abnormal,
        "healthy volume reported abnormal"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await; // past the stats cache

    relays(false);
    let result = async {
        let t = Instant::now();
        let r = node
            .node_get_volume_stats(stats(0, &vols[0]))
            .await?
            .into_inner();
        let cond = r.volume_condition.unwrap_or_default();
        ensure!(cond.abnormal, "stats of a hung server: {cond:?}");
        ensure!(
            t.elapsed() < Duration::from_secs(8),
            "stats took {:?}",
            t.elapsed()
        );
        eprintln!(
            "hung server: stats abnormal after {:?}: {}",
            t.elapsed(),
            cond.message
        );
        let t = Instant::now();
        let r = node
            .node_get_volume_stats(stats(0, &vols[0]))
            .await?
            .into_inner();
        ensure!(
            r.volume_condition.unwrap_or_default().abnormal,
            "second stats call healthy"
        );
        ensure!(
            t.elapsed() < Duration::from_secs(1),
            "second stats call waited {:?}",
            t.elapsed()
        );
        let t = Instant::now();
        ident.probe(csi::ProbeRequest {}).await?;
        ensure!(
            t.elapsed() < Duration::from_secs(1),
            "Probe took {:?}",
            t.elapsed()
        );
        let t = Instant::now();
        let r = node.node_stage_volume(stage(2, &vols[2])).await;
        ensure!(
            matches!(&r, Err(s) if s.code() == tonic::Code::DeadlineExceeded),
            "stage with a hung server: {r:?}"
        );
        eprintln!("hung server: stage failed after {:?}", t.elapsed());
        ensure!(
            t.elapsed() < Duration::from_secs(40),
            "stage took {:?}",
            t.elapsed()
        );
        // The failed call's helpers die with it: no mount.nfs is left to
        // finish the mount behind its back once the server answers.
        let t = Instant::now();
        loop {
            let left = mount_helpers();
            if left.is_empty() {
                break;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(5),
                "5 s after the failed stage these still run: {left:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let t = Instant::now();
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: vols[1].volume_id.clone(),
            target_path: paths(1).1,
        })
        .await
        .context("unpublish with a hung server")?;
        node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: vols[1].volume_id.clone(),
            staging_target_path: paths(1).0,
        })
        .await
        .context("unstage with a hung server")?;
        eprintln!("hung server: unpublish and unstage took {:?}", t.elapsed());
        ensure!(
            t.elapsed() < Duration::from_secs(200),
            "unmounts took {:?}",
            t.elapsed()
        );
        Ok(())
    }
    .await;
    relays(true);
    if result.is_err() {
        let _ = rcsi_tests::harness::release_under(scratch.path());
    }
    result?;
    // Back: the failed stage succeeds, and stats are healthy again.
    node.node_stage_volume(stage(2, &vols[2]))
        .await
        .context("stage after the server is back")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = node
            .node_get_volume_stats(stats(0, &vols[0]))
            .await?
            .into_inner();
        if !r.volume_condition.unwrap_or_default().abnormal {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "stats still abnormal 30 s after the server is back"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: vols[0].volume_id.clone(),
        target_path: paths(0).1,
    })
    .await?;
    for (i, v) in [(0, &vols[0]), (2, &vols[2])] {
        node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: paths(i).0,
        })
        .await?;
    }
    for v in &vols {
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await?;
    }
    inst.stop().await
}

fn main() -> std::process::ExitCode {
    if std::env::var_os("RCSI_VM_PROFILES").is_some() {
        return in_node_vm();
    }
    // Bad arguments exit here, before a backend is started and left running.
    let _ = libtest_mimic::Arguments::from_args();
    let g = Backend::start("nfs").expect("a real NFS server (nfs-ganesha)");
    let profile = Profile {
        name: "nfs/controller".into(),
        parameters: g.params("NFS_SC_PARAMS_FILE"),
        volume_size: 32 << 20,
        host_data: Some(PathBuf::from(g.var("NFS_EXPORT_DIR"))),
        ids_hold_paths: true,
        shared_stats: true,
        ..Default::default()
    };
    let conclusion = run_suite(
        vec![(controller(&g), profile)],
        rcsi_tests::cases::all(),
        vec![node_vm_trial(
            "nfs/node::in-node-vm",
            &[
                ("RCSI_VM_PROFILES", "nfs"),
                ("RCSI_VM_FORWARD", "2049 20048"),
            ],
        )],
    );
    drop(g);
    conclusion.exit_code()
}

/// A static PV (a handle written as `server:/path`, no attributes) staged
/// and published, and a CSI inline volume (attributes `server`, `share`,
/// `subDir`; the kubelet publishes it without staging) seeing its data.
async fn static_and_inline() -> anyhow::Result<()> {
    use anyhow::{Context, ensure};
    use csi_core::csi::{self, node_client::NodeClient, volume_capability as vc};
    use rcsi_tests::Driver;
    let mut inst = node_plugin().start().await?;
    let ch = csi_core::client::connect(&inst.endpoint()).await?;
    let mut ctl = csi::controller_client::ControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch);
    let scratch = tempfile::tempdir()?;
    let at = |p: &str| scratch.path().join(p).display().to_string();
    let cap = csi::VolumeCapability {
        access_type: Some(vc::AccessType::Mount(Default::default())),
        access_mode: Some(vc::AccessMode {
            mode: vc::access_mode::Mode::MultiNodeMultiWriter as i32,
        }),
    };
    let v = ctl
        .create_volume(csi::CreateVolumeRequest {
            name: "static-dir".into(),
            volume_capabilities: vec![cap.clone()],
            parameters: node_profile("x", &[]).parameters,
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .context("no volume")?;
    let handle = "127.0.0.1:/export/static-dir".to_string();
    node.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: handle.clone(),
        staging_target_path: at("stage"),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .context("staging a static handle")?;
    node.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: handle.clone(),
        staging_target_path: at("stage"),
        target_path: at("static"),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .context("publishing a static handle")?;
    std::fs::write(Path::new(&at("static")).join("hello"), b"from a static PV")?;
    let inline: HashMap<String, String> = [
        ("server", "127.0.0.1"),
        ("share", "/export"),
        ("subDir", "static-dir"),
        ("csi.storage.k8s.io/ephemeral", "true"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    node.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: "csi-0123456789abcdef".into(),
        target_path: at("inline"),
        volume_capability: Some(cap.clone()),
        volume_context: inline,
        ..Default::default()
    })
    .await
    .context("publishing an inline volume without staging")?;
    let got = std::fs::read(Path::new(&at("inline")).join("hello"))?;
    ensure!(
        got == b"from a static PV",
        "the inline volume does not see the data"
    );
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: "csi-0123456789abcdef".into(),
        target_path: at("inline"),
    })
    .await?;
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: handle.clone(),
        target_path: at("static"),
    })
    .await?;
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: handle,
        staging_target_path: at("stage"),
    })
    .await?;
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: v.volume_id,
        ..Default::default()
    })
    .await?;
    inst.stop().await
}
