//! The node: an image becomes a block device through one of the
//! [`DeviceMapper`]s of `mapper.rs` (krbd, rbd-nbd, rbd-fuse + loop), gets
//! a filesystem when blank, is mounted at the staging path and bound at its
//! targets; raw block volumes bind the device.
//!
//! Per staged volume a state file (0600 in a 0700 directory) says which
//! image backs it and through which device; the keyring rbd-fuse reads
//! sits beside it. The mapping processes are detached, so they outlive the
//! plugin, and a restarted plugin finds everything from these files and the
//! kernel's mount and loop tables.

use super::mapper::{Krbd, NBD_REATTACH, RbdFuse, RbdNbd};
use super::params::Mounter as MounterKind;
use super::{Rbd, creds_of};
use crate::id::CephId;
use crate::keyfiles::KeyFiles;
use crate::secret::Credentials;
use crate::volstate::VolumeStates;
use async_trait::async_trait;
use csi_core::backend::{NodeBackend, NodeInfo, NodeRpc, VolumeStats};
use csi_core::blockdev::{BlockDevices, DeviceMapper, LoopDevices, Mapping};
use csi_core::daemon::Spawner;
use csi_core::devvol::{Format, elsewhere, mount_filesystem, publish_device, same_device};
use csi_core::exec::Exec;
use csi_core::fsutil::{DirLock, LOCK_WAIT};
use csi_core::mount::{MountInfo, Mounter, exposures, vfs_flags};
use csi_core::stats::{Heals, StatsCache};
use csi_core::types::{AccessMode, AccessType, Capability, NodeExpand, PublishVolume, StageVolume};
use csi_core::{Error, IoContext, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Settings of the node plugin.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's id.
    pub node_id: String,
    /// Where state files, keyrings and rbd-fuse mounts live (on the host's
    /// filesystem, e.g. under the kubelet's plugins directory).
    pub state_dir: PathBuf,
    /// The rbd-fuse program.
    pub rbd_fuse: String,
    /// The rbd program (`rbd map` for krbd).
    pub rbd: String,
    /// The rbd-nbd program.
    pub rbd_nbd: String,
    /// How long a mapping, mount or unmount may take.
    pub mount_timeout: Duration,
    /// How long a statfs may take before the volume is reported abnormal.
    pub stats_timeout: Duration,
    /// How long NodeGetVolumeStats answers from its cache.
    pub stats_cache: Duration,
}

impl Staged {
    /// Whether a kernel block device (krbd or nbd) holds the mapping, with
    /// no rbd-fuse file and loop device.
    fn kernel_device(&self) -> bool {
        self.krbd || self.nbd
    }

    /// The image as `pool[/namespace]/image`.
    fn spec(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{ns}/{}", self.pool, self.image),
            None => format!("{}/{}", self.pool, self.image),
        }
    }
}

/// The privileged operations of the node.
pub struct NodeHost {
    /// Mount operations.
    pub mounter: Arc<dyn Mounter>,
    /// Loop devices (rbd-fuse files become devices).
    pub loops: Arc<dyn LoopDevices>,
    /// Filesystems on devices.
    pub blockdev: Arc<dyn BlockDevices>,
    /// Detached helper processes (rbd-fuse).
    pub spawner: Arc<dyn Spawner>,
    /// Programs (`rbd map`, `rbd unmap`).
    pub exec: Arc<dyn Exec>,
}

/// The node side of the driver.
pub(crate) struct Node {
    cfg: NodeConfig,
    host: NodeHost,
    keys: KeyFiles,
    /// Keeps a second plugin off the state directory while this one runs.
    _lock: DirLock,
    states: VolumeStates,
    stats: StatsCache,
    krbd: Krbd,
    nbd: RbdNbd,
    fuse: RbdFuse,
    /// Per volume: when and how its mapping was last healed.
    heals: Heals,
}

/// How long the volume condition reports a heal.
const HEAL_REPORT: Duration = Duration::from_secs(3600);

