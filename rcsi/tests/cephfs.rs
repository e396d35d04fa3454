//! `cephfs.rcsi.io` against a real single-node Ceph (`tests/backends/ceph.sh`,
//! one MDS). The controller alone: its conformance cases, a volume's
//! subvolume with its quota and mode, growth, snapshots outliving their
//! volume, restores and clones holding the source's data, crash states, a
//! stopped MDS. The node plugin with ceph-fuse on this host: every
//! conformance case, the plugin and ceph-fuse SIGKILLed, a user of the
//! volume's own, a static volume, stats with the MDS stopped. At the end
//! no subvolume, snapshot, journal key or volume user is left.

use anyhow::{Context, Result, ensure};
use csi_core::csi::{self, controller_client::ControllerClient, volume_capability as vc};
use rcsi_tests::flows::{
    NodeClient, create_in, pids_of, stage_publish, unpublish_unstage_delete, write_synced,
};
use rcsi_tests::{Backend, CommandDriver, Driver, Profile, run_suite_with};
use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The filesystem of the test cluster and the default subvolume group.
const FS: &str = "cephfs";
const GROUP: &str = "csi";

/// The controller, a mgr command abandoned after `mgr_timeout` seconds.
fn controller_with(b: &Backend, mgr_timeout: u64) -> Arc<CommandDriver> {
    Arc::new(CommandDriver {
        program: env!("CARGO_BIN_EXE_rcsi").into(),
        args: [
            "controller",
            "--driver",
            "cephfs",
            "--endpoint",
            "unix://{endpoint}",
            "--ceph-config",
            &b.var("CEPH_CONFIG_FILE"),
            "--call-timeout",
            "5",
            "--mgr-timeout",
            &mgr_timeout.to_string(),
        ]
        .map(String::from)
        .to_vec(),
        break_volume: None,
        state_root: None,
    })
}

/// The controller as the suites run it: a mgr command may take 30 s (the
/// volumes module queues commands while it purges or copies).
fn controller(b: &Backend) -> Arc<CommandDriver> {
    controller_with(b, 30)
}

/// The admin `ceph` CLI of the test cluster, its JSON output parsed.
fn ceph(b: &Backend, args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("ceph")
        .args(["-c", &b.var("CEPH_CONF"), "-k", &b.var("CEPH_KEYRING")])
        .args(args)
        .args(["--format", "json"])
        .output()?;
    ensure!(
        out.status.success(),
        "ceph {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(&text).with_context(|| format!("ceph {}: {text}", args.join(" ")))
}

/// The names `ceph ... ls` lists.
fn names(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["name"].as_str().map(str::to_owned))
        .collect()
}

/// What the filesystem still holds of ours: subvolumes (with their
/// snapshots) in the group, and journal keys in the metadata pool.
fn leftovers(b: &Backend) -> Result<Vec<String>> {
    let mut out = Vec::new();
    // A run that made no volume (a filtered one) never made the group.
    let grouped = names(&ceph(b, &["fs", "subvolumegroup", "ls", FS])?).contains(&GROUP.to_owned());
    let subs = if grouped {
        names(&ceph(b, &["fs", "subvolume", "ls", FS, GROUP])?)
    } else {
        Vec::new()
    };
    for sub in subs {
        out.push(format!("subvolume {sub}"));
        let snaps = ceph(b, &["fs", "subvolume", "snapshot", "ls", FS, &sub, GROUP])?;
        out.extend(
            names(&snaps)
                .into_iter()
                .map(|s| format!("snapshot {sub}@{s}")),
        );
    }
    for e in ceph(b, &["auth", "ls"])?["auth_dump"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(name) = e["entity"]
            .as_str()
            .filter(|n| n.starts_with("client.rcsi-"))
        {
            out.push(format!("cephx user {name}"));
        }
    }
    for dir in ["csi.volumes.rcsi", "csi.snaps.rcsi"] {
        let keys = Command::new("rados")
            .args(["-c", &b.var("CEPH_CONF"), "-k", &b.var("CEPH_KEYRING")])
            .args(["-p", "cephfs_metadata", "-N", "csi", "listomapkeys", dir])
            .output()?;
        for k in String::from_utf8_lossy(&keys.stdout).lines() {
            out.push(format!("{dir} key {k}"));
        }
    }
    Ok(out)
}

fn cap(mode: vc::access_mode::Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(vc::AccessType::Mount(Default::default())),
        access_mode: Some(vc::AccessMode { mode: mode as i32 }),
    }
}

