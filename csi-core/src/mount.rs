//! Mounting behind a narrow trait: mountinfo parsing, bind mounts,
//! read-only remounts, idempotent unmounts and dead-mount detection.

use crate::exec::{Command, Exec};
use crate::{Error, Result, invalid};
use async_trait::async_trait;
use nix::mount::{MntFlags, MsFlags};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// One line of /proc/self/mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    /// Mount id.
    pub id: u32,
    /// Parent mount id.
    pub parent: u32,
    /// `major:minor` of the device.
    pub dev: String,
    /// Root of the mount within its filesystem.
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options (ro, nosuid, ...).
    pub options: Vec<String>,
    /// Filesystem type.
    pub fs_type: String,
    /// Mount source (device, server:/export, ...).
    pub source: String,
    /// Per-superblock options.
    pub super_options: Vec<String>,
}

impl MountInfo {
    /// True when mounted read-only.
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

/// Undoes the kernel's octal escapes (`\040` space, `\011` tab, `\012`, `\134`).
pub fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of /proc/<pid>/mountinfo; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountInfo> {
    let (head, tail) = line.split_once(" - ")?;
    let mut h = head.split(' ');
    let id = h.next()?.parse().ok()?;
    let parent = h.next()?.parse().ok()?;
    let dev = h.next()?.to_owned();
    let root = PathBuf::from(unescape(h.next()?));
    let mount_point = PathBuf::from(unescape(h.next()?));
    let options = h.next()?.split(',').map(str::to_owned).collect();
    let mut t = tail.split(' ');
    let fs_type = unescape(t.next()?);
    let source = unescape(t.next()?);
    let super_options = t
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::to_owned)
        .collect();
    Some(MountInfo {
        id,
        parent,
        dev,
        root,
        mount_point,
        options,
        fs_type,
        source,
        super_options,
    })
}

/// The mount at `path` and every other view of it: mounts of the same
/// filesystem and root (a container started after the mount copies it
/// into its private binds, where unmounting the original does not reach).
/// Empty when nothing is mounted at `path`.
pub fn views(mounts: &[MountInfo], path: &Path) -> Vec<PathBuf> {
    let Some(top) = mounts.iter().rev().find(|m| m.mount_point == path) else {
        return Vec::new();
    };
    let mut found = vec![path.to_path_buf()];
    found.extend(
        mounts
            .iter()
            .filter(|m| m.dev == top.dev && m.root == top.root && m.fs_type == top.fs_type)
            .map(|m| m.mount_point.clone())
            .filter(|p| p != path),
    );
    found.dedup();
    found
}

/// Every mount through which the file or directory `path` is visible as
/// the root of that mount: `path` itself when it is a mount point, and each
/// bind mount of it (bind mounts of those included). `path` must be
/// canonical. This is the kernel's view, so it survives plugin restarts.
pub fn exposures(mounts: &[MountInfo], path: &Path) -> Vec<MountInfo> {
    // The topmost mount holding `path`: the last of the deepest mount points.
    let Some(holder) = mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())
    else {
        return vec![];
    };
    let rel = path
        .strip_prefix(&holder.mount_point)
        .unwrap_or(Path::new(""));
    let root = if rel.as_os_str().is_empty() {
        holder.root.clone()
    } else {
        holder.root.join(rel)
    };
    mounts
        .iter()
        .filter(|m| m.dev == holder.dev && m.root == root)
        .cloned()
        .collect()
}

/// What is at a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MountState {
    /// Nothing is mounted there.
    NotMounted,
    /// A live mount (the topmost one when several are stacked).
    Mounted(MountInfo),
    /// A mount whose filesystem no longer answers (ENOTCONN, ESTALE, EIO).
    Dead(MountInfo),
}

