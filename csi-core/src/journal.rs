//! Crash-safe driver metadata: an append-only journal of changes made
//! durable with one `fdatasync` per batch of concurrent commits (group
//! commit), compacted into a snapshot written atomically (temp file, fsync,
//! rename).
//!
//! - Records are framed (length and CRC-32), so a torn write is recognised
//!   wherever it lies and skipped: it was never acknowledged.
//! - A failed append (ENOSPC, EIO) is cut back off the file before the next
//!   batch; if that fails too, or an fsync fails (its pages cannot be trusted
//!   to be retried), the journal refuses every later write with a clear error.
//! - Space ahead of the last record is written with filler bytes, so an
//!   append overwrites allocated blocks: its `fdatasync` flushes the data
//!   without a filesystem journal commit (no size or extent change), and
//!   metadata can still be written (a DeleteVolume that frees space) when
//!   volumes have filled the disk. More is preallocated beyond that.
//! - A change is applied to the in-memory state by whoever commits its
//!   batch, after it is durable and before the caller hears of it: a caller
//!   that goes away midway cannot leave a durable change invisible.
//!
//! [`Log`] is generic over the state it keeps; [`FileJournal`] is the
//! name→id reservation journal that drivers share through [`NameJournal`].

use crate::fsutil::atomic_write;
use crate::{Error, IoContext, Result};
use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use tokio::sync::oneshot;
use tracing::warn;

/// State kept by a [`Log`]: a snapshot plus the changes applied to it.
pub trait LogState: Default + Clone + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// One change. Applying the same change twice must give the same state
    /// (replay after a crash during compaction applies some twice).
    type Change: Clone + Serialize + DeserializeOwned + Send + 'static;
    /// Applies one change.
    fn apply(&mut self, change: Self::Change);
}

const SNAPSHOT: &str = "state.json";
const JOURNAL: &str = "journal.log";
/// First bytes of a framed journal; older journals are JSON lines.
const MAGIC: &[u8; 8] = b"RCSIJNL1";
/// Records after which the committer writes a fresh snapshot.
const COMPACT_EVERY: usize = 4096;
/// Bytes preallocated for appends beyond the end of the journal file.
const RESERVE: i64 = 4 << 20;
/// Bytes written with [`FILL`] ahead of the last record, at a time.
const AHEAD: u64 = 1 << 20;
/// The filler byte: never the start of an intact record (its length would
/// exceed [`MAX_RECORD`]), so replay, of any version, skips it.
const FILL: u8 = 0xFF;
/// Largest record accepted on replay.
const MAX_RECORD: usize = 16 << 20;

/// A change waiting for its batch, and whom to tell when it is done.
struct Pending<C> {
    change: C,
    done: Done,
}

/// How a waiting caller hears of its change.
enum Done {
    /// A blocking thread parked on its slot.
    Thread(Arc<Slot>),
    /// An async task awaiting a channel.
    Task(oneshot::Sender<Result<()>>),
}

/// Where a blocking caller waits for its result or its turn to lead.
#[derive(Default)]
struct Slot {
    turn: Mutex<Turn>,
    cv: Condvar,
}

/// What a blocking caller is told.
#[derive(Default)]
enum Turn {
    #[default]
    Wait,
    /// Commit the queued batch for everyone.
    Lead,
    Done(Result<()>),
}

impl Slot {
    fn set(&self, turn: Turn) {
        *lock(&self.turn) = turn;
        self.cv.notify_one();
    }
}

/// Changes queued for the next batch.
struct Queue<C> {
    pending: Vec<Pending<C>>,
    /// Whether a leader is committing (or has been chosen to).
    leading: bool,
    /// The journal thread is asked to lead (for async callers).
    thread_turn: bool,
    /// Every [`Log`] is gone: the journal thread ends.
    stopped: bool,
}

