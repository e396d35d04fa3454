//! The real Mounter and BlockDevices, exercised as root on this machine.

use csi_core::Error;
use csi_core::blockdev::{BlockDevices, SystemBlockDevices};
use csi_core::exec::{Command, Exec, Output, SystemExec};
use csi_core::mount::{MountState, Mounter, SystemMounter};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn root() -> bool {
    let ok = nix::unistd::geteuid().is_root();
    assert!(
        ok,
        "privileged tests must run as root (mounts and loop devices)"
    );
    ok
}

fn mounter() -> SystemMounter {
    SystemMounter::new(Arc::new(SystemExec), Duration::from_secs(30))
}

#[tokio::test]
async fn bind_readonly_and_idempotent_unmount_with_escaped_paths() {
    root();
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("source dir");
    let dst = d.path().join("target\twith tab");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::write(src.join("f"), b"data").unwrap();
    let m = mounter();
    assert_eq!(m.state(&dst).await.unwrap(), MountState::NotMounted);

    m.bind(&src, &dst, true, &["nosuid".into()]).await.unwrap();
    let MountState::Mounted(info) = m.state(&dst).await.unwrap() else {
        panic!("not mounted")
    };
    assert!(info.read_only(), "{info:?}");
    assert!(info.options.iter().any(|o| o == "nosuid"), "{info:?}");
    assert_eq!(std::fs::read(dst.join("f")).unwrap(), b"data");
    let err = std::fs::write(dst.join("g"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));

    m.unmount(&dst).await.unwrap();
    m.unmount(&dst).await.unwrap();
    assert_eq!(m.state(&dst).await.unwrap(), MountState::NotMounted);
    m.unmount(&d.path().join("never-existed")).await.unwrap();
}

#[tokio::test]
async fn bad_bind_options_mount_nothing() {
    root();
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = (d.path().join("s"), d.path().join("t"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    let m = mounter();
    let e = m
        .bind(&src, &dst, false, &["vers=4.1".into()])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert_eq!(m.state(&dst).await.unwrap(), MountState::NotMounted);
}

#[tokio::test]
async fn dead_fuse_mount_is_detected_and_removed() {
    root();
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("fuse");
    std::fs::create_dir_all(&target).unwrap();
    // A FUSE mount whose daemon is gone: mount with an fd, then close the fd.
    let fuse = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .unwrap();
    let opts = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0",
        fuse.as_raw_fd()
    );
    nix::mount::mount(
        Some("rcsi-test"),
        &target,
        Some("fuse.rcsi-test"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .unwrap();
    drop(fuse);
    let m = mounter();
    let state = m.state(&target).await.unwrap();
    assert!(
        matches!(state, MountState::Dead(ref i) if i.fs_type == "fuse.rcsi-test"),
        "{state:?}"
    );
    m.unmount(&target).await.unwrap();
    assert_eq!(m.state(&target).await.unwrap(), MountState::NotMounted);
}

/// Delegates to the real programs and records which ones ran.
#[derive(Default)]
struct Recording(Mutex<Vec<String>>);

#[async_trait::async_trait]
impl Exec for Recording {
    async fn output(&self, cmd: &Command) -> csi_core::Result<Output> {
        self.0.lock().unwrap().push(cmd.display());
        SystemExec.output(cmd).await
    }
}

#[tokio::test]
async fn loop_attach_mkfs_once_grow_and_detach() {
    root();
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let rec = Arc::new(Recording::default());
    let bd = SystemBlockDevices::new(rec.clone());

    let dev = bd.attach_loop(&img).await.unwrap();
    assert_eq!(
        bd.attach_loop(&img).await.unwrap(),
        dev,
        "second attach must reuse the device"
    );
    assert_eq!(
        bd.find_loop(&img).await.unwrap().as_deref(),
        Some(dev.as_path())
    );
    assert_eq!(bd.size(&dev).await.unwrap(), 64 << 20);
    assert_eq!(bd.fs_type(&dev).await.unwrap(), None);

    assert_eq!(bd.mkfs_if_blank(&dev, "ext4").await.unwrap(), "ext4");
    assert_eq!(
        bd.mkfs_if_blank(&dev, "xfs").await.unwrap(),
        "ext4",
        "an existing filesystem is kept"
    );
    let mkfs_runs = rec
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.starts_with("mkfs."))
        .count();
    assert_eq!(mkfs_runs, 1, "mkfs must run only on a blank device");

    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(96 << 20)
        .unwrap();
    bd.refresh_loop(&dev).await.unwrap();
    assert_eq!(bd.size(&dev).await.unwrap(), 96 << 20);
    bd.grow_fs(&dev, "ext4", None).await.unwrap();

    bd.detach_loop(&dev).await.unwrap();
    bd.detach_loop(&dev).await.unwrap();
    assert_eq!(bd.find_loop(&img).await.unwrap(), None);
    assert!(
        !Path::new("/sys/block")
            .join(dev.file_name().unwrap())
            .join("loop")
            .exists()
    );
}
