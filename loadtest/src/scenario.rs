//! Scenarios: what a run does, and the per-session loops that drive traffic and check integrity.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use fastwebsockets::{FragmentCollector, FragmentCollectorRead, Frame, OpCode, Payload, WebSocketError};
use rand::Rng;
use serde::Deserialize;
use tokio::time::Instant;

use crate::stats::{Hist, ProcessUse, Report, Stats, TimelinePoint};
use crate::target::{Target, Ws};
use crate::token::TokenOptions;
use crate::wire::{self, Invalid, Kind as MsgKind};
use crate::{de_duration, parse_duration, sys};

/// The kinds of scenario.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Closed loop: each session keeps `window` messages in flight.
    #[default]
    Echo,
    /// Open loop at a fixed total message rate; latency from each message's intended send time.
    Rate,
    /// Open sessions at the ramp rate and hold them.
    Idle,
    /// Connect, exchange one message, close, as fast as `connections` workers can.
    Storm,
    /// Keystrokes at human rates against a terminal backend; keystroke-to-echo latency.
    Terminal,
    /// Dashboards: `connections` watchers, `watchers` per agent, each receiving every event its
    /// agent publishes (a `--mode broadcast` backend), checked in order; publish-to-receive
    /// latency per watcher.
    Watch,
    /// Plain HTTP: `connections` kept-alive connections, one request at a time each (closed
    /// loop); a POST of `size` bytes echoed back and checked, or a GET; requests per second.
    Http,
    /// Server-Sent Events: `connections` streams for `duration`; every event checked in order,
    /// publish-to-receive latency; events per second.
    Sse,
    /// MCP (Streamable HTTP): each connection sends `initialize`, keeps the `Mcp-Session-Id` it
    /// gets, then `tools/call`s the `echo` tool one at a time (closed loop), each answer checked
    /// for its id and arguments; calls per second.
    Mcp,
}

impl Kind {
    /// Lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Echo => "echo",
            Kind::Rate => "rate",
            Kind::Idle => "idle",
            Kind::Storm => "storm",
            Kind::Terminal => "terminal",
            Kind::Watch => "watch",
            Kind::Http => "http",
            Kind::Sse => "sse",
            Kind::Mcp => "mcp",
        }
    }
}

/// A scenario: from command-line flags or a TOML file (see `loadtest/scenarios/`).
#[derive(Clone, Debug, clap::Args, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scenario {
    /// Scenario kind (set by the subcommand on the command line).
    #[arg(skip)]
    pub scenario: Kind,
    /// Target URL, `ws://` or `wss://`; `{conn}` in the path is the connection number.
    #[arg(long)]
    pub target: Option<String>,
    /// Sessions (storm: concurrent workers).
    #[arg(long, short = 'c', default_value_t = 10)]
    pub connections: u64,
    /// Length of the traffic or hold phase.
    #[arg(long, short = 'd', default_value = "10s", value_parser = parse_duration)]
    #[serde(deserialize_with = "de_duration", serialize_with = "crate::ser_duration")]
    pub duration: Duration,
    /// Messages in flight per session (echo).
    #[arg(long, default_value_t = 1)]
    pub window: usize,
    /// Message size in bytes (at least 32, the integrity header).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Total messages per second over all sessions (rate).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Keystrokes per second per session (terminal), Poisson-distributed.
    #[arg(long, default_value_t = 5.0)]
    pub keystroke_rate: f64,
    /// New sessions per second (0 = all at once). Storm: the pace of new sessions over all
    /// workers, open loop (0 = as fast as the workers can; a worker behind its schedule starts
    /// its next session at once).
    #[arg(long, default_value_t = 0.0)]
    pub ramp: f64,
    /// Send a ping this often while holding idle sessions (0 = never).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    #[serde(deserialize_with = "de_duration", serialize_with = "crate::ser_duration")]
    pub ping_interval: Duration,
    /// Time limit for one session to open (TCP + TLS + upgrade).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(deserialize_with = "de_duration", serialize_with = "crate::ser_duration")]
    pub connect_timeout: Duration,
    /// After the traffic phase, how long to wait for outstanding replies before counting them lost.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    #[serde(deserialize_with = "de_duration", serialize_with = "crate::ser_duration")]
    pub drain: Duration,
    /// Extra request header `Name: value` (repeatable; `{conn}` substituted).
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
    /// Origin header.
    #[arg(long)]
    pub origin: Option<String>,
    /// Subprotocol to offer.
    #[arg(long)]
    pub subprotocol: Option<String>,
    /// CA certificate (PEM) to trust for wss://.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Accept any server certificate (self-signed test targets only).
    #[arg(long)]
    pub insecure: bool,
    /// Spread sessions over source addresses 127.0.0.1 … 127.0.0.N (loopback targets only).
    #[arg(long, default_value_t = 1)]
    pub source_addrs: u8,
    /// WebSockets over HTTP/2 (RFC 8441, wss:// only): this many sessions share each h2
    /// connection (sessions i·N … i·N+N-1 the i-th). 0: HTTP/1.1, a connection per session.
    #[arg(long, default_value_t = 0)]
    pub h2_streams: u64,
    /// Target process id(s), comma-separated: sample RSS and CPU time from /proc, summed over the
    /// processes (e.g. all NGINX workers).
    #[arg(long, value_name = "PID[,PID...]")]
    pub pid: Option<sys::Pids>,
    /// No live progress line.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// First connection number of this process (set for `--procs` workers).
    #[arg(skip)]
    pub conn_offset: u64,
    /// Split the sessions over this many worker processes (each has its own descriptor limit).
    #[arg(long, default_value_t = 1)]
    pub procs: u32,
    /// Run only share K of N (`K/N`, K from 0) of the scenario: its sessions (numbered on from
    /// the shares before it), its rate and ramp. For load from several machines: N workers
    /// (a Kubernetes Indexed Job: `--shard $(JOB_COMPLETION_INDEX)/N`) each write `--json`,
    /// and `merge` combines them.
    #[arg(long, value_name = "K/N")]
    pub shard: Option<Shard>,
    /// Storm: stop after this many sessions in total in this process, spread over its workers
    /// (0 = run for the whole duration).
    #[arg(long, default_value_t = 0)]
    pub sessions: u64,
    /// Http: the request method, POST (a body of `size` bytes, echoed back) or GET.
    #[arg(long, default_value = "POST")]
    pub method: String,
    /// Watch: watchers per agent (connection `i` watches agent `i / watchers`; write the
    /// target as `.../agents/agent-{conn / 50}/events`).
    #[arg(long, default_value_t = 50)]
    pub watchers: u64,
    /// Watch: events each agent publishes (the backend's `--events`).
    #[arg(long, default_value_t = 100)]
    pub events: u64,
    /// Watch: also open this many watchers that never read (one on each of the first agents,
    /// each with a small receive buffer, opened with its agent's first watcher), left out of
    /// every figure: to see that clients which stop reading do not slow the rest. The report
    /// says how each ended (dropped by the target, or still open).
    #[arg(long, default_value_t = 0)]
    pub stall: u64,
    /// Token settings (a `[token]` table in scenario files).
    #[command(flatten)]
    pub token: TokenOptions,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            scenario: Kind::Echo,
            target: None,
            connections: 10,
            duration: Duration::from_secs(10),
            window: 1,
            size: 64,
            rate: 1000.0,
            keystroke_rate: 5.0,
            ramp: 0.0,
            ping_interval: Duration::ZERO,
            connect_timeout: Duration::from_secs(10),
            drain: Duration::from_secs(3),
            headers: Vec::new(),
            origin: None,
            subprotocol: None,
            ca: None,
            insecure: false,
            source_addrs: 1,
            h2_streams: 0,
            pid: None,
            quiet: false,
            conn_offset: 0,
            procs: 1,
            shard: None,
            sessions: 0,
            watchers: 50,
            events: 100,
            stall: 0,
            method: "POST".into(),
            token: TokenOptions { alg: "ES256".into(), token_via: "header".into(), ..TokenOptions::default() },
        }
    }
}

