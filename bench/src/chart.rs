//! `--chart FILE.svg`: one document for the run, a row per phase with its
//! latency histogram (log-scale x axis) and its throughput over time, both
//! axes labelled with values, drawn as plain SVG.

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
    let trim = |x: f64| {
        let t = format!("{x:.1}");
        t.trim_end_matches(".0").to_owned()
    };
    if v >= 1e6 {
        format!("{}s", trim(v / 1e6))
    } else if v >= 1e3 {
        format!("{}ms", trim(v / 1e3))
    } else {
        format!("{}us", trim(v))
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
        histogram(&mut s, r, 60.0, top + 30.0, 410.0, 200.0);
        series(&mut s, r, 570.0, top + 30.0, 410.0, 200.0);
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
        yl = x - 44.0,
        cy = y + h / 2.0,
    );
}

/// A labelled tick on the x axis at `px`.
fn x_tick(s: &mut String, px: f64, y: f64, h: f64, label: &str) {
    let _ = writeln!(
        s,
        r##"<path d="M{px:.1} {b} v4" stroke="#333"/><text x="{px:.1}" y="{ty}" text-anchor="middle" font-size="9">{label}</text>"##,
        b = y + h,
        ty = y + h + 14.0,
    );
}

/// Labelled ticks and light grid lines at 0, half and the top of the y axis.
fn y_ticks(s: &mut String, x: f64, y: f64, w: f64, h: f64, max: f64) {
    for f in [0.0, 0.5, 1.0] {
        let py = y + h - h * f;
        let _ = writeln!(
            s,
            r##"<path d="M{x0} {py:.1} H{x1}" stroke="#ddd"/><text x="{tx}" y="{ty:.1}" text-anchor="end" font-size="9">{}</text>"##,
            short(max * f),
            x0 = x,
            x1 = x + w,
            tx = x - 4.0,
            ty = py + 3.0,
        );
    }
}

/// The latency histogram on a true log2 x axis: every bucket keeps its
/// width, empty ones included, with ticks at powers of ten.
fn histogram(s: &mut String, r: &PhaseResult, x: f64, y: f64, w: f64, h: f64) {
    axes(s, x, y, w, h, "latency (log scale)", "operations");
    let first = r.histogram.iter().position(|b| b.count > 0);
    let last = r.histogram.iter().rposition(|b| b.count > 0);
    let (Some(first), Some(last)) = (first, last) else {
        return;
    };
    let buckets = &r.histogram[first..=last];
    let max = buckets.iter().map(|b| b.count).max().unwrap_or(1);
    // Bucket i holds (le/2, le]; the axis spans the shown buckets, one octave at least.
    let lo = (buckets[0].le_us / 2.0).log2();
    let hi = buckets[buckets.len() - 1].le_us.log2().max(lo + 1.0);
    let px = |us: f64| x + w * (us.log2() - lo) / (hi - lo);
    y_ticks(s, x, y, w, h, max as f64);
    for b in buckets.iter().filter(|b| b.count > 0) {
        let (x0, x1) = (px(b.le_us / 2.0), px(b.le_us));
        let bh = h * b.count as f64 / max as f64;
        let _ = writeln!(
            s,
            r##"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="#4a7ab5"><title>{} to {}: {}</title></rect>"##,
            y + h - bh,
            (x1 - x0 - 1.0).max(1.0),
            us(b.le_us / 2.0),
            us(b.le_us),
            b.count
        );
    }
    let mut decade = 10f64.powf((lo * std::f64::consts::LOG10_2).ceil());
    let mut ticks = 0;
    while decade.log2() <= hi + 1e-9 {
        x_tick(s, px(decade), y, h, &us(decade));
        decade *= 10.0;
        ticks += 1;
    }
    if ticks < 2 {
        // Less than a decade shown: label both ends instead.
        x_tick(s, x, y, h, &us(2f64.powf(lo)));
        x_tick(s, x + w, y, h, &us(2f64.powf(hi)));
    }
}

/// Throughput (or entries) over time; a phase shorter than one sample is a point.
fn series(s: &mut String, r: &PhaseResult, x: f64, y: f64, w: f64, h: f64) {
    let io = r.block_size > 0;
    let unit = if io { "MiB/s" } else { "entries/s" };
    axes(s, x, y, w, h, "time", unit);
    let mut pts: Vec<(f64, f64)> = r
        .series
        .iter()
        .map(|p| (p.t_ms / 1e3, if io { p.mib_per_s } else { p.entries_per_s }))
        .collect();
    if pts.len() < 2 {
        let avg = if io {
            r.last.mib_per_s
        } else {
            r.last.entries_per_s
        };
        pts = vec![(r.last.elapsed_ms / 1e3, avg)];
    }
    let t_max = pts
        .last()
        .map_or(0.0, |p| p.0)
        .max(r.last.elapsed_ms / 1e3)
        .max(1e-9);
    let v_max = pts.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-9);
    y_ticks(s, x, y, w, h, v_max);
    for f in [0.0, 0.5, 1.0] {
        x_tick(s, x + w * f, y, h, &secs(t_max * f));
    }
    let at = |(t, v): (f64, f64)| (x + w * t / t_max, y + h - h * v / v_max);
    if let [p] = pts[..] {
        let (px, py) = at(p);
        let _ = writeln!(
            s,
            r##"<circle cx="{px:.1}" cy="{py:.1}" r="4" fill="#c0392b"><title>whole phase: {}</title></circle>"##,
            short(p.1)
        );
        return;
    }
    let mut d = String::new();
    for (i, &p) in pts.iter().enumerate() {
        let (px, py) = at(p);
        let _ = write!(d, "{}{px:.1} {py:.1} ", if i == 0 { "M" } else { "L" });
    }
    let _ = writeln!(
        s,
        r##"<path d="{d}" stroke="#c0392b" stroke-width="1.5" fill="none"/>"##
    );
}

fn secs(v: f64) -> String {
    match v {
        v if v >= 10.0 => format!("{v:.0}s"),
        v if v >= 1.0 => format!("{v:.1}s"),
        v if v >= 0.01 => format!("{:.0}ms", v * 1e3),
        v if v > 0.0 => format!("{:.2}ms", v * 1e3),
        _ => "0".into(),
    }
}
