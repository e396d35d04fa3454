//! The CSI Controller service: validation, locking and capability checks
//! around a [`ControllerBackend`].

use crate::backend::{ControllerBackend, ControllerRpc, SnapshotFilter};
use crate::csi;
use crate::locks::Operations;
use crate::observe::Observer;
use crate::types::{
    Capability, CapacityRange, ContentSource, ControllerPublish, CreateVolume, Secrets,
    check_id_basic, check_name, proto_i64,
};
use crate::{Error, Result, invalid, paging};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Controller service over any [`ControllerBackend`].
pub struct ControllerService {
    backend: Arc<dyn ControllerBackend>,
    caps: Vec<ControllerRpc>,
    ops: Operations,
    obs: Arc<Observer>,
}

impl ControllerService {
    /// Wraps a backend; its capabilities are read once here. `ops` is the
    /// process's one lock table, shared with the Node service.
    pub fn new(backend: Arc<dyn ControllerBackend>, ops: Operations, obs: Arc<Observer>) -> Self {
        let caps = backend.controller_capabilities();
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

    fn require(&self, cap: ControllerRpc, what: &str) -> Result<()> {
        if self.caps.contains(&cap) {
            Ok(())
        } else {
            Err(Error::Unimplemented(format!(
                "{what} is not supported by {}",
                self.backend.name()
            )))
        }
    }

    async fn create_volume_inner(
        &self,
        r: &csi::CreateVolumeRequest,
    ) -> Result<csi::CreateVolumeResponse> {
        self.require(ControllerRpc::CreateDeleteVolume, "CreateVolume")?;
        let ids = |v: &str, f: &str| self.id(v, f).map(drop);
        let req = CreateVolume::from_proto(r, &ids)?;
        // A restore or clone reads its source: others may read it too, but
        // it must not be deleted or changed meanwhile.
        let mut guards = match &req.source {
            Some(ContentSource::Snapshot(id)) => {
                if !self.caps.contains(&ControllerRpc::CreateDeleteSnapshot) {
                    return Err(invalid!("{} cannot restore snapshots", self.backend.name()));
                }
                vec![self.ops.lock_shared("snapshot", id)?]
            }
            Some(ContentSource::Volume(id)) => {
                if !self.caps.contains(&ControllerRpc::CloneVolume) {
                    return Err(invalid!("{} cannot clone volumes", self.backend.name()));
                }
                vec![self.ops.lock_shared("volume", id)?]
            }
            None => vec![],
        };
        guards.push(self.ops.lock("volume name", &req.name)?);
        let range = req.capacity;
        let backend = self.backend.clone();
        let volume = self
            .ops
            .run(guards, async move { backend.create_volume(req).await })
            .await?;
        if volume.volume_id.is_empty() {
            return Err(Error::Internal(
                "driver returned a volume without an id".into(),
            ));
        }
        if volume.capacity_bytes != 0 && !range.admits(volume.capacity_bytes as u64) {
            return Err(Error::Internal(format!(
                "driver returned {} bytes, outside the requested range",
                volume.capacity_bytes
            )));
        }
        Ok(csi::CreateVolumeResponse {
            volume: Some(volume),
        })
    }
}

#[tonic::async_trait]
impl csi::controller_server::Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("CreateVolume", &r.name, &r, self.create_volume_inner(&r))
            .await
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("DeleteVolume", &r.volume_id, &r, async {
                self.require(ControllerRpc::CreateDeleteVolume, "DeleteVolume")?;
                let id = self.id(&r.volume_id, "volume_id")?;
                let g = self.ops.lock("volume", &id)?;
                let (backend, secrets) = (self.backend.clone(), Secrets(r.secrets.clone()));
                self.ops
                    .run(vec![g], async move {
                        backend.delete_volume(&id, &secrets).await
                    })
                    .await?;
                Ok(csi::DeleteVolumeResponse {})
            })
            .await
    }

    async fn controller_publish_volume(
        &self,
        request: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("ControllerPublishVolume", &r.volume_id, &r, async {
                self.require(
                    ControllerRpc::PublishUnpublishVolume,
                    "ControllerPublishVolume",
                )?;
                let volume_id = self.id(&r.volume_id, "volume_id")?;
                if r.node_id.is_empty() {
                    return Err(invalid!("node_id is required"));
                }
                let cap = r
                    .volume_capability
                    .as_ref()
                    .ok_or_else(|| invalid!("volume_capability is required"))?;
                let req = ControllerPublish {
                    volume_id,
                    node_id: r.node_id.clone(),
                    readonly: r.readonly,
                    capability: Capability::from_proto(cap, "volume_capability")?,
                    volume_context: r.volume_context.clone(),
                    secrets: Secrets(r.secrets.clone()),
                };
                let g = self.ops.lock("volume", &req.volume_id)?;
                let backend = self.backend.clone();
                let publish_context = self
                    .ops
                    .run(
                        vec![g],
                        async move { backend.controller_publish(req).await },
                    )
                    .await?;
                Ok(csi::ControllerPublishVolumeResponse { publish_context })
            })
            .await
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("ControllerUnpublishVolume", &r.volume_id, &r, async {
                self.require(
                    ControllerRpc::PublishUnpublishVolume,
                    "ControllerUnpublishVolume",
                )?;
                let id = self.id(&r.volume_id, "volume_id")?;
                let g = self.ops.lock("volume", &id)?;
                let (backend, secrets) = (self.backend.clone(), Secrets(r.secrets.clone()));
                let node = (!r.node_id.is_empty()).then(|| r.node_id.clone());
                self.ops
                    .run(vec![g], async move {
                        backend
                            .controller_unpublish(&id, node.as_deref(), &secrets)
                            .await
                    })
                    .await?;
                Ok(csi::ControllerUnpublishVolumeResponse {})
            })
            .await
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("ValidateVolumeCapabilities", &r.volume_id, &r, async {
                let id = self.id(&r.volume_id, "volume_id")?;
                let caps =
                    Capability::list_from_proto(&r.volume_capabilities, "volume_capabilities")?;
                match self
                    .backend
                    .validate_volume_capabilities(
                        &id,
                        &caps,
                        &r.parameters,
                        &Secrets(r.secrets.clone()),
                    )
                    .await
                {
                    Ok(()) => Ok(csi::ValidateVolumeCapabilitiesResponse {
                        confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                            volume_context: r.volume_context.clone(),
                            volume_capabilities: r.volume_capabilities.clone(),
                            parameters: r.parameters.clone(),
                            mutable_parameters: r.mutable_parameters.clone(),
                        }),
                        message: String::new(),
                    }),
                    Err(Error::InvalidArgument(why)) => {
                        Ok(csi::ValidateVolumeCapabilitiesResponse {
                            confirmed: None,
                            message: why,
                        })
                    }
                    Err(e) => Err(e),
                }
            })
            .await
    }

    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("ListVolumes", "", &r, async {
                self.require(ControllerRpc::ListVolumes, "ListVolumes")?;
                let all = self.backend.list_volumes().await?;
                let (page, next_token) =
                    paging::page(all, |(v, _)| &v.volume_id, &r.starting_token, r.max_entries)?;
                let with_nodes = self
                    .caps
                    .contains(&ControllerRpc::ListVolumesPublishedNodes);
                let with_condition = self.caps.contains(&ControllerRpc::VolumeCondition);
                let entries = page
                    .into_iter()
                    .map(|(v, s)| csi::list_volumes_response::Entry {
                        volume: Some(v),
                        status: (with_nodes || with_condition).then(|| {
                            csi::list_volumes_response::VolumeStatus {
                                published_node_ids: s.published_node_ids,
                                volume_condition: s.condition.filter(|_| with_condition),
                            }
                        }),
                    })
                    .collect();
                Ok(csi::ListVolumesResponse {
                    entries,
                    next_token,
                })
            })
            .await
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("GetCapacity", "", &r, async {
                self.require(ControllerRpc::GetCapacity, "GetCapacity")?;
                let caps = r
                    .volume_capabilities
                    .iter()
                    .enumerate()
                    .map(|(i, c)| Capability::from_proto(c, &format!("volume_capabilities[{i}]")))
                    .collect::<Result<Vec<_>>>()?;
                let c = self
                    .backend
                    .get_capacity(&caps, &r.parameters, r.accessible_topology.as_ref())
                    .await?;
                Ok(csi::GetCapacityResponse {
                    available_capacity: proto_i64(c.available),
                    maximum_volume_size: c.maximum_volume_size.map(proto_i64),
                    minimum_volume_size: c.minimum_volume_size.map(proto_i64),
                })
            })
            .await
    }

    async fn controller_get_capabilities(
        &self,
        request: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use csi::controller_service_capability::{Rpc, Type};
        self.obs
            .call("ControllerGetCapabilities", "", request.get_ref(), async {
                Ok(csi::ControllerGetCapabilitiesResponse {
                    capabilities: self
                        .caps
                        .iter()
                        .map(|c| csi::ControllerServiceCapability {
                            r#type: Some(Type::Rpc(Rpc { r#type: *c as i32 })),
                        })
                        .collect(),
                })
            })
            .await
    }

    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("CreateSnapshot", &r.source_volume_id, &r, async {
                self.require(ControllerRpc::CreateDeleteSnapshot, "CreateSnapshot")?;
                let name = check_name(&r.name, "name")?;
                let source = self.id(&r.source_volume_id, "source_volume_id")?;
                let guards = vec![
                    self.ops.lock("snapshot name", &name)?,
                    self.ops.lock("volume", &source)?,
                ];
                let params = r.parameters.clone().into_iter().collect();
                let (backend, secrets) = (self.backend.clone(), Secrets(r.secrets.clone()));
                let snapshot = self
                    .ops
                    .run(guards, async move {
                        backend
                            .create_snapshot(&source, &name, &params, &secrets)
                            .await
                    })
                    .await?;
                Ok(csi::CreateSnapshotResponse {
                    snapshot: Some(snapshot),
                })
            })
            .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("DeleteSnapshot", "", &r, async {
                self.require(ControllerRpc::CreateDeleteSnapshot, "DeleteSnapshot")?;
                let id = self.id(&r.snapshot_id, "snapshot_id")?;
                let g = self.ops.lock("snapshot", &id)?;
                let (backend, secrets) = (self.backend.clone(), Secrets(r.secrets.clone()));
                self.ops
                    .run(vec![g], async move {
                        backend.delete_snapshot(&id, &secrets).await
                    })
                    .await?;
                Ok(csi::DeleteSnapshotResponse {})
            })
            .await
    }

    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("ListSnapshots", &r.source_volume_id, &r, async {
                self.require(ControllerRpc::ListSnapshots, "ListSnapshots")?;
                // An id that cannot exist matches nothing: an empty list, per spec.
                let valid = |s: &str, f| s.is_empty() || self.id(s, f).is_ok();
                if !valid(&r.snapshot_id, "snapshot_id")
                    || !valid(&r.source_volume_id, "source_volume_id")
                {
                    return Ok(csi::ListSnapshotsResponse::default());
                }
                let filter = SnapshotFilter {
                    snapshot_id: (!r.snapshot_id.is_empty()).then(|| r.snapshot_id.clone()),
                    source_volume_id: (!r.source_volume_id.is_empty())
                        .then(|| r.source_volume_id.clone()),
                    secrets: Secrets(r.secrets.clone()),
                };
                let all = self.backend.list_snapshots(&filter).await?;
                let (page, next_token) =
                    paging::page(all, |s| &s.snapshot_id, &r.starting_token, r.max_entries)?;
                Ok(csi::ListSnapshotsResponse {
                    entries: page
                        .into_iter()
                        .map(|s| csi::list_snapshots_response::Entry { snapshot: Some(s) })
                        .collect(),
                    next_token,
                })
            })
            .await
    }

    async fn get_snapshot(
        &self,
        request: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("GetSnapshot", "", &r, async {
                self.require(ControllerRpc::GetSnapshot, "GetSnapshot")?;
                let id = self.id(&r.snapshot_id, "snapshot_id")?;
                let filter = SnapshotFilter {
                    snapshot_id: Some(id.clone()),
                    source_volume_id: None,
                    secrets: Secrets(r.secrets.clone()),
                };
                let snapshot = self
                    .backend
                    .list_snapshots(&filter)
                    .await?
                    .into_iter()
                    .next();
                match snapshot {
                    Some(s) => Ok(csi::GetSnapshotResponse { snapshot: Some(s) }),
                    None => Err(Error::NotFound(format!("snapshot {id:?} does not exist"))),
                }
            })
            .await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("ControllerExpandVolume", &r.volume_id, &r, async {
                self.require(ControllerRpc::ExpandVolume, "ControllerExpandVolume")?;
                let id = self.id(&r.volume_id, "volume_id")?;
                if r.capacity_range.is_none() {
                    return Err(invalid!("capacity_range is required"));
                }
                let range = CapacityRange::from_proto(r.capacity_range.as_ref())?;
                let cap = r
                    .volume_capability
                    .as_ref()
                    .map(|c| Capability::from_proto(c, "volume_capability"))
                    .transpose()?;
                let g = self.ops.lock("volume", &id)?;
                let (backend, secrets) = (self.backend.clone(), Secrets(r.secrets.clone()));
                let (size, node) = self
                    .ops
                    .run(vec![g], async move {
                        backend
                            .expand_volume(&id, range, cap.as_ref(), &secrets)
                            .await
                    })
                    .await?;
                Ok(csi::ControllerExpandVolumeResponse {
                    capacity_bytes: proto_i64(size),
                    node_expansion_required: node,
                })
            })
            .await
    }

    async fn controller_get_volume(
        &self,
        request: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("ControllerGetVolume", &r.volume_id, &r, async {
                self.require(ControllerRpc::GetVolume, "ControllerGetVolume")?;
                let id = self.id(&r.volume_id, "volume_id")?;
                let (volume, status) = self.backend.get_volume(&id).await?;
                Ok(csi::ControllerGetVolumeResponse {
                    volume: Some(volume),
                    status: Some(csi::controller_get_volume_response::VolumeStatus {
                        published_node_ids: status.published_node_ids,
                        volume_condition: status.condition,
                    }),
                })
            })
            .await
    }

    async fn controller_modify_volume(
        &self,
        request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("ControllerModifyVolume", &r.volume_id, &r, async {
                Err::<csi::ControllerModifyVolumeResponse, _>(Error::Unimplemented(format!(
                    "ControllerModifyVolume is not supported by {}",
                    self.backend.name()
                )))
            })
            .await
    }
}
