//! The provisioner's controllers against a scripted API server: the exact API calls,
//! their bodies, and the CSI calls for each path.

mod mock;

use http::Method;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::Client;
use kube::runtime::controller::Action;
use mock::*;
use rcsi_provisioner::csi::Csi;
use rcsi_provisioner::snapshot::{self, Content};
use rcsi_provisioner::{Ctx, capacity, delete, provision, resize};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tonic::Code;

const DRIVER: &str = "local.rcsi.io";
const UID: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
const PV: &str = "pvc-1b4e28ba-2fa1-11d2-883f-0016d3cca427";
const TOPO: &str = "topology.local.rcsi.io/node";

fn claim(extra: Value) -> Value {
    let mut pvc = json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data", "namespace": "apps", "uid": UID, "resourceVersion": "10",
            "annotations": {"team": "blue"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
            "resources": {"requests": {"storage": "1Gi"}}},
        "status": {"phase": "Pending"}
    });
    merge(&mut pvc, extra);
    pvc
}

fn merge(a: &mut Value, b: Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                if v.is_null() {
                    a.remove(&k);
                } else {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        (a, b) => *a = b,
    }
}

fn class(extra: Value) -> Value {
    let mut sc = json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "fast"}, "provisioner": DRIVER,
        "reclaimPolicy": "Delete", "volumeBindingMode": "Immediate",
        "allowVolumeExpansion": true,
        "parameters": {"backing": "directory"}
    });
    merge(&mut sc, extra);
    sc
}

fn pvc_of(v: &Value) -> Arc<PersistentVolumeClaim> {
    Arc::new(serde_json::from_value(v.clone()).unwrap())
}

fn ctx(client: Client, csi: Arc<mock::FakeCsi>, node: Option<&str>) -> Arc<Ctx> {
    let csi: Arc<dyn Csi> = csi;
    Arc::new(Ctx::new(
        client,
        csi,
        DRIVER.into(),
        node.map(str::to_owned),
        "rcsi-system".into(),
    ))
}

const SC_PATH: &str = "/apis/storage.k8s.io/v1/storageclasses/fast";
const PV_PATH: &str = "/api/v1/persistentvolumes/pvc-1b4e28ba-2fa1-11d2-883f-0016d3cca427";
const PVC_PATH: &str = "/api/v1/namespaces/apps/persistentvolumeclaims/data?";

fn finalizer_patch(present: bool, rv: &'static str) -> impl Fn(&Value) + Send {
    move |b: &Value| {
        assert_eq!(b["metadata"]["resourceVersion"], rv, "{b}");
        if !present {
            let handle = &b["metadata"]["annotations"]["provisioner.rcsi.io/volume-handle"];
            assert!(
                handle.is_null(),
                "the recorded handle goes with the finalizer: {b}"
            );
        }
        let list = b["metadata"]["finalizers"].as_array().unwrap();
        assert_eq!(
            list.iter().any(|f| f == "provisioner.rcsi.io/provisioning"),
            present,
            "{b}"
        );
    }
}

/// The volume id is written on the claim as soon as CreateVolume returns.
fn handle_recorded(claim: Value) -> Step {
    write(Method::PATCH, PVC_PATH, claim, |b| {
        assert_eq!(
            b,
            &json!({"metadata": {"annotations": {"provisioner.rcsi.io/volume-handle": format!("vol-{PV}")}}})
        );
    })
}

async fn finish(ctx: Arc<Ctx>, server: tokio::task::JoinHandle<()>) {
    drop(ctx);
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("API server script did not finish")
        .expect("API server script failed");
}

fn secret(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": ns},
        "data": {"token": "czNjcjN0"}})
}

