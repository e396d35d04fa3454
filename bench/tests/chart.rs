//! `--chart`: the SVG rendered to PNG (resvg) and its pixels checked where
//! the bars, the throughput line and a short phase's point must be.

use rbench::stats::{self, Done, PhaseResult, Sample, Totals};
use resvg::{tiny_skia, usvg};
use std::time::Duration;

const BAR: [u8; 3] = [0x4a, 0x7a, 0xb5];
const LINE: [u8; 3] = [0xc0, 0x39, 0x2b];

/// A phase whose latencies are `values` (ns, count) and throughput `rates` every 100 ms.
fn result(phase: &str, values: &[(u64, u64)], rates: &[f64], elapsed_ms: f64) -> PhaseResult {
    let mut h = stats::new_histogram();
    for &(ns, n) in values {
        h.record_n(ns, n).unwrap();
    }
    let series = rates
        .iter()
        .enumerate()
        .map(|(i, &r)| Sample {
            t_ms: 100.0 * (i + 1) as f64,
            mib_per_s: r,
            iops: r * 256.0,
            entries_per_s: r,
        })
        .collect();
    let done = Done::new(
        Totals {
            ops: 100,
            bytes: 100 << 20,
            entries: 100,
        },
        Duration::from_secs_f64(elapsed_ms / 1e3),
    );
    PhaseResult {
        phase: phase.into(),
        iteration: 1,
        threads: 1,
        block_size: if phase == "WRITE" { 4096 } else { 0 },
        first: done.clone(),
        last: done,
        histogram: stats::buckets(&h),
        series,
        ..Default::default()
    }
}

struct Png(tiny_skia::Pixmap);

impl Png {
    fn render(svg: &str) -> Self {
        let tree = usvg::Tree::from_str(svg, &usvg::Options::default()).unwrap();
        let size = tree.size().to_int_size();
        let mut pm = tiny_skia::Pixmap::new(size.width(), size.height()).unwrap();
        resvg::render(&tree, tiny_skia::Transform::identity(), &mut pm.as_mut());
        // Through an encoded PNG and back, as a viewer would get it.
        Png(tiny_skia::Pixmap::decode_png(&pm.encode_png().unwrap()).unwrap())
    }

    /// Pixels of `color` (within a small tolerance) in the box x0..x1, y0..y1.
    fn count(&self, color: [u8; 3], (x0, x1): (u32, u32), (y0, y1): (u32, u32)) -> usize {
        let mut n = 0;
        for y in y0..y1 {
            for x in x0..x1 {
                let p = self.0.pixel(x, y).unwrap();
                let c = [p.red(), p.green(), p.blue()];
                if c.iter().zip(color).all(|(a, b)| a.abs_diff(b) <= 12) {
                    n += 1;
                }
            }
        }
        n
    }
}

#[test]
fn the_chart_renders_with_log_latency_labelled_axes_and_short_phases_as_points() {
    let rs = [
        // Fast and slow operations: the x axis is log scale, so the empty
        // buckets between them keep their room.
        result(
            "WRITE",
            &[(1_500, 1000), (900_000, 10)],
            &[100.0, 300.0, 200.0, 250.0, 150.0],
            500.0,
        ),
        // Shorter than one sample.
        result("STAT", &[(3_000, 100)], &[80.0], 40.0),
    ];
    let svg = rbench::chart::render(&rs);
    let png = Png::render(&svg);
    // Row 0 histogram panel: x 60..470, y 40..240.
    let (hx, hy) = ((60, 470), (40, 240));
    let column_has_bar = |x: u32| png.count(BAR, (x, x + 1), hy) > 0;
    assert!((60..110).any(column_has_bar), "the 1-2 us bar at the left");
    assert!(
        (420..470).any(column_has_bar),
        "the 0.5-1 ms bar at the right"
    );
    assert!(
        !(150..380).any(column_has_bar),
        "nothing drawn for the empty buckets between them"
    );
    assert!(png.count(BAR, hx, hy) > 2000, "bars have area");
    // Row 0 series panel: x 570..980: a line.
    let line = png.count(LINE, (570, 981), hy);
    assert!(line > 150, "throughput line drawn: {line} pixels");
    // Row 1 series: one point at the phase's end, nothing else.
    let point = png.count(LINE, (960, 990), (310, 530));
    assert!((20..120).contains(&point), "a point of r=4: {point} pixels");
    assert_eq!(png.count(LINE, (570, 950), (310, 530)), 0, "no line");
    // One document holds both phases, and both axes carry values.
    assert_eq!(svg.matches("<svg").count(), 1);
    assert!(svg.contains("WRITE (iteration 1") && svg.contains("STAT (iteration 1"));
    for tick in [
        ">1us<", ">10us<", ">100us<", ">1ms<", ">300<", ">150<", ">500ms<", ">40ms<", ">0<",
    ] {
        assert!(svg.contains(tick), "tick {tick} expected");
    }
}
