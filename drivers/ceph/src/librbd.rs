//! The librbd calls the RBD driver uses, declared here (no bindgen: CI has
//! no libclang) with safe wrappers. Every call is blocking; callers run them
//! through [`crate::pool::Pool::run`].

use crate::ffi::IoctxT as rados_ioctx_t;
use crate::rados::{IoCtx, check, cstr};
use csi_core::{Error, Result};
use std::marker::PhantomData;
use std::os::raw::{c_char, c_int, c_void};
use std::ptr;

type RbdImage = *mut c_void;
type RbdImageOptions = *mut c_void;
/// The shape of librbd's open calls (by name or id, writable or not).
type OpenFn =
    unsafe extern "C" fn(rados_ioctx_t, *const c_char, *mut RbdImage, *const c_char) -> c_int;

crate::ffi::dynamic_library! {
    /// The librbd calls the RBD driver makes.
    Rbd, c"librbd.so.1", "librbd1" {
        fn rbd_image_options_create(opts: *mut RbdImageOptions);
        fn rbd_image_options_destroy(opts: RbdImageOptions);
        fn rbd_image_options_set_uint64(opts: RbdImageOptions, optname: c_int, val: u64) -> c_int;
        fn rbd_image_options_set_string(
            opts: RbdImageOptions,
            optname: c_int,
            val: *const c_char,
        ) -> c_int;
        fn rbd_create4(
            io: rados_ioctx_t,
            name: *const c_char,
            size: u64,
            opts: RbdImageOptions,
        ) -> c_int;
        fn rbd_open(
            io: rados_ioctx_t,
            name: *const c_char,
            image: *mut RbdImage,
            snap: *const c_char,
        ) -> c_int;
        fn rbd_open_read_only(
            io: rados_ioctx_t,
            name: *const c_char,
            image: *mut RbdImage,
            snap: *const c_char,
        ) -> c_int;
        fn rbd_close(image: RbdImage) -> c_int;
        fn rbd_get_size(image: RbdImage, size: *mut u64) -> c_int;
        fn rbd_get_features(image: RbdImage, features: *mut u64) -> c_int;
        fn rbd_get_id(image: RbdImage, id: *mut c_char, len: usize) -> c_int;
        fn rbd_resize(image: RbdImage, size: u64) -> c_int;
        fn rbd_remove(io: rados_ioctx_t, name: *const c_char) -> c_int;
        fn rbd_trash_move(io: rados_ioctx_t, name: *const c_char, delay: u64) -> c_int;
        fn rbd_trash_remove(io: rados_ioctx_t, id: *const c_char, force: bool) -> c_int;
        fn rbd_open_by_id(
            io: rados_ioctx_t,
            id: *const c_char,
            image: *mut RbdImage,
            snap: *const c_char,
        ) -> c_int;
        fn rbd_snap_list(image: RbdImage, snaps: *mut SnapInfo, max: *mut c_int) -> c_int;
        fn rbd_snap_list_end(snaps: *mut SnapInfo);
        fn rbd_snap_get_namespace_type(image: RbdImage, snap_id: u64, ns: *mut c_int) -> c_int;
        fn rbd_open_by_id_read_only(
            io: rados_ioctx_t,
            id: *const c_char,
            image: *mut RbdImage,
            snap: *const c_char,
        ) -> c_int;
        fn rbd_snap_exists(image: RbdImage, name: *const c_char, exists: *mut bool) -> c_int;
        fn rbd_snap_create(image: RbdImage, name: *const c_char) -> c_int;
        fn rbd_snap_remove(image: RbdImage, name: *const c_char) -> c_int;
        fn rbd_clone3(
            p_io: rados_ioctx_t,
            p_name: *const c_char,
            p_snap: *const c_char,
            c_io: rados_ioctx_t,
            c_name: *const c_char,
            opts: RbdImageOptions,
        ) -> c_int;
        fn rbd_flatten(image: RbdImage) -> c_int;
        fn rbd_get_parent(image: RbdImage, parent: *mut LinkedImageSpec, snap: *mut SnapSpec) -> c_int;
        fn rbd_linked_image_spec_cleanup(spec: *mut LinkedImageSpec);
        fn rbd_snap_spec_cleanup(spec: *mut SnapSpec);
        fn rbd_watchers_list(image: RbdImage, watchers: *mut Watcher, max: *mut usize) -> c_int;
        fn rbd_watchers_list_cleanup(watchers: *mut Watcher, n: usize);
    }
}

