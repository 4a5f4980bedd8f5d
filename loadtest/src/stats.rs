//! Counters shared by all sessions of a run, and the final report built from them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Live counters, updated by every session task; read by the progress line and the report.
#[derive(Default)]
pub struct Stats {
    /// Sessions currently open.
    pub open: AtomicU64,
    /// Sessions opened successfully, in total.
    pub opened: AtomicU64,
    /// HTTP connections reopened after the target closed a kept-alive one (`http` scenario).
    pub reconnects: AtomicU64,
    /// Data messages sent.
    pub sent: AtomicU64,
    /// Data messages received (echoes and backend output).
    pub received: AtomicU64,
    /// Payload bytes sent.
    pub bytes_sent: AtomicU64,
    /// Payload bytes received.
    pub bytes_received: AtomicU64,
    /// Errors of any kind (details in `errors`).
    pub error_count: AtomicU64,
    /// Integrity counters.
    pub lost: AtomicU64,
    /// Messages received twice.
    pub duplicated: AtomicU64,
    /// Messages received after a later one.
    pub reordered: AtomicU64,
    /// Messages whose checksum, magic or connection id was wrong.
    pub corrupted: AtomicU64,
    /// Errors by kind, with the first detail seen.
    pub errors: Mutex<BTreeMap<String, (u64, String)>>,
    /// Close codes received from the target.
    pub close_codes: Mutex<BTreeMap<u16, u64>>,
    /// Message round-trip latency, microseconds (merged from sessions).
    pub latency: Mutex<Hist>,
    /// A sample (one message in [`INTERVAL_SAMPLE`]) of the latencies since the timeline's last
    /// point, for latency over time; the timeline takes and clears it.
    pub interval_latency: Mutex<Hist>,
    /// Handshake latency (TCP connect to 101), microseconds.
    pub handshake: Mutex<Hist>,
}

/// One message in this many records its latency for the timeline (`Stats::interval_latency`):
/// enough for its percentiles, few enough that sessions do not queue on its lock.
pub const INTERVAL_SAMPLE: u64 = 16;

/// A latency histogram in microseconds, 1 µs to 1 hour, 3 significant digits.
pub struct Hist(pub Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Hist(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid"))
    }
}

impl Hist {
    /// Records a value in microseconds, clamped to the histogram's range.
    pub fn record(&mut self, us: u64) {
        let _ = self.0.record(us.clamp(1, 3_600_000_000));
    }
}

impl Stats {
    /// Counts one error of `kind`, keeping the first `detail`.
    pub fn error(&self, kind: &str, detail: impl FnOnce() -> String) {
        self.error_count.fetch_add(1, Ordering::Relaxed);
        let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        e.entry(kind.to_owned()).or_insert_with(|| (0, detail())).0 += 1;
    }

    /// Counts a close code received.
    pub fn close_code(&self, code: u16) {
        *self.close_codes.lock().unwrap_or_else(|p| p.into_inner()).entry(code).or_default() += 1;
    }

    /// Merges a session's latency histogram.
    pub fn merge_latency(&self, h: &Hist) {
        let _ = self.latency.lock().unwrap_or_else(|p| p.into_inner()).0.add(&h.0);
    }

    /// Records one handshake's latency.
    pub fn record_handshake(&self, us: u64) {
        self.handshake.lock().unwrap_or_else(|p| p.into_inner()).record(us);
    }
}

/// Percentiles of a histogram, microseconds.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct Percentiles {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

impl Percentiles {
    /// Summarises `h`.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

/// One point of the run's timeline.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct TimelinePoint {
    /// Seconds since the start of the run.
    pub t_s: f64,
    /// Messages received per second over the last second.
    pub msgs_per_s: f64,
    /// Sessions open.
    pub open: u64,
    /// Data messages sent since the start (as the live progress line shows them).
    #[serde(default)]
    pub sent: u64,
    /// Errors of any kind since the start.
    #[serde(default)]
    pub errors: u64,
    /// Median message latency over the interval since the last point (sampled), µs; 0 when no
    /// message came back in it.
    #[serde(default)]
    pub p50_us: u64,
    /// 99th percentile of the same, µs.
    #[serde(default)]
    pub p99_us: u64,
}

