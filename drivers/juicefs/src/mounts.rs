//! Whole-filesystem `juicefs mount`s, one per filesystem and option set,
//! each under `<root>/<key>`. The daemons are started detached (their own
//! session, optionally their own cgroups), so they outlive the process that
//! started them; the mount table, not memory, says what is mounted.

use crate::fs::Cli;
use crate::secret::FsSecret;
use csi_core::daemon::Spawner;
use csi_core::mount::{MountInfo, Mounter};
use csi_core::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, OwnedMutexGuard};

/// Filesystem type of JuiceFS mounts in the mount table.
pub const FS_TYPE: &str = "fuse.juicefs";

/// State of a filesystem mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Mounted and answering.
    Up,
    /// In the mount table, but its daemon is gone (ENOTCONN).
    Dead(String),
    /// Not mounted.
    Absent,
}

/// The filesystem mounts under one directory.
pub struct FsMounts {
    root: PathBuf,
    cli: Arc<Cli>,
    spawner: Arc<dyn Spawner>,
    mounter: Arc<dyn Mounter>,
    timeout: Duration,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    formatted: Mutex<HashSet<String>>,
    /// Notified when a mount daemon this process started exits.
    pub died: Arc<Notify>,
}

/// FNV-1a: a stable hash for mount keys (std's hasher may change).
fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The last non-empty line of a daemon log, without juicefs's prefix.
fn last_line(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    crate::fs::reason_of(&text)
}

impl FsMounts {
    /// Mounts under `root`, each mount, unmount and check bounded by `timeout`.
    pub fn new(
        root: &Path,
        cli: Arc<Cli>,
        spawner: Arc<dyn Spawner>,
        mounter: Arc<dyn Mounter>,
        timeout: Duration,
    ) -> Self {
        Self {
            root: root.to_path_buf(),
            cli,
            spawner,
            mounter,
            timeout,
            locks: Mutex::default(),
            formatted: Mutex::default(),
            died: Arc::default(),
        }
    }

    /// The key of filesystem `fs` mounted with `options`: its name and a
    /// hash of its metadata URL and the options.
    pub fn key(fs: &FsSecret, options: &[String]) -> String {
        let mut parts = vec![fs.name.as_str(), fs.metaurl.as_str()];
        parts.extend(fs.mount_options.iter().map(String::as_str));
        parts.extend(options.iter().map(String::as_str));
        format!("{}-{:016x}", fs.name, fnv(&parts))
    }

    /// Where the filesystem with `key` is mounted.
    pub fn mountpoint(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Serializes work on one filesystem mount.
    pub async fn lock(&self, key: &str) -> OwnedMutexGuard<()> {
        let m = self
            .locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_owned())
            .or_default()
            .clone();
        m.lock_owned().await
    }

    /// The mount table.
    pub async fn table(&self) -> Result<Arc<[MountInfo]>> {
        self.mounter.mounts().await
    }

    /// The JuiceFS mount at the mountpoint of `key`, if any.
    pub async fn entry(&self, key: &str) -> Result<Option<MountInfo>> {
        let mp = self.mountpoint(key);
        Ok(self
            .table()
            .await?
            .iter()
            .rev()
            .find(|m| m.mount_point == mp && m.fs_type == FS_TYPE)
            .cloned())
    }

    /// Keys of the JuiceFS mounts under the root (mounted by this or an earlier process).
    pub async fn mounted_keys(&self) -> Result<Vec<String>> {
        Ok(self
            .table()
            .await?
            .iter()
            .filter(|m| m.fs_type == FS_TYPE && m.mount_point.parent() == Some(&self.root))
            .filter_map(|m| Some(m.mount_point.file_name()?.to_str()?.to_owned()))
            .collect())
    }

