//! Kubelet plugin registration, built in so no node-driver-registrar
//! sidecar is needed: the kubelet finds `<dir>/<driver>-reg.sock`, asks
//! GetInfo, and reports the outcome through NotifyRegistrationStatus.

use crate::pluginregistration::{self as pr, registration_server::Registration};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tonic::{Request, Response, Status};
use tracing::{error, info};

/// CSI versions advertised to the kubelet.
pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0"];

/// Where and what to register.
#[derive(Clone, Debug)]
pub struct RegistrationOptions {
    /// Registration socket, `<plugins_registry>/<driver>-reg.sock`.
    pub socket: PathBuf,
    /// CSI endpoint path as the kubelet sees it on the host.
    pub kubelet_endpoint: String,
}

/// What the kubelet last said about our registration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RegistrationState {
    /// The kubelet has not called yet.
    #[default]
    Pending,
    /// Registered.
    Registered,
    /// The kubelet refused the registration.
    Failed(String),
}

/// The registration service of one driver.
#[derive(Clone)]
pub struct RegistrationService {
    name: String,
    endpoint: String,
    state: Arc<Mutex<RegistrationState>>,
}

impl RegistrationService {
    /// Registers `driver` with its CSI socket at `kubelet_endpoint`.
    pub fn new(driver: &str, kubelet_endpoint: &str) -> Self {
        Self {
            name: driver.to_owned(),
            endpoint: kubelet_endpoint.to_owned(),
            state: Arc::default(),
        }
    }

    /// The latest registration state.
    pub fn state(&self) -> RegistrationState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn get_info(
        &self,
        _: Request<pr::InfoRequest>,
    ) -> Result<Response<pr::PluginInfo>, Status> {
        info!(driver = %self.name, endpoint = %self.endpoint, "kubelet asked for plugin info");
        Ok(Response::new(pr::PluginInfo {
            r#type: "CSIPlugin".into(),
            name: self.name.clone(),
            endpoint: self.endpoint.clone(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }))
    }

    async fn notify_registration_status(
        &self,
        request: Request<pr::RegistrationStatus>,
    ) -> Result<Response<pr::RegistrationStatusResponse>, Status> {
        let s = request.into_inner();
        let state = if s.plugin_registered {
            info!(driver = %self.name, "registered with the kubelet");
            RegistrationState::Registered
        } else {
            error!(driver = %self.name, error = %s.error, "the kubelet refused the registration");
            RegistrationState::Failed(s.error)
        };
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = state;
        Ok(Response::new(pr::RegistrationStatusResponse {}))
    }
}
