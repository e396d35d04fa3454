//! The node: a volume's subvolume (or a static volume's directory) is
//! mounted once per node at its staging path, by the kernel's CephFS
//! client or by ceph-fuse, and bound at its targets.
//!
//! Per staged volume a state file (0600 in a 0700 directory) says what is
//! mounted there and how; the keyrings sit beside it. ceph-fuse processes
//! are detached, so they outlive the plugin; one that dies is replaced:
//! the healer mounts the volume again at the staging path and binds it over
//! every target (stacked on the dead bind).

use super::Cephfs;
use super::params::Mounter as MounterKind;
use crate::id::CephId;
use crate::keyfiles::KeyFiles;
use crate::secret::{Credentials, creds_of};
use crate::volstate::VolumeStates;
use async_trait::async_trait;
use csi_core::backend::{NodeBackend, NodeInfo, NodeRpc, VolumeStats};
use csi_core::daemon::Spawner;
use csi_core::devvol::elsewhere;
use csi_core::exec::Command;
use csi_core::fsutil::{DirLock, LOCK_WAIT};
use csi_core::mount::{MountInfo, Mounter};
use csi_core::stats::{Heals, StatsCache};
use csi_core::types::{AccessMode, AccessType, Capability, PublishVolume, StageVolume};
use csi_core::{Error, IoContext, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Settings of the node plugin.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's id.
    pub node_id: String,
    /// Where state files, keyrings and ceph-fuse logs live (on the host's
    /// filesystem, e.g. under the kubelet's plugins directory).
    pub state_dir: PathBuf,
    /// The ceph-fuse program.
    pub ceph_fuse: String,
    /// How long a mount or unmount may take.
    pub mount_timeout: Duration,
    /// How long a statfs may take before the volume is reported abnormal.
    pub stats_timeout: Duration,
    /// How long NodeGetVolumeStats answers from its cache.
    pub stats_cache: Duration,
}

/// The privileged operations of the node.
pub struct NodeHost {
    /// Mount operations (`mount -t ceph` through mount.ceph, binds).
    pub mounter: Arc<dyn Mounter>,
    /// Detached helper processes (ceph-fuse).
    pub spawner: Arc<dyn Spawner>,
}

/// Filesystem type of ceph-fuse mounts in the mount table.
const FUSE_TYPE: &str = "fuse.ceph-fuse";

/// How long the volume condition reports a heal.
const HEAL_REPORT: Duration = Duration::from_secs(3600);

/// Mount options the driver sets itself (refused in the StorageClass).
const OWN_OPTIONS: &[&str] = &["name", "secret", "secretfile", "mds_namespace", "fs"];

/// What is known of a staged volume.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Staged {
    cluster: String,
    fs_name: String,
    /// The mounted directory of the filesystem.
    root: String,
    /// The cephx user the mount runs as.
    user: String,
    /// Whether `user` was made for this volume (its keyring goes at unstage).
    own_user: bool,
    /// The Secret's user (blocklists a dead ceph-fuse client).
    stage_user: String,
    /// The ceph-fuse client's address, blocklisted when it dies so the MDS
    /// hands its capabilities to others at once.
    client: Option<String>,
    /// Mounted by ceph-fuse (else the kernel).
    fuse: bool,
    /// Mount options (kernel) or `-o` options (ceph-fuse).
    options: Vec<String>,
    staging: PathBuf,
    /// The device number of the staging mount once mounted; its binds
    /// (the targets) show the same.
    dev: Option<String>,
    /// A dead ceph-fuse mount's device whose targets are still to be bound
    /// to the new mount (a heal in progress).
    replaced: Option<String>,
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
    /// Per volume: when and how its mount was last healed.
    heals: Heals,
    /// Notified when a ceph-fuse this process started exits.
    died: Arc<Notify>,
}

fn describe(e: &Error) -> String {
    match e {
        Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOTCONN) => format!(
            "the volume's ceph-fuse process is gone ({e}); the plugin is mounting the volume again"
        ),
        _ => format!("the CephFS mount does not answer: {e}"),
    }
}

