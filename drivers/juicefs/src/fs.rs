//! Running the `juicefs` client: secrets go in the environment (META_PASSWORD,
//! ACCESS_KEY, SECRET_KEY), never in argv, where every user of the node
//! could read them in /proc.

use crate::error::JuicefsError;
use crate::secret::FsSecret;
use csi_core::exec::{Command, Exec, Output};
use csi_core::{Error, Result};
use std::sync::Arc;
use std::time::Duration;

/// How long a failed format waits for a concurrent one to finish.
const FORMAT_RACE_WAIT: Duration = Duration::from_secs(5);

/// The `juicefs` command-line client.
pub struct Cli {
    exec: Arc<dyn Exec>,
    program: String,
    timeout: Duration,
}

/// The last line of juicefs's output, without its timestamp prefix.
fn reason(out: &Output) -> String {
    if out.stderr.trim().is_empty() {
        reason_of(&out.stdout)
    } else {
        reason_of(&out.stderr)
    }
}

/// The last non-empty line of juicefs log text, without its prefix and
/// source location.
pub(crate) fn reason_of(text: &str) -> String {
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let line = line.split_once(">: ").map_or(line, |(_, m)| m);
    line.split(" [").next().unwrap_or(line).trim().to_owned()
}

impl Cli {
    /// Runs `program` (normally `juicefs`) through `exec`, each call bounded by `timeout`.
    pub fn new(exec: Arc<dyn Exec>, program: &str, timeout: Duration) -> Self {
        Self {
            exec,
            program: program.to_owned(),
            timeout,
        }
    }

    /// A juicefs command for `fs`, its metadata password in the environment.
    pub fn command(&self, fs: &FsSecret, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.program, args.iter().copied()).timeout(self.timeout);
        if let Some(pw) = &fs.meta_password {
            cmd = cmd.env("META_PASSWORD", pw);
        }
        cmd
    }

    /// Runs a command; a timeout names the metadata engine it was waiting for.
    async fn output(&self, fs: &FsSecret, cmd: &Command) -> Result<Output> {
        match self.exec.output(cmd).await {
            Err(Error::DeadlineExceeded(_)) => Err(Error::DeadlineExceeded(
                JuicefsError::Metadata {
                    url: fs.metaurl.clone(),
                    why: format!("no answer within {:?}", self.timeout),
                }
                .to_string(),
            )),
            r => r,
        }
    }

    /// Runs a juicefs command that must succeed; `what` names it in the error.
    async fn run(&self, fs: &FsSecret, args: &[&str], what: impl FnOnce() -> String) -> Result<()> {
        let out = self.output(fs, &self.command(fs, args)).await?;
        if out.code != 0 {
            return Err(Error::Internal(format!(
                "{} failed: {}",
                what(),
                reason(&out)
            )));
        }
        Ok(())
    }

    /// Whether the metadata engine holds the filesystem (false: it holds
    /// none); a filesystem of another name is refused.
    async fn formatted(&self, fs: &FsSecret) -> Result<bool> {
        let status = self
            .output(fs, &self.command(fs, &["status", &fs.metaurl]))
            .await?;
        if status.code == 0 {
            let found = serde_json::from_str::<serde_json::Value>(&status.stdout)
                .ok()
                .and_then(|v| v["Setting"]["Name"].as_str().map(String::from))
                .unwrap_or_default();
            if found != fs.name {
                return Err(JuicefsError::OtherFilesystem {
                    wanted: fs.name.clone(),
                    found,
                }
                .into());
            }
            return Ok(true);
        }
        if status.stderr.contains("database is not formatted") {
            return Ok(false);
        }
        Err(JuicefsError::Metadata {
            url: fs.metaurl.clone(),
            why: reason(&status),
        }
        .into())
    }

    /// Formats the filesystem unless its metadata engine already holds it
    /// (idempotent: an existing filesystem is never reformatted; one with
    /// another name is refused). Returns true when it was formatted now.
    pub async fn ensure_formatted(&self, fs: &FsSecret) -> Result<bool> {
        if self.formatted(fs).await? {
            return Ok(false);
        }
        let mut args = vec!["format", "--storage", &fs.storage, "--bucket", &fs.bucket];
        args.extend(fs.format_options.iter().map(String::as_str));
        args.extend([fs.metaurl.as_str(), fs.name.as_str()]);
        let mut cmd = self.command(fs, &args);
        if let Some(k) = &fs.access_key {
            cmd = cmd.env("ACCESS_KEY", k);
        }
        if let Some(k) = &fs.secret_key {
            cmd = cmd.env("SECRET_KEY", k);
        }
        let out = self.output(fs, &cmd).await?;
        if out.code == 0 {
            return Ok(true);
        }
        // Another node may be formatting it now: juicefs puts its uuid object
        // in the bucket before it writes the metadata, so this format found
        // the bucket "not empty". Wait for that one to finish.
        let deadline = tokio::time::Instant::now() + FORMAT_RACE_WAIT.min(self.timeout);
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match self.formatted(fs).await {
                Ok(true) => return Ok(false),
                Err(e @ Error::FailedPrecondition(_)) => return Err(e),
                _ => {}
            }
        }
        Err(JuicefsError::Format {
            name: fs.name.clone(),
            why: reason(&out),
        }
        .into())
    }

    /// Creates directory `path` of the filesystem when missing and sets its
    /// hard quota to `bytes` (also to raise it). Works on the metadata
    /// engine alone: nothing is mounted.
    pub async fn set_quota(&self, fs: &FsSecret, path: &str, bytes: u64) -> Result<()> {
        // A bare number would be GiB; a `B` suffix is exact.
        let capacity = format!("{bytes}B");
        let args = [
            "quota",
            "set",
            &fs.metaurl,
            "--path",
            path,
            "--capacity",
            &capacity,
            "--create",
        ];
        self.run(fs, &args, || {
            format!(
                "setting the quota of {path} on {:?} to {bytes} bytes",
                fs.name
            )
        })
        .await
    }

    /// Removes directory `path` of a mounted filesystem and everything in
    /// it with `juicefs rmr` (done by the mount daemon, far faster than one
    /// unlink per file; into the trash when the filesystem keeps one).
    pub async fn remove_tree(&self, fs: &FsSecret, path: &std::path::Path) -> Result<()> {
        let p = path.to_string_lossy();
        self.run(fs, &["rmr", p.as_ref()], || format!("removing {p}"))
            .await
    }
}
