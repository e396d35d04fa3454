//! The cluster side of `rbench k8s`: preflight checks, the objects of a
//! run and their status, and their deletion.

use super::VolumeTimes;
use super::objects::{RUN_LABEL, SERVICE_PORT, Spec};
use super::tunnel::{self, Tunnel};
use crate::error::{BenchError, Result};
use k8s_openapi::api::core::v1::{
    Event, Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod, Secret,
};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A failed API call, said plainly (quota and RBAC refusals included).
fn api_error(what: &str, e: kube::Error) -> BenchError {
    let msg = match &e {
        kube::Error::Api(s) if s.is_forbidden() && s.message.contains("exceeded quota") => {
            format!(
                "{what}: the namespace's ResourceQuota refuses it: {}",
                s.message
            )
        }
        kube::Error::Api(s) if s.is_forbidden() => format!(
            "{what}: forbidden ({}); manifests/rbench holds the Role and ClusterRole rbench k8s needs",
            s.message
        ),
        kube::Error::Api(s) => format!("{what}: {} ({})", s.message, s.code),
        e => format!("{what}: {e}"),
    };
    BenchError::Cluster(msg)
}

/// The cluster side of a run: the API, the namespace and what was made.
pub struct Session {
    client: kube::Client,
    tunnel: Arc<dyn Tunnel>,
    ns: String,
    own_ns: bool,
    timeout: Duration,
    /// Claims and pods made (for cleanup).
    claims: Vec<String>,
    pods: Vec<String>,
    secret: Option<String>,
    /// Selects the pods and claims of the class being measured.
    selector: ListParams,
    /// How often the API is polled while waiting.
    poll: Duration,
}