/// What a report says of the run itself: when, how and with what it ran.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct RunMeta {
    /// When the run started, RFC 3339 UTC (`2026-12-05T15:04:05Z`).
    pub started_at: String,
    /// The same instant, milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// The command line, with anything that looks like a credential replaced by `<redacted>`.
    pub command: String,
    /// `portcullis-loadtest` version.
    pub version: String,
    /// The build profile of the harness: `release` or `debug` (a debug harness measures itself).
    pub profile: String,
}

impl RunMeta {
    /// The run starting now, under this process's command line.
    pub fn now() -> RunMeta {
        let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        RunMeta {
            started_at: rfc3339(since.as_secs()),
            started_unix_ms: since.as_millis() as u64,
            command: redacted_command(std::env::args()),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            profile: if cfg!(debug_assertions) { "debug" } else { "release" }.to_owned(),
        }
    }
}

/// `args` joined by spaces, with what looks like a credential (a header or argument carrying a
/// bearer token, a JWT, a key or secret value) replaced: a report is shared, a token must not be.
pub fn redacted_command(args: impl IntoIterator<Item = String>) -> String {
    let secretish = |a: &str| {
        let lower = a.to_ascii_lowercase();
        lower.contains("bearer ")
            || lower.contains("authorization")
            || lower.contains("token=")
            || lower.contains("secret")
            || (a.split('.').count() == 3 && a.len() > 40 && !a.contains('/'))
    };
    args.into_iter().map(|a| if secretish(&a) { "<redacted>".to_owned() } else { a }).collect::<Vec<_>>().join(" ")
}

/// `secs` since the epoch as RFC 3339 UTC (civil-from-days, Howard Hinnant's algorithm).
fn rfc3339(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Percentiles from 0 to 99.999 on a log-like scale (for the percentile plot).
fn curve(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    [0.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 99.999, 100.0]
        .iter()
        .map(|&p| (p, h.value_at_quantile(p / 100.0)))
        .collect()
}

/// A histogram's recorded values as (value, count) pairs.
fn pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded().map(|v| (v.value_iterated_to(), v.count_at_value())).collect()
}

/// Integrity counts; all zero on a correct run.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Integrity {
    /// Sent (or announced by sequence) but never received.
    pub lost: u64,
    /// Received more than once.
    pub duplicated: u64,
    /// Received after a later message.
    pub reordered: u64,
    /// Bad checksum, bad header or someone else's message.
    pub corrupted: u64,
}

impl Integrity {
    /// Whether every count is zero.
    pub fn is_clean(&self) -> bool {
        *self == Integrity::default()
    }
}

/// The target process's resource use, sampled from /proc.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct ProcessUse {
    /// Process id(s) sampled; with several, RSS and CPU figures are their sums.
    pub pid: crate::sys::Pids,
    /// RSS before the run, KiB.
    pub rss_before_kib: u64,
    /// RSS at the measurement point (sessions held), KiB.
    pub rss_loaded_kib: u64,
    /// (loaded − before) / sessions, KiB; only meaningful with many sessions.
    pub kib_per_session: f64,
    /// CPU time (user + system) used during the run, microseconds.
    pub cpu_us: u64,
    /// CPU microseconds per received message (0 if none).
    pub cpu_us_per_msg: f64,
}

impl ProcessUse {
    /// Resource use between two samples of `pid` (sums over its processes), per session (held sessions for idle runs,
    /// opened ones otherwise) and per message received.
    pub fn between(
        pid: &crate::sys::Pids,
        before: &crate::sys::Sample,
        loaded: &crate::sys::Sample,
        report: &Report,
        idle: bool,
    ) -> Self {
        let sessions = if idle { report.held } else { report.opened };
        let cpu_us = loaded.cpu_us.saturating_sub(before.cpu_us);
        ProcessUse {
            pid: pid.clone(),
            rss_before_kib: before.rss_kib,
            rss_loaded_kib: loaded.rss_kib,
            kib_per_session: if sessions > 0 {
                (loaded.rss_kib as f64 - before.rss_kib as f64) / sessions as f64
            } else {
                0.0
            },
            cpu_us,
            cpu_us_per_msg: if report.received > 0 { cpu_us as f64 / report.received as f64 } else { 0.0 },
        }
    }
}

