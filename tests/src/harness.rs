//! Driver processes, per-case context and the test runner.

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use async_trait::async_trait;
use csi_core::backend::{ControllerRpc, NodeRpc};
use csi_core::csi::{
    self, controller_client::ControllerClient, group_controller_client::GroupControllerClient,
    identity_client::IdentityClient, node_client::NodeClient, volume_capability as vc,
};
use csi_core::server::Endpoint;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// What a suite run needs to know about the storage behind a driver.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// Prefix of every case name, e.g. `local-path/dir`.
    pub name: String,
    /// StorageClass parameters for CreateVolume.
    pub parameters: HashMap<String, String>,
    /// Secrets by call: `CreateVolumeSecret`, `NodeStageVolumeSecret`, ...
    pub secrets: HashMap<String, HashMap<String, String>>,
    /// Whether raw block volumes are supported.
    pub block: bool,
    /// Size of the volumes the cases create.
    pub volume_size: i64,
    /// Filesystem type put in mount capabilities ("" for the driver default).
    pub fs_type: String,
    /// Whether published volumes can grow here (ext4 cannot without CAP_SYS_RESOURCE).
    pub online_expansion: bool,
    /// Whether writes beyond a volume's size must fail.
    pub enforces_size: bool,
    /// Whether the controller sees the node's mounts (node-local drivers) and
    /// so must refuse to delete a volume still staged or published there.
    pub controller_sees_node: bool,
    /// For a controller tested without a node plugin: a host directory
    /// holding the storage, where a volume's data is at the volume
    /// context's `subDir` (an NFS export served from this host).
    pub host_data: Option<PathBuf>,
    /// Whether volume ids legitimately contain `/` (NFS: `server:/share/dir`).
    pub ids_hold_paths: bool,
    /// Whether NodeGetVolumeStats shows the shared filesystem a volume is a
    /// directory of, not the volume's size (NFS).
    pub shared_stats: bool,
    /// How long NodeGetVolumeStats may take to show a write, a new size or
    /// a removed volume (JuiceFS clients load quotas, flush usage and
    /// expire cached entries periodically).
    pub stats_settle: std::time::Duration,
    /// Only these cases, where another profile of the run covers the rest
    /// (code that does not differ between the two).
    pub only: Option<&'static [&'static str]>,
}

impl Profile {
    /// Secrets for one call kind (empty when none are configured).
    pub fn secrets(&self, kind: &str) -> HashMap<String, String> {
        self.secrets.get(kind).cloned().unwrap_or_default()
    }
}

/// Starts fresh driver instances, each with its own state.
#[async_trait]
pub trait Driver: Send + Sync + 'static {
    /// Starts an instance and waits until it answers Probe.
    async fn start(&self) -> Result<Box<dyn Instance>>;
}

/// One running driver.
#[async_trait]
pub trait Instance: Send + Sync {
    /// Where it serves.
    fn endpoint(&self) -> Endpoint;
    /// Stops it with SIGTERM and starts it again on the same state.
    async fn restart(&mut self) -> Result<()>;
    /// Kills it with SIGKILL (no chance to clean up) and starts it again.
    async fn crash(&mut self) -> Result<()>;
    /// Whether [`Instance::break_volume`] is possible with this backend.
    fn can_break_volumes(&self) -> bool;
    /// Makes a volume's storage vanish behind the driver's back (for
    /// volume-condition checks).
    async fn break_volume(&self, volume_id: &str) -> Result<()>;
    /// Stops it and removes mounts and devices left under its state.
    async fn stop(&mut self) -> Result<()>;
}

/// Breaks a volume's storage given the instance state directory and id.
pub type BreakFn = fn(&Path, &str) -> Result<()>;

/// A driver run as a child process; `{endpoint}` and `{state}` in `args`
/// are replaced by the socket path and a fresh state directory.
pub struct CommandDriver {
    /// Program to run.
    pub program: PathBuf,
    /// Arguments with placeholders.
    pub args: Vec<String>,
    /// How to break a volume's storage, if possible.
    pub break_volume: Option<BreakFn>,
    /// Directory in which instance state directories are created (default: the system temp dir).
    pub state_root: Option<PathBuf>,
}

