//! A base filesystem filled by a volume's own data (directory sizes are not
//! enforced on this host): creates fail with ResourceExhausted, a delete
//! still works, every earlier volume survives a crash and restart, and
//! creates work again once space is freed.

mod common;

use common::{Driver, cap, create_req, mount};
use csi_core::csi;
use std::io::Write;
use std::path::Path;
use tonic::Code;

fn fill_up(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let block = vec![0x5au8; 256 << 10];
    loop {
        match f.write_all(&block) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", p.display()),
        }
    }
    let _ = f.sync_all();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_base_filesystem_loses_nothing() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts: run as root"
    );
    let fs = rcsi_tests::LoopFs::new("ext4", 64 << 20, &["-q", "-F", "-m", "0"], "").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut driver, mut ctl, mut node) = Driver::start(dir.path(), &fs.path()).await;
    let c = cap(false, "");
    let mut made = Vec::new();
    for i in 0..3 {
        let v = ctl
            .create_volume(create_req(&format!("v{i}"), 1 << 20, &[], c.clone(), None))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        made.push(v);
    }
    let target = mount(&mut node, &made[0], c.clone(), dir.path(), "v0").await;
    let filler = fill_up(&target);

    let full = ctl
        .create_volume(create_req("late", 1 << 20, &[], c.clone(), None))
        .await
        .unwrap_err();
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    // Deleting is how an operator frees space: it must work on a full disk.
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: made[2].volume_id.clone(),
        ..Default::default()
    })
    .await
    .unwrap();

    let mut want = vec![made[0].volume_id.clone(), made[1].volume_id.clone()];
    want.sort();
    assert_eq!(common::volume_ids(&mut ctl).await, want);
    let (mut ctl, _node) = driver.crash_and_restart().await;
    assert_eq!(
        common::volume_ids(&mut ctl).await,
        want,
        "volumes after a restart on the full disk:\n{}",
        driver.log_text()
    );

    std::fs::remove_file(filler).unwrap();
    let late = ctl
        .create_volume(create_req("late", 1 << 20, &[], c.clone(), None))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(common::volume_ids(&mut ctl).await.len(), 3, "{late:?}");
    // The published volume's mount is still the same volume.
    std::fs::write(target.join("after"), b"ok").unwrap();
    drop(ctl);
    let _ = rcsi_tests::harness::release_under(dir.path());
}
