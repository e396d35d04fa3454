//! Per-RPC tracing spans, Prometheus metrics and slow-call warnings.

use crate::Result;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::{Response, Status};
use tracing::{Instrument, debug, info, warn};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

type HistogramFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

/// Shared instrumentation for every RPC of one plugin process.
pub struct Observer {
    calls: Family<CallLabels, Counter>,
    in_flight: Family<MethodLabels, Gauge>,
    latency: HistogramFamily,
    registry: std::sync::Mutex<Registry>,
    slow: Duration,
    next_id: AtomicU64,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

impl Observer {
    /// Creates the metrics; calls slower than `slow` log a warning.
    pub fn new(slow: Duration) -> Self {
        let calls = Family::<CallLabels, Counter>::default();
        let in_flight = Family::<MethodLabels, Gauge>::default();
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let mut registry = Registry::with_prefix("csi");
        registry.register(
            "rpc_requests",
            "CSI calls completed, by method and gRPC code",
            calls.clone(),
        );
        registry.register("rpc_in_flight", "CSI calls in progress", in_flight.clone());
        registry.register(
            "rpc_duration_seconds",
            "CSI call latency in seconds",
            latency.clone(),
        );
        Self {
            calls,
            in_flight,
            latency,
            registry: std::sync::Mutex::new(registry),
            slow,
            next_id: AtomicU64::new(1),
        }
    }

    /// Renders the metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Runs one RPC under a span, records metrics and logs the outcome.
    pub async fn call<R: Debug, T>(
        &self,
        method: &'static str,
        volume_id: &str,
        request: &R,
        fut: impl Future<Output = Result<T>>,
    ) -> std::result::Result<Response<T>, Status> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("rpc", method, request_id, volume_id);
        let labels = MethodLabels {
            method: method.to_owned(),
        };
        async {
            debug!(request = ?request, "call");
            let mut call = InFlight::start(self, &labels);
            let result = fut.await;
            let code = match &result {
                Ok(_) => tonic::Code::Ok,
                Err(e) => e.code(),
            };
            let elapsed = call.finish(code);
            let ms = elapsed.as_secs_f64() * 1e3;
            if elapsed > self.slow {
                warn!(ms, "slow call");
            }
            match result {
                Ok(v) => {
                    info!(ms, "ok");
                    Ok(Response::new(v))
                }
                Err(e) => {
                    warn!(ms, code = ?code, error = %e, "failed");
                    Err(e.into())
                }
            }
        }
        .instrument(span)
        .await
    }
}

/// One call in progress: counted as Cancelled if its future is dropped
/// (the client's deadline passed or it reset the stream) before finishing.
struct InFlight<'a> {
    obs: &'a Observer,
    labels: &'a MethodLabels,
    start: Instant,
    done: bool,
}

impl<'a> InFlight<'a> {
    fn start(obs: &'a Observer, labels: &'a MethodLabels) -> Self {
        obs.in_flight.get_or_create(labels).inc();
        Self {
            obs,
            labels,
            start: Instant::now(),
            done: false,
        }
    }

    /// Records the outcome; returns how long the call took.
    fn finish(&mut self, code: tonic::Code) -> Duration {
        self.done = true;
        let elapsed = self.start.elapsed();
        self.obs.in_flight.get_or_create(self.labels).dec();
        self.obs
            .latency
            .get_or_create(self.labels)
            .observe(elapsed.as_secs_f64());
        self.obs
            .calls
            .get_or_create(&CallLabels {
                method: self.labels.method.clone(),
                code: format!("{code:?}"),
            })
            .inc();
        elapsed
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.done {
            let elapsed = self.finish(tonic::Code::Cancelled);
            warn!(
                ms = elapsed.as_secs_f64() * 1e3,
                "client cancelled the call (deadline or reset); a mutating operation runs on to its end"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[tokio::test]
    async fn counts_calls_by_code() {
        let o = Observer::new(Duration::from_secs(1));
        let _ = o.call("Probe", "", &(), async { Ok(()) }).await;
        let e = o
            .call("Probe", "", &(), async {
                Err::<(), _>(Error::NotFound("x".into()))
            })
            .await;
        assert_eq!(e.unwrap_err().code(), tonic::Code::NotFound);
        let text = o.encode();
        assert!(
            text.contains(r#"csi_rpc_requests_total{method="Probe",code="Ok"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"csi_rpc_requests_total{method="Probe",code="NotFound"} 1"#));
        assert!(text.contains("csi_rpc_duration_seconds_count{method=\"Probe\"} 2"));
    }

    #[tokio::test]
    async fn dropped_calls_count_as_cancelled() {
        let o = Observer::new(Duration::from_secs(1));
        let never = o.call(
            "CreateVolume",
            "v",
            &(),
            std::future::pending::<Result<()>>(),
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(5), never)
                .await
                .is_err()
        );
        let text = o.encode();
        assert!(
            text.contains(r#"csi_rpc_requests_total{method="CreateVolume",code="Cancelled"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"csi_rpc_in_flight{method="CreateVolume"} 0"#),
            "{text}"
        );
    }
}
