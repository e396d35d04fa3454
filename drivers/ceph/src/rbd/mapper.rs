//! The three ways an RBD image becomes a block device, each the core's
//! [`DeviceMapper`] beside loop: krbd (`rbd map`), rbd-nbd (a detached
//! userspace client behind /dev/nbdN, tagged with the volume id as its
//! cookie) and rbd-fuse (a detached process exposing the image as a file,
//! attached to a loop device).

use async_trait::async_trait;
use csi_core::blockdev::{DeviceMapper, LoopDevices, Mapping};
use csi_core::daemon::{Daemon, Spawner};
use csi_core::exec::{Command, Exec};
use csi_core::mount::{Mounter, views};
use csi_core::{Error, IoContext, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Filesystem type of rbd-fuse mounts in the mount table.
const FUSE_TYPE: &str = "fuse.rbd-fuse";

/// How long the kernel keeps an nbd device whose rbd-nbd died, queueing
/// its I/O for a new rbd-nbd to attach.
pub(crate) const NBD_REATTACH: Duration = Duration::from_secs(300);

/// Splits `pool[/namespace]/image`.
fn parse_spec(spec: &str) -> Result<(&str, &str, &str)> {
    match spec.split('/').collect::<Vec<_>>()[..] {
        [pool, image] => Ok((pool, "", image)),
        [pool, ns, image] => Ok((pool, ns, image)),
        _ => Err(Error::Internal(format!(
            "{spec:?} is not pool[/namespace]/image"
        ))),
    }
}

/// Runs blocking filesystem work with the mappers' deadline.
async fn blocking<T: Send + 'static>(
    what: impl Into<String>,
    timeout: Duration,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    csi_core::fsutil::blocking(what, timeout, f).await
}