/// What a [`Log`]'s handles, its leaders and its journal thread share.
struct Shared<S: LogState> {
    queue: Mutex<Queue<S::Change>>,
    /// Wakes the journal thread.
    wake: Condvar,
    /// Only the leader takes it, so it is never contended.
    committer: Mutex<Committer>,
    state: RwLock<S>,
}

/// Stops the journal thread when the last [`Log`] handle is dropped.
struct Handle<S: LogState>(Arc<Shared<S>>);

impl<S: LogState> Drop for Handle<S> {
    fn drop(&mut self) {
        lock(&self.0.queue).stopped = true;
        self.0.wake.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A group-committed journal over state `S`; see the module documentation.
///
/// A blocking caller that finds no commit running commits its change
/// itself; callers that arrive meanwhile queue, and the first of them then
/// commits the whole queue in one write and one `fdatasync`. Async callers
/// are led by the journal thread. So an uncontended commit costs no thread
/// switch, and a contended one still shares its flush.
#[derive(Clone)]
pub struct Log<S: LogState>(Arc<Handle<S>>);

impl<S: LogState> Log<S> {
    /// Loads the state under `dir` (snapshot plus journal), compacts it and
    /// starts the journal thread.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
        let snap = dir.join(SNAPSHOT);
        let mut state: S = match std::fs::read(&snap) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                Error::Internal(format!(
                    "{} is corrupt ({e}); it was written atomically, so this is damage from outside",
                    snap.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => S::default(),
            Err(e) => return Err(Error::io(format!("reading {}", snap.display()), e)),
        };
        let path = dir.join(JOURNAL);
        let replayed = replay::<S::Change>(&path)?;
        let fold = !replayed.changes.is_empty() || !replayed.framed;
        for c in replayed.changes {
            state.apply(c);
        }
        // Fold the journal into a new snapshot; on a full disk keep
        // appending to the journal as it is instead.
        let compacted = if fold {
            write_snapshot(dir, &state).and_then(|()| fresh_journal(&path))
        } else {
            Err(Error::Internal("nothing to compact".into()))
        };
        let ((journal, filled), len) = match compacted {
            Ok(j) => (j, MAGIC.len() as u64),
            Err(e) if replayed.framed => {
                if fold {
                    warn!(error = %e, "cannot compact the journal now; appending to it as it is");
                }
                (append_at(&path, replayed.good_end)?, replayed.good_end)
            }
            Err(e) => return Err(e),
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                pending: Vec::new(),
                leading: false,
                thread_turn: false,
                stopped: false,
            }),
            wake: Condvar::new(),
            committer: Mutex::new(Committer {
                dir: dir.to_path_buf(),
                journal,
                len,
                filled,
                since_compact: 0,
                broken: None,
            }),
            state: RwLock::new(state),
        });
        let thread = shared.clone();
        std::thread::Builder::new()
            .name("rcsi-journal".into())
            .spawn(move || journal_thread(&thread))
            .map_err(|e| Error::io("starting the journal thread", e))?;
        Ok(Self(Arc::new(Handle(shared))))
    }

    /// Reads the current state (every acknowledged change included).
    pub fn read(&self) -> RwLockReadGuard<'_, S> {
        self.0.0.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `change` durable and applies it; returns once both are done.
    /// Dropping the future after queueing does not undo or hide the change.
    pub async fn commit(&self, change: S::Change) -> Result<()> {
        let (done, wait) = oneshot::channel();
        {
            let shared = &self.0.0;
            let mut q = lock(&shared.queue);
            q.pending.push(Pending {
                change,
                done: Done::Task(done),
            });
            if !q.leading {
                q.leading = true;
                q.thread_turn = true;
                shared.wake.notify_one();
            }
        }
        wait.await.map_err(|_| stopped())?
    }

    /// [`Log::commit`] for a thread that may block (not an async task), so
    /// filesystem work and its record can share one trip off the runtime.
    /// The calling thread commits the batch itself when it can.
    pub fn commit_blocking(&self, change: S::Change) -> Result<()> {
        let shared = &self.0.0;
        let slot = Arc::new(Slot::default());
        let mut q = lock(&shared.queue);
        q.pending.push(Pending {
            change,
            done: Done::Thread(slot.clone()),
        });
        if !q.leading {
            q.leading = true;
            lead(shared, q, false);
        } else {
            drop(q);
        }
        let mut turn = lock(&slot.turn);
        loop {
            match std::mem::take(&mut *turn) {
                Turn::Wait => turn = slot.cv.wait(turn).unwrap_or_else(|e| e.into_inner()),
                Turn::Lead => {
                    drop(turn);
                    lead(shared, lock(&shared.queue), false);
                    turn = lock(&slot.turn);
                }
                Turn::Done(r) => return r,
            }
        }
    }
}

