//! Connections by cluster and cephx user, opened on first use and kept, with
//! every call run off the runtime under our own deadline (on top of
//! librados's op timeouts), so a sick cluster never blocks Probe or other
//! clusters' calls.

use crate::config::ClusterMap;
use crate::rados::Connection;
use crate::secret::Credentials;
use csi_core::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The connections of one driver process.
pub struct Pool {
    map: ClusterMap,
    timeout: Duration,
    /// By cluster, user and whether librados times operations out.
    conns: Mutex<HashMap<(String, Credentials, bool), Arc<Connection>>>,
}

impl Pool {
    /// Connections to the clusters of `map`; librados gives up after
    /// `timeout`, and every call is abandoned shortly after that.
    pub fn new(map: ClusterMap, timeout: Duration) -> Self {
        Self {
            map,
            timeout,
            conns: Mutex::default(),
        }
    }

    /// The cluster `id` of the map.
    pub fn cluster(&self, id: &str) -> Result<&crate::config::Cluster> {
        Ok(self.map.get(id)?)
    }

    /// Every cluster of the map.
    pub fn clusters(&self) -> &ClusterMap {
        &self.map
    }

    /// The deadline of one call: librados's timeout plus a margin.
    pub fn deadline(&self) -> Duration {
        self.timeout + Duration::from_secs(2)
    }

    /// The connection to `cluster` as `creds` (a rotated key gets a new one).
    pub async fn get(&self, cluster: &str, creds: &Credentials) -> Result<Arc<Connection>> {
        self.connection(cluster, creds, true).await
    }

    /// A connection without librados op timeouts, for mgr commands (see
    /// [`Connection::mgr_command`]); [`Pool::run`] still bounds each call.
    pub async fn get_for_mgr(&self, cluster: &str, creds: &Credentials) -> Result<Arc<Connection>> {
        self.connection(cluster, creds, false).await
    }

    async fn connection(
        &self,
        cluster: &str,
        creds: &Credentials,
        op_timeouts: bool,
    ) -> Result<Arc<Connection>> {
        let key = (cluster.to_owned(), creds.clone(), op_timeouts);
        if let Some(c) = self.lock().get(&key) {
            return Ok(c.clone());
        }
        let monitors = self.map.get(cluster)?.monitors.clone();
        let (c, t) = (creds.clone(), self.timeout);
        let conn = csi_core::fsutil::blocking(
            format!("connecting to Ceph cluster {cluster:?}"),
            self.deadline(),
            move || Connection::connect(&monitors, &c, t, op_timeouts),
        )
        .await?;
        Ok(self.lock().entry(key).or_insert(Arc::new(conn)).clone())
    }

    /// Runs `f` on `conn` off the runtime under the deadline; `what` names it.
    pub async fn run<T: Send + 'static>(
        &self,
        conn: &Arc<Connection>,
        what: &str,
        f: impl FnOnce(&Arc<Connection>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.run_within(conn, what, self.deadline(), f).await
    }

    /// Runs `f` on `conn` off the runtime, abandoned after `deadline`.
    pub async fn run_within<T: Send + 'static>(
        &self,
        conn: &Arc<Connection>,
        what: &str,
        deadline: Duration,
        f: impl FnOnce(&Arc<Connection>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let c = conn.clone();
        csi_core::fsutil::blocking(what.to_owned(), deadline, move || f(&c)).await
    }

    /// Drops the connection to `cluster` as `creds` (after a failure that
    /// may have left it unusable); the next call connects again.
    pub fn forget(&self, cluster: &str, creds: &Credentials) {
        let mut conns = self.lock();
        for timed in [true, false] {
            conns.remove(&(cluster.to_owned(), creds.clone(), timed));
        }
    }

    /// ResourceExhausted when `size` bytes of `what` (an image, a quota)
    /// could never be written in full: beyond pool `pool_id`'s quota, or
    /// the cluster's raw capacity (space is thin, so anything below that is
    /// allowed).
    pub async fn check_room(
        &self,
        conn: &Arc<Connection>,
        pool_id: Option<i64>,
        size: u64,
        what: &str,
    ) -> Result<()> {
        let (df, quota) = self
            .run(conn, "reading the cluster's capacity", move |conn| {
                let (df, _) = conn.mon_command(r#"{"prefix": "df", "format": "json"}"#)?;
                let q = pool_id.map(|p| {
                    format!(
                        r#"{{"prefix": "osd pool get-quota", "poolid": {p}, "format": "json"}}"#
                    )
                });
                // The quota needs more than read access on some clusters.
                let quota = q.and_then(|q| conn.mon_command(&q).map(|(o, _)| o).ok());
                Ok((df, quota))
            })
            .await?;
        let df: serde_json::Value = serde_json::from_str(&df)
            .map_err(|e| Error::Internal(format!("ceph df answered {df:?}: {e}")))?;
        let total = df["stats"]["total_bytes"].as_u64().unwrap_or(u64::MAX);
        if size > total {
            return Err(Error::ResourceExhausted(format!(
                "{what} of {size} bytes is larger than the whole Ceph cluster ({total} bytes raw)"
            )));
        }
        let max = quota
            .and_then(|q| serde_json::from_str::<serde_json::Value>(&q).ok())
            .and_then(|q| q["quota_max_bytes"].as_u64())
            .unwrap_or(0);
        if max > 0 && size > max {
            return Err(Error::ResourceExhausted(format!(
                "{what} of {size} bytes is larger than the pool's quota of {max} bytes"
            )));
        }
        Ok(())
    }

    /// Blocklists a dead client of ours at `addr` for an hour, so its
    /// watches (RBD) or capabilities and session (CephFS) stop holding
    /// others up; best effort: they lapse by themselves after a while.
    pub async fn blocklist(&self, cluster: &str, creds: &Credentials, addr: &str) {
        let cmd = serde_json::json!({
            "prefix": "osd blocklist",
            "blocklistop": "add",
            "addr": addr,
            "expire": 3600.0,
        })
        .to_string();
        let done = async {
            let conn = self.get(cluster, creds).await?;
            self.run(&conn, "blocklisting a dead client", move |c| {
                c.mon_command(&cmd).map(drop)
            })
            .await
        }
        .await;
        match done {
            Ok(()) => tracing::info!(cluster, addr, "blocklisted a dead client"),
            Err(e) => {
                tracing::warn!(cluster, addr, error = %e, "cannot blocklist a dead client; what it holds lapses by itself")
            }
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, Credentials, bool), Arc<Connection>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}
