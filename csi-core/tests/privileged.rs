//! The real Mounter and BlockDevices, exercised as root on this machine.

use csi_core::Error;
use csi_core::blockdev::{BlockDevices, LoopDevices, SystemBlockDevices, SystemLoopDevices};
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
async fn the_mount_table_shows_every_change_at_once() {
    root();
    let d = tempfile::tempdir().unwrap();
    let m = mounter();
    let listed =
        |mounts: &[csi_core::mount::MountInfo]| mounts.iter().any(|i| i.mount_point == d.path());
    let run = |args: &[&str]| {
        let ok = std::process::Command::new(args[0])
            .args(&args[1..])
            .status()
            .unwrap()
            .success();
        assert!(ok, "{args:?}");
    };
    let dir = d.path().to_str().unwrap();
    // Mounts by another process, read right after, over and over: the table
    // is cached between changes, never stale after one.
    for _ in 0..20 {
        assert!(!listed(&m.mounts().await.unwrap()));
        run(&["mount", "-t", "tmpfs", "none", dir]);
        assert!(listed(&m.mounts().await.unwrap()));
        assert!(
            listed(&m.mounts().await.unwrap()),
            "unchanged, from the cache"
        );
        run(&["umount", dir]);
        assert!(!listed(&m.mounts().await.unwrap()));
    }
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

/// Mounts a FUSE filesystem on `target` that no daemon serves; the
/// returned device keeps its connection open until dropped.
fn fuse_mount(target: &Path) -> std::fs::File {
    std::fs::create_dir_all(target).unwrap();
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
        target,
        Some("fuse.rcsi-test"),
        nix::mount::MsFlags::empty(),
        Some(opts.as_str()),
    )
    .unwrap();
    fuse
}

