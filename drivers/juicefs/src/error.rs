//! Errors specific to the JuiceFS driver, and their gRPC meaning.

use csi_core::Error as CoreError;

/// What can go wrong before a generic error applies. Messages name the
/// Secret key to fix and never carry a secret's value.
#[derive(Debug, thiserror::Error)]
pub enum JuicefsError {
    /// A required Secret key is missing or empty.
    #[error("the filesystem Secret has no {0:?} key (required: name, metaurl, storage, bucket)")]
    MissingKey(&'static str),
    /// A Secret key this driver does not know.
    #[error(
        "unknown key {0:?} in the filesystem Secret; accepted: name, metaurl, storage, bucket, access-key, secret-key, format-options, mount-options"
    )]
    UnknownKey(String),
    /// A Secret key with a value the driver cannot use.
    #[error("Secret key {key:?} is invalid: {why}")]
    BadKey {
        /// The key.
        key: &'static str,
        /// What is wrong (never the value of a secret).
        why: String,
    },
    /// The metadata engine cannot be reached or read.
    #[error("cannot use the metadata engine of Secret key \"metaurl\" ({url}): {why}")]
    Metadata {
        /// The URL without its password.
        url: String,
        /// The error juicefs reported.
        why: String,
    },
    /// Formatting failed, most often because the bucket is unreachable.
    #[error("cannot format {name:?} with the Secret keys \"storage\" and \"bucket\": {why}")]
    Format {
        /// The filesystem name.
        name: String,
        /// The error juicefs reported.
        why: String,
    },
    /// The metadata engine holds another filesystem than the Secret names.
    #[error(
        "the metadata engine of Secret key \"metaurl\" holds filesystem {found:?}, not {wanted:?} (Secret key \"name\"); it is never reformatted"
    )]
    OtherFilesystem {
        /// Name in the Secret.
        wanted: String,
        /// Name found in the metadata.
        found: String,
    },
    /// A StorageClass parameter with a value the driver cannot use.
    #[error("StorageClass parameter {key:?} is invalid: {why}")]
    BadParameter {
        /// The parameter.
        key: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A StorageClass parameter this driver does not know.
    #[error("unknown StorageClass parameter {0:?}; accepted: pathPattern, onDelete, mountOptions")]
    UnknownParameter(String),
    /// A volume directory that would leave the filesystem or hit a reserved name.
    #[error("the directory {path:?} (from {from}) cannot be a volume: {why}")]
    BadPath {
        /// Where the path came from (pathPattern, the volume name, the volume context).
        from: &'static str,
        /// The path.
        path: String,
        /// What is wrong.
        why: String,
    },
    /// The call carried no filesystem Secret.
    #[error(
        "{call} needs the filesystem Secret; set csi.storage.k8s.io/{kind}-secret-name and -namespace in the StorageClass (or the secret reference in a static PV)"
    )]
    NoSecret {
        /// The CSI call.
        call: &'static str,
        /// The external-provisioner / kubelet secret kind, e.g. provisioner, node-publish.
        kind: &'static str,
    },
    /// The Secret describes another filesystem than the volume is on.
    #[error("volume {volume} is on filesystem {on:?}, but the Secret describes {secret:?}")]
    WrongFilesystem {
        /// The volume id.
        volume: String,
        /// Filesystem named in the id.
        on: String,
        /// Filesystem named in the Secret.
        secret: String,
    },
}

impl From<JuicefsError> for CoreError {
    fn from(e: JuicefsError) -> Self {
        use JuicefsError::*;
        let msg = e.to_string();
        match e {
            MissingKey(_)
            | UnknownKey(_)
            | BadKey { .. }
            | BadParameter { .. }
            | UnknownParameter(_)
            | BadPath { .. }
            | NoSecret { .. }
            | WrongFilesystem { .. } => CoreError::InvalidArgument(msg),
            Metadata { .. } | Format { .. } => CoreError::Unavailable(msg),
            OtherFilesystem { .. } => CoreError::FailedPrecondition(msg),
        }
    }
}
