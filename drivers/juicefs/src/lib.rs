//! `juicefs.rcsi.io`: volumes are quota-limited sub-directories of JuiceFS
//! filesystems described by Secrets. This first part: the Secret, and
//! formatting a filesystem on first use with its secrets kept out of argv,
//! logs and messages.

pub mod error;
pub mod fs;
pub mod secret;

pub use error::JuicefsError;
pub use fs::Cli;
pub use secret::FsSecret;