#[tokio::test]
async fn provisions_an_immediate_claim_with_secrets_and_templates() {
    let sc = class(json!({
        "reclaimPolicy": "Retain",
        "mountOptions": ["noatime"],
        "parameters": {
            "csi.storage.k8s.io/fstype": "xfs",
            "csi.storage.k8s.io/provisioner-secret-name": "${pvc.name}-creds",
            "csi.storage.k8s.io/provisioner-secret-namespace": "${pvc.namespace}",
            "csi.storage.k8s.io/node-stage-secret-name": "stage-${pvc.annotations['team']}",
            "csi.storage.k8s.io/node-stage-secret-namespace": "storage",
        },
        "allowedTopologies": [{"matchLabelExpressions": [{"key": TOPO, "values": ["n1", "n2"]}]}],
    }));
    let pvc = claim(json!({}));
    let with_finalizer = claim(json!({"metadata": {"resourceVersion": "11",
        "finalizers": ["provisioner.rcsi.io/provisioning"]}}));
    let (client, server) = api(vec![
        get(SC_PATH, sc),
        missing(Method::GET, PV_PATH),
        get(
            "/api/v1/namespaces/apps/secrets/data-creds",
            secret("apps", "data-creds"),
        ),
        write(
            Method::PATCH,
            PVC_PATH,
            with_finalizer.clone(),
            finalizer_patch(true, "10"),
        ),
        event("apps", "Provisioning"),
        handle_recorded(with_finalizer.clone()),
        echo(Method::POST, "/api/v1/persistentvolumes?", |pv| {
            let spec = &pv["spec"];
            assert_eq!(pv["metadata"]["name"], PV);
            assert_eq!(
                pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"],
                DRIVER
            );
            assert_eq!(
                pv["metadata"]["annotations"]["volume.kubernetes.io/provisioner-deletion-secret-name"],
                "data-creds"
            );
            assert!(
                pv["metadata"].get("finalizers").is_none(),
                "Retain needs no finalizer"
            );
            assert_eq!(spec["persistentVolumeReclaimPolicy"], "Retain");
            assert_eq!(spec["capacity"]["storage"], "1Gi");
            assert_eq!(spec["claimRef"]["uid"], UID);
            assert_eq!(spec["claimRef"]["namespace"], "apps");
            assert_eq!(spec["storageClassName"], "fast");
            assert_eq!(spec["mountOptions"], json!(["noatime"]));
            assert_eq!(spec["volumeMode"], "Filesystem");
            assert_eq!(spec["csi"]["driver"], DRIVER);
            assert_eq!(spec["csi"]["volumeHandle"], format!("vol-{PV}"));
            assert_eq!(spec["csi"]["fsType"], "xfs");
            assert_eq!(spec["csi"]["volumeAttributes"]["backing"], "directory");
            assert_eq!(
                spec["csi"]["nodeStageSecretRef"],
                json!({"name": "stage-blue", "namespace": "storage"})
            );
            let term = &spec["nodeAffinity"]["required"]["nodeSelectorTerms"][0];
            assert_eq!(
                term["matchExpressions"][0],
                json!({"key": TOPO, "operator": "In", "values": ["n1"]})
            );
        }),
        write(
            Method::PATCH,
            PVC_PATH,
            pvc.clone(),
            finalizer_patch(false, "11"),
        ),
        event("apps", "ProvisioningSucceeded"),
    ]);
    let csi = Arc::new(FakeCsi::default());
    let ctx = ctx(client, csi.clone(), None);
    let action = provision::reconcile(pvc_of(&pvc), ctx.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    finish(ctx, server).await;

    let req = csi.creates.lock().unwrap()[0].clone();
    assert_eq!(req.name, PV);
    assert_eq!(req.capacity_range.unwrap().required_bytes, 1 << 30);
    assert_eq!(req.secrets.get("token").map(String::as_str), Some("s3cr3t"));
    assert_eq!(
        req.parameters.get("backing").map(String::as_str),
        Some("directory")
    );
    assert_eq!(req.parameters["csi.storage.k8s.io/pvc/name"], "data");
    assert_eq!(req.parameters["csi.storage.k8s.io/pvc/namespace"], "apps");
    assert_eq!(req.parameters["csi.storage.k8s.io/pv/name"], PV);
    assert!(!req.parameters.contains_key("csi.storage.k8s.io/fstype"));
    assert!(!req.parameters.keys().any(|k| k.contains("secret")));
    let cap = &req.volume_capabilities[0];
    assert_eq!(cap.access_mode.unwrap().mode, 1, "SINGLE_NODE_WRITER");
    match cap.access_type.as_ref().unwrap() {
        csi_core::csi::volume_capability::AccessType::Mount(m) => {
            assert_eq!(m.fs_type, "xfs");
            assert_eq!(m.mount_flags, vec!["noatime"]);
        }
        other => panic!("expected a mount capability, got {other:?}"),
    }
    let topo = req.accessibility_requirements.unwrap();
    assert_eq!(topo.requisite.len(), 2);
    assert_eq!(csi.calls(), vec!["CreateVolume"]);
}

#[tokio::test]
async fn wait_for_first_consumer_waits_then_uses_the_selected_nodes_topology() {
    let sc = class(json!({"volumeBindingMode": "WaitForFirstConsumer"}));
    let (client, server) = api(vec![get(SC_PATH, sc.clone())]);
    let csi = Arc::new(FakeCsi::default());
    let c = ctx(client, csi.clone(), None);
    provision::reconcile(pvc_of(&claim(json!({}))), c.clone())
        .await
        .unwrap();
    finish(c, server).await;
    assert!(
        csi.calls().is_empty(),
        "nothing happens before the scheduler picks a node"
    );

    let selected = claim(json!({"metadata": {"annotations": {
        "volume.kubernetes.io/selected-node": "n2"}}}));
    let block = claim(json!({"metadata": {"annotations": {
        "volume.kubernetes.io/selected-node": "n2"}}, "spec": {"volumeMode": "Block",
        "accessModes": ["ReadWriteOncePod"]}}));
    let mut finalized = block.clone();
    finalized["metadata"]["finalizers"] = json!(["provisioner.rcsi.io/provisioning"]);
    let (client, server) = api(vec![
        get(SC_PATH, sc),
        missing(Method::GET, PV_PATH),
        get(
            "/apis/storage.k8s.io/v1/csinodes/n2",
            json!({"apiVersion": "storage.k8s.io/v1",
            "kind": "CSINode", "metadata": {"name": "n2"},
            "spec": {"drivers": [{"name": DRIVER, "nodeID": "n2", "topologyKeys": [TOPO]}]}}),
        ),
        get(
            "/api/v1/nodes/n2",
            json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n2", "labels": {TOPO: "n2", "zone": "a"}}}),
        ),
        write(
            Method::PATCH,
            PVC_PATH,
            finalized.clone(),
            finalizer_patch(true, "10"),
        ),
        event("apps", "Provisioning"),
        handle_recorded(finalized.clone()),
        echo(Method::POST, "/api/v1/persistentvolumes?", |pv| {
            assert_eq!(pv["spec"]["volumeMode"], "Block");
            assert!(pv["spec"]["csi"].get("fsType").is_none());
            assert_eq!(pv["spec"]["accessModes"], json!(["ReadWriteOncePod"]));
            assert_eq!(
                pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"]
                    [0]["values"],
                json!(["n2"])
            );
            assert_eq!(
                pv["metadata"]["finalizers"],
                json!(["external-provisioner.volume.kubernetes.io/finalizer"])
            );
        }),
        write(
            Method::PATCH,
            PVC_PATH,
            claim(json!({})),
            finalizer_patch(false, "10"),
        ),
        event("apps", "ProvisioningSucceeded"),
    ]);
    let _ = selected;
    let c = ctx(client, csi.clone(), None);
    provision::reconcile(pvc_of(&block), c.clone())
        .await
        .unwrap();
    finish(c, server).await;
    let req = csi.creates.lock().unwrap()[0].clone();
    let topo = req.accessibility_requirements.unwrap();
    assert_eq!(topo.requisite.len(), 1);
    assert_eq!(topo.requisite[0].segments[TOPO], "n2");
    assert_eq!(
        topo.requisite[0].segments.len(),
        1,
        "only the driver's topology keys"
    );
    assert_eq!(
        req.volume_capabilities[0].access_mode.unwrap().mode,
        6,
        "SINGLE_NODE_SINGLE_WRITER"
    );
}

fn csinode(node: &str) -> Step {
    get(
        &format!("/apis/storage.k8s.io/v1/csinodes/{node}"),
        json!({"apiVersion": "storage.k8s.io/v1", "kind": "CSINode", "metadata": {"name": node},
            "spec": {"drivers": [{"name": DRIVER, "nodeID": node, "topologyKeys": [TOPO]}]}}),
    )
}

fn node(name: &str) -> Step {
    get(
        &format!("/api/v1/nodes/{name}"),
        json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {TOPO: name}}}),
    )
}

