//! The controller: volumes, snapshots and clones as directories on the
//! export, done over the userspace NFSv3 client.

use crate::Nfs;
use crate::client::{Kind, Share};
use crate::error::NfsError;
use crate::id::{SnapshotId, VolumeId};
use crate::params::{DEFAULT_MODE, Params, RESERVED};
use crate::records::{Records, ShareJournal};
use crate::tree::{copy_tree, remove_tree};
use async_trait::async_trait;
use csi_core::backend::{Capacity, ControllerBackend, ControllerRpc, VolumeStatus};
use csi_core::csi;
use csi_core::journal::{NameJournal, Reservation};
use csi_core::types::{
    AccessType, Capability, CapacityRange, ContentSource, CreateVolume, Secrets, proto_i64,
};
use csi_core::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

const READY: &str = "ready";
const CREATING: &str = "creating";

fn parts(path: &str) -> Vec<&str> {
    path.split('/').collect()
}

/// Refuses capabilities an NFS directory cannot serve.
fn check_caps(caps: &[Capability]) -> Result<()> {
    for c in caps {
        match &c.access {
            AccessType::Block => return Err(NfsError::Block.into()),
            AccessType::Mount { fs_type, .. } => {
                if !matches!(fs_type.as_str(), "" | "nfs" | "nfs4") {
                    return Err(Error::InvalidArgument(format!(
                        "fsType {fs_type:?} was requested; NFS volumes are nfs or nfs4"
                    )));
                }
            }
        }
    }
    Ok(())
}

fn attr<'a>(r: &'a Reservation, key: &str) -> &'a str {
    r.attrs.get(key).map(String::as_str).unwrap_or("")
}

fn size_of(r: &Reservation) -> u64 {
    attr(r, "size").parse().unwrap_or(0)
}

/// Removes what an interrupted copy left in `.rcsi/tmp`.
async fn remove_tmp(share: &Share, name: &str) -> Result<()> {
    let tmp = share.rcsi_dir("tmp").await?;
    Ok(remove_tree(share, &tmp, name.as_bytes()).await?)
}

impl Nfs {
    fn share_of(&self, server: &str, share: &str) -> Arc<Share> {
        self.pool.share(server, share)
    }

    fn volumes(&self, share: &Arc<Share>) -> ShareJournal {
        ShareJournal::new(share.clone(), Records::Volumes)
    }

    fn snapshots(&self, share: &Arc<Share>) -> ShareJournal {
        ShareJournal::new(share.clone(), Records::Snapshots)
    }

    /// A volume's id parsed and its record, or NotFound.
    async fn volume(&self, id: &str) -> Result<(VolumeId, Arc<Share>, Reservation)> {
        let missing = || Error::from(NfsError::NoSuchVolume(id.into()));
        let vid = VolumeId::parse(id).ok_or_else(missing)?;
        let share = self.share_of(&vid.server, &vid.share);
        let r = self
            .volumes(&share)
            .lookup_id(id)
            .await?
            .ok_or_else(missing)?;
        Ok((vid, share, r))
    }

    /// Where content comes from: the share, directory and size of a
    /// snapshot's data or a volume's directory.
    async fn source(&self, src: &ContentSource) -> Result<(Arc<Share>, Vec<String>, u64, String)> {
        match src {
            ContentSource::Snapshot(id) => {
                let missing = || Error::from(NfsError::NoSuchSnapshot(id.clone()));
                let sid = SnapshotId::parse(id).ok_or_else(missing)?;
                let share = self.share_of(&sid.server, &sid.share);
                let r = self
                    .snapshots(&share)
                    .lookup_id(id)
                    .await?
                    .filter(|r| attr(r, "state") == READY)
                    .ok_or_else(missing)?;
                let dir = vec![
                    RESERVED.into(),
                    "snapshots".into(),
                    format!("{}.d", sid.uuid.simple()),
                ];
                Ok((share, dir, size_of(&r), format!("snapshot:{id}")))
            }
            ContentSource::Volume(id) => {
                let (vid, share, r) = self.volume(id).await?;
                let dir = parts(&vid.sub_dir).into_iter().map(String::from).collect();
                Ok((share, dir, size_of(&r), format!("volume:{id}")))
            }
        }
    }

