//! The conformance cases. Each starts from a fresh driver instance.

use crate::harness::{Case, Ctx, Needs, expect_code, expect_one_of};
use anyhow::{Context as _, Result, anyhow, bail, ensure};
use csi_core::backend::{ControllerRpc as C, NodeRpc as N};
use csi_core::csi::{self, volume_capability as vc};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use tonic::Code;

macro_rules! case {
    ($name:ident, $needs:expr) => {
        Case {
            name: stringify!($name),
            needs: $needs,
            node_free: NODE_FREE.contains(&stringify!($name)),
            run: |c| Box::pin($name(c)),
        }
    };
}

/// Cases that need no Node service (data checks go through the profile's
/// `host_data` when there is none), so a controller plugin alone runs them.
const NODE_FREE: &[&str] = &[
    "identity_plugin_info",
    "identity_probe_and_capabilities",
    "create_volume_required_fields",
    "create_volume_rejects_names_that_escape",
    "longest_names_work",
    "create_volume_idempotent",
    "create_volume_capacity_ranges",
    "delete_volume_semantics",
    "validate_volume_capabilities",
    "list_volumes_pagination",
    "get_capacity",
    "concurrent_create_same_name",
    "snapshot_required_fields",
    "snapshot_idempotent_and_listed",
    "list_snapshots_pagination",
    "restore_snapshot_keeps_data",
    "clone_volume_keeps_data",
    "expand_volume",
    "crash_during_creates",
    "controller_lookups_of_unknown_ids",
];

/// Node-free cases that read or write volume data: a driver whose
/// controller has no `host_data` runs them with a node plugin.
pub const NEED_DATA: &[&str] = &[
    "restore_snapshot_keeps_data",
    "clone_volume_keeps_data",
    "expand_volume",
];

/// Every case, in a stable order.
pub fn all() -> Vec<Case> {
    use Needs::*;
    vec![
        case!(identity_plugin_info, Nothing),
        case!(identity_probe_and_capabilities, Nothing),
        case!(node_get_info, Nothing),
        case!(
            create_volume_required_fields,
            Controller(C::CreateDeleteVolume)
        ),
        case!(
            create_volume_rejects_names_that_escape,
            Controller(C::CreateDeleteVolume)
        ),
        case!(longest_names_work, Controller(C::CreateDeleteVolume)),
        case!(create_volume_idempotent, Controller(C::CreateDeleteVolume)),
        case!(
            create_volume_capacity_ranges,
            Controller(C::CreateDeleteVolume)
        ),
        case!(delete_volume_semantics, Controller(C::CreateDeleteVolume)),
        case!(
            validate_volume_capabilities,
            Controller(C::CreateDeleteVolume)
        ),
        case!(list_volumes_pagination, Controller(C::ListVolumes)),
        case!(get_capacity, Controller(C::GetCapacity)),
        case!(
            concurrent_create_same_name,
            Controller(C::CreateDeleteVolume)
        ),
        case!(
            snapshot_required_fields,
            Controller(C::CreateDeleteSnapshot)
        ),
        case!(snapshot_idempotent_and_listed, Controller(C::ListSnapshots)),
        case!(list_snapshots_pagination, Controller(C::ListSnapshots)),
        case!(
            restore_snapshot_keeps_data,
            Controller(C::CreateDeleteSnapshot)
        ),
        case!(clone_volume_keeps_data, Controller(C::CloneVolume)),
        case!(expand_volume, Controller(C::ExpandVolume)),
        case!(node_stage_required_fields, Node(N::StageUnstageVolume)),
        case!(
            node_publish_required_fields,
            Controller(C::CreateDeleteVolume)
        ),
        case!(full_lifecycle_idempotent, Controller(C::CreateDeleteVolume)),
        case!(readonly_publish, Controller(C::CreateDeleteVolume)),
        case!(two_targets_share_data, Controller(C::CreateDeleteVolume)),
        case!(block_volume_lifecycle, Block),
        case!(volume_stats, Node(N::GetVolumeStats)),
        case!(volume_condition_abnormal, Breakable),
        case!(size_is_enforced, SizeEnforced),
        case!(restart_mid_lifecycle, Controller(C::CreateDeleteVolume)),
        case!(crash_during_creates, Controller(C::CreateDeleteVolume)),
        case!(mount_group_applied, Node(N::VolumeMountGroup)),
        case!(single_writer_publishes_once, Node(N::SingleNodeMultiWriter)),
        case!(unstage_refused_while_published, Node(N::StageUnstageVolume)),
        case!(delete_refused_while_in_use, ControllerSeesNode),
        case!(stats_and_expand_judge_volume_first, Node(N::GetVolumeStats)),
        case!(node_error_table_codes, Node(N::StageUnstageVolume)),
        case!(
            controller_lookups_of_unknown_ids,
            Controller(C::CreateDeleteVolume)
        ),
        case!(group_snapshots_cut_together, GroupSnapshots),
    ]
}

const REPEAT: usize = 10;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write_data(dir: &str, seed: u64) -> Result<()> {
    let p = Path::new(dir).join("data.bin");
    std::fs::write(&p, pattern(seed, 256 * 1024))
        .with_context(|| format!("writing {}", p.display()))?;
    let f = std::fs::File::open(&p)?;
    f.sync_all()?;
    Ok(())
}

fn check_data(dir: &str, seed: u64) -> Result<()> {
    let p = Path::new(dir).join("data.bin");
    let got = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
    ensure!(
        got == pattern(seed, 256 * 1024),
        "{} does not hold the data written (seed {seed})",
        p.display()
    );
    Ok(())
}

fn is_mounted(path: &str) -> bool {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    csi_core::mount::parse_mountinfo(&text)
        .iter()
        .any(|m| m.mount_point == Path::new(path))
}

async fn identity_plugin_info(c: &mut Ctx) -> Result<()> {
    let info = c
        .ident
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await?
        .into_inner();
    ensure!(
        !info.name.is_empty() && info.name.len() <= 63,
        "bad name {:?}",
        info.name
    );
    ensure!(
        info.name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '.')
            && info.name.starts_with(|ch: char| ch.is_ascii_alphanumeric())
            && info.name.ends_with(|ch: char| ch.is_ascii_alphanumeric()),
        "name {:?} is not in domain-name form",
        info.name
    );
    ensure!(
        !info.vendor_version.is_empty(),
        "vendor_version is required"
    );
    Ok(())
}

async fn identity_probe_and_capabilities(c: &mut Ctx) -> Result<()> {
    for _ in 0..REPEAT {
        let p = c.ident.probe(csi::ProbeRequest {}).await?.into_inner();
        ensure!(p.ready != Some(false), "plugin reports not ready");
    }
    ensure!(
        !c.ctl_caps.contains(&C::Unknown),
        "controller advertises UNKNOWN"
    );
    ensure!(
        !c.node_caps.contains(&N::Unknown),
        "node advertises UNKNOWN"
    );
    let unique: HashSet<_> = c.ctl_caps.iter().collect();
    ensure!(
        unique.len() == c.ctl_caps.len(),
        "controller capabilities repeat"
    );
    if !c.has_controller {
        expect_code(
            c.ctl.create_volume(c.create_req("x", c.mount_cap())).await,
            Code::Unimplemented,
            "CreateVolume on a node-only plugin",
        )?;
    }
    Ok(())
}