/// A ReadWriteMany volume is a subvolume of the group with its size as the
/// quota and mode 0777; it grows by its quota (no node step); a snapshot
/// outlives the volume's deletion and goes with it when deleted.
async fn subvolume_quota_growth_snapshots(b: &Backend, profile: &Profile) -> Result<()> {
    let mut inst = controller(b).start().await?;
    let mut ctl = ControllerClient::new(csi_core::client::connect(&inst.endpoint()).await?);
    let v = ctl
        .create_volume(csi::CreateVolumeRequest {
            name: "rwx-quota".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 100 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap(vc::access_mode::Mode::MultiNodeMultiWriter)],
            parameters: profile.parameters.clone(),
            secrets: profile.secrets("CreateVolumeSecret"),
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .context("no volume")?;
    let ctx = &v.volume_context;
    let sub = ctx.get("subvolumeName").context("no subvolumeName")?;
    ensure!(
        ctx.get("subvolumeGroup").map(String::as_str) == Some(GROUP),
        "{ctx:?}"
    );
    ensure!(ctx.get("fsName").map(String::as_str) == Some(FS), "{ctx:?}");
    let info = ceph(b, &["fs", "subvolume", "info", FS, sub, GROUP])?;
    ensure!(
        info["bytes_quota"].as_u64() == Some(100 << 20),
        "quota: {info}"
    );
    ensure!(info["mode"].as_u64() == Some(0o40777), "mode: {info}");
    ensure!(
        ctx.get("subvolumePath").map(String::as_str) == info["path"].as_str(),
        "path {:?} vs {}",
        ctx.get("subvolumePath"),
        info["path"]
    );

    let grown = ctl
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 200 << 20,
                limit_bytes: 0,
            }),
            secrets: profile.secrets("ControllerExpandVolumeSecret"),
            volume_capability: None,
        })
        .await?
        .into_inner();
    ensure!(
        grown.capacity_bytes == 200 << 20 && !grown.node_expansion_required,
        "{grown:?}"
    );
    let info = ceph(b, &["fs", "subvolume", "info", FS, sub, GROUP])?;
    ensure!(
        info["bytes_quota"].as_u64() == Some(200 << 20),
        "quota after growth: {info}"
    );

    let snap = ctl
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: v.volume_id.clone(),
            name: "rwx-snap".into(),
            secrets: profile.secrets("CreateSnapshotSecret"),
            parameters: Default::default(),
        })
        .await?
        .into_inner()
        .snapshot
        .context("no snapshot")?;
    ensure!(
        snap.ready_to_use && snap.size_bytes == 200 << 20,
        "{snap:?}"
    );
    let snaps = names(&ceph(
        b,
        &["fs", "subvolume", "snapshot", "ls", FS, sub, GROUP],
    )?);
    ensure!(snaps.len() == 1, "snapshots of {sub}: {snaps:?}");
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        secrets: profile.secrets("DeleteVolumeSecret"),
    })
    .await
    .context("deleting a volume that has a snapshot")?;
    let listed = ctl
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: snap.snapshot_id.clone(),
            secrets: profile.secrets("ListSnapshotsSecret"),
            ..Default::default()
        })
        .await?
        .into_inner();
    ensure!(
        listed.entries.len() == 1,
        "the snapshot went with its volume: {listed:?}"
    );
    ctl.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        secrets: profile.secrets("DeleteSnapshotSecret"),
    })
    .await?;
    let left = names(&ceph(b, &["fs", "subvolume", "ls", FS, GROUP])?);
    ensure!(
        !left.contains(sub),
        "{sub} is still there after its last snapshot went: {left:?}"
    );
    inst.stop().await?;
    Ok(())
}

/// The whole filesystem mounted with ceph-fuse as the admin, to put data
/// into volumes and read it back; unmounted when dropped.
struct AdminMount(tempfile::TempDir);

impl AdminMount {
    fn new(b: &Backend) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ok = Command::new("ceph-fuse")
            .args(["-c", &b.var("CEPH_CONF"), "-k", &b.var("CEPH_KEYRING")])
            .arg(dir.path())
            .status()?
            .success();
        ensure!(ok, "ceph-fuse did not mount the filesystem");
        Ok(Self(dir))
    }

    /// Where volume `v`'s subvolume is in the mount.
    fn of(&self, v: &csi::Volume) -> std::path::PathBuf {
        let path = v.volume_context["subvolumePath"].trim_start_matches('/');
        self.0.path().join(path)
    }
}

