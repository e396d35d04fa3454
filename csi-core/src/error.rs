//! The core error type and its one mapping to gRPC status codes.

use tonic::{Code, Status};

/// Every failure a CSI call can report; each variant maps to one gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required field is missing or a field has a value the plugin rejects.
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume, snapshot or path named in the request does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The name exists with attributes incompatible with this request.
    #[error("{0}")]
    AlreadyExists(String),
    /// Another operation on the same volume, name or path is in flight.
    #[error("{0}")]
    Aborted(String),
    /// The requested size cannot be met by this backend.
    #[error("{0}")]
    OutOfRange(String),
    /// Not enough space (or volumes) left to satisfy the request.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The volume is not in a state that allows this call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The call is not supported by this driver.
    #[error("{0}")]
    Unimplemented(String),
    /// A backend could not be reached.
    #[error("{0}")]
    Unavailable(String),
    /// A backend refused the credentials the request carried.
    #[error("{0}")]
    PermissionDenied(String),
    /// An external command or backend call ran out of time.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying OS error.
        source: std::io::Error,
    },
    /// Anything else that went wrong inside the plugin.
    #[error("{0}")]
    Internal(String),
}

/// Result type used throughout rcsi.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The gRPC code this error maps to: the single table for all drivers.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::Aborted(_) => Code::Aborted,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Unavailable(_) => Code::Unavailable,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) => Code::ResourceExhausted,
                Some(libc::ENOENT) => Code::NotFound,
                _ => Code::Internal,
            },
            Error::Internal(_) => Code::Internal,
        }
    }

    /// A copy of this error with the same code and message (for answering
    /// every caller of one failed batch).
    pub fn duplicate(&self) -> Self {
        match self {
            Error::InvalidArgument(m) => Error::InvalidArgument(m.clone()),
            Error::NotFound(m) => Error::NotFound(m.clone()),
            Error::AlreadyExists(m) => Error::AlreadyExists(m.clone()),
            Error::Aborted(m) => Error::Aborted(m.clone()),
            Error::OutOfRange(m) => Error::OutOfRange(m.clone()),
            Error::ResourceExhausted(m) => Error::ResourceExhausted(m.clone()),
            Error::FailedPrecondition(m) => Error::FailedPrecondition(m.clone()),
            Error::Unimplemented(m) => Error::Unimplemented(m.clone()),
            Error::Unavailable(m) => Error::Unavailable(m.clone()),
            Error::PermissionDenied(m) => Error::PermissionDenied(m.clone()),
            Error::DeadlineExceeded(m) => Error::DeadlineExceeded(m.clone()),
            Error::Io { context, source } => Error::Io {
                context: context.clone(),
                source: match source.raw_os_error() {
                    Some(code) => std::io::Error::from_raw_os_error(code),
                    None => std::io::Error::new(source.kind(), source.to_string()),
                },
            },
            Error::Internal(m) => Error::Internal(m.clone()),
        }
    }

    /// Wraps an OS error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

/// Adds context to `std::io::Result`s.
pub trait IoContext<T> {
    /// Turns an OS error into [`Error::Io`] with a description.
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}

/// Shorthand constructors used by validation code.
#[macro_export]
macro_rules! invalid {
    ($($t:tt)*) => { $crate::Error::InvalidArgument(format!($($t)*)) };
}