async fn node_get_info(c: &mut Ctx) -> Result<()> {
    use csi::plugin_capability::{Type as PT, service::Type as ST};
    let info = c
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await?
        .into_inner();
    ensure!(!info.node_id.is_empty(), "node_id is required");
    ensure!(
        info.max_volumes_per_node >= 0,
        "negative max_volumes_per_node"
    );
    let plugin = c
        .ident
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await?
        .into_inner();
    let topo = plugin.capabilities.iter().any(|p| {
        matches!(&p.r#type, Some(PT::Service(s)) if s.r#type == ST::VolumeAccessibilityConstraints as i32)
    });
    if topo {
        let t = info
            .accessible_topology
            .ok_or_else(|| anyhow!("topology advertised but NodeGetInfo has none"))?;
        ensure!(!t.segments.is_empty(), "empty topology");
    }
    Ok(())
}

async fn create_volume_required_fields(c: &mut Ctx) -> Result<()> {
    let good = c.create_req("required-fields", c.mount_cap());
    let mut r = good.clone();
    r.name.clear();
    expect_code(
        c.ctl.create_volume(r).await,
        Code::InvalidArgument,
        "no name",
    )?;
    let mut r = good.clone();
    r.volume_capabilities.clear();
    expect_code(
        c.ctl.create_volume(r).await,
        Code::InvalidArgument,
        "no capabilities",
    )?;
    let mut r = good.clone();
    r.volume_capabilities[0].access_mode = None;
    expect_code(
        c.ctl.create_volume(r).await,
        Code::InvalidArgument,
        "no access mode",
    )?;
    let mut r = good.clone();
    r.volume_capabilities[0].access_type = None;
    expect_code(
        c.ctl.create_volume(r).await,
        Code::InvalidArgument,
        "no access type",
    )?;
    let mut r = good.clone();
    r.volume_capabilities[0].access_mode = Some(vc::AccessMode { mode: 0 });
    expect_code(
        c.ctl.create_volume(r).await,
        Code::InvalidArgument,
        "UNKNOWN access mode",
    )?;
    let mut r = good;
    r.volume_content_source = Some(csi::VolumeContentSource { r#type: None });
    expect_code(
        c.ctl.create_volume(r).await,
        Code::InvalidArgument,
        "empty content source",
    )?;
    Ok(())
}

async fn create_volume_rejects_names_that_escape(c: &mut Ctx) -> Result<()> {
    let before = if c.can(C::ListVolumes) {
        c.list_ids().await?
    } else {
        vec![]
    };
    let long = "n".repeat(300);
    for bad in [
        "..",
        ".",
        "../escape",
        "a/b",
        "/abs",
        "nul\0byte",
        "ctl\u{1}char",
        long.as_str(),
    ] {
        let r = c.ctl.create_volume(c.create_req(bad, c.mount_cap())).await;
        expect_code(r, Code::InvalidArgument, &format!("name {bad:?}"))?;
    }
    let raw = crate::raw::create_volume_raw(
        c.channel.clone(),
        vec![b'v', 0xff, 0xfe, b'x'],
        vec![c.mount_cap()],
    )
    .await;
    match raw {
        Err(s) if s.code() == Code::InvalidArgument => {}
        other => bail!("non-UTF-8 name: expected InvalidArgument, got {other:?}"),
    }
    if c.can(C::ListVolumes) {
        ensure!(
            c.list_ids().await? == before,
            "a rejected request created a volume"
        );
    }
    // Drivers whose ids hold paths (NFS: server:/share/dir) may take "a/b"
    // as an id that names nothing; none may take one that climbs out.
    let mut bad_ids = vec!["", "../x", "/abs/x", "x\0"];
    if !c.profile.ids_hold_paths {
        bad_ids.push("a/b");
    }
    for bad in bad_ids {
        let r = c
            .ctl
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: bad.into(),
                ..Default::default()
            })
            .await;
        expect_code(r, Code::InvalidArgument, &format!("delete id {bad:?}"))?;
    }
    Ok(())
}

async fn create_volume_idempotent(c: &mut Ctx) -> Result<()> {
    let first = c.create("idem").await?;
    ensure!(!first.volume_id.is_empty(), "empty volume_id");
    ensure!(
        first.capacity_bytes == 0 || first.capacity_bytes >= c.profile.volume_size,
        "capacity {} below the {} requested",
        first.capacity_bytes,
        c.profile.volume_size
    );
    for _ in 1..REPEAT {
        let again = c.create("idem").await?;
        ensure!(
            again.volume_id == first.volume_id,
            "same name gave a second volume"
        );
        ensure!(
            again.capacity_bytes == first.capacity_bytes,
            "capacity changed"
        );
    }
    let mut other = c.create_req("idem", c.mount_cap());
    let bigger = first.capacity_bytes.max(c.profile.volume_size) * 2 + (1 << 20);
    other.capacity_range = Some(csi::CapacityRange {
        required_bytes: bigger,
        limit_bytes: bigger,
    });
    expect_code(
        c.ctl.create_volume(other).await,
        Code::AlreadyExists,
        "same name, other size",
    )?;
    c.delete(&first.volume_id).await
}

async fn create_volume_capacity_ranges(c: &mut Ctx) -> Result<()> {
    let mut r = c.create_req("neg", c.mount_cap());
    r.capacity_range = Some(csi::CapacityRange {
        required_bytes: -1,
        limit_bytes: 0,
    });
    expect_code(
        c.ctl.create_volume(r).await,
        Code::InvalidArgument,
        "negative size",
    )?;
    let mut r = c.create_req("inverted", c.mount_cap());
    r.capacity_range = Some(csi::CapacityRange {
        required_bytes: 2 << 30,
        limit_bytes: 1 << 30,
    });
    expect_one_of(
        c.ctl.create_volume(r).await,
        &[Code::OutOfRange, Code::InvalidArgument],
        "limit < required",
    )?;
    let mut r = c.create_req("huge", c.mount_cap());
    r.capacity_range = Some(csi::CapacityRange {
        required_bytes: 1 << 60,
        limit_bytes: 0,
    });
    expect_one_of(
        c.ctl.create_volume(r).await,
        &[Code::OutOfRange, Code::ResourceExhausted],
        "1 EiB",
    )?;
    let size = c.profile.volume_size;
    let mut r = c.create_req("bounded", c.mount_cap());
    r.capacity_range = Some(csi::CapacityRange {
        required_bytes: size,
        limit_bytes: size * 2,
    });
    let v = c.create_with(r).await?;
    ensure!(
        v.capacity_bytes == 0 || (v.capacity_bytes >= size && v.capacity_bytes <= size * 2),
        "capacity {} outside [{size}, {}]",
        v.capacity_bytes,
        size * 2
    );
    c.delete(&v.volume_id).await?;
    let mut r = c.create_req("limit-only", c.mount_cap());
    r.capacity_range = Some(csi::CapacityRange {
        required_bytes: 0,
        limit_bytes: size,
    });
    let v = c.create_with(r).await?;
    ensure!(
        v.capacity_bytes <= size,
        "capacity {} above limit_bytes {size}",
        v.capacity_bytes
    );
    c.delete(&v.volume_id).await
}

async fn delete_volume_semantics(c: &mut Ctx) -> Result<()> {
    expect_code(
        c.ctl
            .delete_volume(csi::DeleteVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        "no volume_id",
    )?;
    c.delete("unknown-volume-0123456789").await?;
    let v = c.create("to-delete").await?;
    for _ in 0..REPEAT {
        c.delete(&v.volume_id).await?;
    }
    if c.can(C::ListVolumes) {
        ensure!(
            !c.list_ids().await?.contains(&v.volume_id),
            "deleted volume still listed"
        );
    }
    let r = c
        .ctl
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            volume_capabilities: vec![c.mount_cap()],
            secrets: c
                .profile
                .secrets("ControllerValidateVolumeCapabilitiesSecret"),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::NotFound, "validate a deleted volume")?;
    let again = c.create("to-delete").await?;
    c.delete(&again.volume_id).await
}

async fn validate_volume_capabilities(c: &mut Ctx) -> Result<()> {
    let v = c.create("validate").await?;
    let secrets = c
        .profile
        .secrets("ControllerValidateVolumeCapabilitiesSecret");
    let req = |id: &str, caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
        volume_id: id.to_owned(),
        volume_context: v.volume_context.clone(),
        volume_capabilities: caps,
        secrets: secrets.clone(),
        ..Default::default()
    };
    let r = c
        .ctl
        .validate_volume_capabilities(req("", vec![c.mount_cap()]))
        .await;
    expect_code(r, Code::InvalidArgument, "no id")?;
    let r = c
        .ctl
        .validate_volume_capabilities(req(&v.volume_id, vec![]))
        .await;
    expect_code(r, Code::InvalidArgument, "no capabilities")?;
    let r = c
        .ctl
        .validate_volume_capabilities(req("unknown-volume-0123456789", vec![c.mount_cap()]))
        .await;
    expect_code(r, Code::NotFound, "unknown volume")?;
    let ok = c
        .ctl
        .validate_volume_capabilities(req(&v.volume_id, vec![c.mount_cap()]))
        .await?
        .into_inner();
    ensure!(
        ok.confirmed.is_some(),
        "the capability it was created with is not confirmed: {}",
        ok.message
    );
    c.delete(&v.volume_id).await
}

async fn list_volumes_pagination(c: &mut Ctx) -> Result<()> {
    let before: HashSet<String> = c.list_ids().await?.into_iter().collect();
    let mut made = HashSet::new();
    for i in 0..5 {
        made.insert(c.create(&format!("page-{i}")).await?.volume_id);
    }
    let pages = c.list_pages(2).await?;
    for p in &pages {
        ensure!(
            p.len() <= 2,
            "page of {} entries with max_entries 2",
            p.len()
        );
    }
    let seen: Vec<String> = pages.concat();
    let seen_set: HashSet<String> = seen.iter().cloned().collect();
    ensure!(
        seen_set.len() == seen.len(),
        "a volume appeared on two pages"
    );
    let expected: HashSet<String> = before.union(&made).cloned().collect();
    ensure!(
        seen_set == expected,
        "pages did not cover exactly the volumes"
    );
    let r = c
        .ctl
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 1,
            starting_token: "garbage-token".into(),
        })
        .await;
    expect_code(r, Code::Aborted, "garbage starting_token")?;
    let r = c
        .ctl
        .list_volumes(csi::ListVolumesRequest {
            max_entries: -1,
            starting_token: String::new(),
        })
        .await;
    expect_code(r, Code::InvalidArgument, "negative max_entries")?;
    for id in made {
        c.delete(&id).await?;
    }
    Ok(())
}

async fn get_capacity(c: &mut Ctx) -> Result<()> {
    let r = c
        .ctl
        .get_capacity(csi::GetCapacityRequest {
            volume_capabilities: vec![c.mount_cap()],
            parameters: c.profile.parameters.clone(),
            accessible_topology: None,
        })
        .await?
        .into_inner();
    ensure!(r.available_capacity >= 0, "negative capacity");
    if let Some(max) = r.maximum_volume_size {
        ensure!(max >= 0, "negative maximum_volume_size");
    }
    let bare = c
        .ctl
        .get_capacity(csi::GetCapacityRequest::default())
        .await?
        .into_inner();
    ensure!(
        bare.available_capacity >= 0,
        "negative capacity without arguments"
    );
    Ok(())
}

