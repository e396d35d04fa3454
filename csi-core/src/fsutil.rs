//! Filesystem helpers: atomic state files and space accounting.

use crate::{Error, IoContext, Result};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// How long filesystem work on the node may take before the call fails
/// with DeadlineExceeded (a hung NFS or FUSE mount, a dying disk).
pub const FS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs blocking filesystem or mount work on the core's worker pool
/// with a deadline, so a slow disk or a hung mount never stalls the async
/// runtime (and with it Probe and the liveness check). `what` names the work
/// in the error. On timeout the work is abandoned on its thread, never awaited.
pub async fn blocking<T: Send + 'static>(
    what: impl Into<String>,
    timeout: std::time::Duration,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::time::timeout(timeout, crate::pool::spawn(f)).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(Error::Internal(format!(
            "{}: the worker panicked",
            what.into()
        ))),
        Err(_) => Err(Error::DeadlineExceeded(format!(
            "{} did not finish within {timeout:?}",
            what.into()
        ))),
    }
}

/// Writes `data` to `path` atomically: temp file, fsync, rename, fsync dir.
pub fn atomic_write(path: &Path, data: &[u8]) -> Result<()> {
    write_unsynced_then_rename(path, data, true)
}

/// Like [`atomic_write`] but leaves durability to a later `syncfs`/dir fsync
/// (the caller batches them); the rename is still atomic.
pub fn atomic_write_nosync(path: &Path, data: &[u8]) -> Result<()> {
    write_unsynced_then_rename(path, data, false)
}

