//! The node: one mount per filesystem (and option set), bind mounts of
//! volume directories at their targets, released with the last target.
//!
//! What the node knows lives in a state file (0600 in a 0700 directory: it
//! holds the filesystems' Secrets, which a dead mount needs to be mounted
//! again when no call brings them) and in the mount table, which decides
//! what is mounted. A restarted plugin keeps every live mount as it is.

use crate::controller::fs_of;
use crate::error::JuicefsError;
use crate::id::VolumeId;
use crate::mounts::{FS_TYPE, FsMounts, Health};
use crate::{Config, FsSecret, Juicefs, NodeConfig};
use async_trait::async_trait;
use csi_core::backend::{NodeBackend, NodeInfo, NodeRpc, VolumeStats};
use csi_core::fsutil::{DirLock, LOCK_WAIT};
use csi_core::mount::{MountInfo, Mounter};
use csi_core::stats::{Heals, StatsCache};
use csi_core::types::{AccessMode, AccessType, PublishVolume};
use csi_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{info, warn};

/// How long the volume condition reports that a mount was restored.
const HEAL_REPORT: Duration = Duration::from_secs(600);

/// A filesystem the node mounts: what is needed to mount it again.
#[derive(Clone, Serialize, Deserialize)]
struct SavedFs {
    secret: FsSecret,
    options: Vec<String>,
}

/// A published volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Target {
    volume_id: String,
    key: String,
    /// Directory in the filesystem, relative to its root ("" for the root).
    path: String,
    readonly: bool,
    single_writer: bool,
}

#[derive(Clone, Default, Serialize, Deserialize)]
struct Saved {
    filesystems: BTreeMap<String, SavedFs>,
    targets: BTreeMap<PathBuf, Target>,
}

/// The node side of the driver.
pub(crate) struct Node {
    cfg: NodeConfig,
    mounts: FsMounts,
    mounter: Arc<dyn Mounter>,
    /// Keeps a second plugin off the state directory while this one runs.
    _lock: DirLock,
    timeout: Duration,
    file: PathBuf,
    saved: Mutex<Saved>,
    /// Held across serializing and writing, so writes land in order.
    save_lock: tokio::sync::Mutex<()>,
    /// Per filesystem key: when its mount was restored, and what happened.
    heals: Heals,
    stats: StatsCache,
}

fn describe(e: &Error) -> String {
    match e {
        Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOTCONN) => format!(
            "the juicefs mount process is gone ({e}); the plugin is mounting the filesystem again"
        ),
        _ => format!("the JuiceFS mount does not answer: {e}"),
    }
}

fn ctx<'a>(c: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    c.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
}

