//! What one worker thread does in each phase, in dir mode and file mode.

use crate::clock::Clock;
use crate::config::{Config, Mode, Phase, RandAlgo};
use crate::engine::{self, AlignedBuf, Meter, Mixed, Pacer, Spec};
use crate::error::{BenchError, Result};
use crate::fill::{Permutation, Rng};
use crate::stats::{self, Counters};
use hdrhistogram::Histogram;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Buffer alignment: enough for O_DIRECT on every common filesystem and device.
const ALIGN: usize = 4096;

/// One thread's I/O resources: `--iodepth` buffers and, above depth 1, an io_uring.
struct Io {
    // The ring goes first so it is dropped (and its buffer registration
    // released) before the buffers it points into.
    ring: Option<io_uring::IoUring>,
    bufs: Vec<AlignedBuf>,
}

impl Io {
    fn new(cfg: &Config, thread: usize) -> Result<Self> {
        let mut bufs: Vec<AlignedBuf> = (0..cfg.iodepth)
            .map(|_| AlignedBuf::new(cfg.block as usize, ALIGN))
            .collect();
        if cfg.blockvarpct == 0 {
            // Never refilled: random once, so compression still cannot cheat.
            for b in &mut bufs {
                crate::fill::fill(b.bytes(), thread as u64, 0, 100);
            }
        }
        let ring = (cfg.iodepth > 1)
            .then(|| new_ring(cfg.iodepth as u32))
            .transpose()?;
        if let Some(r) = &ring {
            // Registered buffers are pinned once, not on every I/O.
            let iovecs: Vec<libc::iovec> = bufs
                .iter_mut()
                .map(|b| {
                    let bytes = b.bytes();
                    libc::iovec {
                        iov_base: bytes.as_mut_ptr().cast(),
                        iov_len: bytes.len(),
                    }
                })
                .collect();
            // SAFETY: the buffers live in `Self` next to the ring, which is dropped first.
            unsafe { r.submitter().register_buffers(&iovecs) }
                .map_err(|e| BenchError::io("registering io_uring buffers", e))?;
        }
        Ok(Self { ring, bufs })
    }

    /// Block I/O on `file` at every offset, with the engine the depth asks for.
    fn run(
        &mut self,
        file: &File,
        offs: &mut dyn Iterator<Item = u64>,
        spec: &Spec<'_>,
        m: &mut Meter<'_>,
    ) -> Result<()> {
        match self.ring.as_mut() {
            Some(r) => engine::uring_io(r, file.as_raw_fd(), offs, spec, &mut self.bufs, m),
            None => engine::sync_io(file.as_raw_fd(), offs, spec, &mut self.bufs[0], m),
        }
    }
}

/// A ring for one thread: completions are run only when that thread asks
/// for them (no interrupts to deliver task work), falling back to a plain
/// ring on kernels without those flags.
fn new_ring(depth: u32) -> Result<io_uring::IoUring> {
    io_uring::IoUring::builder()
        .setup_coop_taskrun()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(depth)
        .or_else(|_| io_uring::IoUring::new(depth))
        .map_err(|e| BenchError::io("creating an io_uring", e))
}

/// What block I/O on file number `file_id` does in this phase.
fn spec<'p>(cfg: &Config, file_id: u64, path: &'p str, write: bool) -> Spec<'p> {
    Spec {
        file_id,
        path,
        block: cfg.block as usize,
        write,
        verify: cfg.verify && !write,
        varpct: cfg.blockvarpct,
        mix_read_pct: if write { cfg.rwmixpct.unwrap_or(0) } else { 0 },
    }
}

/// One worker's view of a phase.
pub struct Worker<'a> {
    /// The run.
    pub cfg: &'a Config,
    /// Thread number.
    pub thread: usize,
    /// Live counters of this thread.
    pub counters: &'a Counters,
    /// Descriptors shared by all threads (file mode with --sharedfd).
    pub shared: &'a [File],
    /// Blocks that failed `--verify` in this phase, over all threads.
    pub mismatches: &'a engine::Mismatches,
}