async fn concurrent_create_same_name(c: &mut Ctx) -> Result<()> {
    let before = if c.can(C::ListVolumes) {
        c.list_ids().await?.len()
    } else {
        0
    };
    let req = c.create_req("racing", c.mount_cap());
    let calls = (0..16).map(|_| {
        let mut ctl = c.ctl.clone();
        let req = req.clone();
        async move { ctl.create_volume(req).await }
    });
    let results = futures::future::join_all(calls).await;
    let mut ids = HashSet::new();
    for r in results {
        match r {
            Ok(v) => {
                ids.insert(
                    v.into_inner()
                        .volume
                        .map(|v| v.volume_id)
                        .unwrap_or_default(),
                );
            }
            Err(s) if s.code() == Code::Aborted => {}
            Err(s) => bail!(
                "concurrent CreateVolume failed with {:?}: {}",
                s.code(),
                s.message()
            ),
        }
    }
    ensure!(
        ids.len() == 1,
        "concurrent creates of one name produced {} volumes",
        ids.len()
    );
    let id = ids.into_iter().next().unwrap_or_default();
    let again = c.create("racing").await?;
    ensure!(
        again.volume_id == id,
        "retry after the race gave another volume"
    );
    if c.can(C::ListVolumes) {
        ensure!(
            c.list_ids().await?.len() == before + 1,
            "exactly one volume must exist"
        );
    }
    c.delete(&id).await
}

/// Names of 128 bytes, the spec's size limit for strings, must work: the
/// id fits the same limit and a retry returns it (csi-sanity's
/// maximum-length cases, which a driver embedding names in ids can fail).
async fn longest_names_work(c: &mut Ctx) -> Result<()> {
    let name = format!("longest-volume-{}", "n".repeat(113));
    ensure!(name.len() == csi_core::types::MAX_ID_BYTES);
    let v = c.create(&name).await?;
    ensure!(
        v.volume_id.len() <= csi_core::types::MAX_ID_BYTES,
        "a 128-byte name gave a {}-byte volume id",
        v.volume_id.len()
    );
    let again = c.create(&name).await?;
    ensure!(
        again.volume_id == v.volume_id,
        "a retry returned another id"
    );
    if c.can(C::CreateDeleteSnapshot) {
        let sname = format!("longest-snapshot-{}", "s".repeat(111));
        let s = create_snapshot(c, &v.volume_id, &sname).await?;
        ensure!(
            s.snapshot_id.len() <= csi_core::types::MAX_ID_BYTES,
            "a 128-byte name gave a {}-byte snapshot id",
            s.snapshot_id.len()
        );
        let again = create_snapshot(c, &v.volume_id, &sname).await?;
        ensure!(
            again.snapshot_id == s.snapshot_id,
            "a retry returned another snapshot id"
        );
        delete_snapshot(c, &s.snapshot_id).await?;
    }
    c.delete(&v.volume_id).await
}

fn snap_req(c: &Ctx, source: &str, name: &str) -> csi::CreateSnapshotRequest {
    csi::CreateSnapshotRequest {
        source_volume_id: source.to_owned(),
        name: name.to_owned(),
        secrets: c.profile.secrets("CreateSnapshotSecret"),
        parameters: Default::default(),
    }
}

async fn create_snapshot(c: &mut Ctx, source: &str, name: &str) -> Result<csi::Snapshot> {
    let r = snap_req(c, source, name);
    let s = c
        .ctl
        .create_snapshot(r)
        .await
        .with_context(|| format!("CreateSnapshot {name}"))?
        .into_inner()
        .snapshot
        .ok_or_else(|| anyhow!("no snapshot returned"))?;
    ensure!(
        s.source_volume_id == source,
        "snapshot names the wrong source volume"
    );
    ensure!(!s.snapshot_id.is_empty(), "empty snapshot_id");
    ensure!(s.creation_time.is_some(), "creation_time is required");
    Ok(s)
}

async fn delete_snapshot(c: &mut Ctx, id: &str) -> Result<()> {
    c.ctl
        .delete_snapshot(csi::DeleteSnapshotRequest {
            snapshot_id: id.to_owned(),
            secrets: c.profile.secrets("DeleteSnapshotSecret"),
        })
        .await
        .with_context(|| format!("DeleteSnapshot {id}"))?;
    Ok(())
}

async fn snapshot_required_fields(c: &mut Ctx) -> Result<()> {
    let v = c.create("snap-src").await?;
    let r = c.ctl.create_snapshot(snap_req(c, &v.volume_id, "")).await;
    expect_code(r, Code::InvalidArgument, "no snapshot name")?;
    let r = c.ctl.create_snapshot(snap_req(c, "", "snap")).await;
    expect_code(r, Code::InvalidArgument, "no source volume")?;
    let r = c
        .ctl
        .create_snapshot(snap_req(c, "unknown-volume-0123456789", "snap"))
        .await;
    expect_code(r, Code::NotFound, "unknown source volume")?;
    let r = c
        .ctl
        .create_snapshot(snap_req(c, &v.volume_id, "../snap"))
        .await;
    expect_code(r, Code::InvalidArgument, "snapshot name with '/'")?;
    let r = c
        .ctl
        .delete_snapshot(csi::DeleteSnapshotRequest::default())
        .await;
    expect_code(r, Code::InvalidArgument, "no snapshot id")?;
    delete_snapshot(c, "unknown-snapshot-0123456789").await?;
    let mut from = c.create_req("from-missing", c.mount_cap());
    from.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: "unknown-snapshot-0123456789".into(),
            },
        )),
    });
    expect_code(
        c.ctl.create_volume(from).await,
        Code::NotFound,
        "restore from unknown snapshot",
    )?;
    c.delete(&v.volume_id).await
}

async fn list_snaps(c: &mut Ctx, snapshot_id: &str, source: &str) -> Result<Vec<csi::Snapshot>> {
    Ok(c.ctl
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: snapshot_id.to_owned(),
            source_volume_id: source.to_owned(),
            secrets: c.profile.secrets("ListSnapshotsSecret"),
            ..Default::default()
        })
        .await?
        .into_inner()
        .entries
        .into_iter()
        .filter_map(|e| e.snapshot)
        .collect())
}

/// GetSnapshot of `id`, with the profile's secrets.
async fn get_snapshot(
    c: &mut Ctx,
    id: &str,
) -> std::result::Result<tonic::Response<csi::GetSnapshotResponse>, tonic::Status> {
    c.ctl
        .get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: id.to_owned(),
            secrets: c.profile.secrets("GetSnapshotSecret"),
        })
        .await
}

async fn snapshot_idempotent_and_listed(c: &mut Ctx) -> Result<()> {
    let a = c.create("snap-a").await?;
    let b = c.create("snap-b").await?;
    let first = create_snapshot(c, &a.volume_id, "snap-1").await?;
    for _ in 1..REPEAT {
        let again = create_snapshot(c, &a.volume_id, "snap-1").await?;
        ensure!(
            again.snapshot_id == first.snapshot_id,
            "same name gave a second snapshot"
        );
    }
    let r = c
        .ctl
        .create_snapshot(snap_req(c, &b.volume_id, "snap-1"))
        .await;
    expect_code(r, Code::AlreadyExists, "same snapshot name, other volume")?;
    let by_id = list_snaps(c, &first.snapshot_id, "").await?;
    ensure!(
        by_id.len() == 1 && by_id[0].snapshot_id == first.snapshot_id,
        "list by id: {by_id:?}"
    );
    let by_src = list_snaps(c, "", &a.volume_id).await?;
    ensure!(by_src.len() == 1, "list by source: {by_src:?}");
    ensure!(
        list_snaps(c, "", &b.volume_id).await?.is_empty(),
        "volume b has no snapshots"
    );
    ensure!(
        list_snaps(c, "unknown-snapshot-0123456789", "")
            .await?
            .is_empty(),
        "unknown id must list nothing"
    );
    if c.can(C::GetSnapshot) {
        let got = get_snapshot(c, &first.snapshot_id)
            .await
            .context("GetSnapshot of an existing snapshot")?
            .into_inner()
            .snapshot;
        ensure!(
            got.as_ref()
                .is_some_and(|s| s.snapshot_id == first.snapshot_id
                    && s.source_volume_id == a.volume_id
                    && s.size_bytes == first.size_bytes
                    && s.ready_to_use),
            "GetSnapshot of {:?}: {got:?}",
            first.snapshot_id
        );
        expect_code(
            get_snapshot(c, "").await,
            Code::InvalidArgument,
            "GetSnapshot without an id",
        )?;
    }
    for _ in 0..REPEAT {
        delete_snapshot(c, &first.snapshot_id).await?;
    }
    if c.can(C::GetSnapshot) {
        expect_code(
            get_snapshot(c, &first.snapshot_id).await,
            Code::NotFound,
            "GetSnapshot of a deleted snapshot",
        )?;
    }
    ensure!(
        list_snaps(c, &first.snapshot_id, "").await?.is_empty(),
        "deleted snapshot still listed"
    );
    c.delete(&a.volume_id).await?;
    c.delete(&b.volume_id).await
}

