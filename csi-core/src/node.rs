//! The CSI Node service: validation, locking and capability checks around a
//! [`NodeBackend`].

use crate::backend::{NodeBackend, NodeRpc};
use crate::csi;
use crate::locks::Operations;
use crate::observe::Observer;
use crate::types::{
    Capability, CapacityRange, NodeExpand, PublishVolume, Secrets, StageVolume, check_id_basic,
    check_path, proto_i64,
};
use crate::{Error, Result, invalid};
use std::path::PathBuf;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Node service over any [`NodeBackend`].
pub struct NodeService {
    backend: Arc<dyn NodeBackend>,
    caps: Vec<NodeRpc>,
    ops: Operations,
    obs: Arc<Observer>,
}

impl NodeService {
    /// Wraps a backend; its capabilities are read once here. `ops` is the
    /// process's one lock table, shared with the Controller service.
    pub fn new(backend: Arc<dyn NodeBackend>, ops: Operations, obs: Arc<Observer>) -> Self {
        let caps = backend.node_capabilities();
        Self {
            backend,
            caps,
            ops,
            obs,
        }
    }

    /// Checks an id: the core's rule, then the driver's hook.
    fn id(&self, value: &str, field: &str) -> Result<String> {
        check_id_basic(value, field)?;
        self.backend.check_id(value, field)?;
        Ok(value.to_owned())
    }

    fn require(&self, cap: NodeRpc, what: &str) -> Result<()> {
        if self.caps.contains(&cap) {
            Ok(())
        } else {
            Err(Error::Unimplemented(format!(
                "{what} is not supported by {}",
                self.backend.name()
            )))
        }
    }

    fn stages(&self) -> bool {
        self.caps.contains(&NodeRpc::StageUnstageVolume)
    }
}

/// The path a volume is said to be at (NodeGetVolumeStats, NodeExpandVolume):
/// missing is InvalidArgument, but a path that cannot hold it (relative,
/// with `..`) is NotFound, as the spec and the reference drivers answer.
fn volume_path(volume_id: &str, value: &str, field: &str) -> Result<PathBuf> {
    if value.is_empty() {
        return Err(invalid!("{field} is required"));
    }
    check_path(value, field).map_err(|e| {
        Error::NotFound(format!(
            "volume {volume_id:?} is not at {field} {value:?}: {e}"
        ))
    })
}

fn capability(cap: Option<&csi::VolumeCapability>) -> Result<Capability> {
    let cap = cap.ok_or_else(|| invalid!("volume_capability is required"))?;
    Capability::from_proto(cap, "volume_capability")
}

