//! The snapshot controller: VolumeSnapshotContents (snapshot.storage.k8s.io/v1) to
//! CreateSnapshot / DeleteSnapshot, as csi-snapshotter does next to the snapshot-controller.

use crate::error::{Error, Result};
use crate::params::{self, SecretKind, TemplateVars};
use crate::provision::read_secret;
use crate::{Ctx, observe};
use csi_core::csi;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams};
use kube::core::object::Object;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Annotation set while CreateSnapshot may still be running, so nobody deletes meanwhile.
pub const ANN_BEING_CREATED: &str = "snapshot.storage.kubernetes.io/volumesnapshot-being-created";
/// Annotation the snapshot-controller sets when the content is to be deleted.
pub const ANN_BEING_DELETED: &str = "snapshot.storage.kubernetes.io/volumesnapshot-being-deleted";
/// Content finalizer the snapshot-controller adds; the sidecar (here: us) removes it
/// once the snapshot is gone or is not ours to delete.
pub const CONTENT_FINALIZER: &str =
    "snapshot.storage.kubernetes.io/volumesnapshotcontent-bound-protection";
/// Annotations naming the DeleteSnapshot secret (set by the snapshot-controller).
pub const ANN_SECRET_NAME: &str = "snapshot.storage.kubernetes.io/deletion-secret-name";
/// See [`ANN_SECRET_NAME`].
pub const ANN_SECRET_NAMESPACE: &str = "snapshot.storage.kubernetes.io/deletion-secret-namespace";

fn resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "snapshot.storage.k8s.io",
        "v1",
        kind,
    ))
}

/// The VolumeSnapshotContent API resource.
pub fn content_resource() -> ApiResource {
    resource("VolumeSnapshotContent")
}

/// Where a content's snapshot comes from.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContentSource {
    /// Dynamic: the volume to snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_handle: Option<String>,
    /// Pre-provisioned: the existing snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
}

/// VolumeSnapshotContent spec (the fields we use).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContentSpec {
    /// CSI driver name.
    pub driver: String,
    /// Delete or Retain.
    pub deletion_policy: String,
    /// Source volume or snapshot.
    pub source: ContentSource,
    /// The VolumeSnapshotClass of a dynamic snapshot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_snapshot_class_name: Option<String>,
    /// The VolumeSnapshot bound to this content.
    pub volume_snapshot_ref: ObjectReference,
}

/// VolumeSnapshotContent status.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContentStatus {
    /// The driver's snapshot id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
    /// Creation time in nanoseconds since the epoch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<i64>,
    /// Bytes needed to restore.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore_size: Option<i64>,
    /// True once the snapshot can be restored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_to_use: Option<bool>,
    /// Set on members of a group snapshot, which are deleted with their group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_group_snapshot_handle: Option<String>,
}

/// A VolumeSnapshotContent.
pub type Content = Object<ContentSpec, ContentStatus>;

/// Returns once the VolumeSnapshotContent API answers, asking again every `every`:
/// the snapshot CRDs may be installed after the provisioner starts.
pub async fn wait_for_api(api: &Api<Content>, every: Duration) {
    let mut warned = false;
    while let Err(e) = api.list(&ListParams::default().limit(1)).await {
        if !warned {
            warn!(error = %e, "VolumeSnapshotContent API not available: snapshots wait until the snapshot CRDs are installed");
            warned = true;
        }
        tokio::time::sleep(every).await;
    }
    if warned {
        info!("VolumeSnapshotContent API found: snapshots enabled");
    }
}

/// Reconciles one VolumeSnapshotContent.
pub async fn reconcile(c: Arc<Content>, ctx: Arc<Ctx>) -> Result<Action> {
    let key = format!("vsc/{}", c.name_any());
    observe(&ctx, "snapshot", key, reconcile_content(&c, &ctx)).await
}

