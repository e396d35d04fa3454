//! Publishes this node's CSIStorageCapacity objects (node-deployment mode), so the
//! scheduler only sends WaitForFirstConsumer claims to nodes with room.

use crate::error::{Error, Result};
use crate::{Ctx, MANAGER, params};
use csi_core::csi;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::storage::v1::{CSIStorageCapacity, StorageClass};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use std::collections::BTreeMap;
use std::time::Duration;
use tracing::warn;

/// Label naming the driver of a CSIStorageCapacity object.
pub const LABEL_DRIVER: &str = "csi.storage.k8s.io/drivername";
/// Label naming the instance that manages a CSIStorageCapacity object.
pub const LABEL_MANAGED_BY: &str = "csi.storage.k8s.io/managed-by";

/// A name for this node's object for StorageClass `sc`: stable, short, DNS-safe.
pub fn object_name(driver: &str, node: &str, sc: &str) -> String {
    // FNV-1a: stable across releases, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in [driver, "\0", node, "\0", sc].concat().bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("rcsi-{h:016x}")
}

fn managed_by(node: &str) -> String {
    let v = format!("rcsi-{node}");
    if v.len() <= 63 {
        v
    } else {
        object_name("", node, "")
    }
}

/// The owner for this instance's CSIStorageCapacity objects, as csi-provisioner's
/// default `--capacity-ownerref-level=1`: the controller of pod `namespace/pod` (the
/// DaemonSet), or the pod itself. Deleting the owner then deletes the objects.
pub async fn owner(client: Client, namespace: &str, pod: &str) -> Result<OwnerReference> {
    let p = Api::<Pod>::namespaced(client, namespace).get(pod).await?;
    let controller = p
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
        .cloned();
    Ok(match controller {
        Some(o) => OwnerReference {
            controller: None,
            block_owner_deletion: None,
            ..o
        },
        None => OwnerReference {
            api_version: "v1".into(),
            kind: "Pod".into(),
            name: p.name_any(),
            uid: p.uid().unwrap_or_default(),
            ..Default::default()
        },
    })
}

/// One publishing pass: GetCapacity for every StorageClass of this driver on this
/// node, apply the objects, delete the ones whose class is gone.
pub async fn publish(ctx: &Ctx) -> Result<usize> {
    let (Some(node), Some(view)) = (ctx.node.clone(), ctx.node_view().await?) else {
        return Ok(0);
    };
    let classes = Api::<StorageClass>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?;
    let api = Api::<CSIStorageCapacity>::namespaced(ctx.client.clone(), &ctx.namespace);
    let labels = BTreeMap::from([
        (LABEL_DRIVER.to_owned(), ctx.driver.clone()),
        (LABEL_MANAGED_BY.to_owned(), managed_by(&node)),
    ]);
    let mut wanted = Vec::new();
    for sc in classes
        .items
        .iter()
        .filter(|sc| sc.provisioner == ctx.driver)
    {
        let sc_name = sc.name_any();
        let req = csi::GetCapacityRequest {
            volume_capabilities: Vec::new(),
            parameters: params::driver_params(&sc.parameters.clone().unwrap_or_default()),
            accessible_topology: Some(csi::Topology {
                segments: view.segment.clone().into_iter().collect(),
            }),
        };
        let resp = ctx
            .csi
            .get_capacity(req)
            .await
            .map_err(|s| Error::csi("GetCapacity", s))?;
        let name = object_name(&ctx.driver, &node, &sc_name);
        let obj = CSIStorageCapacity {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ctx.namespace.clone()),
                labels: Some(labels.clone()),
                owner_references: ctx.capacity_owner.clone().map(|o| vec![o]),
                ..Default::default()
            },
            storage_class_name: sc_name,
            node_topology: Some(LabelSelector {
                match_labels: Some(view.segment.clone()),
                match_expressions: None,
            }),
            capacity: Some(params::format_quantity(
                resp.available_capacity.max(0) as u64
            )),
            maximum_volume_size: resp
                .maximum_volume_size
                .map(|m| params::format_quantity(m.max(0) as u64)),
        };
        let mut value = serde_json::to_value(&obj).map_err(|e| Error::Invalid(e.to_string()))?;
        value["apiVersion"] = "storage.k8s.io/v1".into();
        value["kind"] = "CSIStorageCapacity".into();
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&value),
        )
        .await?;
        wanted.push(name);
    }
    let selector = labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    for old in api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items
    {
        let name = old.name_any();
        if !wanted.contains(&name) {
            api.delete(&name, &DeleteParams::default()).await?;
        }
    }
    Ok(wanted.len())
}

/// Delay before a failed publishing pass is retried.
const RETRY: Duration = Duration::from_secs(5);

/// Republishes every `interval`, and soon after a volume is created, deleted or expanded.
pub async fn run(ctx: &Ctx, interval: Duration) {
    loop {
        // A failed pass (typically: the kubelet has not registered the driver yet)
        // is retried soon, so the scheduler does not wait a whole interval.
        let wait = match publish(ctx).await {
            Ok(_) => interval,
            Err(e) => {
                warn!(error = %e, "publishing storage capacity failed");
                interval.min(RETRY)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ctx.capacity_changed.notified() => {
                // Coalesce bursts of changes.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