async fn list_snapshots_pagination(c: &mut Ctx) -> Result<()> {
    let v = c.create("snap-pages").await?;
    let mut made = HashSet::new();
    for i in 0..3 {
        made.insert(
            create_snapshot(c, &v.volume_id, &format!("page-snap-{i}"))
                .await?
                .snapshot_id,
        );
    }
    let mut seen = HashSet::new();
    let mut token = String::new();
    for _ in 0..10 {
        let r = c
            .ctl
            .list_snapshots(csi::ListSnapshotsRequest {
                max_entries: 1,
                starting_token: token.clone(),
                secrets: c.profile.secrets("ListSnapshotsSecret"),
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(r.entries.len() <= 1, "page too long");
        for e in r.entries.into_iter().filter_map(|e| e.snapshot) {
            ensure!(seen.insert(e.snapshot_id), "snapshot listed twice");
        }
        token = r.next_token;
        if token.is_empty() {
            break;
        }
    }
    ensure!(seen == made, "pages did not cover exactly the snapshots");
    let r = c
        .ctl
        .list_snapshots(csi::ListSnapshotsRequest {
            starting_token: "garbage-token".into(),
            secrets: c.profile.secrets("ListSnapshotsSecret"),
            ..Default::default()
        })
        .await;
    expect_code(r, Code::Aborted, "garbage starting_token")?;
    for id in made {
        delete_snapshot(c, &id).await?;
    }
    c.delete(&v.volume_id).await
}

async fn restore_snapshot_keeps_data(c: &mut Ctx) -> Result<()> {
    let v = c.create("restore-src").await?;
    let (st, tg) = c.mount(&v, "src").await?;
    write_data(&tg, 1)?;
    let s = create_snapshot(c, &v.volume_id, "restore-snap").await?;
    ensure!(s.ready_to_use, "snapshot not ready");
    write_data(&tg, 2)?;
    let mut req = c.create_req("restored", c.mount_cap());
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: s.snapshot_id.clone(),
            },
        )),
    });
    let r = c.create_with(req).await?;
    ensure!(
        r.content_source.is_some(),
        "restored volume does not report its content source"
    );
    let (rst, rtg) = c.mount(&r, "restored").await?;
    check_data(&rtg, 1)?;
    check_data(&tg, 2)?;
    c.unmount(&r, &rst, &rtg).await?;
    c.unmount(&v, &st, &tg).await?;
    c.delete(&r.volume_id).await?;
    delete_snapshot(c, &s.snapshot_id).await?;
    c.delete(&v.volume_id).await
}

async fn clone_volume_keeps_data(c: &mut Ctx) -> Result<()> {
    let v = c.create("clone-src").await?;
    let (st, tg) = c.mount(&v, "src").await?;
    write_data(&tg, 3)?;
    c.unmount(&v, &st, &tg).await?;
    let mut req = c.create_req("clone", c.mount_cap());
    req.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: v.volume_id.clone(),
            },
        )),
    });
    let mut missing = req.clone();
    missing.name = "clone-of-missing".into();
    missing.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: "unknown-volume-0123456789".into(),
            },
        )),
    });
    expect_code(
        c.ctl.create_volume(missing).await,
        Code::NotFound,
        "clone of unknown volume",
    )?;
    let k = c.create_with(req).await?;
    let (kst, ktg) = c.mount(&k, "clone").await?;
    check_data(&ktg, 3)?;
    write_data(&ktg, 4)?;
    c.unmount(&k, &kst, &ktg).await?;
    let (st, tg) = c.mount(&v, "src2").await?;
    check_data(&tg, 3)?;
    c.unmount(&v, &st, &tg).await?;
    c.delete(&k.volume_id).await?;
    c.delete(&v.volume_id).await
}

fn expand_req(c: &Ctx, id: &str, bytes: Option<i64>) -> csi::ControllerExpandVolumeRequest {
    csi::ControllerExpandVolumeRequest {
        volume_id: id.to_owned(),
        capacity_range: bytes.map(|b| csi::CapacityRange {
            required_bytes: b,
            limit_bytes: 0,
        }),
        secrets: c.profile.secrets("ControllerExpandVolumeSecret"),
        ..Default::default()
    }
}

/// ControllerExpandVolume to `want`, then NodeExpandVolume when the node must act.
async fn grow(c: &mut Ctx, v: &csi::Volume, want: i64, staging: &str, target: &str) -> Result<i64> {
    let r = c
        .ctl
        .controller_expand_volume(expand_req(c, &v.volume_id, Some(want)))
        .await?
        .into_inner();
    ensure!(
        r.capacity_bytes >= want,
        "expanded to {} < {want}",
        r.capacity_bytes
    );
    if r.node_expansion_required && c.node_caps.contains(&N::ExpandVolume) && !target.is_empty() {
        node_grow(c, v, want, staging, target).await?;
    }
    Ok(r.capacity_bytes)
}

async fn node_grow(
    c: &mut Ctx,
    v: &csi::Volume,
    want: i64,
    staging: &str,
    target: &str,
) -> Result<()> {
    let n = c
        .node
        .node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            volume_path: target.to_owned(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: want,
                limit_bytes: 0,
            }),
            staging_target_path: if c.stages() {
                staging.to_owned()
            } else {
                String::new()
            },
            volume_capability: Some(c.mount_cap()),
            secrets: Default::default(),
        })
        .await
        .context("NodeExpandVolume")?
        .into_inner();
    ensure!(
        n.capacity_bytes == 0 || n.capacity_bytes >= want,
        "node reports {}",
        n.capacity_bytes
    );
    Ok(())
}

/// Total bytes NodeGetVolumeStats reports for a published volume.
/// Byte usage (total, used) of a published volume, asked again until `ok`
/// holds or the profile's `stats_settle` has passed; the last answer.
async fn stats_bytes(
    c: &mut Ctx,
    v: &csi::Volume,
    (staging, target): (&str, &str),
    ok: impl Fn(i64, i64) -> bool,
) -> Result<(i64, i64)> {
    let deadline = std::time::Instant::now() + c.profile.stats_settle;
    loop {
        let stats = c
            .node
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: v.volume_id.clone(),
                volume_path: target.to_owned(),
                staging_target_path: staging.to_owned(),
            })
            .await?
            .into_inner();
        let (total, used) = stats
            .usage
            .iter()
            .find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32)
            .map(|u| (u.total, u.used))
            .ok_or_else(|| anyhow!("no byte usage"))?;
        if ok(total, used) || std::time::Instant::now() >= deadline {
            return Ok((total, used));
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

async fn expand_volume(c: &mut Ctx) -> Result<()> {
    let r = c
        .ctl
        .controller_expand_volume(expand_req(c, "", Some(1 << 30)))
        .await;
    expect_code(r, Code::InvalidArgument, "no id")?;
    let v = c.create("expand").await?;
    let r = c
        .ctl
        .controller_expand_volume(expand_req(c, &v.volume_id, None))
        .await;
    expect_code(r, Code::InvalidArgument, "no capacity range")?;
    let r = c
        .ctl
        .controller_expand_volume(expand_req(c, "unknown-volume-0123456789", Some(1 << 30)))
        .await;
    expect_code(r, Code::NotFound, "unknown volume")?;
    // Stats of a volume that is a directory of a shared filesystem show
    // that filesystem, whatever the volume's size.
    let stats = c.node_caps.contains(&N::GetVolumeStats) && !c.profile.shared_stats;
    let base = v.capacity_bytes.max(c.profile.volume_size);

    let (st, tg) = c.mount(&v, "expand").await?;
    write_data(&tg, 5)?;
    // Filesystems keep part of the space for their own metadata, so stats
    // totals are checked against 3/4 of the size and against the old total.
    let mut size = base;
    let before = if stats {
        stats_bytes(c, &v, ("", &tg), |_, _| true).await?.0
    } else {
        0
    };
    if c.profile.online_expansion {
        // Online: grow while published, repeated to prove idempotency.
        for _ in 0..3 {
            size = grow(c, &v, base * 2, &st, &tg).await?;
        }
        if stats {
            let grown = |t: i64, _| t > before && t >= size * 3 / 4;
            let (total, _) = stats_bytes(c, &v, ("", &tg), grown).await?;
            ensure!(
                grown(total, 0),
                "stats total {total} after growing online to {size}"
            );
        }
    }
    c.unmount(&v, &st, &tg).await?;

    // Offline: grow while unpublished; the node finishes at the next mount.
    let offline = grow(c, &v, size * 2, "", "").await?;
    let (st, tg) = c.mount(&v, "expand2").await?;
    if c.node_caps.contains(&N::ExpandVolume) {
        node_grow(c, &v, offline, &st, &tg).await?;
    }
    if stats {
        let grown = |t: i64, _| t > before && t >= offline * 3 / 4;
        let (total, _) = stats_bytes(c, &v, ("", &tg), grown).await?;
        ensure!(
            grown(total, 0),
            "stats total {total} after growing offline to {offline}"
        );
    }
    check_data(&tg, 5)?;
    c.unmount(&v, &st, &tg).await?;
    let back = c
        .ctl
        .controller_expand_volume(expand_req(c, &v.volume_id, Some(c.profile.volume_size)))
        .await?
        .into_inner();
    ensure!(
        back.capacity_bytes >= offline,
        "a smaller request shrank the volume"
    );
    c.delete(&v.volume_id).await
}

async fn node_stage_required_fields(c: &mut Ctx) -> Result<()> {
    let v = c.create("stage-fields").await?;
    let staging = c.path("staging");
    std::fs::create_dir_all(&staging)?;
    let good = c.stage_req(&v, c.mount_cap(), &staging);
    let mut r = good.clone();
    r.volume_id.clear();
    expect_code(
        c.node.node_stage_volume(r).await,
        Code::InvalidArgument,
        "no volume_id",
    )?;
    let mut r = good.clone();
    r.staging_target_path.clear();
    expect_code(
        c.node.node_stage_volume(r).await,
        Code::InvalidArgument,
        "no staging path",
    )?;
    let mut r = good.clone();
    r.volume_capability = None;
    expect_code(
        c.node.node_stage_volume(r).await,
        Code::InvalidArgument,
        "no capability",
    )?;
    for bad in ["relative/path", "/tmp/../etc", "/tmp/x\0y"] {
        let mut r = good.clone();
        r.staging_target_path = bad.into();
        expect_code(
            c.node.node_stage_volume(r).await,
            Code::InvalidArgument,
            &format!("staging {bad:?}"),
        )?;
    }
    let mut r = good.clone();
    r.volume_id = "unknown-volume-0123456789".into();
    expect_code(
        c.node.node_stage_volume(r).await,
        Code::NotFound,
        "unknown volume",
    )?;
    let r = c
        .node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: String::new(),
            staging_target_path: staging.clone(),
        })
        .await;
    expect_code(r, Code::InvalidArgument, "unstage without id")?;
    let r = c
        .node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: String::new(),
        })
        .await;
    expect_code(r, Code::InvalidArgument, "unstage without path")?;
    let publish = c.publish_req(&v, c.mount_cap(), &staging, &c.path("pod/mount"), false);
    std::fs::create_dir_all(c.path("pod"))?;
    expect_code(
        c.node.node_publish_volume(publish).await,
        Code::FailedPrecondition,
        "publish before stage",
    )?;
    c.delete(&v.volume_id).await
}

