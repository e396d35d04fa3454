//! The controller: volumes are directories with a quota; records on the
//! filesystem make every step of create and delete safe to retry.

use crate::error::JuicefsError;
use crate::id::VolumeId;
use crate::params::{OnDelete, Params};
use crate::records::{Record, Records};
use crate::{FsMounts, FsSecret, Juicefs};
use async_trait::async_trait;
use csi_core::backend::{ControllerBackend, ControllerRpc, VolumeStatus};
use csi_core::csi;
use csi_core::types::{Capability, CapacityRange, CreateVolume, Secrets};
use csi_core::{Error, Result};
use std::collections::HashMap;
use std::path::PathBuf;
use tokio::sync::OwnedMutexGuard;

/// Size of a volume when the request names none.
const DEFAULT_SIZE: u64 = 1 << 30;
/// Smallest quota: JuiceFS accounts in 4 KiB blocks.
const MIN_SIZE: u64 = 4096;

/// The filesystem a call's Secret describes.
pub(crate) fn fs_of(secrets: &Secrets, call: &'static str, kind: &'static str) -> Result<FsSecret> {
    if secrets.0.is_empty() {
        return Err(JuicefsError::NoSecret { call, kind }.into());
    }
    Ok(FsSecret::parse(secrets)?)
}

/// A filesystem mounted for the controller, locked for one call.
struct Opened {
    mountpoint: PathBuf,
    records: Records,
    _lock: OwnedMutexGuard<()>,
}

fn block_refused(caps: &[Capability]) -> Result<()> {
    if caps.iter().any(Capability::is_block) {
        return Err(Error::InvalidArgument(
            "JuiceFS volumes are directories: volumeMode Block is not supported".into(),
        ));
    }
    Ok(())
}

impl Juicefs {
    /// Mounts (once) and locks the filesystem for a controller call.
    async fn open(&self, fs: &FsSecret) -> Result<Opened> {
        let key = FsMounts::key(fs, &[]);
        let lock = self.controller.lock(&key).await;
        self.controller.ensure(&key, fs, &[]).await?;
        let mountpoint = self.controller.mountpoint(&key);
        Ok(Opened {
            records: Records::new(&mountpoint, self.cfg.mount_timeout),
            mountpoint,
            _lock: lock,
        })
    }

    /// Whether `path` exists in the mounted filesystem.
    async fn exists(&self, path: PathBuf) -> Result<bool> {
        csi_core::fsutil::blocking(
            format!("looking up {}", path.display()),
            self.cfg.mount_timeout,
            move || match std::fs::symlink_metadata(&path) {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(Error::io(format!("looking up {}", path.display()), e)),
            },
        )
        .await
    }

    /// The volume with id `volume_id`, its filesystem and record (None:
    /// no such volume). Free-form ids of static volumes are never ours.
    async fn find(
        &self,
        volume_id: &str,
        secrets: &Secrets,
        call: &'static str,
        kind: &'static str,
    ) -> Result<Option<(VolumeId, FsSecret, Opened, Record)>> {
        let Some(id) = VolumeId::parse(volume_id) else {
            return Ok(None);
        };
        let fs = fs_of(secrets, call, kind)?;
        if fs.name != id.fs {
            return Err(JuicefsError::WrongFilesystem {
                volume: volume_id.to_owned(),
                on: id.fs,
                secret: fs.name,
            }
            .into());
        }
        let opened = self.open(&fs).await?;
        let record = opened.records.get(id.uuid).await?;
        Ok(record.map(|r| (id, fs, opened, r)))
    }
}

fn volume(id: &VolumeId, r: &Record, params: &Params) -> csi::Volume {
    let mut context = HashMap::from([(crate::PATH_KEY.to_owned(), format!("/{}", r.path))]);
    if !params.mount_options.is_empty() {
        context.insert("mountOptions".into(), params.mount_options.join(","));
    }
    csi::Volume {
        volume_id: id.to_string(),
        capacity_bytes: csi_core::types::proto_i64(r.capacity),
        volume_context: context,
        ..Default::default()
    }
}

#[async_trait]
impl ControllerBackend for Juicefs {
    fn controller_capabilities(&self) -> Vec<ControllerRpc> {
        vec![
            ControllerRpc::CreateDeleteVolume,
            ControllerRpc::ExpandVolume,
            ControllerRpc::SingleNodeMultiWriter,
        ]
    }