/// What is known of a staged volume.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Staged {
    cluster: String,
    pool: String,
    namespace: Option<String>,
    image: String,
    user: String,
    /// Raw block (no filesystem).
    block: bool,
    /// Mapped by the kernel (krbd), not rbd-fuse.
    #[serde(default)]
    krbd: bool,
    /// Mapped by rbd-nbd.
    #[serde(default)]
    nbd: bool,
    /// The cookie of the rbd-nbd device (the volume id), by which the
    /// kernel names it and a new rbd-nbd attaches to it.
    #[serde(default)]
    cookie: String,
    /// `mapOptions` of the StorageClass (rbd-nbd's options when it attaches again).
    #[serde(default)]
    map_options: Option<String>,
    /// The loop device attached to it.
    dev: Option<PathBuf>,
    /// The rbd-fuse client's address as the image's watcher (to blocklist
    /// it when it died: its watch would keep the image busy for a while).
    #[serde(default)]
    watcher: Option<String>,
    /// Where the filesystem is mounted, its type and mount options (to
    /// mount it again when its rbd-fuse is replaced).
    #[serde(default)]
    staging: Option<PathBuf>,
    #[serde(default)]
    fs_type: Option<String>,
    #[serde(default)]
    mount_options: Vec<String>,
    /// A dead rbd-fuse's loop device whose mounts are still to be replaced
    /// by mounts of `dev` (a heal in progress).
    #[serde(default)]
    replaced: Option<PathBuf>,
}

fn describe(e: &Error) -> String {
    format!("the volume's filesystem does not answer: {e}")
}

fn ctx<'a>(c: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    c.get(key).map(String::as_str).filter(|v| !v.is_empty())
}

/// The image a volume names: `imageName` in its context, or for a static
/// volume (`staticVolume: "true"`, as ceph-csi has them) the volume id.
fn image_of(volume_id: &str, c: &HashMap<String, String>) -> Result<(String, String, String)> {
    let need = |k: &str| {
        ctx(c, k).map(str::to_owned).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "volume_context has no {k:?}: a volume of rbd.rcsi.io carries clusterID, pool and imageName (a static PV sets clusterID, pool and staticVolume: \"true\")"
            ))
        })
    };
    let cluster = need("clusterID")?;
    let pool = need("pool")?;
    let image = if ctx(c, "staticVolume") == Some("true") {
        volume_id.to_owned()
    } else {
        need("imageName")?
    };
    let ok = image.len() <= 255
        && image
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
        && !image.starts_with('.');
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "image name {image:?} is not one rbd-fuse can expose (A-Z a-z 0-9 - _ .)"
        )));
    }
    Ok((cluster, pool, image))
}

/// NotFound unless `volume_id` is the image its context names (a
/// provisioned volume's image carries its id's uuid; static volumes are
/// believed).
fn check_ours(
    volume_id: &str,
    c: &HashMap<String, String>,
    cluster: &str,
    pool: &str,
    image: &str,
) -> Result<()> {
    if ctx(c, "staticVolume") == Some("true") {
        return Ok(());
    }
    let ours = CephId::parse(volume_id).is_some_and(|id| {
        id.cluster == cluster && image.ends_with(&id.uuid.hyphenated().to_string())
    });
    if ours {
        return Ok(());
    }
    Err(Error::NotFound(format!(
        "volume {volume_id} is not the image {pool}/{image} its context names (a static PV sets staticVolume: \"true\")"
    )))
}

fn mount_flags(cap: &Capability) -> &[String] {
    match &cap.access {
        AccessType::Mount { flags, .. } => flags,
        AccessType::Block => &[],
    }
}

