//! Block devices behind narrow traits: [`DeviceMapper`] (how a volume's
//! source becomes a device: loop here; krbd, rbd-nbd and rbd-fuse+loop in
//! the Ceph driver), [`LoopDevices`] (loop devices as such) and
//! [`BlockDevices`] (what is done with any device: blkid, mkfs only when
//! blank, fsck, growth).

use crate::exec::{Command, Exec};
use crate::{Error, IoContext, Result};
use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Files attached as block devices on the node.
#[async_trait]
pub trait LoopDevices: Send + Sync {
    /// Attaches `file` to a loop device, reusing an existing attachment.
    async fn attach_loop(&self, file: &Path) -> Result<PathBuf>;
    /// The loop device backed by `file`, if any.
    async fn find_loop(&self, file: &Path) -> Result<Option<PathBuf>>;
    /// Detaches a loop device; success when it is already gone.
    async fn detach_loop(&self, dev: &Path) -> Result<()>;
    /// Makes a loop device pick up its backing file's new size.
    async fn refresh_loop(&self, dev: &Path) -> Result<()>;
}

/// What a [`DeviceMapper`] turns into a block device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mapping {
    /// What is mapped: a file (loop) or an image spec (`pool[/namespace]/image`).
    pub source: String,
    /// The mapping's stable name (a volume id): mappers that tag their
    /// devices or keep helper state use it, so a restarted plugin finds them.
    pub key: String,
    /// Mapper options, comma-separated (a StorageClass's `mapOptions`).
    pub options: Option<String>,
    /// Arguments naming the cluster and the client's credentials (paths
    /// of a conf and keyring, never a secret itself).
    pub client: Vec<std::ffi::OsString>,
    /// The device recorded at the last map, for mappers that cannot tell
    /// theirs otherwise once its helper died.
    pub device: Option<PathBuf>,
}

/// One way a volume becomes a block device on this node.
#[async_trait]
pub trait DeviceMapper: Send + Sync {
    /// Name in logs and errors (`loop`, `krbd`, `rbd-nbd`, `rbd-fuse`).
    fn name(&self) -> &'static str;
    /// Maps `m`, reusing a live mapping and serving one whose helper died
    /// again; returns the device and whether a helper or mapping was started.
    async fn map(&self, m: &Mapping) -> Result<(PathBuf, bool)>;
    /// The device mapping `m`, also when its helper died; None when unmapped.
    async fn find(&self, m: &Mapping) -> Result<Option<PathBuf>>;
    /// Whether I/O on the mapping is served (false: its helper is gone).
    async fn alive(&self, m: &Mapping) -> Result<bool>;
    /// Removes the mapping of `m` (found as [`DeviceMapper::find`] finds
    /// it) and whatever serves it; success when it is gone already.
    async fn unmap(&self, m: &Mapping) -> Result<()>;
    /// Makes `dev` show the source's current size (after a resize).
    async fn refresh(&self, m: &Mapping, dev: &Path) -> Result<()>;
}

/// What a driver does with any block device, however it was attached.
#[async_trait]
pub trait BlockDevices: Send + Sync {
    /// Filesystem type found on `dev` by blkid, None when blank.
    async fn fs_type(&self, dev: &Path) -> Result<Option<String>>;
    /// Creates `fs_type` on `dev` (with extra `args`) unless blkid finds a
    /// filesystem; returns the type in use.
    async fn mkfs_if_blank(&self, dev: &Path, fs_type: &str, args: &[String]) -> Result<String>;
    /// Grows the filesystem on `dev` (mounted at `mount_point` when given) to fill it.
    async fn grow_fs(&self, dev: &Path, fs_type: &str, mount_point: Option<&Path>) -> Result<()>;
    /// Size of a block device in bytes.
    async fn size(&self, dev: &Path) -> Result<u64>;
    /// Size in bytes of the `fs_type` filesystem on `dev`, when the tools
    /// can tell it unmounted (ext2/3/4); None otherwise.
    async fn fs_size(&self, dev: &Path, fs_type: &str) -> Result<Option<u64>>;
    /// Checks an unmounted filesystem and repairs what is safe to repair
    /// (before an offline grow); an error when problems remain.
    async fn fsck(&self, dev: &Path, fs_type: &str) -> Result<()>;
}

