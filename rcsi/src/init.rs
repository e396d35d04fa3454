//! rcsi as a container's first process (pid 1): orphans are re-parented
//! to pid 1, so a helper left by a timed-out command (a `mount.nfs` under
//! a killed `mount`) would stay a zombie forever and fill the pod's pid
//! limit. So pid 1 forks: the child runs rcsi, the parent reaps every
//! orphan and forwards signals to the child, as tini does.

use nix::sys::signal::{SigSet, SigmaskHow, Signal, kill, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork};

/// Signals passed on to rcsi.
const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

/// When this process is pid 1, becomes the reaper and returns only in the
/// child that goes on as rcsi. Must run before any thread is started.
pub fn reap_orphans_if_pid1() {
    if std::process::id() != 1 {
        return;
    }
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set.add(Signal::SIGCHLD);
    // Blocked before the fork, so no signal slips by unforwarded.
    let mut old = SigSet::empty();
    if let Err(e) = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old)) {
        eprintln!("rcsi: cannot block signals to act as init ({e}); orphans will not be reaped");
        return;
    }
    // SAFETY: no other thread exists yet (see above).
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
        }
        Ok(ForkResult::Parent { child }) => std::process::exit(supervise(child, &set)),
        Err(e) => {
            eprintln!("rcsi: cannot fork to act as init ({e}); orphans will not be reaped");
            let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
        }
    }
}

/// Forwards signals to `child` and reaps every process that ends until
/// `child` does; returns its exit code (128 + signal when killed).
fn supervise(child: Pid, set: &SigSet) -> i32 {
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                if let Some(code) = reap(child) {
                    return code;
                }
            }
            Ok(sig) => {
                let _ = kill(child, sig);
            }
            Err(_) => {}
        }
    }
}

/// Reaps every ended process; `Some(code)` once `child` is among them.
fn reap(child: Pid) -> Option<i32> {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == child => return Some(code),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => return Some(128 + sig as i32),
            Ok(WaitStatus::StillAlive) => return None,
            Ok(_) => {}
            // No child left at all: rcsi is gone without a status.
            Err(nix::errno::Errno::ECHILD) => return Some(1),
            Err(_) => return None,
        }
    }
}