impl Node {
    /// The node side with its state under `cfg.state_dir`.
    pub(crate) fn open(cfg: NodeConfig, host: NodeHost) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        for d in ["", "fuse"] {
            let dir = cfg.state_dir.join(d);
            std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .ctx(|| format!("chmod {}", dir.display()))?;
        }
        // Two plugins on one state directory would heal the same mounts.
        let lock = DirLock::acquire(&cfg.state_dir, "state directory", LOCK_WAIT)?;
        let krbd = Krbd {
            exec: host.exec.clone(),
            rbd: cfg.rbd.clone(),
            timeout: cfg.mount_timeout,
        };
        let nbd = RbdNbd {
            exec: host.exec.clone(),
            spawner: host.spawner.clone(),
            rbd_nbd: cfg.rbd_nbd.clone(),
            log_dir: cfg.state_dir.join("nbd"),
            timeout: cfg.mount_timeout,
            lock: tokio::sync::Mutex::new(()),
        };
        let fuse = RbdFuse {
            mounter: host.mounter.clone(),
            spawner: host.spawner.clone(),
            loops: host.loops.clone(),
            rbd_fuse: cfg.rbd_fuse.clone(),
            dir: cfg.state_dir.join("fuse"),
            timeout: cfg.mount_timeout,
        };
        let keys = KeyFiles::open(cfg.state_dir.join("keys"), cfg.mount_timeout)?;
        let states = VolumeStates::open(cfg.state_dir.join("volumes"), cfg.mount_timeout)?;
        Ok(Self {
            _lock: lock,
            keys,
            states,
            cfg,
            host,
            stats: StatsCache::new("the RBD image does not answer", describe),
            krbd,
            nbd,
            fuse,
            heals: Heals::new(HEAL_REPORT),
        })
    }

    /// Detaches a loop device that was replaced, in the background: the
    /// kernel frees it at its last close, which may be a container's.
    fn release_loop(&self, dev: PathBuf) {
        let loops = self.host.loops.clone();
        tokio::spawn(async move {
            if let Err(e) = loops.detach_loop(&dev).await {
                tracing::info!(device = %dev.display(), error = %e, "a replaced loop device is detached at its last close");
            }
        });
    }

    /// The mapper that maps a staged volume.
    fn mapper(&self, s: &Staged) -> &dyn DeviceMapper {
        if s.krbd {
            &self.krbd
        } else if s.nbd {
            &self.nbd
        } else {
            &self.fuse
        }
    }

    /// What the mapper maps for a staged volume (`key` is the volume id).
    fn mapping(&self, volume_id: &str, s: &Staged) -> Mapping {
        let k = self.keys.paths(&s.cluster, &s.user);
        Mapping {
            source: s.spec(),
            key: if s.nbd {
                s.cookie.clone()
            } else {
                volume_id.to_owned()
            },
            options: s.map_options.clone(),
            client: vec![
                "-c".into(),
                k.conf.into(),
                "--id".into(),
                s.user.clone().into(),
                "--keyring".into(),
                k.keyring.into(),
            ],
            device: s.dev.clone(),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        what: String,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        csi_core::fsutil::blocking(what, self.cfg.mount_timeout, f).await
    }

    /// Whether the image is mapped here and answering.
    async fn mapped(&self, volume_id: &str, s: &Staged) -> Result<bool> {
        let (mapper, m) = (self.mapper(s), self.mapping(volume_id, s));
        Ok(mapper.find(&m).await?.is_some() && mapper.alive(&m).await?)
    }

    /// The device of a staged volume, also when its helper died.
    async fn device(&self, volume_id: &str, s: &Staged) -> Result<Option<PathBuf>> {
        self.mapper(s).find(&self.mapping(volume_id, s)).await
    }

    /// Makes the new device `dev` of a staged volume reachable where its old
    /// one was (`exposed`): the filesystem mounted at the staging path again,
    /// and bound over each target (stacked, so a container that mounted the
    /// target with HostToContainer propagation receives it). Returns how
    /// many targets were bound.
    async fn expose_again(&self, s: &Staged, dev: &Path, exposed: &[MountInfo]) -> Result<usize> {
        let mounter = self.host.mounter.as_ref();
        let staging = s.staging.as_deref();
        // What is done already (a heal resumed): the topmost mount at a
        // path exposes the new device.
        let fresh = self.exposed(s, dev).await?;
        let mounts = mounter.mounts().await?;
        let done = |p: &Path| {
            mounts
                .iter()
                .rev()
                .find(|m| m.mount_point == p)
                .is_some_and(|top| fresh.iter().any(|f| f.id == top.id))
        };
        if !s.block && !staging.is_some_and(done) {
            let (Some(staging), Some(fs_type)) = (staging, s.fs_type.as_deref()) else {
                return Err(Error::FailedPrecondition(format!(
                    "the state of image {} does not say where it was mounted (staged by an older plugin); unstage and stage it again",
                    s.spec()
                )));
            };
            // Never a new filesystem: the device must show the old one.
            let found = self.host.blockdev.fs_type(dev).await?;
            if found.as_deref() != Some(fs_type) {
                return Err(Error::Internal(format!(
                    "{} shows {found:?}, not the volume's {fs_type} filesystem; not mounting it",
                    dev.display()
                )));
            }
            mounter
                .unmount_network(staging, Duration::from_secs(1))
                .await?;
            mount_filesystem(
                self.host.blockdev.as_ref(),
                mounter,
                dev,
                staging,
                Format {
                    fs_type,
                    mkfs_args: &[],
                    options: &s.mount_options,
                },
                "the volume",
            )
            .await?;
            self.stats.forget(staging);
        }
        let mut rebound = 0;
        let targets = exposed
            .iter()
            .filter(|t| Some(t.mount_point.as_path()) != staging && !done(&t.mount_point));
        for t in targets {
            let source = if s.block { dev } else { staging.unwrap_or(dev) };
            mounter
                .bind(source, &t.mount_point, t.read_only(), &[])
                .await?;
            self.stats.forget(&t.mount_point);
            rebound += 1;
        }
        Ok(rebound)
    }

    /// Mounts through which the volume's data is reachable: for a
    /// filesystem every mount of its device (staging and binds), for a raw
    /// volume every bind of the device node.
    async fn exposed(&self, s: &Staged, dev: &Path) -> Result<Vec<MountInfo>> {
        let mounts = self.host.mounter.mounts().await?;
        Ok(if s.block {
            exposures(&mounts, dev)
        } else {
            mounts
                .iter()
                .filter(|m| Path::new(&m.source) == dev)
                .cloned()
                .collect()
        })
    }

    /// The staged volume `volume_id` and its device, or NotFound when it
    /// is not staged here or `path` (when given) does not hold it.
    async fn holding(&self, volume_id: &str, path: Option<&Path>) -> Result<(Staged, PathBuf)> {
        let missing = |what: String| Error::NotFound(what);
        let s = self
            .states
            .load::<Staged>(volume_id)
            .await?
            .ok_or_else(|| missing(format!("volume {volume_id} is not staged on this node")))?;
        let dev = self.device(volume_id, &s).await?.ok_or_else(|| {
            missing(format!(
                "volume {volume_id} has no device on this node (its rbd-fuse mapping is gone)"
            ))
        })?;
        if let Some(path) = path {
            // While a heal is redoing the mounts, the old device still
            // holds the paths not yet done.
            let mut here = false;
            for d in std::iter::once(&dev).chain(s.replaced.as_ref()) {
                here = here
                    || self
                        .exposed(&s, d)
                        .await?
                        .iter()
                        .any(|m| m.mount_point == path)
                    || (s.block && same_device(path, d).await?);
            }
            if !here {
                return Err(missing(format!(
                    "volume {volume_id} is not at {}",
                    path.display()
                )));
            }
        }
        Ok((s, dev))
    }
}

