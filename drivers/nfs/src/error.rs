//! Errors specific to the NFS driver, and their gRPC meaning.

use csi_core::Error as CoreError;
use std::time::Duration;

/// What can go wrong in the NFS driver before a generic error applies.
#[derive(Debug, thiserror::Error)]
pub enum NfsError {
    /// A StorageClass parameter this driver does not know.
    #[error(
        "unknown parameter {0:?}; nfs.rcsi.io accepts: server, share, subDir, onDelete (delete|retain|archive), mountPermissions, mountOptions, nfsvers"
    )]
    UnknownParameter(String),
    /// A required parameter is missing.
    #[error("parameter {0:?} is required")]
    MissingParameter(&'static str),
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
    /// A raw block capability: NFS volumes are directories.
    #[error("NFS volumes are directories; raw block access is not supported")]
    Block,
    /// The id is longer than CSI allows once server, share and sub-directory are in it.
    #[error(
        "the volume id for {0:?} would exceed 128 bytes; use a shorter subDir template, share or server name"
    )]
    IdTooLong(String),
    /// A volume id of the right shape that the share does not know.
    #[error("volume {0:?} does not exist")]
    NoSuchVolume(String),
    /// A snapshot id of the right shape that the share does not know.
    #[error("snapshot {0:?} does not exist")]
    NoSuchSnapshot(String),
    /// An NFS server did not answer in time.
    #[error("NFS server {server} did not answer {what} within {timeout:?}")]
    Timeout {
        /// Server address.
        server: String,
        /// The call.
        what: String,
        /// The bound.
        timeout: Duration,
    },
    /// An NFS server could not be reached.
    #[error("cannot reach NFS server {server} for {what}: {why}")]
    Unreachable {
        /// Server address.
        server: String,
        /// The call.
        what: String,
        /// The transport error.
        why: String,
    },
    /// An NFS call failed with a status.
    #[error("NFS {what} failed: {status}")]
    Status {
        /// The call and its object.
        what: String,
        /// NFSv3 status name.
        status: String,
        /// The status as errno-like number.
        code: u32,
    },
    /// A stored record cannot be read.
    #[error("record {path:?} on {share} is damaged: {why}")]
    BadRecord {
        /// `server:/share`.
        share: String,
        /// Path in the share.
        path: String,
        /// What is wrong.
        why: String,
    },
}

impl NfsError {
    /// The NFSv3 status code, when this is a status error.
    pub fn status(&self) -> Option<u32> {
        match self {
            NfsError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// NFSv3 status numbers this driver reacts to.
pub mod nfsstat {
    /// No such file or directory.
    pub const NOENT: u32 = 2;
    /// Permission denied.
    pub const ACCES: u32 = 13;
    /// Not owner.
    pub const PERM: u32 = 1;
    /// File exists.
    pub const EXIST: u32 = 17;
    /// Not a directory.
    pub const NOTDIR: u32 = 20;
    /// No space left.
    pub const NOSPC: u32 = 28;
    /// Quota exceeded.
    pub const DQUOT: u32 = 69;
    /// Stale file handle.
    pub const STALE: u32 = 70;
    /// Bad file handle.
    pub const BADHANDLE: u32 = 10001;
    /// Server busy, try later.
    pub const JUKEBOX: u32 = 10008;
}

impl From<NfsError> for CoreError {
    fn from(e: NfsError) -> Self {
        use NfsError::*;
        let msg = e.to_string();
        match e {
            UnknownParameter(_)
            | MissingParameter(_)
            | BadParameter { .. }
            | Block
            | IdTooLong(_) => CoreError::InvalidArgument(msg),
            NoSuchVolume(_) | NoSuchSnapshot(_) => CoreError::NotFound(msg),
            Timeout { .. } => CoreError::DeadlineExceeded(msg),
            Unreachable { .. } => CoreError::Unavailable(msg),
            Status { code, .. } => match code {
                nfsstat::NOSPC | nfsstat::DQUOT => CoreError::ResourceExhausted(msg),
                nfsstat::ACCES | nfsstat::PERM => CoreError::FailedPrecondition(format!(
                    "{msg}; the export must allow root access (no_root_squash) from the controller"
                )),
                nfsstat::JUKEBOX => CoreError::Unavailable(msg),
                _ => CoreError::Internal(msg),
            },
            BadRecord { .. } => CoreError::Internal(msg),
        }
    }
}
