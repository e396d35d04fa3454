//! Errors specific to the local-path driver, and their gRPC meaning.

use csi_core::Error as CoreError;

/// What can go wrong in local-path before a generic error applies.
#[derive(Debug, thiserror::Error)]
pub enum LocalPathError {
    /// A StorageClass parameter this driver does not know.
    #[error(
        "unknown parameter {0:?}; local.rcsi.io accepts: backing (directory|file), mode (octal, e.g. 0770)"
    )]
    UnknownParameter(String),
    /// A parameter with a value this driver cannot use.
    #[error("parameter {key}={value:?} is invalid: {why}")]
    BadParameter {
        /// Parameter name.
        key: String,
        /// Given value.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A multi-node access mode on node-local storage.
    #[error("access mode {0:?} needs storage shared between nodes; local volumes live on one node")]
    MultiNode(csi_core::types::AccessMode),
    /// Block and mount capabilities in one request.
    #[error("a volume cannot be both a raw block device and a mounted filesystem")]
    MixedAccess,
    /// A filesystem type that directory volumes cannot honour.
    #[error(
        "fsType {requested:?} was requested but directory volumes use the base filesystem ({base}); set parameter backing=file to get a dedicated {requested} filesystem"
    )]
    FsMismatch {
        /// Requested type.
        requested: String,
        /// Type of the base path.
        base: String,
    },
    /// The CO asked for topology that excludes this node.
    #[error(
        "volumes of this driver instance can only be created on node {0:?}, which the requisite topology excludes"
    )]
    WrongNode(String),
    /// A volume id of the right shape that this driver does not know.
    #[error("volume {0:?} does not exist")]
    NoSuchVolume(String),
    /// A snapshot id of the right shape that this driver does not know.
    #[error("snapshot {0:?} does not exist")]
    NoSuchSnapshot(String),
}

impl From<LocalPathError> for CoreError {
    fn from(e: LocalPathError) -> Self {
        use LocalPathError::*;
        let msg = e.to_string();
        match e {
            UnknownParameter(_)
            | BadParameter { .. }
            | MultiNode(_)
            | MixedAccess
            | FsMismatch { .. } => CoreError::InvalidArgument(msg),
            WrongNode(_) => CoreError::ResourceExhausted(msg),
            NoSuchVolume(_) | NoSuchSnapshot(_) => CoreError::NotFound(msg),
        }
    }
}