impl Drop for AdminMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// CreateVolume until it is no longer Aborted (a clone still copying).
async fn create_until_done(
    ctl: &mut ControllerClient<tonic::transport::Channel>,
    req: csi::CreateVolumeRequest,
) -> Result<csi::Volume> {
    let t = std::time::Instant::now();
    loop {
        match ctl.create_volume(req.clone()).await {
            Ok(r) => return r.into_inner().volume.context("no volume"),
            Err(e) if e.code() == tonic::Code::Aborted && t.elapsed().as_secs() < 120 => {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A volume restored from a snapshot and one cloned from a volume hold the
/// source's data, with their own (larger) quota; the temporary snapshot of
/// the volume clone is gone once it is complete.
async fn restore_and_clone_keep_data(b: &Backend, profile: &Profile) -> Result<()> {
    let mut inst = controller(b).start().await?;
    let mut ctl = ControllerClient::new(csi_core::client::connect(&inst.endpoint()).await?);
    let mnt = AdminMount::new(b)?;
    let req = |name: &str, size: i64, src: Option<csi::volume_content_source::Type>| {
        csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: size,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap(vc::access_mode::Mode::MultiNodeMultiWriter)],
            parameters: profile.parameters.clone(),
            secrets: profile.secrets("CreateVolumeSecret"),
            volume_content_source: src.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
            ..Default::default()
        }
    };
    let a = create_until_done(&mut ctl, req("clone-src", 64 << 20, None)).await?;
    std::fs::write(mnt.of(&a).join("data"), b"kept across copies")?;
    std::fs::create_dir(mnt.of(&a).join("dir"))?;
    std::fs::write(mnt.of(&a).join("dir/file"), vec![7u8; 1 << 20])?;
    let snap = ctl
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: a.volume_id.clone(),
            name: "clone-src-snap".into(),
            secrets: profile.secrets("CreateSnapshotSecret"),
            parameters: Default::default(),
        })
        .await?
        .into_inner()
        .snapshot
        .context("no snapshot")?;
    // Written after the snapshot: a restore must not have it.
    std::fs::write(mnt.of(&a).join("later"), b"after the snapshot")?;
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let restored = create_until_done(
        &mut ctl,
        req(
            "restored",
            128 << 20,
            Some(Type::Snapshot(SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            })),
        ),
    )
    .await?;
    let cloned = create_until_done(
        &mut ctl,
        req(
            "cloned",
            64 << 20,
            Some(Type::Volume(VolumeSource {
                volume_id: a.volume_id.clone(),
            })),
        ),
    )
    .await?;
    for (v, later) in [(&restored, false), (&cloned, true)] {
        let dir = mnt.of(v);
        ensure!(
            std::fs::read(dir.join("data"))? == b"kept across copies",
            "{}: data differs",
            v.volume_id
        );
        ensure!(
            std::fs::read(dir.join("dir/file"))? == vec![7u8; 1 << 20],
            "dir/file differs"
        );
        ensure!(
            dir.join("later").exists() == later,
            "{}: 'later' present: {}",
            v.volume_id,
            !later
        );
    }
    let sub = |v: &csi::Volume| v.volume_context["subvolumeName"].clone();
    let info = ceph(b, &["fs", "subvolume", "info", FS, &sub(&restored), GROUP])?;
    ensure!(
        info["bytes_quota"].as_u64() == Some(128 << 20),
        "restored quota: {info}"
    );
    let snaps = names(&ceph(
        b,
        &["fs", "subvolume", "snapshot", "ls", FS, &sub(&a), GROUP],
    )?);
    ensure!(
        snaps.len() == 1,
        "snapshots of the source after the clone: {snaps:?}"
    );
    for v in [&cloned, &restored, &a] {
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            secrets: profile.secrets("DeleteVolumeSecret"),
        })
        .await?;
    }
    ctl.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        secrets: profile.secrets("DeleteSnapshotSecret"),
    })
    .await?;
    drop(mnt);
    inst.stop().await?;
    Ok(())
}

/// The uuid the journal derives for a volume or snapshot name.
fn uuid_for(b: &Backend, name: &str) -> Result<String> {
    let pool = ceph(b, &["fs", "ls"])?[0]["metadata_pool_id"]
        .as_i64()
        .context("no metadata pool id")?;
    Ok(rcsi_ceph::journal::derived_id("rcsi-test", pool, name)
        .uuid
        .hyphenated()
        .to_string())
}

