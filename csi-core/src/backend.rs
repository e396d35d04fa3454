//! The small traits a driver implements; the core owns all CSI plumbing.

use crate::csi;
use crate::types::{
    Capability, CapacityRange, ControllerPublish, CreateVolume, NodeExpand, PublishVolume, Secrets,
    StageVolume,
};
use crate::{Error, Result};
use async_trait::async_trait;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub use csi::controller_service_capability::rpc::Type as ControllerRpc;
pub use csi::node_service_capability::rpc::Type as NodeRpc;

/// Name, version and plugin-level capabilities shared by every service.
#[async_trait]
pub trait Plugin: Send + Sync + 'static {
    /// Driver name, e.g. `local.rcsi.io`.
    fn name(&self) -> &str;
    /// Whether volumes are only reachable from some nodes (topology).
    fn has_topology(&self) -> bool {
        false
    }
    /// Whether volumes can be expanded while published (online expansion).
    fn online_expansion(&self) -> bool {
        false
    }
    /// Readiness: Ok(true) when ready, Ok(false) while starting, Err when broken.
    async fn probe(&self) -> Result<bool> {
        Ok(true)
    }
    /// Checks a volume or snapshot id beyond the core's rule (non-empty, at
    /// most 128 bytes, no NUL). The default also refuses anything that could
    /// act as a path; a driver whose ids hold paths (a static NFS handle
    /// `server:/share/dir`) loosens it and must then keep them inside its
    /// storage itself.
    fn check_id(&self, id: &str, field: &str) -> Result<()> {
        crate::types::check_id(id, field).map(drop)
    }
}

/// What GetCapacity reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct Capacity {
    /// Bytes available for new volumes.
    pub available: u64,
    /// Largest volume that can be created now, if known.
    pub maximum_volume_size: Option<u64>,
    /// Smallest volume that can be created, if there is a minimum.
    pub minimum_volume_size: Option<u64>,
}

/// Filter for ListSnapshots.
#[derive(Clone, Debug, Default)]
pub struct SnapshotFilter {
    /// Only this snapshot.
    pub snapshot_id: Option<String>,
    /// Only snapshots of this volume.
    pub source_volume_id: Option<String>,
    /// Secrets of the ListSnapshots or GetSnapshot request.
    pub secrets: Secrets,
}

/// Status of a volume as ListVolumes and ControllerGetVolume report it.
#[derive(Clone, Debug, Default)]
pub struct VolumeStatus {
    /// Nodes the volume is published to.
    pub published_node_ids: Vec<String>,
    /// Health, when the driver monitors it.
    pub condition: Option<csi::VolumeCondition>,
}

/// Controller side of a driver: volume and snapshot lifecycle.
#[async_trait]
pub trait ControllerBackend: Plugin {
    /// The controller RPCs this driver supports; the core advertises exactly these.
    fn controller_capabilities(&self) -> Vec<ControllerRpc>;

    /// Creates (or returns the existing) volume for `req.name`.
    async fn create_volume(&self, req: CreateVolume) -> Result<csi::Volume>;

    /// Deletes a volume; an unknown id is success.
    async fn delete_volume(&self, volume_id: &str, secrets: &Secrets) -> Result<()>;

    /// Looks up one volume (NotFound when unknown) with its status.
    async fn get_volume(&self, volume_id: &str) -> Result<(csi::Volume, VolumeStatus)>;

    /// Checks that the volume supports `caps` (InvalidArgument with a reason
    /// when not); by default any capability of an existing volume.
    async fn validate_volume_capabilities(
        &self,
        volume_id: &str,
        caps: &[Capability],
        parameters: &HashMap<String, String>,
        secrets: &Secrets,
    ) -> Result<()> {
        let _ = (caps, parameters, secrets);
        self.get_volume(volume_id).await.map(drop)
    }

    /// Makes a volume usable on a node (attach, fence a previous node) and
    /// returns the publish context NodeStageVolume will get; called only
    /// when the driver declares PublishUnpublishVolume.
    async fn controller_publish(&self, req: ControllerPublish) -> Result<HashMap<String, String>> {
        let _ = req;
        Err(Error::Unimplemented(
            "ControllerPublishVolume is not supported".into(),
        ))
    }

    /// Undoes `controller_publish` for `node_id` (every node when None);
    /// success when the volume or the publish is already gone.
    async fn controller_unpublish(
        &self,
        volume_id: &str,
        node_id: Option<&str>,
        secrets: &Secrets,
    ) -> Result<()> {
        let _ = (volume_id, node_id, secrets);
        Err(Error::Unimplemented(
            "ControllerUnpublishVolume is not supported".into(),
        ))
    }

    /// All volumes, sorted by id (the core paginates).
    async fn list_volumes(&self) -> Result<Vec<(csi::Volume, VolumeStatus)>> {
        Err(Error::Unimplemented("ListVolumes is not supported".into()))
    }

    /// Space available for volumes with these parameters in this topology.
    async fn get_capacity(
        &self,
        caps: &[Capability],
        parameters: &HashMap<String, String>,
        topology: Option<&csi::Topology>,
    ) -> Result<Capacity> {
        let _ = (caps, parameters, topology);
        Err(Error::Unimplemented("GetCapacity is not supported".into()))
    }