impl Scenario {
    /// Reads a TOML scenario file.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Scenario> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut s: Scenario = toml::from_str(&text).with_context(|| format!("invalid scenario {}", path.display()))?;
        if s.token.token_ttl.is_zero() {
            s.token.token_ttl = Duration::from_secs(3600);
        }
        Ok(s)
    }

    /// When session `i` may start connecting.
    fn start_of(&self, t0: Instant, i: u64) -> Instant {
        if self.ramp > 0.0 {
            t0 + Duration::from_secs_f64(i as f64 / self.ramp)
        } else {
            t0
        }
    }

    /// How long the ramp takes.
    pub fn ramp_time(&self) -> Duration {
        if self.ramp > 0.0 {
            Duration::from_secs_f64(self.connections as f64 / self.ramp)
        } else {
            Duration::ZERO
        }
    }
}

/// Runs a scenario to completion and returns its report (over `procs` worker processes if asked).
pub async fn run(s: &Scenario) -> anyhow::Result<Report> {
    if let Some(shard) = s.shard {
        let mut share = shard.of(s);
        share.shard = None;
        let mut report = Box::pin(run(&share)).await?;
        report.notes.push(format!(
            "shard {} of {} (sessions {}..{})",
            shard.index,
            shard.total,
            share.conn_offset,
            share.conn_offset + share.connections
        ));
        return Ok(report);
    }
    if s.stall > 0 && (s.scenario != Kind::Watch || s.procs > 1 || s.h2_streams > 0) {
        anyhow::bail!("--stall is for the watch scenario, in one process, over HTTP/1.1");
    }
    if s.procs > 1 {
        return crate::procs::run(s).await;
    }
    let fd_limit = sys::raise_fd_limit();
    let target = Arc::new(Target::new(s).await?);
    let stats = Arc::new(Stats::default());
    let mut report = Report {
        scenario: s.scenario.name().to_owned(),
        target: s.target.clone().unwrap_or_default(),
        connections: s.connections,
        ..Report::default()
    };
    if s.connections + 64 > fd_limit {
        report.notes.push(format!(
            "the descriptor limit ({fd_limit}, soft raised to hard) caps this run near {} sessions per process",
            fd_limit.saturating_sub(64)
        ));
    }
    if s.size < wire::HEADER_LEN {
        report.notes.push(format!("messages are at least {} bytes (the integrity header)", wire::HEADER_LEN));
    }
    let before = s.pid.as_ref().map(sys::Pids::sample).transpose().context("cannot sample --pid")?;
    // About 60 timeline points over the run: every 250 ms for a short run, every second for a
    // long one.
    let period = ((s.ramp_time() + s.duration) / 60).clamp(Duration::from_millis(250), Duration::from_secs(1));
    let progress = progress(s.quiet, stats.clone(), period);
    let t0 = Instant::now();
    let loaded;
    match s.scenario {
        Kind::Echo | Kind::Rate | Kind::Terminal | Kind::Http | Kind::Sse | Kind::Mcp => {
            let end = t0 + s.ramp_time() + s.duration;
            let mut tasks = Vec::new();
            for i in 0..s.connections {
                let (s2, target, stats) = (s.clone(), target.clone(), stats.clone());
                tasks.push(tokio::spawn(async move {
                    match s2.scenario {
                        Kind::Http | Kind::Mcp => http_session(&s2, &target, &stats, i, t0, end).await,
                        Kind::Sse => sse_session(&s2, &target, &stats, i, t0, end).await,
                        _ => traffic_session(&s2, &target, &stats, i, t0, end).await,
                    }
                }));
            }
            let pid = s.pid.clone();
            let sampler = tokio::spawn(async move {
                tokio::time::sleep_until(end).await;
                pid.and_then(|p| p.sample().ok())
            });
            for t in tasks {
                let _ = t.await;
            }
            loaded = sampler.await.ok().flatten();
            report.duration_s = (end - t0).as_secs_f64();
        }
        Kind::Idle => {
            let hold_end = t0 + s.ramp_time() + s.duration;
            let mut tasks = Vec::new();
            for i in 0..s.connections {
                let (s2, target, stats) = (s.clone(), target.clone(), stats.clone());
                tasks.push(tokio::spawn(async move { idle_session(&s2, &target, &stats, i, t0, hold_end).await }));
            }
            let settle = s.duration.min(Duration::from_secs(1)) / 2;
            tokio::time::sleep_until(hold_end - settle).await;
            loaded = s.pid.as_ref().and_then(|p| p.sample().ok());
            for t in tasks {
                if let Ok(true) = t.await {
                    report.held += 1;
                }
            }
            report.duration_s = s.duration.as_secs_f64();
        }
        Kind::Watch => {
            // Every watcher ends when its agent's events are done; `duration` bounds the run.
            let end = t0 + s.ramp_time() + s.duration;
            // A stalled watcher joins with its agent's first watcher (so the backend's groups
            // start when they would without it), and is let go (and asked how it ended) once
            // the others are done.
            let (done_tx, done_rx) = tokio::sync::watch::channel(false);
            let mut stalled = Vec::new();
            for k in 0..s.stall {
                let (s2, target, done) = (s.clone(), target.clone(), done_rx.clone());
                stalled.push(tokio::spawn(async move { stalled_watcher(&s2, &target, k, t0, done).await }));
            }
            let mut tasks = Vec::new();
            for i in 0..s.connections {
                let (s2, target, stats) = (s.clone(), target.clone(), stats.clone());
                tasks.push(tokio::spawn(async move { watch_session(&s2, &target, &stats, i, t0, end).await }));
            }
            let mut watchers = Vec::new();
            for t in tasks {
                if let Ok(Some(w)) = t.await {
                    watchers.push(w);
                }
            }
            loaded = s.pid.as_ref().and_then(|p| p.sample().ok());
            report.duration_s = t0.elapsed().as_secs_f64();
            let _ = done_tx.send(true);
            let mut stall_opened = 0;
            let mut stall_ends = BTreeMap::new();
            for t in stalled {
                let end = match t.await {
                    Ok(Some(wait)) => {
                        stall_opened += 1;
                        wait.await.unwrap_or_else(|_| "failed".to_owned())
                    }
                    _ => "never opened".to_owned(),
                };
                *stall_ends.entry(end).or_insert(0) += 1;
            }
            let mut summary = WatchSummary::of(s, &watchers);
            summary.stalled = stall_opened;
            summary.stalled_ends = stall_ends;
            report.watch = Some(summary);
        }
        Kind::Storm => {
            let end = t0 + s.duration;
            let mut tasks = Vec::new();
            for i in 0..s.connections {
                let (s2, target, stats) = (s.clone(), target.clone(), stats.clone());
                tasks.push(tokio::spawn(async move { storm_worker(&s2, &target, &stats, i, t0, end).await }));
            }
            for t in tasks {
                let _ = t.await;
            }
            loaded = s.pid.as_ref().and_then(|p| p.sample().ok());
            report.duration_s = t0.elapsed().as_secs_f64();
        }
    }
    report.timeline = progress.finish().await;
    report.absorb(&stats);
    if s.scenario == Kind::Storm && report.duration_s > 0.0 {
        report.handshakes_per_s = report.opened as f64 / report.duration_s;
    }
    if let (Some(pid), Some(b), Some(l)) = (&s.pid, before, loaded) {
        report.process = Some(ProcessUse::between(pid, &b, &l, &report, s.scenario == Kind::Idle));
    }
    Ok(report)
}

