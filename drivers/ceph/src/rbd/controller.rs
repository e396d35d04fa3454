//! The controller: images created, cloned, snapshotted, grown and removed,
//! each CO name reserved in the pool's journal before anything is made.

use super::images::{self, Origin};
use super::params::Params;
use super::{Place, Rbd, creds_of};
use crate::id::CephId;
use crate::journal::{CREATING, Kind, READY, attr, now, size_of, snapshot_of, snapshots_in};
use async_trait::async_trait;
use csi_core::backend::{ControllerBackend, ControllerRpc, SnapshotFilter, VolumeStatus};
use csi_core::csi;
use csi_core::journal::{NameJournal, Reservation};
use csi_core::types::{
    AccessMode, AccessType, Capability, CapacityRange, ContentSource, CreateVolume, Secrets,
};
use csi_core::{Error, Result};
use std::collections::{BTreeMap, HashMap};

const MIB: u64 = 1 << 20;
/// Size of a volume when the request names none.
const DEFAULT_SIZE: u64 = 1 << 30;

/// The volume mode the capabilities ask for ("Block" or "Filesystem");
/// refuses a filesystem written from several nodes, which a block device
/// cannot serve safely, and a mix of both modes.
fn volume_mode(caps: &[Capability]) -> Result<&'static str> {
    for c in caps {
        if matches!(c.access, AccessType::Mount { .. })
            && matches!(
                c.mode,
                AccessMode::MultiNodeMultiWriter | AccessMode::MultiNodeSingleWriter
            )
        {
            return Err(Error::InvalidArgument(format!(
                "{:?} with volumeMode Filesystem would corrupt the filesystem (RBD images are block devices); use ReadWriteOnce, ReadOnlyMany, or volumeMode Block",
                c.mode
            )));
        }
    }
    match caps.iter().filter(|c| c.is_block()).count() {
        0 => Ok("Filesystem"),
        n if n == caps.len() => Ok("Block"),
        _ => Err(Error::InvalidArgument(
            "volume_capabilities mix block and mount access; a volume has one mode".into(),
        )),
    }
}

/// A resolved content source.
struct Source {
    origin: Origin,
    size: u64,
    /// `snapshot:<id>` or `volume:<id>`.
    label: String,
}

impl Rbd {
    /// A volume by id with its pool, or None when it does not exist.
    async fn find(
        &self,
        id: &str,
        kind: Kind,
        creds: &crate::secret::Credentials,
    ) -> Result<Option<(Place, Reservation)>> {
        let Some(parsed) = CephId::parse(id) else {
            return Ok(None);
        };
        let Some(place) = self.place_of(&parsed, creds).await? else {
            return Ok(None);
        };
        let r = self.journal(&place, kind).lookup_id(id).await?;
        Ok(r.map(|r| (place, r)))
    }

    /// Resolves a content source in `cluster` for the new volume `uuid`.
    async fn source(
        &self,
        src: &ContentSource,
        cluster: &str,
        creds: &crate::secret::Credentials,
        uuid: uuid::Uuid,
    ) -> Result<Source> {
        let (id, kind, what) = match src {
            ContentSource::Snapshot(id) => (id, Kind::Snapshots, "snapshot"),
            ContentSource::Volume(id) => (id, Kind::Volumes, "volume"),
        };
        let missing = || Error::NotFound(format!("source {what} {id} does not exist"));
        if CephId::parse(id).is_some_and(|p| p.cluster != cluster) {
            return Err(Error::InvalidArgument(format!(
                "source {what} {id} is in another Ceph cluster than clusterID {cluster:?}"
            )));
        }
        let (place, r) = self.find(id, kind, creds).await?.ok_or_else(missing)?;
        if attr(&r, "state") != READY {
            return Err(Error::Unavailable(format!(
                "source {what} {id} is still being created; retry"
            )));
        }
        let image = attr(&r, "image").to_owned();
        let origin = match src {
            ContentSource::Snapshot(_) => Origin::Snapshot {
                io: place.io.clone(),
                snap: image.clone(),
                image,
            },
            ContentSource::Volume(_) => Origin::Image {
                io: place.io.clone(),
                image,
                tmp: format!("csi-tmp-{}", uuid.hyphenated()),
            },
        };
        Ok(Source {
            origin,
            size: size_of(&r),
            label: format!("{what}:{id}"),
        })
    }
}