/// `rbd_linked_image_spec_t`.
#[repr(C)]
pub(crate) struct LinkedImageSpec {
    pool_id: i64,
    pool_name: *mut c_char,
    pool_namespace: *mut c_char,
    image_id: *mut c_char,
    image_name: *mut c_char,
    trash: bool,
}

/// `rbd_snap_spec_t`.
#[repr(C)]
pub(crate) struct SnapSpec {
    id: u64,
    namespace_type: c_int,
    name: *mut c_char,
}

/// `rbd_snap_info_t`.
#[repr(C)]
pub(crate) struct SnapInfo {
    id: u64,
    size: u64,
    name: *const c_char,
}

/// `rbd_image_watcher_t`.
#[repr(C)]
pub(crate) struct Watcher {
    addr: *mut c_char,
    id: i64,
    cookie: u64,
}

/// A C string librbd returned, copied (empty for NULL).
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string.
unsafe fn owned(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the caller promises a NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned()
}

const OPTION_FEATURES: c_int = 1;
const OPTION_ORDER: c_int = 2;
const OPTION_STRIPE_UNIT: c_int = 3;
const OPTION_STRIPE_COUNT: c_int = 4;
const OPTION_DATA_POOL: c_int = 10;
const OPTION_CLONE_FORMAT: c_int = 12;

/// RBD image features by the names StorageClasses use (`imageFeatures`).
pub const FEATURES: &[(&str, u64)] = &[
    ("layering", 1),
    ("striping", 1 << 1),
    ("exclusive-lock", 1 << 2),
    ("object-map", 1 << 3),
    ("fast-diff", 1 << 4),
    ("deep-flatten", 1 << 5),
    ("journaling", 1 << 6),
    ("data-pool", 1 << 7),
];

/// How a new image is laid out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageSpec {
    /// Feature bits (see [`FEATURES`]).
    pub features: u64,
    /// Object size as a power of two (0: librbd's default, 22 = 4 MiB).
    pub order: u32,
    /// Stripe unit in bytes and stripe count (0: not striped).
    pub stripe: Option<(u64, u64)>,
    /// Pool for the data objects (erasure-coded pools need one).
    pub data_pool: Option<String>,
}

/// Image options built from a spec, destroyed when dropped.
struct Options(RbdImageOptions);

impl Drop for Options {
    fn drop(&mut self) {
        // SAFETY: created by rbd_image_options_create, destroyed once.
        unsafe { rbd_image_options_destroy(self.0) }
    }
}

impl Options {
    /// Options for `spec`; clones use clone format 2 (no protected parent
    /// snapshot, and the parent snapshot may be removed while clones live).
    fn new(spec: &ImageSpec, clone: bool) -> Result<Self> {
        Rbd::get()?;
        let dp = spec.data_pool.as_deref().map(cstr).transpose()?;
        let mut opts: RbdImageOptions = ptr::null_mut();
        // SAFETY: an out pointer; the handle is owned by the returned value.
        unsafe { rbd_image_options_create(&mut opts) };
        let o = Self(opts);
        let u = |k: c_int, v: u64| {
            // SAFETY: a live options handle.
            check(
                unsafe { rbd_image_options_set_uint64(o.0, k, v) },
                "image options",
            )
        };
        u(OPTION_FEATURES, spec.features)?;
        if spec.order > 0 {
            u(OPTION_ORDER, u64::from(spec.order))?;
        }
        if let Some((unit, count)) = spec.stripe {
            u(OPTION_STRIPE_UNIT, unit)?;
            u(OPTION_STRIPE_COUNT, count)?;
        }
        if clone {
            u(OPTION_CLONE_FORMAT, 2)?;
        }
        if let Some(dp) = &dp {
            // SAFETY: a live handle; librbd copies the string.
            let r = unsafe { rbd_image_options_set_string(o.0, OPTION_DATA_POOL, dp.as_ptr()) };
            check(r, "image options")?;
        }
        Ok(o)
    }
}

