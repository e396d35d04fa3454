//! Controller side of local-path: volumes, snapshots, capacity, expansion.

use crate::meta::{Backing, SnapshotMeta, SourceMeta, VolumeMeta};
use crate::quota::Quotas;
use crate::store::Change;
use crate::{
    COPY_TIMEOUT, DEFAULT_SIZE, LocalPath, LocalPathError, PROMISED_TTL, TOPOLOGY_KEY, is_our_id,
    new_id, now, remove_any, tmp_name,
};
use csi_core::backend::{Capacity, ControllerBackend, ControllerRpc, SnapshotFilter, VolumeStatus};
use csi_core::csi;
use csi_core::types::{
    AccessType, Capability, CapacityRange, ContentSource, CreateVolume, Secrets,
};
use csi_core::{Error, IoContext, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tracing::warn;

/// Smallest image that mkfs accepts, per filesystem.
fn min_size(backing: &Backing) -> u64 {
    match backing {
        Backing::Directory => 0,
        Backing::Block => 4096,
        Backing::Filesystem { fs_type } if fs_type == "xfs" => 300 << 20,
        Backing::Filesystem { fs_type } if fs_type == "btrfs" => 128 << 20,
        Backing::Filesystem { .. } => 16 << 20,
    }
}

/// Parsed StorageClass parameters.
struct Params {
    file: bool,
    mode: u32,
}

/// The directory mode a volume was created with (from its parameters).
pub(crate) fn mode_of(parameters: &BTreeMap<String, String>) -> u32 {
    parse_params(parameters).map_or(0o777, |p| p.mode)
}

/// Parses StorageClass parameters, skipping Kubernetes' own `csi.storage.k8s.io/*` keys.
fn parse_params<'a>(p: impl IntoIterator<Item = (&'a String, &'a String)>) -> Result<Params> {
    let mut out = Params {
        file: false,
        mode: 0o777,
    };
    for (k, v) in p
        .into_iter()
        .filter(|(k, _)| !k.starts_with(csi_core::types::K8S_PARAM_PREFIX))
    {
        match k.as_str() {
            "backing" => {
                out.file = match v.as_str() {
                    "directory" | "" => false,
                    "file" => true,
                    _ => {
                        return Err(LocalPathError::BadParameter {
                            key: k.clone(),
                            value: v.clone(),
                            why: "expected directory or file".into(),
                        }
                        .into());
                    }
                }
            }
            "mode" => {
                out.mode = u32::from_str_radix(v, 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| LocalPathError::BadParameter {
                        key: k.clone(),
                        value: v.clone(),
                        why: "expected octal permissions such as 0770".into(),
                    })?;
            }
            _ => return Err(LocalPathError::UnknownParameter(k.clone()).into()),
        }
    }
    Ok(out)
}

impl LocalPath {
    fn backing_for(&self, caps: &[Capability], params: &Params) -> Result<Backing> {
        for c in caps {
            if c.mode.is_multi_node() {
                return Err(LocalPathError::MultiNode(c.mode).into());
            }
        }
        let block = caps.iter().filter(|c| c.is_block()).count();
        if block == caps.len() {
            return Ok(Backing::Block);
        }
        if block > 0 {
            return Err(LocalPathError::MixedAccess.into());
        }
        let fs_types: Vec<&str> = caps
            .iter()
            .filter_map(|c| match &c.access {
                AccessType::Mount { fs_type, .. } if !fs_type.is_empty() => Some(fs_type.as_str()),
                _ => None,
            })
            .collect();
        let requested = fs_types.first().copied();
        if fs_types.iter().any(|f| Some(*f) != requested) {
            return Err(Error::InvalidArgument(
                "capabilities ask for different fsTypes".into(),
            ));
        }
        if params.file {
            let fs_type = requested.unwrap_or("ext4").to_owned();
            if !csi_core::blockdev::SUPPORTED_FS.contains(&fs_type.as_str()) {
                return Err(Error::InvalidArgument(format!(
                    "fsType {fs_type:?} is not supported; use one of {:?}",
                    csi_core::blockdev::SUPPORTED_FS
                )));
            }
            return Ok(Backing::Filesystem { fs_type });
        }
        match requested {
            Some(f) if f != self.base_fs => Err(LocalPathError::FsMismatch {
                requested: f.to_owned(),
                base: self.base_fs.clone(),
            }
            .into()),
            _ => Ok(Backing::Directory),
        }
    }

