//! `juicefs.rcsi.io`: volumes are quota-limited sub-directories of JuiceFS
//! filesystems described by Secrets.
//!
//! The controller formats a filesystem on first use, keeps its records on
//! the filesystem ([`records`]) through a mount of its own, and sets each
//! volume's quota with `juicefs quota set` before CreateVolume returns. The
//! node mounts each filesystem once ([`mounts`]) and bind-mounts volume
//! directories to their targets; the mount daemons outlive the plugin, a
//! restarted plugin re-adopts them, and a dead one is mounted again with
//! its targets re-bound.

mod controller;
pub mod error;
pub mod fs;
pub mod id;
pub mod mounts;
mod node;
pub mod params;
pub mod records;
pub mod secret;

use csi_core::backend::Plugin;
use csi_core::daemon::Spawner;
use csi_core::exec::Exec;
use csi_core::mount::Mounter;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use error::JuicefsError;
pub use fs::Cli;
pub use mounts::FsMounts;
pub use secret::FsSecret;

/// The driver name.
pub const NAME: &str = "juicefs.rcsi.io";

/// Volume-context key of a provisioned volume's directory; static volumes
/// name theirs in `path`.
pub const PATH_KEY: &str = "juicefs.rcsi.io/path";

/// Settings shared by the controller and the node.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where mounts, their logs and the node's state live.
    pub state_dir: PathBuf,
    /// The juicefs client program.
    pub program: String,
    /// Bound on each juicefs command (format, quota, rmr).
    pub call_timeout: Duration,
    /// Bound on a mount becoming ready, an unmount, and filesystem access.
    pub mount_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/rcsi/juicefs"),
            program: "juicefs".into(),
            call_timeout: Duration::from_secs(60),
            mount_timeout: Duration::from_secs(30),
        }
    }
}

/// Node-side settings.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's id.
    pub node_id: String,
    /// Bound on a statfs; slower is reported as an abnormal volume condition.
    pub stats_timeout: Duration,
    /// How long NodeGetVolumeStats answers from its cache.
    pub stats_cache: Duration,
    /// How often mounts are checked (and dead ones restored); zero: only
    /// when a daemon this process started exits, and at publish.
    pub check_interval: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: String::new(),
            stats_timeout: Duration::from_secs(10),
            stats_cache: Duration::from_secs(5),
            check_interval: Duration::from_secs(10),
        }
    }
}

/// The JuiceFS driver: controller, node, or both in one process.
pub struct Juicefs {
    cli: Arc<Cli>,
    cfg: Config,
    controller: FsMounts,
    node: Option<node::Node>,
}

impl Juicefs {
    /// A controller (and, with `node`, a node plugin) running juicefs through
    /// `exec`, its mount daemons through `spawner`.
    pub fn new(
        cfg: Config,
        node: Option<NodeConfig>,
        exec: Arc<dyn Exec>,
        spawner: Arc<dyn Spawner>,
        mounter: Arc<dyn Mounter>,
    ) -> csi_core::Result<Self> {
        let cli = Arc::new(Cli::new(exec, &cfg.program, cfg.call_timeout));
        let mounts = |dir: &str| {
            FsMounts::new(
                &cfg.state_dir.join(dir),
                cli.clone(),
                spawner.clone(),
                mounter.clone(),
                cfg.mount_timeout,
            )
        };
        let controller = mounts("controller");
        let node = match node {
            Some(n) => Some(node::Node::open(
                &cfg,
                n,
                mounts("mounts"),
                mounter.clone(),
            )?),
            None => None,
        };
        Ok(Self {
            cli,
            cfg,
            controller,
            node,
        })
    }

    /// Starts background work: the controller drops mounts an earlier
    /// process left behind; the node re-adopts its mounts and starts
    /// checking them.
    pub async fn start(self: &Arc<Self>) -> csi_core::Result<()> {
        for key in self.controller.mounted_keys().await? {
            self.controller.unmount(&key).await?;
        }
        if self.node.is_some() {
            self.adopt().await?;
            let me = self.clone();
            tokio::spawn(async move { me.check_forever().await });
        }
        Ok(())
    }
}

impl Plugin for Juicefs {
    fn name(&self) -> &str {
        NAME
    }

    fn online_expansion(&self) -> bool {
        true
    }
}
