//! `--chart FILE.svg`: per phase, the latency histogram and the throughput
//! over time, drawn as plain SVG.

use crate::stats::PhaseResult;
use std::fmt::Write;

const W: f64 = 1000.0;
const ROW: f64 = 280.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn short(v: f64) -> String {
    match v {
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e4 => format!("{:.0}k", v / 1e3),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v if v >= 10.0 => format!("{v:.0}"),
        v => format!("{v:.1}"),
    }
}

fn us(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.0}s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.0}ms", v / 1e3)
    } else {
        format!("{v:.0}us")
    }
}

/// Renders every phase result into one SVG document.
pub fn render(results: &[PhaseResult]) -> String {
    let h = ROW * results.len().max(1) as f64 + 20.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, r) in results.iter().enumerate() {
        let top = 10.0 + ROW * i as f64;
        let title = format!(
            "{} (iteration {}, {} threads{}): p50 {} us, p99 {} us, p99.99 {} us",
            r.phase,
            r.iteration,
            r.threads,
            if r.label.is_empty() {
                String::new()
            } else {
                format!(", {}", r.label)
            },
            short(r.latency.p50_us),
            short(r.latency.p99_us),
            short(r.latency.p9999_us)
        );
        let _ = writeln!(
            s,
            r#"<text x="10" y="{}" font-size="13" font-weight="bold">{}</text>"#,
            top + 14.0,
            esc(&title)
        );
        histogram(&mut s, r, 50.0, top + 30.0, 420.0, 200.0);
        series(&mut s, r, 560.0, top + 30.0, 420.0, 200.0);
    }
    s.push_str("</svg>\n");
    s
}

fn axes(s: &mut String, x: f64, y: f64, w: f64, h: f64, xlabel: &str, ylabel: &str) {
    let _ = writeln!(
        s,
        r##"<path d="M{x} {y} V{b} H{r}" stroke="#333" fill="none"/><text x="{cx}" y="{ly}" text-anchor="middle">{xlabel}</text><text x="{yl}" y="{cy}" text-anchor="middle" transform="rotate(-90 {yl} {cy})">{ylabel}</text>"##,
        b = y + h,
        r = x + w,
        cx = x + w / 2.0,
        ly = y + h + 30.0,
        yl = x - 38.0,
        cy = y + h / 2.0,
    );
}

fn histogram(s: &mut String, r: &PhaseResult, x: f64, y: f64, w: f64, h: f64) {
    axes(s, x, y, w, h, "latency (log2 buckets)", "operations");
    let buckets: Vec<_> = r.histogram.iter().filter(|b| b.count > 0).collect();
    let Some(max) = buckets.iter().map(|b| b.count).max() else {
        return;
    };
    let n = buckets.len() as f64;
    let bw = w / n;
    for (i, b) in buckets.iter().enumerate() {
        let bh = h * b.count as f64 / max as f64;
        let bx = x + bw * i as f64;
        let _ = writeln!(
            s,
            r##"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="#4a7ab5"><title>&lt;= {} : {}</title></rect>"##,
            y + h - bh,
            (bw - 1.0).max(1.0),
            us(b.le_us),
            b.count
        );
        if buckets.len() <= 12 || i % (buckets.len() / 8).max(1) == 0 {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle" font-size="9">{}</text>"#,
                bx + bw / 2.0,
                y + h + 12.0,
                us(b.le_us)
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="end" font-size="9">{max}</text>"#,
        x - 3.0,
        y + 8.0
    );
}

fn series(s: &mut String, r: &PhaseResult, x: f64, y: f64, w: f64, h: f64) {
    let io = r.block_size > 0;
    let unit = if io { "MiB/s" } else { "entries/s" };
    axes(s, x, y, w, h, "time (s)", unit);
    let pts: Vec<(f64, f64)> = r
        .series
        .iter()
        .map(|p| (p.t_ms / 1e3, if io { p.mib_per_s } else { p.entries_per_s }))
        .collect();
    let t_max = pts
        .last()
        .map_or(0.0, |p| p.0)
        .max(r.last.elapsed_ms / 1e3)
        .max(1e-3);
    let v_max = pts.iter().map(|p| p.1).fold(0.0, f64::max);
    if pts.is_empty() || v_max <= 0.0 {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">phase shorter than one sample (100 ms)</text>"#,
            x + w / 2.0,
            y + h / 2.0
        );
        return;
    }
    let mut d = String::new();
    for (i, (t, v)) in pts.iter().enumerate() {
        let px = x + w * t / t_max;
        let py = y + h - h * v / v_max;
        let _ = write!(d, "{}{px:.1} {py:.1} ", if i == 0 { "M" } else { "L" });
    }
    let _ = writeln!(
        s,
        r##"<path d="{d}" stroke="#c0392b" stroke-width="1.5" fill="none"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="end" font-size="9">{}</text>"#,
        x - 3.0,
        y + 8.0,
        short(v_max)
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="end" font-size="9">{:.1}</text>"#,
        x + w,
        y + h + 12.0,
        t_max
    );
}