fn stopped() -> Error {
    Error::Internal("the metadata journal has stopped".into())
}

/// Leads for async callers until every [`Log`] handle is gone.
fn journal_thread<S: LogState>(shared: &Shared<S>) {
    let mut q = lock(&shared.queue);
    loop {
        while !q.thread_turn && !q.stopped {
            q = shared.wake.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        if !q.thread_turn {
            return;
        }
        q.thread_turn = false;
        lead(shared, q, true);
        q = lock(&shared.queue);
    }
}

/// Commits the queue in batches, as its leader. A caller's thread commits
/// one batch (its own change is in it) and hands the lead to the oldest
/// blocking waiter, or else to the journal thread; the journal thread
/// leads until the queue is empty.
fn lead<'a, S: LogState>(
    shared: &'a Shared<S>,
    mut q: MutexGuard<'a, Queue<S::Change>>,
    thread: bool,
) {
    loop {
        let batch = std::mem::take(&mut q.pending);
        drop(q);
        let (changes, waiting): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|p| (p.change, p.done)).unzip();
        let result = {
            let mut c = lock(&shared.committer);
            let result = c.append(changes.iter());
            if result.is_ok() {
                let mut state = shared.state.write().unwrap_or_else(|e| e.into_inner());
                for ch in changes {
                    state.apply(ch);
                }
            }
            result
        };
        for done in waiting {
            let r = result.as_ref().map(drop).map_err(Error::duplicate);
            match done {
                Done::Thread(slot) => slot.set(Turn::Done(r)),
                Done::Task(tx) => drop(tx.send(r)),
            }
        }
        // After the batch has its answers; the next batch waits for it.
        {
            let mut c = lock(&shared.committer);
            if c.broken.is_none() && c.since_compact >= COMPACT_EVERY {
                c.compact(&shared.state);
            }
        }
        q = lock(&shared.queue);
        if q.pending.is_empty() {
            q.leading = false;
            return;
        }
        if thread {
            continue;
        }
        match q.pending.iter().find_map(|p| match &p.done {
            Done::Thread(slot) => Some(slot.clone()),
            Done::Task(_) => None,
        }) {
            Some(next) => next.set(Turn::Lead),
            None => {
                q.thread_turn = true;
                shared.wake.notify_one();
            }
        }
        return;
    }
}

struct Committer {
    dir: PathBuf,
    journal: std::fs::File,
    /// Length of the journal up to its last durable record.
    len: u64,
    /// End of the filler written ahead of `len` (the file's length).
    filled: u64,
    since_compact: usize,
    /// Why the journal refuses writes, once it must.
    broken: Option<String>,
}

