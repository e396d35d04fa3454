//! `local.rcsi.io`: node-local volumes as directories (bind-mounted) or as
//! sparse image files on loop devices (raw block, or a dedicated ext4/xfs).

mod controller;
mod error;
mod group;
pub mod meta;
mod node;
mod quota;
pub mod store;

pub use error::LocalPathError;

use crate::meta::{Backing, SnapshotMeta, VolumeMeta};
use crate::store::{Change, Index};
use csi_core::backend::Plugin;
use csi_core::blockdev::{BlockDevices, LoopDevices};
use csi_core::exec::{Command, Exec};
use csi_core::fsutil::FS_TIMEOUT;
use csi_core::journal::Log;
use csi_core::mount::Mounter;
use csi_core::{Error, IoContext, Result};
use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLockReadGuard};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// CSI driver name.
pub const DRIVER_NAME: &str = "local.rcsi.io";
/// Topology key whose value is the node id.
pub const TOPOLOGY_KEY: &str = "topology.local.rcsi.io/node";
/// Size given to volumes created without a capacity.
pub const DEFAULT_SIZE: u64 = 1 << 30;

/// Start-up settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's id.
    pub node_id: String,
    /// Directory holding all volumes, snapshots and metadata.
    pub base_path: PathBuf,
    /// Most volumes this node accepts (0: unlimited).
    pub max_volumes: u64,
    /// Bytes of the base filesystem never handed out.
    pub reserved_bytes: u64,
}

/// Privileged helpers the driver uses.
#[derive(Clone)]
pub struct Host {
    /// Mount operations.
    pub mounter: Arc<dyn Mounter>,
    /// Image files attached as devices.
    pub loops: Arc<dyn LoopDevices>,
    /// Filesystems on devices.
    pub blockdev: Arc<dyn BlockDevices>,
    /// External programs (cp).
    pub exec: Arc<dyn Exec>,
}

impl Host {
    /// The real host: system mounts (each bounded by `mount_timeout`), loop devices, programs.
    pub fn system(mount_timeout: std::time::Duration) -> Self {
        let exec: Arc<dyn Exec> = Arc::new(csi_core::exec::SystemExec);
        Self {
            mounter: Arc::new(csi_core::mount::SystemMounter::new(
                exec.clone(),
                mount_timeout,
            )),
            loops: Arc::new(csi_core::blockdev::SystemLoopDevices::new(exec.clone())),
            blockdev: Arc::new(csi_core::blockdev::SystemBlockDevices::new(exec.clone())),
            exec,
        }
    }
}

/// The local-path driver: controller and node in one process.
pub struct LocalPath {
    cfg: Config,
    host: Host,
    log: Log<Index>,
    /// Cached sum of the unwritten space of size-enforced volumes.
    promised: Mutex<Option<(Instant, u64)>>,
    base_fs: String,
    /// Project quotas, when the base filesystem enforces them.
    quotas: Option<quota::Quotas>,
    next_project: std::sync::atomic::AtomicU32,
    /// Held while tombstones are being settled; holds the count that
    /// starts the next settling (past those whose data is still there).
    settling: tokio::sync::Mutex<usize>,
    /// Keeps a second plugin off this base path while this one runs.
    _lock: csi_core::fsutil::DirLock,
}

/// Bound of copies and removals of a volume's data.
pub(crate) const COPY_TIMEOUT: Duration = Duration::from_secs(3600);
/// Bound of Probe's look at the base path: a hung disk makes it fail, not hang.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the sum of promised space may be reused.
pub(crate) const PROMISED_TTL: Duration = Duration::from_secs(5);

/// Tombstones after which a deletion settles them.
const SETTLE_EVERY: usize = 256;

/// First project id handed to a volume; lower ids are left to the operator.
const FIRST_PROJECT: u32 = 1 << 20;

