//! Wiring: connect to the driver, elect a leader, run the controllers.

use crate::csi::{Csi, GrpcCsi};
use crate::error::{Error, Result};
use crate::snapshot::{self, Content};
use crate::{Ctx, capacity, delete, metrics, provision};
use csi_core::server::Endpoint;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// How often a missing VolumeSnapshotContent API is looked for again.
const SNAPSHOT_API_RECHECK: Duration = Duration::from_secs(30);

/// How `rcsi provisioner` runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The driver's CSI endpoint.
    pub csi_endpoint: Endpoint,
    /// Node-deployment mode: the node this instance serves.
    pub node: Option<String>,
    /// Namespace for the lease and CSIStorageCapacity objects.
    pub namespace: String,
    /// Hold a Lease so only one replica acts (ignored in node-deployment mode).
    pub leader_election: bool,
    /// This replica's identity in the lease (usually the pod name).
    pub identity: String,
    /// Serve /metrics and /healthz here.
    pub metrics_address: Option<SocketAddr>,
    /// Deadline of each CSI call.
    pub timeout: Duration,
    /// How often capacity is republished.
    pub capacity_interval: Duration,
}

/// Runs until `shutdown` resolves, or fails when leadership is lost.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
    let client = Client::try_default().await.map_err(|e| {
        Error::Invalid(format!(
            "no Kubernetes API to talk to (needs an in-cluster service account or KUBECONFIG): {e}"
        ))
    })?;
    let channel = csi_core::client::connect_when_ready(&cfg.csi_endpoint, Duration::from_secs(60))
        .await
        .map_err(|e| Error::Waiting(format!("driver: {e}")))?;
    let csi: Arc<dyn Csi> = Arc::new(GrpcCsi::new(channel, cfg.timeout));
    let driver = csi
        .driver_name()
        .await
        .map_err(|s| Error::csi("GetPluginInfo", s))?;
    info!(%driver, node = ?cfg.node, "starting provisioner");

    let mut ctx = Ctx::new(
        client.clone(),
        csi.clone(),
        driver,
        cfg.node.clone(),
        cfg.namespace.clone(),
    );
    if ctx.node.is_some() {
        match capacity::owner(client.clone(), &cfg.namespace, &cfg.identity).await {
            Ok(o) => ctx.capacity_owner = Some(o),
            Err(e) => warn!(pod = %cfg.identity, error = %e,
                "cannot read this pod: CSIStorageCapacity objects get no owner and outlive it"),
        }
    }
    let metrics = ctx.metrics.clone();
    if let Some(addr) = cfg.metrics_address {
        metrics::serve(addr, metrics.clone(), csi.clone())
            .await
            .map_err(|e| Error::Invalid(format!("binding metrics address {addr}: {e}")))?;
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let mut lease = None;
    if cfg.leader_election && cfg.node.is_none() {
        // One lease per driver, so several drivers' controllers can share a namespace.
        let lease_name = format!("rcsi-provisioner-{}", ctx.driver.replace('.', "-"));
        let manager = LeaseManagerBuilder::new(client.clone(), lease_name)
            .with_namespace(&cfg.namespace)
            .with_identity(&cfg.identity)
            .build()
            .await
            .map_err(|e| Error::Lease(e.to_string()))?;
        let (mut leader, task) = manager.watch().await;
        info!(identity = %cfg.identity, "waiting for the leader lease");
        tokio::select! {
            r = leader.wait_for(|l| *l) => { r.map_err(|e| Error::Lease(e.to_string()))?; }
            _ = stopped() => return Ok(()),
        }
        info!("became leader");
        lease = Some((leader, task));
    }
    metrics.leader.set(1);

    let pv_controller = Controller::new(
        Api::<PersistentVolume>::all(client.clone()),
        watcher::Config::default(),
    );
    ctx.pvs = Some(pv_controller.store());
    let ctx = Arc::new(ctx);

    let claims = Controller::new(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(stopped())
    .run(provision::reconcile, provision::error_policy, ctx.clone())
    .for_each(|_| async {});
    let volumes = pv_controller
        .graceful_shutdown_on(stopped())
        .run(delete::reconcile, delete::error_policy, ctx.clone())
        .for_each(|_| async {});

    let content_api: Api<Content> = Api::all_with(client.clone(), &snapshot::content_resource());
    let snapshots = {
        let ctx = ctx.clone();
        let stopped = stopped.clone();
        async move {
            tokio::select! {
                _ = snapshot::wait_for_api(&content_api, SNAPSHOT_API_RECHECK) => {}
                _ = stopped() => return,
            }
            Controller::new_with(
                content_api,
                watcher::Config::default(),
                snapshot::content_resource(),
            )
            .graceful_shutdown_on(stopped())
            .run(snapshot::reconcile, snapshot::error_policy, ctx)
            .for_each(|_| async {})
            .await
        }
    };
    let capacity = {
        let ctx = ctx.clone();
        let interval = cfg.capacity_interval;
        async move {
            if ctx.node.is_some() {
                capacity::run(&ctx, interval).await;
            } else {
                std::future::pending::<()>().await;
            }
        }
    };
    let lost = async {
        match &mut lease {
            Some((leader, _)) => {
                let _ = leader.wait_for(|l| !*l).await;
            }
            None => std::future::pending().await,
        }
    };
    let work = async {
        tokio::join!(claims, volumes, snapshots);
    };
    tokio::select! {
        _ = work => {}
        _ = capacity => {}
        _ = lost => {
            metrics.leader.set(0);
            return Err(Error::Lease("lost the leader lease".into()));
        }
    }
    if let Some((leader, task)) = lease {
        drop(leader);
        if let Ok(Ok(manager)) = task.await {
            let _ = manager.release().await;
        }
    }
    info!("provisioner stopped");
    Ok(())
}