/// Creates image `name` of `size` bytes.
pub fn create(io: &IoCtx, name: &str, size: u64, spec: &ImageSpec) -> Result<()> {
    let n = cstr(name)?;
    let opts = Options::new(spec, false)?;
    // SAFETY: live ioctx and options; the name outlives the call.
    let r = unsafe { rbd_create4(io.raw(), n.as_ptr(), size, opts.0) };
    check(r, &format!("creating image {name}")).map(drop)
}

/// Clones snapshot `snap` of image `parent` (in `parent_io`) as image
/// `name` in `io`, laid out as `spec` (clone format 2).
pub fn clone(
    parent_io: &IoCtx,
    parent: &str,
    snap: &str,
    io: &IoCtx,
    name: &str,
    spec: &ImageSpec,
) -> Result<()> {
    let (p, s, n) = (cstr(parent)?, cstr(snap)?, cstr(name)?);
    let opts = Options::new(spec, true)?;
    // SAFETY: live contexts and options; the strings outlive the call.
    let r = unsafe {
        rbd_clone3(
            parent_io.raw(),
            p.as_ptr(),
            s.as_ptr(),
            io.raw(),
            n.as_ptr(),
            opts.0,
        )
    };
    check(r, &format!("cloning {parent}@{snap} as {name}")).map(drop)
}

/// The image a clone was made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parent {
    /// Its pool.
    pub pool_id: i64,
    /// Its RADOS namespace ("" for none).
    pub namespace: String,
    /// Its internal id.
    pub image_id: String,
    /// Its name.
    pub image_name: String,
    /// Whether it is in the trash (deleted, kept for its clones).
    pub trash: bool,
}

/// An open image, closed when dropped; it may not outlive its context.
pub struct Image<'a> {
    handle: RbdImage,
    name: String,
    _io: PhantomData<&'a IoCtx>,
}

impl Drop for Image<'_> {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open, closed once.
        unsafe { rbd_close(self.handle) };
    }
}

impl<'a> Image<'a> {
    /// Opens image `name` (NotFound when it does not exist). A writable
    /// open registers a watch, which a killed process leaves behind for a
    /// while: open with [`Image::inspect`] when only reading.
    pub fn open(io: &'a IoCtx, name: &str) -> Result<Self> {
        Self::opened(io, name, name.to_owned(), rbd_open)
    }

    /// Opens image `name` read-only (no watch).
    pub fn inspect(io: &'a IoCtx, name: &str) -> Result<Self> {
        Self::opened(io, name, name.to_owned(), rbd_open_read_only)
    }

    /// Opens the image with internal id `id`, also when it is in the trash.
    pub fn open_by_id(io: &'a IoCtx, id: &str) -> Result<Self> {
        Self::opened(io, id, format!("id {id}"), rbd_open_by_id)
    }

    /// As [`Image::open_by_id`], read-only: it registers no watch, so
    /// [`Image::watchers`] shows only other clients.
    pub fn inspect_by_id(io: &'a IoCtx, id: &str) -> Result<Self> {
        Self::opened(io, id, format!("id {id}"), rbd_open_by_id_read_only)
    }

    /// Opens the image `key` names (a name or an id, as `open` takes it).
    fn opened(io: &'a IoCtx, key: &str, name: String, open: OpenFn) -> Result<Self> {
        Rbd::get()?;
        let k = cstr(key)?;
        let mut handle: RbdImage = ptr::null_mut();
        // SAFETY: handle is an out pointer; the key outlives the call.
        let r = unsafe { open(io.raw(), k.as_ptr(), &mut handle, ptr::null()) };
        check(r, &format!("opening image {name}"))?;
        Ok(Self {
            handle,
            name,
            _io: PhantomData,
        })
    }

