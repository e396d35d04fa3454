//! Reaching the services in the pods: a local TCP port per pod whose
//! connections are carried to the pod's port, through the API server's
//! port-forward (so no in-cluster networking is needed).

use k8s_openapi::api::core::v1::Pod;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite};

/// A byte stream to a pod's port.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// A boxed future of a stream.
pub type Opening = Pin<Box<dyn Future<Output = io::Result<Box<dyn Stream>>> + Send>>;

/// Opens connections to a pod's port.
pub trait Tunnel: Send + Sync + 'static {
    /// A new connection to `port` of pod `pod` in namespace `ns`.
    fn open(&self, ns: &str, pod: &str, port: u16) -> Opening;
}

/// The API server's port-forward subresource (kube's WebSocket client).
pub struct PortForward {
    /// The cluster.
    pub client: kube::Client,
}

impl Tunnel for PortForward {
    fn open(&self, ns: &str, pod: &str, port: u16) -> Opening {
        let pods: kube::Api<Pod> = kube::Api::namespaced(self.client.clone(), ns);
        let pod = pod.to_owned();
        Box::pin(async move {
            let mut pf = pods
                .portforward(&pod, &[port])
                .await
                .map_err(|e| io::Error::other(format!("port-forward to {pod}: {e}")))?;
            let stream = pf
                .take_stream(port)
                .ok_or_else(|| io::Error::other("port-forward gave no stream"))?;
            // The forwarder's task runs as long as the stream is used.
            tokio::spawn(async move {
                let _ = pf.join().await;
            });
            Ok(Box::new(stream) as Box<dyn Stream>)
        })
    }
}

/// Listens on a free port of 127.0.0.1 and carries each connection to
/// `port` of pod `pod` through `tunnel`; returns the local address.
pub async fn forward(
    tunnel: Arc<dyn Tunnel>,
    ns: &str,
    pod: &str,
    port: u16,
) -> io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (ns, pod) = (ns.to_owned(), pod.to_owned());
    tokio::spawn(async move {
        while let Ok((mut local, _)) = listener.accept().await {
            let opening = tunnel.open(&ns, &pod, port);
            tokio::spawn(async move {
                match opening.await {
                    Ok(mut remote) => {
                        let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
                    }
                    Err(e) => eprintln!("rbench k8s: {e}"),
                }
            });
        }
    });
    Ok(addr)
}

/// Waits until the service behind `addr` sends its greeting (a line),
/// trying every `every` for up to `within`.
pub async fn answering(addr: SocketAddr, within: Duration, every: Duration) -> io::Result<()> {
    let start = Instant::now();
    loop {
        let tried = async {
            let s = tokio::net::TcpStream::connect(addr).await?;
            let mut line = String::new();
            let n = tokio::io::BufReader::new(s).read_line(&mut line).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            Ok(())
        };
        let e = match tokio::time::timeout(Duration::from_secs(5), tried).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => e,
            Err(_) => io::Error::from(io::ErrorKind::TimedOut),
        };
        if start.elapsed() > within {
            return Err(io::Error::new(
                e.kind(),
                format!("did not answer within {within:?}: {e}"),
            ));
        }
        tokio::time::sleep(every).await;
    }
}
