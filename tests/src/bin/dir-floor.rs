//! dir-floor: the filesystem work of local-path's create+delete pairs with
//! no driver around it, as the limit csi-bench figures are read against.
//! Each of `--threads` threads makes a directory in place, chmods it and
//! removes it, spread over 16 shard directories as local-path does; no
//! journal.
//!
//! The last line printed is machine-readable: `pairs_per_s=...`

use anyhow::{Context, Result};
use clap::Parser;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Rate of bare mkdir, chmod, rmdir cycles in 16 shard directories")]
struct Args {
    /// Directory to work in (made with its shards if missing; left with
    /// empty shards).
    dir: PathBuf,
    /// Concurrent threads.
    #[arg(long, default_value_t = 16)]
    threads: usize,
    /// Total cycles across all threads.
    #[arg(long, default_value_t = 4000)]
    ops: usize,
}

/// Shard directories, as local-path's `volumes/0` to `volumes/f`.
const SHARDS: usize = 16;

fn cycle(dir: &std::path::Path, t: usize, i: usize) -> std::io::Result<()> {
    // local-path's ids end in a random hex digit: a well-mixed one here.
    let h = ((t as u64) << 32 | i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let shard = (h >> 60) as usize % SHARDS;
    let vol = dir.join(format!("{shard:x}")).join(format!("v-{t}-{i}"));
    std::fs::create_dir(&vol)?;
    std::fs::set_permissions(&vol, std::fs::Permissions::from_mode(0o777))?;
    std::fs::remove_dir(&vol)
}

fn main() -> Result<()> {
    let a = Args::parse();
    for s in 0..SHARDS {
        let d = a.dir.join(format!("{s:x}"));
        std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    }
    let threads = a.threads.max(1);
    let per = a.ops.div_ceil(threads);
    let start = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let dir = &a.dir;
                s.spawn(move || (0..per).try_for_each(|i| cycle(dir, t, i)))
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("worker panicked"))
    })
    .with_context(|| format!("working in {}", a.dir.display()))?;
    let secs = start.elapsed().as_secs_f64();
    let cycles = per * threads;
    println!("{cycles} cycles from {threads} threads in {secs:.2} s");
    println!("pairs_per_s={:.0}", cycles as f64 / secs);
    Ok(())
}
