//! A group snapshot of mounted image volumes freezes every member before
//! the first copy and thaws them after the last (real mounts, as root).

use async_trait::async_trait;
use csi_core::backend::{ControllerBackend, GroupControllerBackend, NodeBackend};
use csi_core::csi::{self, volume_capability as vc};
use csi_core::exec::{Command, Exec, Output, SystemExec};
use csi_core::types::{Capability, CreateVolume, Secrets, StageVolume};
use rcsi_local_path::{Config, Host, LocalPath};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Runs real programs and keeps their command lines in order.
#[derive(Default)]
struct Recording(Mutex<Vec<String>>);

#[async_trait]
impl Exec for Recording {
    async fn output(&self, cmd: &Command) -> csi_core::Result<Output> {
        self.0.lock().unwrap().push(cmd.display());
        SystemExec.output(cmd).await
    }
}

fn ext4_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(vc::AccessType::Mount(vc::MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
        access_mode: Some(vc::AccessMode {
            mode: vc::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

#[tokio::test]
async fn members_are_frozen_together_and_always_thawed() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test mounts: run as root"
    );
    let dir = tempfile::tempdir().unwrap();
    let rec = Arc::new(Recording::default());
    let exec: Arc<dyn Exec> = rec.clone();
    let host = Host {
        mounter: Arc::new(csi_core::mount::SystemMounter::new(
            exec.clone(),
            Duration::from_secs(30),
        )),
        loops: Arc::new(csi_core::blockdev::SystemLoopDevices::new(exec.clone())),
        blockdev: Arc::new(csi_core::blockdev::SystemBlockDevices::new(exec.clone())),
        exec,
    };
    let cfg = Config {
        node_id: "n1".into(),
        base_path: dir.path().join("base"),
        max_volumes: 0,
        reserved_bytes: 0,
    };
    let d = LocalPath::open(cfg, host).unwrap();
    let mut ids = Vec::new();
    let mut staged = Vec::new();
    for name in ["a", "b"] {
        let req = csi::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 32 << 20,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![ext4_cap()],
            parameters: [("backing".to_owned(), "file".to_owned())].into(),
            ..Default::default()
        };
        let v = d
            .create_volume(CreateVolume::from_proto(&req, &|_, _| Ok(())).unwrap())
            .await
            .unwrap();
        let staging = dir.path().join(format!("stage-{name}"));
        d.stage(StageVolume {
            volume_id: v.volume_id.clone(),
            staging_path: staging.clone(),
            capability: Capability::from_proto(&ext4_cap(), "cap").unwrap(),
            publish_context: Default::default(),
            volume_context: Default::default(),
            secrets: Secrets::default(),
        })
        .await
        .unwrap();
        ids.push(v.volume_id);
        staged.push(staging);
    }
    rec.0.lock().unwrap().clear();
    let group = d
        .create_group_snapshot("g", &ids, &Default::default(), &Secrets::default())
        .await
        .unwrap();
    assert_eq!(group.snapshots.len(), 2);

    let cmds = rec.0.lock().unwrap().clone();
    let at = |pred: &dyn Fn(&String) -> bool| -> Vec<usize> {
        cmds.iter()
            .enumerate()
            .filter(|(_, c)| pred(c))
            .map(|(i, _)| i)
            .collect()
    };
    let freezes = at(&|c| c.starts_with("fsfreeze -f"));
    let thaws = at(&|c| c.starts_with("fsfreeze -u"));
    let copies = at(&|c| c.starts_with("cp "));
    assert_eq!(
        (freezes.len(), thaws.len(), copies.len()),
        (2, 2, 2),
        "{cmds:#?}"
    );
    assert!(
        freezes.iter().max() < copies.iter().min() && copies.iter().max() < thaws.iter().min(),
        "every member frozen before the first copy and thawed after the last: {cmds:#?}"
    );
    // Both filesystems answer writes again.
    for s in &staged {
        std::fs::write(s.join("after"), b"thawed").unwrap();
    }

    for (id, s) in ids.iter().zip(&staged) {
        d.unstage(id, s).await.unwrap();
    }
    d.delete_group_snapshot(&group.group_snapshot_id, &[], &Secrets::default())
        .await
        .unwrap();
    for id in &ids {
        d.delete_volume(id, &Secrets::default()).await.unwrap();
    }
}