async fn node_publish_required_fields(c: &mut Ctx) -> Result<()> {
    let v = c.create("publish-fields").await?;
    let (st, tg) = c.mount(&v, "pf").await?;
    let good = c.publish_req(&v, c.mount_cap(), &st, &c.path("pf2/mount"), false);
    let mut r = good.clone();
    r.volume_id.clear();
    expect_code(
        c.node.node_publish_volume(r).await,
        Code::InvalidArgument,
        "no volume_id",
    )?;
    let mut r = good.clone();
    r.target_path.clear();
    expect_code(
        c.node.node_publish_volume(r).await,
        Code::InvalidArgument,
        "no target path",
    )?;
    let mut r = good.clone();
    r.volume_capability = None;
    expect_code(
        c.node.node_publish_volume(r).await,
        Code::InvalidArgument,
        "no capability",
    )?;
    let mut r = good.clone();
    r.target_path = "../escape".into();
    expect_code(
        c.node.node_publish_volume(r).await,
        Code::InvalidArgument,
        "relative target",
    )?;
    let mut r = good.clone();
    r.volume_id = "unknown-volume-0123456789".into();
    expect_code(
        c.node.node_publish_volume(r).await,
        Code::NotFound,
        "unknown volume",
    )?;
    let r = c
        .node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: String::new(),
            target_path: tg.clone(),
        })
        .await;
    expect_code(r, Code::InvalidArgument, "unpublish without id")?;
    let r = c
        .node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            target_path: String::new(),
        })
        .await;
    expect_code(r, Code::InvalidArgument, "unpublish without target")?;
    c.unpublish(&v.volume_id, &c.path("never-published"))
        .await
        .context("unpublish of a target that was never published must succeed")?;
    c.unmount(&v, &st, &tg).await?;
    c.delete(&v.volume_id).await
}

async fn full_lifecycle_idempotent(c: &mut Ctx) -> Result<()> {
    let v = c.create("lifecycle").await?;
    let staging = c.path("lc-staging");
    let target = c.path("lc-pod/mount");
    std::fs::create_dir_all(&staging)?;
    std::fs::create_dir_all(c.path("lc-pod"))?;
    let cap = c.mount_cap();
    if c.stages() {
        for _ in 0..REPEAT {
            c.node
                .node_stage_volume(c.stage_req(&v, cap.clone(), &staging))
                .await
                .context("stage")?;
        }
    }
    for _ in 0..REPEAT {
        let r = c.publish_req(&v, cap.clone(), &staging, &target, false);
        c.node.node_publish_volume(r).await.context("publish")?;
    }
    ensure!(is_mounted(&target), "target is not a mount point");
    write_data(&target, 6)?;
    check_data(&target, 6)?;
    if c.node_caps.contains(&N::GetVolumeStats) {
        let written = |_, used| used >= 256 * 1024;
        let (total, used) = stats_bytes(c, &v, (&staging, &target), written).await?;
        ensure!(
            written(total, used),
            "{used} bytes used after writing 256 KiB"
        );
        ensure!(total >= used, "used exceeds total");
    }
    for _ in 0..REPEAT {
        c.unpublish(&v.volume_id, &target)
            .await
            .context("unpublish")?;
    }
    ensure!(!is_mounted(&target), "target still mounted");
    ensure!(!Path::new(&target).exists(), "target path not removed");
    if c.stages() {
        for _ in 0..REPEAT {
            c.unstage(&v.volume_id, &staging).await.context("unstage")?;
        }
        ensure!(!is_mounted(&staging), "staging still mounted");
    }
    c.delete(&v.volume_id).await
}

async fn readonly_publish(c: &mut Ctx) -> Result<()> {
    let v = c.create("readonly").await?;
    let (st, tg) = c.mount(&v, "rw").await?;
    write_data(&tg, 7)?;
    let ro = c.path("ro-pod/mount");
    std::fs::create_dir_all(c.path("ro-pod"))?;
    c.node
        .node_publish_volume(c.publish_req(&v, c.mount_cap(), &st, &ro, true))
        .await
        .context("read-only publish")?;
    check_data(&ro, 7)?;
    match std::fs::write(Path::new(&ro).join("nope"), b"x") {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        other => bail!("write through a read-only publish: {other:?}"),
    }
    let r = c
        .node
        .node_publish_volume(c.publish_req(&v, c.mount_cap(), &st, &ro, false))
        .await;
    expect_code(
        r,
        Code::AlreadyExists,
        "re-publish the read-only target read-write",
    )?;
    c.unpublish(&v.volume_id, &ro).await?;
    c.unmount(&v, &st, &tg).await?;
    c.delete(&v.volume_id).await
}

async fn two_targets_share_data(c: &mut Ctx) -> Result<()> {
    let v = c.create("shared").await?;
    let (st, tg) = c.mount(&v, "one").await?;
    let second = c.path("two-pod/mount");
    std::fs::create_dir_all(c.path("two-pod"))?;
    c.node
        .node_publish_volume(c.publish_req(&v, c.mount_cap(), &st, &second, false))
        .await?;
    write_data(&tg, 8)?;
    check_data(&second, 8)?;
    c.unpublish(&v.volume_id, &second).await?;
    check_data(&tg, 8)?;
    c.unmount(&v, &st, &tg).await?;
    c.delete(&v.volume_id).await
}

async fn block_volume_lifecycle(c: &mut Ctx) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::unix::fs::FileTypeExt;
    let bcap = c.block_cap();
    let v = c.create_with(c.create_req("block", bcap.clone())).await?;
    let staging = c.path("blk-staging");
    std::fs::create_dir_all(&staging)?;
    std::fs::create_dir_all(c.path("blk-pod"))?;
    let target = c.path("blk-pod/dev");
    if c.stages() {
        for _ in 0..3 {
            c.node
                .node_stage_volume(c.stage_req(&v, bcap.clone(), &staging))
                .await?;
        }
    }
    for _ in 0..3 {
        c.node
            .node_publish_volume(c.publish_req(&v, bcap.clone(), &staging, &target, false))
            .await
            .context("publish block")?;
    }
    let meta = std::fs::metadata(&target)?;
    ensure!(
        meta.file_type().is_block_device(),
        "{target} is not a block device"
    );
    let data = pattern(9, 1 << 20);
    {
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)?;
        let size = f.seek(SeekFrom::End(0))?;
        ensure!(
            size as i64 >= c.profile.volume_size,
            "device is {size} bytes"
        );
        f.seek(SeekFrom::Start(4096))?;
        f.write_all(&data)?;
        f.sync_all()?;
        let mut back = vec![0u8; data.len()];
        f.seek(SeekFrom::Start(4096))?;
        f.read_exact(&mut back)?;
        ensure!(back == data, "block data did not read back");
    }
    let mount_cap = c.mount_cap();
    let r = c
        .node
        .node_publish_volume(c.publish_req(&v, mount_cap, &staging, &c.path("blk-pod/fs"), false))
        .await;
    // Spec, NodePublishVolume errors: "Exceeds capabilities" is FAILED_PRECONDITION.
    expect_code(
        r,
        Code::FailedPrecondition,
        "mount a block volume as a filesystem",
    )?;
    c.unpublish(&v.volume_id, &target).await?;
    ensure!(!Path::new(&target).exists(), "block target not removed");
    if c.stages() {
        c.unstage(&v.volume_id, &staging).await?;
    }
    c.delete(&v.volume_id).await
}