struct CommandInstance {
    program: PathBuf,
    args: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<tokio::process::Child>,
    break_volume: Option<BreakFn>,
}

impl CommandInstance {
    fn sock(&self) -> PathBuf {
        self.dir.path().join("csi.sock")
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("driver.log")
    }

    async fn spawn(&mut self) -> Result<()> {
        let args: Vec<String> = self
            .args
            .iter()
            .map(|a| {
                a.replace("{endpoint}", &self.sock().display().to_string())
                    .replace("{state}", &self.state().display().to_string())
            })
            .collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())?;
        let mut child = tokio::process::Command::new(&self.program);
        child
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        // SAFETY: pre_exec runs in the forked child before exec; prctl is async-signal-safe.
        unsafe {
            child.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = child
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!("driver exited with {status}:\n{}", self.log_text());
            }
            if let Ok(ch) = csi_core::client::connect(&self.endpoint()).await
                && let Ok(r) = IdentityClient::new(ch).probe(csi::ProbeRequest {}).await
                && r.into_inner().ready != Some(false)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "driver did not become ready within 30 s:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    async fn terminate(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!(
                        "driver exited with {status} after SIGTERM:\n{}",
                        self.log_text()
                    );
                }
                Ok(())
            }
            Err(_) => {
                child.kill().await?;
                bail!("driver ignored SIGTERM for 20 s")
            }
        }
    }
}

#[async_trait]
impl Driver for CommandDriver {
    async fn start(&self) -> Result<Box<dyn Instance>> {
        let mut inst = CommandInstance {
            program: self.program.clone(),
            args: self.args.clone(),
            dir: match &self.state_root {
                Some(root) => tempfile::Builder::new()
                    .prefix("rcsi-conf-")
                    .tempdir_in(root)?,
                None => tempfile::Builder::new().prefix("rcsi-conf-").tempdir()?,
            },
            child: None,
            break_volume: self.break_volume,
        };
        std::fs::create_dir_all(inst.state())?;
        inst.spawn().await?;
        Ok(Box::new(inst))
    }
}

#[async_trait]
impl Instance for CommandInstance {
    fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.sock())
    }

    async fn restart(&mut self) -> Result<()> {
        self.terminate().await?;
        self.spawn().await
    }

    async fn crash(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        self.spawn().await
    }

    fn can_break_volumes(&self) -> bool {
        self.break_volume.is_some()
    }

    async fn break_volume(&self, volume_id: &str) -> Result<()> {
        let f = self
            .break_volume
            .ok_or_else(|| anyhow!("this backend cannot break volumes"))?;
        f(&self.state(), volume_id)
    }

    async fn stop(&mut self) -> Result<()> {
        let r = self.terminate().await;
        release_under(self.dir.path())?;
        r
    }
}

/// Unmounts everything below `dir` and detaches loop devices backed by files there.
pub fn release_under(dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut mounts: Vec<PathBuf> = csi_core::mount::parse_mountinfo(&text)
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect();
    mounts.reverse();
    for m in mounts {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
    if let Ok(entries) = std::fs::read_dir("/sys/block") {
        for e in entries.flatten() {
            let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
                continue;
            };
            if Path::new(backing.trim()).starts_with(dir) {
                let _ = std::process::Command::new("losetup")
                    .arg("-d")
                    .arg(Path::new("/dev").join(e.file_name()))
                    .status();
            }
        }
    }
    Ok(())
}

/// Everything one case works with.
pub struct Ctx {
    /// The driver under test.
    pub inst: Box<dyn Instance>,
    /// Raw channel (for hand-built requests).
    pub channel: Channel,
    /// Controller client.
    pub ctl: ControllerClient<Channel>,
    /// Node client.
    pub node: NodeClient<Channel>,
    /// Identity client.
    pub ident: IdentityClient<Channel>,
    /// GroupController client.
    pub group: GroupControllerClient<Channel>,
    /// Storage profile.
    pub profile: Arc<Profile>,
    /// Scratch directory for staging and target paths.
    pub scratch: tempfile::TempDir,
    /// Advertised controller capabilities.
    pub ctl_caps: Vec<ControllerRpc>,
    /// Advertised node capabilities.
    pub node_caps: Vec<NodeRpc>,
    /// Whether the Controller service is advertised.
    pub has_controller: bool,
    /// Whether the GroupController service is advertised.
    pub has_group: bool,
    /// Whether the Node service is served.
    pub has_node: bool,
}

