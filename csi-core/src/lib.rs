//! csi-core: the shared CSI gRPC core of rcsi. Drivers implement the traits
//! in [`backend`]; this crate validates requests, serializes operations,
//! observes every call and serves the gRPC endpoints.

/// Generated CSI v1.12 types, clients and servers.
#[allow(missing_docs, clippy::all)]
pub mod csi {
    tonic::include_proto!("csi.v1");
    include!(concat!(env!("OUT_DIR"), "/csi_redact.rs"));
}

/// Generated kubelet plugin-registration types and servers.
#[allow(missing_docs, clippy::all)]
pub mod pluginregistration {
    tonic::include_proto!("pluginregistration");
}

pub mod authority;
pub mod backend;
pub mod blockdev;
pub mod client;
pub mod codec;
pub mod controller;
pub mod daemon;
pub mod devvol;
mod error;
pub mod exec;
pub mod fsutil;
pub mod fuse;
pub mod group;
pub mod identity;
pub mod journal;
pub mod locks;
pub mod mount;
pub mod node;
pub mod observe;
pub mod paging;
mod pool;
pub mod redact;
pub mod registration;
pub mod server;
pub mod stats;
pub mod types;

pub use error::{Error, IoContext, Result};