impl Committer {
    fn append<'c, C: Serialize + 'c>(
        &mut self,
        changes: impl Iterator<Item = &'c C>,
    ) -> Result<()> {
        if let Some(why) = &self.broken {
            return Err(Error::Unavailable(format!(
                "the metadata journal refuses writes since {why}; restart the plugin after fixing the disk"
            )));
        }
        let mut buf = Vec::with_capacity(512);
        let mut n = 0;
        for c in changes {
            frame(&mut buf, c)?;
            n += 1;
        }
        let path = self.dir.join(JOURNAL);
        let end = self.len + buf.len() as u64;
        if end > self.filled {
            // Past the filler: write more (one size change, committed
            // here), or on failure append past the end as it is.
            self.filled = fill_ahead(&self.journal, self.filled, end).unwrap_or(self.filled);
        }
        if let Err(e) = self.journal.write_all_at(&buf, self.len) {
            // Cut the torn bytes off so the next record starts clean.
            let cut = self
                .journal
                .set_len(self.len)
                .and_then(|_| self.journal.sync_data());
            if let Err(c) = cut {
                self.broken = Some(format!(
                    "an append to {} failed ({e}) and cutting it back failed too ({c})",
                    path.display()
                ));
            }
            self.filled = self.len;
            reserve(&self.journal, self.len);
            return Err(Error::io(format!("appending to {}", path.display()), e));
        }
        if let Err(e) = self.journal.sync_data() {
            let _ = self.journal.set_len(self.len);
            self.filled = self.len;
            self.broken = Some(format!("fdatasync of {} failed ({e})", path.display()));
            return Err(Error::io(format!("fdatasync {}", path.display()), e));
        }
        self.len = end;
        self.filled = self.filled.max(end);
        self.since_compact += n;
        Ok(())
    }

    fn compact<S: Serialize + Clone>(&mut self, state: &RwLock<S>) {
        let snapshot = state.read().unwrap_or_else(|e| e.into_inner()).clone();
        let done = write_snapshot(&self.dir, &snapshot)
            .and_then(|()| fresh_journal(&self.dir.join(JOURNAL)));
        match done {
            Ok((j, filled)) => {
                self.journal = j;
                self.filled = filled;
                self.len = MAGIC.len() as u64;
                self.since_compact = 0;
            }
            Err(e) => warn!(error = %e, "journal compaction failed; will retry"),
        }
    }
}

/// Appends one framed record: length, CRC-32 of the payload, JSON payload.
fn frame<C: Serialize>(buf: &mut Vec<u8>, change: &C) -> Result<()> {
    let payload = serde_json::to_vec(change).map_err(|e| Error::Internal(e.to_string()))?;
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    buf.extend_from_slice(&payload);
    Ok(())
}

/// The record at the start of `b`, if one is there whole and intact.
fn record_at(b: &[u8]) -> Option<(&[u8], usize)> {
    let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(b.get(4..8)?.try_into().ok()?);
    // A payload is JSON, never empty: zeros are not a record.
    let payload = b
        .get(8..8 + len)
        .filter(|_| (1..=MAX_RECORD).contains(&len))?;
    (crc32fast::hash(payload) == crc).then_some((payload, 8 + len))
}

/// What a journal held.
struct Replayed<C> {
    /// Every intact change, in order.
    changes: Vec<C>,
    /// Whether the file is a framed journal (else absent or JSON lines).
    framed: bool,
    /// End of the last intact record.
    good_end: u64,
}