/// The final result of one scenario run; printed as a table and written with `--json`.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct Report {
    /// Scenario kind.
    pub scenario: String,
    /// Target URL template.
    pub target: String,
    /// Length of the traffic phase, seconds.
    pub duration_s: f64,
    /// Sessions asked for.
    pub connections: u64,
    /// Sessions opened successfully (storm: handshakes completed).
    pub opened: u64,
    /// Sessions still open at the end of the hold (idle scenario).
    pub held: u64,
    /// HTTP connections reopened after the target closed a kept-alive one.
    #[serde(default)]
    pub reconnects: u64,
    /// Data messages sent.
    pub sent: u64,
    /// Data messages received.
    pub received: u64,
    /// Received messages per second.
    pub msgs_per_s: f64,
    /// Received payload MiB per second.
    pub mib_per_s: f64,
    /// Handshakes per second (storm).
    pub handshakes_per_s: f64,
    /// Message latency (rate: from the intended send time), µs.
    pub latency_us: Percentiles,
    /// Handshake latency, µs.
    pub handshake_us: Percentiles,
    /// Integrity counts.
    pub integrity: Integrity,
    /// Errors by kind: count and first detail.
    pub errors: BTreeMap<String, (u64, String)>,
    /// Close codes received, with counts.
    pub close_codes: BTreeMap<u16, u64>,
    /// Target process resource use, with `--pid`.
    pub process: Option<ProcessUse>,
    /// Received messages per second, open sessions and errors, at a period that fits the run
    /// (about 60 points, every 250 ms to every second).
    pub timeline: Vec<TimelinePoint>,
    /// When, how and with what the run ran.
    #[serde(default)]
    pub meta: RunMeta,
    /// Latency percentile curve: (percentile, µs), for plots.
    pub latency_curve: Vec<(f64, u64)>,
    /// Latency histogram as (value µs, count) pairs, so worker processes' reports can be merged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency_hist: Vec<(u64, u64)>,
    /// Handshake histogram as (value µs, count) pairs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handshake_hist: Vec<(u64, u64)>,
    /// Things the reader must know (descriptor limit capped the run, ...).
    pub notes: Vec<String>,
    /// The dashboards scenario's per-watcher view.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<crate::scenario::WatchSummary>,
}

