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
    /// A call that needs cephx credentials came without a Secret.
    #[error(
        "{call} needs the {kind} secret (userID, userKey); name it in the StorageClass (csi.storage.k8s.io/{kind}-secret-name and -namespace)"
    )]
    NoSecret {
        /// The RPC.
        call: &'static str,
        /// Which secret (provisioner, node-stage, controller-expand, ...).
        kind: &'static str,
    },
    /// A StorageClass parameter with a value that cannot be used.
    #[error("parameter {key:?}: {why}")]
    BadParameter {
        /// The parameter.
        key: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A parameter this driver does not know.
    #[error("unknown parameter {key:?} (known: {known})")]
    UnknownParameter {
        /// The parameter.
        key: String,
        /// The parameters the driver knows.
        known: &'static str,
    },
    /// A ceph-csi parameter asking for what this driver does not do.
    #[error(
        "parameter {0:?} asks for a feature rcsi does not provide; remove it or set it to \"false\""
    )]
    UnsupportedParameter(String),
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
            CephError::UnknownCluster(..)
            | CephError::MissingKey(_)
            | CephError::BadKey { .. }
            | CephError::NoSecret { .. }
            | CephError::BadParameter { .. }
            | CephError::UnknownParameter { .. }
            | CephError::UnsupportedParameter(_) => CoreError::InvalidArgument(msg),
        }
    }
}
