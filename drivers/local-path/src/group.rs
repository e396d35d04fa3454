//! Volume group snapshots of local-path: every member cut at one instant.
//! Mounted image volumes are all frozen before the first copy and thawed
//! after the last; directory volumes cannot be frozen, so they take part
//! only while nothing has them mounted.

use crate::controller::{no_parameters, prost_timestamp};
use crate::meta::{GroupMeta, SnapshotMeta, VolumeMeta};
use crate::store::Change;
use crate::{LocalPath, new_id, now, tmp_name};
use csi_core::backend::GroupControllerBackend;
use csi_core::types::Secrets;
use csi_core::{Error, IoContext, Result, csi};
use std::collections::BTreeMap;

fn sorted(ids: &[String]) -> Vec<&String> {
    let mut v: Vec<&String> = ids.iter().collect();
    v.sort();
    v
}

impl LocalPath {
    fn group_proto(&self, g: &GroupMeta) -> csi::VolumeGroupSnapshot {
        let idx = self.index();
        csi::VolumeGroupSnapshot {
            group_snapshot_id: g.id.clone(),
            snapshots: g
                .snapshot_ids
                .iter()
                .filter_map(|id| idx.state.snapshots.get(id))
                .map(Self::snapshot_proto)
                .collect(),
            creation_time: Some(prost_timestamp(g.created_unix, g.created_nanos)),
            ready_to_use: true,
        }
    }

    fn group(&self, id: &str) -> Option<GroupMeta> {
        self.index().state.groups.get(id).cloned()
    }

    /// InvalidArgument unless `given` (when not empty) are the group's members.
    fn check_members(g: &GroupMeta, given: &[String]) -> Result<()> {
        if given.is_empty() || sorted(given) == sorted(&g.snapshot_ids) {
            return Ok(());
        }
        Err(Error::InvalidArgument(format!(
            "snapshot_ids {given:?} are not the members of group snapshot {} ({:?})",
            g.id, g.snapshot_ids
        )))
    }

    /// Copies every member's data to its temporary name, all frozen at once.
    async fn cut_group(&self, volumes: &[VolumeMeta], snaps: &[SnapshotMeta]) -> Result<()> {
        let mut frozen = Vec::new();
        for v in volumes.iter().filter(|v| v.backing.is_image()) {
            // A failure here drops the guards taken so far, which thaws them.
            frozen.extend(self.freeze(&self.volume_path(v)).await?);
        }
        let copied = async {
            for (v, s) in volumes.iter().zip(snaps) {
                let tmp = tmp_name(&self.snapshot_path(s));
                if !v.backing.is_image() {
                    let t = tmp.clone();
                    self.fs("creating a snapshot directory", move || {
                        std::fs::create_dir(&t).ctx(|| format!("creating {}", t.display()))
                    })
                    .await?;
                }
                let from = self.volume_path(v);
                self.copy_raw(&from, &tmp, v.backing.is_image()).await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        for f in frozen {
            f.thaw().await;
        }
        copied
    }
}

#[async_trait::async_trait]
impl GroupControllerBackend for LocalPath {
    async fn create_group_snapshot(
        &self,
        name: &str,
        sources: &[String],
        parameters: &BTreeMap<String, String>,
        _secrets: &Secrets,
    ) -> Result<csi::VolumeGroupSnapshot> {
        no_parameters(parameters, "group snapshot")?;
        let existing = {
            let idx = self.index();
            idx.group_by_name
                .get(name)
                .and_then(|id| idx.state.groups.get(id).cloned())
        };
        if let Some(g) = existing {
            if sorted(&g.source_volume_ids) != sorted(sources) {
                return Err(Error::AlreadyExists(format!(
                    "group snapshot {name:?} already exists as {} of volumes {:?}",
                    g.id, g.source_volume_ids
                )));
            }
            let members: Vec<SnapshotMeta> = {
                let idx = self.index();
                let snaps = &idx.state.snapshots;
                g.snapshot_ids
                    .iter()
                    .filter_map(|id| snaps.get(id).cloned())
                    .collect()
            };
            for s in &members {
                self.settle(&self.snapshot_path(s)).await?;
            }
            return Ok(self.group_proto(&g));
        }
        let volumes = sources
            .iter()
            .map(|id| self.volume(id))
            .collect::<Result<Vec<_>>>()?;
        for v in volumes.iter().filter(|v| !v.backing.is_image()) {
            let mounted = self.exposures(v).await?;
            if let Some(m) = mounted.first() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is a directory mounted at {}: directories cannot be frozen, so a group snapshot could not be write-order consistent; unpublish it first, or use backing=file volumes",
                    v.id,
                    m.mount_point.display()
                )));
            }
        }
        let (secs, nanos) = now();
        let gid = new_id("lg-");
        let snaps: Vec<SnapshotMeta> = volumes
            .iter()
            .map(|v| SnapshotMeta {
                id: new_id("ls-"),
                // '/' never appears in a CO's names, so members never collide with them.
                name: format!("{name}/{}", v.id),
                source_volume_id: v.id.clone(),
                size: v.capacity,
                backing: v.backing.clone(),
                created_unix: secs,
                created_nanos: nanos,
                group_id: Some(gid.clone()),
            })
            .collect();
        let group = GroupMeta {
            id: gid,
            name: name.to_owned(),
            source_volume_ids: sources.to_vec(),
            snapshot_ids: snaps.iter().map(|s| s.id.clone()).collect(),
            created_unix: secs,
            created_nanos: nanos,
        };
        let done = async {
            self.cut_group(&volumes, &snaps).await?;
            self.commit(Change::PutGroup {
                group: group.clone(),
                snapshots: snaps.clone(),
            })
            .await
        }
        .await;
        if let Err(e) = done {
            for s in &snaps {
                self.cleanup(&tmp_name(&self.snapshot_path(s))).await;
            }
            return Err(e);
        }
        for s in &snaps {
            self.settle(&self.snapshot_path(s)).await?;
        }
        Ok(self.group_proto(&group))
    }

    async fn delete_group_snapshot(
        &self,
        id: &str,
        snapshot_ids: &[String],
        _secrets: &Secrets,
    ) -> Result<()> {
        let Some(g) = self.group(id) else {
            return Ok(());
        };
        Self::check_members(&g, snapshot_ids)?;
        let paths: Vec<_> = {
            let idx = self.index();
            g.snapshot_ids
                .iter()
                .filter_map(|s| idx.state.snapshots.get(s))
                .map(|s| self.snapshot_path(s))
                .collect()
        };
        self.commit(Change::DeleteGroup { id: g.id.clone() })
            .await?;
        for p in paths {
            self.remove(&p).await?;
        }
        self.settle_deletions().await;
        Ok(())
    }

    async fn get_group_snapshot(
        &self,
        id: &str,
        snapshot_ids: &[String],
        _secrets: &Secrets,
    ) -> Result<csi::VolumeGroupSnapshot> {
        let g = self
            .group(id)
            .ok_or_else(|| Error::NotFound(format!("group snapshot {id:?} does not exist")))?;
        Self::check_members(&g, snapshot_ids)?;
        Ok(self.group_proto(&g))
    }
}