    async fn create_volume(&self, req: CreateVolume) -> Result<csi::Volume> {
        block_refused(&req.capabilities)?;
        if req.source.is_some() {
            return Err(Error::InvalidArgument(
                "JuiceFS volumes cannot be created from a snapshot or another volume".into(),
            ));
        }
        let params = Params::parse(&req.parameters)?;
        let fs = fs_of(&req.secrets, "CreateVolume", "provisioner")?;
        let capacity = req.capacity.choose(DEFAULT_SIZE, MIN_SIZE, 1)?;
        let id = VolumeId::for_name(&fs.name, &req.name);
        let dir = params.dir_for(&req.name, &req.metadata)?;
        let opened = self.open(&fs).await?;
        let record = match opened.records.get(id.uuid).await? {
            Some(r) if r.name != req.name => {
                return Err(Error::Internal(format!(
                    "record {} belongs to volume {:?}, not {:?}",
                    id.uuid, r.name, req.name
                )));
            }
            Some(r) if !req.capacity.admits(r.capacity) => {
                return Err(Error::AlreadyExists(format!(
                    "volume {:?} already exists with {} bytes, outside the requested range",
                    req.name, r.capacity
                )));
            }
            Some(r) => r,
            None => {
                if self.exists(opened.mountpoint.join(&dir)).await? {
                    return Err(Error::AlreadyExists(format!(
                        "directory /{dir} already exists on filesystem {:?} and is no volume named {:?}; use a pathPattern that names a new directory, or a static PV for existing data",
                        fs.name, req.name
                    )));
                }
                let root = opened.mountpoint.clone();
                let free = csi_core::fsutil::blocking(
                    "statfs of the filesystem",
                    self.cfg.mount_timeout,
                    move || csi_core::fsutil::statvfs(&root),
                )
                .await?
                .available_bytes;
                if capacity > free {
                    return Err(Error::ResourceExhausted(format!(
                        "volume {:?} asks for {capacity} bytes; filesystem {:?} has {free} bytes free",
                        req.name, fs.name
                    )));
                }
                let r = Record {
                    name: req.name.clone(),
                    path: dir,
                    capacity,
                    on_delete: params.on_delete,
                    ready: false,
                };
                opened.records.put(id.uuid, &r).await?;
                r
            }
        };
        if !record.ready {
            self.cli
                .set_quota(&fs, &format!("/{}", record.path), record.capacity)
                .await?;
            let path = opened.mountpoint.join(&record.path);
            csi_core::fsutil::blocking(
                format!("opening up {}", path.display()),
                self.cfg.mount_timeout,
                move || {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))
                        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))
                },
            )
            .await?;
            let ready = Record {
                ready: true,
                ..record.clone()
            };
            opened.records.put(id.uuid, &ready).await?;
        }
        Ok(volume(&id, &record, &params))
    }

    async fn delete_volume(&self, volume_id: &str, secrets: &Secrets) -> Result<()> {
        let Some((id, fs, opened, r)) = self
            .find(volume_id, secrets, "DeleteVolume", "provisioner")
            .await?
        else {
            return Ok(());
        };
        let path = opened.mountpoint.join(&r.path);
        if r.on_delete == OnDelete::Delete && self.exists(path.clone()).await? {
            self.cli.remove_tree(&fs, &path).await?;
        }
        opened.records.remove(id.uuid).await
    }

    async fn get_volume(&self, volume_id: &str) -> Result<(csi::Volume, VolumeStatus)> {
        let _ = volume_id;
        Err(Error::Unimplemented(
            "ControllerGetVolume is not supported: it carries no Secret to find the filesystem"
                .into(),
        ))
    }

    async fn validate_volume_capabilities(
        &self,
        volume_id: &str,
        caps: &[Capability],
        _parameters: &HashMap<String, String>,
        secrets: &Secrets,
    ) -> Result<()> {
        let known = VolumeId::parse(volume_id).is_some()
            && (secrets.0.is_empty()
                || self
                    .find(
                        volume_id,
                        secrets,
                        "ValidateVolumeCapabilities",
                        "controller",
                    )
                    .await?
                    .is_some());
        if !known {
            return Err(Error::NotFound(format!(
                "volume {volume_id:?} does not exist"
            )));
        }
        block_refused(caps)
    }

    async fn expand_volume(
        &self,
        volume_id: &str,
        range: CapacityRange,
        _capability: Option<&Capability>,
        secrets: &Secrets,
    ) -> Result<(u64, bool)> {
        let Some((id, fs, opened, r)) = self
            .find(
                volume_id,
                secrets,
                "ControllerExpandVolume",
                "controller-expand",
            )
            .await?
        else {
            return Err(Error::NotFound(format!(
                "volume {volume_id:?} does not exist"
            )));
        };
        let size = range.choose(r.capacity, MIN_SIZE, 1)?;
        if size <= r.capacity {
            return Ok((r.capacity, false));
        }
        self.cli
            .set_quota(&fs, &format!("/{}", r.path), size)
            .await?;
        let grown = Record {
            capacity: size,
            ..r
        };
        opened.records.put(id.uuid, &grown).await?;
        Ok((size, false))
    }
}
