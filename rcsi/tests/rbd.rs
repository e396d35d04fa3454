//! `rbd.rcsi.io`'s controller against a real single-node Ceph
//! (`tests/backends/ceph.sh`): the conformance cases a controller alone
//! can run, the states a crash leaves at each step of clone, snapshot and
//! delete, flattening, deferred purges, an image in use, a stopped OSD,
//! and at the end a pool with no image, trash entry or journal key left.

use anyhow::{Context, Result, ensure};
use csi_core::csi::{self, controller_client::ControllerClient, volume_capability as vc};
use rcsi_tests::flows::{
    cap, create_in, pids_matching, stage_publish, unpublish_unstage_delete, write_synced,
};
use rcsi_tests::{Backend, CommandDriver, Driver, Profile, run_suite_with};
use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Code;

/// Pools of the node profiles (the last for the kernel client in the VM).
const NODE_POOLS: [&str; 4] = ["rbd-ext4", "rbd-xfs", "rbd-krbd", "rbd-nbd"];

fn controller(b: &Backend, extra: &[&str]) -> Arc<CommandDriver> {
    let mut args: Vec<String> = [
        "controller",
        "--driver",
        "rbd",
        "--endpoint",
        "unix://{endpoint}",
        "--ceph-config",
        &b.var("CEPH_CONFIG_FILE"),
        "--call-timeout",
        "3",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    Arc::new(CommandDriver {
        program: env!("CARGO_BIN_EXE_rcsi").into(),
        args,
        break_volume: None,
        state_root: None,
    })
}

/// The node plugin (serving the controller too) on this host, mapping
/// images with rbd-fuse + loop.
fn node_plugin(b: &Backend) -> Arc<CommandDriver> {
    node_plugin_with(&b.var("CEPH_CONFIG_FILE"), Some(kill_rbd_fuse))
}

/// The node plugin with the cluster map at `config`.
fn node_plugin_with(
    config: &str,
    break_volume: Option<rcsi_tests::harness::BreakFn>,
) -> Arc<CommandDriver> {
    Arc::new(CommandDriver {
        program: env!("CARGO_BIN_EXE_rcsi").into(),
        args: [
            "node",
            "--driver",
            "rbd",
            "--endpoint",
            "unix://{endpoint}",
            "--node-id",
            "rbd-test-node",
            "--serve-controller",
            "--ceph-config",
            config,
            "--call-timeout",
            "5",
            "--state-dir",
            "{state}",
            "--stats-cache",
            "1",
            "--heal-interval",
            "1",
        ]
        .map(String::from)
        .to_vec(),
        break_volume,
        state_root: None,
    })
}

/// Kills the rbd-fuse process behind a volume.
fn kill_rbd_fuse(state: &std::path::Path, volume_id: &str) -> Result<()> {
    let pattern = format!("{}/fuse/{volume_id}", state.display());
    let ok = Command::new("pkill")
        .args(["-9", "-f", &pattern])
        .status()?
        .success();
    ensure!(ok, "no rbd-fuse process for {volume_id}");
    Ok(())
}

/// A profile for the node plugin with volumes in `pool` (each profile has
/// its own: the cases reuse names).
fn node_profile(b: &Backend, name: &str, pool: &str, fs_type: &str, online: bool) -> Profile {
    let mut parameters = b.params("CEPH_RBD_SC_PARAMS_FILE");
    parameters.insert("pool".into(), pool.into());
    Profile {
        name: name.into(),
        parameters,
        secrets: b.secrets("CEPH_SECRETS_FILE"),
        block: true,
        // mkfs.xfs needs 300 MiB.
        volume_size: if fs_type == "xfs" {
            320 << 20
        } else {
            64 << 20
        },
        fs_type: fs_type.into(),
        online_expansion: online,
        enforces_size: true,
        // The image's watchers show the controller a volume in use.
        controller_sees_node: true,
        stats_settle: Duration::from_secs(3),
        ..Default::default()
    }
}

/// Runs the admin CLI (`rbd`, `rados`, `ceph`) of the test cluster.
fn admin(b: &Backend, program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(["-c", &b.var("CEPH_CONF"), "-k", &b.var("CEPH_KEYRING")])
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn json(b: &Backend, program: &str, args: &[&str]) -> Result<serde_json::Value> {
    let mut a = args.to_vec();
    a.extend(["--format", "json"]);
    let text = admin(b, program, &a)?;
    serde_json::from_str(&text).with_context(|| format!("{program} {args:?} printed {text:?}"))
}

/// Loop devices still backed by an image file of rbd-fuse (alive or dead).
fn image_loops() -> Result<Vec<String>> {
    let out = Command::new("losetup").arg("-a").output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("/csi-vol-") || l.contains("/csi-snap-"))
        .map(|l| format!("loop device {l}"))
        .collect())
}

