//! Command line and its validation into a [`Config`]. Every check happens
//! before anything is created, so bad input leaves nothing behind.

use crate::units::{format_size, parse_size};
use clap::{Parser, ValueEnum};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Benchmark phases, run in elbencho's order ([`Phase::ORDER`]) when selected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Create directories (dir mode).
    Mkdirs,
    /// Write files or block ranges.
    Write,
    /// Stat files (dir mode).
    Stat,
    /// Read files or block ranges.
    Read,
    /// Delete files (dir mode).
    RmFiles,
    /// Delete directories (dir mode).
    RmDirs,
}

impl Phase {
    /// The order phases run in, elbencho's: stat before read.
    pub const ORDER: [Phase; 6] = [
        Phase::Mkdirs,
        Phase::Write,
        Phase::Stat,
        Phase::Read,
        Phase::RmFiles,
        Phase::RmDirs,
    ];

    /// Name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Mkdirs => "MKDIRS",
            Phase::Write => "WRITE",
            Phase::Read => "READ",
            Phase::Stat => "STAT",
            Phase::RmFiles => "RMFILES",
            Phase::RmDirs => "RMDIRS",
        }
    }
}

/// posix_fadvise hints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Fadvise {
    /// POSIX_FADV_SEQUENTIAL
    Seq,
    /// POSIX_FADV_RANDOM
    Rand,
    /// POSIX_FADV_WILLNEED
    Willneed,
    /// POSIX_FADV_DONTNEED
    Dontneed,
    /// POSIX_FADV_NOREUSE
    Noreuse,
}

impl Fadvise {
    /// The libc constant.
    pub fn advice(self) -> libc::c_int {
        match self {
            Fadvise::Seq => libc::POSIX_FADV_SEQUENTIAL,
            Fadvise::Rand => libc::POSIX_FADV_RANDOM,
            Fadvise::Willneed => libc::POSIX_FADV_WILLNEED,
            Fadvise::Dontneed => libc::POSIX_FADV_DONTNEED,
            Fadvise::Noreuse => libc::POSIX_FADV_NOREUSE,
        }
    }
}

/// When to show the live progress line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Progress {
    /// Only when stderr is a terminal.
    Auto,
    /// Always.
    Always,
    /// Never.
    Never,
}

/// How random offsets are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RandAlgo {
    /// Every block exactly once, in random order.
    Full,
    /// Independent uniform offsets (blocks may repeat or be skipped).
    Plain,
}

/// What the short help adds after its options.
const SHORT_HELP: &str = "\
Phases (run in this order): -d mkdirs, -w write, --stat, -r read, -F delete files, -D delete dirs.
Sizes: 4096, 4k, 1m, 2g, 1t (powers of 1024; K/KiB/KB the same). More options: rbench --help-all.

Examples:
  A file on a disk, 4 KiB random direct reads at queue depth 16, 2 threads:
    rbench -w -r -t 2 -s 10g -b 4k --rand --direct --iodepth 16 /mnt/disk/file
  A directory tree, 4 threads x 8 dirs x 1000 files of 64 KiB, every phase:
    rbench -d -w --stat -r -F -D -t 4 -n 8 -N 1000 -s 64k /mnt/fs
  A block device, 1 MiB sequential writes then verified reads (overwrites it!):
    rbench -w -r -t 4 -b 1m --direct --verify /dev/sdb
  Distributed: `rbench --service --bind 0.0.0.0 --secret S /mnt/fs` on each host, then
    rbench --hosts node1,node2 --secret S -w -r -t 4 -s 1g /mnt/fs
  Latency at a steady 20 MiB/s per thread for 60 s:
    rbench -w -t 1 -s 10g -b 4k --rand --direct --limitwrite 20m --timelimit 60 /mnt/disk/file
  PVCs of StorageClasses on Kubernetes: rbench k8s --help";

/// What the full help adds after its options.
const LONG_HELP: &str = "\
Modes:
  Dir mode: one existing directory; thread N works in PATH/t<N>/d<M>/f<K> (-n dirs, -N files).
  File mode: files or block devices (ranges like /data/f[1-4]); each target's --size is split
  between the threads (over all hosts of a distributed run).