async fn volume_stats(c: &mut Ctx) -> Result<()> {
    let req = |id: &str, path: &str| csi::NodeGetVolumeStatsRequest {
        volume_id: id.to_owned(),
        volume_path: path.to_owned(),
        staging_target_path: String::new(),
    };
    let v = c.create("stats").await?;
    let (st, tg) = c.mount(&v, "stats").await?;
    expect_code(
        c.node.node_get_volume_stats(req("", &tg)).await,
        Code::InvalidArgument,
        "no id",
    )?;
    expect_code(
        c.node.node_get_volume_stats(req(&v.volume_id, "")).await,
        Code::InvalidArgument,
        "no path",
    )?;
    let missing = c.path("does-not-exist");
    expect_code(
        c.node
            .node_get_volume_stats(req(&v.volume_id, &missing))
            .await,
        Code::NotFound,
        "missing path",
    )?;
    expect_code(
        c.node
            .node_get_volume_stats(req("unknown-volume-0123456789", &tg))
            .await,
        Code::NotFound,
        "unknown volume",
    )?;
    let s = c
        .node
        .node_get_volume_stats(req(&v.volume_id, &tg))
        .await?
        .into_inner();
    ensure!(!s.usage.is_empty(), "no usage reported");
    for u in &s.usage {
        ensure!(
            u.total > 0 && u.used >= 0 && u.available >= 0,
            "bad usage {u:?}"
        );
        ensure!(
            u.used <= u.total && u.available <= u.total,
            "inconsistent usage {u:?}"
        );
    }
    if c.node_caps.contains(&N::VolumeCondition) {
        let cond = s
            .volume_condition
            .ok_or_else(|| anyhow!("VOLUME_CONDITION advertised but absent"))?;
        ensure!(
            !cond.abnormal,
            "healthy volume reported abnormal: {}",
            cond.message
        );
    }
    c.unmount(&v, &st, &tg).await?;
    c.delete(&v.volume_id).await
}

async fn volume_condition_abnormal(c: &mut Ctx) -> Result<()> {
    ensure!(
        c.node_caps.contains(&N::VolumeCondition),
        "breakable backends must report volume condition"
    );
    let v = c.create("condition").await?;
    let (st, tg) = c.mount(&v, "cond").await?;
    c.inst.break_volume(&v.volume_id).await?;
    let deadline = std::time::Instant::now() + c.profile.stats_settle;
    let cond = loop {
        let s = c
            .node
            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: v.volume_id.clone(),
                volume_path: tg.clone(),
                staging_target_path: String::new(),
            })
            .await?
            .into_inner();
        let cond = s
            .volume_condition
            .ok_or_else(|| anyhow!("no volume condition"))?;
        if cond.abnormal || std::time::Instant::now() >= deadline {
            break cond;
        }
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };
    ensure!(cond.abnormal, "broken volume reported healthy");
    ensure!(
        !cond.message.is_empty(),
        "abnormal condition needs a message"
    );
    c.unmount(&v, &st, &tg).await?;
    c.delete(&v.volume_id).await
}

async fn restart_mid_lifecycle(c: &mut Ctx) -> Result<()> {
    let v = c.create("survivor").await?;
    let (st, tg) = c.mount(&v, "survivor").await?;
    write_data(&tg, 10)?;
    c.restart().await?;
    check_data(&tg, 10)?;
    let again = c.create("survivor").await?;
    ensure!(
        again.volume_id == v.volume_id,
        "after a restart the name maps to another volume"
    );
    if c.can(C::ListVolumes) {
        ensure!(
            c.list_ids().await?.contains(&v.volume_id),
            "volume lost across restart"
        );
    }
    if c.stages() {
        c.node
            .node_stage_volume(c.stage_req(&v, c.mount_cap(), &st))
            .await
            .context("re-stage after restart")?;
    }
    c.node
        .node_publish_volume(c.publish_req(&v, c.mount_cap(), &st, &tg, false))
        .await
        .context("re-publish after restart")?;
    c.unmount(&v, &st, &tg).await?;
    c.restart().await?;
    c.delete(&v.volume_id).await?;
    if c.can(C::ListVolumes) {
        ensure!(
            !c.list_ids().await?.contains(&v.volume_id),
            "deleted volume came back"
        );
    }
    Ok(())
}

/// Writes `mib` MiB to a new file in `dir` as an unprivileged user (as a pod
/// would: root with CAP_SYS_RESOURCE may bypass quotas); returns dd's error
/// text when the write fails.
fn fill(dir: &str, name: &str, mib: usize) -> Result<Option<String>> {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}", Path::new(dir).join(name).display()))
        .args(["bs=1M", &format!("count={mib}"), "conv=fsync"])
        .uid(65534)
        .gid(65534)
        .output()
        .context("running dd")?;
    Ok((!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned()))
}

async fn size_is_enforced(c: &mut Ctx) -> Result<()> {
    let v = c.create("enforced").await?;
    let mib = (v.capacity_bytes.max(c.profile.volume_size) >> 20) as usize;
    let (st, tg) = c.mount(&v, "enforced").await?;
    let settles = !c.profile.stats_settle.is_zero() && c.node_caps.contains(&N::GetVolumeStats);
    if settles {
        // The node learns the size late: wait until it reports it.
        let size = (mib as i64) << 20;
        stats_bytes(c, &v, (&st, &tg), |t, _| t > 0 && t <= size * 5 / 4).await?;
    }
    // The writer is unprivileged (root may use reserved space); the
    // volume's root may be root's alone (kubelet's fsGroup opens it up).
    std::fs::set_permissions(&tg, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    match fill(&tg, "too-big", mib + 8)? {
        Some(e) if e.contains("quota") || e.contains("No space") => {}
        other => bail!(
            "writing {} MiB into a {mib} MiB volume: expected EDQUOT or ENOSPC, got {other:?}",
            mib + 8
        ),
    }
    std::fs::remove_file(Path::new(&tg).join("too-big"))?;
    if c.can(C::ExpandVolume) && c.profile.online_expansion {
        let bigger = (mib as i64) << 21;
        grow(c, &v, bigger, &st, &tg).await?;
        if settles {
            stats_bytes(c, &v, (&st, &tg), |t, _| t >= bigger * 3 / 4).await?;
        }
        if let Some(e) = fill(&tg, "fits-now", mib + 8)? {
            bail!(
                "after growing to {bigger} bytes, writing {} MiB failed: {e}",
                mib + 8
            );
        }
    }
    c.unmount(&v, &st, &tg).await?;
    c.delete(&v.volume_id).await
}

async fn crash_during_creates(c: &mut Ctx) -> Result<()> {
    // 8 clients create volumes back to back until SIGKILL cuts them off (at
    // most 3 each, so small quota-enforced base filesystems do not fill up).
    let req = c.create_req("crash", c.mount_cap());
    let acks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..8)
        .map(|k| {
            let mut ctl = c.ctl.clone();
            let req = req.clone();
            let acks = acks.clone();
            tokio::spawn(async move {
                let mut tried = Vec::new();
                for i in 0..3 {
                    let mut r = req.clone();
                    r.name = format!("crash-{k}-{i}");
                    let res = ctl.create_volume(r.clone()).await;
                    let acked = res
                        .ok()
                        .and_then(|v| v.into_inner().volume)
                        .map(|v| v.volume_id);
                    let done = acked.is_none();
                    if !done {
                        acks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    tried.push((r.name, acked));
                    if done {
                        break;
                    }
                }
                tried
            })
        })
        .collect();
    // Crash once some creates are acknowledged and more are in flight,
    // however fast or slow this machine is.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while acks.load(std::sync::atomic::Ordering::Relaxed) < 16
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    c.crash().await?;
    let mut tried = Vec::new();
    for client in clients {
        tried.extend(client.await?);
    }
    let acked = tried.iter().filter(|(_, id)| id.is_some()).count();
    ensure!(
        acked > 0,
        "no create finished before the crash; the case proves nothing"
    );
    // Every acknowledged volume survived under its id; every name maps to
    // exactly one volume; nothing else exists.
    let mut ids = HashSet::new();
    for (name, id) in &tried {
        let v = c.create(name).await?;
        if let Some(id) = id {
            ensure!(
                *id == v.volume_id,
                "acknowledged volume {name} changed id after a crash"
            );
        }
        ensure!(
            ids.insert(v.volume_id),
            "two names share a volume after the crash"
        );
    }
    if c.can(C::ListVolumes) {
        let listed: HashSet<String> = c.list_ids().await?.into_iter().collect();
        ensure!(
            listed == ids,
            "after a crash the volumes are not exactly those created ({} listed, {} expected)",
            listed.len(),
            ids.len()
        );
    }
    for id in ids {
        c.delete(&id).await?;
    }
    Ok(())
}

async fn mount_group_applied(c: &mut Ctx) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::process::CommandExt;
    let v = c.create("fsgroup").await?;
    let mut cap = c.mount_cap();
    if let Some(vc::AccessType::Mount(m)) = cap.access_type.as_mut() {
        m.volume_mount_group = "4321".into();
    }
    let staging = c.path("fsg-staging");
    let target = c.path("fsg-pod/mount");
    std::fs::create_dir_all(&staging)?;
    std::fs::create_dir_all(c.path("fsg-pod"))?;
    if c.stages() {
        c.node
            .node_stage_volume(c.stage_req(&v, cap.clone(), &staging))
            .await?;
    }
    c.node
        .node_publish_volume(c.publish_req(&v, cap, &staging, &target, false))
        .await
        .context("publish with volume_mount_group")?;
    let meta = std::fs::metadata(&target)?;
    ensure!(
        meta.gid() == 4321,
        "volume root group is {} instead of 4321",
        meta.gid()
    );
    ensure!(
        meta.mode() & 0o2070 == 0o2070,
        "volume root mode {:o} lacks g+rwxs",
        meta.mode() & 0o7777
    );
    // A pod user whose only link to the volume is the group can write.
    let out = std::process::Command::new("sh")
        .args(["-c", "echo ok > \"$0/by-group\"", &target])
        .uid(5555)
        .gid(4321)
        .output()?;
    ensure!(
        out.status.success(),
        "group member cannot write: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created = std::fs::metadata(Path::new(&target).join("by-group"))?;
    ensure!(
        created.gid() == 4321,
        "new files do not inherit the group (setgid)"
    );
    c.unmount(&v, &staging, &target).await?;
    c.delete(&v.volume_id).await
}

/// A capability like `base` with another access mode.
fn with_mode(
    mut base: csi::VolumeCapability,
    mode: vc::access_mode::Mode,
) -> csi::VolumeCapability {
    base.access_mode = Some(vc::AccessMode { mode: mode as i32 });
    base
}

/// The capabilities a case should try: mount, and block when the profile has it.
fn mount_and_block(c: &Ctx) -> Vec<(&'static str, csi::VolumeCapability)> {
    let mut caps = vec![("mount", c.mount_cap())];
    if c.profile.block {
        caps.push(("block", c.block_cap()));
    }
    caps
}

/// Stages (when the node stages) a volume with `cap` at `<tag>-staging`;
/// returns the staging path and a target path `<tag>-<n>` for each of `n`
/// targets (created as the kubelet would: a directory, or a file's parent).
async fn stage_for(
    c: &mut Ctx,
    v: &csi::Volume,
    cap: &csi::VolumeCapability,
    tag: &str,
    targets: usize,
) -> Result<(String, Vec<String>)> {
    let staging = c.path(&format!("{tag}-staging"));
    std::fs::create_dir_all(&staging)?;
    if c.stages() {
        c.node
            .node_stage_volume(c.stage_req(v, cap.clone(), &staging))
            .await
            .context("NodeStageVolume")?;
    }
    let paths = (0..targets)
        .map(|i| {
            std::fs::create_dir_all(c.path(&format!("{tag}-pod{i}")))?;
            Ok(c.path(&format!("{tag}-pod{i}/vol")))
        })
        .collect::<Result<_>>()?;
    Ok((staging, paths))
}

/// Spec, NodePublishVolume: a SINGLE_NODE_SINGLE_WRITER volume published at
/// one target cannot be published at another (FAILED_PRECONDITION), while
/// the same target stays idempotent; after unpublishing, another target works.
async fn single_writer_publishes_once(c: &mut Ctx) -> Result<()> {
    use vc::access_mode::Mode;
    for (kind, base) in mount_and_block(c) {
        let cap = with_mode(base, Mode::SingleNodeSingleWriter);
        let v = c
            .create_with(c.create_req(&format!("snsw-{kind}"), cap.clone()))
            .await?;
        let (st, t) = stage_for(c, &v, &cap, &format!("snsw-{kind}"), 2).await?;
        for _ in 0..2 {
            c.node
                .node_publish_volume(c.publish_req(&v, cap.clone(), &st, &t[0], false))
                .await
                .with_context(|| format!("{kind}: first publish"))?;
        }
        let r = c
            .node
            .node_publish_volume(c.publish_req(&v, cap.clone(), &st, &t[1], false))
            .await;
        expect_code(
            r,
            Code::FailedPrecondition,
            &format!("{kind}: SINGLE_NODE_SINGLE_WRITER volume published at a second target"),
        )?;
        ensure!(!is_mounted(&t[1]), "{kind}: the refused target is mounted");
        c.unpublish(&v.volume_id, &t[0]).await?;
        c.node
            .node_publish_volume(c.publish_req(&v, cap.clone(), &st, &t[1], false))
            .await
            .with_context(|| format!("{kind}: publish elsewhere after unpublish"))?;
        c.unpublish(&v.volume_id, &t[1]).await?;
        if c.stages() {
            c.unstage(&v.volume_id, &st).await?;
        }
        c.delete(&v.volume_id).await?;
    }
    Ok(())
}

/// NodeUnstageVolume while a publish is still active must fail (the CO
/// unpublishes first) and must leave the publish working.
async fn unstage_refused_while_published(c: &mut Ctx) -> Result<()> {
    for (kind, cap) in mount_and_block(c) {
        let v = c
            .create_with(c.create_req(&format!("busy-{kind}"), cap.clone()))
            .await?;
        let (st, t) = stage_for(c, &v, &cap, &format!("busy-{kind}"), 1).await?;
        c.node
            .node_publish_volume(c.publish_req(&v, cap.clone(), &st, &t[0], false))
            .await
            .context("publish")?;
        if kind == "mount" {
            write_data(&t[0], 21)?;
        }
        expect_code(
            c.unstage(&v.volume_id, &st).await.map(tonic::Response::new),
            Code::FailedPrecondition,
            &format!("{kind}: NodeUnstageVolume with a publish still active"),
        )?;
        ensure!(is_mounted(&t[0]), "{kind}: the publish was torn down");
        if kind == "mount" {
            check_data(&t[0], 21)?;
        } else {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&t[0])
                .with_context(|| format!("{kind}: device gone after refused unstage"))?;
        }
        c.unpublish(&v.volume_id, &t[0]).await?;
        c.unstage(&v.volume_id, &st).await?;
        c.delete(&v.volume_id).await?;
    }
    Ok(())
}