/// Each step of create, clone, snapshot and delete done as a controller
/// killed right after it leaves it, then the call retried: the same id
/// comes back, nothing is made twice, temporary snapshots go.
async fn crash_states(b: &Backend, profile: &Profile) -> Result<()> {
    let mut inst = controller(b).start().await?;
    let mut ctl = ControllerClient::new(csi_core::client::connect(&inst.endpoint()).await?);
    let req =
        |name: &str, src: Option<csi::volume_content_source::Type>| csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 64 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap(vc::access_mode::Mode::MultiNodeMultiWriter)],
            parameters: profile.parameters.clone(),
            secrets: profile.secrets("CreateVolumeSecret"),
            volume_content_source: src.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
            ..Default::default()
        };
    let id_uuid = |id: &str| {
        id.rsplit('-')
            .take(5)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("-")
    };
    let a = create_until_done(&mut ctl, req("crash-src", None)).await?;
    let a_sub = a.volume_context["subvolumeName"].clone();

    // A subvolume made before the journal said so.
    let made = format!("csi-vol-{}", uuid_for(b, "crash-made")?);
    ceph(
        b,
        &[
            "fs",
            "subvolume",
            "create",
            FS,
            &made,
            "--group_name",
            GROUP,
        ],
    )?;
    let v = create_until_done(&mut ctl, req("crash-made", None)).await?;
    ensure!(
        v.volume_context["subvolumeName"] == made,
        "another subvolume: {v:?}"
    );

    // A name reserved in the journal's directory alone.
    let ruuid = uuid_for(b, "crash-reserved")?;
    let rados = |args: &[&str]| -> Result<()> {
        let ok = Command::new("rados")
            .args(["-c", &b.var("CEPH_CONF"), "-k", &b.var("CEPH_KEYRING")])
            .args(["-p", "cephfs_metadata", "-N", "csi"])
            .args(args)
            .status()?
            .success();
        ensure!(ok, "rados {}", args.join(" "));
        Ok(())
    };
    rados(&[
        "setomapval",
        "csi.volumes.rcsi",
        "name.crash-reserved",
        &ruuid,
    ])?;
    let r = create_until_done(&mut ctl, req("crash-reserved", None)).await?;
    ensure!(
        id_uuid(&r.volume_id) == ruuid,
        "the reserved id was not used: {}",
        r.volume_id
    );

    // A clone: its temporary snapshot made and the copy started.
    let cuuid = uuid_for(b, "crash-clone")?;
    let csub = format!("csi-vol-{cuuid}");
    let tmp = format!("csi-tmp-{csub}");
    ceph(
        b,
        &[
            "fs",
            "subvolume",
            "snapshot",
            "create",
            FS,
            &a_sub,
            &tmp,
            "--group_name",
            GROUP,
        ],
    )?;
    ceph(
        b,
        &[
            "fs",
            "subvolume",
            "snapshot",
            "clone",
            FS,
            &a_sub,
            &tmp,
            &csub,
            "--group_name",
            GROUP,
            "--target_group_name",
            GROUP,
        ],
    )?;
    use csi::volume_content_source::{Type, VolumeSource};
    let from_a = || {
        Some(Type::Volume(VolumeSource {
            volume_id: a.volume_id.clone(),
        }))
    };
    let c = create_until_done(&mut ctl, req("crash-clone", from_a())).await?;
    ensure!(
        c.volume_context["subvolumeName"] == csub,
        "another clone: {c:?}"
    );
    let snaps = names(&ceph(
        b,
        &["fs", "subvolume", "snapshot", "ls", FS, &a_sub, GROUP],
    )?);
    ensure!(snaps.is_empty(), "snapshots left on the source: {snaps:?}");

    // A snapshot made before the journal said so.
    let suuid = uuid_for(b, "crash-snap")?;
    let sname = format!("csi-snap-{suuid}");
    ceph(
        b,
        &[
            "fs",
            "subvolume",
            "snapshot",
            "create",
            FS,
            &a_sub,
            &sname,
            "--group_name",
            GROUP,
        ],
    )?;
    let snap_req = csi::CreateSnapshotRequest {
        source_volume_id: a.volume_id.clone(),
        name: "crash-snap".into(),
        secrets: profile.secrets("CreateSnapshotSecret"),
        parameters: Default::default(),
    };
    let snap = ctl
        .create_snapshot(snap_req.clone())
        .await?
        .into_inner()
        .snapshot
        .context("no snapshot")?;
    ensure!(
        id_uuid(&snap.snapshot_id) == suuid && snap.ready_to_use,
        "{snap:?}"
    );
    let again = ctl
        .create_snapshot(snap_req)
        .await?
        .into_inner()
        .snapshot
        .context("no snapshot")?;
    ensure!(
        again.snapshot_id == snap.snapshot_id,
        "a second snapshot for the same name"
    );
    let snaps = names(&ceph(
        b,
        &["fs", "subvolume", "snapshot", "ls", FS, &a_sub, GROUP],
    )?);
    ensure!(
        snaps == vec![sname.clone()],
        "snapshots of the source: {snaps:?}"
    );

    // A delete whose subvolume went before the journal entry.
    ceph(
        b,
        &["fs", "subvolume", "rm", FS, &made, "--group_name", GROUP],
    )?;
    for _ in 0..2 {
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            secrets: profile.secrets("DeleteVolumeSecret"),
        })
        .await?;
    }
    ctl.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        secrets: profile.secrets("DeleteSnapshotSecret"),
    })
    .await?;
    for id in [&c.volume_id, &r.volume_id, &a.volume_id] {
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: profile.secrets("DeleteVolumeSecret"),
        })
        .await?;
    }
    inst.stop().await?;
    Ok(())
}

/// The MDS stopped (SIGSTOP): CreateVolume fails within the mgr timeout
/// while Probe answers, and works once the MDS runs again.
async fn stopped_mds(b: &Backend, profile: &Profile) -> Result<()> {
    let mut inst = controller_with(b, 8).start().await?;
    let ch = csi_core::client::connect(&inst.endpoint()).await?;
    let mut ctl = ControllerClient::new(ch.clone());
    let mut ident = csi::identity_client::IdentityClient::new(ch);
    // This cluster's MDS, by its conf (another test cluster may run).
    let pattern = format!("ceph-mds -c {} ", b.var("CEPH_CONF"));
    let out = Command::new("pgrep").args(["-f", &pattern]).output()?;
    let pid = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_owned)
        .context("no ceph-mds")?;
    let req = csi::CreateVolumeRequest {
        name: "mds-stopped".into(),
        volume_capabilities: vec![cap(vc::access_mode::Mode::MultiNodeMultiWriter)],
        parameters: profile.parameters.clone(),
        secrets: profile.secrets("CreateVolumeSecret"),
        ..Default::default()
    };
    Command::new("kill").args(["-STOP", &pid]).status()?;
    let t = std::time::Instant::now();
    let r = ctl.create_volume(req.clone()).await;
    let took = t.elapsed();
    let probe = ident.probe(csi::ProbeRequest {}).await;
    Command::new("kill").args(["-CONT", &pid]).status()?;
    let e = r
        .err()
        .context("CreateVolume succeeded with the MDS stopped")?;
    ensure!(
        matches!(
            e.code(),
            tonic::Code::DeadlineExceeded | tonic::Code::Unavailable
        ),
        "with the MDS stopped: {e:?}"
    );
    ensure!(
        took.as_secs() <= 20,
        "CreateVolume took {took:?} with the MDS stopped"
    );
    probe.context("Probe did not answer with the MDS stopped")?;
    eprintln!(
        "figure: MDS stopped: CreateVolume failed with {:?} after {took:?}; Probe answered",
        e.code()
    );
    let v = create_until_done(&mut ctl, req).await?;
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        secrets: profile.secrets("DeleteVolumeSecret"),
    })
    .await?;
    inst.stop().await?;
    Ok(())
}