/// The live progress line (hidden with `quiet`), which also records the throughput timeline.
struct Progress {
    bar: indicatif::ProgressBar,
    stop: tokio::sync::oneshot::Sender<()>,
    ticker: tokio::task::JoinHandle<Vec<TimelinePoint>>,
}

impl Progress {
    async fn finish(self) -> Vec<TimelinePoint> {
        let _ = self.stop.send(());
        let timeline = self.ticker.await.unwrap_or_default();
        self.bar.finish_and_clear();
        timeline
    }
}

fn progress(quiet: bool, stats: Arc<Stats>, period: Duration) -> Progress {
    let bar = if quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new_spinner() };
    let b = bar.clone();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let ticker = tokio::spawn(async move {
        let start = Instant::now();
        let mut timeline = Vec::new();
        let mut last = (start, 0u64);
        let mut last_point = (start, 0u64);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut stopped => return timeline,
            }
            let now = Instant::now();
            let recv = stats.received.load(Ordering::Relaxed);
            let open = stats.open.load(Ordering::Relaxed);
            let rate = (recv - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-3);
            last = (now, recv);
            if now - last_point.0 >= period {
                let rate = (recv - last_point.1) as f64 / (now - last_point.0).as_secs_f64();
                let sent = stats.sent.load(Ordering::Relaxed);
                let errors = stats.error_count.load(Ordering::Relaxed);
                let (p50_us, p99_us) = {
                    let mut h = stats.interval_latency.lock().unwrap_or_else(|p| p.into_inner());
                    let q =
                        if h.0.is_empty() { (0, 0) } else { (h.0.value_at_quantile(0.5), h.0.value_at_quantile(0.99)) };
                    h.0.reset();
                    q
                };
                timeline.push(TimelinePoint {
                    t_s: (now - start).as_secs_f64(),
                    msgs_per_s: rate,
                    open,
                    sent,
                    errors,
                    p50_us,
                    p99_us,
                });
                last_point = (now, recv);
            }
            b.set_message(format!(
                "{:>5.1}s  open {}  sent {}  recv {}  {:.0} msg/s  errors {}  integrity {}",
                (now - start).as_secs_f64(),
                open,
                stats.sent.load(Ordering::Relaxed),
                recv,
                rate,
                stats.error_count.load(Ordering::Relaxed),
                stats.lost.load(Ordering::Relaxed)
                    + stats.corrupted.load(Ordering::Relaxed)
                    + stats.duplicated.load(Ordering::Relaxed)
                    + stats.reordered.load(Ordering::Relaxed),
            ));
            b.tick();
        }
    });
    Progress { bar, stop, ticker }
}

/// Opens session `i`, recording handshake latency or the error; keeps `stats.open` up to date.
async fn open(s: &Scenario, target: &Target, stats: &Stats, i: u64) -> Option<Ws> {
    let started = Instant::now();
    match target.connect(i, s.connect_timeout).await {
        Ok(ws) => {
            stats.record_handshake(started.elapsed().as_micros() as u64);
            stats.opened.fetch_add(1, Ordering::Relaxed);
            stats.open.fetch_add(1, Ordering::Relaxed);
            Some(ws)
        }
        Err(e) => {
            stats.error(&e.kind, || e.detail.clone());
            None
        }
    }
}

/// Per-session integrity state: what was sent and not yet received.
struct Tracker {
    /// This session's connection id.
    conn: u64,
    /// Next sequence number to send.
    next_seq: u64,
    /// Sent and not yet received: sequence → time the latency is measured from.
    outstanding: HashMap<u64, Instant>,
    /// Highest client sequence received so far.
    max_received: Option<u64>,
    /// Next backend-originated sequence expected.
    backend_next: u64,
    /// Latency of this session, µs.
    latency: Hist,
    /// Set when the writer has stopped.
    writer_done: bool,
}

impl Tracker {
    fn new(conn: u64) -> Self {
        Tracker {
            conn,
            next_seq: 0,
            outstanding: HashMap::new(),
            max_received: None,
            backend_next: 0,
            latency: Hist::default(),
            writer_done: false,
        }
    }