impl Rbd {
    fn node(&self) -> Result<&Node> {
        self.node
            .as_ref()
            .ok_or_else(|| Error::Internal("this process serves no node plugin".into()))
    }

    /// The addresses of the clients that have the image open.
    async fn watchers(&self, s: &Staged, creds: &Credentials) -> Result<Vec<String>> {
        let place = self.place_named(&s.cluster, creds, &s.pool).await?;
        let image = s.image.clone();
        self.run(&place, "listing the image's clients", move |_, io| {
            let id = crate::librbd::Image::inspect(io, &image)?.id()?;
            crate::librbd::Image::inspect_by_id(io, &id)?.watchers()
        })
        .await
    }

    /// The one client that has the image open now and was not among
    /// `before` (the helper just started), if exactly one.
    async fn new_watcher(
        &self,
        s: &Staged,
        creds: &Credentials,
        before: &[String],
    ) -> Result<Option<String>> {
        let mut new = self.watchers(s, creds).await?;
        new.retain(|w| !before.contains(w));
        Ok((new.len() == 1).then(|| new.remove(0)))
    }

    /// Blocklists a dead rbd-fuse client, so its watch stops keeping the
    /// image busy.
    async fn blocklist(&self, s: &Staged, addr: &str) {
        let Ok(n) = self.node() else { return };
        match n.keys.read(&s.cluster, &s.user).await {
            Ok(creds) => self.pool.blocklist(&s.cluster, &creds, addr).await,
            Err(e) => {
                tracing::warn!(image = %s.image, error = %e, "no key to blocklist the dead rbd-fuse client")
            }
        }
    }