/// The block offsets a thread handles in a range of `blocks` blocks.
fn offsets(
    cfg: &Config,
    first: u64,
    blocks: u64,
    seed: u64,
) -> Box<dyn Iterator<Item = u64> + Send> {
    let b = cfg.block;
    match cfg.rand {
        None => Box::new((first..first + blocks).map(move |i| i * b)),
        Some(RandAlgo::Full) => {
            Box::new(Permutation::new(blocks, seed).map(move |i| (first + i) * b))
        }
        Some(RandAlgo::Plain) => {
            let mut r = Rng::new(seed);
            Box::new((0..blocks).map(move |_| (first + r.below(blocks)) * b))
        }
    }
}

/// Opens a file for a data phase.
pub fn open(
    path: &Path,
    write: bool,
    create: bool,
    trunc: bool,
    direct: bool,
) -> std::io::Result<File> {
    let mut o = std::fs::OpenOptions::new();
    // Read access too: --rwmixpct reads from files opened for writing.
    o.read(true)
        .write(write)
        .create(write && create)
        .truncate(write && trunc);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.mode(0o644);
    o.open(path)
}

impl<'a> Worker<'a> {
    /// This thread's number over all hosts of a distributed run.
    fn global(&self) -> usize {
        self.cfg.rank * self.cfg.threads + self.thread
    }

    fn dir_path(&self, base: &Path, d: Option<u64>) -> PathBuf {
        let t = base.join(format!("t{}", self.global()));
        match d {
            Some(d) => t.join(format!("d{d}")),
            None => t,
        }
    }

    fn file_id(&self, d: u64, f: u64) -> u64 {
        (self.global() as u64 * self.cfg.dirs + d) * self.cfg.files + f
    }

    /// Runs `phase`; returns whether the time limit cut it short.
    pub fn run(
        &self,
        phase: Phase,
        hist: &mut Histogram<u64>,
        mixed: Option<&mut Mixed>,
    ) -> Result<bool> {
        let cfg = self.cfg;
        let deadline = cfg.timelimit.map(|t| Instant::now() + t);
        let limit = match phase {
            Phase::Write => cfg.limit_write,
            Phase::Read => cfg.limit_read,
            _ => None,
        };
        let mut m = Meter {
            counters: self.counters,
            hist,
            tick_hist: None,
            deadline,
            cut: false,
            pacer: limit.map(|rate| Pacer::new(cfg.block, rate)),
            mixed,
            mismatches: self.mismatches,
        };
        match &self.cfg.mode {
            Mode::Dir(base) => self.dir_phase(base, phase, &mut m)?,
            Mode::File(paths) => self.file_phase(paths, phase, &mut m)?,
        }
        if let Some(ticks) = m.tick_hist.take() {
            Clock::new().fold(&ticks, m.hist);
        }
        Ok(m.cut)
    }

    /// Times one metadata operation and counts it as an entry.
    fn meta(
        &self,
        m: &mut Meter<'_>,
        what: impl FnOnce() -> std::io::Result<()>,
        describe: impl FnOnce() -> String,
    ) -> Result<()> {
        let start = Instant::now();
        what().map_err(|e| BenchError::io(describe(), e))?;
        m.hist.saturating_record(start.elapsed().as_nanos() as u64);
        self.counters.op(0);
        self.counters.entry();
        Ok(())
    }

