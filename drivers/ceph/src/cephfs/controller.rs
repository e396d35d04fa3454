//! The controller: subvolumes created, snapshotted, grown and removed
//! through the mgr's `fs subvolume` commands, each CO name reserved in the
//! filesystem's journal before anything is made.

use super::params::Params;
use super::{Cephfs, Fs};
use crate::id::CephId;
use crate::journal::{CREATING, Kind, READY, attr, now, size_of, snapshot_of, snapshots_in};
use crate::secret::{Credentials, creds_of};
use async_trait::async_trait;
use csi_core::backend::{ControllerBackend, ControllerRpc, SnapshotFilter, VolumeStatus};
use csi_core::csi;
use csi_core::journal::{NameJournal, Reservation};
use csi_core::types::{Capability, CapacityRange, CreateVolume, Secrets};
use csi_core::{Error, Result};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};

const MIB: u64 = 1 << 20;
/// Size of a volume when the request names none.
const DEFAULT_SIZE: u64 = 1 << 30;

/// InvalidArgument for raw block capabilities: a subvolume is a directory tree.
fn filesystem_only(caps: &[Capability]) -> Result<()> {
    if caps.iter().any(Capability::is_block) {
        return Err(Error::InvalidArgument(
            "CephFS volumes are filesystems; volumeMode Block is not available (use rbd.rcsi.io)"
                .into(),
        ));
    }
    Ok(())
}

/// The `fs subvolume` arguments naming a volume's subvolume.
fn subvolume(r: &Reservation) -> serde_json::Value {
    json!({"sub_name": attr(r, "subvolume"), "group_name": attr(r, "group")})
}

/// The volume context entries of a reservation (`ctx.*`), less those only
/// known once the subvolume exists.
fn context(r: &Reservation) -> Vec<(&String, &String)> {
    r.attrs
        .iter()
        .filter(|(k, _)| k.starts_with("ctx.") && *k != "ctx.subvolumePath")
        .collect()
}

impl Cephfs {
    /// A volume or snapshot by id with its filesystem, or None when it
    /// does not exist.
    async fn find(
        &self,
        id: &str,
        kind: Kind,
        creds: &Credentials,
    ) -> Result<Option<(Fs, Reservation)>> {
        let Some(parsed) = CephId::parse(id) else {
            return Ok(None);
        };
        let Some(fs) = self.fs_of(&parsed, creds).await? else {
            return Ok(None);
        };
        let r = self.journal(&fs, kind).lookup_id(id).await?;
        Ok(r.map(|r| (fs, r)))
    }

    /// Every filesystem of every cluster of the map the credentials can
    /// open (for listing snapshots without a filter).
    async fn every_fs(&self, creds: &Credentials) -> Result<Vec<Fs>> {
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
            let (ls, _) = self
                .pool
                .run(&conn, "listing filesystems", |c| {
                    c.mon_command(r#"{"prefix": "fs ls", "format": "json"}"#)
                })
                .await?;
            for f in super::fs_list(&ls)? {
                out.push(self.fs_named(&cluster, creds, &f.name).await?);
            }
        }
        Ok(out)
    }
}