#[tokio::test]
async fn node_deployment_handles_only_its_own_node() {
    let wffc = class(json!({"volumeBindingMode": "WaitForFirstConsumer"}));
    let elsewhere = claim(json!({"metadata": {"annotations": {
        "volume.kubernetes.io/selected-node": "n2"}}}));
    let here = claim(json!({"metadata": {"annotations": {
        "volume.kubernetes.io/selected-node": "n1"}, "finalizers": ["provisioner.rcsi.io/provisioning"]}}));
    let (client, server) = api(vec![
        get(SC_PATH, wffc.clone()),
        get(SC_PATH, wffc),
        missing(Method::GET, PV_PATH),
        csinode("n1"),
        node("n1"),
        event("apps", "Provisioning"),
        handle_recorded(here.clone()),
        echo(Method::POST, "/api/v1/persistentvolumes?", |_| {}),
        write(
            Method::PATCH,
            PVC_PATH,
            claim(json!({})),
            finalizer_patch(false, "10"),
        ),
        event("apps", "ProvisioningSucceeded"),
        // An Immediate claim: this node tries to claim it, guarded by resourceVersion.
        get(SC_PATH, class(json!({}))),
        conflict(Method::PATCH, PVC_PATH),
    ]);
    let csi = Arc::new(FakeCsi::default());
    let c = ctx(client, csi.clone(), Some("n1"));
    provision::reconcile(pvc_of(&elsewhere), c.clone())
        .await
        .unwrap();
    assert!(
        csi.calls().is_empty(),
        "a claim selected for n2 is not n1's business"
    );
    provision::reconcile(pvc_of(&here), c.clone())
        .await
        .unwrap();
    assert_eq!(csi.calls(), vec!["CreateVolume"]);
    // Lost the race for the Immediate claim: no error, no CSI call.
    provision::reconcile(pvc_of(&claim(json!({}))), c.clone())
        .await
        .unwrap();
    assert_eq!(csi.calls().len(), 1);
    finish(c, server).await;
}

#[tokio::test]
async fn create_failures_back_off_and_resource_exhausted_reschedules() {
    let wffc = class(json!({"volumeBindingMode": "WaitForFirstConsumer"}));
    let pvc = claim(json!({"metadata": {"annotations": {
        "volume.kubernetes.io/selected-node": "n1"}, "finalizers": ["provisioner.rcsi.io/provisioning"]}}));
    let (client, server) = api(vec![
        // Unavailable: the claim keeps its node and is retried with growing delays.
        get(SC_PATH, wffc.clone()),
        missing(Method::GET, PV_PATH),
        csinode("n1"),
        node("n1"),
        event("apps", "Provisioning"),
        event("apps", "ProvisioningFailed"),
        // ResourceExhausted: the selected node is dropped so the scheduler retries elsewhere.
        get(SC_PATH, wffc),
        missing(Method::GET, PV_PATH),
        event_again("apps", "Provisioning"),
        event_again("apps", "ProvisioningFailed"),
        write(Method::PATCH, PVC_PATH, claim(json!({})), |b| {
            // Nothing was created: the finalizer goes with the node, so whichever node
            // the scheduler picks next (or a deletion) is not blocked.
            assert_eq!(
                b,
                &json!({"metadata": {"resourceVersion": "10", "finalizers": [],
                "annotations": {"volume.kubernetes.io/selected-node": null}}})
            );
        }),
    ]);
    let csi = Arc::new(FakeCsi::default());
    csi.fail
        .lock()
        .unwrap()
        .insert("CreateVolume", Code::Unavailable);
    let c = ctx(client, csi.clone(), Some("n1"));
    let p = pvc_of(&pvc);
    let err = provision::reconcile(p.clone(), c.clone())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("CreateVolume failed: Unavailable"),
        "{err}"
    );
    let delays: Vec<_> = (0..4)
        .map(|_| provision::error_policy(p.clone(), &err, c.clone()))
        .collect();
    assert_eq!(
        delays,
        [1, 2, 4, 8].map(|s| Action::requeue(Duration::from_secs(s)))
    );
    csi.fail
        .lock()
        .unwrap()
        .insert("CreateVolume", Code::ResourceExhausted);
    let err = provision::reconcile(p.clone(), c.clone())
        .await
        .unwrap_err();
    assert!(err.is_final_csi(), "{err}");
    assert_eq!(c.metrics.count("claim", "error"), 2);
    assert!(
        c.metrics
            .encode()
            .contains(r#"rcsi_provisioner_reconciles_total{controller="claim",result="error"} 2"#),
        "{}",
        c.metrics.encode()
    );
    finish(c, server).await;
}

#[tokio::test]
async fn a_claim_deleted_mid_provisioning_leaves_no_volume() {
    let deleted = claim(json!({"metadata": {
        "deletionTimestamp": "2026-11-22T00:00:00Z",
        "finalizers": ["provisioner.rcsi.io/provisioning"]}}));
    let (client, server) = api(vec![
        missing(Method::GET, PV_PATH),
        get(SC_PATH, class(json!({}))),
        write(
            Method::PATCH,
            PVC_PATH,
            claim(json!({})),
            finalizer_patch(false, "10"),
        ),
    ]);
    let csi = Arc::new(FakeCsi::default());
    let c = ctx(client, csi.clone(), None);
    provision::reconcile(pvc_of(&deleted), c.clone())
        .await
        .unwrap();
    finish(c, server).await;
    assert_eq!(csi.calls(), vec!["CreateVolume", "DeleteVolume"]);
    assert_eq!(
        csi.deletes.lock().unwrap()[0].volume_id,
        format!("vol-{PV}")
    );
}

#[tokio::test]
async fn a_claim_deleted_after_create_volume_is_cleaned_up_by_its_recorded_handle() {
    let deleted = claim(json!({"metadata": {
        "deletionTimestamp": "2026-11-22T00:00:00Z",
        "annotations": {"provisioner.rcsi.io/volume-handle": "vol-recorded"},
        "finalizers": ["provisioner.rcsi.io/provisioning", "kubernetes.io/pvc-protection"]}}));
    let mut fresh = deleted.clone();
    fresh["metadata"]["resourceVersion"] = json!("12");
    let (client, server) = api(vec![
        missing(Method::GET, PV_PATH),
        get(SC_PATH, class(json!({}))),
        // A stale copy: the guarded patch conflicts, the claim is read again and the
        // patch retried, keeping the other finalizer.
        conflict(Method::PATCH, PVC_PATH),
        get("/api/v1/namespaces/apps/persistentvolumeclaims/data", fresh),
        write(Method::PATCH, PVC_PATH, claim(json!({})), |b| {
            assert_eq!(b["metadata"]["resourceVersion"], "12");
            assert_eq!(
                b["metadata"]["finalizers"],
                json!(["kubernetes.io/pvc-protection"])
            );
        }),
    ]);
    let csi = Arc::new(FakeCsi::default());
    let c = ctx(client, csi.clone(), None);
    provision::reconcile(pvc_of(&deleted), c.clone())
        .await
        .unwrap();
    finish(c, server).await;
    assert_eq!(
        csi.calls(),
        vec!["DeleteVolume"],
        "no CreateVolume to learn the id"
    );
    assert_eq!(csi.deletes.lock().unwrap()[0].volume_id, "vol-recorded");
}

