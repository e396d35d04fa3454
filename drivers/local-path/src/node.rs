//! Node side of local-path: staging (bind or loop + filesystem), publishing,
//! stats with volume condition, and filesystem growth.

use crate::meta::{Backing, VolumeMeta};
use crate::{LocalPath, TOPOLOGY_KEY};
use csi_core::backend::{NodeBackend, NodeInfo, NodeRpc, VolumeStats};
use csi_core::exec::Command;
use csi_core::mount::{MountState, vfs_flags};
use csi_core::types::{AccessType, Capability, CapacityRange, PublishVolume, StageVolume};
use csi_core::{Error, IoContext, Result};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

fn same_device(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.rdev() == y.rdev() && x.rdev() != 0,
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
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
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

    /// True when the ext filesystem on `dev` is smaller than the device.
    async fn ext_needs_growth(&self, dev: &Path) -> Result<bool> {
        let out = self
            .host
            .exec
            .run(&Command::new("dumpe2fs", ["-h".as_ref(), dev.as_os_str()]))
            .await?;
        let field = |name: &str| {
            out.stdout
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(blocks), Some(bs)) = (field("Block count:"), field("Block size:")) else {
            return Err(Error::Internal(format!(
                "cannot read the size of the filesystem on {}",
                dev.display()
            )));
        };
        Ok(blocks * bs < self.host.blockdev.size(dev).await?)
    }

    /// Grows an unmounted ext filesystem to fill its device, so volumes
    /// expanded while unstaged are full size at the next stage.
    async fn grow_ext_offline(&self, dev: &Path) -> Result<()> {
        if !self.ext_needs_growth(dev).await? {
            return Ok(());
        }
        let fsck = self
            .host
            .exec
            .output(&Command::new(
                "e2fsck",
                ["-f".as_ref(), "-p".as_ref(), dev.as_os_str()],
            ))
            .await?;
        if fsck.code > 1 {
            return Err(Error::Internal(format!(
                "e2fsck {} found problems it could not fix (exit {}): {}",
                dev.display(),
                fsck.code,
                fsck.stderr.trim()
            )));
        }
        self.host.blockdev.grow_fs(dev, "ext4", None).await
    }

    async fn stage_filesystem(
        &self,
        v: &VolumeMeta,
        fs_type: &str,
        req: &StageVolume,
    ) -> Result<()> {
        let img = self.volume_path(&v.id, &v.backing);
        let dev = self.host.blockdev.attach_loop(&img).await?;
        match self.host.mounter.state(&req.staging_path).await? {
            MountState::Mounted(m) if Path::new(&m.source) == dev => return Ok(()),
            MountState::Mounted(m) => {
                return Err(Error::AlreadyExists(format!(
                    "{} already has {} mounted",
                    req.staging_path.display(),
                    m.source
                )));
            }
            MountState::Dead(_) => self.host.mounter.unmount(&req.staging_path).await?,
            MountState::NotMounted => {}
        }
        let fresh = self.host.blockdev.fs_type(&dev).await?.is_none();
        let found = self.host.blockdev.mkfs_if_blank(&dev, fs_type).await?;
        if found != fs_type {
            return Err(Error::FailedPrecondition(format!(
                "volume {} holds a {found} filesystem, not {fs_type}",
                v.id
            )));
        }
        if fs_type.starts_with("ext") && !fresh {
            self.grow_ext_offline(&dev).await?;
        }
        let mut options = mount_flags(&req.capability).to_vec();
        if fs_type == "xfs" && !options.iter().any(|o| o.split(',').any(|o| o == "nouuid")) {
            // Snapshots and clones share the source's UUID, which xfs refuses twice.
            options.push("nouuid".into());
        }
        self.host
            .mounter
            .mount(&dev.to_string_lossy(), &req.staging_path, fs_type, &options)
            .await?;
        if fresh {
            std::fs::set_permissions(
                &req.staging_path,
                std::fs::Permissions::from_mode(Self::mode_of(v)),
            )
            .ctx(|| format!("chmod {}", req.staging_path.display()))?;
        } else if !fs_type.starts_with("ext") {
            self.host
                .blockdev
                .grow_fs(&dev, fs_type, Some(&req.staging_path))
                .await?;
        }
        Ok(())
    }

    fn apply_mount_group(&self, root: &Path, group: &str) -> Result<()> {
        let gid: u32 = group.parse().map_err(|_| {
            Error::InvalidArgument(format!(
                "volume_mount_group {group:?} is not a numeric group id"
            ))
        })?;
        std::os::unix::fs::chown(root, None, Some(gid))
            .ctx(|| format!("chgrp {gid} {}", root.display()))?;
        let mode = std::fs::metadata(root)
            .ctx(|| format!("stat {}", root.display()))?
            .mode();
        std::fs::set_permissions(
            root,
            std::fs::Permissions::from_mode((mode & 0o7777) | 0o2070),
        )
        .ctx(|| format!("chmod g+rwxs {}", root.display()))
    }
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
            self.host
                .blockdev
                .attach_loop(&self.volume_path(&v.id, &v.backing))
                .await?;
            return Ok(());
        }
        std::fs::create_dir_all(&req.staging_path)
            .ctx(|| format!("creating {}", req.staging_path.display()))?;
        match &v.backing {
            Backing::Filesystem { fs_type } => self.stage_filesystem(&v, fs_type, &req).await,
            _ => {
                let data = self.volume_path(&v.id, &v.backing);
                if !data.is_dir() {
                    return Err(Error::FailedPrecondition(format!(
                        "the data directory of volume {} is missing ({})",
                        v.id,
                        data.display()
                    )));
                }
                match self.host.mounter.state(&req.staging_path).await? {
                    MountState::Mounted(_) if same_file(&req.staging_path, &data) => Ok(()),
                    MountState::Mounted(m) => Err(Error::AlreadyExists(format!(
                        "{} already has {} mounted",
                        req.staging_path.display(),
                        m.source
                    ))),
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
        self.host.mounter.unmount(staging_path).await?;
        if let Ok(v) = self.volume(volume_id)
            && v.backing.is_image()
        {
            let img = self.volume_path(&v.id, &v.backing);
            if let Some(dev) = self.host.blockdev.find_loop(&img).await? {
                self.host.blockdev.detach_loop(&dev).await?;
            }
        }
        Ok(())
    }

    async fn publish(&self, req: PublishVolume) -> Result<()> {
        let v = self.volume(&req.volume_id)?;
        check_fits(&v, &req.capability)?;
        let target = &req.target_path;
        if v.backing == Backing::Block {
            let img = self.volume_path(&v.id, &v.backing);
            let dev = self.host.blockdev.find_loop(&img).await?.ok_or_else(|| {
                Error::FailedPrecondition(format!("volume {} is not staged on this node", v.id))
            })?;
            if let Some(dir) = target.parent() {
                std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
            }
            if !target.exists() {
                std::fs::File::create(target).ctx(|| format!("creating {}", target.display()))?;
            }
            return match self.host.mounter.state(target).await? {
                MountState::Mounted(m)
                    if same_device(target, &dev) && m.read_only() == req.readonly =>
                {
                    Ok(())
                }
                MountState::Mounted(_) => Err(Error::AlreadyExists(format!(
                    "{} is already published with another device or read-only setting",
                    target.display()
                ))),
                _ => {
                    self.host
                        .mounter
                        .bind(&dev, target, req.readonly, &[])
                        .await
                }
            };
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
        std::fs::create_dir_all(target).ctx(|| format!("creating {}", target.display()))?;
        match self.host.mounter.state(target).await? {
            MountState::Mounted(m) => {
                if same_file(target, &staging) && m.read_only() == req.readonly {
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
            self.apply_mount_group(&staging, g)?;
        }
        self.host
            .mounter
            .bind(&staging, target, req.readonly, &flags)
            .await
    }

    async fn unpublish(&self, _volume_id: &str, target_path: &Path) -> Result<()> {
        self.host.mounter.unmount(target_path).await?;
        let r = match std::fs::symlink_metadata(target_path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(target_path),
            Ok(_) => std::fs::remove_file(target_path),
            Err(e) => Err(e),
        };
        match r {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(format!("removing {}", target_path.display()), e))
            }
            _ => Ok(()),
        }
    }

    async fn stats(&self, volume_id: &str, path: &Path) -> Result<VolumeStats> {
        let v = self.volume(volume_id)?;
        match std::fs::symlink_metadata(path) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
                return Ok(VolumeStats {
                    abnormal: Some(format!(
                        "the mount at {} is dead (ENOTCONN)",
                        path.display()
                    )),
                    ..Default::default()
                });
            }
            Err(_) => {
                return Err(Error::NotFound(format!(
                    "volume path {} does not exist",
                    path.display()
                )));
            }
        }
        let data = self.volume_path(&v.id, &v.backing);
        let mut abnormal = None;
        if !data.exists() {
            abnormal = Some(format!("the volume's data ({}) is gone", data.display()));
        } else if let MountState::Dead(_) = self.host.mounter.state(path).await? {
            abnormal = Some(format!("the mount at {} no longer answers", path.display()));
        }
        let mut stats = VolumeStats {
            abnormal,
            ..Default::default()
        };
        if stats.abnormal.is_some() {
            return Ok(stats);
        }
        match &v.backing {
            Backing::Directory => {
                let (d, base) = (data.clone(), self.cfg.base_path.clone());
                let quota = match (&self.quotas, v.project_id) {
                    (Some(q), Some(p)) => Some(q.usage(p)?),
                    _ => None,
                };
                let (used, inodes, fs) = tokio::task::spawn_blocking(move || {
                    // Without a project quota the only measure is a walk of the tree.
                    let (used, inodes) = match quota {
                        Some(u) => u,
                        None => csi_core::fsutil::tree_usage(&d)?,
                    };
                    Ok::<_, Error>((used, inodes, csi_core::fsutil::statvfs(&base)?))
                })
                .await
                .map_err(|e| Error::Internal(e.to_string()))??;
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
                let used = std::fs::metadata(&data)
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

    async fn expand(
        &self,
        volume_id: &str,
        path: &Path,
        staging_path: Option<&Path>,
        _range: CapacityRange,
        _capability: Option<&Capability>,
    ) -> Result<u64> {
        let v = self.volume(volume_id)?;
        if !path.exists() {
            return Err(Error::NotFound(format!(
                "volume path {} does not exist",
                path.display()
            )));
        }
        if v.backing == Backing::Directory {
            return Ok(v.capacity);
        }
        let img = self.volume_path(&v.id, &v.backing);
        let dev = self.host.blockdev.find_loop(&img).await?.ok_or_else(|| {
            Error::FailedPrecondition(format!("volume {} is not staged on this node", v.id))
        })?;
        self.host.blockdev.refresh_loop(&dev).await?;
        if let Backing::Filesystem { fs_type } = &v.backing {
            if fs_type.starts_with("ext") && !self.ext_needs_growth(&dev).await? {
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
