//! The registry of drivers `rcsi` serves: each brings its own group of
//! flags, so `rcsi node --driver NAME --help` shows only what applies.

use anyhow::Context;
use clap::{ArgMatches, Args, Command, FromArgMatches};
use csi_core::server::Services;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What the node plugin of every driver is told.
pub struct NodeCommon {
    /// This node's name.
    pub node_id: String,
}

/// One driver `rcsi` can serve.
pub struct Driver {
    /// Value of `--driver`.
    pub name: &'static str,
    /// One line for help texts.
    pub about: &'static str,
    /// Adds the driver's flags to `rcsi node`.
    pub node_flags: fn(Command) -> Command,
    /// Builds the node plugin's services from the parsed flags.
    pub node: fn(&ArgMatches, NodeCommon) -> anyhow::Result<Services>,
    /// The controller plugin, or why the driver has none.
    pub controller: Result<ControllerEntry, &'static str>,
}

/// The controller side of a driver that runs one apart from its nodes.
pub struct ControllerEntry {
    /// Adds the driver's flags to `rcsi controller`.
    pub flags: fn(Command) -> Command,
    /// Builds the controller plugin's services.
    pub build: fn(&ArgMatches) -> anyhow::Result<Services>,
}

/// Every driver, by name.
pub const DRIVERS: &[Driver] = &[
    Driver {
        name: "local-path",
        about: "local.rcsi.io: node-local directories and loop-device volumes",
        node_flags: LocalPathArgs::augment_args,
        node: local_path_node,
        controller: Err(
            "local-path keeps its data on each node, so its controller runs inside `rcsi node`; no separate controller is needed",
        ),
    },
    Driver {
        name: "nfs",
        about: "nfs.rcsi.io: sub-directories of NFS exports",
        node_flags: NfsNodeArgs::augment_args,
        node: nfs_node,
        controller: Ok(ControllerEntry {
            flags: NfsClientArgs::augment_args,
            build: nfs_controller,
        }),
    },
    Driver {
        name: "juicefs",
        about: "juicefs.rcsi.io: quota-limited sub-directories of JuiceFS filesystems",
        node_flags: JuicefsNodeArgs::augment_args,
        node: juicefs_node,
        controller: Ok(ControllerEntry {
            flags: JuicefsArgs::augment_args,
            build: juicefs_controller,
        }),
    },
    Driver {
        name: "rbd",
        about: "rbd.rcsi.io: Ceph RBD images",
        node_flags: RbdNodeArgs::augment_args,
        node: rbd_node,
        controller: Ok(ControllerEntry {
            flags: RbdArgs::augment_args,
            build: rbd_controller,
        }),
    },
    Driver {
        name: "cephfs",
        about: "cephfs.rcsi.io: CephFS subvolumes, mounted by the kernel or ceph-fuse",
        node_flags: CephfsNodeArgs::augment_args,
        node: cephfs_node,
        controller: Ok(ControllerEntry {
            flags: CephfsArgs::augment_args,
            build: cephfs_controller,
        }),
    },
];

/// The driver named `name`.
pub fn find(name: &str) -> Option<&'static Driver> {
    DRIVERS.iter().find(|d| d.name == name)
}

/// The value of `--driver NAME` or `--driver=NAME` anywhere in `argv`.
pub fn named_in(argv: &[std::ffi::OsString]) -> Option<&'static Driver> {
    let mut it = argv.iter().filter_map(|a| a.to_str());
    while let Some(a) = it.next() {
        if a == "--driver" {
            return it.next().and_then(find);
        }
        if let Some(v) = a.strip_prefix("--driver=") {
            return find(v);
        }
    }
    None
}

/// Help appended when no driver is named.
pub fn overview(subcommand: &str) -> String {
    let mut s = format!(
        "Each driver has its own flags: `rcsi {subcommand} --driver NAME --help` lists them.\nDrivers:"
    );
    for d in DRIVERS {
        s.push_str(&format!("\n  {:<12} {}", d.name, d.about));
    }
    s
}