    /// Checks one received data message; returns whether it answered one of ours (frees a window slot).
    fn on_message(&mut self, payload: &[u8], now: Instant, stats: &Stats) -> bool {
        stats.received.fetch_add(1, Ordering::Relaxed);
        stats.bytes_received.fetch_add(payload.len() as u64, Ordering::Relaxed);
        let h = match wire::decode(payload) {
            Ok(h) => h,
            Err(e) => {
                stats.corrupted.fetch_add(1, Ordering::Relaxed);
                // A damaged message whose sequence is still readable is corrupted, not also lost.
                if let Invalid::Checksum { seq } = e {
                    return self.outstanding.remove(&seq).is_some();
                }
                return false;
            }
        };
        match h.kind {
            MsgKind::Client => {
                if h.conn != self.conn {
                    stats.corrupted.fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                match self.outstanding.remove(&h.seq) {
                    Some(t) => {
                        let us = now.saturating_duration_since(t).as_micros() as u64;
                        self.latency.record(us);
                        if h.seq % crate::stats::INTERVAL_SAMPLE == 0 {
                            stats.interval_latency.lock().unwrap_or_else(|p| p.into_inner()).record(us);
                        }
                        if self.max_received.is_some_and(|m| h.seq < m) {
                            stats.reordered.fetch_add(1, Ordering::Relaxed);
                        }
                        self.max_received = Some(self.max_received.map_or(h.seq, |m| m.max(h.seq)));
                        true
                    }
                    None if h.seq < self.next_seq => {
                        stats.duplicated.fetch_add(1, Ordering::Relaxed);
                        false
                    }
                    None => {
                        stats.corrupted.fetch_add(1, Ordering::Relaxed);
                        false
                    }
                }
            }
            MsgKind::Backend => {
                if h.seq > self.backend_next {
                    stats.lost.fetch_add(h.seq - self.backend_next, Ordering::Relaxed);
                } else if h.seq < self.backend_next {
                    stats.reordered.fetch_add(1, Ordering::Relaxed);
                }
                self.backend_next = self.backend_next.max(h.seq + 1);
                false
            }
        }
    }
}

/// The stream under an open session.
type Io = hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>;

/// The write half of a session, shared by the writer and the reader's obligated replies (pong, close).
///
/// Known limit: a ping that arrives while the writer is blocked on a full socket makes the reader
/// wait for this lock instead of reading; if the peer is blocked writing to us at that moment, the
/// session stalls until the drain deadline. Proxies ping only after silence, so load runs do not
/// hit it.
type SharedWriter = Arc<tokio::sync::Mutex<fastwebsockets::WebSocketWrite<tokio::io::WriteHalf<Io>>>>;

/// Payload of the ping that marks the end of a session's sends.
const DRAIN_PING: &[u8] = b"pclt-drain";

/// One echo/rate/terminal session: connect, send until `end`, drain replies, close.
async fn traffic_session(s: &Scenario, target: &Target, stats: &Arc<Stats>, i: u64, t0: Instant, end: Instant) {
    tokio::time::sleep_until(s.start_of(t0, i)).await;
    let Some(ws) = open(s, target, stats, s.conn_offset + i).await else { return };
    let (rx, tx) = ws.split(tokio::io::split);
    let mut rx = FragmentCollectorRead::new(rx);
    let tx: SharedWriter = Arc::new(tokio::sync::Mutex::new(tx));
    let tracker = Arc::new(Mutex::new(Tracker::new(s.conn_offset + i)));
    let window = Arc::new(tokio::sync::Semaphore::new(s.window.max(1)));
    let failed = Arc::new(AtomicBool::new(false));

    let writer = {
        let (tx, tracker, window, failed) = (tx.clone(), tracker.clone(), window.clone(), failed.clone());
        let s = s.clone();
        // Counted as each message is written, so the live progress line shows them.
        let sent = stats.clone();
        async move {
            let started = Instant::now();
            // Rate: this session's share of the total rate, phase-shifted so sessions interleave.
            let interval = Duration::from_secs_f64(s.connections.max(1) as f64 / s.rate.max(1e-3));
            let phase = Duration::from_secs_f64((i as f64 / s.rate.max(1e-3)) % interval.as_secs_f64().max(1e-9));
            let mut next = started + phase;
            let mut k: u32 = 0;
            loop {
                let intended = match s.scenario {
                    Kind::Rate => {
                        let t = started + phase + interval * k;
                        k += 1;
                        t
                    }
                    Kind::Terminal => {
                        let gap: f64 =
                            -rand::rng().random_range(f64::EPSILON..1.0f64).ln() / s.keystroke_rate.max(1e-3);
                        next += Duration::from_secs_f64(gap);
                        next
                    }
                    _ => match tokio::time::timeout_at(end, window.acquire()).await {
                        Ok(Ok(permit)) => {
                            permit.forget();
                            Instant::now()
                        }
                        _ => break,
                    },
                };
                if intended >= end {
                    break;
                }
                // Only sleep for a future send time: tokio's timer rounds deadlines up to the next
                // millisecond, so sleeping until "now" would hold every closed-loop message for up
                // to 1 ms and put a 1 ms floor under every round trip.
                if intended > Instant::now() {
                    tokio::time::sleep_until(intended).await;
                }
                let seq = {
                    let mut t = tracker.lock().unwrap_or_else(|p| p.into_inner());
                    let seq = t.next_seq;
                    t.next_seq += 1;
                    t.outstanding.insert(seq, intended);
                    seq
                };
                let size = if s.scenario == Kind::Terminal { wire::HEADER_LEN.max(s.size.min(64)) } else { s.size };
                let msg = wire::encode(MsgKind::Client, s.conn_offset + i, seq, size);
                let len = msg.len();
                if let Err(e) = tx.lock().await.write_frame(Frame::binary(Payload::Owned(msg))).await {
                    failed.store(true, Ordering::Relaxed);
                    return Some(e);
                }
                sent.sent.fetch_add(1, Ordering::Relaxed);
                sent.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
            }
            tracker.lock().unwrap_or_else(|p| p.into_inner()).writer_done = true;
            let r =
                tx.lock().await.write_frame(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(DRAIN_PING))).await;
            r.err()
        }
    };
    let writer = tokio::spawn(writer);

