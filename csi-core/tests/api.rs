//! The backend API as a driver sees it: the id hook, secrets of every
//! request, and ControllerPublish/Unpublish, over a real unix socket.

use async_trait::async_trait;
use csi_core::backend::{
    ControllerBackend, ControllerRpc, NodeBackend, NodeInfo, NodeRpc, Plugin, SnapshotFilter,
    VolumeStatus,
};
use csi_core::csi::{
    self, controller_client::ControllerClient, node_client::NodeClient, volume_capability as vc,
};
use csi_core::server::{Endpoint, ServeOptions, Services, serve};
use csi_core::types::{
    Capability, ControllerPublish, CreateVolume, NodeExpand, PublishVolume, Secrets,
};
use csi_core::{Error, Result};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tonic::Code;

/// Ids are `server:/export/dir` paths; every call records the secrets it got.
#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(String, Secrets)>>,
}

impl Recorder {
    fn saw(&self, call: &str, secrets: &Secrets) {
        self.seen
            .lock()
            .unwrap()
            .push((call.to_owned(), secrets.clone()));
    }

    fn secrets_of(&self, call: &str) -> Option<Secrets> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .rev()
            .find(|(c, _)| c == call)
            .map(|(_, s)| s.clone())
    }
}

#[async_trait]
impl Plugin for Recorder {
    fn name(&self) -> &str {
        "recorder.rcsi.io"
    }
    fn check_id(&self, id: &str, field: &str) -> Result<()> {
        match id.split_once(":/") {
            Some((server, _)) if !server.is_empty() && !id.contains("/../") => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "{field} {id:?} is not server:/path"
            ))),
        }
    }
}

#[async_trait]
impl ControllerBackend for Recorder {
    fn controller_capabilities(&self) -> Vec<ControllerRpc> {
        vec![
            ControllerRpc::CreateDeleteVolume,
            ControllerRpc::PublishUnpublishVolume,
            ControllerRpc::CreateDeleteSnapshot,
            ControllerRpc::ListSnapshots,
            ControllerRpc::GetSnapshot,
        ]
    }
    async fn create_volume(&self, req: CreateVolume) -> Result<csi::Volume> {
        self.saw("CreateVolume", &req.secrets);
        Ok(csi::Volume {
            volume_id: format!("nas:/export/{}", req.name),
            ..Default::default()
        })
    }
    async fn delete_volume(&self, id: &str, secrets: &Secrets) -> Result<()> {
        self.saw(&format!("DeleteVolume {id}"), secrets);
        Ok(())
    }
    async fn get_volume(&self, id: &str) -> Result<(csi::Volume, VolumeStatus)> {
        Err(Error::NotFound(format!("{id} does not exist")))
    }
    async fn validate_volume_capabilities(
        &self,
        _: &str,
        _: &[Capability],
        _: &HashMap<String, String>,
        secrets: &Secrets,
    ) -> Result<()> {
        self.saw("ValidateVolumeCapabilities", secrets);
        Ok(())
    }
    async fn list_snapshots(&self, filter: &SnapshotFilter) -> Result<Vec<csi::Snapshot>> {
        self.saw("ListSnapshots", &filter.secrets);
        Ok(vec![csi::Snapshot {
            snapshot_id: "nas:/export/.snap/s1".into(),
            source_volume_id: "nas:/export/v".into(),
            ready_to_use: true,
            ..Default::default()
        }])
    }
    async fn controller_publish(&self, req: ControllerPublish) -> Result<HashMap<String, String>> {
        self.saw(&format!("ControllerPublish {}", req.node_id), &req.secrets);
        Ok([("device".to_owned(), "/dev/rbd0".to_owned())].into())
    }
    async fn controller_unpublish(
        &self,
        id: &str,
        node: Option<&str>,
        secrets: &Secrets,
    ) -> Result<()> {
        self.saw(
            &format!("ControllerUnpublish {id} {}", node.unwrap_or("*")),
            secrets,
        );
        Ok(())
    }
}

#[async_trait]
impl NodeBackend for Recorder {
    fn node_capabilities(&self) -> Vec<NodeRpc> {
        vec![NodeRpc::ExpandVolume]
    }
    fn node_info(&self) -> NodeInfo {
        NodeInfo {
            node_id: "n1".into(),
            ..Default::default()
        }
    }
    async fn publish(&self, _: PublishVolume) -> Result<()> {
        Ok(())
    }
    async fn unpublish(&self, _: &str, _: &Path) -> Result<()> {
        Ok(())
    }
    async fn expand(&self, req: NodeExpand) -> Result<u64> {
        self.saw("NodeExpandVolume", &req.secrets);
        Ok(req.range.required)
    }
}

