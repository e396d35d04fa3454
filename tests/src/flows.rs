//! CSI call sequences the driver tests share: create, stage and publish a
//! volume, take it down again, write synced data.

use crate::Profile;
use anyhow::{Context, Result};
use csi_core::csi::{self, controller_client::ControllerClient, volume_capability as vc};
use std::collections::HashMap;
use std::process::Command;

/// A SINGLE_NODE_WRITER mount capability.
pub fn cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(vc::AccessType::Mount(Default::default())),
        access_mode: Some(vc::AccessMode {
            mode: vc::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

/// Creates a 64 MiB mount volume `name` with a profile's parameters and secrets.
pub async fn create_in(
    ctl: &mut ControllerClient<tonic::transport::Channel>,
    profile: &Profile,
    name: &str,
) -> Result<csi::Volume> {
    ctl.create_volume(csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 64 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap()],
        parameters: profile.parameters.clone(),
        secrets: profile.secrets("CreateVolumeSecret"),
        ..Default::default()
    })
    .await?
    .into_inner()
    .volume
    .context("no volume")
}

/// A node client.
pub type NodeClient = csi::node_client::NodeClient<tonic::transport::Channel>;

/// Writes `data` to `path` and fsyncs it.
pub fn write_synced(path: &std::path::Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// Stages volume `v` at `st` and publishes it at `tg` with `cap`.
pub async fn stage_publish(
    node: &mut NodeClient,
    v: &csi::Volume,
    cap: &csi::VolumeCapability,
    secrets: &HashMap<String, String>,
    st: &std::path::Path,
    tg: &std::path::Path,
) -> Result<()> {
    let path = |p: &std::path::Path| p.display().to_string();
    node.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: path(st),
        volume_capability: Some(cap.clone()),
        secrets: secrets.clone(),
        volume_context: v.volume_context.clone(),
        ..Default::default()
    })
    .await?;
    node.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: path(st),
        target_path: path(tg),
        volume_capability: Some(cap.clone()),
        volume_context: v.volume_context.clone(),
        ..Default::default()
    })
    .await?;
    Ok(())
}

/// Unpublishes, unstages and deletes volume `v` (see [`stage_publish`]).
pub async fn unpublish_unstage_delete(
    node: &mut NodeClient,
    ctl: &mut ControllerClient<tonic::transport::Channel>,
    v: &csi::Volume,
    secrets: HashMap<String, String>,
    st: &std::path::Path,
    tg: &std::path::Path,
) -> Result<()> {
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: v.volume_id.clone(),
        target_path: tg.display().to_string(),
    })
    .await?;
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: v.volume_id.clone(),
        staging_target_path: st.display().to_string(),
    })
    .await?;
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: v.volume_id.clone(),
        secrets,
    })
    .await
    .context("DeleteVolume after unstaging")?;
    Ok(())
}

/// The processes named `name`.
pub fn pids_of(name: &str) -> Vec<String> {
    pgrep(&["-x", name])
}

/// The processes whose command line matches the regular expression `pattern`.
pub fn pids_matching(pattern: &str) -> Vec<String> {
    pgrep(&["-f", pattern])
}

fn pgrep(args: &[&str]) -> Vec<String> {
    let out = Command::new("pgrep").args(args).output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    })
    .unwrap_or_default()
}
