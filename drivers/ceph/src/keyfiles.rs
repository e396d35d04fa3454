//! The files a node's Ceph clients read (rbd-fuse, rbd-nbd, `rbd map`,
//! ceph-fuse, mount.ceph): a minimal ceph.conf per cluster, and per user a
//! keyring and a bare secret file, all 0600 in a 0700 directory. A helper
//! started again after the plugin restarted finds its key here.

use crate::secret::Credentials;
use csi_core::{Error, IoContext, Result};
use std::path::PathBuf;
use std::time::Duration;

/// The key files under one directory.
pub(crate) struct KeyFiles {
    dir: PathBuf,
    timeout: Duration,
}

/// Where the files of one cluster and user are.
pub(crate) struct KeyPaths {
    /// The ceph.conf naming the monitors.
    pub conf: PathBuf,
    /// The keyring of the user.
    pub keyring: PathBuf,
    /// The user's key alone (mount.ceph's `secretfile=`).
    pub secret: PathBuf,
}

impl KeyFiles {
    /// Key files in `dir` (created 0700); every file operation is bounded by `timeout`.
    pub fn open(dir: PathBuf, timeout: Duration) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .ctx(|| format!("chmod {}", dir.display()))?;
        Ok(Self { dir, timeout })
    }

    /// The files of `user` of `cluster`.
    pub fn paths(&self, cluster: &str, user: &str) -> KeyPaths {
        KeyPaths {
            conf: self.dir.join(format!("{cluster}.conf")),
            keyring: self.dir.join(format!("{cluster}.{user}.keyring")),
            secret: self.dir.join(format!("{cluster}.{user}.secret")),
        }
    }

    /// Writes the files of `creds` for `cluster` with `monitors`.
    pub async fn write(
        &self,
        cluster: &str,
        monitors: &[String],
        creds: &Credentials,
    ) -> Result<KeyPaths> {
        let p = self.paths(cluster, &creds.user);
        let conf = format!(
            "[global]\nmon host = {}\nadmin socket =\nlog file =\nlog to stderr = true\n",
            monitors.join(",")
        );
        let keyring = format!("[client.{}]\n\tkey = {}\n", creds.user, creds.key);
        let secret = creds.key.clone();
        let (c, k, s) = (p.conf.clone(), p.keyring.clone(), p.secret.clone());
        csi_core::fsutil::blocking("writing the Ceph keyring", self.timeout, move || {
            csi_core::fsutil::atomic_write(&c, conf.as_bytes())?;
            csi_core::fsutil::atomic_write(&k, keyring.as_bytes())?;
            csi_core::fsutil::atomic_write(&s, secret.as_bytes())
        })
        .await?;
        Ok(p)
    }

    /// The credentials of `user` of `cluster`, from its keyring.
    pub async fn read(&self, cluster: &str, user: &str) -> Result<Credentials> {
        let k = self.paths(cluster, user).keyring;
        let user = user.to_owned();
        csi_core::fsutil::blocking(
            format!("reading {}", k.display()),
            self.timeout,
            move || {
                let text =
                    std::fs::read_to_string(&k).ctx(|| format!("reading {}", k.display()))?;
                let key = text
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("key = "))
                    .ok_or_else(|| Error::Internal(format!("{} holds no key", k.display())))?;
                Ok(Credentials {
                    user,
                    key: key.trim().to_owned(),
                })
            },
        )
        .await
    }

    /// Removes the keyring and secret file of `user` (not the cluster's conf).
    pub async fn remove(&self, cluster: &str, user: &str) -> Result<()> {
        let p = self.paths(cluster, user);
        csi_core::fsutil::blocking("removing a keyring", self.timeout, move || {
            for f in [&p.keyring, &p.secret] {
                match std::fs::remove_file(f) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(Error::io(format!("removing {}", f.display()), e));
                    }
                    _ => {}
                }
            }
            Ok(())
        })
        .await
    }
}
