//! NodeGetVolumeStats for network and FUSE filesystems: one statfs per path
//! in flight, answers cached for a while, and a statfs that does not return
//! reported as an abnormal condition instead of waited on.

use crate::Error;
use crate::backend::VolumeStats;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

enum Slot {
    Fresh(Instant, VolumeStats),
    Running(Instant, watch::Receiver<Option<VolumeStats>>),
}

/// Measures the usage at a path (blocking), describing failures with the function given.
pub type Measure = fn(&Path, fn(&Error) -> String) -> VolumeStats;

/// Cached statfs answers by path; see the module documentation.
pub struct StatsCache {
    slots: Arc<Mutex<HashMap<PathBuf, Slot>>>,
    hung: &'static str,
    describe: fn(&Error) -> String,
    measure: Measure,
}

impl StatsCache {
    /// A cache whose hung statfs is reported with `hung` (e.g. "the NFS
    /// server is not responding") and failed ones with `describe(error)`.
    pub fn new(hung: &'static str, describe: fn(&Error) -> String) -> Self {
        Self::measuring(hung, describe, statfs)
    }

    /// As [`StatsCache::new`], measuring with `measure` instead of statfs.
    pub fn measuring(hung: &'static str, describe: fn(&Error) -> String, measure: Measure) -> Self {
        Self {
            slots: Arc::default(),
            hung,
            describe,
            measure,
        }
    }

    /// Drops what is known about `path` (it was unmounted).
    pub fn forget(&self, path: &Path) {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(path);
    }

    /// Usage and condition of the filesystem at `path`: answered from the
    /// cache when younger than `cache`, abnormal when a statfs has run for
    /// `timeout`.
    pub async fn get(&self, path: &Path, cache: Duration, timeout: Duration) -> VolumeStats {
        let hung = |since: Instant| VolumeStats {
            abnormal: Some(format!(
                "statfs of {} has not returned for {:.0?}: {}",
                path.display(),
                since.elapsed(),
                self.hung
            )),
            ..Default::default()
        };
        let (since, mut rx) = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            match slots.get(path) {
                Some(Slot::Fresh(at, s)) if at.elapsed() < cache => return s.clone(),
                Some(Slot::Running(since, _)) if since.elapsed() >= timeout => {
                    return hung(*since);
                }
                Some(Slot::Running(since, rx)) => (*since, rx.clone()),
                _ => {
                    let (tx, rx) = watch::channel(None);
                    let now = Instant::now();
                    slots.insert(path.to_path_buf(), Slot::Running(now, rx.clone()));
                    self.spawn(path.to_path_buf(), tx);
                    (now, rx)
                }
            }
        };
        let left = timeout.saturating_sub(since.elapsed());
        match tokio::time::timeout(left, rx.wait_for(Option::is_some)).await {
            Ok(Ok(s)) => s.clone().unwrap_or_default(),
            _ => hung(since),
        }
    }

    /// Runs one statfs on a blocking thread; its answer fills the slot
    /// whenever it comes, however late.
    fn spawn(&self, path: PathBuf, tx: watch::Sender<Option<VolumeStats>>) {
        let slots = self.slots.clone();
        let (describe, measure) = (self.describe, self.measure);
        tokio::spawn(async move {
            let p = path.clone();
            let s = tokio::task::spawn_blocking(move || measure(&p, describe))
                .await
                .unwrap_or_else(|e| VolumeStats {
                    abnormal: Some(format!("statfs failed: {e}")),
                    ..Default::default()
                });
            slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(path, Slot::Fresh(Instant::now(), s.clone()));
            let _ = tx.send(Some(s));
        });
    }
}

/// Recent heals (a mount or mapping made again under published volumes),
/// each reported in its volumes' condition for a while.
pub struct Heals {
    report: Duration,
    done: Mutex<HashMap<String, (Instant, String)>>,
}

impl Heals {
    /// Heals reported for `report` after they happen.
    pub fn new(report: Duration) -> Self {
        Self {
            report,
            done: Mutex::default(),
        }
    }

    /// Records that what `key` names was healed, as `what` says.
    pub fn record(&self, key: &str, what: String) {
        self.lock().insert(key.to_owned(), (Instant::now(), what));
    }

    /// Forgets the heal of `key` (unstaged, unmounted).
    pub fn forget(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Makes `stats` abnormal with a recent heal of `key` when nothing
    /// else is wrong, saying what the pod must do about it.
    pub fn report(&self, key: &str, stats: &mut VolumeStats) {
        let heal = self
            .lock()
            .get(key)
            .filter(|(at, _)| at.elapsed() < self.report)
            .cloned();
        if stats.abnormal.is_none()
            && let Some((at, what)) = heal
        {
            stats.abnormal = Some(format!(
                "{what} {:.0?} ago. Files opened before then must be reopened; a container sees the new mount only if it mounts the volume with mountPropagation: HostToContainer, others must be restarted",
                at.elapsed()
            ));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, String)>> {
        self.done.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Usage of the filesystem at `path`, or the condition that prevents it.
pub fn statfs(path: &Path, describe: fn(&Error) -> String) -> VolumeStats {
    match crate::fsutil::statvfs(path) {
        Ok(s) => VolumeStats {
            bytes: Some((s.total_bytes, s.used_bytes, s.available_bytes)),
            inodes: Some((
                s.total_inodes,
                s.total_inodes.saturating_sub(s.free_inodes),
                s.free_inodes,
            )),
            abnormal: None,
        },
        Err(e) => VolumeStats {
            abnormal: Some(describe(&e)),
            ..Default::default()
        },
    }
}
