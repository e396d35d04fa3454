//! The node: kernel NFS mounts at stage (or publish), bind mounts at
//! publish. Nothing here touches a mounted filesystem on the runtime, and
//! the mount table (not stat) decides what is mounted, so a dead server
//! blocks only the calls for its own volumes, each for a bounded time.

use crate::id::Source;
use crate::{Nfs, NodeConfig};
use async_trait::async_trait;
use csi_core::backend::{NodeBackend, NodeInfo, NodeRpc, VolumeStats};
use csi_core::mount::{MountInfo, Mounter};
use csi_core::stats::StatsCache;
use csi_core::types::{AccessType, Capability, PublishVolume, StageVolume};
use csi_core::{Error, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Volume-context key kubelet sets on CSI inline (ephemeral) volumes.
const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";

/// What the node plugin keeps in memory: which volume it mounted where, and
/// NodeGetVolumeStats answers (cached for a while, one statfs per path in
/// flight, and a statfs that does not return is reported, not waited on).
pub struct NodeState {
    stats: StatsCache,
    /// Volume id mounted at each staging or target path by this process.
    held: Mutex<HashMap<PathBuf, String>>,
}

fn ctx<'a>(c: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    c.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v.as_str())
}

/// Mount options for a volume: the capability's, then the StorageClass's
/// `mountOptions` and `nfsvers` from the volume context, then `ro`.
fn options(cap: &Capability, c: &HashMap<String, String>, readonly: bool) -> Result<Vec<String>> {
    let AccessType::Mount { flags, fs_type, .. } = &cap.access else {
        return Err(crate::NfsError::Block.into());
    };
    if !matches!(fs_type.as_str(), "" | "nfs" | "nfs4") {
        return Err(Error::InvalidArgument(format!(
            "fsType {fs_type:?} was requested; NFS volumes are nfs or nfs4"
        )));
    }
    let mut o: Vec<String> = flags.clone();
    if let Some(extra) = ctx(c, "mountOptions") {
        o.extend(
            extra
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from),
        );
    }
    let has_vers = o
        .iter()
        .flat_map(|f| f.split(','))
        .any(|f| f.starts_with("vers=") || f.starts_with("nfsvers="));
    if let Some(v) = ctx(c, "nfsvers").filter(|_| !has_vers) {
        o.push(format!("nfsvers={v}"));
    }
    if readonly {
        o.push("ro".into());
    }
    if o.iter().any(|f| f.contains(['\0', ' ', '\n'])) {
        return Err(Error::InvalidArgument(format!(
            "mount options {o:?} must not contain spaces, newlines or NUL"
        )));
    }
    Ok(o)
}

impl Nfs {
    fn host(&self) -> Result<(&NodeConfig, &Arc<dyn Mounter>)> {
        self.node
            .as_ref()
            .map(|(c, m)| (c, m))
            .ok_or_else(|| Error::Unimplemented("this process is not a node plugin".into()))
    }

    /// The mount at exactly `path`, from the mount table only.
    async fn mount_at(&self, path: &Path) -> Result<Option<MountInfo>> {
        let (_, m) = self.host()?;
        Ok(m.mounts()
            .await?
            .iter()
            .rev()
            .find(|i| i.mount_point == path)
            .cloned())
    }

    /// Creates a directory on the node's own filesystem, under a deadline.
    async fn make_dir(&self, path: &Path) -> Result<()> {
        let (cfg, _) = self.host()?;
        let p = path.to_path_buf();
        csi_core::fsutil::blocking(
            format!("creating {}", p.display()),
            cfg.mount_timeout,
            move || {
                std::fs::create_dir_all(&p)
                    .map_err(|e| Error::io(format!("creating {}", p.display()), e))
            },
        )
        .await
    }