#[tokio::test]
async fn dead_fuse_mount_is_detected_and_removed() {
    root();
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("fuse");
    // A FUSE mount whose daemon is gone: mount with an fd, then close the fd.
    let fuse = fuse_mount(&target);
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

/// A FUSE mount whose connection stays open while nobody answers it (the
/// test holds the device and never replies): a stat hangs. While a live
/// process names the mountpoint, the probe waits and then times out; once
/// that process is gone (a zombie counts as gone), the probe aborts the
/// connection and the mount reads as dead, so it can be removed.
#[tokio::test]
async fn hung_fuse_mount_without_a_daemon_is_aborted() {
    root();
    let d = tempfile::tempdir().unwrap();
    let target = d.path().join("fuse");
    let fuse = fuse_mount(&target);
    let m = mounter();
    let info = m
        .mounts()
        .await
        .unwrap()
        .iter()
        .find(|i| i.mount_point == target)
        .cloned()
        .unwrap();

    let mut daemon = std::process::Command::new("sh")
        .args(["-c", "sleep 600; :", "rcsi-serve"])
        .arg(&target)
        .spawn()
        .unwrap();
    let pid = daemon.id() as i32;
    let wait = std::time::Instant::now();
    while !csi_core::daemon::naming(target.as_os_str()).contains(&pid) {
        assert!(wait.elapsed() < Duration::from_secs(5), "daemon not seen");
        std::thread::sleep(Duration::from_millis(10));
    }
    let e = csi_core::fuse::probe(&target, &info.dev, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::DeadlineExceeded(_)), "{e}");

    daemon.kill().unwrap();
    let wait = std::time::Instant::now();
    while !csi_core::daemon::dying(pid) {
        assert!(wait.elapsed() < Duration::from_secs(5), "not a zombie");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(csi_core::daemon::naming(target.as_os_str()).is_empty());
    let dead = csi_core::fuse::probe(&target, &info.dev, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(dead.is_some_and(|r| r.contains("aborted")));
    let e = std::fs::metadata(&target).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    daemon.wait().unwrap();
    drop(fuse);
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
    let loops = SystemLoopDevices::new(rec.clone());

    let dev = loops.attach_loop(&img).await.unwrap();
    assert_eq!(
        loops.attach_loop(&img).await.unwrap(),
        dev,
        "second attach must reuse the device"
    );
    assert_eq!(
        loops.find_loop(&img).await.unwrap().as_deref(),
        Some(dev.as_path())
    );
    assert_eq!(bd.size(&dev).await.unwrap(), 64 << 20);
    assert_eq!(bd.fs_type(&dev).await.unwrap(), None);
    // Found by device and inode, not by name: another name of the same file
    // (as a restarted container sees it in its own mount namespace) finds
    // the device, and a different file of the same name does not.
    let other_name = d.path().join("same-inode.img");
    std::fs::hard_link(&img, &other_name).unwrap();
    assert_eq!(
        loops.find_loop(&other_name).await.unwrap().as_deref(),
        Some(dev.as_path())
    );
    let copy = d.path().join("copy.img");
    std::fs::copy(&img, &copy).unwrap();
    assert_eq!(loops.find_loop(&copy).await.unwrap(), None);

    assert_eq!(bd.mkfs_if_blank(&dev, "ext4", &[]).await.unwrap(), "ext4");
    assert_eq!(
        bd.mkfs_if_blank(&dev, "xfs", &[]).await.unwrap(),
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
    loops.refresh_loop(&dev).await.unwrap();
    assert_eq!(bd.size(&dev).await.unwrap(), 96 << 20);
    assert_eq!(bd.fs_size(&dev, "ext4").await.unwrap(), Some(64 << 20));
    bd.fsck(&dev, "ext4").await.unwrap();
    bd.grow_fs(&dev, "ext4", None).await.unwrap();
    assert_eq!(bd.fs_size(&dev, "ext4").await.unwrap(), Some(96 << 20));
    assert_eq!(bd.fs_size(&dev, "xfs").await.unwrap(), None);

    loops.detach_loop(&dev).await.unwrap();
    loops.detach_loop(&dev).await.unwrap();
    assert_eq!(loops.find_loop(&img).await.unwrap(), None);
    assert!(
        !Path::new("/sys/block")
            .join(dev.file_name().unwrap())
            .join("loop")
            .exists()
    );
}

#[tokio::test]
async fn loop_as_a_device_mapper() {
    use csi_core::blockdev::{DeviceMapper, Mapping};
    root();
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("mapped.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let exec: Arc<dyn Exec> = Arc::new(SystemExec);
    let loops = SystemLoopDevices::new(exec.clone());
    let bd = SystemBlockDevices::new(exec);
    let m = Mapping {
        source: img.to_string_lossy().into_owned(),
        ..Default::default()
    };
    assert_eq!(loops.name(), "loop");
    assert_eq!(loops.find(&m).await.unwrap(), None);
    let (dev, new) = loops.map(&m).await.unwrap();
    assert!(new, "the first map attaches");
    assert_eq!(loops.map(&m).await.unwrap(), (dev.clone(), false));
    assert_eq!(loops.find(&m).await.unwrap(), Some(dev.clone()));
    assert!(loops.alive(&m).await.unwrap());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    loops.refresh(&m, &dev).await.unwrap();
    assert_eq!(bd.size(&dev).await.unwrap(), 48 << 20);
    loops.unmap(&m).await.unwrap();
    loops.unmap(&m).await.unwrap();
    assert_eq!(loops.find(&m).await.unwrap(), None);
    std::fs::remove_file(&img).unwrap();
    assert!(
        !loops.alive(&m).await.unwrap(),
        "a missing file is not served"
    );
}

/// Fills `dir`'s filesystem with one file until ENOSPC; returns its path.
fn fill_up(dir: &Path) -> std::path::PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let block = vec![0xa5u8; 64 << 10];
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

/// A small tmpfs, unmounted on drop (also when an assertion fails).
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

async fn names(j: &csi_core::journal::FileJournal) -> Vec<String> {
    use csi_core::journal::NameJournal;
    j.list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect()
}

#[tokio::test]
async fn journal_on_a_full_disk_keeps_every_acknowledged_record() {
    use csi_core::journal::{FileJournal, NameJournal, Reservation};
    root();
    let d = tempfile::tempdir().unwrap();
    let fs = Tmpfs(d.path().join("fs"));
    std::fs::create_dir(&fs.0).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &fs.0,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=8m"),
    )
    .unwrap();
    let res = |name: &str, pad: usize| Reservation {
        name: name.into(),
        id: format!("id-{name}"),
        attrs: [("pad".to_owned(), "x".repeat(pad))].into(),
    };
    let dir = fs.0.join("journal");
    let j = FileJournal::open(&dir).unwrap();
    j.reserve(res("before", 10)).await.unwrap();
    let filler = fill_up(&fs.0);
    // Preallocated journal space: records needing new pages (64 KiB here)
    // still land on a full disk.
    j.reserve(res("full-small", 64 << 10)).await.unwrap();
    // A record larger than the reserve fails cleanly with ENOSPC...
    let e = j.reserve(res("full-big", 6 << 20)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    // ...and leaves no torn bytes: the next record is fine.
    j.reserve(res("after-failure", 64 << 10)).await.unwrap();
    drop(j);
    // Reopening on the full disk cannot compact, but loses nothing.
    let j = FileJournal::open(&dir).unwrap();
    assert_eq!(names(&j).await, ["after-failure", "before", "full-small"]);
    std::fs::remove_file(filler).unwrap();
    j.reserve(res("full-big", 6 << 20)).await.unwrap();
    drop(j);
    let j = FileJournal::open(&dir).unwrap();
    assert_eq!(
        names(&j).await,
        ["after-failure", "before", "full-big", "full-small"]
    );
}

/// A daemon started with a cgroup escape joins the named cgroup in every
/// hierarchy (v1 here, with a cpuset that must be filled in), so stopping
/// the caller's cgroup leaves it running.
#[tokio::test]
async fn daemons_escape_into_their_own_cgroup_in_every_hierarchy() {
    use csi_core::daemon::{CgroupEscape, Spawner, SystemSpawner};
    root();
    let name = format!("rcsi-test-{}", std::process::id());
    let spawner = SystemSpawner {
        escape: Some(CgroupEscape {
            root: "/sys/fs/cgroup".into(),
            name: name.clone(),
        }),
    };
    let d = tempfile::tempdir().unwrap();
    let cmd = Command::new("sleep", ["30"]);
    let daemon = spawner.spawn(&cmd, &d.path().join("log")).unwrap();
    let groups = std::fs::read_to_string(format!("/proc/{}/cgroup", daemon.pid)).unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let mut exited = daemon.exited.clone();
    exited.wait_for(Option::is_some).await.unwrap();
    for line in groups.lines() {
        assert!(line.ends_with(&format!(":/{name}")), "{line} in\n{groups}");
    }
    for e in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let _ = std::fs::remove_dir(e.path().join(&name));
    }
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(&name));
}