impl Cephfs {
    /// Removes the cephx user nodes made for the volume of `sub`, when the
    /// provisioner's user may (else it stays, harmless: its caps name a
    /// path that no longer exists).
    async fn remove_volume_user(&self, fs: &Fs, creds: &Credentials, sub: &str) -> Result<()> {
        let who = (fs.cluster.clone(), creds.user.clone());
        let refused = || self.no_auth_caps.lock().unwrap_or_else(|e| e.into_inner());
        if refused().contains(&who) {
            return Ok(());
        }
        let entity = format!("client.{}", super::node::volume_user(sub));
        let cmd = json!({"prefix": "auth rm", "entity": entity}).to_string();
        let done = self
            .pool
            .run(&fs.conn, "removing the volume's cephx user", move |c| {
                c.mon_command(&cmd)
            })
            .await;
        match done {
            Ok(_) | Err(Error::NotFound(_)) => Ok(()),
            Err(Error::PermissionDenied(e)) => {
                tracing::info!(entity, error = %e, "the provisioner's user may not remove volume users; they stay (harmless: their caps name removed paths)");
                refused().insert(who);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl ControllerBackend for Cephfs {
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
        filesystem_only(&req.capabilities)?;
        let p = Params::parse(&req.parameters)?;
        let creds = creds_of(&req.secrets, "CreateVolume", "provisioner")?;
        let group = self.group(&p.cluster, p.group.as_deref())?;
        let fs = self.fs_named(&p.cluster, &creds, &p.fs_name).await?;
        let journal = self.journal(&fs, Kind::Volumes);
        let id = journal.id_for(&req.name);
        let source = match &req.source {
            Some(src) => Some(self.source(src, &fs, &creds).await?),
            None => None,
        };
        let min = source.as_ref().map_or(MIB, |s| size_of(&s.entry).max(MIB));
        let default = source.as_ref().map_or(DEFAULT_SIZE, |s| size_of(&s.entry));
        let size = req.capacity.choose(default.max(min), min, MIB)?;
        let sub = format!("{}{}", p.prefix, id.uuid.hyphenated());
        let mut attrs = BTreeMap::from([
            ("subvolume".to_string(), sub.clone()),
            ("group".into(), group.clone()),
            ("size".into(), size.to_string()),
            ("state".into(), CREATING.into()),
            (
                "source".into(),
                source.as_ref().map(|s| s.label.clone()).unwrap_or_default(),
            ),
            ("ctx.clusterID".into(), p.cluster.clone()),
            ("ctx.fsName".into(), p.fs_name.clone()),
            ("ctx.subvolumeGroup".into(), group.clone()),
            ("ctx.subvolumeName".into(), sub.clone()),
            ("ctx.mounter".into(), p.mounter.as_str().into()),
        ]);
        for (k, v) in [
            ("ctx.kernelMountOptions", &p.kernel_options),
            ("ctx.fuseMountOptions", &p.fuse_options),
            ("ctx.pool", &p.pool),
        ] {
            if let Some(v) = v {
                attrs.insert(k.into(), v.clone());
            }
        }
        if let Some(src) = source.as_ref().filter(|s| s.volume) {
            // Where the temporary snapshot is, also once the source's entry is gone.
            attrs.insert("from".into(), attr(&src.entry, "subvolume").into());
            attrs.insert("fromGroup".into(), attr(&src.entry, "group").into());
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
                    .check_room(&fs.conn, None, size, "a volume's quota")
                    .await?;
                journal.reserve(wanted.clone()).await?
            }
        };
        if held.attrs.is_empty() {
            // A crash right after the directory entry: finish the entry.
            journal.update(wanted.clone()).await?;
            held = wanted.clone();
        }
        let same_source = attr(&held, "source") == attr(&wanted, "source");
        if !req.capacity.admits(size_of(&held))
            || context(&held) != context(&wanted)
            || !same_source
        {
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
        // Both are idempotent: an existing group or subvolume is kept.
        self.mgr(
            &fs,
            "fs subvolumegroup create",
            json!({"group_name": group}),
        )
        .await?;
        match &source {
            None => {
                let mut args = subvolume(&held);
                args["size"] = size_of(&held).into();
                args["mode"] = "0777".into();
                if let Some(pool) = &p.pool {
                    args["pool_layout"] = pool.clone().into();
                }
                self.mgr(&fs, "fs subvolume create", args).await?;
            }
            Some(src) => {
                self.clone_into(&fs, src, &held, p.pool.as_deref()).await?;
                // The clone has the source's quota: give it the volume's.
                let mut args = subvolume(&held);
                args["new_size"] = size_of(&held).into();
                self.mgr(&fs, "fs subvolume resize", args).await?;
            }
        }
        let path = self.subvolume_path(&fs, &held).await?;
        held.attrs.insert("ctx.subvolumePath".into(), path);
        held.attrs.insert("state".into(), READY.into());
        journal.update(held.clone()).await?;
        Ok(held.to_volume())
    }

    async fn delete_volume(&self, volume_id: &str, secrets: &Secrets) -> Result<()> {
        if CephId::parse(volume_id).is_none() {
            return Ok(());
        }
        let creds = creds_of(secrets, "DeleteVolume", "provisioner")?;
        let Some((fs, r)) = self.find(volume_id, Kind::Volumes, &creds).await? else {
            return Ok(());
        };
        let rm = |retain: bool| {
            let mut a = subvolume(&r);
            a["retain_snapshots"] = retain.into();
            a["force"] = true.into();
            a
        };
        if attr(&r, "state") != READY && !attr(&r, "source").is_empty() {
            // A clone still copying cannot be removed until cancelled.
            let _ = self.mgr(&fs, "fs clone cancel", clone_args(&r)).await;
            self.drop_temp_snapshot(&fs, &r).await?;
        }
        match self.mgr(&fs, "fs subvolume rm", rm(false)).await {
            Ok(_) | Err(Error::NotFound(_)) => {}
            // Its snapshots outlive it (VolumeSnapshots outlive their claim):
            // the subvolume's data goes, the snapshots stay until deleted.
            Err(Error::FailedPrecondition(_)) => {
                self.mgr(&fs, "fs subvolume rm", rm(true)).await?;
            }
            Err(e) => return Err(e),
        }
        self.remove_volume_user(&fs, &creds, attr(&r, "subvolume"))
            .await?;
        self.journal(&fs, Kind::Volumes).release(&r.name).await
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
        self.find(volume_id, Kind::Volumes, &creds)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {volume_id} does not exist")))?;
        filesystem_only(caps)
    }

    async fn create_snapshot(
        &self,
        source_volume_id: &str,
        name: &str,
        _parameters: &BTreeMap<String, String>,
        secrets: &Secrets,
    ) -> Result<csi::Snapshot> {
        let creds = creds_of(secrets, "CreateSnapshot", "snapshotter")?;
        let (fs, vol) = self
            .find(source_volume_id, Kind::Volumes, &creds)
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!("source volume {source_volume_id} does not exist"))
            })?;
        let journal = self.journal(&fs, Kind::Snapshots);
        let id = journal.id_for(name);
        let snap = format!("csi-snap-{}", id.uuid.hyphenated());
        let wanted = Reservation {
            name: name.into(),
            id: id.to_string(),
            attrs: BTreeMap::from([
                ("source".to_string(), source_volume_id.to_string()),
                ("snapshot".into(), snap.clone()),
                ("subvolume".into(), attr(&vol, "subvolume").into()),
                ("group".into(), attr(&vol, "group").into()),
                ("size".into(), size_of(&vol).to_string()),
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
            let mut args = subvolume(&vol);
            args["snap_name"] = snap.into();
            match self.mgr(&fs, "fs subvolume snapshot create", args).await {
                Ok(_) | Err(Error::AlreadyExists(_)) => {}
                Err(e) => return Err(e),
            }
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
        let Some((fs, r)) = self.find(snapshot_id, Kind::Snapshots, &creds).await? else {
            return Ok(());
        };
        let mut args = subvolume(&r);
        args["snap_name"] = attr(&r, "snapshot").into();
        // A subvolume removed with its snapshots retained goes with the last.
        match self.mgr(&fs, "fs subvolume snapshot rm", args).await {
            Ok(_) | Err(Error::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        self.journal(&fs, Kind::Snapshots).release(&r.name).await
    }

    async fn list_snapshots(&self, filter: &SnapshotFilter) -> Result<Vec<csi::Snapshot>> {
        let creds = creds_of(&filter.secrets, "ListSnapshots", "snapshotter-list")?;
        if let Some(id) = &filter.snapshot_id {
            let found = self.find(id, Kind::Snapshots, &creds).await?;
            return Ok(found.iter().map(|(_, r)| snapshot_of(r)).collect());
        }
        let journals = if let Some(vid) = &filter.source_volume_id {
            match self.find(vid, Kind::Volumes, &creds).await? {
                Some((fs, _)) => vec![self.journal(&fs, Kind::Snapshots)],
                None => vec![],
            }
        } else {
            let all = self.every_fs(&creds).await?;
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
        let (fs, mut r) = self
            .find(volume_id, Kind::Volumes, &creds)
            .await?
            .ok_or_else(|| Error::NotFound(format!("volume {volume_id} does not exist")))?;
        let current = size_of(&r);
        let size = range.choose(current, 0, MIB)?;
        if size <= current {
            return Ok((current, false));
        }
        let mut args = subvolume(&r);
        args["new_size"] = size.into();
        args["no_shrink"] = true.into();
        self.mgr(&fs, "fs subvolume resize", args).await?;
        r.attrs.insert("size".into(), size.to_string());
        self.journal(&fs, Kind::Volumes).update(r).await?;
        // The quota applies at once on every mount: nothing to do on nodes.
        Ok((size, false))
    }
}

/// A resolved content source: the journal entry of the snapshot or volume.
struct Source {
    entry: Reservation,
    /// Whether it is a volume (cloned through a temporary snapshot).
    volume: bool,
    /// `snapshot:<id>` or `volume:<id>`.
    label: String,
}

/// How long CreateVolume waits for a clone before answering Aborted (the
/// provisioner retries until it is complete).
const CLONE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The `fs clone status` / `fs clone cancel` arguments of a new volume.
fn clone_args(r: &Reservation) -> serde_json::Value {
    json!({"clone_name": attr(r, "subvolume"), "group_name": attr(r, "group")})
}

/// The temporary snapshot a volume cloned from a volume is copied from.
fn temp_snapshot(r: &Reservation) -> String {
    format!("csi-tmp-{}", attr(r, "subvolume"))
}

impl Cephfs {
    /// Looks up a content source in filesystem `fs` (NotFound when it does
    /// not exist, InvalidArgument when it lives in another filesystem,
    /// Unavailable while it is being made).
    async fn source(
        &self,
        src: &csi_core::types::ContentSource,
        fs: &Fs,
        creds: &Credentials,
    ) -> Result<Source> {
        use csi_core::types::ContentSource;
        let (id, kind, what) = match src {
            ContentSource::Snapshot(id) => (id, Kind::Snapshots, "snapshot"),
            ContentSource::Volume(id) => (id, Kind::Volumes, "volume"),
        };
        let (home, entry) = self
            .find(id, kind, creds)
            .await?
            .ok_or_else(|| Error::NotFound(format!("source {what} {id} does not exist")))?;
        if (home.cluster.as_str(), home.pool_id) != (fs.cluster.as_str(), fs.pool_id) {
            return Err(Error::InvalidArgument(format!(
                "source {what} {id} is in another CephFS filesystem than {:?}; a clone stays in its filesystem",
                fs.name
            )));
        }
        if attr(&entry, "state") != READY {
            return Err(Error::Unavailable(format!(
                "source {what} {id} is still being created; retry"
            )));
        }
        Ok(Source {
            entry,
            volume: kind == Kind::Volumes,
            label: format!("{what}:{id}"),
        })
    }

    /// Copies the source into the new volume's subvolume with `fs subvolume
    /// snapshot clone` (a volume through a temporary snapshot), waiting a
    /// little: Aborted while the copy runs, so the CO retries; a failed
    /// copy is removed so the retry starts it again.
    async fn clone_into(
        &self,
        fs: &Fs,
        src: &Source,
        new: &Reservation,
        pool: Option<&str>,
    ) -> Result<()> {
        let snap = if src.volume {
            let snap = temp_snapshot(new);
            let mut args = subvolume(&src.entry);
            args["snap_name"] = snap.clone().into();
            match self.mgr(fs, "fs subvolume snapshot create", args).await {
                Ok(_) | Err(Error::AlreadyExists(_)) => {}
                Err(e) => return Err(e),
            }
            snap
        } else {
            attr(&src.entry, "snapshot").to_owned()
        };
        let mut args = subvolume(&src.entry);
        args["snap_name"] = snap.into();
        args["target_sub_name"] = attr(new, "subvolume").into();
        args["target_group_name"] = attr(new, "group").into();
        if let Some(pool) = pool {
            args["pool_layout"] = pool.into();
        }
        match self.mgr(fs, "fs subvolume snapshot clone", args).await {
            // Started by an earlier call.
            Ok(_) | Err(Error::AlreadyExists(_)) => {}
            Err(e) => return Err(e),
        }
        let t = std::time::Instant::now();
        loop {
            let st = match self.mgr(fs, "fs clone status", clone_args(new)).await {
                Ok(st) => st,
                // The mgr's volumes module answers slowly while it copies.
                Err(Error::DeadlineExceeded(_)) => json!({"status": {"state": "busy"}}),
                Err(e) => return Err(e),
            };
            let state = st["status"]["state"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            match state.as_str() {
                "complete" => break,
                "failed" | "canceled" => {
                    let why = st["status"]["failure"].to_string();
                    let mut rm = subvolume(new);
                    rm["force"] = true.into();
                    self.mgr(fs, "fs subvolume rm", rm).await?;
                    return Err(Error::Internal(format!(
                        "copying {} into {} {state} ({why}); the copy was removed, a retry starts it again",
                        src.label,
                        attr(new, "subvolume")
                    )));
                }
                _ if t.elapsed() >= CLONE_WAIT => {
                    return Err(Error::Aborted(format!(
                        "the copy of {} into volume {:?} is {state}; retry until it is complete",
                        src.label, new.name
                    )));
                }
                _ => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
            }
        }
        if src.volume {
            self.drop_temp_snapshot(fs, new).await?;
        }
        Ok(())
    }

    /// Removes the temporary snapshot of a volume cloned from a volume
    /// (success when there is none).
    async fn drop_temp_snapshot(&self, fs: &Fs, new: &Reservation) -> Result<()> {
        if attr(new, "from").is_empty() {
            return Ok(());
        }
        let mut args = json!({"sub_name": attr(new, "from"), "group_name": attr(new, "fromGroup")});
        args["snap_name"] = temp_snapshot(new).into();
        args["force"] = true.into();
        match self.mgr(fs, "fs subvolume snapshot rm", args).await {
            Ok(_) | Err(Error::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The subvolume's path from `fs subvolume info`.
    async fn subvolume_path(&self, fs: &Fs, r: &Reservation) -> Result<String> {
        let info = self.mgr(fs, "fs subvolume info", subvolume(r)).await?;
        info["path"].as_str().map(str::to_owned).ok_or_else(|| {
            // Seen while the MDS does not answer: the mgr prints nothing.
            Error::Unavailable(format!(
                "fs subvolume info of {} printed {info} (is an MDS of filesystem {:?} active?); retry",
                attr(r, "subvolume"),
                fs.name
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_is_refused() {
        use csi_core::types::{AccessMode, AccessType};
        let block = Capability {
            access: AccessType::Block,
            mode: AccessMode::MultiNodeMultiWriter,
        };
        assert!(matches!(
            filesystem_only(&[block]),
            Err(Error::InvalidArgument(_))
        ));
    }
}