/// Reads every intact change from a journal; torn or corrupt bytes (writes
/// that failed and were never acknowledged) are skipped with a warning.
fn replay<C: DeserializeOwned>(path: &Path) -> Result<Replayed<C>> {
    let mut bytes = Vec::new();
    match std::fs::File::open(path) {
        Ok(mut f) => f
            .read_to_end(&mut bytes)
            .ctx(|| format!("reading {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
    };
    if !bytes.starts_with(MAGIC) {
        return Ok(Replayed {
            changes: replay_lines(path, &bytes),
            framed: false,
            good_end: 0,
        });
    }
    // The filler ahead of the last record ends the journal; a record never
    // ends with it (JSON ends with `}`).
    let data_end = bytes.len() - bytes.iter().rev().take_while(|&&b| b == FILL).count();
    let mut out = Vec::new();
    let mut pos = MAGIC.len();
    let mut good_end = pos;
    while pos < data_end {
        match record_at(&bytes[pos..]) {
            Some((payload, n)) => {
                let c = serde_json::from_slice(payload).map_err(|e| {
                    Error::Internal(format!(
                        "{} holds an intact record at offset {pos} that this version cannot read: {e}",
                        path.display()
                    ))
                })?;
                out.push(c);
                pos += n;
                good_end = pos;
            }
            None => {
                let next = (pos + 1..data_end).find(|&p| record_at(&bytes[p..]).is_some());
                let end = next.unwrap_or(data_end);
                warn!(
                    path = %path.display(),
                    offset = pos,
                    bytes = end - pos,
                    "skipping unreadable journal bytes (a write that failed and was never acknowledged)"
                );
                pos = end;
            }
        }
    }
    Ok(Replayed {
        changes: out,
        framed: true,
        good_end: good_end as u64,
    })
}

/// Replays a journal of JSON lines (the format before framing). A failed
/// append there left torn bytes that the next line was written onto, so a
/// bad line is retried from each later `{` to find the record glued to it.
fn replay_lines<C: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Vec<C> {
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let found = (0..line.len())
            .filter(|&p| line[p] == b'{')
            .find_map(|p| serde_json::from_slice::<C>(&line[p..]).ok().map(|c| (p, c)));
        match found {
            Some((0, c)) => out.push(c),
            Some((p, c)) => {
                warn!(path = %path.display(), line = i + 1, skipped = p, "recovered a record written after torn bytes");
                out.push(c);
            }
            None => {
                warn!(path = %path.display(), line = i + 1, "skipping an unreadable journal line")
            }
        }
    }
    out
}

fn write_snapshot<S: Serialize>(dir: &Path, state: &S) -> Result<()> {
    let bytes = serde_json::to_vec(state).map_err(|e| Error::Internal(e.to_string()))?;
    atomic_write(&dir.join(SNAPSHOT), &bytes)
}

/// Replaces the journal with an empty framed one, durably, with filler
/// written ahead and space reserved; returns it and the filler's end.
fn fresh_journal(path: &Path) -> Result<(std::fs::File, u64)> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)
        .ctx(|| format!("truncating {}", path.display()))?;
    f.write_all(MAGIC)
        .and_then(|_| f.sync_all())
        .ctx(|| format!("writing {}", path.display()))?;
    if let Some(dir) = path.parent() {
        crate::fsutil::fsync_dir(dir).ctx(|| format!("fsync {}", dir.display()))?;
    }
    let len = MAGIC.len() as u64;
    let filled = fill_ahead(&f, len, len).unwrap_or(len);
    Ok((f, filled))
}

/// Opens a framed journal for appending after its last intact record;
/// returns it and the filler's end.
fn append_at(path: &Path, good_end: u64) -> Result<(std::fs::File, u64)> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .ctx(|| format!("opening {}", path.display()))?;
    f.set_len(good_end)
        .and_then(|_| f.sync_all())
        .ctx(|| format!("cutting the torn tail off {}", path.display()))?;
    let filled = fill_ahead(&f, good_end, good_end).unwrap_or(good_end);
    Ok((f, filled))
}

/// Writes [`FILL`] from `from` (the file's end) to [`AHEAD`] bytes past
/// `need`, durably, and reserves space beyond; returns the new end. Best
/// effort: on failure (a full disk) appends extend the file instead.
fn fill_ahead(f: &std::fs::File, from: u64, need: u64) -> std::io::Result<u64> {
    let to = (need + AHEAD).next_multiple_of(4096);
    let chunk = vec![FILL; 64 << 10];
    let mut at = from;
    let written = (|| {
        while at < to {
            let n = chunk.len().min((to - at) as usize);
            f.write_all_at(&chunk[..n], at)?;
            at += n as u64;
        }
        f.sync_data()
    })();
    reserve(f, to);
    written.map(|()| to).inspect_err(|e| {
        tracing::debug!(error = %e, "cannot write filler ahead of the journal");
    })
}

