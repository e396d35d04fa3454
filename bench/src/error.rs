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
    /// Blocks read back did not hold what was written.
    #[error("verify failed: {blocks} block(s) differ from what was written; the first: {first}")]
    Verify {
        /// Blocks found bad before the run stopped (at most --verifylimit).
        blocks: u64,
        /// The first bad byte: file, offset, expected and found.
        first: String,
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

/// A clap error in one line: its first line plus the indented lines under
/// it (the names of missing arguments).
pub fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut lines = text.lines();
    let mut out = lines
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ")
        .trim_end_matches(':')
        .to_owned();
    let listed: Vec<&str> = lines
        .take_while(|l| l.starts_with(' '))
        .map(str::trim)
        .collect();
    if e.kind() == clap::error::ErrorKind::MissingRequiredArgument && !listed.is_empty() {
        out = format!("missing {}", listed.join(", "));
        if out.contains("<PATH>") {
            out.push_str(": a directory (dir mode), or files and block devices (file mode)");
        }
    } else if !listed.is_empty() {
        out = format!("{out}: {}", listed.join(", "));
    }
    out
}

/// rbench's result type.
pub type Result<T, E = BenchError> = std::result::Result<T, E>;
