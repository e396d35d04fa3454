//! Prometheus metrics and the /metrics + /healthz endpoint.

use crate::csi::Csi;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Labels of one reconcile outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// Which controller: claim, volume, snapshot or capacity.
    pub controller: &'static str,
    /// "ok" or "error".
    pub result: &'static str,
}

/// Labels naming a controller.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    /// Which controller: claim, volume, snapshot or capacity.
    pub controller: &'static str,
}

/// The provisioner's metrics.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<Outcome, Counter>,
    duration: Family<ControllerLabel, Histogram>,
    /// 1 while this instance holds the leader lease (or needs none).
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("rcsi_provisioner");
        let reconciles = Family::<Outcome, Counter>::default();
        let duration = Family::<ControllerLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        let leader = Gauge::default();
        registry.register(
            "reconciles",
            "Reconciles by controller and result",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            duration.clone(),
        );
        registry.register("leader", "1 while this instance is active", leader.clone());
        Self {
            registry,
            reconciles,
            duration,
            leader,
        }
    }
}

impl Metrics {
    /// Counts one reconcile of `controller` that took `took`.
    pub fn record(&self, controller: &'static str, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&Outcome { controller, result })
            .inc();
        self.duration
            .get_or_create(&ControllerLabel { controller })
            .observe(took.as_secs_f64());
    }

    /// How many reconciles of `controller` ended with `result`.
    pub fn count(&self, controller: &'static str, result: &'static str) -> u64 {
        self.reconciles
            .get_or_create(&Outcome { controller, result })
            .get()
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves /metrics, and /healthz (200 when the driver answers Probe ready) on `addr`.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    csi: Arc<dyn Csi>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
                        m.encode(),
                    )
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let csi = csi.clone();
                async move {
                    match tokio::time::timeout(Duration::from_secs(5), csi.probe()).await {
                        Ok(Ok(true)) => (StatusCode::OK, "ok".to_owned()),
                        Ok(Ok(false)) => {
                            (StatusCode::SERVICE_UNAVAILABLE, "driver not ready".into())
                        }
                        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("probe: {e}")),
                        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "probe timed out".into()),
                    }
                }
            }),
        );
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    }))
}