/// A numeric CephFS virtual xattr of `path`; None when unset (ENODATA).
fn vxattr(path: &Path, name: &str) -> Result<Option<u64>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument(format!("{} contains NUL", path.display())))?;
    let n = std::ffi::CString::new(name).map_err(|e| Error::Internal(e.to_string()))?;
    let mut buf = [0u8; 64];
    // SAFETY: both strings are NUL-terminated and `buf` is writable for its length.
    let len = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if len < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENODATA) {
            return Ok(None);
        }
        return Err(Error::io(
            format!("reading {name} of {}", path.display()),
            e,
        ));
    }
    let text = String::from_utf8_lossy(&buf[..len as usize]);
    text.trim_end_matches('\0')
        .trim()
        .parse()
        .map(Some)
        .map_err(|_| Error::Internal(format!("{name} of {} is {text:?}", path.display())))
}

/// Usage of a CephFS volume: its quota as the total and its recursive
/// byte count (`ceph.dir.rbytes`, which the MDS keeps current) as used;
/// statfs of a quota root shows usage the client refreshes only lazily.
/// Without a quota, the filesystem's statfs.
fn usage(path: &Path, describe: fn(&Error) -> String) -> VolumeStats {
    let read = || -> Result<Option<VolumeStats>> {
        let Some(total) = vxattr(path, "ceph.quota.max_bytes")?.filter(|q| *q > 0) else {
            return Ok(None);
        };
        let used = vxattr(path, "ceph.dir.rbytes")?.unwrap_or(0);
        let files = vxattr(path, "ceph.dir.rentries")?.unwrap_or(0);
        let max_files = vxattr(path, "ceph.quota.max_files")?.filter(|q| *q > 0);
        Ok(Some(VolumeStats {
            bytes: Some((total, used.min(total), total.saturating_sub(used))),
            inodes: max_files.map(|m| (m, files.min(m), m.saturating_sub(files))),
            abnormal: None,
        }))
    };
    match read() {
        Ok(Some(s)) => s,
        Ok(None) => csi_core::stats::statfs(path, describe),
        Err(e) => VolumeStats {
            abnormal: Some(describe(&e)),
            ..Default::default()
        },
    }
}

fn ctx<'a>(c: &'a HashMap<String, String>, key: &str) -> Option<&'a str> {
    c.get(key).map(String::as_str).filter(|v| !v.is_empty())
}

/// The last lines of a ceph-fuse log that say why it failed, without
/// timestamps.
fn reason_in(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains("ceph version") && !l.contains("newargv"))
        .collect();
    let tail = &lines[lines.len().saturating_sub(2)..];
    tail.iter()
        .map(|l| {
            l.splitn(4, ' ')
                .nth(3)
                .filter(|_| l.starts_with("20"))
                .unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether `p` is an absolute path in the filesystem that never leaves its
/// root (no `.`/`..`, NUL or empty components).
fn plain_path(p: &str) -> bool {
    if p == "/" {
        return true;
    }
    p.starts_with('/')
        && p.len() <= 4096
        && !p.contains('\0')
        && p[1..]
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// What a volume's context says to mount.
struct Source {
    cluster: String,
    fs_name: String,
    root: String,
    /// The subvolume (provisioned volumes; static ones have none).
    subvolume: Option<String>,
    fuse: bool,
    options: Vec<String>,
}

/// Reads the volume context (and capability) of NodeStageVolume: a
/// provisioned volume carries clusterID, fsName, subvolumeName and
/// subvolumePath; a static one (`staticVolume: "true"`) clusterID, fsName
/// and rootPath. NotFound when a provisioned volume's id is not its subvolume.
fn source_of(volume_id: &str, c: &HashMap<String, String>, cap: &Capability) -> Result<Source> {
    let AccessType::Mount { fs_type, flags, .. } = &cap.access else {
        return Err(Error::InvalidArgument(
            "CephFS volumes are filesystems: volumeMode Block is not supported".into(),
        ));
    };
    if !matches!(fs_type.as_str(), "" | "ceph" | "cephfs") {
        return Err(Error::InvalidArgument(format!(
            "fsType {fs_type:?} was requested; CephFS volumes are ceph"
        )));
    }
    let need = |k: &str| {
        ctx(c, k).map(str::to_owned).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "volume_context has no {k:?}: a volume of cephfs.rcsi.io carries clusterID, fsName, subvolumeName and subvolumePath (a static PV sets clusterID, fsName, rootPath and staticVolume: \"true\")"
            ))
        })
    };
    let cluster = need("clusterID")?;
    let fs_name = need("fsName")?;
    let is_static = ctx(c, "staticVolume") == Some("true");
    let (root, subvolume) = if is_static {
        (need("rootPath")?, None)
    } else {
        let sub = need("subvolumeName")?;
        let ours = CephId::parse(volume_id).is_some_and(|id| {
            id.cluster == cluster && sub.ends_with(&id.uuid.hyphenated().to_string())
        });
        if !ours {
            return Err(Error::NotFound(format!(
                "volume {volume_id} is not the subvolume {sub} its context names (a static PV sets staticVolume: \"true\" and rootPath)"
            )));
        }
        (need("subvolumePath")?, Some(sub))
    };
    if !plain_path(&root) {
        return Err(Error::InvalidArgument(format!(
            "{root:?} is not an absolute path of the filesystem without \".\" or \"..\" (volume context {})",
            if is_static {
                "\"rootPath\""
            } else {
                "\"subvolumePath\""
            }
        )));
    }
    let fuse = MounterKind::parse(ctx(c, "mounter").unwrap_or(""))? == MounterKind::Fuse;
    let key = if fuse {
        "fuseMountOptions"
    } else {
        "kernelMountOptions"
    };
    let mut options: Vec<String> = ctx(c, key)
        .into_iter()
        .chain(flags.iter().map(String::as_str))
        .flat_map(|o| o.split(','))
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(str::to_owned)
        .collect();
    options.dedup();
    for o in &options {
        let name = o.split('=').next().unwrap_or_default();
        if OWN_OPTIONS.contains(&name) {
            return Err(Error::InvalidArgument(format!(
                "mount option {name:?} is set by the driver (from the Secret and fsName); remove it from {key} or the PV's mountOptions"
            )));
        }
    }
    Ok(Source {
        cluster,
        fs_name,
        root,
        subvolume,
        fuse,
        options,
    })
}