#[tonic::async_trait]
impl csi::node_server::Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("NodeStageVolume", &r.volume_id, &r, async {
                self.require(NodeRpc::StageUnstageVolume, "NodeStageVolume")?;
                let volume_id = self.id(&r.volume_id, "volume_id")?;
                let staging_path = check_path(&r.staging_target_path, "staging_target_path")?;
                let capability = capability(r.volume_capability.as_ref())?;
                let g = self.ops.lock("volume", &volume_id)?;
                let backend = self.backend.clone();
                let req = StageVolume {
                    volume_id,
                    staging_path,
                    capability,
                    publish_context: r.publish_context.clone(),
                    volume_context: r.volume_context.clone(),
                    secrets: Secrets(r.secrets.clone()),
                };
                self.ops
                    .run(vec![g], async move { backend.stage(req).await })
                    .await?;
                Ok(csi::NodeStageVolumeResponse {})
            })
            .await
    }

    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("NodeUnstageVolume", &r.volume_id, &r, async {
                self.require(NodeRpc::StageUnstageVolume, "NodeUnstageVolume")?;
                let volume_id = self.id(&r.volume_id, "volume_id")?;
                let staging_path = check_path(&r.staging_target_path, "staging_target_path")?;
                let g = self.ops.lock("volume", &volume_id)?;
                let backend = self.backend.clone();
                self.ops
                    .run(vec![g], async move {
                        backend.unstage(&volume_id, &staging_path).await
                    })
                    .await?;
                Ok(csi::NodeUnstageVolumeResponse {})
            })
            .await
    }

    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("NodePublishVolume", &r.volume_id, &r, async {
                let volume_id = self.id(&r.volume_id, "volume_id")?;
                let target_path = check_path(&r.target_path, "target_path")?;
                // A missing field is InvalidArgument before the missing stage.
                let capability = capability(r.volume_capability.as_ref())?;
                // Kubelet never stages CSI inline (ephemeral) volumes.
                let ephemeral = r
                    .volume_context
                    .get("csi.storage.k8s.io/ephemeral")
                    .is_some_and(|v| v == "true");
                let staging_path = if !self.stages() || (ephemeral && r.staging_target_path.is_empty()) {
                    None
                } else if r.staging_target_path.is_empty() {
                    // The spec's "Staging target path not set".
                    return Err(Error::FailedPrecondition(format!(
                        "{} stages volumes: staging_target_path is required; call NodeStageVolume first",
                        self.backend.name()
                    )));
                } else {
                    Some(check_path(&r.staging_target_path, "staging_target_path")?)
                };
                let guards = vec![
                    self.ops.lock("volume", &volume_id)?,
                    self.ops.lock("target path", &r.target_path)?,
                ];
                let backend = self.backend.clone();
                let req = PublishVolume {
                    volume_id,
                    staging_path,
                    target_path,
                    readonly: r.readonly || capability.mode.is_read_only(),
                    capability,
                    publish_context: r.publish_context.clone(),
                    volume_context: r.volume_context.clone(),
                    secrets: Secrets(r.secrets.clone()),
                };
                self.ops
                    .run(guards, async move { backend.publish(req).await })
                    .await?;
                Ok(csi::NodePublishVolumeResponse {})
            })
            .await
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("NodeUnpublishVolume", &r.volume_id, &r, async {
                let volume_id = self.id(&r.volume_id, "volume_id")?;
                let target_path = check_path(&r.target_path, "target_path")?;
                let guards = vec![
                    self.ops.lock("volume", &volume_id)?,
                    self.ops.lock("target path", &r.target_path)?,
                ];
                let backend = self.backend.clone();
                self.ops
                    .run(guards, async move {
                        backend.unpublish(&volume_id, &target_path).await
                    })
                    .await?;
                Ok(csi::NodeUnpublishVolumeResponse {})
            })
            .await
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        use csi::volume_usage::Unit;
        let r = request.into_inner();
        self.obs
            .call("NodeGetVolumeStats", &r.volume_id, &r, async {
                self.require(NodeRpc::GetVolumeStats, "NodeGetVolumeStats")?;
                let volume_id = self.id(&r.volume_id, "volume_id")?;
                let path = volume_path(&volume_id, &r.volume_path, "volume_path")?;
                let s = self.backend.stats(&volume_id, &path).await?;
                let usage = |(total, used, avail): (u64, u64, u64), unit: Unit| csi::VolumeUsage {
                    total: proto_i64(total),
                    used: proto_i64(used),
                    available: proto_i64(avail),
                    unit: unit as i32,
                };
                let mut out = Vec::new();
                out.extend(s.bytes.map(|b| usage(b, Unit::Bytes)));
                out.extend(s.inodes.map(|i| usage(i, Unit::Inodes)));
                let condition =
                    self.caps
                        .contains(&NodeRpc::VolumeCondition)
                        .then(|| csi::VolumeCondition {
                            abnormal: s.abnormal.is_some(),
                            message: s.abnormal.unwrap_or_else(|| "volume is healthy".into()),
                        });
                Ok(csi::NodeGetVolumeStatsResponse {
                    usage: out,
                    volume_condition: condition,
                })
            })
            .await
    }

    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("NodeExpandVolume", &r.volume_id, &r, async {
                self.require(NodeRpc::ExpandVolume, "NodeExpandVolume")?;
                let volume_id = self.id(&r.volume_id, "volume_id")?;
                let path = volume_path(&volume_id, &r.volume_path, "volume_path")?;
                let staging = if r.staging_target_path.is_empty() {
                    None
                } else {
                    Some(check_path(&r.staging_target_path, "staging_target_path")?)
                };
                let range = CapacityRange::from_proto(r.capacity_range.as_ref())?;
                let cap = r
                    .volume_capability
                    .as_ref()
                    .map(|c| Capability::from_proto(c, "volume_capability"))
                    .transpose()?;
                let g = self.ops.lock("volume", &volume_id)?;
                let backend = self.backend.clone();
                let req = NodeExpand {
                    volume_id,
                    path,
                    staging_path: staging,
                    range,
                    capability: cap,
                    secrets: Secrets(r.secrets.clone()),
                };
                let size = self
                    .ops
                    .run(vec![g], async move { backend.expand(req).await })
                    .await?;
                Ok(csi::NodeExpandVolumeResponse {
                    capacity_bytes: proto_i64(size),
                })
            })
            .await
    }

    async fn node_get_capabilities(
        &self,
        request: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        use csi::node_service_capability::{Rpc, Type};
        self.obs
            .call("NodeGetCapabilities", "", request.get_ref(), async {
                Ok(csi::NodeGetCapabilitiesResponse {
                    capabilities: self
                        .caps
                        .iter()
                        .map(|c| csi::NodeServiceCapability {
                            r#type: Some(Type::Rpc(Rpc { r#type: *c as i32 })),
                        })
                        .collect(),
                })
            })
            .await
    }

    async fn node_get_info(
        &self,
        request: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        self.obs
            .call("NodeGetInfo", "", request.get_ref(), async {
                let info = self.backend.node_info();
                Ok(csi::NodeGetInfoResponse {
                    node_id: info.node_id,
                    max_volumes_per_node: proto_i64(info.max_volumes),
                    accessible_topology: (!info.topology.is_empty()).then(|| csi::Topology {
                        segments: info.topology.into_iter().collect(),
                    }),
                })
            })
            .await
    }
}