/// DeleteVolume of a volume still published or staged on the node must fail
/// with FAILED_PRECONDITION and keep its data.
async fn delete_refused_while_in_use(c: &mut Ctx) -> Result<()> {
    for (kind, cap) in mount_and_block(c) {
        let v = c
            .create_with(c.create_req(&format!("inuse-{kind}"), cap.clone()))
            .await?;
        let (st, t) = stage_for(c, &v, &cap, &format!("inuse-{kind}"), 1).await?;
        c.node
            .node_publish_volume(c.publish_req(&v, cap.clone(), &st, &t[0], false))
            .await
            .context("publish")?;
        if kind == "mount" {
            write_data(&t[0], 22)?;
        }
        let del = csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            secrets: c.profile.secrets("DeleteVolumeSecret"),
        };
        expect_code(
            c.ctl.delete_volume(del.clone()).await,
            Code::FailedPrecondition,
            &format!("{kind}: DeleteVolume while published"),
        )?;
        if kind == "mount" {
            check_data(&t[0], 22)?;
        }
        c.unpublish(&v.volume_id, &t[0]).await?;
        if c.stages() {
            expect_code(
                c.ctl.delete_volume(del.clone()).await,
                Code::FailedPrecondition,
                &format!("{kind}: DeleteVolume while staged"),
            )?;
            c.unstage(&v.volume_id, &st).await?;
        }
        c.delete(&v.volume_id).await?;
        if c.can(C::ListVolumes) {
            ensure!(
                !c.list_ids().await?.contains(&v.volume_id),
                "{kind}: volume listed after delete"
            );
        }
    }
    Ok(())
}

