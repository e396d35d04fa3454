//! Connecting to a CSI endpoint as a client (tests, demo, bench, provisioner).

use crate::server::Endpoint;
use crate::{Error, Result};
use hyper_util::rt::TokioIo;
use std::time::Duration;
use tonic::transport::Channel;

/// Opens a channel to `unix:///path` or `tcp://host:port`.
pub async fn connect(endpoint: &Endpoint) -> Result<Channel> {
    let unavailable =
        |e: tonic::transport::Error| Error::Unavailable(format!("connecting to {endpoint:?}: {e}"));
    match endpoint {
        Endpoint::Unix(path) => {
            let path = path.clone();
            tonic::transport::Endpoint::from_static("http://[::]:0")
                .connect_timeout(Duration::from_secs(5))
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
                .map_err(unavailable)
        }
        Endpoint::Tcp(addr) => tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::InvalidArgument(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(unavailable),
    }
}

/// Connects to an endpoint that may not be listening yet (a driver still
/// starting), retrying until `within` has passed.
pub async fn connect_when_ready(endpoint: &Endpoint, within: Duration) -> Result<Channel> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match connect(endpoint).await {
            Ok(c) => return Ok(c),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}
