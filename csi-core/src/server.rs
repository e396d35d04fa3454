//! Serving the CSI services on a unix or TCP endpoint, plus the metrics and
//! health endpoint, with graceful shutdown.

use crate::authority::AuthorityFix;
use crate::backend::{ControllerBackend, GroupControllerBackend, NodeBackend, Plugin};
use crate::controller::ControllerService;
use crate::csi::{controller_server, group_controller_server, identity_server, node_server};
use crate::group::GroupControllerService;
use crate::identity::IdentityService;
use crate::locks::Operations;
use crate::node::NodeService;
use crate::observe::Observer;
use crate::pluginregistration::registration_server::RegistrationServer;
use crate::registration::{RegistrationOptions, RegistrationService, RegistrationState};
use crate::{Error, IoContext, Result};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tracing::info;

/// Where the gRPC server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `unix:///path/csi.sock`
    Unix(PathBuf),
    /// `tcp://host:port`
    Tcp(String),
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix://") {
            let p = Path::new(p);
            if !p.is_absolute() {
                return Err(format!(
                    "{s}: a unix endpoint needs an absolute path (unix:///run/csi.sock)"
                ));
            }
            Ok(Endpoint::Unix(p.to_path_buf()))
        } else if let Some(p) = s.strip_prefix("unix:").filter(|p| p.starts_with('/')) {
            Ok(Endpoint::Unix(PathBuf::from(p)))
        } else if let Some(a) = s.strip_prefix("tcp://") {
            if a.rsplit_once(':')
                .is_none_or(|(_, port)| port.parse::<u16>().is_err())
            {
                return Err(format!("{s}: a tcp endpoint needs host:port"));
            }
            Ok(Endpoint::Tcp(a.to_owned()))
        } else {
            Err(format!("{s}: expected unix:///path or tcp://host:port"))
        }
    }
}

/// The services one process serves.
pub struct Services {
    /// Identity information and readiness.
    pub plugin: Arc<dyn Plugin>,
    /// Controller service, when this process serves it.
    pub controller: Option<Arc<dyn ControllerBackend>>,
    /// Node service, when this process serves it.
    pub node: Option<Arc<dyn NodeBackend>>,
    /// GroupController service, when the driver has one.
    pub group: Option<Arc<dyn GroupControllerBackend>>,
}

/// Settings for [`serve`].
pub struct ServeOptions {
    /// gRPC endpoint.
    pub endpoint: Endpoint,
    /// Address for `/metrics` and `/healthz`, if any.
    pub metrics_address: Option<SocketAddr>,
    /// Calls slower than this log a warning.
    pub slow_call: Duration,
    /// Kubelet plugin registration, when this process is a node plugin.
    pub registration: Option<RegistrationOptions>,
}

impl Services {
    /// All three services from one backend (node plugins that also serve Controller).
    pub fn all<T: Plugin + ControllerBackend + NodeBackend + 'static>(backend: Arc<T>) -> Self {
        Self {
            plugin: backend.clone(),
            controller: Some(backend.clone()),
            node: Some(backend),
            group: None,
        }
    }

    /// Adds the GroupController service.
    pub fn with_group(mut self, backend: Arc<dyn GroupControllerBackend>) -> Self {
        self.group = Some(backend);
        self
    }
}

impl ServeOptions {
    /// Serve on `endpoint` only: no metrics, no registration, 10 s slow-call warning.
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            metrics_address: None,
            slow_call: Duration::from_secs(10),
            registration: None,
        }
    }
}

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received, finishing in-flight calls"),
        _ = int.recv() => info!("SIGINT received, finishing in-flight calls"),
    }
}

/// Binds a unix socket, removing a stale one and creating the parent directory.
pub fn bind_unix(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(Error::FailedPrecondition(format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                )));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::FailedPrecondition(format!(
                    "another process is already serving on {}",
                    path.display()
                )));
            }
            std::fs::remove_file(path)
                .ctx(|| format!("removing stale socket {}", path.display()))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("inspecting {}", path.display()), e)),
    }
    UnixListener::bind(path).ctx(|| format!("binding {}", path.display()))
}

/// Accepted unix connections, each behind [`AuthorityFix`] so clients that
/// send the socket path as `:authority` (grpcio, the kubelet) are served.
pub fn unix_incoming(
    listener: UnixListener,
) -> impl futures::Stream<Item = std::io::Result<AuthorityFix<tokio::net::UnixStream>>> {
    use futures::StreamExt;
    tokio_stream::wrappers::UnixListenerStream::new(listener).map(|c| c.map(AuthorityFix::new))
}

