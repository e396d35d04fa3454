//! The librbd calls the RBD driver uses, declared here (no bindgen: CI has
//! no libclang) with safe wrappers. Every call is blocking; callers run them
//! through [`crate::pool::Pool::run`].

use crate::rados::{IoCtx, check, cstr};
use ceph::rados::rados_ioctx_t;
use csi_core::Result;
use std::os::raw::{c_char, c_int, c_void};
use std::ptr;

type RbdImage = *mut c_void;
type RbdImageOptions = *mut c_void;

#[link(name = "rbd")]
unsafe extern "C" {
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
    fn rbd_close(image: RbdImage) -> c_int;
    fn rbd_get_size(image: RbdImage, size: *mut u64) -> c_int;
    fn rbd_get_features(image: RbdImage, features: *mut u64) -> c_int;
    fn rbd_get_id(image: RbdImage, id: *mut c_char, len: usize) -> c_int;
    fn rbd_resize(image: RbdImage, size: u64) -> c_int;
    fn rbd_trash_move(io: rados_ioctx_t, name: *const c_char, delay: u64) -> c_int;
    fn rbd_trash_remove(io: rados_ioctx_t, id: *const c_char, force: bool) -> c_int;
}

const OPTION_FEATURES: c_int = 1;
const OPTION_ORDER: c_int = 2;
const OPTION_STRIPE_UNIT: c_int = 3;
const OPTION_STRIPE_COUNT: c_int = 4;
const OPTION_DATA_POOL: c_int = 10;

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

/// Creates image `name` of `size` bytes.
pub fn create(io: &IoCtx, name: &str, size: u64, spec: &ImageSpec) -> Result<()> {
    let n = cstr(name)?;
    let dp = spec.data_pool.as_deref().map(cstr).transpose()?;
    // SAFETY: the options handle is created and destroyed here; every
    // string outlives the create call.
    unsafe {
        let mut opts: RbdImageOptions = ptr::null_mut();
        rbd_image_options_create(&mut opts);
        let mut r = rbd_image_options_set_uint64(opts, OPTION_FEATURES, spec.features);
        if r == 0 && spec.order > 0 {
            r = rbd_image_options_set_uint64(opts, OPTION_ORDER, u64::from(spec.order));
        }
        if let (0, Some((unit, count))) = (r, spec.stripe) {
            r = rbd_image_options_set_uint64(opts, OPTION_STRIPE_UNIT, unit);
            if r == 0 {
                r = rbd_image_options_set_uint64(opts, OPTION_STRIPE_COUNT, count);
            }
        }
        if let (0, Some(dp)) = (r, &dp) {
            r = rbd_image_options_set_string(opts, OPTION_DATA_POOL, dp.as_ptr());
        }
        if r == 0 {
            r = rbd_create4(io.raw(), n.as_ptr(), size, opts);
        }
        rbd_image_options_destroy(opts);
        check(r, &format!("creating image {name}")).map(drop)
    }
}

/// An open image, closed when dropped.
pub struct Image {
    handle: RbdImage,
    name: String,
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open, closed once.
        unsafe { rbd_close(self.handle) };
    }
}

impl Image {
    /// Opens image `name` (NotFound when it does not exist).
    pub fn open(io: &IoCtx, name: &str) -> Result<Self> {
        let n = cstr(name)?;
        let mut handle: RbdImage = ptr::null_mut();
        // SAFETY: handle is an out pointer; the name outlives the call.
        let r = unsafe { rbd_open(io.raw(), n.as_ptr(), &mut handle, ptr::null()) };
        check(r, &format!("opening image {name}"))?;
        Ok(Self {
            handle,
            name: name.to_owned(),
        })
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

/// Moves image `name` to the trash (a cheap rename; it keeps its data).
pub fn trash_move(io: &IoCtx, name: &str) -> Result<()> {
    let n = cstr(name)?;
    // SAFETY: the name outlives the call.
    let r = unsafe { rbd_trash_move(io.raw(), n.as_ptr(), 0) };
    check(r, &format!("moving image {name} to the trash")).map(drop)
}

/// Purges the trashed image with internal id `id`; success when it is gone.
pub fn trash_remove(io: &IoCtx, id: &str) -> Result<()> {
    let i = cstr(id)?;
    // SAFETY: the id outlives the call.
    let r = unsafe { rbd_trash_remove(io.raw(), i.as_ptr(), true) };
    if r == -libc::ENOENT {
        return Ok(());
    }
    check(r, &format!("purging trashed image {id}")).map(drop)
}
