//! csi-bench: CreateVolume+DeleteVolume pairs (or full node cycles) against
//! any CSI driver's socket, from N concurrent clients.
//!
//! The last line printed is machine-readable:
//! `pairs_per_s=... p50_ms=... p99_ms=... driver_rss_kb=... client_cpu_us=...`
//! (the last is this client's own CPU time an operation: on a small machine
//! it shares the cores with the driver it measures).

use anyhow::{Context, Result, bail};
use clap::Parser;
use csi_core::csi::{
    self, controller_client::ControllerClient, node_client::NodeClient, volume_capability as vc,
};
use csi_core::server::Endpoint;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    about = "Measure CSI CreateVolume/DeleteVolume (or full lifecycle) throughput and latency"
)]
struct Args {
    /// Driver endpoint: unix:///path/csi.sock or tcp://host:port.
    #[arg(long)]
    endpoint: Endpoint,
    /// Concurrent clients, each on its own connection.
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Total operations (pairs or cycles) across all clients.
    #[arg(long, default_value_t = 1000)]
    ops: u64,
    /// Full cycle: create, stage, publish, unpublish, unstage, delete (needs root).
    #[arg(long)]
    cycle: bool,
    /// Driver process id, to report its resident memory.
    #[arg(long)]
    pid: Option<u32>,
    /// StorageClass parameter for CreateVolume, repeatable: --param backing=file.
    #[arg(long = "param", value_parser = parse_kv)]
    params: Vec<(String, String)>,
    /// Volume size in bytes.
    #[arg(long, default_value_t = 16 << 20)]
    size: i64,
    /// Scratch directory for staging and target paths (with --cycle).
    #[arg(long, default_value = "/tmp")]
    scratch: std::path::PathBuf,
    /// Secrets file (YAML: call kind → key → value, as the backends'
    /// scripts write them), for drivers whose calls need credentials.
    #[arg(long)]
    secrets: Option<std::path::PathBuf>,
    /// Prefix of volume names, so runs can share a driver.
    #[arg(long, default_value = "bench")]
    prefix: String,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn mount_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(vc::AccessType::Mount(vc::MountVolume::default())),
        access_mode: Some(vc::AccessMode {
            mode: vc::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

struct Client {
    ctl: ControllerClient<tonic::transport::Channel>,
    node: NodeClient<tonic::transport::Channel>,
}

/// What every request carries.
struct Inputs {
    params: HashMap<String, String>,
    secrets: HashMap<String, HashMap<String, String>>,
}

impl Inputs {
    fn secret(&self, kind: &str) -> HashMap<String, String> {
        self.secrets.get(kind).cloned().unwrap_or_default()
    }
}

async fn one(c: &mut Client, args: &Args, inputs: &Inputs, n: u64) -> Result<()> {
    let name = format!("{}-{n}", args.prefix);
    let vol = c
        .ctl
        .create_volume(csi::CreateVolumeRequest {
            name: name.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: args.size,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap()],
            parameters: inputs.params.clone(),
            secrets: inputs.secret("CreateVolumeSecret"),
            ..Default::default()
        })
        .await
        .with_context(|| format!("CreateVolume {name}"))?
        .into_inner()
        .volume
        .context("no volume")?;
    if args.cycle {
        let staging = args.scratch.join(format!("{name}-staging"));
        let target = args.scratch.join(format!("{name}-pod/mount"));
        std::fs::create_dir_all(&staging)?;
        std::fs::create_dir_all(target.parent().expect("target has a parent"))?;
        let (staging, target) = (staging.display().to_string(), target.display().to_string());
        c.node
            .node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: vol.volume_id.clone(),
                staging_target_path: staging.clone(),
                volume_capability: Some(mount_cap()),
                volume_context: vol.volume_context.clone(),
                secrets: inputs.secret("NodeStageVolumeSecret"),
                ..Default::default()
            })
            .await
            .context("NodeStageVolume")?;
        c.node
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                staging_target_path: staging.clone(),
                target_path: target.clone(),
                volume_capability: Some(mount_cap()),
                volume_context: vol.volume_context.clone(),
                ..Default::default()
            })
            .await
            .context("NodePublishVolume")?;
        c.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                target_path: target.clone(),
            })
            .await
            .context("NodeUnpublishVolume")?;
        c.node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: vol.volume_id.clone(),
                staging_target_path: staging.clone(),
            })
            .await
            .context("NodeUnstageVolume")?;
        let _ = std::fs::remove_dir(&staging);
        let _ = std::fs::remove_dir(std::path::Path::new(&target).parent().expect("parent"));
    }
    c.ctl
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: vol.volume_id,
            secrets: inputs.secret("DeleteVolumeSecret"),
        })
        .await
        .context("DeleteVolume")?;
    Ok(())
}

/// User plus system CPU seconds this process has used.
fn own_cpu() -> f64 {
    let (user, sys) = rbench::stats::cpu_times();
    user + sys
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Arc::new(Args::parse());
    if args.clients == 0 || args.ops == 0 {
        bail!("--clients and --ops must be at least 1");
    }
    let params: Arc<Inputs> = Arc::new(Inputs {
        params: args.params.iter().cloned().collect(),
        secrets: args
            .secrets
            .as_deref()
            .map(rcsi_tests::backend::secrets_file)
            .unwrap_or_default(),
    });
    let idle_rss = args.pid.and_then(rss_kb);
    let next = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        let ch = csi_core::client::connect(&args.endpoint).await?;
        clients.push(Client {
            ctl: ControllerClient::new(ch.clone()),
            node: NodeClient::new(ch),
        });
    }
    let start = Instant::now();
    let cpu_start = own_cpu();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let (args, params, next) = (args.clone(), params.clone(), next.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= args.ops {
                        return Ok::<_, anyhow::Error>(lat);
                    }
                    let t = Instant::now();
                    one(&mut c, &args, &params, n).await?;
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                }
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = start.elapsed().max(Duration::from_micros(1));
    let cpu = own_cpu() - cpu_start;
    lat.sort_by(f64::total_cmp);
    let rate = lat.len() as f64 / elapsed.as_secs_f64();
    let rss = args.pid.and_then(rss_kb);
    let what = if args.cycle {
        "full cycles"
    } else {
        "create+delete pairs"
    };
    println!(
        "{} {what} from {} clients in {:.2} s",
        lat.len(),
        args.clients,
        elapsed.as_secs_f64()
    );
    if let Some(idle) = idle_rss {
        println!("driver RSS before the run: {idle} kB");
    }
    println!(
        "pairs_per_s={rate:.0} p50_ms={:.3} p99_ms={:.3} driver_rss_kb={} client_cpu_us={:.0}",
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        rss.map_or("unknown".to_owned(), |r| r.to_string()),
        cpu * 1e6 / lat.len().max(1) as f64
    );
    Ok(())
}
