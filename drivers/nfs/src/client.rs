//! A userspace NFSv3 client for the controller: pooled connections per
//! export, a deadline on every call, reconnection after a server restart.
//! The controller mounts nothing and needs no privileges beyond a network
//! connection (and a privileged source port where the server insists).

use crate::error::{NfsError, nfsstat};
use nfs3_client::io::{AsyncRead, AsyncWrite};
use nfs3_client::net::Connector;
use nfs3_client::nfs3_types::nfs3::{
    self, Nfs3Option, Nfs3Result, diropargs3, fattr3, filename3, ftype3, nfs_fh3, sattr3,
};
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::{Nfs3Client, Nfs3ConnectionBuilder, RpcError};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

type Client = Nfs3Client<Stream>;

/// A TCP connection whose end of stream is an error: the client library
/// reads in a loop that would otherwise spin on a connection the server
/// closed (after a restart) until the call's deadline.
pub struct Stream(TcpStream);

impl AsyncRead for Stream {
    async fn async_read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = tokio::io::AsyncReadExt::read(&mut self.0, buf).await?;
        if n == 0 && !buf.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(n)
    }
}

impl AsyncWrite for Stream {
    async fn async_write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        tokio::io::AsyncWriteExt::write(&mut self.0, buf).await
    }
}

/// Opens [`Stream`]s.
struct Tcp;

impl Connector for Tcp {
    type Connection = Stream;

    async fn connect(&self, addr: SocketAddr) -> std::io::Result<Stream> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Stream(s))
    }

    async fn connect_with_port(
        &self,
        addr: SocketAddr,
        local_port: u16,
    ) -> std::io::Result<Stream> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        let local = match addr {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], local_port)),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], local_port)),
        };
        socket.bind(local)?;
        let s = socket.connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Stream(s))
    }
}
/// Result of NFS operations.
pub type Result<T, E = NfsError> = std::result::Result<T, E>;

/// How the controller talks to NFS servers.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// NFS port; None asks the server's portmapper.
    pub nfs_port: Option<u16>,
    /// MOUNT port; None asks the server's portmapper.
    pub mount_port: Option<u16>,
    /// Portmapper port (111).
    pub portmapper_port: u16,
    /// Bound on every call, connecting included.
    pub timeout: Duration,
    /// Connections per export (one call is in flight per connection).
    pub connections: usize,
    /// Connect from a port below 1024 (servers with `secure` exports want it; needs root).
    pub privileged_port: bool,
    /// AUTH_UNIX uid (0: root, which `no_root_squash` exports honour).
    pub uid: u32,
    /// AUTH_UNIX gid.
    pub gid: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            nfs_port: None,
            mount_port: None,
            portmapper_port: 111,
            timeout: Duration::from_secs(30),
            connections: 4,
            privileged_port: false,
            uid: 0,
            gid: 0,
        }
    }
}

/// Connections to every export the controller has used.
#[derive(Default)]
pub struct Pool {
    cfg: ClientConfig,
    shares: Mutex<HashMap<(String, String), Arc<Share>>>,
}

impl Pool {
    /// A pool that connects with `cfg`.
    pub fn new(cfg: ClientConfig) -> Self {
        Self {
            cfg,
            shares: Mutex::default(),
        }
    }

    /// The export `share` of `server` (connections are made on first use).
    pub fn share(&self, server: &str, share: &str) -> Arc<Share> {
        let mut all = self.shares.lock().unwrap_or_else(|e| e.into_inner());
        all.entry((server.to_owned(), share.to_owned()))
            .or_insert_with(|| {
                Arc::new(Share {
                    server: server.to_owned(),
                    export: share.to_owned(),
                    cfg: self.cfg.clone(),
                    idle: Mutex::default(),
                    permits: Arc::new(Semaphore::new(self.cfg.connections.max(1))),
                    root: Mutex::default(),
                    dirs: Mutex::default(),
                })
            })
            .clone()
    }
}

/// One export and its pooled connections.
pub struct Share {
    server: String,
    export: String,
    cfg: ClientConfig,
    idle: Mutex<Vec<Client>>,
    permits: Arc<Semaphore>,
    root: Mutex<Option<nfs_fh3>>,
    /// Handles of `.rcsi/<name>` directories.
    dirs: Mutex<HashMap<&'static str, nfs_fh3>>,
}