impl Ctx {
    async fn new(inst: Box<dyn Instance>, profile: Arc<Profile>) -> Result<Self> {
        let channel = csi_core::client::connect(&inst.endpoint()).await?;
        let mut ctx = Self {
            inst,
            ctl: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel.clone()),
            ident: IdentityClient::new(channel.clone()),
            group: GroupControllerClient::new(channel.clone()),
            channel,
            profile,
            scratch: tempfile::Builder::new().prefix("rcsi-scratch-").tempdir()?,
            ctl_caps: vec![],
            node_caps: vec![],
            has_controller: false,
            has_group: false,
            has_node: false,
        };
        let caps = query_caps(ctx.channel.clone()).await?;
        (
            ctx.ctl_caps,
            ctx.node_caps,
            ctx.has_controller,
            ctx.has_group,
            ctx.has_node,
        ) = caps;
        Ok(ctx)
    }

    /// Restarts the driver and reconnects.
    pub async fn restart(&mut self) -> Result<()> {
        self.inst.restart().await?;
        self.reconnect().await
    }

    /// Kills the driver with SIGKILL, starts it again and reconnects.
    pub async fn crash(&mut self) -> Result<()> {
        self.inst.crash().await?;
        self.reconnect().await
    }

    async fn reconnect(&mut self) -> Result<()> {
        self.channel = csi_core::client::connect(&self.inst.endpoint()).await?;
        self.ctl = ControllerClient::new(self.channel.clone());
        self.node = NodeClient::new(self.channel.clone());
        self.ident = IdentityClient::new(self.channel.clone());
        self.group = GroupControllerClient::new(self.channel.clone());
        Ok(())
    }

    /// True when the controller advertises `cap`.
    pub fn can(&self, cap: ControllerRpc) -> bool {
        self.ctl_caps.contains(&cap)
    }

    /// True when the node stages volumes.
    pub fn stages(&self) -> bool {
        self.node_caps.contains(&NodeRpc::StageUnstageVolume)
    }

    /// A single-node-writer mount capability with the profile's fsType.
    pub fn mount_cap(&self) -> csi::VolumeCapability {
        cap(
            vc::AccessType::Mount(vc::MountVolume {
                fs_type: self.profile.fs_type.clone(),
                ..Default::default()
            }),
            vc::access_mode::Mode::SingleNodeWriter,
        )
    }

    /// A single-node-writer block capability.
    pub fn block_cap(&self) -> csi::VolumeCapability {
        cap(
            vc::AccessType::Block(vc::BlockVolume {}),
            vc::access_mode::Mode::SingleNodeWriter,
        )
    }

    /// A CreateVolume request with the profile's parameters, secrets and size.
    pub fn create_req(&self, name: &str, cap: csi::VolumeCapability) -> csi::CreateVolumeRequest {
        csi::CreateVolumeRequest {
            name: name.to_owned(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: self.profile.volume_size,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap],
            parameters: self.profile.parameters.clone(),
            secrets: self.profile.secrets("CreateVolumeSecret"),
            ..Default::default()
        }
    }

    /// Creates a mount volume named `name`.
    pub async fn create(&mut self, name: &str) -> Result<csi::Volume> {
        let req = self.create_req(name, self.mount_cap());
        self.create_with(req).await
    }

    /// Sends a CreateVolume request and returns its volume.
    /// ABORTED (a copy still running, another call on the name) is retried
    /// for up to two minutes, as the external-provisioner retries it.
    pub async fn create_with(&mut self, req: csi::CreateVolumeRequest) -> Result<csi::Volume> {
        let name = req.name.clone();
        let start = std::time::Instant::now();
        let r = loop {
            match self.ctl.create_volume(req.clone()).await {
                Err(e)
                    if e.code() == tonic::Code::Aborted
                        && start.elapsed() < std::time::Duration::from_secs(120) =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                r => break r,
            }
        };
        r.with_context(|| format!("CreateVolume {name}"))?
            .into_inner()
            .volume
            .ok_or_else(|| anyhow!("CreateVolume {name} returned no volume"))
    }

    /// Deletes a volume.
    pub async fn delete(&mut self, id: &str) -> Result<()> {
        self.ctl
            .delete_volume(csi::DeleteVolumeRequest {
                volume_id: id.to_owned(),
                secrets: self.profile.secrets("DeleteVolumeSecret"),
            })
            .await
            .with_context(|| format!("DeleteVolume {id}"))?;
        Ok(())
    }

    /// A path inside the scratch directory.
    pub fn path(&self, name: &str) -> String {
        self.scratch.path().join(name).display().to_string()
    }

    /// NodeStageVolume request for a volume at `staging`.
    pub fn stage_req(
        &self,
        v: &csi::Volume,
        cap: csi::VolumeCapability,
        staging: &str,
    ) -> csi::NodeStageVolumeRequest {
        csi::NodeStageVolumeRequest {
            volume_id: v.volume_id.clone(),
            publish_context: HashMap::new(),
            staging_target_path: staging.to_owned(),
            volume_capability: Some(cap),
            secrets: self.profile.secrets("NodeStageVolumeSecret"),
            volume_context: v.volume_context.clone(),
        }
    }

    /// NodePublishVolume request.
    pub fn publish_req(
        &self,
        v: &csi::Volume,
        cap: csi::VolumeCapability,
        staging: &str,
        target: &str,
        readonly: bool,
    ) -> csi::NodePublishVolumeRequest {
        csi::NodePublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            publish_context: HashMap::new(),
            staging_target_path: if self.stages() {
                staging.to_owned()
            } else {
                String::new()
            },
            target_path: target.to_owned(),
            volume_capability: Some(cap),
            readonly,
            secrets: self.profile.secrets("NodePublishVolumeSecret"),
            volume_context: v.volume_context.clone(),
        }
    }

    /// Stages (when the node stages) and publishes a volume; returns
    /// (staging, target). Without a node plugin, the target is the volume's
    /// directory in the profile's `host_data`.
    pub async fn mount(&mut self, v: &csi::Volume, tag: &str) -> Result<(String, String)> {
        if !self.has_node {
            let base = self
                .profile
                .host_data
                .as_ref()
                .ok_or_else(|| anyhow!("no node plugin and no host_data to reach volumes"))?;
            let sub = v
                .volume_context
                .get("subDir")
                .ok_or_else(|| anyhow!("volume context has no subDir"))?;
            return Ok((String::new(), base.join(sub).display().to_string()));
        }
        let staging = self.path(&format!("{tag}-staging"));
        let target = self.path(&format!("{tag}-pod/mount"));
        std::fs::create_dir_all(&staging)?;
        std::fs::create_dir_all(self.path(&format!("{tag}-pod")))?;
        let cap = self.mount_cap();
        if self.stages() {
            let req = self.stage_req(v, cap.clone(), &staging);
            self.node
                .node_stage_volume(req)
                .await
                .context("NodeStageVolume")?;
        }
        let req = self.publish_req(v, cap, &staging, &target, false);
        self.node
            .node_publish_volume(req)
            .await
            .context("NodePublishVolume")?;
        Ok((staging, target))
    }

    /// NodeUnpublishVolume.
    pub async fn unpublish(&mut self, volume_id: &str, target: &str) -> Result<(), Status> {
        self.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: volume_id.to_owned(),
                target_path: target.to_owned(),
            })
            .await
            .map(drop)
    }

    /// NodeUnstageVolume.
    pub async fn unstage(&mut self, volume_id: &str, staging: &str) -> Result<(), Status> {
        self.node
            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: volume_id.to_owned(),
                staging_target_path: staging.to_owned(),
            })
            .await
            .map(drop)
    }

    /// Undoes [`Ctx::mount`].
    pub async fn unmount(&mut self, v: &csi::Volume, staging: &str, target: &str) -> Result<()> {
        if !self.has_node {
            return Ok(());
        }
        self.unpublish(&v.volume_id, target)
            .await
            .context("NodeUnpublishVolume")?;
        if self.stages() {
            self.unstage(&v.volume_id, staging)
                .await
                .context("NodeUnstageVolume")?;
        }
        Ok(())
    }

    /// Volume ids of every ListVolumes page of at most `max_entries` (0: no limit).
    pub async fn list_pages(&mut self, max_entries: i32) -> Result<Vec<Vec<String>>> {
        let mut pages = Vec::new();
        let mut token = String::new();
        loop {
            let r = self
                .ctl
                .list_volumes(csi::ListVolumesRequest {
                    max_entries,
                    starting_token: token,
                })
                .await?
                .into_inner();
            pages.push(
                r.entries
                    .into_iter()
                    .filter_map(|e| e.volume)
                    .map(|v| v.volume_id)
                    .collect(),
            );
            ensure!(pages.len() < 10_000, "pagination does not end");
            if r.next_token.is_empty() {
                return Ok(pages);
            }
            token = r.next_token;
        }
    }

    /// Ids of every volume ListVolumes returns.
    pub async fn list_ids(&mut self) -> Result<Vec<String>> {
        Ok(self.list_pages(0).await?.concat())
    }
}

