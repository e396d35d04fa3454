//! The claim controller: provisions PVs for new PVCs and expands bound ones.

use crate::error::{Error, Result, already_exists, conflict, not_found};
use crate::params::{self, SecretKind, TemplateVars};
use crate::snapshot;
use crate::{
    ANN_DELETE_SECRET_NAME, ANN_DELETE_SECRET_NAMESPACE, ANN_PROVISIONED_BY, ANN_SELECTED_NODE,
    ANN_VOLUME_HANDLE, Ctx, PV_FINALIZER, PVC_FINALIZER, observe,
};
use csi_core::csi;
use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeSpec, Secret, SecretReference,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tracing::{info, warn};

/// Reconciles one PVC: provision, finish an abandoned provisioning, or expand.
pub async fn reconcile(pvc: Arc<PersistentVolumeClaim>, ctx: Arc<Ctx>) -> Result<Action> {
    let key = format!("pvc/{}", pvc.uid().unwrap_or_default());
    observe(&ctx, "claim", key, reconcile_claim(&pvc, &ctx)).await
}

/// Retry delay after a failed claim reconcile.
pub fn error_policy(pvc: Arc<PersistentVolumeClaim>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let key = format!("pvc/{}", pvc.uid().unwrap_or_default());
    let delay = ctx.backoff(&key);
    warn!(pvc = %describe(&pvc), error = %err, retry_in = ?delay, "claim reconcile failed");
    Action::requeue(delay)
}

fn describe(pvc: &PersistentVolumeClaim) -> String {
    format!("{}/{}", pvc.namespace().unwrap_or_default(), pvc.name_any())
}

/// The PV name for a claim: `pvc-<claim uid>`, like every CSI provisioner.
pub fn pv_name(pvc: &PersistentVolumeClaim) -> Result<String> {
    pvc.uid()
        .map(|u| format!("pvc-{u}"))
        .ok_or_else(|| Error::Invalid("claim has no uid".into()))
}

fn claims(ctx: &Ctx, pvc: &PersistentVolumeClaim) -> Api<PersistentVolumeClaim> {
    Api::namespaced(ctx.client.clone(), &pvc.namespace().unwrap_or_default())
}

fn has_finalizer<K: Resource>(obj: &K, f: &str) -> bool {
    obj.finalizers().iter().any(|x| x == f)
}

/// Adds or removes finalizer `f` on `obj`. The patch is guarded by the resourceVersion
/// so no one else's finalizer is lost; on a conflict the object is read again and the
/// patch retried (a few times), as client-go's RetryOnConflict does.
pub async fn set_finalizer<K>(api: &Api<K>, obj: &K, f: &str, present: bool) -> Result<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    patch_finalizer(api, obj, f, present, serde_json::Value::Null).await
}

/// [`set_finalizer`], merging `annotations` (an object, or null for none) in the same patch.
async fn patch_finalizer<K>(
    api: &Api<K>,
    obj: &K,
    f: &str,
    present: bool,
    annotations: serde_json::Value,
) -> Result<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut current = obj.clone();
    for attempt in 0.. {
        if has_finalizer(&current, f) == present && attempt > 0 && annotations.is_null() {
            return Ok(current);
        }
        let mut list: Vec<String> = current
            .finalizers()
            .iter()
            .filter(|x| *x != f)
            .cloned()
            .collect();
        if present {
            list.push(f.to_owned());
        }
        let mut patch = json!({"metadata": {
            "resourceVersion": current.resource_version(),
            "finalizers": list,
        }});
        if !annotations.is_null() {
            patch["metadata"]["annotations"] = annotations.clone();
        }
        let name = current.name_any();
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Err(e) if conflict(&e) && attempt < 3 => current = api.get(&name).await?,
            r => return Ok(r?),
        }
    }
    unreachable!("the loop returns")
}

