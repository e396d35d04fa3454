//! What a node knows of each staged volume: one JSON file per volume (0600
//! in a 0700 directory, written atomically), read again by a restarted
//! plugin, and a lock per volume that stage, unstage and the healer hold.

use csi_core::{Error, IoContext, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OwnedMutexGuard;

/// The state files of the staged volumes, in one directory.
pub(crate) struct VolumeStates {
    dir: PathBuf,
    timeout: Duration,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl VolumeStates {
    /// The state files in `dir` (created 0700); each file operation is bounded by `timeout`.
    pub fn open(dir: PathBuf, timeout: Duration) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .ctx(|| format!("chmod {}", dir.display()))?;
        Ok(Self {
            dir,
            timeout,
            locks: Mutex::default(),
        })
    }

    fn file(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.json"))
    }

    /// Serialises the changes of one volume (held across a whole stage,
    /// unstage or heal).
    pub async fn lock(&self, volume_id: &str) -> OwnedMutexGuard<()> {
        let m = self
            .locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(volume_id.to_owned())
            .or_default()
            .clone();
        m.lock_owned().await
    }

    /// The state of `volume_id`, None when it is not staged.
    pub async fn load<T: DeserializeOwned + Send + 'static>(
        &self,
        volume_id: &str,
    ) -> Result<Option<T>> {
        let f = self.file(volume_id);
        csi_core::fsutil::blocking(
            format!("reading {}", f.display()),
            self.timeout,
            move || match std::fs::read(&f) {
                Ok(b) => serde_json::from_slice(&b)
                    .map(Some)
                    .map_err(|e| Error::Internal(format!("{} is corrupt: {e}", f.display()))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(format!("reading {}", f.display()), e)),
            },
        )
        .await
    }

    /// Writes the state of `volume_id` (temp file, fsync, rename).
    pub async fn save<T: Serialize>(&self, volume_id: &str, s: &T) -> Result<()> {
        let f = self.file(volume_id);
        let data = serde_json::to_vec(s).map_err(|e| Error::Internal(e.to_string()))?;
        csi_core::fsutil::blocking(
            format!("writing {}", f.display()),
            self.timeout,
            move || csi_core::fsutil::atomic_write(&f, &data),
        )
        .await
    }

    /// Removes the state of `volume_id` (unstaged).
    pub async fn forget(&self, volume_id: &str) -> Result<()> {
        let f = self.file(volume_id);
        csi_core::fsutil::blocking(
            format!("removing {}", f.display()),
            self.timeout,
            move || match std::fs::remove_file(&f) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io(format!("removing {}", f.display()), e))
                }
                _ => Ok(()),
            },
        )
        .await
    }

    /// The ids of the staged volumes.
    pub fn ids(&self) -> Vec<String> {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".json")
                    .map(str::to_owned)
            })
            .collect()
    }
}
