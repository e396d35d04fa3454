//! The controller's records of its volumes, kept on the filesystem itself
//! under `.rcsi/volumes/<uuid>` (JSON, written atomically): any controller
//! replica finds them, and a retry after a crash at any step finds the
//! record its first attempt wrote.

use crate::params::OnDelete;
use csi_core::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use uuid::Uuid;

/// One volume as the controller recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The CO's name for the volume.
    pub name: String,
    /// Its directory, relative to the filesystem root.
    pub path: String,
    /// Its quota in bytes.
    pub capacity: u64,
    /// What DeleteVolume does.
    pub on_delete: OnDelete,
    /// Whether the directory and its quota exist (set after both are made).
    pub ready: bool,
}

/// The records of one mounted filesystem.
pub struct Records {
    dir: PathBuf,
    timeout: Duration,
}

impl Records {
    /// Records under the filesystem mounted at `mountpoint`; every access
    /// is bounded by `timeout`.
    pub fn new(mountpoint: &Path, timeout: Duration) -> Self {
        Self {
            dir: mountpoint.join(".rcsi/volumes"),
            timeout,
        }
    }

    /// The record of `uuid`, if any.
    pub async fn get(&self, uuid: Uuid) -> Result<Option<Record>> {
        let path = self.dir.join(uuid.simple().to_string());
        csi_core::fsutil::blocking(
            format!("reading {}", path.display()),
            self.timeout,
            move || match std::fs::read(&path) {
                Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                    Error::Internal(format!("volume record {} is corrupt: {e}", path.display()))
                }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
            },
        )
        .await
    }

    /// Writes the record of `uuid` (temp file, fsync, rename).
    pub async fn put(&self, uuid: Uuid, r: &Record) -> Result<()> {
        let path = self.dir.join(uuid.simple().to_string());
        let data = serde_json::to_vec(r).map_err(|e| Error::Internal(e.to_string()))?;
        let dir = self.dir.clone();
        csi_core::fsutil::blocking(
            format!("writing {}", path.display()),
            self.timeout,
            move || {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
                csi_core::fsutil::atomic_write(&path, &data)
            },
        )
        .await
    }

    /// Removes the record of `uuid`; success when it is gone.
    pub async fn remove(&self, uuid: Uuid) -> Result<()> {
        let path = self.dir.join(uuid.simple().to_string());
        csi_core::fsutil::blocking(
            format!("removing {}", path.display()),
            self.timeout,
            move || match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io(format!("removing {}", path.display()), e))
                }
                _ => Ok(()),
            },
        )
        .await
    }
}