fn volume(extra: Value) -> Value {
    let mut pv = json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": PV, "resourceVersion": "20",
            "annotations": {"pv.kubernetes.io/provisioned-by": DRIVER,
                "volume.kubernetes.io/provisioner-deletion-secret-name": "creds",
                "volume.kubernetes.io/provisioner-deletion-secret-namespace": "storage"},
            "finalizers": ["kubernetes.io/pv-protection", "external-provisioner.volume.kubernetes.io/finalizer"]},
        "spec": {"accessModes": ["ReadWriteOnce"], "capacity": {"storage": "1Gi"},
            "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "fast",
            "volumeMode": "Filesystem",
            "claimRef": {"namespace": "apps", "name": "data", "uid": UID},
            "csi": {"driver": DRIVER, "volumeHandle": "vol-1", "fsType": "ext4"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": TOPO, "operator": "In", "values": ["n1"]}]}]}}},
        "status": {"phase": "Bound"}
    });
    merge(&mut pv, extra);
    pv
}

fn pv_of(v: &Value) -> Arc<PersistentVolume> {
    Arc::new(serde_json::from_value(v.clone()).unwrap())
}

const PV_PATCH: &str = "/api/v1/persistentvolumes/pvc-1b4e28ba-2fa1-11d2-883f-0016d3cca427?";

#[tokio::test]
async fn released_volumes_are_deleted_before_their_pv_and_failures_keep_the_finalizer() {
    let released = volume(json!({"status": {"phase": "Released"}}));
    let (client, server) = api(vec![
        // First attempt fails: event, finalizer stays, nothing deleted.
        get(PV_PATH, released.clone()),
        get(
            "/api/v1/namespaces/storage/secrets/creds",
            secret("storage", "creds"),
        ),
        event("default", "VolumeFailedDelete"),
        // Second attempt: DeleteVolume, drop our finalizer (others kept), delete the PV.
        get(PV_PATH, released.clone()),
        get(
            "/api/v1/namespaces/storage/secrets/creds",
            secret("storage", "creds"),
        ),
        echo(Method::PATCH, PV_PATCH, |b| {
            assert_eq!(b["metadata"]["resourceVersion"], "20");
            assert_eq!(
                b["metadata"]["finalizers"],
                json!(["kubernetes.io/pv-protection"])
            );
        }),
        step(
            Method::DELETE,
            PV_PATCH,
            200,
            Reply::Json(volume(json!({}))),
        ),
    ]);
    let csi = Arc::new(FakeCsi::default());
    csi.fail
        .lock()
        .unwrap()
        .insert("DeleteVolume", Code::Internal);
    let c = ctx(client, csi.clone(), None);
    assert!(
        delete::reconcile(pv_of(&released), c.clone())
            .await
            .is_err()
    );
    delete::reconcile(pv_of(&released), c.clone())
        .await
        .unwrap();
    finish(c, server).await;
    let deletes = csi.deletes.lock().unwrap();
    assert_eq!(deletes.len(), 2);
    assert_eq!(deletes[1].volume_id, "vol-1");
    assert_eq!(deletes[1].secrets["token"], "s3cr3t");
}

#[tokio::test]
async fn a_pv_deleted_while_bound_keeps_its_volume_until_released_and_is_deleted_once() {
    let deleting = json!({"metadata": {"deletionTimestamp": "2026-11-22T00:00:00Z"}});
    let bound_deleting = volume(deleting.clone());
    let mut released = volume(json!({"status": {"phase": "Released"}}));
    merge(&mut released, deleting);
    let mut finished = released.clone();
    merge(
        &mut finished,
        json!({"metadata": {"finalizers": ["kubernetes.io/pv-protection"]}}),
    );
    let (client, server) = api(vec![
        // Released: deleted once.
        get(PV_PATH, released.clone()),
        get(
            "/api/v1/namespaces/storage/secrets/creds",
            secret("storage", "creds"),
        ),
        echo(Method::PATCH, PV_PATCH, |b| {
            assert_eq!(
                b["metadata"]["finalizers"],
                json!(["kubernetes.io/pv-protection"])
            );
        }),
        // A stale copy from the watch cache: the fresh read shows it is done.
        get(PV_PATH, finished),
    ]);
    let csi = Arc::new(FakeCsi::default());
    let c = ctx(client, csi.clone(), None);
    // Deleted by hand while Bound (its pod still writing): nothing happens.
    delete::reconcile(pv_of(&bound_deleting), c.clone())
        .await
        .unwrap();
    assert!(csi.calls().is_empty(), "DeleteVolume of a Bound PV");
    delete::reconcile(pv_of(&released), c.clone())
        .await
        .unwrap();
    delete::reconcile(pv_of(&released), c.clone())
        .await
        .unwrap();
    finish(c, server).await;
    assert_eq!(csi.calls(), vec!["DeleteVolume"]);
}

#[tokio::test]
async fn retained_bound_and_foreign_volumes_are_left_alone() {
    let retained = volume(
        json!({"metadata": {"deletionTimestamp": "2026-11-22T00:00:00Z"},
        "spec": {"persistentVolumeReclaimPolicy": "Retain"}, "status": {"phase": "Released"}}),
    );
    let foreign = volume(
        json!({"metadata": {"annotations": {"pv.kubernetes.io/provisioned-by": "other"}},
        "status": {"phase": "Released"}}),
    );
    let other_node = volume(
        json!({"status": {"phase": "Released"}, "spec": {"nodeAffinity":
        {"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": TOPO, "operator": "In", "values": ["n2"]}]}]}}}}),
    );
    let (client, server) = api(vec![
        csinode("n1"),
        node("n1"),
        echo(Method::PATCH, PV_PATCH, |b| {
            assert_eq!(
                b["metadata"]["finalizers"],
                json!(["kubernetes.io/pv-protection"])
            );
        }),
    ]);
    let csi = Arc::new(FakeCsi::default());
    let c = ctx(client, csi.clone(), Some("n1"));
    delete::reconcile(pv_of(&volume(json!({}))), c.clone())
        .await
        .unwrap();
    delete::reconcile(pv_of(&retained), c.clone())
        .await
        .unwrap();
    delete::reconcile(pv_of(&foreign), c.clone()).await.unwrap();
    delete::reconcile(pv_of(&other_node), c.clone())
        .await
        .unwrap();
    finish(c, server).await;
    assert!(csi.calls().is_empty());
}