/// What a pool still holds of ours: images, trash entries, journal keys
/// and journal objects.
fn leftovers(b: &Backend, pool: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for v in json(b, "rbd", &["ls", pool])?
        .as_array()
        .into_iter()
        .flatten()
    {
        out.push(format!("image {v}"));
    }
    for v in json(b, "rbd", &["trash", "ls", pool])?
        .as_array()
        .into_iter()
        .flatten()
    {
        out.push(format!("trash {}", v["name"]));
    }
    for dir in ["csi.volumes.rcsi", "csi.snaps.rcsi"] {
        let keys = Command::new("rados")
            .args(["-c", &b.var("CEPH_CONF"), "-k", &b.var("CEPH_KEYRING")])
            .args(["-p", pool, "listomapkeys", dir])
            .output()?;
        for k in String::from_utf8_lossy(&keys.stdout).lines() {
            out.push(format!("{dir} key {k}"));
        }
    }
    for o in admin(b, "rados", &["-p", pool, "ls"])?.lines() {
        if o.starts_with("csi.volume.") || o.starts_with("csi.snap.") {
            out.push(format!("object {o}"));
        }
    }
    Ok(out)
}

/// A gRPC session with one controller instance.
struct Session {
    inst: Box<dyn rcsi_tests::Instance>,
    ctl: ControllerClient<tonic::transport::Channel>,
    params: HashMap<String, String>,
    secrets: HashMap<String, String>,
}

impl Session {
    async fn start(b: &Backend, extra: &[&str]) -> Result<Self> {
        let inst = controller(b, extra).start().await?;
        let ch = csi_core::client::connect(&inst.endpoint()).await?;
        Ok(Self {
            inst,
            ctl: ControllerClient::new(ch),
            params: b.params("CEPH_RBD_SC_PARAMS_FILE"),
            secrets: b.secrets("CEPH_SECRETS_FILE")["CreateVolumeSecret"].clone(),
        })
    }

    fn req(
        &self,
        name: &str,
        source: Option<csi::volume_content_source::Type>,
    ) -> csi::CreateVolumeRequest {
        csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 64 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap()],
            parameters: self.params.clone(),
            secrets: self.secrets.clone(),
            volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
            ..Default::default()
        }
    }

    async fn create(
        &mut self,
        name: &str,
        source: Option<csi::volume_content_source::Type>,
    ) -> Result<csi::Volume> {
        let r = self.req(name, source);
        self.ctl
            .create_volume(r)
            .await
            .with_context(|| format!("CreateVolume {name}"))?
            .into_inner()
            .volume
            .context("no volume")
    }

    async fn snapshot(&mut self, vol: &str, name: &str) -> Result<csi::Snapshot> {
        self.ctl
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: vol.into(),
                name: name.into(),
                secrets: self.secrets.clone(),
                ..Default::default()
            })
            .await
            .with_context(|| format!("CreateSnapshot {name}"))?
            .into_inner()
            .snapshot
            .context("no snapshot")
    }

    async fn delete(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.ctl
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.into(),
                secrets: self.secrets.clone(),
            })
            .await
            .map(drop)
    }

    async fn delete_snapshot(&mut self, id: &str) -> Result<()> {
        self.ctl
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: id.into(),
                secrets: self.secrets.clone(),
            })
            .await
            .with_context(|| format!("DeleteSnapshot {id}"))?;
        Ok(())
    }
}

fn from_volume(id: &str) -> Option<csi::volume_content_source::Type> {
    Some(csi::volume_content_source::Type::Volume(
        csi::volume_content_source::VolumeSource {
            volume_id: id.into(),
        },
    ))
}

fn from_snapshot(id: &str) -> Option<csi::volume_content_source::Type> {
    Some(csi::volume_content_source::Type::Snapshot(
        csi::volume_content_source::SnapshotSource {
            snapshot_id: id.into(),
        },
    ))
}

fn image_of(v: &csi::Volume) -> String {
    v.volume_context["imageName"].clone()
}

/// The uuid part of a Ceph id.
fn uuid_of(id: &str) -> String {
    id[id.len() - 36..].to_owned()
}

/// Snapshots of `image` in every namespace (user and trash).
fn snaps(b: &Backend, image: &str) -> Result<Vec<String>> {
    let v = json(b, "rbd", &["snap", "ls", "--all", &format!("rbd/{image}")])?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            format!(
                "{}:{}",
                s["namespace"]["type"].as_str().unwrap_or(""),
                s["name"].as_str().unwrap_or("")
            )
        })
        .collect())
}

fn parent(b: &Backend, image: &str) -> Result<Option<String>> {
    let v = json(b, "rbd", &["info", &format!("rbd/{image}")])?;
    Ok(v.get("parent")
        .map(|p| p["image"].as_str().unwrap_or("").to_owned()))
}

/// The pool id of `rbd`.
fn pool_id(b: &Backend) -> Result<i64> {
    let v = json(b, "ceph", &["osd", "pool", "ls", "detail"])?;
    v.as_array()
        .into_iter()
        .flatten()
        .find(|p| p["pool_name"] == "rbd")
        .and_then(|p| p["pool_id"].as_i64())
        .context("no pool rbd")
}