impl LocalPath {
    /// Opens (or initializes) the base path and recovers from any crash.
    pub fn open(cfg: Config, host: Host) -> Result<Self> {
        // Before anything is read or repaired: a second plugin's recovery
        // would remove the first one's creations in flight.
        let lock = csi_core::fsutil::DirLock::acquire(
            &cfg.base_path,
            "base path",
            csi_core::fsutil::LOCK_WAIT,
        )?;
        for d in ["volumes", "snapshots"] {
            let p = cfg.base_path.join(d);
            std::fs::create_dir_all(&p).ctx(|| format!("creating {}", p.display()))?;
        }
        make_shards(&cfg.base_path.join("volumes"))?;
        let base_path = std::fs::canonicalize(&cfg.base_path)
            .ctx(|| format!("resolving {}", cfg.base_path.display()))?;
        let cfg = Config { base_path, ..cfg };
        let log = Log::<Index>::open(&cfg.base_path.join(".rcsi"))?;
        let base_fs = fs_type_of(&cfg.base_path).unwrap_or_else(|| "unknown".into());
        let (quotas, unenforced) = match quota::Quotas::probe(&cfg.base_path) {
            Ok(q) => (Some(q), None),
            Err(why) => (None, Some(why)),
        };
        let next_project = log
            .read()
            .state
            .volumes
            .values()
            .filter_map(|v| v.project_id)
            .max()
            .map_or(FIRST_PROJECT, |p| p + 1);
        let driver = Self {
            cfg,
            host,
            log,
            promised: Mutex::new(None),
            base_fs,
            quotas,
            next_project: std::sync::atomic::AtomicU32::new(next_project),
            settling: tokio::sync::Mutex::new(SETTLE_EVERY),
            _lock: lock,
        };
        driver.recover()?;
        let volumes = driver.index().state.volumes.len();
        match unenforced {
            None => info!(
                base = %driver.cfg.base_path.display(),
                fs = %driver.base_fs,
                volumes,
                "local-path ready; directory volume sizes are enforced with project quotas"
            ),
            Some(why) => warn!(
                base = %driver.cfg.base_path.display(),
                fs = %driver.base_fs,
                volumes,
                "local-path ready; directory volume sizes are NOT enforced: {why}; use backing=file for hard limits"
            ),
        }
        Ok(driver)
    }