fn bound(request: &str, extra: Value) -> Value {
    let mut pvc = claim(
        json!({"spec": {"volumeName": PV, "resources": {"requests": {"storage": request}}},
        "status": {"phase": "Bound", "capacity": {"storage": "1Gi"}}}),
    );
    merge(&mut pvc, extra);
    pvc
}

const PVC_STATUS: &str = "/api/v1/namespaces/apps/persistentvolumeclaims/data/status?";

#[tokio::test]
async fn expansion_grows_the_pv_and_hands_over_to_the_kubelet() {
    let (client, server) = api(vec![
        get(PV_PATH, volume(json!({}))),
        echo(Method::PATCH, PVC_STATUS, |b| {
            assert_eq!(b["status"]["allocatedResources"]["storage"], "2Gi");
            assert_eq!(
                b["status"]["allocatedResourceStatuses"]["storage"],
                "ControllerResizeInProgress"
            );
            assert_eq!(b["status"]["conditions"][0]["type"], "Resizing");
        }),
        echo(Method::PATCH, PV_PATCH, |b| {
            assert_eq!(b, &json!({"spec": {"capacity": {"storage": "2Gi"}}}));
        }),
        echo(Method::PATCH, PVC_STATUS, |b| {
            assert_eq!(
                b["status"]["allocatedResourceStatuses"]["storage"],
                "NodeResizePending"
            );
            assert_eq!(
                b["status"]["conditions"][0]["type"],
                "FileSystemResizePending"
            );
            assert!(
                b["status"].get("capacity").is_none(),
                "the kubelet sets capacity"
            );
        }),
        event("apps", "FileSystemResizeRequired"),
        // Handed over: while the kubelet's step is pending or running, the claim is
        // only read, never written (the kubelet's guarded patches would conflict).
        get(
            PV_PATH,
            volume(json!({"spec": {"capacity": {"storage": "2Gi"}}})),
        ),
        get(
            PV_PATH,
            volume(json!({"spec": {"capacity": {"storage": "2Gi"}}})),
        ),
        get(
            PV_PATH,
            volume(json!({"spec": {"capacity": {"storage": "2Gi"}}})),
        ),
    ]);
    let csi = Arc::new(FakeCsi {
        node_expansion: true,
        ..Default::default()
    });
    let c = ctx(client, csi.clone(), None);
    provision::reconcile(pvc_of(&bound("2Gi", json!({}))), c.clone())
        .await
        .unwrap();
    // The kubelet's states; a larger request meanwhile waits for the first to finish.
    for (request, state) in [
        ("2Gi", "NodeResizePending"),
        ("2Gi", "NodeResizeInProgress"),
        ("3Gi", "NodeResizeInProgress"),
    ] {
        let claim = bound(
            request,
            json!({"status": {"allocatedResources": {"storage": "2Gi"},
            "allocatedResourceStatuses": {"storage": state}}}),
        );
        provision::reconcile(pvc_of(&claim), c.clone())
            .await
            .unwrap();
    }
    provision::reconcile(pvc_of(&bound("1Gi", json!({}))), c.clone())
        .await
        .unwrap();
    finish(c, server).await;
    let req = csi.expands.lock().unwrap()[0].clone();
    assert_eq!(req.volume_id, "vol-1");
    assert_eq!(req.capacity_range.unwrap().required_bytes, 2 << 30);
    assert!(req.volume_capability.is_some());
    assert_eq!(csi.calls(), vec!["ControllerExpandVolume"]);
}

#[tokio::test]
async fn expansion_without_a_node_step_completes_and_final_errors_are_reported() {
    let (client, server) = api(vec![
        get(PV_PATH, volume(json!({}))),
        echo(Method::PATCH, PVC_STATUS, |_| {}),
        echo(Method::PATCH, PV_PATCH, |_| {}),
        echo(Method::PATCH, PVC_STATUS, |b| {
            assert_eq!(b["status"]["capacity"]["storage"], "3Gi");
            assert!(b["status"]["allocatedResourceStatuses"].is_null());
            assert!(b["status"]["conditions"].is_null());
        }),
        event("apps", "VolumeResizeSuccessful"),
        // 9Ti is out of range: reported once, then retried only after a while.
        get(PV_PATH, volume(json!({}))),
        echo(Method::PATCH, PVC_STATUS, |b| {
            assert_eq!(b["status"]["allocatedResources"]["storage"], "9Ti");
        }),
        event("apps", "VolumeResizeFailed"),
        echo(Method::PATCH, PVC_STATUS, |b| {
            assert_eq!(
                b["status"]["allocatedResourceStatuses"]["storage"],
                "ControllerResizeInfeasible"
            );
            assert_eq!(
                b["status"]["conditions"][0]["type"],
                "ControllerResizeError"
            );
        }),
        get(PV_PATH, volume(json!({}))),
        // The user lowers the request to 2Gi: tried at once.
        get(PV_PATH, volume(json!({}))),
        echo(Method::PATCH, PVC_STATUS, |b| {
            assert_eq!(b["status"]["allocatedResources"]["storage"], "2Gi");
        }),
        echo(Method::PATCH, PV_PATCH, |_| {}),
        echo(Method::PATCH, PVC_STATUS, |b| {
            assert_eq!(b["status"]["capacity"]["storage"], "2Gi");
        }),
        // The repeated event is counted on the first one.
        echo(
            Method::PATCH,
            "/apis/events.k8s.io/v1/namespaces/apps/events/*",
            |_| {},
        ),
    ]);
    let csi = Arc::new(FakeCsi::default());
    let c = ctx(client, csi.clone(), None);
    provision::reconcile(pvc_of(&bound("3Gi", json!({}))), c.clone())
        .await
        .unwrap();
    csi.fail
        .lock()
        .unwrap()
        .insert("ControllerExpandVolume", Code::OutOfRange);
    let later = Action::requeue(resize::INFEASIBLE_RETRY);
    assert_eq!(
        provision::reconcile(pvc_of(&bound("9Ti", json!({}))), c.clone())
            .await
            .unwrap(),
        later
    );
    let infeasible = json!({"status": {"allocatedResources": {"storage": "9Ti"},
        "allocatedResourceStatuses": {"storage": "ControllerResizeInfeasible"}}});
    assert_eq!(
        provision::reconcile(pvc_of(&bound("9Ti", infeasible.clone())), c.clone())
            .await
            .unwrap(),
        later
    );
    csi.fail.lock().unwrap().clear();
    provision::reconcile(pvc_of(&bound("2Gi", infeasible)), c.clone())
        .await
        .unwrap();
    finish(c, server).await;
    assert_eq!(csi.expands.lock().unwrap().len(), 3);
}

