//! Block I/O on one file descriptor: synchronous pread/pwrite at depth 1,
//! io_uring at higher depths. Latency is measured per block.

use crate::error::{BenchError, Result};
use crate::fill;
use crate::stats::Counters;
use hdrhistogram::Histogram;
use std::os::fd::RawFd;
use std::time::Instant;

/// An aligned heap buffer for (direct) I/O.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the buffer is plain memory owned by one thread at a time.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two).
    /// Buffers of 64 KiB and more sit in transparent huge pages: physically
    /// contiguous memory lets a large direct I/O go to the device as one
    /// request instead of being split at the queue's segment limit.
    pub fn new(len: usize, align: usize) -> Self {
        const HUGE: usize = 2 << 20;
        let (size, align) = if len >= 64 << 10 {
            (len.div_ceil(HUGE) * HUGE, HUGE)
        } else {
            (len.max(1), align.max(8))
        };
        let layout = std::alloc::Layout::from_size_align(size, align).expect("valid buffer layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        if align == HUGE {
            // SAFETY: advice on memory we own; failure only loses the optimization.
            unsafe { libc::madvise(ptr.cast(), size, libc::MADV_HUGEPAGE) };
        }
        let mut buf = Self { ptr, layout };
        // Fault every page in now, in order, rather than during the first I/O.
        for page in buf.bytes().chunks_mut(4096) {
            // SAFETY: a volatile write keeps the touch from being optimized out.
            unsafe { std::ptr::write_volatile(page.as_mut_ptr(), 0) };
        }
        buf
    }

    /// The bytes.
    pub fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() bytes and uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// What one run of block I/O does.
#[derive(Clone, Copy, Debug)]
pub struct Spec<'a> {
    /// Number of the file (seeds the block contents).
    pub file_id: u64,
    /// Path for messages.
    pub path: &'a str,
    /// Block size.
    pub block: usize,
    /// Write (else read).
    pub write: bool,
    /// Check contents on read.
    pub verify: bool,
    /// Percentage of a block refilled per write.
    pub varpct: u8,
    /// In a write phase, percentage of blocks read instead (0: none).
    pub mix_read_pct: u8,
}

/// Reads mixed into a write phase (`--rwmixpct`), counted apart.
pub struct Mixed {
    /// Live counters of the mixed reads, shared with the coordinator.
    pub counters: std::sync::Arc<Counters>,
    /// Their latency in ns.
    pub hist: Histogram<u64>,
    /// Decides which blocks are reads.
    pub rng: fill::Rng,
}

/// Spaces operations evenly to hold a rate (`--limitread`, `--limitwrite`).
pub struct Pacer {
    start: Instant,
    interval: std::time::Duration,
    n: u32,
}

impl Pacer {
    /// `block`-byte operations at `rate` bytes per second.
    pub fn new(block: u64, rate: u64) -> Self {
        Self {
            start: Instant::now(),
            interval: std::time::Duration::from_secs_f64(block as f64 / rate as f64),
            n: 0,
        }
    }

    /// Waits for the next operation's slot and returns its scheduled start.
    /// Latency is measured from that instant, not from when the operation
    /// really began, so a stall that delays later operations still counts
    /// against them (no coordinated omission).
    fn next(&mut self) -> Instant {
        let at = self.start + self.interval * self.n;
        self.n += 1;
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        at
    }
}

/// Per-thread accounting shared by the engines.
pub struct Meter<'a> {
    /// Live counters.
    pub counters: &'a Counters,
    /// Latency in ns.
    pub hist: &'a mut Histogram<u64>,
    /// Latency in [`crate::clock::Clock`] ticks, folded into `hist` when the phase ends.
    pub tick_hist: Option<Histogram<u64>>,
    /// Stop at this instant (`--timelimit`).
    pub deadline: Option<Instant>,
    /// Set when the deadline stopped the work.
    pub cut: bool,
    /// Rate limit, if any.
    pub pacer: Option<Pacer>,
    /// Mixed reads, if any.
    pub mixed: Option<&'a mut Mixed>,
    /// Blocks that failed `--verify`, shared by the phase's threads.
    pub mismatches: &'a Mismatches,
}