impl Report {
    /// Fills the counters of the report from `stats`.
    pub fn absorb(&mut self, stats: &Stats) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.opened = get(&stats.opened);
        self.reconnects = get(&stats.reconnects);
        self.sent = get(&stats.sent);
        self.received = get(&stats.received);
        if self.duration_s > 0.0 {
            self.msgs_per_s = self.received as f64 / self.duration_s;
            self.mib_per_s = get(&stats.bytes_received) as f64 / self.duration_s / (1024.0 * 1024.0);
        }
        let latency = &stats.latency.lock().unwrap_or_else(|p| p.into_inner()).0;
        let handshake = &stats.handshake.lock().unwrap_or_else(|p| p.into_inner()).0;
        self.set_histograms(latency, handshake);
        self.integrity = Integrity {
            lost: get(&stats.lost),
            duplicated: get(&stats.duplicated),
            reordered: get(&stats.reordered),
            corrupted: get(&stats.corrupted),
        };
        self.errors = stats.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.close_codes = stats.close_codes.lock().unwrap_or_else(|p| p.into_inner()).clone();
    }

    fn set_histograms(&mut self, latency: &Histogram<u64>, handshake: &Histogram<u64>) {
        self.latency_us = Percentiles::of(latency);
        self.latency_curve = curve(latency);
        self.latency_hist = pairs(latency);
        self.handshake_us = Percentiles::of(handshake);
        self.handshake_hist = pairs(handshake);
    }

    /// Merges the reports of worker processes that ran shares of one scenario.
    pub fn merge(parts: Vec<Report>) -> Report {
        let mut out = Report::default();
        let (mut latency, mut handshake) = (Hist::default(), Hist::default());
        for p in parts {
            out.scenario = p.scenario;
            out.target = p.target;
            out.duration_s = out.duration_s.max(p.duration_s);
            out.connections += p.connections;
            out.opened += p.opened;
            out.reconnects += p.reconnects;
            out.held += p.held;
            out.sent += p.sent;
            out.received += p.received;
            out.msgs_per_s += p.msgs_per_s;
            out.mib_per_s += p.mib_per_s;
            out.handshakes_per_s += p.handshakes_per_s;
            out.integrity.lost += p.integrity.lost;
            out.integrity.duplicated += p.integrity.duplicated;
            out.integrity.reordered += p.integrity.reordered;
            out.integrity.corrupted += p.integrity.corrupted;
            for (k, (n, d)) in p.errors {
                out.errors.entry(k).or_insert((0, d)).0 += n;
            }
            for (c, n) in p.close_codes {
                *out.close_codes.entry(c).or_default() += n;
            }
            for (i, t) in p.timeline.into_iter().enumerate() {
                match out.timeline.get_mut(i) {
                    Some(o) => {
                        o.msgs_per_s += t.msgs_per_s;
                        o.open += t.open;
                        o.sent += t.sent;
                        o.errors += t.errors;
                    }
                    None => out.timeline.push(t),
                }
            }
            for (v, n) in p.latency_hist {
                let _ = latency.0.record_n(v.max(1), n);
            }
            for (v, n) in p.handshake_hist {
                let _ = handshake.0.record_n(v.max(1), n);
            }
            for note in p.notes {
                if !out.notes.contains(&note) {
                    out.notes.push(note);
                }
            }
        }
        out.set_histograms(&latency.0, &handshake.0);
        out
    }

    /// Whether the run is a success: integrity clean (errors alone do not fail a run).
    pub fn is_clean(&self) -> bool {
        self.integrity.is_clean()
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "scenario      {}  →  {}", self.scenario, self.target);
        let _ = writeln!(
            s,
            "sessions      {} asked, {} opened{}",
            self.connections,
            self.opened,
            if self.scenario == "idle" { format!(", {} held", self.held) } else { String::new() }
        );
        let _ = writeln!(s, "duration      {:.2} s", self.duration_s);
        if self.reconnects > 0 {
            let _ = writeln!(s, "reconnects    {} (the target closed kept-alive connections)", self.reconnects);
        }
        let (what, unit) = match self.scenario.as_str() {
            "http" => ("requests", "req/s"),
            "sse" | "watch" => ("events", "events/s"),
            _ => ("messages", "msg/s"),
        };
        let _ = writeln!(
            s,
            "{what:<13} {} sent, {} received  ({:.0} {unit}, {:.2} MiB/s)",
            self.sent, self.received, self.msgs_per_s, self.mib_per_s
        );
        if self.handshakes_per_s > 0.0 {
            let _ = writeln!(s, "handshakes    {:.0} /s", self.handshakes_per_s);
        }
        let row = |s: &mut String, name: &str, p: &Percentiles| {
            if p.count > 0 {
                let _ = writeln!(
                    s,
                    "{name:<13} p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
                    fmt_us(p.p50),
                    fmt_us(p.p90),
                    fmt_us(p.p99),
                    fmt_us(p.p999),
                    fmt_us(p.max),
                    p.count
                );
            }
        };
        row(&mut s, "latency", &self.latency_us);
        row(&mut s, "handshake", &self.handshake_us);
        if let Some(w) = &self.watch {
            let _ = writeln!(
                s,
                "watchers      {} agents × {} watchers, {} events each: {} of {} watchers got every event in order",
                w.agents, w.watchers_per_agent, w.events_per_agent, w.complete, w.watchers
            );
            row(&mut s, "watcher p50", &w.per_watcher_p50_us);
            row(&mut s, "watcher p99", &w.per_watcher_p99_us);
            if w.stalled > 0 || !w.stalled_ends.is_empty() {
                let ends: Vec<String> = w.stalled_ends.iter().map(|(end, n)| format!("{n} {end}")).collect();
                let _ = writeln!(
                    s,
                    "stalled       {} watchers that never read (in no figure above): {}",
                    w.stalled,
                    ends.join(", ")
                );
            }
        }
        if let Some(p) = &self.process {
            let _ = writeln!(
                s,
                "target {}  RSS {} → {} KiB ({:.2} KiB/session), CPU {} ms ({:.2} µs/msg)",
                if p.pid.as_slice().len() > 1 { format!("pids {} (summed)", p.pid) } else { format!("pid {}", p.pid) },
                p.rss_before_kib,
                p.rss_loaded_kib,
                p.kib_per_session,
                p.cpu_us / 1000,
                p.cpu_us_per_msg
            );
        }
        if !self.close_codes.is_empty() {
            let codes: Vec<String> = self.close_codes.iter().map(|(c, n)| format!("{c}×{n}")).collect();
            let _ = writeln!(s, "close codes   {}", codes.join("  "));
        }
        for (kind, (n, detail)) in &self.errors {
            let _ = writeln!(s, "error         {kind}: {n}  (first: {detail})");
        }
        for n in &self.notes {
            let _ = writeln!(s, "note          {n}");
        }
        if self.is_clean() {
            let _ = writeln!(s, "integrity     ok (0 lost, 0 duplicated, 0 reordered, 0 corrupted)");
        } else {
            let i = &self.integrity;
            let _ = writeln!(s, "!!!!!!!!!!!!  INTEGRITY FAILURE  !!!!!!!!!!!!");
            let _ = writeln!(
                s,
                "integrity     {} lost, {} duplicated, {} reordered, {} corrupted",
                i.lost, i.duplicated, i.reordered, i.corrupted
            );
        }
        s
    }
}