/// Flags of the local-path driver.
#[derive(Args)]
#[command(next_help_heading = "local-path")]
struct LocalPathArgs {
    /// Directory that holds the volumes of this node.
    #[arg(long, default_value = "/var/lib/rcsi/local")]
    base_path: PathBuf,
    /// Most volumes on this node (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_volumes: u64,
    /// Bytes of the base filesystem never handed out to volumes.
    #[arg(long, default_value_t = 0)]
    reserved_bytes: u64,
}

fn local_path_node(m: &ArgMatches, common: NodeCommon) -> anyhow::Result<Services> {
    let a = LocalPathArgs::from_arg_matches(m)?;
    let host = rcsi_local_path::Host::system(Duration::from_secs(120));
    let cfg = rcsi_local_path::Config {
        node_id: common.node_id,
        base_path: a.base_path,
        max_volumes: a.max_volumes,
        reserved_bytes: a.reserved_bytes,
    };
    let driver =
        rcsi_local_path::LocalPath::open(cfg, host).context("opening the local-path base path")?;
    let driver = Arc::new(driver);
    Ok(Services::all(driver.clone()).with_group(driver))
}

/// How the NFS controller reaches servers.
#[derive(Args)]
#[command(next_help_heading = "nfs (controller)")]
struct NfsClientArgs {
    /// NFS port of the servers (default: ask each server's portmapper).
    #[arg(long)]
    nfs_port: Option<u16>,
    /// MOUNT port of the servers (default: ask each server's portmapper).
    #[arg(long)]
    nfs_mount_port: Option<u16>,
    /// Portmapper port, used when a port above is not given.
    #[arg(long, default_value_t = 111)]
    nfs_portmapper_port: u16,
    /// Seconds one NFS call may take before the CSI call fails with DEADLINE_EXCEEDED.
    #[arg(long, default_value_t = 30)]
    nfs_call_timeout: u64,
    /// Connections per export (one NFS call is in flight per connection).
    #[arg(long, default_value_t = 4)]
    nfs_connections: usize,
    /// Connect from a port below 1024, for exports marked `secure` (needs root or CAP_NET_BIND_SERVICE).
    #[arg(long)]
    nfs_privileged_port: bool,
    /// AUTH_UNIX uid of the controller's calls (exports need no_root_squash for 0).
    #[arg(long, default_value_t = 0)]
    nfs_uid: u32,
    /// AUTH_UNIX gid of the controller's calls.
    #[arg(long, default_value_t = 0)]
    nfs_gid: u32,
}

impl NfsClientArgs {
    fn config(&self) -> rcsi_nfs::ClientConfig {
        rcsi_nfs::ClientConfig {
            nfs_port: self.nfs_port,
            mount_port: self.nfs_mount_port,
            portmapper_port: self.nfs_portmapper_port,
            timeout: Duration::from_secs(self.nfs_call_timeout.max(1)),
            connections: self.nfs_connections.max(1),
            privileged_port: self.nfs_privileged_port,
            uid: self.nfs_uid,
            gid: self.nfs_gid,
        }
    }
}

/// Flags of the NFS node plugin.
#[derive(Args)]
#[command(next_help_heading = "nfs (node)")]
struct NfsNodeArgs {
    /// Mount at NodeStageVolume and bind-mount at NodePublishVolume; with
    /// false, every publish mounts the export itself.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    stage: bool,
    /// Seconds a mount or unmount may take (then unmount is forced, then lazy).
    #[arg(long, default_value_t = 60)]
    mount_timeout: u64,
    /// Seconds a statfs may take before the volume is reported abnormal.
    #[arg(long, default_value_t = 10)]
    stats_timeout: u64,
    /// Seconds NodeGetVolumeStats answers from its cache.
    #[arg(long, default_value_t = 30)]
    stats_cache: u64,
    /// Also serve the Controller service from this process (small clusters, tests).
    #[arg(long)]
    serve_controller: bool,
    #[command(flatten)]
    client: NfsClientArgs,
}