/// Mount operations a driver may perform on the node.
#[async_trait]
pub trait Mounter: Send + Sync {
    /// Mounts `source` of type `fs_type` on `target` with `options` via mount(8).
    async fn mount(
        &self,
        source: &str,
        target: &Path,
        fs_type: &str,
        options: &[String],
    ) -> Result<()>;
    /// Bind-mounts `source` on `target`, then applies `readonly` and VFS `options`.
    async fn bind(
        &self,
        source: &Path,
        target: &Path,
        readonly: bool,
        options: &[String],
    ) -> Result<()>;
    /// Unmounts `target`; success when nothing is mounted there.
    async fn unmount(&self, target: &Path) -> Result<()>;
    /// Unmounts a network mount whose server may be gone, never touching its
    /// files: a plain unmount within `grace`, then a forced one (MNT_FORCE
    /// aborts pending requests), then a lazy one (MNT_DETACH). Success when
    /// nothing is mounted there.
    async fn unmount_network(&self, target: &Path, grace: Duration) -> Result<()>;
    /// The mount state of `target`.
    async fn state(&self, target: &Path) -> Result<MountState>;
    /// Every mount of this mount namespace, shared: an unchanged table is
    /// not copied per call (a node may hold hundreds of mounts).
    async fn mounts(&self) -> Result<Arc<[MountInfo]>>;
}

/// Parses bind-mount options into mount flags; unknown ones are InvalidArgument.
pub fn vfs_flags(options: &[String]) -> Result<MsFlags> {
    let mut f = MsFlags::empty();
    for o in options.iter().flat_map(|o| o.split(',')).map(str::trim) {
        match o {
            "" | "rw" | "defaults" | "bind" | "rbind" | "suid" | "dev" | "exec" | "async"
            | "relatime" => {}
            "ro" => f |= MsFlags::MS_RDONLY,
            "nosuid" => f |= MsFlags::MS_NOSUID,
            "nodev" => f |= MsFlags::MS_NODEV,
            "noexec" => f |= MsFlags::MS_NOEXEC,
            "noatime" => f |= MsFlags::MS_NOATIME,
            "nodiratime" => f |= MsFlags::MS_NODIRATIME,
            "strictatime" => f |= MsFlags::MS_STRICTATIME,
            "sync" => f |= MsFlags::MS_SYNCHRONOUS,
            "dirsync" => f |= MsFlags::MS_DIRSYNC,
            other => {
                return Err(invalid!(
                    "mount option {other:?} cannot be applied to a bind mount; allowed: ro, rw, nosuid, nodev, noexec, noatime, nodiratime, relatime, strictatime, sync, dirsync"
                ));
            }
        }
    }
    Ok(f)
}

/// The real mounter: syscalls for bind/unmount, mount(8) for filesystems.
pub struct SystemMounter {
    exec: Arc<dyn Exec>,
    timeout: Duration,
}

impl SystemMounter {
    /// Uses `exec` for mount(8); each operation is bounded by `timeout`.
    pub fn new(exec: Arc<dyn Exec>, timeout: Duration) -> Self {
        Self { exec, timeout }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        what: String,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        crate::fsutil::blocking(what, self.timeout, f).await
    }
}

/// The parsed mount table, its open mountinfo, and whether a poll has seen a
/// change not yet read.
struct MountCache {
    file: std::fs::File,
    mounts: Arc<[MountInfo]>,
    stale: bool,
}

static MOUNTS: std::sync::Mutex<Option<MountCache>> = std::sync::Mutex::new(None);

/// Whether the table changed since it was read: poll() on an open
/// mountinfo reports POLLPRI once after any mount or unmount in the
/// namespace (propagated ones included). It never blocks or touches a
/// mounted filesystem.
fn table_changed(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(
        file.as_fd(),
        nix::poll::PollFlags::POLLPRI,
    )];
    Ok(nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO)? > 0)
}

/// The cached table if it is known unchanged, found without blocking (so
/// on the async runtime, with no trip to the blocking pool).
fn unchanged_mounts() -> Option<Arc<[MountInfo]>> {
    let mut cache = MOUNTS.try_lock().ok()?;
    let c = cache.as_mut().filter(|c| !c.stale)?;
    match table_changed(&c.file) {
        Ok(false) => Some(c.mounts.clone()),
        _ => {
            c.stale = true;
            None
        }
    }
}