impl Meter<'_> {
    /// True (and remembered) once the deadline has passed or --verifylimit is reached.
    #[inline]
    pub fn expired(&mut self) -> bool {
        if self.deadline.is_some_and(|d| Instant::now() >= d) || self.mismatches.at_limit() {
            self.cut = true;
        }
        self.cut
    }

    #[inline]
    fn done(&mut self, start: Instant, bytes: u64, mixed_read: bool) {
        self.done_at(start, Instant::now(), bytes, mixed_read);
    }

    /// Counts an operation that started at `start` and was seen done at `end`.
    #[inline]
    fn done_at(&mut self, start: Instant, end: Instant, bytes: u64, mixed_read: bool) {
        let ns = end.saturating_duration_since(start).as_nanos() as u64;
        match (&mut self.mixed, mixed_read) {
            (Some(mx), true) => {
                mx.hist.saturating_record(ns);
                mx.counters.op(bytes);
            }
            _ => {
                self.hist.saturating_record(ns);
                self.counters.op(bytes);
            }
        }
    }

    /// Start instant of the next operation (waiting for its slot when rate-limited).
    #[inline]
    fn begin(&mut self) -> Instant {
        match &mut self.pacer {
            Some(p) => p.next(),
            None => Instant::now(),
        }
    }

    /// Whether the next block of a write phase is a mixed-in read.
    #[inline]
    fn mixed_read(&mut self, spec: &Spec<'_>) -> bool {
        match &mut self.mixed {
            Some(mx) if spec.write => mx.rng.below(100) < u64::from(spec.mix_read_pct),
            _ => false,
        }
    }
}

fn check(spec: &Spec<'_>, write: bool, got: isize, offset: u64) -> Result<()> {
    if got < 0 {
        let op = if write { "writing" } else { "reading" };
        return Err(BenchError::io(
            format!("{op} {} at offset {offset}", spec.path),
            std::io::Error::from_raw_os_error(-got as i32),
        ));
    }
    if got as usize != spec.block {
        return Err(BenchError::Short {
            op: if write { "write" } else { "read" },
            got: got as usize,
            want: spec.block,
            offset,
            path: spec.path.to_owned(),
        });
    }
    Ok(())
}

fn after_read(spec: &Spec<'_>, buf: &[u8], offset: u64, m: &Meter<'_>) -> Result<()> {
    if spec.verify
        && let Err(bad) = fill::verify(buf, spec.file_id, offset)
    {
        return m.mismatches.report(spec.path, offset, bad);
    }
    Ok(())
}

/// Blocks that failed `--verify` over all threads of a phase.
#[derive(Debug)]
pub struct Mismatches {
    limit: u64,
    count: std::sync::atomic::AtomicU64,
    first: std::sync::Mutex<Option<String>>,
}

impl Mismatches {
    /// Stops the run at the `limit`th bad block.
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            count: 0.into(),
            first: None.into(),
        }
    }

    /// Prints one bad block's first bad byte; an error once the limit is reached.
    fn report(&self, path: &str, block: u64, bad: fill::Mismatch) -> Result<()> {
        let at = format!(
            "{path} at offset {} (byte {} of the block at {block}): expected 0x{:02x}, found 0x{:02x}",
            block + bad.byte as u64,
            bad.byte,
            bad.expected,
            bad.found
        );
        if self.limit > 1 {
            // With a limit of one, the error that ends the run says it.
            eprintln!("rbench: verify: {at}");
        }
        self.first.lock().expect("not poisoned").get_or_insert(at);
        let n = self
            .count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if n >= self.limit {
            return Err(self.error().expect("one was found"));
        }
        Ok(())
    }

    /// Whether a thread has stopped the phase (so the others stop too).
    #[inline]
    fn at_limit(&self) -> bool {
        self.count.load(std::sync::atomic::Ordering::Relaxed) >= self.limit
    }

    /// The phase's verify failure, if any block was bad.
    pub fn error(&self) -> Option<BenchError> {
        let first = self.first.lock().expect("not poisoned").clone()?;
        Some(BenchError::Verify {
            blocks: self.count.load(std::sync::atomic::Ordering::Relaxed),
            first,
        })
    }
}

/// Synchronous pread/pwrite of every offset.
pub fn sync_io(
    fd: RawFd,
    offsets: &mut dyn Iterator<Item = u64>,
    spec: &Spec<'_>,
    buf: &mut AlignedBuf,
    m: &mut Meter<'_>,
) -> Result<()> {
    let b = &mut buf.bytes()[..spec.block];
    for off in offsets {
        if m.expired() {
            return Ok(());
        }
        let read_instead = m.mixed_read(spec);
        let write = spec.write && !read_instead;
        let start = m.begin();
        let got = if write {
            if spec.varpct > 0 {
                fill::fill(b, spec.file_id, off, spec.varpct);
            }
            // SAFETY: b is valid for spec.block bytes.
            unsafe { libc::pwrite(fd, b.as_ptr().cast(), spec.block, off as libc::off_t) }
        } else {
            // SAFETY: b is valid for spec.block bytes.
            unsafe { libc::pread(fd, b.as_mut_ptr().cast(), spec.block, off as libc::off_t) }
        };
        let got = if got < 0 {
            -(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO) as isize)
        } else {
            got
        };
        check(spec, write, got, off)?;
        if !spec.write {
            after_read(spec, b, off, m)?;
        }
        m.done(start, spec.block as u64, read_instead);
    }
    Ok(())
}

