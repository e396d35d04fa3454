//! The volume controller: deletes backend volumes of released PVs, per reclaim policy.

use crate::error::{Error, Result, not_found};
use crate::params;
use crate::provision::{read_secret, set_finalizer};
use crate::{
    ANN_DELETE_SECRET_NAME, ANN_DELETE_SECRET_NAMESPACE, ANN_PROVISIONED_BY, Ctx, PV_FINALIZER,
    observe,
};
use csi_core::csi;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::DeleteParams;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use std::sync::Arc;
use tracing::{info, warn};

/// Reconciles one PV: delete the backend volume once released (reclaim policy Delete).
pub async fn reconcile(pv: Arc<PersistentVolume>, ctx: Arc<Ctx>) -> Result<Action> {
    let key = format!("pv/{}", pv.name_any());
    observe(&ctx, "volume", key, reconcile_volume(&pv, &ctx)).await
}

/// Retry delay after a failed volume reconcile.
pub fn error_policy(pv: Arc<PersistentVolume>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let delay = ctx.backoff(&format!("pv/{}", pv.name_any()));
    warn!(pv = %pv.name_any(), error = %err, retry_in = ?delay, "volume reconcile failed");
    Action::requeue(delay)
}

/// True when `pv` is a volume this instance provisioned and is responsible for.
pub async fn is_ours(pv: &PersistentVolume, ctx: &Ctx) -> Result<bool> {
    let spec = pv.spec.as_ref();
    let driver_matches = spec
        .and_then(|s| s.csi.as_ref())
        .is_some_and(|c| c.driver == ctx.driver);
    if !driver_matches || pv.annotations().get(ANN_PROVISIONED_BY) != Some(&ctx.driver) {
        return Ok(false);
    }
    Ok(match ctx.node_view().await? {
        Some(view) => {
            params::affinity_matches(spec.and_then(|s| s.node_affinity.as_ref()), &view.labels)
        }
        None => true,
    })
}

async fn reconcile_volume(pv: &PersistentVolume, ctx: &Ctx) -> Result<Action> {
    let deleting = pv.metadata.deletion_timestamp.is_some();
    let finalized = pv.finalizers().iter().any(|f| f == PV_FINALIZER);
    if deleting && !finalized {
        return Ok(Action::await_change());
    }
    if !is_ours(pv, ctx).await? {
        return Ok(Action::await_change());
    }
    let spec = pv.spec.clone().unwrap_or_default();
    let reclaim_delete = spec.persistent_volume_reclaim_policy.as_deref() == Some("Delete");
    let api = Api::<PersistentVolume>::all(ctx.client.clone());
    if !reclaim_delete {
        if deleting {
            set_finalizer(&api, pv, PV_FINALIZER, false).await?;
        }
        return Ok(Action::await_change());
    }
    if !deleting && !finalized {
        set_finalizer(&api, pv, PV_FINALIZER, true).await?;
        return Ok(Action::await_change());
    }
    // A PV deleted by hand while Bound stays (pv-protection, our finalizer) and its
    // data stays with it until the claim lets go, as upstream does.
    let released = |pv: &PersistentVolume| {
        pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released")
    };
    if !released(pv) {
        return Ok(Action::await_change());
    }
    // The watch cache may still show a PV we have just finished: read it fresh, so the
    // driver is not asked to delete the same volume twice.
    let pv = match api.get_opt(&pv.name_any()).await? {
        Some(f) if released(&f) && f.finalizers().iter().any(|x| x == PV_FINALIZER) => f,
        _ => return Ok(Action::await_change()),
    };
    let pv = &pv;
    let deleting = pv.metadata.deletion_timestamp.is_some();
    let handle = spec.csi.map(|c| c.volume_handle).unwrap_or_default();
    let secret = params::annotated_secret(
        pv.annotations(),
        ANN_DELETE_SECRET_NAME,
        ANN_DELETE_SECRET_NAMESPACE,
    );
    let secrets = read_secret(ctx, secret.as_ref()).await?;
    let req = csi::DeleteVolumeRequest {
        volume_id: handle.clone(),
        secrets,
    };
    if let Err(s) = ctx.csi.delete_volume(req).await {
        let e = Error::csi("DeleteVolume", s);
        ctx.event(
            &pv.object_ref(&()),
            true,
            "VolumeFailedDelete",
            "Delete",
            e.to_string(),
        )
        .await;
        return Err(e);
    }
    info!(pv = %pv.name_any(), volume = %handle, "deleted volume");
    ctx.capacity_changed.notify_one();
    match set_finalizer(&api, pv, PV_FINALIZER, false).await {
        Err(Error::Kube(e)) if not_found(&e) => return Ok(Action::await_change()),
        r => {
            r?;
        }
    }
    if !deleting {
        match api.delete(&pv.name_any(), &DeleteParams::default()).await {
            Err(e) if !not_found(&e) => return Err(e.into()),
            _ => {}
        }
    }
    Ok(Action::await_change())
}
