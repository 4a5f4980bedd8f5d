//! `headline`: the benchmark page's headline, from the results of `peers/compare.sh` (one
//! directory per set: plain, TLS): one Markdown table of the figures that decide between proxies
//! (Portcullis, NGINX, HAProxy and the direct connection, with Portcullis against the best peer)
//! and one SVG plot of where Portcullis stands on each.

use std::fmt::Write;
use std::path::Path;

use anyhow::Context;

use crate::compare::Summary;

/// Which figure of a scenario's summary a headline row shows.
#[derive(Clone, Copy)]
enum Pick {
    Throughput,
    P50,
    P99,
    Cpu,
    Kib,
}

/// One headline row: its label, the scenario file (`<name>.json` of compare.sh) it is read
/// from, the figure, whether lower is better, and its unit.
struct Row {
    label: &'static str,
    scenario: &'static str,
    pick: Pick,
    lower_better: bool,
    unit: &'static str,
}

const ROWS: &[Row] = &[
    Row {
        label: "throughput at saturation",
        scenario: "echo64",
        pick: Pick::Throughput,
        lower_better: false,
        unit: "msg/s",
    },
    Row {
        label: "CPU per message at saturation", scenario: "echo64", pick: Pick::Cpu, lower_better: true, unit: "µs"
    },
    Row {
        label: "CPU per message at a fixed rate", scenario: "rate", pick: Pick::Cpu, lower_better: true, unit: "µs"
    },
    Row { label: "p99 at a fixed rate", scenario: "rate", pick: Pick::P99, lower_better: true, unit: "µs" },
    Row {
        label: "round trip p50, one message in flight",
        scenario: "latency",
        pick: Pick::P50,
        lower_better: true,
        unit: "µs",
    },
    Row { label: "CPU per new session", scenario: "storm", pick: Pick::Cpu, lower_better: true, unit: "µs" },
    // From a freshly started proxy (compare.sh's FRESH_IDLE runs): one that served load before
    // keeps freed memory, which hides the growth.
    Row {
        label: "memory per idle session (5,000 held)",
        scenario: "idle-fresh-5000",
        pick: Pick::Kib,
        lower_better: true,
        unit: "KiB",
    },
];

/// The targets shown, as compare.sh names them; the peers are the last two.
const TARGETS: &[(&str, &str)] =
    &[("direct", "direct"), ("portcullis", "Portcullis"), ("nginx", "NGINX"), ("haproxy", "HAProxy")];
const PEERS: &[&str] = &["nginx", "haproxy"];

fn pick(s: &Summary, p: Pick) -> Option<f64> {
    let v = match p {
        Pick::Throughput => Some(s.throughput),
        Pick::P50 => Some(s.p50_us),
        Pick::P99 => Some(s.p99_us),
        Pick::Cpu => s.cpu_us_per_msg,
        Pick::Kib => s.kib_per_session,
    };
    v.filter(|v| *v > 0.0 && s.clean)
}

/// One set's figures: per row, each target's value (when measured).
pub struct Set {
    /// The set's name (`plain`, `TLS`).
    pub name: String,
    values: Vec<Vec<Option<f64>>>,
}

/// Reads a compare.sh results directory.
pub fn read_set(name: &str, dir: &Path) -> anyhow::Result<Set> {
    let mut values = Vec::new();
    for row in ROWS {
        let summaries = match row.scenario.strip_prefix("idle-fresh-") {
            Some(n) => fresh_idle(dir, n)?,
            None => {
                let path = dir.join(format!("{}.json", row.scenario));
                match read_if_there(&path)? {
                    Some(text) => serde_json::from_slice(&text)
                        .with_context(|| format!("{} is not compare --json", path.display()))?,
                    None => Vec::new(),
                }
            }
        };
        values.push(
            TARGETS
                .iter()
                .map(|(t, _)| summaries.iter().find(|s| s.name == *t).and_then(|s| pick(s, row.pick)))
                .collect(),
        );
    }
    Ok(Set { name: name.to_owned(), values })
}