    fn index(&self) -> RwLockReadGuard<'_, Index> {
        self.log.read()
    }

    fn volumes_dir(&self) -> PathBuf {
        self.cfg.base_path.join("volumes")
    }

    fn snapshots_dir(&self) -> PathBuf {
        self.cfg.base_path.join("snapshots")
    }

    /// The volumes directory and its shards: every place volume data lives.
    fn volume_dirs(&self) -> Vec<PathBuf> {
        let top = self.volumes_dir();
        std::iter::once(top.clone())
            .chain(shards().map(|s| top.join(s)))
            .collect()
    }

    /// Where a volume's data lives.
    fn volume_path(&self, v: &VolumeMeta) -> PathBuf {
        if v.sharded {
            self.new_volume_path(&v.id, &v.backing)
        } else {
            data_path(&self.volumes_dir(), &v.id, &v.backing)
        }
    }

    /// Where a new volume's data goes: the shard directory of its id.
    fn new_volume_path(&self, id: &str, backing: &Backing) -> PathBuf {
        data_path(&self.volumes_dir().join(shard_of(id)), id, backing)
    }

    fn snapshot_path(&self, s: &SnapshotMeta) -> PathBuf {
        data_path(&self.snapshots_dir(), &s.id, &s.backing)
    }

    fn volume(&self, id: &str) -> Result<VolumeMeta> {
        self.index()
            .state
            .volumes
            .get(id)
            .cloned()
            .ok_or_else(|| LocalPathError::NoSuchVolume(id.to_owned()).into())
    }

    /// Makes a change durable; the index reflects it once this returns.
    async fn commit(&self, change: Change) -> Result<()> {
        let done = self.log.commit(change).await;
        self.forget_promised();
        done
    }

    /// Drops the cached sum of promised bytes after a change of volumes.
    fn forget_promised(&self) {
        *self.promised.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Runs filesystem work off the async runtime with [`FS_TIMEOUT`].
    async fn fs<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        csi_core::fsutil::blocking(what, FS_TIMEOUT, f).await
    }

    /// Removes a volume's or snapshot's data (a tree may take long: the
    /// bound is the one of copies).
    async fn remove(&self, p: &Path) -> Result<()> {
        let p = p.to_path_buf();
        csi_core::fsutil::blocking("removing data", COPY_TIMEOUT, move || remove_any(&p)).await
    }

    /// Removes `p` after an error, logging (not returning) a failure.
    async fn cleanup(&self, p: &Path) {
        if let Err(e) = self.remove(p).await {
            warn!(path = %p.display(), error = %e, "cleanup failed; start-up recovery will retry");
        }
    }

    /// Moves committed data (a volume's or a snapshot's) from its temporary
    /// name into place, after a crash or a failed rename between commit and rename.
    async fn settle(&self, done: &Path) -> Result<()> {
        let done = done.to_path_buf();
        self.fs("moving new data into place", move || {
            let tmp = tmp_name(&done);
            if !done.exists() && tmp.exists() {
                std::fs::rename(&tmp, &done).ctx(|| format!("renaming {}", tmp.display()))?;
            }
            Ok(())
        })
        .await
    }

    /// Drops the tombstones (every [`SETTLE_EVERY`] deletions) of deletions
    /// whose data is gone, after making that removal durable. A failure is
    /// logged: the tombstones stay and a later deletion tries again.
    async fn settle_deletions(&self) {
        let Ok(mut settle_at) = self.settling.try_lock() else {
            return;
        };
        let ids: Vec<String> = {
            let idx = self.index();
            if idx.state.deleted.len() < *settle_at {
                return;
            }
            idx.state.deleted.iter().cloned().collect()
        };
        let total = ids.len();
        let mut dirs = self.volume_dirs();
        dirs.push(self.snapshots_dir());
        let settled = self
            .fs("settling deletions", move || {
                // Data a failed removal left behind is removed again here.
                let removed = |p: &PathBuf| match remove_any(p) {
                    Ok(()) => true,
                    Err(e) => {
                        warn!(path = %p.display(), error = %e, "could not remove deleted data; will retry");
                        false
                    }
                };
                // One listing per directory, not a stat per id and name.
                let listed = dirs
                    .iter()
                    .map(|d| {
                        let names = std::fs::read_dir(d).ctx(|| format!("listing {}", d.display()))?;
                        names
                            .map(|e| e.map(|e| e.file_name()))
                            .collect::<std::io::Result<HashSet<_>>>()
                            .ctx(|| format!("listing {}", d.display()))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let gone = |id: &String| {
                    dirs.iter().zip(&listed).all(|(d, names)| {
                        [id.clone(), format!("{id}.img")]
                            .into_iter()
                            .all(|n| !names.contains(OsStr::new(&n)) || removed(&d.join(n)))
                    })
                };
                let ids: Vec<String> = ids.into_iter().filter(gone).collect();
                for d in &dirs {
                    csi_core::fsutil::fsync_dir(d).ctx(|| format!("fsync {}", d.display()))?;
                }
                Ok(ids)
            })
            .await;
        let done = match settled {
            Ok(ids) => {
                *settle_at = total - ids.len() + SETTLE_EVERY;
                self.commit(Change::Settled { ids }).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            warn!(error = %e, "could not settle deletions; will retry");
        }
    }

    /// Cleans up after a crash: creations and deletions that committed are
    /// finished, those that did not are undone.
    fn recover(&self) -> Result<()> {
        let idx = self.index();
        let volumes = idx.state.volumes.keys().cloned().collect::<Vec<_>>();
        let snapshots = idx.state.snapshots.keys().cloned().collect::<Vec<_>>();
        let top = self.volumes_dir();
        let shard_names: Vec<String> = shards().collect();
        let mut dirs: Vec<_> = self
            .volume_dirs()
            .into_iter()
            .map(|d| (d, &volumes))
            .collect();
        dirs.push((self.snapshots_dir(), &snapshots));
        for (dir, known) in dirs {
            let entries = std::fs::read_dir(&dir).ctx(|| format!("reading {}", dir.display()))?;
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let path = e.path();
                if dir == top && shard_names.contains(&name) {
                    continue;
                }
                if let Some(rest) = name.strip_prefix(".tmp-") {
                    let id = rest.trim_end_matches(".img");
                    if known.iter().any(|k| k == id) {
                        info!(path = %path.display(), "finishing a committed creation");
                        let done = dir.join(rest);
                        std::fs::rename(&path, &done)
                            .ctx(|| format!("renaming {}", path.display()))?;
                    } else {
                        warn!(path = %path.display(), "removing unfinished creation");
                        remove_any(&path)?;
                    }
                } else if let Some(rest) = name.strip_prefix(".trash-") {
                    let id = rest.trim_end_matches(".img");
                    if known.iter().any(|k| k == id) {
                        let back = dir.join(rest);
                        warn!(path = %path.display(), "rolling back uncommitted deletion");
                        std::fs::rename(&path, &back)
                            .ctx(|| format!("restoring {}", back.display()))?;
                    } else {
                        remove_any(&path)?;
                    }
                } else {
                    let id = name.trim_end_matches(".img");
                    if known.iter().any(|k| k == id) {
                        continue;
                    }
                    if idx.state.deleted.contains(id) {
                        info!(path = %path.display(), "finishing a committed deletion");
                        remove_any(&path)?;
                    } else if std::fs::remove_dir(&path).is_ok() {
                        // Empty: a directory volume made in place whose
                        // record never committed. Nothing is lost.
                        info!(path = %path.display(), "removed an unfinished creation");
                    } else {
                        warn!(path = %path.display(), "data without metadata; leaving it for the operator");
                    }
                }
            }
        }
        // The journal's flush does not flush other metadata, so a crash can
        // keep a record whose directory entry, size or quota limit was not
        // yet on disk: redo those (copied data was flushed before its record).
        for v in idx.state.volumes.values() {
            let p = self.volume_path(v);
            let quota = self.quotas.as_ref().zip(v.project_id);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if v.backing.is_image() && m.len() < v.capacity => {
                    info!(volume = %v.id, "finishing a committed expansion");
                    controller::grow_file(&p, v.capacity)?;
                }
                Ok(_) => {
                    if let Some((q, project)) = quota
                        && let Err(e) = q.set_limit(project, v.capacity)
                    {
                        warn!(volume = %v.id, error = %e, "could not restore a quota limit");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && v.source.is_none() => {
                    warn!(volume = %v.id, path = %p.display(), "recreating an empty volume whose creation had not reached the disk");
                    let mode = controller::mode_of(&v.parameters);
                    make_empty(&p, &v.backing, v.capacity, mode, None)?;
                    // The record names its project: that one, not a free one.
                    if let Some((q, project)) = quota {
                        q.assign(&p, project, v.capacity)?;
                    }
                }
                Err(_) => warn!(volume = %v.id, path = %p.display(), "volume data is missing"),
            }
        }
        Ok(())
    }

    /// Copies a directory tree (into the existing directory `to`) or an image
    /// file, with reflinks when the filesystem has them. A mounted image is
    /// frozen during the copy so the copy is consistent.
    async fn copy_data(&self, from: &Path, to: &Path, is_image: bool) -> Result<()> {
        let frozen = if is_image {
            self.freeze(from).await?
        } else {
            None
        };
        let result = self.copy_raw(from, to, is_image).await;
        if let Some(f) = frozen {
            f.thaw().await;
        }
        result
    }

    /// Freezes the filesystem of an image if it is mounted on this node.
    async fn freeze(&self, image: &Path) -> Result<Option<Frozen>> {
        let Some(dev) = self.host.loops.find_loop(image).await? else {
            return Ok(None);
        };
        let mounts = self.host.mounter.mounts().await?;
        let Some(m) = mounts.iter().find(|m| Path::new(&m.source) == dev) else {
            return Ok(None);
        };
        let cmd = Command::new("fsfreeze", ["-f".as_ref(), m.mount_point.as_os_str()]);
        self.host.exec.run(&cmd).await?;
        Ok(Some(Frozen {
            mount: Some(m.mount_point.clone()),
            exec: self.host.exec.clone(),
        }))
    }

    async fn copy_raw(&self, from: &Path, to: &Path, is_image: bool) -> Result<()> {
        let cmd = if is_image {
            Command::new(
                "cp",
                [
                    "--reflink=auto".as_ref(),
                    "--sparse=always".as_ref(),
                    from.as_os_str(),
                    to.as_os_str(),
                ],
            )
        } else {
            let mut src = from.as_os_str().to_owned();
            src.push("/.");
            Command::new(
                "cp",
                [
                    "-a".as_ref(),
                    "--reflink=auto".as_ref(),
                    src.as_os_str(),
                    to.as_os_str(),
                ],
            )
        };
        self.host.exec.run(&cmd.timeout(COPY_TIMEOUT)).await?;
        // The copy must be on disk before the record that points at it.
        let to = to.to_path_buf();
        csi_core::fsutil::blocking("flushing copied data", COPY_TIMEOUT, move || {
            csi_core::fsutil::syncfs(&to)
        })
        .await
    }
}

/// Creates an empty volume's data at `path`: a directory with `mode` or a
/// sparse image of `size` bytes. Given `quota` and a first project id, the
/// directory gets a free project limited to `size`; returns its id.
fn make_empty(
    path: &Path,
    backing: &Backing,
    size: u64,
    mode: u32,
    quota: Option<(&quota::Quotas, u32)>,
) -> Result<Option<u32>> {
    use std::os::unix::fs::PermissionsExt;
    if backing.is_image() {
        let f = std::fs::File::create(path).ctx(|| format!("creating {}", path.display()))?;
        f.set_len(size)
            .ctx(|| format!("sizing {}", path.display()))?;
        return Ok(None);
    }
    std::fs::create_dir(path).ctx(|| format!("creating {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .ctx(|| format!("chmod {}", path.display()))?;
    quota
        .map(|(q, first)| q.claim(path, first, size))
        .transpose()
}

/// A filesystem frozen for a consistent copy. It is thawed on drop too, so
/// no failure or cancellation of the copy can leave a pod's filesystem frozen.
pub(crate) struct Frozen {
    mount: Option<PathBuf>,
    exec: Arc<dyn Exec>,
}

fn thaw_cmd(mount: &Path) -> Command {
    Command::new("fsfreeze", ["-u".as_ref(), mount.as_os_str()])
}

impl Frozen {
    /// Thaws now, logging a failure.
    pub(crate) async fn thaw(mut self) {
        if let Some(mp) = self.mount.take()
            && let Err(e) = self.exec.run(&thaw_cmd(&mp)).await
        {
            warn!(mount = %mp.display(), error = %e, "thawing after copy failed");
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let Some(mp) = self.mount.take() else { return };
        let exec = self.exec.clone();
        let thaw = async move {
            if let Err(e) = exec.run(&thaw_cmd(&mp)).await {
                warn!(mount = %mp.display(), error = %e, "thawing an abandoned freeze failed");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(thaw)),
            Err(_) => warn!("no runtime to thaw an abandoned freeze on"),
        }
    }
}

/// Where data is prepared before its commit: `.tmp-<name>` beside `done`.
fn tmp_name(done: &Path) -> PathBuf {
    done.with_file_name(format!(
        ".tmp-{}",
        done.file_name().unwrap_or_default().to_string_lossy()
    ))
}

/// Names of the shard directories under `volumes/`: creations and removals
/// in different shards do not queue on one directory's lock, which a
/// filesystem mounted with `discard` holds while it trims a removed
/// directory's blocks.
fn shards() -> impl Iterator<Item = String> {
    (0..16u32).map(|n| format!("{n:x}"))
}

/// The shard of an id: its last hex digit (ids end in random hex).
fn shard_of(id: &str) -> String {
    let last = id.chars().last().unwrap_or('0');
    let n = last.to_digit(16).unwrap_or(u32::from(last) % 16);
    format!("{n:x}")
}

/// Where a volume made by this version keeps its data under base path
/// `base` (an image adds `.img`).
pub fn volume_dir(base: &Path, id: &str) -> PathBuf {
    base.join("volumes").join(shard_of(id)).join(id)
}

/// Makes the missing shard directories, durably, before any volume uses them.
fn make_shards(volumes: &Path) -> Result<()> {
    let mut made = false;
    for s in shards() {
        let p = volumes.join(s);
        match std::fs::create_dir(&p) {
            Ok(()) => made = true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(format!("creating {}", p.display()), e)),
        }
    }
    if made {
        csi_core::fsutil::fsync_dir(volumes).ctx(|| format!("fsync {}", volumes.display()))?;
    }
    Ok(())
}

/// Data location of an id with a given layout.
fn data_path(dir: &Path, id: &str, backing: &Backing) -> PathBuf {
    if backing.is_image() {
        dir.join(format!("{id}.img"))
    } else {
        dir.join(id)
    }
}

pub(crate) fn remove_any(p: &Path) -> Result<()> {
    // Most volumes are removed empty: one rmdir, no stat, no directory walk.
    // rmdir never follows a symlink (ENOTDIR), nor does remove_dir_all.
    let r = std::fs::remove_dir(p).or_else(|e| match e.raw_os_error() {
        Some(libc::ENOTDIR) => std::fs::remove_file(p),
        Some(libc::ENOTEMPTY | libc::EEXIST) => std::fs::remove_dir_all(p),
        _ => Err(e),
    });
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io(format!("removing {}", p.display()), e))
        }
        _ => Ok(()),
    }
}

/// Filesystem type of the mount holding `path`.
fn fs_type_of(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    csi_core::mount::parse_mountinfo(&text)
        .into_iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
        .map(|m| m.fs_type)
}

/// New random id with a prefix (`lv-` volumes, `ls-` snapshots).
fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

/// True when `id` has the shape of an id this driver issues.
fn is_our_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|h| {
        h.len() == 32
            && h.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    })
}

