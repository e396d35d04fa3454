//! librados and librbd, opened with `dlopen` on first use instead of linked:
//! a plugin serving local-path, NFS or JuiceFS neither loads the Ceph
//! libraries (about 17 MB of resident pages and their C++ start-up) nor
//! needs them installed. Declared by hand (no bindgen: CI has no libclang).

use csi_core::Result;
use std::ffi::{CStr, c_void};
use std::os::raw::{c_char, c_int};

/// A connected cluster (`rados_t`).
pub type RadosT = *mut c_void;
/// An I/O context on one pool (`rados_ioctx_t`).
pub type IoctxT = *mut c_void;
/// An omap listing's iterator (`rados_omap_iter_t`).
pub type OmapIterT = *mut c_void;
/// A compound read (`rados_read_op_t`).
pub type ReadOpT = *mut c_void;
/// A compound write (`rados_write_op_t`).
pub type WriteOpT = *mut c_void;

/// Opens `soname` once; the handle is never closed.
pub(crate) fn open(soname: &CStr) -> std::result::Result<*mut c_void, String> {
    // SAFETY: a NUL-terminated name; dlerror is read on the same thread.
    let h = unsafe { libc::dlopen(soname.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        return Err(format!(
            "cannot load {}: {}",
            soname.to_string_lossy(),
            dl_error()
        ));
    }
    Ok(h)
}

/// The address of `name` in the library `h`.
pub(crate) fn symbol(
    h: *mut c_void,
    soname: &CStr,
    name: &CStr,
) -> std::result::Result<*mut c_void, String> {
    // SAFETY: a live handle from dlopen and a NUL-terminated name.
    let p = unsafe { libc::dlsym(h, name.as_ptr()) };
    if p.is_null() {
        return Err(format!(
            "{} has no {}: {}",
            soname.to_string_lossy(),
            name.to_string_lossy(),
            dl_error()
        ));
    }
    Ok(p)
}

fn dl_error() -> String {
    // SAFETY: dlerror returns NULL or a thread-local NUL-terminated string.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        return "unknown error".into();
    }
    // SAFETY: checked non-NULL above.
    unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
}

/// Declares a library's functions as a table resolved on first use, and a
/// function of the same name and signature for each that calls through it.
macro_rules! dynamic_library {
    ($(#[$meta:meta])* $lib:ident, $soname:literal, $package:literal {
        $(fn $f:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)?;)*
    }) => {
        $(#[$meta])*
        pub(crate) struct $lib {
            $($f: unsafe extern "C" fn($($t),*) $(-> $r)?,)*
        }

        impl $lib {
            /// The library, loaded and resolved once; the error names the
            /// package that provides it.
            pub(crate) fn get() -> csi_core::Result<&'static $lib> {
                static LIB: std::sync::OnceLock<std::result::Result<$lib, String>> =
                    std::sync::OnceLock::new();
                LIB.get_or_init(|| {
                    let so = $soname;
                    let h = $crate::ffi::open(so)?;
                    Ok($lib {
                        $($f: {
                            let name = std::ffi::CStr::from_bytes_with_nul(
                                concat!(stringify!($f), "\0").as_bytes(),
                            )
                            .map_err(|e| e.to_string())?;
                            let p = $crate::ffi::symbol(h, so, name)?;
                            // SAFETY: the symbol is this C function, declared
                            // with the signature of the library's header.
                            unsafe {
                                std::mem::transmute::<
                                    *mut std::ffi::c_void,
                                    unsafe extern "C" fn($($t),*) $(-> $r)?,
                                >(p)
                            }
                        },)*
                    })
                })
                .as_ref()
                .map_err(|e| csi_core::Error::FailedPrecondition(format!(
                    "{e} (install {})", $package
                )))
            }
        }

        $(
            #[doc = concat!("`", stringify!($f), "` of ", $package, ".")]
            ///
            /// # Safety
            /// As the C function's; the library must load (checked at start-up).
            pub(crate) unsafe extern "C" fn $f($($a: $t),*) $(-> $r)? {
                match $lib::get() {
                    // SAFETY: the caller upholds the C function's contract.
                    Ok(lib) => unsafe { (lib.$f)($($a),*) },
                    Err(e) => panic!("{e}"),
                }
            }
        )*
    };
}
pub(crate) use dynamic_library;

