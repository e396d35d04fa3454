//! `rcsi`: one binary for every rcsi CSI driver.

mod demo;
mod drivers;
mod init;

use anyhow::bail;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use csi_core::registration::RegistrationOptions;
use csi_core::server::{Endpoint, ServeOptions, serve, shutdown_signal};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "rcsi",
    version,
    about = "Rust CSI drivers for Kubernetes: one small binary for every backend"
)]
struct Cli {
    /// Log format on stderr (level from RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the node plugin (Identity + Node; local-path also serves Controller here).
    Node(NodeArgs),
    /// Serve the controller plugin (Identity + Controller).
    Controller(CommonArgs),
    /// Provision, delete, expand and snapshot volumes for PVCs (replaces csi-provisioner,
    /// csi-resizer and csi-snapshotter).
    Provisioner(ProvisionerArgs),
    /// Walk one local-path volume through its whole life on a temporary base path, printing each step (needs root).
    Demo {
        /// Base path to use instead of a fresh temporary directory.
        #[arg(long)]
        base_path: Option<PathBuf>,
    },
}

#[derive(Args)]
struct CommonArgs {
    /// Storage backend to serve (its own flags: --driver NAME --help).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(
        drivers::DRIVERS.iter().map(|d| d.name)
    ))]
    driver: String,
    /// gRPC endpoint: unix:///path/csi.sock or tcp://host:port.
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: Endpoint,
    /// Serve Prometheus /metrics and /healthz on this address (e.g. 0.0.0.0:9808).
    #[arg(long)]
    metrics_address: Option<SocketAddr>,
    /// Log a warning for calls slower than this many milliseconds.
    #[arg(long, default_value_t = 10_000)]
    slow_call_ms: u64,
}

#[derive(Args)]
struct NodeArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// This node's name (Kubernetes node name).
    #[arg(long, env = "NODE_ID")]
    node_id: String,
    /// Register with the kubelet, which reaches the CSI socket at this host path
    /// (e.g. /var/lib/kubelet/plugins/local.rcsi.io/csi.sock); replaces node-driver-registrar.
    #[arg(long, env = "KUBELET_REGISTRATION_PATH")]
    kubelet_registration_path: Option<String>,
    /// Directory the kubelet watches for registration sockets.
    #[arg(long, default_value = "/var/lib/kubelet/plugins_registry")]
    registration_dir: PathBuf,
}

#[derive(Args)]
struct ProvisionerArgs {
    /// The driver's CSI endpoint (unix:///csi/csi.sock); its name is asked with GetPluginInfo.
    #[arg(long, env = "CSI_ENDPOINT")]
    csi_address: Endpoint,
    /// Node-deployment mode: handle only volumes of this node and publish its
    /// CSIStorageCapacity (for node-local drivers such as local-path).
    #[arg(long)]
    node_deployment: Option<String>,
    /// Namespace for the leader lease and CSIStorageCapacity objects.
    #[arg(long, env = "POD_NAMESPACE", default_value = "rcsi-system")]
    namespace: String,
    /// Elect a leader with a Lease, so several replicas can run (controller Deployment).
    #[arg(long)]
    leader_election: bool,
    /// This replica's identity in the lease.
    #[arg(long, env = "POD_NAME", default_value = "rcsi-provisioner")]
    identity: String,
    /// Serve Prometheus /metrics and /healthz (driver Probe) on this address.
    #[arg(long)]
    metrics_address: Option<SocketAddr>,
    /// Deadline of each CSI call, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// How often CSIStorageCapacity is refreshed, in seconds (also after every change).
    #[arg(long, default_value_t = 60)]
    capacity_interval_secs: u64,
}

fn init_logging(format: LogFormat, default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}

fn options(c: &CommonArgs) -> ServeOptions {
    ServeOptions {
        endpoint: c.endpoint.clone(),
        metrics_address: c.metrics_address,
        slow_call: Duration::from_millis(c.slow_call_ms),
        registration: None,
    }
}

fn main() -> anyhow::Result<()> {
    // Before the runtime starts its threads: it may fork.
    init::reap_orphans_if_pid1();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    // Only the named driver's flags are added, so help lists what applies.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let driver = drivers::named_in(&argv);
    let cmd = Cli::command()
        .mut_subcommand("node", |c| match driver {
            Some(d) => (d.node_flags)(c),
            None => c.after_help(drivers::overview("node")),
        })
        .mut_subcommand("controller", |c| match driver.map(|d| &d.controller) {
            Some(Ok(entry)) => (entry.flags)(c),
            Some(Err(_)) => c,
            None => c.after_help(drivers::overview("controller")),
        });
    let matches = cmd.get_matches_from(&argv);
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let sub = |name| {
        matches
            .subcommand_matches(name)
            .expect("the parsed subcommand")
    };
    let quiet = matches!(cli.command, Cmd::Demo { .. });
    init_logging(cli.log_format, if quiet { "warn" } else { "info" });
    match cli.command {
        Cmd::Node(args) => {
            let d = drivers::find(&args.common.driver).expect("parser accepts only known drivers");
            let common = drivers::NodeCommon {
                node_id: args.node_id.clone(),
            };
            let services = (d.node)(sub("node"), common)?;
            let mut opts = options(&args.common);
            opts.registration =
                args.kubelet_registration_path
                    .as_ref()
                    .map(|endpoint| RegistrationOptions {
                        socket: args
                            .registration_dir
                            .join(format!("{}-reg.sock", services.plugin.name())),
                        kubelet_endpoint: endpoint.clone(),
                    });
            serve(services, opts, shutdown_signal()).await?;
        }
        Cmd::Controller(args) => {
            let d = drivers::find(&args.driver).expect("parser accepts only known drivers");
            match &d.controller {
                Ok(entry) => {
                    let services = (entry.build)(sub("controller"))?;
                    serve(services, options(&args), shutdown_signal()).await?;
                }
                Err(why) => bail!("{why}"),
            }
        }
        Cmd::Provisioner(a) => {
            let cfg = rcsi_provisioner::run::Config {
                csi_endpoint: a.csi_address,
                node: a.node_deployment,
                namespace: a.namespace,
                leader_election: a.leader_election,
                identity: a.identity,
                metrics_address: a.metrics_address,
                timeout: Duration::from_secs(a.timeout_secs),
                capacity_interval: Duration::from_secs(a.capacity_interval_secs.max(1)),
            };
            rcsi_provisioner::run::run(cfg, shutdown_signal()).await?;
        }
        Cmd::Demo { base_path } => demo::run(base_path).await?,
    }
    Ok(())
}