/// NodeGetVolumeStats and NodeExpandVolume look the volume up before the
/// path: an unknown volume, or a path (relative, missing, or another
/// directory) that does not hold the volume, is NOT_FOUND; only a missing
/// field is INVALID_ARGUMENT.
async fn stats_and_expand_judge_volume_first(c: &mut Ctx) -> Result<()> {
    let stats = |id: &str, path: &str| csi::NodeGetVolumeStatsRequest {
        volume_id: id.to_owned(),
        volume_path: path.to_owned(),
        staging_target_path: String::new(),
    };
    let expand = |id: &str, path: &str| csi::NodeExpandVolumeRequest {
        volume_id: id.to_owned(),
        volume_path: path.to_owned(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 1 << 30,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let v = c.create("judge").await?;
    let (st, tg) = c.mount(&v, "judge").await?;
    let other = c.path("not-this-volume");
    std::fs::create_dir_all(&other)?;
    let missing = c.path("missing/dir");
    let unknown = "unknown-volume-0123456789";
    let not_found = [
        (unknown, "some/path"),
        (unknown, missing.as_str()),
        (unknown, tg.as_str()),
        (v.volume_id.as_str(), "some/path"),
        (v.volume_id.as_str(), missing.as_str()),
        (v.volume_id.as_str(), other.as_str()),
    ];
    for (id, path) in not_found {
        expect_code(
            c.node.node_get_volume_stats(stats(id, path)).await,
            Code::NotFound,
            &format!("NodeGetVolumeStats({id}, {path})"),
        )?;
    }
    expect_code(
        c.node.node_get_volume_stats(stats("", "some/path")).await,
        Code::InvalidArgument,
        "NodeGetVolumeStats without a volume id",
    )?;
    expect_code(
        c.node.node_get_volume_stats(stats(unknown, "")).await,
        Code::InvalidArgument,
        "NodeGetVolumeStats without a path",
    )?;
    if c.node_caps.contains(&N::ExpandVolume) {
        for (id, path) in not_found {
            expect_code(
                c.node.node_expand_volume(expand(id, path)).await,
                Code::NotFound,
                &format!("NodeExpandVolume({id}, {path})"),
            )?;
        }
        expect_code(
            c.node.node_expand_volume(expand("", &tg)).await,
            Code::InvalidArgument,
            "NodeExpandVolume without a volume id",
        )?;
        expect_code(
            c.node.node_expand_volume(expand(&v.volume_id, "")).await,
            Code::InvalidArgument,
            "NodeExpandVolume without a path",
        )?;
    }
    c.node
        .node_get_volume_stats(stats(&v.volume_id, &tg))
        .await
        .context("stats of the real target")?;
    c.unmount(&v, &st, &tg).await?;
    c.delete(&v.volume_id).await
}

/// The spec's NodeStageVolume and NodePublishVolume error tables: a
/// capability the volume cannot serve is FAILED_PRECONDITION ("Exceeds
/// capabilities"), and so is a publish without the staging path of a
/// driver that stages ("Staging target path not set") unless a required
/// field is missing too (InvalidArgument).
async fn node_error_table_codes(c: &mut Ctx) -> Result<()> {
    let v = c.create("codes").await?;
    let (st, tg) = c.mount(&v, "codes").await?;
    let mut r = c.publish_req(&v, c.mount_cap(), &st, &c.path("codes-2/vol"), false);
    r.staging_target_path.clear();
    expect_code(
        c.node.node_publish_volume(r).await,
        Code::FailedPrecondition,
        "NodePublishVolume without staging_target_path on a staging driver",
    )?;
    // A missing required field comes first: csi-sanity's "no volume
    // capability" case sends neither field.
    let mut r = c.publish_req(&v, c.mount_cap(), &st, &c.path("codes-3/vol"), false);
    r.staging_target_path.clear();
    r.volume_capability = None;
    expect_code(
        c.node.node_publish_volume(r).await,
        Code::InvalidArgument,
        "NodePublishVolume without volume_capability nor staging_target_path",
    )?;
    c.unmount(&v, &st, &tg).await?;
    c.delete(&v.volume_id).await?;
    if c.profile.block {
        let b = c
            .create_with(c.create_req("codes-blk", c.block_cap()))
            .await?;
        let staging = c.path("codes-blk-staging");
        std::fs::create_dir_all(&staging)?;
        expect_code(
            c.node
                .node_stage_volume(c.stage_req(&b, c.mount_cap(), &staging))
                .await,
            Code::FailedPrecondition,
            "NodeStageVolume of a block volume with a mount capability",
        )?;
        ensure!(!is_mounted(&staging), "the refused stage mounted something");
        c.delete(&b.volume_id).await?;
    }
    Ok(())
}

/// Lookups of ids that do not exist are NOT_FOUND in every table that has
/// them: ControllerGetVolume, GetSnapshot, ControllerExpandVolume, and a
/// restore from an unknown snapshot.
async fn controller_lookups_of_unknown_ids(c: &mut Ctx) -> Result<()> {
    let unknown = "unknown-volume-0123456789";
    if c.can(C::GetVolume) {
        expect_code(
            c.ctl
                .controller_get_volume(csi::ControllerGetVolumeRequest {
                    volume_id: unknown.into(),
                })
                .await,
            Code::NotFound,
            "ControllerGetVolume of an unknown id",
        )?;
    }
    if c.can(C::GetSnapshot) {
        expect_code(
            c.ctl
                .get_snapshot(csi::GetSnapshotRequest {
                    snapshot_id: "unknown-snapshot-0123456789".into(),
                    secrets: c.profile.secrets("GetSnapshotSecret"),
                })
                .await,
            Code::NotFound,
            "GetSnapshot of an unknown id",
        )?;
    }
    if c.can(C::ExpandVolume) {
        expect_code(
            c.ctl
                .controller_expand_volume(expand_req(c, unknown, Some(1 << 30)))
                .await,
            Code::NotFound,
            "ControllerExpandVolume of an unknown id",
        )?;
    }
    Ok(())
}

fn group_req(name: &str, sources: &[&str]) -> csi::CreateVolumeGroupSnapshotRequest {
    csi::CreateVolumeGroupSnapshotRequest {
        name: name.into(),
        source_volume_ids: sources.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// GroupController: a group snapshot of two volumes with data, taken while
/// they are in use (or, when the driver cannot make that consistent, after
/// FailedPrecondition and unmounting); idempotent by name, AlreadyExists for
/// other sources, members listed with their group, restorable with the data
/// of the instant of the cut, member lists checked on Get and Delete, and
/// the spec's required fields.
async fn group_snapshots_cut_together(c: &mut Ctx) -> Result<()> {
    let a = c.create("grp-a").await?;
    let b = c.create("grp-b").await?;
    let (sa, ta) = c.mount(&a, "grp-a").await?;
    let (sb, tb) = c.mount(&b, "grp-b").await?;
    write_data(&ta, 31)?;
    write_data(&tb, 32)?;
    let (ida, idb) = (a.volume_id.as_str(), b.volume_id.as_str());

    for (r, what) in [
        (group_req("", &[ida]), "no name"),
        (group_req("g", &[]), "no sources"),
        (group_req("g", &[ida, ida]), "a source twice"),
    ] {
        expect_code(
            c.group.create_volume_group_snapshot(r).await,
            Code::InvalidArgument,
            what,
        )?;
    }
    expect_code(
        c.group
            .create_volume_group_snapshot(group_req("g", &[ida, "unknown-volume-0123456789"]))
            .await,
        Code::NotFound,
        "unknown source volume",
    )?;

    let mut mounted = true;
    let group = match c
        .group
        .create_volume_group_snapshot(group_req("g", &[ida, idb]))
        .await
    {
        Ok(r) => r.into_inner().group_snapshot,
        Err(s) if s.code() == Code::FailedPrecondition => {
            // The driver cannot cut these consistently while in use.
            c.unmount(&a, &sa, &ta).await?;
            c.unmount(&b, &sb, &tb).await?;
            mounted = false;
            c.group
                .create_volume_group_snapshot(group_req("g", &[ida, idb]))
                .await
                .context("group snapshot after unmounting")?
                .into_inner()
                .group_snapshot
        }
        Err(s) => bail!("CreateVolumeGroupSnapshot: {s}"),
    }
    .ok_or_else(|| anyhow!("no group_snapshot in the response"))?;
    ensure!(group.snapshots.len() == 2, "{group:?}");
    ensure!(
        group.creation_time.is_some() && group.ready_to_use,
        "{group:?}"
    );
    for snap in &group.snapshots {
        ensure!(
            snap.group_snapshot_id == group.group_snapshot_id,
            "member without its group id: {snap:?}"
        );
    }
    let mut members: Vec<String> = group
        .snapshots
        .iter()
        .map(|s| s.snapshot_id.clone())
        .collect();
    members.sort();
    if mounted {
        // Writes after the cut must not show in the snapshot.
        write_data(&ta, 33)?;
    }

    let again = c
        .group
        .create_volume_group_snapshot(group_req("g", &[idb, ida]))
        .await?
        .into_inner()
        .group_snapshot
        .unwrap_or_default();
    ensure!(
        again.group_snapshot_id == group.group_snapshot_id,
        "not idempotent"
    );
    let mut again_ids: Vec<String> = again
        .snapshots
        .iter()
        .map(|s| s.snapshot_id.clone())
        .collect();
    again_ids.sort();
    ensure!(again_ids == members, "members changed: {again_ids:?}");
    expect_code(
        c.group
            .create_volume_group_snapshot(group_req("g", &[ida]))
            .await,
        Code::AlreadyExists,
        "same name, other sources",
    )?;

    let gid = group.group_snapshot_id.clone();
    let get = |ids: Vec<String>| csi::GetVolumeGroupSnapshotRequest {
        group_snapshot_id: gid.clone(),
        snapshot_ids: ids,
        secrets: HashMap::new(),
    };
    c.group
        .get_volume_group_snapshot(get(members.clone()))
        .await?;
    expect_code(
        c.group
            .get_volume_group_snapshot(get(vec![members[0].clone()]))
            .await,
        Code::InvalidArgument,
        "GetVolumeGroupSnapshot with a wrong member list",
    )?;
    let listed = list_snaps(c, "", "").await?;
    for id in &members {
        let s = listed
            .iter()
            .find(|s| &s.snapshot_id == id)
            .ok_or_else(|| anyhow!("member {id} not listed"))?;
        ensure!(s.group_snapshot_id == gid, "{s:?}");
    }
    expect_code(
        c.ctl
            .delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: members[0].clone(),
                secrets: HashMap::new(),
            })
            .await,
        Code::InvalidArgument,
        "DeleteSnapshot of a group member (the spec's \"Snapshot is part of a group\")",
    )?;

    // Each member restores to the data of the instant of the cut.
    for snap in &group.snapshots {
        let seed = if snap.source_volume_id == a.volume_id {
            31
        } else {
            32
        };
        let mut req = c.create_req(&format!("from-{}", snap.snapshot_id), c.mount_cap());
        req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: snap.snapshot_id.clone(),
                },
            )),
        });
        let r = c.create_with(req).await?;
        let (st, tg) = c.mount(&r, &format!("grp-r{seed}")).await?;
        check_data(&tg, seed)?;
        c.unmount(&r, &st, &tg).await?;
        c.delete(&r.volume_id).await?;
    }

    let del = |ids: Vec<String>| csi::DeleteVolumeGroupSnapshotRequest {
        group_snapshot_id: gid.clone(),
        snapshot_ids: ids,
        secrets: HashMap::new(),
    };
    expect_code(
        c.group
            .delete_volume_group_snapshot(del(vec!["ls-not-a-member".into()]))
            .await,
        Code::InvalidArgument,
        "DeleteVolumeGroupSnapshot with a wrong member list",
    )?;
    for _ in 0..2 {
        c.group
            .delete_volume_group_snapshot(del(members.clone()))
            .await
            .context("DeleteVolumeGroupSnapshot")?;
    }
    expect_code(
        c.group.get_volume_group_snapshot(get(vec![])).await,
        Code::NotFound,
        "GetVolumeGroupSnapshot after delete",
    )?;
    let listed = list_snaps(c, "", "").await?;
    ensure!(
        !listed.iter().any(|s| members.contains(&s.snapshot_id)),
        "members listed after the group was deleted"
    );
    if mounted {
        c.unmount(&a, &sa, &ta).await?;
        c.unmount(&b, &sb, &tb).await?;
    }
    c.delete(ida).await?;
    c.delete(idb).await
}