/// Waits until `ready` (given what the helper logged past byte `from`)
/// has what the helper `what` was started for: Unavailable when it exits
/// first, DeadlineExceeded (and SIGTERM) after `timeout`; the errors quote
/// its log's last line.
async fn wait_ready<T, F, Fut>(
    what: &str,
    daemon: &mut Daemon,
    log: &Path,
    from: u64,
    timeout: Duration,
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
        if t.elapsed() > timeout {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(daemon.pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            return Err(Error::DeadlineExceeded(format!(
                "{what} was not ready within {timeout:?}: {tail}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The length of a log file, where a new helper's own lines start.
async fn log_start(dir: &Path, log: &Path, timeout: Duration) -> Result<u64> {
    let (d, l) = (dir.to_path_buf(), log.to_path_buf());
    blocking(format!("creating {}", dir.display()), timeout, move || {
        std::fs::create_dir_all(&d).ctx(|| format!("creating {}", d.display()))?;
        Ok(std::fs::metadata(&l).map_or(0, |m| m.len()))
    })
    .await
}

/// The kernel's RBD client: `rbd map -o noudev` makes /dev/rbdN.
pub(crate) struct Krbd {
    /// Runs `rbd`.
    pub exec: Arc<dyn Exec>,
    /// The rbd program.
    pub rbd: String,
    /// How long a map or unmap may take.
    pub timeout: Duration,
}

#[async_trait]
impl DeviceMapper for Krbd {
    fn name(&self) -> &'static str {
        "krbd"
    }

    async fn map(&self, m: &Mapping) -> Result<(PathBuf, bool)> {
        if let Some(dev) = self.find(m).await? {
            return Ok((dev, false));
        }
        // No udev in containers: the kernel makes the device node.
        let mut opts = vec!["noudev".to_owned()];
        opts.extend(
            m.options
                .as_deref()
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .filter(|o| !o.is_empty())
                .map(str::to_owned),
        );
        let mut args: Vec<OsString> = vec!["map".into(), m.source.clone().into()];
        args.extend(m.client.iter().cloned());
        args.extend(["-o".into(), opts.join(",").into()]);
        let mut cmd = Command::new(&self.rbd, args);
        cmd.timeout = self.timeout;
        let out = self.exec.run(&cmd).await?;
        let dev = out.stdout.trim();
        if !dev.starts_with("/dev/rbd") {
            return Err(Error::Internal(format!(
                "rbd map printed {dev:?}, not a device"
            )));
        }
        Ok((PathBuf::from(dev), true))
    }

    async fn find(&self, m: &Mapping) -> Result<Option<PathBuf>> {
        let (pool, ns, image) = parse_spec(&m.source)?;
        let (pool, ns, image) = (pool.to_owned(), ns.to_owned(), image.to_owned());
        blocking("listing krbd devices", self.timeout, move || {
            let entries = match std::fs::read_dir("/sys/bus/rbd/devices") {
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

    async fn alive(&self, m: &Mapping) -> Result<bool> {
        Ok(self.find(m).await?.is_some())
    }

    async fn unmap(&self, m: &Mapping) -> Result<()> {
        let Some(dev) = self.find(m).await? else {
            return Ok(());
        };
        let mut cmd = Command::new(
            &self.rbd,
            [
                "unmap".as_ref(),
                "-o".as_ref(),
                "noudev".as_ref(),
                dev.as_os_str(),
            ],
        );
        cmd.timeout = self.timeout;
        self.exec.run(&cmd).await.map(drop)
    }

    /// The kernel learns the new size from the image header's notification.
    async fn refresh(&self, _m: &Mapping, _dev: &Path) -> Result<()> {
        Ok(())
    }
}

/// rbd-nbd behind /dev/nbdN, mapped through netlink with the mapping's key
/// as the device's cookie, so a new rbd-nbd can attach to the device when
/// the old one died (the kernel holds its I/O for [`NBD_REATTACH`]).
pub(crate) struct RbdNbd {
    /// Runs `rbd-nbd unmap`.
    pub exec: Arc<dyn Exec>,
    /// Starts rbd-nbd detached.
    pub spawner: Arc<dyn Spawner>,
    /// The rbd-nbd program.
    pub rbd_nbd: String,
    /// Where each rbd-nbd's log goes (`<key>.log`).
    pub log_dir: PathBuf,
    /// How long a map or unmap may take.
    pub timeout: Duration,
    /// Held while an rbd-nbd is started or a device unmapped, so no two
    /// ever serve or unmap one device at once.
    pub lock: tokio::sync::Mutex<()>,
}

impl RbdNbd {
    /// Starts a detached rbd-nbd that maps the image (or, given `device`,
    /// attaches to that device, whose rbd-nbd died) and waits until it
    /// names the device it serves.
    async fn start(&self, m: &Mapping, device: Option<&Path>) -> Result<PathBuf> {
        let mut args: Vec<OsString> = vec!["-f".into()];
        args.extend(m.client.iter().cloned());
        args.extend([
            "--try-netlink".into(),
            "--reattach-timeout".into(),
            NBD_REATTACH.as_secs().to_string().into(),
            "--cookie".into(),
            m.key.clone().into(),
        ]);
        // mapOptions: `io-timeout=30,exclusive` become `--io-timeout 30 --exclusive`.
        for o in m.options.as_deref().unwrap_or("").split(',').map(str::trim) {
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
        args.push(m.source.clone().into());
        let log = self.log_dir.join(format!("{}.log", m.key));
        // Only what this rbd-nbd prints counts; a dead one's lines stay.
        let from = log_start(&self.log_dir, &log, self.timeout).await?;
        let mut daemon = self
            .spawner
            .spawn(&Command::new(&self.rbd_nbd, args), &log)?;
        let what = format!("rbd-nbd for image {}", m.source);
        wait_ready(
            &what,
            &mut daemon,
            &log,
            from,
            self.timeout,
            |text| async move {
                let dev = text.lines().find(|l| l.starts_with("/dev/nbd"))?;
                Some(PathBuf::from(dev.trim()))
            },
        )
        .await
    }
}

#[async_trait]
impl DeviceMapper for RbdNbd {
    fn name(&self) -> &'static str {
        "rbd-nbd"
    }

    async fn map(&self, m: &Mapping) -> Result<(PathBuf, bool)> {
        let _held = self.lock.lock().await;
        match self.find(m).await? {
            Some(dev) if self.alive(m).await? => Ok((dev, false)),
            Some(dev) => {
                tracing::warn!(image = %m.source, device = %dev.display(), "rbd-nbd is gone; attaching a new one");
                Ok((self.start(m, Some(&dev)).await?, true))
            }
            None => Ok((self.start(m, None).await?, true)),
        }
    }

    async fn find(&self, m: &Mapping) -> Result<Option<PathBuf>> {
        let cookie = m.key.clone();
        blocking("listing nbd devices", self.timeout, move || {
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

    async fn alive(&self, m: &Mapping) -> Result<bool> {
        let cookie = m.key.clone();
        blocking("looking for rbd-nbd", self.timeout, move || {
            Ok(!csi_core::daemon::naming(std::ffi::OsStr::new(&cookie)).is_empty())
        })
        .await
    }

    async fn unmap(&self, m: &Mapping) -> Result<()> {
        let _held = self.lock.lock().await;
        if let Some(dev) = self.find(m).await? {
            let mut cmd = Command::new(&self.rbd_nbd, ["unmap".as_ref(), dev.as_os_str()]);
            cmd.timeout = self.timeout;
            self.exec.run(&cmd).await?;
        }
        Ok(())
    }

    /// rbd-nbd resizes the device when the image's header changes.
    async fn refresh(&self, _m: &Mapping, _dev: &Path) -> Result<()> {
        Ok(())
    }
}

/// rbd-fuse exposing the image as the file `<dir>/<key>/<image>`, attached
/// to a loop device.
pub(crate) struct RbdFuse {
    /// Reads the mount table and unmounts rbd-fuse.
    pub mounter: Arc<dyn Mounter>,
    /// Starts rbd-fuse detached.
    pub spawner: Arc<dyn Spawner>,
    /// Attaches the file.
    pub loops: Arc<dyn LoopDevices>,
    /// The rbd-fuse program.
    pub rbd_fuse: String,
    /// Where the mounts (`<key>/`) and logs (`<key>.log`) are.
    pub dir: PathBuf,
    /// How long a mount, unmount or stat may take.
    pub timeout: Duration,
}

impl RbdFuse {
    /// The file rbd-fuse exposes for `m`.
    pub fn file(&self, m: &Mapping) -> Result<PathBuf> {
        let (_, _, image) = parse_spec(&m.source)?;
        Ok(self.dir.join(&m.key).join(image))
    }

    /// Whether `file` answers (false: missing, or its rbd-fuse is gone).
    async fn answers(&self, file: &Path) -> bool {
        let f = file.to_path_buf();
        blocking("looking at an rbd-fuse file", self.timeout, move || {
            Ok(std::fs::metadata(&f).is_ok())
        })
        .await
        .unwrap_or(false)
    }

    /// Makes the rbd-fuse mount of `m` expose its image, starting a
    /// detached rbd-fuse when none answers (a hung one's connection is
    /// aborted first); returns whether it started one.
    async fn ensure(&self, m: &Mapping, file: &Path) -> Result<bool> {
        let dir = self.dir.join(&m.key);
        // The mount table, not a stat: a stat of a hung mount would hang.
        let mounts = self.mounter.mounts().await?;
        match mounts.iter().rev().find(|x| x.mount_point == dir) {
            Some(x) if x.fs_type == FUSE_TYPE => {
                let dead = csi_core::fuse::probe(&dir, &x.dev, self.timeout).await?;
                if dead.is_none() && self.answers(file).await {
                    return Ok(false);
                }
                self.mounter
                    .unmount_network(&dir, Duration::from_secs(1))
                    .await?;
            }
            Some(x) => {
                return Err(Error::Internal(format!(
                    "{} holds a {} mount, not rbd-fuse",
                    dir.display(),
                    x.fs_type
                )));
            }
            None => {}
        }
        let (pool, ns, image) = parse_spec(&m.source)?;
        let mut args: Vec<OsString> = vec!["-f".into()];
        args.extend(m.client.iter().cloned());
        args.extend(["-p".into(), pool.into(), "-r".into(), image.into()]);
        if !ns.is_empty() {
            args.extend(["-s".into(), ns.into()]);
        }
        args.push(dir.clone().into());
        let log = self.dir.join(format!("{}.log", m.key));
        let from = log_start(&dir, &log, self.timeout).await?;
        let mut daemon = self
            .spawner
            .spawn(&Command::new(&self.rbd_fuse, args), &log)?;
        let what = format!("rbd-fuse for image {}", m.source);
        wait_ready(
            &what,
            &mut daemon,
            &log,
            from,
            self.timeout,
            |_| async move { self.answers(file).await.then_some(true) },
        )
        .await
    }
}

#[async_trait]
impl DeviceMapper for RbdFuse {
    fn name(&self) -> &'static str {
        "rbd-fuse"
    }

    async fn map(&self, m: &Mapping) -> Result<(PathBuf, bool)> {
        let file = self.file(m)?;
        let started = self.ensure(m, &file).await?;
        Ok((self.loops.attach_loop(&file).await?, started))
    }

    async fn find(&self, m: &Mapping) -> Result<Option<PathBuf>> {
        let file = self.file(m)?;
        if let Some(dev) = &m.device {
            let name = dev.file_name().unwrap_or_default().to_owned();
            let f = file.clone();
            // The recorded loop device still backed by the image's file,
            // also when its rbd-fuse is gone (then the kernel shows the
            // file as "/<image> (deleted)").
            let attached = blocking("reading a loop device", self.timeout, move || {
                let p = Path::new("/sys/block").join(name).join("loop/backing_file");
                Ok(std::fs::read_to_string(p).is_ok_and(|b| {
                    let b = b.trim_end_matches('\n').trim_end_matches(" (deleted)");
                    Path::new(b) == f || Path::new(b).file_name() == f.file_name()
                }))
            })
            .await?;
            if attached {
                return Ok(Some(dev.clone()));
            }
        }
        if self.answers(&file).await {
            return self.loops.find_loop(&file).await;
        }
        Ok(None)
    }

    async fn alive(&self, m: &Mapping) -> Result<bool> {
        Ok(self.answers(&self.file(m)?).await)
    }

    /// Detaches the loop device (when still in use, at its last close),
    /// then unmounts every view of the rbd-fuse mount, so rbd-fuse exits.
    async fn unmap(&self, m: &Mapping) -> Result<()> {
        if let Some(dev) = self.find(m).await? {
            self.loops.detach_loop(&dev).await?;
        }
        let dir = self.dir.join(&m.key);
        let mut all = views(&self.mounter.mounts().await?, &dir);
        if all.is_empty() {
            all.push(dir.clone());
        }
        for v in &all {
            self.mounter
                .unmount_network(v, Duration::from_secs(5))
                .await?;
        }
        blocking(
            format!("removing {}", dir.display()),
            self.timeout,
            move || match std::fs::remove_dir(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io(format!("removing {}", dir.display()), e))
                }
                _ => Ok(()),
            },
        )
        .await
    }

    async fn refresh(&self, _m: &Mapping, dev: &Path) -> Result<()> {
        self.loops.refresh_loop(dev).await
    }
}