/// Controller caps, node caps and whether a controller and a group controller are served.
async fn query_caps(
    channel: Channel,
) -> Result<(Vec<ControllerRpc>, Vec<NodeRpc>, bool, bool, bool)> {
    use csi::plugin_capability::{Type as PT, service::Type as ST};
    let plugin = IdentityClient::new(channel.clone())
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await?
        .into_inner();
    let serves = |t: ST| {
        plugin
            .capabilities
            .iter()
            .any(|c| matches!(&c.r#type, Some(PT::Service(s)) if s.r#type == t as i32))
    };
    let (has_controller, has_group) = (
        serves(ST::ControllerService),
        serves(ST::GroupControllerService),
    );
    let mut ctl_caps = Vec::new();
    if has_controller {
        let caps = ControllerClient::new(channel.clone())
            .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
            .await?
            .into_inner();
        ctl_caps = caps
            .capabilities
            .iter()
            .filter_map(|c| match &c.r#type {
                Some(csi::controller_service_capability::Type::Rpc(r)) => {
                    ControllerRpc::try_from(r.r#type).ok()
                }
                None => None,
            })
            .collect();
    }
    // A controller plugin serves no Node service at all.
    let caps = match NodeClient::new(channel)
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
    {
        Err(s) if s.code() == Code::Unimplemented => {
            return Ok((ctl_caps, vec![], has_controller, has_group, false));
        }
        r => r?.into_inner(),
    };
    let node_caps = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(csi::node_service_capability::Type::Rpc(r)) => NodeRpc::try_from(r.r#type).ok(),
            None => None,
        })
        .collect();
    Ok((ctl_caps, node_caps, has_controller, has_group, true))
}

/// Builds a capability.
pub fn cap(access: vc::AccessType, mode: vc::access_mode::Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(access),
        access_mode: Some(vc::AccessMode { mode: mode as i32 }),
    }
}

