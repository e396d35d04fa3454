//! Cancellation safety: clients that give up mid-call (a short deadline)
//! during a clone of a large volume, a snapshot of a mounted image volume
//! and a delete, at several points. Afterwards the mount is writable, each
//! name maps to exactly one volume after the retries, and no temporary or
//! trash data remains under the base path.

mod common;

use common::{Driver, cap, create, create_req, fill, mount};
use csi_core::csi;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::Code;

fn with_deadline<T>(msg: T, d: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(d);
    r
}

/// Sends `make()` with deadline `d` (the client gives up then), then retries
/// without one until the call succeeds; Aborted means the abandoned call is
/// still running.
macro_rules! cancel_then_retry {
    ($client:expr, $method:ident, $make:expr, $d:expr) => {{
        let d: Duration = $d;
        let first = tokio::time::timeout(
            d + Duration::from_millis(20),
            $client.$method(with_deadline($make, d)),
        )
        .await;
        let cut_short = !matches!(first, Ok(Ok(_)));
        let mut tries = 0;
        loop {
            match $client.$method($make).await {
                Ok(r) => break (r.into_inner(), cut_short),
                Err(s) if s.code() == Code::Aborted && tries < 600 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => panic!(
                    "{} failed after a cancelled attempt: {s}",
                    stringify!($method)
                ),
            }
        }
    }};
}

/// Writes and syncs a file in `dir` in a thread; false when that does not
/// finish within 20 s (a frozen filesystem blocks writers).
fn writable(dir: &Path) -> bool {
    let p = dir.join("probe");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r =
            std::fs::write(&p, b"still writable").and_then(|_| std::fs::File::open(&p)?.sync_all());
        let _ = tx.send(r.is_ok());
    });
    rx.recv_timeout(Duration::from_secs(20)).unwrap_or(false)
}

fn leftovers(base: &Path) -> Vec<PathBuf> {
    let list = |d: &Path| std::fs::read_dir(d).unwrap().map(|e| e.unwrap().path());
    let shards = list(&base.join("volumes")).filter(|p| p.file_name().unwrap().len() == 1);
    shards
        .chain(["volumes", "snapshots"].map(|d| base.join(d)))
        .flat_map(|d| list(&d).collect::<Vec<_>>())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(".tmp-") || n.starts_with(".trash-")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_calls_leave_nothing_half_done() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts: run as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base");
    let (_driver, mut ctl, mut node) = Driver::start(dir.path(), &base).await;
    let deadlines = [1, 10, 40, 150, 400].map(Duration::from_millis);
    let mut names: HashMap<String, String> = HashMap::new();

    // Clones of a large directory volume (real copies on the ext4 root disk).
    let dir_cap = cap(false, "");
    let src = create(&mut ctl, "big", 1 << 30, &[], dir_cap.clone()).await;
    let src_mount = mount(&mut node, &src, dir_cap.clone(), dir.path(), "big").await;
    fill(&src_mount, 48, 4 << 20);
    let mut cut = 0;
    for (i, d) in deadlines.iter().enumerate() {
        let name = format!("clone-{i}");
        let make = || create_req(&name, 1 << 30, &[], dir_cap.clone(), Some(&src.volume_id));
        let (r, cut_short) = cancel_then_retry!(ctl, create_volume, make(), *d);
        cut += usize::from(cut_short);
        let id = r.volume.unwrap().volume_id;
        assert!(names.insert(name, id).is_none());
    }
    assert!(
        cut > 0,
        "no clone was cut short: the deadlines are too long for this disk"
    );

    // Snapshots of a mounted image volume: frozen during the copy.
    let img_cap = cap(false, "ext4");
    let img = create(
        &mut ctl,
        "img",
        256 << 20,
        &[("backing", "file")],
        img_cap.clone(),
    )
    .await;
    let img_mount = mount(&mut node, &img, img_cap, dir.path(), "img").await;
    fill(&img_mount, 24, 4 << 20);
    let mut snaps = Vec::new();
    for (i, d) in deadlines.iter().enumerate() {
        let make = || csi::CreateSnapshotRequest {
            source_volume_id: img.volume_id.clone(),
            name: format!("snap-{i}"),
            ..Default::default()
        };
        let (r, _) = cancel_then_retry!(ctl, create_snapshot, make(), *d);
        snaps.push(r.snapshot.unwrap().snapshot_id);
        assert!(
            writable(&img_mount),
            "the mount stayed frozen after a cancelled snapshot"
        );
    }
    let listed = ctl
        .list_snapshots(csi::ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.entries.len(),
        deadlines.len(),
        "one snapshot per name"
    );

    // Deletes of volumes with many files.
    for (i, d) in deadlines.iter().enumerate() {
        let name = format!("clone-{i}");
        let id = names.remove(&name).unwrap();
        let make = || csi::DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: HashMap::new(),
        };
        cancel_then_retry!(ctl, delete_volume, make(), *d);
    }

    // Every name created maps to one volume; nothing half-done is left.
    let mut want = vec![src.volume_id.clone(), img.volume_id.clone()];
    want.sort();
    let got = common::volume_ids(&mut ctl).await;
    assert_eq!(got, want, "volumes left after the deletes");
    assert!(writable(&src_mount) && writable(&img_mount));
    assert_eq!(
        leftovers(&base),
        Vec::<PathBuf>::new(),
        "temporary or trash data left"
    );

    for (v, tag) in [(&src, "big"), (&img, "img")] {
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            target_path: dir
                .path()
                .join(format!("{tag}-target"))
                .display()
                .to_string(),
        })
        .await
        .unwrap();
        node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: dir
                .path()
                .join(format!("{tag}-staging"))
                .display()
                .to_string(),
        })
        .await
        .unwrap();
    }
}
