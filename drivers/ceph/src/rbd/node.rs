//! The node: an image becomes a block device through a mapper (the kernel's
//! krbd via `rbd map`, or rbd-fuse, a detached process exposing the image
//! as a file, attached to a loop device), gets a filesystem when blank, is
//! mounted at the staging path and bound at its targets; raw block volumes
//! bind the device.
//!
//! Per staged volume a state file (0600 in a 0700 directory) says which
//! image backs it and through which device; the keyring rbd-fuse reads
//! sits beside it. The mapping processes are detached, so they outlive the
//! plugin, and a restarted plugin finds everything from these files and the
//! kernel's mount and loop tables.

use super::params::Mounter as MounterKind;
use super::{Rbd, creds_of};
use crate::id::CephId;
use crate::secret::Credentials;
use async_trait::async_trait;
use csi_core::backend::{NodeBackend, NodeInfo, NodeRpc, VolumeStats};
use csi_core::blockdev::{BlockDevices, LoopDevices};
use csi_core::daemon::Spawner;
use csi_core::devvol::{Format, elsewhere, mount_filesystem, publish_device, same_device};
use csi_core::exec::Command;
use csi_core::exec::Exec;
use csi_core::mount::{MountInfo, Mounter, exposures, vfs_flags, views};
use csi_core::stats::StatsCache;
use csi_core::types::{AccessMode, AccessType, Capability, NodeExpand, PublishVolume, StageVolume};
use csi_core::{Error, IoContext, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Filesystem type of rbd-fuse mounts in the mount table.
const FUSE_TYPE: &str = "fuse.rbd-fuse";

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

/// The arguments rbd-fuse and rbd-nbd share: in the foreground, the
/// cluster's conf and the user's keyring.
fn client_args(s: &Staged, conf: &Path, keyring: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "-f".into(),
        "-c".into(),
        conf.into(),
        "--id".into(),
        s.user.clone().into(),
        "--keyring".into(),
        keyring.into(),
    ]
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

/// How long the kernel keeps an nbd device whose rbd-nbd died, queueing
/// its I/O for a new rbd-nbd to attach.
const NBD_REATTACH: Duration = Duration::from_secs(300);

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
    stats: StatsCache,
    /// Held while an rbd-nbd is started or a device unmapped, so the
    /// healer never attaches to a device being unmapped or just mapped.
    nbd_lock: tokio::sync::Mutex<()>,
}

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
    /// The file rbd-fuse exposes (rbd-fuse only).
    file: PathBuf,
    /// The loop device attached to it.
    dev: Option<PathBuf>,
    /// The rbd-fuse client's address as the image's watcher (to blocklist
    /// it when it died: its watch would keep the image busy for a while).
    #[serde(default)]
    watcher: Option<String>,
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
        for d in ["", "volumes", "keys", "fuse"] {
            let dir = cfg.state_dir.join(d);
            std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .ctx(|| format!("chmod {}", dir.display()))?;
        }
        Ok(Self {
            cfg,
            host,
            stats: StatsCache::new("the RBD image does not answer", describe),
            nbd_lock: tokio::sync::Mutex::new(()),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        what: String,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        csi_core::fsutil::blocking(what, self.cfg.mount_timeout, f).await
    }

    fn state_file(&self, volume_id: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("volumes")
            .join(format!("{volume_id}.json"))
    }

    fn fuse_dir(&self, volume_id: &str) -> PathBuf {
        self.cfg.state_dir.join("fuse").join(volume_id)
    }

    async fn load(&self, volume_id: &str) -> Result<Option<Staged>> {
        let f = self.state_file(volume_id);
        self.blocking(
            format!("reading {}", f.display()),
            move || match std::fs::read(&f) {
                Ok(b) => serde_json::from_slice(&b)
                    .map(Some)
                    .map_err(|e| Error::Internal(format!("{} is corrupt: {e}", f.display()))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(format!("reading {}", f.display()), e)),
            },
        )
        .await
    }

    async fn save(&self, volume_id: &str, s: &Staged) -> Result<()> {
        let f = self.state_file(volume_id);
        let data = serde_json::to_vec(s).map_err(|e| Error::Internal(e.to_string()))?;
        self.blocking(format!("writing {}", f.display()), move || {
            csi_core::fsutil::atomic_write(&f, &data)
        })
        .await
    }

    async fn forget(&self, volume_id: &str) -> Result<()> {
        let f = self.state_file(volume_id);
        self.blocking(
            format!("removing {}", f.display()),
            move || match std::fs::remove_file(&f) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io(format!("removing {}", f.display()), e))
                }
                _ => Ok(()),
            },
        )
        .await
    }

    /// Where the ceph.conf of `cluster` and the keyring of `user` are.
    fn key_paths(&self, cluster: &str, user: &str) -> (PathBuf, PathBuf) {
        let dir = self.cfg.state_dir.join("keys");
        (
            dir.join(format!("{cluster}.conf")),
            dir.join(format!("{cluster}.{user}.keyring")),
        )
    }

    /// Writes the ceph.conf and keyring rbd-fuse reads for `cluster` as
    /// `creds` (0600 in the 0700 keys directory); returns their paths.
    async fn keys(
        &self,
        cluster: &str,
        monitors: &[String],
        creds: &Credentials,
    ) -> Result<(PathBuf, PathBuf)> {
        let (conf, keyring) = self.key_paths(cluster, &creds.user);
        let conf_text = format!(
            "[global]\nmon host = {}\nadmin socket =\nlog file =\nlog to stderr = true\n",
            monitors.join(",")
        );
        let key_text = format!("[client.{}]\n\tkey = {}\n", creds.user, creds.key);
        let (c, k) = (conf.clone(), keyring.clone());
        self.blocking("writing the Ceph keyring".into(), move || {
            csi_core::fsutil::atomic_write(&c, conf_text.as_bytes())?;
            csi_core::fsutil::atomic_write(&k, key_text.as_bytes())
        })
        .await?;
        Ok((conf, keyring))
    }

    /// Whether `file` answers (false: missing, or its rbd-fuse is gone).
    async fn file_answers(&self, file: &Path) -> bool {
        let f = file.to_path_buf();
        self.blocking("looking at an rbd-fuse file".into(), move || {
            Ok(std::fs::metadata(&f).is_ok())
        })
        .await
        .unwrap_or(false)
    }

    /// Makes the rbd-fuse mount of `volume_id` expose `s.image` (starting a
    /// detached rbd-fuse when none answers); returns the file and whether
    /// it started one.
    async fn ensure_fuse(
        &self,
        volume_id: &str,
        s: &Staged,
        conf: &Path,
        keyring: &Path,
    ) -> Result<(PathBuf, bool)> {
        let dir = self.fuse_dir(volume_id);
        // The mount table, not a stat: a stat of a hung mount would hang.
        let mounts = self.host.mounter.mounts().await?;
        match mounts.into_iter().rev().find(|m| m.mount_point == dir) {
            Some(m) if m.fs_type == FUSE_TYPE => {
                // Aborts the connection of an rbd-fuse that died holding it.
                let dead = csi_core::fuse::probe(&dir, &m.dev, self.cfg.mount_timeout).await?;
                if dead.is_none() && self.file_answers(&s.file).await {
                    return Ok((s.file.clone(), false));
                }
                self.host
                    .mounter
                    .unmount_network(&dir, Duration::from_secs(1))
                    .await?;
            }
            Some(m) => {
                return Err(Error::Internal(format!(
                    "{} holds a {} mount, not rbd-fuse",
                    dir.display(),
                    m.fs_type
                )));
            }
            None => {}
        }
        let d = dir.clone();
        self.blocking(format!("creating {}", dir.display()), move || {
            std::fs::create_dir_all(&d).ctx(|| format!("creating {}", d.display()))
        })
        .await?;
        let mut args = client_args(s, conf, keyring);
        args.extend([
            "-p".into(),
            s.pool.clone().into(),
            "-r".into(),
            s.image.clone().into(),
        ]);
        if let Some(ns) = &s.namespace {
            args.extend(["-s".into(), ns.clone().into()]);
        }
        args.push(dir.clone().into());
        let log = self
            .cfg
            .state_dir
            .join("fuse")
            .join(format!("{volume_id}.log"));
        let cmd = Command::new(&self.cfg.rbd_fuse, args);
        let from = std::fs::metadata(&log).map_or(0, |m| m.len());
        let mut daemon = self.host.spawner.spawn(&cmd, &log)?;
        let what = format!("rbd-fuse for image {}/{}", s.pool, s.image);
        let file = &s.file;
        self.wait_ready(&what, &mut daemon, &log, from, |_| async move {
            self.file_answers(file).await.then(|| (file.clone(), true))
        })
        .await
    }

    /// The size of the file rbd-fuse exposes.
    async fn file_size(&self, file: &Path) -> Result<u64> {
        let f = file.to_path_buf();
        self.blocking(format!("stat {}", file.display()), move || {
            Ok(std::fs::metadata(&f)
                .ctx(|| format!("stat {}", f.display()))?
                .len())
        })
        .await
    }

    /// The credentials a staged volume was mapped with (from its keyring).
    async fn staged_creds(&self, s: &Staged) -> Result<Credentials> {
        let k = self
            .cfg
            .state_dir
            .join("keys")
            .join(format!("{}.{}.keyring", s.cluster, s.user));
        let user = s.user.clone();
        self.blocking(format!("reading {}", k.display()), move || {
            let text = std::fs::read_to_string(&k).ctx(|| format!("reading {}", k.display()))?;
            let key = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("key = "))
                .ok_or_else(|| Error::Internal(format!("{} holds no key", k.display())))?;
            Ok(Credentials {
                user,
                key: key.trim().to_owned(),
            })
        })
        .await
    }

    /// The kernel's mapping of the image (`/dev/rbdN`), from /sys/bus/rbd.
    async fn krbd_find(&self, s: &Staged) -> Result<Option<PathBuf>> {
        let (pool, ns, image) = (
            s.pool.clone(),
            s.namespace.clone().unwrap_or_default(),
            s.image.clone(),
        );
        self.blocking("listing krbd devices".into(), move || {
            let dir = Path::new("/sys/bus/rbd/devices");
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                // No rbd module loaded: nothing is mapped.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(Error::io("reading /sys/bus/rbd/devices", e)),
            };
            for e in entries.flatten() {
                let read = |f: &str| {
                    std::fs::read_to_string(e.path().join(f))
                        .map(|v| v.trim().to_owned())
                        .unwrap_or_default()
                };
                if read("pool") == pool
                    && read("pool_ns") == ns
                    && read("name") == image
                    && read("current_snap") == "-"
                {
                    let id = e.file_name().to_string_lossy().into_owned();
                    return Ok(Some(PathBuf::from(format!("/dev/rbd{id}"))));
                }
            }
            Ok(None)
        })
        .await
    }

    /// Maps the image with the kernel client (reusing a mapping); returns
    /// the device and whether it mapped it now.
    async fn krbd_map(
        &self,
        s: &Staged,
        conf: &Path,
        keyring: &Path,
        options: Option<&str>,
    ) -> Result<(PathBuf, bool)> {
        if let Some(dev) = self.krbd_find(s).await? {
            return Ok((dev, false));
        }
        let spec = s.spec();
        // No udev in containers: the kernel makes the device node.
        let mut opts = vec!["noudev".to_owned()];
        opts.extend(
            options
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|o| !o.is_empty())
                .map(str::to_owned),
        );
        let mut cmd = Command::new(
            &self.cfg.rbd,
            [
                std::ffi::OsString::from("map"),
                spec.into(),
                "--id".into(),
                s.user.clone().into(),
                "--keyring".into(),
                keyring.as_os_str().to_owned(),
                "-c".into(),
                conf.as_os_str().to_owned(),
                "-o".into(),
                opts.join(",").into(),
            ],
        );
        cmd.timeout = self.cfg.mount_timeout;
        let out = self.host.exec.run(&cmd).await?;
        let dev = out.stdout.trim();
        if !dev.starts_with("/dev/rbd") {
            return Err(Error::Internal(format!(
                "rbd map printed {dev:?}, not a device"
            )));
        }
        Ok((PathBuf::from(dev), true))
    }

    /// Unmaps a krbd device; success when it is gone already.
    async fn krbd_unmap(&self, dev: &Path) -> Result<()> {
        if !dev.exists() {
            return Ok(());
        }
        let mut cmd = Command::new(
            &self.cfg.rbd,
            [
                "unmap".as_ref(),
                "-o".as_ref(),
                "noudev".as_ref(),
                dev.as_os_str(),
            ],
        );
        cmd.timeout = self.cfg.mount_timeout;
        self.host.exec.run(&cmd).await.map(drop)
    }

    /// The nbd device whose cookie is `cookie`, from /sys/block.
    async fn nbd_find(&self, cookie: &str) -> Result<Option<PathBuf>> {
        let cookie = cookie.to_owned();
        self.blocking("listing nbd devices".into(), move || {
            let entries = std::fs::read_dir("/sys/block").ctx(|| "reading /sys/block".into())?;
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("nbd")
                    && std::fs::read_to_string(e.path().join("backend"))
                        .is_ok_and(|b| b.trim() == cookie)
                {
                    return Ok(Some(Path::new("/dev").join(name)));
                }
            }
            Ok(None)
        })
        .await
    }

    /// Whether an rbd-nbd process serves the volume's device.
    async fn nbd_alive(&self, s: &Staged) -> bool {
        let cookie = s.cookie.clone();
        self.blocking("looking for rbd-nbd".into(), move || {
            Ok(!csi_core::daemon::naming(std::ffi::OsStr::new(&cookie)).is_empty())
        })
        .await
        .unwrap_or(false)
    }

    /// Starts a detached rbd-nbd that maps the image (or, given `device`,
    /// attaches to that device, whose rbd-nbd died) and waits until it
    /// names the device it serves.
    async fn nbd_start(
        &self,
        s: &Staged,
        conf: &Path,
        keyring: &Path,
        device: Option<&Path>,
    ) -> Result<PathBuf> {
        let mut args = client_args(s, conf, keyring);
        args.extend([
            "--try-netlink".into(),
            "--reattach-timeout".into(),
            NBD_REATTACH.as_secs().to_string().into(),
            "--cookie".into(),
            s.cookie.clone().into(),
        ]);
        // mapOptions: `io-timeout=30,exclusive` become `--io-timeout 30 --exclusive`.
        for o in s
            .map_options
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
        {
            match o.split_once('=') {
                _ if o.is_empty() => {}
                Some((k, v)) => args.extend([format!("--{k}").into(), v.into()]),
                None => args.push(format!("--{o}").into()),
            }
        }
        match device {
            Some(dev) => args.extend(["attach".into(), "--device".into(), dev.into()]),
            None => args.push("map".into()),
        }
        args.push(s.spec().into());
        let dir = self.cfg.state_dir.join("nbd");
        let log = dir.join(format!("{}.log", s.cookie));
        let (d, l) = (dir.clone(), log.clone());
        // Only what this rbd-nbd prints counts; a dead one's lines stay.
        let from = self
            .blocking(format!("creating {}", dir.display()), move || {
                std::fs::create_dir_all(&d).ctx(|| format!("creating {}", d.display()))?;
                Ok(std::fs::metadata(&l).map_or(0, |m| m.len()))
            })
            .await?;
        let cmd = Command::new(&self.cfg.rbd_nbd, args);
        let mut daemon = self.host.spawner.spawn(&cmd, &log)?;
        let what = format!("rbd-nbd for image {}", s.spec());
        self.wait_ready(&what, &mut daemon, &log, from, |text| async move {
            let dev = text.lines().find(|l| l.starts_with("/dev/nbd"))?;
            Some(PathBuf::from(dev.trim()))
        })
        .await
    }

    /// Waits until `ready` (given what the helper logged past byte `from`) has what the
    /// helper `what` was started for: Unavailable when it exits first,
    /// DeadlineExceeded (and SIGTERM) after the mount timeout; the errors
    /// quote its log's last line.
    async fn wait_ready<T, F, Fut>(
        &self,
        what: &str,
        daemon: &mut csi_core::daemon::Daemon,
        log: &Path,
        from: u64,
        mut ready: F,
    ) -> Result<T>
    where
        F: FnMut(String) -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let t = Instant::now();
        loop {
            let all = std::fs::read_to_string(log).unwrap_or_default();
            let text = all.get(from as usize..).unwrap_or_default().to_owned();
            let tail = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .to_owned();
            if let Some(v) = ready(text).await {
                return Ok(v);
            }
            if let Some(code) = *daemon.exited.borrow_and_update() {
                return Err(Error::Unavailable(format!(
                    "{what} exited ({code}) before it was ready: {tail}"
                )));
            }
            if t.elapsed() > self.cfg.mount_timeout {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(daemon.pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
                return Err(Error::DeadlineExceeded(format!(
                    "{what} was not ready within {:?}: {tail}",
                    self.cfg.mount_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Maps the image with rbd-nbd, reusing a served device and attaching a
    /// new rbd-nbd to a device whose rbd-nbd died; returns the device and
    /// whether it started an rbd-nbd.
    async fn nbd_map(&self, s: &Staged, conf: &Path, keyring: &Path) -> Result<(PathBuf, bool)> {
        let _held = self.nbd_lock.lock().await;
        match self.nbd_find(&s.cookie).await? {
            Some(dev) if self.nbd_alive(s).await => Ok((dev, false)),
            Some(dev) => {
                tracing::warn!(image = %s.spec(), device = %dev.display(), "rbd-nbd is gone; attaching a new one");
                Ok((self.nbd_start(s, conf, keyring, Some(&dev)).await?, true))
            }
            None => Ok((self.nbd_start(s, conf, keyring, None).await?, true)),
        }
    }

    /// Unmaps an rbd-nbd device (success when it is gone already) and
    /// forgets the volume, with the healer kept out until both are done.
    async fn nbd_unmap(&self, volume_id: &str, s: &Staged) -> Result<()> {
        let _held = self.nbd_lock.lock().await;
        if let Some(dev) = self.nbd_find(&s.cookie).await? {
            let mut cmd = Command::new(&self.cfg.rbd_nbd, ["unmap".as_ref(), dev.as_os_str()]);
            cmd.timeout = self.cfg.mount_timeout;
            self.host.exec.run(&cmd).await?;
        }
        self.forget(volume_id).await
    }

    /// Attaches a new rbd-nbd to each staged volume's device whose rbd-nbd
    /// died (the kernel holds the device's I/O until then).
    pub(crate) async fn heal_nbd(&self) {
        let dir = self.cfg.state_dir.join("volumes");
        let ids: Vec<String> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".json")
                    .map(str::to_owned)
            })
            .collect();
        for id in ids {
            let _held = self.nbd_lock.lock().await;
            let Ok(Some(s)) = self.load(&id).await else {
                continue;
            };
            if !s.nbd || self.nbd_alive(&s).await {
                continue;
            }
            let Ok(Some(dev)) = self.nbd_find(&s.cookie).await else {
                continue;
            };
            let (conf, keyring) = self.key_paths(&s.cluster, &s.user);
            match self.nbd_start(&s, &conf, &keyring, Some(&dev)).await {
                Ok(_) => {
                    tracing::warn!(volume = %id, device = %dev.display(), "rbd-nbd had died; a new one attached to the device")
                }
                Err(e) => tracing::error!(volume = %id, error = %e, "cannot attach a new rbd-nbd"),
            }
        }
    }

    /// Whether the image is mapped here and answering.
    async fn mapped(&self, s: &Staged) -> Result<bool> {
        if s.krbd {
            return Ok(self.krbd_find(s).await?.is_some());
        }
        if s.nbd {
            return Ok(self.nbd_find(&s.cookie).await?.is_some() && self.nbd_alive(s).await);
        }
        Ok(self.file_answers(&s.file).await)
    }

    /// The device of a staged volume: its krbd device, or the loop device
    /// still attached to its rbd-fuse file.
    async fn device(&self, s: &Staged) -> Result<Option<PathBuf>> {
        if s.krbd {
            return self.krbd_find(s).await;
        }
        if s.nbd {
            return self.nbd_find(&s.cookie).await;
        }
        if let Some(dev) = &s.dev {
            let name = dev.file_name().unwrap_or_default().to_owned();
            let file = s.file.clone();
            // The recorded loop device still backed by the image's file,
            // also when its rbd-fuse is gone (then the kernel shows the
            // file as "/<image> (deleted)").
            let attached = self
                .blocking("reading a loop device".into(), move || {
                    let p = Path::new("/sys/block").join(name).join("loop/backing_file");
                    Ok(std::fs::read_to_string(p).is_ok_and(|b| {
                        let b = b.trim_end_matches('\n').trim_end_matches(" (deleted)");
                        Path::new(b) == file || Path::new(b).file_name() == file.file_name()
                    }))
                })
                .await?;
            if attached {
                return Ok(Some(dev.clone()));
            }
        }
        if self.file_answers(&s.file).await {
            return self.host.loops.find_loop(&s.file).await;
        }
        Ok(None)
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
                .into_iter()
                .filter(|m| Path::new(&m.source) == dev)
                .collect()
        })
    }

    /// The staged volume `volume_id` and its device, or NotFound when it
    /// is not staged here or `path` (when given) does not hold it.
    async fn holding(&self, volume_id: &str, path: Option<&Path>) -> Result<(Staged, PathBuf)> {
        let missing = |what: String| Error::NotFound(what);
        let s = self
            .load(volume_id)
            .await?
            .ok_or_else(|| missing(format!("volume {volume_id} is not staged on this node")))?;
        let dev = self.device(&s).await?.ok_or_else(|| {
            missing(format!(
                "volume {volume_id} has no device on this node (its rbd-fuse mapping is gone)"
            ))
        })?;
        if let Some(path) = path {
            let here = self
                .exposed(&s, &dev)
                .await?
                .iter()
                .any(|m| m.mount_point == path)
                || (s.block && same_device(path, &dev).await?);
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

    /// Blocklists a dead client of ours, so its watch stops keeping the
    /// image busy (best effort: it lapses by itself after a while).
    async fn blocklist(&self, s: &Staged, addr: &str) {
        let done = async {
            let n = self.node()?;
            let creds = n.staged_creds(s).await?;
            let conn = self.pool.get(&s.cluster, &creds).await?;
            let cmd = serde_json::json!({
                "prefix": "osd blocklist",
                "blocklistop": "add",
                "addr": addr,
                "expire": 3600.0,
            })
            .to_string();
            self.pool
                .run(&conn, "blocklisting a dead client", move |c| {
                    c.mon_command(&cmd).map(drop)
                })
                .await
        }
        .await;
        match done {
            Ok(()) => {
                tracing::info!(image = %s.image, addr, "blocklisted the dead rbd-fuse client")
            }
            Err(e) => {
                tracing::warn!(image = %s.image, addr, error = %e, "cannot blocklist the dead rbd-fuse client; its watch lapses by itself")
            }
        }
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
            file: if krbd || nbd {
                PathBuf::new()
            } else {
                n.fuse_dir(&req.volume_id).join(&image)
            },
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
        };
        let old = n.load(&req.volume_id).await?;
        if let Some(o) = &old
            && (o.block, o.krbd, o.nbd, &o.image, &o.pool)
                != (s.block, s.krbd, s.nbd, &s.image, &s.pool)
        {
            return Err(Error::FailedPrecondition(format!(
                "volume {} is staged here already in another way; unstage it first",
                req.volume_id
            )));
        }
        let mapped = n.mapped(&s).await?;
        let before = if mapped {
            vec![]
        } else {
            self.check_single_node(&s, &creds, &req.capability).await?
        };
        let (conf, keyring) = n.keys(&s.cluster, &monitors, &creds).await?;
        n.save(&req.volume_id, &s).await?;
        let (dev, started) = if krbd {
            n.krbd_map(&s, &conf, &keyring, ctx(c, "mapOptions"))
                .await?
        } else if nbd {
            n.nbd_map(&s, &conf, &keyring).await?
        } else {
            let (file, started) = n.ensure_fuse(&req.volume_id, &s, &conf, &keyring).await?;
            (n.host.loops.attach_loop(&file).await?, started)
        };
        let watcher = if started {
            let new: Vec<String> = self
                .watchers(&s, &creds)
                .await?
                .into_iter()
                .filter(|w| !before.contains(w))
                .collect();
            (new.len() == 1).then(|| new[0].clone())
        } else {
            old.and_then(|o| o.watcher)
        };
        let s = Staged {
            dev: Some(dev.clone()),
            watcher,
            ..s
        };
        n.save(&req.volume_id, &s).await?;
        if block {
            return Ok(());
        }
        let fs_type = match &req.capability.access {
            AccessType::Mount { fs_type, .. } if !fs_type.is_empty() => fs_type.clone(),
            _ => ctx(c, "fsType").unwrap_or("ext4").to_owned(),
        };
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
        let Some(s) = n.load(volume_id).await? else {
            // Never staged here (or already unstaged): nothing of ours to undo.
            return Ok(());
        };
        if let Some(dev) = n.device(&s).await? {
            let elsewhere = elsewhere(&n.exposed(&s, &dev).await?, &[staging_path]);
            if !elsewhere.is_empty() {
                return Err(Error::FailedPrecondition(format!(
                    "volume {volume_id} is still published at {}; unpublish it first",
                    elsewhere.join(", ")
                )));
            }
            n.host.mounter.unmount(staging_path).await?;
            n.stats.forget(staging_path);
            if s.krbd {
                n.krbd_unmap(&dev).await?;
            } else if s.nbd {
                n.nbd_unmap(volume_id, &s).await?;
            } else {
                n.host.loops.detach_loop(&dev).await?;
            }
        } else {
            n.host.mounter.unmount(staging_path).await?;
        }
        if s.kernel_device() {
            return n.forget(volume_id).await;
        }
        if !n.file_answers(&s.file).await
            && let Some(addr) = &s.watcher
        {
            self.blocklist(&s, addr).await;
        }
        let dir = n.fuse_dir(volume_id);
        // Every view of the mount: rbd-fuse exits once the last is gone.
        let mut views = views(&n.host.mounter.mounts().await?, &dir);
        if views.is_empty() {
            views.push(dir.clone());
        }
        for v in &views {
            n.host
                .mounter
                .unmount_network(v, Duration::from_secs(5))
                .await?;
        }
        let d = dir.clone();
        n.blocking(
            format!("removing {}", dir.display()),
            move || match std::fs::remove_dir(&d) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io(format!("removing {}", d.display()), e))
                }
                _ => Ok(()),
            },
        )
        .await?;
        n.forget(volume_id).await
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
        let s = match n.load(&req.volume_id).await? {
            Some(s) => s,
            None => {
                let (cluster, pool, image) = image_of(&req.volume_id, &req.volume_context)?;
                check_ours(&req.volume_id, &req.volume_context, &cluster, &pool, &image)?;
                return Err(not_staged());
            }
        };
        let dev = n.device(&s).await?.ok_or_else(not_staged)?;
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
        if s.nbd && !n.nbd_alive(&s).await {
            return Ok(VolumeStats {
                abnormal: Some(format!(
                    "the rbd-nbd process of image {}/{} is gone; I/O waits until a new one attaches (within {:?})",
                    s.pool, s.image, NBD_REATTACH
                )),
                ..Default::default()
            });
        }
        if !s.kernel_device() && !n.file_answers(&s.file).await {
            return Ok(VolumeStats {
                abnormal: Some(format!(
                    "the rbd-fuse process of image {}/{} is gone; I/O on the volume fails",
                    s.pool, s.image
                )),
                ..Default::default()
            });
        }
        if s.block {
            let size = n.host.blockdev.size(&dev).await?;
            return Ok(VolumeStats {
                bytes: Some((size, 0, size)),
                ..Default::default()
            });
        }
        Ok(n.stats
            .get(path, n.cfg.stats_cache, n.cfg.stats_timeout)
            .await)
    }

    async fn expand(&self, req: NodeExpand) -> Result<u64> {
        let n = self.node()?;
        let (s, dev) = n.holding(&req.volume_id, Some(&req.path)).await?;
        // The client (kernel or rbd-fuse) learns the new size from the
        // image's header notification.
        let t = Instant::now();
        loop {
            let seen = if s.kernel_device() {
                n.host.blockdev.size(&dev).await?
            } else {
                n.file_size(&s.file).await?
            };
            if seen >= req.range.required || t.elapsed() >= n.cfg.mount_timeout {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !s.kernel_device() {
            n.host.loops.refresh_loop(&dev).await?;
        }
        let size = n.host.blockdev.size(&dev).await?;
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
            n.host.blockdev.grow_fs(&dev, &fs, Some(&req.path)).await?;
            n.stats.forget(&req.path);
        }
        Ok(size)
    }
}