/// Each step of clone, snapshot and delete interrupted as a crash leaves
/// it (made here with the admin CLI), then retried through the driver.
async fn crash_states(b: &Backend) -> Result<()> {
    let mut s = Session::start(b, &[]).await?;
    let pool = pool_id(b)?;
    let uuid = |name: &str| {
        rcsi_ceph::journal::derived_id("rcsi-test", pool, name)
            .uuid
            .hyphenated()
            .to_string()
    };
    let a = s.create("crash-src", None).await?;
    let a_img = image_of(&a);

    // Clone: the temporary snapshot made, then the clone made, before a crash.
    let tmp = format!("rbd/{a_img}@csi-tmp-{}", uuid("crash-clone"));
    admin(b, "rbd", &["snap", "create", &tmp])?;
    let c = s.create("crash-clone", from_volume(&a.volume_id)).await?;
    ensure!(
        uuid_of(&c.volume_id) == uuid("crash-clone"),
        "clone got another id"
    );
    ensure!(
        snaps(b, &a_img)?.iter().all(|n| !n.contains("csi-tmp")),
        "temporary snapshot left: {:?}",
        snaps(b, &a_img)?
    );
    let tmp2 = format!("rbd/{a_img}@csi-tmp-{}", uuid("crash-clone-2"));
    admin(b, "rbd", &["snap", "create", &tmp2])?;
    admin(
        b,
        "rbd",
        &[
            "clone",
            "--rbd-default-clone-format",
            "2",
            &tmp2,
            &format!("rbd/csi-vol-{}", uuid("crash-clone-2")),
        ],
    )?;
    let c2 = s.create("crash-clone-2", from_volume(&a.volume_id)).await?;
    ensure!(
        parent(b, &image_of(&c2))?.as_deref() == Some(a_img.as_str()),
        "not a clone of the source"
    );
    ensure!(
        snaps(b, &a_img)?.iter().all(|n| !n.starts_with("user:")),
        "user snapshot left on the source: {:?}",
        snaps(b, &a_img)?
    );

    // Snapshot: temporary snapshot and snapshot image made, its own snapshot not.
    let sid = uuid("crash-snap");
    let tmp3 = format!("rbd/{a_img}@csi-tmp-{sid}");
    admin(b, "rbd", &["snap", "create", &tmp3])?;
    admin(
        b,
        "rbd",
        &[
            "clone",
            "--rbd-default-clone-format",
            "2",
            &tmp3,
            &format!("rbd/csi-snap-{sid}"),
        ],
    )?;
    let snap = s.snapshot(&a.volume_id, "crash-snap").await?;
    ensure!(
        uuid_of(&snap.snapshot_id) == sid && snap.ready_to_use,
        "snapshot {snap:?}"
    );
    ensure!(
        snaps(b, &format!("csi-snap-{sid}"))? == vec![format!("user:csi-snap-{sid}")],
        "snapshot image holds {:?}",
        snaps(b, &format!("csi-snap-{sid}"))?
    );
    let again = s.snapshot(&a.volume_id, "crash-snap").await?;
    ensure!(
        again.snapshot_id == snap.snapshot_id,
        "a second snapshot for the same name"
    );

    // Delete: image already in the trash when the controller died.
    admin(b, "rbd", &["trash", "mv", &format!("rbd/{}", image_of(&c))])?;
    s.delete(&c.volume_id).await?;
    s.delete(&c.volume_id).await?;

    // A name reserved in the directory alone (crash right after that write).
    let ruuid = uuid("crash-reserved");
    admin(
        b,
        "rados",
        &[
            "-p",
            "rbd",
            "setomapval",
            "csi.volumes.rcsi",
            "name.crash-reserved",
            &ruuid,
        ],
    )?;
    let r = s.create("crash-reserved", None).await?;
    ensure!(
        uuid_of(&r.volume_id) == ruuid,
        "the reserved id was not used"
    );
    json(b, "rbd", &["info", &format!("rbd/{}", image_of(&r))])?;

    for id in [&c2.volume_id, &r.volume_id] {
        s.delete(id).await?;
    }
    s.delete_snapshot(&snap.snapshot_id).await?;
    s.delete(&a.volume_id).await?;
    s.inst.stop().await?;
    Ok(())
}

