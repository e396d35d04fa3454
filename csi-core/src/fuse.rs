//! FUSE mounts whose daemon is gone while its device is still held open.
//!
//! A FUSE daemon killed while one of its own threads waits on a request to
//! its own mount never finishes dying: the kernel waits for an answer only
//! the dead daemon could give, and the connection never closes. Every access
//! to the mount then hangs, where a closed connection would fail with
//! ENOTCONN. [`probe`] tells the two cases apart and aborts such a
//! connection, so the mount reads as dead and can be healed.

use crate::{Error, Result};
use std::path::Path;
use std::time::{Duration, Instant};

/// Where the kernel's fusectl filesystem is mounted.
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// How long a stat may hang before the mount's daemons are looked for.
const PATIENCE: Duration = Duration::from_millis(500);

/// The fusectl name of a FUSE mount's connection: its device number as the
/// kernel encodes it (`major << 20 | minor`).
pub fn connection(dev: &str) -> Option<u32> {
    let (major, minor) = dev.split_once(':')?;
    Some((major.parse::<u32>().ok()? << 20) | minor.parse::<u32>().ok()?)
}

/// Aborts the FUSE connection of the mount at `mountpoint` (device `dev`):
/// its pending and later requests fail with ENOTCONN. Mounts fusectl when
/// it is not mounted; without it, a forced unmount aborts the connection.
pub fn abort(mountpoint: &Path, dev: &str) -> Result<()> {
    let conn = connection(dev)
        .ok_or_else(|| Error::Internal(format!("{dev:?} is not a device number")))?;
    let file = Path::new(FUSECTL).join(conn.to_string()).join("abort");
    if !file.exists() && std::fs::read_dir(FUSECTL).is_ok_and(|mut d| d.next().is_none()) {
        let _ = nix::mount::mount(
            Some("fusectl"),
            FUSECTL,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    match std::fs::write(&file, b"1") {
        Ok(()) => Ok(()),
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "no fusectl; forcing an unmount to abort the connection");
            match nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_FORCE) {
                Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
                Err(e) => Err(Error::io(
                    format!("aborting the FUSE connection of {}", mountpoint.display()),
                    e.into(),
                )),
            }
        }
    }
}

/// Looks at the FUSE mount at `mountpoint` (device `dev`): `None` when it
/// answers, the reason when it is dead. A stat that hangs while no live
/// process serves the mount means a daemon died holding its connection:
/// the connection is aborted and the mount reported dead. A live daemon
/// that does not answer within `timeout` is DeadlineExceeded.
pub async fn probe(mountpoint: &Path, dev: &str, timeout: Duration) -> Result<Option<String>> {
    let mp = mountpoint.to_path_buf();
    let mut stat = tokio::task::spawn_blocking(move || std::fs::metadata(&mp).map(drop));
    let start = Instant::now();
    let mut aborted = false;
    loop {
        let wait = if aborted { timeout } else { PATIENCE };
        match tokio::time::timeout(wait, &mut stat).await {
            Ok(Ok(Ok(()))) => return Ok(None),
            Ok(Ok(Err(e)))
                if matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)) =>
            {
                return Ok(Some(if aborted {
                    "its daemon died holding the FUSE connection, which was aborted".into()
                } else {
                    e.to_string()
                }));
            }
            Ok(Ok(Err(e))) => {
                return Err(Error::io(format!("stat {}", mountpoint.display()), e));
            }
            Ok(Err(e)) => return Err(Error::Internal(format!("stat worker failed: {e}"))),
            Err(_) if aborted => {
                return Err(Error::DeadlineExceeded(format!(
                    "{} still hangs after its FUSE connection was aborted",
                    mountpoint.display()
                )));
            }
            Err(_) => {}
        }
        let mp = mountpoint.to_path_buf();
        let served = crate::fsutil::blocking("looking for FUSE daemons", timeout, move || {
            // juicefs, rbd-fuse and ceph-fuse take their mountpoint as an argument.
            Ok(!crate::daemon::naming(mp.as_os_str()).is_empty())
        })
        .await?;
        if !served {
            tracing::warn!(mountpoint = %mountpoint.display(), "FUSE mount hangs with no daemon; aborting its connection");
            let (mp, dev) = (mountpoint.to_path_buf(), dev.to_owned());
            crate::fsutil::blocking("aborting a FUSE connection", timeout, move || {
                abort(&mp, &dev)
            })
            .await?;
            aborted = true;
        } else if start.elapsed() > timeout {
            return Err(Error::DeadlineExceeded(format!(
                "the FUSE mount {} did not answer within {timeout:?}",
                mountpoint.display()
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_names_follow_the_kernel_encoding() {
        assert_eq!(connection("0:57"), Some(57));
        assert_eq!(connection("7:3"), Some((7 << 20) | 3));
        assert_eq!(connection("x"), None);
    }
}
