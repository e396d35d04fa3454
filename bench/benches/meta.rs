//! rbench's metadata phases against the bare syscall loop (the physical
//! limit on this machine): `--stat` against statx and `-F` against unlinkat,
//! each on files of one directory, single thread, medians of alternating rounds.
//! Usage: cargo bench -p rbench --bench meta [-- DIR [FILES]] (DIR defaults to /dev/shm).

use clap::Parser;
use rbench::config::{Args, Config};
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Instant;

/// Runs rbench with these options on `dir`; returns entries per second of its last phase.
fn rbench(opts: &[&str], dir: &Path) -> f64 {
    let argv = ["rbench", "--progress", "never"]
        .into_iter()
        .chain(opts.iter().copied())
        .chain([dir.to_str().unwrap()]);
    let cfg = Config::from_args(Args::try_parse_from(argv).unwrap()).unwrap();
    let mut rate = 0.0;
    rbench::run::run(&cfg, &mut |r| {
        rate = r.last.entries_per_s;
        Ok(())
    })
    .unwrap();
    rate
}

fn open_dir(p: &Path) -> OwnedFd {
    std::fs::File::open(p).unwrap().into()
}

/// statx of every name relative to the open directory; entries per second.
fn bare_stat(dir: &OwnedFd, names: &[CString]) -> f64 {
    let t = Instant::now();
    for n in names {
        // SAFETY: statx fills the struct we pass; the name is NUL-terminated.
        let mut st: libc::statx = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::statx(
                dir.as_raw_fd(),
                n.as_ptr(),
                0,
                libc::STATX_BASIC_STATS,
                &mut st,
            )
        };
        assert_eq!(r, 0);
    }
    names.len() as f64 / t.elapsed().as_secs_f64()
}

/// unlinkat of every name in the open directory; entries per second.
fn bare_unlink(dir: &OwnedFd, names: &[CString]) -> f64 {
    let t = Instant::now();
    for n in names {
        // SAFETY: unlinkat on an open directory with a NUL-terminated name.
        assert_eq!(unsafe { libc::unlinkat(dir.as_raw_fd(), n.as_ptr(), 0) }, 0);
    }
    names.len() as f64 / t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let parent = args.first().map_or("/dev/shm", String::as_str);
    let files: usize = args.get(1).map_or(100_000, |n| n.parse().unwrap());
    let base = tempfile::tempdir_in(parent).unwrap();
    let (n, dir) = (files.to_string(), base.path().join("t0").join("d0"));
    let create = ["-d", "-w", "-s", "0", "-N", &n];
    let names: Vec<CString> = (0..files)
        .map(|f| CString::new(format!("f{f}")).unwrap())
        .collect();
    let (mut stat, mut bstat, mut unlink, mut bunlink) = (vec![], vec![], vec![], vec![]);
    // Who goes first alternates, so neither side always meets the fresher
    // caches. Stat changes nothing, so its rounds share one tree.
    rbench(&create, base.path());
    let d = open_dir(&dir);
    for round in 0..STAT_ROUNDS {
        let first = round % 2 == 0;
        if first {
            bstat.push(bare_stat(&d, &names));
        }
        stat.push(rbench(&["--stat", "-N", &n], base.path()));
        if !first {
            bstat.push(bare_stat(&d, &names));
        }
    }
    for round in 0..UNLINK_ROUNDS {
        if round % 2 == 0 {
            unlink.push(rbench(&["-F", "-N", &n], base.path()));
            rbench(&create, base.path());
            bunlink.push(bare_unlink(&d, &names));
        } else {
            bunlink.push(bare_unlink(&d, &names));
            rbench(&create, base.path());
            unlink.push(rbench(&["-F", "-N", &n], base.path()));
        }
        rbench(&create, base.path());
    }
    println!("{files} files in one directory under {parent}, 1 thread, alternating rounds:");
    for (what, r, b) in [("stat", stat, bstat), ("unlink", unlink, bunlink)] {
        let count = r.len();
        let rounds = median(r.iter().zip(&b).map(|(r, b)| r / b).collect());
        let (r, b) = (median(r), median(b));
        println!(
            "  {what:<7} rbench {r:>10.0}/s   bare syscall loop {b:>10.0}/s   \
             rbench/bare {:.3} (median of the {count} rounds' own ratios {rounds:.3})",
            r / b
        );
    }
}

/// Rounds of each side; medians are over these.
const STAT_ROUNDS: usize = 30;
/// Unlink rounds each recreate the files twice, so fewer.
const UNLINK_ROUNDS: usize = 9;