    /// Whether snapshot `snap` exists.
    pub fn snap_exists(&self, snap: &str) -> Result<bool> {
        let s = cstr(snap)?;
        let mut exists = false;
        // SAFETY: open image, out pointer, string outlives the call.
        let r = unsafe { rbd_snap_exists(self.handle, s.as_ptr(), &mut exists) };
        check(r, &format!("looking up snapshot {}@{snap}", self.name))?;
        Ok(exists)
    }

    /// Creates snapshot `snap` unless it exists.
    pub fn snap_create(&self, snap: &str) -> Result<()> {
        if self.snap_exists(snap)? {
            return Ok(());
        }
        let s = cstr(snap)?;
        // SAFETY: open image; the name outlives the call.
        let r = unsafe { rbd_snap_create(self.handle, s.as_ptr()) };
        match check(r, &format!("creating snapshot {}@{snap}", self.name)) {
            Err(Error::AlreadyExists(_)) => Ok(()),
            r => r.map(drop),
        }
    }

    /// Removes snapshot `snap`; success when it does not exist. A snapshot
    /// with format-2 clones moves to the trash namespace until they go.
    pub fn snap_remove(&self, snap: &str) -> Result<()> {
        let s = cstr(snap)?;
        // SAFETY: open image; the name outlives the call.
        let r = unsafe { rbd_snap_remove(self.handle, s.as_ptr()) };
        if r == -libc::ENOENT {
            return Ok(());
        }
        check(r, &format!("removing snapshot {}@{snap}", self.name)).map(drop)
    }

    /// Names of the image's user snapshots (not those kept in the trash
    /// namespace for clones).
    pub fn snapshots(&self) -> Result<Vec<String>> {
        let mut max: c_int = 16;
        loop {
            // SAFETY: zeroed entries (NULL names) for librbd to fill; after
            // success rbd_snap_list_end frees the names it allocated.
            let mut snaps: Vec<SnapInfo> =
                (0..max).map(|_| unsafe { std::mem::zeroed() }).collect();
            let mut n = max;
            let r = unsafe { rbd_snap_list(self.handle, snaps.as_mut_ptr(), &mut n) };
            if r == -libc::ERANGE {
                max = n.max(max * 2);
                continue;
            }
            let count = usize::try_from(check(r, &format!("snapshots of image {}", self.name))?)
                .unwrap_or(0);
            let mut out = Vec::new();
            for s in &snaps[..count] {
                let mut ns: c_int = 0;
                // SAFETY: an open image and an out pointer.
                let r = unsafe { rbd_snap_get_namespace_type(self.handle, s.id, &mut ns) };
                check(r, &format!("snapshot namespace on image {}", self.name))?;
                if ns == 0 {
                    // SAFETY: librbd filled this entry's name.
                    out.push(unsafe { owned(s.name) });
                }
            }
            // SAFETY: frees what librbd allocated.
            unsafe { rbd_snap_list_end(snaps.as_mut_ptr()) };
            return Ok(out);
        }
    }

    /// Copies every block of the parent into this clone and detaches it.
    pub fn flatten(&self) -> Result<()> {
        // SAFETY: open image.
        let r = unsafe { rbd_flatten(self.handle) };
        if r == -libc::EINVAL {
            // Not a clone (any more): nothing to do.
            return Ok(());
        }
        check(r, &format!("flattening image {}", self.name)).map(drop)
    }

    /// The image this one was cloned from (None when it is no clone).
    pub fn parent(&self) -> Result<Option<Parent>> {
        // SAFETY: zeroed specs are valid out values (NULL pointers); librbd
        // fills them and the cleanups free what it allocated.
        unsafe {
            let mut image: LinkedImageSpec = std::mem::zeroed();
            let mut snap: SnapSpec = std::mem::zeroed();
            let r = rbd_get_parent(self.handle, &mut image, &mut snap);
            if r == -libc::ENOENT {
                return Ok(None);
            }
            check(r, &format!("parent of image {}", self.name))?;
            let p = Parent {
                pool_id: image.pool_id,
                namespace: owned(image.pool_namespace),
                image_id: owned(image.image_id),
                image_name: owned(image.image_name),
                trash: image.trash,
            };
            rbd_linked_image_spec_cleanup(&mut image);
            rbd_snap_spec_cleanup(&mut snap);
            Ok(Some(p))
        }
    }

