//! `rbench k8s` against a scripted API server (tower-test): the exact
//! requests of a run (preflight, Secret, claims, pods, their status listed
//! then watched,
//! deletion of pods, claims and Secret, PVs gone), of a run that fails
//! midway (cleaned up all the same) and of one refused before anything is
//! made. The services are real `rbench --service` processes on loopback,
//! reached through a tunnel that stands in for the port-forward.

use http::{Method, Request, Response};
use kube::client::Body;
use rbench::k8s::tunnel::{Opening, Stream, Tunnel};
use rbench::k8s::{K8sArgs, run};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Check = Box<dyn Fn(&Value) + Send>;

/// One expected request: method, path pattern (`*` matches any run of
/// characters), status and answer (None: echo the body).
struct Step {
    method: Method,
    path: String,
    status: u16,
    reply: Option<Value>,
    check: Option<Check>,
    /// A watch's answer: one JSON event per line.
    events: Option<Vec<Value>>,
}

fn step(method: Method, path: &str, status: u16, reply: Option<Value>) -> Step {
    Step {
        method,
        path: path.into(),
        status,
        reply,
        check: None,
        events: None,
    }
}

/// A watch (from resource version `rv`) answered with `events`, then ended by the server.
fn watch(what: &str, rv: &str, events: Vec<Value>) -> Step {
    Step {
        events: Some(events),
        ..step(
            Method::GET,
            &format!("{NS}/{what}?*watch=true*resourceVersion={rv}*"),
            200,
            None,
        )
    }
}

fn event(kind: &str, object: Value) -> Value {
    json!({"type": kind, "object": object})
}

fn echo(method: Method, path: &str, check: impl Fn(&Value) + Send + 'static) -> Step {
    Step {
        check: Some(Box::new(check)),
        ..step(method, path, 201, None)
    }
}

fn not_found(method: Method, path: &str) -> Step {
    step(
        method,
        path,
        404,
        Some(
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                    "reason": "NotFound", "code": 404, "message": "not found"}),
        ),
    )
}

/// Whether `text` matches `pattern`, where `*` stands for any characters.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let mut rest = text;
    for (i, p) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(p) else {
                return false;
            };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(p);
        } else {
            let Some(at) = rest.find(p) else { return false };
            rest = &rest[at + p.len()..];
        }
    }
    rest.is_empty()
}

/// A client whose API server answers exactly `steps`, in order.
fn api(steps: Vec<Step>) -> (kube::Client, tokio::task::JoinHandle<()>) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let task = tokio::spawn(async move {
        for (i, s) in steps.into_iter().enumerate() {
            let Some((req, send)) = handle.next_request().await else {
                panic!(
                    "step {i}: expected {} {}, no request came",
                    s.method, s.path
                );
            };
            let path = req.uri().path_and_query().unwrap().to_string();
            assert!(
                req.method() == s.method && glob(&s.path, &path),
                "step {i}: expected {} {}, got {} {path}",
                s.method,
                s.path,
                req.method()
            );
            let bytes = req.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            if let Some(check) = &s.check {
                check(&body);
            }
            let bytes = match s.events {
                Some(events) => events
                    .iter()
                    .flat_map(|e| [serde_json::to_vec(e).unwrap(), b"\n".to_vec()])
                    .flatten()
                    .collect(),
                None => serde_json::to_vec(&s.reply.unwrap_or(body)).unwrap(),
            };
            send.send_response(
                Response::builder()
                    .status(s.status)
                    .header("content-type", "application/json")
                    .body(Body::from(bytes))
                    .unwrap(),
            );
        }
        if let Some((req, _)) = handle.next_request().await {
            panic!("unexpected request {} {}", req.method(), req.uri());
        }
    });
    (kube::Client::new(svc, "default"), task)
}

/// Real services standing in for the pods: started on first use with the
/// secret the run put in its Secret, each on its own loopback port.
struct Services {
    secret: Arc<Mutex<Option<String>>>,
    root: std::path::PathBuf,
    running: Mutex<HashMap<String, (Child, u16)>>,
}

