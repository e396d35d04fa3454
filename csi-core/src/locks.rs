//! Per-key operation guards: a second operation on a busy key gets Aborted.

use crate::{Error, Result};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Set of keys with an operation in flight.
#[derive(Clone, Default)]
pub struct OpLocks {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Holds a key until dropped.
#[must_use = "the lock is released when the guard is dropped"]
pub struct OpGuard {
    busy: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl OpLocks {
    /// Takes `kind`/`key` or fails with Aborted naming what is busy.
    pub fn try_lock(&self, kind: &str, key: &str) -> Result<OpGuard> {
        let full = format!("{kind}\0{key}");
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if !busy.insert(full.clone()) {
            return Err(Error::Aborted(format!(
                "an operation on {kind} {key:?} is already in progress; retry later"
            )));
        }
        Ok(OpGuard {
            busy: self.busy.clone(),
            key: full,
        })
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        busy.remove(&self.key);
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
}
