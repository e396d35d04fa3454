//! Node side of local-path: staging (bind or loop + filesystem), publishing,
//! stats with volume condition, and filesystem growth.

use crate::meta::{Backing, VolumeMeta};
use crate::quota::Quotas;
use crate::{LocalPath, TOPOLOGY_KEY};
use csi_core::backend::{NodeBackend, NodeInfo, NodeRpc, VolumeStats};
use csi_core::devvol::{Format, elsewhere, mount_filesystem, publish_device, same_device};
use csi_core::mount::{MountInfo, MountState, exposures, vfs_flags};
use csi_core::types::{AccessMode, AccessType, Capability, NodeExpand, PublishVolume, StageVolume};
use csi_core::{Error, IoContext, Result};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn check_fits(v: &VolumeMeta, cap: &Capability) -> Result<()> {
    let ok = match (&cap.access, &v.backing) {
        (AccessType::Block, Backing::Block) => true,
        (AccessType::Block, _) | (_, Backing::Block) => false,
        (AccessType::Mount { fs_type, .. }, Backing::Filesystem { fs_type: have }) => {
            fs_type.is_empty() || fs_type == have
        }
        (AccessType::Mount { .. }, Backing::Directory) => true,
    };
    // The spec's node error tables: "Exceeds capabilities" is FAILED_PRECONDITION.
    if ok {
        Ok(())
    } else {
        Err(Error::FailedPrecondition(format!(
            "volume {} is {} and cannot be used as {:?}",
            v.id,
            v.backing.describe(),
            cap.access
        )))
    }
}

fn mount_flags(cap: &Capability) -> &[String] {
    match &cap.access {
        AccessType::Mount { flags, .. } => flags,
        AccessType::Block => &[],
    }
}

impl LocalPath {
    fn mode_of(v: &VolumeMeta) -> u32 {
        v.parameters
            .get("mode")
            .and_then(|m| u32::from_str_radix(m, 8).ok())
            .unwrap_or(0o777)
    }

    /// True when the filesystem on `dev` is known to be smaller than the device.
    async fn needs_growth(&self, dev: &Path, fs_type: &str) -> Result<bool> {
        Ok(match self.host.blockdev.fs_size(dev, fs_type).await? {
            Some(fs) => fs < self.host.blockdev.size(dev).await?,
            None => false,
        })
    }

    async fn stage_filesystem(
        &self,
        v: &VolumeMeta,
        fs_type: &str,
        req: &StageVolume,
    ) -> Result<()> {
        let img = self.volume_path(v);
        let dev = self.host.loops.attach_loop(&img).await?;
        let format = Format {
            fs_type,
            mkfs_args: &[],
            options: mount_flags(&req.capability),
        };
        let what = format!("volume {}", v.id);
        let fresh = mount_filesystem(
            self.host.blockdev.as_ref(),
            self.host.mounter.as_ref(),
            &dev,
            &req.staging_path,
            format,
            &what,
        )
        .await?;
        if fresh {
            let (root, mode) = (req.staging_path.clone(), Self::mode_of(v));
            self.fs("setting a new volume's mode", move || {
                std::fs::set_permissions(&root, std::fs::Permissions::from_mode(mode))
                    .ctx(|| format!("chmod {}", root.display()))
            })
            .await?;
        }
        Ok(())
    }

    /// Mounts on this node through which the volume's data is reachable:
    /// its staging mount and every publish (the kernel's view, so it holds
    /// across plugin restarts). For raw block volumes, binds of its loop device.
    pub(crate) async fn exposures(&self, v: &VolumeMeta) -> Result<Vec<MountInfo>> {
        Ok(self.usage(v).await?.1)
    }

    /// The loop device of an image volume (None when detached or a
    /// directory) and the volume's [`exposures`](Self::exposures), from one
    /// look at the loop devices and the mount table.
    pub(crate) async fn usage(&self, v: &VolumeMeta) -> Result<(Option<PathBuf>, Vec<MountInfo>)> {
        let data = self.volume_path(v);
        let dev = match v.backing {
            Backing::Directory => None,
            _ => match self.host.loops.find_loop(&data).await? {
                Some(dev) => Some(dev),
                None => return Ok((None, vec![])),
            },
        };
        let mounts = self.host.mounter.mounts().await?;
        let exposed = match (&v.backing, &dev) {
            (Backing::Filesystem { .. }, Some(dev)) => mounts
                .iter()
                .filter(|m| Path::new(&m.source) == dev)
                .cloned()
                .collect(),
            (_, Some(dev)) => exposures(&mounts, dev),
            (_, None) => exposures(&mounts, &data),
        };
        Ok((dev, exposed))
    }