    /// Removes an (unmounted) directory; success when it is gone.
    async fn remove_dir(&self, path: &Path) -> Result<()> {
        let (cfg, _) = self.host()?;
        let p = path.to_path_buf();
        csi_core::fsutil::blocking(
            format!("removing {}", p.display()),
            cfg.mount_timeout,
            move || match std::fs::remove_dir(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io(format!("removing {}", p.display()), e))
                }
                _ => Ok(()),
            },
        )
        .await
    }

    /// Mounts `src` at `target` with kernel NFS (idempotent).
    async fn mount_nfs(
        &self,
        src: &Source,
        target: &Path,
        options: &[String],
        mode: Option<&str>,
    ) -> Result<()> {
        let (cfg, m) = self.host()?;
        let device = src.device();
        if let Some(info) = self.mount_at(target).await? {
            if info.source == device {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "{} already has {} mounted, not {device}",
                target.display(),
                info.source
            )));
        }
        self.make_dir(target).await?;
        m.mount(&device, target, "nfs", options)
            .await
            .map_err(|e| match e {
                Error::Internal(msg) if msg.contains("No such file or directory") => {
                    Error::NotFound(format!("{device} does not exist on the server: {msg}"))
                }
                e => e,
            })?;
        if let Some(mode) = mode {
            let bits = u32::from_str_radix(mode, 8).map_err(|_| {
                Error::InvalidArgument(format!("mountPermissions {mode:?} is not an octal mode"))
            })?;
            let t = target.to_path_buf();
            let r = csi_core::fsutil::blocking(
                format!("chmod {mode} {}", t.display()),
                cfg.mount_timeout,
                move || {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&t, std::fs::Permissions::from_mode(bits))
                        .map_err(|e| Error::io(format!("chmod {}", t.display()), e))
                },
            )
            .await;
            if let Err(e) = r {
                let _ = m.unmount_network(target, cfg.mount_timeout).await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Unmounts whatever is at `path` (forcing when the server is gone) and
    /// removes the directory.
    async fn release(&self, path: &Path) -> Result<()> {
        let (cfg, m) = self.host()?;
        m.unmount_network(path, cfg.mount_timeout).await?;
        self.state.stats.forget(path);
        self.held(|h| h.remove(path));
        self.remove_dir(path).await
    }

    fn held<T>(&self, f: impl FnOnce(&mut HashMap<PathBuf, String>) -> T) -> T {
        f(&mut self.state.held.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether the NFS mount `info` at `path` holds volume `id`: the paths
    /// this process mounted are known; after a restart, an id that names
    /// its server path must match the mount's source, and a static volume's
    /// free-form handle (its server in the volume attributes, which later
    /// calls do not carry) cannot be checked, so it is believed.
    fn holds(&self, id: &str, path: &Path, info: &MountInfo) -> bool {
        if let Some(known) = self.held(|h| h.get(path).cloned()) {
            return known == id;
        }
        Source::find(id, &HashMap::new()).map_or(true, |s| s.device() == info.source)
    }
}

#[async_trait]
impl NodeBackend for Nfs {
    fn node_capabilities(&self) -> Vec<NodeRpc> {
        let mut caps = vec![NodeRpc::GetVolumeStats, NodeRpc::VolumeCondition];
        if self.node.as_ref().is_some_and(|(c, _)| c.stage) {
            caps.push(NodeRpc::StageUnstageVolume);
        }
        caps
    }

    fn node_info(&self) -> NodeInfo {
        NodeInfo {
            node_id: self
                .node
                .as_ref()
                .map(|(c, _)| c.node_id.clone())
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    async fn stage(&self, req: StageVolume) -> Result<()> {
        let src = Source::find(&req.volume_id, &req.volume_context).map_err(Error::NotFound)?;
        let o = options(
            &req.capability,
            &req.volume_context,
            req.capability.mode.is_read_only(),
        )?;
        let mode = ctx(&req.volume_context, "mountPermissions");
        self.mount_nfs(&src, &req.staging_path, &o, mode).await?;
        self.held(|h| h.insert(req.staging_path.clone(), req.volume_id.clone()));
        Ok(())
    }

    async fn unstage(&self, volume_id: &str, staging_path: &Path) -> Result<()> {
        let (_, m) = self.host()?;
        if let Some(staged) = self.mount_at(staging_path).await? {
            if !self.holds(volume_id, staging_path, &staged) {
                return Err(Error::NotFound(format!(
                    "volume {volume_id:?} is not what is staged at {} ({})",
                    staging_path.display(),
                    staged.source
                )));
            }
            // Bind mounts of the staging mount: same superblock and source.
            // (All mounts of one export share a superblock and a root, so
            // the source tells the volume's directory apart.)
            let users: Vec<String> = m
                .mounts()
                .await?
                .iter()
                .filter(|e| {
                    e.dev == staged.dev
                        && e.source == staged.source
                        && e.mount_point != staging_path
                })
                .map(|e| e.mount_point.display().to_string())
                .collect();
            if !users.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {volume_id} is still published at {}; unpublish it first",
                    users.join(", ")
                )));
            }
        }
        self.release(staging_path).await
    }

    async fn publish(&self, req: PublishVolume) -> Result<()> {
        let (_, m) = self.host()?;
        let o = options(&req.capability, &req.volume_context, req.readonly)?;
        let ephemeral = ctx(&req.volume_context, EPHEMERAL) == Some("true");
        let staging = req.staging_path.as_ref().filter(|_| !ephemeral);
        let Some(staging) = staging else {
            let src = Source::find(&req.volume_id, &req.volume_context).map_err(Error::NotFound)?;
            let mode = ctx(&req.volume_context, "mountPermissions");
            self.mount_nfs(&src, &req.target_path, &o, mode).await?;
            self.held(|h| h.insert(req.target_path.clone(), req.volume_id.clone()));
            return Ok(());
        };
        let Some(staged) = self.mount_at(staging).await? else {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is not staged at {}; call NodeStageVolume first",
                req.volume_id,
                staging.display()
            )));
        };
        if !self.holds(&req.volume_id, staging, &staged) {
            return Err(Error::NotFound(format!(
                "volume {:?} is not what is staged at {} ({})",
                req.volume_id,
                staging.display(),
                staged.source
            )));
        }
        if let Some(info) = self.mount_at(&req.target_path).await? {
            if info.source == staged.source && info.read_only() == req.readonly {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "{} already has {} mounted{}",
                req.target_path.display(),
                info.source,
                if info.read_only() { " read-only" } else { "" }
            )));
        }
        self.make_dir(&req.target_path).await?;
        m.bind(staging, &req.target_path, req.readonly, &[]).await?;
        self.held(|h| h.insert(req.target_path.clone(), req.volume_id.clone()));
        Ok(())
    }

    async fn unpublish(&self, _volume_id: &str, target_path: &Path) -> Result<()> {
        self.release(target_path).await
    }

    async fn stats(&self, volume_id: &str, path: &Path) -> Result<VolumeStats> {
        let (cfg, _) = self.host()?;
        let Some(info) = self.mount_at(path).await? else {
            return Err(Error::NotFound(format!(
                "volume {volume_id:?} is not mounted at {}",
                path.display()
            )));
        };
        if !info.fs_type.starts_with("nfs") || !self.holds(volume_id, path, &info) {
            return Err(Error::NotFound(format!(
                "volume {volume_id:?} is not what is mounted at {} ({} from {})",
                path.display(),
                info.fs_type,
                info.source
            )));
        }
        Ok(self
            .state
            .stats
            .get(path, cfg.stats_cache, cfg.stats_timeout)
            .await)
    }
}

impl Default for NodeState {
    fn default() -> Self {
        Self {
            stats: StatsCache::new("the NFS server is not responding", describe),
            held: Mutex::default(),
        }
    }
}

/// What a failed statfs of an NFS mount means.
fn describe(e: &Error) -> String {
    match e {
        Error::Io { source, .. } if matches!(source.raw_os_error(), Some(libc::ESTALE)) => {
            format!(
                "the NFS file handle is stale (the directory was removed or the export changed on the server): {e}"
            )
        }
        _ => format!("the NFS mount does not answer: {e}"),
    }
}
