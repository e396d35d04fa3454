//! Crash-safe metadata: an append-only journal made durable with one
//! fdatasync per batch of concurrent changes (group commit), compacted into
//! an atomically written snapshot (temp file, fsync, rename).

use crate::meta::{SnapshotMeta, VolumeMeta};
use csi_core::fsutil::atomic_write;
use csi_core::{Error, IoContext, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use tokio::sync::oneshot;

/// One metadata change.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Change {
    /// Create or replace a volume record.
    PutVolume(VolumeMeta),
    /// Forget a volume.
    DeleteVolume {
        /// Volume id.
        id: String,
    },
    /// Create or replace a snapshot record.
    PutSnapshot(SnapshotMeta),
    /// Forget a snapshot.
    DeleteSnapshot {
        /// Snapshot id.
        id: String,
    },
}

/// Everything the driver persists.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    /// Volumes by id.
    pub volumes: BTreeMap<String, VolumeMeta>,
    /// Snapshots by id.
    pub snapshots: BTreeMap<String, SnapshotMeta>,
}

impl State {
    fn apply(&mut self, c: Change) {
        match c {
            Change::PutVolume(v) => {
                self.volumes.insert(v.id.clone(), v);
            }
            Change::DeleteVolume { id } => {
                self.volumes.remove(&id);
            }
            Change::PutSnapshot(s) => {
                self.snapshots.insert(s.id.clone(), s);
            }
            Change::DeleteSnapshot { id } => {
                self.snapshots.remove(&id);
            }
        }
    }
}

const SNAPSHOT: &str = "state.json";
const JOURNAL: &str = "journal.log";
/// Journal entries after which the committer writes a fresh snapshot.
const COMPACT_EVERY: usize = 4096;

type Pending = (Change, oneshot::Sender<Result<()>>);

/// Handle to the committer thread.
pub struct Store {
    tx: mpsc::Sender<Pending>,
}

impl Store {
    /// Loads the state under `dir` (snapshot plus journal), compacts it and
    /// starts the committer.
    pub fn open(dir: &Path) -> Result<(Self, State)> {
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        let mut state = match std::fs::read(dir.join(SNAPSHOT)) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                Error::Internal(format!("{} is corrupt: {e}", dir.join(SNAPSHOT).display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => {
                return Err(Error::io(
                    format!("reading {}", dir.join(SNAPSHOT).display()),
                    e,
                ));
            }
        };
        let journal_path = dir.join(JOURNAL);
        replay(&journal_path, &mut state)?;
        compact(dir, &state)?;
        let journal = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&journal_path)
            .ctx(|| format!("opening {}", journal_path.display()))?;
        let (tx, rx) = mpsc::channel();
        let mirror = state.clone();
        let dir = dir.to_path_buf();
        std::thread::Builder::new()
            .name("rcsi-committer".into())
            .spawn(move || committer(dir, journal, mirror, rx))
            .map_err(|e| Error::io("starting the committer thread", e))?;
        Ok((Self { tx }, state))
    }

    /// Makes `change` durable; returns once it is on stable storage.
    pub async fn commit(&self, change: Change) -> Result<()> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send((change, done))
            .map_err(|_| Error::Internal("metadata committer has stopped".into()))?;
        wait.await
            .map_err(|_| Error::Internal("metadata committer has stopped".into()))?
    }
}

fn replay(path: &Path, state: &mut State) -> Result<()> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
    };
    let lines: Vec<String> = std::io::BufReader::new(f)
        .lines()
        .collect::<std::io::Result<_>>()
        .ctx(|| format!("reading {}", path.display()))?;
    let last = lines.len().saturating_sub(1);
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<Change>(line) {
            Ok(c) => state.apply(c),
            // A torn final line is a write that was never acknowledged.
            Err(_) if i == last => {
                tracing::warn!(path = %path.display(), "ignoring torn journal tail")
            }
            Err(e) => {
                return Err(Error::Internal(format!(
                    "{} line {} is corrupt: {e}",
                    path.display(),
                    i + 1
                )));
            }
        }
    }
    Ok(())
}

fn compact(dir: &Path, state: &State) -> Result<()> {
    let bytes = serde_json::to_vec(state).map_err(|e| Error::Internal(e.to_string()))?;
    atomic_write(&dir.join(SNAPSHOT), &bytes)?;
    let j = dir.join(JOURNAL);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&j)
        .ctx(|| format!("truncating {}", j.display()))?;
    f.sync_all().ctx(|| format!("fsync {}", j.display()))
}

fn committer(
    dir: PathBuf,
    mut journal: std::fs::File,
    mut mirror: State,
    rx: mpsc::Receiver<Pending>,
) {
    let mut since_compact = 0usize;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let mut buf = Vec::with_capacity(batch.len() * 256);
        for (c, _) in &batch {
            serde_json::to_writer(&mut buf, c).expect("metadata serializes");
            buf.push(b'\n');
        }
        let written = journal
            .write_all(&buf)
            .and_then(|_| journal.sync_data())
            .map_err(|e| format!("appending to {}: {e}", dir.join(JOURNAL).display()));
        since_compact += batch.len();
        for (c, done) in batch {
            if written.is_ok() {
                mirror.apply(c);
            }
            let _ = done.send(written.clone().map_err(Error::Internal));
        }
        if written.is_ok() && since_compact >= COMPACT_EVERY {
            match compact(&dir, &mirror) {
                Ok(()) => since_compact = 0,
                Err(e) => tracing::warn!(error = %e, "journal compaction failed; will retry"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{Backing, VolumeMeta};

    fn vol(id: &str) -> VolumeMeta {
        VolumeMeta {
            id: id.into(),
            name: format!("name-{id}"),
            capacity: 1 << 20,
            backing: Backing::Directory,
            parameters: Default::default(),
            source: None,
            created_unix: 0,
            project_id: None,
        }
    }

    #[tokio::test]
    async fn changes_survive_reopen_and_torn_tails_are_ignored() {
        let d = tempfile::tempdir().unwrap();
        {
            let (s, st) = Store::open(d.path()).unwrap();
            assert!(st.volumes.is_empty());
            s.commit(Change::PutVolume(vol("a"))).await.unwrap();
            s.commit(Change::PutVolume(vol("b"))).await.unwrap();
            s.commit(Change::DeleteVolume { id: "a".into() })
                .await
                .unwrap();
        }
        // Simulate a crash in the middle of an append.
        let mut j = std::fs::OpenOptions::new()
            .append(true)
            .open(d.path().join(JOURNAL))
            .unwrap();
        j.write_all(b"{\"op\":\"put_vol").unwrap();
        let (_s, st) = Store::open(d.path()).unwrap();
        assert_eq!(st.volumes.keys().collect::<Vec<_>>(), ["b"]);
    }

    #[tokio::test]
    async fn concurrent_commits_all_land() {
        let d = tempfile::tempdir().unwrap();
        let (s, _) = Store::open(d.path()).unwrap();
        let s = std::sync::Arc::new(s);
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(
                    async move { s.commit(Change::PutVolume(vol(&format!("v{i}")))).await },
                )
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        drop(s);
        let (_s, st) = Store::open(d.path()).unwrap();
        assert_eq!(st.volumes.len(), 64);
    }
}
