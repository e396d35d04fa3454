//! The CSI GroupController service: validation, locking and detached
//! execution around a [`GroupControllerBackend`].

use crate::backend::GroupControllerBackend;
use crate::csi;
use crate::locks::Operations;
use crate::observe::Observer;
use crate::types::{Secrets, check_id_basic, check_name};
use crate::{Result, invalid};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// GroupController service over any [`GroupControllerBackend`].
pub struct GroupControllerService {
    backend: Arc<dyn GroupControllerBackend>,
    ops: Operations,
    obs: Arc<Observer>,
}

impl GroupControllerService {
    /// Wraps a backend; `ops` is the process's one lock table.
    pub fn new(
        backend: Arc<dyn GroupControllerBackend>,
        ops: Operations,
        obs: Arc<Observer>,
    ) -> Self {
        Self { backend, ops, obs }
    }

    fn id(&self, value: &str, field: &str) -> Result<String> {
        check_id_basic(value, field)?;
        self.backend.check_id(value, field)?;
        Ok(value.to_owned())
    }

    /// The member snapshot ids a Delete or Get names (optional, checked).
    fn member_ids(&self, ids: &[String]) -> Result<Vec<String>> {
        ids.iter()
            .enumerate()
            .map(|(i, s)| self.id(s, &format!("snapshot_ids[{i}]")))
            .collect()
    }
}

#[tonic::async_trait]
impl csi::group_controller_server::GroupController for GroupControllerService {
    async fn group_controller_get_capabilities(
        &self,
        request: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        use csi::group_controller_service_capability::{Rpc, Type, rpc};
        self.obs
            .call(
                "GroupControllerGetCapabilities",
                "",
                request.get_ref(),
                async {
                    Ok(csi::GroupControllerGetCapabilitiesResponse {
                        capabilities: vec![csi::GroupControllerServiceCapability {
                            r#type: Some(Type::Rpc(Rpc {
                                r#type: rpc::Type::CreateDeleteGetVolumeGroupSnapshot as i32,
                            })),
                        }],
                    })
                },
            )
            .await
    }

    async fn create_volume_group_snapshot(
        &self,
        request: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("CreateVolumeGroupSnapshot", "", &r, async {
                let name = check_name(&r.name, "name")?;
                if r.source_volume_ids.is_empty() {
                    return Err(invalid!(
                        "source_volume_ids is required and must not be empty"
                    ));
                }
                let mut sources = Vec::new();
                let mut seen = BTreeSet::new();
                for (i, v) in r.source_volume_ids.iter().enumerate() {
                    let id = self.id(v, &format!("source_volume_ids[{i}]"))?;
                    if !seen.insert(id.clone()) {
                        return Err(invalid!("source_volume_ids names {id:?} twice"));
                    }
                    sources.push(id);
                }
                let mut guards = vec![self.ops.lock("group snapshot name", &name)?];
                for id in &sources {
                    guards.push(self.ops.lock("volume", id)?);
                }
                let backend = self.backend.clone();
                let params: BTreeMap<String, String> = r.parameters.clone().into_iter().collect();
                let secrets = Secrets(r.secrets.clone());
                let group = self
                    .ops
                    .run(guards, async move {
                        backend
                            .create_group_snapshot(&name, &sources, &params, &secrets)
                            .await
                    })
                    .await?;
                Ok(csi::CreateVolumeGroupSnapshotResponse {
                    group_snapshot: Some(group),
                })
            })
            .await
    }

    async fn delete_volume_group_snapshot(
        &self,
        request: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("DeleteVolumeGroupSnapshot", "", &r, async {
                let id = self.id(&r.group_snapshot_id, "group_snapshot_id")?;
                let members = self.member_ids(&r.snapshot_ids)?;
                let g = self.ops.lock("group snapshot", &id)?;
                let (backend, secrets) = (self.backend.clone(), Secrets(r.secrets.clone()));
                self.ops
                    .run(vec![g], async move {
                        backend.delete_group_snapshot(&id, &members, &secrets).await
                    })
                    .await?;
                Ok(csi::DeleteVolumeGroupSnapshotResponse {})
            })
            .await
    }

    async fn get_volume_group_snapshot(
        &self,
        request: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        let r = request.into_inner();
        self.obs
            .call("GetVolumeGroupSnapshot", "", &r, async {
                let id = self.id(&r.group_snapshot_id, "group_snapshot_id")?;
                let members = self.member_ids(&r.snapshot_ids)?;
                let group = self
                    .backend
                    .get_group_snapshot(&id, &members, &Secrets(r.secrets.clone()))
                    .await?;
                Ok(csi::GetVolumeGroupSnapshotResponse {
                    group_snapshot: Some(group),
                })
            })
            .await
    }
}
