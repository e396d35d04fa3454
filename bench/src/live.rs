//! The live view on stderr while a phase runs: a full screen like
//! elbencho's (percent done, rbench's CPU, current and average rates, a row
//! per thread) or a single line (`--live1`).

use crate::config::{Config, Mode, Phase};
use crate::stats::{Sample, Totals};
use std::io::Write;
use std::time::Duration;

/// Which live view to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Live {
    /// None (not a terminal, or `--nolive`).
    Off,
    /// One line, redrawn in place (`--live1`).
    Line,
    /// The full-screen view on the terminal's alternate screen.
    Full,
}

/// What one thread is expected to move in a phase, for the percent done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Work {
    /// Bytes (I/O phases with a size).
    pub bytes: u64,
    /// Files or directories (everything else).
    pub entries: u64,
}

impl Work {
    /// A thread's share of `phase` under `cfg`.
    pub fn per_thread(cfg: &Config, phase: Phase) -> Self {
        match (&cfg.mode, phase) {
            (Mode::Dir(_), Phase::Mkdirs | Phase::RmDirs) => Work {
                bytes: 0,
                entries: cfg.dirs + 1,
            },
            (Mode::Dir(_), Phase::Write | Phase::Read) => Work {
                bytes: cfg.dirs * cfg.files * cfg.size,
                entries: cfg.dirs * cfg.files,
            },
            (Mode::Dir(_), _) => Work {
                bytes: 0,
                entries: cfg.dirs * cfg.files,
            },
            (Mode::File(paths), _) => Work {
                bytes: cfg.size * paths.len() as u64 / cfg.total_threads() as u64,
                entries: 0,
            },
        }
    }

    /// Percent of this work that `done` (a thread's or, times `n`, all threads') covers.
    pub fn percent(self, done: Totals, n: u64) -> f64 {
        let (d, of) = if self.bytes > 0 {
            (done.bytes, self.bytes * n)
        } else {
            (done.entries, self.entries * n)
        };
        if of == 0 {
            100.0
        } else {
            (d as f64 * 100.0 / of as f64).min(100.0)
        }
    }
}

/// One redraw's figures.
pub struct Frame<'a> {
    /// The phase.
    pub phase: Phase,
    /// Its iteration.
    pub iteration: u64,
    /// Time since it started.
    pub elapsed: Duration,
    /// All threads' totals so far.
    pub totals: Totals,
    /// Rates since the last redraw.
    pub current: &'a Sample,
    /// Each thread's totals and its rates since the last redraw.
    pub threads: &'a [(Totals, Sample)],
    /// Threads finished.
    pub done: usize,
    /// rbench's CPU use since the last redraw, percent of all cores.
    pub cpu_pct: f64,
    /// One thread's share of the work.
    pub work: Work,
}

impl Frame<'_> {
    fn average(&self) -> Sample {
        Sample::between(
            (Duration::ZERO, Totals::default()),
            (self.elapsed, self.totals),
        )
    }

    fn percent(&self) -> f64 {
        self.work.percent(self.totals, self.threads.len() as u64)
    }

    /// The one-line view.
    pub fn line(&self) -> String {
        format!(
            "{:<8} {:>7.1}s {:>4.0}%  {:>9.1} MiB/s  {:>10.0} IOPS  {:>9.0} entries/s  CPU {:>3.0}%  {}/{} threads done",
            self.phase.name(),
            self.elapsed.as_secs_f64(),
            self.percent(),
            self.current.mib_per_s,
            self.current.iops,
            self.current.entries_per_s,
            self.cpu_pct,
            self.done,
            self.threads.len()
        )
    }

    /// The full-screen view, at most `rows` lines.
    pub fn screen(&self, rows: usize) -> String {
        let avg = self.average();
        let mut s = format!(
            "rbench  {}  iteration {}  {:.1} s  {:.0}% done  rbench CPU {:.0}%  {}/{} threads done\n\n",
            self.phase.name(),
            self.iteration,
            self.elapsed.as_secs_f64(),
            self.percent(),
            self.cpu_pct,
            self.done,
            self.threads.len()
        );
        s.push_str(&format!("{:<12}{:>14}{:>14}\n", "", "current", "average"));
        for (name, c, a) in [
            ("MiB/s", self.current.mib_per_s, avg.mib_per_s),
            ("IOPS", self.current.iops, avg.iops),
            ("Entries/s", self.current.entries_per_s, avg.entries_per_s),
        ] {
            s.push_str(&format!("{name:<12}{c:>14.1}{a:>14.1}\n"));
        }
        s.push_str(&format!(
            "\n{:>6} {:>5} {:>12} {:>12} {:>12}\n",
            "Thread", "Done", "MiB/s", "IOPS", "Entries/s"
        ));
        let room = rows.saturating_sub(s.lines().count() + 1).max(1);
        for (i, (t, r)) in self.threads.iter().enumerate() {
            if i + 1 == room && self.threads.len() > room {
                s.push_str(&format!("  ... {} more threads\n", self.threads.len() - i));
                break;
            }
            s.push_str(&format!(
                "{i:>6} {:>4.0}% {:>12.1} {:>12.0} {:>12.0}\n",
                self.work.percent(*t, 1),
                r.mib_per_s,
                r.iops,
                r.entries_per_s
            ));
        }
        s
    }
}