fn content(extra: Value) -> Value {
    let mut c = json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotContent",
        "metadata": {"name": "snapcontent-1", "resourceVersion": "30"},
        "spec": {"driver": DRIVER, "deletionPolicy": "Delete",
            "source": {"volumeHandle": "vol-1"},
            "volumeSnapshotClassName": "snaps",
            "volumeSnapshotRef": {"name": "nightly", "namespace": "apps", "uid": "abc"}}
    });
    merge(&mut c, extra);
    c
}

fn content_of(v: &Value) -> Arc<Content> {
    Arc::new(serde_json::from_value(v.clone()).unwrap())
}

const VSC_PATH: &str = "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents/snapcontent-1?";
const VSC_STATUS: &str =
    "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents/snapcontent-1/status?";

#[tokio::test]
async fn snapshots_are_created_with_class_parameters_and_deleted_on_request() {
    let (client, server) = api(vec![
        get(
            "/apis/snapshot.storage.k8s.io/v1/volumesnapshotclasses/snaps",
            json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
            "metadata": {"name": "snaps"}, "driver": DRIVER, "deletionPolicy": "Delete",
            "parameters": {"csi.storage.k8s.io/snapshotter-secret-name": "${volumesnapshot.name}-key",
                "csi.storage.k8s.io/snapshotter-secret-namespace": "${volumesnapshot.namespace}",
                "tier": "cold"}}),
        ),
        get(
            "/api/v1/namespaces/apps/secrets/nightly-key",
            secret("apps", "nightly-key"),
        ),
        write(Method::PATCH, VSC_PATH, content(json!({})), |b| {
            assert_eq!(
                b["metadata"]["annotations"]["snapshot.storage.kubernetes.io/volumesnapshot-being-created"],
                "yes"
            );
        }),
        write(Method::PATCH, VSC_STATUS, content(json!({})), |b| {
            let s = &b["status"];
            assert_eq!(s["snapshotHandle"], "snap-snapshot-abc");
            assert_eq!(s["readyToUse"], true);
            assert_eq!(s["restoreSize"], 1u64 << 30);
            assert_eq!(s["creationTime"], 1_700_000_000_000_000_005i64);
        }),
        write(Method::PATCH, VSC_PATH, content(json!({})), |b| {
            assert!(b["metadata"]["annotations"]["snapshot.storage.kubernetes.io/volumesnapshot-being-created"].is_null());
        }),
        // Deletion requested by the snapshot-controller.
        write(
            Method::PATCH,
            VSC_STATUS,
            content(json!({"metadata": {"resourceVersion": "31", "finalizers":
                ["snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection", "other"]}})),
            |b| {
                assert_eq!(
                    b,
                    &json!({"status": {"snapshotHandle": null, "readyToUse": false}})
                );
            },
        ),
        // ...and the content's finalizer goes, or the VolumeSnapshot hangs forever
        // (guarded by the version the status patch returned: no conflict).
        write(Method::PATCH, VSC_PATH, content(json!({})), |b| {
            assert_eq!(b["metadata"]["finalizers"], json!(["other"]), "{b}");
            assert_eq!(b["metadata"]["resourceVersion"], "31");
        }),
        // Retained, or a member of a group snapshot: the finalizer goes, the data stays.
        write(Method::PATCH, VSC_PATH, content(json!({})), |b| {
            assert_eq!(b["metadata"]["finalizers"], json!(["other"]), "{b}");
        }),
        write(Method::PATCH, VSC_PATH, content(json!({})), |b| {
            assert_eq!(b["metadata"]["finalizers"], json!(["other"]), "{b}");
        }),
    ]);
    let csi = Arc::new(FakeCsi::default());
    let c = ctx(client, csi.clone(), None);
    let action = snapshot::reconcile(content_of(&content(json!({}))), c.clone())
        .await
        .unwrap();
    assert_eq!(action, Action::await_change());
    let ready =
        content(json!({"status": {"snapshotHandle": "snap-snapshot-abc", "readyToUse": true}}));
    snapshot::reconcile(content_of(&ready), c.clone())
        .await
        .unwrap();
    let deleting = content(
        json!({"metadata": {"deletionTimestamp": "2026-11-22T00:00:00Z",
        "finalizers": ["snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection", "other"],
        "annotations": {"snapshot.storage.kubernetes.io/volumesnapshot-being-deleted": "yes"}},
        "status": {"snapshotHandle": "snap-snapshot-abc", "readyToUse": true}}),
    );
    snapshot::reconcile(content_of(&deleting), c.clone())
        .await
        .unwrap();
    let mut retained = deleting.clone();
    merge(&mut retained, json!({"spec": {"deletionPolicy": "Retain"}}));
    snapshot::reconcile(content_of(&retained), c.clone())
        .await
        .unwrap();
    let mut member = deleting.clone();
    merge(
        &mut member,
        json!({"status": {"volumeGroupSnapshotHandle": "group-1"}}),
    );
    snapshot::reconcile(content_of(&member), c.clone())
        .await
        .unwrap();
    // CreateSnapshot may still be running: wait.
    let mut creating = deleting.clone();
    merge(
        &mut creating,
        json!({"metadata": {"annotations": {"snapshot.storage.kubernetes.io/volumesnapshot-being-created": "yes"}}}),
    );
    snapshot::reconcile(content_of(&creating), c.clone())
        .await
        .unwrap();
    finish(c, server).await;
    assert_eq!(csi.snapshot_deletes.lock().unwrap().len(), 1);
    let req = csi.snapshots.lock().unwrap()[0].clone();
    assert_eq!(req.name, "snapshot-abc");
    assert_eq!(req.source_volume_id, "vol-1");
    assert_eq!(req.secrets["token"], "s3cr3t");
    assert_eq!(req.parameters["tier"], "cold");
    assert_eq!(
        req.parameters["csi.storage.k8s.io/volumesnapshot/name"],
        "nightly"
    );
    assert!(
        !req.parameters
            .contains_key("csi.storage.k8s.io/snapshotter-secret-name")
    );
    assert_eq!(
        csi.snapshot_deletes.lock().unwrap()[0].snapshot_id,
        "snap-snapshot-abc"
    );
}