/// Fails unless `r` is an error with `code`.
pub fn expect_code<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, Status>,
    code: Code,
    what: &str,
) -> Result<()> {
    match r {
        Err(s) if s.code() == code => {
            if s.message().is_empty() {
                bail!("{what}: {code:?} without a message");
            }
            Ok(())
        }
        Err(s) => bail!(
            "{what}: expected {code:?}, got {:?}: {}",
            s.code(),
            s.message()
        ),
        Ok(v) => bail!(
            "{what}: expected {code:?}, got success {:?}",
            v.into_inner()
        ),
    }
}

/// Fails unless `r` is an error with one of `codes`.
pub fn expect_one_of<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, Status>,
    codes: &[Code],
    what: &str,
) -> Result<()> {
    match r {
        Err(s) if codes.contains(&s.code()) => Ok(()),
        Err(s) => bail!(
            "{what}: expected one of {codes:?}, got {:?}: {}",
            s.code(),
            s.message()
        ),
        Ok(v) => bail!(
            "{what}: expected one of {codes:?}, got success {:?}",
            v.into_inner()
        ),
    }
}

/// A case body.
pub type CaseFn = for<'a> fn(&'a mut Ctx) -> Pin<Box<dyn Future<Output = Result<()>> + Send + 'a>>;

/// What a case needs from the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Identity and node only.
    Nothing,
    /// A controller with this capability.
    Controller(ControllerRpc),
    /// A node with this capability (plus create/delete to get volumes).
    Node(NodeRpc),
    /// Raw block volumes.
    Block,
    /// A way to break a volume's storage.
    Breakable,
    /// Volume sizes that the storage enforces.
    SizeEnforced,
    /// A controller that sees the node's mounts.
    ControllerSeesNode,
    /// The GroupController service (volume group snapshots).
    GroupSnapshots,
}