impl Node {
    /// Opens the node's state under `cfg.state_dir`.
    pub(crate) fn open(
        cfg: &Config,
        node: NodeConfig,
        mounts: FsMounts,
        mounter: Arc<dyn Mounter>,
    ) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let dir = &cfg.state_dir;
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(format!("chmod {}", dir.display()), e))?;
        // Two plugins on one state directory would restore the same mounts.
        let lock = DirLock::acquire(dir, "state directory", LOCK_WAIT)?;
        let file = dir.join("node-state.json");
        let saved = match std::fs::read(&file) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| Error::Internal(format!("{} is corrupt: {e}", file.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
            Err(e) => return Err(Error::io(format!("reading {}", file.display()), e)),
        };
        Ok(Self {
            _lock: lock,
            cfg: node,
            mounts,
            mounter,
            timeout: cfg.mount_timeout,
            file,
            saved: Mutex::new(saved),
            save_lock: tokio::sync::Mutex::default(),
            heals: Heals::new(HEAL_REPORT),
            stats: StatsCache::new("the JuiceFS mount is not responding", describe),
        })
    }

    fn saved<T>(&self, f: impl FnOnce(&mut Saved) -> T) -> T {
        f(&mut self.saved.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Writes the state file (temp file, fsync, rename).
    async fn save(&self) -> Result<()> {
        let _order = self.save_lock.lock().await;
        let data = self
            .saved(|s| serde_json::to_vec(s))
            .map_err(|e| Error::Internal(e.to_string()))?;
        let file = self.file.clone();
        csi_core::fsutil::blocking("saving the node state", self.timeout, move || {
            csi_core::fsutil::atomic_write(&file, &data)
        })
        .await
    }

    /// The mount at exactly `path`.
    async fn mount_at(&self, path: &Path) -> Result<Option<MountInfo>> {
        Ok(self
            .mounter
            .mounts()
            .await?
            .iter()
            .rev()
            .find(|m| m.mount_point == path)
            .cloned())
    }

    /// Runs blocking filesystem work under the mount deadline.
    async fn blocking<T: Send + 'static>(
        &self,
        what: String,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        csi_core::fsutil::blocking(what, self.timeout, f).await
    }

    /// Binds directory `path` of the mount of `key` at `target`.
    async fn bind(&self, key: &str, path: &str, target: &Path, readonly: bool) -> Result<()> {
        let src = self.mounts.mountpoint(key).join(path);
        let t = target.to_path_buf();
        self.blocking(format!("creating {}", t.display()), move || {
            std::fs::create_dir_all(&t)
                .map_err(|e| Error::io(format!("creating {}", t.display()), e))
        })
        .await?;
        self.mounter.bind(&src, target, readonly, &[]).await
    }

    /// Unmounts `target`, every mount stacked there (forcing, then
    /// detaching, when busy or dead), and removes the directory.
    async fn unbind(&self, target: &Path) -> Result<()> {
        self.mounter.unmount_network(target, self.timeout).await?;
        self.stats.forget(target);
        let t = target.to_path_buf();
        self.blocking(
            format!("removing {}", t.display()),
            move || match std::fs::remove_dir(&t) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io(format!("removing {}", t.display()), e))
                }
                _ => Ok(()),
            },
        )
        .await
    }

    /// Makes sure the mount of `key` is up and every target of it is bound
    /// to that mount (the caller holds the key's lock): a dead or vanished
    /// mount is mounted again and its targets re-bound, which the volume
    /// condition then reports.
    async fn restore(&self, key: &str) -> Result<()> {
        let Some(fs) = self.saved(|s| s.filesystems.get(key).cloned()) else {
            return Ok(());
        };
        let dead = match self.mounts.health(key).await? {
            Health::Dead(why) => Some(why),
            Health::Up | Health::Absent => None,
        };
        self.mounts.ensure(key, &fs.secret, &fs.options).await?;
        let targets: Vec<(PathBuf, Target)> = self.saved(|s| {
            s.targets
                .iter()
                .filter(|(_, t)| t.key == key)
                .map(|(p, t)| (p.clone(), t.clone()))
                .collect()
        });
        let live = self.mounts.entry(key).await?.map(|m| m.dev);
        let mut rebound = 0;
        for (path, t) in &targets {
            match self.mount_at(path).await? {
                Some(m) if Some(&m.dev) == live.as_ref() => continue,
                // Stacked on the dead bind, not in its place: a container
                // that mounted the target with HostToContainer propagation
                // receives a mount made on top of it, never a replacement.
                Some(_) => {
                    let src = self.mounts.mountpoint(key).join(&t.path);
                    self.mounter.bind(&src, path, t.readonly, &[]).await?;
                }
                None => self.bind(key, &t.path, path, t.readonly).await?,
            }
            self.stats.forget(path);
            rebound += 1;
        }
        if dead.is_none() && rebound == 0 {
            return Ok(());
        }
        let why = dead.unwrap_or_else(|| "it was no longer mounted".into());
        let msg = format!(
            "the juicefs mount of filesystem {:?} was lost ({why}); the plugin mounted it again and re-bound {rebound} target(s)",
            fs.secret.name
        );
        warn!(key, rebound, "restored a lost JuiceFS mount");
        self.heals.record(key, msg);
        Ok(())
    }

    /// Restores every filesystem mount that targets use.
    async fn check(&self) {
        let keys: Vec<String> = self.saved(|s| {
            let mut k: Vec<String> = s.targets.values().map(|t| t.key.clone()).collect();
            k.sort();
            k.dedup();
            k
        });
        for key in keys {
            let _lock = self.mounts.lock(&key).await;
            if let Err(e) = self.restore(&key).await {
                warn!(key, "restoring a JuiceFS mount failed, will retry: {e}");
            }
        }
    }

    /// Unmounts the filesystem of `key` when no target uses it any more.
    async fn release_if_unused(&self, key: &str) -> Result<()> {
        let used = self.saved(|s| s.targets.values().any(|t| t.key == key));
        if used {
            return Ok(());
        }
        self.mounts.unmount(key).await?;
        self.saved(|s| s.filesystems.remove(key));
        self.heals.forget(key);
        self.save().await
    }
}

impl Juicefs {
    fn host(&self) -> Result<&Node> {
        self.node
            .as_ref()
            .ok_or_else(|| Error::Unimplemented("this process is not a node plugin".into()))
    }

