//! The coordinator: runs each phase on all threads from a common start,
//! takes the first-done and last-done figures, and measures its own CPU time.

use crate::config::{Config, Mode, Phase};
use crate::engine::Mixed;
use crate::error::{BenchError, Result};
use crate::fill::Rng;
use crate::live::{Frame, Live, View, Work};
use crate::stats::{self, Counters, Done, Latency, PhaseResult, Sample, Totals};
use crate::work::{self, Worker};
use std::fs::File;
use std::sync::Arc;
use std::sync::{Barrier, mpsc};
use std::time::{Duration, Instant};

/// How often throughput is sampled (and the live view redrawn).
const TICK: Duration = Duration::from_millis(100);

/// Runs every iteration of every phase, handing each result to `sink` as
/// soon as it is known.
pub fn run(cfg: &Config, sink: &mut dyn FnMut(&PhaseResult) -> Result<()>) -> Result<()> {
    let mut iteration = 0u64;
    while cfg.iterations.is_none_or(|n| iteration < n) {
        iteration += 1;
        for &phase in &cfg.phases {
            prepare_targets(cfg, phase)?;
            for r in run_phase(cfg, phase, iteration)? {
                sink(&r)?;
            }
            after_phase(cfg)?;
        }
    }
    Ok(())
}

/// File mode, before writing: --trunc recreates regular files at --size,
/// --prealloc reserves them, mixed reads need the full size present.
pub fn prepare_targets(cfg: &Config, phase: Phase) -> Result<()> {
    let Mode::File(paths) = &cfg.mode else {
        return Ok(());
    };
    if phase != Phase::Write || !(cfg.trunc || cfg.prealloc || cfg.rwmixpct.is_some()) {
        return Ok(());
    }
    for p in paths {
        if std::fs::metadata(p).is_ok_and(|m| !m.is_file()) {
            continue;
        }
        let io = |e| BenchError::io(format!("preparing {}", p.display()), e);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(cfg.trunc)
            .open(p)
            .map_err(io)?;
        if cfg.prealloc {
            // SAFETY: fallocate on an open descriptor.
            if unsafe {
                libc::fallocate(
                    std::os::fd::AsRawFd::as_raw_fd(&f),
                    0,
                    0,
                    cfg.size as libc::off_t,
                )
            } != 0
            {
                return Err(io(std::io::Error::last_os_error()));
            }
        }
        if f.metadata().map_err(io)?.len() < cfg.size {
            f.set_len(cfg.size).map_err(io)?;
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

/// Runs one phase on all threads; a write phase with `--rwmixpct` also
/// yields the mixed-in reads as a second result (RWMIXREAD).
pub fn run_phase(cfg: &Config, phase: Phase, iteration: u64) -> Result<Vec<PhaseResult>> {
    let shared = shared_fds(cfg, phase)?;
    let counters: Vec<Counters> = (0..cfg.threads).map(|_| Counters::default()).collect();
    let mixing = phase == Phase::Write && cfg.rwmixpct.is_some();
    let mix_counters: Vec<Arc<Counters>> = (0..cfg.threads).map(|_| Arc::default()).collect();
    let mismatches = crate::engine::Mismatches::new(cfg.verify_limit);
    let barrier = Barrier::new(cfg.threads + 1);
    let (tx, rx) = mpsc::channel();
    let cpu0 = stats::cpu_times();
    let (user0, sys0) = cpu0;
    let mut first: Option<(Totals, Totals, Instant)> = None;
    let mut outcomes = Vec::with_capacity(cfg.threads);
    let mut series = Vec::new();
    let mut mix_series = Vec::new();
    std::thread::scope(|s| {
        for (thread, c) in counters.iter().enumerate() {
            let (tx, barrier, shared, mismatches) = (tx.clone(), &barrier, &shared, &mismatches);
            let mut mixed = mixing.then(|| Mixed {
                counters: mix_counters[thread].clone(),
                hist: stats::new_histogram(),
                rng: Rng::new(0x6d69_7800 ^ thread as u64),
            });
            s.spawn(move || {
                crate::work::private_fd_table();
                let w = Worker {
                    cfg,
                    thread,
                    counters: c,
                    shared,
                    mismatches,
                };
                let mut hist = stats::new_histogram();
                barrier.wait();
                let begun = Instant::now();
                let r = w.run(phase, &mut hist, mixed.as_mut());
                let mixed_hist = mixed.map(|m| m.hist);
                let _ = tx.send((r.map(|cut| (hist, mixed_hist, cut)), begun, Instant::now()));
            });
        }
        drop(tx);
        let view = View::start(cfg.live);
        let work = Work::per_thread(cfg, phase);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let mut thread_prev = vec![Totals::default(); cfg.threads];
        let mut cpu_prev = cpu0;
        barrier.wait();
        let t0 = Instant::now();
        let mut prev = (Duration::ZERO, Totals::default());
        let mut mix_prev = prev;
        loop {
            match rx.recv_timeout(TICK) {
                Ok((outcome, begun, end)) => {
                    if first.is_none() {
                        first = Some((
                            sum(counters.iter()),
                            sum(mix_counters.iter().map(|c| &**c)),
                            end,
                        ));
                    }
                    outcomes.push((outcome, begun, end));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let now = (t0.elapsed(), sum(counters.iter()));
                    let sample = Sample::between(prev, now);
                    if cfg.live != Live::Off {
                        let dt = now.0 - prev.0;
                        let threads: Vec<(Totals, Sample)> = counters
                            .iter()
                            .zip(mix_counters.iter())
                            .zip(thread_prev.iter_mut())
                            .map(|((c, mc), p)| {
                                let t = c.snapshot() + mc.snapshot();
                                let r = Sample::between((Duration::ZERO, *p), (dt, t));
                                *p = t;
                                (t, r)
                            })
                            .collect();
                        let cpu = stats::cpu_times();
                        let used = (cpu.0 + cpu.1) - (cpu_prev.0 + cpu_prev.1);
                        cpu_prev = cpu;
                        view.draw(&Frame {
                            phase,
                            iteration,
                            elapsed: now.0,
                            totals: now.1 + sum(mix_counters.iter().map(|c| &**c)),
                            current: &sample,
                            threads: &threads,
                            done: outcomes.len(),
                            cpu_pct: used / dt.as_secs_f64().max(1e-9) / cores * 100.0,
                            work,
                        });
                    }
                    series.push(sample);
                    prev = now;
                    if mixing {
                        let m = (now.0, sum(mix_counters.iter().map(|c| &**c)));
                        mix_series.push(Sample::between(mix_prev, m));
                        mix_prev = m;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let now = (t0.elapsed(), sum(counters.iter()));
        if now.0 > prev.0 {
            series.push(Sample::between(prev, now));
            if mixing {
                let m = (now.0, sum(mix_counters.iter().map(|c| &**c)));
                mix_series.push(Sample::between(mix_prev, m));
            }
        }
        drop(view);
    });
    let (user1, sys1) = stats::cpu_times();

    // The phase starts when the first thread leaves the barrier.
    let start = outcomes
        .iter()
        .map(|o| o.1)
        .min()
        .expect("at least one thread");
    let mut hist = stats::new_histogram();
    let mut mix_hist = stats::new_histogram();
    let mut cut = false;
    let mut last_end = start;
    for (outcome, _, end) in outcomes {
        let (h, mh, c) = outcome?;
        hist.add(&h).expect("histograms share bounds");
        if let Some(mh) = mh {
            mix_hist.add(&mh).expect("histograms share bounds");
        }
        cut |= c;
        last_end = last_end.max(end);
    }
    if let Some(e) = mismatches.error() {
        return Err(e);
    }
    let totals = sum(counters.iter());
    let mix_totals = sum(mix_counters.iter().map(|c| &**c));
    let (first_totals, first_mix, first_end) = first.unwrap_or((totals, mix_totals, last_end));
    let mut results = vec![PhaseResult {
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
        series,
        histogram: stats::buckets(&hist),
        hdr: Some(hist),
        ..Default::default()
    }];
    if mixing {
        let mixed = PhaseResult {
            phase: "RWMIXREAD".into(),
            first: Done::new(first_mix, first_end - start),
            last: Done::new(mix_totals, last_end - start),
            latency: Latency::from_histogram(&mix_hist),
            series: mix_series,
            histogram: stats::buckets(&mix_hist),
            hdr: Some(mix_hist),
            ..results[0].clone()
        };
        results.push(mixed);
    }
    Ok(results)
}

fn sum<'c>(counters: impl Iterator<Item = &'c Counters>) -> Totals {
    counters
        .map(Counters::snapshot)
        .fold(Totals::default(), |a, b| a + b)
}

/// `--sync` and `--dropcache` after a phase.
pub fn after_phase(cfg: &Config) -> Result<()> {
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