fn nfs_node(m: &ArgMatches, common: NodeCommon) -> anyhow::Result<Services> {
    let a = NfsNodeArgs::from_arg_matches(m)?;
    let timeout = Duration::from_secs(a.mount_timeout.max(1));
    let exec: Arc<dyn csi_core::exec::Exec> = Arc::new(csi_core::exec::SystemExec);
    let mounter = Arc::new(csi_core::mount::SystemMounter::new(exec, timeout));
    let cfg = rcsi_nfs::NodeConfig {
        node_id: common.node_id,
        stage: a.stage,
        mount_timeout: timeout,
        stats_timeout: Duration::from_secs(a.stats_timeout.max(1)),
        stats_cache: Duration::from_secs(a.stats_cache),
    };
    let driver = Arc::new(rcsi_nfs::Nfs::node(cfg, mounter, a.client.config()));
    let mut services = Services::all(driver);
    if !a.serve_controller {
        services.controller = None;
    }
    Ok(services)
}

fn nfs_controller(m: &ArgMatches) -> anyhow::Result<Services> {
    let a = NfsClientArgs::from_arg_matches(m)?;
    let driver = Arc::new(rcsi_nfs::Nfs::controller(a.config()));
    Ok(Services {
        plugin: driver.clone(),
        controller: Some(driver),
        node: None,
        group: None,
    })
}

/// Flags of the JuiceFS driver shared by controller and node.
#[derive(Args)]
#[command(next_help_heading = "juicefs")]
struct JuicefsArgs {
    /// Directory for filesystem mounts, their logs and the node's state
    /// (the node's must be under a path shared with the host, e.g. the
    /// kubelet's plugins directory).
    #[arg(long, default_value = "/var/lib/rcsi/juicefs")]
    state_dir: PathBuf,
    /// The juicefs client program.
    #[arg(long, default_value = "juicefs")]
    juicefs: String,
    /// Seconds each juicefs command (format, quota, rmr) may take.
    #[arg(long, default_value_t = 60)]
    call_timeout: u64,
    /// Seconds a mount may take to become ready (also bounds unmounts and lookups).
    #[arg(long, default_value_t = 30)]
    mount_timeout: u64,
}

impl JuicefsArgs {
    fn config(&self) -> rcsi_juicefs::Config {
        rcsi_juicefs::Config {
            state_dir: self.state_dir.clone(),
            program: self.juicefs.clone(),
            call_timeout: Duration::from_secs(self.call_timeout.max(1)),
            mount_timeout: Duration::from_secs(self.mount_timeout.max(1)),
        }
    }
}

/// Flags of the JuiceFS node plugin.
#[derive(Args)]
#[command(next_help_heading = "juicefs (node)")]
struct JuicefsNodeArgs {
    /// Seconds a statfs may take before the volume is reported abnormal.
    #[arg(long, default_value_t = 10)]
    stats_timeout: u64,
    /// Seconds NodeGetVolumeStats answers from its cache.
    #[arg(long, default_value_t = 5)]
    stats_cache: u64,
    /// Seconds between checks of the mounts (dead ones are mounted again and
    /// their targets re-bound); 0: only when a mount process exits.
    #[arg(long, default_value_t = 10)]
    check_interval: u64,
    /// The host's cgroup filesystem (a hostPath of /sys/fs/cgroup): mount
    /// processes are moved into their own cgroup there, so stopping the
    /// plugin's container does not kill them. Unset: they stay in the
    /// plugin's cgroup (still in their own session).
    #[arg(long)]
    mount_cgroup_root: Option<PathBuf>,
    /// Name of that cgroup, created in every hierarchy.
    #[arg(long, default_value = "rcsi-juicefs")]
    mount_cgroup: String,
    /// Also serve the Controller service from this process (small clusters, tests).
    #[arg(long)]
    serve_controller: bool,
    #[command(flatten)]
    common: JuicefsArgs,
}

/// Builds the JuiceFS driver and runs its start-up work (re-adopting mounts).
fn juicefs_driver(
    cfg: rcsi_juicefs::Config,
    node: Option<rcsi_juicefs::NodeConfig>,
    escape: Option<csi_core::daemon::CgroupEscape>,
) -> anyhow::Result<Arc<rcsi_juicefs::Juicefs>> {
    let exec: Arc<dyn csi_core::exec::Exec> = Arc::new(csi_core::exec::SystemExec);
    let mounter = Arc::new(csi_core::mount::SystemMounter::new(
        exec.clone(),
        cfg.mount_timeout,
    ));
    let spawner = Arc::new(csi_core::daemon::SystemSpawner { escape });
    let driver = Arc::new(
        rcsi_juicefs::Juicefs::new(cfg, node, exec, spawner, mounter)
            .context("opening the JuiceFS state directory")?,
    );
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| handle.block_on(driver.start()))
        .context("re-adopting JuiceFS mounts")?;
    Ok(driver)
}

