//! Start-up recovery from every crash window of create and delete.

use csi_core::backend::ControllerBackend;
use csi_core::csi::{self, volume_capability as vc};
use csi_core::exec::SystemExec;
use csi_core::types::CreateVolume;
use rcsi_local_path::store::Index;
use rcsi_local_path::{Config, Host, LocalPath, volume_dir};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

fn open(base: &Path) -> LocalPath {
    try_open(base).unwrap()
}

fn try_open(base: &Path) -> csi_core::Result<LocalPath> {
    let exec = Arc::new(SystemExec);
    let host = Host {
        mounter: Arc::new(csi_core::mount::SystemMounter::new(
            exec.clone(),
            Duration::from_secs(5),
        )),
        loops: Arc::new(csi_core::blockdev::SystemLoopDevices::new(exec.clone())),
        blockdev: Arc::new(csi_core::blockdev::SystemBlockDevices::new(exec.clone())),
        exec,
    };
    LocalPath::open(
        Config {
            node_id: "n1".into(),
            base_path: base.to_path_buf(),
            max_volumes: 0,
            reserved_bytes: 0,
        },
        host,
    )
}

async fn create(d: &LocalPath, name: &str) -> String {
    create_with(
        d,
        name,
        &[],
        vc::AccessType::Mount(vc::MountVolume::default()),
    )
    .await
}

async fn create_with(
    d: &LocalPath,
    name: &str,
    params: &[(&str, &str)],
    access: vc::AccessType,
) -> String {
    let req = csi::CreateVolumeRequest {
        name: name.into(),
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 1 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![csi::VolumeCapability {
            access_type: Some(access),
            access_mode: Some(vc::AccessMode {
                mode: vc::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }],
        ..Default::default()
    };
    d.create_volume(CreateVolume::from_proto(&req, &|_, _| Ok(())).unwrap())
        .await
        .unwrap()
        .volume_id
}

/// The ids ListVolumes returns, sorted.
async fn listed_ids(d: &LocalPath) -> Vec<String> {
    sorted(
        d.list_volumes()
            .await
            .unwrap()
            .into_iter()
            .map(|(v, _)| v.volume_id),
    )
}

fn sorted(ids: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = ids.into_iter().collect();
    v.sort();
    v
}

#[tokio::test]
async fn crash_windows_are_finished_or_undone() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let vols = base.join("volumes");
    let vol = |id: &str| volume_dir(&base, id);
    let beside = |id: &str, prefix: &str| vol(id).with_file_name(format!("{prefix}{id}"));
    let (a, b) = {
        let d = open(&base);
        let a = create(&d, "a").await;
        let b = create(&d, "b").await;
        std::fs::write(vol(&a).join("data"), b"kept").unwrap();
        (a, b)
    };
    // a: committed, crashed before its rename into place.
    std::fs::rename(vol(&a), beside(&a, ".tmp-")).unwrap();
    // b: renamed to trash for deletion, crashed before the commit.
    std::fs::rename(vol(&b), beside(&b, ".trash-")).unwrap();
    // Leftovers of creations and deletions that did commit or never did, in
    // a shard and where volumes lived before shards.
    let unknown = "lv-0123456789abcdef0123456789abcdef";
    std::fs::create_dir(beside(unknown, ".tmp-")).unwrap();
    std::fs::create_dir(vols.join(format!(".trash-{unknown}"))).unwrap();
    // A directory made in place whose record never committed: empty, removed.
    let unfinished = vol("lv-eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee");
    std::fs::create_dir(&unfinished).unwrap();
    // Data without metadata is the operator's to judge: left alone.
    std::fs::create_dir(vols.join("lv-ffffffffffffffffffffffffffffffff")).unwrap();
    std::fs::write(vols.join("lv-ffffffffffffffffffffffffffffffff/f"), b"x").unwrap();

    let d = open(&base);
    assert_eq!(std::fs::read(vol(&a).join("data")).unwrap(), b"kept");
    assert!(vol(&b).is_dir(), "uncommitted deletion rolled back");
    assert!(!beside(unknown, ".tmp-").exists());
    assert!(!vols.join(format!(".trash-{unknown}")).exists());
    assert!(
        !unfinished.exists(),
        "an empty unrecorded directory is removed"
    );
    assert!(vols.join("lv-ffffffffffffffffffffffffffffffff/f").exists());
    let shards = std::fs::read_dir(&vols)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().len() == 1)
        .count();
    assert_eq!(shards, 16, "recovery keeps the empty shard directories");
    assert_eq!(listed_ids(&d).await, sorted([a.clone(), b.clone()]));
    assert_eq!(create(&d, "a").await, a, "names still map to their volumes");
}