/// Retry delay after a failed snapshot reconcile.
pub fn error_policy(c: Arc<Content>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let delay = ctx.backoff(&format!("vsc/{}", c.name_any()));
    warn!(content = %c.name_any(), error = %err, retry_in = ?delay, "snapshot reconcile failed");
    Action::requeue(delay)
}

fn contents(ctx: &Ctx) -> Api<Content> {
    Api::all_with(ctx.client.clone(), &content_resource())
}

/// True when a watched PV of this driver with CSI handle `handle` is on the node with
/// `labels`. Waits for the PV cache's first listing, so a snapshot taken right after a
/// restart is not skipped.
async fn is_local_volume(ctx: &Ctx, handle: &str, labels: &BTreeMap<String, String>) -> bool {
    let Some(store) = ctx.pvs.as_ref() else {
        return false;
    };
    if store.wait_until_ready().await.is_err() {
        return false;
    }
    store.state().iter().any(|pv| {
        let spec = pv.spec.as_ref();
        spec.and_then(|s| s.csi.as_ref())
            .is_some_and(|c| c.driver == ctx.driver && c.volume_handle == handle)
            && params::affinity_matches(spec.and_then(|s| s.node_affinity.as_ref()), labels)
    })
}

async fn reconcile_content(c: &Content, ctx: &Ctx) -> Result<Action> {
    if c.spec.driver != ctx.driver {
        return Ok(Action::await_change());
    }
    let status = c.status.clone().unwrap_or_default();
    let handle = status
        .snapshot_handle
        .clone()
        .or_else(|| c.spec.source.snapshot_handle.clone());
    let view = ctx.node_view().await?;
    if c.metadata.deletion_timestamp.is_some() {
        if !should_delete(c) {
            return Ok(Action::await_change());
        }
        let delete_here =
            c.spec.deletion_policy == "Delete" && status.volume_group_snapshot_handle.is_none();
        if let (true, Some(h)) = (delete_here, status.snapshot_handle.as_deref()) {
            // In node-deployment mode only the node that holds the snapshot deletes it.
            if view.is_some() && find(ctx, h).await?.is_none() {
                return Ok(Action::await_change());
            }
            // The finalizer patch is guarded by resourceVersion: use the content as
            // the handle's removal left it.
            let c = delete(c, ctx, h).await?;
            remove_finalizer(ctx, &c).await?;
        } else {
            remove_finalizer(ctx, c).await?;
        }
        return Ok(Action::await_change());
    }
    if status.ready_to_use == Some(true) {
        return Ok(Action::await_change());
    }
    match (&c.spec.source.volume_handle, &handle) {
        (Some(volume), _) => match &view {
            Some(v) if !is_local_volume(ctx, volume, &v.labels).await => Ok(Action::await_change()),
            _ => create(c, ctx, volume).await,
        },
        (None, Some(snap)) => import(c, ctx, snap, view.is_some()).await,
        (None, None) => Err(Error::Invalid(format!(
            "content {} has neither a source volume nor a snapshot handle",
            c.name_any()
        ))),
    }
}

/// True when a content being deleted may be deleted now (as csi-snapshotter decides):
/// an unbound pre-provisioned content, or one the snapshot-controller marked for
/// deletion whose CreateSnapshot is not still in flight.
fn should_delete(c: &Content) -> bool {
    let a = c.annotations();
    let unbound = c
        .spec
        .volume_snapshot_ref
        .uid
        .as_deref()
        .unwrap_or("")
        .is_empty();
    if c.spec.source.snapshot_handle.is_some() && unbound {
        return true;
    }
    !a.contains_key(ANN_BEING_CREATED) && a.contains_key(ANN_BEING_DELETED)
}

/// Drops [`CONTENT_FINALIZER`] so the API server can remove the content.
async fn remove_finalizer(ctx: &Ctx, c: &Content) -> Result<()> {
    if !c.finalizers().iter().any(|f| f == CONTENT_FINALIZER) {
        return Ok(());
    }
    match crate::provision::set_finalizer(&contents(ctx), c, CONTENT_FINALIZER, false).await {
        Err(Error::Kube(e)) if crate::error::not_found(&e) => Ok(()),
        r => r.map(drop),
    }
}