    /// NotFound unless `path` is a mount of this volume (or, for a raw block
    /// volume, its device node).
    async fn check_holds(&self, v: &VolumeMeta, path: &Path) -> Result<()> {
        let (dev, exposed) = self.usage(v).await?;
        if exposed.iter().any(|m| m.mount_point == path) {
            return Ok(());
        }
        if v.backing == Backing::Block
            && let Some(dev) = dev
            && same_device(path, &dev).await?
        {
            return Ok(());
        }
        Err(Error::NotFound(format!(
            "volume {} is not mounted at {}",
            v.id,
            path.display()
        )))
    }

    async fn apply_mount_group(&self, root: &Path, group: &str) -> Result<()> {
        let gid: u32 = group.parse().map_err(|_| {
            Error::InvalidArgument(format!(
                "volume_mount_group {group:?} is not a numeric group id"
            ))
        })?;
        let root = root.to_path_buf();
        self.fs("giving the volume to its fsGroup", move || {
            std::os::unix::fs::chown(&root, None, Some(gid))
                .ctx(|| format!("chgrp {gid} {}", root.display()))?;
            let mode = std::fs::metadata(&root)
                .ctx(|| format!("stat {}", root.display()))?
                .mode();
            std::fs::set_permissions(
                &root,
                std::fs::Permissions::from_mode((mode & 0o7777) | 0o2070),
            )
            .ctx(|| format!("chmod g+rwxs {}", root.display()))
        })
        .await
    }

    /// `same_file`, off the runtime.
    async fn is_same_file(&self, a: &Path, b: &Path) -> Result<bool> {
        let (a, b) = (a.to_path_buf(), b.to_path_buf());
        self.fs("comparing mount sources", move || Ok(same_file(&a, &b)))
            .await
    }

    /// `mkdir -p`, off the runtime.
    async fn mkdirs(&self, dir: &Path) -> Result<()> {
        let dir = dir.to_path_buf();
        self.fs("creating a directory", move || {
            std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))
        })
        .await
    }
}

/// Usage of a healthy volume mounted at `path` (blocking).
fn measure(
    v: &VolumeMeta,
    data: &Path,
    path: &Path,
    base: &Path,
    quotas: Option<&Quotas>,
) -> Result<VolumeStats> {
    let mut stats = VolumeStats::default();
    match &v.backing {
        Backing::Directory => {
            // Without a project quota the only measure is a walk of the tree.
            let (used, inodes) = match (quotas, v.project_id) {
                (Some(q), Some(p)) => q.usage(p)?,
                _ => csi_core::fsutil::tree_usage(data)?,
            };
            let fs = csi_core::fsutil::statvfs(base)?;
            let avail = v.capacity.saturating_sub(used).min(fs.available_bytes);
            stats.bytes = Some((v.capacity, used, avail));
            // Filesystems without a fixed inode table (btrfs) report 0: omit inodes.
            stats.inodes =
                (fs.total_inodes > 0).then_some((fs.total_inodes, inodes, fs.free_inodes));
        }
        Backing::Filesystem { .. } => {
            let fs = csi_core::fsutil::statvfs(path)?;
            stats.bytes = Some((fs.total_bytes, fs.used_bytes, fs.available_bytes));
            stats.inodes = (fs.total_inodes > 0).then_some((
                fs.total_inodes,
                fs.total_inodes.saturating_sub(fs.free_inodes),
                fs.free_inodes,
            ));
        }
        Backing::Block => {
            let used = std::fs::metadata(data)
                .map(|m| m.blocks() * 512)
                .unwrap_or(0);
            stats.bytes = Some((
                v.capacity,
                used.min(v.capacity),
                v.capacity.saturating_sub(used),
            ));
        }
    }
    Ok(stats)
}

