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
}

impl From<JuicefsError> for CoreError {
    fn from(e: JuicefsError) -> Self {
        use JuicefsError::*;
        let msg = e.to_string();
        match e {
            MissingKey(_) | UnknownKey(_) | BadKey { .. } => CoreError::InvalidArgument(msg),
            Metadata { .. } | Format { .. } => CoreError::Unavailable(msg),
            OtherFilesystem { .. } => CoreError::FailedPrecondition(msg),
        }
    }
}