    fn check_topology(&self, req: &Option<csi::TopologyRequirement>) -> Result<()> {
        let Some(t) = req else { return Ok(()) };
        if t.requisite.is_empty() {
            return Ok(());
        }
        let ours = |top: &csi::Topology| {
            top.segments
                .iter()
                .all(|(k, v)| k == TOPOLOGY_KEY && *v == self.cfg.node_id)
        };
        if t.requisite.iter().any(ours) {
            Ok(())
        } else {
            Err(LocalPathError::WrongNode(self.cfg.node_id.clone()).into())
        }
    }

    fn topology(&self) -> csi::Topology {
        csi::Topology {
            segments: [(TOPOLOGY_KEY.to_owned(), self.cfg.node_id.clone())].into(),
        }
    }

    fn to_proto(&self, v: &VolumeMeta) -> csi::Volume {
        csi::Volume {
            capacity_bytes: v.capacity as i64,
            volume_id: v.id.clone(),
            volume_context: [
                ("backing".to_owned(), v.backing.describe()),
                (
                    "sizeEnforced".to_owned(),
                    (v.backing.is_image() || v.project_id.is_some()).to_string(),
                ),
            ]
            .into(),
            content_source: v.source.as_ref().map(|s| ContentSource::from(s).to_proto()),
            accessible_topology: vec![self.topology()],
        }
    }

    pub(crate) fn snapshot_proto(s: &SnapshotMeta) -> csi::Snapshot {
        csi::Snapshot {
            size_bytes: s.size as i64,
            snapshot_id: s.id.clone(),
            source_volume_id: s.source_volume_id.clone(),
            creation_time: Some(prost_timestamp(s.created_unix, s.created_nanos)),
            ready_to_use: true,
            group_snapshot_id: s.group_id.clone().unwrap_or_default(),
        }
    }

