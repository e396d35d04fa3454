//! Node steps shared by drivers whose volumes are block devices (local-path
//! images, RBD images): a filesystem made when blank, grown to its device
//! and mounted at the staging path; raw devices bound at their targets.

use crate::blockdev::BlockDevices;
use crate::mount::{MountInfo, MountState, Mounter};
use crate::{Error, IoContext, Result};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Whether `a` is a device node of the same device as `b` (off the runtime).
pub async fn same_device(a: &Path, b: &Path) -> Result<bool> {
    let (a, b) = (a.to_path_buf(), b.to_path_buf());
    crate::fsutil::blocking("comparing devices", crate::fsutil::FS_TIMEOUT, move || {
        Ok(match (std::fs::metadata(&a), std::fs::metadata(&b)) {
            (Ok(x), Ok(y)) => x.rdev() == y.rdev() && x.rdev() != 0,
            _ => false,
        })
    })
    .await
}

/// The filesystem a volume gets.
#[derive(Clone, Copy, Debug)]
pub struct Format<'a> {
    /// Filesystem type (see [`crate::blockdev::SUPPORTED_FS`]).
    pub fs_type: &'a str,
    /// Extra mkfs arguments.
    pub mkfs_args: &'a [String],
    /// Mount options.
    pub options: &'a [String],
}

/// Makes the filesystem of `dev` ready at `staging`: created when the
/// device is blank, checked and grown offline when an ext filesystem is
/// smaller than its device, mounted (xfs gets `nouuid`: clones share their
/// source's UUID), and grown online otherwise. Returns whether the
/// filesystem is new. `what` names the volume in errors.
pub async fn mount_filesystem(
    bd: &dyn BlockDevices,
    mounter: &dyn Mounter,
    dev: &Path,
    staging: &Path,
    f: Format<'_>,
    what: &str,
) -> Result<bool> {
    let Format {
        fs_type,
        mkfs_args,
        options,
    } = f;
    match mounter.state(staging).await? {
        MountState::Mounted(m) if Path::new(&m.source) == dev => return Ok(false),
        MountState::Mounted(m) => {
            return Err(Error::AlreadyExists(format!(
                "{} already has {} mounted",
                staging.display(),
                m.source
            )));
        }
        MountState::Dead(_) => mounter.unmount(staging).await?,
        MountState::NotMounted => {}
    }
    let fresh = bd.fs_type(dev).await?.is_none();
    let found = bd.mkfs_if_blank(dev, fs_type, mkfs_args).await?;
    if found != fs_type {
        return Err(Error::FailedPrecondition(format!(
            "{what} holds a {found} filesystem, not {fs_type}"
        )));
    }
    let ext = fs_type.starts_with("ext");
    if ext && !fresh {
        let smaller = match bd.fs_size(dev, fs_type).await? {
            Some(fs) => fs < bd.size(dev).await?,
            None => false,
        };
        if smaller {
            bd.fsck(dev, fs_type).await?;
            bd.grow_fs(dev, fs_type, None).await?;
        }
    }
    let mut options = options.to_vec();
    if fs_type == "xfs" && !options.iter().any(|o| o.split(',').any(|o| o == "nouuid")) {
        options.push("nouuid".into());
    }
    mounter
        .mount(&dev.to_string_lossy(), staging, fs_type, &options)
        .await?;
    if !fresh && !ext {
        bd.grow_fs(dev, fs_type, Some(staging)).await?;
    }
    Ok(fresh)
}

/// Binds device `dev` at the file `target` (created with its directory);
/// success when it is already bound there the same way.
pub async fn publish_device(
    mounter: &dyn Mounter,
    dev: &Path,
    target: &Path,
    readonly: bool,
) -> Result<()> {
    let t = target.to_path_buf();
    crate::fsutil::blocking(
        "creating the block target",
        crate::fsutil::FS_TIMEOUT,
        move || {
            if let Some(dir) = t.parent() {
                std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
            }
            if !t.exists() {
                std::fs::File::create(&t).ctx(|| format!("creating {}", t.display()))?;
            }
            Ok(())
        },
    )
    .await?;
    match mounter.state(target).await? {
        MountState::Mounted(m) if m.read_only() == readonly && same_device(target, dev).await? => {
            Ok(())
        }
        MountState::Mounted(_) => Err(Error::AlreadyExists(format!(
            "{} is already published with another device or read-only setting",
            target.display()
        ))),
        _ => mounter.bind(dev, target, readonly, &[]).await,
    }
}

/// The mount points in `exposed` other than `keep` (a volume's staging
/// path, the target being published), for "in use elsewhere" refusals.
pub fn elsewhere(exposed: &[MountInfo], keep: &[&Path]) -> Vec<String> {
    exposed
        .iter()
        .map(|m| m.mount_point.as_path())
        .filter(|p| !keep.contains(p))
        .map(|p| p.display().to_string())
        .collect()
}