fn juicefs_node(m: &ArgMatches, common: NodeCommon) -> anyhow::Result<Services> {
    let a = JuicefsNodeArgs::from_arg_matches(m)?;
    let node = rcsi_juicefs::NodeConfig {
        node_id: common.node_id,
        stats_timeout: Duration::from_secs(a.stats_timeout.max(1)),
        stats_cache: Duration::from_secs(a.stats_cache),
        check_interval: Duration::from_secs(a.check_interval),
    };
    let escape = a
        .mount_cgroup_root
        .map(|root| csi_core::daemon::CgroupEscape {
            root,
            name: a.mount_cgroup,
        });
    let driver = juicefs_driver(a.common.config(), Some(node), escape)?;
    let mut services = Services::all(driver);
    if !a.serve_controller {
        services.controller = None;
    }
    Ok(services)
}

fn juicefs_controller(m: &ArgMatches) -> anyhow::Result<Services> {
    let a = JuicefsArgs::from_arg_matches(m)?;
    let driver = juicefs_driver(a.config(), None, None)?;
    Ok(Services {
        plugin: driver.clone(),
        controller: Some(driver),
        node: None,
        group: None,
    })
}

/// Flags of the Ceph RBD driver.
#[derive(Args)]
#[command(next_help_heading = "rbd")]
struct RbdArgs {
    /// The cluster map: ceph-csi's config.json, a JSON list of clusterID and monitors.
    #[arg(long, default_value = "/etc/ceph-csi-config/config.json")]
    ceph_config: PathBuf,
    /// Seconds a monitor or OSD operation may take (every call is abandoned shortly after).
    #[arg(long, default_value_t = 10)]
    call_timeout: u64,
    /// Clones (restores, clones, snapshots) deeper than this are flattened when made.
    #[arg(long, default_value_t = 8)]
    max_clone_depth: u32,
    /// Seconds a flatten (a full copy of an image) may take.
    #[arg(long, default_value_t = 600)]
    flatten_timeout: u64,
}

impl RbdArgs {
    fn config(&self) -> anyhow::Result<(rcsi_ceph::config::ClusterMap, rcsi_ceph::rbd::Config)> {
        let map = rcsi_ceph::config::ClusterMap::load(&self.ceph_config)?;
        let cfg = rcsi_ceph::rbd::Config {
            call_timeout: Duration::from_secs(self.call_timeout.max(1)),
            max_clone_depth: self.max_clone_depth,
            flatten_timeout: Duration::from_secs(self.flatten_timeout.max(1)),
        };
        Ok((map, cfg))
    }
}

/// Flags of the Ceph RBD node plugin.
#[derive(Args)]
#[command(next_help_heading = "rbd (node)")]
struct RbdNodeArgs {
    /// State files, keyrings and rbd-fuse mounts (on the host's filesystem,
    /// under a path shared with the host such as the kubelet's plugins directory).
    #[arg(long, default_value = "/var/lib/kubelet/plugins/rbd.rcsi.io/state")]
    state_dir: PathBuf,
    /// The rbd-fuse program.
    #[arg(long, default_value = "rbd-fuse")]
    rbd_fuse: String,
    /// The rbd program (`rbd map` for the krbd mounter).
    #[arg(long, default_value = "rbd")]
    rbd: String,
    /// The rbd-nbd program (the rbd-nbd mounter).
    #[arg(long, default_value = "rbd-nbd")]
    rbd_nbd: String,
    /// Seconds between checks for rbd-nbd and rbd-fuse processes that died
    /// (a new rbd-nbd attaches to the device; a new rbd-fuse is mapped and
    /// the volume mounted again).
    #[arg(long, default_value_t = 10)]
    heal_interval: u64,
    /// Seconds a mapping, mount or unmount may take.
    #[arg(long, default_value_t = 30)]
    mount_timeout: u64,
    /// Seconds a statfs may take before the volume is reported abnormal.
    #[arg(long, default_value_t = 10)]
    stats_timeout: u64,
    /// Seconds NodeGetVolumeStats answers from its cache.
    #[arg(long, default_value_t = 5)]
    stats_cache: u64,
    /// The host's cgroup filesystem (a hostPath of /sys/fs/cgroup): mapping
    /// processes move into their own cgroup there, so stopping the plugin's
    /// container does not kill them.
    #[arg(long)]
    mount_cgroup_root: Option<PathBuf>,
    /// Name of that cgroup, created in every hierarchy.
    #[arg(long, default_value = "rcsi-rbd")]
    mount_cgroup: String,
    /// Also serve the Controller service from this process (small clusters, tests).
    #[arg(long)]
    serve_controller: bool,
    #[command(flatten)]
    common: RbdArgs,
}