#[async_trait::async_trait]
impl NodeBackend for LocalPath {
    fn node_capabilities(&self) -> Vec<NodeRpc> {
        vec![
            NodeRpc::StageUnstageVolume,
            NodeRpc::GetVolumeStats,
            NodeRpc::ExpandVolume,
            NodeRpc::VolumeCondition,
            NodeRpc::SingleNodeMultiWriter,
            NodeRpc::VolumeMountGroup,
        ]
    }

    fn node_info(&self) -> NodeInfo {
        NodeInfo {
            node_id: self.cfg.node_id.clone(),
            max_volumes: self.cfg.max_volumes,
            topology: [(TOPOLOGY_KEY.to_owned(), self.cfg.node_id.clone())].into(),
        }
    }

    async fn stage(&self, req: StageVolume) -> Result<()> {
        let v = self.volume(&req.volume_id)?;
        check_fits(&v, &req.capability)?;
        if v.backing == Backing::Block {
            self.host.loops.attach_loop(&self.volume_path(&v)).await?;
            return Ok(());
        }
        self.mkdirs(&req.staging_path).await?;
        match &v.backing {
            Backing::Filesystem { fs_type } => self.stage_filesystem(&v, fs_type, &req).await,
            _ => {
                let data = self.volume_path(&v);
                let d = data.clone();
                if !self
                    .fs("looking at volume data", move || Ok(d.is_dir()))
                    .await?
                {
                    return Err(Error::FailedPrecondition(format!(
                        "the data directory of volume {} is missing ({})",
                        v.id,
                        data.display()
                    )));
                }
                match self.host.mounter.state(&req.staging_path).await? {
                    MountState::Mounted(m) => {
                        if self.is_same_file(&req.staging_path, &data).await? {
                            return Ok(());
                        }
                        Err(Error::AlreadyExists(format!(
                            "{} already has {} mounted",
                            req.staging_path.display(),
                            m.source
                        )))
                    }
                    state => {
                        if matches!(state, MountState::Dead(_)) {
                            self.host.mounter.unmount(&req.staging_path).await?;
                        }
                        self.host
                            .mounter
                            .bind(&data, &req.staging_path, false, &[])
                            .await
                    }
                }
            }
        }
    }