Units:
  Sizes (--size, --block, --limitread, --limitwrite): a whole number of bytes, or with k, m, g
  or t for KiB, MiB, GiB, TiB (case-insensitive; 4k, 4K, 4KiB and 4KB are all 4096 bytes).
  Rates are sizes per second (50m or 50m/s). --timelimit is in seconds.
Phases run in elbencho's order: -d, -w, --stat, -r, -F, -D.
Kubernetes: `rbench k8s --help` measures StorageClasses through N claims and pods.";

/// rbench command line.
#[derive(Parser, Debug)]
#[command(
    name = "rbench",
    version,
    about = "Storage benchmark: throughput, IOPS, latency percentiles and metadata rates",
    disable_help_flag = true,
    after_help = SHORT_HELP,
    after_long_help = LONG_HELP
)]
pub struct Args {
    /// The most used options and examples (--help-all: every option).
    #[arg(short = 'h', long = "help", action = clap::ArgAction::HelpShort)]
    help: Option<bool>,
    /// Every option, the units and the modes.
    #[arg(long = "help-all", action = clap::ArgAction::HelpLong)]
    help_all: Option<bool>,
    /// Directory (dir mode), or files / block devices (file mode). With
    /// --service: the only directories and files coordinators may use.
    #[arg(required_unless_present = "service", value_name = "PATH")]
    pub paths: Vec<String>,
    /// Run as a service that coordinators (--hosts) drive, on the PATHs given.
    #[arg(hide_short_help = true, long)]
    pub service: bool,
    /// TCP port of the service (with --service) or the default port of --hosts.
    #[arg(hide_short_help = true, long, default_value_t = 1611)]
    pub port: u16,
    /// Address the service listens on; any other than loopback needs --secret.
    #[arg(hide_short_help = true, long, default_value = "127.0.0.1")]
    pub bind: String,
    /// Run on these services (host or host:port, comma-separated) instead of locally.
    #[arg(hide_short_help = true, long, value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// Shared secret between coordinator and services (never sent: the
    /// coordinator proves it knows it with an HMAC of a fresh challenge).
    #[arg(
        hide_short_help = true,
        long,
        env = "RBENCH_SECRET",
        default_value = "",
        hide_env_values = true
    )]
    pub secret: String,
    /// Create directories.
    #[arg(hide_short_help = true, short = 'd', long = "mkdirs")]
    pub mkdirs: bool,
    /// Write.
    #[arg(short = 'w', long)]
    pub write: bool,
    /// Read.
    #[arg(short = 'r', long)]
    pub read: bool,
    /// Stat files.
    #[arg(hide_short_help = true, long)]
    pub stat: bool,
    /// Delete files.
    #[arg(hide_short_help = true, short = 'F', long = "delfiles")]
    pub delfiles: bool,
    /// Delete directories.
    #[arg(hide_short_help = true, short = 'D', long = "deldirs")]
    pub deldirs: bool,
    /// Worker threads.
    #[arg(short = 't', long, default_value = "1")]
    pub threads: String,
    /// Directories per thread (dir mode).
    #[arg(short = 'n', long, default_value = "1")]
    pub dirs: String,
    /// Files per directory (dir mode).
    #[arg(short = 'N', long, default_value = "1")]
    pub files: String,
    /// File size (k/m/g/t suffixes); file mode defaults to the device or file size.
    #[arg(short = 's', long)]
    pub size: Option<String>,
    /// Block size of each read or write [default: 1m, or --size when that is smaller].
    #[arg(short = 'b', long)]
    pub block: Option<String>,
    /// O_DIRECT: bypass the page cache (blocks and offsets must be aligned).
    #[arg(long)]
    pub direct: bool,
    /// Random offsets instead of sequential.
    #[arg(long)]
    pub rand: bool,
    /// How random offsets are chosen.
    #[arg(hide_short_help = true, long, value_enum, default_value_t = RandAlgo::Full)]
    pub randalgo: RandAlgo,
    /// Asynchronous I/O depth per thread through io_uring (1: synchronous pread/pwrite).
    #[arg(long, default_value = "1")]
    pub iodepth: String,
    /// Sync the filesystems of the targets after each phase.
    #[arg(hide_short_help = true, long)]
    pub sync: bool,
    /// Drop the page cache after each phase (needs root).
    #[arg(hide_short_help = true, long)]
    pub dropcache: bool,
    /// Stop each phase after this many seconds.
    #[arg(hide_short_help = true, long)]
    pub timelimit: Option<String>,
    /// Run the phases this many times.
    #[arg(hide_short_help = true, long, default_value = "1")]
    pub iterations: String,
    /// Run the phases until interrupted.
    #[arg(hide_short_help = true, long)]
    pub infloop: bool,
    /// Check on read that every block holds what the write phase put there.
    #[arg(hide_short_help = true, long)]
    pub verify: bool,
    /// With --verify: stop at the Nth bad block (each one is reported).
    #[arg(hide_short_help = true, long, default_value = "1", value_name = "N")]
    pub verifylimit: String,
    /// Percentage of each block refilled with new random data per write (0: fill once).
    #[arg(hide_short_help = true, long, default_value = "100")]
    pub blockvarpct: String,
    /// File mode: threads share one file descriptor per file instead of opening their own.
    #[arg(hide_short_help = true, long)]
    pub sharedfd: bool,
    /// Reserve each file's full size with fallocate before writing.
    #[arg(hide_short_help = true, long)]
    pub prealloc: bool,
    /// File mode: truncate regular files to --size before the write phase.
    #[arg(hide_short_help = true, long)]
    pub trunc: bool,
    /// posix_fadvise hint for every opened file.
    #[arg(hide_short_help = true, long, value_enum)]
    pub fadvise: Option<Fadvise>,
    /// Percentage of the write phase's blocks that are reads instead (mixed I/O).
    #[arg(hide_short_help = true, long)]
    pub rwmixpct: Option<String>,
    /// Per-thread write rate limit, e.g. 50m (bytes per second).
    #[arg(hide_short_help = true, long, value_name = "SIZE/s")]
    pub limitwrite: Option<String>,
    /// Per-thread read rate limit, e.g. 50m (bytes per second).
    #[arg(hide_short_help = true, long, value_name = "SIZE/s")]
    pub limitread: Option<String>,
    /// Draw each phase's latency histogram and throughput over time into this SVG file.
    #[arg(hide_short_help = true, long, value_name = "FILE.svg")]
    pub chart: Option<PathBuf>,
    /// Live view on stderr: auto (only on a terminal), always or never.
    #[arg(hide_short_help = true, long, value_enum, default_value_t = Progress::Auto)]
    pub progress: Progress,
    /// Live view in one line instead of the full screen.
    #[arg(hide_short_help = true, long)]
    pub live1: bool,
    /// No live view (as --progress never).
    #[arg(hide_short_help = true, long)]
    pub nolive: bool,
    /// Label written into every result.
    #[arg(hide_short_help = true, long, default_value = "")]
    pub label: String,
    /// Write all results as JSON to this file.
    #[arg(
        hide_short_help = true,
        long,
        visible_alias = "jsonfile",
        value_name = "FILE"
    )]
    pub json: Option<PathBuf>,
    /// Append all results as CSV rows to this file (header when new).
    #[arg(
        hide_short_help = true,
        long,
        visible_alias = "csvfile",
        value_name = "FILE"
    )]
    pub csv: Option<PathBuf>,
    /// Append this run's result tables to this file, under its time and command line.
    #[arg(hide_short_help = true, long, value_name = "FILE")]
    pub resfile: Option<PathBuf>,
}