#[tokio::test]
async fn a_node_snapshots_its_volume_even_before_its_pv_cache_has_synced() {
    use kube::runtime::{reflector, watcher};
    let snaps = json!({"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
        "metadata": {"name": "snaps"}, "driver": DRIVER, "deletionPolicy": "Delete"});
    let (client, server) = api(vec![
        csinode("n1"),
        node("n1"),
        get(
            "/apis/snapshot.storage.k8s.io/v1/volumesnapshotclasses/snaps",
            snaps,
        ),
        write(Method::PATCH, VSC_PATH, content(json!({})), |_| {}),
        write(Method::PATCH, VSC_STATUS, content(json!({})), |b| {
            assert_eq!(b["status"]["readyToUse"], true);
        }),
        write(Method::PATCH, VSC_PATH, content(json!({})), |_| {}),
    ]);
    let csi = Arc::new(FakeCsi::default());
    let dyn_csi: Arc<dyn Csi> = csi.clone();
    let mut c = Ctx::new(
        client,
        dyn_csi,
        DRIVER.into(),
        Some("n1".into()),
        "rcsi-system".into(),
    );
    let (store, mut writer) = reflector::store::<PersistentVolume>();
    c.pvs = Some(store);
    let c = Arc::new(c);
    // The PV watch lists its first page only after the content arrives.
    let pv: PersistentVolume = serde_json::from_value(volume(json!({}))).unwrap();
    let sync = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(pv));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        writer
    });
    snapshot::reconcile(content_of(&content(json!({}))), c.clone())
        .await
        .unwrap();
    drop(sync.await.unwrap());
    finish(c, server).await;
    assert_eq!(csi.calls(), vec!["CreateSnapshot"]);
}

#[tokio::test]
async fn snapshots_start_once_the_crds_are_installed_later() {
    let list = "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents?&limit=1";
    let (client, server) = api(vec![
        missing(Method::GET, list),
        missing(Method::GET, list),
        get(
            list,
            json!({"apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshotContentList", "metadata": {}, "items": []}),
        ),
    ]);
    let contents: kube::Api<Content> = kube::Api::all_with(client, &snapshot::content_resource());
    tokio::time::timeout(
        Duration::from_secs(5),
        snapshot::wait_for_api(&contents, Duration::from_millis(10)),
    )
    .await
    .expect("still waiting after the API appeared");
    drop(contents);
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn pre_provisioned_snapshots_are_imported_by_the_node_that_has_them() {
    let imported =
        content(json!({"spec": {"source": {"volumeHandle": null, "snapshotHandle": "snap-9"}}}));
    let unknown =
        content(json!({"spec": {"source": {"volumeHandle": null, "snapshotHandle": "snap-x"}}}));
    let (client, server) = api(vec![
        csinode("n1"),
        node("n1"),
        write(Method::PATCH, VSC_STATUS, content(json!({})), |b| {
            assert_eq!(b["status"]["snapshotHandle"], "snap-9");
            assert_eq!(b["status"]["restoreSize"], 4096);
        }),
    ]);
    let csi = Arc::new(FakeCsi {
        known_snapshots: vec!["snap-9".into()],
        ..Default::default()
    });
    let c = ctx(client, csi.clone(), Some("n1"));
    snapshot::reconcile(content_of(&imported), c.clone())
        .await
        .unwrap();
    snapshot::reconcile(content_of(&unknown), c.clone())
        .await
        .unwrap();
    // A dynamic snapshot of a volume that is not on n1 (no such PV known here).
    snapshot::reconcile(content_of(&content(json!({}))), c.clone())
        .await
        .unwrap();
    finish(c, server).await;
    assert_eq!(csi.calls(), vec!["ListSnapshots", "ListSnapshots"]);
}

#[tokio::test]
async fn claims_restore_from_snapshots_and_clone_claims() {
    let from_snap = claim(
        json!({"metadata": {"finalizers": ["provisioner.rcsi.io/provisioning"]},
        "spec": {"dataSourceRef": {"apiGroup": "snapshot.storage.k8s.io",
        "kind": "VolumeSnapshot", "name": "nightly"}}}),
    );
    let too_small = claim(
        json!({"spec": {"resources": {"requests": {"storage": "1Mi"}},
        "dataSource": {"kind": "PersistentVolumeClaim", "name": "src"}}}),
    );
    let (client, server) = api(vec![
        get(SC_PATH, class(json!({}))),
        missing(Method::GET, PV_PATH),
        get(
            "/apis/snapshot.storage.k8s.io/v1/namespaces/apps/volumesnapshots/nightly",
            json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": "nightly", "namespace": "apps"},
            "status": {"readyToUse": true, "boundVolumeSnapshotContentName": "snapcontent-1"}}),
        ),
        get(
            "/apis/snapshot.storage.k8s.io/v1/volumesnapshotcontents/snapcontent-1",
            content(
                json!({"status": {"snapshotHandle": "snap-7", "restoreSize": 1024, "readyToUse": true}}),
            ),
        ),
        event("apps", "Provisioning"),
        handle_recorded(from_snap.clone()),
        echo(Method::POST, "/api/v1/persistentvolumes?", |_| {}),
        write(Method::PATCH, PVC_PATH, claim(json!({})), |_| {}),
        event("apps", "ProvisioningSucceeded"),
        // Clone source bigger than the request: refused before anything is created.
        get(SC_PATH, class(json!({}))),
        missing(Method::GET, PV_PATH),
        get(
            "/api/v1/namespaces/apps/persistentvolumeclaims/src",
            bound("1Gi", json!({"metadata": {"name": "src"}})),
        ),
        get(PV_PATH, volume(json!({}))),
        event("apps", "ProvisioningFailed"),
    ]);
    let csi = Arc::new(FakeCsi::default());
    let c = ctx(client, csi.clone(), None);
    provision::reconcile(pvc_of(&from_snap), c.clone())
        .await
        .unwrap();
    let err = provision::reconcile(pvc_of(&too_small), c.clone())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("less than its source claim"),
        "{err}"
    );
    finish(c, server).await;
    use csi_core::csi::volume_content_source::Type;
    let req = csi.creates.lock().unwrap()[0].clone();
    match req.volume_content_source.and_then(|s| s.r#type) {
        Some(Type::Snapshot(s)) => assert_eq!(s.snapshot_id, "snap-7"),
        other => panic!("expected a snapshot source, got {other:?}"),
    }
    assert_eq!(csi.calls(), vec!["CreateVolume"]);
}