    /// Copies `from_dir` of `from` into a fresh temporary directory on `to`
    /// and renames it to `dest`: the destination appears complete or not at all.
    async fn copy_into(
        &self,
        from: &Share,
        from_dir: &[String],
        to: &Share,
        tmp: &str,
        dest: &[&str],
        mode: Option<u32>,
    ) -> Result<u64> {
        let src: Vec<&str> = from_dir.iter().map(String::as_str).collect();
        let Some((src_fh, _)) = from.walk(&src).await? else {
            return Err(Error::NotFound(format!(
                "the source directory {} is missing on {}",
                src.join("/"),
                from.label()
            )));
        };
        let tmp_dir = to.rcsi_dir("tmp").await?;
        remove_tree(to, &tmp_dir, tmp.as_bytes()).await?;
        let work = to.mkdir(&tmp_dir, tmp.as_bytes(), 0o700).await?;
        let copied = copy_tree(from, &src_fh, to, &work).await?;
        if let Some(mode) = mode {
            to.setattr(&work, crate::client::mode_attr(mode)).await?;
        }
        let (parent, leaf) = dest.split_at(dest.len() - 1);
        let parent_fh = to.mkdir_all(parent, mode.unwrap_or(DEFAULT_MODE)).await?;
        to.rename(&tmp_dir, tmp.as_bytes(), &parent_fh, leaf[0].as_bytes())
            .await?;
        tracing::info!(
            bytes = copied.bytes,
            entries = copied.entries,
            recopied = copied.recopied,
            to = %dest.join("/"),
            "copied"
        );
        Ok(copied.bytes)
    }
}

#[async_trait]
impl ControllerBackend for Nfs {
    fn controller_capabilities(&self) -> Vec<ControllerRpc> {
        vec![
            ControllerRpc::CreateDeleteVolume,
            ControllerRpc::CreateDeleteSnapshot,
            ControllerRpc::CloneVolume,
            ControllerRpc::ExpandVolume,
            ControllerRpc::GetCapacity,
            ControllerRpc::GetVolume,
            ControllerRpc::VolumeCondition,
        ]
    }

    async fn create_volume(&self, req: CreateVolume) -> Result<csi::Volume> {
        check_caps(&req.capabilities)?;
        let p = Params::parse(&req.parameters)?;
        let sub = p.sub_dir_for(&req.name, &req.metadata)?;
        let mut vid = VolumeId::new(&p.server, &p.share, &sub, &req.name);
        // A directory named after the volume may be shortened; one from the
        // operator's template is kept as given.
        let fits = if p.sub_dir.is_none() {
            vid.shorten_sub_dir()
        } else {
            vid.fits()
        };
        if !fits {
            return Err(NfsError::IdTooLong(req.name.clone()).into());
        }
        let sub = vid.sub_dir.clone();
        let id = vid.encode();
        let share = self.share_of(&p.server, &p.share);
        let journal = self.volumes(&share);
        let source = match &req.source {
            Some(s) => Some(self.source(s).await?),
            None => None,
        };
        let min = source.as_ref().map_or(0, |s| s.2);
        let size = req.capacity.choose(min, min, 1)?;
        if size < min {
            return Err(Error::OutOfRange(format!(
                "the source holds {min} bytes; the new volume must be at least that large"
            )));
        }
        let mut attrs = BTreeMap::from([
            ("subDir".to_string(), sub.clone()),
            ("size".into(), size.to_string()),
            (
                "onDelete".into(),
                serde_json::to_value(p.on_delete)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default(),
            ),
            (
                "source".into(),
                source.as_ref().map(|s| s.3.clone()).unwrap_or_default(),
            ),
            // A plain directory's record is final at once (the directory
            // is made again on every call); a copy is done when marked ready.
            (
                "state".into(),
                if source.is_some() { CREATING } else { READY }.into(),
            ),
            // The node reads server and share from the id; subDir is for people.
            ("ctx.subDir".into(), sub.clone()),
        ]);
        if let Some(m) = p.mount_permissions {
            attrs.insert("ctx.mountPermissions".into(), format!("{m:o}"));
        }
        if let Some(o) = &p.mount_options {
            attrs.insert("ctx.mountOptions".into(), o.clone());
        }
        if let Some(v) = &p.nfsvers {
            attrs.insert("ctx.nfsvers".into(), v.clone());
        }
        let wanted = Reservation {
            name: req.name.clone(),
            id: id.clone(),
            attrs,
        };
        let mut held = match journal.lookup(&req.name).await? {
            Some(held) => held,
            None => {
                if source.is_some() && share.walk(&parts(&sub)).await?.is_some() {
                    return Err(Error::AlreadyExists(format!(
                        "directory {sub} already exists on {}; restoring into it would mix contents",
                        share.label()
                    )));
                }
                let available = share.available().await?;
                if size > available {
                    return Err(Error::ResourceExhausted(format!(
                        "{} has {} bytes available; {size} were requested",
                        share.label(),
                        available
                    )));
                }
                // The name is locked and was free: write without looking again.
                journal.update(wanted.clone()).await?;
                wanted.clone()
            }
        };
        let same = |k: &str| attr(&held, k) == attr(&wanted, k);
        if held.id != id
            || !req.capacity.admits(size_of(&held))
            || !same("source")
            || !same("onDelete")
            || held
                .attrs
                .keys()
                .filter(|k| k.starts_with("ctx."))
                .ne(wanted.attrs.keys().filter(|k| k.starts_with("ctx.")))
        {
            return Err(Error::AlreadyExists(format!(
                "volume {:?} exists as {} with {} bytes; this request differs (size, parameters or source)",
                req.name,
                held.id,
                size_of(&held)
            )));
        }
        let dest = parts(&sub);
        let mode = p.mount_permissions.unwrap_or(DEFAULT_MODE);
        match &source {
            None => {
                let fh = share.mkdir_all(&dest, mode).await?;
                share.setattr(&fh, crate::client::mode_attr(mode)).await?;
                return Ok(held.to_volume());
            }
            Some(_) if attr(&held, "state") == READY => return Ok(held.to_volume()),
            Some((from, dir, _, _)) => {
                let tmp = format!("v-{}", vid.uuid.simple());
                let exists = share.walk(&dest).await?.is_some();
                // The directory was free when the name was reserved, so
                // if it exists now an earlier attempt renamed its copy there.
                if !exists {
                    self.copy_into(from, dir, &share, &tmp, &dest, Some(mode))
                        .await?;
                }
            }
        }
        held.attrs.insert("state".into(), READY.into());
        journal.update(held.clone()).await?;
        Ok(held.to_volume())
    }