/// Preallocates space past `len` for appends (best effort: not every
/// filesystem can).
fn reserve(f: &std::fs::File, len: u64) {
    use nix::fcntl::{FallocateFlags, fallocate};
    if let Err(e) = fallocate(f, FallocateFlags::FALLOC_FL_KEEP_SIZE, len as i64, RESERVE) {
        tracing::debug!(error = %e, "cannot preallocate journal space");
    }
}

/// One name held for one id, with what the driver needs to answer a retry.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reservation {
    /// The CO's idempotency name.
    pub name: String,
    /// The id issued for it.
    pub id: String,
    /// Driver attributes (request parameters, paths, sizes).
    pub attrs: BTreeMap<String, String>,
}

impl Reservation {
    /// Attribute `key` ("" when unset).
    pub fn attr(&self, key: &str) -> &str {
        self.attrs.get(key).map(String::as_str).unwrap_or("")
    }

    /// The volume a reservation describes, by the drivers' attribute
    /// conventions: `size` in bytes, `source` as `snapshot:<id>` or
    /// `volume:<id>`, and the volume context in `ctx.<key>`.
    pub fn to_volume(&self) -> crate::csi::Volume {
        use crate::types::ContentSource;
        let context = self
            .attrs
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("ctx.")?.to_owned(), v.clone())))
            .collect();
        let source = self.attr("source");
        let content_source = if let Some(id) = source.strip_prefix("snapshot:") {
            Some(ContentSource::Snapshot(id.into()).to_proto())
        } else {
            source
                .strip_prefix("volume:")
                .map(|id| ContentSource::Volume(id.into()).to_proto())
        };
        crate::csi::Volume {
            capacity_bytes: crate::types::proto_i64(self.attr("size").parse().unwrap_or(0)),
            volume_id: self.id.clone(),
            volume_context: context,
            content_source,
            accessible_topology: vec![],
        }
    }
}

/// The name→id reservations of one kind of object (volumes or snapshots):
/// written before the object is created and removed after it is deleted,
/// so a retry after a crash at any step finds the same id and nothing leaks.
#[async_trait]
pub trait NameJournal: Send + Sync {
    /// The reservation of `name`, if any.
    async fn lookup(&self, name: &str) -> Result<Option<Reservation>>;
    /// The reservation holding `id`, if any.
    async fn lookup_id(&self, id: &str) -> Result<Option<Reservation>>;
    /// Reserves `r.name` for `r.id`, durably. When the name is already
    /// reserved, returns that reservation unchanged for the caller to compare.
    async fn reserve(&self, r: Reservation) -> Result<Reservation>;
    /// Replaces the attributes of an existing reservation, durably.
    async fn update(&self, r: Reservation) -> Result<()>;
    /// Removes the reservation of `name`; success when there is none.
    async fn release(&self, name: &str) -> Result<()>;
    /// Every reservation, sorted by name.
    async fn list(&self) -> Result<Vec<Reservation>>;
}

/// Reservations by name: the state of a [`FileJournal`].
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Reservations(BTreeMap<String, Reservation>);

/// A change to [`Reservations`].
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ReservationChange {
    /// Hold (or update) a name.
    Put(Reservation),
    /// Let a name go.
    Release {
        /// The name.
        name: String,
    },
}

impl LogState for Reservations {
    type Change = ReservationChange;

    fn apply(&mut self, change: ReservationChange) {
        match change {
            ReservationChange::Put(r) => {
                self.0.insert(r.name.clone(), r);
            }
            ReservationChange::Release { name } => {
                self.0.remove(&name);
            }
        }
    }
}

/// A [`NameJournal`] in a directory on the local filesystem.
pub struct FileJournal {
    log: Log<Reservations>,
    /// Serializes reserve's check-then-write.
    write: tokio::sync::Mutex<()>,
}

impl FileJournal {
    /// Opens (or creates) the journal in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(Self {
            log: Log::open(dir)?,
            write: tokio::sync::Mutex::new(()),
        })
    }
}

#[async_trait]
impl NameJournal for FileJournal {
    async fn lookup(&self, name: &str) -> Result<Option<Reservation>> {
        Ok(self.log.read().0.get(name).cloned())
    }