    /// Work that measures the bytes still free for new volumes: statvfs
    /// minus the reserve minus the unwritten part of every size-enforced
    /// volume (those are promised in full). It returns them and, when it
    /// summed the promised bytes afresh, that sum: it costs a stat or
    /// quotactl per volume, so it is cached until a change or for
    /// [`PROMISED_TTL`] (see [`LocalPath::available`]).
    pub(crate) fn room(&self) -> impl FnOnce() -> Result<(u64, Option<u64>)> + Send + 'static {
        let cached = *self.promised.lock().unwrap_or_else(|e| e.into_inner());
        let enforced: Option<Vec<(PathBuf, VolumeMeta)>> = match cached {
            Some((at, _)) if at.elapsed() < PROMISED_TTL => None,
            _ => Some(
                self.index()
                    .state
                    .volumes
                    .values()
                    .filter(|v| v.backing.is_image() || v.project_id.is_some())
                    .map(|v| (self.volume_path(v), v.clone()))
                    .collect(),
            ),
        };
        let (base, quotas, reserved) = (
            self.cfg.base_path.clone(),
            self.quotas.clone(),
            self.cfg.reserved_bytes,
        );
        move || {
            let st = csi_core::fsutil::statvfs(&base)?;
            let fresh = enforced.map(|vols| {
                vols.iter()
                    .map(|(p, v)| {
                        let used = used_bytes(p, v, quotas.as_ref()).unwrap_or(0);
                        v.capacity.saturating_sub(used)
                    })
                    .sum::<u64>()
            });
            let promised = fresh.or(cached.map(|(_, sum)| sum)).unwrap_or(0);
            let free = st
                .available_bytes
                .saturating_sub(reserved)
                .saturating_sub(promised);
            Ok((free, fresh))
        }
    }

    /// Bytes still free for new volumes (see [`LocalPath::room`]).
    pub(crate) async fn available(&self) -> Result<u64> {
        let (free, fresh) = self.fs("measuring free space", self.room()).await?;
        if let Some(sum) = fresh {
            *self.promised.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), sum));
        }
        Ok(free)
    }

    /// Creates a volume without a source in one trip off the runtime: the
    /// room check, its data, its record, and for an image the rename into
    /// place. A directory is made in place: until its record commits it is
    /// an empty directory without a record, which start-up recovery removes.
    async fn create_empty(
        &self,
        req: &CreateVolume,
        backing: &Backing,
        size: u64,
        mode: u32,
    ) -> Result<csi::Volume> {
        let id = new_id("lv-");
        let final_path = self.new_volume_path(&id, backing);
        let staging = if backing.is_image() {
            tmp_name(&final_path)
        } else {
            final_path.clone()
        };
        let project = (*backing == Backing::Directory && self.quotas.is_some()).then(|| {
            self.next_project
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        });
        let meta = VolumeMeta {
            id,
            name: req.name.clone(),
            capacity: size,
            backing: backing.clone(),
            parameters: req.parameters.clone(),
            source: None,
            created_unix: now().0,
            project_id: project,
            sharded: true,
        };
        let (room, log, quotas, node) = (
            self.room(),
            self.log.clone(),
            self.quotas.clone(),
            self.cfg.node_id.clone(),
        );
        let mut record = meta.clone();
        let done = self
            .fs("creating a volume", move || {
                let (free, _) = room()?;
                if size > free {
                    return Err(Error::ResourceExhausted(format!(
                        "{size} bytes requested but only {free} bytes are available on node {node}"
                    )));
                }
                let quota = quotas.as_ref().zip(project);
                let mut claimed = None;
                let made = super::make_empty(&staging, &record.backing, size, mode, quota)
                    .and_then(|p| {
                        (claimed, record.project_id) = (p, p);
                        log.commit_blocking(Change::PutVolume(record))
                    });
                if let Err(e) = made {
                    if let Err(c) = remove_any(&staging) {
                        warn!(path = %staging.display(), error = %c, "cleanup failed; start-up recovery will retry");
                    }
                    clear_quota(quotas.as_ref().zip(claimed));
                    return Err(e);
                }
                if staging != final_path {
                    // The commit is the point of no return: a failed rename is
                    // finished by a retry or by start-up recovery.
                    std::fs::rename(&staging, &final_path)
                        .ctx(|| format!("renaming {}", staging.display()))?;
                }
                Ok(claimed)
            })
            .await;
        self.forget_promised();
        let claimed = done?;
        self.next_project_after(claimed);
        Ok(self.to_proto(&VolumeMeta {
            project_id: claimed,
            ..meta
        }))
    }

    /// Starts later claims past a project id just claimed.
    fn next_project_after(&self, project: Option<u32>) {
        if let Some(p) = project {
            self.next_project
                .fetch_max(p.saturating_add(1), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Drops the quota limit of a project that no longer has a volume.
    async fn release_project(&self, project: Option<u32>) {
        let Some(quota) = self.quotas.clone().zip(project) else {
            return;
        };
        let project = quota.1;
        let cleared = self.fs("clearing a project quota", move || {
            clear_quota(Some((&quota.0, quota.1)));
            Ok(())
        });
        // clear_quota logs its own failure; this is the timeout's.
        if let Err(e) = cleared.await {
            warn!(project, error = %e, "could not clear a project quota");
        }
    }

    fn compatible(existing: &VolumeMeta, req: &CreateVolume, backing: &Backing) -> Result<()> {
        let mut why = Vec::new();
        if !req.capacity.admits(existing.capacity) {
            why.push(format!("it has {} bytes", existing.capacity));
        }
        if existing.backing != *backing {
            why.push(format!("it is {}", existing.backing.describe()));
        }
        if existing.parameters != req.parameters {
            why.push("it has different parameters".into());
        }
        if existing.source != req.source.as_ref().map(SourceMeta::from) {
            why.push("it has a different content source".into());
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(Error::AlreadyExists(format!(
                "volume {:?} already exists as {} and {}",
                req.name,
                existing.id,
                why.join(", ")
            )))
        }
    }

    /// Fills `tmp` with a copy of `source` (a directory under its own project
    /// quota when enforced, or an image grown to `size`).
    async fn populate(
        &self,
        tmp: &std::path::Path,
        backing: &Backing,
        size: u64,
        mode: u32,
        project: Option<u32>,
        (from, src_backing): (std::path::PathBuf, Backing),
    ) -> Result<Option<u32>> {
        if src_backing != *backing {
            return Err(Error::InvalidArgument(format!(
                "the source is {} but the new volume would be {}",
                src_backing.describe(),
                backing.describe()
            )));
        }
        let (t, quotas, b) = (tmp.to_path_buf(), self.quotas.clone(), backing.clone());
        if backing.is_image() {
            self.copy_data(&from, tmp, true).await?;
            self.fs("growing a copied image", move || grow_file(&t, size))
                .await?;
            return Ok(None);
        }
        let claimed = self
            .fs("creating a volume directory", move || {
                super::make_empty(&t, &b, size, mode, quotas.as_ref().zip(project))
            })
            .await?;
        if let Err(e) = self.copy_data(&from, tmp, false).await {
            self.release_project(claimed).await;
            return Err(e);
        }
        Ok(claimed)
    }
}

/// Bytes a volume occupies, when it can be known cheaply (image files,
/// quota-tracked directories).
fn used_bytes(path: &Path, v: &VolumeMeta, quotas: Option<&Quotas>) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    if v.backing.is_image() {
        return std::fs::metadata(path).ok().map(|m| m.blocks() * 512);
    }
    quotas?.usage(v.project_id?).ok().map(|(bytes, _)| bytes)
}

/// Drops the quota limit of a project that no longer has a volume, logging
/// (not returning) a failure.
fn clear_quota(quota: Option<(&Quotas, u32)>) {
    if let Some((q, p)) = quota
        && let Err(e) = q.set_limit(p, 0)
    {
        warn!(project = p, error = %e, "could not clear a project quota");
    }
}

pub(crate) fn grow_file(p: &std::path::Path, size: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .ctx(|| format!("opening {}", p.display()))?;
    let cur = f.metadata().ctx(|| format!("stat {}", p.display()))?.len();
    if size > cur {
        f.set_len(size).ctx(|| format!("growing {}", p.display()))?;
    }
    Ok(())
}

/// InvalidArgument for any parameter but Kubernetes' own: `what`s take none.
pub(crate) fn no_parameters(parameters: &BTreeMap<String, String>, what: &str) -> Result<()> {
    match parameters
        .keys()
        .find(|k| !k.starts_with(csi_core::types::K8S_PARAM_PREFIX))
    {
        Some(k) => Err(Error::InvalidArgument(format!(
            "unknown {what} parameter {k:?}; local.rcsi.io {what}s take no parameters"
        ))),
        None => Ok(()),
    }
}

pub(crate) fn prost_timestamp(secs: u64, nanos: u32) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: secs as i64,
        nanos: nanos as i32,
    }
}

