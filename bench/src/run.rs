//! The coordinator: runs each phase on all threads from a common start,
//! takes the first-done and last-done figures, and measures its own CPU time.

use crate::config::{Config, Mode, Phase};
use crate::error::{BenchError, Result};
use crate::stats::{self, Counters, Done, Latency, PhaseResult, Totals};
use crate::work::{self, Worker};
use std::fs::File;
use std::sync::{Barrier, mpsc};
use std::time::Instant;

/// Runs every iteration of every phase, handing each result to `sink` as
/// soon as it is known.
pub fn run(cfg: &Config, sink: &mut dyn FnMut(&PhaseResult) -> Result<()>) -> Result<()> {
    let mut iteration = 0u64;
    while cfg.iterations.is_none_or(|n| iteration < n) {
        iteration += 1;
        for &phase in &cfg.phases {
            let r = run_phase(cfg, phase, iteration)?;
            sink(&r)?;
            after_phase(cfg)?;
        }
    }
    Ok(())
}

fn shared_fds(cfg: &Config, phase: Phase) -> Result<Vec<File>> {
    match (&cfg.mode, cfg.sharedfd) {
        (Mode::File(paths), true) => paths
            .iter()
            .map(|p| {
                work::open(p, phase == Phase::Write, true, false, cfg.direct)
                    .map_err(|e| BenchError::io(format!("opening {}", p.display()), e))
            })
            .collect(),
        _ => Ok(Vec::new()),
    }
}

/// Runs one phase on all threads.
pub fn run_phase(cfg: &Config, phase: Phase, iteration: u64) -> Result<PhaseResult> {
    let shared = shared_fds(cfg, phase)?;
    let counters: Vec<Counters> = (0..cfg.threads).map(|_| Counters::default()).collect();
    let barrier = Barrier::new(cfg.threads + 1);
    let (tx, rx) = mpsc::channel();
    let (user0, sys0) = stats::cpu_times();
    let mut first: Option<(Totals, Instant)> = None;
    let mut outcomes = Vec::with_capacity(cfg.threads);
    std::thread::scope(|s| {
        for (thread, c) in counters.iter().enumerate() {
            let (tx, barrier, shared) = (tx.clone(), &barrier, &shared);
            s.spawn(move || {
                let w = Worker {
                    cfg,
                    thread,
                    counters: c,
                    shared,
                };
                let mut hist = stats::new_histogram();
                barrier.wait();
                let begun = Instant::now();
                let r = w.run(phase, &mut hist);
                let _ = tx.send((r.map(|cut| (hist, cut)), begun, Instant::now()));
            });
        }
        drop(tx);
        barrier.wait();
        for (outcome, begun, end) in rx.iter() {
            if first.is_none() {
                let totals = counters
                    .iter()
                    .map(Counters::snapshot)
                    .fold(Totals::default(), |a, b| a + b);
                first = Some((totals, end));
            }
            outcomes.push((outcome, begun, end));
        }
    });
    let (user1, sys1) = stats::cpu_times();

    // The phase starts when the first thread leaves the barrier.
    let start = outcomes
        .iter()
        .map(|o| o.1)
        .min()
        .expect("at least one thread");
    let mut hist = stats::new_histogram();
    let mut cut = false;
    let mut last_end = start;
    for (outcome, _, end) in outcomes {
        let (h, c) = outcome?;
        hist.add(&h).expect("histograms share bounds");
        cut |= c;
        last_end = last_end.max(end);
    }
    let totals = counters
        .iter()
        .map(Counters::snapshot)
        .fold(Totals::default(), |a, b| a + b);
    let (first_totals, first_end) = first.unwrap_or((totals, last_end));
    Ok(PhaseResult {
        label: cfg.label.clone(),
        phase: phase.name().to_owned(),
        iteration,
        threads: cfg.threads,
        block_size: if matches!(phase, Phase::Write | Phase::Read) {
            cfg.block
        } else {
            0
        },
        first: Done::new(first_totals, first_end - start),
        last: Done::new(totals, last_end - start),
        latency: Latency::from_histogram(&hist),
        cpu_s: (user1 - user0) + (sys1 - sys0),
        cpu_user_s: user1 - user0,
        cpu_sys_s: sys1 - sys0,
        time_limited: cut,
    })
}

fn after_phase(cfg: &Config) -> Result<()> {
    if cfg.sync || cfg.dropcache {
        let target = match &cfg.mode {
            Mode::Dir(d) => d.clone(),
            Mode::File(ps) => ps[0].clone(),
        };
        let f = File::open(&target)
            .map_err(|e| BenchError::io(format!("opening {}", target.display()), e))?;
        // SAFETY: syncfs on an open descriptor.
        if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) } != 0 {
            return Err(BenchError::io(
                format!("syncfs {}", target.display()),
                std::io::Error::last_os_error(),
            ));
        }
    }
    if cfg.dropcache {
        std::fs::write("/proc/sys/vm/drop_caches", b"3")
            .map_err(|e| BenchError::io("dropping the page cache (needs root)", e))?;
    }
    Ok(())
}