impl Args {
    /// The phases asked for, in run order.
    pub fn phases(&self) -> Vec<Phase> {
        Phase::ORDER
            .into_iter()
            .filter(|p| match p {
                Phase::Mkdirs => self.mkdirs,
                Phase::Write => self.write,
                Phase::Stat => self.stat,
                Phase::Read => self.read,
                Phase::RmFiles => self.delfiles,
                Phase::RmDirs => self.deldirs,
            })
            .collect()
    }
}

/// What the targets are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A directory tree under this path.
    Dir(PathBuf),
    /// Files or block devices.
    File(Vec<PathBuf>),
}

/// A validated run.
#[derive(Clone, Debug)]
pub struct Config {
    /// Targets.
    pub mode: Mode,
    /// Phases in run order.
    pub phases: Vec<Phase>,
    /// Worker threads.
    pub threads: usize,
    /// Directories per thread.
    pub dirs: u64,
    /// Files per directory.
    pub files: u64,
    /// Bytes per file (file mode: per target).
    pub size: u64,
    /// Bytes per I/O.
    pub block: u64,
    /// O_DIRECT.
    pub direct: bool,
    /// Random offsets.
    pub rand: Option<RandAlgo>,
    /// io_uring queue depth (1: synchronous).
    pub iodepth: usize,
    /// Sync after each phase.
    pub sync: bool,
    /// Drop caches after each phase.
    pub dropcache: bool,
    /// Per-phase time limit.
    pub timelimit: Option<Duration>,
    /// Iterations (None: forever).
    pub iterations: Option<u64>,
    /// Verify on read.
    pub verify: bool,
    /// Bad blocks that stop a verifying read.
    pub verify_limit: u64,
    /// Refill percentage per block.
    pub blockvarpct: u8,
    /// Shared file descriptors in file mode.
    pub sharedfd: bool,
    /// fallocate before writing.
    pub prealloc: bool,
    /// Truncate file-mode targets before writing.
    pub trunc: bool,
    /// fadvise hint.
    pub fadvise: Option<Fadvise>,
    /// Percentage of reads in the write phase.
    pub rwmixpct: Option<u8>,
    /// Per-thread write limit, bytes/s.
    pub limit_write: Option<u64>,
    /// Per-thread read limit, bytes/s.
    pub limit_read: Option<u64>,
    /// SVG chart output.
    pub chart: Option<PathBuf>,
    /// The live view while a phase runs.
    pub live: crate::live::Live,
    /// Result label.
    pub label: String,
    /// JSON output.
    pub json: Option<PathBuf>,
    /// CSV output.
    pub csv: Option<PathBuf>,
    /// This host's number in a distributed run (0 when local).
    pub rank: usize,
    /// Hosts taking part (1 when local).
    pub hosts: usize,
    /// What rbench chose for the user (printed before the results).
    pub notes: Vec<String>,
}