/// The driver's snapshot `id`, if it has it.
async fn find(ctx: &Ctx, id: &str) -> Result<Option<csi::Snapshot>> {
    let req = csi::ListSnapshotsRequest {
        snapshot_id: id.into(),
        ..Default::default()
    };
    let resp = ctx
        .csi
        .list_snapshots(req)
        .await
        .map_err(|s| Error::csi("ListSnapshots", s))?;
    Ok(resp.entries.into_iter().find_map(|e| e.snapshot))
}

/// DeleteSnapshot, then forgets the handle; returns the updated content.
async fn delete(c: &Content, ctx: &Ctx, handle: &str) -> Result<Content> {
    let secret = params::annotated_secret(c.annotations(), ANN_SECRET_NAME, ANN_SECRET_NAMESPACE);
    let secrets = read_secret(ctx, secret.as_ref()).await?;
    let req = csi::DeleteSnapshotRequest {
        snapshot_id: handle.into(),
        secrets,
    };
    ctx.csi
        .delete_snapshot(req)
        .await
        .map_err(|s| Error::csi("DeleteSnapshot", s))?;
    info!(content = %c.name_any(), snapshot = handle, "deleted snapshot");
    // Forget the handle first: if dropping the finalizer fails, the retry (on any
    // node) only drops the finalizer.
    let patch = json!({"status": {"snapshotHandle": null, "readyToUse": false}});
    Ok(contents(ctx)
        .patch_status(
            &c.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?)
}

async fn set_annotation(ctx: &Ctx, c: &Content, key: &str, value: Option<&str>) -> Result<()> {
    let patch = json!({"metadata": {"annotations": {key: value}}});
    contents(ctx)
        .patch(
            &c.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

async fn create(c: &Content, ctx: &Ctx, volume: &str) -> Result<Action> {
    let class_name = c.spec.volume_snapshot_class_name.clone().ok_or_else(|| {
        Error::Invalid(format!(
            "content {} names no VolumeSnapshotClass",
            c.name_any()
        ))
    })?;
    let classes: Api<DynamicObject> =
        Api::all_with(ctx.client.clone(), &resource("VolumeSnapshotClass"));
    let class = classes.get_opt(&class_name).await?.ok_or_else(|| {
        Error::Waiting(format!("VolumeSnapshotClass {class_name} does not exist"))
    })?;
    let class_params: BTreeMap<String, String> =
        serde_json::from_value(class.data.get("parameters").cloned().unwrap_or_default())
            .unwrap_or_default();
    let snap_ref = &c.spec.volume_snapshot_ref;
    let content_name = c.name_any();
    let vars = TemplateVars {
        content_name: Some(&content_name),
        snapshot_name: snap_ref.name.as_deref(),
        snapshot_namespace: snap_ref.namespace.as_deref(),
        ..Default::default()
    };
    let secret = params::secret_ref(&class_params, SecretKind::Snapshotter, &vars)?;
    let secrets = read_secret(ctx, secret.as_ref()).await?;
    let mut parameters = params::driver_params(&class_params);
    for (k, v) in [
        ("volumesnapshot/name", snap_ref.name.clone()),
        ("volumesnapshot/namespace", snap_ref.namespace.clone()),
        ("volumesnapshotcontent/name", Some(content_name.clone())),
    ] {
        parameters.insert(format!("{}{k}", params::PREFIX), v.unwrap_or_default());
    }
    let uid = snap_ref.uid.clone().ok_or_else(|| {
        Error::Invalid(format!(
            "content {content_name} is not bound to a VolumeSnapshot uid"
        ))
    })?;
    if !c.annotations().contains_key(ANN_BEING_CREATED) {
        set_annotation(ctx, c, ANN_BEING_CREATED, Some("yes")).await?;
    }
    let req = csi::CreateSnapshotRequest {
        source_volume_id: volume.into(),
        name: format!("snapshot-{uid}"),
        secrets,
        parameters,
    };
    let snap = match ctx.csi.create_snapshot(req).await {
        Ok(s) => s,
        Err(s) => {
            let e = Error::csi("CreateSnapshot", s);
            if e.is_final_csi() {
                set_annotation(ctx, c, ANN_BEING_CREATED, None).await?;
            }
            let patch = json!({"status": {"error": {
                "time": jiff::Timestamp::now().to_string(), "message": e.to_string()}}});
            contents(ctx)
                .patch_status(
                    &content_name,
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await?;
            return Err(e);
        }
    };
    write_status(ctx, c, &snap).await?;
    set_annotation(ctx, c, ANN_BEING_CREATED, None).await?;
    info!(content = %content_name, snapshot = %snap.snapshot_id, ready = snap.ready_to_use, "created snapshot");
    Ok(if snap.ready_to_use {
        Action::await_change()
    } else {
        Action::requeue(Duration::from_secs(5))
    })
}

async fn write_status(ctx: &Ctx, c: &Content, s: &csi::Snapshot) -> Result<()> {
    let created = s
        .creation_time
        .as_ref()
        .map(|t| t.seconds * 1_000_000_000 + i64::from(t.nanos));
    let patch = json!({"status": {
        "snapshotHandle": s.snapshot_id,
        "creationTime": created,
        "restoreSize": s.size_bytes,
        "readyToUse": s.ready_to_use,
        "error": null,
    }});
    contents(ctx)
        .patch_status(
            &c.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}

/// A pre-provisioned content: look the snapshot up and fill in its status.
async fn import(c: &Content, ctx: &Ctx, snap: &str, node_local: bool) -> Result<Action> {
    match find(ctx, snap).await? {
        Some(s) => {
            write_status(ctx, c, &s).await?;
            Ok(if s.ready_to_use {
                Action::await_change()
            } else {
                Action::requeue(Duration::from_secs(5))
            })
        }
        // Another node's snapshot.
        None if node_local => Ok(Action::await_change()),
        None => Err(Error::Waiting(format!("the driver has no snapshot {snap}"))),
    }
}

/// The snapshot id and restore size of VolumeSnapshot `ns/name`, for restoring a claim.
pub async fn restore_source(ctx: &Ctx, ns: &str, name: &str) -> Result<(String, Option<u64>)> {
    let snaps: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), ns, &resource("VolumeSnapshot"));
    let vs = snaps
        .get_opt(name)
        .await?
        .ok_or_else(|| Error::Waiting(format!("snapshot {ns}/{name} does not exist")))?;
    let status = vs.data.get("status");
    let ready = status
        .and_then(|s| s.get("readyToUse"))
        .and_then(|v| v.as_bool());
    let content = status
        .and_then(|s| s.get("boundVolumeSnapshotContentName"))
        .and_then(|v| v.as_str());
    let (Some(true), Some(content)) = (ready, content) else {
        return Err(Error::Waiting(format!(
            "snapshot {ns}/{name} is not ready yet"
        )));
    };
    let c = contents(ctx)
        .get_opt(content)
        .await?
        .ok_or_else(|| Error::Waiting(format!("snapshot content {content} does not exist")))?;
    if c.spec.driver != ctx.driver {
        return Err(Error::Invalid(format!(
            "snapshot {ns}/{name} belongs to driver {}, not {}",
            c.spec.driver, ctx.driver
        )));
    }
    let s = c.status.unwrap_or_default();
    let handle = s
        .snapshot_handle
        .ok_or_else(|| Error::Waiting(format!("snapshot content {content} has no handle yet")))?;
    Ok((handle, s.restore_size.map(|r| r.max(0) as u64)))
}