/// Formats microseconds with a readable unit.
pub fn fmt_us(us: u64) -> String {
    if us >= 10_000_000 {
        format!("{:.1}s", us as f64 / 1e6)
    } else if us >= 10_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else {
        format!("{us}µs")
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn run_metadata_has_an_rfc3339_time_and_no_credential() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_796_483_045), "2026-12-05T15:04:05Z");
        let jwt = format!("{}.{}.{}", "a".repeat(20), "b".repeat(30), "c".repeat(20));
        let cmd = super::redacted_command(
            ["portcullis-loadtest", "run", "-H", "Authorization: Bearer xyz", "--target", "wss://h/p?token=abc", &jwt]
                .map(String::from),
        );
        assert_eq!(cmd, "portcullis-loadtest run -H <redacted> --target <redacted> <redacted>");
    }

    use super::{ProcessUse, Report};
    use crate::sys::{Pids, Sample};

    #[test]
    fn process_use_from_summed_samples() {
        let report = Report { opened: 10, received: 1000, ..Report::default() };
        let before = Sample { rss_kib: 3000, cpu_us: 1_000 };
        let loaded = Sample { rss_kib: 4000, cpu_us: 51_000 };
        let pids: Pids = "11,12".parse().unwrap();
        let p = ProcessUse::between(&pids, &before, &loaded, &report, false);
        assert_eq!((p.rss_before_kib, p.rss_loaded_kib, p.cpu_us), (3000, 4000, 50_000));
        assert_eq!((p.kib_per_session, p.cpu_us_per_msg), (100.0, 50.0));
        let table = Report { process: Some(p.clone()), ..report.clone() }.table();
        assert!(table.contains("target pids 11,12 (summed)  RSS 3000 → 4000 KiB"), "{table}");
        let one = ProcessUse { pid: Pids::from(11), ..p };
        let table = Report { process: Some(one), ..report }.table();
        assert!(table.contains("target pid 11  RSS 3000 → 4000 KiB"), "{table}");
    }
}