#[async_trait::async_trait]
impl ControllerBackend for LocalPath {
    fn controller_capabilities(&self) -> Vec<ControllerRpc> {
        vec![
            ControllerRpc::CreateDeleteVolume,
            ControllerRpc::ListVolumes,
            ControllerRpc::GetCapacity,
            ControllerRpc::CreateDeleteSnapshot,
            ControllerRpc::ListSnapshots,
            ControllerRpc::CloneVolume,
            ControllerRpc::ExpandVolume,
            ControllerRpc::GetVolume,
            ControllerRpc::SingleNodeMultiWriter,
            ControllerRpc::GetSnapshot,
        ]
    }

    async fn create_volume(&self, req: CreateVolume) -> Result<csi::Volume> {
        let params = parse_params(&req.parameters)?;
        let backing = self.backing_for(&req.capabilities, &params)?;
        self.check_topology(&req.accessibility)?;

        let existing = self.index().volume_by_name.get(&req.name).cloned();
        if let Some(id) = existing {
            let existing = self.volume(&id)?;
            Self::compatible(&existing, &req, &backing)?;
            self.settle(&self.volume_path(&existing)).await?;
            return Ok(self.to_proto(&existing));
        }

        let source = match &req.source {
            None => None,
            Some(ContentSource::Snapshot(id)) => {
                let s = self
                    .index()
                    .state
                    .snapshots
                    .get(id)
                    .cloned()
                    .ok_or_else(|| LocalPathError::NoSuchSnapshot(id.clone()))?;
                Some((self.snapshot_path(&s), s.backing.clone(), s.size))
            }
            Some(ContentSource::Volume(id)) => {
                let v = self.volume(id)?;
                Some((self.volume_path(&v), v.backing.clone(), v.capacity))
            }
        };
        let min = min_size(&backing).max(source.as_ref().map_or(0, |s| s.2));
        let default = DEFAULT_SIZE.max(min);
        let size = req.capacity.choose(default, min, 4096)?;

        if self.cfg.max_volumes > 0
            && self.index().state.volumes.len() as u64 >= self.cfg.max_volumes
        {
            return Err(Error::ResourceExhausted(format!(
                "node {} already holds its maximum of {} volumes",
                self.cfg.node_id, self.cfg.max_volumes
            )));
        }
        let Some(source) = source else {
            return self.create_empty(&req, &backing, size, params.mode).await;
        };
        let available = self.available().await?;
        if size > available {
            return Err(Error::ResourceExhausted(format!(
                "{size} bytes requested but only {available} bytes are available on node {}",
                self.cfg.node_id
            )));
        }

        let id = new_id("lv-");
        let final_path = self.new_volume_path(&id, &backing);
        let tmp = tmp_name(&final_path);
        let project = (backing == Backing::Directory && self.quotas.is_some()).then(|| {
            self.next_project
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        });
        let created = async {
            let project = self
                .populate(
                    &tmp,
                    &backing,
                    size,
                    params.mode,
                    project,
                    (source.0, source.1),
                )
                .await?;
            self.next_project_after(project);
            let (secs, _) = now();
            let meta = VolumeMeta {
                id: id.clone(),
                name: req.name.clone(),
                capacity: size,
                backing: backing.clone(),
                parameters: req.parameters.clone(),
                source: req.source.as_ref().map(SourceMeta::from),
                created_unix: secs,
                project_id: project,
                sharded: true,
            };
            if let Err(e) = self.commit(Change::PutVolume(meta.clone())).await {
                self.release_project(project).await;
                return Err(e);
            }
            Ok::<_, Error>(meta)
        }
        .await;
        match created {
            Ok(meta) => {
                // The commit is the point of no return: from here a failed
                // rename is finished by a retry or by start-up recovery.
                self.settle(&final_path).await?;
                Ok(self.to_proto(&meta))
            }
            Err(e) => {
                self.cleanup(&tmp).await;
                Err(e)
            }
        }
    }