/// Raw block, an unknown filesystem, a restore: refused with
/// InvalidArgument before anything is made.
async fn refusals(b: &Backend, profile: &Profile) -> Result<()> {
    let mut inst = controller(b).start().await?;
    let mut ctl = ControllerClient::new(csi_core::client::connect(&inst.endpoint()).await?);
    let req = |name: &str, caps, params: HashMap<String, String>| csi::CreateVolumeRequest {
        name: name.into(),
        volume_capabilities: vec![caps],
        parameters: params,
        secrets: profile.secrets("CreateVolumeSecret"),
        ..Default::default()
    };
    let block = csi::VolumeCapability {
        access_type: Some(vc::AccessType::Block(Default::default())),
        ..cap(vc::access_mode::Mode::SingleNodeWriter)
    };
    let e = ctl
        .create_volume(req("block", block, profile.parameters.clone()))
        .await
        .expect_err("a block volume was made");
    ensure!(e.code() == tonic::Code::InvalidArgument, "block: {e:?}");
    let mut other = profile.parameters.clone();
    other.insert("fsName".into(), "nosuchfs".into());
    let rwo = cap(vc::access_mode::Mode::SingleNodeWriter);
    let e = ctl
        .create_volume(req("nofs", rwo.clone(), other))
        .await
        .expect_err("a volume of a missing filesystem was made");
    ensure!(
        e.code() == tonic::Code::InvalidArgument && e.message().contains("nosuchfs"),
        "missing fs: {e:?}"
    );
    let mut escape = profile.parameters.clone();
    escape.insert("subvolumeGroup".into(), "../x".into());
    let e = ctl
        .create_volume(req("escape", rwo, escape))
        .await
        .expect_err("a group name with a slash was taken");
    ensure!(
        e.code() == tonic::Code::InvalidArgument,
        "group ../x: {e:?}"
    );
    inst.stop().await?;
    Ok(())
}

/// The node plugin (serving the controller too) with the cluster map at
/// `config`; `fuse`: its volumes are broken by killing their ceph-fuse.
fn node_plugin(config: &str, fuse: bool, extra: &[&str]) -> Arc<CommandDriver> {
    let mut args: Vec<String> = [
        "node",
        "--driver",
        "cephfs",
        "--endpoint",
        "unix://{endpoint}",
        "--node-id",
        "cephfs-test-node",
        "--serve-controller",
        "--ceph-config",
        config,
        "--call-timeout",
        "5",
        "--mgr-timeout",
        "30",
        "--state-dir",
        "{state}",
        "--stats-cache",
        "1",
        "--heal-interval",
        "1",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    Arc::new(CommandDriver {
        program: env!("CARGO_BIN_EXE_rcsi").into(),
        args,
        break_volume: fuse.then_some(kill_ceph_fuse as rcsi_tests::harness::BreakFn),
        state_root: None,
    })
}

/// The staging path of a volume staged by the plugin with state `state`.
fn staging_of(state: &Path, volume_id: &str) -> Result<String> {
    let f = state.join("volumes").join(format!("{volume_id}.json"));
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&f)?)?;
    s["staging"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{} names no staging path", f.display()))
}

/// Kills the ceph-fuse process behind a volume (a kernel mount cannot be
/// broken this way).
fn kill_ceph_fuse(state: &Path, volume_id: &str) -> Result<()> {
    let pattern = format!("ceph-fuse -f {} ", staging_of(state, volume_id)?);
    let ok = Command::new("pkill")
        .args(["-9", "-f", &pattern])
        .status()?
        .success();
    ensure!(ok, "no ceph-fuse process for {volume_id}");
    Ok(())
}

/// A profile for the node plugin mounting with `mounter`.
fn node_profile(name: &str, parameters: HashMap<String, String>, mounter: &str) -> Profile {
    let mut parameters = parameters;
    parameters.insert("mounter".into(), mounter.into());
    Profile {
        name: name.into(),
        parameters,
        volume_size: 64 << 20,
        online_expansion: true,
        enforces_size: true,
        // The MDS propagates usage (and ceph-fuse its quota) lazily.
        stats_settle: Duration::from_secs(15),
        ..Default::default()
    }
}

/// The admin user's credentials, as a Secret.
fn admin_secret(b: &Backend) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(b.var("CEPH_KEYRING"))?;
    let key = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("key = "))
        .context("no key in the admin keyring")?;
    Ok(HashMap::from([
        ("userID".to_string(), "admin".to_string()),
        ("userKey".to_string(), key.trim().to_string()),
    ]))
}

/// A started node plugin and its clients.
struct NodeSession {
    inst: Box<dyn rcsi_tests::Instance>,
    ctl: ControllerClient<tonic::transport::Channel>,
    node: NodeClient,
}

impl NodeSession {
    async fn start(b: &Backend, extra: &[&str]) -> Result<Self> {
        let inst = node_plugin(&b.var("CEPH_CONFIG_FILE"), true, extra)
            .start()
            .await?;
        Self::connect(inst).await
    }

    async fn connect(inst: Box<dyn rcsi_tests::Instance>) -> Result<Self> {
        let ch = csi_core::client::connect(&inst.endpoint()).await?;
        Ok(Self {
            inst,
            ctl: ControllerClient::new(ch.clone()),
            node: NodeClient::new(ch),
        })
    }

    /// The volume condition of `v` at `path`.
    async fn condition(&mut self, v: &csi::Volume, path: &Path) -> Result<csi::VolumeCondition> {
        let s = self
            .node
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: v.volume_id.clone(),
                volume_path: path.display().to_string(),
                staging_target_path: String::new(),
            })
            .await?
            .into_inner();
        s.volume_condition.context("no volume condition")
    }
}