/// Serves until `shutdown` resolves, then lets in-flight calls finish.
pub async fn serve(
    services: Services,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let obs = Arc::new(Observer::new(opts.slow_call));
    let ops = Operations::default();
    let identity = IdentityService::new(
        services.plugin.clone(),
        services.controller.is_some(),
        services.group.is_some(),
        obs.clone(),
    );
    let router =
        tonic::transport::Server::builder()
            .add_service(identity_server::IdentityServer::new(identity))
            .add_optional_service(services.controller.map(|c| {
                controller_server::ControllerServer::new(ControllerService::new(
                    c,
                    ops.clone(),
                    obs.clone(),
                ))
            }))
            .add_optional_service(services.group.map(|g| {
                group_controller_server::GroupControllerServer::new(GroupControllerService::new(
                    g,
                    ops.clone(),
                    obs.clone(),
                ))
            }))
            .add_optional_service(services.node.map(|n| {
                node_server::NodeServer::new(NodeService::new(n, ops.clone(), obs.clone()))
            }));

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let registration = match &opts.registration {
        Some(r) => {
            let svc = RegistrationService::new(services.plugin.name(), &r.kubelet_endpoint);
            let listener = bind_unix(&r.socket)?;
            info!(socket = %r.socket.display(), "serving kubelet plugin registration");
            let mut stop = stop_rx.clone();
            let server = tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(svc.clone()))
                .serve_with_incoming_shutdown(unix_incoming(listener), async move {
                    let _ = stop.wait_for(|s| *s).await;
                });
            Some((svc, tokio::spawn(server), r.socket.clone()))
        }
        None => None,
    };
    let metrics = match opts.metrics_address {
        Some(addr) => {
            let reg = registration.as_ref().map(|r| r.0.clone());
            Some(spawn_metrics(addr, obs.clone(), services.plugin.clone(), reg, stop_rx).await?)
        }
        None => None,
    };
    let result = match &opts.endpoint {
        Endpoint::Unix(path) => {
            let listener = bind_unix(path)?;
            info!(endpoint = %path.display(), "serving CSI");
            let r = router
                .serve_with_incoming_shutdown(unix_incoming(listener), shutdown)
                .await;
            let _ = std::fs::remove_file(path);
            r
        }
        Endpoint::Tcp(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .ctx(|| format!("binding tcp://{addr}"))?;
            info!(endpoint = %addr, "serving CSI");
            router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    shutdown,
                )
                .await
        }
    };
    // Operations whose clients went away still run; let them finish.
    ops.wait().await;
    let _ = stop_tx.send(true);
    if let Some(m) = metrics {
        let _ = m.await;
    }
    if let Some((_, server, socket)) = registration {
        let _ = server.await;
        let _ = std::fs::remove_file(socket);
    }
    result.map_err(|e| Error::Internal(format!("gRPC server failed: {e}")))
}

async fn spawn_metrics(
    addr: SocketAddr,
    obs: Arc<Observer>,
    plugin: Arc<dyn Plugin>,
    registration: Option<RegistrationService>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let listener = TcpListener::bind(addr)
        .await
        .ctx(|| format!("binding metrics address {addr}"))?;
    info!(%addr, "serving /metrics and /healthz");
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let obs = obs.clone();
                async move { obs.encode() }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let plugin = plugin.clone();
                let registration = registration.clone();
                async move {
                    match registration.map(|r| r.state()) {
                        Some(RegistrationState::Failed(e)) => {
                            return (
                                StatusCode::SERVICE_UNAVAILABLE,
                                format!("kubelet registration failed: {e}"),
                            );
                        }
                        Some(RegistrationState::Pending) => {
                            return (
                                StatusCode::SERVICE_UNAVAILABLE,
                                "not yet registered with the kubelet (no NotifyRegistrationStatus received)"
                                    .to_owned(),
                            );
                        }
                        _ => {}
                    }
                    match plugin.probe().await {
                        Ok(true) => (StatusCode::OK, "ok".to_owned()),
                        Ok(false) => (StatusCode::SERVICE_UNAVAILABLE, "not ready".to_owned()),
                        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
                    }
                }
            }),
        );
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "unix:///run/csi/csi.sock".parse(),
            Ok(Endpoint::Unix("/run/csi/csi.sock".into()))
        );
        assert_eq!(
            "tcp://127.0.0.1:10000".parse(),
            Ok(Endpoint::Tcp("127.0.0.1:10000".into()))
        );
        assert!("unix://relative.sock".parse::<Endpoint>().is_err());
        assert!("tcp://nohost".parse::<Endpoint>().is_err());
        assert!("/plain/path".parse::<Endpoint>().is_err());
    }

    #[test]
    fn stale_socket_is_replaced_but_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("sub/csi.sock");
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let l = bind_unix(&sock).unwrap();
            drop(l); // socket file stays behind, nobody listens
            bind_unix(&sock).unwrap();
        });
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        rt.block_on(async {
            assert!(bind_unix(&file).is_err());
        });
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }
}
