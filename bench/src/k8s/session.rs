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
        let start = Instant::now();
        self.wait_running(&created, &mut times, start).await?;
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

    /// Waits until every pod runs, recording when each claim was Bound and
    /// each pod Running from the moment the API says so: one list of the
    /// claims and one of the pods, then a watch on each from there (watched
    /// again from the last version seen when the server ends it, listed
    /// again when that version has expired).
    async fn wait_running(
        &self,
        created: &[Instant],
        times: &mut [VolumeTimes],
        start: Instant,
    ) -> Result<()> {
        use futures::{StreamExt, TryStreamExt};
        use kube::api::{WatchEvent, WatchParams};
        let (pvcs, pods): (Api<PersistentVolumeClaim>, Api<Pod>) = (self.api(), self.api());
        let labels = self.selector.label_selector.clone().unwrap_or_default();
        let mut versions: Option<(String, String)> = None;
        loop {
            let (claim_rv, pod_rv) = match versions.take() {
                Some(v) => v,
                None => {
                    let claims = pvcs
                        .list(&self.selector)
                        .await
                        .map_err(|e| api_error("listing the claims", e))?;
                    let running = pods
                        .list(&self.selector)
                        .await
                        .map_err(|e| api_error("listing the pods", e))?;
                    for c in &claims.items {
                        claim_seen(c, created, times);
                    }
                    for p in &running.items {
                        pod_seen(p, created, times)?;
                    }
                    let rv =
                        |m: &kube::api::ListMeta| m.resource_version.clone().unwrap_or_default();
                    (rv(&claims.metadata), rv(&running.metadata))
                }
            };
            if all_ready(times) {
                return Ok(());
            }
            let left = self.timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(self.stuck(times).await);
            }
            let wp = WatchParams::default()
                .labels(&labels)
                .timeout(left.as_secs().clamp(1, 290) as u32);
            let claim_events = pvcs
                .watch(&wp, &claim_rv)
                .await
                .map_err(|e| api_error("watching the claims", e))?
                .map_ok(Err);
            let pod_events = pods
                .watch(&wp, &pod_rv)
                .await
                .map_err(|e| api_error("watching the pods", e))?
                .map_ok(Ok);
            let mut events = futures::stream::select(claim_events.boxed(), pod_events.boxed());
            let (mut claim_rv, mut pod_rv) = (claim_rv, pod_rv);
            loop {
                let left = self.timeout.saturating_sub(start.elapsed());
                let next = match tokio::time::timeout(left, events.next()).await {
                    Err(_) => return Err(self.stuck(times).await),
                    // The server ended a watch: watch again from where it stopped.
                    Ok(None) => break,
                    Ok(Some(ev)) => ev.map_err(|e| api_error("watching claims and pods", e))?,
                };
                match next {
                    Err(WatchEvent::Added(c) | WatchEvent::Modified(c)) => {
                        claim_rv = c.metadata.resource_version.clone().unwrap_or(claim_rv);
                        claim_seen(&c, created, times);
                    }
                    Ok(WatchEvent::Added(p) | WatchEvent::Modified(p)) => {
                        pod_rv = p.metadata.resource_version.clone().unwrap_or(pod_rv);
                        pod_seen(&p, created, times)?;
                    }
                    Err(WatchEvent::Bookmark(b)) => claim_rv = b.metadata.resource_version,
                    Ok(WatchEvent::Bookmark(b)) => pod_rv = b.metadata.resource_version,
                    Err(WatchEvent::Deleted(c)) => {
                        return Err(BenchError::Cluster(format!(
                            "claim {} was deleted while the run waited for it",
                            c.metadata.name.unwrap_or_default()
                        )));
                    }
                    Ok(WatchEvent::Deleted(p)) => {
                        return Err(BenchError::Cluster(format!(
                            "pod {} was deleted while the run waited for it",
                            p.metadata.name.unwrap_or_default()
                        )));
                    }
                    // 410 Gone: the version is too old; list again.
                    Err(WatchEvent::Error(e)) | Ok(WatchEvent::Error(e)) if e.code == 410 => {
                        claim_rv.clear();
                        break;
                    }
                    Err(WatchEvent::Error(e)) | Ok(WatchEvent::Error(e)) => {
                        return Err(BenchError::Cluster(format!(
                            "watching claims and pods: {} ({})",
                            e.message, e.code
                        )));
                    }
                }
                if all_ready(times) {
                    return Ok(());
                }
            }
            if !claim_rv.is_empty() {
                versions = Some((claim_rv, pod_rv));
            }
        }
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

/// Whether every claim was seen Bound and every pod Running.
fn all_ready(times: &[VolumeTimes]) -> bool {
    times
        .iter()
        .all(|t| t.bound_s.is_some() && t.running_s.is_some())
}

/// The index of a run's object by name.
fn index(name: Option<&str>, times: &[VolumeTimes]) -> Option<usize> {
    times.iter().position(|t| Some(t.name.as_str()) == name)
}

/// Records when claim `c` was first seen Bound.
fn claim_seen(c: &PersistentVolumeClaim, created: &[Instant], times: &mut [VolumeTimes]) {
    let Some(i) = index(c.metadata.name.as_deref(), times) else {
        return;
    };
    let phase = c.status.as_ref().and_then(|s| s.phase.as_deref());
    if times[i].bound_s.is_none() && phase == Some("Bound") {
        times[i].bound_s = Some(created[i].elapsed().as_secs_f64());
    }
}

/// Records when pod `p` was first seen Running (and where); an error when it cannot come up.
fn pod_seen(p: &Pod, created: &[Instant], times: &mut [VolumeTimes]) -> Result<()> {
    let Some(i) = index(p.metadata.name.as_deref(), times) else {
        return Ok(());
    };
    pod_failure(p)?;
    let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
    if times[i].running_s.is_none() && phase == Some("Running") {
        times[i].running_s = Some(created[i].elapsed().as_secs_f64());
        times[i].node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
    }
    Ok(())
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