/// The mount table, parsed again only when it changed, so an unchanged
/// table costs one syscall.
fn read_mounts() -> Result<Arc<[MountInfo]>> {
    use std::io::{Read, Seek};
    let io = |e| Error::io("reading /proc/self/mountinfo", e);
    let mut cache = MOUNTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(MountCache {
        file,
        mounts,
        stale,
    }) = cache.as_mut()
    {
        if !*stale && !table_changed(file).map_err(io)? {
            return Ok(mounts.clone());
        }
        let mut text = String::new();
        file.rewind().map_err(io)?;
        file.read_to_string(&mut text).map_err(io)?;
        *mounts = parse_mountinfo(&text).into();
        *stale = false;
        return Ok(mounts.clone());
    }
    let mut file = std::fs::File::open("/proc/self/mountinfo").map_err(io)?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(io)?;
    let mounts: Arc<[MountInfo]> = parse_mountinfo(&text).into();
    *cache = Some(MountCache {
        file,
        mounts: mounts.clone(),
        stale: false,
    });
    Ok(mounts)
}

fn state_of(target: &Path) -> Result<MountState> {
    let top = read_mounts()?
        .iter()
        .rev()
        .find(|m| m.mount_point == target)
        .cloned();
    let Some(info) = top else {
        return Ok(MountState::NotMounted);
    };
    match std::fs::metadata(target) {
        Ok(_) => Ok(MountState::Mounted(info)),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOTCONN | libc::ESTALE | libc::EIO)
            ) =>
        {
            Ok(MountState::Dead(info))
        }
        Err(e) => Err(Error::io(format!("stat {}", target.display()), e)),
    }
}

#[async_trait]
impl Mounter for SystemMounter {
    async fn mount(
        &self,
        source: &str,
        target: &Path,
        fs_type: &str,
        options: &[String],
    ) -> Result<()> {
        let mut args: Vec<std::ffi::OsString> = vec!["-t".into(), fs_type.into()];
        if !options.is_empty() {
            args.push("-o".into());
            args.push(options.join(",").into());
        }
        args.push(source.into());
        args.push(target.into());
        self.exec
            .run(&Command::new("mount", args).timeout(self.timeout))
            .await
            .map(drop)
    }