    async fn delete_volume(&self, volume_id: &str, _secrets: &Secrets) -> Result<()> {
        // Nothing of ours can have an id we cannot parse.
        let Some(vid) = VolumeId::parse(volume_id) else {
            return Ok(());
        };
        let share = self.share_of(&vid.server, &vid.share);
        let journal = self.volumes(&share);
        let Some(r) = journal.lookup_id(volume_id).await? else {
            return Ok(());
        };
        let path = parts(&vid.sub_dir);
        let (parent, leaf) = path.split_at(path.len() - 1);
        let leaf = leaf[0];
        match attr(&r, "onDelete") {
            "retain" => {}
            on_delete => {
                if let Some((pfh, _)) = share.walk(parent).await? {
                    if on_delete == "archive" {
                        if share.lookup(&pfh, leaf.as_bytes()).await?.is_some() {
                            let mut to = format!("archived-{leaf}");
                            if share.lookup(&pfh, to.as_bytes()).await?.is_some() {
                                to = format!("archived-{leaf}-{}", vid.uuid.simple());
                            }
                            share
                                .rename(&pfh, leaf.as_bytes(), &pfh, to.as_bytes())
                                .await?;
                        }
                    } else {
                        remove_tree(&share, &pfh, leaf.as_bytes()).await?;
                    }
                }
                remove_tmp(&share, &format!("v-{}", vid.uuid.simple())).await?;
            }
        }
        journal.release(&r.name).await
    }

    async fn get_volume(&self, volume_id: &str) -> Result<(csi::Volume, VolumeStatus)> {
        let (vid, share, r) = self.volume(volume_id).await?;
        let condition = match share.walk(&parts(&vid.sub_dir)).await? {
            Some((_, a)) if a.kind == Kind::Dir => csi::VolumeCondition {
                abnormal: false,
                message: "directory present".into(),
            },
            _ => csi::VolumeCondition {
                abnormal: true,
                message: format!("directory {} is missing on {}", vid.sub_dir, share.label()),
            },
        };
        Ok((
            r.to_volume(),
            VolumeStatus {
                published_node_ids: vec![],
                condition: Some(condition),
            },
        ))
    }

