//! The name journal kept on the share itself (`.rcsi/` at the export root):
//! one small JSON file per volume or snapshot, named by the uuid derived
//! from the CO's name and replaced atomically (write, then RENAME). The
//! controller keeps no local state, so any replica can take over.

use crate::client::{Kind, Share};
use crate::error::{NfsError, nfsstat};
use crate::params::RESERVED;
use async_trait::async_trait;
use csi_core::journal::{NameJournal, Reservation};
use nfs3_client::nfs3_types::nfs3::nfs_fh3;
use std::sync::Arc;
use uuid::Uuid;

/// Which objects a journal holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Records {
    /// Volumes (`.rcsi/volumes`).
    Volumes,
    /// Snapshots (`.rcsi/snapshots`).
    Snapshots,
}

impl Records {
    fn dir(self) -> &'static str {
        match self {
            Records::Volumes => "volumes",
            Records::Snapshots => "snapshots",
        }
    }

    fn uuid(self, name: &str) -> Uuid {
        match self {
            Records::Volumes => crate::id::volume_uuid(name),
            Records::Snapshots => crate::id::snapshot_uuid(name),
        }
    }
}

/// Runs `$body` with `$dir` bound to the records directory; when its
/// remembered handle went stale (someone removed it), once more on a fresh one.
macro_rules! in_dir {
    ($j:expr, |$dir:ident| $body:expr) => {{
        let j: &ShareJournal = $j;
        let $dir = j.share.rcsi_dir(j.kind.dir()).await?;
        match $body {
            Err(e) if matches!(e.status(), Some(nfsstat::STALE | nfsstat::BADHANDLE)) => {
                j.share.forget_dirs();
                let $dir = j.share.rcsi_dir(j.kind.dir()).await?;
                $body
            }
            r => r,
        }
    }};
}

/// Largest record accepted when reading.
const MAX_RECORD: usize = 64 << 10;

/// A [`NameJournal`] in `.rcsi/<kind>/` of one export.
pub struct ShareJournal {
    share: Arc<Share>,
    kind: Records,
}

impl ShareJournal {
    /// The journal of `kind` on `share`.
    pub fn new(share: Arc<Share>, kind: Records) -> Self {
        Self { share, kind }
    }

    /// Writes `data` to `tmp` in `dir`, then renames it over `file`.
    async fn replace(
        &self,
        dir: &nfs_fh3,
        tmp: &str,
        file: &str,
        data: &[u8],
    ) -> Result<(), NfsError> {
        let fh = self.share.create(dir, tmp.as_bytes(), 0o600).await?;
        self.share.write(&fh, 0, data).await?;
        self.share
            .rename(dir, tmp.as_bytes(), dir, file.as_bytes())
            .await
    }

    async fn read(&self, uuid: Uuid) -> Result<Option<Reservation>, NfsError> {
        let file = uuid.simple().to_string();
        let Some((fh, attr)) = in_dir!(self, |dir| self.share.lookup(&dir, file.as_bytes()).await)?
        else {
            return Ok(None);
        };
        let bad = |why: String| NfsError::BadRecord {
            share: self.share.label(),
            path: format!("{RESERVED}/{}/{file}", self.kind.dir()),
            why,
        };
        if attr.kind != Kind::File {
            return Err(bad("not a regular file".into()));
        }
        let data = self.share.read_all(&fh, MAX_RECORD).await?;
        serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| bad(e.to_string()))
    }

    async fn write(&self, r: &Reservation) -> Result<(), NfsError> {
        let file = self.kind.uuid(&r.name).simple().to_string();
        let tmp = format!(".{file}.tmp");
        let data = serde_json::to_vec(r).expect("a reservation serializes");
        in_dir!(self, |dir| self.replace(&dir, &tmp, &file, &data).await)
    }
}

#[async_trait]
impl NameJournal for ShareJournal {
    async fn lookup(&self, name: &str) -> csi_core::Result<Option<Reservation>> {
        let r = self.read(self.kind.uuid(name)).await?;
        // A uuid collision between two names would show here.
        Ok(r.filter(|r| r.name == name))
    }

    async fn lookup_id(&self, id: &str) -> csi_core::Result<Option<Reservation>> {
        let Some(uuid) = id.rsplit('#').next().and_then(|u| Uuid::try_parse(u).ok()) else {
            return Ok(None);
        };
        Ok(self.read(uuid).await?.filter(|r| r.id == id))
    }

    async fn reserve(&self, r: Reservation) -> csi_core::Result<Reservation> {
        if let Some(held) = self.lookup(&r.name).await? {
            return Ok(held);
        }
        self.write(&r).await?;
        Ok(r)
    }

    async fn update(&self, r: Reservation) -> csi_core::Result<()> {
        Ok(self.write(&r).await?)
    }

    async fn release(&self, name: &str) -> csi_core::Result<()> {
        let file = self.kind.uuid(name).simple().to_string();
        Ok(in_dir!(self, |dir| self
            .share
            .remove(&dir, file.as_bytes())
            .await)?)
    }

    async fn list(&self) -> csi_core::Result<Vec<Reservation>> {
        let dir = self.share.rcsi_dir(self.kind.dir()).await?;
        let mut out = Vec::new();
        let (mut cookie, mut verf) = (0, [0; 8]);
        loop {
            let (entries, next, v, eof) = self.share.readdir_page(&dir, cookie, verf).await?;
            for e in entries {
                let Some(uuid) = std::str::from_utf8(&e.name)
                    .ok()
                    .and_then(|n| Uuid::try_parse(n).ok())
                else {
                    continue;
                };
                if let Some(r) = self.read(uuid).await? {
                    out.push(r);
                }
            }
            if eof {
                break;
            }
            (cookie, verf) = (next, v);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}