    async fn unstage(&self, volume_id: &str, staging_path: &Path) -> Result<()> {
        let volume = self.volume(volume_id).ok();
        if let Some(v) = &volume {
            let published = elsewhere(&self.exposures(v).await?, &[staging_path]);
            if !published.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {volume_id} is still published at {}; call NodeUnpublishVolume first",
                    published.join(", ")
                )));
            }
        }
        self.host.mounter.unmount(staging_path).await?;
        if let Some(v) = volume
            && v.backing.is_image()
        {
            let img = self.volume_path(&v);
            if let Some(dev) = self.host.loops.find_loop(&img).await? {
                self.host.loops.detach_loop(&dev).await?;
            }
        }
        Ok(())
    }

    async fn publish(&self, req: PublishVolume) -> Result<()> {
        let v = self.volume(&req.volume_id)?;
        check_fits(&v, &req.capability)?;
        let target = &req.target_path;
        if req.capability.mode == AccessMode::SingleNodeSingleWriter {
            let mut keep = vec![target.as_path()];
            keep.extend(req.staging_path.as_deref());
            let elsewhere = elsewhere(&self.exposures(&v).await?, &keep);
            if !elsewhere.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is SINGLE_NODE_SINGLE_WRITER (ReadWriteOncePod) and already published at {}",
                    v.id,
                    elsewhere.join(", ")
                )));
            }
        }
        if v.backing == Backing::Block {
            let img = self.volume_path(&v);
            let dev = self.host.loops.find_loop(&img).await?.ok_or_else(|| {
                Error::FailedPrecondition(format!("volume {} is not staged on this node", v.id))
            })?;
            return publish_device(self.host.mounter.as_ref(), &dev, target, req.readonly).await;
        }

        let staging: PathBuf = req
            .staging_path
            .clone()
            .ok_or_else(|| Error::InvalidArgument("staging_target_path is required".into()))?;
        if !matches!(
            self.host.mounter.state(&staging).await?,
            MountState::Mounted(_)
        ) {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is not staged at {}; call NodeStageVolume first",
                v.id,
                staging.display()
            )));
        }
        let flags: Vec<String> = match v.backing {
            // Filesystem options were applied at staging; keep only what a bind can carry.
            Backing::Filesystem { .. } => mount_flags(&req.capability)
                .iter()
                .flat_map(|f| f.split(','))
                .filter(|f| vfs_flags(&[f.to_string()]).is_ok())
                .map(str::to_owned)
                .collect(),
            _ => {
                vfs_flags(mount_flags(&req.capability))?;
                mount_flags(&req.capability).to_vec()
            }
        };
        self.mkdirs(target).await?;
        match self.host.mounter.state(target).await? {
            MountState::Mounted(m) => {
                if m.read_only() == req.readonly && self.is_same_file(target, &staging).await? {
                    return Ok(());
                }
                return Err(Error::AlreadyExists(format!(
                    "{} is already published with another volume or read-only setting",
                    target.display()
                )));
            }
            MountState::Dead(_) => self.host.mounter.unmount(target).await?,
            MountState::NotMounted => {}
        }
        if let AccessType::Mount {
            mount_group: Some(g),
            ..
        } = &req.capability.access
            && !req.readonly
        {
            self.apply_mount_group(&staging, g).await?;
        }
        self.host
            .mounter
            .bind(&staging, target, req.readonly, &flags)
            .await
    }

    async fn unpublish(&self, _volume_id: &str, target_path: &Path) -> Result<()> {
        self.host.mounter.unmount(target_path).await?;
        let t = target_path.to_path_buf();
        self.fs("removing the target", move || {
            csi_core::fsutil::remove_target(&t)
        })
        .await
    }

    async fn stats(&self, volume_id: &str, path: &Path) -> Result<VolumeStats> {
        let v = self.volume(volume_id)?;
        let data = self.volume_path(&v);
        let (p, d) = (path.to_path_buf(), data.clone());
        let look = self
            .fs("looking at the volume path", move || {
                Ok((std::fs::symlink_metadata(&p).map(drop), d.exists()))
            })
            .await?;
        let abnormal = match look {
            (Err(e), _) if e.raw_os_error() == Some(libc::ENOTCONN) => Some(format!(
                "the mount at {} is dead (ENOTCONN)",
                path.display()
            )),
            (Err(_), _) => {
                return Err(Error::NotFound(format!(
                    "volume path {} does not exist",
                    path.display()
                )));
            }
            (Ok(()), false) => Some(format!("the volume's data ({}) is gone", data.display())),
            (Ok(()), true) => match self.host.mounter.state(path).await? {
                MountState::Dead(_) => {
                    Some(format!("the mount at {} no longer answers", path.display()))
                }
                _ => None,
            },
        };
        if abnormal.is_some() {
            return Ok(VolumeStats {
                abnormal,
                ..Default::default()
            });
        }
        self.check_holds(&v, path).await?;
        let (p, base, quotas) = (
            path.to_path_buf(),
            self.cfg.base_path.clone(),
            self.quotas.clone(),
        );
        self.fs("measuring volume usage", move || {
            measure(&v, &data, &p, &base, quotas.as_ref())
        })
        .await
    }

    async fn expand(&self, req: NodeExpand) -> Result<u64> {
        let (volume_id, path) = (req.volume_id.as_str(), req.path.as_path());
        let staging_path = req.staging_path.as_deref();
        let v = self.volume(volume_id)?;
        self.check_holds(&v, path).await?;
        if v.backing == Backing::Directory {
            return Ok(v.capacity);
        }
        let img = self.volume_path(&v);
        let dev = self.host.loops.find_loop(&img).await?.ok_or_else(|| {
            Error::FailedPrecondition(format!("volume {} is not staged on this node", v.id))
        })?;
        self.host.loops.refresh_loop(&dev).await?;
        if let Backing::Filesystem { fs_type } = &v.backing {
            if fs_type.starts_with("ext") && !self.needs_growth(&dev, fs_type).await? {
                return Ok(v.capacity);
            }
            let mp = staging_path.unwrap_or(path);
            self.host.blockdev.grow_fs(&dev, fs_type, Some(mp)).await.map_err(|e| match e {
                Error::Internal(m) if m.contains("Permission denied") => Error::FailedPrecondition(format!(
                    "growing {fs_type} while mounted needs CAP_SYS_RESOURCE, which this node plugin lacks; \
                     the filesystem grows at the next NodeStageVolume instead ({m})"
                )),
                other => other,
            })?;
        }
        Ok(v.capacity)
    }
}
