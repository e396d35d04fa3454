//! Errors of the Ceph layer, and their gRPC meaning.

use csi_core::Error as CoreError;

/// What can go wrong before a generic error applies. Messages never carry
/// a key.
#[derive(Debug, thiserror::Error)]
pub enum CephError {
    /// The cluster map file cannot be read or parsed.
    #[error("the Ceph cluster map {path}: {why}")]
    Config {
        /// The file (`--ceph-config`).
        path: String,
        /// What is wrong.
        why: String,
    },
    /// A `clusterID` the cluster map does not hold.
    #[error("clusterID {0:?} is not in the Ceph cluster map (--ceph-config); known: {1}")]
    UnknownCluster(String, String),
    /// The call's Secret lacks a key.
    #[error("the Secret has no {0:?} key (required: userID, userKey)")]
    MissingKey(&'static str),
    /// A Secret key with a value that cannot be used.
    #[error("Secret key {key:?} is invalid: {why}")]
    BadKey {
        /// The key.
        key: &'static str,
        /// What is wrong (never the value).
        why: String,
    },
}

impl From<CephError> for CoreError {
    fn from(e: CephError) -> Self {
        let msg = e.to_string();
        match e {
            CephError::Config { .. } => CoreError::FailedPrecondition(msg),
            CephError::UnknownCluster(..) | CephError::MissingKey(_) | CephError::BadKey { .. } => {
                CoreError::InvalidArgument(msg)
            }
        }
    }
}