impl Session {
    /// A session in namespace `ns` (made by it when `own_ns`).
    pub fn new(
        client: kube::Client,
        tunnel: Arc<dyn Tunnel>,
        ns: String,
        own_ns: bool,
        timeout: Duration,
    ) -> Self {
        Self {
            client,
            tunnel,
            ns,
            own_ns,
            timeout,
            claims: vec![],
            pods: vec![],
            secret: None,
            selector: ListParams::default(),
            poll: Duration::from_millis(250),
        }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Refuses what cannot work before anything is made: a StorageClass
    /// that does not exist, no node a pod can run on, a namespace to use
    /// that does not exist.
    pub async fn preflight(&self, classes: &[String]) -> Result<()> {
        let sc: Api<StorageClass> = Api::all(self.client.clone());
        for c in classes {
            let found = sc
                .get_opt(c)
                .await
                .map_err(|e| api_error(&format!("reading StorageClass {c}"), e))?;
            if found.is_none() {
                let known: Vec<String> = sc
                    .list(&ListParams::default())
                    .await
                    .map(|l| {
                        l.items
                            .into_iter()
                            .filter_map(|s| s.metadata.name)
                            .collect()
                    })
                    .unwrap_or_default();
                return Err(BenchError::Usage(format!(
                    "StorageClass {c:?} does not exist (there are: {})",
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                )));
            }
        }
        let nodes: Api<Node> = Api::all(self.client.clone());
        let nodes = nodes
            .list(&ListParams::default())
            .await
            .map_err(|e| api_error("listing nodes", e))?;
        let usable = nodes.items.iter().filter(|n| schedulable(n)).count();
        if usable == 0 {
            return Err(BenchError::Cluster(format!(
                "no node can run the benchmark's pods ({} nodes, all cordoned, not Ready or tainted NoSchedule)",
                nodes.items.len()
            )));
        }
        if !self.own_ns {
            let ns: Api<Namespace> = Api::all(self.client.clone());
            let found = ns
                .get_opt(&self.ns)
                .await
                .map_err(|e| api_error(&format!("reading namespace {}", self.ns), e))?;
            if found.is_none() {
                return Err(BenchError::Usage(format!(
                    "namespace {:?} does not exist (leave out --namespace to use a new one)",
                    self.ns
                )));
            }
        }
        Ok(())
    }

    /// Creates the namespace (when its own) and the Secret.
    pub async fn prepare(&mut self, spec: &Spec, secret: &str) -> Result<()> {
        if self.own_ns {
            let ns: Api<Namespace> = Api::all(self.client.clone());
            ns.create(&PostParams::default(), &spec.namespace(&self.ns))
                .await
                .map_err(|e| api_error(&format!("creating namespace {}", self.ns), e))?;
        }
        let secrets: Api<Secret> = self.api();
        secrets
            .create(&PostParams::default(), &spec.secret(secret))
            .await
            .map_err(|e| api_error("creating the Secret", e))?;
        self.secret = Some(spec.secret_name.clone());
        Ok(())
    }

    /// Creates `n` claims and pods, waits until every service answers and
    /// returns their times and the local addresses that reach them.
    pub async fn provision(
        &mut self,
        spec: &Spec,
        n: usize,
    ) -> Result<(Vec<VolumeTimes>, Vec<SocketAddr>)> {
        let (pvcs, pods): (Api<PersistentVolumeClaim>, Api<Pod>) = (self.api(), self.api());
        self.selector = ListParams::default().labels(&format!("{RUN_LABEL}={}", spec.run));
        let names: Vec<String> = (0..n).map(|i| format!("rbench-{i}")).collect();
        let mut created = Vec::new();
        for name in &names {
            created.push(Instant::now());
            pvcs.create(&PostParams::default(), &spec.claim(name))
                .await
                .map_err(|e| api_error(&format!("creating claim {name}"), e))?;
            self.claims.push(name.clone());
        }
        let start = Instant::now();
        for name in &names {
            loop {
                match pods.create(&PostParams::default(), &spec.pod(name)).await {
                    Ok(_) => break,
                    // A namespace just made has no default ServiceAccount
                    // for a moment; admission refuses pods until it does.
                    Err(kube::Error::Api(s))
                        if s.message.contains("serviceaccount")
                            && s.message.contains("not found")
                            && start.elapsed() < self.timeout =>
                    {
                        tokio::time::sleep(self.poll).await;
                    }
                    Err(e) => return Err(api_error(&format!("creating pod {name}"), e)),
                }
            }
            self.pods.push(name.clone());
        }
        let mut times: Vec<VolumeTimes> = names
            .iter()
            .map(|n| VolumeTimes {
                name: n.clone(),
                ..Default::default()
            })
            .collect();
        let selector = self.selector.clone();
        let start = Instant::now();
        loop {
            let claims = pvcs
                .list(&selector)
                .await
                .map_err(|e| api_error("listing the claims", e))?;
            let running = pods
                .list(&selector)
                .await
                .map_err(|e| api_error("listing the pods", e))?;
            for (i, t) in times.iter_mut().enumerate() {
                let claim = claims
                    .items
                    .iter()
                    .find(|c| c.metadata.name.as_deref() == Some(&t.name));
                let phase = claim.and_then(|c| c.status.as_ref()?.phase.as_deref());
                if t.bound_s.is_none() && phase == Some("Bound") {
                    t.bound_s = Some(created[i].elapsed().as_secs_f64());
                }
                let pod = running
                    .items
                    .iter()
                    .find(|p| p.metadata.name.as_deref() == Some(&t.name));
                if let Some(p) = pod {
                    pod_failure(p)?;
                    let status = p.status.as_ref();
                    if t.running_s.is_none()
                        && status.and_then(|s| s.phase.as_deref()) == Some("Running")
                    {
                        t.running_s = Some(created[i].elapsed().as_secs_f64());
                        t.node = p
                            .spec
                            .as_ref()
                            .and_then(|s| s.node_name.clone())
                            .unwrap_or_default();
                    }
                }
            }
            if times.iter().all(|t| t.running_s.is_some()) {
                break;
            }
            if start.elapsed() > self.timeout {
                return Err(self.stuck(&times).await);
            }
            tokio::time::sleep(self.poll).await;
        }
        let mut addrs = Vec::new();
        for (i, t) in times.iter_mut().enumerate() {
            let addr = tunnel::forward(self.tunnel.clone(), &self.ns, &t.name, SERVICE_PORT)
                .await
                .map_err(|e| BenchError::io(format!("forwarding to pod {}", t.name), e))?;
            let left = self.timeout.saturating_sub(start.elapsed());
            tunnel::answering(addr, left, self.poll)
                .await
                .map_err(|e| BenchError::io(format!("the service in pod {}", t.name), e))?;
            t.answering_s = Some(created[i].elapsed().as_secs_f64());
            addrs.push(addr);
        }
        Ok((times, addrs))
    }

    /// The error for claims or pods not ready in time, with their events.
    async fn stuck(&self, times: &[VolumeTimes]) -> BenchError {
        let events: Api<Event> = self.api();
        let mut lines = Vec::new();
        for t in times.iter().filter(|t| t.running_s.is_none()) {
            let (what, kind) = if t.bound_s.is_none() {
                ("claim", "PersistentVolumeClaim")
            } else {
                ("pod", "Pod")
            };
            let lp = ListParams::default().fields(&format!(
                "involvedObject.name={},involvedObject.kind={kind}",
                t.name
            ));
            let said: Vec<String> = events
                .list(&lp)
                .await
                .map(|l| {
                    l.items
                        .into_iter()
                        .map(|e| {
                            format!(
                                "{}: {}",
                                e.reason.unwrap_or_default(),
                                e.message.unwrap_or_default()
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            lines.push(format!(
                "{what} {} not ready; events: {}",
                t.name,
                if said.is_empty() {
                    "none".into()
                } else {
                    said.join(" | ")
                }
            ));
        }
        BenchError::Cluster(format!(
            "not ready after {:?} (--timeout): {}",
            self.timeout,
            lines.join("; ")
        ))
    }

    /// Deletes the pods and claims made, pods first (their claims are in
    /// use until then), recording per claim the time until its PV is gone;
    /// returns what could not be removed.
    pub async fn cleanup(&mut self, times: &mut [VolumeTimes]) -> Vec<String> {
        let mut left = Vec::new();
        let (pvcs, pods): (Api<PersistentVolumeClaim>, Api<Pod>) = (self.api(), self.api());
        let now = DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        };
        for p in std::mem::take(&mut self.pods) {
            if let Err(e) = pods.delete(&p, &now).await
                && !not_found(&e)
            {
                left.push(format!("pod {p}: {e}"));
            }
        }
        let start = Instant::now();
        loop {
            let listed = pods.list(&self.selector).await;
            if listed.is_ok_and(|l| l.items.is_empty()) || start.elapsed() > self.timeout {
                break;
            }
            tokio::time::sleep(self.poll).await;
        }
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let mut deleting = Vec::new();
        for c in std::mem::take(&mut self.claims) {
            let pv = pvcs
                .get_opt(&c)
                .await
                .ok()
                .flatten()
                .and_then(|c| c.spec?.volume_name);
            match pvcs.delete(&c, &DeleteParams::default()).await {
                Ok(_) => deleting.push((c, pv, Instant::now())),
                Err(e) if not_found(&e) => {}
                Err(e) => left.push(format!("claim {c}: {e}")),
            }
        }
        let start = Instant::now();
        while !deleting.is_empty() && start.elapsed() < self.timeout {
            let mut still = Vec::new();
            for (c, pv, t) in deleting {
                let gone = match &pv {
                    Some(pv) => matches!(pvs.get_opt(pv).await, Ok(None)),
                    None => matches!(pvcs.get_opt(&c).await, Ok(None)),
                };
                if gone {
                    if let Some(v) = times.iter_mut().find(|v| v.name == c) {
                        v.deleted_s = Some(t.elapsed().as_secs_f64());
                    }
                } else {
                    still.push((c, pv, t));
                }
            }
            deleting = still;
            if !deleting.is_empty() {
                tokio::time::sleep(self.poll).await;
            }
        }
        for (c, pv, _) in deleting {
            left.push(format!(
                "claim {c}'s volume {} still exists after {:?} (reclaimPolicy Retain, or the provisioner is slow)",
                pv.unwrap_or_default(),
                self.timeout
            ));
        }
        left
    }

    /// Deletes the Secret and the namespace when it is the run's own;
    /// returns what could not be removed.
    pub async fn cleanup_rest(&mut self) -> Vec<String> {
        let mut left = Vec::new();
        if let Some(s) = self.secret.take() {
            let secrets: Api<Secret> = self.api();
            if let Err(e) = secrets.delete(&s, &DeleteParams::default()).await
                && !not_found(&e)
            {
                left.push(format!("secret {s}: {e}"));
            }
        }
        if self.own_ns {
            let ns: Api<Namespace> = Api::all(self.client.clone());
            if let Err(e) = ns.delete(&self.ns, &DeleteParams::default()).await
                && !not_found(&e)
            {
                left.push(format!("namespace {}: {e}", self.ns));
            }
            self.own_ns = false;
        }
        left
    }
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}

/// Whether a pod without tolerations can run on node `n`.
fn schedulable(n: &Node) -> bool {
    let spec = n.spec.as_ref();
    let cordoned = spec.and_then(|s| s.unschedulable).unwrap_or(false);
    let tainted = spec
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.effect == "NoSchedule"));
    let ready = n
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    ready && !cordoned && !tainted
}

/// An error when pod `p` cannot come up: its image cannot be pulled, its
/// container cannot be made, it cannot be scheduled, or it failed.
fn pod_failure(p: &Pod) -> Result<()> {
    let name = p.metadata.name.clone().unwrap_or_default();
    let Some(status) = &p.status else {
        return Ok(());
    };
    if status.phase.as_deref() == Some("Failed") {
        return Err(BenchError::Cluster(format!(
            "pod {name} failed: {}",
            status.message.clone().unwrap_or_default()
        )));
    }
    for c in status.container_statuses.iter().flatten() {
        let waiting = c.state.as_ref().and_then(|s| s.waiting.as_ref());
        if let Some(w) = waiting {
            let reason = w.reason.as_deref().unwrap_or_default();
            if matches!(
                reason,
                "ErrImagePull"
                    | "ImagePullBackOff"
                    | "InvalidImageName"
                    | "CreateContainerConfigError"
                    | "CreateContainerError"
            ) {
                return Err(BenchError::Cluster(format!(
                    "pod {name}: {reason}: {} (--image {})",
                    w.message.clone().unwrap_or_default(),
                    c.image
                )));
            }
        }
        if let Some(t) = c.state.as_ref().and_then(|s| s.terminated.as_ref()) {
            return Err(BenchError::Cluster(format!(
                "pod {name}: rbench --service exited ({}): {}",
                t.exit_code,
                t.message.clone().unwrap_or_default()
            )));
        }
    }
    Ok(())
}