async fn reconcile_claim(pvc: &PersistentVolumeClaim, ctx: &Ctx) -> Result<Action> {
    if pvc.metadata.deletion_timestamp.is_some() {
        if has_finalizer(pvc, PVC_FINALIZER) {
            return abandon(pvc, ctx).await;
        }
        return Ok(Action::await_change());
    }
    let Some(spec) = &pvc.spec else {
        return Ok(Action::await_change());
    };
    if spec.volume_name.as_deref().is_some_and(|v| !v.is_empty()) {
        if has_finalizer(pvc, PVC_FINALIZER) {
            release_claim(&claims(ctx, pvc), pvc).await?;
            return Ok(Action::await_change());
        }
        if pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound") {
            return crate::resize::expand(pvc, ctx).await;
        }
        return Ok(Action::await_change());
    }
    let Some(sc) = our_class(ctx, pvc).await? else {
        return Ok(Action::await_change());
    };
    let selected = pvc.annotations().get(ANN_SELECTED_NODE).cloned();
    let wffc = sc.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer");
    match (&ctx.node, &selected) {
        (_, None) if wffc => return Ok(Action::await_change()),
        (Some(me), Some(n)) if n != me => return Ok(Action::await_change()),
        (Some(me), None) => {
            // Immediate binding with node-local volumes: instances race to claim it.
            let patch = json!({"metadata": {
                "resourceVersion": pvc.resource_version(),
                "annotations": {ANN_SELECTED_NODE: me},
            }});
            return match claims(ctx, pvc)
                .patch(
                    &pvc.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => Ok(Action::await_change()),
                Err(e) if conflict(&e) => Ok(Action::await_change()),
                Err(e) => Err(e.into()),
            };
        }
        _ => {}
    }
    provision(pvc, ctx, &sc, selected.as_deref()).await
}

/// The claim's StorageClass if its provisioner is this driver (Waiting while it does not exist).
async fn our_class(ctx: &Ctx, pvc: &PersistentVolumeClaim) -> Result<Option<StorageClass>> {
    let Some(name) = pvc
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
        .filter(|n| !n.is_empty())
    else {
        return Ok(None);
    };
    let sc = Api::<StorageClass>::all(ctx.client.clone())
        .get_opt(name)
        .await?
        .ok_or_else(|| Error::Waiting(format!("StorageClass {name} does not exist")))?;
    Ok((sc.provisioner == ctx.driver).then_some(sc))
}

/// What CreateVolume was asked, plus what the PV needs to remember.
struct Prepared {
    request: csi::CreateVolumeRequest,
    requested: u64,
    block: bool,
    fs_type: String,
    provisioner_secret: Option<SecretReference>,
    node_stage: Option<SecretReference>,
    node_publish: Option<SecretReference>,
    node_expand: Option<SecretReference>,
    controller_expand: Option<SecretReference>,
}

/// Reads a Secret's data as CSI secrets (none without a reference).
pub async fn read_secret(
    ctx: &Ctx,
    r: Option<&SecretReference>,
) -> Result<HashMap<String, String>> {
    let Some(r) = r else {
        return Ok(HashMap::new());
    };
    let (ns, name) = (
        r.namespace.as_deref().unwrap_or_default(),
        r.name.as_deref().unwrap_or_default(),
    );
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .get_opt(name)
        .await?
        .ok_or_else(|| Error::Waiting(format!("secret {ns}/{name} does not exist")))?;
    secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            String::from_utf8(v.0)
                .map(|v| (k.clone(), v))
                .map_err(|_| Error::Invalid(format!("secret {ns}/{name} key {k} is not UTF-8")))
        })
        .collect()
}

/// The StorageClass's `kind` secret reference for `pvc`, templates resolved.
fn secret_ref(
    pvc: &PersistentVolumeClaim,
    sc_params: &BTreeMap<String, String>,
    pv_name: &str,
    kind: SecretKind,
) -> Result<Option<SecretReference>> {
    let (namespace, name) = (pvc.namespace().unwrap_or_default(), pvc.name_any());
    let vars = TemplateVars {
        pv_name: Some(pv_name),
        pvc_name: Some(&name),
        pvc_namespace: Some(&namespace),
        pvc_annotations: Some(pvc.annotations()),
        ..Default::default()
    };
    params::secret_ref(sc_params, kind, &vars)
}

