//! `--procs N`: one run split over N worker processes, so one process's descriptor limit is not
//! the cap. Each worker is this binary's hidden `worker` subcommand, given its share of the
//! scenario as JSON in `PCLT_WORKER_SCENARIO`; it prints its report as JSON on stdout, and the
//! reports are merged (histograms included). The target's /proc sampling is done here, once.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::time::Instant;

use crate::scenario::{Kind, Scenario};
use crate::stats::{ProcessUse, Report};
use crate::sys;

/// The environment variable carrying a worker's scenario.
pub const WORKER_ENV: &str = "PCLT_WORKER_SCENARIO";

/// Runs `s` over `s.procs` worker processes and merges their reports.
pub async fn run(s: &Scenario) -> anyhow::Result<Report> {
    let n = u64::from(s.procs.max(1));
    let exe = std::env::current_exe().context("cannot find this executable to start workers")?;
    let before = s.pid.as_ref().map(sys::Pids::sample).transpose().context("cannot sample --pid")?;
    let t0 = Instant::now();
    let mut children = Vec::new();
    for k in 0..n {
        // Each worker runs a share, as one of N machines would (`--shard k/N`).
        let mut share = crate::scenario::Shard { index: k as u32, total: n as u32 }.of(s);
        share.procs = 1;
        share.pid = None;
        share.quiet = true;
        let child = tokio::process::Command::new(&exe)
            .arg("worker")
            .env(WORKER_ENV, serde_json::to_string(&share)?)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a worker process")?;
        children.push(child);
    }
    // Sample the target where a single-process run would: at the end of the hold or traffic phase.
    let phase_end = t0 + s.ramp_time() + s.duration;
    let sampler = {
        let pid = s.pid.clone();
        let settle = if s.scenario == Kind::Idle { s.duration.min(Duration::from_secs(1)) / 2 } else { Duration::ZERO };
        tokio::spawn(async move {
            tokio::time::sleep_until(phase_end - settle).await;
            pid.and_then(|p| p.sample().ok())
        })
    };
    let mut parts = Vec::new();
    for child in children {
        let out = child.wait_with_output().await?;
        if !out.status.success() {
            bail!("a worker process failed ({})", out.status);
        }
        parts.push(serde_json::from_slice::<Report>(&out.stdout).context("a worker printed no report")?);
    }
    let loaded = sampler.await.ok().flatten();
    let mut report = Report::merge(parts);
    report.notes.push(format!("split over {n} worker processes"));
    if let (Some(pid), Some(b), Some(l)) = (&s.pid, before, loaded) {
        report.process = Some(ProcessUse::between(pid, &b, &l, &report, s.scenario == Kind::Idle));
    }
    Ok(report)
}

/// The worker side: reads its scenario from the environment, runs it, prints the report as JSON.
pub async fn worker() -> anyhow::Result<()> {
    let text = std::env::var(WORKER_ENV).with_context(|| format!("{WORKER_ENV} is not set"))?;
    let s: Scenario = serde_json::from_str(&text).context("bad worker scenario")?;
    let report = crate::scenario::run(&s).await?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