impl Drop for Services {
    fn drop(&mut self) {
        for (_, (mut c, _)) in self.running.lock().unwrap().drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Services {
    fn port_of(&self, pod: &str) -> u16 {
        let mut running = self.running.lock().unwrap();
        if let Some((_, port)) = running.get(pod) {
            return *port;
        }
        let secret = self.secret.lock().unwrap().clone().expect("no Secret yet");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_rbench"))
            .args(["--service", "--port", &port.to_string()])
            .arg(&self.root)
            .env("RBENCH_SECRET", secret)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        running.insert(pod.to_owned(), (child, port));
        port
    }
}

struct Loopback(Arc<Services>);

impl Tunnel for Loopback {
    fn open(&self, ns: &str, pod: &str, port: u16) -> Opening {
        assert_eq!((ns, port), ("bench", 1611), "tunnel to {pod}");
        let local = self.0.port_of(pod);
        Box::pin(async move {
            let start = Instant::now();
            loop {
                match tokio::net::TcpStream::connect(("127.0.0.1", local)).await {
                    Ok(s) => return Ok(Box::new(s) as Box<dyn Stream>),
                    Err(e) if start.elapsed() > Duration::from_secs(10) => return Err(e),
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        })
    }
}

/// Two RWX claims of class fast in namespace bench.
const TWO_RWX: &[&str] = &[
    "--storageclass",
    "fast",
    "--pvcs",
    "2",
    "--size",
    "1Gi",
    "--access-mode",
    "RWX",
    "--namespace",
    "bench",
];

fn args_with(common: &[&str], extra: &[&str]) -> K8sArgs {
    args(&[common, extra].concat())
}

fn args(extra: &[&str]) -> K8sArgs {
    use clap::Parser;
    let mut argv = vec!["rbench k8s"];
    argv.extend_from_slice(extra);
    K8sArgs::try_parse_from(argv).unwrap()
}

const NS: &str = "/api/v1/namespaces/bench";

fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": items})
}

fn list_at(rv: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv}, "items": items})
}

/// The preflight of a run in namespace bench measuring StorageClass fast.
fn preflight() -> Vec<Step> {
    vec![
        step(
            Method::GET,
            "/apis/storage.k8s.io/v1/storageclasses/fast",
            200,
            Some(
                json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                        "metadata": {"name": "fast"}, "provisioner": "local.rcsi.io"}),
            ),
        ),
        step(
            Method::GET,
            "/api/v1/nodes?",
            200,
            Some(list(vec![json!({"metadata": {"name": "n1"},
                "status": {"conditions": [{"type": "Ready", "status": "True"}]}})])),
        ),
        step(
            Method::GET,
            NS,
            200,
            Some(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}})),
        ),
    ]
}

/// The Secret, its value handed to the services.
fn secret_step(slot: &Arc<Mutex<Option<String>>>) -> Step {
    let slot = slot.clone();
    echo(Method::POST, &format!("{NS}/secrets?"), move |b| {
        let s = b["stringData"]["secret"].as_str().unwrap();
        assert_eq!(s.len(), 64, "a 64-digit secret");
        *slot.lock().unwrap() = Some(s.to_owned());
    })
}

fn claim_step(i: usize) -> Step {
    echo(
        Method::POST,
        &format!("{NS}/persistentvolumeclaims?"),
        move |b| {
            assert_eq!(b["metadata"]["name"], format!("rbench-{i}"));
            assert_eq!(b["spec"]["storageClassName"], "fast");
            assert_eq!(b["spec"]["accessModes"][0], "ReadWriteMany");
            assert_eq!(b["spec"]["resources"]["requests"]["storage"], "1Gi");
        },
    )
}