/// A pass/fail bound on a run (`--fail-on`), as k6's thresholds: the run fails (exit 3) when
/// the metric is above the limit. `p50>2ms`, `p99>50ms`, `p999>…` (message latency),
/// `handshake_p99>…`, `refused>5%` (sessions asked for but not opened), `errors>10`.
#[derive(Clone, Debug)]
pub struct Threshold {
    metric: ThresholdMetric,
    limit: f64,
    text: String,
}

#[derive(Clone, Copy, Debug)]
enum ThresholdMetric {
    Latency(fn(&Percentiles) -> u64),
    Handshake(fn(&Percentiles) -> u64),
    RefusedPercent,
    Errors,
}

impl std::str::FromStr for Threshold {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, limit) =
            s.split_once('>').ok_or_else(|| format!("{s:?}: write NAME>LIMIT, as p99>50ms, refused>5% or errors>0"))?;
        let (name, limit) = (name.trim(), limit.trim());
        let latency = |l: &str| -> Result<f64, String> {
            crate::parse_duration(l).map(|d| d.as_secs_f64() * 1e6).map_err(|e| format!("{s:?}: {e}"))
        };
        let percentile = |p: &str| -> Option<fn(&Percentiles) -> u64> {
            match p {
                "p50" => Some(|p: &Percentiles| p.p50),
                "p90" => Some(|p: &Percentiles| p.p90),
                "p99" => Some(|p: &Percentiles| p.p99),
                "p999" => Some(|p: &Percentiles| p.p999),
                "max" => Some(|p: &Percentiles| p.max),
                _ => None,
            }
        };
        let (metric, limit) = match name {
            "refused" => {
                let pct = limit.strip_suffix('%').ok_or_else(|| format!("{s:?}: refused takes a percentage"))?;
                (ThresholdMetric::RefusedPercent, pct.parse::<f64>().map_err(|_| format!("{s:?}: not a percentage"))?)
            }
            "errors" => (ThresholdMetric::Errors, limit.parse::<f64>().map_err(|_| format!("{s:?}: not a count"))?),
            n => match (n.strip_prefix("handshake_"), percentile(n)) {
                (Some(p), _) => match percentile(p) {
                    Some(f) => (ThresholdMetric::Handshake(f), latency(limit)?),
                    None => return Err(format!("{s:?}: unknown percentile {p:?}")),
                },
                (None, Some(f)) => (ThresholdMetric::Latency(f), latency(limit)?),
                (None, None) => {
                    return Err(format!(
                        "{s:?}: unknown metric {n:?} (p50, p90, p99, p999, max, handshake_p99, ..., refused, errors)"
                    ))
                }
            },
        };
        Ok(Threshold { metric, limit, text: s.to_owned() })
    }
}

impl Threshold {
    /// Why `report` breaks this bound, or `None` when it holds.
    pub fn breach(&self, report: &Report) -> Option<String> {
        let (value, shown) = match self.metric {
            ThresholdMetric::Latency(f) => {
                let v = f(&report.latency_us) as f64;
                (v, format!("{:.1}ms", v / 1000.0))
            }
            ThresholdMetric::Handshake(f) => {
                let v = f(&report.handshake_us) as f64;
                (v, format!("{:.1}ms", v / 1000.0))
            }
            ThresholdMetric::RefusedPercent => {
                let refused = report.connections.saturating_sub(report.opened) as f64;
                let v = if report.connections == 0 { 0.0 } else { 100.0 * refused / report.connections as f64 };
                (v, format!("{v:.1}% ({} of {} sessions not opened)", refused, report.connections))
            }
            ThresholdMetric::Errors => {
                let v = report.errors.values().map(|(n, _)| *n).sum::<u64>() as f64;
                (v, format!("{v}"))
            }
        };
        (value > self.limit).then(|| format!("threshold {} failed: {shown}", self.text))
    }
}