/// A connection taken from the pool; returned only after a clean call.
struct Lease {
    client: Option<Client>,
    reused: bool,
    _permit: OwnedSemaphorePermit,
}

/// Attributes of a file the controller cares about.
#[derive(Clone, Debug)]
pub struct Attr {
    /// Regular file, directory, symlink, ...
    pub kind: Kind,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Modification time (seconds, nanoseconds).
    pub mtime: (u32, u32),
    /// Change time (seconds, nanoseconds).
    pub ctime: (u32, u32),
    /// Device numbers of a device node.
    pub rdev: (u32, u32),
}

/// File types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Block device.
    Block,
    /// Character device.
    Char,
    /// Socket.
    Socket,
    /// Named pipe.
    Fifo,
}

impl From<&fattr3> for Attr {
    fn from(a: &fattr3) -> Self {
        Attr {
            kind: match a.type_ {
                ftype3::NF3REG => Kind::File,
                ftype3::NF3DIR => Kind::Dir,
                ftype3::NF3LNK => Kind::Symlink,
                ftype3::NF3BLK => Kind::Block,
                ftype3::NF3CHR => Kind::Char,
                ftype3::NF3SOCK => Kind::Socket,
                ftype3::NF3FIFO => Kind::Fifo,
            },
            mode: a.mode & 0o7777,
            uid: a.uid,
            gid: a.gid,
            size: a.size,
            mtime: (a.mtime.seconds, a.mtime.nseconds),
            ctime: (a.ctime.seconds, a.ctime.nseconds),
            rdev: (a.rdev.specdata1, a.rdev.specdata2),
        }
    }
}

/// One directory entry with its handle and attributes.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Name in its directory.
    pub name: Vec<u8>,
    /// File handle.
    pub fh: nfs_fh3,
    /// Attributes.
    pub attr: Attr,
}

/// One RPC on a leased connection, bounded by the configured timeout; a
/// connection that failed or timed out is dropped, and a call that failed on
/// a reused connection (the server restarted since) is retried once on a
/// fresh one.
macro_rules! rpc {
    ($share:expr, $what:expr, |$c:ident| $call:expr) => {{
        let share: &Share = $share;
        let what: String = ($what).into();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut lease = share.lease(&what).await?;
            let reused = lease.reused;
            let $c = lease.client.as_mut().expect("a lease holds a client");
            match tokio::time::timeout(share.cfg.timeout, $call).await {
                Ok(Ok(reply)) => {
                    share.give_back(lease);
                    break Ok(reply);
                }
                // The server closed it (restarted): so it did every idle one.
                Ok(Err(e)) if reused && attempt == 1 && broken(&e) => {
                    share.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
                    continue;
                }
                Ok(Err(e)) => break Err(share.transport(&what, e)),
                Err(_) => break Err(share.timeout(&what)),
            }
        }
    }};
}

/// True when an RPC error means the connection is dead rather than the call wrong.
fn broken(e: &RpcError) -> bool {
    matches!(
        e,
        RpcError::Io(_) | RpcError::UnexpectedXid | RpcError::Xdr(_)
    )
}

/// Unwraps an NFSv3 result into Ok or a status error naming `what`.
fn check<T, E>(r: Nfs3Result<T, E>, what: impl FnOnce() -> String) -> Result<T> {
    match r {
        Nfs3Result::Ok(v) => Ok(v),
        Nfs3Result::Err((status, _)) => Err(NfsError::Status {
            what: what(),
            status: status.to_string(),
            code: status as u32,
        }),
    }
}

fn name3(name: &[u8]) -> filename3<'_> {
    filename3(Opaque::borrowed(name))
}

/// Attributes for a new object: mode only (owner from the credential).
pub fn mode_attr(mode: u32) -> sattr3 {
    sattr3 {
        mode: Nfs3Option::Some(mode),
        ..Default::default()
    }
}

impl Share {
    /// `server:/share`, for messages.
    pub fn label(&self) -> String {
        format!("{}:{}", self.server, self.export)
    }

    fn timeout(&self, what: &str) -> NfsError {
        NfsError::Timeout {
            server: self.server.clone(),
            what: what.to_owned(),
            timeout: self.cfg.timeout,
        }
    }