/// Filesystems rcsi can create.
pub const SUPPORTED_FS: &[&str] = &["ext4", "xfs", "ext3", "btrfs"];

/// Real block devices: blkid, mkfs, fsck and the grow tools.
pub struct SystemBlockDevices {
    exec: Arc<dyn Exec>,
}

impl SystemBlockDevices {
    /// Runs tools through `exec`.
    pub fn new(exec: Arc<dyn Exec>) -> Self {
        Self { exec }
    }
}

/// Real loop devices: losetup and /sys/block.
pub struct SystemLoopDevices {
    exec: Arc<dyn Exec>,
}

impl SystemLoopDevices {
    /// Runs losetup through `exec`.
    pub fn new(exec: Arc<dyn Exec>) -> Self {
        Self { exec }
    }
}

/// `struct loop_info64` of linux/loop.h.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

nix::ioctl_read_bad!(
    /// LOOP_GET_STATUS64: what a loop device is attached to.
    loop_get_status64,
    0x4C05,
    LoopInfo64
);

/// Device and inode of the file behind a loop device (None when unbound).
/// Unlike `backing_file`, which names the file as the mount namespace that
/// attached it saw it, these identify it from any namespace: a restarted
/// node plugin container still finds its devices.
fn loop_backing_id(dev: &Path) -> std::io::Result<Option<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(dev)?;
    // SAFETY: the zeroed struct is valid for every field (plain integers
    // and byte arrays); the ioctl fills it.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 writes one loop_info64 into `info`, which
    // lives for the call; the fd is open.
    match unsafe { loop_get_status64(f.as_raw_fd(), &mut info) } {
        Ok(_) => Ok(Some((info.lo_device, info.lo_inode))),
        Err(nix::errno::Errno::ENXIO) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// One attached loop device.
struct Attached {
    dev: PathBuf,
    /// The backing file as the attaching namespace named it.
    path: PathBuf,
    /// Device and inode of the backing file, when the kernel told us.
    id: Option<(u64, u64)>,
}

/// Every attached loop device and its backing file. A read error is an
/// error, never "no loop devices": callers decide from this whether data is
/// still in use.
fn attached_loops() -> Result<Vec<Attached>> {
    let entries = std::fs::read_dir("/sys/block").ctx(|| "reading /sys/block".into())?;
    let mut out = Vec::new();
    for e in entries {
        let e = e.ctx(|| "reading /sys/block".into())?;
        if !e.file_name().to_string_lossy().starts_with("loop") {
            continue;
        }
        let file = e.path().join("loop/backing_file");
        match std::fs::read_to_string(&file) {
            Ok(backing) => {
                let dev = Path::new("/dev").join(e.file_name());
                let id = match loop_backing_id(&dev) {
                    Ok(id) => id,
                    Err(err) => {
                        tracing::debug!(dev = %dev.display(), error = %err, "no loop status; matching by path");
                        None
                    }
                };
                out.push(Attached {
                    dev,
                    path: PathBuf::from(backing.trim_end_matches('\n')),
                    id,
                });
            }
            // An unattached loop device has no backing_file.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(Error::io(format!("reading {}", file.display()), err)),
        }
    }
    Ok(out)
}

#[async_trait]
impl LoopDevices for SystemLoopDevices {
    async fn attach_loop(&self, file: &Path) -> Result<PathBuf> {
        if let Some(dev) = self.find_loop(file).await? {
            return Ok(dev);
        }
        let out = self
            .exec
            .run(&Command::new(
                "losetup",
                [
                    "--find".as_ref(),
                    "--show".as_ref(),
                    "--nooverlap".as_ref(),
                    file.as_os_str(),
                ],
            ))
            .await?;
        let dev = out.stdout.trim();
        if !dev.starts_with("/dev/") {
            return Err(Error::Internal(format!(
                "losetup printed {dev:?}, not a device"
            )));
        }
        Ok(PathBuf::from(dev))
    }

    async fn find_loop(&self, file: &Path) -> Result<Option<PathBuf>> {
        let file = file.to_path_buf();
        crate::fsutil::blocking(
            "listing loop devices",
            crate::fsutil::FS_TIMEOUT,
            move || {
                use std::os::unix::fs::MetadataExt;
                let id = match std::fs::metadata(&file) {
                    Ok(m) => Some((m.dev(), m.ino())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                    Err(e) => return Err(Error::io(format!("stat {}", file.display()), e)),
                };
                let path = std::fs::canonicalize(&file).unwrap_or(file);
                Ok(attached_loops()?
                    .into_iter()
                    .find(|a| match (a.id, id) {
                        (Some(a), Some(f)) => a == f,
                        _ => a.path == path,
                    })
                    .map(|a| a.dev))
            },
        )
        .await
    }

    async fn detach_loop(&self, dev: &Path) -> Result<()> {
        let name = dev.file_name().unwrap_or_default();
        let sys = Path::new("/sys/block").join(name).join("loop");
        if !sys.exists() {
            return Ok(());
        }
        self.exec
            .run(&Command::new("losetup", ["-d".as_ref(), dev.as_os_str()]))
            .await?;
        // A device still open elsewhere (a probe, a late close) is detached
        // only at its last close: wait for that so "detached" means detached.
        let backing = sys.join("backing_file");
        for _ in 0..500 {
            if !backing.exists() {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        Err(Error::Unavailable(format!(
            "{} is still in use 5 s after detaching; retry later",
            dev.display()
        )))
    }

    async fn refresh_loop(&self, dev: &Path) -> Result<()> {
        self.exec
            .run(&Command::new("losetup", ["-c".as_ref(), dev.as_os_str()]))
            .await
            .map(drop)
    }
}

/// Loop devices as a [`DeviceMapper`]: the source is a file's path.
#[async_trait]
impl DeviceMapper for SystemLoopDevices {
    fn name(&self) -> &'static str {
        "loop"
    }

    async fn map(&self, m: &Mapping) -> Result<(PathBuf, bool)> {
        let file = Path::new(&m.source);
        if let Some(dev) = self.find_loop(file).await? {
            return Ok((dev, false));
        }
        Ok((self.attach_loop(file).await?, true))
    }

    async fn find(&self, m: &Mapping) -> Result<Option<PathBuf>> {
        self.find_loop(Path::new(&m.source)).await
    }

    async fn alive(&self, m: &Mapping) -> Result<bool> {
        let file = PathBuf::from(&m.source);
        crate::fsutil::blocking(
            "looking at a loop file",
            crate::fsutil::FS_TIMEOUT,
            move || Ok(std::fs::metadata(&file).is_ok()),
        )
        .await
        .or(Ok(false))
    }

    async fn unmap(&self, m: &Mapping) -> Result<()> {
        match self.find(m).await? {
            Some(dev) => self.detach_loop(&dev).await,
            None => Ok(()),
        }
    }

    async fn refresh(&self, _m: &Mapping, dev: &Path) -> Result<()> {
        self.refresh_loop(dev).await
    }
}

#[async_trait]
impl BlockDevices for SystemBlockDevices {
    async fn fs_type(&self, dev: &Path) -> Result<Option<String>> {
        let out = self
            .exec
            .output(&Command::new(
                "blkid",
                [
                    "-p".as_ref(),
                    "-o".as_ref(),
                    "value".as_ref(),
                    "-s".as_ref(),
                    "TYPE".as_ref(),
                    dev.as_os_str(),
                ],
            ))
            .await?;
        match out.code {
            0 => Ok(Some(out.stdout.trim().to_owned()).filter(|t| !t.is_empty())),
            2 => Ok(None),
            c => Err(Error::Internal(format!(
                "blkid {} failed (exit {c}): {}",
                dev.display(),
                out.stderr.trim()
            ))),
        }
    }

    async fn mkfs_if_blank(&self, dev: &Path, fs_type: &str, extra: &[String]) -> Result<String> {
        if let Some(existing) = self.fs_type(dev).await? {
            return Ok(existing);
        }
        if !SUPPORTED_FS.contains(&fs_type) {
            return Err(Error::InvalidArgument(format!(
                "fsType {fs_type:?} is not supported; use one of {SUPPORTED_FS:?}"
            )));
        }
        let mut args: Vec<std::ffi::OsString> = match fs_type {
            "ext4" | "ext3" => vec!["-F".into(), "-q".into(), "-m".into(), "0".into()],
            "xfs" => vec!["-q".into()],
            _ => vec![],
        };
        args.extend(extra.iter().map(Into::into));
        args.push(dev.into());
        self.exec
            .run(&Command::new(&format!("mkfs.{fs_type}"), args))
            .await?;
        Ok(fs_type.to_owned())
    }

    async fn grow_fs(&self, dev: &Path, fs_type: &str, mount_point: Option<&Path>) -> Result<()> {
        let cmd = match (fs_type, mount_point) {
            ("ext4" | "ext3" | "ext2", _) => Command::new("resize2fs", [dev.as_os_str()]),
            ("xfs", Some(mp)) => Command::new("xfs_growfs", [mp.as_os_str()]),
            ("btrfs", Some(mp)) => Command::new(
                "btrfs",
                [
                    "filesystem".as_ref(),
                    "resize".as_ref(),
                    "max".as_ref(),
                    mp.as_os_str(),
                ],
            ),
            (fs, None) => {
                return Err(Error::FailedPrecondition(format!(
                    "{fs} can only grow while mounted"
                )));
            }
            (fs, _) => return Err(Error::InvalidArgument(format!("cannot grow {fs}"))),
        };
        self.exec.run(&cmd).await.map(drop)
    }

    async fn size(&self, dev: &Path) -> Result<u64> {
        let name = dev.file_name().unwrap_or_default();
        let p = Path::new("/sys/class/block").join(name).join("size");
        let what = format!("reading {}", p.display());
        crate::fsutil::blocking(what, crate::fsutil::FS_TIMEOUT, move || {
            let s = std::fs::read_to_string(&p)
                .map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
            s.trim()
                .parse::<u64>()
                .map(|sectors| sectors * 512)
                .map_err(|e| Error::Internal(format!("{}: {e}", p.display())))
        })
        .await
    }

    async fn fs_size(&self, dev: &Path, fs_type: &str) -> Result<Option<u64>> {
        if !fs_type.starts_with("ext") {
            return Ok(None);
        }
        let out = self
            .exec
            .run(&Command::new("dumpe2fs", ["-h".as_ref(), dev.as_os_str()]))
            .await?;
        let field = |name: &str| {
            out.stdout
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        match (field("Block count:"), field("Block size:")) {
            (Some(blocks), Some(bs)) => Ok(Some(blocks * bs)),
            _ => Err(Error::Internal(format!(
                "cannot read the size of the filesystem on {}",
                dev.display()
            ))),
        }
    }

    async fn fsck(&self, dev: &Path, fs_type: &str) -> Result<()> {
        let cmd = match fs_type {
            "ext2" | "ext3" | "ext4" => {
                Command::new("e2fsck", ["-f".as_ref(), "-p".as_ref(), dev.as_os_str()])
            }
            "xfs" => Command::new("xfs_repair", ["-n".as_ref(), dev.as_os_str()]),
            _ => return Ok(()),
        };
        let out = self.exec.output(&cmd).await?;
        // e2fsck: 1 means errors were fixed.
        if out.code > 1 || (fs_type == "xfs" && out.code != 0) {
            return Err(Error::Internal(format!(
                "`{}` found problems it could not fix (exit {}): {}",
                cmd.display(),
                out.code,
                out.stderr.trim()
            )));
        }
        Ok(())
    }
}