async fn prepare(
    ctx: &Ctx,
    pvc: &PersistentVolumeClaim,
    sc: &StorageClass,
    pv_name: &str,
    selected: Option<&str>,
) -> Result<Option<Prepared>> {
    let spec = pvc.spec.clone().unwrap_or_default();
    let sc_params = sc.parameters.clone().unwrap_or_default();
    let resources = spec.resources.as_ref();
    let requested = params::storage(resources.and_then(|r| r.requests.as_ref()))?
        .ok_or_else(|| Error::Invalid("the claim requests no storage".into()))?;
    let limit = params::storage(resources.and_then(|r| r.limits.as_ref()))?.unwrap_or(0);
    let block = spec.volume_mode.as_deref() == Some("Block");
    let fs_type = if block {
        String::new()
    } else {
        sc_params.get(params::FSTYPE).cloned().unwrap_or_default()
    };
    let mount_options = sc.mount_options.clone().unwrap_or_default();
    let access_modes = spec.access_modes.clone().unwrap_or_default();
    let capabilities = params::capabilities(&access_modes, block, &fs_type, &mount_options)?;

    let (namespace, name) = (pvc.namespace().unwrap_or_default(), pvc.name_any());
    let r = |kind| secret_ref(pvc, &sc_params, pv_name, kind);
    let provisioner_secret = r(SecretKind::Provisioner)?;
    let secrets = read_secret(ctx, provisioner_secret.as_ref()).await?;

    let volume_content_source = match content_source(ctx, pvc, requested).await? {
        Source::None => None,
        Source::Csi(s) => Some(s),
        Source::Foreign => return Ok(None),
    };

    let mut parameters = params::driver_params(&sc_params);
    parameters.insert(params::PVC_NAME.into(), name.clone());
    parameters.insert(params::PVC_NAMESPACE.into(), namespace.clone());
    parameters.insert(params::PV_NAME.into(), pv_name.into());

    let accessibility_requirements = match selected {
        Some(node) => {
            let segment = match ctx.node_view().await? {
                Some(view) => view.segment,
                None => ctx.topology_of(node).await?.segment,
            };
            let t = csi::Topology {
                segments: segment.into_iter().collect(),
            };
            Some(csi::TopologyRequirement {
                requisite: vec![t.clone()],
                preferred: vec![t],
            })
        }
        None => allowed_topologies(sc),
    };

    Ok(Some(Prepared {
        request: csi::CreateVolumeRequest {
            name: pv_name.into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: requested as i64,
                limit_bytes: limit as i64,
            }),
            volume_capabilities: capabilities,
            parameters,
            secrets,
            volume_content_source,
            accessibility_requirements,
            mutable_parameters: HashMap::new(),
        },
        requested,
        block,
        fs_type,
        provisioner_secret,
        node_stage: r(SecretKind::NodeStage)?,
        node_publish: r(SecretKind::NodePublish)?,
        node_expand: r(SecretKind::NodeExpand)?,
        controller_expand: r(SecretKind::ControllerExpand)?,
    }))
}

/// The StorageClass's allowedTopologies as CSI requisite topologies.
fn allowed_topologies(sc: &StorageClass) -> Option<csi::TopologyRequirement> {
    let mut out = Vec::new();
    for term in sc.allowed_topologies.iter().flatten() {
        let mut combos: Vec<HashMap<String, String>> = vec![HashMap::new()];
        for expr in term.match_label_expressions.iter().flatten() {
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    expr.values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.insert(expr.key.clone(), v.clone());
                        c
                    })
                })
                .collect();
        }
        out.extend(
            combos
                .into_iter()
                .filter(|c| !c.is_empty())
                .map(|segments| csi::Topology { segments }),
        );
    }
    (!out.is_empty()).then(|| csi::TopologyRequirement {
        requisite: out.clone(),
        preferred: out,
    })
}

enum Source {
    None,
    Csi(csi::VolumeContentSource),
    /// A data source a volume populator handles, not us.
    Foreign,
}

