//! core-floor: the shared CSI core serving a backend that does nothing, as
//! the limit of what any rcsi driver can reach on this stack (gRPC, runtime, logs,
//! locks, metrics). Run csi-bench against its socket; `dir-floor` gives the
//! filesystem's share of a local-path pair, this the core's.

use anyhow::Result;
use async_trait::async_trait;
use clap::Parser;
use csi_core::backend::{
    ControllerBackend, ControllerRpc, NodeBackend, NodeInfo, NodeRpc, Plugin, VolumeStatus,
};
use csi_core::csi;
use csi_core::server::{Endpoint, ServeOptions, Services, serve, shutdown_signal};
use csi_core::types::{CreateVolume, PublishVolume, Secrets};
use std::path::Path;
use std::sync::Arc;

#[derive(Parser)]
#[command(about = "Serve the CSI core over a backend that does no work")]
struct Args {
    /// Endpoint to serve: unix:///path/csi.sock.
    #[arg(long)]
    endpoint: Endpoint,
}

/// Answers every call at once.
struct Nothing;

#[async_trait]
impl Plugin for Nothing {
    fn name(&self) -> &str {
        "floor.rcsi.io"
    }
}

#[async_trait]
impl ControllerBackend for Nothing {
    fn controller_capabilities(&self) -> Vec<ControllerRpc> {
        vec![ControllerRpc::CreateDeleteVolume]
    }
    async fn create_volume(&self, req: CreateVolume) -> csi_core::Result<csi::Volume> {
        Ok(csi::Volume {
            volume_id: req.name,
            capacity_bytes: req.capacity.required as i64,
            ..Default::default()
        })
    }
    async fn delete_volume(&self, _: &str, _: &Secrets) -> csi_core::Result<()> {
        Ok(())
    }
    async fn get_volume(&self, id: &str) -> csi_core::Result<(csi::Volume, VolumeStatus)> {
        Err(csi_core::Error::NotFound(format!("{id} does not exist")))
    }
}

#[async_trait]
impl NodeBackend for Nothing {
    fn node_capabilities(&self) -> Vec<NodeRpc> {
        vec![]
    }
    fn node_info(&self) -> NodeInfo {
        NodeInfo {
            node_id: "floor".into(),
            ..Default::default()
        }
    }
    async fn publish(&self, _: PublishVolume) -> csi_core::Result<()> {
        Ok(())
    }
    async fn unpublish(&self, _: &str, _: &Path) -> csi_core::Result<()> {
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    // Logs as the rcsi binary's text format does (RUST_LOG, default info).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    serve(
        Services::all(Arc::new(Nothing)),
        ServeOptions::new(args.endpoint),
        shutdown_signal(),
    )
    .await?;
    Ok(())
}
