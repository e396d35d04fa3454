//! The provisioner's error type and how each kind is retried.

use std::fmt;

/// Everything a reconcile can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API failed or refused a request.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The CSI driver failed a call.
    #[error("{call} failed: {status}")]
    Csi {
        /// The CSI call, e.g. `CreateVolume`.
        call: &'static str,
        /// What the driver answered.
        status: CsiStatus,
    },
    /// An object is wrong in a way only its owner can fix (bad parameter, bad template).
    #[error("{0}")]
    Invalid(String),
    /// Something the object needs does not exist or is not ready yet.
    #[error("{0}")]
    Waiting(String),
    /// Leader election failed or leadership was lost.
    #[error("leader election: {0}")]
    Lease(String),
}

/// A gRPC status with a short, log-friendly display (code and message only).
#[derive(Debug, Clone)]
pub struct CsiStatus(pub tonic::Status);

impl fmt::Display for CsiStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.0.code(), self.0.message())
    }
}

impl Error {
    /// Wraps a driver's answer to `call`.
    pub fn csi(call: &'static str, status: tonic::Status) -> Self {
        Error::Csi {
            call,
            status: CsiStatus(status),
        }
    }

    /// The gRPC code of a driver error, if this is one.
    pub fn csi_code(&self) -> Option<tonic::Code> {
        match self {
            Error::Csi { status, .. } => Some(status.0.code()),
            _ => None,
        }
    }

    /// True when the driver's answer means nothing was done and repeating the same
    /// call cannot succeed (the CSI spec's "final" errors).
    pub fn is_final_csi(&self) -> bool {
        use tonic::Code::*;
        matches!(
            self.csi_code(),
            Some(
                InvalidArgument
                    | NotFound
                    | AlreadyExists
                    | PermissionDenied
                    | FailedPrecondition
                    | OutOfRange
                    | Unimplemented
                    | Unauthenticated
                    | ResourceExhausted
            )
        )
    }
}

/// Short for `std::result::Result<T, Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// True when a Kubernetes error is a 404.
pub fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}

/// True when a Kubernetes error is a 409 AlreadyExists.
pub fn already_exists(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_already_exists())
}

/// True when a Kubernetes error is a 409 Conflict (stale resourceVersion).
pub fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_conflict())
}