#[async_trait]
impl ControllerBackend for Rbd {
    fn controller_capabilities(&self) -> Vec<ControllerRpc> {
        vec![
            ControllerRpc::CreateDeleteVolume,
            ControllerRpc::CreateDeleteSnapshot,
            ControllerRpc::ListSnapshots,
            ControllerRpc::GetSnapshot,
            ControllerRpc::CloneVolume,
            ControllerRpc::ExpandVolume,
            ControllerRpc::SingleNodeMultiWriter,
        ]
    }

    async fn create_volume(&self, req: CreateVolume) -> Result<csi::Volume> {
        let mode = volume_mode(&req.capabilities)?;
        let p = Params::parse(&req.parameters)?;
        let creds = creds_of(&req.secrets, "CreateVolume", "provisioner")?;
        let place = self.place_named(&p.cluster, &creds, &p.pool).await?;
        let journal = self.journal(&place, Kind::Volumes);
        let id = journal.id_for(&req.name);
        let source = match &req.source {
            Some(s) => Some(self.source(s, &p.cluster, &creds, id.uuid).await?),
            None => None,
        };
        let min = source.as_ref().map_or(0, |s| s.size);
        let default = if min > 0 { min } else { DEFAULT_SIZE };
        let size = req.capacity.choose(default, min.max(MIB), MIB)?;
        let image = format!("{}{}", p.prefix, id.uuid.hyphenated());
        let mut attrs = BTreeMap::from([
            ("image".to_string(), image.clone()),
            ("size".into(), size.to_string()),
            ("state".into(), CREATING.into()),
            (
                "source".into(),
                source.as_ref().map(|s| s.label.clone()).unwrap_or_default(),
            ),
            ("ctx.clusterID".into(), p.cluster.clone()),
            ("ctx.pool".into(), p.pool.clone()),
            ("ctx.imageName".into(), image.clone()),
            ("ctx.imageFeatures".into(), p.features.clone()),
            ("ctx.mounter".into(), p.mounter.as_str().into()),
            ("ctx.volumeMode".into(), mode.into()),
        ]);
        if let Some(ns) = self.namespace(&p.cluster)? {
            attrs.insert("ctx.radosNamespace".into(), ns);
        }
        for (k, v) in [
            ("ctx.mkfsOptions", &p.mkfs_options),
            ("ctx.mapOptions", &p.map_options),
            ("ctx.fsType", &p.fs_type),
        ] {
            if let Some(v) = v {
                attrs.insert(k.into(), v.clone());
            }
        }
        let wanted = Reservation {
            name: req.name.clone(),
            id: id.to_string(),
            attrs,
        };
        let mut held = match journal.lookup(&req.name).await? {
            Some(held) => held,
            None => {
                self.pool
                    .check_room(&place.conn, Some(place.pool_id), size, "an image")
                    .await?;
                journal.reserve(wanted.clone()).await?
            }
        };
        if held.attrs.is_empty() {
            // A crash right after the directory entry: finish the entry.
            journal.update(wanted.clone()).await?;
            held = wanted.clone();
        }
        let same = |k: &str| attr(&held, k) == attr(&wanted, k);
        let ctx = |r: &Reservation| -> Vec<(String, String)> {
            r.attrs
                .iter()
                .filter(|(k, _)| k.starts_with("ctx."))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        if !req.capacity.admits(size_of(&held)) || !same("source") || ctx(&held) != ctx(&wanted) {
            return Err(Error::AlreadyExists(format!(
                "volume {:?} exists as {} with {} bytes; this request differs (size, parameters or source)",
                req.name,
                held.id,
                size_of(&held)
            )));
        }
        if attr(&held, "state") == READY {
            return Ok(held.to_volume());
        }
        let origin = source.map_or(Origin::Empty, |s| s.origin);
        let (spec, img, max) = (p.spec.clone(), image.clone(), self.cfg.max_clone_depth);
        let size = size_of(&held);
        let image_id = self
            .run(&place, "creating an image", move |_, io| {
                images::ensure_image(io, &img, size, &spec, &origin)
            })
            .await?;
        let img = image.clone();
        self.run_long(&place, "flattening a deep clone", move |conn, io| {
            images::flatten_if_deep(conn, io, &img, max)
        })
        .await?;
        held.attrs.insert("imageId".into(), image_id);
        held.attrs.insert("state".into(), READY.into());
        journal.update(held.clone()).await?;
        Ok(held.to_volume())
    }

    async fn delete_volume(&self, volume_id: &str, secrets: &Secrets) -> Result<()> {
        if CephId::parse(volume_id).is_none() {
            return Ok(());
        }
        let creds = creds_of(secrets, "DeleteVolume", "provisioner")?;
        let Some((place, r)) = self.find(volume_id, Kind::Volumes, &creds).await? else {
            return Ok(());
        };
        let (image, id) = (attr(&r, "image").to_owned(), attr(&r, "imageId").to_owned());
        self.run(&place, "removing an image", move |conn, io| {
            images::remove_image(conn, io, &image, Some(&id))
        })
        .await?;
        self.journal(&place, Kind::Volumes).release(&r.name).await
    }

    async fn get_volume(&self, volume_id: &str) -> Result<(csi::Volume, VolumeStatus)> {
        Err(Error::Unimplemented(format!(
            "ControllerGetVolume carries no Secret, so {volume_id} cannot be looked up"
        )))
    }

    async fn validate_volume_capabilities(
        &self,
        volume_id: &str,
        caps: &[Capability],
        _parameters: &HashMap<String, String>,
        secrets: &Secrets,
    ) -> Result<()> {
        let creds = creds_of(secrets, "ValidateVolumeCapabilities", "controller")?;
        let (_, r) = self
            .find(volume_id, Kind::Volumes, &creds)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {volume_id} does not exist")))?;
        let mode = volume_mode(caps)?;
        let made = attr(&r, "ctx.volumeMode");
        if !made.is_empty() && made != mode {
            return Err(Error::InvalidArgument(format!(
                "volume {volume_id} was made for volumeMode {made}, not {mode}"
            )));
        }
        Ok(())
    }

    async fn create_snapshot(
        &self,
        source_volume_id: &str,
        name: &str,
        _parameters: &BTreeMap<String, String>,
        secrets: &Secrets,
    ) -> Result<csi::Snapshot> {
        let creds = creds_of(secrets, "CreateSnapshot", "snapshotter")?;
        let (place, vol) = self
            .find(source_volume_id, Kind::Volumes, &creds)
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!("source volume {source_volume_id} does not exist"))
            })?;
        let journal = self.journal(&place, Kind::Snapshots);
        let id = journal.id_for(name);
        let image = format!("csi-snap-{}", id.uuid.hyphenated());
        let wanted = Reservation {
            name: name.into(),
            id: id.to_string(),
            attrs: BTreeMap::from([
                ("source".to_string(), source_volume_id.to_string()),
                ("image".into(), image.clone()),
                ("state".into(), CREATING.into()),
                ("created".into(), now()),
            ]),
        };
        let mut held = journal.reserve(wanted.clone()).await?;
        if held.attrs.is_empty() {
            journal.update(wanted.clone()).await?;
            held = wanted;
        }
        if attr(&held, "source") != source_volume_id {
            return Err(Error::AlreadyExists(format!(
                "snapshot {name:?} exists for volume {}",
                attr(&held, "source")
            )));
        }
        if attr(&held, "state") != READY {
            let src = attr(&vol, "image").to_owned();
            let tmp = format!("csi-tmp-{}", id.uuid.hyphenated());
            let max = self.cfg.max_clone_depth;
            let img = image.clone();
            let size = self
                .run_long(&place, "snapshotting an image", move |conn, io| {
                    images::ensure_snapshot(conn, (io, &src), &tmp, io, &img, max)
                })
                .await?;
            held.attrs.insert("size".into(), size.to_string());
            held.attrs.insert("state".into(), READY.into());
            journal.update(held.clone()).await?;
        }
        Ok(snapshot_of(&held))
    }

    async fn delete_snapshot(&self, snapshot_id: &str, secrets: &Secrets) -> Result<()> {
        if CephId::parse(snapshot_id).is_none() {
            return Ok(());
        }
        let creds = creds_of(secrets, "DeleteSnapshot", "snapshotter")?;
        let Some((place, r)) = self.find(snapshot_id, Kind::Snapshots, &creds).await? else {
            return Ok(());
        };
        let image = attr(&r, "image").to_owned();
        self.run(&place, "removing a snapshot", move |conn, io| {
            images::remove_image(conn, io, &image, None)
        })
        .await?;
        self.journal(&place, Kind::Snapshots).release(&r.name).await
    }

    async fn list_snapshots(&self, filter: &SnapshotFilter) -> Result<Vec<csi::Snapshot>> {
        let creds = creds_of(&filter.secrets, "ListSnapshots", "snapshotter-list")?;
        if let Some(id) = &filter.snapshot_id {
            let found = self.find(id, Kind::Snapshots, &creds).await?;
            return Ok(found.iter().map(|(_, r)| snapshot_of(r)).collect());
        }
        let journals = if let Some(vid) = &filter.source_volume_id {
            match self.find(vid, Kind::Volumes, &creds).await? {
                Some((place, _)) => vec![self.journal(&place, Kind::Snapshots)],
                None => vec![],
            }
        } else {
            let all = self.every_pool(&creds).await?;
            all.iter()
                .map(|x| self.journal(x, Kind::Snapshots))
                .collect()
        };
        snapshots_in(journals, filter.source_volume_id.as_deref()).await
    }

    async fn expand_volume(
        &self,
        volume_id: &str,
        range: CapacityRange,
        _capability: Option<&Capability>,
        secrets: &Secrets,
    ) -> Result<(u64, bool)> {
        let creds = creds_of(secrets, "ControllerExpandVolume", "controller-expand")?;
        let (place, mut r) = self
            .find(volume_id, Kind::Volumes, &creds)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {volume_id} does not exist")))?;
        let current = size_of(&r);
        let size = range.choose(current, 0, MIB)?;
        if size <= current {
            return Ok((current, false));
        }
        let image = attr(&r, "image").to_owned();
        self.run(&place, "growing an image", move |_, io| {
            let img = crate::librbd::Image::open(io, &image)?;
            if img.size()? < size {
                img.resize(size)?;
            }
            Ok(())
        })
        .await?;
        r.attrs.insert("size".into(), size.to_string());
        self.journal(&place, Kind::Volumes).update(r).await?;
        Ok((size, true))
    }
}

impl Rbd {
    /// Every pool of every cluster of the map the credentials can open
    /// (for listing without a filter).
    async fn every_pool(&self, creds: &crate::secret::Credentials) -> Result<Vec<Place>> {
        let mut out = Vec::new();
        let clusters: Vec<String> = self
            .pool
            .clusters()
            .iter()
            .map(|c| c.cluster_id.clone())
            .collect();
        for cluster in clusters {
            let conn = match self.pool.get(&cluster, creds).await {
                Ok(c) => c,
                Err(Error::PermissionDenied(_)) => continue,
                Err(e) => return Err(e),
            };
            let (out_json, _) = self
                .pool
                .run(&conn, "listing pools", |c| {
                    c.mon_command(r#"{"prefix": "osd pool ls", "format": "json"}"#)
                })
                .await?;
            let names: Vec<String> = serde_json::from_str(&out_json)
                .map_err(|e| Error::Internal(format!("osd pool ls answered {out_json:?}: {e}")))?;
            for name in names {
                match self.place_named(&cluster, creds, &name).await {
                    Ok(p) => out.push(p),
                    Err(Error::PermissionDenied(_) | Error::InvalidArgument(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(out)
    }
}