fn pod_step(i: usize, root: String) -> Step {
    echo(Method::POST, &format!("{NS}/pods?"), move |b| {
        assert_eq!(b["metadata"]["name"], format!("rbench-{i}"));
        let c = &b["spec"]["containers"][0];
        assert_eq!(c["volumeMounts"][0]["mountPath"], root.as_str());
        assert_eq!(
            b["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
            format!("rbench-{i}")
        );
    })
}

fn claim(i: usize, phase: &str) -> Value {
    json!({"metadata": {"name": format!("rbench-{i}")},
           "spec": {"volumeName": format!("pv-{i}")}, "status": {"phase": phase}})
}

fn pod(i: usize, phase: &str) -> Value {
    json!({"metadata": {"name": format!("rbench-{i}")},
           "spec": {"nodeName": "n1", "containers": [{"name": "rbench"}]},
           "status": {"phase": phase}})
}

/// Deleting pod `i`.
fn delete_pod(i: usize) -> Step {
    step(
        Method::DELETE,
        &format!("{NS}/pods/rbench-{i}?"),
        200,
        Some(pod(i, "Running")),
    )
}

/// Reading and deleting claim `i`.
fn delete_claim(i: usize) -> Vec<Step> {
    vec![
        step(
            Method::GET,
            &format!("{NS}/persistentvolumeclaims/rbench-{i}"),
            200,
            Some(claim(i, "Bound")),
        ),
        step(
            Method::DELETE,
            &format!("{NS}/persistentvolumeclaims/rbench-{i}?"),
            200,
            Some(claim(i, "Bound")),
        ),
    ]
}

/// Removing two pods and claims (both Bound) of the run that `selector` selects.
fn remove_two(selector: &str) -> Vec<Step> {
    let mut steps = vec![delete_pod(0), delete_pod(1)];
    steps.push(step(
        Method::GET,
        &format!("{NS}/pods?*{selector}"),
        200,
        Some(list(vec![])),
    ));
    steps.extend(delete_claim(0));
    steps.extend(delete_claim(1));
    steps.extend(volumes_gone_and_secret());
    steps
}

/// The end of every run: both PVs gone, then the Secret deleted.
fn volumes_gone_and_secret() -> Vec<Step> {
    vec![
        not_found(Method::GET, "/api/v1/persistentvolumes/pv-0"),
        not_found(Method::GET, "/api/v1/persistentvolumes/pv-1"),
        step(
            Method::DELETE,
            &format!("{NS}/secrets/rbench-*"),
            200,
            Some(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_makes_measures_and_removes_everything_in_order() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().display().to_string();
    let slot = Arc::new(Mutex::new(None));
    let mut steps = preflight();
    steps.push(secret_step(&slot));
    steps.extend([claim_step(0), claim_step(1)]);
    steps.extend([pod_step(0, root.clone()), pod_step(1, root.clone())]);
    // Status: one claim pending and no pod running yet; then watches from
    // those versions. The first pair ends before all is ready (the server's
    // timeout) and is watched again from the last version seen.
    let selector = "labelSelector=rbench.rcsi.io%2Frun%3D*-0";
    steps.push(step(
        Method::GET,
        &format!("{NS}/persistentvolumeclaims?*{selector}"),
        200,
        Some(list_at("10", vec![claim(0, "Bound"), claim(1, "Pending")])),
    ));
    steps.push(step(
        Method::GET,
        &format!("{NS}/pods?*{selector}"),
        200,
        Some(list_at("11", vec![pod(0, "Pending"), pod(1, "Pending")])),
    ));
    let at = |mut v: Value, rv: &str| {
        v["metadata"]["resourceVersion"] = rv.into();
        v
    };
    steps.push(watch(
        "persistentvolumeclaims",
        "10",
        vec![event("MODIFIED", at(claim(1, "Bound"), "12"))],
    ));
    steps.push(watch(
        "pods",
        "11",
        vec![event("MODIFIED", at(pod(0, "Running"), "13"))],
    ));
    steps.push(watch("persistentvolumeclaims", "12", vec![]));
    steps.push(watch(
        "pods",
        "13",
        vec![event("MODIFIED", at(pod(1, "Running"), "14"))],
    ));
    // The workload runs through the tunnel; then everything goes.
    steps.extend(remove_two(selector));
    let (client, script) = api(steps);
    let services = Arc::new(Services {
        secret: slot,
        root: d.path().to_owned(),
        running: Mutex::default(),
    });
    let json_out = d.path().join("r.json");
    let a = args_with(
        TWO_RWX,
        &[
            "--mount-path",
            &root,
            "--timeout",
            "30",
            "--json",
            json_out.to_str().unwrap(),
            "--",
            "-w",
            "-r",
            "-t",
            "1",
            "-n",
            "1",
            "-N",
            "4",
            "-s",
            "64k",
            "-b",
            "16k",
        ],
    );
    run(client, Arc::new(Loopback(services.clone())), a)
        .await
        .unwrap();
    script.await.unwrap();
    assert_eq!(
        services.running.lock().unwrap().len(),
        2,
        "one service per pod"
    );
    let doc: Value = serde_json::from_slice(&std::fs::read(&json_out).unwrap()).unwrap();
    let run = &doc["storageclasses"][0];
    assert_eq!(run["storage_class"], "fast");
    let volumes = run["volumes"].as_array().unwrap();
    assert_eq!(volumes.len(), 2);
    for v in volumes {
        for k in ["bound_s", "running_s", "answering_s", "deleted_s"] {
            assert!(v[k].as_f64().is_some(), "{k} of {v}");
        }
        assert!(v["running_s"].as_f64() <= v["answering_s"].as_f64(), "{v}");
        assert_eq!(v["node"], "n1");
    }
    let phases: Vec<&str> = run["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["WRITE", "READ"]);
    for r in run["results"].as_array().unwrap() {
        assert_eq!(r["hosts"].as_array().unwrap().len(), 2, "per-pod results");
        assert_eq!(r["last"]["bytes"], 2 * 4 * 64 * 1024, "{r}");
        assert_eq!(r["label"], "fast");
    }
}

/// Runs two RWX claims of class fast in namespace bench against `steps`,
/// which must end the run with an error; returns it.
async fn failing_run(steps: Vec<Step>, slot: Arc<Mutex<Option<String>>>) -> String {
    let (client, script) = api(steps);
    let services = Arc::new(Services {
        secret: slot,
        root: "/nonexistent".into(),
        running: Mutex::default(),
    });
    let a = args_with(TWO_RWX, &["--", "-w", "-s", "1m"]);
    let e = run(client, Arc::new(Loopback(services)), a)
        .await
        .unwrap_err()
        .to_string();
    script.await.unwrap();
    e
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_pod_still_removes_what_was_made() {
    let slot = Arc::new(Mutex::new(None));
    let mut steps = preflight();
    steps.push(secret_step(&slot));
    steps.extend([claim_step(0), claim_step(1)]);
    steps.push(pod_step(0, "/data".into()));
    steps.push(step(
        Method::POST,
        &format!("{NS}/pods?"),
        403,
        Some(json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
            "code": 403, "message": "pods \"rbench-1\" is forbidden: exceeded quota: q, requested: pods=1, used: pods=1, limited: pods=1"})),
    ));
    steps.push(delete_pod(0));
    steps.push(step(
        Method::GET,
        &format!("{NS}/pods?*labelSelector=*"),
        200,
        Some(list(vec![])),
    ));
    for i in 0..2 {
        steps.push(step(
            Method::GET,
            &format!("{NS}/persistentvolumeclaims/rbench-{i}"),
            200,
            Some(claim(i, "Pending")),
        ));
        steps.push(step(
            Method::DELETE,
            &format!("{NS}/persistentvolumeclaims/rbench-{i}?"),
            200,
            Some(claim(i, "Pending")),
        ));
    }
    steps.extend(volumes_gone_and_secret());
    let e = failing_run(steps, slot).await;
    assert!(e.contains("ResourceQuota") && e.contains("rbench-1"), "{e}");
}

#[tokio::test]
async fn an_unknown_storageclass_is_refused_before_anything_is_made() {
    let (client, script) = api(vec![
        not_found(Method::GET, "/apis/storage.k8s.io/v1/storageclasses/nope"),
        step(
            Method::GET,
            "/apis/storage.k8s.io/v1/storageclasses?",
            200,
            Some(list(vec![
                json!({"metadata": {"name": "fast"}, "provisioner": "x"}),
                json!({"metadata": {"name": "slow"}, "provisioner": "y"}),
            ])),
        ),
    ]);
    let services = Arc::new(Services {
        secret: Arc::default(),
        root: "/nonexistent".into(),
        running: Mutex::default(),
    });
    let e = run(
        client,
        Arc::new(Loopback(services)),
        args(&["--storageclass", "nope", "--", "-w", "-s", "1m"]),
    )
    .await
    .unwrap_err();
    script.await.unwrap();
    assert!(matches!(e, rbench::error::BenchError::Usage(_)), "{e}");
    let e = e.to_string();
    assert!(e.contains("\"nope\"") && e.contains("fast, slow"), "{e}");
    // A workload naming a path, nothing to do or a local file, is refused without a request.
    let (client, script) = api(vec![]);
    for w in [
        &["-w", "-s", "1m", "/mnt"][..],
        &["-s", "1m"][..],
        &["-w", "-s", "1m", "--resfile", "r.txt"][..],
    ] {
        let mut a = vec!["--storageclass", "fast", "--"];
        a.extend_from_slice(w);
        let e = run(
            client.clone(),
            Arc::new(Loopback(Arc::new(Services {
                secret: Arc::default(),
                root: "/nonexistent".into(),
                running: Mutex::default(),
            }))),
            args(&a),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, rbench::error::BenchError::Usage(_)), "{e}");
    }
    drop(client);
    script.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_watch_lists_again_and_a_bad_image_is_said_and_cleaned_up() {
    let slot = Arc::new(Mutex::new(None));
    let mut steps = preflight();
    steps.push(secret_step(&slot));
    steps.extend([claim_step(0), claim_step(1)]);
    steps.extend([pod_step(0, "/data".into()), pod_step(1, "/data".into())]);
    let selector = "labelSelector=rbench.rcsi.io%2Frun%3D*-0";
    let lists = |pods: Vec<Value>| {
        [
            step(
                Method::GET,
                &format!("{NS}/persistentvolumeclaims?*{selector}"),
                200,
                Some(list_at(
                    "10",
                    vec![claim(0, "Pending"), claim(1, "Pending")],
                )),
            ),
            step(
                Method::GET,
                &format!("{NS}/pods?*{selector}"),
                200,
                Some(list_at("11", pods)),
            ),
        ]
    };
    steps.extend(lists(vec![pod(0, "Pending"), pod(1, "Pending")]));
    // The version is too old by the time the watch starts: 410 Gone.
    steps.push(watch(
        "persistentvolumeclaims",
        "10",
        vec![json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
            "status": "Failure", "reason": "Expired", "code": 410, "message": "too old resource version"}})],
    ));
    steps.push(watch("pods", "11", vec![]));
    let mut bad = pod(1, "Pending");
    bad["status"]["containerStatuses"] = json!([{"name": "rbench", "image": "nope:1",
        "imageID": "", "ready": false, "restartCount": 0,
        "state": {"waiting": {"reason": "ErrImagePull", "message": "pull access denied"}}}]);
    steps.extend(lists(vec![pod(0, "Pending"), bad]));
    steps.extend(remove_two(selector));
    let e = failing_run(steps, slot).await;
    assert!(
        e.contains("pod rbench-1: ErrImagePull: pull access denied (--image nope:1)"),
        "{e}"
    );
}