    /// Stat or unlink every file of `dir`: one statx or unlinkat per file,
    /// relative to the open directory (no path walk from the root), and one
    /// read of the cheap clock per file (each operation is timed from the
    /// end of the one before, so the loop's own few instructions count
    /// against rbench). The deadline is checked about every millisecond.
    fn file_meta(&self, dir: &Path, phase: Phase, m: &mut Meter<'_>) -> Result<()> {
        /// Ticks between deadline checks: 0.2 to 1 ms at 1 to 5 GHz.
        const CHECK: u64 = 1 << 20;
        if m.expired() {
            return Ok(());
        }
        let d = std::fs::File::open(dir)
            .map_err(|e| BenchError::io(format!("opening {}", dir.display()), e))?;
        let fd = d.as_raw_fd();
        let mut name = FileName::default();
        let clock = Clock::new();
        let ticks = m.tick_hist.get_or_insert_with(stats::new_histogram);
        let mut t = clock.ticks();
        let mut checked = t;
        for f in 0..self.cfg.files {
            if let Some(deadline) = m.deadline
                && t.wrapping_sub(checked) >= CHECK
            {
                checked = t;
                if Instant::now() >= deadline {
                    m.cut = true;
                    return Ok(());
                }
            }
            let c = name.set(f);
            let r = if phase == Phase::Stat {
                // SAFETY: statx fills the struct we pass; the name is NUL-terminated.
                let mut st = std::mem::MaybeUninit::<libc::statx>::uninit();
                unsafe { libc::statx(fd, c, 0, libc::STATX_BASIC_STATS, st.as_mut_ptr()) }
            } else {
                // SAFETY: unlinkat of a NUL-terminated name in an open directory.
                unsafe { libc::unlinkat(fd, c, 0) }
            };
            if r != 0 {
                let op = if phase == Phase::Stat {
                    "stat"
                } else {
                    "unlink"
                };
                return Err(BenchError::io(
                    format!("{op} {}", dir.join(format!("f{f}")).display()),
                    std::io::Error::last_os_error(),
                ));
            }
            let now = clock.ticks();
            ticks.saturating_record(now.saturating_sub(t));
            t = now;
            self.counters.op(0);
            self.counters.entry();
        }
        Ok(())
    }

    fn dir_phase(&self, base: &Path, phase: Phase, m: &mut Meter<'_>) -> Result<()> {
        let cfg = self.cfg;
        let mut io = if matches!(phase, Phase::Write | Phase::Read) && cfg.size > 0 {
            Some(Io::new(cfg, self.thread)?)
        } else {
            None
        };
        if phase == Phase::Mkdirs {
            let top = self.dir_path(base, None);
            self.meta(m, || mkdir(&top), || format!("mkdir {}", top.display()))?;
        }
        for d in 0..cfg.dirs {
            let dir = self.dir_path(base, Some(d));
            match phase {
                Phase::Mkdirs => {
                    if m.expired() {
                        return Ok(());
                    }
                    self.meta(m, || mkdir(&dir), || format!("mkdir {}", dir.display()))?;
                    continue;
                }
                Phase::RmDirs => {
                    if m.expired() {
                        return Ok(());
                    }
                    self.meta(
                        m,
                        || std::fs::remove_dir(&dir),
                        || format!("rmdir {}", dir.display()),
                    )?;
                    continue;
                }
                // Writing into a tree that -d did not make creates it, uncounted.
                Phase::Write => std::fs::create_dir_all(&dir)
                    .map_err(|e| BenchError::io(format!("creating {}", dir.display()), e))?,
                _ => {}
            }
            if matches!(phase, Phase::Stat | Phase::RmFiles) {
                self.file_meta(&dir, phase, m)?;
                if m.cut {
                    return Ok(());
                }
                continue;
            }
            for f in 0..cfg.files {
                if m.expired() {
                    return Ok(());
                }
                let path = dir.join(format!("f{f}"));
                match phase {
                    Phase::Write | Phase::Read => {
                        let write = phase == Phase::Write;
                        let start = Instant::now();
                        let file = open(&path, write, true, true, cfg.direct).map_err(|e| {
                            BenchError::io(format!("opening {}", path.display()), e)
                        })?;
                        if cfg.size == 0 {
                            m.hist.saturating_record(start.elapsed().as_nanos() as u64);
                            self.counters.op(0);
                        } else {
                            let name = path.display().to_string();
                            let spec = spec(cfg, self.file_id(d, f), &name, write);
                            prepare(&file, cfg, write).map_err(|e| {
                                BenchError::io(format!("preparing {}", path.display()), e)
                            })?;
                            let mut offs = offsets(cfg, 0, cfg.size / cfg.block, spec.file_id);
                            let io = io.as_mut().expect("I/O phases have buffers");
                            io.run(&file, &mut offs, &spec, m)?;
                        }
                        drop(file);
                        if m.cut {
                            return Ok(());
                        }
                        self.counters.entry();
                    }
                    _ => unreachable!("handled per directory"),
                }
            }
        }
        if phase == Phase::RmDirs && !m.cut {
            let top = self.dir_path(base, None);
            self.meta(
                m,
                || std::fs::remove_dir(&top),
                || format!("rmdir {}", top.display()),
            )?;
        }
        Ok(())
    }