    async fn delete_volume(&self, volume_id: &str, _secrets: &Secrets) -> Result<()> {
        if !is_our_id(volume_id, "lv-") {
            return Ok(());
        }
        let Ok(v) = self.volume(volume_id) else {
            return Ok(());
        };
        let path = self.volume_path(&v);
        let (dev, exposed) = self.usage(&v).await?;
        let mounted: Vec<String> = exposed
            .into_iter()
            .map(|m| m.mount_point.display().to_string())
            .collect();
        if !mounted.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id} is still staged or published on node {} at {}; unpublish and unstage it first",
                self.cfg.node_id,
                mounted.join(", ")
            )));
        }
        if dev.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id} is still staged on node {} (its loop device is attached); unstage it first",
                self.cfg.node_id
            )));
        }
        // One trip off the runtime: the record, then the removal. The record
        // leaves a tombstone, so start-up recovery finishes a removal that a
        // crash or an error cut short.
        let (log, id, quota) = (
            self.log.clone(),
            v.id.clone(),
            self.quotas.clone().zip(v.project_id),
        );
        let done = csi_core::fsutil::blocking("deleting a volume", COPY_TIMEOUT, move || {
            log.commit_blocking(Change::DeleteVolume { id })?;
            remove_any(&path)?;
            clear_quota(quota.as_ref().map(|(q, p)| (q, *p)));
            Ok(())
        })
        .await;
        self.forget_promised();
        done?;
        self.settle_deletions().await;
        Ok(())
    }

    async fn get_volume(&self, volume_id: &str) -> Result<(csi::Volume, VolumeStatus)> {
        let v = self.volume(volume_id)?;
        Ok((self.to_proto(&v), VolumeStatus::default()))
    }

    async fn validate_volume_capabilities(
        &self,
        volume_id: &str,
        caps: &[Capability],
        parameters: &HashMap<String, String>,
        _secrets: &Secrets,
    ) -> Result<()> {
        let v = self.volume(volume_id)?;
        parse_params(parameters)?;
        for c in caps {
            if c.mode.is_multi_node() {
                return Err(LocalPathError::MultiNode(c.mode).into());
            }
            let fits = match (&c.access, &v.backing) {
                (AccessType::Block, Backing::Block) => true,
                (AccessType::Block, _) | (_, Backing::Block) => false,
                (AccessType::Mount { fs_type, .. }, Backing::Directory) => {
                    fs_type.is_empty() || *fs_type == self.base_fs
                }
                (AccessType::Mount { fs_type, .. }, Backing::Filesystem { fs_type: have }) => {
                    fs_type.is_empty() || fs_type == have
                }
            };
            if !fits {
                return Err(Error::InvalidArgument(format!(
                    "volume {volume_id} is {} and cannot serve {:?}",
                    v.backing.describe(),
                    c.access
                )));
            }
        }
        Ok(())
    }

    async fn list_volumes(&self) -> Result<Vec<(csi::Volume, VolumeStatus)>> {
        let vols: Vec<VolumeMeta> = self.index().state.volumes.values().cloned().collect();
        Ok(vols
            .iter()
            .map(|v| (self.to_proto(v), VolumeStatus::default()))
            .collect())
    }

    async fn get_capacity(
        &self,
        _caps: &[Capability],
        parameters: &HashMap<String, String>,
        topology: Option<&csi::Topology>,
    ) -> Result<Capacity> {
        if let Some(t) = topology
            && t.segments
                .iter()
                .any(|(k, v)| k != TOPOLOGY_KEY || *v != self.cfg.node_id)
        {
            return Ok(Capacity::default());
        }
        parse_params(parameters)?;
        let available = self.available().await?;
        Ok(Capacity {
            available,
            maximum_volume_size: Some(available),
            minimum_volume_size: None,
        })
    }

    async fn create_snapshot(
        &self,
        source_volume_id: &str,
        name: &str,
        parameters: &BTreeMap<String, String>,
        _secrets: &Secrets,
    ) -> Result<csi::Snapshot> {
        no_parameters(parameters, "snapshot")?;
        let existing = {
            let idx = self.index();
            idx.snapshot_by_name
                .get(name)
                .and_then(|id| idx.state.snapshots.get(id).cloned())
        };
        if let Some(s) = existing {
            if s.source_volume_id != source_volume_id {
                return Err(Error::AlreadyExists(format!(
                    "snapshot {name:?} already exists for volume {}",
                    s.source_volume_id
                )));
            }
            self.settle(&self.snapshot_path(&s)).await?;
            return Ok(Self::snapshot_proto(&s));
        }
        let v = self.volume(source_volume_id)?;
        let (secs, nanos) = now();
        let s = SnapshotMeta {
            id: new_id("ls-"),
            name: name.to_owned(),
            source_volume_id: v.id.clone(),
            size: v.capacity,
            backing: v.backing.clone(),
            created_unix: secs,
            created_nanos: nanos,
            group_id: None,
        };
        let dst = self.snapshot_path(&s);
        let tmp = tmp_name(&dst);
        let copied = async {
            if !v.backing.is_image() {
                let t = tmp.clone();
                self.fs("creating a snapshot directory", move || {
                    std::fs::create_dir(&t).ctx(|| format!("creating {}", t.display()))
                })
                .await?;
            }
            let from = self.volume_path(&v);
            self.copy_data(&from, &tmp, v.backing.is_image()).await?;
            self.commit(Change::PutSnapshot(s.clone())).await
        }
        .await;
        if let Err(e) = copied {
            self.cleanup(&tmp).await;
            return Err(e);
        }
        // The commit is the point of no return: a failed rename is finished
        // by the retry (above) or by start-up recovery, never undone.
        self.settle(&dst).await?;
        Ok(Self::snapshot_proto(&s))
    }

    async fn delete_snapshot(&self, snapshot_id: &str, _secrets: &Secrets) -> Result<()> {
        let s = self.index().state.snapshots.get(snapshot_id).cloned();
        let Some(s) = s else { return Ok(()) };
        if let Some(g) = &s.group_id {
            return Err(Error::InvalidArgument(format!(
                "snapshot {snapshot_id} is part of group snapshot {g} and is deleted with it (DeleteVolumeGroupSnapshot)"
            )));
        }
        let path = self.snapshot_path(&s);
        self.commit(Change::DeleteSnapshot { id: s.id.clone() })
            .await?;
        self.remove(&path).await?;
        self.settle_deletions().await;
        Ok(())
    }

    async fn list_snapshots(&self, filter: &SnapshotFilter) -> Result<Vec<csi::Snapshot>> {
        Ok(self
            .index()
            .state
            .snapshots
            .values()
            .filter(|s| filter.snapshot_id.as_ref().is_none_or(|id| *id == s.id))
            .filter(|s| {
                filter
                    .source_volume_id
                    .as_ref()
                    .is_none_or(|id| *id == s.source_volume_id)
            })
            .map(Self::snapshot_proto)
            .collect())
    }

    async fn expand_volume(
        &self,
        volume_id: &str,
        range: CapacityRange,
        _capability: Option<&Capability>,
        _secrets: &Secrets,
    ) -> Result<(u64, bool)> {
        let v = self.volume(volume_id)?;
        // Only a filesystem needs the node: a raw block volume is done here, because
        // this controller runs on the volume's node and refreshes its loop device (the
        // kubelet does not expand block volumes that are in use).
        let node_step = matches!(v.backing, Backing::Filesystem { .. });
        let size = range.choose(v.capacity, v.capacity, 4096)?;
        if size <= v.capacity {
            return Ok((v.capacity, node_step));
        }
        let grow = size - v.capacity;
        let available = self.available().await?;
        if grow > available {
            return Err(Error::ResourceExhausted(format!(
                "growing by {grow} bytes needs more than the {available} bytes available"
            )));
        }
        let (img, quotas, backing, project) = (
            self.volume_path(&v),
            self.quotas.clone(),
            v.backing.clone(),
            v.project_id,
        );
        self.fs("growing a volume", move || {
            if backing.is_image() {
                grow_file(&img, size)
            } else if let (Some(q), Some(p)) = (quotas, project) {
                q.set_limit(p, size)
            } else {
                Ok(())
            }
        })
        .await?;
        if v.backing == Backing::Block {
            let img = self.volume_path(&v);
            if let Some(dev) = self.host.loops.find_loop(&img).await? {
                self.host.loops.refresh_loop(&dev).await?;
            }
        }
        let meta = VolumeMeta {
            capacity: size,
            ..v.clone()
        };
        self.commit(Change::PutVolume(meta)).await?;
        Ok((size, node_step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_strict() {
        assert!(parse_params(&BTreeMap::new()).is_ok_and(|p| !p.file && p.mode == 0o777));
        let p: BTreeMap<String, String> = [
            ("backing".to_owned(), "file".to_owned()),
            ("mode".to_owned(), "0770".to_owned()),
            (
                "csi.storage.k8s.io/pvc/name".to_owned(),
                "ignored".to_owned(),
            ),
        ]
        .into();
        assert!(parse_params(&p).is_ok_and(|p| p.file && p.mode == 0o770));
        for (k, v) in [("backing", "lvm"), ("mode", "999"), ("size", "1")] {
            let p: BTreeMap<String, String> = [(k.to_owned(), v.to_owned())].into();
            assert!(
                matches!(parse_params(&p), Err(Error::InvalidArgument(_))),
                "{k}={v}"
            );
        }
    }
}
