//! The name→id journal in RADOS omaps, one per pool (and RADOS namespace),
//! behind the core's [`NameJournal`]: a directory object
//! (`csi.volumes.rcsi` or `csi.snaps.rcsi`) maps each CO name to a uuid, and
//! one object per uuid (`csi.volume.<uuid>`) holds the name, the id and the
//! driver's attributes. The uuid is derived from the pool and the name
//! (UUIDv5), so a retry after a crash at any step finds the same id even
//! when a write was lost. The directory entry is written first and removed
//! first: a crash in between leaves at most a small per-uuid object, never
//! an entry naming nothing.

use crate::id::CephId;
use crate::rados::IoCtx;
use async_trait::async_trait;
use csi_core::journal::{NameJournal, Reservation};
use csi_core::{Error, Result};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

/// Namespace of the UUIDs derived from pool and name.
const NAMESPACE: Uuid = Uuid::from_u128(0x2c51_9e0a_7b3d_4f16_a9c8_03de_5b41_e872);
const NAME_KEY: &str = "csi.name";
const ID_KEY: &str = "csi.id";
const ATTR: &str = "attr.";

/// The id a CO name gets in pool `pool` of `cluster` (the same for
/// volumes and snapshots; they live in different journals).
pub fn derived_id(cluster: &str, pool: i64, name: &str) -> CephId {
    let seed = format!("{cluster}/{pool}/{name}");
    CephId {
        cluster: cluster.to_owned(),
        pool,
        uuid: Uuid::new_v5(&NAMESPACE, seed.as_bytes()),
    }
}

/// Which objects a journal keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Volumes (`csi.volumes.rcsi`, `csi.volume.<uuid>`).
    Volumes,
    /// Snapshots (`csi.snaps.rcsi`, `csi.snap.<uuid>`).
    Snapshots,
}

impl Kind {
    fn directory(self) -> &'static str {
        match self {
            Kind::Volumes => "csi.volumes.rcsi",
            Kind::Snapshots => "csi.snaps.rcsi",
        }
    }

    fn object(self, uuid: Uuid) -> String {
        match self {
            Kind::Volumes => format!("csi.volume.{}", uuid.hyphenated()),
            Kind::Snapshots => format!("csi.snap.{}", uuid.hyphenated()),
        }
    }
}

/// The journal of one pool of one cluster.
pub struct OmapJournal {
    io: Arc<IoCtx>,
    cluster: String,
    pool: i64,
    kind: Kind,
    timeout: Duration,
}

/// `state` of a journal entry whose object is made.
pub(crate) const READY: &str = "ready";
/// `state` of a journal entry whose object is being made.
pub(crate) const CREATING: &str = "creating";

/// Attribute `key` of a reservation ("" when unset).
pub(crate) fn attr<'a>(r: &'a Reservation, key: &str) -> &'a str {
    r.attrs.get(key).map(String::as_str).unwrap_or("")
}

/// The `size` attribute in bytes (0 when unset).
pub(crate) fn size_of(r: &Reservation) -> u64 {
    attr(r, "size").parse().unwrap_or(0)
}

/// Now as `seconds.nanoseconds`, the `created` attribute of snapshots.
pub(crate) fn now() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{}", t.as_secs(), t.subsec_nanos())
}

/// The CSI snapshot a snapshot reservation describes (`source`, `size`,
/// `created`, `state`).
pub(crate) fn snapshot_of(r: &Reservation) -> csi_core::csi::Snapshot {
    let created = attr(r, "created");
    let (secs, nanos) = created.split_once('.').unwrap_or((created, "0"));
    csi_core::csi::Snapshot {
        size_bytes: csi_core::types::proto_i64(size_of(r)),
        snapshot_id: r.id.clone(),
        source_volume_id: attr(r, "source").to_owned(),
        creation_time: Some(prost_types::Timestamp {
            seconds: secs.parse().unwrap_or(0),
            nanos: nanos.parse().unwrap_or(0),
        }),
        ready_to_use: attr(r, "state") == READY,
        group_snapshot_id: String::new(),
    }
}

