//! The gRPC server end to end with an in-memory backend: metrics, health,
//! capability advertising and graceful shutdown with a call in flight.

use async_trait::async_trait;
use csi_core::backend::{
    ControllerBackend, ControllerRpc, NodeBackend, NodeInfo, NodeRpc, Plugin, VolumeStatus,
};
use csi_core::csi::{
    self, controller_client::ControllerClient, identity_client::IdentityClient,
    volume_capability as vc,
};
use csi_core::pluginregistration::{self as pr, registration_client::RegistrationClient};
use csi_core::registration::RegistrationOptions;
use csi_core::server::{Endpoint, ServeOptions, Services, serve};
use csi_core::types::{CreateVolume, PublishVolume, Secrets};
use csi_core::{Error, Result};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Volumes whose name starts with "slow" take 500 ms to create.
struct Fake;

#[async_trait]
impl Plugin for Fake {
    fn name(&self) -> &str {
        "fake.rcsi.io"
    }
}

#[async_trait]
impl ControllerBackend for Fake {
    fn controller_capabilities(&self) -> Vec<ControllerRpc> {
        vec![ControllerRpc::CreateDeleteVolume]
    }
    async fn create_volume(&self, req: CreateVolume) -> Result<csi::Volume> {
        if req.name.starts_with("slow") {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(csi::Volume {
            volume_id: format!("id-{}", req.name),
            capacity_bytes: req.capacity.required as i64,
            ..Default::default()
        })
    }
    async fn delete_volume(&self, _: &str, _: &Secrets) -> Result<()> {
        Ok(())
    }
    async fn get_volume(&self, id: &str) -> Result<(csi::Volume, VolumeStatus)> {
        Err(Error::NotFound(format!("{id} does not exist")))
    }
}

#[async_trait]
impl NodeBackend for Fake {
    fn node_capabilities(&self) -> Vec<NodeRpc> {
        vec![]
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
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn mount_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(vc::AccessType::Mount(vc::MountVolume::default())),
        access_mode: Some(vc::AccessMode {
            mode: vc::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_metrics_health_and_drains_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run/csi.sock");
    let reg_sock = dir.path().join("plugins_registry/fake.rcsi.io-reg.sock");
    let port = free_port();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let fake = Arc::new(Fake);
    let server = tokio::spawn(serve(
        Services {
            plugin: fake.clone(),
            controller: Some(fake.clone()),
            node: Some(fake),
            group: None,
        },
        ServeOptions {
            endpoint: Endpoint::Unix(sock.clone()),
            metrics_address: Some(([127, 0, 0, 1], port).into()),
            slow_call: Duration::from_millis(100),
            registration: Some(RegistrationOptions {
                socket: reg_sock.clone(),
                kubelet_endpoint: "/var/lib/kubelet/plugins/fake.rcsi.io/csi.sock".into(),
            }),
        },
        async {
            let _ = stop_rx.await;
        },
    ));
    let endpoint = Endpoint::Unix(sock.clone());
    let channel = csi_core::client::connect_when_ready(&endpoint, Duration::from_secs(10))
        .await
        .unwrap();
    let mut ident = IdentityClient::new(channel.clone());
    let mut ctl = ControllerClient::new(channel);
    ident.probe(csi::ProbeRequest {}).await.unwrap();
    let caps = ctl
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        caps.capabilities.len(),
        1,
        "exactly the declared capabilities"
    );
    let e = ctl
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented);

    let health = http_get(port, "/healthz");
    assert!(
        health.starts_with("HTTP/1.1 503") && health.contains("not yet registered"),
        "healthy before the kubelet registered the plugin: {health}"
    );

    // The kubelet's side of plugin registration.
    let reg = csi_core::client::connect(&Endpoint::Unix(reg_sock.clone()))
        .await
        .unwrap();
    let mut kubelet = RegistrationClient::new(reg);
    let info = kubelet
        .get_info(pr::InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.r#type, "CSIPlugin");
    assert_eq!(info.name, "fake.rcsi.io");
    assert_eq!(
        info.endpoint,
        "/var/lib/kubelet/plugins/fake.rcsi.io/csi.sock"
    );
    assert_eq!(info.supported_versions, ["1.0.0"]);
    kubelet
        .notify_registration_status(pr::RegistrationStatus {
            plugin_registered: true,
            error: String::new(),
        })
        .await
        .unwrap();
    assert!(http_get(port, "/healthz").starts_with("HTTP/1.1 200"));
    kubelet
        .notify_registration_status(pr::RegistrationStatus {
            plugin_registered: false,
            error: "version 9 is not supported".into(),
        })
        .await
        .unwrap();
    let refused = http_get(port, "/healthz");
    assert!(
        refused.starts_with("HTTP/1.1 503") && refused.contains("version 9 is not supported"),
        "{refused}"
    );
    let metrics = http_get(port, "/metrics");
    assert!(
        metrics.contains(r#"csi_rpc_requests_total{method="Probe",code="Ok"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"csi_rpc_requests_total{method="ListVolumes",code="Unimplemented"} 1"#)
    );

    // A call in flight when shutdown starts still completes.
    let mut slow = ctl.clone();
    let inflight = tokio::spawn(async move {
        slow.create_volume(csi::CreateVolumeRequest {
            name: "slow-1".into(),
            volume_capabilities: vec![mount_cap()],
            ..Default::default()
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop_tx.send(()).unwrap();
    let v = inflight.await.unwrap().expect("in-flight call must finish");
    assert_eq!(v.into_inner().volume.unwrap().volume_id, "id-slow-1");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server stops after draining")
        .unwrap()
        .unwrap();
    assert!(!sock.exists(), "socket removed on exit");
    assert!(!reg_sock.exists(), "registration socket removed on exit");
}

#[test]
fn secrets_never_reach_debug_output() {
    let req = csi::NodeStageVolumeRequest {
        volume_id: "v1".into(),
        secrets: [("password".to_owned(), "hunter2".to_owned())].into(),
        ..Default::default()
    };
    let text = format!("{req:?}");
    assert!(
        text.contains("password") && !text.contains("hunter2"),
        "{text}"
    );
    let create = csi::CreateVolumeRequest {
        name: "n".into(),
        secrets: [("key".to_owned(), "s3cr3t".to_owned())].into(),
        ..Default::default()
    };
    let text = format!("{create:#?}");
    assert!(!text.contains("s3cr3t"), "{text}");
    let secrets = Secrets([("token".to_owned(), "abc".to_owned())].into());
    assert!(!format!("{secrets:?}").contains("abc"));
}

#[tokio::test]
async fn serves_on_tcp() {
    let port = free_port();
    let endpoint: Endpoint = format!("tcp://127.0.0.1:{port}").parse().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let fake = Arc::new(Fake);
    let server = tokio::spawn(serve(
        Services {
            plugin: fake.clone(),
            controller: None,
            node: Some(fake),
            group: None,
        },
        ServeOptions {
            slow_call: Duration::from_secs(1),
            ..ServeOptions::new(endpoint.clone())
        },
        async {
            let _ = stop_rx.await;
        },
    ));
    let channel = csi_core::client::connect_when_ready(&endpoint, Duration::from_secs(10))
        .await
        .unwrap();
    let caps = IdentityClient::new(channel.clone())
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        caps.capabilities.is_empty(),
        "a node-only plugin must not advertise CONTROLLER_SERVICE"
    );
    let e = ControllerClient::new(channel)
        .create_volume(csi::CreateVolumeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::Unimplemented,
        "no controller service is served"
    );
    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}