    async fn lookup_id(&self, id: &str) -> Result<Option<Reservation>> {
        Ok(self.log.read().0.values().find(|r| r.id == id).cloned())
    }

    async fn reserve(&self, r: Reservation) -> Result<Reservation> {
        let _w = self.write.lock().await;
        if let Some(existing) = self.log.read().0.get(&r.name).cloned() {
            return Ok(existing);
        }
        self.log.commit(ReservationChange::Put(r.clone())).await?;
        Ok(r)
    }

    async fn update(&self, r: Reservation) -> Result<()> {
        let _w = self.write.lock().await;
        if !self.log.read().0.contains_key(&r.name) {
            return Err(Error::NotFound(format!(
                "no reservation named {:?}",
                r.name
            )));
        }
        self.log.commit(ReservationChange::Put(r)).await
    }

    async fn release(&self, name: &str) -> Result<()> {
        let _w = self.write.lock().await;
        if !self.log.read().0.contains_key(name) {
            return Ok(());
        }
        self.log
            .commit(ReservationChange::Release { name: name.into() })
            .await
    }

    async fn list(&self) -> Result<Vec<Reservation>> {
        Ok(self.log.read().0.values().cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(name: &str, id: &str) -> Reservation {
        Reservation {
            name: name.into(),
            id: id.into(),
            attrs: [("size".to_owned(), "1".to_owned())].into(),
        }
    }

    #[tokio::test]
    async fn reservations_survive_reopen_and_torn_records_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        {
            let j = FileJournal::open(d.path()).unwrap();
            assert_eq!(j.reserve(res("a", "1")).await.unwrap().id, "1");
            // A second reserve of the name returns the first holder.
            assert_eq!(j.reserve(res("a", "2")).await.unwrap().id, "1");
            j.reserve(res("b", "3")).await.unwrap();
            j.release("a").await.unwrap();
            j.release("never").await.unwrap();
        }
        // Torn bytes in the middle (a failed append on the old code), then
        // an intact record after them, then a torn tail.
        let p = d.path().join(JOURNAL);
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        let mut buf = Vec::new();
        frame(&mut buf, &ReservationChange::Put(res("c", "4"))).unwrap();
        f.write_all(&buf).unwrap();
        f.write_all(&buf[..buf.len() - 3]).unwrap();
        drop(f);
        let j = FileJournal::open(d.path()).unwrap();
        let names: Vec<_> = j
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["b", "c"]);
        assert_eq!(j.lookup_id("4").await.unwrap().unwrap().name, "c");
        // Compacted on open: the journal holds only the header and filler.
        let bytes = std::fs::read(&p).unwrap();
        assert!(bytes.starts_with(MAGIC));
        assert!(bytes[MAGIC.len()..].iter().all(|&b| b == FILL));
    }

