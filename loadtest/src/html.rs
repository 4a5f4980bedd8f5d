//! `--html FILE`: a self-contained report (tables plus SVG plots drawn here, no network assets).

use std::fmt::Write;

use crate::stats::Report;

/// Renders `r` as one HTML page.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>portcullis-loadtest: {} {}</title>\
         <style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}pre{{background:#f4f4f4;padding:1em}}\
         .bad{{color:#b00;font-weight:bold}}</style></head><body><h1>{} → {}</h1>",
        esc(&r.scenario),
        esc(&r.target),
        esc(&r.scenario),
        esc(&r.target)
    );
    if !r.is_clean() {
        let _ = write!(s, "<p class=\"bad\">INTEGRITY FAILURE</p>");
    }
    let m = &r.meta;
    let _ = write!(
        s,
        "<table><tr><th align=left>started</th><td>{}</td></tr><tr><th align=left>command</th><td><code>{}</code></td></tr>\
         <tr><th align=left>harness</th><td>portcullis-loadtest {} ({} build)</td></tr>\
         <tr><th align=left>traffic</th><td>{:.1} s, {} sessions asked, {} opened</td></tr></table>",
        esc(&m.started_at),
        esc(&m.command),
        esc(&m.version),
        esc(&m.profile),
        r.duration_s,
        r.connections,
        r.opened
    );
    let _ = write!(s, "<pre>{}</pre>", esc(&r.table()));
    if !r.latency_curve.is_empty() {
        let _ = write!(s, "<h2>Latency by percentile</h2>{}", percentile_plot(&r.latency_curve));
    }
    if !r.timeline.is_empty() {
        let _ = write!(s, "<h2>Throughput over time</h2>{}", timeline_plot(r, |p| p.msgs_per_s, "msg/s"));
        if r.timeline.iter().any(|p| p.p99_us > 0) {
            let _ = write!(s, "<h2>Latency over time (p50, p99; sampled)</h2>{}", latency_timeline_plot(r));
        }
        let _ = write!(s, "<h2>Open sessions over time</h2>{}", timeline_plot(r, |p| p.open as f64, "sessions"));
        let _ = write!(s, "<h2>Errors over time (cumulative)</h2>{}", timeline_plot(r, |p| p.errors as f64, "errors"));
    }
    s.push_str("</body></html>\n");
    s
}

const W: f64 = 800.0;
const H: f64 = 300.0;
const PAD: f64 = 60.0;

/// Latency (ms, linear) against percentile on a "number of nines" axis: x = log10(1 / (1 - p)).
fn percentile_plot(curve: &[(f64, u64)]) -> String {
    let nines = |p: f64| (1.0 / (1.0 - (p / 100.0).min(0.99999))).log10();
    let max_x = nines(99.999);
    let max_y = curve.iter().map(|c| c.1).max().unwrap_or(1).max(1) as f64 / 1000.0;
    let points: Vec<(f64, f64)> = curve.iter().map(|&(p, us)| (nines(p) / max_x, us as f64 / 1000.0 / max_y)).collect();
    let ticks = [(0.0, "0%"), (50.0, "50%"), (90.0, "90%"), (99.0, "99%"), (99.9, "99.9%"), (99.99, "99.99%")];
    let xt: Vec<(f64, String)> = ticks.iter().map(|&(p, l)| (nines(p) / max_x, l.to_owned())).collect();
    plot(&points, &xt, max_y, "ms")
}

/// One value of the timeline over time: the measured points only (none is made up at t = 0),
/// on a time axis with round ticks.
fn timeline_plot(r: &Report, value: impl Fn(&crate::stats::TimelinePoint) -> f64, unit: &str) -> String {
    let max_t = r.timeline.last().map_or(1.0, |p| p.t_s).max(1.0);
    let max_y = r.timeline.iter().map(&value).fold(1.0, f64::max);
    let points: Vec<(f64, f64)> = r.timeline.iter().map(|p| (p.t_s / max_t, value(p) / max_y)).collect();
    timeline_axes(max_t, max_y, unit, &points)
}

/// The median and 99th percentile latency of each interval (ms), the p99 line above the p50.
fn latency_timeline_plot(r: &Report) -> String {
    let max_t = r.timeline.last().map_or(1.0, |p| p.t_s).max(1.0);
    let max_y = r.timeline.iter().map(|p| p.p99_us as f64 / 1000.0).fold(0.001, f64::max);
    let line = |v: fn(&crate::stats::TimelinePoint) -> u64| -> Vec<(f64, f64)> {
        r.timeline.iter().filter(|p| v(p) > 0).map(|p| (p.t_s / max_t, v(p) as f64 / 1000.0 / max_y)).collect()
    };
    let (p50, p99) = (line(|p| p.p50_us), line(|p| p.p99_us));
    let mut svg = timeline_axes(max_t, max_y, "ms p50/p99", &p99);
    // The p50 line beside the p99's, lighter.
    let pts: Vec<String> = p50
        .iter()
        .map(|&(x, y)| format!("{:.1},{:.1}", PAD + x * (W - 2.0 * PAD), H - PAD - y * (H - 2.0 * PAD)))
        .collect();
    svg.truncate(svg.len() - "</svg>".len());
    let _ = write!(
        svg,
        "<polyline fill=\"none\" stroke=\"#80a8e0\" stroke-width=\"2\" points=\"{}\"/></svg>",
        pts.join(" ")
    );
    svg
}

/// The plot of `points` on the time axis of a run `max_t` seconds long.
fn timeline_axes(max_t: f64, max_y: f64, unit: &str, points: &[(f64, f64)]) -> String {
    let step = nice_step(max_t / 5.0);
    let decimals = if step < 1.0 { 1 } else { 0 };
    let xt: Vec<(f64, String)> = (0..)
        .map(|i| i as f64 * step)
        .take_while(|t| *t <= max_t + 1e-9)
        .map(|t| (t / max_t, format!("{t:.decimals$}s")))
        .collect();
    plot(points, &xt, max_y, unit)
}

/// The round step (1, 2 or 5 times a power of ten) nearest above `raw`.
fn nice_step(raw: f64) -> f64 {
    let p = 10f64.powf(raw.max(1e-9).log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * p).find(|s| *s >= raw).unwrap_or(10.0 * p)
}

/// A line through `points` (both coordinates in 0..1), with x tick labels and a y scale up to `max_y`.
fn plot(points: &[(f64, f64)], xticks: &[(f64, String)], max_y: f64, unit: &str) -> String {
    let px = |x: f64| PAD + x * (W - 2.0 * PAD);
    let py = |y: f64| H - PAD + -y * (H - 2.0 * PAD);
    let mut s = String::new();
    let _ = write!(s, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-size=\"11\">");
    let _ = write!(
        s,
        "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#000\"/>",
        px(0.0),
        py(0.0),
        px(1.0),
        py(0.0)
    );
    let _ = write!(
        s,
        "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#000\"/>",
        px(0.0),
        py(0.0),
        px(0.0),
        py(1.0)
    );
    for (x, label) in xticks {
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            px(*x),
            py(0.0) + 15.0,
            esc(label)
        );
    }
    // The unit once, above the axis; the tick labels stay short enough for the margin.
    let _ =
        write!(s, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>", px(0.0), py(1.0) - 12.0, esc(unit));
    for i in 0..=4 {
        let y = i as f64 / 4.0;
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
             <line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>",
            px(0.0) - 4.0,
            py(y) + 4.0,
            compact(max_y * y),
            px(0.0),
            py(y),
            px(1.0),
            py(y)
        );
    }
    let path: Vec<String> = points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
    let _ = write!(
        s,
        "<polyline fill=\"none\" stroke=\"#2060c0\" stroke-width=\"2\" points=\"{}\"/></svg>",
        path.join(" ")
    );
    s
}

/// A tick label of at most five characters: `0`, `0.25`, `7.5`, `120`, `14.8k`, `59k`, `1.2M`.
fn compact(v: f64) -> String {
    match v.abs() {
        a if a >= 1e6 => format!("{:.1}M", v / 1e6),
        a if a >= 1e4 => format!("{:.0}k", v / 1e3),
        a if a >= 1e3 => format!("{:.1}k", v / 1e3),
        a if a >= 10.0 => format!("{v:.0}"),
        0.0 => "0".to_owned(),
        _ => format!("{v:.2}"),
    }
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use crate::stats::{Report, TimelinePoint};

    #[test]
    fn renders_plots_without_external_assets() {
        let r = Report {
            scenario: "echo".into(),
            target: "ws://x/<y>".into(),
            latency_curve: vec![(50.0, 100), (99.0, 1000), (100.0, 5000)],
            timeline: vec![TimelinePoint {
                t_s: 1.0,
                msgs_per_s: 10.0,
                open: 1,
                sent: 10,
                errors: 0,
                p50_us: 100,
                p99_us: 900,
            }],
            ..Report::default()
        };
        let html = super::render(&r);
        assert_eq!(
            html.matches("<svg").count(),
            5,
            "latency by percentile and over time, throughput, open sessions, errors"
        );
        assert!(!html.contains("<script") && !html.contains("src=") && !html.contains("href="));
        assert!(html.contains("ws://x/&lt;y&gt;"));
    }

    #[test]
    fn throughput_labels_fit_the_margin_the_line_has_only_measured_points_and_ticks_are_round() {
        // The report of a 59k msg/s run used to label its axis "59000.0 msg/s", cut off by the
        // margin; a 5 s run plotted 4 samples and a made-up zero, with ticks at 1.2 s, 2.5 s...
        let r = Report {
            timeline: (1..=20)
                .map(|t| TimelinePoint {
                    t_s: t as f64 / 4.0,
                    msgs_per_s: 59_000.0,
                    open: 50,
                    ..TimelinePoint::default()
                })
                .collect(),
            ..Report::default()
        };
        let svg = super::timeline_plot(&r, |p| p.msgs_per_s, "msg/s");
        assert!(svg.contains(">59k</text>") && svg.contains(">30k</text>"), "{svg}");
        assert_eq!(svg.matches(">msg/s</text>").count(), 1, "the unit once, as the axis title");
        let points = svg.split("points=\"").nth(1).and_then(|p| p.split('"').next()).expect("polyline");
        assert_eq!(points.split(' ').count(), 20, "one point per sample, none made up");
        for tick in ["0s", "1s", "2s", "3s", "4s", "5s"] {
            assert!(svg.contains(&format!(">{tick}</text>")), "round tick {tick}: {svg}");
        }
        assert_eq!(super::nice_step(0.83), 1.0);
        assert_eq!(super::nice_step(13.0), 20.0);
        assert_eq!(super::nice_step(0.3), 0.5);
        for (v, label) in
            [(0.0, "0"), (0.25, "0.25"), (120.0, "120"), (14_800.0, "15k"), (1_250.0, "1.2k"), (1.2e6, "1.2M")]
        {
            assert_eq!(super::compact(v), label);
        }
    }
}