/// Clone chains stay short, a source with clones waits in the trash until
/// they go, and an image in use is not deleted.
async fn chains_and_purges(b: &Backend) -> Result<()> {
    let mut s = Session::start(b, &["--max-clone-depth", "1"]).await?;
    let a = s.create("chain-a", None).await?;
    let s1 = s.snapshot(&a.volume_id, "chain-s1").await?;
    let r = s.create("chain-r", from_snapshot(&s1.snapshot_id)).await?;
    ensure!(
        parent(b, &image_of(&r))?.is_none(),
        "a clone two deep was not flattened"
    );
    let s2 = s.snapshot(&r.volume_id, "chain-s2").await?;
    ensure!(
        parent(b, &format!("csi-snap-{}", uuid_of(&s2.snapshot_id)))?.is_some(),
        "a clone one deep was flattened"
    );
    let clone = s.create("chain-clone", from_volume(&a.volume_id)).await?;
    ensure!(
        clone.capacity_bytes == a.capacity_bytes,
        "clone size {}",
        clone.capacity_bytes
    );
    let mut bigger = s.req("chain-big", from_snapshot(&s1.snapshot_id));
    bigger.capacity_range = Some(csi::CapacityRange {
        required_bytes: 128 << 20,
        limit_bytes: 0,
    });
    let big = s
        .ctl
        .create_volume(bigger)
        .await?
        .into_inner()
        .volume
        .context("no volume")?;
    ensure!(
        big.capacity_bytes == 128 << 20,
        "restore to a larger size gave {}",
        big.capacity_bytes
    );
    let mut smaller = s.req("chain-small", from_snapshot(&s1.snapshot_id));
    smaller.capacity_range = Some(csi::CapacityRange {
        required_bytes: 32 << 20,
        limit_bytes: 32 << 20,
    });
    let e = s
        .ctl
        .create_volume(smaller)
        .await
        .expect_err("restore smaller than its snapshot");
    ensure!(
        e.code() == Code::OutOfRange,
        "restore smaller than its snapshot: {e:?}"
    );

    // The source goes first: it waits in the trash for its clones.
    s.delete(&a.volume_id).await?;
    let trash = json(b, "rbd", &["trash", "ls", "rbd"])?;
    ensure!(
        trash.as_array().is_some_and(|t| t.len() == 1),
        "trash: {trash}"
    );
    for id in [&clone.volume_id, &big.volume_id, &r.volume_id] {
        s.delete(id).await?;
    }
    s.delete_snapshot(&s2.snapshot_id).await?;
    s.delete_snapshot(&s1.snapshot_id).await?;
    let trash = json(b, "rbd", &["trash", "ls", "rbd"])?;
    ensure!(
        trash.as_array().is_some_and(|t| t.is_empty()),
        "purged parent still in the trash: {trash}"
    );

    // In use: a client watches the image.
    let u = s.create("chain-in-use", None).await?;
    let mut watch = Command::new("rbd")
        .args([
            "-c",
            &b.var("CEPH_CONF"),
            "-k",
            &b.var("CEPH_KEYRING"),
            "watch",
        ])
        .arg(format!("rbd/{}", image_of(&u)))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let t = Instant::now();
    loop {
        let st = json(b, "rbd", &["status", &format!("rbd/{}", image_of(&u))])?;
        if st["watchers"].as_array().is_some_and(|w| !w.is_empty()) {
            break;
        }
        ensure!(
            t.elapsed() < Duration::from_secs(10),
            "rbd watch never registered: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = s.delete(&u.volume_id).await;
    let _ = watch.kill();
    let _ = watch.wait();
    let e = refused
        .err()
        .context("DeleteVolume removed an image a client has open")?;
    ensure!(
        e.code() == Code::FailedPrecondition,
        "delete of an image in use: {e:?}"
    );
    ensure!(e.message().contains("in use"), "{}", e.message());
    // The watch of a killed client lapses after the OSD's timeout.
    let t = Instant::now();
    while let Err(e) = s.delete(&u.volume_id).await {
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "still refused: {e:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    s.inst.stop().await?;
    Ok(())
}

/// SIGKILL the node plugin while a writer fsyncs into a published volume:
/// the writer sees no error, the rbd-fuse process stays, and the restarted
/// plugin carries on from its state files. Then the rbd-fuse process is
/// killed: the plugin's healer blocklists the dead client, starts a new
/// rbd-fuse, mounts the filesystem again and binds it over the target; the
/// data fsynced before is there, the condition reports the heal, and
/// unpublish, unstage and delete work.
async fn kill_plugin(b: &Backend) -> Result<()> {
    let profile = node_profile(b, "kill", NODE_POOLS[0], "", false);
    kill_plugin_and_helper(node_plugin(b), &profile, "rbd-fuse").await
}

/// As [`kill_plugin`] for the mapping process `helper` of `profile`'s
/// mounter. rbd-nbd is killed while the writer runs: the kernel holds the
/// I/O until the plugin attaches a new rbd-nbd, so the writer sees no
/// error and the condition is healthy again; a new rbd-fuse comes with a
/// new loop device, so the volume is mounted again (see [`kill_plugin`]).
async fn kill_plugin_and_helper(
    plugin: Arc<CommandDriver>,
    profile: &Profile,
    helper: &str,
) -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut inst = plugin.start().await?;
    let ch = csi_core::client::connect(&inst.endpoint()).await?;
    let mut ctl = ControllerClient::new(ch.clone());
    let mut node = csi::node_client::NodeClient::new(ch);
    let secrets = profile.secrets("NodeStageVolumeSecret");
    let v = create_in(&mut ctl, profile, "kill-plugin").await?;
    let scratch = tempfile::tempdir()?;
    let (st, tg) = (
        scratch.path().join("staging"),
        scratch.path().join("target"),
    );
    std::fs::create_dir_all(&st)?;
    let path = |p: &std::path::Path| p.display().to_string();
    stage_publish(&mut node, &v, &cap(), &secrets, &st, &tg).await?;
    // This volume's helper only: other trials may run theirs meanwhile.
    let image = v
        .volume_context
        .get("imageName")
        .context("no imageName in the volume context")?;
    let mine = match helper {
        "rbd-nbd" => format!("rbd-nbd .*/{image}$"),
        _ => format!("/fuse/{}$", v.volume_id),
    };
    let helper_pids = || pids_matching(&mine);
    let helpers = helper_pids();
    ensure!(!helpers.is_empty(), "no {helper} serves {image}");
    let stop = Arc::new(AtomicBool::new(false));
    let w = rcsi_tests::writer(tg.join("log"), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    inst.crash().await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let written = w.join().map_err(|_| anyhow::anyhow!("writer panicked"))?;
    let written = written.map_err(|e| anyhow::anyhow!("the writer saw an error: {e}"))?;
    ensure!(written > 0, "nothing written");
    ensure!(
        helper_pids() == helpers,
        "{helper} processes changed across the plugin's SIGKILL"
    );
    eprintln!(
        "figure: plugin SIGKILLed under a writer: {written} bytes fsynced, no error, same {helper}"
    );

    let ch = csi_core::client::connect(&inst.endpoint()).await?;
    let mut ctl = ControllerClient::new(ch.clone());
    let mut node = csi::node_client::NodeClient::new(ch);
    let stats = |node: &mut csi::node_client::NodeClient<tonic::transport::Channel>| {
        let req = csi::NodeGetVolumeStatsRequest {
            volume_id: v.volume_id.clone(),
            volume_path: path(&tg),
            staging_target_path: String::new(),
        };
        let mut node = node.clone();
        async move {
            node.node_get_volume_stats(req)
                .await
                .map(|r| r.into_inner())
        }
    };
    let healthy = stats(&mut node).await?;
    ensure!(
        healthy
            .volume_condition
            .as_ref()
            .is_some_and(|c| !c.abnormal),
        "after the restart: {healthy:?}"
    );
    if helper == "rbd-nbd" {
        let stop = Arc::new(AtomicBool::new(false));
        let w = rcsi_tests::writer(tg.join("log2"), stop.clone());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed = Command::new("pkill").args(["-9", "-f", &mine]).status()?;
        ensure!(killed.success(), "no {helper} for the volume");
        let t = Instant::now();
        while helper_pids().is_empty() || helper_pids() == helpers {
            ensure!(t.elapsed() < Duration::from_secs(20), "no new {helper}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let healed = t.elapsed();
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.store(true, Ordering::Relaxed);
        let written = w.join().map_err(|_| anyhow::anyhow!("writer panicked"))?;
        let written = written.map_err(|e| anyhow::anyhow!("the writer saw an error: {e}"))?;
        let s = stats(&mut node).await?;
        ensure!(
            s.volume_condition.as_ref().is_some_and(|c| !c.abnormal),
            "after the heal: {s:?}"
        );
        eprintln!(
            "figure: {helper} SIGKILLed under a writer: a new one attached after {healed:?}; {written} bytes fsynced, no error"
        );
    } else {
        let before = b"written before rbd-fuse died\n";
        write_synced(&tg.join("before"), before)?;
        let killed = Command::new("pkill").args(["-9", "-f", &mine]).status()?;
        ensure!(killed.success(), "no rbd-fuse for the volume");
        let t = Instant::now();
        let message = loop {
            let s = stats(&mut node).await?;
            let c = s.volume_condition.unwrap_or_default();
            if c.abnormal && c.message.contains("mounted the volume again") {
                break c.message;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(60),
                "not healed within 60 s: {c:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let healed = t.elapsed();
        let now = helper_pids();
        ensure!(
            !now.is_empty() && now != helpers,
            "no new rbd-fuse serves the volume"
        );
        ensure!(
            message.contains("re-bound 1 target"),
            "the target was not bound again: {message}"
        );
        // Through the target, as a container started now sees it: the data
        // fsynced before the kill, and new writes.
        ensure!(
            std::fs::read(tg.join("before"))? == before,
            "the data written before the kill is not there after the heal"
        );
        ensure!(tg.join("log").exists(), "the writer's file is gone");
        write_synced(&tg.join("after"), b"after")?;
        eprintln!(
            "figure: rbd-fuse SIGKILLed: a new one mapped, the volume mounted again and its target re-bound after {healed:?} (heal interval 1 s); data fsynced before the kill read back, new writes fine"
        );
    }
    unpublish_unstage_delete(&mut node, &mut ctl, &v, secrets, &st, &tg).await?;
    inst.stop().await?;
    Ok(())
}

/// rbd-fuse of a published xfs volume killed: after the heal the target
/// holds the dead mount under the live one; the volume still grows online
/// to its new size (xfs_growfs must not size it from the dead mount's
/// device), and the target shows the new size.
async fn heal_then_grow(b: &Backend) -> Result<()> {
    let profile = node_profile(b, "heal-grow", NODE_POOLS[1], "xfs", true);
    let mut inst = node_plugin(b).start().await?;
    let ch = csi_core::client::connect(&inst.endpoint()).await?;
    let mut ctl = ControllerClient::new(ch.clone());
    let mut node = csi::node_client::NodeClient::new(ch);
    let secrets = profile.secrets("NodeStageVolumeSecret");
    let xfs = csi::VolumeCapability {
        access_type: Some(vc::AccessType::Mount(vc::MountVolume {
            fs_type: "xfs".into(),
            ..Default::default()
        })),
        ..cap()
    };
    let v = ctl
        .create_volume(csi::CreateVolumeRequest {
            name: "heal-then-grow".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 320 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![xfs.clone()],
            parameters: profile.parameters.clone(),
            secrets: profile.secrets("CreateVolumeSecret"),
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .context("no volume")?;
    let scratch = tempfile::tempdir()?;
    let (st, tg) = (scratch.path().join("st"), scratch.path().join("tg"));
    std::fs::create_dir_all(&st)?;
    let path = |p: &std::path::Path| p.display().to_string();
    stage_publish(&mut node, &v, &xfs, &secrets, &st, &tg).await?;
    write_synced(&tg.join("before"), b"before")?;
    let pattern = format!("/fuse/{}$", v.volume_id);
    let killed = Command::new("pkill")
        .args(["-9", "-f", &pattern])
        .status()?;
    ensure!(killed.success(), "no rbd-fuse for the volume");
    let t = Instant::now();
    let fs_dev = |p: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).map(|m| m.dev()).ok()
    };
    let st_dev = fs_dev(&st);
    while fs_dev(&tg) == st_dev || fs_dev(&tg) != fs_dev(&st) {
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "the target was not mounted again within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fs_size = |p: &std::path::Path| -> Result<u64> {
        let out = Command::new("stat")
            .args(["-f", "-c", "%b %S"])
            .arg(p)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut f = text
            .split_whitespace()
            .map(|x| x.parse::<u64>().unwrap_or(0));
        Ok(f.next().unwrap_or(0) * f.next().unwrap_or(0))
    };
    let small = fs_size(&tg)?;
    let grown = 448u64 << 20;
    ctl.controller_expand_volume(csi::ControllerExpandVolumeRequest {
        volume_id: v.volume_id.clone(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: grown as i64,
            limit_bytes: 0,
        }),
        secrets: profile.secrets("ControllerExpandVolumeSecret"),
        volume_capability: Some(xfs.clone()),
    })
    .await?;
    node.node_expand_volume(csi::NodeExpandVolumeRequest {
        volume_id: v.volume_id.clone(),
        volume_path: path(&tg),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: grown as i64,
            limit_bytes: 0,
        }),
        staging_target_path: path(&st),
        volume_capability: Some(xfs.clone()),
        ..Default::default()
    })
    .await?;
    let size = fs_size(&tg)?;
    ensure!(
        size >= small + (100 << 20),
        "the target shows {size} bytes after growing by 128 MiB (before: {small})"
    );
    ensure!(
        std::fs::read(tg.join("before"))? == b"before",
        "data written before the kill is gone"
    );
    unpublish_unstage_delete(&mut node, &mut ctl, &v, secrets, &st, &tg).await?;
    inst.stop().await?;
    Ok(())
}

/// Two node plugins (two "nodes", each with its own state) stage one
/// ReadWriteOnce volume: the second is refused while the first has the
/// image mapped, and succeeds once the first unstaged it.
async fn second_node_refused(b: &Backend) -> Result<()> {
    let (mut a, mut other) = (node_plugin(b).start().await?, node_plugin(b).start().await?);
    let ch = csi_core::client::connect(&a.endpoint()).await?;
    let mut ctl = ControllerClient::new(ch.clone());
    let mut node_a = csi::node_client::NodeClient::new(ch);
    let mut node_b =
        csi::node_client::NodeClient::new(csi_core::client::connect(&other.endpoint()).await?);
    let profile = node_profile(b, "two-nodes", NODE_POOLS[0], "", false);
    let secrets = profile.secrets("NodeStageVolumeSecret");
    let v = create_in(&mut ctl, &profile, "two-nodes").await?;
    let scratch = tempfile::tempdir()?;
    let stage = |dir: &str| {
        let st = scratch.path().join(dir);
        std::fs::create_dir_all(&st).expect("staging directory");
        csi::NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: st.display().to_string(),
            volume_capability: Some(cap()),
            secrets: secrets.clone(),
            volume_context: v.volume_context.clone(),
            ..Default::default()
        }
    };
    let unstage = |dir: &str| csi::NodeUnstageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: scratch.path().join(dir).display().to_string(),
    };
    node_a.node_stage_volume(stage("a")).await?;
    let e = node_b
        .node_stage_volume(stage("b"))
        .await
        .expect_err("a second node mapped an RWO image in use");
    ensure!(e.code() == Code::FailedPrecondition, "second node: {e:?}");
    ensure!(e.message().contains("in use"), "{}", e.message());
    node_a.node_unstage_volume(unstage("a")).await?;
    node_b.node_stage_volume(stage("b")).await?;
    node_b.node_unstage_volume(unstage("b")).await?;
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        secrets,
    })
    .await?;
    a.stop().await?;
    other.stop().await?;
    Ok(())
}