impl Config {
    /// Threads over all hosts.
    pub fn total_threads(&self) -> usize {
        self.threads * self.hosts
    }
}

fn count(s: &str, what: &str, min: u64) -> Result<u64, String> {
    let n: u64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{what} {s:?} is not a whole number"))?;
    if n < min {
        return Err(format!("{what} must be at least {min}"));
    }
    Ok(n)
}

fn size(s: &str, what: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| format!("{what}: {e}"))
}

fn rate(s: &str, what: &str) -> Result<u64, String> {
    let v = size(s.trim_end_matches("/s"), what)?;
    if v == 0 {
        return Err(format!("{what} must be larger than 0"));
    }
    Ok(v)
}

/// The block size and a note saying so when -b is left out and the files
/// are smaller than the default block: as elbencho does, each is moved in one block.
pub fn shrunk_block(a: &Args, size: u64) -> Option<(u64, String)> {
    let io = a.write || a.read;
    (io && a.block.is_none() && size > 0 && size < DEFAULT_BLOCK).then(|| {
        let note = format!(
            "block size set to the file size {} (the default 1M is larger; -b sets it)",
            format_size(size)
        );
        (size, note)
    })
}

/// The block size when -b is left out.
const DEFAULT_BLOCK: u64 = 1 << 20;

/// Size of a block device or regular file.
fn target_size(p: &Path) -> Option<u64> {
    let meta = std::fs::metadata(p).ok()?;
    if meta.file_type().is_block_device() {
        let f = std::fs::File::open(p).ok()?;
        let mut bytes: u64 = 0;
        // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
        // SAFETY: BLKGETSIZE64 writes one u64 to the pointer.
        let r =
            unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), 0x8008_1272, &mut bytes) };
        (r == 0).then_some(bytes)
    } else {
        Some(meta.len())
    }
}

