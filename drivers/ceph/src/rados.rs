//! A cluster connection over librados ([`crate::ffi`]) with
//! the few calls the drivers use: pools, omap key/values and mon commands.
//! Every call is blocking and bounded by librados's own op timeouts; the
//! async layer adds its own deadline on top.

use crate::ffi::{self, IoctxT as rados_ioctx_t, RadosT as rados_t};
use crate::secret::Credentials;
use csi_core::{Error, Result};
use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

/// A librados error code as a gRPC-meaningful error; `what` names the call.
pub(crate) fn check(code: i32, what: &str) -> Result<i32> {
    if code >= 0 {
        return Ok(code);
    }
    let errno = -code;
    let msg = format!("{what}: {}", std::io::Error::from_raw_os_error(errno));
    Err(match errno {
        libc::ENOENT => Error::NotFound(msg),
        libc::EEXIST => Error::AlreadyExists(msg),
        libc::ETIMEDOUT => Error::DeadlineExceeded(msg),
        libc::EACCES | libc::EPERM => Error::PermissionDenied(msg),
        libc::ENOSPC | libc::EDQUOT => Error::ResourceExhausted(msg),
        libc::EINVAL => Error::InvalidArgument(msg),
        libc::EBUSY | libc::ENOTEMPTY => Error::FailedPrecondition(msg),
        _ => Error::Unavailable(msg),
    })
}

pub(crate) fn cstr(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::InvalidArgument(format!("{s:?} contains NUL")))
}

/// A connected cluster handle (librados handles are thread-safe).
pub struct Connection {
    handle: rados_t,
}

// SAFETY: a rados_t may be used from any thread (librados locks internally).
unsafe impl Send for Connection {}
// SAFETY: as above; every method takes &self and librados serializes.
unsafe impl Sync for Connection {}

impl Drop for Connection {
    fn drop(&mut self) {
        // SAFETY: the handle was created by rados_create and is shut down once.
        unsafe { ffi::rados_shutdown(self.handle) }
    }
}

impl Connection {
    /// Connects to `monitors` as `creds` (the key is set in memory, never
    /// written to a file); monitor and OSD operations time out after
    /// `timeout`, or with `op_timeouts` false never (see [`Connection::mgr_command`]).
    pub fn connect(
        monitors: &[String],
        creds: &Credentials,
        timeout: Duration,
        op_timeouts: bool,
    ) -> Result<Self> {
        ffi::Rados::get()?;
        let user = cstr(&creds.user)?;
        let mut handle: rados_t = ptr::null_mut();
        // SAFETY: handle is an out pointer; user outlives the call.
        check(
            unsafe { ffi::rados_create(&mut handle, user.as_ptr()) },
            "rados_create",
        )?;
        let conn = Self { handle };
        let secs = timeout.as_secs().max(1).to_string();
        let op = if op_timeouts {
            secs.clone()
        } else {
            "0".into()
        };
        for (k, v) in [
            ("mon_host", monitors.join(",")),
            ("key", creds.key.clone()),
            ("rados_mon_op_timeout", op.clone()),
            ("rados_osd_op_timeout", op),
            ("client_mount_timeout", secs),
            ("log_to_stderr", "false".into()),
            ("err_to_stderr", "false".into()),
            ("log_file", String::new()),
        ] {
            let (ck, cv) = (cstr(k)?, cstr(&v)?);
            // SAFETY: the handle is live and both strings outlive the call.
            let r = unsafe { ffi::rados_conf_set(conn.handle, ck.as_ptr(), cv.as_ptr()) };
            check(r, &format!("setting {k}"))?;
        }
        // SAFETY: configured handle; bounded by client_mount_timeout.
        let r = unsafe { ffi::rados_connect(conn.handle) };
        check(
            r,
            &format!(
                "connecting to {} as client.{}",
                monitors.join(","),
                creds.user
            ),
        )
        .map_err(|e| match e {
            Error::PermissionDenied(m) => {
                Error::PermissionDenied(format!("{m} (check userID and userKey in the Secret)"))
            }
            e => e,
        })?;
        Ok(conn)
    }

    /// The id of pool `name`.
    pub fn pool_id(&self, name: &str) -> Result<i64> {
        let n = cstr(name)?;
        // SAFETY: live handle, string outlives the call.
        let id = unsafe { ffi::rados_pool_lookup(self.handle, n.as_ptr()) };
        if id == -i64::from(libc::ENOENT) {
            return Err(Error::NotFound(format!("pool {name:?} does not exist")));
        }
        check(
            i32::try_from(id.min(0)).unwrap_or(-libc::EIO),
            "looking up a pool",
        )?;
        Ok(id)
    }