/// A named case.
pub struct Case {
    /// Case name.
    pub name: &'static str,
    /// Requirement.
    pub needs: Needs,
    /// Runs without a Node service.
    pub node_free: bool,
    /// Body.
    pub run: CaseFn,
}

/// Runs `cases` against fresh instances of each driver as libtest trials
/// named `<profile>::<case>`, plus `extra` trials, in a harness=false test binary.
pub fn run_suite(
    suites: Vec<(Arc<dyn Driver>, Profile)>,
    cases: Vec<Case>,
    extra: Vec<libtest_mimic::Trial>,
) -> libtest_mimic::Conclusion {
    run_suite_with(libtest_mimic::Arguments::from_args(), suites, cases, extra)
}

/// [`run_suite`] with given arguments (e.g. one trial at a time, for
/// drivers whose volumes share a listing).
pub fn run_suite_with(
    args: libtest_mimic::Arguments,
    suites: Vec<(Arc<dyn Driver>, Profile)>,
    cases: Vec<Case>,
    extra: Vec<libtest_mimic::Trial>,
) -> libtest_mimic::Conclusion {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "the conformance suite mounts filesystems and attaches loop devices: run it as root"
        );
        std::process::exit(1);
    }
    let cases = Arc::new(cases);
    let mut trials = extra;
    for (driver, profile) in suites {
        let profile = Arc::new(profile);
        let probe = runtime().block_on(async {
            let mut inst = driver.start().await?;
            let caps =
                async { query_caps(csi_core::client::connect(&inst.endpoint()).await?).await }
                    .await;
            let breakable = inst.can_break_volumes();
            inst.stop().await?;
            caps.map(|c| (c, breakable))
        });
        let ((ctl_caps, node_caps, has_controller, has_group, has_node), breakable) = match probe {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{}: cannot start the driver: {e:#}", profile.name);
                std::process::exit(1);
            }
        };
        for (i, case) in cases.iter().enumerate() {
            let supported = (has_node || case.node_free)
                && match case.needs {
                    Needs::Nothing => true,
                    Needs::Controller(c) => has_controller && ctl_caps.contains(&c),
                    Needs::Node(n) => {
                        node_caps.contains(&n)
                            && ctl_caps.contains(&ControllerRpc::CreateDeleteVolume)
                    }
                    Needs::Block => {
                        profile.block && ctl_caps.contains(&ControllerRpc::CreateDeleteVolume)
                    }
                    Needs::Breakable => {
                        breakable && ctl_caps.contains(&ControllerRpc::CreateDeleteVolume)
                    }
                    Needs::SizeEnforced => {
                        profile.enforces_size
                            && ctl_caps.contains(&ControllerRpc::CreateDeleteVolume)
                    }
                    Needs::GroupSnapshots => {
                        has_group && ctl_caps.contains(&ControllerRpc::CreateDeleteSnapshot)
                    }
                    Needs::ControllerSeesNode => {
                        profile.controller_sees_node
                            && ctl_caps.contains(&ControllerRpc::CreateDeleteVolume)
                    }
                };
            if profile.only.is_some_and(|only| !only.contains(&case.name)) {
                eprintln!(
                    "{}::{} not run: another profile of this run covers it",
                    profile.name, case.name
                );
                continue;
            }
            if !supported {
                eprintln!(
                    "{}::{} not run: needs {:?}, which this driver and profile do not offer",
                    profile.name, case.name, case.needs
                );
                continue;
            }
            let (driver, profile, cases) = (driver.clone(), profile.clone(), cases.clone());
            let name = format!("{}::{}", profile.name, case.name);
            trials.push(libtest_mimic::Trial::test(name.clone(), move || {
                let t0 = std::time::Instant::now();
                let r = runtime()
                    .block_on(async {
                        let inst = driver.start().await?;
                        let mut ctx = Ctx::new(inst, profile).await?;
                        let result = (cases[i].run)(&mut ctx).await;
                        let stopped = ctx.inst.stop().await;
                        release_under(ctx.scratch.path())?;
                        result?;
                        stopped
                    })
                    .map_err(|e| format!("{e:#}").into());
                if std::env::var_os("RCSI_CASE_TIMES").is_some() {
                    eprintln!("figure: {name} took {:.1} s", t0.elapsed().as_secs_f64());
                }
                r
            }));
        }
    }
    libtest_mimic::run(&args, trials)
}