#[tokio::test]
async fn a_second_plugin_on_the_same_base_path_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let first = open(&base);
    let a = create(&first, "a").await;
    std::fs::write(volume_dir(&base, &a).join("data"), b"kept").unwrap();
    // The first plugin's clone in flight: a second plugin's recovery would
    // take it for a crash's leftover and remove it.
    let id = "lv-0123456789abcdef0123456789abcdef";
    let in_flight = volume_dir(&base, id).with_file_name(format!(".tmp-{id}"));
    std::fs::create_dir(&in_flight).unwrap();
    // Through another spelling of the path: the lock is on the directory.
    let alias = dir.path().join("alias");
    std::os::unix::fs::symlink(&base, &alias).unwrap();
    let t = std::time::Instant::now();
    let e = match try_open(&alias) {
        Ok(_) => panic!("a second plugin opened a base path in use"),
        Err(e) => e,
    };
    assert!(
        t.elapsed() >= csi_core::fsutil::LOCK_WAIT,
        "gave up after {:?}",
        t.elapsed()
    );
    assert!(matches!(e, csi_core::Error::FailedPrecondition(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!(
            "{} is in use by another rcsi process (pid ",
            alias.display()
        )),
        "{msg}"
    );
    assert!(msg.contains("must not share a base path"), "{msg}");
    assert!(
        in_flight.is_dir(),
        "the refused plugin removed a creation in flight"
    );
    assert_eq!(
        std::fs::read(volume_dir(&base, &a).join("data")).unwrap(),
        b"kept"
    );
    // The first plugin's journal is untouched: it goes on, and all it
    // acknowledged is there after a restart.
    let b = create(&first, "b").await;
    drop(first);
    std::fs::remove_dir(&in_flight).unwrap();
    assert_eq!(listed_ids(&open(&base)).await, sorted([a, b]));
}

#[tokio::test]
async fn a_committed_snapshot_whose_rename_failed_is_settled_by_the_retry() {
    use csi_core::types::Secrets;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let d = open(&base);
    let v = create(&d, "src").await;
    std::fs::write(volume_dir(&base, &v).join("data"), b"snap me").unwrap();
    let params = Default::default();
    let s = d
        .create_snapshot(&v, "snap", &params, &Secrets::default())
        .await
        .unwrap();
    let snaps = base.join("snapshots");
    let data = snaps.join(&s.snapshot_id);
    // As if the rename after the commit had failed: the data sits under its
    // temporary name. The retry must move it into place, not report a
    // snapshot without data.
    std::fs::rename(&data, snaps.join(format!(".tmp-{}", s.snapshot_id))).unwrap();
    let again = d
        .create_snapshot(&v, "snap", &params, &Secrets::default())
        .await
        .unwrap();
    assert_eq!(again.snapshot_id, s.snapshot_id);
    assert_eq!(std::fs::read(data.join("data")).unwrap(), b"snap me");
}

/// Tombstones in the persisted metadata.
fn tombstones(base: &Path) -> usize {
    let log = csi_core::journal::Log::<Index>::open(&base.join(".rcsi")).unwrap();
    log.read().state.deleted.len()
}

// The journal's flush makes only its own record durable, so a crash can keep
// a record whose directory entry, image size or removal was not yet on
// disk: recovery redoes each.
#[tokio::test]
async fn committed_changes_whose_metadata_was_lost_are_redone() {
    use csi_core::types::Secrets;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let vol = |id: &str| volume_dir(&base, id);
    let (a, img, gone) = {
        let d = open(&base);
        let a = create_with(
            &d,
            "a",
            &[("mode", "0750")],
            vc::AccessType::Mount(vc::MountVolume::default()),
        )
        .await;
        let img = create_with(
            &d,
            "img",
            &[("backing", "file")],
            vc::AccessType::Block(vc::BlockVolume::default()),
        )
        .await;
        let gone = create(&d, "gone").await;
        d.delete_volume(&gone, &Secrets::default()).await.unwrap();
        (a, img, gone)
    };
    // a's mkdir, img's size and gone's removal were lost.
    std::fs::remove_dir(vol(&a)).unwrap();
    let image = vol(&img).with_extension("img");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(4096)
        .unwrap();
    std::fs::create_dir(vol(&gone)).unwrap();
    std::fs::write(vol(&gone).join("old"), b"deleted data").unwrap();
    assert_eq!(tombstones(&base), 1);

    let d = open(&base);
    let m = std::fs::metadata(vol(&a)).unwrap();
    assert!(m.is_dir());
    assert_eq!(m.permissions().mode() & 0o7777, 0o750);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 1 << 20);
    assert!(!vol(&gone).exists(), "a committed deletion is finished");
    assert_eq!(d.list_volumes().await.unwrap().len(), 2);
}