    /// An I/O context on pool `pool` (and RADOS namespace `ns`).
    pub fn ioctx(self: &Arc<Self>, pool: i64, ns: Option<&str>) -> Result<IoCtx> {
        let mut ctx: rados_ioctx_t = ptr::null_mut();
        // SAFETY: live handle, ctx is an out pointer.
        let r = unsafe { ffi::rados_ioctx_create2(self.handle, pool, &mut ctx) };
        check(r, &format!("opening pool {pool}"))?;
        let io = IoCtx {
            ctx,
            _conn: self.clone(),
        };
        if let Some(ns) = ns.filter(|n| !n.is_empty()) {
            let n = cstr(ns)?;
            // SAFETY: live ioctx, string outlives the call (librados copies it).
            unsafe { ffi::rados_ioctx_set_namespace(io.ctx, n.as_ptr()) };
        }
        Ok(io)
    }

    /// Runs a mon command (JSON); returns its output buffer and status text.
    pub fn mon_command(&self, cmd: &str) -> Result<(String, String)> {
        self.command(cmd, "mon", ffi::rados_mon_command)
    }

    /// Runs a mgr command (JSON, e.g. `fs subvolume create`); returns its
    /// output buffer and status text. Only on a connection without op
    /// timeouts: librados 16.2 returns from a timed-out mgr command while the
    /// command stays registered, and the late reply is written into the
    /// freed call frame (a segfault, seen with a stopped MDS). Callers bound
    /// the wait themselves and abandon the blocked thread instead.
    pub fn mgr_command(&self, cmd: &str) -> Result<(String, String)> {
        self.command(cmd, "mgr", ffi::rados_mgr_command)
    }

    fn command(&self, cmd: &str, to: &str, call: CommandFn) -> Result<(String, String)> {
        let c = cstr(cmd)?;
        let cmds = [c.as_ptr()];
        let (mut outbuf, mut outbuf_len): (*mut c_char, usize) = (ptr::null_mut(), 0);
        let (mut outs, mut outs_len): (*mut c_char, usize) = (ptr::null_mut(), 0);
        // SAFETY: one command string; librados allocates the outputs, which
        // are copied and released with rados_buffer_free below.
        let r = unsafe {
            call(
                self.handle,
                cmds.as_ptr() as *mut *const c_char,
                1,
                ptr::null(),
                0,
                &mut outbuf,
                &mut outbuf_len,
                &mut outs,
                &mut outs_len,
            )
        };
        let take = |p: *mut c_char, len: usize| -> String {
            if p.is_null() {
                return String::new();
            }
            // SAFETY: librados returned `len` valid bytes at `p`.
            let s = unsafe { std::slice::from_raw_parts(p as *const u8, len) };
            let s = String::from_utf8_lossy(s).into_owned();
            // SAFETY: p was allocated by librados.
            unsafe { ffi::rados_buffer_free(p) };
            s
        };
        let (out, status) = (take(outbuf, outbuf_len), take(outs, outs_len));
        check(r, &format!("{to} command {cmd}: {status}"))?;
        Ok((out, status))
    }
}

/// The signature librados's mon and mgr command calls share.
type CommandFn = unsafe extern "C" fn(
    rados_t,
    *mut *const c_char,
    usize,
    *const c_char,
    usize,
    *mut *mut c_char,
    *mut usize,
    *mut *mut c_char,
    *mut usize,
) -> i32;

/// One omap key and its value.
type Entry = (String, Vec<u8>);

/// Keys read per omap listing call.
const PAGE: u64 = 1024;

/// An I/O context on one pool; keeps its connection alive.
pub struct IoCtx {
    ctx: rados_ioctx_t,
    _conn: Arc<Connection>,
}

// SAFETY: an ioctx may be used from several threads for independent ops.
unsafe impl Send for IoCtx {}
// SAFETY: as above; no method mutates shared Rust state.
unsafe impl Sync for IoCtx {}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create2, destroyed once.
        unsafe { ffi::rados_ioctx_destroy(self.ctx) }
    }
}

impl IoCtx {
    /// The raw context, for librbd.
    pub fn raw(&self) -> rados_ioctx_t {
        self.ctx
    }