/// Rows of the terminal on stderr (24 when unknown).
fn terminal_rows() -> usize {
    // SAFETY: TIOCGWINSZ fills the winsize we pass.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::ioctl(2, libc::TIOCGWINSZ, &mut ws) };
    if r == 0 && ws.ws_row > 0 {
        ws.ws_row as usize
    } else {
        24
    }
}

/// Leaves the alternate screen on a fatal signal, then dies of it.
extern "C" fn restore_and_die(sig: libc::c_int) {
    const RESTORE: &[u8] = b"\x1b[?1049l\x1b[?25h";
    // SAFETY: write, signal and raise are async-signal-safe.
    unsafe {
        libc::write(2, RESTORE.as_ptr().cast(), RESTORE.len());
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Draws the live view of one phase; leaves the screen as it found it when dropped.
pub struct View {
    live: Live,
}

impl View {
    /// Starts the view (the full screen switches to the alternate screen).
    pub fn start(live: Live) -> Self {
        if live == Live::Full {
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                // SAFETY: installs a handler that only calls async-signal-safe functions.
                unsafe { libc::signal(sig, restore_and_die as *const () as libc::sighandler_t) };
            }
            eprint!("\x1b[?1049h\x1b[?25l");
        }
        Self { live }
    }

    /// Redraws with `frame`.
    pub fn draw(&self, frame: &Frame<'_>) {
        let mut err = std::io::stderr().lock();
        let _ = match self.live {
            Live::Off => Ok(()),
            Live::Line => write!(err, "\r\x1b[2K{}", frame.line()),
            Live::Full => write!(
                err,
                "\x1b[H\x1b[2J{}",
                frame.screen(terminal_rows()).replace('\n', "\r\n")
            ),
        };
        let _ = err.flush();
    }
}

impl Drop for View {
    fn drop(&mut self) {
        match self.live {
            Live::Off => {}
            Live::Line => eprint!("\r\x1b[2K"),
            Live::Full => {
                eprint!("\x1b[?1049l\x1b[?25h");
                for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                    // SAFETY: restores the default disposition.
                    unsafe { libc::signal(sig, libc::SIG_DFL) };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(bytes: u64, entries: u64) -> Totals {
        Totals {
            ops: bytes / 4096,
            bytes,
            entries,
        }
    }

    #[test]
    fn the_screen_shows_percent_cpu_rates_and_a_row_per_thread() {
        let rate = |mib: f64| Sample {
            t_ms: 0.0,
            mib_per_s: mib,
            iops: mib * 256.0,
            entries_per_s: 0.0,
        };
        let threads = [
            (totals(3 << 20, 0), rate(30.0)),
            (totals(1 << 20, 0), rate(10.0)),
        ];
        let f = Frame {
            phase: Phase::Write,
            iteration: 2,
            elapsed: Duration::from_secs(2),
            totals: totals(4 << 20, 0),
            current: &rate(40.0),
            threads: &threads,
            done: 0,
            cpu_pct: 37.4,
            work: Work {
                bytes: 4 << 20,
                entries: 1,
            },
        };
        let s = f.screen(40);
        assert!(
            s.starts_with(
                "rbench  WRITE  iteration 2  2.0 s  50% done  rbench CPU 37%  0/2 threads done"
            ),
            "{s}"
        );
        assert!(
            s.contains("MiB/s                 40.0           2.0"),
            "{s}"
        );
        assert!(s.contains("     0   75%         30.0         7680"), "{s}");
        assert!(s.contains("     1   25%         10.0         2560"), "{s}");
        // A short terminal: rows cut, the rest counted.
        let many: Vec<_> = (0..50).map(|_| threads[0].clone()).collect();
        let s = Frame {
            threads: &many,
            ..f
        }
        .screen(15);
        assert!(s.lines().count() <= 15, "{s}");
        assert!(s.contains("more threads"), "{s}");
        assert!(f.line().contains("  50%") && f.line().contains("CPU  37%"));
    }

    #[test]
    fn work_covers_every_phase() {
        use clap::Parser;
        let dir = std::env::temp_dir();
        let args = crate::config::Args::try_parse_from([
            "rbench",
            "-d",
            "-w",
            "-n",
            "2",
            "-N",
            "3",
            "-s",
            "8k",
            dir.to_str().unwrap(),
        ])
        .unwrap();
        let cfg = Config::from_args(args).unwrap();
        assert_eq!(Work::per_thread(&cfg, Phase::Mkdirs).entries, 3);
        assert_eq!(Work::per_thread(&cfg, Phase::Write).bytes, 6 * 8192);
        assert_eq!(Work::per_thread(&cfg, Phase::Stat).entries, 6);
        let w = Work::per_thread(&cfg, Phase::RmFiles);
        assert_eq!(w.percent(totals(0, 3), 1), 50.0);
    }
}