    async fn bind(
        &self,
        source: &Path,
        target: &Path,
        readonly: bool,
        options: &[String],
    ) -> Result<()> {
        let mut flags = vfs_flags(options)?;
        if readonly {
            flags |= MsFlags::MS_RDONLY;
        }
        let (s, t) = (source.to_path_buf(), target.to_path_buf());
        let what = format!("bind mount {} on {}", s.display(), t.display());
        self.blocking(what.clone(), move || {
            let err = |e: nix::Error| Error::io(what.clone(), e.into());
            nix::mount::mount(Some(&s), &t, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .map_err(err)?;
            if !flags.is_empty() {
                let remount = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | flags;
                if let Err(e) =
                    nix::mount::mount(None::<&str>, &t, None::<&str>, remount, None::<&str>)
                {
                    let _ = nix::mount::umount2(&t, MntFlags::empty());
                    return Err(err(e));
                }
            }
            Ok(())
        })
        .await
    }

    async fn unmount(&self, target: &Path) -> Result<()> {
        let t = target.to_path_buf();
        self.blocking(format!("unmount {}", t.display()), move || {
            loop {
                match state_of(&t)? {
                    MountState::NotMounted => return Ok(()),
                    MountState::Mounted(_) => nix::mount::umount2(&t, MntFlags::empty()),
                    MountState::Dead(_) => nix::mount::umount2(&t, MntFlags::MNT_DETACH),
                }
                .map_err(|e| Error::io(format!("unmount {}", t.display()), e.into()))?;
            }
        })
        .await
    }

    async fn unmount_network(&self, target: &Path, grace: Duration) -> Result<()> {
        let mounted =
            |t: &Path| -> Result<bool> { Ok(read_mounts()?.iter().any(|m| m.mount_point == t)) };
        for flags in [MntFlags::empty(), MntFlags::MNT_FORCE, MntFlags::MNT_DETACH] {
            let t = target.to_path_buf();
            let what = format!("unmount {} ({flags:?})", t.display());
            let r = crate::fsutil::blocking(what.clone(), grace, move || {
                while mounted(&t)? {
                    nix::mount::umount2(&t, flags)
                        .map_err(|e| Error::io(what.clone(), e.into()))?;
                }
                Ok(())
            })
            .await;
            match r {
                Ok(()) => return Ok(()),
                Err(e) if flags == MntFlags::MNT_DETACH => return Err(e),
                Err(e) => tracing::warn!(error = %e, "unmount did not finish; trying harder"),
            }
        }
        Ok(())
    }

    async fn state(&self, target: &Path) -> Result<MountState> {
        let t = target.to_path_buf();
        self.blocking(format!("mount state of {}", t.display()), move || {
            state_of(&t)
        })
        .await
    }

    async fn mounts(&self) -> Result<Arc<[MountInfo]>> {
        if let Some(m) = unchanged_mounts() {
            return Ok(m);
        }
        self.blocking("reading mountinfo".into(), read_mounts).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes_and_optional_fields() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 22 0:50 / /var/lib/kubelet/pods/x/vol ro,relatime shared:7 - fuse.juicefs JuiceFS:my\\134vol rw\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, Path::new("/mnt/with space"));
        assert_eq!(m[0].root, Path::new("/mnt1"));
        assert_eq!(m[0].fs_type, "ext3");
        assert_eq!(m[0].source, "/dev/root");
        assert!(!m[0].read_only());
        assert_eq!(m[1].source, "JuiceFS:my\\vol");
        assert!(m[1].read_only());
        assert_eq!(unescape("tab\\011x\\012"), "tab\tx\n");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn exposures_follow_binds_of_a_path() {
        let text = "20 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                    30 20 8:1 /base/volumes/v1 /stage/v1 rw - ext4 /dev/sda1 rw\n\
                    31 20 8:1 /base/volumes/v1 /pods/a rw - ext4 /dev/sda1 rw\n\
                    32 20 8:1 /base/volumes/v2 /stage/v2 rw - ext4 /dev/sda1 rw\n\
                    33 20 0:5 /loop3 /pods/blk rw - devtmpfs udev rw\n\
                    34 20 0:5 / /dev rw - devtmpfs udev rw\n";
        let m = parse_mountinfo(text);
        let points = |p: &str| -> Vec<PathBuf> {
            exposures(&m, Path::new(p))
                .into_iter()
                .map(|m| m.mount_point)
                .collect()
        };
        assert_eq!(
            points("/base/volumes/v1"),
            [Path::new("/stage/v1"), Path::new("/pods/a")]
        );
        assert_eq!(
            points("/stage/v1"),
            [Path::new("/stage/v1"), Path::new("/pods/a")]
        );
        assert_eq!(points("/base/volumes/v3"), Vec::<PathBuf>::new());
        assert_eq!(points("/dev/loop3"), [Path::new("/pods/blk")]);
        assert_eq!(points("/"), [Path::new("/")]);
    }

    #[test]
    fn views_are_mounts_of_the_same_filesystem_and_root() {
        let text = "20 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
                    30 20 0:9 / /var/lib/kubelet/plugins/d/state/fuse/v1 rw shared:1 - fuse.rbd-fuse rbd-fuse rw\n\
                    31 20 0:9 / /csi/state/fuse/v1 rw - fuse.rbd-fuse rbd-fuse rw\n\
                    32 20 0:10 / /other/state/fuse/v1 rw - fuse.rbd-fuse rbd-fuse rw\n\
                    33 20 0:9 /sub /pods/a rw - fuse.rbd-fuse rbd-fuse rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(
            views(&m, Path::new("/csi/state/fuse/v1")),
            [
                PathBuf::from("/csi/state/fuse/v1"),
                PathBuf::from("/var/lib/kubelet/plugins/d/state/fuse/v1"),
            ]
        );
        assert!(views(&m, Path::new("/nothing")).is_empty());
    }

    #[test]
    fn bind_options_are_checked() {
        assert!(
            vfs_flags(&["ro,noexec".into()])
                .unwrap()
                .contains(MsFlags::MS_RDONLY | MsFlags::MS_NOEXEC)
        );
        assert!(matches!(
            vfs_flags(&["vers=4".into()]),
            Err(Error::InvalidArgument(_))
        ));
    }
}