dynamic_library! {
    /// The librados calls the Ceph layer makes.
    Rados, c"librados.so.2", "librados2" {
        fn rados_create(cluster: *mut RadosT, id: *const c_char) -> c_int;
        fn rados_conf_set(cluster: RadosT, option: *const c_char, value: *const c_char) -> c_int;
        fn rados_connect(cluster: RadosT) -> c_int;
        fn rados_shutdown(cluster: RadosT);
        fn rados_pool_lookup(cluster: RadosT, pool_name: *const c_char) -> i64;
        fn rados_ioctx_create2(cluster: RadosT, pool_id: i64, ioctx: *mut IoctxT) -> c_int;
        fn rados_ioctx_destroy(io: IoctxT);
        fn rados_ioctx_set_namespace(io: IoctxT, nspace: *const c_char);
        fn rados_mon_command(
            cluster: RadosT,
            cmd: *mut *const c_char,
            cmdlen: usize,
            inbuf: *const c_char,
            inbuflen: usize,
            outbuf: *mut *mut c_char,
            outbuflen: *mut usize,
            outs: *mut *mut c_char,
            outslen: *mut usize,
        ) -> c_int;
        fn rados_mgr_command(
            cluster: RadosT,
            cmd: *mut *const c_char,
            cmdlen: usize,
            inbuf: *const c_char,
            inbuflen: usize,
            outbuf: *mut *mut c_char,
            outbuflen: *mut usize,
            outs: *mut *mut c_char,
            outslen: *mut usize,
        ) -> c_int;
        fn rados_buffer_free(buf: *mut c_char);
        fn rados_create_read_op() -> ReadOpT;
        fn rados_release_read_op(op: ReadOpT);
        fn rados_read_op_omap_get_vals(
            op: ReadOpT,
            start_after: *const c_char,
            filter_prefix: *const c_char,
            max_return: u64,
            iter: *mut OmapIterT,
            prval: *mut c_int,
        );
        fn rados_read_op_omap_get_vals_by_keys(
            op: ReadOpT,
            keys: *const *const c_char,
            keys_len: usize,
            iter: *mut OmapIterT,
            prval: *mut c_int,
        );
        fn rados_read_op_operate(op: ReadOpT, io: IoctxT, oid: *const c_char, flags: c_int) -> c_int;
        fn rados_omap_get_next(
            iter: OmapIterT,
            key: *mut *mut c_char,
            val: *mut *mut c_char,
            len: *mut usize,
        ) -> c_int;
        fn rados_omap_get_end(iter: OmapIterT);
        fn rados_create_write_op() -> WriteOpT;
        fn rados_release_write_op(op: WriteOpT);
        fn rados_write_op_create(op: WriteOpT, exclusive: c_int, category: *const c_char);
        fn rados_write_op_omap_set(
            op: WriteOpT,
            keys: *const *const c_char,
            vals: *const *const c_char,
            lens: *const usize,
            num: usize,
        );
        fn rados_write_op_omap_rm_keys(op: WriteOpT, keys: *const *const c_char, keys_len: usize);
        fn rados_write_op_operate(
            op: WriteOpT,
            io: IoctxT,
            oid: *const c_char,
            mtime: *mut libc::time_t,
            flags: c_int,
        ) -> c_int;
        fn rados_remove(io: IoctxT, oid: *const c_char) -> c_int;
    }
}

/// Loads librados, and librbd too when `rbd`: a driver calls this at start so
/// a node without them fails there, with the package to install.
pub fn require(rbd: bool) -> Result<()> {
    Rados::get()?;
    if rbd {
        crate::librbd::Rbd::get()?;
    }
    Ok(())
}

#[cfg(test)]
// The test libraries declare functions only some tests call.
#[allow(dead_code)]
mod tests {
    use super::*;
    use csi_core::Error;

    #[test]
    fn a_missing_library_names_its_package() {
        dynamic_library! {
            /// A library that is not installed anywhere.
            Missing, c"librcsi-missing.so.0", "rcsi-missing" {
                fn rcsi_missing(x: c_int) -> c_int;
            }
        }
        let e = Missing::get().err().expect("no such library");
        let msg = e.to_string();
        assert!(matches!(e, Error::FailedPrecondition(_)), "{msg}");
        assert!(msg.contains("librcsi-missing.so.0"), "{msg}");
        assert!(msg.contains("install rcsi-missing"), "{msg}");
    }

    #[test]
    fn a_missing_symbol_is_an_error() {
        dynamic_library! {
            /// libc, asked for a function it does not have.
            Odd, c"libc.so.6", "libc6" {
                fn getpid() -> c_int;
                fn rcsi_no_such_function() -> c_int;
            }
        }
        let msg = Odd::get().err().expect("no such symbol").to_string();
        assert!(msg.contains("rcsi_no_such_function"), "{msg}");
    }

    #[test]
    fn functions_are_called_through_the_table() {
        dynamic_library! {
            /// libc's getpid, as a stand-in for a Ceph library.
            Libc, c"libc.so.6", "libc6" {
                fn getpid() -> c_int;
            }
        }
        // SAFETY: getpid has no preconditions.
        assert_eq!(unsafe { getpid() }, std::process::id() as c_int);
    }
}