/// With the OSD stopped, calls fail within the bound and Probe stays quick.
async fn stopped_osd(b: &Backend) -> Result<()> {
    let mut s = Session::start(b, &[]).await?;
    let a = s.create("sick-a", None).await?;
    let pid = std::fs::read_to_string(
        std::path::Path::new(&b.var("CEPH_CONF")).with_file_name("run/osd.0.pid"),
    )?;
    let pid = pid.trim().to_owned();
    Command::new("kill").args(["-STOP", &pid]).status()?;
    let result = async {
        let t = Instant::now();
        let e = s
            .create("sick-b", None)
            .await
            .expect_err("create with the OSD stopped");
        ensure!(
            t.elapsed() < Duration::from_secs(12),
            "create took {:?}",
            t.elapsed()
        );
        eprintln!(
            "stopped OSD: CreateVolume failed after {:?}: {e:#}",
            t.elapsed()
        );
        let t = Instant::now();
        let mut ident = csi::identity_client::IdentityClient::new(
            csi_core::client::connect(&s.inst.endpoint()).await?,
        );
        ident.probe(csi::ProbeRequest {}).await?;
        ensure!(
            t.elapsed() < Duration::from_secs(1),
            "Probe took {:?}",
            t.elapsed()
        );
        Ok(())
    }
    .await;
    Command::new("kill").args(["-CONT", &pid]).status()?;
    result?;
    let t = Instant::now();
    loop {
        match s.create("sick-b", None).await {
            Ok(v) => {
                s.delete(&v.volume_id).await?;
                break;
            }
            Err(e) if t.elapsed() < Duration::from_secs(60) => {
                eprintln!("after the OSD resumed: {e:#}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
    s.delete(&a.volume_id).await?;
    s.inst.stop().await?;
    Ok(())
}

/// The body of one extra trial.
type TrialFn =
    fn(&Backend) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + '_>>;

/// Inside the node VM: the whole suite with the kernel client (krbd) and
/// with rbd-nbd, the host's cluster relayed to the guest's 127.0.0.1; then
/// the plugin and rbd-nbd SIGKILLed under a writer.
fn in_node_vm() -> std::process::ExitCode {
    // The host's files are not all visible in the guest: they come as
    // one-line JSON (the guest's shell takes no multi-line values).
    let dir = tempfile::tempdir().expect("a temporary directory");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let config = dir.path().join("config.json");
    std::fs::write(&config, var("RCSI_CEPH_CONFIG")).expect("writing the cluster map");
    let config = config.display().to_string();
    let profile = |name: &str, pool: &str, mounter: &str| {
        let mut parameters: HashMap<String, String> =
            serde_json::from_str(&var("RCSI_CEPH_PARAMS")).expect("parameters");
        parameters.insert("pool".into(), pool.into());
        parameters.insert("mounter".into(), mounter.into());
        Profile {
            name: name.into(),
            parameters,
            secrets: serde_json::from_str(&var("RCSI_CEPH_SECRETS")).expect("secrets"),
            block: true,
            volume_size: 64 << 20,
            enforces_size: true,
            controller_sees_node: true,
            ..Default::default()
        }
    };
    // rbd-nbd runs the cases whose path goes through the mapper; request
    // checks, bookkeeping and the controller's copies are krbd's cases.
    let nbd = Profile {
        only: Some(&[
            "full_lifecycle_idempotent",
            "readonly_publish",
            "block_volume_lifecycle",
            "volume_stats",
            "size_is_enforced",
            "expand_volume",
            "restart_mid_lifecycle",
            "delete_refused_while_in_use",
        ]),
        ..profile("rbd/nbd-ext4", NODE_POOLS[3], "rbd-nbd")
    };
    let (c, p) = (config.clone(), nbd.clone());
    let heal = libtest_mimic::Trial::test("rbd/nbd-ext4::kill-plugin-and-rbd-nbd", move || {
        tokio::runtime::Runtime::new()
            .expect("runtime")
            .block_on(kill_plugin_and_helper(
                node_plugin_with(&c, None),
                &p,
                "rbd-nbd",
            ))
            .map_err(|e| format!("{e:#}").into())
    });
    // Two at a time, one per vCPU: the pools differ and the kill trial
    // touches only its own volume's rbd-nbd.
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads = Some(2);
    run_suite_with(
        args,
        // Neither the kernel's mapping nor a healed rbd-nbd stays broken.
        vec![
            (
                node_plugin_with(&config, None),
                profile("rbd/krbd-ext4", NODE_POOLS[2], "krbd"),
            ),
            (node_plugin_with(&config, None), nbd),
        ],
        // The controller's own cases ran on the host already.
        rcsi_tests::cases::all()
            .into_iter()
            .filter(|c| !c.node_free || rcsi_tests::cases::NEED_DATA.contains(&c.name))
            .collect(),
        vec![heal],
    )
    .exit_code()
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
        name: "rbd/controller".into(),
        parameters: b.params("CEPH_RBD_SC_PARAMS_FILE"),
        secrets: b.secrets("CEPH_SECRETS_FILE"),
        volume_size: 64 << 20,
        ..Default::default()
    };
    let controller_cases = rcsi_tests::cases::all()
        .into_iter()
        .filter(|c| !rcsi_tests::cases::NEED_DATA.contains(&c.name))
        .collect();
    for pool in NODE_POOLS {
        let made = admin(&b, "ceph", &["osd", "pool", "create", pool, "8"])
            .and_then(|_| admin(&b, "rbd", &["pool", "init", pool]));
        if let Err(e) = made {
            eprintln!("creating pool {pool}: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    }
    let b = Arc::new(b);
    let trial = |name: &str, f: TrialFn| {
        let b = b.clone();
        libtest_mimic::Trial::test(name, move || {
            tokio::runtime::Runtime::new()
                .expect("runtime")
                .block_on(f(&b))
                .map_err(|e| format!("{e:#}").into())
        })
    };
    let extra = vec![
        trial("rbd/controller::crash-states", |b| {
            Box::pin(crash_states(b))
        }),
        trial("rbd/controller::chains-and-purges", |b| {
            Box::pin(chains_and_purges(b))
        }),
        trial("rbd/controller::stopped-osd", |b| Box::pin(stopped_osd(b))),
    ];
    // One trial at a time: unfiltered snapshot listings see the whole pool.
    let mut args = libtest_mimic::Arguments::from_args();
    args.test_threads = Some(1);
    let mut conclusion = run_suite_with(
        args.clone(),
        vec![(controller(&b, &[]), profile)],
        controller_cases,
        extra,
    );
    let kill = trial("rbd/fuse-ext4::kill-plugin-under-writer", |b| {
        Box::pin(kill_plugin(b))
    });
    let config_line = std::fs::read_to_string(b.var("CEPH_CONFIG_FILE"))
        .unwrap_or_default()
        .replace('\n', " ");
    let secrets_json =
        serde_json::to_string(&b.secrets("CEPH_SECRETS_FILE")).expect("secrets as JSON");
    let params_json =
        serde_json::to_string(&b.params("CEPH_RBD_SC_PARAMS_FILE")).expect("parameters as JSON");
    let vm = rcsi_tests::node_vm_trial(
        "rbd/krbd+nbd::in-node-vm",
        &[
            ("RCSI_VM_PROFILES", "rbd"),
            (
                "RCSI_VM_FORWARD",
                b.var("CEPH_PORTS").trim_matches('"').trim(),
            ),
            ("RCSI_CEPH_CONFIG", &config_line),
            ("RCSI_CEPH_SECRETS", &secrets_json),
            ("RCSI_CEPH_PARAMS", &params_json),
        ],
    );
    let two = trial("rbd/fuse-ext4::second-node-refused", |b| {
        Box::pin(second_node_refused(b))
    });
    let grow = trial("rbd/fuse-xfs::heal-then-grow", |b| {
        Box::pin(heal_then_grow(b))
    });
    let nodes = run_suite_with(
        args,
        vec![
            (
                node_plugin(&b),
                node_profile(&b, "rbd/fuse-ext4", NODE_POOLS[0], "", false),
            ),
            (
                node_plugin(&b),
                node_profile(&b, "rbd/fuse-xfs", NODE_POOLS[1], "xfs", true),
            ),
        ],
        rcsi_tests::cases::all(),
        vec![kill, two, grow, vm],
    );
    conclusion.num_failed += nodes.num_failed;
    conclusion.num_passed += nodes.num_passed;
    let left = std::iter::once(&"rbd")
        .chain(NODE_POOLS.iter())
        .map(|p| leftovers(&b, p))
        .collect::<Result<Vec<_>>>()
        .map(|l| l.concat())
        .and_then(|mut l| {
            l.extend(image_loops()?);
            Ok(l)
        });
    drop(b);
    match left {
        Ok(l) if l.is_empty() => conclusion.exit_code(),
        Ok(l) => {
            eprintln!("the pool still holds: {l:#?}");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("cannot list what the pool holds: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