/// Asynchronous I/O through io_uring with `bufs.len()` operations in flight;
/// `bufs` must be registered with the ring, in order. Each round fills every
/// free slot, submitting each operation as soon as the next one is ready
/// (the last goes with the wait), and reaps every completion there is: a
/// disk given a whole batch at once served it slower. Without a rate limit
/// the clock is read once per round on each side (an operation counts from
/// the start of its round, before the first of it is prepared, to just
/// after its reap), not twice per operation.
pub fn uring_io(
    ring: &mut io_uring::IoUring,
    fd: RawFd,
    offsets: &mut dyn Iterator<Item = u64>,
    spec: &Spec<'_>,
    bufs: &mut [AlignedBuf],
    m: &mut Meter<'_>,
) -> Result<()> {
    use io_uring::{opcode, types};
    let depth = bufs.len();
    let paced = m.pacer.is_some();
    let epoch = Instant::now();
    let mut slots: Vec<(u64, Instant, bool)> = vec![(0, epoch, false); depth];
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let mut in_flight = 0usize;
    let mut exhausted = m.expired();
    loop {
        let round = Instant::now();
        while !exhausted && !free.is_empty() {
            let Some(off) = offsets.next() else {
                exhausted = true;
                break;
            };
            if !ring.submission().is_empty() {
                ring.submit()
                    .map_err(|e| BenchError::io(format!("io_uring submit for {}", spec.path), e))?;
            }
            let slot = free.pop().expect("a free slot");
            let read_instead = m.mixed_read(spec);
            let write = spec.write && !read_instead;
            let start = if paced { m.begin() } else { round };
            let b = &mut bufs[slot].bytes()[..spec.block];
            if write && spec.varpct > 0 {
                fill::fill(b, spec.file_id, off, spec.varpct);
            }
            // Buffer `slot` is registered buffer number `slot` (see work::Io).
            let sqe = if write {
                opcode::WriteFixed::new(types::Fd(fd), b.as_ptr(), spec.block as u32, slot as u16)
                    .offset(off)
                    .build()
            } else {
                opcode::ReadFixed::new(
                    types::Fd(fd),
                    b.as_mut_ptr(),
                    spec.block as u32,
                    slot as u16,
                )
                .offset(off)
                .build()
            }
            .user_data(slot as u64);
            slots[slot] = (off, start, read_instead);
            // SAFETY: the buffer stays alive and untouched until its completion is reaped.
            unsafe { ring.submission().push(&sqe) }.expect("queue has room for depth entries");
            in_flight += 1;
        }
        if in_flight == 0 {
            return Ok(());
        }
        let (submitter, _, mut cq) = ring.split();
        submitter
            .submit_and_wait(1)
            .map_err(|e| BenchError::io(format!("io_uring submit for {}", spec.path), e))?;
        cq.sync();
        let now = Instant::now();
        for c in &mut cq {
            let slot = c.user_data() as usize;
            let (off, start, read_instead) = slots[slot];
            in_flight -= 1;
            free.push(slot);
            check(spec, spec.write && !read_instead, c.result() as isize, off)?;
            if !spec.write {
                after_read(spec, &bufs[slot].bytes()[..spec.block], off, m)?;
            }
            m.done_at(start, now, spec.block as u64, read_instead);
        }
        exhausted = exhausted || m.expired();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pacer_charges_stalls_to_the_operations_they_delay() {
        // 1 ms per operation. After a 20 ms stall the next operations are
        // late; their latency counts from their scheduled starts.
        let mut p = Pacer::new(1, 1000);
        let first = p.next();
        std::thread::sleep(Duration::from_millis(20));
        let second = p.next();
        assert_eq!(second - first, Duration::from_millis(1));
        assert!(
            second.elapsed() >= Duration::from_millis(18),
            "a late start is charged as latency"
        );
        // Once caught up, the pacer waits again.
        for _ in 0..30 {
            p.next();
        }
        let on_time = p.next();
        assert!(on_time.elapsed() < Duration::from_millis(5));
    }
}