    /// Serves every staged volume again whose mapping's helper died: a new
    /// rbd-nbd attaches to the kernel's device (the pod notices nothing); a
    /// new rbd-fuse gets a new loop device, whose filesystem is mounted at
    /// the staging path again and bound over every target of the old one.
    pub(crate) async fn heal(&self) {
        let Some(n) = &self.node else {
            return;
        };
        let ids = n.states.ids();
        for id in ids {
            if let Err(e) = self.heal_volume(n, &id).await {
                tracing::error!(volume = %id, error = %e, "cannot serve the volume's mapping again; retrying at the next heal");
            }
        }
    }

    async fn heal_volume(&self, n: &Node, id: &str) -> Result<()> {
        let _held = n.states.lock(id).await;
        let Some(s) = n.states.load::<Staged>(id).await? else {
            return Ok(());
        };
        let (mapper, m) = (n.mapper(&s), n.mapping(id, &s));
        if s.krbd {
            return Ok(());
        }
        let alive = mapper.alive(&m).await?;
        if alive && s.replaced.is_none() {
            return Ok(());
        }
        // Nothing mapped: being staged, or unstaged behind our back.
        let Some(old) = mapper.find(&m).await? else {
            return Ok(());
        };
        if s.nbd {
            mapper.map(&m).await?;
            tracing::warn!(volume = %id, device = %old.display(), "rbd-nbd had died; a new one attached to the device");
            return Ok(());
        }
        let s = if alive {
            s
        } else {
            self.remap_fuse(n, id, s, old).await?
        };
        let (Some(dev), Some(old)) = (s.dev.clone(), s.replaced.clone()) else {
            return Ok(());
        };
        let exposed = n.exposed(&s, &old).await?;
        let rebound = n.expose_again(&s, &dev, &exposed).await?;
        n.states
            .save(
                id,
                &Staged {
                    replaced: None,
                    ..s.clone()
                },
            )
            .await?;
        n.release_loop(old);
        let msg = format!(
            "the rbd-fuse process of image {} died; the plugin started a new one, mounted the volume again and re-bound {rebound} target(s)",
            s.spec()
        );
        tracing::warn!(volume = %id, rebound, "rbd-fuse had died; the volume is mapped and mounted again");
        n.heals.record(id, msg);
        Ok(())
    }

    /// Starts a new rbd-fuse for a staged volume whose rbd-fuse died (its
    /// client blocklisted first) and attaches a new loop device; the state
    /// then names the old device as `replaced` until its mounts are redone.
    async fn remap_fuse(&self, n: &Node, id: &str, s: Staged, old: PathBuf) -> Result<Staged> {
        let creds = n.keys.read(&s.cluster, &s.user).await?;
        if let Some(addr) = &s.watcher {
            self.blocklist(&s, addr).await;
        }
        let before = self.watchers(&s, &creds).await?;
        let (dev, _) = n.mapper(&s).map(&n.mapping(id, &s)).await?;
        let s = Staged {
            dev: Some(dev),
            watcher: self.new_watcher(&s, &creds, &before).await?,
            // Still the first dead device when a heal is resumed.
            replaced: Some(s.replaced.clone().unwrap_or(old)),
            ..s
        };
        n.states.save(id, &s).await?;
        Ok(s)
    }