/// The client address (`addr_str`) a ceph-fuse reports on its admin socket.
fn client_addr(asok: &Path) -> Result<String> {
    use std::io::{Read, Write};
    let what = || format!("asking {} for its status", asok.display());
    let mut c = std::os::unix::net::UnixStream::connect(asok).ctx(what)?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ctx(what)?;
    c.write_all(b"{\"prefix\": \"status\"}\0").ctx(what)?;
    let mut len = [0u8; 4];
    c.read_exact(&mut len).ctx(what)?;
    let mut body = vec![0u8; u32::from_be_bytes(len).min(1 << 20) as usize];
    c.read_exact(&mut body).ctx(what)?;
    let v: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| Error::Internal(format!("{}: {e}", what())))?;
    v["addr_str"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| Error::Internal(format!("{}: no addr_str", what())))
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
        Ok(Self {
            _lock: lock,
            keys: KeyFiles::open(cfg.state_dir.join("keys"), cfg.mount_timeout)?,
            states: VolumeStates::open(cfg.state_dir.join("volumes"), cfg.mount_timeout)?,
            cfg,
            host,
            stats: StatsCache::measuring("the CephFS mount does not answer", describe, usage),
            heals: Heals::new(HEAL_REPORT),
            died: Default::default(),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        what: String,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        csi_core::fsutil::blocking(what, self.cfg.mount_timeout, f).await
    }

    /// The topmost mount at `path`.
    async fn mount_at(&self, path: &Path) -> Result<Option<MountInfo>> {
        Ok(self
            .host
            .mounter
            .mounts()
            .await?
            .iter()
            .rev()
            .find(|m| m.mount_point == path)
            .cloned())
    }

    /// The CephFS mount (of the staged volume's kind) topmost at its staging path.
    async fn staging_mount(&self, s: &Staged) -> Result<Option<MountInfo>> {
        let want = if s.fuse { FUSE_TYPE } else { "ceph" };
        Ok(self
            .mount_at(&s.staging)
            .await?
            .filter(|m| m.fs_type == want))
    }

    /// Every mount of the volume: the staging mount and its binds, also
    /// those of a replaced mount while a heal redoes them.
    async fn exposed(&self, s: &Staged) -> Result<Vec<MountInfo>> {
        let devs: Vec<&String> = s.dev.iter().chain(s.replaced.iter()).collect();
        Ok(self
            .host
            .mounter
            .mounts()
            .await?
            .iter()
            .filter(|m| devs.contains(&&m.dev))
            .cloned()
            .collect())
    }

    /// Mounts the volume at its staging path (the directory exists); sets
    /// the mount's device number and ceph-fuse's client address in `s`.
    async fn mount(&self, volume_id: &str, s: &mut Staged, monitors: &[String]) -> Result<()> {
        let k = self.keys.paths(&s.cluster, &s.user);
        s.client = None;
        if s.fuse {
            s.client = self.mount_fuse(volume_id, s, &k.conf, &k.keyring).await?;
        } else {
            let mut options = vec![
                format!("name={}", s.user),
                format!("secretfile={}", k.secret.display()),
                format!("mds_namespace={}", s.fs_name),
            ];
            options.extend(s.options.iter().cloned());
            let source = format!("{}:{}", monitors.join(","), s.root);
            self.host
                .mounter
                .mount(&source, &s.staging, "ceph", &options)
                .await?;
        }
        let m = self.staging_mount(s).await?.ok_or_else(|| {
            Error::Internal(format!(
                "{} is not in the mount table after mounting it",
                s.staging.display()
            ))
        })?;
        s.dev = Some(m.dev);
        Ok(())
    }

    /// Starts a detached ceph-fuse for the volume and waits until its mount
    /// is in the table; returns its client address when its admin socket
    /// tells it.
    async fn mount_fuse(
        &self,
        volume_id: &str,
        s: &Staged,
        conf: &Path,
        keyring: &Path,
    ) -> Result<Option<String>> {
        let dir = self.cfg.state_dir.join("fuse");
        let log = dir.join(format!("{volume_id}.log"));
        // Unix socket paths are short (108 bytes): named by a hash.
        let asok = dir.join(format!(
            "{}.asok",
            uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, volume_id.as_bytes()).simple()
        ));
        let mut args: Vec<std::ffi::OsString> = vec![
            "-f".into(),
            s.staging.clone().into(),
            "-c".into(),
            conf.into(),
            "--id".into(),
            s.user.clone().into(),
            "--keyring".into(),
            keyring.into(),
            "-r".into(),
            s.root.clone().into(),
            "--client_fs".into(),
            s.fs_name.clone().into(),
            "--admin_socket".into(),
            asok.clone().into(),
        ];
        if !s.options.is_empty() {
            args.push("-o".into());
            args.push(s.options.join(",").into());
        }
        let cmd = Command::new(&self.cfg.ceph_fuse, args);
        let daemon = self.host.spawner.spawn(&cmd, &log)?;
        let mut exited = daemon.exited.clone();
        let died = self.died.clone();
        tokio::spawn(async move {
            if exited.wait_for(Option::is_some).await.is_ok() {
                died.notify_one();
            }
        });
        let start = Instant::now();
        loop {
            if self.staging_mount(s).await?.is_some() {
                let addr = self
                    .blocking("asking ceph-fuse its address".into(), move || {
                        client_addr(&asok)
                    })
                    .await;
                return Ok(match addr {
                    Ok(a) => Some(a),
                    Err(e) => {
                        tracing::warn!(volume = %volume_id, error = %e, "ceph-fuse did not tell its address; if it dies, the MDS frees its capabilities only after its session times out");
                        None
                    }
                });
            }
            if let Some(code) = *daemon.exited.borrow() {
                let why = reason_in(&log);
                let msg = format!(
                    "ceph-fuse for {} of filesystem {:?} as client.{} exited ({code}): {why} (log: {})",
                    s.root,
                    s.fs_name,
                    s.user,
                    log.display()
                );
                return Err(
                    if why.contains("Operation not permitted") || why.contains("rejected us") {
                        Error::PermissionDenied(msg)
                    } else if why.contains("No such file or directory") {
                        Error::NotFound(msg)
                    } else {
                        Error::Unavailable(msg)
                    },
                );
            }
            if start.elapsed() > self.cfg.mount_timeout {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(daemon.pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
                return Err(Error::DeadlineExceeded(format!(
                    "ceph-fuse for {} of filesystem {:?} was not mounted within {:?}: {} (log: {})",
                    s.root,
                    s.fs_name,
                    self.cfg.mount_timeout,
                    reason_in(&log),
                    log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The reason the volume's ceph-fuse mount is dead, None when it is
    /// alive (or not a ceph-fuse mount, or not mounted).
    async fn fuse_dead(&self, s: &Staged) -> Result<Option<String>> {
        if !s.fuse {
            return Ok(None);
        }
        let Some(m) = self.staging_mount(s).await? else {
            return Ok(None);
        };
        match csi_core::fuse::probe(&s.staging, &m.dev, self.cfg.stats_timeout).await {
            Ok(why) => Ok(why),
            // Served but slow (a stopped MDS): alive, not for the healer.
            Err(Error::DeadlineExceeded(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The staged volume `volume_id`, or NotFound when it is not staged
    /// here or `path` (when given) is neither its staging path nor a target.
    async fn holding(&self, volume_id: &str, path: &Path) -> Result<Staged> {
        let s = self
            .states
            .load::<Staged>(volume_id)
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!("volume {volume_id} is not staged on this node"))
            })?;
        let here = self
            .exposed(&s)
            .await?
            .iter()
            .any(|m| m.mount_point == path);
        if !here {
            return Err(Error::NotFound(format!(
                "volume {volume_id} is not at {}",
                path.display()
            )));
        }
        Ok(s)
    }
}

impl Cephfs {
    /// Blocklists the dead ceph-fuse client of a staged volume.
    async fn blocklist(&self, n: &Node, s: &Staged) {
        let Some(addr) = &s.client else { return };
        match n.keys.read(&s.cluster, &s.stage_user).await {
            Ok(creds) => self.pool.blocklist(&s.cluster, &creds, addr).await,
            Err(e) => {
                tracing::warn!(root = %s.root, error = %e, "no key to blocklist the dead ceph-fuse client")
            }
        }
    }

    /// Mounts a volume whose ceph-fuse died again (its client blocklisted
    /// first, so the MDS frees what it held) and binds the new mount over
    /// every target of the old one.
    async fn heal_volume(&self, n: &Node, id: &str, monitors: &[String]) -> Result<()> {
        let _held = n.states.lock(id).await;
        let Some(mut s) = n.states.load::<Staged>(id).await? else {
            return Ok(());
        };
        let Some(dev) = s.dev.clone().filter(|_| s.fuse) else {
            return Ok(()); // kernel mounts reconnect by themselves; or still staging
        };
        let why = if s.replaced.is_some() {
            "a heal was interrupted".to_owned()
        } else {
            let Some(why) = n.fuse_dead(&s).await? else {
                return Ok(());
            };
            s.replaced = Some(dev.clone());
            n.states.save(id, &s).await?;
            why
        };
        if n.staging_mount(&s).await?.map(|m| m.dev) != s.dev || s.dev == s.replaced {
            self.blocklist(n, &s).await;
            n.host
                .mounter
                .unmount_network(&s.staging, Duration::from_secs(1))
                .await?;
            n.mount(id, &mut s, monitors).await?;
            n.states.save(id, &s).await?;
            n.stats.forget(&s.staging);
        }
        let old = s.replaced.clone().unwrap_or_default();
        let mounts = n.host.mounter.mounts().await?;
        let mut rebound = 0;
        for t in mounts.iter().filter(|m| m.dev == old) {
            let top = mounts.iter().rev().find(|m| m.mount_point == t.mount_point);
            if t.mount_point == s.staging || top.map(|m| &m.dev) == s.dev.as_ref() {
                continue;
            }
            // Stacked on the dead bind, not in its place: a container that
            // mounted the target with HostToContainer propagation receives it.
            n.host
                .mounter
                .bind(&s.staging, &t.mount_point, t.read_only(), &[])
                .await?;
            n.stats.forget(&t.mount_point);
            rebound += 1;
        }
        s.replaced = None;
        n.states.save(id, &s).await?;
        let msg = format!(
            "the ceph-fuse process of {} on filesystem {:?} died ({why}); the plugin mounted the volume again and re-bound {rebound} target(s)",
            s.root, s.fs_name
        );
        tracing::warn!(volume = %id, rebound, "ceph-fuse had died; the volume is mounted again");
        n.heals.record(id, msg);
        Ok(())
    }

    fn node(&self) -> Result<&Node> {
        self.node
            .as_ref()
            .ok_or_else(|| Error::Internal("this process serves no node plugin".into()))
    }

    /// Mounts again every staged ceph-fuse volume whose ceph-fuse died.
    pub(crate) async fn heal(&self) {
        let Some(n) = &self.node else {
            return;
        };
        for id in n.states.ids() {
            let done = match n.states.load::<Staged>(&id).await {
                Ok(Some(s)) => match self.pool.cluster(&s.cluster) {
                    Ok(c) => self.heal_volume(n, &id, &c.monitors.clone()).await,
                    Err(e) => Err(e),
                },
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(e) = done {
                tracing::error!(volume = %id, error = %e, "cannot mount the volume again; retrying at the next heal");
            }
        }
    }

    /// Checks every `every`, and when a ceph-fuse exits, for dead mounts
    /// (no-op without a node).
    pub fn heal_forever(self: &Arc<Self>, every: Duration) {
        let Some(n) = &self.node else {
            return;
        };
        let died = n.died.clone();
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let _ = tokio::time::timeout(every, died.notified()).await;
                me.heal().await;
            }
        });
    }

    /// The user a volume is mounted as: one made for the subvolume (its
    /// MDS caps limited to the subvolume's path) when the Secret's user may
    /// create users, else the Secret's user.
    async fn mount_user(&self, src: &Source, creds: &Credentials) -> Result<(Credentials, bool)> {
        let Some(sub) = &src.subvolume else {
            return Ok((creds.clone(), false));
        };
        let entity = format!("client.{}", volume_user(sub));
        let cmd = serde_json::json!({
            "prefix": "auth get-or-create",
            "entity": entity,
            "caps": [
                "mds", format!("allow rw fsname={} path={}", src.fs_name, src.root),
                "mon", format!("allow r fsname={}", src.fs_name),
                "osd", format!("allow rw tag cephfs data={}", src.fs_name),
            ],
            "format": "json",
        })
        .to_string();
        let conn = self.pool.get(&src.cluster, creds).await?;
        let out = self
            .pool
            .run(&conn, "creating the volume's cephx user", move |c| {
                c.mon_command(&cmd)
            })
            .await;
        let (out, _) = match out {
            Ok(o) => o,
            Err(Error::PermissionDenied(_)) => {
                tracing::debug!(user = %creds.user, "the node-stage user may not create users; mounting as it");
                return Ok((creds.clone(), false));
            }
            Err(e) => return Err(e),
        };
        let v: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| Error::Internal(format!("auth get-or-create answered badly: {e}")))?;
        let key = v[0]["key"]
            .as_str()
            .ok_or_else(|| Error::Internal("auth get-or-create answered without a key".into()))?;
        Ok((
            Credentials {
                user: volume_user(sub),
                key: key.to_owned(),
            },
            true,
        ))
    }
}

/// The cephx user (without `client.`) made for the volume of subvolume `sub`.
pub(crate) fn volume_user(sub: &str) -> String {
    format!("rcsi-{sub}")
}

#[async_trait]
impl NodeBackend for Cephfs {
    fn node_capabilities(&self) -> Vec<NodeRpc> {
        vec![
            NodeRpc::StageUnstageVolume,
            NodeRpc::GetVolumeStats,
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
        let src = source_of(&req.volume_id, &req.volume_context, &req.capability)?;
        let creds = creds_of(&req.secrets, "NodeStageVolume", "node-stage")?;
        let monitors = self.pool.cluster(&src.cluster)?.monitors.clone();
        let _held = n.states.lock(&req.volume_id).await;
        let old = n.states.load::<Staged>(&req.volume_id).await?;
        if let Some(o) = &old {
            let same = (
                &o.cluster, &o.fs_name, &o.root, o.fuse, &o.options, &o.staging,
            ) == (
                &src.cluster,
                &src.fs_name,
                &src.root,
                src.fuse,
                &src.options,
                &req.staging_path,
            );
            if !same {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is staged here already at {} or in another way; unstage it first",
                    req.volume_id,
                    o.staging.display()
                )));
            }
            if o.dev.is_some()
                && o.replaced.is_none()
                && n.staging_mount(o).await?.map(|m| m.dev) == o.dev
                && n.fuse_dead(o).await?.is_none()
            {
                return Ok(());
            }
        }
        let (user, own_user) = self.mount_user(&src, &creds).await?;
        n.keys.write(&src.cluster, &monitors, &creds).await?;
        if own_user {
            n.keys.write(&src.cluster, &monitors, &user).await?;
        }
        let mut s = Staged {
            cluster: src.cluster,
            fs_name: src.fs_name,
            root: src.root,
            user: user.user,
            own_user,
            stage_user: creds.user.clone(),
            client: None,
            fuse: src.fuse,
            options: src.options,
            staging: req.staging_path.clone(),
            dev: None,
            replaced: None,
        };
        if let Some(o) = &old {
            // A dead or half-made mount of an earlier try: gone first.
            if n.fuse_dead(o).await?.is_some() {
                self.blocklist(n, o).await;
            }
            n.host
                .mounter
                .unmount_network(&o.staging, Duration::from_secs(1))
                .await?;
        }
        n.states.save(&req.volume_id, &s).await?;
        let sp = req.staging_path.clone();
        n.blocking(format!("creating {}", sp.display()), move || {
            std::fs::create_dir_all(&sp).ctx(|| format!("creating {}", sp.display()))
        })
        .await?;
        n.mount(&req.volume_id, &mut s, &monitors).await?;
        n.states.save(&req.volume_id, &s).await
    }

    async fn unstage(&self, volume_id: &str, staging_path: &Path) -> Result<()> {
        let n = self.node()?;
        let _held = n.states.lock(volume_id).await;
        let Some(s) = n.states.load::<Staged>(volume_id).await? else {
            // Not staged here, or already unstaged: a CephFS mount left at
            // the path (state lost) still goes.
            if let Some(m) = n.mount_at(staging_path).await?
                && matches!(m.fs_type.as_str(), "ceph" | FUSE_TYPE)
            {
                tracing::warn!(volume_id, staging = %staging_path.display(), "unmounting an unrecorded CephFS staging mount");
                n.host
                    .mounter
                    .unmount_network(staging_path, n.cfg.mount_timeout)
                    .await?;
            }
            return Ok(());
        };
        if s.staging != staging_path {
            return Err(Error::NotFound(format!(
                "volume {volume_id} is staged at {}, not at {}",
                s.staging.display(),
                staging_path.display()
            )));
        }
        let published = elsewhere(&n.exposed(&s).await?, &[staging_path]);
        if !published.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "volume {volume_id} is still published at {}; unpublish it first",
                published.join(", ")
            )));
        }
        if n.fuse_dead(&s).await?.is_some() {
            self.blocklist(n, &s).await;
        }
        n.host
            .mounter
            .unmount_network(staging_path, n.cfg.mount_timeout)
            .await?;
        n.stats.forget(staging_path);
        if s.own_user {
            n.keys.remove(&s.cluster, &s.user).await?;
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
        let Some(s) = n.states.load::<Staged>(&req.volume_id).await? else {
            source_of(&req.volume_id, &req.volume_context, &req.capability)?;
            return Err(not_staged());
        };
        if req.capability.is_block() {
            return Err(Error::InvalidArgument(
                "CephFS volumes are filesystems: volumeMode Block is not supported".into(),
            ));
        }
        let exposed = n.exposed(&s).await?;
        if s.staging != staging || !exposed.iter().any(|m| m.mount_point == staging) {
            return Err(not_staged());
        }
        let target = &req.target_path;
        if req.capability.mode == AccessMode::SingleNodeSingleWriter {
            let published = elsewhere(&exposed, &[target, &staging]);
            if !published.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {} is SINGLE_NODE_SINGLE_WRITER (ReadWriteOncePod) and already published at {}",
                    req.volume_id,
                    published.join(", ")
                )));
            }
        }
        if let Some(m) = n.mount_at(target).await? {
            if s.dev.as_ref() == Some(&m.dev) && m.read_only() == req.readonly {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "{} already has {} mounted{}, not this volume as requested",
                target.display(),
                m.source,
                if m.read_only() { " read-only" } else { "" }
            )));
        }
        let t = target.clone();
        n.blocking(format!("creating {}", t.display()), move || {
            std::fs::create_dir_all(&t).ctx(|| format!("creating {}", t.display()))
        })
        .await?;
        n.host
            .mounter
            .bind(&staging, target, req.readonly, &[])
            .await
    }

    async fn unpublish(&self, _volume_id: &str, target_path: &Path) -> Result<()> {
        let n = self.node()?;
        // Every mount stacked there (a healed target holds the dead bind
        // under the live one).
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
        let s = n.holding(volume_id, path).await?;
        if s.replaced.is_some() {
            return Ok(VolumeStats {
                abnormal: Some(format!(
                    "the ceph-fuse process of {} died; the plugin is mounting the volume again",
                    s.root
                )),
                ..Default::default()
            });
        }
        let mut stats = n
            .stats
            .get(path, n.cfg.stats_cache, n.cfg.stats_timeout)
            .await;
        if stats.abnormal.is_some() {
            n.died.notify_one(); // let the healer look now
        }
        n.heals.report(volume_id, &mut stats);
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(fs_type: &str, flags: &[&str]) -> Capability {
        Capability {
            mode: AccessMode::MultiNodeMultiWriter,
            access: AccessType::Mount {
                fs_type: fs_type.into(),
                flags: flags.iter().map(|f| f.to_string()).collect(),
                mount_group: None,
            },
        }
    }

    fn context(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn sources_from_contexts() {
        let id = CephId {
            cluster: "c".into(),
            pool: 2,
            uuid: uuid::Uuid::nil(),
        }
        .to_string();
        let sub = format!("csi-vol-{}", uuid::Uuid::nil().hyphenated());
        let ours = |extra: &[(&str, &str)]| {
            let mut kv = vec![
                ("clusterID", "c"),
                ("fsName", "cephfs"),
                ("subvolumeName", sub.as_str()),
                ("subvolumePath", "/volumes/csi/x/y"),
            ];
            kv.extend_from_slice(extra);
            context(&kv)
        };
        let s = source_of(&id, &ours(&[]), &cap("", &[])).unwrap();
        assert!(!s.fuse && s.subvolume.is_some() && s.root == "/volumes/csi/x/y");
        let s = source_of(
            &id,
            &ours(&[("mounter", "fuse"), ("fuseMountOptions", "debug")]),
            &cap("", &["noatime"]),
        )
        .unwrap();
        assert!(s.fuse);
        assert_eq!(s.options, ["debug", "noatime"]);
        // Another volume's context, a path that escapes, options we own.
        assert!(matches!(
            source_of("other-id", &ours(&[]), &cap("", &[])),
            Err(Error::NotFound(_))
        ));
        let mut bad = ours(&[]);
        bad.insert("subvolumePath".into(), "/volumes/../etc".into());
        assert!(matches!(
            source_of(&id, &bad, &cap("", &[])),
            Err(Error::InvalidArgument(_))
        ));
        for o in ["secretfile=/x", "name=admin", "fs=other"] {
            let e = source_of(&id, &ours(&[("kernelMountOptions", o)]), &cap("", &[]));
            assert!(matches!(e, Err(Error::InvalidArgument(_))), "{o}");
        }
        assert!(source_of(&id, &ours(&[]), &cap("xfs", &[])).is_err());
        let block = Capability {
            mode: AccessMode::MultiNodeMultiWriter,
            access: AccessType::Block,
        };
        assert!(source_of(&id, &ours(&[]), &block).is_err());
        // Static volumes: any id, their rootPath.
        let st = context(&[
            ("clusterID", "c"),
            ("fsName", "cephfs"),
            ("staticVolume", "true"),
            ("rootPath", "/shared"),
        ]);
        let s = source_of("pv-shared", &st, &cap("", &[])).unwrap();
        assert!(s.subvolume.is_none() && s.root == "/shared");
    }

    #[test]
    fn plain_paths() {
        for ok in ["/", "/a", "/volumes/csi/x/uuid"] {
            assert!(plain_path(ok), "{ok}");
        }
        for bad in ["", "a", "/a/../b", "/a//b", "/./a", "/a/", "/a\0"] {
            assert!(!plain_path(bad), "{bad:?}");
        }
    }
}