/// A filesystem on a loop-attached sparse image, mounted until dropped.
pub struct LoopFs {
    dir: tempfile::TempDir,
}

impl LoopFs {
    /// Creates a `size`-byte image, runs `mkfs.<fs_type> <mkfs_args>` and
    /// mounts it with `options`.
    pub fn new(fs_type: &str, size: u64, mkfs_args: &[&str], options: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("rcsi-loopfs-").tempdir()?;
        let img = dir.path().join("fs.img");
        std::fs::File::create(&img)?.set_len(size)?;
        let run = |cmd: &mut std::process::Command| -> Result<()> {
            let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
            if !out.status.success() {
                bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        run(std::process::Command::new(format!("mkfs.{fs_type}"))
            .args(mkfs_args)
            .arg(&img))?;
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt)?;
        let mut opts = String::from("loop");
        if !options.is_empty() {
            opts.push(',');
            opts.push_str(options);
        }
        run(std::process::Command::new("mount")
            .args(["-t", fs_type, "-o", &opts])
            .arg(&img)
            .arg(&mnt))?;
        Ok(Self { dir })
    }

    /// Where the filesystem is mounted.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = release_under(&self.path());
        let _ = nix::mount::umount2(&self.path(), nix::mount::MntFlags::MNT_DETACH);
        let _ = release_under(self.dir.path());
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A trial that runs this same test binary inside the node VM
/// (`tests/vm/node-vm.sh`) with `env` set, for kernel features the host lacks.
/// The guest runs one trial at a time unless its entry point says otherwise.
pub fn node_vm_trial(name: &str, env: &[(&str, &str)]) -> libtest_mimic::Trial {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let label = name.to_owned();
    libtest_mimic::Trial::test(name, move || {
        let run = || -> Result<()> {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/node-vm.sh");
            let work = tempfile::Builder::new().prefix("rcsi-vm-").tempdir()?;
            let exe = std::env::current_exe()?;
            let out = std::process::Command::new(&script)
                .arg("run")
                .arg(work.path())
                .arg(&exe)
                .args(["--test-threads", "1"])
                .envs(env.iter().cloned())
                .output()
                .with_context(|| format!("running {}", script.display()))?;
            let text = String::from_utf8_lossy(&out.stdout);
            if !out.status.success() {
                bail!(
                    "inside the node VM:\n{text}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let summary = text
                .lines()
                .rev()
                .find(|l| l.starts_with("test result:"))
                .unwrap_or("no summary");
            eprintln!("{label}: {summary}");
            // Figures the guest's trials print.
            let err = String::from_utf8_lossy(&out.stderr);
            for l in text.lines().chain(err.lines()) {
                if let Some(f) = l.split_once("figure: ").map(|(_, f)| f) {
                    eprintln!("{label}: {f}");
                }
            }
            Ok(())
        };
        run().map_err(|e| format!("{e:#}").into())
    })
}

/// Appends 4 KiB and fsyncs, every 5 ms, until stopped; the bytes made
/// durable, or the first error.
pub fn writer(
    path: std::path::PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<std::result::Result<u64, String>> {
    use std::io::Write;
    std::thread::spawn(move || {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("open: {e}"))?;
        let mut done = 0u64;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            f.write_all(&[7u8; 4096])
                .and_then(|_| f.sync_data())
                .map_err(|e| format!("after {done} bytes: {e}"))?;
            done += 4096;
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(done)
    })
}
