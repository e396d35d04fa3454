//! A scripted Kubernetes API server (tower-test) and a scripted CSI driver.

#![allow(dead_code, missing_docs)]

use async_trait::async_trait;
use csi_core::csi;
use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use rcsi_provisioner::csi::Csi;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Mutex;
use tonic::{Code, Status};

/// Asserts on a request body.
pub type Check = Box<dyn Fn(&Value) + Send>;

/// One expected API request and the answer to give.
pub struct Step {
    pub method: Method,
    pub path: String,
    pub status: u16,
    pub reply: Reply,
    pub check: Option<Check>,
}

/// How to answer a request.
pub enum Reply {
    Json(Value),
    /// Echo the request body back (creates and patches of objects we do not model).
    Echo,
}

pub fn step(method: Method, path: &str, status: u16, reply: Reply) -> Step {
    Step {
        method,
        path: path.to_owned(),
        status,
        reply,
        check: None,
    }
}

pub fn get(path: &str, obj: Value) -> Step {
    step(Method::GET, path, 200, Reply::Json(obj))
}

pub fn missing(method: Method, path: &str) -> Step {
    step(
        method,
        path,
        404,
        Reply::Json(
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "NotFound", "code": 404, "message": "not found"}),
        ),
    )
}

pub fn conflict(method: Method, path: &str) -> Step {
    step(
        method,
        path,
        409,
        Reply::Json(
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
        ),
    )
}

/// A request answered with `obj`, its body checked by `check` (a path ending in `*` is a prefix).
pub fn write(
    method: Method,
    path: &str,
    obj: Value,
    check: impl Fn(&Value) + Send + 'static,
) -> Step {
    Step {
        check: Some(Box::new(check)),
        ..step(method, path, 200, Reply::Json(obj))
    }
}

/// A POST or PATCH echoed back, its body checked by `check`.
pub fn echo(method: Method, path: &str, check: impl Fn(&Value) + Send + 'static) -> Step {
    Step {
        check: Some(Box::new(check)),
        ..step(method, path, 201, Reply::Echo)
    }
}

/// An event with `reason` recorded on an object in `ns`.
pub fn event(ns: &str, reason: &'static str) -> Step {
    echo(
        Method::POST,
        &format!("/apis/events.k8s.io/v1/namespaces/{ns}/events?"),
        move |b| assert_eq!(b["reason"], reason, "event {b}"),
    )
}

/// A repeated event with `reason`: the recorder patches its series count.
pub fn event_again(ns: &str, reason: &'static str) -> Step {
    echo(
        Method::PATCH,
        &format!("/apis/events.k8s.io/v1/namespaces/{ns}/events/*"),
        move |b| {
            assert!(
                b["series"]["count"].as_i64().unwrap() >= 2,
                "event {reason}: {b}"
            )
        },
    )
}

