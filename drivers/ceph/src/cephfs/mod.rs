//! `cephfs.rcsi.io`: volumes are CephFS subvolumes (one per volume, its size
//! the quota) in a subvolume group, made through the mgr's `fs subvolume`
//! commands sent over librados; names are reserved in a journal in the
//! filesystem's metadata pool (RADOS namespace `csi`), so every step is
//! safe to retry; restores and clones go through the mgr's clone engine.
//! The node mounts a subvolume with the kernel's client or ceph-fuse.

pub mod controller;
pub mod node;
pub mod params;

use crate::config::ClusterMap;
use crate::id::CephId;
use crate::journal::{Kind, OmapJournal};
use crate::pool::Pool;
use crate::rados::{Connection, IoCtx};
use crate::secret::Credentials;
use async_trait::async_trait;
use csi_core::backend::Plugin;
use csi_core::{Error, Result};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// The driver's CSI name.
pub const DRIVER_NAME: &str = "cephfs.rcsi.io";

/// RADOS namespace of the journal in the metadata pool (the MDS's own
/// objects live in the default one).
const JOURNAL_NAMESPACE: &str = "csi";

/// Subvolume group when neither the StorageClass nor the cluster map names one.
pub const DEFAULT_GROUP: &str = "csi";

/// Settings of the driver process.
#[derive(Clone, Debug)]
pub struct Config {
    /// librados's monitor and OSD op timeout; every call is abandoned
    /// shortly after it.
    pub call_timeout: Duration,
    /// How long a mgr command (subvolume create, rm, snapshot, clone) may
    /// take: the mgr's volumes module queues them behind its own work.
    pub mgr_timeout: Duration,
}

/// The CephFS driver.
pub struct Cephfs {
    pool: Pool,
    mgr_timeout: Duration,
    node: Option<node::Node>,
    /// Provisioner users (cluster, user) the monitors refused `auth rm`:
    /// not asked again to remove volume users.
    no_auth_caps: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
}

/// A filesystem of a cluster, opened as one user: the journal's context in
/// its metadata pool and the connection its mgr commands go over.
pub(crate) struct Fs {
    conn: Arc<Connection>,
    /// For mgr commands: no librados op timeouts (see `Connection::mgr_command`).
    mgr_conn: Arc<Connection>,
    io: Arc<IoCtx>,
    cluster: String,
    /// The filesystem's name.
    name: String,
    /// Its metadata pool (volume ids name it).
    pool_id: i64,
}

/// One filesystem as `fs ls` describes it.
struct FsEntry {
    name: String,
    metadata_pool_id: i64,
}

fn fs_list(out: &str) -> Result<Vec<FsEntry>> {
    let v: Value = serde_json::from_str(out)
        .map_err(|e| Error::Internal(format!("fs ls answered {out:?}: {e}")))?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| {
            Some(FsEntry {
                name: f["name"].as_str()?.to_owned(),
                metadata_pool_id: f["metadata_pool_id"].as_i64()?,
            })
        })
        .collect())
}

impl Cephfs {
    /// A driver (controller only) using the clusters of `map`.
    pub fn new(map: ClusterMap, cfg: Config) -> Self {
        Self {
            pool: Pool::new(map, cfg.call_timeout),
            mgr_timeout: cfg.mgr_timeout,
            node: None,
            no_auth_caps: Default::default(),
        }
    }

    /// A driver that also serves the node plugin, its state in `node.state_dir`.
    pub fn with_node(
        map: ClusterMap,
        cfg: Config,
        node: node::NodeConfig,
        host: node::NodeHost,
    ) -> Result<Self> {
        Ok(Self {
            node: Some(node::Node::open(node, host)?),
            ..Self::new(map, cfg)
        })
    }

    /// The subvolume group of a volume: the parameter, else the cluster
    /// map's `cephFS.subvolumeGroup`, else `csi`.
    fn group(&self, cluster: &str, param: Option<&str>) -> Result<String> {
        if let Some(g) = param {
            return Ok(g.to_owned());
        }
        let map = self.pool.cluster(cluster)?.cephfs.subvolume_group.clone();
        Ok(map
            .filter(|g| !g.is_empty())
            .unwrap_or_else(|| DEFAULT_GROUP.into()))
    }

