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
pub const DRIVERS: &[Driver] = &[Driver {
    name: "local-path",
    about: "local.rcsi.io: node-local directories and loop-device volumes",
    node_flags: LocalPathArgs::augment_args,
    node: local_path_node,
    controller: Err(
        "local-path keeps its data on each node, so its controller runs inside `rcsi node`; no separate controller is needed",
    ),
}];

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