    /// Creates (or returns the existing) snapshot `name` of a volume.
    async fn create_snapshot(
        &self,
        source_volume_id: &str,
        name: &str,
        parameters: &BTreeMap<String, String>,
        secrets: &Secrets,
    ) -> Result<csi::Snapshot> {
        let _ = (source_volume_id, name, parameters, secrets);
        Err(Error::Unimplemented(
            "CreateSnapshot is not supported".into(),
        ))
    }

    /// Deletes a snapshot; an unknown id is success.
    async fn delete_snapshot(&self, snapshot_id: &str, secrets: &Secrets) -> Result<()> {
        let _ = (snapshot_id, secrets);
        Err(Error::Unimplemented(
            "DeleteSnapshot is not supported".into(),
        ))
    }

    /// Snapshots matching the filter, sorted by id (the core paginates).
    async fn list_snapshots(&self, filter: &SnapshotFilter) -> Result<Vec<csi::Snapshot>> {
        let _ = filter;
        Err(Error::Unimplemented(
            "ListSnapshots is not supported".into(),
        ))
    }

    /// Grows a volume; returns the new size and whether the node must act too.
    async fn expand_volume(
        &self,
        volume_id: &str,
        range: CapacityRange,
        capability: Option<&Capability>,
        secrets: &Secrets,
    ) -> Result<(u64, bool)> {
        let _ = (volume_id, range, capability, secrets);
        Err(Error::Unimplemented(
            "ControllerExpandVolume is not supported".into(),
        ))
    }
}

/// Volume group snapshots: every member cut at the same point in time.
#[async_trait]
pub trait GroupControllerBackend: Plugin {
    /// Creates (or returns the existing) group snapshot `name` of these
    /// volumes, write-order consistent across them or FailedPrecondition.
    async fn create_group_snapshot(
        &self,
        name: &str,
        source_volume_ids: &[String],
        parameters: &BTreeMap<String, String>,
        secrets: &Secrets,
    ) -> Result<csi::VolumeGroupSnapshot>;

    /// Deletes a group snapshot and its members; unknown is success.
    /// `snapshot_ids`, when given, must be its members (InvalidArgument).
    async fn delete_group_snapshot(
        &self,
        group_snapshot_id: &str,
        snapshot_ids: &[String],
        secrets: &Secrets,
    ) -> Result<()>;

    /// A group snapshot (NotFound when unknown); `snapshot_ids` as for delete.
    async fn get_group_snapshot(
        &self,
        group_snapshot_id: &str,
        snapshot_ids: &[String],
        secrets: &Secrets,
    ) -> Result<csi::VolumeGroupSnapshot>;
}

/// Usage and health of a published volume.
#[derive(Clone, Debug, Default)]
pub struct VolumeStats {
    /// Bytes: total, used, available.
    pub bytes: Option<(u64, u64, u64)>,
    /// Inodes: total, used, available.
    pub inodes: Option<(u64, u64, u64)>,
    /// Abnormal condition message, None when healthy.
    pub abnormal: Option<String>,
}

/// Node identity as NodeGetInfo reports it.
#[derive(Clone, Debug, Default)]
pub struct NodeInfo {
    /// Node id given on the command line.
    pub node_id: String,
    /// Most volumes this node can hold (0: no limit).
    pub max_volumes: u64,
    /// Topology segments of this node.
    pub topology: BTreeMap<String, String>,
}

/// Node side of a driver: making volumes usable on this host.
#[async_trait]
pub trait NodeBackend: Plugin {
    /// The node RPCs this driver supports; the core advertises exactly these.
    fn node_capabilities(&self) -> Vec<NodeRpc>;

    /// This node's id, limits and topology.
    fn node_info(&self) -> NodeInfo;

    /// Prepares the volume at its staging path (idempotent).
    async fn stage(&self, req: StageVolume) -> Result<()> {
        let _ = req;
        Err(Error::Unimplemented(
            "NodeStageVolume is not supported".into(),
        ))
    }

    /// Undoes `stage` (idempotent).
    async fn unstage(&self, volume_id: &str, staging_path: &Path) -> Result<()> {
        let _ = (volume_id, staging_path);
        Err(Error::Unimplemented(
            "NodeUnstageVolume is not supported".into(),
        ))
    }

    /// Makes the volume visible at the target path (idempotent).
    async fn publish(&self, req: PublishVolume) -> Result<()>;

    /// Removes the volume from the target path (idempotent).
    async fn unpublish(&self, volume_id: &str, target_path: &Path) -> Result<()>;

    /// Usage and condition of a volume mounted at `path`.
    async fn stats(&self, volume_id: &str, path: &Path) -> Result<VolumeStats> {
        let _ = (volume_id, path);
        Err(Error::Unimplemented(
            "NodeGetVolumeStats is not supported".into(),
        ))
    }

    /// Grows the filesystem of a volume; returns the new size.
    async fn expand(&self, req: NodeExpand) -> Result<u64> {
        let _ = req;
        Err(Error::Unimplemented(
            "NodeExpandVolume is not supported".into(),
        ))
    }
}