    /// Runs a read op on `oid` whose one step, set up by `step`, fills an
    /// omap iterator; returns the key/values (None: no such object).
    fn read_omap(
        &self,
        oid: &str,
        step: impl FnOnce(ffi::ReadOpT, *mut ffi::OmapIterT, *mut i32),
    ) -> Result<Option<Vec<Entry>>> {
        let o = cstr(oid)?;
        let mut out = Vec::new();
        // SAFETY: the op and iterator are released on every path; every
        // pointer `step` captured outlives the operate call.
        unsafe {
            let op = ffi::rados_create_read_op();
            let mut iter: ffi::OmapIterT = ptr::null_mut();
            let mut rval: i32 = 0;
            step(op, &mut iter, &mut rval);
            let r = ffi::rados_read_op_operate(op, self.ctx, o.as_ptr(), 0);
            if r == -libc::ENOENT {
                ffi::rados_release_read_op(op);
                return Ok(None);
            }
            if r < 0 || rval < 0 {
                ffi::rados_release_read_op(op);
                check(
                    if r < 0 { r } else { rval },
                    &format!("reading omap of {oid}"),
                )?;
            }
            loop {
                let (mut k, mut v, mut len): (*mut c_char, *mut c_char, usize) =
                    (ptr::null_mut(), ptr::null_mut(), 0);
                if ffi::rados_omap_get_next(iter, &mut k, &mut v, &mut len) < 0 || k.is_null() {
                    break;
                }
                let key = CStr::from_ptr(k).to_string_lossy().into_owned();
                let val = if v.is_null() {
                    Vec::new()
                } else {
                    std::slice::from_raw_parts(v as *const u8, len).to_vec()
                };
                out.push((key, val));
            }
            ffi::rados_omap_get_end(iter);
            ffi::rados_release_read_op(op);
        }
        Ok(Some(out))
    }

    /// The values of `keys` in the omap of object `oid` (missing keys are
    /// absent; a missing object is an empty map).
    pub fn omap_get(&self, oid: &str, keys: &[&str]) -> Result<BTreeMap<String, Vec<u8>>> {
        let ks: Vec<CString> = keys.iter().map(|k| cstr(k)).collect::<Result<_>>()?;
        let kp: Vec<*const c_char> = ks.iter().map(|k| k.as_ptr()).collect();
        let found = self.read_omap(oid, |op, iter, rval| {
            // SAFETY: kp and the strings it points to outlive the read.
            unsafe {
                ffi::rados_read_op_omap_get_vals_by_keys(op, kp.as_ptr(), kp.len(), iter, rval)
            }
        })?;
        Ok(found.unwrap_or_default().into_iter().collect())
    }

    /// Sets key/values in the omap of `oid` (creating the object), and
    /// removes `remove`, atomically.
    pub fn omap_update(&self, oid: &str, set: &[(&str, &[u8])], remove: &[&str]) -> Result<()> {
        let o = cstr(oid)?;
        let ks: Vec<CString> = set.iter().map(|(k, _)| cstr(k)).collect::<Result<_>>()?;
        let kp: Vec<*const c_char> = ks.iter().map(|k| k.as_ptr()).collect();
        let vp: Vec<*const c_char> = set
            .iter()
            .map(|(_, v)| v.as_ptr() as *const c_char)
            .collect();
        let lens: Vec<usize> = set.iter().map(|(_, v)| v.len()).collect();
        let rs: Vec<CString> = remove.iter().map(|k| cstr(k)).collect::<Result<_>>()?;
        let rp: Vec<*const c_char> = rs.iter().map(|k| k.as_ptr()).collect();
        // SAFETY: a write op built from slices that outlive the operate call.
        let r = unsafe {
            let op = ffi::rados_create_write_op();
            ffi::rados_write_op_create(op, 0, ptr::null());
            if !set.is_empty() {
                ffi::rados_write_op_omap_set(op, kp.as_ptr(), vp.as_ptr(), lens.as_ptr(), kp.len());
            }
            if !remove.is_empty() {
                ffi::rados_write_op_omap_rm_keys(op, rp.as_ptr(), rp.len());
            }
            let r = ffi::rados_write_op_operate(op, self.ctx, o.as_ptr(), ptr::null_mut(), 0);
            ffi::rados_release_write_op(op);
            r
        };
        check(r, &format!("writing omap of {oid}")).map(drop)
    }

    /// Every key/value in the omap of `oid` (a missing object is empty).
    pub fn omap_all(&self, oid: &str) -> Result<BTreeMap<String, Vec<u8>>> {
        let mut out = BTreeMap::new();
        let mut after = String::new();
        loop {
            let a = cstr(&after)?;
            let page = self.read_omap(oid, |op, iter, rval| {
                // SAFETY: `a` outlives the read.
                unsafe {
                    ffi::rados_read_op_omap_get_vals(op, a.as_ptr(), ptr::null(), PAGE, iter, rval)
                }
            })?;
            let Some(page) = page else { return Ok(out) };
            let full = page.len() as u64 >= PAGE;
            if let Some((k, _)) = page.last() {
                after.clone_from(k);
            }
            out.extend(page);
            if !full {
                return Ok(out);
            }
        }
    }

    /// Removes object `oid`; success when it does not exist.
    pub fn remove(&self, oid: &str) -> Result<()> {
        let o = cstr(oid)?;
        // SAFETY: live ioctx, string outlives the call.
        let r = unsafe { ffi::rados_remove(self.ctx, o.as_ptr()) };
        if r == -libc::ENOENT {
            return Ok(());
        }
        check(r, &format!("removing {oid}")).map(drop)
    }
}