    // The reader: until the writer is done and every reply is in, or the drain time runs out.
    let drain_end = end + s.drain;
    let mut closed_by_target = false;
    let mut obligated = |f| {
        let tx = tx.clone();
        async move { tx.lock().await.write_frame(f).await }
    };
    loop {
        let read = rx.read_frame(&mut obligated);
        let frame = match tokio::time::timeout_at(drain_end, read).await {
            Err(_) => break,
            Ok(Err(e)) => {
                if !failed.load(Ordering::Relaxed) {
                    let (kind, detail) = classify(&e);
                    stats.error(kind, || detail);
                }
                closed_by_target = true;
                break;
            }
            Ok(Ok(f)) => f,
        };
        match frame.opcode {
            OpCode::Binary | OpCode::Text => {
                let mut t = tracker.lock().unwrap_or_else(|p| p.into_inner());
                if t.on_message(&frame.payload, Instant::now(), stats) {
                    window.add_permits(1);
                }
                if t.writer_done && t.outstanding.is_empty() {
                    break;
                }
            }
            OpCode::Pong => {
                let t = tracker.lock().unwrap_or_else(|p| p.into_inner());
                if t.writer_done && t.outstanding.is_empty() {
                    break;
                }
            }
            OpCode::Close => {
                let code = close_code(&frame.payload);
                stats.close_code(code);
                stats.error("closed by target", || format!("close {code} before the end of the run"));
                let _ = tx.lock().await.write_frame(close_reply(&frame.payload)).await;
                closed_by_target = true;
                break;
            }
            _ => {}
        }
    }
    window.close();
    let write_err = writer.await.unwrap_or_default();
    if let Some(e) = write_err {
        if !closed_by_target {
            let (kind, detail) = classify(&e);
            stats.error(kind, || format!("write: {detail}"));
        }
    }
    {
        let t = tracker.lock().unwrap_or_else(|p| p.into_inner());
        stats.lost.fetch_add(t.outstanding.len() as u64, Ordering::Relaxed);
        stats.merge_latency(&t.latency);
    }
    if !closed_by_target {
        let _ = tx.lock().await.write_frame(Frame::close(1000, b"")).await;
        let wait_close = async {
            loop {
                let f = rx.read_frame(&mut obligated).await;
                match f {
                    Ok(f) if f.opcode == OpCode::Close => {
                        stats.close_code(close_code(&f.payload));
                        break;
                    }
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), wait_close).await;
    }
    stats.open.fetch_sub(1, Ordering::Relaxed);
}

/// One idle session: open, hold until `hold_end` (pinging if asked), close. Returns whether it held.
async fn idle_session(s: &Scenario, target: &Target, stats: &Stats, i: u64, t0: Instant, hold_end: Instant) -> bool {
    tokio::time::sleep_until(s.start_of(t0, i)).await;
    let Some(ws) = open(s, target, stats, s.conn_offset + i).await else { return false };
    let (rx, tx) = ws.split(tokio::io::split);
    let mut rx = FragmentCollectorRead::new(rx);
    let tx: SharedWriter = Arc::new(tokio::sync::Mutex::new(tx));
    let (close_tx, mut close_rx) = tokio::sync::watch::channel(None::<u16>);
    let reader = {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                let f = rx
                    .read_frame(&mut |f| {
                        let tx = tx.clone();
                        async move { tx.lock().await.write_frame(f).await }
                    })
                    .await;
                match f {
                    Ok(f) if f.opcode == OpCode::Close => {
                        let _ = tx.lock().await.write_frame(close_reply(&f.payload)).await;
                        let _ = close_tx.send(Some(close_code(&f.payload)));
                        return;
                    }
                    Ok(_) => {}
                    Err(_) => {
                        let _ = close_tx.send(Some(1006));
                        return;
                    }
                }
            }
        })
    };
    let mut held = true;
    loop {
        let wake = if s.ping_interval.is_zero() { hold_end } else { (Instant::now() + s.ping_interval).min(hold_end) };
        tokio::select! {
            _ = close_rx.changed() => {
                let code = (*close_rx.borrow()).unwrap_or(1006);
                stats.close_code(code);
                stats.error("closed by target", || format!("close {code} while idle"));
                held = false;
                break;
            }
            _ = tokio::time::sleep_until(wake) => {
                if wake >= hold_end {
                    break;
                }
                let _ = tx.lock().await.write_frame(Frame::new(true, OpCode::Ping, None, Payload::Borrowed(b"idle"))).await;
            }
        }
    }
    if held {
        let _ = tx.lock().await.write_frame(Frame::close(1000, b"")).await;
        if tokio::time::timeout(Duration::from_secs(2), close_rx.changed()).await.is_ok() {
            if let Some(code) = *close_rx.borrow() {
                stats.close_code(code);
            }
        }
    }
    reader.abort();
    stats.open.fetch_sub(1, Ordering::Relaxed);
    held
}