    #[tokio::test]
    async fn appends_overwrite_filler_and_replay_stops_at_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(JOURNAL);
        let j = FileJournal::open(d.path()).unwrap();
        let filled = std::fs::metadata(&p).unwrap().len();
        assert!(filled >= AHEAD, "filler written ahead: {filled} bytes");
        for i in 0..100 {
            j.reserve(res(&format!("n{i}"), &i.to_string()))
                .await
                .unwrap();
        }
        // The records went into the filler: no size change to flush.
        assert_eq!(std::fs::metadata(&p).unwrap().len(), filled);
        drop(j);
        let replayed = replay::<ReservationChange>(&p).unwrap();
        assert_eq!(replayed.changes.len(), 100);
        // A torn record inside the filler (a crash mid-write) is skipped.
        let mut torn = Vec::new();
        frame(&mut torn, &ReservationChange::Put(res("torn", "x"))).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&torn[..torn.len() - 2], replayed.good_end)
            .unwrap();
        drop(f);
        let j = FileJournal::open(d.path()).unwrap();
        assert_eq!(j.list().await.unwrap().len(), 100);
        assert!(j.lookup("torn").await.unwrap().is_none());
        j.reserve(res("after", "y")).await.unwrap();
        drop(j);
        let j = FileJournal::open(d.path()).unwrap();
        assert_eq!(j.list().await.unwrap().len(), 101);
    }

    #[test]
    fn zeros_after_the_last_record_are_not_a_record() {
        // What a filesystem shows past the last write after some crashes.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(JOURNAL);
        let mut bytes = MAGIC.to_vec();
        frame(&mut bytes, &ReservationChange::Put(res("a", "1"))).unwrap();
        bytes.extend_from_slice(&[0; 4096]);
        std::fs::write(&p, &bytes).unwrap();
        let replayed = replay::<ReservationChange>(&p).unwrap();
        assert_eq!(replayed.changes.len(), 1);
    }

    #[test]
    fn legacy_json_lines_with_a_record_glued_to_torn_bytes_replay() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(JOURNAL);
        std::fs::write(
            &p,
            concat!(
                r#"{"op":"put","name":"a","id":"1","attrs":{}}"#,
                "\n",
                r#"{"op":"put","na{"op":"put","name":"b","id":"2","attrs":{}}"#,
                "\n",
                r#"{"op":"release","name":"a"}"#,
                "\n",
                r#"{"op":"pu"#
            ),
        )
        .unwrap();
        let replayed = replay::<ReservationChange>(&p).unwrap();
        assert!(!replayed.framed);
        let mut s = Reservations::default();
        for c in replayed.changes {
            s.apply(c);
        }
        assert_eq!(s.0.keys().collect::<Vec<_>>(), ["b"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn blocking_and_async_commits_mixed_are_all_durable() {
        let d = tempfile::tempdir().unwrap();
        let log = Log::<Reservations>::open(d.path()).unwrap();
        let put = |i: usize| ReservationChange::Put(res(&format!("n{i}"), &i.to_string()));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        log.commit_blocking(put(t * 1000 + i)).unwrap();
                        // Acknowledged means visible.
                        assert!(log.read().0.contains_key(&format!("n{}", t * 1000 + i)));
                    }
                })
            })
            .collect();
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                tokio::spawn(async move {
                    for i in 0..50 {
                        log.commit(put(100_000 + t * 1000 + i)).await.unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(log.read().0.len(), 800);
        drop(log);
        let replayed = replay::<ReservationChange>(&d.path().join(JOURNAL)).unwrap();
        assert_eq!(replayed.changes.len(), 800);
    }

    #[test]
    fn a_long_run_is_compacted_into_the_snapshot_and_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let log = Log::<Reservations>::open(d.path()).unwrap();
        let n = COMPACT_EVERY + 10;
        for i in 0..n {
            let name = format!("n{}", i % 100);
            log.commit_blocking(ReservationChange::Put(res(&name, &i.to_string())))
                .unwrap();
        }
        drop(log);
        // Compacted once: the journal holds only what came after.
        let replayed = replay::<ReservationChange>(&d.path().join(JOURNAL)).unwrap();
        assert!(replayed.changes.len() < n - COMPACT_EVERY + 1);
        assert!(d.path().join(SNAPSHOT).exists());
        let log = Log::<Reservations>::open(d.path()).unwrap();
        let state = log.read();
        assert_eq!(state.0.len(), 100);
        let last = format!("n{}", (n - 1) % 100);
        assert_eq!(state.0[&last].id, (n - 1).to_string());
    }

    #[tokio::test]
    async fn concurrent_commits_are_grouped_and_all_applied() {
        let d = tempfile::tempdir().unwrap();
        let j = Arc::new(FileJournal::open(d.path()).unwrap());
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let j = j.clone();
                tokio::spawn(async move { j.reserve(res(&format!("n{i}"), &i.to_string())).await })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(j.list().await.unwrap().len(), 64);
        drop(j);
        let j = FileJournal::open(d.path()).unwrap();
        assert_eq!(j.list().await.unwrap().len(), 64);
    }
}
