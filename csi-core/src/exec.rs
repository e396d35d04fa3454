//! Running external programs with a timeout, behind a trait tests can record.

use crate::{Error, Result};
use async_trait::async_trait;
use std::ffi::OsString;
use std::sync::Mutex;
use std::time::Duration;

/// A program invocation.
#[derive(Clone, PartialEq, Eq)]
pub struct Command {
    /// Program name or path.
    pub program: String,
    /// Arguments (visible to every user in /proc: never put secrets here).
    pub args: Vec<OsString>,
    /// Extra environment variables, the place for secrets (Debug hides their values).
    pub env: Vec<(String, String)>,
    /// Killed after this long.
    pub timeout: Duration,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let env: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Command")
            .field("program", &self.program)
            .field("args", &self.args)
            .field("env (values hidden)", &env)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Command {
    /// A command with the default 2-minute timeout.
    pub fn new(program: &str, args: impl IntoIterator<Item = impl Into<OsString>>) -> Self {
        Self {
            program: program.to_owned(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            timeout: Duration::from_secs(120),
        }
    }

    /// Adds an environment variable (for secrets: not shown in argv or Debug).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Sets the timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// The command line, for messages.
    pub fn display(&self) -> String {
        let mut s = self.program.clone();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }
}

/// What a finished program produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs programs.
#[async_trait]
pub trait Exec: Send + Sync {
    /// Runs `cmd`; a non-zero exit is returned, not an error.
    async fn output(&self, cmd: &Command) -> Result<Output>;

    /// Runs `cmd` and fails with its stderr when it exits non-zero.
    async fn run(&self, cmd: &Command) -> Result<Output> {
        let out = self.output(cmd).await?;
        if out.code != 0 {
            let msg = out.stderr.trim();
            let msg = if msg.is_empty() {
                out.stdout.trim()
            } else {
                msg
            };
            return Err(Error::Internal(format!(
                "`{}` failed (exit {}): {}",
                cmd.display(),
                out.code,
                tail(msg, 600)
            )));
        }
        Ok(out)
    }
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Runs real programs with tokio. Each runs in its own process group, and
/// when it times out or its caller goes away the whole group is killed: a
/// helper it started (`mount.nfs` under `mount`) must not go on and finish
/// the job after the call failed.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemExec;

/// Kills a process group with SIGKILL when dropped, unless disarmed.
struct KillGroup(Option<nix::unistd::Pid>);

impl Drop for KillGroup {
    fn drop(&mut self) {
        // The group id stays the group's while any member lives. The
        // killed are not awaited: a process in a hung mount may never exit
        // (tokio reaps the program in the background when it does).
        if let Some(g) = self.0 {
            let _ = nix::sys::signal::killpg(g, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Everything `pipe` yields until it closes.
async fn read_all(pipe: Option<impl tokio::io::AsyncRead + Unpin>) -> std::io::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    if let Some(mut p) = pipe {
        p.read_to_end(&mut buf).await?;
    }
    Ok(buf)
}

#[async_trait]
impl Exec for SystemExec {
    async fn output(&self, cmd: &Command) -> Result<Output> {
        use std::process::Stdio;
        let spawned = tokio::process::Command::new(&cmd.program)
            .args(&cmd.args)
            .envs(cmd.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn();
        let mut child = match spawned {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::FailedPrecondition(format!(
                    "{} is not installed on this node",
                    cmd.program
                )));
            }
            Err(e) => return Err(Error::io(format!("running {}", cmd.display()), e)),
            Ok(c) => c,
        };
        // Armed until the program has finished and its output is read.
        let mut group = KillGroup(child.id().map(|id| nix::unistd::Pid::from_raw(id as i32)));
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let run = async { tokio::try_join!(read_all(stdout), read_all(stderr), child.wait()) };
        match tokio::time::timeout(cmd.timeout, run).await {
            Err(_) => Err(Error::DeadlineExceeded(format!(
                "`{}` did not finish within {:?}",
                cmd.display(),
                cmd.timeout
            ))),
            Ok(Err(e)) => Err(Error::io(format!("running {}", cmd.display()), e)),
            Ok(Ok((stdout, stderr, status))) => {
                group.0 = None;
                Ok(Output {
                    code: status.code().unwrap_or(-1),
                    stdout: String::from_utf8_lossy(&stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&stderr).into_owned(),
                })
            }
        }
    }
}

/// Records every command and answers from a script; for unit tests.
#[derive(Default)]
pub struct RecordingExec {
    /// Commands run so far.
    pub calls: Mutex<Vec<Command>>,
    /// Answers, matched by program name; unmatched programs succeed silently.
    pub answers: Mutex<Vec<(String, Output)>>,
}

#[async_trait]
impl Exec for RecordingExec {
    async fn output(&self, cmd: &Command) -> Result<Output> {
        self.calls.lock().unwrap().push(cmd.clone());
        let answers = self.answers.lock().unwrap();
        Ok(answers
            .iter()
            .find(|(p, _)| *p == cmd.program)
            .map(|(_, o)| o.clone())
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `pid` has ended (gone, or a zombie not reaped yet).
    fn ended(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(s) => s
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z')),
        }
    }

    #[tokio::test]
    async fn a_timeout_or_a_caller_gone_kills_what_the_program_started_too() {
        let d = tempfile::tempdir().unwrap();
        let scripts = [
            // The program waits for its helper.
            "sleep 30 & echo $! > {pid}; wait",
            // The program is gone, its helper holds the output open.
            "sleep 30 & echo $! > {pid}",
        ];
        let short = Duration::from_millis(300);
        for (i, (script, abandoned)) in scripts
            .iter()
            .flat_map(|s| [(s, false), (s, true)])
            .enumerate()
        {
            let pidfile = d.path().join(format!("pid{i}"));
            let script = script.replace("{pid}", pidfile.to_str().unwrap());
            let t = std::time::Instant::now();
            if abandoned {
                // The caller's future is dropped long before the bound.
                let cmd =
                    Command::new("sh", ["-c", script.as_str()]).timeout(Duration::from_secs(60));
                let call = tokio::time::timeout(short, SystemExec.output(&cmd)).await;
                assert!(call.is_err(), "{script}: finished");
            } else {
                let cmd = Command::new("sh", ["-c", script.as_str()]).timeout(short);
                let e = SystemExec.output(&cmd).await.unwrap_err();
                assert!(matches!(e, Error::DeadlineExceeded(_)), "{e}");
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{script}: {:?}",
                t.elapsed()
            );
            let helper: i32 = std::fs::read_to_string(&pidfile)
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            let gone = std::time::Instant::now();
            while !ended(helper) {
                assert!(
                    gone.elapsed() < Duration::from_secs(5),
                    "{script}: helper {helper} still runs"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    #[tokio::test]
    async fn real_exec_reports_failures_and_timeouts() {
        let e = SystemExec;
        let ok = e.run(&Command::new("sh", ["-c", "echo hi"])).await.unwrap();
        assert_eq!(ok.stdout, "hi\n");
        let err = e
            .run(&Command::new("sh", ["-c", "echo bad >&2; exit 3"]))
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("exit 3") && err.to_string().contains("bad"),
            "{err}"
        );
        let slow = Command::new("sleep", ["5"]).timeout(Duration::from_millis(100));
        assert!(matches!(
            e.run(&slow).await,
            Err(Error::DeadlineExceeded(_))
        ));
        let missing = Command::new("no-such-program-rcsi", Vec::<String>::new());
        assert!(matches!(
            e.run(&missing).await,
            Err(Error::FailedPrecondition(_))
        ));
    }

    #[tokio::test]
    async fn environment_reaches_the_program_and_not_debug() {
        let cmd = Command::new("sh", ["-c", "printf %s \"$RCSI_TEST_SECRET\""])
            .env("RCSI_TEST_SECRET", "hunter2");
        assert_eq!(SystemExec.run(&cmd).await.unwrap().stdout, "hunter2");
        let shown = format!("{cmd:?} {}", cmd.display());
        assert!(
            !shown.contains("hunter2") && shown.contains("RCSI_TEST_SECRET"),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn recording_exec_records_argv() {
        let r = RecordingExec::default();
        r.run(&Command::new("mkfs.ext4", ["/dev/loop0"]))
            .await
            .unwrap();
        assert_eq!(r.calls.lock().unwrap()[0].display(), "mkfs.ext4 /dev/loop0");
    }
}