/// One storm worker: connect, one message, close, repeated until `end`; at `--ramp` new
/// sessions per second over all workers when it is set (worker `w`'s `n`-th session is due at
/// `t0 + (n + w / workers) · workers / ramp`), as fast as it can when it is not.
async fn storm_worker(s: &Scenario, target: &Target, stats: &Stats, worker: u64, t0: Instant, end: Instant) {
    let workers = s.connections.max(1);
    let period = (s.ramp > 0.0).then(|| Duration::from_secs_f64(workers as f64 / s.ramp));
    let mut n = 0u64;
    while Instant::now() < end {
        let nth = worker + n * workers;
        if s.sessions > 0 && nth >= s.sessions {
            break;
        }
        if let Some(period) = period {
            let due = t0 + period.mul_f64(n as f64 + worker as f64 / workers as f64);
            if due >= end {
                break;
            }
            tokio::time::sleep_until(due).await;
        }
        let conn = s.conn_offset + nth;
        n += 1;
        let Some(ws) = open(s, target, stats, conn).await else {
            // Back off a little so a refusing target is not spun against.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let mut ws = FragmentCollector::new(ws);
        let mut tracker = Tracker::new(conn);
        let sent_at = Instant::now();
        tracker.outstanding.insert(0, sent_at);
        tracker.next_seq = 1;
        let msg = wire::encode(MsgKind::Client, conn, 0, s.size);
        stats.bytes_sent.fetch_add(msg.len() as u64, Ordering::Relaxed);
        stats.sent.fetch_add(1, Ordering::Relaxed);
        let exchange = async {
            ws.write_frame(Frame::binary(Payload::Owned(msg))).await?;
            loop {
                let f = ws.read_frame().await?;
                match f.opcode {
                    OpCode::Binary | OpCode::Text if tracker.on_message(&f.payload, Instant::now(), stats) => break,
                    OpCode::Close => {
                        let _ = ws.write_frame(close_reply(&f.payload)).await;
                        return Err(WebSocketError::ConnectionClosed);
                    }
                    _ => {}
                }
            }
            ws.write_frame(Frame::close(1000, b"")).await?;
            loop {
                let f = ws.read_frame().await?;
                if f.opcode == OpCode::Close {
                    stats.close_code(close_code(&f.payload));
                    return Ok::<(), WebSocketError>(());
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), exchange).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let (kind, detail) = classify(&e);
                stats.error(kind, || detail);
            }
            Err(_) => stats.error("timeout", || "no echo or close reply within 5 s".into()),
        }
        stats.lost.fetch_add(tracker.outstanding.len() as u64, Ordering::Relaxed);
        stats.merge_latency(&tracker.latency);
        stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The status code of a close frame payload (1005 when absent).
/// The reply to a close frame the target sent: its code echoed (RFC 6455 §5.5.1), or an empty
/// close when it carried none.
fn close_reply(payload: &[u8]) -> Frame<'static> {
    match payload.get(..2) {
        Some(code) => Frame::close(u16::from_be_bytes([code[0], code[1]]), b""),
        None => Frame::close_raw(Payload::Owned(Vec::new())),
    }
}

fn close_code(payload: &[u8]) -> u16 {
    if payload.len() >= 2 {
        u16::from_be_bytes([payload[0], payload[1]])
    } else {
        1005
    }
}

/// A short stable label and the detail of a WebSocket error.
fn classify(e: &WebSocketError) -> (&'static str, String) {
    let kind = match e {
        WebSocketError::ConnectionClosed => "connection closed",
        WebSocketError::UnexpectedEOF => "unexpected eof",
        WebSocketError::IoError(_) => "io",
        _ => "protocol",
    };
    (kind, e.to_string())
}

/// What one watcher saw.
pub struct Watcher {
    /// Events received.
    pub received: u64,
    /// Every event, in order, none missing or repeated.
    pub complete: bool,
    /// Its publish-to-receive latency, µs.
    pub latency: Hist,
}

/// The dashboards run in numbers: how many watchers saw everything, and the spread of their
/// latency percentiles (each watcher's p50 and p99, summarised over the watchers).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct WatchSummary {
    /// Agents (groups of watchers).
    pub agents: u64,
    /// Watchers per agent.
    pub watchers_per_agent: u64,
    /// Events each agent published.
    pub events_per_agent: u64,
    /// Watchers that opened.
    pub watchers: u64,
    /// Watchers that received every event of their agent, in order.
    pub complete: u64,
    /// Each watcher's median latency, summarised over the watchers (µs).
    pub per_watcher_p50_us: crate::stats::Percentiles,
    /// Each watcher's 99th-percentile latency, summarised over the watchers (µs).
    pub per_watcher_p99_us: crate::stats::Percentiles,
    /// Watchers that never read (`--stall`) and opened; not in any other figure.
    #[serde(default)]
    pub stalled: u64,
    /// How the stalled watchers ended, once the others were done: `closed <code>` (the target
    /// sent a close frame), `cut` (the connection ended without one), `open` (still open).
    #[serde(default)]
    pub stalled_ends: BTreeMap<String, u64>,
}

impl WatchSummary {
    fn of(s: &Scenario, watchers: &[Watcher]) -> WatchSummary {
        let mut p50 = Hist::default();
        let mut p99 = Hist::default();
        for w in watchers.iter().filter(|w| !w.latency.0.is_empty()) {
            p50.record(w.latency.0.value_at_quantile(0.50));
            p99.record(w.latency.0.value_at_quantile(0.99));
        }
        WatchSummary {
            agents: s.connections.div_ceil(s.watchers.max(1)),
            watchers_per_agent: s.watchers,
            events_per_agent: s.events,
            watchers: watchers.len() as u64,
            complete: watchers.iter().filter(|w| w.complete).count() as u64,
            per_watcher_p50_us: crate::stats::Percentiles::of(&p50.0),
            per_watcher_p99_us: crate::stats::Percentiles::of(&p99.0),
            stalled: 0,
            stalled_ends: BTreeMap::new(),
        }
    }
}

/// How long a stalled watcher, let go at the end, reads before it is called `open`.
const STALL_DRAIN: Duration = Duration::from_secs(10);

/// A watcher that never reads (`--stall`): on agent `k`, opened when that agent's first watcher
/// is, with a receive buffer of 4 KiB, so that what the target sends it backs up at the target.
/// Returns, once open, a task that waits for `done` and then reads what is left, to tell how
/// the target ended it.
async fn stalled_watcher(
    s: &Scenario,
    target: &Target,
    k: u64,
    t0: Instant,
    mut done: tokio::sync::watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<String>> {
    let agents = s.connections.div_ceil(s.watchers.max(1)).max(1);
    let first = (k % agents) * s.watchers.max(1);
    tokio::time::sleep_until(s.start_of(t0, first)).await;
    let ws = target.connect_stalled(s.conn_offset + first, s.connect_timeout, 4096).await.ok()?;
    Some(tokio::spawn(async move {
        let _ = done.wait_for(|d| *d).await;
        let mut ws = FragmentCollector::new(ws);
        let drain = async {
            loop {
                match ws.read_frame().await {
                    Ok(f) if f.opcode == OpCode::Close => return format!("closed {}", close_code(&f.payload)),
                    Ok(_) => continue,
                    Err(_) => return "cut".to_owned(),
                }
            }
        };
        tokio::time::timeout(STALL_DRAIN, drain).await.unwrap_or_else(|_| "open".to_owned())
    }))
}

/// One watcher: every event of its agent, checked for order and completeness, until the close.
async fn watch_session(
    s: &Scenario,
    target: &Target,
    stats: &Stats,
    i: u64,
    t0: Instant,
    end: Instant,
) -> Option<Watcher> {
    tokio::time::sleep_until(s.start_of(t0, i)).await;
    let ws = open(s, target, stats, s.conn_offset + i).await?;
    let mut ws = FragmentCollector::new(ws);
    let mut w = Watcher { received: 0, complete: false, latency: Hist::default() };
    let mut next = 0u64;
    let mut clean = true;
    loop {
        let frame = match tokio::time::timeout_at(end, ws.read_frame()).await {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                stats.error("read", || e.to_string());
                clean = false;
                break;
            }
            Err(_) => {
                stats.error("watch timeout", || format!("events still missing at the end of the run (got {next})"));
                clean = false;
                break;
            }
        };
        match frame.opcode {
            OpCode::Binary | OpCode::Text => {
                let received_at = wire::now_us();
                stats.received.fetch_add(1, Ordering::Relaxed);
                stats.bytes_received.fetch_add(frame.payload.len() as u64, Ordering::Relaxed);
                w.received += 1;
                let seq = match wire::decode(&frame.payload) {
                    Ok(h) if h.kind == MsgKind::Backend => h.seq,
                    _ => {
                        stats.corrupted.fetch_add(1, Ordering::Relaxed);
                        clean = false;
                        continue;
                    }
                };
                if let Some(sent) = wire::sent_us(&frame.payload) {
                    let us = received_at.saturating_sub(sent);
                    w.latency.record(us);
                    stats.latency.lock().unwrap_or_else(|p| p.into_inner()).record(us);
                }
                match seq.cmp(&next) {
                    std::cmp::Ordering::Equal => next += 1,
                    std::cmp::Ordering::Greater => {
                        stats.lost.fetch_add(seq - next, Ordering::Relaxed);
                        clean = false;
                        next = seq + 1;
                    }
                    std::cmp::Ordering::Less => {
                        stats.reordered.fetch_add(1, Ordering::Relaxed);
                        clean = false;
                    }
                }
            }
            OpCode::Close => {
                let code = close_code(&frame.payload);
                stats.close_code(code);
                break;
            }
            _ => {}
        }
    }
    if next < s.events {
        stats.lost.fetch_add(s.events - next, Ordering::Relaxed);
        clean = false;
    }
    stats.open.fetch_sub(1, Ordering::Relaxed);
    w.complete = clean && next == s.events;
    Some(w)
}

