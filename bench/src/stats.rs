//! Per-thread counters and latency histograms, and the per-phase results
//! built from them.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Live progress of one thread, written by it alone and read by the coordinator without locks.
#[derive(Default)]
#[repr(align(128))]
pub struct Counters {
    /// I/O operations (blocks) or metadata operations done.
    pub ops: AtomicU64,
    /// Bytes read or written.
    pub bytes: AtomicU64,
    /// Files or directories finished.
    pub entries: AtomicU64,
}

impl Counters {
    /// Current values.
    pub fn snapshot(&self) -> Totals {
        Totals {
            ops: self.ops.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            entries: self.entries.load(Ordering::Relaxed),
        }
    }

    /// Adds one finished operation of `bytes` bytes (by the owning thread only).
    #[inline]
    pub fn op(&self, bytes: u64) {
        bump(&self.ops, 1);
        if bytes > 0 {
            bump(&self.bytes, bytes);
        }
    }

    /// Adds one finished file or directory (by the owning thread only).
    #[inline]
    pub fn entry(&self) {
        bump(&self.entries, 1);
    }
}

/// Adds to a counter that only one thread writes: a plain load and store,
/// no locked read-modify-write on the hot path.
#[inline]
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed) + n, Ordering::Relaxed);
}

/// Summed counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Operations.
    pub ops: u64,
    /// Bytes.
    pub bytes: u64,
    /// Entries.
    pub entries: u64,
}

impl std::ops::Add for Totals {
    type Output = Totals;

    fn add(self, o: Totals) -> Totals {
        Totals {
            ops: self.ops + o.ops,
            bytes: self.bytes + o.bytes,
            entries: self.entries + o.entries,
        }
    }
}

/// A latency histogram in nanoseconds (1 ns to 1 hour, 3 significant digits).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds")
}

/// Figures at the moment the first or the last thread finished.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Done {
    /// Time since the phase started, ms.
    pub elapsed_ms: f64,
    /// Operations completed by all threads by then.
    pub ops: u64,
    /// Bytes moved by all threads by then.
    pub bytes: u64,
    /// Entries (files, directories) completed by then.
    pub entries: u64,
    /// Operations per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_per_s: f64,
    /// Entries per second.
    pub entries_per_s: f64,
}

impl Done {
    /// Rates from totals over an elapsed time.
    pub fn new(t: Totals, elapsed: Duration) -> Self {
        let s = elapsed.as_secs_f64().max(1e-9);
        Self {
            elapsed_ms: s * 1e3,
            ops: t.ops,
            bytes: t.bytes,
            entries: t.entries,
            iops: t.ops as f64 / s,
            mib_per_s: t.bytes as f64 / s / (1024.0 * 1024.0),
            entries_per_s: t.entries as f64 / s,
        }
    }
}

/// Latency summary in microseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Minimum.
    pub min_us: f64,
    /// Mean.
    pub mean_us: f64,
    /// Maximum.
    pub max_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// 99.99th percentile.
    pub p9999_us: f64,
}

impl Latency {
    /// Summarizes a nanosecond histogram.
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let us = |ns: u64| ns as f64 / 1e3;
        Self {
            count: h.len(),
            min_us: us(h.min()),
            mean_us: h.mean() / 1e3,
            max_us: us(h.max()),
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            p9999_us: us(h.value_at_quantile(0.9999)),
        }
    }
}

/// Everything measured in one phase.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PhaseResult {
    /// `--label` of the run.
    pub label: String,
    /// Service this result comes from (empty: local run or aggregate).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub host: String,
    /// MKDIRS, WRITE, STAT, READ, RMFILES, RMDIRS.
    pub phase: String,
    /// Iteration number, from 1.
    pub iteration: u64,
    /// Worker threads.
    pub threads: usize,
    /// Block size in bytes (0 for metadata phases).
    pub block_size: u64,
    /// When the first thread finished.
    pub first: Done,
    /// When the last thread finished.
    pub last: Done,
    /// Per-operation latency over all threads.
    pub latency: Latency,
    /// CPU seconds of rbench itself (user + system) during the phase.
    pub cpu_s: f64,
    /// User part of `cpu_s`.
    pub cpu_user_s: f64,
    /// System part of `cpu_s`.
    pub cpu_sys_s: f64,
    /// Whether `--timelimit` cut the phase short.
    pub time_limited: bool,
    /// Throughput over time, one sample per interval.
    pub series: Vec<Sample>,
    /// Latency distribution in log-spaced buckets.
    pub histogram: Vec<Bucket>,
    /// The full latency histogram (ns), for merging results of several hosts.
    #[serde(skip)]
    pub hdr: Option<Histogram<u64>>,
    /// Per-host results behind an aggregate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<PhaseResult>,
}

/// Rates over one sampling interval.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Sample {
    /// End of the interval, ms since the phase started.
    pub t_ms: f64,
    /// MiB/s in the interval.
    pub mib_per_s: f64,
    /// Operations per second in the interval.
    pub iops: f64,
    /// Entries per second in the interval.
    pub entries_per_s: f64,
}

impl Sample {
    /// Rates between two snapshots.
    pub fn between(prev: (Duration, Totals), now: (Duration, Totals)) -> Self {
        let dt = (now.0 - prev.0).as_secs_f64().max(1e-9);
        Self {
            t_ms: now.0.as_secs_f64() * 1e3,
            mib_per_s: (now.1.bytes - prev.1.bytes) as f64 / dt / 1048576.0,
            iops: (now.1.ops - prev.1.ops) as f64 / dt,
            entries_per_s: (now.1.entries - prev.1.entries) as f64 / dt,
        }
    }
}

/// Operations whose latency fell at or below `le_us` (and above the previous bucket).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Bucket {
    /// Upper bound, microseconds.
    pub le_us: f64,
    /// Operations in the bucket.
    pub count: u64,
}

/// Log-spaced buckets (doubling from 1 us) of a nanosecond histogram.
pub fn buckets(h: &Histogram<u64>) -> Vec<Bucket> {
    if h.is_empty() {
        return Vec::new();
    }
    h.iter_log(1000, 2.0)
        .map(|v| Bucket {
            le_us: v.value_iterated_to() as f64 / 1e3,
            count: v.count_since_last_iteration(),
        })
        .collect()
}

/// User and system CPU time of this process so far.
pub fn cpu_times() -> (f64, f64) {
    // SAFETY: getrusage writes a struct rusage that we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer cannot fail.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (tv(ru.ru_utime), tv(ru.ru_stime))
}