    /// Opens filesystem `name` of `cluster` (InvalidArgument when it does
    /// not exist), or with `pool_id` the one whose metadata pool that is
    /// (None when there is none any more).
    async fn open(
        &self,
        cluster: &str,
        creds: &Credentials,
        want: Result<&str, i64>,
    ) -> Result<Option<Fs>> {
        let conn = self.pool.get(cluster, creds).await?;
        let (out, _) = self
            .pool
            .run(&conn, "listing filesystems", |c| {
                c.mon_command(r#"{"prefix": "fs ls", "format": "json"}"#)
            })
            .await?;
        let all = fs_list(&out)?;
        let Some(fs) = all.into_iter().find(|f| match want {
            Ok(name) => f.name == name,
            Err(id) => f.metadata_pool_id == id,
        }) else {
            return match want {
                Ok(name) => Err(Error::InvalidArgument(format!(
                    "CephFS filesystem {name:?} does not exist in cluster {cluster:?} (parameter \"fsName\")"
                ))),
                Err(_) => Ok(None),
            };
        };
        let pool_id = fs.metadata_pool_id;
        let io = self
            .pool
            .run(&conn, "opening the metadata pool", move |c| {
                c.ioctx(pool_id, Some(JOURNAL_NAMESPACE))
            })
            .await?;
        let mgr_conn = self.pool.get_for_mgr(cluster, creds).await?;
        Ok(Some(Fs {
            conn,
            mgr_conn,
            io: Arc::new(io),
            cluster: cluster.to_owned(),
            name: fs.name,
            pool_id,
        }))
    }

    /// Filesystem `name` of `cluster`.
    pub(crate) async fn fs_named(
        &self,
        cluster: &str,
        creds: &Credentials,
        name: &str,
    ) -> Result<Fs> {
        self.open(cluster, creds, Ok(name))
            .await?
            .ok_or_else(|| Error::Internal(format!("filesystem {name:?} vanished")))
    }

    /// The filesystem an id names; None when it no longer exists.
    pub(crate) async fn fs_of(&self, id: &CephId, creds: &Credentials) -> Result<Option<Fs>> {
        self.open(&id.cluster, creds, Err(id.pool)).await
    }

    /// The journal of `kind` of a filesystem.
    pub(crate) fn journal(&self, fs: &Fs, kind: Kind) -> OmapJournal {
        OmapJournal::new(
            fs.io.clone(),
            &fs.cluster,
            fs.pool_id,
            kind,
            self.pool.deadline(),
        )
    }

    /// Sends the mgr command `prefix` with `args` for `fs` (its `vol_name`
    /// added); returns the parsed JSON output (Null when it printed none).
    pub(crate) async fn mgr(&self, fs: &Fs, prefix: &str, mut args: Value) -> Result<Value> {
        args["prefix"] = prefix.into();
        args["vol_name"] = fs.name.clone().into();
        args["format"] = "json".into();
        let cmd = args.to_string();
        let what = format!("ceph {prefix}");
        let (out, _) = self
            .pool
            .run_within(&fs.mgr_conn, &what, self.mgr_timeout, move |c| {
                c.mgr_command(&cmd)
            })
            .await?;
        if out.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&out)
            .map_err(|e| Error::Internal(format!("{what} answered {out:?}: {e}")))
    }
}

#[async_trait]
impl Plugin for Cephfs {
    fn name(&self) -> &str {
        DRIVER_NAME
    }

    fn online_expansion(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_ls_output() {
        let out = r#"[{"name":"cephfs","metadata_pool":"cephfs_metadata","metadata_pool_id":2,"data_pool_ids":[3],"data_pools":["cephfs_data"]}]"#;
        let l = fs_list(out).unwrap();
        assert_eq!((l[0].name.as_str(), l[0].metadata_pool_id), ("cephfs", 2));
        assert!(fs_list("[]").unwrap().is_empty());
        assert!(fs_list("not json").is_err());
    }
}
