//! The provisioner's gRPC client against the real local-path driver on a unix socket,
//! with a scripted API server: a claim becomes a directory volume and goes away again.

mod mock;

use csi_core::csi::{self, controller_client::ControllerClient};
use csi_core::server::{Endpoint, ServeOptions, Services, serve};
use http::Method;
use mock::*;
use rcsi_provisioner::csi::{Csi, GrpcCsi};
use rcsi_provisioner::{Ctx, capacity, delete, provision};
use serde_json::{Value, json};
use std::sync::{Arc, mpsc};
use std::time::Duration;

const TOPO: &str = "topology.local.rcsi.io/node";

#[tokio::test]
async fn a_claim_round_trips_through_the_local_path_driver() {
    let dir = tempfile::tempdir().unwrap();
    let host = rcsi_local_path::Host::system(Duration::from_secs(30));
    let cfg = rcsi_local_path::Config {
        node_id: "n1".into(),
        base_path: dir.path().join("base"),
        max_volumes: 0,
        reserved_bytes: 0,
    };
    let driver = Arc::new(rcsi_local_path::LocalPath::open(cfg, host).unwrap());
    let endpoint = Endpoint::Unix(dir.path().join("csi.sock"));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        Services::all(driver),
        ServeOptions::new(endpoint.clone()),
        async {
            let _ = stop_rx.await;
        },
    ));
    let channel = csi_core::client::connect_when_ready(&endpoint, Duration::from_secs(10))
        .await
        .unwrap();
    let grpc = GrpcCsi::new(channel.clone(), Duration::from_secs(30));
    assert_eq!(grpc.driver_name().await.unwrap(), "local.rcsi.io");

    let uid = "0f8fad5b-d9cb-469f-a165-70867728950e";
    let pv_name = format!("pvc-{uid}");
    let pvc = json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data", "namespace": "apps", "uid": uid, "resourceVersion": "1",
            "annotations": {"volume.kubernetes.io/selected-node": "n1"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local",
            "resources": {"requests": {"storage": "64Mi"}}},
    });
    let sc = json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "local"}, "provisioner": "local.rcsi.io",
        "volumeBindingMode": "WaitForFirstConsumer", "parameters": {"backing": "directory"}});
    let (pv_tx, pv_rx) = mpsc::channel::<Value>();
    let pv_path = format!("/api/v1/persistentvolumes/{pv_name}");
    let pvc_path = "/api/v1/namespaces/apps/persistentvolumeclaims/data?";
    let mut with_finalizer = pvc.clone();
    with_finalizer["metadata"]["finalizers"] = json!(["provisioner.rcsi.io/provisioning"]);
    let (client, api_server) = api(vec![
        get("/apis/storage.k8s.io/v1/storageclasses/local", sc.clone()),
        missing(Method::GET, &pv_path),
        get(
            "/apis/storage.k8s.io/v1/csinodes/n1",
            json!({"apiVersion": "storage.k8s.io/v1",
            "kind": "CSINode", "metadata": {"name": "n1"},
            "spec": {"drivers": [{"name": "local.rcsi.io", "nodeID": "n1", "topologyKeys": [TOPO]}]}}),
        ),
        get(
            "/api/v1/nodes/n1",
            json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "labels": {TOPO: "n1"}}}),
        ),
        write(Method::PATCH, pvc_path, with_finalizer.clone(), |_| {}),
        event("apps", "Provisioning"),
        write(Method::PATCH, pvc_path, with_finalizer.clone(), |b| {
            assert!(b["metadata"]["annotations"]["provisioner.rcsi.io/volume-handle"].is_string());
        }),
        echo(Method::POST, "/api/v1/persistentvolumes?", move |pv| {
            pv_tx.send(pv.clone()).unwrap();
        }),
        write(Method::PATCH, pvc_path, pvc.clone(), |_| {}),
        event("apps", "ProvisioningSucceeded"),
        get(
            "/apis/storage.k8s.io/v1/storageclasses?",
            json!({"apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClassList", "metadata": {}, "items": [sc]}),
        ),
        echo(
            Method::PATCH,
            "/apis/storage.k8s.io/v1/namespaces/rcsi-system/csistoragecapacities/*",
            |b| {
                assert_ne!(b["capacity"], "0", "the driver reports free space: {b}");
            },
        ),
        get(
            "/apis/storage.k8s.io/v1/namespaces/rcsi-system/csistoragecapacities?*",
            json!({"apiVersion": "storage.k8s.io/v1", "kind": "CSIStorageCapacityList", "metadata": {}, "items": []}),
        ),
        // The deleter reads the PV fresh before DeleteVolume.
        get(
            &pv_path,
            json!({"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": pv_name, "resourceVersion": "6",
                "finalizers": ["external-provisioner.volume.kubernetes.io/finalizer"]},
            "status": {"phase": "Released"}}),
        ),
        echo(Method::PATCH, &format!("{pv_path}?"), |_| {}),
        step(
            Method::DELETE,
            &format!("{pv_path}?"),
            404,
            Reply::Json(json!({"kind": "Status",
            "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})),
        ),
    ]);
    let csi: Arc<dyn Csi> = Arc::new(grpc);
    let ctx = Arc::new(Ctx::new(
        client,
        csi,
        "local.rcsi.io".into(),
        Some("n1".into()),
        "rcsi-system".into(),
    ));
    let claim = Arc::new(serde_json::from_value(pvc).unwrap());
    provision::reconcile(claim, ctx.clone()).await.unwrap();
    let pv = pv_rx.recv().unwrap();
    let handle = pv["spec"]["csi"]["volumeHandle"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(pv["spec"]["capacity"]["storage"], "64Mi");
    assert_eq!(
        pv["spec"]["csi"]["volumeAttributes"]["backing"],
        "directory"
    );
    assert_eq!(
        pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]["values"],
        json!(["n1"])
    );
    let mut ctl = ControllerClient::new(channel);
    let list = |ctl: &mut ControllerClient<_>| {
        let mut ctl = ctl.clone();
        async move {
            ctl.list_volumes(csi::ListVolumesRequest::default())
                .await
                .unwrap()
                .into_inner()
                .entries
                .into_iter()
                .filter_map(|e| e.volume.map(|v| v.volume_id))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(list(&mut ctl).await, vec![handle.clone()]);

    assert_eq!(capacity::publish(&ctx).await.unwrap(), 1);

    let mut released = pv;
    released["metadata"]["resourceVersion"] = json!("5");
    released["status"] = json!({"phase": "Released"});
    let released = Arc::new(serde_json::from_value(released).unwrap());
    delete::reconcile(released, ctx.clone()).await.unwrap();
    assert!(
        list(&mut ctl).await.is_empty(),
        "the volume is gone from the driver"
    );

    drop(ctx);
    api_server.await.unwrap();
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}