fn write_unsynced_then_rename(path: &Path, data: &[u8], sync: bool) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::Internal(format!("{} has no parent", path.display())))?;
    let name = path
        .file_name()
        .ok_or_else(|| Error::Internal(format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        if sync {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if sync {
            fsync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.ctx(|| format!("writing {}", path.display()))
}

/// Fsyncs a directory so renames and unlinks in it are durable.
pub fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Flushes every dirty inode of the filesystem holding `path` (one call
/// makes a whole batch of writes durable).
pub fn syncfs(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).ctx(|| format!("opening {}", path.display()))?;
    nix::unistd::syncfs(&f).map_err(|e| Error::io(format!("syncfs {}", path.display()), e.into()))
}

/// Space and inode figures of the filesystem holding a path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsStats {
    /// Total bytes.
    pub total_bytes: u64,
    /// Bytes free for unprivileged users.
    pub available_bytes: u64,
    /// Bytes used.
    pub used_bytes: u64,
    /// Total inodes (0 when the filesystem has no fixed count).
    pub total_inodes: u64,
    /// Free inodes.
    pub free_inodes: u64,
}

/// statvfs(2) of `path`.
pub fn statvfs(path: &Path) -> Result<FsStats> {
    let s = nix::sys::statvfs::statvfs(path)
        .map_err(|e| Error::io(format!("statvfs {}", path.display()), e.into()))?;
    let frag = s.fragment_size();
    Ok(FsStats {
        total_bytes: s.blocks() * frag,
        available_bytes: s.blocks_available() * frag,
        used_bytes: (s.blocks() - s.blocks_free()) * frag,
        total_inodes: s.files(),
        free_inodes: s.files_free(),
    })
}

/// Bytes and inodes used by a directory tree (for filesystems without quotas).
pub fn tree_usage(root: &Path) -> Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0u64;
    let mut inodes = 0u64;
    let mut stack = vec![root.to_path_buf()];
    let dev = std::fs::symlink_metadata(root)
        .ctx(|| format!("stat {}", root.display()))?
        .dev();
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("reading {}", dir.display()), e)),
        };
        for entry in entries {
            let entry = entry.ctx(|| format!("reading {}", dir.display()))?;
            let Ok(meta) = entry.metadata() else { continue };
            inodes += 1;
            bytes += meta.blocks() * 512;
            if meta.is_dir() && meta.dev() == dev {
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}

/// How long a plugin starting up waits for the process before it on the
/// same state directory to exit (a pod being replaced).
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// An exclusive lock on a state directory, held for the life of the
/// process that uses it, so two plugins never share one. The kernel drops
/// it when the holder exits, however it dies.
#[derive(Debug)]
pub struct DirLock {
    _file: nix::fcntl::Flock<std::fs::File>,
}

impl DirLock {
    /// Locks `dir` (created if missing) through `dir/.lock`, waiting up to
    /// `wait` for a holder to exit; `what` names the directory's role in
    /// the error. Blocking.
    pub fn acquire(dir: &Path, what: &str, wait: std::time::Duration) -> Result<Self> {
        use nix::fcntl::{Flock, FlockArg};
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        let path = dir.join(".lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .ctx(|| format!("opening {}", path.display()))?;
        let deadline = std::time::Instant::now() + wait;
        let mut warned = false;
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(mut held) => {
                    let host =
                        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                    let me = format!("pid {} on {}\n", std::process::id(), host.trim());
                    // Only for the message of a later refusal: best effort.
                    let _ = held.set_len(0).and_then(|()| held.write_all(me.as_bytes()));
                    return Ok(Self { _file: held });
                }
                Err((f, nix::errno::Errno::EWOULDBLOCK)) => file = f,
                Err((_, e)) => {
                    return Err(Error::io(format!("locking {}", path.display()), e.into()));
                }
            }
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = match holder.trim() {
                "" => "another rcsi process".to_string(),
                h => format!("another rcsi process ({h})"),
            };
            if std::time::Instant::now() >= deadline {
                return Err(Error::FailedPrecondition(format!(
                    "{} is in use by {holder}: two plugins must not share a {what}; stop the other one or give each its own",
                    dir.display()
                )));
            }
            if !warned {
                warned = true;
                tracing::warn!(dir = %dir.display(), %holder, ?wait, "waiting for the {what} to be released");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// Removes a publish target (a directory, or a file for raw block
/// volumes); success when it is gone already. Blocking.
pub fn remove_target(t: &Path) -> Result<()> {
    let r = match std::fs::symlink_metadata(t) {
        Ok(m) if m.is_dir() => std::fs::remove_dir(t),
        Ok(_) => std::fs::remove_file(t),
        Err(e) => Err(e),
    };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io(format!("removing {}", t.display()), e))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[tokio::test]
    async fn blocking_work_has_a_deadline() {
        let ok = blocking("quick", FS_TIMEOUT, || Ok(7)).await.unwrap();
        assert_eq!(ok, 7);
        let slow = blocking("a hung stat", std::time::Duration::from_millis(20), || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            Ok(())
        })
        .await
        .unwrap_err();
        assert!(matches!(slow, Error::DeadlineExceeded(_)), "{slow}");
        assert!(slow.to_string().contains("a hung stat"));
    }

    #[test]
    fn a_locked_directory_is_refused_until_released() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("state");
        let held = DirLock::acquire(&dir, "state directory", std::time::Duration::ZERO).unwrap();
        let t = std::time::Instant::now();
        let wait = std::time::Duration::from_millis(300);
        let e = DirLock::acquire(&dir, "state directory", wait).unwrap_err();
        assert!(t.elapsed() >= wait, "gave up after {:?}", t.elapsed());
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
        let msg = e.to_string();
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(
            msg.contains(&format!("pid {}", std::process::id())),
            "{msg}"
        );
        assert!(msg.contains("share a state directory"), "{msg}");
        // A waiter gets it once the holder lets go.
        let waiter = {
            let dir = dir.clone();
            std::thread::spawn(move || {
                DirLock::acquire(&dir, "state directory", std::time::Duration::from_secs(10))
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(200));
        drop(held);
        waiter.join().unwrap().unwrap();
    }

    #[test]
    fn a_lock_is_not_inherited_by_programs_started_while_held() {
        let d = tempfile::tempdir().unwrap();
        let held = DirLock::acquire(d.path(), "base path", std::time::Duration::ZERO).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        drop(held);
        let again = DirLock::acquire(d.path(), "base path", std::time::Duration::ZERO);
        child.kill().unwrap();
        child.wait().unwrap();
        again.unwrap();
    }

    #[test]
    fn usage_counts_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/f"), vec![1u8; 10000]).unwrap();
        let (bytes, inodes) = tree_usage(d.path()).unwrap();
        assert_eq!(inodes, 2);
        assert!(bytes >= 10000, "{bytes}");
        assert!(statvfs(d.path()).unwrap().total_bytes > 0);
    }
}
