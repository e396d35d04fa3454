//! The tables `rbench k8s` prints besides the workload's own.

use super::{ClassRun, VolumeTimes};

/// Percentile `p` (0-100) of `v` (sorted here).
fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[(((v.len() - 1) as f64) * p / 100.0).round() as usize]
}

/// The provisioning table: per volume, and p50 / p90 / max over them.
pub fn provisioning_table(run: &ClassRun) -> String {
    let mut out = format!(
        "provisioning ({}): seconds from each claim's creation\n{:<12} {:<16} {:>8} {:>8} {:>10} {:>8}\n",
        run.storage_class, "volume", "node", "bound", "running", "answering", "deleted"
    );
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    for t in &run.volumes {
        out += &format!(
            "{:<12} {:<16} {:>8} {:>8} {:>10} {:>8}\n",
            t.name,
            t.node,
            f(t.bound_s),
            f(t.running_s),
            f(t.answering_s),
            f(t.deleted_s)
        );
    }
    if run.volumes.len() > 1 {
        let col = |g: fn(&VolumeTimes) -> Option<f64>| -> Vec<f64> {
            run.volumes.iter().filter_map(g).collect()
        };
        for (label, p) in [("p50", 50.0), ("p90", 90.0), ("max", 100.0)] {
            let v = |g| {
                let mut c = col(g);
                if c.is_empty() {
                    "-".to_owned()
                } else {
                    format!("{:.1}", percentile(&mut c, p))
                }
            };
            out += &format!(
                "{:<12} {:<16} {:>8} {:>8} {:>10} {:>8}\n",
                label,
                "",
                v(|t| t.bound_s),
                v(|t| t.running_s),
                v(|t| t.answering_s),
                v(|t| t.deleted_s)
            );
        }
    }
    out
}

/// StorageClasses side by side: per phase, throughput, IOPS, entries/s and
/// latency over all pods, and the median time to a running pod.
pub fn side_by_side(runs: &[ClassRun]) -> String {
    let mut out = format!(
        "{:<20} {:<8} {:>10} {:>11} {:>10} {:>10} {:>10} {:>9}\n",
        "storageclass", "phase", "MiB/s", "IOPS", "entries/s", "p50 us", "p99 us", "ready s"
    );
    for r in runs {
        let mut ready: Vec<f64> = r.volumes.iter().filter_map(|t| t.answering_s).collect();
        let ready = percentile(&mut ready, 50.0);
        for p in &r.results {
            out += &format!(
                "{:<20} {:<8} {:>10.1} {:>11.1} {:>10.1} {:>10.1} {:>10.1} {:>9.1}\n",
                r.storage_class,
                p.phase,
                p.last.mib_per_s,
                p.last.iops,
                p.last.entries_per_s,
                p.latency.p50_us,
                p.latency.p99_us,
                ready
            );
        }
    }
    out
}