/// A client whose API server answers exactly `steps`, in order; the returned task
/// fails if a request differs or is missing, or if one more arrives.
pub fn api(steps: Vec<Step>) -> (Client, tokio::task::JoinHandle<()>) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let task = tokio::spawn(async move {
        for (i, s) in steps.into_iter().enumerate() {
            let Some((req, send)) = handle.next_request().await else {
                panic!(
                    "step {i}: expected {} {}, but no more requests came",
                    s.method, s.path
                );
            };
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default();
            let matches = match s.path.strip_suffix('*') {
                Some(prefix) => path.starts_with(prefix),
                None => path == s.path,
            };
            assert!(
                req.method() == s.method && matches,
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
            let reply = match s.reply {
                Reply::Json(v) => v,
                Reply::Echo => body,
            };
            let resp = Response::builder()
                .status(s.status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap();
            send.send_response(resp);
        }
        if let Some((req, _)) = handle.next_request().await {
            panic!("unexpected request {} {}", req.method(), req.uri());
        }
    });
    (Client::new(svc, "default"), task)
}

/// A CSI driver that records calls and answers plausibly, failing where told.
#[derive(Default)]
pub struct FakeCsi {
    pub calls: Mutex<Vec<String>>,
    pub creates: Mutex<Vec<csi::CreateVolumeRequest>>,
    pub deletes: Mutex<Vec<csi::DeleteVolumeRequest>>,
    pub expands: Mutex<Vec<csi::ControllerExpandVolumeRequest>>,
    pub snapshots: Mutex<Vec<csi::CreateSnapshotRequest>>,
    pub snapshot_deletes: Mutex<Vec<csi::DeleteSnapshotRequest>>,
    /// Next answer of a call by name: an error code (taken once).
    pub fail: Mutex<HashMap<&'static str, Code>>,
    /// ControllerExpandVolume says the node must grow the filesystem.
    pub node_expansion: bool,
    /// Snapshot ids ListSnapshots knows.
    pub known_snapshots: Vec<String>,
    pub capacity: i64,
}

impl FakeCsi {
    fn enter(&self, call: &'static str) -> Result<(), Status> {
        self.calls.lock().unwrap().push(call.to_owned());
        match self.fail.lock().unwrap().remove(call) {
            Some(code) => Err(Status::new(code, format!("{call} failed on purpose"))),
            None => Ok(()),
        }
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl Csi for FakeCsi {
    async fn driver_name(&self) -> Result<String, Status> {
        Ok("local.rcsi.io".into())
    }

    async fn probe(&self) -> Result<bool, Status> {
        Ok(true)
    }

    async fn create_volume(&self, req: csi::CreateVolumeRequest) -> Result<csi::Volume, Status> {
        self.creates.lock().unwrap().push(req.clone());
        self.enter("CreateVolume")?;
        let topology = req
            .accessibility_requirements
            .as_ref()
            .and_then(|r| r.preferred.first().cloned());
        Ok(csi::Volume {
            capacity_bytes: req.capacity_range.map(|c| c.required_bytes).unwrap_or(0),
            volume_id: format!("vol-{}", req.name),
            volume_context: [("backing".to_owned(), "directory".to_owned())].into(),
            content_source: req.volume_content_source,
            accessible_topology: topology.into_iter().collect(),
        })
    }

    async fn delete_volume(&self, req: csi::DeleteVolumeRequest) -> Result<(), Status> {
        self.deletes.lock().unwrap().push(req);
        self.enter("DeleteVolume")
    }

    async fn expand_volume(
        &self,
        req: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse, Status> {
        let bytes = req.capacity_range.map(|c| c.required_bytes).unwrap_or(0);
        self.expands.lock().unwrap().push(req);
        self.enter("ControllerExpandVolume")?;
        Ok(csi::ControllerExpandVolumeResponse {
            capacity_bytes: bytes,
            node_expansion_required: self.node_expansion,
        })
    }

    async fn create_snapshot(
        &self,
        req: csi::CreateSnapshotRequest,
    ) -> Result<csi::Snapshot, Status> {
        self.snapshots.lock().unwrap().push(req.clone());
        self.enter("CreateSnapshot")?;
        Ok(csi::Snapshot {
            size_bytes: 1 << 30,
            snapshot_id: format!("snap-{}", req.name),
            source_volume_id: req.source_volume_id,
            creation_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
            ready_to_use: true,
            group_snapshot_id: String::new(),
        })
    }

    async fn delete_snapshot(&self, req: csi::DeleteSnapshotRequest) -> Result<(), Status> {
        self.snapshot_deletes.lock().unwrap().push(req);
        self.enter("DeleteSnapshot")
    }

    async fn list_snapshots(
        &self,
        req: csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse, Status> {
        self.enter("ListSnapshots")?;
        let entries = self
            .known_snapshots
            .iter()
            .filter(|id| **id == req.snapshot_id)
            .map(|id| csi::list_snapshots_response::Entry {
                snapshot: Some(csi::Snapshot {
                    size_bytes: 4096,
                    snapshot_id: id.clone(),
                    source_volume_id: "vol-x".into(),
                    creation_time: None,
                    ready_to_use: true,
                    group_snapshot_id: String::new(),
                }),
            })
            .collect();
        Ok(csi::ListSnapshotsResponse {
            entries,
            next_token: String::new(),
        })
    }

    async fn get_capacity(
        &self,
        _req: csi::GetCapacityRequest,
    ) -> Result<csi::GetCapacityResponse, Status> {
        self.enter("GetCapacity")?;
        Ok(csi::GetCapacityResponse {
            available_capacity: self.capacity,
            maximum_volume_size: Some(self.capacity),
            minimum_volume_size: None,
        })
    }
}
