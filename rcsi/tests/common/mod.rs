//! Helpers shared by the tests that drive `rcsi node` over its socket.
#![allow(dead_code)]

use csi_core::csi::{self, volume_capability as vc};
use csi_core::server::Endpoint;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

/// Controller client.
pub type Ctl = csi::controller_client::ControllerClient<Channel>;
/// Node client.
pub type Node = csi::node_client::NodeClient<Channel>;

/// `rcsi node --driver local-path` on `base`, serving `<dir>/csi.sock`.
pub struct Driver {
    child: Option<tokio::process::Child>,
    sock: PathBuf,
    base: PathBuf,
    log: PathBuf,
}

impl Driver {
    /// Starts the driver and connects to it.
    pub async fn start(dir: &Path, base: &Path) -> (Self, Ctl, Node) {
        let mut d = Self {
            child: None,
            sock: dir.join("csi.sock"),
            base: base.to_path_buf(),
            log: dir.join("driver.log"),
        };
        let (ctl, node) = d.spawn().await;
        (d, ctl, node)
    }

    async fn spawn(&mut self) -> (Ctl, Node) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            tokio::process::Command::new(env!("CARGO_BIN_EXE_rcsi"))
                .args(["node", "--driver", "local-path", "--node-id", "test-node"])
                .arg(format!("--endpoint=unix://{}", self.sock.display()))
                .arg(format!("--base-path={}", self.base.display()))
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .unwrap(),
        );
        let ch = csi_core::client::connect_when_ready(
            &Endpoint::Unix(self.sock.clone()),
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|e| panic!("driver did not start: {e}\n{}", self.log_text()));
        (Ctl::new(ch.clone()), Node::new(ch))
    }

    /// What the driver logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the driver with SIGKILL and starts it again on the same state.
    pub async fn crash_and_restart(&mut self) -> (Ctl, Node) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.unwrap();
        }
        self.spawn().await
    }
}

/// A single-node-writer capability: raw block, or a mount with `fs`.
pub fn cap(block: bool, fs: &str) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(if block {
            vc::AccessType::Block(vc::BlockVolume {})
        } else {
            vc::AccessType::Mount(vc::MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            })
        }),
        access_mode: Some(vc::AccessMode {
            mode: vc::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}
/// Creates a volume (panics on failure).
pub async fn create(
    ctl: &mut Ctl,
    name: &str,
    size: i64,
    params: &[(&str, &str)],
    c: csi::VolumeCapability,
) -> csi::Volume {
    ctl.create_volume(create_req(name, size, params, c, None))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
}
/// A CreateVolumeRequest, optionally cloning `clone_of`.
pub fn create_req(
    name: &str,
    size: i64,
    params: &[(&str, &str)],
    c: csi::VolumeCapability,
    clone_of: Option<&str>,
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: size,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![c],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        volume_content_source: clone_of.map(|id| csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Volume(
                csi::volume_content_source::VolumeSource {
                    volume_id: id.into(),
                },
            )),
        }),
        ..Default::default()
    }
}
/// Stages and publishes `v` under `dir` (`<tag>-staging`, `<tag>-target`); returns the target.
pub async fn mount(
    node: &mut Node,
    v: &csi::Volume,
    c: csi::VolumeCapability,
    dir: &Path,
    tag: &str,
) -> PathBuf {
    let staging = dir.join(format!("{tag}-staging"));
    let target = dir.join(format!("{tag}-target"));
    std::fs::create_dir_all(&staging).unwrap();
    node.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(c.clone()),
        volume_context: v.volume_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    node.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(c),
        volume_context: v.volume_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    target
}
/// Writes `files` files of `bytes` bytes into `dir`.
pub fn fill(dir: &Path, files: usize, bytes: usize) {
    let block: Vec<u8> = (0..bytes).map(|i| (i * 7 + 3) as u8).collect();
    for i in 0..files {
        std::fs::write(dir.join(format!("f{i}")), &block).unwrap();
    }
}

/// Every volume id ListVolumes returns, sorted.
pub async fn volume_ids(ctl: &mut Ctl) -> Vec<String> {
    let mut ids: Vec<String> = ctl
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect();
    ids.sort();
    ids
}