#[tokio::test]
async fn capacity_is_published_per_class_and_stale_objects_are_removed() {
    let ns = "/apis/storage.k8s.io/v1/namespaces/rcsi-system/csistoragecapacities";
    let name = capacity::object_name(DRIVER, "n1", "fast");
    let (client, server) = api(vec![
        get(
            "/api/v1/namespaces/rcsi-system/pods/rcsi-node-x7k2p",
            json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "rcsi-node-x7k2p", "namespace": "rcsi-system", "uid": "p-1",
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                    "name": "rcsi-node", "uid": "ds-1", "controller": true,
                    "blockOwnerDeletion": true}]}}),
        ),
        csinode("n1"),
        node("n1"),
        get(
            "/apis/storage.k8s.io/v1/storageclasses?",
            json!({"apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClassList", "metadata": {},
            "items": [class(json!({})), class(json!({"metadata": {"name": "nfs"}, "provisioner": "nfs.rcsi.io"}))]}),
        ),
        echo(
            Method::PATCH,
            &format!("{ns}/{name}?&force=true&fieldManager=rcsi-provisioner"),
            |b| {
                assert_eq!(b["storageClassName"], "fast");
                assert_eq!(b["capacity"], "10Gi");
                assert_eq!(b["maximumVolumeSize"], "10Gi");
                assert_eq!(b["nodeTopology"]["matchLabels"][TOPO], "n1");
                assert_eq!(
                    b["metadata"]["labels"]["csi.storage.k8s.io/drivername"],
                    DRIVER
                );
                // Owned by the DaemonSet: deleting it deletes the objects.
                assert_eq!(
                    b["metadata"]["ownerReferences"],
                    json!([{"apiVersion": "apps/v1", "kind": "DaemonSet",
                        "name": "rcsi-node", "uid": "ds-1"}])
                );
            },
        ),
        get(
            &format!(
                "{ns}?&labelSelector=csi.storage.k8s.io%2Fdrivername%3Dlocal.rcsi.io%2Ccsi.storage.k8s.io%2Fmanaged-by%3Drcsi-n1"
            ),
            json!({"apiVersion": "storage.k8s.io/v1", "kind": "CSIStorageCapacityList", "metadata": {},
                "items": [
                    {"metadata": {"name": name, "namespace": "rcsi-system"}, "storageClassName": "fast"},
                    {"metadata": {"name": "rcsi-old", "namespace": "rcsi-system"}, "storageClassName": "gone"}]}),
        ),
        step(
            Method::DELETE,
            &format!("{ns}/rcsi-old?"),
            200,
            Reply::Json(json!({"kind": "Status",
            "apiVersion": "v1", "status": "Success"})),
        ),
    ]);
    let csi = Arc::new(FakeCsi {
        capacity: 10 << 30,
        ..Default::default()
    });
    let dyn_csi: Arc<dyn Csi> = csi.clone();
    let mut c = Ctx::new(
        client.clone(),
        dyn_csi,
        DRIVER.into(),
        Some("n1".into()),
        "rcsi-system".into(),
    );
    c.capacity_owner = Some(
        capacity::owner(client, "rcsi-system", "rcsi-node-x7k2p")
            .await
            .unwrap(),
    );
    let c = Arc::new(c);
    assert_eq!(capacity::publish(&c).await.unwrap(), 1);
    finish(c, server).await;
    assert_eq!(csi.calls(), vec!["GetCapacity"]);
}

#[tokio::test]
async fn claims_of_other_drivers_and_missing_classes() {
    let (client, server) = api(vec![
        get(SC_PATH, class(json!({"provisioner": "nfs.rcsi.io"}))),
        missing(Method::GET, SC_PATH),
    ]);
    let csi = Arc::new(FakeCsi::default());
    let c = ctx(client, csi.clone(), None);
    let pvc = pvc_of(&claim(json!({})));
    assert_eq!(
        provision::reconcile(pvc.clone(), c.clone()).await.unwrap(),
        Action::await_change()
    );
    // A class that does not exist yet is retried, with backoff.
    let err = provision::reconcile(pvc, c.clone()).await.unwrap_err();
    assert!(
        err.to_string().contains("StorageClass fast does not exist"),
        "{err}"
    );
    finish(c, server).await;
    assert!(csi.calls().is_empty());
}

#[tokio::test]
async fn a_restart_after_the_pv_was_created_calls_nothing_twice() {
    let mid = claim(json!({"metadata": {"finalizers": ["provisioner.rcsi.io/provisioning"]}}));
    let bound_mid = bound(
        "1Gi",
        json!({"metadata": {"finalizers": ["provisioner.rcsi.io/provisioning"]}}),
    );
    let (client, server) = api(vec![
        get(SC_PATH, class(json!({}))),
        get(PV_PATH, volume(json!({}))),
        // Once bound, the provisioning finalizer goes.
        write(
            Method::PATCH,
            PVC_PATH,
            claim(json!({})),
            finalizer_patch(false, "10"),
        ),
    ]);
    let csi = Arc::new(FakeCsi::default());
    let c = ctx(client, csi.clone(), None);
    provision::reconcile(pvc_of(&mid), c.clone()).await.unwrap();
    provision::reconcile(pvc_of(&bound_mid), c.clone())
        .await
        .unwrap();
    finish(c, server).await;
    assert!(csi.calls().is_empty());
}

#[tokio::test]
async fn metrics_and_health_are_served() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let metrics = Arc::new(rcsi_provisioner::metrics::Metrics::default());
    metrics.record("volume", true, Duration::from_millis(3));
    let csi: Arc<dyn Csi> = Arc::new(FakeCsi::default());
    rcsi_provisioner::metrics::serve(addr, metrics, csi)
        .await
        .unwrap();
    let get = |path: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let m = get("/metrics").await;
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(
        m.contains(r#"rcsi_provisioner_reconciles_total{controller="volume",result="ok"} 1"#),
        "{m}"
    );
    assert!(
        m.contains("rcsi_provisioner_reconcile_duration_seconds_bucket"),
        "{m}"
    );
    let h = get("/healthz").await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
}