    fn transport(&self, what: &str, e: impl std::fmt::Display) -> NfsError {
        NfsError::Unreachable {
            server: self.server.clone(),
            what: what.to_owned(),
            why: e.to_string(),
        }
    }

    fn credential(&self) -> opaque_auth<'static> {
        opaque_auth::auth_unix(&auth_unix {
            stamp: std::process::id(),
            machinename: Opaque::owned(b"rcsi-controller".to_vec()),
            uid: self.cfg.uid,
            gid: self.cfg.gid,
            gids: vec![self.cfg.gid],
        })
    }

    async fn lease(&self, what: &str) -> Result<Lease> {
        let permit = tokio::time::timeout(self.cfg.timeout, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| self.timeout(&format!("{what} (every connection is busy)")))?
            .expect("the pool's semaphore is never closed");
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        if let Some(client) = idle {
            return Ok(Lease {
                client: Some(client),
                reused: true,
                _permit: permit,
            });
        }
        let client = tokio::time::timeout(self.cfg.timeout, self.connect())
            .await
            .map_err(|_| self.timeout(&format!("connect for {what}")))??;
        Ok(Lease {
            client: Some(client),
            reused: false,
            _permit: permit,
        })
    }

    fn give_back(&self, mut lease: Lease) {
        if let Some(c) = lease.client.take() {
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(c);
        }
    }

    async fn connect(&self) -> Result<Client> {
        let mut b = Nfs3ConnectionBuilder::new(Tcp, &self.server, &self.export)
            .portmapper_port(self.cfg.portmapper_port)
            .connect_from_privileged_port(self.cfg.privileged_port)
            .credential(self.credential());
        if let Some(p) = self.cfg.mount_port {
            b = b.mount_port(p);
        }
        if let Some(p) = self.cfg.nfs_port {
            b = b.nfs3_port(p);
        }
        let conn = b.mount().await.map_err(|e| self.transport("MOUNT", e))?;
        *self.root.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.root_nfs_fh3());
        Ok(conn.into_nfs3_client())
    }

    /// The handle of the export's root.
    pub async fn root(&self) -> Result<nfs_fh3> {
        if let Some(fh) = self.root.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Ok(fh);
        }
        // Connecting mounts the export, which yields the root handle.
        let lease = self.lease("MOUNT").await?;
        self.give_back(lease);
        self.root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| self.transport("MOUNT", "no root handle"))
    }

    /// Bytes available to this user on the export (FSSTAT).
    pub async fn available(&self) -> Result<u64> {
        let root = self.root().await?;
        let what = format!("FSSTAT {}", self.label());
        let r = rpc!(self, what.clone(), |c| c.fsstat(&nfs3::FSSTAT3args {
            fsroot: root.clone()
        }))?;
        Ok(check(r, || what)?.abytes)
    }

    /// Looks `name` up in `dir`; None when it does not exist.
    pub async fn lookup(&self, dir: &nfs_fh3, name: &[u8]) -> Result<Option<(nfs_fh3, Attr)>> {
        let what = format!("LOOKUP {}", String::from_utf8_lossy(name));
        let r = rpc!(self, what.clone(), |c| c.lookup(&nfs3::LOOKUP3args {
            what: diropargs3 {
                dir: dir.clone(),
                name: name3(name),
            }
        }))?;
        match check(r, || what) {
            Ok(ok) => {
                let attr = match ok.obj_attributes {
                    Nfs3Option::Some(a) => Attr::from(&a),
                    Nfs3Option::None => self.getattr(&ok.object).await?,
                };
                Ok(Some((ok.object, attr)))
            }
            Err(e) if e.status() == Some(nfsstat::NOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Walks `path` (components relative to the root); None when any part is missing.
    pub async fn walk(&self, path: &[&str]) -> Result<Option<(nfs_fh3, Attr)>> {
        let mut fh = self.root().await?;
        let mut attr = None;
        for part in path {
            match self.lookup(&fh, part.as_bytes()).await? {
                Some((next, a)) => {
                    fh = next;
                    attr = Some(a);
                }
                None => return Ok(None),
            }
        }
        let attr = match attr {
            Some(a) => a,
            None => self.getattr(&fh).await?,
        };
        Ok(Some((fh, attr)))
    }

    /// GETATTR.
    pub async fn getattr(&self, fh: &nfs_fh3) -> Result<Attr> {
        let r = rpc!(self, "GETATTR", |c| c
            .getattr(&nfs3::GETATTR3args { object: fh.clone() }))?;
        Ok(Attr::from(&check(r, || "GETATTR".into())?.obj_attributes))
    }

    /// The handle of `.rcsi/<name>`, created (mode 0700) when missing and
    /// remembered until [`Share::forget_dirs`].
    pub async fn rcsi_dir(&self, name: &'static str) -> Result<nfs_fh3> {
        if let Some(fh) = self
            .dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(fh.clone());
        }
        let fh = self
            .mkdir_all(&[crate::params::RESERVED, name], 0o700)
            .await?;
        self.dirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, fh.clone());
        Ok(fh)
    }

    /// Drops remembered directory handles (one went stale: it was removed).
    pub fn forget_dirs(&self) {
        self.dirs.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Sets mode, owner and times (what is given).
    pub async fn setattr(&self, fh: &nfs_fh3, attr: sattr3) -> Result<()> {
        let r = rpc!(self, "SETATTR", |c| c.setattr(&nfs3::SETATTR3args {
            object: fh.clone(),
            new_attributes: attr.clone(),
            guard: Nfs3Option::None,
        }))?;
        check(r, || "SETATTR".into()).map(drop)
    }

    /// Creates directory `name` in `dir` with `mode`; an existing directory is fine.
    pub async fn mkdir(&self, dir: &nfs_fh3, name: &[u8], mode: u32) -> Result<nfs_fh3> {
        let what = format!("MKDIR {}", String::from_utf8_lossy(name));
        let r = rpc!(self, what.clone(), |c| c.mkdir(&nfs3::MKDIR3args {
            where_: diropargs3 {
                dir: dir.clone(),
                name: name3(name),
            },
            attributes: mode_attr(mode),
        }))?;
        match check(r, || what.clone()) {
            Ok(ok) => match ok.obj {
                Nfs3Option::Some(fh) => Ok(fh),
                Nfs3Option::None => self.expect(dir, name, Kind::Dir, &what).await,
            },
            Err(e) if e.status() == Some(nfsstat::EXIST) => {
                self.expect(dir, name, Kind::Dir, &what).await
            }
            Err(e) => Err(e),
        }
    }

    /// The handle of `name` in `dir`, which must exist with type `kind`.
    async fn expect(&self, dir: &nfs_fh3, name: &[u8], kind: Kind, what: &str) -> Result<nfs_fh3> {
        match self.lookup(dir, name).await? {
            Some((fh, a)) if a.kind == kind => Ok(fh),
            Some((_, a)) => Err(NfsError::Status {
                what: format!("{what}: it exists as {:?}", a.kind),
                status: "NFS3ERR_EXIST".into(),
                code: nfsstat::EXIST,
            }),
            None => Err(NfsError::Status {
                what: what.to_owned(),
                status: "NFS3ERR_NOENT".into(),
                code: nfsstat::NOENT,
            }),
        }
    }

    /// Creates every missing directory of `path` (relative to the root) with `mode`.
    pub async fn mkdir_all(&self, path: &[&str], mode: u32) -> Result<nfs_fh3> {
        let mut fh = self.root().await?;
        for part in path {
            fh = match self.lookup(&fh, part.as_bytes()).await? {
                Some((next, a)) if a.kind == Kind::Dir => next,
                Some(_) => {
                    return Err(NfsError::Status {
                        what: format!("MKDIR {}: {part} is not a directory", path.join("/")),
                        status: "NFS3ERR_NOTDIR".into(),
                        code: nfsstat::NOTDIR,
                    });
                }
                None => self.mkdir(&fh, part.as_bytes(), mode).await?,
            };
        }
        Ok(fh)
    }

    /// Creates (or truncates) file `name` in `dir`.
    pub async fn create(&self, dir: &nfs_fh3, name: &[u8], mode: u32) -> Result<nfs_fh3> {
        let what = format!("CREATE {}", String::from_utf8_lossy(name));
        let attrs = sattr3 {
            mode: Nfs3Option::Some(mode),
            size: Nfs3Option::Some(0),
            ..Default::default()
        };
        let r = rpc!(self, what.clone(), |c| c.create(&nfs3::CREATE3args {
            where_: diropargs3 {
                dir: dir.clone(),
                name: name3(name),
            },
            how: nfs3::createhow3::UNCHECKED(attrs.clone()),
        }))?;
        match check(r, || what.clone())?.obj {
            Nfs3Option::Some(fh) => Ok(fh),
            Nfs3Option::None => self.expect(dir, name, Kind::File, &what).await,
        }
    }

    /// Reads up to `count` bytes at `offset`; returns the data and EOF.
    pub async fn read(&self, fh: &nfs_fh3, offset: u64, count: u32) -> Result<(Vec<u8>, bool)> {
        let r = rpc!(self, "READ", |c| c.read(&nfs3::READ3args {
            file: fh.clone(),
            offset,
            count,
        }))?;
        let ok = check(r, || "READ".into())?;
        Ok((ok.data.into_owned(), ok.eof))
    }

    /// Writes `data` at `offset` stably (FILE_SYNC); loops on short writes.
    pub async fn write(&self, fh: &nfs_fh3, mut offset: u64, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let r = rpc!(self, "WRITE", |c| c.write(&nfs3::WRITE3args {
                file: fh.clone(),
                offset,
                count: data.len() as u32,
                stable: nfs3::stable_how::FILE_SYNC,
                data: Opaque::borrowed(data),
            }))?;
            let ok = check(r, || "WRITE".into())?;
            let n = (ok.count as usize).min(data.len());
            if n == 0 {
                return Err(NfsError::Status {
                    what: "WRITE wrote nothing".into(),
                    status: "NFS3ERR_IO".into(),
                    code: 5,
                });
            }
            data = &data[n..];
            offset += n as u64;
        }
        Ok(())
    }

    /// Reads a whole small file.
    pub async fn read_all(&self, fh: &nfs_fh3, limit: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let (chunk, eof) = self.read(fh, out.len() as u64, 64 << 10).await?;
            out.extend_from_slice(&chunk);
            if eof || chunk.is_empty() || out.len() > limit {
                return Ok(out);
            }
        }
    }

    /// Removes file `name` from `dir`; success when it is gone already.
    pub async fn remove(&self, dir: &nfs_fh3, name: &[u8]) -> Result<()> {
        self.unlink(dir, name, false).await
    }

    /// Removes empty directory `name` from `dir`; success when it is gone already.
    pub async fn rmdir(&self, dir: &nfs_fh3, name: &[u8]) -> Result<()> {
        self.unlink(dir, name, true).await
    }

    async fn unlink(&self, dir: &nfs_fh3, name: &[u8], is_dir: bool) -> Result<()> {
        let op = if is_dir { "RMDIR" } else { "REMOVE" };
        let what = format!("{op} {}", String::from_utf8_lossy(name));
        let object = || diropargs3 {
            dir: dir.clone(),
            name: name3(name),
        };
        let r = if is_dir {
            let r = rpc!(self, what.clone(), |c| c
                .rmdir(&nfs3::RMDIR3args { object: object() }))?;
            check(r, || what.clone()).map(drop)
        } else {
            let r = rpc!(self, what.clone(), |c| c
                .remove(&nfs3::REMOVE3args { object: object() }))?;
            check(r, || what.clone()).map(drop)
        };
        match r {
            Err(e) if e.status() == Some(nfsstat::NOENT) => Ok(()),
            r => r,
        }
    }

    /// Renames `from_dir/from` to `to_dir/to` (atomic on the server).
    pub async fn rename(
        &self,
        from_dir: &nfs_fh3,
        from: &[u8],
        to_dir: &nfs_fh3,
        to: &[u8],
    ) -> Result<()> {
        let what = format!(
            "RENAME {} to {}",
            String::from_utf8_lossy(from),
            String::from_utf8_lossy(to)
        );
        let r = rpc!(self, what.clone(), |c| c.rename(&nfs3::RENAME3args {
            from: diropargs3 {
                dir: from_dir.clone(),
                name: name3(from),
            },
            to: diropargs3 {
                dir: to_dir.clone(),
                name: name3(to),
            },
        }))?;
        check(r, || what).map(drop)
    }

    /// Reads the target of a symbolic link.
    pub async fn readlink(&self, fh: &nfs_fh3) -> Result<Vec<u8>> {
        let r = rpc!(self, "READLINK", |c| c.readlink(&nfs3::READLINK3args {
            symlink: fh.clone()
        }))?;
        Ok(check(r, || "READLINK".into())?.data.0.into_owned())
    }

    /// Creates symbolic link `name` in `dir` pointing at `target`.
    pub async fn symlink(&self, dir: &nfs_fh3, name: &[u8], target: &[u8]) -> Result<()> {
        let what = format!("SYMLINK {}", String::from_utf8_lossy(name));
        let r = rpc!(self, what.clone(), |c| c.symlink(&nfs3::SYMLINK3args {
            where_: diropargs3 {
                dir: dir.clone(),
                name: name3(name),
            },
            symlink: nfs3::symlinkdata3 {
                symlink_attributes: sattr3::default(),
                symlink_data: nfs3::nfspath3(Opaque::borrowed(target)),
            },
        }))?;
        match check(r, || what) {
            Err(e) if e.status() == Some(nfsstat::EXIST) => Ok(()),
            r => r.map(drop),
        }
    }

    /// Creates a fifo, socket or device node `name` in `dir` like `attr`.
    pub async fn mknod(&self, dir: &nfs_fh3, name: &[u8], attr: &Attr) -> Result<()> {
        let what = format!("MKNOD {}", String::from_utf8_lossy(name));
        let sattr = mode_attr(attr.mode);
        let device = |a: &Attr| nfs3::devicedata3 {
            dev_attributes: sattr.clone(),
            spec: nfs3::specdata3 {
                specdata1: a.rdev.0,
                specdata2: a.rdev.1,
            },
        };
        if !matches!(
            attr.kind,
            Kind::Fifo | Kind::Socket | Kind::Block | Kind::Char
        ) {
            return Ok(());
        }
        let data = || match attr.kind {
            Kind::Fifo => nfs3::mknoddata3::NF3FIFO(sattr.clone()),
            Kind::Socket => nfs3::mknoddata3::NF3SOCK(sattr.clone()),
            Kind::Block => nfs3::mknoddata3::NF3BLK(device(attr)),
            _ => nfs3::mknoddata3::NF3CHR(device(attr)),
        };
        let r = rpc!(self, what.clone(), |c| c.mknod(&nfs3::MKNOD3args {
            where_: diropargs3 {
                dir: dir.clone(),
                name: name3(name),
            },
            what: data(),
        }))?;
        match check(r, || what) {
            Err(e) if e.status() == Some(nfsstat::EXIST) => Ok(()),
            r => r.map(drop),
        }
    }

    /// One page of `dir`'s entries starting after `cookie` (READDIRPLUS);
    /// returns the entries, the next cookie and verifier, and EOF.
    pub async fn readdir_page(
        &self,
        dir: &nfs_fh3,
        cookie: u64,
        verf: [u8; 8],
    ) -> Result<(Vec<Entry>, u64, [u8; 8], bool)> {
        let r = rpc!(self, "READDIRPLUS", |c| c.readdirplus(
            &nfs3::READDIRPLUS3args {
                dir: dir.clone(),
                cookie,
                cookieverf: nfs3::cookieverf3(verf),
                dircount: 16 << 10,
                maxcount: 64 << 10,
            }
        ))?;
        let ok = check(r, || "READDIRPLUS".into())?;
        let verf = ok.cookieverf.0;
        let eof = ok.reply.eof;
        let mut next = cookie;
        let mut out = Vec::new();
        for e in ok.reply.entries.into_inner() {
            next = e.cookie;
            let name = e.name.0.to_vec();
            if name == b"." || name == b".." {
                continue;
            }
            let fh = match e.name_handle {
                Nfs3Option::Some(fh) => fh,
                Nfs3Option::None => match self.lookup(dir, &name).await? {
                    Some((fh, _)) => fh,
                    None => continue,
                },
            };
            let attr = match e.name_attributes {
                Nfs3Option::Some(a) => Attr::from(&a),
                Nfs3Option::None => self.getattr(&fh).await?,
            };
            out.push(Entry { name, fh, attr });
        }
        Ok((out, next, verf, eof))
    }
}
