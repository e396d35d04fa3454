//! publish-bench: how long NodePublishVolume takes to give a writable
//! target, for the first volume a node plugin publishes and for the next
//! ones, and how much memory the plugin and its helper processes (FUSE
//! daemons) hold. Volumes are created first (not timed) and removed at the
//! end unless `--keep` (which prints the last target and volume id).
//!
//! The last line printed is machine-readable:
//! `first_ms=... next_p50_ms=... next_max_ms=... plugin_rss_kb=... helpers_rss_kb=...`

use anyhow::{Context, Result};
use clap::Parser;
use csi_core::csi::{
    self, controller_client::ControllerClient, node_client::NodeClient, volume_capability as vc,
};
use csi_core::server::Endpoint;
use rcsi_tests::backend::{params_file, secrets_file};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Measure NodePublishVolume to a writable target, first and next volumes")]
struct Args {
    /// Driver endpoint (controller and node): unix:///path/csi.sock.
    #[arg(long)]
    endpoint: Endpoint,
    /// Volumes to publish.
    #[arg(long, default_value_t = 10)]
    volumes: usize,
    /// StorageClass parameters file (`key: value` lines).
    #[arg(long)]
    params: Option<PathBuf>,
    /// Secrets file (CreateVolumeSecret:, NodePublishVolumeSecret:, ...).
    #[arg(long)]
    secrets: Option<PathBuf>,
    /// Volume size in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    size: i64,
    /// Scratch directory for staging and target paths.
    #[arg(long, default_value = "/tmp")]
    scratch: PathBuf,
    /// The plugin's process id, to report its resident memory.
    #[arg(long)]
    pid: Option<u32>,
    /// Helper processes whose command line contains this are counted too.
    #[arg(long)]
    helpers: Option<String>,
    /// Leave the volumes published and created.
    #[arg(long)]
    keep: bool,
}

fn rss_kb(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Resident memory and count of the other processes whose command line
/// contains `pattern`.
fn helpers_rss_kb(pattern: &str) -> (u64, usize) {
    let mut total = (0, 0);
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == std::process::id().to_string() {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(pattern) {
            total.0 += rss_kb(&name);
            total.1 += 1;
        }
    }
    total
}

fn mount_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(vc::AccessType::Mount(vc::MountVolume::default())),
        access_mode: Some(vc::AccessMode {
            mode: vc::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

/// Writes and fsyncs a small file at `target`.
fn write_probe(target: &std::path::Path) -> std::io::Result<()> {
    let mut f = std::fs::File::create(target.join(".publish-bench"))?;
    f.write_all(&[1u8; 4096])?;
    f.sync_all()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let params: HashMap<String, String> =
        args.params.as_deref().map(params_file).unwrap_or_default();
    let secrets = args
        .secrets
        .as_deref()
        .map(secrets_file)
        .unwrap_or_default();
    let secret = |kind: &str| secrets.get(kind).cloned().unwrap_or_default();
    let ch = csi_core::client::connect(&args.endpoint).await?;
    let mut ctl = ControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch);
    let stages = node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await?
        .into_inner()
        .capabilities
        .iter()
        .any(|c| {
            matches!(&c.r#type, Some(csi::node_service_capability::Type::Rpc(r))
                if r.r#type == csi::node_service_capability::rpc::Type::StageUnstageVolume as i32)
        });
    let rss_before = args.pid.map(|p| rss_kb(&p.to_string())).unwrap_or(0);
    let mut vols = Vec::new();
    for i in 0..args.volumes {
        let v = ctl
            .create_volume(csi::CreateVolumeRequest {
                name: format!("publish-bench-{i}"),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: args.size,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![mount_cap()],
                parameters: params.clone(),
                secrets: secret("CreateVolumeSecret"),
                ..Default::default()
            })
            .await
            .with_context(|| format!("CreateVolume publish-bench-{i}"))?
            .into_inner()
            .volume
            .context("no volume")?;
        vols.push(v);
    }
    let mut times = Vec::new();
    let mut paths = Vec::new();
    for (i, v) in vols.iter().enumerate() {
        let staging = args.scratch.join(format!("publish-bench-{i}-staging"));
        let target = args.scratch.join(format!("publish-bench-{i}-pod/mount"));
        std::fs::create_dir_all(target.parent().context("target parent")?)?;
        let t = Instant::now();
        if stages {
            std::fs::create_dir_all(&staging)?;
            node.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: v.volume_id.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(mount_cap()),
                volume_context: v.volume_context.clone(),
                secrets: secret("NodeStageVolumeSecret"),
                ..Default::default()
            })
            .await
            .context("NodeStageVolume")?;
        }
        node.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            staging_target_path: if stages {
                staging.display().to_string()
            } else {
                String::new()
            },
            target_path: target.display().to_string(),
            volume_capability: Some(mount_cap()),
            volume_context: v.volume_context.clone(),
            secrets: secret("NodePublishVolumeSecret"),
            ..Default::default()
        })
        .await
        .context("NodePublishVolume")?;
        write_probe(&target).with_context(|| format!("writing to {}", target.display()))?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        paths.push((staging, target));
    }
    let plugin_rss = args.pid.map(|p| rss_kb(&p.to_string())).unwrap_or(0);
    let (helpers_rss, helpers) = args
        .helpers
        .as_deref()
        .map(helpers_rss_kb)
        .unwrap_or((0, 0));
    let first = times.first().copied().unwrap_or(0.0);
    let mut next: Vec<f64> = times.iter().skip(1).copied().collect();
    next.sort_by(f64::total_cmp);
    let p50 = next
        .get(next.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(0.0);
    let max = next.last().copied().unwrap_or(0.0);
    println!(
        "{} volumes: first publish to writable {first:.1} ms; next p50 {p50:.1} ms, max {max:.1} ms",
        times.len()
    );
    if args.pid.is_some() {
        println!(
            "plugin RSS {plugin_rss} kB ({:+} kB over {} publishes)",
            plugin_rss as i64 - rss_before as i64,
            times.len()
        );
    }
    if args.helpers.is_some() {
        println!("{helpers} helper processes hold {helpers_rss} kB");
    }
    if args.keep {
        if let (Some(v), Some((_, t))) = (vols.last(), paths.last()) {
            println!("kept: volume={} target={}", v.volume_id, t.display());
        }
    } else {
        for (v, (staging, target)) in vols.iter().zip(&paths) {
            let _ = std::fs::remove_file(target.join(".publish-bench"));
            node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                target_path: target.display().to_string(),
            })
            .await?;
            if stages {
                node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                    volume_id: v.volume_id.clone(),
                    staging_target_path: staging.display().to_string(),
                })
                .await?;
            }
            let _ = std::fs::remove_dir(target.parent().context("target parent")?);
            ctl.delete_volume(csi::DeleteVolumeRequest {
                volume_id: v.volume_id.clone(),
                secrets: secret("DeleteVolumeSecret"),
            })
            .await?;
        }
    }
    println!(
        "first_ms={first:.1} next_p50_ms={p50:.1} next_max_ms={max:.1} plugin_rss_kb={plugin_rss} helpers_rss_kb={helpers_rss}"
    );
    Ok(())
}