    /// After a restart: keeps every live mount, forgets targets that are
    /// no longer mounted (the kubelet publishes them again) and unmounts
    /// filesystems nothing uses.
    pub(crate) async fn adopt(&self) -> Result<()> {
        let n = self.host()?;
        let table = n.mounter.mounts().await?;
        let gone: Vec<PathBuf> = n.saved(|s| {
            s.targets
                .keys()
                .filter(|p| !table.iter().any(|m| &m.mount_point == *p))
                .cloned()
                .collect()
        });
        n.saved(|s| gone.iter().for_each(|p| drop(s.targets.remove(p))));
        let mut keys: Vec<String> = n.saved(|s| s.filesystems.keys().cloned().collect());
        keys.extend(n.mounts.mounted_keys().await?);
        keys.sort();
        keys.dedup();
        for key in &keys {
            if !n.saved(|s| s.filesystems.contains_key(key)) {
                n.mounts.unmount(key).await?; // no state: nothing can use it
            } else {
                n.release_if_unused(key).await?;
            }
        }
        n.save().await?;
        let (fs, targets) = n.saved(|s| (s.filesystems.len(), s.targets.len()));
        info!(
            filesystems = fs,
            targets,
            dropped = gone.len(),
            "re-adopted JuiceFS mounts"
        );
        Ok(())
    }

    /// Checks the mounts every `check_interval` and whenever a daemon exits.
    pub(crate) async fn check_forever(self: Arc<Self>) {
        let Ok(n) = self.host() else { return };
        loop {
            n.check().await;
            let died = n.mounts.died.notified();
            if n.cfg.check_interval.is_zero() {
                died.await;
            } else {
                let _ = tokio::time::timeout(n.cfg.check_interval, died).await;
            }
        }
    }
}

/// juicefs mount options for a volume: the PV's (capability mount flags),
/// then the StorageClass's from the volume context.
fn mount_options(req: &PublishVolume) -> Result<Vec<String>> {
    let AccessType::Mount { flags, fs_type, .. } = &req.capability.access else {
        return Err(Error::InvalidArgument(
            "JuiceFS volumes are directories: volumeMode Block is not supported".into(),
        ));
    };
    if !matches!(fs_type.as_str(), "" | "juicefs") {
        return Err(Error::InvalidArgument(format!(
            "fsType {fs_type:?} was requested; JuiceFS volumes are juicefs"
        )));
    }
    let mut o = Vec::new();
    for f in flags {
        o.extend(crate::secret::options("mountOptions", f)?);
    }
    if let Some(extra) = ctx(&req.volume_context, "mountOptions") {
        o.extend(crate::secret::options("mountOptions", extra)?);
    }
    Ok(o)
}

/// The volume's directory ("" for the whole filesystem): a provisioned
/// volume's from [`crate::PATH_KEY`] in its context, a static volume's from
/// its `path` attribute.
fn volume_dir(req: &PublishVolume) -> Result<String> {
    let ours = VolumeId::parse(&req.volume_id).is_some();
    let key = if ours { crate::PATH_KEY } else { "path" };
    let Some(p) = ctx(&req.volume_context, key) else {
        return Err(if ours {
            Error::InvalidArgument(format!(
                "volume {} has no {key:?} in its volume context; pass the context CreateVolume returned",
                req.volume_id
            ))
        } else {
            Error::NotFound(format!(
                "volume {:?} is unknown: it is no id this driver made, and a static volume names its directory in the volume attribute \"path\" (\"/\" for the whole filesystem)",
                req.volume_id
            ))
        });
    };
    if p.trim_matches('/').is_empty() {
        return Ok(String::new());
    }
    csi_core::types::check_sub_dir(p, crate::params::RESERVED).map_err(|why| {
        JuicefsError::BadPath {
            from: "the volume context",
            path: p.to_owned(),
            why,
        }
        .into()
    })
}

#[async_trait]
impl NodeBackend for Juicefs {
    fn node_capabilities(&self) -> Vec<NodeRpc> {
        vec![
            NodeRpc::GetVolumeStats,
            NodeRpc::VolumeCondition,
            NodeRpc::SingleNodeMultiWriter,
        ]
    }