async fn open_http(s: &Scenario, target: &Target, stats: &Stats, conn: u64) -> Option<crate::target::HttpConn> {
    let started = Instant::now();
    match target.http(conn, s.connect_timeout).await {
        Ok(c) => {
            stats.record_handshake(started.elapsed().as_micros() as u64);
            stats.opened.fetch_add(1, Ordering::Relaxed);
            stats.open.fetch_add(1, Ordering::Relaxed);
            Some(c)
        }
        Err(e) => {
            stats.error(&e.kind, || e.detail.clone());
            None
        }
    }
}

/// One kept-alive connection sending requests back to back until `end`; each response is
/// checked (status 200; a POST's body is its own message back, sequence and checksum).
async fn http_session(s: &Scenario, target: &Target, stats: &Stats, i: u64, t0: Instant, end: Instant) {
    use http_body_util::BodyExt;
    tokio::time::sleep_until(s.start_of(t0, i)).await;
    let conn = s.conn_offset + i;
    let Some(mut c) = open_http(s, target, stats, conn).await else { return };
    let mcp = s.scenario == Kind::Mcp;
    let post = mcp || s.method.eq_ignore_ascii_case("POST");
    let mut session = None;
    if mcp {
        match mcp::initialize(target, &mut c.sender, conn).await {
            Ok(id) => session = id,
            Err(e) => {
                stats.error("mcp initialize", || e);
                stats.open.fetch_sub(1, Ordering::Relaxed);
                return;
            }
        }
    }
    let mut seq = 0u64;
    while Instant::now() < end {
        let body = if mcp {
            bytes::Bytes::from(mcp::call(conn, seq, s.size))
        } else if post {
            bytes::Bytes::from(wire::encode(MsgKind::Client, conn, seq, s.size))
        } else {
            bytes::Bytes::new()
        };
        let sent_len = body.len() as u64;
        let req = match target.request(conn, if post { "POST" } else { "GET" }, body) {
            Ok(r) if mcp => mcp::headers(r, session.as_ref()),
            Ok(r) => r,
            Err(e) => {
                stats.error(&e.kind, || e.detail.clone());
                break;
            }
        };
        if c.sender.ready().await.is_err() {
            // The target closed the kept-alive connection (after its last response said
            // `Connection: close`, as NGINX does every `keepalive_requests`): open a new one,
            // as any HTTP client does. Counted as a reconnect, not an error.
            stats.open.fetch_sub(1, Ordering::Relaxed);
            let _ = c.driver.await;
            match open_http(s, target, stats, conn).await {
                Some(fresh) => c = fresh,
                None => return,
            }
            stats.reconnects.fetch_add(1, Ordering::Relaxed);
            if c.sender.ready().await.is_err() {
                stats.error("http closed", || "a new connection closed before its first request".into());
                break;
            }
        }
        let started = Instant::now();
        stats.sent.fetch_add(1, Ordering::Relaxed);
        stats.bytes_sent.fetch_add(sent_len, Ordering::Relaxed);
        let resp = match tokio::time::timeout(
            s.connect_timeout.max(Duration::from_secs(10)),
            c.sender.send_request(req),
        )
        .await
        {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                stats.error("http", || e.to_string());
                break;
            }
            Err(_) => {
                stats.error("http timeout", || "no response".into());
                break;
            }
        };
        let status = resp.status().as_u16();
        let body = match resp.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                stats.error("http body", || e.to_string());
                break;
            }
        };
        stats.latency.lock().unwrap_or_else(|p| p.into_inner()).record(started.elapsed().as_micros() as u64);
        if status != 200 {
            stats.error(&format!("http {status}"), || String::from_utf8_lossy(&body).chars().take(100).collect());
            continue;
        }
        stats.received.fetch_add(1, Ordering::Relaxed);
        stats.bytes_received.fetch_add(body.len() as u64, Ordering::Relaxed);
        let ok = match wire::decode(&body) {
            _ if mcp => mcp::answered(&body, conn, seq),
            Ok(h) if post => h.kind == MsgKind::Client && h.conn == conn && h.seq == seq,
            Ok(h) => h.kind == MsgKind::Backend,
            Err(_) => false,
        };
        if !ok {
            stats.corrupted.fetch_add(1, Ordering::Relaxed);
        }
        seq += 1;
    }
    drop(c.sender);
    let _ = c.driver.await;
    stats.open.fetch_sub(1, Ordering::Relaxed);
}