fn mount_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(vc::AccessType::Mount(vc::MountVolume::default())),
        access_mode: Some(vc::AccessMode {
            mode: vc::access_mode::Mode::MultiNodeMultiWriter as i32,
        }),
    }
}

fn secret(v: &str) -> HashMap<String, String> {
    [("userKey".to_owned(), v.to_owned())].into()
}

#[tokio::test]
async fn ids_secrets_and_controller_publish_reach_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("csi.sock");
    let backend = Arc::new(Recorder::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        Services::all(backend.clone()),
        ServeOptions::new(Endpoint::Unix(sock.clone())),
        async move {
            let _ = stopped.await;
        },
    ));
    let ch = csi_core::client::connect_when_ready(
        &Endpoint::Unix(sock),
        std::time::Duration::from_secs(10),
    )
    .await
    .unwrap();
    let mut ctl = ControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch);

    // The driver's id rule: paths with ':' and '/' are ids here...
    ctl.delete_volume(csi::DeleteVolumeRequest {
        volume_id: "nas:/export/a/b".into(),
        secrets: secret("d"),
    })
    .await
    .unwrap();
    assert_eq!(
        backend.secrets_of("DeleteVolume nas:/export/a/b"),
        Some(Secrets(secret("d")))
    );
    // ...its own refusals keep their message, and the core's limits still hold.
    for (bad, why) in [
        ("plain-name", "not server:/path"),
        ("nas:/export/a\0b", "NUL"),
        (&*format!("nas:/{}", "x".repeat(130)), "limit is 128"),
        ("nas:/export/../../etc", "not server:/path"),
    ] {
        let e = ctl
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: bad.into(),
                secrets: HashMap::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}");
        assert!(e.message().contains(why), "{bad:?}: {}", e.message());
    }

    // Secrets of every request that carries them reach the backend.
    let confirmed = ctl
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "nas:/export/v".into(),
            volume_capabilities: vec![mount_cap()],
            secrets: secret("v"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(confirmed.confirmed.is_some());
    assert_eq!(
        backend.secrets_of("ValidateVolumeCapabilities"),
        Some(Secrets(secret("v")))
    );
    let listed = ctl
        .list_snapshots(csi::ListSnapshotsRequest {
            secrets: secret("l"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    assert_eq!(
        backend.secrets_of("ListSnapshots"),
        Some(Secrets(secret("l")))
    );
    ctl.get_snapshot(csi::GetSnapshotRequest {
        snapshot_id: "nas:/export/.snap/s1".into(),
        secrets: secret("g"),
    })
    .await
    .unwrap();
    assert_eq!(
        backend.secrets_of("ListSnapshots"),
        Some(Secrets(secret("g")))
    );
    node.node_expand_volume(csi::NodeExpandVolumeRequest {
        volume_id: "nas:/export/v".into(),
        volume_path: "/var/lib/kubelet/pods/p/volumes/v".into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 1 << 30,
            limit_bytes: 0,
        }),
        secrets: secret("e"),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        backend.secrets_of("NodeExpandVolume"),
        Some(Secrets(secret("e")))
    );

    // ControllerPublish: required fields, then the publish context.
    let good = csi::ControllerPublishVolumeRequest {
        volume_id: "nas:/export/v".into(),
        node_id: "n1".into(),
        volume_capability: Some(mount_cap()),
        secrets: secret("p"),
        ..Default::default()
    };
    for (mut r, what) in [
        (good.clone(), "node_id"),
        (good.clone(), "volume_capability"),
        (good.clone(), "volume_id"),
    ] {
        match what {
            "node_id" => r.node_id.clear(),
            "volume_capability" => r.volume_capability = None,
            _ => r.volume_id.clear(),
        }
        let e = ctl.controller_publish_volume(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{what}");
        assert!(e.message().contains(what), "{}", e.message());
    }
    let published = ctl
        .controller_publish_volume(good)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(published.publish_context["device"], "/dev/rbd0");
    assert_eq!(
        backend.secrets_of("ControllerPublish n1"),
        Some(Secrets(secret("p")))
    );
    ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: "nas:/export/v".into(),
        node_id: String::new(),
        secrets: secret("u"),
    })
    .await
    .unwrap();
    assert_eq!(
        backend.secrets_of("ControllerUnpublish nas:/export/v *"),
        Some(Secrets(secret("u")))
    );

    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