/// A results file, or `None` when the run did not write it (a scenario not run); any other
/// error is the reader's to see.
fn read_if_there(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The fresh-idle runs of `n` sessions (`idle-fresh-<target>-<n>.json`, one report each) as
/// summaries.
fn fresh_idle(dir: &Path, n: &str) -> anyhow::Result<Vec<Summary>> {
    let mut out = Vec::new();
    for (target, _) in TARGETS {
        let path = dir.join(format!("idle-fresh-{target}-{n}.json"));
        let Some(text) = read_if_there(&path)? else { continue };
        let r: crate::stats::Report =
            serde_json::from_slice(&text).with_context(|| format!("{} is not a report", path.display()))?;
        let held_all = r.held == r.connections;
        out.push(Summary {
            name: (*target).to_owned(),
            url: r.target.clone(),
            throughput: 0.0,
            p50_us: 0.0,
            p99_us: 0.0,
            cpu_us_per_msg: None,
            kib_per_session: r.process.as_ref().map(|p| p.kib_per_session),
            clean: held_all && r.errors.is_empty(),
            runs: Vec::new(),
        });
    }
    Ok(out)
}

/// Portcullis against the best peer on one row: the ratio of the values, and how far ahead
/// (above 1) or behind (below 1) Portcullis is whichever way the row is better.
fn standing(row: &Row, values: &[Option<f64>]) -> Option<(f64, f64)> {
    let ours = values[TARGETS.iter().position(|(t, _)| *t == "portcullis")?]?;
    let peers = PEERS.iter().filter_map(|p| TARGETS.iter().position(|(t, _)| t == p).and_then(|i| values[i]));
    let best = if row.lower_better { peers.fold(f64::INFINITY, f64::min) } else { peers.fold(0.0, f64::max) };
    if !best.is_finite() || best <= 0.0 {
        return None;
    }
    let ratio = ours / best;
    Some((ratio, if row.lower_better { 1.0 / ratio } else { ratio }))
}

fn fmt(v: Option<f64>, unit: &str) -> String {
    match v {
        None => "-".to_owned(),
        Some(v) if unit == "msg/s" => format!("{:.0}", v),
        Some(v) if v >= 100.0 => format!("{v:.0} {unit}"),
        Some(v) => format!("{v:.1} {unit}"),
    }
}

/// The headline table, in Markdown.
pub fn markdown(sets: &[Set]) -> String {
    let mut s = String::new();
    let names: Vec<&str> = TARGETS.iter().map(|(_, n)| *n).collect();
    let _ = writeln!(s, "| | set | {} | Portcullis / best peer |", names.join(" | "));
    let _ = writeln!(s, "|---|---|{}---|", "---:|".repeat(TARGETS.len()));
    for (i, row) in ROWS.iter().enumerate() {
        for set in sets {
            let values = &set.values[i];
            let cells: Vec<String> = values.iter().map(|v| fmt(*v, row.unit)).collect();
            let standing = match standing(row, values) {
                Some((ratio, ahead)) if ahead >= 1.0 => format!("**{ratio:.2}×**"),
                Some((ratio, _)) => format!("{ratio:.2}×"),
                None => "-".to_owned(),
            };
            let better = if row.lower_better { "lower is better" } else { "higher is better" };
            let _ = writeln!(s, "| {} ({better}) | {} | {} | {standing} |", row.label, set.name, cells.join(" | "));
        }
    }
    let _ = writeln!(s, "\nBold: Portcullis is ahead of the best peer (NGINX or HAProxy) on that row.");
    s
}

/// The headline plot: per row and set, how far Portcullis is ahead of (right of 1) or behind
/// (left of 1) the best peer, on a log scale from 0.5× to 2×.
pub fn svg(sets: &[Set]) -> String {
    let rows: Vec<(String, Option<f64>)> = ROWS
        .iter()
        .enumerate()
        .flat_map(|(i, row)| {
            sets.iter().map(move |set| {
                (format!("{} ({})", row.label, set.name), standing(row, &set.values[i]).map(|(_, ahead)| ahead))
            })
        })
        .collect();
    let (label_w, plot_w, row_h, top) = (330.0, 360.0, 22.0, 40.0);
    let (w, h) = (label_w + plot_w + 70.0, top + row_h * rows.len() as f64 + 40.0);
    // log2 scale: 0.5× at the left edge, 2× at the right, 1× (parity) in the middle.
    let x = |v: f64| label_w + plot_w * ((v.clamp(0.5, 2.0).log2() + 1.0) / 2.0);
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\
         <rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\
         <text x=\"{:.1}\" y=\"20\" text-anchor=\"middle\" font-weight=\"bold\">Portcullis against the best peer (NGINX or HAProxy): right of 1× is ahead</text>",
        w / 2.0
    );
    for (v, label) in [(0.5, "0.5×"), (0.75, "0.75×"), (1.0, "1×"), (1.5, "1.5×"), (2.0, "2×")] {
        let _ = write!(
            s,
            "<line x1=\"{0:.1}\" y1=\"{top}\" x2=\"{0:.1}\" y2=\"{1:.1}\" stroke=\"{2}\"/>\
             <text x=\"{0:.1}\" y=\"{3:.1}\" text-anchor=\"middle\">{label}</text>",
            x(v),
            h - 30.0,
            if v == 1.0 { "#000" } else { "#ddd" },
            h - 14.0
        );
    }
    for (i, (label, ahead)) in rows.iter().enumerate() {
        let y = top + row_h * i as f64;
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            label_w - 8.0,
            y + row_h * 0.65,
            label.replace('&', "&amp;").replace('<', "&lt;")
        );
        let Some(a) = ahead else { continue };
        let (x0, x1) = (x(1.0).min(x(*a)), x(1.0).max(x(*a)));
        let colour = if *a >= 1.0 { "#2a8a3a" } else { "#c0392b" };
        let _ = write!(
            s,
            "<rect x=\"{x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{colour}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{a:.2}×</text>",
            y + 4.0,
            (x1 - x0).max(1.0),
            row_h - 8.0,
            x(2.0) + 6.0,
            y + row_h * 0.65
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(name: &str, throughput: f64, cpu: f64) -> serde_json::Value {
        serde_json::json!({"name": name, "url": "ws://x", "throughput": throughput, "p50_us": 100.0, "p99_us": 900.0,
            "cpu_us_per_msg": cpu, "kib_per_session": 4.0, "clean": true, "runs": []})
    }

    #[test]
    fn the_headline_reads_compare_results_and_says_who_is_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let echo = serde_json::json!([
            summary("direct", 100.0, 0.0),
            summary("portcullis", 90.0, 5.0),
            summary("nginx", 80.0, 6.0),
            summary("haproxy", 95.0, 4.0)
        ]);
        std::fs::write(dir.path().join("echo64.json"), echo.to_string()).unwrap();
        let set = read_set("plain", dir.path()).unwrap();
        let table = markdown(&[set]);
        // Throughput: 90 against HAProxy's 95, behind; CPU: 5 against HAProxy's 4, behind.
        assert!(
            table.contains("| throughput at saturation (higher is better) | plain | 100 | 90 | 80 | 95 | 0.95× |"),
            "{table}"
        );
        assert!(
            table.contains(
                "| CPU per message at saturation (lower is better) | plain | - | 5.0 µs | 6.0 µs | 4.0 µs | 1.25× |"
            ),
            "{table}"
        );
        assert!(
            table.contains("| p99 at a fixed rate (lower is better) | plain | - | - | - | - | - |"),
            "no rate.json: {table}"
        );
        let set = read_set("plain", dir.path()).unwrap();
        let plot = svg(&[set]);
        assert!(plot.starts_with("<svg") && plot.contains("0.95×") && plot.contains("0.80×"), "{plot}");
    }
}
