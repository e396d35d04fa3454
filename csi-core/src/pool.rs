//! The thread pool that runs blocking filesystem and mount work.
//!
//! tokio's blocking pool wakes a parked thread for every job, which on a
//! busy node costs two context switches per call. Here a thread that runs
//! out of work first yields for a short while and takes any job queued
//! meanwhile; a job is queued without a wake-up when enough threads are
//! spinning to take every queued job. A job stuck in a hung mount holds
//! only its own thread: jobs behind it are taken by spinning threads or by
//! threads woken or started for them.

use std::collections::VecDeque;
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard};
use std::time::Duration;

type Job = Box<dyn FnOnce() + Send>;

/// Most threads the pool starts; further jobs wait for a free one.
const MAX_THREADS: usize = 512;
/// How many times a thread out of work yields before it parks.
const SPINS: usize = 32;
/// How long a parked thread waits for work before it exits.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Threads out of work that still look at the queue before parking.
    spinning: usize,
    /// Threads parked on the condition variable.
    idle: usize,
    /// Threads alive.
    threads: usize,
    /// Wake-ups sent and not yet taken by a parked thread.
    notified: usize,
    /// Threads started and not yet looking at the queue.
    starting: usize,
}

struct Pool {
    state: Mutex<State>,
    wake: Condvar,
}

static POOL: LazyLock<Pool> = LazyLock::new(|| Pool {
    state: Mutex::new(State::default()),
    wake: Condvar::new(),
});

impl Pool {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn submit(&'static self, job: Job) {
        let mut s = self.lock();
        s.jobs.push_back(job);
        // Every queued job needs a thread that will look at the queue.
        let coming = s.spinning + s.notified + s.starting;
        if s.jobs.len() <= coming {
            return;
        }
        if s.idle > s.notified {
            s.notified += 1;
            self.wake.notify_one();
        } else if s.threads < MAX_THREADS {
            s.threads += 1;
            s.starting += 1;
            drop(s);
            let started = std::thread::Builder::new()
                .name("rcsi-fs".into())
                .spawn(move || self.work());
            if let Err(e) = started {
                let mut s = self.lock();
                s.threads -= 1;
                s.starting -= 1;
                tracing::error!(error = %e, "cannot start a filesystem worker thread");
            }
        }
    }

    fn work(&'static self) {
        let mut s = self.lock();
        s.starting -= 1;
        loop {
            if let Some(job) = s.jobs.pop_front() {
                drop(s);
                job();
                s = self.lock();
                continue;
            }
            s.spinning += 1;
            let mut found = None;
            for _ in 0..SPINS {
                drop(s);
                std::thread::yield_now();
                s = self.lock();
                if let Some(job) = s.jobs.pop_front() {
                    found = Some(job);
                    break;
                }
            }
            s.spinning -= 1;
            if let Some(job) = found {
                drop(s);
                job();
                s = self.lock();
                continue;
            }
            s.idle += 1;
            let (next, timeout) = self
                .wake
                .wait_timeout_while(s, KEEP_ALIVE, |s| s.notified == 0 && s.jobs.is_empty())
                .unwrap_or_else(|e| e.into_inner());
            s = next;
            s.idle -= 1;
            if s.notified > 0 {
                s.notified -= 1;
            } else if timeout.timed_out() && s.jobs.is_empty() {
                s.threads -= 1;
                return;
            }
        }
    }
}

/// Runs `f` on the pool with the caller's tokio runtime entered; the
/// returned receiver gets its result, or is closed if `f` panicked.
pub(crate) fn spawn<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> tokio::sync::oneshot::Receiver<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let rt = tokio::runtime::Handle::try_current().ok();
    POOL.submit(Box::new(move || {
        let _entered = rt.as_ref().map(|h| h.enter());
        if let Ok(v) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            let _ = tx.send(v);
        }
    }));
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_jobs_all_run_and_answer() {
        let ran = Arc::new(AtomicUsize::new(0));
        let rxs: Vec<_> = (0..2000)
            .map(|i| {
                let ran = ran.clone();
                spawn(move || {
                    ran.fetch_add(1, Ordering::Relaxed);
                    i * 2
                })
            })
            .collect();
        for (i, rx) in rxs.into_iter().enumerate() {
            assert_eq!(rx.await.unwrap(), i * 2);
        }
        assert_eq!(ran.load(Ordering::Relaxed), 2000);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_behind_hung_ones_still_run() {
        // Eight jobs that never finish (until released), then quick ones.
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        for _ in 0..8 {
            let r = release.clone();
            drop(spawn(move || {
                let (m, cv) = &*r;
                let _g = cv
                    .wait_while(m.lock().unwrap(), |released| !*released)
                    .unwrap();
            }));
        }
        for i in 0..100 {
            let got = tokio::time::timeout(Duration::from_secs(5), spawn(move || i)).await;
            assert_eq!(
                got.expect("a quick job waited behind hung ones").unwrap(),
                i
            );
        }
        let (m, cv) = &*release;
        *m.lock().unwrap() = true;
        cv.notify_all();
    }

    #[tokio::test]
    async fn a_panic_closes_the_receiver_and_the_runtime_is_entered() {
        assert!(spawn(|| panic!("boom")).await.is_err());
        let inside = spawn(|| tokio::runtime::Handle::try_current().is_ok());
        assert!(inside.await.unwrap(), "jobs run with the runtime entered");
    }
}