async fn content_source(ctx: &Ctx, pvc: &PersistentVolumeClaim, requested: u64) -> Result<Source> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let spec = pvc.spec.as_ref();
    let (group, kind, name) = match (
        spec.and_then(|s| s.data_source_ref.as_ref()),
        spec.and_then(|s| s.data_source.as_ref()),
    ) {
        (Some(r), _) => {
            if r.namespace
                .as_deref()
                .is_some_and(|n| Some(n) != pvc.namespace().as_deref())
            {
                return Err(Error::Invalid(
                    "cross-namespace data sources are not supported".into(),
                ));
            }
            (
                r.api_group.clone().unwrap_or_default(),
                r.kind.clone(),
                r.name.clone(),
            )
        }
        (None, Some(r)) => (
            r.api_group.clone().unwrap_or_default(),
            r.kind.clone(),
            r.name.clone(),
        ),
        (None, None) => return Ok(Source::None),
    };
    let ns = pvc.namespace().unwrap_or_default();
    match (group.as_str(), kind.as_str()) {
        ("snapshot.storage.k8s.io", "VolumeSnapshot") => {
            let (handle, restore) = snapshot::restore_source(ctx, &ns, &name).await?;
            if let Some(restore) = restore.filter(|r| *r > requested) {
                return Err(Error::Invalid(format!(
                    "the claim requests {requested} bytes, less than snapshot {name}'s restore size {restore}"
                )));
            }
            Ok(Source::Csi(csi::VolumeContentSource {
                r#type: Some(Type::Snapshot(SnapshotSource {
                    snapshot_id: handle,
                })),
            }))
        }
        ("", "PersistentVolumeClaim") => {
            let src = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns)
                .get_opt(&name)
                .await?
                .ok_or_else(|| {
                    Error::Waiting(format!("source claim {ns}/{name} does not exist"))
                })?;
            let bound = src.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
            let volume = src.spec.as_ref().and_then(|s| s.volume_name.clone());
            let (true, Some(volume)) = (bound, volume) else {
                return Err(Error::Waiting(format!(
                    "source claim {ns}/{name} is not bound yet"
                )));
            };
            let pv = Api::<PersistentVolume>::all(ctx.client.clone())
                .get_opt(&volume)
                .await?
                .ok_or_else(|| Error::Waiting(format!("source volume {volume} does not exist")))?;
            let csi_src = pv
                .spec
                .as_ref()
                .and_then(|s| s.csi.as_ref())
                .filter(|c| c.driver == ctx.driver)
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "source claim {ns}/{name} is not a {} volume",
                        ctx.driver
                    ))
                })?;
            let size = params::storage(src.status.as_ref().and_then(|s| s.capacity.as_ref()))?;
            if size.is_some_and(|s| s > requested) {
                return Err(Error::Invalid(format!(
                    "the claim requests {requested} bytes, less than its source claim {name}"
                )));
            }
            Ok(Source::Csi(csi::VolumeContentSource {
                r#type: Some(Type::Volume(VolumeSource {
                    volume_id: csi_src.volume_handle.clone(),
                })),
            }))
        }
        _ => Ok(Source::Foreign),
    }
}

