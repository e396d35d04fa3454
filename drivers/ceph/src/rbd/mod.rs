//! `rbd.rcsi.io`: volumes are RBD images. The controller creates, clones,
//! snapshots, grows and deletes them over librados/librbd with the journal
//! making every step safe to retry; the node maps them (krbd or rbd-fuse),
//! formats and mounts them.

pub mod controller;
pub mod images;
mod mapper;
pub mod node;
pub mod params;

pub use node::{NodeConfig, NodeHost};

use crate::config::ClusterMap;
use crate::id::CephId;
use crate::journal::{Kind, OmapJournal};
use crate::pool::Pool;
use crate::rados::{Connection, IoCtx};
use crate::secret::Credentials;
pub(crate) use crate::secret::creds_of;
use async_trait::async_trait;
use csi_core::backend::Plugin;
use csi_core::{Error, Result};
use std::sync::Arc;
use std::time::Duration;

/// The driver's CSI name.
pub const DRIVER_NAME: &str = "rbd.rcsi.io";

/// Settings of the driver process.
#[derive(Clone, Debug)]
pub struct Config {
    /// librados's monitor and OSD op timeout; every call is abandoned
    /// shortly after it.
    pub call_timeout: Duration,
    /// Clones deeper than this are flattened when they are made.
    pub max_clone_depth: u32,
    /// How long a flatten (a copy of the whole image) may take.
    pub flatten_timeout: Duration,
}

/// The RBD driver.
pub struct Rbd {
    pool: Pool,
    cfg: Config,
    node: Option<node::Node>,
}

/// A pool of a cluster, opened as one user.
pub(crate) struct Place {
    conn: Arc<Connection>,
    io: Arc<IoCtx>,
    cluster: String,
    pool_id: i64,
}

impl Rbd {
    /// A driver (controller only) using the clusters of `map`.
    pub fn new(map: ClusterMap, cfg: Config) -> Self {
        Self {
            pool: Pool::new(map, cfg.call_timeout),
            cfg,
            node: None,
        }
    }

    /// A driver that also serves the node plugin, its state in `node.state_dir`.
    pub fn with_node(
        map: ClusterMap,
        cfg: Config,
        node: NodeConfig,
        host: NodeHost,
    ) -> Result<Self> {
        Ok(Self {
            node: Some(node::Node::open(node, host)?),
            ..Self::new(map, cfg)
        })
    }

    /// Checks the node's mappings every `every` from now on and serves
    /// those whose rbd-nbd or rbd-fuse died again (no-op without a node).
    pub fn heal_forever(self: &std::sync::Arc<Self>, every: std::time::Duration) {
        if self.node.is_none() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                me.heal().await;
            }
        });
    }

    /// The RADOS namespace images of `cluster` live in.
    fn namespace(&self, cluster: &str) -> Result<Option<String>> {
        Ok(self.pool.cluster(cluster)?.rbd.rados_namespace.clone())
    }

    /// Pool `pool` (by name) of `cluster`; InvalidArgument when it does not exist.
    pub(crate) async fn place_named(
        &self,
        cluster: &str,
        creds: &Credentials,
        pool: &str,
    ) -> Result<Place> {
        let ns = self.namespace(cluster)?;
        let conn = self.pool.get(cluster, creds).await?;
        let (name, c) = (pool.to_owned(), cluster.to_owned());
        let (pool_id, io) = self
            .pool
            .run(&conn, "opening a pool", move |conn| {
                let id = conn.pool_id(&name).map_err(|e| match e {
                    Error::NotFound(_) => Error::InvalidArgument(format!(
                        "pool {name:?} does not exist in Ceph cluster {c:?} (parameter \"pool\")"
                    )),
                    e => e,
                })?;
                Ok((id, conn.ioctx(id, ns.as_deref())?))
            })
            .await?;
        Ok(Place {
            conn,
            io: Arc::new(io),
            cluster: cluster.to_owned(),
            pool_id,
        })
    }

    /// The pool an id names; None when the pool no longer exists.
    pub(crate) async fn place_of(&self, id: &CephId, creds: &Credentials) -> Result<Option<Place>> {
        let ns = self.namespace(&id.cluster)?;
        let conn = self.pool.get(&id.cluster, creds).await?;
        let pool_id = id.pool;
        let io = self
            .pool
            .run(&conn, "opening a pool", move |conn| {
                match conn.ioctx(pool_id, ns.as_deref()) {
                    Ok(io) => Ok(Some(io)),
                    Err(Error::NotFound(_)) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await?;
        Ok(io.map(|io| Place {
            conn,
            io: Arc::new(io),
            cluster: id.cluster.clone(),
            pool_id,
        }))
    }

    /// The journal of `kind` of a pool.
    pub(crate) fn journal(&self, p: &Place, kind: Kind) -> OmapJournal {
        OmapJournal::new(
            p.io.clone(),
            &p.cluster,
            p.pool_id,
            kind,
            self.pool.deadline(),
        )
    }

    /// Runs blocking work with the place's connection and context.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        p: &Place,
        what: &str,
        f: impl FnOnce(&Arc<Connection>, &IoCtx) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let io = p.io.clone();
        self.pool.run(&p.conn, what, move |c| f(c, &io)).await
    }

    /// As [`Rbd::run`], for work that copies data (flatten) under its own
    /// longer deadline.
    pub(crate) async fn run_long<T: Send + 'static>(
        &self,
        p: &Place,
        what: &str,
        f: impl FnOnce(&Arc<Connection>, &IoCtx) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (io, conn) = (p.io.clone(), p.conn.clone());
        csi_core::fsutil::blocking(what.to_owned(), self.cfg.flatten_timeout, move || {
            f(&conn, &io)
        })
        .await
    }
}

#[async_trait]
impl Plugin for Rbd {
    fn name(&self) -> &str {
        DRIVER_NAME
    }

    fn online_expansion(&self) -> bool {
        true
    }
}