/// The snapshots of every journal in `journals` (those the credentials
/// may not read hold none of theirs), of `source` only when given, sorted
/// by id as ListSnapshots pages them.
pub(crate) async fn snapshots_in(
    journals: Vec<OmapJournal>,
    source: Option<&str>,
) -> Result<Vec<csi_core::csi::Snapshot>> {
    let mut out = Vec::new();
    for j in journals {
        match j.list().await {
            Ok(rs) => out.extend(rs.iter().map(snapshot_of)),
            Err(Error::PermissionDenied(_)) => {}
            Err(e) => return Err(e),
        }
    }
    if let Some(v) = source {
        out.retain(|s| s.source_volume_id == v);
    }
    out.sort_by(|a, b| a.snapshot_id.cmp(&b.snapshot_id));
    Ok(out)
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

impl OmapJournal {
    /// The journal of `kind` in pool `pool` (opened as `io`) of `cluster`;
    /// every call is bounded by `timeout`.
    pub fn new(io: Arc<IoCtx>, cluster: &str, pool: i64, kind: Kind, timeout: Duration) -> Self {
        Self {
            io,
            cluster: cluster.to_owned(),
            pool,
            kind,
            timeout,
        }
    }

    /// The id the name `name` gets in this pool.
    pub fn id_for(&self, name: &str) -> CephId {
        derived_id(&self.cluster, self.pool, name)
    }

    /// Runs blocking RADOS work under the deadline.
    async fn run<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&IoCtx) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let io = self.io.clone();
        csi_core::fsutil::blocking(format!("journal: {what}"), self.timeout, move || f(&io)).await
    }

    /// The reservation held in the per-uuid object (None when absent).
    async fn read(&self, uuid: Uuid, expect_name: Option<String>) -> Result<Option<Reservation>> {
        let obj = self.kind.object(uuid);
        let fallback_id = CephId {
            cluster: self.cluster.clone(),
            pool: self.pool,
            uuid,
        }
        .to_string();
        self.run("reading an entry", move |io| {
            let vals = io.omap_all(&obj)?;
            let name = vals.get(NAME_KEY).map(|v| text(v)).or(expect_name);
            let Some(name) = name else { return Ok(None) };
            let attrs = vals
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(ATTR)?.to_owned(), text(v))))
                .collect();
            let id = vals.get(ID_KEY).map(|v| text(v)).unwrap_or(fallback_id);
            Ok(Some(Reservation { name, id, attrs }))
        })
        .await
    }

    fn name_key(name: &str) -> String {
        format!("name.{name}")
    }
}

#[async_trait]
impl NameJournal for OmapJournal {
    async fn lookup(&self, name: &str) -> Result<Option<Reservation>> {
        let dir = self.kind.directory();
        let key = Self::name_key(name);
        let k = key.clone();
        let found = self
            .run("looking up a name", move |io| io.omap_get(dir, &[&k]))
            .await?;
        let Some(uuid) = found.get(&key) else {
            return Ok(None);
        };
        let uuid = Uuid::try_parse(&text(uuid))
            .map_err(|e| Error::Internal(format!("journal entry of {name:?} is corrupt: {e}")))?;
        // The directory entry is written first: an entry without its
        // object still holds the name and the id.
        self.read(uuid, Some(name.to_owned())).await
    }

    async fn lookup_id(&self, id: &str) -> Result<Option<Reservation>> {
        let Some(parsed) = CephId::parse(id) else {
            return Ok(None);
        };
        if parsed.cluster != self.cluster || parsed.pool != self.pool {
            return Ok(None);
        }
        self.read(parsed.uuid, None).await
    }

    async fn reserve(&self, r: Reservation) -> Result<Reservation> {
        if let Some(existing) = self.lookup(&r.name).await? {
            return Ok(existing);
        }
        let uuid = CephId::parse(&r.id)
            .ok_or_else(|| Error::Internal(format!("{} is not a Ceph id", r.id)))?
            .uuid;
        let (dir, key) = (self.kind.directory(), Self::name_key(&r.name));
        let u = uuid.hyphenated().to_string();
        self.run("reserving a name", move |io| {
            io.omap_update(dir, &[(&key, u.as_bytes())], &[])
        })
        .await?;
        self.update(r.clone()).await?;
        Ok(r)
    }

    async fn update(&self, r: Reservation) -> Result<()> {
        let uuid = CephId::parse(&r.id)
            .ok_or_else(|| Error::Internal(format!("{} is not a Ceph id", r.id)))?
            .uuid;
        let obj = self.kind.object(uuid);
        self.run("writing an entry", move |io| {
            let stale: Vec<String> = io
                .omap_all(&obj)?
                .into_keys()
                .filter(|k| {
                    k.strip_prefix(ATTR)
                        .is_some_and(|a| !r.attrs.contains_key(a))
                })
                .collect();
            let mut set: BTreeMap<String, Vec<u8>> = r
                .attrs
                .iter()
                .map(|(k, v)| (format!("{ATTR}{k}"), v.clone().into_bytes()))
                .collect();
            set.insert(NAME_KEY.into(), r.name.clone().into_bytes());
            set.insert(ID_KEY.into(), r.id.clone().into_bytes());
            let set: Vec<(&str, &[u8])> = set
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect();
            let stale: Vec<&str> = stale.iter().map(String::as_str).collect();
            io.omap_update(&obj, &set, &stale)
        })
        .await
    }

    async fn release(&self, name: &str) -> Result<()> {
        let Some(r) = self.lookup(name).await? else {
            return Ok(());
        };
        let (dir, key) = (self.kind.directory(), Self::name_key(name));
        self.run("releasing a name", move |io| {
            io.omap_update(dir, &[], &[&key])
        })
        .await?;
        if let Some(id) = CephId::parse(&r.id) {
            let obj = self.kind.object(id.uuid);
            self.run("removing an entry", move |io| io.remove(&obj))
                .await?;
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<Reservation>> {
        let dir = self.kind.directory();
        let entries = self
            .run("listing names", move |io| io.omap_all(dir))
            .await?;
        let mut out = Vec::new();
        for (key, uuid) in entries {
            let Some(name) = key.strip_prefix("name.") else {
                continue;
            };
            let Ok(uuid) = Uuid::try_parse(&text(&uuid)) else {
                continue;
            };
            if let Some(r) = self.read(uuid, Some(name.to_owned())).await? {
                out.push(r);
            }
        }
        Ok(out)
    }
}
