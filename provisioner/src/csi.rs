//! The CSI controller calls the provisioner makes, behind a trait so tests can script them.

use async_trait::async_trait;
use csi_core::csi::{self, controller_client::ControllerClient, identity_client::IdentityClient};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// The CSI controller RPCs the provisioner uses.
#[async_trait]
pub trait Csi: Send + Sync + 'static {
    /// The driver's name (GetPluginInfo).
    async fn driver_name(&self) -> Result<String, Status>;
    /// True when the driver reports itself ready (Probe).
    async fn probe(&self) -> Result<bool, Status>;
    /// CreateVolume.
    async fn create_volume(&self, req: csi::CreateVolumeRequest) -> Result<csi::Volume, Status>;
    /// DeleteVolume.
    async fn delete_volume(&self, req: csi::DeleteVolumeRequest) -> Result<(), Status>;
    /// ControllerExpandVolume.
    async fn expand_volume(
        &self,
        req: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse, Status>;
    /// CreateSnapshot.
    async fn create_snapshot(
        &self,
        req: csi::CreateSnapshotRequest,
    ) -> Result<csi::Snapshot, Status>;
    /// DeleteSnapshot.
    async fn delete_snapshot(&self, req: csi::DeleteSnapshotRequest) -> Result<(), Status>;
    /// ListSnapshots.
    async fn list_snapshots(
        &self,
        req: csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse, Status>;
    /// GetCapacity.
    async fn get_capacity(
        &self,
        req: csi::GetCapacityRequest,
    ) -> Result<csi::GetCapacityResponse, Status>;
}

/// [`Csi`] over a gRPC channel to the driver's socket.
#[derive(Clone)]
pub struct GrpcCsi {
    controller: ControllerClient<Channel>,
    identity: IdentityClient<Channel>,
    timeout: Duration,
}

impl GrpcCsi {
    /// Uses `channel` for every call; each call is cancelled after `timeout`.
    pub fn new(channel: Channel, timeout: Duration) -> Self {
        Self {
            controller: ControllerClient::new(channel.clone()),
            identity: IdentityClient::new(channel),
            timeout,
        }
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }
}

#[async_trait]
impl Csi for GrpcCsi {
    async fn driver_name(&self) -> Result<String, Status> {
        let r = self.req(csi::GetPluginInfoRequest {});
        Ok(self
            .identity
            .clone()
            .get_plugin_info(r)
            .await?
            .into_inner()
            .name)
    }

    async fn probe(&self) -> Result<bool, Status> {
        let r = self.req(csi::ProbeRequest {});
        let ready = self.identity.clone().probe(r).await?.into_inner().ready;
        Ok(ready.is_none_or(|b| b))
    }

    async fn create_volume(&self, req: csi::CreateVolumeRequest) -> Result<csi::Volume, Status> {
        let r = self.req(req);
        let resp = self.controller.clone().create_volume(r).await?.into_inner();
        resp.volume
            .ok_or_else(|| Status::internal("CreateVolume returned no volume"))
    }

    async fn delete_volume(&self, req: csi::DeleteVolumeRequest) -> Result<(), Status> {
        self.controller.clone().delete_volume(self.req(req)).await?;
        Ok(())
    }

    async fn expand_volume(
        &self,
        req: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse, Status> {
        let r = self.req(req);
        Ok(self
            .controller
            .clone()
            .controller_expand_volume(r)
            .await?
            .into_inner())
    }

    async fn create_snapshot(
        &self,
        req: csi::CreateSnapshotRequest,
    ) -> Result<csi::Snapshot, Status> {
        let r = self.req(req);
        let resp = self
            .controller
            .clone()
            .create_snapshot(r)
            .await?
            .into_inner();
        resp.snapshot
            .ok_or_else(|| Status::internal("CreateSnapshot returned no snapshot"))
    }

    async fn delete_snapshot(&self, req: csi::DeleteSnapshotRequest) -> Result<(), Status> {
        self.controller
            .clone()
            .delete_snapshot(self.req(req))
            .await?;
        Ok(())
    }

    async fn list_snapshots(
        &self,
        req: csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse, Status> {
        let r = self.req(req);
        Ok(self
            .controller
            .clone()
            .list_snapshots(r)
            .await?
            .into_inner())
    }

    async fn get_capacity(
        &self,
        req: csi::GetCapacityRequest,
    ) -> Result<csi::GetCapacityResponse, Status> {
        let r = self.req(req);
        Ok(self.controller.clone().get_capacity(r).await?.into_inner())
    }
}