#[tokio::test]
async fn tombstones_are_dropped_once_removals_are_durable() {
    use csi_core::types::Secrets;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    async fn churn(base: &Path, names: std::ops::Range<usize>) {
        let d = open(base);
        for i in names {
            let id = create(&d, &format!("v{i}")).await;
            d.delete_volume(&id, &Secrets::default()).await.unwrap();
        }
    }
    churn(&base, 0..255).await;
    assert_eq!(tombstones(&base), 255);
    churn(&base, 255..256).await;
    assert_eq!(tombstones(&base), 0, "the 256th deletion settles them");
}

// The record goes before the removal, so a removal that fails leaves data
// under a tombstone: the next settling removes it without a restart.
#[tokio::test]
async fn data_a_failed_removal_left_is_removed_when_deletions_settle() {
    use csi_core::types::Secrets;
    use nix::mount::{MntFlags, MsFlags, mount, umount2};
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let d = open(&base);
    let id = create(&d, "busy").await;
    let data = volume_dir(&base, &id);
    let busy = data.join("mnt");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(data.join("f"), b"x").unwrap();
    // A mount point inside the volume makes its removal fail with EBUSY.
    mount(
        Some("tmpfs"),
        &busy,
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let err = d.delete_volume(&id, &Secrets::default()).await;
    umount2(&busy, MntFlags::MNT_DETACH).unwrap();
    assert!(err.is_err(), "the removal failed: {err:?}");
    assert!(
        d.list_volumes().await.unwrap().is_empty(),
        "the volume is gone"
    );
    for i in 0..255 {
        let v = create(&d, &format!("v{i}")).await;
        d.delete_volume(&v, &Secrets::default()).await.unwrap();
    }
    let left: Vec<_> = std::fs::read_dir(volume_dir(&base, &id).parent().unwrap())
        .unwrap()
        .collect();
    assert!(left.is_empty(), "settling removed the leftover: {left:?}");
    drop(d);
    assert_eq!(tombstones(&base), 0);
}

// Volumes made before shard directories keep their data in `volumes/`; their
// records carry no `sharded` flag.
#[tokio::test]
async fn volumes_made_before_shards_stay_where_they_are() {
    use csi_core::types::Secrets;
    use rcsi_local_path::store::Change;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let old_dir = |id: &str| base.join("volumes").join(id);
    let id = {
        let d = open(&base);
        create(&d, "old").await
    };
    // Turn it into a volume of the layout before shards: record and data.
    {
        let log = csi_core::journal::Log::<Index>::open(&base.join(".rcsi")).unwrap();
        let mut v = log.read().state.volumes[&id].clone();
        assert!(v.sharded, "new volumes are made in a shard");
        v.sharded = false;
        let record = serde_json::to_string(&v).unwrap();
        assert!(!record.contains("sharded"), "{record}");
        log.commit(Change::PutVolume(v)).await.unwrap();
    }
    std::fs::rename(volume_dir(&base, &id), old_dir(&id)).unwrap();
    std::fs::write(old_dir(&id).join("data"), b"old data").unwrap();

    let d = open(&base);
    assert_eq!(
        std::fs::read(old_dir(&id).join("data")).unwrap(),
        b"old data"
    );
    assert_eq!(create(&d, "old").await, id, "its name still maps to it");
    let new = create(&d, "new").await;
    assert!(
        volume_dir(&base, &new).is_dir(),
        "a new volume goes in its shard"
    );
    d.delete_volume(&id, &Secrets::default()).await.unwrap();
    assert!(!old_dir(&id).exists(), "its deletion removes its data");
    let ids: Vec<_> = d.list_volumes().await.unwrap();
    assert_eq!(ids.len(), 1);
    assert_eq!(ids[0].0.volume_id, new);
}