    /// Addresses of the clients watching the image (a mapped or open image
    /// has one per client).
    pub fn watchers(&self) -> Result<Vec<String>> {
        let mut max: usize = 8;
        loop {
            // SAFETY: a zeroed array of `max` watchers for librbd to fill;
            // on success the cleanup frees the strings it allocated.
            let mut ws: Vec<Watcher> = (0..max).map(|_| unsafe { std::mem::zeroed() }).collect();
            let mut n = max;
            let r = unsafe { rbd_watchers_list(self.handle, ws.as_mut_ptr(), &mut n) };
            if r == -libc::ERANGE {
                max = n.max(max * 2);
                continue;
            }
            check(r, &format!("watchers of image {}", self.name))?;
            // SAFETY: librbd filled the first `n` entries.
            let out = ws[..n].iter().map(|w| unsafe { owned(w.addr) }).collect();
            // SAFETY: frees what librbd allocated for those entries.
            unsafe { rbd_watchers_list_cleanup(ws.as_mut_ptr(), n) };
            return Ok(out);
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> Result<u64> {
        let mut size = 0;
        // SAFETY: open image, out pointer.
        check(unsafe { rbd_get_size(self.handle, &mut size) }, &self.name)?;
        Ok(size)
    }

    /// Feature bits.
    pub fn features(&self) -> Result<u64> {
        let mut f = 0;
        // SAFETY: open image, out pointer.
        check(unsafe { rbd_get_features(self.handle, &mut f) }, &self.name)?;
        Ok(f)
    }

    /// The image's internal id (what the trash knows it by).
    pub fn id(&self) -> Result<String> {
        let mut buf = [0 as c_char; 64];
        // SAFETY: a buffer of the length given.
        let r = unsafe { rbd_get_id(self.handle, buf.as_mut_ptr(), buf.len()) };
        check(r, &format!("id of image {}", self.name))?;
        // SAFETY: librbd wrote a NUL-terminated id into buf.
        let id = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
        Ok(id.to_string_lossy().into_owned())
    }

    /// Grows (or shrinks) the image to `size` bytes.
    pub fn resize(&self, size: u64) -> Result<()> {
        // SAFETY: open image.
        let r = unsafe { rbd_resize(self.handle, size) };
        check(r, &format!("resizing image {}", self.name)).map(drop)
    }
}

/// Removes image `name` at once, also one a crash left half made;
/// success when it does not exist.
pub fn remove(io: &IoCtx, name: &str) -> Result<()> {
    Rbd::get()?;
    let n = cstr(name)?;
    // SAFETY: the name outlives the call.
    let r = unsafe { rbd_remove(io.raw(), n.as_ptr()) };
    if r == -libc::ENOENT {
        return Ok(());
    }
    check(r, &format!("removing image {name}")).map(drop)
}

/// Moves image `name` to the trash (a cheap rename; it keeps its data).
pub fn trash_move(io: &IoCtx, name: &str) -> Result<()> {
    Rbd::get()?;
    let n = cstr(name)?;
    // SAFETY: the name outlives the call.
    let r = unsafe { rbd_trash_move(io.raw(), n.as_ptr(), 0) };
    check(r, &format!("moving image {name} to the trash")).map(drop)
}

/// Purges the trashed image with internal id `id`; success when it is gone.
pub fn trash_remove(io: &IoCtx, id: &str) -> Result<()> {
    Rbd::get()?;
    let i = cstr(id)?;
    // SAFETY: the id outlives the call.
    let r = unsafe { rbd_trash_remove(io.raw(), i.as_ptr(), true) };
    if r == -libc::ENOENT {
        return Ok(());
    }
    check(r, &format!("purging trashed image {id}")).map(drop)
}