/// SIGKILL the node plugin while a writer fsyncs into a ceph-fuse volume:
/// the writer sees no error and the same ceph-fuse serves on. Then
/// ceph-fuse is killed: the healer mounts the volume again and binds it
/// over the target; the data fsynced before is there, new writes work, the
/// condition reports the heal, and unpublish, unstage and delete work.
async fn kill_plugin_and_ceph_fuse(b: &Backend, profile: &Profile) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let profile = node_profile("kill", profile.parameters.clone(), "fuse");
    let mut n = NodeSession::start(b, &[]).await?;
    let secrets = b.secrets("CEPH_SECRETS_FILE");
    let mut p = profile.clone();
    p.secrets = secrets.clone();
    let v = create_in(&mut n.ctl, &p, "kill-plugin").await?;
    let scratch = tempfile::tempdir()?;
    let (st, tg) = (
        scratch.path().join("staging"),
        scratch.path().join("target"),
    );
    let stage_secrets = secrets["NodeStageVolumeSecret"].clone();
    stage_publish(
        &mut n.node,
        &v,
        &rcsi_tests::flows::cap(),
        &stage_secrets,
        &st,
        &tg,
    )
    .await?;
    let before_kill = pids_of("ceph-fuse");
    let stop = Arc::new(AtomicBool::new(false));
    let w = rcsi_tests::writer(tg.join("log"), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    n.inst.crash().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let written = w.join().map_err(|_| anyhow::anyhow!("writer panicked"))?;
    let written = written.map_err(|e| anyhow::anyhow!("the writer saw an error: {e}"))?;
    ensure!(written > 0, "nothing written");
    ensure!(
        pids_of("ceph-fuse") == before_kill,
        "ceph-fuse processes changed across the plugin's SIGKILL"
    );
    eprintln!(
        "figure: plugin SIGKILLed under a writer: {written} bytes fsynced, no error, same ceph-fuse"
    );
    let mut n = NodeSession::connect(n.inst).await?;
    let c = n.condition(&v, &tg).await?;
    ensure!(!c.abnormal, "after the restart: {c:?}");

    let before = b"written before ceph-fuse died\n";
    write_synced(&tg.join("before"), before)?;
    let pattern = format!("ceph-fuse -f {} ", st.display());
    let old = Command::new("pgrep")
        .args(["-f", &pattern])
        .output()?
        .stdout;
    let killed = Command::new("pkill")
        .args(["-9", "-f", &pattern])
        .status()?;
    ensure!(killed.success(), "no ceph-fuse for the volume");
    let t = Instant::now();
    let message = loop {
        let c = n.condition(&v, &tg).await?;
        if c.abnormal && c.message.contains("mounted the volume again") {
            break c.message;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "not healed within 60 s: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let healed = t.elapsed();
    let now = Command::new("pgrep")
        .args(["-f", &pattern])
        .output()?
        .stdout;
    ensure!(
        !now.is_empty() && now != old,
        "no new ceph-fuse serves the volume"
    );
    ensure!(
        message.contains("re-bound 1 target"),
        "the target was not bound again: {message}"
    );
    ensure!(
        std::fs::read(tg.join("before"))? == before,
        "the data written before the kill is not there after the heal"
    );
    ensure!(tg.join("log").exists(), "the writer's file is gone");
    write_synced(&tg.join("after"), b"after")?;
    eprintln!(
        "figure: ceph-fuse SIGKILLed: mounted again and its target re-bound after {healed:?} (heal interval 1 s); data fsynced before the kill read back, new writes fine"
    );
    let delete = secrets["DeleteVolumeSecret"].clone();
    unpublish_unstage_delete(&mut n.node, &mut n.ctl, &v, delete, &st, &tg).await?;
    n.inst.stop().await?;
    Ok(())
}

/// Staged with a Secret whose user may create users (admin), the volume
/// is mounted as a user of its own whose MDS caps name only the
/// subvolume's path; deleting the volume removes that user. A static
/// volume (an existing directory, any id) is mounted as the Secret's user.
async fn own_user_and_static_volume(b: &Backend, profile: &Profile) -> Result<()> {
    let mut n = NodeSession::start(b, &[]).await?;
    let admin = admin_secret(b)?;
    let mut p = node_profile("own-user", profile.parameters.clone(), "fuse");
    p.secrets = b.secrets("CEPH_SECRETS_FILE");
    let v = create_in(&mut n.ctl, &p, "own-user").await?;
    let sub = v.volume_context["subvolumeName"].clone();
    let path = v.volume_context["subvolumePath"].clone();
    let scratch = tempfile::tempdir()?;
    let (st, tg) = (
        scratch.path().join("staging"),
        scratch.path().join("target"),
    );
    stage_publish(&mut n.node, &v, &rcsi_tests::flows::cap(), &admin, &st, &tg).await?;
    let entity = format!("client.rcsi-{sub}");
    let user = ceph(b, &["auth", "get", &entity])?;
    let caps = &user[0]["caps"];
    ensure!(
        caps["mds"].as_str() == Some(&format!("allow rw fsname={FS} path={path}")),
        "caps of {entity}: {caps}"
    );
    let pattern = format!("ceph-fuse -f {} ", st.display());
    let args = Command::new("pgrep")
        .args(["-af", &pattern])
        .output()?
        .stdout;
    ensure!(
        String::from_utf8_lossy(&args).contains(&format!("--id rcsi-{sub}")),
        "ceph-fuse does not run as the volume's user: {}",
        String::from_utf8_lossy(&args)
    );
    write_synced(&tg.join("f"), b"own user")?;
    unpublish_unstage_delete(&mut n.node, &mut n.ctl, &v, admin.clone(), &st, &tg).await?;
    ensure!(
        ceph(b, &["auth", "get", &entity]).is_err(),
        "{entity} outlived its volume"
    );

    // A static volume: a directory made by the admin, mounted as client.csi.
    ceph(b, &["fs", "subvolume", "create", FS, "static-pv"])?;
    let out = Command::new("ceph")
        .args(["-c", &b.var("CEPH_CONF"), "-k", &b.var("CEPH_KEYRING")])
        .args(["fs", "subvolume", "getpath", FS, "static-pv"])
        .output()?;
    let root = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    ensure!(root.starts_with('/'), "getpath answered {root:?}");
    let sv = csi::Volume {
        volume_id: "static-pv-1".into(),
        volume_context: HashMap::from([
            ("clusterID".to_string(), p.parameters["clusterID"].clone()),
            ("fsName".into(), FS.into()),
            ("staticVolume".into(), "true".into()),
            ("rootPath".into(), root.clone()),
            ("mounter".into(), "fuse".into()),
        ]),
        ..Default::default()
    };
    let secrets = p.secrets("NodeStageVolumeSecret");
    let (st, tg) = (scratch.path().join("st2"), scratch.path().join("tg2"));
    stage_publish(
        &mut n.node,
        &sv,
        &rcsi_tests::flows::cap(),
        &secrets,
        &st,
        &tg,
    )
    .await?;
    write_synced(&tg.join("static"), b"static")?;
    let c = n.condition(&sv, &tg).await?;
    ensure!(!c.abnormal, "static volume: {c:?}");
    n.node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: sv.volume_id.clone(),
            target_path: tg.display().to_string(),
        })
        .await?;
    n.node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: sv.volume_id.clone(),
            staging_target_path: st.display().to_string(),
        })
        .await?;
    ceph(b, &["fs", "subvolume", "rm", FS, "static-pv"])?;
    n.inst.stop().await?;
    Ok(())
}