fn rbd_node(m: &ArgMatches, common: NodeCommon) -> anyhow::Result<Services> {
    rcsi_ceph::ffi::require(true)?;
    let a = RbdNodeArgs::from_arg_matches(m)?;
    let (map, cfg) = a.common.config()?;
    let exec: Arc<dyn csi_core::exec::Exec> = Arc::new(csi_core::exec::SystemExec);
    let mount_timeout = Duration::from_secs(a.mount_timeout.max(1));
    let escape = a
        .mount_cgroup_root
        .map(|root| csi_core::daemon::CgroupEscape {
            root,
            name: a.mount_cgroup,
        });
    let host = rcsi_ceph::rbd::NodeHost {
        mounter: Arc::new(csi_core::mount::SystemMounter::new(
            exec.clone(),
            mount_timeout,
        )),
        loops: Arc::new(csi_core::blockdev::SystemLoopDevices::new(exec.clone())),
        blockdev: Arc::new(csi_core::blockdev::SystemBlockDevices::new(exec.clone())),
        spawner: Arc::new(csi_core::daemon::SystemSpawner { escape }),
        exec,
    };
    let node = rcsi_ceph::rbd::NodeConfig {
        node_id: common.node_id,
        state_dir: a.state_dir,
        rbd_fuse: a.rbd_fuse,
        rbd: a.rbd,
        rbd_nbd: a.rbd_nbd,
        mount_timeout,
        stats_timeout: Duration::from_secs(a.stats_timeout.max(1)),
        stats_cache: Duration::from_secs(a.stats_cache),
    };
    let driver = Arc::new(
        rcsi_ceph::rbd::Rbd::with_node(map, cfg, node, host)
            .context("opening the RBD node state directory")?,
    );
    driver.heal_forever(Duration::from_secs(a.heal_interval.max(1)));
    let mut services = Services::all(driver);
    if !a.serve_controller {
        services.controller = None;
    }
    Ok(services)
}

fn rbd_controller(m: &ArgMatches) -> anyhow::Result<Services> {
    rcsi_ceph::ffi::require(true)?;
    let (map, cfg) = RbdArgs::from_arg_matches(m)?.config()?;
    let driver = Arc::new(rcsi_ceph::rbd::Rbd::new(map, cfg));
    Ok(Services {
        plugin: driver.clone(),
        controller: Some(driver),
        node: None,
        group: None,
    })
}

/// Flags of the CephFS driver.
#[derive(Args)]
#[command(next_help_heading = "cephfs")]
struct CephfsArgs {
    /// The cluster map: ceph-csi's config.json, a JSON list of clusterID and monitors.
    #[arg(long, default_value = "/etc/ceph-csi-config/config.json")]
    ceph_config: PathBuf,
    /// Seconds a monitor or OSD operation may take (every call is abandoned shortly after).
    #[arg(long, default_value_t = 10)]
    call_timeout: u64,
    /// Seconds a mgr command (subvolume create, rm, snapshot, clone) may
    /// take; the mgr's volumes module queues them while it is busy.
    #[arg(long, default_value_t = 60)]
    mgr_timeout: u64,
}

impl CephfsArgs {
    fn config(&self) -> rcsi_ceph::cephfs::Config {
        rcsi_ceph::cephfs::Config {
            call_timeout: Duration::from_secs(self.call_timeout.max(1)),
            mgr_timeout: Duration::from_secs(self.mgr_timeout.max(1)),
        }
    }
}

