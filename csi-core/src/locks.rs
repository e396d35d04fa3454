//! Per-key operation guards (a second operation on a busy key gets
//! Aborted) and the runner that makes mutating calls safe to cancel.

use crate::{Error, Result};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio_util::task::TaskTracker;

/// Keys with an operation in flight: -1 for an exclusive holder, else the
/// number of shared holders.
#[derive(Clone, Default)]
pub struct OpLocks {
    busy: Arc<Mutex<HashMap<String, isize>>>,
}

/// Holds a key until dropped.
#[must_use = "the lock is released when the guard is dropped"]
pub struct OpGuard {
    busy: Arc<Mutex<HashMap<String, isize>>>,
    key: String,
}

impl OpLocks {
    /// Takes `kind`/`key` alone or fails with Aborted naming what is busy.
    pub fn try_lock(&self, kind: &str, key: &str) -> Result<OpGuard> {
        self.take(kind, key, false)
    }

    /// Takes `kind`/`key` beside other shared holders (a restore or clone
    /// reading its source); Aborted while an exclusive holder has it.
    pub fn try_lock_shared(&self, kind: &str, key: &str) -> Result<OpGuard> {
        self.take(kind, key, true)
    }

    fn take(&self, kind: &str, key: &str, shared: bool) -> Result<OpGuard> {
        let full = format!("{kind}\0{key}");
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        match (busy.get_mut(&full), shared) {
            (None, _) => {
                busy.insert(full.clone(), if shared { 1 } else { -1 });
            }
            (Some(n), true) if *n > 0 => *n += 1,
            _ => {
                return Err(Error::Aborted(format!(
                    "an operation on {kind} {key:?} is already in progress; retry later"
                )));
            }
        }
        Ok(OpGuard {
            busy: self.busy.clone(),
            key: full,
        })
    }
}

/// One per process: the lock table shared by the Controller and Node
/// services, and the tasks that run mutating backend calls.
///
/// tonic drops a handler's future when the client's deadline passes or it
/// resets the stream. A mutating call therefore runs in its own task with
/// its guards held inside it, so it always finishes (or cleans up) as if the
/// client had waited, and the key stays busy until it has.
#[derive(Clone, Default)]
pub struct Operations {
    locks: OpLocks,
    tasks: TaskTracker,
}

impl Operations {
    /// Takes `kind`/`key` alone or fails with Aborted naming what is busy.
    pub fn lock(&self, kind: &str, key: &str) -> Result<OpGuard> {
        self.locks.try_lock(kind, key)
    }

    /// Takes `kind`/`key` beside other shared holders.
    pub fn lock_shared(&self, kind: &str, key: &str) -> Result<OpGuard> {
        self.locks.try_lock_shared(kind, key)
    }

    /// Runs `op` to completion in its own task, holding `guards` until it ends.
    pub async fn run<T: Send + 'static>(
        &self,
        guards: Vec<OpGuard>,
        op: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let task = self.tasks.spawn(async move {
            let result = op.await;
            drop(guards);
            result
        });
        task.await
            .map_err(|e| Error::Internal(format!("operation task failed: {e}")))?
    }

    /// Waits for every operation still running (at shutdown).
    pub async fn wait(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        match busy.get_mut(&self.key) {
            Some(n) if *n > 1 => *n -= 1,
            _ => {
                busy.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_aborted_until_release() {
        let locks = OpLocks::default();
        let g = locks.try_lock("volume", "a").unwrap();
        assert!(matches!(
            locks.try_lock("volume", "a"),
            Err(Error::Aborted(_))
        ));
        assert!(locks.try_lock("name", "a").is_ok());
        drop(g);
        assert!(locks.try_lock("volume", "a").is_ok());
    }

    #[test]
    fn shared_holders_exclude_only_exclusive_ones() {
        let locks = OpLocks::default();
        let a = locks.try_lock_shared("snapshot", "s").unwrap();
        let b = locks.try_lock_shared("snapshot", "s").unwrap();
        assert!(matches!(
            locks.try_lock("snapshot", "s"),
            Err(Error::Aborted(_))
        ));
        drop(a);
        assert!(locks.try_lock("snapshot", "s").is_err(), "b still holds it");
        drop(b);
        let x = locks.try_lock("snapshot", "s").unwrap();
        assert!(locks.try_lock_shared("snapshot", "s").is_err());
        drop(x);
    }

    #[tokio::test]
    async fn a_dropped_caller_does_not_cut_the_operation_short() {
        let ops = Operations::default();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let g = ops.lock("volume", "v").unwrap();
        let caller = ops.run(vec![g], async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let _ = tx.send(());
            Ok(())
        });
        // The client gives up long before the operation ends.
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(5), caller)
                .await
                .is_err()
        );
        assert!(matches!(ops.lock("volume", "v"), Err(Error::Aborted(_))));
        rx.await.expect("the operation ran to its end");
        ops.wait().await;
        assert!(
            ops.lock("volume", "v").is_ok(),
            "guard released with the task"
        );
    }
}
