//! `nfs.rcsi.io`: each volume is a sub-directory of an NFS export.
//!
//! The controller creates, deletes, archives, snapshots and clones those
//! directories with a userspace NFSv3 client ([`client`]) and keeps its
//! records on the export ([`records`]), so it mounts nothing and holds no
//! local state. The node mounts them with kernel NFS; every mount, unmount
//! and statfs runs off the runtime under a deadline, so a dead server never
//! blocks other volumes or Probe.

pub mod client;
mod controller;
pub mod error;
pub mod id;
mod node;
pub mod params;
pub mod records;
pub mod tree;

use csi_core::backend::Plugin;
use csi_core::mount::Mounter;
use std::sync::Arc;
use std::time::Duration;

pub use client::ClientConfig;
pub use error::NfsError;

/// The driver name.
pub const NAME: &str = "nfs.rcsi.io";

/// Node-side settings.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's id.
    pub node_id: String,
    /// Mount at NodeStageVolume and bind at NodePublishVolume (else mount at publish).
    pub stage: bool,
    /// Bound on a mount or unmount.
    pub mount_timeout: Duration,
    /// Bound on a statfs; slower is reported as an abnormal volume condition.
    pub stats_timeout: Duration,
    /// How long NodeGetVolumeStats answers from its cache.
    pub stats_cache: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: String::new(),
            stage: true,
            mount_timeout: Duration::from_secs(60),
            stats_timeout: Duration::from_secs(10),
            stats_cache: Duration::from_secs(30),
        }
    }
}

/// The NFS driver: controller, node, or both in one process.
pub struct Nfs {
    pool: client::Pool,
    node: Option<(NodeConfig, Arc<dyn Mounter>)>,
    state: node::NodeState,
}

impl Nfs {
    /// A controller that reaches servers with `client`.
    pub fn controller(client: ClientConfig) -> Self {
        Self {
            pool: client::Pool::new(client),
            node: None,
            state: node::NodeState::default(),
        }
    }

    /// A node plugin that mounts with `mounter` (its controller side, when
    /// also served, uses `client`).
    pub fn node(cfg: NodeConfig, mounter: Arc<dyn Mounter>, client: ClientConfig) -> Self {
        Self {
            pool: client::Pool::new(client),
            node: Some((cfg, mounter)),
            state: node::NodeState::default(),
        }
    }
}

impl Plugin for Nfs {
    fn name(&self) -> &str {
        NAME
    }

    /// Ids hold server, share and sub-directory (and static handles are
    /// `server:/path`), so the path-free default does not apply; every id is
    /// parsed strictly before use.
    fn check_id(&self, id: &str, field: &str) -> csi_core::Result<()> {
        let climbs = id.split(['/', '#']).any(|part| part == ".." || part == ".");
        if climbs || id.starts_with('/') || id.contains(['\n', '\r']) {
            return Err(csi_core::Error::InvalidArgument(format!(
                "{field} {id:?} is not a volume id: it contains '.' or '..' path parts, starts with '/' or holds a line break"
            )));
        }
        Ok(())
    }

    fn online_expansion(&self) -> bool {
        true
    }
}
