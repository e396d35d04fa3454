//! The CSI Identity service.

use crate::backend::Plugin;
use crate::csi::{self, plugin_capability as pc};
use crate::observe::Observer;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Identity service over any [`Plugin`].
pub struct IdentityService {
    plugin: Arc<dyn Plugin>,
    serves_controller: bool,
    serves_group: bool,
    obs: Arc<Observer>,
}

impl IdentityService {
    /// `serves_controller` and `serves_group` advertise CONTROLLER_SERVICE
    /// and GROUP_CONTROLLER_SERVICE when this process also serves them.
    pub fn new(
        plugin: Arc<dyn Plugin>,
        serves_controller: bool,
        serves_group: bool,
        obs: Arc<Observer>,
    ) -> Self {
        Self {
            plugin,
            serves_controller,
            serves_group,
            obs,
        }
    }

    fn capabilities(&self) -> Vec<csi::PluginCapability> {
        let service = |t: pc::service::Type| csi::PluginCapability {
            r#type: Some(pc::Type::Service(pc::Service { r#type: t as i32 })),
        };
        let mut caps = Vec::new();
        if self.serves_controller {
            caps.push(service(pc::service::Type::ControllerService));
        }
        if self.serves_group {
            caps.push(service(pc::service::Type::GroupControllerService));
        }
        if self.plugin.has_topology() {
            caps.push(service(pc::service::Type::VolumeAccessibilityConstraints));
        }
        if self.plugin.online_expansion() {
            caps.push(csi::PluginCapability {
                r#type: Some(pc::Type::VolumeExpansion(pc::VolumeExpansion {
                    r#type: pc::volume_expansion::Type::Online as i32,
                })),
            });
        }
        caps
    }
}

#[tonic::async_trait]
impl csi::identity_server::Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        request: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        self.obs
            .call("GetPluginInfo", "", request.get_ref(), async {
                Ok(csi::GetPluginInfoResponse {
                    name: self.plugin.name().to_owned(),
                    vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
                    manifest: [("project".to_owned(), "rcsi".to_owned())].into(),
                })
            })
            .await
    }

    async fn get_plugin_capabilities(
        &self,
        request: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        self.obs
            .call("GetPluginCapabilities", "", request.get_ref(), async {
                Ok(csi::GetPluginCapabilitiesResponse {
                    capabilities: self.capabilities(),
                })
            })
            .await
    }

    async fn probe(
        &self,
        request: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        self.obs
            .call("Probe", "", request.get_ref(), async {
                let ready = self.plugin.probe().await?;
                Ok(csi::ProbeResponse { ready: Some(ready) })
            })
            .await
    }
}
