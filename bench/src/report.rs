//! Result printers: a human table on stdout, JSON and CSV files.

use crate::error::{BenchError, Result};
use crate::stats::PhaseResult;
use std::io::Write;
use std::path::Path;

/// The human-readable table for one phase.
pub fn text(r: &PhaseResult) -> String {
    let mut s = String::new();
    let row = |s: &mut String, name: &str, a: String, b: String| {
        s.push_str(&format!("{:<10}{:<22}: {:>14} {:>14}\n", "", name, a, b));
    };
    s.push_str(&format!(
        "{:<10}{:<22}  {:>14} {:>14}\n",
        format!("{}{}", r.phase, if r.time_limited { "*" } else { "" }),
        format!("iteration {} / {} thr", r.iteration, r.threads),
        "FIRST DONE",
        "LAST DONE"
    ));
    let f = |v: f64| format!("{v:.1}");
    let ms = |v: f64| format!("{v:.3}");
    row(
        &mut s,
        "Elapsed ms",
        ms(r.first.elapsed_ms),
        ms(r.last.elapsed_ms),
    );
    if r.block_size > 0 {
        row(&mut s, "IOPS", f(r.first.iops), f(r.last.iops));
        row(
            &mut s,
            "Throughput MiB/s",
            f(r.first.mib_per_s),
            f(r.last.mib_per_s),
        );
        let mib = |b: u64| format!("{:.1}", b as f64 / 1048576.0);
        row(&mut s, "Total MiB", mib(r.first.bytes), mib(r.last.bytes));
    }
    if r.last.entries > 0 {
        row(
            &mut s,
            "Entries/s",
            f(r.first.entries_per_s),
            f(r.last.entries_per_s),
        );
        row(
            &mut s,
            "Entries",
            r.first.entries.to_string(),
            r.last.entries.to_string(),
        );
    }
    let l = &r.latency;
    let what = if r.block_size > 0 { "I/O" } else { "Op" };
    s.push_str(&format!(
        "{:<10}{:<22}: min {:.1}  mean {:.1}  max {:.1}\n",
        "",
        format!("{what} latency us"),
        l.min_us,
        l.mean_us,
        l.max_us
    ));
    s.push_str(&format!(
        "{:<10}{:<22}: p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  p99.99 {:.1}\n",
        "", "Percentiles us", l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.p9999_us
    ));
    s.push_str(&format!(
        "{:<10}{:<22}: {:.3} (user {:.3} + sys {:.3})\n",
        "", "rbench CPU s", r.cpu_s, r.cpu_user_s, r.cpu_sys_s
    ));
    if r.time_limited {
        s.push_str(&format!("{:<10}* stopped by --timelimit\n", ""));
    }
    s
}

/// Writes all results as a JSON array.
pub fn write_json(path: &Path, results: &[PhaseResult]) -> Result<()> {
    let data = serde_json::to_vec_pretty(results).expect("results serialize");
    std::fs::write(path, data).map_err(|e| BenchError::io(format!("writing {}", path.display()), e))
}

/// Appends one run's tables to a results file (`--resfile`), under a line
/// with the time and the command line, so runs accumulate in one file.
pub fn append_text(path: &Path, command: &str, tables: &str) -> Result<()> {
    let io = |e: std::io::Error| BenchError::io(format!("writing {}", path.display()), e);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    let entry = format!("# {} UTC: {command}\n{tables}\n", utc_now());
    f.write_all(entry.as_bytes()).map_err(io)
}

/// The current time as `YYYY-MM-DD HH:MM:SS` in UTC.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as libc::time_t;
    // SAFETY: gmtime_r fills the struct we pass from a valid time_t.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe { libc::gmtime_r(&secs, &mut tm) };
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// Column names of the CSV output, in order.
pub const CSV_HEADER: &[&str] = &[
    "label",
    "phase",
    "iteration",
    "threads",
    "block_size",
    "first_elapsed_ms",
    "first_iops",
    "first_mib_per_s",
    "first_entries_per_s",
    "first_bytes",
    "first_entries",
    "last_elapsed_ms",
    "last_iops",
    "last_mib_per_s",
    "last_entries_per_s",
    "last_bytes",
    "last_entries",
    "lat_count",
    "lat_min_us",
    "lat_mean_us",
    "lat_max_us",
    "lat_p50_us",
    "lat_p90_us",
    "lat_p99_us",
    "lat_p999_us",
    "lat_p9999_us",
    "cpu_s",
    "cpu_user_s",
    "cpu_sys_s",
    "time_limited",
];

/// The CSV columns of a first-done or last-done figure, in header order.
fn done_columns(d: &crate::stats::Done) -> [String; 6] {
    [
        format!("{:.3}", d.elapsed_ms),
        format!("{:.1}", d.iops),
        format!("{:.3}", d.mib_per_s),
        format!("{:.1}", d.entries_per_s),
        d.bytes.to_string(),
        d.entries.to_string(),
    ]
}

/// Appends the results as CSV rows, writing the header when the file is new or empty.
pub fn append_csv(path: &Path, results: &[PhaseResult]) -> Result<()> {
    let io = |e: std::io::Error| BenchError::io(format!("writing {}", path.display()), e);
    let fresh = std::fs::metadata(path)
        .map(|m| m.len() == 0)
        .unwrap_or(true);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io)?;
    let mut w = csv::Writer::from_writer(file);
    let csv_err = |e: csv::Error| io(std::io::Error::other(e));
    if fresh {
        w.write_record(CSV_HEADER).map_err(csv_err)?;
    }
    for r in results {
        let l = &r.latency;
        let mut row: Vec<String> = vec![
            r.label.clone(),
            r.phase.clone(),
            r.iteration.to_string(),
            r.threads.to_string(),
            r.block_size.to_string(),
        ];
        row.extend(done_columns(&r.first));
        row.extend(done_columns(&r.last));
        row.extend([
            l.count.to_string(),
            format!("{:.3}", l.min_us),
            format!("{:.3}", l.mean_us),
            format!("{:.3}", l.max_us),
            format!("{:.3}", l.p50_us),
            format!("{:.3}", l.p90_us),
            format!("{:.3}", l.p99_us),
            format!("{:.3}", l.p999_us),
            format!("{:.3}", l.p9999_us),
            format!("{:.4}", r.cpu_s),
            format!("{:.4}", r.cpu_user_s),
            format!("{:.4}", r.cpu_sys_s),
            r.time_limited.to_string(),
        ]);
        w.write_record(&row).map_err(csv_err)?;
    }
    w.flush().map_err(io)?;
    let _ = std::io::stdout().flush();
    Ok(())
}