    /// The clients that have the image open; FailedPrecondition when there
    /// are any and the volume may be written from one node only.
    async fn check_single_node(
        &self,
        s: &Staged,
        creds: &Credentials,
        cap: &Capability,
    ) -> Result<Vec<String>> {
        let watchers = self.watchers(s, creds).await?;
        if !watchers.is_empty() && !cap.mode.is_multi_node() {
            return Err(Error::FailedPrecondition(format!(
                "image {}/{} is in use by {} (mapped on another node?); a ReadWriteOnce volume is used from one node at a time",
                s.pool,
                s.image,
                watchers.join(", ")
            )));
        }
        Ok(watchers)
    }
}

#[async_trait]
impl NodeBackend for Rbd {
    fn node_capabilities(&self) -> Vec<NodeRpc> {
        vec![
            NodeRpc::StageUnstageVolume,
            NodeRpc::GetVolumeStats,
            NodeRpc::ExpandVolume,
            NodeRpc::VolumeCondition,
            NodeRpc::SingleNodeMultiWriter,
        ]
    }

    fn node_info(&self) -> NodeInfo {
        NodeInfo {
            node_id: self
                .node
                .as_ref()
                .map(|n| n.cfg.node_id.clone())
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    async fn stage(&self, req: StageVolume) -> Result<()> {
        let n = self.node()?;
        let c = &req.volume_context;
        let (cluster, pool, image) = image_of(&req.volume_id, c)?;
        let block = req.capability.is_block();
        match (ctx(c, "volumeMode"), block) {
            (Some("Block"), false) | (Some("Filesystem"), true) => {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} was made for volumeMode {}, and cannot be staged as {}",
                    req.volume_id,
                    ctx(c, "volumeMode").unwrap_or_default(),
                    if block { "Block" } else { "Filesystem" }
                )));
            }
            _ => {}
        }
        let mounter = MounterKind::parse(ctx(c, "mounter").unwrap_or("krbd"))?;
        let krbd = mounter == MounterKind::Krbd;
        let nbd = mounter == MounterKind::Nbd;
        check_ours(&req.volume_id, c, &cluster, &pool, &image)?;
        let creds = creds_of(&req.secrets, "NodeStageVolume", "node-stage")?;
        let monitors = self.pool.cluster(&cluster)?.monitors.clone();
        let namespace = self.namespace(&cluster)?;
        let s = Staged {
            krbd,
            nbd,
            cookie: if nbd {
                req.volume_id.clone()
            } else {
                String::new()
            },
            map_options: ctx(c, "mapOptions").map(str::to_owned),
            cluster,
            pool,
            namespace,
            image,
            user: creds.user.clone(),
            block,
            dev: None,
            watcher: None,
            staging: None,
            fs_type: None,
            mount_options: vec![],
            replaced: None,
        };
        let _held = n.states.lock(&req.volume_id).await;
        let old = n.states.load::<Staged>(&req.volume_id).await?;
        if let Some(o) = &old
            && (o.block, o.krbd, o.nbd, &o.image, &o.pool)
                != (s.block, s.krbd, s.nbd, &s.image, &s.pool)
        {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is staged here already in another way; unstage it first",
                req.volume_id
            )));
        }
        let s = Staged {
            dev: old.as_ref().and_then(|o| o.dev.clone()),
            ..s
        };
        let mapped = n.mapped(&req.volume_id, &s).await?;
        let before = if mapped {
            vec![]
        } else {
            self.check_single_node(&s, &creds, &req.capability).await?
        };
        n.keys.write(&s.cluster, &monitors, &creds).await?;
        n.states.save(&req.volume_id, &s).await?;
        let (dev, started) = n.mapper(&s).map(&n.mapping(&req.volume_id, &s)).await?;
        let watcher = if started {
            self.new_watcher(&s, &creds, &before).await?
        } else {
            old.and_then(|o| o.watcher)
        };
        let fs_type = match &req.capability.access {
            AccessType::Mount { fs_type, .. } if !fs_type.is_empty() => fs_type.clone(),
            _ => ctx(c, "fsType").unwrap_or("ext4").to_owned(),
        };
        let replaced = s.dev.clone().filter(|d| *d != dev);
        let s = Staged {
            dev: Some(dev.clone()),
            watcher,
            staging: (!block).then(|| req.staging_path.clone()),
            fs_type: (!block).then(|| fs_type.clone()),
            mount_options: mount_flags(&req.capability).to_vec(),
            ..s
        };
        n.states.save(&req.volume_id, &s).await?;
        if let Some(old) = replaced {
            // A dead rbd-fuse's loop device, replaced by a new one: what is
            // still mounted from it is dead too.
            if !block {
                n.host
                    .mounter
                    .unmount_network(&req.staging_path, Duration::from_secs(1))
                    .await?;
            }
            n.release_loop(old);
        }
        if block {
            return Ok(());
        }
        let mkfs_args: Vec<String> = ctx(c, "mkfsOptions")
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let sp = req.staging_path.clone();
        n.blocking(format!("creating {}", sp.display()), move || {
            std::fs::create_dir_all(&sp).ctx(|| format!("creating {}", sp.display()))
        })
        .await?;
        let what = format!("volume {}", req.volume_id);
        mount_filesystem(
            n.host.blockdev.as_ref(),
            n.host.mounter.as_ref(),
            &dev,
            &req.staging_path,
            Format {
                fs_type: &fs_type,
                mkfs_args: &mkfs_args,
                options: mount_flags(&req.capability),
            },
            &what,
        )
        .await
        .map(drop)
    }

    async fn unstage(&self, volume_id: &str, staging_path: &Path) -> Result<()> {
        let n = self.node()?;
        let _held = n.states.lock(volume_id).await;
        let Some(s) = n.states.load::<Staged>(volume_id).await? else {
            // Never staged here (or already unstaged): nothing of ours to undo.
            return Ok(());
        };
        if let Some(dev) = n.device(volume_id, &s).await? {
            let elsewhere = elsewhere(&n.exposed(&s, &dev).await?, &[staging_path]);
            if !elsewhere.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {volume_id} is still published at {}; unpublish it first",
                    elsewhere.join(", ")
                )));
            }
        }
        n.host.mounter.unmount(staging_path).await?;
        n.stats.forget(staging_path);
        let (mapper, m) = (n.mapper(&s), n.mapping(volume_id, &s));
        // Blocklisting is for rbd-fuse: kernel clients are shared by mappings.
        let dead = !s.kernel_device() && !mapper.alive(&m).await?;
        mapper.unmap(&m).await?;
        if let Some(old) = s.replaced.clone() {
            n.release_loop(old);
        }
        if dead && let Some(addr) = &s.watcher {
            self.blocklist(&s, addr).await;
        }
        n.heals.forget(volume_id);
        n.states.forget(volume_id).await
    }

    async fn publish(&self, req: PublishVolume) -> Result<()> {
        let n = self.node()?;
        let staging = req
            .staging_path
            .clone()
            .ok_or_else(|| Error::FailedPrecondition("staging_target_path is required".into()))?;
        let not_staged = || {
            Error::FailedPrecondition(format!(
                "volume {} is not staged at {}; call NodeStageVolume first",
                req.volume_id,
                staging.display()
            ))
        };
        let s = match n.states.load::<Staged>(&req.volume_id).await? {
            Some(s) => s,
            None => {
                let (cluster, pool, image) = image_of(&req.volume_id, &req.volume_context)?;
                check_ours(&req.volume_id, &req.volume_context, &cluster, &pool, &image)?;
                return Err(not_staged());
            }
        };
        let dev = n.device(&req.volume_id, &s).await?.ok_or_else(not_staged)?;
        if s.block != req.capability.is_block() {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is staged as {} and cannot be published as {}",
                req.volume_id,
                if s.block {
                    "a raw block device"
                } else {
                    "a filesystem"
                },
                if s.block {
                    "a filesystem"
                } else {
                    "a raw block device"
                }
            )));
        }
        let target = &req.target_path;
        let exposed = n.exposed(&s, &dev).await?;
        if req.capability.mode == AccessMode::SingleNodeSingleWriter {
            let elsewhere = elsewhere(&exposed, &[target, &staging]);
            if !elsewhere.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is SINGLE_NODE_SINGLE_WRITER (ReadWriteOncePod) and already published at {}",
                    req.volume_id,
                    elsewhere.join(", ")
                )));
            }
        }
        if s.block {
            return publish_device(n.host.mounter.as_ref(), &dev, target, req.readonly).await;
        }
        if !exposed.iter().any(|m| m.mount_point == staging) {
            return Err(not_staged());
        }
        let flags = mount_flags(&req.capability).to_vec();
        vfs_flags(&flags)
            .map_err(|e| Error::InvalidArgument(format!("mount flags of a bind: {e}")))?;
        if let Some(m) = exposed.iter().find(|m| &m.mount_point == target) {
            if m.read_only() == req.readonly {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "{} is already published with another read-only setting",
                target.display()
            )));
        }
        let t = target.clone();
        n.blocking(format!("creating {}", t.display()), move || {
            std::fs::create_dir_all(&t).ctx(|| format!("creating {}", t.display()))
        })
        .await?;
        n.host
            .mounter
            .bind(&staging, target, req.readonly, &flags)
            .await
    }

    async fn unpublish(&self, _volume_id: &str, target_path: &Path) -> Result<()> {
        let n = self.node()?;
        n.host.mounter.unmount(target_path).await?;
        n.stats.forget(target_path);
        let t = target_path.to_path_buf();
        n.blocking(format!("removing {}", t.display()), move || {
            csi_core::fsutil::remove_target(&t)
        })
        .await
    }

    async fn stats(&self, volume_id: &str, path: &Path) -> Result<VolumeStats> {
        let n = self.node()?;
        let (s, dev) = n.holding(volume_id, Some(path)).await?;
        let (mapper, m) = (n.mapper(&s), n.mapping(volume_id, &s));
        if !mapper.alive(&m).await? {
            let why = if s.nbd {
                format!("I/O waits until the plugin attaches a new one (within {NBD_REATTACH:?})")
            } else {
                "I/O on the volume fails until the plugin maps it again".into()
            };
            return Ok(VolumeStats {
                abnormal: Some(format!(
                    "the {} mapping of image {} is gone; {why}",
                    mapper.name(),
                    s.spec()
                )),
                ..Default::default()
            });
        }
        let mut stats = if s.block {
            let size = n.host.blockdev.size(&dev).await?;
            VolumeStats {
                bytes: Some((size, 0, size)),
                ..Default::default()
            }
        } else {
            n.stats
                .get(path, n.cfg.stats_cache, n.cfg.stats_timeout)
                .await
        };
        n.heals.report(volume_id, &mut stats);
        Ok(stats)
    }

    async fn expand(&self, req: NodeExpand) -> Result<u64> {
        let n = self.node()?;
        let (s, dev) = n.holding(&req.volume_id, Some(&req.path)).await?;
        // The client (kernel, rbd-nbd or rbd-fuse) learns the new size
        // from the image's header notification.
        let (mapper, m) = (n.mapper(&s), n.mapping(&req.volume_id, &s));
        let t = Instant::now();
        let mut pause = Duration::from_millis(50);
        let size = loop {
            let size = n.host.blockdev.size(&dev).await?;
            if size >= req.range.required || t.elapsed() >= n.cfg.mount_timeout {
                break size;
            }
            // Not grown yet: the device may need telling (a loop device
            // over rbd-fuse's file); then wait, less often as time goes by.
            mapper.refresh(&m, &dev).await?;
            if n.host.blockdev.size(&dev).await? >= req.range.required {
                continue;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        };
        if size < req.range.required {
            return Err(Error::FailedPrecondition(format!(
                "the device of volume {} shows {size} bytes, less than the {} requested; expand the volume with ControllerExpandVolume first",
                req.volume_id, req.range.required
            )));
        }
        if !s.block {
            let fs = n.host.blockdev.fs_type(&dev).await?.ok_or_else(|| {
                Error::Internal(format!("volume {} has no filesystem", req.volume_id))
            })?;
            // Through the staging path: after a heal the target holds the
            // dead mount under the live one, and xfs_growfs would size the
            // filesystem from the dead one's device.
            let at = s.staging.as_deref().unwrap_or(&req.path);
            n.host.blockdev.grow_fs(&dev, &fs, Some(at)).await?;
            n.stats.forget(&req.path);
        }
        Ok(size)
    }
}