/// One event stream read until `end`: events `data: <seq> <sent µs>` checked in order.
async fn sse_session(s: &Scenario, target: &Target, stats: &Stats, i: u64, t0: Instant, end: Instant) {
    use http_body_util::BodyExt;
    tokio::time::sleep_until(s.start_of(t0, i)).await;
    let conn = s.conn_offset + i;
    let Some(mut c) = open_http(s, target, stats, conn).await else { return };
    let req = match target.request(conn, "GET", bytes::Bytes::new()) {
        Ok(r) => r,
        Err(e) => {
            stats.error(&e.kind, || e.detail.clone());
            return;
        }
    };
    let resp = match c.sender.send_request(req).await {
        Ok(r) if r.status() == 200 => r,
        Ok(r) => {
            stats.error(&format!("http {}", r.status().as_u16()), || "the stream was refused".into());
            stats.open.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        Err(e) => {
            stats.error("http", || e.to_string());
            stats.open.fetch_sub(1, Ordering::Relaxed);
            return;
        }
    };
    let mut body = resp.into_body();
    let mut text = String::new();
    let mut next = 0u64;
    loop {
        let frame = match tokio::time::timeout_at(end, body.frame()).await {
            Err(_) => break,
            Ok(None) => {
                stats.error("sse ended", || "the stream ended before the run did".into());
                break;
            }
            Ok(Some(Err(e))) => {
                stats.error("sse", || e.to_string());
                break;
            }
            Ok(Some(Ok(f))) => f,
        };
        let Some(data) = frame.data_ref() else { continue };
        let now = wire::now_us();
        stats.bytes_received.fetch_add(data.len() as u64, Ordering::Relaxed);
        text.push_str(&String::from_utf8_lossy(data));
        while let Some((event, rest)) = text.split_once("\n\n") {
            let fields = event.lines().find_map(|l| l.strip_prefix("data: ")).map(|d| {
                let mut it = d.split(' ').map(|v| v.parse::<u64>().ok());
                (it.next().flatten(), it.next().flatten())
            });
            match fields {
                Some((Some(seq), Some(sent))) => {
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    stats.latency.lock().unwrap_or_else(|p| p.into_inner()).record(now.saturating_sub(sent));
                    match seq.cmp(&next) {
                        std::cmp::Ordering::Equal => next += 1,
                        std::cmp::Ordering::Greater => {
                            stats.lost.fetch_add(seq - next, Ordering::Relaxed);
                            next = seq + 1;
                        }
                        std::cmp::Ordering::Less => {
                            stats.reordered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                _ => {
                    stats.corrupted.fetch_add(1, Ordering::Relaxed);
                }
            }
            text = rest.to_owned();
        }
    }
    drop(body);
    c.driver.abort();
    stats.open.fetch_sub(1, Ordering::Relaxed);
}

/// The MCP scenario's messages: what a client sends and what it checks of the answers.
mod mcp {
    use bytes::Bytes;
    use http_body_util::BodyExt as _;
    use hyper::header::HeaderValue;

    use crate::target::Target;

    /// The revision the scenario speaks (the session-based one).
    const REVISION: &str = "2025-11-25";

    /// `initialize` on the connection; the session id the server (through the target) issued.
    pub(super) async fn initialize(
        target: &Target,
        sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
        conn: u64,
    ) -> Result<Option<HeaderValue>, String> {
        let body = serde_json::json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": REVISION, "capabilities": {},
            "clientInfo": {"name": "portcullis-loadtest", "version": env!("CARGO_PKG_VERSION")}}});
        let req = target.request(conn, "POST", Bytes::from(body.to_string())).map_err(|e| e.detail)?;
        let req = headers(req, None);
        sender.ready().await.map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let id = resp.headers().get("mcp-session-id").cloned();
        let _ = resp.into_body().collect().await;
        match status.as_u16() {
            200 => Ok(id),
            other => Err(format!("initialize answered {other}")),
        }
    }

    /// A `tools/call` of `echo` with id `seq`, padded to about `size` bytes.
    pub(super) fn call(conn: u64, seq: u64, size: usize) -> Vec<u8> {
        let head = format!(
            r#"{{"jsonrpc":"2.0","id":{seq},"method":"tools/call","params":{{"name":"echo","arguments":{{"conn":{conn},"seq":{seq},"pad":""#
        );
        let tail = r#""}}}"#;
        let pad = size.saturating_sub(head.len() + tail.len());
        let mut out = Vec::with_capacity(head.len() + pad + tail.len());
        out.extend_from_slice(head.as_bytes());
        out.resize(head.len() + pad, b'x');
        out.extend_from_slice(tail.as_bytes());
        out
    }

    /// The headers of an MCP request, and the session's id when there is one.
    pub(super) fn headers<B>(mut req: hyper::Request<B>, session: Option<&HeaderValue>) -> hyper::Request<B> {
        let h = req.headers_mut();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("accept", HeaderValue::from_static("application/json, text/event-stream"));
        h.insert("mcp-protocol-version", HeaderValue::from_static(REVISION));
        if let Some(s) = session {
            h.insert("mcp-session-id", s.clone());
        }
        req
    }

    /// Whether an answer is the result of call `seq` of connection `conn`: its id, and the
    /// arguments echoed.
    pub(super) fn answered(body: &[u8], conn: u64, seq: u64) -> bool {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else { return false };
        let text = v["result"]["content"][0]["text"].as_str().unwrap_or_default();
        let Ok(args) = serde_json::from_str::<serde_json::Value>(text) else { return false };
        v["id"] == seq && args["conn"] == conn && args["seq"] == seq
    }
}

/// `--shard K/N`: this worker's share of a scenario run by N workers at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Shard {
    /// This worker's share, from 0.
    pub index: u32,
    /// How many workers share the scenario.
    pub total: u32,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(v: &str) -> Result<Shard, String> {
        let (k, n) = v.split_once('/').ok_or_else(|| format!("--shard is K/N (K from 0), not {v:?}"))?;
        let index: u32 = k.trim().parse().map_err(|_| format!("--shard: {k:?} is not a number"))?;
        let total: u32 = n.trim().parse().map_err(|_| format!("--shard: {n:?} is not a number"))?;
        if total == 0 || index >= total {
            return Err(format!("--shard {v}: K must be below N, and N at least 1"));
        }
        Ok(Shard { index, total })
    }
}

impl Shard {
    /// The scenario this worker runs: sessions `[N·K/N, N·(K+1)/N)` of the whole (so the shares
    /// cover each session once), its part of the rate, the ramp and the storm's session count.
    pub fn of(self, s: &Scenario) -> Scenario {
        let (k, n) = (u64::from(self.index), u64::from(self.total));
        let mut share = s.clone();
        let first = s.connections * k / n;
        share.connections = s.connections * (k + 1) / n - first;
        share.conn_offset = s.conn_offset + first;
        share.rate = s.rate / n as f64;
        share.ramp = s.ramp / n as f64;
        share.sessions = s.sessions * (k + 1) / n - s.sessions * k / n;
        share
    }
}
