//! A cheap clock for timing every operation of a fast loop: the CPU's
//! time-stamp counter where the kernel itself keeps time with it (about a
//! third of the cost of `Instant::now()` here), else nanoseconds from
//! `Instant`. Ticks become nanoseconds against `Instant` over the process's
//! life, when a phase's figures are folded.

use hdrhistogram::Histogram;
use std::sync::OnceLock;
use std::time::Instant;

/// When timing started, and whether ticks come from the time-stamp counter.
struct Epoch {
    at: Instant,
    ticks: u64,
    tsc: bool,
}

static EPOCH: OnceLock<Epoch> = OnceLock::new();

fn epoch() -> &'static Epoch {
    EPOCH.get_or_init(|| {
        // The kernel uses the counter only when it is invariant and in step
        // across CPUs, so a thread that moves cannot see it jump.
        let tsc = cfg!(target_arch = "x86_64")
            && std::fs::read_to_string(
                "/sys/devices/system/clocksource/clocksource0/current_clocksource",
            )
            .is_ok_and(|s| s.trim() == "tsc");
        let at = Instant::now();
        let ticks = if tsc { tsc_now() } else { 0 };
        Epoch { at, ticks, tsc }
    })
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn tsc_now() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86_64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn tsc_now() -> u64 {
    unreachable!("the time-stamp counter is used on x86_64 only")
}

/// A reader of the cheap clock.
#[derive(Clone, Copy)]
pub struct Clock(&'static Epoch);

impl Clock {
    /// The process's clock (chosen once).
    pub fn new() -> Self {
        Self(epoch())
    }

    /// Now, in ticks.
    #[inline(always)]
    pub fn ticks(&self) -> u64 {
        if self.0.tsc {
            tsc_now()
        } else {
            self.0.at.elapsed().as_nanos() as u64
        }
    }

    /// Nanoseconds per tick, measured over the process's life so far.
    pub fn ns_per_tick(&self) -> f64 {
        let e = self.0;
        if !e.tsc {
            return 1.0;
        }
        let (ns, ticks) = (
            e.at.elapsed().as_nanos() as f64,
            tsc_now().saturating_sub(e.ticks),
        );
        if ticks == 0 { 1.0 } else { ns / ticks as f64 }
    }

    /// Adds `ticks`, a histogram of durations in ticks, to `ns`, one in nanoseconds.
    pub fn fold(&self, ticks: &Histogram<u64>, ns: &mut Histogram<u64>) {
        let scale = self.ns_per_tick();
        for v in ticks.iter_recorded() {
            let t = ticks.median_equivalent(v.value_iterated_to());
            ns.saturating_record_n((t as f64 * scale).round() as u64, v.count_at_value());
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ticks_fold_into_the_nanoseconds_instant_measures() {
        let c = Clock::new();
        let mut ticks = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).unwrap();
        let mut wall = Vec::new();
        for ms in [5, 20] {
            let (t0, i0) = (c.ticks(), Instant::now());
            std::thread::sleep(Duration::from_millis(ms));
            let (t1, i1) = (c.ticks(), Instant::now());
            ticks.record(t1.saturating_sub(t0)).unwrap();
            wall.push((i1 - i0).as_nanos() as f64);
        }
        let mut ns = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).unwrap();
        ns.record(7).unwrap();
        c.fold(&ticks, &mut ns);
        assert_eq!(ns.len(), 3);
        assert_eq!(ns.min(), 7);
        // Same intervals, two clocks: within the histogram's 0.1 % and the
        // calibration's error.
        let got = [ns.value_at_quantile(0.5), ns.max()];
        for (g, w) in got.iter().zip(&wall) {
            assert!((*g as f64 / w - 1.0).abs() < 0.01, "{g} ns against {w} ns");
        }
    }
}