/// Offset and memory alignment O_DIRECT needs on the filesystem holding `dir`,
/// or an error saying that it refuses O_DIRECT.
pub fn direct_alignment(dir: &Path) -> Result<(u64, u64), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join(format!(".rbench-direct-probe-{}", std::process::id()));
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe);
    let result = match opened {
        Err(e) => Err(format!(
            "the filesystem at {} refuses O_DIRECT ({e}); drop --direct",
            dir.display()
        )),
        Ok(_) => statx_dio(&probe).map(|(mem, off)| (off.max(512) as u64, mem.max(512) as u64)),
    };
    let _ = std::fs::remove_file(&probe);
    result
}

fn statx_dio(p: &Path) -> Result<(u32, u32), String> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: statx fills the struct we pass; the path is NUL-terminated.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statx(libc::AT_FDCWD, c.as_ptr(), 0, libc::STATX_DIOALIGN, &mut st) };
    if r != 0 {
        return Err(format!(
            "statx {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        ));
    }
    if st.stx_mask & libc::STATX_DIOALIGN != 0 && st.stx_dio_offset_align == 0 {
        return Err(format!(
            "the filesystem at {} does not support O_DIRECT; drop --direct",
            p.display()
        ));
    }
    Ok((st.stx_dio_mem_align, st.stx_dio_offset_align))
}

impl Config {
    /// Checks the arguments and the targets without creating anything.
    pub fn from_args(a: Args) -> Result<Self, String> {
        let threads = count(&a.threads, "--threads", 1)? as usize;
        if threads > 4096 {
            return Err("--threads must be at most 4096".into());
        }
        let dirs = count(&a.dirs, "--dirs", 1)?;
        let files = count(&a.files, "--files", 1)?;
        let mut block = match &a.block {
            Some(b) => size(b, "--block")?,
            None => DEFAULT_BLOCK,
        };
        if block == 0 {
            return Err("--block must be larger than 0".into());
        }
        let iodepth = count(&a.iodepth, "--iodepth", 1)? as usize;
        if iodepth > 4096 {
            return Err("--iodepth must be at most 4096".into());
        }
        let iterations = if a.infloop {
            None
        } else {
            Some(count(&a.iterations, "--iterations", 1)?)
        };
        let blockvarpct = count(&a.blockvarpct, "--blockvarpct", 0)?;
        if blockvarpct > 100 {
            return Err("--blockvarpct is a percentage: 0 to 100".into());
        }
        if a.verify && blockvarpct != 100 {
            return Err(
                "--verify needs --blockvarpct 100 so every block's content is known".into(),
            );
        }
        let timelimit = a
            .timelimit
            .as_deref()
            .map(|t| count(t, "--timelimit", 1).map(Duration::from_secs))
            .transpose()?;

        let mut paths = Vec::new();
        for p in &a.paths {
            paths.extend(crate::paths::expand(p)?);
        }
        let mode = if paths.len() == 1 && paths[0].is_dir() {
            Mode::Dir(paths.remove(0))
        } else {
            for p in &paths {
                if p.is_dir() {
                    return Err(format!(
                        "{} is a directory: give one directory (dir mode) or only files",
                        p.display()
                    ));
                }
                let parent = p
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                if !parent.is_dir() {
                    return Err(format!("directory {} does not exist", parent.display()));
                }
            }
            Mode::File(paths)
        };

        let phases = a.phases();
        let dir_mode = matches!(mode, Mode::Dir(_));
        if let Some(p) = phases
            .iter()
            .find(|p| !dir_mode && !matches!(p, Phase::Write | Phase::Read))
        {
            return Err(format!(
                "{} needs dir mode (one directory as the target)",
                p.name().to_lowercase()
            ));
        }
        if phases.is_empty() {
            return Err("nothing to do: choose at least one of -d, -w, -r, --stat, -F, -D".into());
        }
        let io = phases
            .iter()
            .any(|p| matches!(p, Phase::Write | Phase::Read));

        let size = match (&a.size, &mode) {
            (Some(s), _) => size(s, "--size")?,
            (None, Mode::Dir(_)) => 0,
            (None, Mode::File(ps)) => {
                let sizes: Vec<Option<u64>> = ps.iter().map(|p| target_size(p)).collect();
                match sizes.iter().flatten().min() {
                    Some(&s) if sizes.iter().all(Option::is_some) && s > 0 => s,
                    _ => {
                        return Err(
                            "give --size: some targets do not exist yet or are empty".into()
                        );
                    }
                }
            }
        };
        let mut notes = Vec::new();
        if let Some((b, note)) = shrunk_block(&a, size) {
            notes.push(note);
            block = b;
        }
        if io && size > 0 && block > size {
            return Err(format!(
                "block size {} is larger than the file size {}",
                format_size(block),
                format_size(size)
            ));
        }
        if io && size % block != 0 {
            return Err(format!(
                "--size {} is not a multiple of --block {}; every I/O moves one whole block",
                format_size(size),
                format_size(block)
            ));
        }
        if !dir_mode && io && size == 0 {
            return Err("--size must be larger than 0 in file mode".into());
        }
        if !dir_mode && size / block < threads as u64 && io {
            return Err(format!(
                "{} blocks of {} cannot be shared by {threads} threads; lower --threads or --block",
                size / block,
                format_size(block)
            ));
        }
        if a.direct && io {
            let dir = match &mode {
                Mode::Dir(d) => d.clone(),
                Mode::File(ps) => ps[0]
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .to_path_buf(),
            };
            let block_dev = matches!(&mode, Mode::File(ps) if std::fs::metadata(&ps[0]).is_ok_and(|m| m.file_type().is_block_device()));
            let (offset_align, _) = if block_dev {
                (512, 512)
            } else {
                direct_alignment(&dir)?
            };
            if block % offset_align != 0 || size % offset_align != 0 {
                return Err(format!(
                    "--direct needs --block and --size to be multiples of {offset_align} bytes here"
                ));
            }
        }
        let rwmixpct = a
            .rwmixpct
            .as_deref()
            .map(|v| count(v, "--rwmixpct", 0))
            .transpose()?
            .map(|p| {
                if p > 100 {
                    Err("--rwmixpct is a percentage: 0 to 100".to_owned())
                } else {
                    Ok(p as u8)
                }
            })
            .transpose()?;
        if rwmixpct.is_some() && !phases.contains(&Phase::Write) {
            return Err("--rwmixpct mixes reads into the write phase: add -w".into());
        }
        if rwmixpct.is_some() && a.verify {
            return Err(
                "--verify cannot check blocks that --rwmixpct reads before they are written".into(),
            );
        }
        Ok(Self {
            mode,
            phases,
            threads,
            dirs,
            files,
            size,
            block,
            direct: a.direct,
            rand: a.rand.then_some(a.randalgo),
            iodepth,
            sync: a.sync,
            dropcache: a.dropcache,
            timelimit,
            iterations,
            verify: a.verify,
            verify_limit: count(&a.verifylimit, "--verifylimit", 1)?,
            blockvarpct: blockvarpct as u8,
            sharedfd: a.sharedfd,
            prealloc: a.prealloc,
            trunc: a.trunc,
            fadvise: a.fadvise,
            rwmixpct,
            limit_write: a
                .limitwrite
                .as_deref()
                .map(|v| rate(v, "--limitwrite"))
                .transpose()?,
            limit_read: a
                .limitread
                .as_deref()
                .map(|v| rate(v, "--limitread"))
                .transpose()?,
            chart: a.chart,
            live: {
                use crate::live::Live;
                let show = match a.progress {
                    Progress::Always => true,
                    Progress::Never => false,
                    Progress::Auto => std::io::IsTerminal::is_terminal(&std::io::stderr()),
                };
                match (show && !a.nolive, a.live1) {
                    (false, _) => Live::Off,
                    (true, true) => Live::Line,
                    (true, false) => Live::Full,
                }
            },
            rank: 0,
            hosts: 1,
            notes,
            label: a.label,
            json: a.json,
            csv: a.csv,
        })
    }
}