    fn file_phase(&self, paths: &[PathBuf], phase: Phase, m: &mut Meter<'_>) -> Result<()> {
        let cfg = self.cfg;
        let write = phase == Phase::Write;
        let blocks = cfg.size / cfg.block;
        let threads = cfg.total_threads() as u64;
        let (first, mine) = {
            let t = self.global() as u64;
            let lo = blocks * t / threads;
            (lo, blocks * (t + 1) / threads - lo)
        };
        let mut io = Io::new(cfg, self.thread)?;
        for (id, path) in paths.iter().enumerate() {
            let own;
            let file = match self.shared.get(id) {
                Some(f) => f,
                None => {
                    own = open(path, write, true, false, cfg.direct)
                        .map_err(|e| BenchError::io(format!("opening {}", path.display()), e))?;
                    &own
                }
            };
            let name = path.display().to_string();
            let spec = spec(cfg, id as u64, &name, write);
            if self.shared.is_empty() {
                advise(file, cfg)
                    .map_err(|e| BenchError::io(format!("fadvise {}", path.display()), e))?;
            }
            let seed = (id as u64) << 32 | self.global() as u64;
            let mut offs = offsets(cfg, first, mine, seed);
            io.run(file, &mut offs, &spec, m)?;
            if m.cut {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// A file name `f<N>` with its NUL, built without allocating.
#[derive(Default)]
struct FileName([u8; 24]);

impl FileName {
    /// The name of file `n`, valid until the next call.
    fn set(&mut self, mut n: u64) -> *const libc::c_char {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let len = digits.len() - i;
        self.0[0] = b'f';
        self.0[1..=len].copy_from_slice(&digits[i..]);
        self.0[len + 1] = 0;
        self.0.as_ptr().cast()
    }
}

/// Gives the calling thread a descriptor table of its own (a copy), so the
/// kernel's descriptor lookup in each of its system calls takes the
/// single-user path instead of counting references to the file, as fio's
/// job processes do. Best effort: without it only that saving is lost.
pub fn private_fd_table() {
    // SAFETY: unshare(CLONE_FILES) affects only this thread's descriptor table.
    unsafe { libc::unshare(libc::CLONE_FILES) };
}

fn mkdir(p: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(p) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && p.is_dir() => Ok(()),
        r => r,
    }
}

/// fadvise, as asked.
pub fn advise(file: &File, cfg: &Config) -> std::io::Result<()> {
    if let Some(a) = cfg.fadvise {
        // SAFETY: posix_fadvise on an open descriptor.
        let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, a.advice()) };
        if r != 0 {
            return Err(std::io::Error::from_raw_os_error(r));
        }
    }
    Ok(())
}

/// Per-file set-up in dir mode: fadvise, fallocate, and full size when reads
/// are mixed into writes (so they never hit end of file).
fn prepare(file: &File, cfg: &Config, write: bool) -> std::io::Result<()> {
    advise(file, cfg)?;
    if write && cfg.prealloc {
        // SAFETY: fallocate on an open descriptor.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, cfg.size as libc::off_t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    if write && cfg.rwmixpct.is_some() {
        file.set_len(cfg.size)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::FileName;

    #[test]
    fn file_names_are_built_in_place() {
        let mut n = FileName::default();
        for (i, want) in [
            (0, "f0"),
            (7, "f7"),
            (10, "f10"),
            (u64::MAX, "f18446744073709551615"),
        ] {
            // SAFETY: set returns a NUL-terminated name in `n`.
            let got = unsafe { std::ffi::CStr::from_ptr(n.set(i)) };
            assert_eq!(got.to_str().unwrap(), want);
        }
    }
}