fn now() -> (u64, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs(), d.subsec_nanos())
}

#[async_trait::async_trait]
impl Plugin for LocalPath {
    fn name(&self) -> &str {
        DRIVER_NAME
    }

    fn has_topology(&self) -> bool {
        true
    }

    fn online_expansion(&self) -> bool {
        true
    }

    async fn probe(&self) -> Result<bool> {
        let base = self.cfg.base_path.clone();
        csi_core::fsutil::blocking("statvfs of the base path", PROBE_TIMEOUT, move || {
            csi_core::fsutil::statvfs(&base)
        })
        .await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::remove_any;

    #[test]
    fn remove_any_removes_every_kind_and_never_follows_a_link() {
        let t = tempfile::tempdir().unwrap();
        let p = |n: &str| t.path().join(n);
        std::fs::create_dir(p("empty")).unwrap();
        std::fs::create_dir_all(p("full/sub")).unwrap();
        std::fs::write(p("full/sub/f"), b"x").unwrap();
        std::fs::write(p("file.img"), b"x").unwrap();
        std::fs::create_dir(p("kept")).unwrap();
        std::fs::write(p("kept/f"), b"x").unwrap();
        std::os::unix::fs::symlink(p("kept"), p("link")).unwrap();
        for n in ["empty", "full", "file.img", "link", "missing"] {
            remove_any(&p(n)).unwrap();
            assert!(p(n).symlink_metadata().is_err(), "{n} is gone");
        }
        assert!(p("kept/f").exists(), "a link's target is left alone");
    }
}
