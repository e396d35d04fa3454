//! Expansion of bound claims (the csi-resizer's job), following the claim's
//! `allocatedResourceStatuses` so the resizer never touches a claim while the kubelet
//! owns its resize.

use crate::Ctx;
use crate::error::{Error, Result};
use crate::params;
use crate::provision::read_secret;
use csi_core::csi;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use std::time::Duration;

/// How long an infeasible resize waits before it is tried again with the same size.
pub const INFEASIBLE_RETRY: Duration = Duration::from_secs(600);

const CONTROLLER_IN_PROGRESS: &str = "ControllerResizeInProgress";
const CONTROLLER_INFEASIBLE: &str = "ControllerResizeInfeasible";
const NODE_PENDING: &str = "NodeResizePending";
const NODE_IN_PROGRESS: &str = "NodeResizeInProgress";
const NODE_INFEASIBLE: &str = "NodeResizeInfeasible";

/// What a claim says about its resize, in bytes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sizes<'a> {
    /// `spec.resources.requests.storage`.
    pub requested: u64,
    /// `status.capacity.storage` (set by whoever finishes a resize).
    pub status: u64,
    /// The PV's `spec.capacity.storage` (set after ControllerExpandVolume).
    pub pv: u64,
    /// `status.allocatedResources.storage`: the size a resize was started for.
    pub allocated: Option<u64>,
    /// `status.allocatedResourceStatuses.storage`.
    pub state: Option<&'a str>,
    /// The claim has a FileSystemResizePending condition.
    pub fs_pending: bool,
}

/// What the resizer does next for a claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Nothing: no resize asked, or the kubelet owns it.
    Nothing,
    /// The last attempt at this size was infeasible: retry only after a while.
    Later,
    /// Call ControllerExpandVolume for this size (and record it first if it is new).
    Expand(u64),
}

/// Decides what to do, as the upstream resizer does with volume-expansion recovery:
/// finish the size a resize was started for before starting another, and leave claims
/// whose node step is pending or running to the kubelet.
pub fn plan(s: &Sizes) -> Plan {
    if s.requested <= s.status {
        return Plan::Nothing;
    }
    let allocated_or = |v: u64| s.allocated.unwrap_or(v);
    let size = if s.pv < s.requested {
        match s.state {
            Some(NODE_PENDING | NODE_IN_PROGRESS) => {
                let size = allocated_or(s.requested);
                if s.pv >= size {
                    return Plan::Nothing;
                }
                size
            }
            Some(NODE_INFEASIBLE | CONTROLLER_IN_PROGRESS) => allocated_or(s.requested),
            _ => s.requested,
        }
    } else {
        match s.state {
            Some(NODE_PENDING | NODE_IN_PROGRESS) => return Plan::Nothing,
            Some(NODE_INFEASIBLE | CONTROLLER_IN_PROGRESS | CONTROLLER_INFEASIBLE) => {
                allocated_or(s.requested)
            }
            _ => match s.allocated {
                Some(a) => a,
                None if s.fs_pending => return Plan::Nothing,
                None => s.requested,
            },
        }
    };
    if s.state == Some(CONTROLLER_INFEASIBLE) && s.allocated == Some(size) {
        return Plan::Later;
    }
    Plan::Expand(size)
}

/// Reads the sizes `pvc` records; `pv` is left 0 for the caller to fill in.
fn sizes(pvc: &PersistentVolumeClaim) -> Result<Sizes<'_>> {
    let spec = pvc.spec.as_ref();
    let status = pvc.status.as_ref();
    Ok(Sizes {
        requested: params::storage(spec.and_then(|s| s.resources.as_ref()?.requests.as_ref()))?
            .unwrap_or(0),
        status: params::storage(status.and_then(|s| s.capacity.as_ref()))?.unwrap_or(0),
        pv: 0,
        allocated: params::storage(status.and_then(|s| s.allocated_resources.as_ref()))?,
        state: status
            .and_then(|s| s.allocated_resource_statuses.as_ref())
            .and_then(|m| m.get("storage"))
            .map(String::as_str),
        fs_pending: status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "FileSystemResizePending")),
    })
}

