//! Long-lived helper processes (FUSE daemons such as `juicefs mount` or
//! `ceph-fuse`) that must outlive the node plugin: each starts in its own
//! session, and can be moved out of the plugin's cgroups so a container
//! runtime stopping the plugin's container does not kill it with the rest.

use crate::exec::Command;
use crate::{Error, IoContext, Result};
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use tokio::sync::watch;

/// A started daemon.
#[derive(Debug)]
pub struct Daemon {
    /// Its process id.
    pub pid: u32,
    /// Becomes `Some(exit code)` (-1: killed by a signal) when it exits.
    pub exited: watch::Receiver<Option<i32>>,
}

/// Starts daemons.
pub trait Spawner: Send + Sync {
    /// Starts `cmd` detached (stdin null, stdout and stderr appended to
    /// `log`); returns at once, before the daemon is ready.
    fn spawn(&self, cmd: &Command, log: &Path) -> Result<Daemon>;
}

/// Where daemons go to escape the plugin's cgroups: a cgroup named `name`
/// under every hierarchy of the cgroup filesystem mounted at `root` (the
/// host's, e.g. a hostPath of /sys/fs/cgroup), v1 or v2.
#[derive(Clone, Debug)]
pub struct CgroupEscape {
    /// The host's cgroup filesystem root.
    pub root: PathBuf,
    /// Cgroup created under each hierarchy for the daemons.
    pub name: String,
}

impl CgroupEscape {
    /// Creates the daemon cgroup in every hierarchy (copying cpuset limits
    /// from the parent, which a new v1 cpuset lacks) and returns the
    /// `cgroup.procs` files to join.
    fn prepare(&self) -> Result<Vec<CString>> {
        let mut hierarchies = Vec::new();
        if self.root.join("cgroup.procs").exists() {
            hierarchies.push(self.root.clone()); // v2
        } else {
            let entries = std::fs::read_dir(&self.root)
                .ctx(|| format!("reading the cgroup root {}", self.root.display()))?;
            for e in entries.flatten() {
                let p = e.path();
                let real = e.file_type().is_ok_and(|t| t.is_dir() && !t.is_symlink());
                if real && p.join("cgroup.procs").exists() {
                    hierarchies.push(p);
                }
            }
        }
        if hierarchies.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "{} holds no cgroup hierarchy; mount the host's /sys/fs/cgroup there",
                self.root.display()
            )));
        }
        let mut procs = Vec::new();
        for h in hierarchies {
            let dir = h.join(&self.name);
            std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let mine = dir.join(f);
                if std::fs::read_to_string(&mine).is_ok_and(|v| v.trim().is_empty()) {
                    let parent = std::fs::read_to_string(h.join(f))
                        .ctx(|| format!("reading {}", h.join(f).display()))?;
                    std::fs::write(&mine, parent.trim())
                        .ctx(|| format!("writing {}", mine.display()))?;
                }
            }
            let p = dir.join("cgroup.procs");
            procs
                .push(CString::new(p.as_os_str().as_encoded_bytes()).map_err(|_| {
                    Error::InvalidArgument(format!("{} contains NUL", p.display()))
                })?);
        }
        Ok(procs)
    }
}

/// Starts real processes; see the module documentation.
#[derive(Clone, Debug, Default)]
pub struct SystemSpawner {
    /// Cgroups to move daemons into; None keeps them in the plugin's.
    pub escape: Option<CgroupEscape>,
}

/// The host's cgroup namespace when it differs from ours (a container with
/// its own cgroup namespace can only move processes within it).
fn host_cgroup_ns() -> Option<OwnedFd> {
    let ours = std::fs::read_link("/proc/self/ns/cgroup").ok()?;
    let host = std::fs::read_link("/proc/1/ns/cgroup").ok()?;
    if ours == host {
        return None;
    }
    std::fs::File::open("/proc/1/ns/cgroup")
        .ok()
        .map(OwnedFd::from)
}

impl Spawner for SystemSpawner {
    fn spawn(&self, cmd: &Command, log: &Path) -> Result<Daemon> {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::process::CommandExt;
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(log)
            .ctx(|| format!("opening {}", log.display()))?;
        let err = out
            .try_clone()
            .ctx(|| format!("opening {}", log.display()))?;
        let procs = match &self.escape {
            Some(e) => e.prepare()?,
            None => Vec::new(),
        };
        let ns = if procs.is_empty() {
            None
        } else {
            host_cgroup_ns()
        };
        let ns_fd = ns.as_ref().map(|f| f.as_raw_fd());
        let mut c = std::process::Command::new(&cmd.program);
        c.args(&cmd.args)
            .envs(cmd.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: the closure runs between fork and exec and makes only
        // async-signal-safe system calls on memory prepared before the fork.
        unsafe {
            c.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = ns_fd
                    && libc::setns(fd, libc::CLONE_NEWCGROUP) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                for p in &procs {
                    let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // "0" moves the writing process.
                    let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if n != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = tokio::process::Command::from(c)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => Error::FailedPrecondition(format!(
                    "{} is not installed on this node",
                    cmd.program
                )),
                _ => Error::io(format!("starting {}", cmd.display()), e),
            })?;
        drop(ns);
        let pid = child.id().unwrap_or_default();
        let (tx, exited) = watch::channel(None);
        tokio::spawn(async move {
            let mut child = child;
            let code = child.wait().await.map_or(-1, |s| s.code().unwrap_or(-1));
            let _ = tx.send(Some(code));
        });
        Ok(Daemon { pid, exited })
    }
}

/// Processes, not exiting, that have `arg` among their arguments (how a
/// restarted plugin finds the daemons it started: by a mountpoint, a cookie).
pub fn naming(arg: &std::ffi::OsStr) -> Vec<i32> {
    let want = arg.as_encoded_bytes();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == want))
        })
        .filter(|pid| !dying(*pid))
        .collect()
}

/// Whether process `pid` is exiting: a zombie (leader) or a SIGKILL pending
/// on any of its threads. A missing process counts as exiting.
pub fn dying(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return true;
    };
    let status = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    let leader = status(format!("/proc/{pid}/status").into());
    if field(&leader, "State:").is_some_and(|s| s.starts_with(['Z', 'X'])) {
        return true;
    }
    tasks.flatten().any(|t| {
        let s = status(t.path().join("status"));
        ["SigPnd:", "ShdPnd:"].iter().any(|k| {
            field(&s, k)
                .and_then(|v| u64::from_str_radix(v, 16).ok())
                .is_some_and(|mask| mask & (1 << (libc::SIGKILL - 1)) != 0)
        })
    })
}

/// The value of `key` in a /proc status text.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn daemons_start_in_their_own_session_and_report_their_exit() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let cmd = Command::new("sh", ["-c", "echo started; ps -o sid= -p $$; exit 3"]);
        let mut d = SystemSpawner::default().spawn(&cmd, &log).unwrap();
        let code = *d.exited.wait_for(Option::is_some).await.unwrap();
        assert_eq!(code, Some(3));
        let text = std::fs::read_to_string(&log).unwrap();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("started"));
        let sid: u32 = lines.next().unwrap().trim().parse().unwrap();
        assert_eq!(sid, d.pid, "the daemon leads its own session");
        let missing = Command::new("no-such-program-rcsi", Vec::<String>::new());
        let e = SystemSpawner::default().spawn(&missing, &log).unwrap_err();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{e}");
    }

    #[test]
    fn this_process_is_not_dying_and_a_missing_one_is() {
        assert!(!dying(std::process::id() as i32));
        assert!(dying(i32::MAX));
    }
}