    fn node_info(&self) -> NodeInfo {
        NodeInfo {
            node_id: self
                .node
                .as_ref()
                .map(|n| n.cfg.node_id.clone())
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    async fn publish(&self, req: PublishVolume) -> Result<()> {
        let n = self.host()?;
        let fs = fs_of(&req.secrets, "NodePublishVolume", "node-publish")?;
        if let Some(id) = VolumeId::parse(&req.volume_id)
            && id.fs != fs.name
        {
            return Err(JuicefsError::WrongFilesystem {
                volume: req.volume_id.clone(),
                on: id.fs,
                secret: fs.name,
            }
            .into());
        }
        let options = mount_options(&req)?;
        let dir = volume_dir(&req)?;
        let single_writer = req.capability.mode == AccessMode::SingleNodeSingleWriter;
        let elsewhere = n.saved(|s| {
            s.targets
                .iter()
                .find(|(p, t)| {
                    t.volume_id == req.volume_id
                        && **p != req.target_path
                        && (single_writer || t.single_writer)
                })
                .map(|(p, _)| p.clone())
        });
        if let Some(other) = elsewhere {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is single-writer and already published at {}",
                req.volume_id,
                other.display()
            )));
        }
        let key = FsMounts::key(&fs, &options);
        let _lock = n.mounts.lock(&key).await;
        n.saved(|s| {
            s.filesystems.insert(
                key.clone(),
                SavedFs {
                    secret: fs.clone(),
                    options: options.clone(),
                },
            )
        });
        let result = async {
            n.restore(&key).await?;
            let src = n.mounts.mountpoint(&key).join(&dir);
            let is_dir = n
                .blocking(format!("looking up {}", src.display()), move || {
                    match std::fs::metadata(&src) {
                        Ok(m) => Ok(m.is_dir()),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                        Err(e) => Err(Error::io(format!("looking up {}", src.display()), e)),
                    }
                })
                .await?;
            if !is_dir {
                return Err(Error::NotFound(format!(
                    "volume {}: directory /{dir} does not exist on filesystem {:?} (deleted, or a static volume naming a missing directory)",
                    req.volume_id, fs.name
                )));
            }
            let live = n.mounts.entry(&key).await?.map(|m| m.dev);
            if let Some(m) = n.mount_at(&req.target_path).await? {
                let same = Some(&m.dev) == live.as_ref()
                    && m.root == Path::new("/").join(&dir)
                    && m.read_only() == req.readonly;
                if !same {
                    return Err(Error::AlreadyExists(format!(
                        "{} already has {} ({}{}) mounted, not volume {}",
                        req.target_path.display(),
                        m.source,
                        m.root.display(),
                        if m.read_only() { ", read-only" } else { "" },
                        req.volume_id
                    )));
                }
            } else {
                n.bind(&key, &dir, &req.target_path, req.readonly).await?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            n.release_if_unused(&key).await.ok();
            return Err(e);
        }
        n.saved(|s| {
            s.targets.insert(
                req.target_path.clone(),
                Target {
                    volume_id: req.volume_id.clone(),
                    key: key.clone(),
                    path: dir,
                    readonly: req.readonly,
                    single_writer,
                },
            )
        });
        n.save().await
    }

    async fn unpublish(&self, volume_id: &str, target_path: &Path) -> Result<()> {
        let n = self.host()?;
        let Some(t) = n.saved(|s| s.targets.get(target_path).cloned()) else {
            // Not ours (or state lost): unmount a JuiceFS bind left there.
            if n.mount_at(target_path)
                .await?
                .is_some_and(|m| m.fs_type == FS_TYPE)
            {
                warn!(volume_id, target = %target_path.display(), "unmounting an unrecorded JuiceFS target");
            }
            return n.unbind(target_path).await;
        };
        let _lock = n.mounts.lock(&t.key).await;
        n.unbind(target_path).await?;
        n.saved(|s| s.targets.remove(target_path));
        n.save().await?;
        n.release_if_unused(&t.key).await
    }

    async fn stats(&self, volume_id: &str, path: &Path) -> Result<VolumeStats> {
        let n = self.host()?;
        let Some(t) = n
            .saved(|s| s.targets.get(path).cloned())
            .filter(|t| t.volume_id == volume_id)
        else {
            return Err(Error::NotFound(format!(
                "volume {volume_id:?} is not published at {}",
                path.display()
            )));
        };
        let mut s = if n.mount_at(path).await?.is_none() {
            VolumeStats {
                abnormal: Some(format!("{} is no longer mounted", path.display())),
                ..Default::default()
            }
        } else {
            n.stats
                .get(path, n.cfg.stats_cache, n.cfg.stats_timeout)
                .await
        };
        if s.abnormal.is_some() {
            n.mounts.died.notify_one(); // check (and restore) now
        } else if !t.path.is_empty() {
            let dir = n.mounts.mountpoint(&t.key).join(&t.path);
            let found = n
                .blocking(format!("looking up {}", dir.display()), move || {
                    Ok(dir.is_dir())
                })
                .await;
            if !matches!(found, Ok(true)) {
                s.abnormal = Some(format!(
                    "directory /{} of the volume no longer exists on the filesystem (removed behind the driver's back?)",
                    t.path
                ));
            }
        }
        n.heals.report(&t.key, &mut s);
        Ok(s)
    }
}