async fn provision(
    pvc: &PersistentVolumeClaim,
    ctx: &Ctx,
    sc: &StorageClass,
    selected: Option<&str>,
) -> Result<Action> {
    let pv_name = pv_name(pvc)?;
    let pvs = Api::<PersistentVolume>::all(ctx.client.clone());
    if pvs.get_opt(&pv_name).await?.is_some() {
        return Ok(Action::await_change());
    }
    let regarding = pvc.object_ref(&());
    let prepared = match prepare(ctx, pvc, sc, &pv_name, selected).await {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(Action::await_change()),
        Err(e) => return Err(failed(ctx, &regarding, e).await),
    };
    let claims = claims(ctx, pvc);
    let pvc = if has_finalizer(pvc, PVC_FINALIZER) {
        pvc.clone()
    } else {
        set_finalizer(&claims, pvc, PVC_FINALIZER, true).await?
    };
    ctx.event(
        &regarding,
        false,
        "Provisioning",
        "Provision",
        format!("creating volume {pv_name} for claim {}", describe(&pvc)),
    )
    .await;
    let volume = match ctx.csi.create_volume(prepared.request.clone()).await {
        Ok(v) => v,
        Err(status) => {
            let e = failed(ctx, &regarding, Error::csi("CreateVolume", status)).await;
            if e.csi_code() == Some(tonic::Code::ResourceExhausted) && selected.is_some() {
                // Let the scheduler pick another node. Nothing was created under this
                // name (a retry of a created volume would have returned it), so the
                // provisioning finalizer goes too: another node's instance takes over.
                let finalizers: Vec<&String> = pvc
                    .finalizers()
                    .iter()
                    .filter(|f| *f != PVC_FINALIZER)
                    .collect();
                let patch = json!({"metadata": {
                    "resourceVersion": pvc.resource_version(),
                    "annotations": {ANN_SELECTED_NODE: null},
                    "finalizers": finalizers,
                }});
                claims
                    .patch(
                        &pvc.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await?;
            }
            return Err(e);
        }
    };
    // Remember the handle at once: if the claim is deleted before its PV exists, the
    // volume is deleted by this id (see `abandon`).
    let patch = json!({"metadata": {"annotations": {ANN_VOLUME_HANDLE: volume.volume_id}}});
    let pvc = claims
        .patch(
            &pvc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    let pv = build_pv(ctx, &pvc, sc, &pv_name, &prepared, &volume);
    match pvs.create(&PostParams::default(), &pv).await {
        Ok(_) => {}
        Err(e) if already_exists(&e) => {}
        Err(e) => return Err(e.into()),
    }
    release_claim(&claims, &pvc).await?;
    info!(pvc = %describe(&pvc), pv = %pv_name, volume = %volume.volume_id, "provisioned");
    ctx.event(
        &regarding,
        false,
        "ProvisioningSucceeded",
        "Provision",
        format!("volume {pv_name} created ({})", volume.volume_id),
    )
    .await;
    ctx.capacity_changed.notify_one();
    Ok(Action::await_change())
}

/// Drops the provisioning finalizer and the recorded handle once the PV exists.
async fn release_claim(
    claims: &Api<PersistentVolumeClaim>,
    pvc: &PersistentVolumeClaim,
) -> Result<()> {
    let forget = json!({ANN_VOLUME_HANDLE: null});
    patch_finalizer(claims, pvc, PVC_FINALIZER, false, forget).await?;
    Ok(())
}

/// Records a ProvisioningFailed event for `e` and hands it back.
async fn failed(ctx: &Ctx, regarding: &ObjectReference, e: Error) -> Error {
    ctx.event(
        regarding,
        true,
        "ProvisioningFailed",
        "Provision",
        e.to_string(),
    )
    .await;
    e
}

fn build_pv(
    ctx: &Ctx,
    pvc: &PersistentVolumeClaim,
    sc: &StorageClass,
    pv_name: &str,
    p: &Prepared,
    volume: &csi::Volume,
) -> PersistentVolume {
    let spec = pvc.spec.clone().unwrap_or_default();
    let reclaim = sc.reclaim_policy.clone().unwrap_or_else(|| "Delete".into());
    let mut annotations = BTreeMap::from([(ANN_PROVISIONED_BY.to_owned(), ctx.driver.clone())]);
    if let Some(s) = &p.provisioner_secret {
        annotations.insert(
            ANN_DELETE_SECRET_NAME.into(),
            s.name.clone().unwrap_or_default(),
        );
        annotations.insert(
            ANN_DELETE_SECRET_NAMESPACE.into(),
            s.namespace.clone().unwrap_or_default(),
        );
    }
    let capacity = if volume.capacity_bytes > 0 {
        volume.capacity_bytes as u64
    } else {
        p.requested
    };
    let attributes: BTreeMap<String, String> = volume.volume_context.clone().into_iter().collect();
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(pv_name.into()),
            annotations: Some(annotations),
            finalizers: (reclaim == "Delete").then(|| vec![PV_FINALIZER.to_owned()]),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: spec.access_modes.clone(),
            capacity: Some(BTreeMap::from([(
                "storage".to_owned(),
                params::format_quantity(capacity),
            )])),
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: pvc.namespace(),
                name: Some(pvc.name_any()),
                uid: pvc.uid(),
                resource_version: pvc.resource_version(),
                field_path: None,
            }),
            persistent_volume_reclaim_policy: Some(reclaim),
            storage_class_name: sc.metadata.name.clone(),
            mount_options: sc.mount_options.clone().filter(|m| !m.is_empty()),
            volume_mode: Some(if p.block { "Block" } else { "Filesystem" }.into()),
            node_affinity: params::node_affinity(&volume.accessible_topology),
            csi: Some(CSIPersistentVolumeSource {
                driver: ctx.driver.clone(),
                volume_handle: volume.volume_id.clone(),
                fs_type: (!p.fs_type.is_empty()).then(|| p.fs_type.clone()),
                volume_attributes: (!attributes.is_empty()).then_some(attributes),
                controller_expand_secret_ref: p.controller_expand.clone(),
                node_stage_secret_ref: p.node_stage.clone(),
                node_publish_secret_ref: p.node_publish.clone(),
                node_expand_secret_ref: p.node_expand.clone(),
                read_only: None,
                controller_publish_secret_ref: None,
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// A claim was deleted while we held its provisioning finalizer: make sure no
/// volume is left behind, then let it go.
async fn abandon(pvc: &PersistentVolumeClaim, ctx: &Ctx) -> Result<Action> {
    let claims = claims(ctx, pvc);
    let pv_name = pv_name(pvc)?;
    let selected = pvc.annotations().get(ANN_SELECTED_NODE).cloned();
    if ctx.node.is_some() && selected != ctx.node {
        return Ok(Action::await_change());
    }
    let exists = Api::<PersistentVolume>::all(ctx.client.clone())
        .get_opt(&pv_name)
        .await?
        .is_some();
    let regarding = pvc.object_ref(&());
    if let (false, Some(handle)) = (exists, pvc.annotations().get(ANN_VOLUME_HANDLE)) {
        let secrets = match our_class(ctx, pvc).await {
            Ok(Some(sc)) => {
                let sc_params = sc.parameters.unwrap_or_default();
                let r = secret_ref(pvc, &sc_params, &pv_name, SecretKind::Provisioner)?;
                read_secret(ctx, r.as_ref()).await?
            }
            Ok(None) | Err(Error::Waiting(_)) => HashMap::new(),
            Err(e) => return Err(e),
        };
        let req = csi::DeleteVolumeRequest {
            volume_id: handle.clone(),
            secrets,
        };
        ctx.csi
            .delete_volume(req)
            .await
            .map_err(|s| Error::csi("DeleteVolume", s))?;
    } else if !exists {
        // No handle recorded: the provisioner stopped between CreateVolume and recording
        // it. CreateVolume is idempotent by name, so asking again tells the id.
        let prepared = match our_class(ctx, pvc).await {
            Ok(Some(sc)) => prepare(ctx, pvc, &sc, &pv_name, selected.as_deref()).await,
            Ok(None) | Err(Error::Waiting(_)) => {
                Err(Error::Invalid("its StorageClass is gone".into()))
            }
            Err(e) => return Err(e),
        };
        match prepared {
            Ok(Some(p)) => match ctx.csi.create_volume(p.request.clone()).await {
                Ok(v) => {
                    let req = csi::DeleteVolumeRequest {
                        volume_id: v.volume_id,
                        secrets: p.request.secrets,
                    };
                    ctx.csi
                        .delete_volume(req)
                        .await
                        .map_err(|s| Error::csi("DeleteVolume", s))?;
                }
                Err(s) => {
                    let e = Error::csi("CreateVolume", s);
                    if !e.is_final_csi() {
                        return Err(e);
                    }
                }
            },
            Ok(None) => {}
            Err(e @ (Error::Kube(_) | Error::Csi { .. })) => return Err(e),
            Err(e) => {
                ctx.event(
                    &regarding,
                    true,
                    "ProvisioningCleanupSkipped",
                    "Provision",
                    format!("cannot check for a volume left by the deleted claim: {e}"),
                )
                .await;
            }
        }
    }
    match release_claim(&claims, pvc).await {
        Err(Error::Kube(e)) if not_found(&e) => {}
        r => r?,
    }
    Ok(Action::await_change())
}
