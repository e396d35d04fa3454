//! `rcsi demo`: the local-path driver end to end on this machine.

use anyhow::{Context, ensure};
use csi_core::csi::{
    self, controller_client::ControllerClient, node_client::NodeClient, volume_capability as vc,
};
use csi_core::server::{Endpoint, ServeOptions, Services, serve};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

fn step(n: u32, what: &str) {
    println!("[{n}] {what}");
}

/// Runs the demo; cleans up everything it created.
pub async fn run(base_path: Option<PathBuf>) -> anyhow::Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "rcsi demo mounts a volume and must run as root"
    );
    let tmp = tempfile_dir()?;
    let base = base_path.unwrap_or_else(|| tmp.join("base"));
    let sock = tmp.join("csi.sock");
    step(
        1,
        &format!(
            "starting local.rcsi.io on unix://{} with base path {}",
            sock.display(),
            base.display()
        ),
    );
    let host = rcsi_local_path::Host::system(Duration::from_secs(60));
    let driver = Arc::new(rcsi_local_path::LocalPath::open(
        rcsi_local_path::Config {
            node_id: "demo-node".into(),
            base_path: base.clone(),
            max_volumes: 0,
            reserved_bytes: 0,
        },
        host,
    )?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let endpoint = Endpoint::Unix(sock.clone());
    let server = tokio::spawn(serve(
        Services::all(driver),
        ServeOptions::new(endpoint.clone()),
        async {
            let _ = stop_rx.await;
        },
    ));
    let channel = csi_core::client::connect_when_ready(&endpoint, Duration::from_secs(10)).await?;
    let mut ctl = ControllerClient::new(channel.clone());
    let mut node = NodeClient::new(channel);
    let cap = csi::VolumeCapability {
        access_type: Some(vc::AccessType::Mount(vc::MountVolume::default())),
        access_mode: Some(vc::AccessMode {
            mode: vc::access_mode::Mode::SingleNodeWriter as i32,
        }),
    };

    let vol = ctl
        .create_volume(csi::CreateVolumeRequest {
            name: "demo-volume".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 64 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            ..Default::default()
        })
        .await?
        .into_inner()
        .volume
        .context("no volume returned")?;
    step(
        2,
        &format!(
            "CreateVolume -> {} ({} bytes)",
            vol.volume_id, vol.capacity_bytes
        ),
    );

    let staging = tmp.join("staging");
    let target = tmp.join("pod/volume");
    std::fs::create_dir_all(&staging)?;
    node.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await?;
    step(
        3,
        &format!("NodeStageVolume -> bind-mounted at {}", staging.display()),
    );

    node.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await?;
    step(
        4,
        &format!("NodePublishVolume -> mounted at {}", target.display()),
    );

    let file = target.join("hello.txt");
    std::fs::write(&file, b"hello from rcsi\n")?;
    let back = std::fs::read_to_string(&file)?;
    step(
        5,
        &format!(
            "wrote and read {} through the mount: {:?}",
            file.display(),
            back.trim_end()
        ),
    );

    // A short benchmark of the published volume: files written, read,
    // stat'ed and deleted, as `rbench -w -r --stat -F -D` does.
    let argv = [
        "rbench", "-w", "-r", "--stat", "-F", "-D", "-t", "2", "-n", "2", "-N", "32", "-s", "64k",
        "-b", "16k", "--nolive",
    ]
    .map(std::ffi::OsString::from)
    .into_iter()
    .chain([target.clone().into_os_string()]);
    let args = <rbench::config::Args as clap::Parser>::try_parse_from(argv)?;
    let cfg = rbench::config::Config::from_args(args).map_err(|e| anyhow::anyhow!(e))?;
    step(
        6,
        "rbench on the published volume (2 threads x 2 dirs x 32 files of 64 KiB):",
    );
    tokio::task::spawn_blocking(move || {
        rbench::run::run(&cfg, &mut |r| {
            print!("{}", rbench::report::text(r));
            Ok(())
        })
    })
    .await??;

    let stats = node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await?
        .into_inner();
    let bytes = stats
        .usage
        .first()
        .map(|u| (u.used, u.total))
        .unwrap_or_default();
    step(
        7,
        &format!(
            "NodeGetVolumeStats -> {} of {} bytes used",
            bytes.0, bytes.1
        ),
    );

    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.display().to_string(),
    })
    .await?;
    step(8, "NodeUnpublishVolume -> unmounted");
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
    })
    .await?;
    step(9, "NodeUnstageVolume -> unmounted");
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        ..Default::default()
    })
    .await?;
    step(10, "DeleteVolume -> data removed");

    let _ = stop_tx.send(());
    server.await??;
    std::fs::remove_dir_all(&tmp)?;
    step(11, "driver stopped, temporary files removed; demo complete");
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let p = std::env::temp_dir().join(format!("rcsi-demo-{}", std::process::id()));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}
