//! `compare`: the same scenario against several targets, interleaved and repeated, medians and
//! ratios against the first target.

use std::collections::HashMap;
use std::fmt::Write;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::scenario::{run, Kind, Scenario};
use crate::stats::{fmt_us, Report};
use crate::sys::Pids;

/// Medians of one target's runs.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct Summary {
    /// Target name as given (`name=URL`).
    pub name: String,
    /// Target URL.
    pub url: String,
    /// Headline throughput: msg/s (echo, rate, terminal), handshakes/s (storm), sessions held (idle).
    pub throughput: f64,
    /// Median p50 latency (storm: handshake), µs.
    pub p50_us: f64,
    /// Median p99 latency (storm: handshake), µs.
    pub p99_us: f64,
    /// Median target CPU µs per message, if the target's pid was given.
    pub cpu_us_per_msg: Option<f64>,
    /// Median target KiB per session, if the target's pid was given.
    pub kib_per_session: Option<f64>,
    /// Whether every run had clean integrity and no errors.
    pub clean: bool,
    /// Every run's full report.
    pub runs: Vec<Report>,
}

/// Parses `name=URL` target arguments.
pub fn parse_targets(args: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    args.iter()
        .map(|a| {
            let (n, u) = a.split_once('=').with_context(|| format!("targets are written name=URL, got `{a}`"))?;
            Ok((n.to_owned(), u.to_owned()))
        })
        .collect()
}

/// Parses a `--pid-of` argument, `name=PID` or `name=PID,PID,...` (a target's processes, summed).
pub fn parse_pid_of(arg: &str) -> Result<(String, Pids), String> {
    let (name, pids) = arg
        .split_once('=')
        .filter(|(name, _)| !name.is_empty())
        .ok_or_else(|| "write name=PID or name=PID,PID,...".to_owned())?;
    Ok((name.to_owned(), pids.parse()?))
}

/// Parses a `--stall-of` argument, `name=N`: the watch scenario's `--stall` for that target.
pub fn parse_stall_of(arg: &str) -> Result<(String, u64), String> {
    let (name, n) =
        arg.split_once('=').filter(|(name, _)| !name.is_empty()).ok_or_else(|| "write name=N".to_owned())?;
    Ok((name.to_owned(), n.parse().map_err(|_| format!("`{n}` is not a count"))?))
}

/// Runs `base` against every target, `repeat` rounds, interleaved (a, b, c, a, b, c, ...);
/// `stalls` overrides `--stall` per target (the same target twice, with and without).
pub async fn compare(
    base: &Scenario,
    targets: &[(String, String)],
    repeat: usize,
    pids: &HashMap<String, Pids>,
    stalls: &HashMap<String, u64>,
    pause: Duration,
) -> anyhow::Result<Vec<Summary>> {
    let mut runs: Vec<Vec<Report>> = vec![Vec::new(); targets.len()];
    for round in 0..repeat.max(1) {
        for (i, (name, url)) in targets.iter().enumerate() {
            let mut s = base.clone();
            s.target = Some(url.clone());
            s.pid = pids.get(name).cloned();
            s.stall = stalls.get(name).copied().unwrap_or(base.stall);
            eprintln!("round {}/{}: {name} ({url})", round + 1, repeat.max(1));
            let meta = crate::stats::RunMeta::now();
            let mut report = run(&s).await.with_context(|| format!("run against {name}"))?;
            report.meta = meta;
            runs[i].push(report);
            tokio::time::sleep(pause).await;
        }
    }
    Ok(targets.iter().zip(runs).map(|((name, url), reports)| summarise(base.scenario, name, url, reports)).collect())
}

fn summarise(kind: Kind, name: &str, url: &str, runs: Vec<Report>) -> Summary {
    let med = |f: &dyn Fn(&Report) -> f64| median(runs.iter().map(f).collect());
    let (throughput, p50, p99) = match kind {
        Kind::Storm => {
            (med(&|r| r.handshakes_per_s), med(&|r| r.handshake_us.p50 as f64), med(&|r| r.handshake_us.p99 as f64))
        }
        Kind::Idle => {
            (med(&|r| r.held as f64), med(&|r| r.handshake_us.p50 as f64), med(&|r| r.handshake_us.p99 as f64))
        }
        _ => (med(&|r| r.msgs_per_s), med(&|r| r.latency_us.p50 as f64), med(&|r| r.latency_us.p99 as f64)),
    };
    let with_pid = runs.iter().all(|r| r.process.is_some()) && !runs.is_empty();
    Summary {
        name: name.to_owned(),
        url: url.to_owned(),
        throughput,
        p50_us: p50,
        p99_us: p99,
        cpu_us_per_msg: with_pid.then(|| med(&|r| r.process.as_ref().map_or(0.0, |p| p.cpu_us_per_msg))),
        kib_per_session: with_pid.then(|| med(&|r| r.process.as_ref().map_or(0.0, |p| p.kib_per_session))),
        clean: runs.iter().all(|r| r.is_clean() && r.errors.is_empty()),
        runs,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One table: medians per target and ratios against the first target (CPU: the first with a pid).
pub fn table(kind: Kind, rows: &[Summary]) -> String {
    let unit = match kind {
        Kind::Storm => "hs/s",
        Kind::Idle => "held",
        _ => "msg/s",
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<12} {:>12} {:>7} {:>10} {:>7} {:>10} {:>7} {:>9} {:>7} {:>9}  integrity",
        "target", unit, "ratio", "p50", "ratio", "p99", "ratio", "cpu µs/m", "ratio", "KiB/sess"
    );
    let Some(first) = rows.first() else { return s };
    let ratio = |a: f64, b: f64| if b > 0.0 { format!("{:.2}", a / b) } else { "-".into() };
    let opt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
    // CPU is compared with the first target that has a pid (the direct baseline usually has none).
    let cpu_base = rows.iter().find_map(|r| r.cpu_us_per_msg);
    for r in rows {
        let cpu_ratio = match (r.cpu_us_per_msg, cpu_base) {
            (Some(a), Some(b)) => ratio(a, b),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "{:<12} {:>12.0} {:>7} {:>10} {:>7} {:>10} {:>7} {:>9} {:>7} {:>9}  {}",
            r.name,
            r.throughput,
            ratio(r.throughput, first.throughput),
            fmt_us(r.p50_us as u64),
            ratio(r.p50_us, first.p50_us),
            fmt_us(r.p99_us as u64),
            ratio(r.p99_us, first.p99_us),
            opt(r.cpu_us_per_msg),
            cpu_ratio,
            opt(r.kib_per_session),
            if r.clean { "ok" } else { "ERRORS" }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(super::median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(super::median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn pid_of_takes_one_or_several_pids() {
        let (name, pids) = super::parse_pid_of("nginx=123,456").unwrap();
        assert_eq!((name.as_str(), pids.as_slice()), ("nginx", &[123, 456][..]));
        let (name, pids) = super::parse_pid_of("portcullis=42").unwrap();
        assert_eq!((name.as_str(), pids.as_slice()), ("portcullis", &[42][..]));
        for bad in ["nginx", "=123", "nginx=", "nginx=12x", "nginx=1,,2", "nginx=1,1"] {
            assert!(super::parse_pid_of(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stall_of_takes_a_name_and_a_count() {
        assert_eq!(super::parse_stall_of("fanout-stalled=20"), Ok(("fanout-stalled".to_owned(), 20)));
        for bad in ["fanout", "=3", "fanout=", "fanout=-1", "fanout=x"] {
            assert!(super::parse_stall_of(bad).is_err(), "{bad}");
        }
    }
}