    async fn validate_volume_capabilities(
        &self,
        volume_id: &str,
        caps: &[Capability],
        _parameters: &HashMap<String, String>,
        _secrets: &Secrets,
    ) -> Result<()> {
        self.volume(volume_id).await?;
        check_caps(caps)
    }

    async fn get_capacity(
        &self,
        caps: &[Capability],
        parameters: &HashMap<String, String>,
        _topology: Option<&csi::Topology>,
    ) -> Result<Capacity> {
        if caps.iter().any(Capability::is_block) {
            return Ok(Capacity::default());
        }
        let params: BTreeMap<String, String> = parameters
            .iter()
            .filter(|(k, _)| !k.starts_with(csi_core::types::K8S_PARAM_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        // Without a StorageClass there is nothing to measure.
        if params.is_empty() {
            return Ok(Capacity::default());
        }
        let p = Params::parse(&params)?;
        let available = self.share_of(&p.server, &p.share).available().await?;
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
        _parameters: &BTreeMap<String, String>,
        _secrets: &Secrets,
    ) -> Result<csi::Snapshot> {
        let (vid, share, _) = self.volume(source_volume_id).await?;
        let sid = SnapshotId::new(&vid.server, &vid.share, name);
        let journal = self.snapshots(&share);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut held = journal
            .reserve(Reservation {
                name: name.into(),
                id: sid.encode(),
                attrs: BTreeMap::from([
                    ("source".to_string(), source_volume_id.to_string()),
                    ("state".into(), CREATING.into()),
                    ("created".into(), now.as_secs().to_string()),
                ]),
            })
            .await?;
        if attr(&held, "source") != source_volume_id {
            return Err(Error::AlreadyExists(format!(
                "snapshot {name:?} exists for volume {}",
                attr(&held, "source")
            )));
        }
        if attr(&held, "state") != READY {
            let data = format!("{}.d", sid.uuid.simple());
            let done = share.walk(&[RESERVED, "snapshots", &data]).await?.is_some();
            if !done {
                let from: Vec<String> = parts(&vid.sub_dir).into_iter().map(String::from).collect();
                let tmp = format!("s-{}", sid.uuid.simple());
                let bytes = self
                    .copy_into(
                        &share,
                        &from,
                        &share,
                        &tmp,
                        &[RESERVED, "snapshots", &data],
                        None,
                    )
                    .await?;
                held.attrs.insert("size".into(), bytes.to_string());
            }
            held.attrs.insert("state".into(), READY.into());
            journal.update(held.clone()).await?;
        }
        Ok(csi::Snapshot {
            size_bytes: proto_i64(size_of(&held)),
            snapshot_id: held.id.clone(),
            source_volume_id: source_volume_id.into(),
            creation_time: Some(prost_types::Timestamp {
                seconds: attr(&held, "created").parse().unwrap_or(0),
                nanos: 0,
            }),
            ready_to_use: true,
            group_snapshot_id: String::new(),
        })
    }

    async fn delete_snapshot(&self, snapshot_id: &str, _secrets: &Secrets) -> Result<()> {
        let Some(sid) = SnapshotId::parse(snapshot_id) else {
            return Ok(());
        };
        let share = self.share_of(&sid.server, &sid.share);
        let journal = self.snapshots(&share);
        let Some(r) = journal.lookup_id(snapshot_id).await? else {
            return Ok(());
        };
        let dir = share.rcsi_dir("snapshots").await?;
        let data = format!("{}.d", sid.uuid.simple());
        remove_tree(&share, &dir, data.as_bytes()).await?;
        remove_tmp(&share, &format!("s-{}", sid.uuid.simple())).await?;
        journal.release(&r.name).await
    }

    async fn expand_volume(
        &self,
        volume_id: &str,
        range: CapacityRange,
        _capability: Option<&Capability>,
        _secrets: &Secrets,
    ) -> Result<(u64, bool)> {
        let (_, share, mut r) = self.volume(volume_id).await?;
        let current = size_of(&r);
        let size = range.choose(current, 0, 1)?;
        if size <= current {
            return Ok((current, false));
        }
        let available = share.available().await?;
        if size - current > available {
            return Err(Error::ResourceExhausted(format!(
                "{} has {} bytes available; growing by {} was requested",
                share.label(),
                available,
                size - current
            )));
        }
        r.attrs.insert("size".into(), size.to_string());
        self.volumes(&share).update(r).await?;
        Ok((size, false))
    }
}
