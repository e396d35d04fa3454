//! `rcsi provisioner`: Kubernetes controllers that turn PVCs, PV releases, PVC size
//! increases and VolumeSnapshotContents into CSI calls on one rcsi driver.
//!
//! It does the jobs of csi-provisioner, csi-resizer and csi-snapshotter. In
//! node-deployment mode one instance runs next to each node plugin and handles only
//! the volumes of its node, publishing that node's CSIStorageCapacity.

pub mod capacity;
pub mod csi;
pub mod delete;
pub mod error;
pub mod metrics;
pub mod params;
pub mod provision;
pub mod resize;
pub mod run;
pub mod snapshot;

pub use error::{Error, Result};

use crate::csi::Csi;
use k8s_openapi::api::core::v1::{Node, ObjectReference, PersistentVolume};
use k8s_openapi::api::storage::v1::CSINode;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::{Api, Client};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::warn;

/// Name this provisioner uses as field manager and event reporter.
pub const MANAGER: &str = "rcsi-provisioner";
/// PV finalizer: the volume is deleted from the backend before the PV goes away.
/// Same name as csi-provisioner's, so the two can hand PVs over to each other.
pub const PV_FINALIZER: &str = "external-provisioner.volume.kubernetes.io/finalizer";
/// PVC finalizer held between CreateVolume and the PV's creation, so no volume leaks
/// when a claim is deleted mid-provisioning.
pub const PVC_FINALIZER: &str = "provisioner.rcsi.io/provisioning";
/// PVC annotation holding the volume id between CreateVolume and the PV's creation.
pub const ANN_VOLUME_HANDLE: &str = "provisioner.rcsi.io/volume-handle";
/// PV annotation naming the provisioner.
pub const ANN_PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// PVC annotation set by the scheduler for WaitForFirstConsumer claims.
pub const ANN_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// PV annotations that remember the DeleteVolume secret.
pub const ANN_DELETE_SECRET_NAME: &str = "volume.kubernetes.io/provisioner-deletion-secret-name";
/// See [`ANN_DELETE_SECRET_NAME`].
pub const ANN_DELETE_SECRET_NAMESPACE: &str =
    "volume.kubernetes.io/provisioner-deletion-secret-namespace";

/// What one node-deployment instance knows about its node.
#[derive(Clone, Debug)]
pub struct NodeView {
    /// The node's labels.
    pub labels: BTreeMap<String, String>,
    /// The driver's topology segment on this node (from CSINode topology keys).
    pub segment: BTreeMap<String, String>,
}

/// Shared state of every controller.
pub struct Ctx {
    /// Kubernetes client.
    pub client: Client,
    /// The driver.
    pub csi: Arc<dyn Csi>,
    /// The driver's name, which StorageClasses name as provisioner.
    pub driver: String,
    /// Node-deployment mode: the node this instance serves.
    pub node: Option<String>,
    /// Namespace for CSIStorageCapacity objects and the leader lease.
    pub namespace: String,
    /// Metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// Known PVs, for finding a snapshot's source volume.
    pub pvs: Option<Store<PersistentVolume>>,
    /// Owner of the CSIStorageCapacity objects this instance writes.
    pub capacity_owner: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>,
    /// Poked after a volume is created or deleted, so capacity is republished.
    pub capacity_changed: tokio::sync::Notify,
    recorder: Recorder,
    node_view: tokio::sync::Mutex<Option<NodeView>>,
    failures: Mutex<HashMap<String, u32>>,
}

impl Ctx {
    /// Context for `driver`, optionally limited to node `node`.
    pub fn new(
        client: Client,
        csi: Arc<dyn Csi>,
        driver: String,
        node: Option<String>,
        namespace: String,
    ) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: node.clone(),
            },
        );
        Self {
            client,
            csi,
            driver,
            node,
            namespace,
            metrics: Arc::default(),
            pvs: None,
            capacity_owner: None,
            capacity_changed: tokio::sync::Notify::new(),
            recorder,
            node_view: tokio::sync::Mutex::new(None),
            failures: Mutex::default(),
        }
    }

    /// This node's labels and topology segment (node-deployment mode). Cached once the
    /// kubelet has registered the driver and labelled the node.
    pub async fn node_view(&self) -> Result<Option<NodeView>> {
        let Some(node) = &self.node else {
            return Ok(None);
        };
        let mut cached = self.node_view.lock().await;
        if let Some(v) = cached.as_ref() {
            return Ok(Some(v.clone()));
        }
        let v = self.topology_of(node).await?;
        *cached = Some(v.clone());
        Ok(Some(v))
    }

    /// The labels and driver topology segment of node `name`.
    pub async fn topology_of(&self, name: &str) -> Result<NodeView> {
        let csinode = Api::<CSINode>::all(self.client.clone())
            .get_opt(name)
            .await?
            .ok_or_else(|| Error::Waiting(format!("node {name} has no CSINode object yet")))?;
        let keys = csinode
            .spec
            .drivers
            .iter()
            .find(|d| d.name == self.driver)
            .ok_or_else(|| {
                Error::Waiting(format!(
                    "driver {} is not registered on node {name} yet",
                    self.driver
                ))
            })?
            .topology_keys
            .clone()
            .unwrap_or_default();
        let node = Api::<Node>::all(self.client.clone())
            .get_opt(name)
            .await?
            .ok_or_else(|| Error::Waiting(format!("node {name} does not exist")))?;
        let labels = node.metadata.labels.unwrap_or_default();
        let mut segment = BTreeMap::new();
        for k in keys {
            let v = labels.get(&k).ok_or_else(|| {
                Error::Waiting(format!("node {name} has no topology label {k} yet"))
            })?;
            segment.insert(k, v.clone());
        }
        Ok(NodeView { labels, segment })
    }

    /// Records a Kubernetes event on `regarding`; failures are only logged.
    pub async fn event(
        &self,
        regarding: &ObjectReference,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, regarding).await {
            warn!(error = %e, reason, "could not record event");
        }
    }

    /// Next retry delay for `key` after a failure: 1 s doubling to 5 min.
    pub fn backoff(&self, key: &str) -> Duration {
        let mut f = self.failures.lock().unwrap();
        let n = f.entry(key.to_owned()).or_default();
        let delay = Duration::from_secs(1u64 << (*n).min(9)).min(Duration::from_secs(300));
        *n += 1;
        delay
    }

    /// Forgets the failures of `key` after a success.
    pub fn succeeded(&self, key: &str) {
        self.failures.lock().unwrap().remove(key);
    }
}

/// Runs one reconcile, counting it and turning its outcome into the next action.
pub async fn observe<F>(ctx: &Ctx, controller: &'static str, key: String, f: F) -> Result<Action>
where
    F: Future<Output = Result<Action>>,
{
    let start = Instant::now();
    let r = f.await;
    ctx.metrics.record(controller, r.is_ok(), start.elapsed());
    if r.is_ok() {
        ctx.succeeded(&key);
    }
    r
}