/// The MDS stopped under a published volume: NodeGetVolumeStats answers
/// within its timeout (abnormal), Probe answers, and the volume is healthy
/// again once the MDS runs.
async fn stats_with_stopped_mds(b: &Backend, profile: &Profile) -> Result<()> {
    let mut n = NodeSession::start(b, &["--stats-timeout", "2"]).await?;
    let mut p = node_profile("mds-stats", profile.parameters.clone(), "fuse");
    p.secrets = b.secrets("CEPH_SECRETS_FILE");
    let v = create_in(&mut n.ctl, &p, "mds-stats").await?;
    let scratch = tempfile::tempdir()?;
    let (st, tg) = (
        scratch.path().join("staging"),
        scratch.path().join("target"),
    );
    let secrets = p.secrets("NodeStageVolumeSecret");
    stage_publish(
        &mut n.node,
        &v,
        &rcsi_tests::flows::cap(),
        &secrets,
        &st,
        &tg,
    )
    .await?;
    write_synced(&tg.join("f"), &[1u8; 4096])?;
    let pattern = format!("ceph-mds -c {} ", b.var("CEPH_CONF"));
    let out = Command::new("pgrep").args(["-f", &pattern]).output()?;
    let pid = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_owned)
        .context("no ceph-mds")?;
    Command::new("kill").args(["-STOP", &pid]).status()?;
    // A file the client has no caps for yet: its stat needs the MDS.
    let hung = tg.join("never");
    std::thread::spawn(move || std::fs::metadata(hung).is_ok());
    let mut slowest = Duration::ZERO;
    let mut abnormal = None;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(8) {
        let c0 = Instant::now();
        let c = n.condition(&v, &tg).await;
        slowest = slowest.max(c0.elapsed());
        if let Ok(c) = c
            && c.abnormal
        {
            abnormal = Some(c.message);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let probe = csi::identity_client::IdentityClient::new(
        csi_core::client::connect(&n.inst.endpoint()).await?,
    )
    .probe(csi::ProbeRequest {})
    .await;
    Command::new("kill").args(["-CONT", &pid]).status()?;
    probe.context("Probe did not answer with the MDS stopped")?;
    ensure!(
        slowest < Duration::from_secs(5),
        "NodeGetVolumeStats took {slowest:?} with the MDS stopped (stats timeout 2 s)"
    );
    eprintln!(
        "figure: MDS stopped under a ceph-fuse volume: NodeGetVolumeStats answered within {slowest:?} (abnormal: {abnormal:?}); Probe answered"
    );
    let t = Instant::now();
    loop {
        let c = n.condition(&v, &tg).await?;
        if !c.abnormal {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "still abnormal after the MDS runs again: {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let delete = p.secrets("DeleteVolumeSecret");
    unpublish_unstage_delete(&mut n.node, &mut n.ctl, &v, delete, &st, &tg).await?;
    n.inst.stop().await?;
    Ok(())
}

type TrialFn = for<'a> fn(
    &'a Backend,
    &'a Profile,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + 'a>>;

/// Inside the node VM (`RCSI_VM_PROFILES=cephfs`): the cases that use a
/// node or data, with the kernel's CephFS client, against the host's cluster.
fn in_node_vm() -> std::process::ExitCode {
    // The host's files are not all visible in the guest: they come as
    // one-line JSON.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let config = dir.path().join("config.json");
    std::fs::write(&config, var("RCSI_CEPH_CONFIG")).expect("writing the cluster map");
    let parameters = serde_json::from_str(&var("RCSI_CEPH_PARAMS")).expect("parameters");
    let mut profile = node_profile("cephfs/kernel", parameters, "kernel");
    profile.secrets = serde_json::from_str(&var("RCSI_CEPH_SECRETS")).expect("secrets");
    let cases = rcsi_tests::cases::all()
        .into_iter()
        .filter(|c| !c.node_free || rcsi_tests::cases::NEED_DATA.contains(&c.name))
        .collect();
    // Two at a time, one per vCPU: the cases share nothing but the cluster.
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads = Some(2);
    let plugin = node_plugin(&config.display().to_string(), false, &[]);
    run_suite_with(args, vec![(plugin, profile)], cases, vec![]).exit_code()
}

fn main() -> std::process::ExitCode {
    if std::env::var_os("RCSI_VM_PROFILES").is_some() {
        return in_node_vm();
    }
    // Bad arguments exit here, before a backend is started and left running.
    let _ = libtest_mimic::Arguments::from_args();
    let b = match Backend::start("ceph") {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let profile = Profile {
        name: "cephfs/controller".into(),
        parameters: b.params("CEPHFS_SC_PARAMS_FILE"),
        secrets: b.secrets("CEPH_SECRETS_FILE"),
        volume_size: 64 << 20,
        ..Default::default()
    };
    // Restored and cloned data is checked by an admin mount instead
    // (restore_and_clone_keep_data).
    let cases = rcsi_tests::cases::all()
        .into_iter()
        .filter(|c| !rcsi_tests::cases::NEED_DATA.contains(&c.name))
        .collect();
    let b = Arc::new(b);
    let trial = |name: &str, f: TrialFn| {
        let (b, p) = (b.clone(), profile.clone());
        libtest_mimic::Trial::test(name, move || {
            tokio::runtime::Runtime::new()
                .expect("runtime")
                .block_on(f(&b, &p))
                .map_err(|e| format!("{e:#}").into())
        })
    };
    let extra = vec![
        trial(
            "cephfs/controller::subvolume-quota-growth-snapshots",
            |b, p| Box::pin(subvolume_quota_growth_snapshots(b, p)),
        ),
        trial("cephfs/controller::refusals", |b, p| {
            Box::pin(refusals(b, p))
        }),
        trial("cephfs/controller::restore-and-clone-keep-data", |b, p| {
            Box::pin(restore_and_clone_keep_data(b, p))
        }),
        trial("cephfs/controller::crash-states", |b, p| {
            Box::pin(crash_states(b, p))
        }),
        trial("cephfs/controller::stopped-mds", |b, p| {
            Box::pin(stopped_mds(b, p))
        }),
    ];
    // One trial at a time: unfiltered snapshot listings see the whole filesystem.
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads = Some(1);
    let mut conclusion = run_suite_with(
        args.clone(),
        vec![(controller(&b), profile.clone())],
        cases,
        extra,
    );
    let mut node_trials = vec![
        trial("cephfs/fuse::kill-plugin-and-ceph-fuse", |b, p| {
            Box::pin(kill_plugin_and_ceph_fuse(b, p))
        }),
        trial("cephfs/fuse::own-user-and-static-volume", |b, p| {
            Box::pin(own_user_and_static_volume(b, p))
        }),
        trial("cephfs/fuse::stats-with-stopped-mds", |b, p| {
            Box::pin(stats_with_stopped_mds(b, p))
        }),
    ];
    let config_line = std::fs::read_to_string(b.var("CEPH_CONFIG_FILE"))
        .unwrap_or_default()
        .replace('\n', " ");
    let secrets_json = serde_json::to_string(&profile.secrets).expect("secrets as JSON");
    let params_json = serde_json::to_string(&profile.parameters).expect("parameters as JSON");
    let vm = rcsi_tests::node_vm_trial(
        "cephfs/kernel::in-node-vm",
        &[
            ("RCSI_VM_PROFILES", "cephfs"),
            (
                "RCSI_VM_FORWARD",
                b.var("CEPH_PORTS").trim_matches('"').trim(),
            ),
            ("RCSI_CEPH_CONFIG", &config_line),
            ("RCSI_CEPH_SECRETS", &secrets_json),
            ("RCSI_CEPH_PARAMS", &params_json),
        ],
    );
    node_trials.push(vm);
    let mut fuse = node_profile("cephfs/fuse", profile.parameters.clone(), "fuse");
    fuse.secrets = profile.secrets.clone();
    let nodes = run_suite_with(
        args,
        vec![(node_plugin(&b.var("CEPH_CONFIG_FILE"), true, &[]), fuse)],
        rcsi_tests::cases::all(),
        node_trials,
    );
    conclusion.num_failed += nodes.num_failed;
    conclusion.num_passed += nodes.num_passed;
    let left = leftovers(&b);
    drop(b);
    match left {
        Ok(l) if l.is_empty() => conclusion.exit_code(),
        Ok(l) => {
            eprintln!("the filesystem still holds: {l:#?}");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cannot list what the filesystem holds: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
