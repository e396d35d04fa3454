//! rbench's errors: bad input (exit 2) and failures while running (exit 1).

/// Everything that stops a run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The command line or the targets do not allow the run.
    #[error("{0}")]
    Usage(String),
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The Kubernetes cluster refused or did not do what `rbench k8s` asked.
    #[error("{0}")]
    Cluster(String),
    /// A block read back did not hold what was written.
    #[error(
        "verify failed: {path} at offset {offset} (byte {byte} of the block) differs from what was written"
    )]
    Verify {
        /// File or device.
        path: String,
        /// Block offset.
        offset: u64,
        /// First differing byte within the block.
        byte: usize,
    },
    /// A read or write moved fewer bytes than asked.
    #[error(
        "short {op} of {got} bytes instead of {want} at offset {offset} of {path}; is the target smaller than --size?"
    )]
    Short {
        /// read or write.
        op: &'static str,
        /// Bytes moved.
        got: usize,
        /// Bytes asked for.
        want: usize,
        /// Offset.
        offset: u64,
        /// File or device.
        path: String,
    },
}

impl BenchError {
    /// Process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            BenchError::Usage(_) => 2,
            _ => 1,
        }
    }

    /// Wraps an OS error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        BenchError::Io {
            what: what.into(),
            source,
        }
    }
}

/// rbench's result type.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;