/// Reconciles the resize of a bound claim.
pub async fn expand(pvc: &PersistentVolumeClaim, ctx: &Ctx) -> Result<Action> {
    let mut s = sizes(pvc)?;
    if s.requested <= s.status {
        return Ok(Action::await_change());
    }
    let volume = pvc
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .unwrap_or_default();
    let pvs = Api::<PersistentVolume>::all(ctx.client.clone());
    let Some(pv) = pvs.get_opt(&volume).await? else {
        return Ok(Action::await_change());
    };
    let pv_spec = pv.spec.clone().unwrap_or_default();
    let Some(source) = pv_spec.csi.as_ref().filter(|c| c.driver == ctx.driver) else {
        return Ok(Action::await_change());
    };
    let bound_here = pv_spec
        .claim_ref
        .as_ref()
        .is_some_and(|r| r.uid.is_some() && r.uid == pvc.uid());
    if !bound_here || pv.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    if let Some(view) = ctx.node_view().await?
        && !params::affinity_matches(pv_spec.node_affinity.as_ref(), &view.labels)
    {
        return Ok(Action::await_change());
    }
    s.pv = params::storage(pv_spec.capacity.as_ref())?.unwrap_or(0);
    let size = match plan(&s) {
        Plan::Nothing => return Ok(Action::await_change()),
        Plan::Later => return Ok(Action::requeue(INFEASIBLE_RETRY)),
        Plan::Expand(size) => size,
    };
    let claims = Api::<PersistentVolumeClaim>::namespaced(
        ctx.client.clone(),
        &pvc.namespace().unwrap_or_default(),
    );
    let name = pvc.name_any();
    let patch_status = |body: serde_json::Value| {
        let (claims, name) = (claims.clone(), name.clone());
        async move {
            claims
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&body))
                .await
        }
    };
    let now = jiff::Timestamp::now().to_string();
    if s.allocated != Some(size) || s.state != Some(CONTROLLER_IN_PROGRESS) {
        patch_status(json!({"status": {
            "allocatedResources": {"storage": params::format_quantity(size)},
            "allocatedResourceStatuses": {"storage": CONTROLLER_IN_PROGRESS},
            "conditions": [{"type": "Resizing", "status": "True", "lastTransitionTime": now}],
        }}))
        .await?;
    }
    let regarding = pvc.object_ref(&());
    let secrets = read_secret(ctx, source.controller_expand_secret_ref.as_ref()).await?;
    let block = pv_spec.volume_mode.as_deref() == Some("Block");
    let caps = params::capabilities(
        &pv_spec.access_modes.clone().unwrap_or_default(),
        block,
        source.fs_type.as_deref().unwrap_or_default(),
        &pv_spec.mount_options.clone().unwrap_or_default(),
    )?;
    let req = csi::ControllerExpandVolumeRequest {
        volume_id: source.volume_handle.clone(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: size as i64,
            limit_bytes: 0,
        }),
        secrets,
        volume_capability: caps.into_iter().next(),
    };
    let resp = match ctx.csi.expand_volume(req).await {
        Ok(r) => r,
        Err(status) => {
            let e = Error::csi("ControllerExpandVolume", status);
            ctx.event(
                &regarding,
                true,
                "VolumeResizeFailed",
                "Resize",
                e.to_string(),
            )
            .await;
            if !e.is_final_csi() {
                return Err(e);
            }
            // Nothing was done and the same call cannot succeed: say so on the claim,
            // and retry this size only after a while (a new request retries at once).
            let infeasible = matches!(
                e.csi_code(),
                Some(
                    tonic::Code::InvalidArgument
                        | tonic::Code::OutOfRange
                        | tonic::Code::ResourceExhausted
                )
            );
            let state = if infeasible {
                json!({"storage": CONTROLLER_INFEASIBLE})
            } else {
                json!(null)
            };
            patch_status(json!({"status": {
                "allocatedResourceStatuses": state,
                "conditions": [{"type": "ControllerResizeError", "status": "True",
                    "lastTransitionTime": now, "message": e.to_string()}],
            }}))
            .await?;
            return Ok(Action::requeue(INFEASIBLE_RETRY));
        }
    };
    let new_size = (resp.capacity_bytes.max(0) as u64).max(size);
    if new_size > s.pv {
        let patch = json!({"spec": {"capacity": {"storage": params::format_quantity(new_size)}}});
        pvs.patch(&volume, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    let node_step = resp.node_expansion_required;
    if node_step {
        patch_status(json!({"status": {
            "allocatedResourceStatuses": {"storage": NODE_PENDING},
            "conditions": [{"type": "FileSystemResizePending", "status": "True",
                "lastTransitionTime": now,
                "message": "waiting for the kubelet to finish resizing on the node"}],
        }}))
        .await?;
    } else {
        patch_status(json!({"status": {
            "capacity": {"storage": params::format_quantity(new_size)},
            "allocatedResourceStatuses": null,
            "conditions": null,
        }}))
        .await?;
    }
    ctx.event(
        &regarding,
        false,
        if node_step {
            "FileSystemResizeRequired"
        } else {
            "VolumeResizeSuccessful"
        },
        "Resize",
        format!("volume {volume} expanded to {new_size} bytes"),
    )
    .await;
    ctx.capacity_changed.notify_one();
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn s(requested: u64, status: u64, pv: u64) -> Sizes<'static> {
        Sizes {
            requested,
            status,
            pv,
            ..Default::default()
        }
    }

    #[test]
    fn a_new_request_expands_and_a_met_one_does_nothing() {
        assert_eq!(plan(&s(2 * G, G, G)), Plan::Expand(2 * G));
        assert_eq!(plan(&s(G, G, G)), Plan::Nothing);
        assert_eq!(plan(&s(G, 2 * G, 2 * G)), Plan::Nothing);
    }

    #[test]
    fn the_kubelets_resize_is_left_alone() {
        for state in [NODE_PENDING, NODE_IN_PROGRESS] {
            let mut x = s(2 * G, G, 2 * G);
            x.allocated = Some(2 * G);
            x.state = Some(state);
            assert_eq!(plan(&x), Plan::Nothing, "{state}");
            // A larger request waits for the running resize... unless the PV is behind.
            x.requested = 3 * G;
            assert_eq!(plan(&x), Plan::Nothing, "{state}");
            x.pv = G;
            assert_eq!(plan(&x), Plan::Expand(2 * G), "{state}");
        }
        let mut x = s(2 * G, G, 2 * G);
        x.fs_pending = true;
        assert_eq!(plan(&x), Plan::Nothing);
    }

    #[test]
    fn an_interrupted_controller_resize_is_finished_at_its_size() {
        let mut x = s(3 * G, G, G);
        x.allocated = Some(2 * G);
        x.state = Some(CONTROLLER_IN_PROGRESS);
        assert_eq!(plan(&x), Plan::Expand(2 * G));
        x.pv = 3 * G;
        assert_eq!(plan(&x), Plan::Expand(2 * G));
        // Statuses cleared but the allocation recorded: resume it.
        x.state = None;
        assert_eq!(plan(&x), Plan::Expand(2 * G));
    }

    #[test]
    fn an_infeasible_size_waits_but_a_new_request_is_tried() {
        let mut x = s(9 * G, G, G);
        x.allocated = Some(9 * G);
        x.state = Some(CONTROLLER_INFEASIBLE);
        assert_eq!(plan(&x), Plan::Later);
        x.requested = 2 * G;
        assert_eq!(plan(&x), Plan::Expand(2 * G));
        let mut n = s(2 * G, G, 2 * G);
        n.allocated = Some(2 * G);
        n.state = Some(NODE_INFEASIBLE);
        assert_eq!(plan(&n), Plan::Expand(2 * G));
    }
}