    /// Whether the mount of `key` is up, dead or absent. A mount that hangs
    /// with no juicefs process left is aborted and reported dead.
    pub async fn health(&self, key: &str) -> Result<Health> {
        let Some(entry) = self.entry(key).await? else {
            return Ok(Health::Absent);
        };
        let mp = self.mountpoint(key);
        Ok(
            match csi_core::fuse::probe(&mp, &entry.dev, self.timeout).await? {
                None => Health::Up,
                Some(why) => Health::Dead(why),
            },
        )
    }

    /// Makes sure `fs` is mounted under `key` (the caller holds
    /// [`FsMounts::lock`]): an answering mount is kept as it is, a dead one
    /// is detached and mounted again. Formats the filesystem on first use.
    /// Returns true when it mounted now.
    pub async fn ensure(&self, key: &str, fs: &FsSecret, options: &[String]) -> Result<bool> {
        match self.health(key).await? {
            Health::Up => return Ok(false),
            Health::Dead(_) => {
                let mp = self.mountpoint(key);
                self.mounter.unmount_network(&mp, self.timeout).await?;
            }
            Health::Absent => {}
        }
        let known = self
            .formatted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(key);
        if !known {
            self.cli.ensure_formatted(fs).await?;
            self.formatted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.to_owned());
        }
        self.mount(key, fs, options).await?;
        Ok(true)
    }

    /// Starts `juicefs mount` for `key` and waits until the mount is in the
    /// table; its log is `<root>/<key>.log`.
    async fn mount(&self, key: &str, fs: &FsSecret, options: &[String]) -> Result<()> {
        let mp = self.mountpoint(key);
        let log = self.root.join(format!("{key}.log"));
        let dir = mp.clone();
        csi_core::fsutil::blocking("creating a mountpoint", self.timeout, move || {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::io(format!("creating {}", dir.display()), e))
        })
        .await?;
        let mp_arg = mp.to_string_lossy();
        let mut args = vec!["mount", "--no-usage-report"];
        args.extend(fs.mount_options.iter().map(String::as_str));
        args.extend(options.iter().map(String::as_str));
        args.extend([fs.metaurl.as_str(), mp_arg.as_ref()]);
        let cmd = self.cli.command(fs, &args);
        let daemon = self.spawner.spawn(&cmd, &log)?;
        let mut exited = daemon.exited.clone();
        let died = self.died.clone();
        tokio::spawn(async move {
            if exited.wait_for(Option::is_some).await.is_ok() {
                died.notify_one();
            }
        });
        let start = Instant::now();
        loop {
            if self.entry(key).await?.is_some() {
                return Ok(());
            }
            if let Some(code) = *daemon.exited.borrow() {
                return Err(Error::Unavailable(format!(
                    "juicefs mount of {:?} exited ({code}): {} (log: {})",
                    fs.name,
                    last_line(&log),
                    log.display()
                )));
            }
            if start.elapsed() > self.timeout {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(daemon.pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
                return Err(Error::DeadlineExceeded(format!(
                    "juicefs mount of {:?} was not ready within {:?}: {} (log: {})",
                    fs.name,
                    self.timeout,
                    last_line(&log),
                    log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Unmounts the filesystem of `key` (forcing, then detaching, when it
    /// is busy or dead) and removes its mountpoint; its daemon then exits.
    pub async fn unmount(&self, key: &str) -> Result<()> {
        let mp = self.mountpoint(key);
        // Every view of the mount: its daemon exits once the last is gone.
        let mut views = csi_core::mount::views(&self.table().await?, &mp);
        if views.is_empty() {
            views.push(mp.clone());
        }
        for v in &views {
            self.mounter.unmount_network(v, self.timeout).await?;
        }
        let dir = mp.clone();
        csi_core::fsutil::blocking("removing a mountpoint", self.timeout, move || {
            match std::fs::remove_dir(&dir) {
                // Still a mountpoint in another mount namespace: the
                // directory stays, to be used again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    tracing::warn!(path = %dir.display(), "mountpoint busy elsewhere; kept");
                    Ok(())
                }
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io(format!("removing {}", dir.display()), e))
                }
                _ => Ok(()),
            }
        })
        .await
    }
}