fn cephfs_controller(m: &ArgMatches) -> anyhow::Result<Services> {
    rcsi_ceph::ffi::require(false)?;
    let a = CephfsArgs::from_arg_matches(m)?;
    let map = rcsi_ceph::config::ClusterMap::load(&a.ceph_config)?;
    let cfg = a.config();
    let driver = Arc::new(rcsi_ceph::cephfs::Cephfs::new(map, cfg));
    Ok(Services {
        plugin: driver.clone(),
        controller: Some(driver),
        node: None,
        group: None,
    })
}

/// Flags of the CephFS node plugin.
#[derive(Args)]
#[command(next_help_heading = "cephfs (node)")]
struct CephfsNodeArgs {
    /// State files, keyrings and ceph-fuse logs (on the host's filesystem,
    /// under a path shared with the host such as the kubelet's plugins directory).
    #[arg(long, default_value = "/var/lib/kubelet/plugins/cephfs.rcsi.io/state")]
    state_dir: PathBuf,
    /// The ceph-fuse program (the fuse mounter).
    #[arg(long, default_value = "ceph-fuse")]
    ceph_fuse: String,
    /// Seconds between checks for ceph-fuse processes that died (the volume
    /// is mounted again and its targets re-bound); also checked at once
    /// when one started by this process exits.
    #[arg(long, default_value_t = 10)]
    heal_interval: u64,
    /// Seconds a mount or unmount may take.
    #[arg(long, default_value_t = 30)]
    mount_timeout: u64,
    /// Seconds a statfs may take before the volume is reported abnormal.
    #[arg(long, default_value_t = 10)]
    stats_timeout: u64,
    /// Seconds NodeGetVolumeStats answers from its cache.
    #[arg(long, default_value_t = 5)]
    stats_cache: u64,
    /// The host's cgroup filesystem (a hostPath of /sys/fs/cgroup):
    /// ceph-fuse processes move into their own cgroup there, so stopping
    /// the plugin's container does not kill them.
    #[arg(long)]
    mount_cgroup_root: Option<PathBuf>,
    /// Name of that cgroup, created in every hierarchy.
    #[arg(long, default_value = "rcsi-cephfs")]
    mount_cgroup: String,
    /// Also serve the Controller service from this process (small clusters, tests).
    #[arg(long)]
    serve_controller: bool,
    #[command(flatten)]
    common: CephfsArgs,
}

fn cephfs_node(m: &ArgMatches, common: NodeCommon) -> anyhow::Result<Services> {
    rcsi_ceph::ffi::require(false)?;
    let a = CephfsNodeArgs::from_arg_matches(m)?;
    let map = rcsi_ceph::config::ClusterMap::load(&a.common.ceph_config)?;
    let cfg = a.common.config();
    let exec: Arc<dyn csi_core::exec::Exec> = Arc::new(csi_core::exec::SystemExec);
    let mount_timeout = Duration::from_secs(a.mount_timeout.max(1));
    let escape = a
        .mount_cgroup_root
        .map(|root| csi_core::daemon::CgroupEscape {
            root,
            name: a.mount_cgroup,
        });
    let host = rcsi_ceph::cephfs::node::NodeHost {
        mounter: Arc::new(csi_core::mount::SystemMounter::new(exec, mount_timeout)),
        spawner: Arc::new(csi_core::daemon::SystemSpawner { escape }),
    };
    let node = rcsi_ceph::cephfs::node::NodeConfig {
        node_id: common.node_id,
        state_dir: a.state_dir,
        ceph_fuse: a.ceph_fuse,
        mount_timeout,
        stats_timeout: Duration::from_secs(a.stats_timeout.max(1)),
        stats_cache: Duration::from_secs(a.stats_cache),
    };
    let driver = Arc::new(
        rcsi_ceph::cephfs::Cephfs::with_node(map, cfg, node, host)
            .context("opening the CephFS node state directory")?,
    );
    driver.heal_forever(Duration::from_secs(a.heal_interval.max(1)));
    let mut services = Services::all(driver);
    if !a.serve_controller {
        services.controller = None;
    }
    Ok(services)
}
