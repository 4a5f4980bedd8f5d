//! Metrics: names, pre-registered handles and the Prometheus exposition.
//!
//! The recorder is installed once per process, before any handle is made (handles made before
//! it stay no-ops). Hot-path counters are held as handles; labels are bounded: route names from
//! the config, fixed result and reason words, close codes folded into a fixed set of labels
//! (`3xxx`, `4xxx`, `other` beside the known codes). Never a user, address, token or agent id.
//!
//! This module is a leaf: every metric name of the proxy is written here and nowhere else, and
//! it uses no other module of the crate.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter, Gauge, Histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Which way relayed bytes went (the `direction` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Read from the client, written to the backend.
    ClientToBackend = 0,
    /// Read from the backend, written to the client.
    BackendToClient = 1,
}

/// Process metrics.
pub struct Metrics {
    handle: PrometheusHandle,
    /// Client connections open now (TCP accepted, not yet closed).
    pub connections_active: Gauge,
    /// Client connections accepted since start.
    pub connections_total: Counter,
    /// Connections closed at accept because `max_connections` was reached.
    pub connections_rejected: Counter,
    /// WebSocket sessions open now: relayed, fan-out clients and observers (each given back by
    /// `session::close::record_end`).
    pub sessions_active: Gauge,
    /// Time from the first member attempt to a completed backend handshake (including the
    /// attempts on members that failed).
    pub backend_connect_seconds: Histogram,
    /// Relay and TLS record buffer bytes lent out now; set by whoever renders, from the buffer
    /// pool.
    pub relay_buffer_bytes: Gauge,
    /// SSE responses streaming now (sessions like WebSockets).
    pub sse_streams_active: Gauge,
    frames: [Counter; 2],
    bytes: [Counter; 2],
    http_body_bytes: [Counter; 2],
    rate_pauses: [Counter; 2],
    ping_timeouts: Counter,
    /// `portcullis_upgrades_total` by result, then route: counted at every upgrade, so its
    /// handles are kept rather than looked up by their labels (which copies the route's name
    /// and builds a key each time).
    upgrades: RwLock<HashMap<&'static str, HashMap<Box<str>, Counter>>>,
    /// `portcullis_closes_total` by (code, initiator), for the same reason: every session's end.
    closes: RwLock<HashMap<(&'static str, &'static str), Counter>>,
}

static GLOBAL: OnceLock<Arc<Metrics>> = OnceLock::new();

/// From 1 ms to 10 s: the fleet's target is a lock applied everywhere within 1 s.
const LOCK_APPLY_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

const REQUEST_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The kind of a metric, for its `# TYPE` (and the describe call that gives its `# HELP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Distribution (a histogram with buckets, or a summary when none are set).
    Histogram,
}

/// Every metric the proxy exports, with its `# HELP` text (one sentence; `docs/metrics.md` says
/// more). A test checks that the docs list exactly these names and that every exported family
/// has its help.
pub const CATALOG: &[(Kind, &str, &str)] = &[
    (Kind::Gauge, "portcullis_connections_active", "Client connections open now, in any phase."),
    (Kind::Counter, "portcullis_connections_total", "Client connections accepted under the cap."),
    (
        Kind::Counter,
        "portcullis_connections_rejected_total",
        "Connections closed at accept because max_connections were open.",
    ),
    (
        Kind::Gauge,
        "portcullis_connections_limit",
        "The client connection cap in force: server.max_connections, at most half the descriptor budget.",
    ),
    (
        Kind::Gauge,
        "portcullis_outbound_descriptors",
        "Outbound descriptors (member connections, recordings) held now (state held) and the budget (state limit).",
    ),
    (
        Kind::Gauge,
        "portcullis_pooled_connections",
        "Pooled keep-alive member connections, in use or idle, held now (state held) and their share of the outbound \
         budget (state limit).",
    ),
    (
        Kind::Counter,
        "portcullis_pooled_pressure_closes_total",
        "Plain requests' attempts that asked their member to close the connection after the answer because pooled \
         connections held more than three quarters of their share.",
    ),
    (Kind::Counter, "portcullis_http2_connections_total", "TLS client connections that chose HTTP/2 by ALPN."),
    (
        Kind::Counter,
        "portcullis_http2_floods_total",
        "HTTP/2 connections closed for a frame flood, by frame (window_update, priority, empty_frames).",
    ),
    (Kind::Gauge, "portcullis_recordings_active", "Session recordings being written now."),
    (Kind::Gauge, "portcullis_observers_active", "Live observers watching sessions now, by route."),
    (
        Kind::Counter,
        "portcullis_mcp_messages_total",
        "JSON-RPC messages with a method read on MCP routes, by route, method (the specification's, else other), tool (tools/call: a metric_tools name, else other) and result (forwarded, denied, refused).",
    ),
    (
        Kind::Counter,
        "portcullis_observer_closes_total",
        "Observers that ended, by route and reason (left, lagged, session_ended, input, gone, too_big, protocol, revoked, drain, route_removed, rebalance, token_expired, lifetime).",
    ),
    (Kind::Counter, "portcullis_recordings_total", "Session recordings written to the end, by route."),
    (Kind::Counter, "portcullis_recording_bytes_total", "Bytes written to session recordings, by route."),
    (
        Kind::Counter,
        "portcullis_recording_failures_total",
        "Recording gaps, by route and reason (backlog: the writer fell behind; io: the file failed; file_size: max_file_size reached; directory_full: max_total_size held already).",
    ),
    (
        Kind::Counter,
        "portcullis_recording_evictions_total",
        "Finished recordings deleted, by route and reason (age: past max_age; size: before max_age, to make room under when_full = evict_oldest).",
    ),
    (
        Kind::Counter,
        "portcullis_recording_backpressure_total",
        "Times a recorded session's sender was paused for its recording to catch up, by route.",
    ),
    (
        Kind::Counter,
        "portcullis_rebalance_closes_total",
        "Sessions closed as going away (rebalance) by POST /sessions/rebalance, by route.",
    ),
    (Kind::Gauge, "portcullis_fanout_streams", "Shared backend streams ([routes.fanout]) open now, by route."),
    (Kind::Gauge, "portcullis_fanout_subscribers", "Clients subscribed to shared backend streams now, by route."),
    (
        Kind::Counter,
        "portcullis_fanout_streams_total",
        "Shared backend streams opened (one backend connection each), by route.",
    ),
    (
        Kind::Counter,
        "portcullis_fanout_drops_total",
        "Fan-out clients closed by the proxy, by route and reason (slow: its queue was full; input: a data frame on a read-only stream).",
    ),
    (Kind::Gauge, "portcullis_resume_held", "Resumable sessions whose client is away, held for it now, by route."),
    (
        Kind::Counter,
        "portcullis_resume_parked_total",
        "Times a resumable session's client vanished without a close and the session was held, by route.",
    ),
    (
        Kind::Counter,
        "portcullis_resume_resumed_total",
        "Times a held session was attached to a reconnecting client, by route.",
    ),
    (
        Kind::Counter,
        "portcullis_resume_expired_total",
        "Held sessions ended before their client came back, by route and reason (window, overflow, closed).",
    ),
    (
        Kind::Counter,
        "portcullis_resume_refused_total",
        "Handshakes with a resume id refused, by route and reason (other_subject, busy, invalid).",
    ),
    (
        Kind::Counter,
        "portcullis_http2_streams_total",
        "HTTP/2 streams opened by clients, by kind (websocket: RFC 8441 extended CONNECT; request).",
    ),
    (Kind::Counter, "portcullis_tls_handshake_failures_total", "TLS handshakes that failed, by reason."),
    (
        Kind::Counter,
        "portcullis_limit_refusals_total",
        "Connections or requests refused by a per-client limit, by reason.",
    ),
    (
        Kind::Counter,
        "portcullis_client_headers_dropped_total",
        "Client request headers not forwarded because their name has an underscore or folds onto a header the proxy sets, by reason (underscore, collision).",
    ),
    (
        Kind::Counter,
        "portcullis_admin_refusals_total",
        "Admin requests or connections refused, by reason (host, origin, content_type, connections, per_ip).",
    ),
    (
        Kind::Counter,
        "portcullis_cors_preflights_total",
        "CORS preflights answered by the proxy, by route and result (allowed, refused).",
    ),
    (
        Kind::Gauge,
        "portcullis_fleet_store_reachable",
        "1 while the fleet store (local log or Redis) answers, 0 while it cannot be reached.",
    ),
    (
        Kind::Gauge,
        "portcullis_fleet_staleness_seconds",
        "How long this instance's view of the fleet's locks may be behind: 0 while the store answers.",
    ),
    (
        Kind::Counter,
        "portcullis_fleet_locks_written_total",
        "Locks (revocations) written to the fleet store, by store and result (ok, error).",
    ),
    (
        Kind::Counter,
        "portcullis_fleet_locks_applied_total",
        "Locks applied on this instance, by source (local: made here or read at start; fleet: made by another instance).",
    ),
    (
        Kind::Histogram,
        "portcullis_fleet_lock_apply_seconds",
        "Seconds from a lock's creation on another instance to its application here.",
    ),
    (
        Kind::Gauge,
        "portcullis_fleet_directory_sessions",
        "Live sessions in the fleet's directory: this instance's and the others' it has heard of.",
    ),
    (Kind::Gauge, "portcullis_fleet_instances", "Instances of the fleet heard from lately, this one included."),
    (
        Kind::Counter,
        "portcullis_fleet_peer_refusals_total",
        "Connections to the fleet's peer listener refused, by reason (malformed, signature, misdirected, time, replay).",
    ),
    (
        Kind::Counter,
        "portcullis_fleet_relayed_total",
        "Resumes and observers carried to the instance that holds their session, by kind (resume, observe) and result (ok, refused, unreachable).",
    ),
    (
        Kind::Counter,
        "portcullis_fleet_cap_places_total",
        "Capped sessions that asked the fleet store for their places (subject_caps = reserved), by result (taken, full, unreachable, error).",
    ),
    (
        Kind::Gauge,
        "portcullis_fleet_events_readable",
        "1 while this instance reads the fleet's events stream (the session directory and fleet commands), else 0.",
    ),
    (
        Kind::Counter,
        "portcullis_fleet_refusals_total",
        "New sessions refused because the fleet store was unreachable for longer than max_staleness (staleness = strict).",
    ),
    (Kind::Gauge, "portcullis_worker_threads", "Tokio worker threads running the proxy."),
    (
        Kind::Counter,
        "portcullis_worker_connections_total",
        "Client connections accepted, by worker (worker_model = thread_per_core with more than one worker).",
    ),
    (Kind::Gauge, "portcullis_token_cache_entries", "Tokens in the verified-token cache."),
    (
        Kind::Counter,
        "portcullis_session_rate_pauses_total",
        "Times a session's sender was paused for its session rate, by direction.",
    ),
    (Kind::Counter, "portcullis_proxy_protocol_total", "Connections on PROXY-protocol listeners, by result."),
    (
        Kind::Counter,
        "portcullis_upgrades_total",
        "Requests decided by the route, upgrade, auth or connect stages, by route and result.",
    ),
    (
        Kind::Histogram,
        "portcullis_backend_connect_seconds",
        "Time from the first member attempt to a completed backend handshake.",
    ),
    (
        Kind::Counter,
        "portcullis_auth_failures_total",
        "Upgrades and requests refused by the auth stage, by route and reason.",
    ),
    (Kind::Counter, "portcullis_jwks_fetches_total", "JWKS fetches, by result."),
    (
        Kind::Gauge,
        "portcullis_jwks_stale",
        "1 after a failed JWKS fetch (the last good keys stay in use), 0 after a good one.",
    ),
    (Kind::Gauge, "portcullis_sessions_active", "WebSocket sessions now: relayed, fan-out clients and observers."),
    (Kind::Counter, "portcullis_bytes_total", "Bytes read from one side during the relay, by direction."),
    (Kind::Counter, "portcullis_frames_total", "Data frames read from one side during the relay, by direction."),
    (Kind::Counter, "portcullis_violations_total", "Frames that broke a protocol rule or a size limit, by kind."),
    (Kind::Counter, "portcullis_ping_timeouts_total", "Sessions closed because a side did not answer a proxy ping."),
    (
        Kind::Counter,
        "portcullis_send_timeouts_total",
        "HTTP/1.1 client connections closed, and HTTP/2 streams reset, because the client took no byte of an HTTP answer for server.send_timeout.",
    ),
    (
        Kind::Counter,
        "portcullis_closes_total",
        "Sessions ended, by the close code sent to the client and who began the close.",
    ),
    (Kind::Gauge, "portcullis_relay_buffer_bytes", "Bytes of relay and TLS record buffer lent to sessions now."),
    (Kind::Counter, "portcullis_http_requests_total", "Plain HTTP requests answered, by route, kind and status class."),
    (
        Kind::Histogram,
        "portcullis_http_request_duration_seconds",
        "Time from a request's head to its response's last byte, by route.",
    ),
    (
        Kind::Counter,
        "portcullis_http_body_bytes_total",
        "Body bytes of plain HTTP requests and responses, by direction.",
    ),
    (Kind::Gauge, "portcullis_sse_streams_active", "Event streams open now."),
    (Kind::Counter, "portcullis_sse_stream_ends_total", "Event streams ended, by route and reason."),
    (Kind::Counter, "portcullis_route_cache_total", "Member lookups on registry routes, by result."),
    (Kind::Counter, "portcullis_registry_requests_total", "HTTP requests sent to registries, by result."),
    (Kind::Histogram, "portcullis_registry_seconds", "Duration of each registry request."),
    (Kind::Gauge, "portcullis_member_healthy", "Static members of a route not ejected now, by route."),
    (Kind::Counter, "portcullis_reloads_total", "Configuration reloads, by result."),
];

const CONNECT_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl Metrics {
    /// The process metrics, installing the Prometheus recorder on first use.
    pub fn global() -> Arc<Metrics> {
        GLOBAL.get_or_init(|| Arc::new(Metrics::install())).clone()
    }

    fn install() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full("portcullis_backend_connect_seconds".into()), CONNECT_BUCKETS)
            .expect("bucket list is non-empty")
            .set_buckets_for_metric(Matcher::Full("portcullis_http_request_duration_seconds".into()), REQUEST_BUCKETS)
            .expect("bucket list is non-empty")
            .set_buckets_for_metric(Matcher::Full("portcullis_fleet_lock_apply_seconds".into()), LOCK_APPLY_BUCKETS)
            .expect("bucket list is non-empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder can only exist if an embedding program installed one; then our
        // handles record into that one and /metrics shows what this recorder saw.
        let _ = metrics::set_global_recorder(recorder);
        for &(kind, name, help) in CATALOG {
            match kind {
                Kind::Counter => describe_counter!(name, help),
                Kind::Gauge => describe_gauge!(name, help),
                Kind::Histogram => describe_histogram!(name, help),
            }
        }
        let m = Metrics {
            handle,
            connections_active: gauge!("portcullis_connections_active"),
            connections_total: counter!("portcullis_connections_total"),
            connections_rejected: counter!("portcullis_connections_rejected_total"),
            sessions_active: gauge!("portcullis_sessions_active"),
            backend_connect_seconds: histogram!("portcullis_backend_connect_seconds"),
            frames: [
                counter!("portcullis_frames_total", "direction" => "client_to_backend"),
                counter!("portcullis_frames_total", "direction" => "backend_to_client"),
            ],
            bytes: [
                counter!("portcullis_bytes_total", "direction" => "client_to_backend"),
                counter!("portcullis_bytes_total", "direction" => "backend_to_client"),
            ],
            ping_timeouts: counter!("portcullis_ping_timeouts_total"),
            sse_streams_active: gauge!("portcullis_sse_streams_active"),
            http_body_bytes: [
                counter!("portcullis_http_body_bytes_total", "direction" => "client_to_backend"),
                counter!("portcullis_http_body_bytes_total", "direction" => "backend_to_client"),
            ],
            relay_buffer_bytes: gauge!("portcullis_relay_buffer_bytes"),
            rate_pauses: [
                counter!("portcullis_session_rate_pauses_total", "direction" => "client_to_backend"),
                counter!("portcullis_session_rate_pauses_total", "direction" => "backend_to_client"),
            ],
            upgrades: RwLock::default(),
            closes: RwLock::default(),
        };
        m.connections_active.set(0.0);
        m.sessions_active.set(0.0);
        m.sse_streams_active.set(0.0);
        // Series alerts count with increase(): registered at 0, so the first event is an
        // increase and not the series' first sample.
        counter!("portcullis_http2_connections_total").increment(0);
        counter!("portcullis_pooled_pressure_closes_total").increment(0);
        for kind in ["websocket", "request"] {
            counter!("portcullis_http2_streams_total", "kind" => kind).increment(0);
        }
        for result in ["ok", "error"] {
            counter!("portcullis_reloads_total", "result" => result).increment(0);
            counter!("portcullis_jwks_fetches_total", "result" => result).increment(0);
        }
        m
    }

    /// Registers `portcullis_closes_total` at 0 for every code label and initiator, so a
    /// dashboard shows zeros and an alert's first 1014 counts.
    pub fn preregister_closes(&self, codes: &[&'static str], initiators: &[&'static str]) {
        for &code in codes {
            for &initiator in initiators {
                self.close_counter(code, initiator).increment(0);
            }
        }
    }

    /// A TLS client connection chose HTTP/2.
    pub fn http2_connection(&self) {
        counter!("portcullis_http2_connections_total").increment(1);
    }

    /// A client opened an HTTP/2 stream of `kind` (`websocket` or `request`).
    pub fn http2_stream(&self, kind: &'static str) {
        counter!("portcullis_http2_streams_total", "kind" => kind).increment(1);
    }

    /// Registers a route's series at 0, so its dashboard panels show zeros and an alert's
    /// `increase()` counts its first event: successful upgrades on a WebSocket route, rebalance
    /// closes, and auth failures by every reason in `auth_reasons` (empty for a route with
    /// neither auth nor an Origin policy).
    pub fn preregister_route(&self, route: &str, websocket: bool, auth_reasons: &[&'static str]) {
        if websocket {
            counter!("portcullis_upgrades_total", "route" => route.to_owned(), "result" => "ok").increment(0);
        }
        counter!("portcullis_rebalance_closes_total", "route" => route.to_owned()).increment(0);
        for &reason in auth_reasons {
            self.auth_failure_count(route, reason, 0);
        }
    }

    /// A shared backend stream of `route` opened (`1`) or ended (`-1`).
    pub fn fanout_stream(&self, route: &str, delta: f64) {
        if delta > 0.0 {
            counter!("portcullis_fanout_streams_total", "route" => route.to_owned()).increment(1);
        }
        gauge!("portcullis_fanout_streams", "route" => route.to_owned()).increment(delta);
    }

    /// A fan-out client of `route` joined (`1`) or left (`-1`).
    pub fn fanout_subscriber(&self, route: &str, delta: f64) {
        gauge!("portcullis_fanout_subscribers", "route" => route.to_owned()).increment(delta);
    }

    /// A fan-out client of `route` was closed by the proxy: `slow` or `input`.
    pub fn fanout_drop(&self, route: &str, reason: &'static str) {
        counter!("portcullis_fanout_drops_total", "route" => route.to_owned(), "reason" => reason).increment(1);
    }

    /// A resumable session of `route` lost its client and is held for it.
    pub fn resume_parked(&self, route: &str) {
        counter!("portcullis_resume_parked_total", "route" => route.to_owned()).increment(1);
        gauge!("portcullis_resume_held", "route" => route.to_owned()).increment(1.0);
    }

    /// A held session of `route` got its client back; `was_held` takes it off
    /// `portcullis_resume_held`.
    pub fn resume_resumed(&self, route: &str, was_held: bool) {
        counter!("portcullis_resume_resumed_total", "route" => route.to_owned()).increment(1);
        if was_held {
            gauge!("portcullis_resume_held", "route" => route.to_owned()).decrement(1.0);
        }
    }

    /// A held session of `route` ended without its client: `window`, `overflow` or `closed`.
    pub fn resume_expired(&self, route: &str, reason: &'static str) {
        counter!("portcullis_resume_expired_total", "route" => route.to_owned(), "reason" => reason).increment(1);
        gauge!("portcullis_resume_held", "route" => route.to_owned()).decrement(1.0);
    }

    /// A handshake with a resume id on `route` was refused.
    pub fn resume_refused(&self, route: &str, reason: &'static str) {
        counter!("portcullis_resume_refused_total", "route" => route.to_owned(), "reason" => reason).increment(1);
    }

    /// A session of `route` was sent 1001 "rebalance".
    pub fn rebalance_close(&self, route: &str) {
        counter!("portcullis_rebalance_closes_total", "route" => route.to_owned()).increment(1);
    }

    /// Renders the Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drains histogram buckets; call periodically.
    pub fn run_upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// Bytes and data frames relayed in `direction`.
    pub fn relay_bytes(&self, direction: Direction, bytes: u64, frames: u64) {
        let i = direction as usize;
        self.bytes[i].increment(bytes);
        if frames > 0 {
            self.frames[i].increment(frames);
        }
    }

    /// Times a sender in `direction` was paused (not read) for being over its session rate.
    pub fn rate_paused(&self, direction: Direction, pauses: u64) {
        self.rate_pauses[direction as usize].increment(pauses);
    }

    /// Body bytes of plain HTTP requests (uploads) and responses passed in `direction`.
    pub fn http_body_bytes(&self, direction: Direction, bytes: u64) {
        if bytes > 0 {
            self.http_body_bytes[direction as usize].increment(bytes);
        }
    }

    /// A plain HTTP request on `route` ("none" when no route matched) was answered `status`;
    /// `kind` is "request", or "sse" for an event stream.
    pub fn http_request(&self, route: &str, kind: &'static str, status: u16) {
        let class = ["1xx", "2xx", "3xx", "4xx", "5xx"][status_class(status)];
        counter!("portcullis_http_requests_total", "route" => route.to_owned(), "kind" => kind, "class" => class)
            .increment(1);
    }

    /// A plain HTTP exchange (not an event stream) took `seconds`, request head to the last
    /// byte of the response.
    pub fn http_request_seconds(&self, route: &str, seconds: f64) {
        histogram!("portcullis_http_request_duration_seconds", "route" => route.to_owned()).record(seconds);
    }

    /// Pre-registered handles of one HTTP route's per-request metrics, so that a request does
    /// not look its series up by labels.
    pub fn http_route(&self, route: &str) -> Arc<RouteHttpMetrics> {
        let counter = |kind: &'static str, class: &'static str| counter!("portcullis_http_requests_total", "route" => route.to_owned(), "kind" => kind, "class" => class);
        let classes = |kind| ["1xx", "2xx", "3xx", "4xx", "5xx"].map(|c| counter(kind, c));
        Arc::new(RouteHttpMetrics {
            requests: [classes("request"), classes("sse")],
            duration: histogram!("portcullis_http_request_duration_seconds", "route" => route.to_owned()),
        })
    }

    /// An SSE stream on `route` ended for `reason` (a bounded word).
    pub fn sse_end(&self, route: &str, reason: &'static str) {
        counter!("portcullis_sse_stream_ends_total", "route" => route.to_owned(), "reason" => reason).increment(1);
    }

    /// A frame broke the protocol or a size limit.
    pub fn violation(&self, kind: &'static str) {
        counter!("portcullis_violations_total", "kind" => kind).increment(1);
    }

    /// A peer did not answer a proxy ping in time.
    pub fn ping_timeout(&self) {
        self.ping_timeouts.increment(1);
    }

    /// An upgrade request ended with `result` on `route` ("none" when no route matched).
    pub fn upgrade(&self, route: &str, result: &'static str) {
        let known = self.upgrades.read().ok().and_then(|m| m.get(result).and_then(|r| r.get(route)).cloned());
        let counter = known.unwrap_or_else(|| {
            let c = counter!("portcullis_upgrades_total", "route" => route.to_owned(), "result" => result);
            keep(&self.upgrades, |m| m.entry(result).or_default().insert(route.into(), c.clone()));
            c
        });
        counter.increment(1);
    }

    /// An upgrade or a plain request was refused by the auth stage for `reason` (a bounded word).
    pub fn auth_failure(&self, route: &str, reason: &'static str) {
        self.auth_failure_count(route, reason, 1);
    }

    fn auth_failure_count(&self, route: &str, reason: &'static str, n: u64) {
        counter!("portcullis_auth_failures_total", "route" => route.to_owned(), "reason" => reason).increment(n);
    }

    /// A session closed with the close code `code` (as seen by the client, folded into a
    /// bounded label by the close table) started by `initiator`.
    pub fn close(&self, code: &'static str, initiator: &'static str) {
        self.close_counter(code, initiator).increment(1);
    }

    fn close_counter(&self, code: &'static str, initiator: &'static str) -> Counter {
        let known = self.closes.read().ok().and_then(|m| m.get(&(code, initiator)).cloned());
        known.unwrap_or_else(|| {
            let c = counter!("portcullis_closes_total", "code" => code, "initiator" => initiator);
            keep(&self.closes, |m| m.insert((code, initiator), c.clone()));
            c
        })
    }

    /// A TLS handshake failed for `reason` (timeout, eof, protocol, no_certificate).
    pub fn tls_failure(&self, reason: &'static str) {
        counter!("portcullis_tls_handshake_failures_total", "reason" => reason).increment(1);
    }
}

/// Adds a handle to a cache of them. A poisoned lock (nothing panics while holding one) only
/// means the next use looks the series up again.
fn keep<M, R>(cache: &RwLock<M>, add: impl FnOnce(&mut M) -> R) {
    if let Ok(mut m) = cache.write() {
        add(&mut m);
    }
}

/// 0 for 1xx … 4 for 5xx (and anything else).
fn status_class(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// One HTTP route's per-request series (see [`Metrics::http_route`]).
pub struct RouteHttpMetrics {
    requests: [[Counter; 5]; 2],
    duration: Histogram,
}

impl RouteHttpMetrics {
    /// A request answered `status`; `sse` for an event stream.
    pub fn request(&self, sse: bool, status: u16) {
        self.requests[usize::from(sse)][status_class(status)].increment(1);
    }

    /// A request (not an event stream) took `seconds`.
    pub fn seconds(&self, seconds: f64) {
        self.duration.record(seconds);
    }
}

/// A connection on a PROXY protocol listener: its header was read (`ok`) or it was closed for
/// `result` (`untrusted`, `malformed`, `too_large`, `timeout`, `closed`).
pub fn proxy_protocol(result: &'static str) {
    counter!("portcullis_proxy_protocol_total", "result" => result).increment(1);
}

/// A client connection was closed because the client took no byte of an HTTP answer for
/// `send_timeout`.
pub fn send_timeout() {
    counter!("portcullis_send_timeouts_total").increment(1);
}

/// An HTTP/2 connection was closed for a flood of `frame` (`window_update`, `priority`,
/// `empty_frames`).
pub fn http2_flood(frame: &'static str) {
    counter!("portcullis_http2_floods_total", "frame" => frame).increment(1);
}

/// A connection or request was refused by a per-client limit (`reason`: `per_ip_connections`,
/// `per_ip_streams`, ...).
pub fn limit_refused(reason: &'static str) {
    counter!("portcullis_limit_refusals_total", "reason" => reason).increment(1);
}

/// An observer joined (`delta` 1) or left (-1) a session of `route`.
pub fn observers_active(route: &str, delta: f64) {
    gauge!("portcullis_observers_active", "route" => route.to_owned()).increment(delta);
}

/// A JSON-RPC message with a method on an MCP route: `method` and `tool` are bounded labels
/// (`proxy::mcp::method_label`, `tool_label`), `result` is `forwarded`, `denied` or `refused`.
pub fn mcp_message(route: &str, method: &'static str, tool: &str, result: &'static str) {
    counter!(
        "portcullis_mcp_messages_total",
        "route" => route.to_owned(),
        "method" => method,
        "tool" => tool.to_owned(),
        "result" => result
    )
    .increment(1);
}

/// An observer of `route` ended (`reason`: its end's label).
pub fn observer_closed(route: &str, reason: &'static str) {
    counter!("portcullis_observer_closes_total", "route" => route.to_owned(), "reason" => reason).increment(1);
}

/// A recording of `route` failed (`reason`: what failed); the rest of the session is not
/// recorded.
pub fn recording_failed(route: &str, reason: &'static str) {
    counter!("portcullis_recording_failures_total", "route" => route.to_owned(), "reason" => reason).increment(1);
}

/// A session of `route` waited for its recording's queue.
pub fn recording_backpressure(route: &str) {
    counter!("portcullis_recording_backpressure_total", "route" => route.to_owned()).increment(1);
}

/// A recording's file was opened (`delta` 1) or closed (-1).
pub fn recordings_active(delta: f64) {
    gauge!("portcullis_recordings_active").increment(delta);
}

/// A recording of `route` ended with `bytes` written; `stored` when its file was kept.
pub fn recording_ended(route: &str, bytes: u64, stored: bool) {
    if stored {
        counter!("portcullis_recordings_total", "route" => route.to_owned()).increment(1);
    }
    counter!("portcullis_recording_bytes_total", "route" => route.to_owned()).increment(bytes);
}

/// A stored recording of `route` was deleted (`reason`: `age`, `size`, ...).
pub fn recording_evicted(route: &str, reason: &'static str) {
    counter!("portcullis_recording_evictions_total", "route" => route.to_owned(), "reason" => reason).increment(1);
}

/// A client header was not forwarded (`reason`: `underscore`, `collision`).
pub fn client_header_dropped(reason: &'static str) {
    counter!("portcullis_client_headers_dropped_total", "reason" => reason).increment(1);
}

/// An admin request or connection was refused (`reason`: `host`, `origin`, `content_type`,
/// `connections`, `per_ip`).
pub fn admin_refused(reason: &'static str) {
    counter!("portcullis_admin_refusals_total", "reason" => reason).increment(1);
}

/// A CORS preflight was answered (`result`: `allowed`, `refused`).
pub fn cors_preflight(route: &str, result: &'static str) {
    counter!("portcullis_cors_preflights_total", "route" => route.to_owned(), "result" => result).increment(1);
}

/// Tokio worker threads running the proxy (set when metrics are rendered).
pub fn worker_threads(n: usize) {
    gauge!("portcullis_worker_threads").set(n as f64);
}

/// The client connection cap in force (`server.max_connections`, at most half the descriptor
/// budget), for alerts on how near it is.
pub fn connections_limit(n: usize) {
    gauge!("portcullis_connections_limit").set(n as f64);
}

/// Outbound descriptors held and the budget (set when metrics are rendered).
pub fn outbound_descriptors(held: usize, limit: usize) {
    gauge!("portcullis_outbound_descriptors", "state" => "held").set(held as f64);
    gauge!("portcullis_outbound_descriptors", "state" => "limit").set(limit as f64);
}

/// Pooled keep-alive connections held (in use or idle) and their share of the outbound budget
/// (set when metrics are rendered).
pub fn pooled_connections(held: usize, limit: usize) {
    gauge!("portcullis_pooled_connections", "state" => "held").set(held as f64);
    gauge!("portcullis_pooled_connections", "state" => "limit").set(limit as f64);
}

/// A plain request's attempt asked its member to close the connection after the answer:
/// pooled connections held more than three quarters of their share.
pub fn pooled_pressure_close() {
    counter!("portcullis_pooled_pressure_closes_total").increment(1);
}

/// Tokens held in the verified-token cache (set when metrics are rendered).
pub fn token_cache_entries(n: u64) {
    gauge!("portcullis_token_cache_entries").set(n as f64);
}

/// A configuration reload was applied (`ok`) or refused.
pub fn reload(ok: bool) {
    counter!("portcullis_reloads_total", "result" => if ok { "ok" } else { "error" }).increment(1);
}

/// A registry lookup was answered from the route cache: `result` is "hit", "stale" or "miss".
pub fn route_cache(result: &'static str) {
    counter!("portcullis_route_cache_total", "result" => result).increment(1);
}

/// A registry request ended with `result` after `seconds`.
pub fn registry_request(result: &'static str, seconds: f64) {
    histogram!("portcullis_registry_seconds").record(seconds);
    counter!("portcullis_registry_requests_total", "result" => result).increment(1);
}

/// A JWKS fetch succeeded (the key set is fresh) or failed (the last good one stays, stale).
pub fn jwks_fetch(ok: bool) {
    counter!("portcullis_jwks_fetches_total", "result" => if ok { "ok" } else { "error" }).increment(1);
    gauge!("portcullis_jwks_stale").set(if ok { 0.0 } else { 1.0 });
}

/// Static members of `route` that are healthy now.
pub fn member_healthy(route: &str, healthy: usize) {
    gauge!("portcullis_member_healthy", "route" => route.to_owned()).set(healthy as f64);
}

/// Whether the fleet store answers.
pub fn fleet_store_reachable(up: bool) {
    gauge!("portcullis_fleet_store_reachable").set(if up { 1.0 } else { 0.0 });
}

/// How far behind the view of the locks may be.
pub fn fleet_staleness(seconds: f64) {
    gauge!("portcullis_fleet_staleness_seconds").set(seconds);
}

/// A lock was written to the `store` (`local` or `redis`), or failed to be.
pub fn fleet_lock_written(store: &'static str, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    counter!("portcullis_fleet_locks_written_total", "store" => store, "result" => result).increment(1);
}

/// A lock was applied: made here or read at start (`local`), or from another instance
/// (`fleet`, `seconds` after it was made).
pub fn fleet_lock_applied(source: &'static str, seconds: Option<f64>) {
    counter!("portcullis_fleet_locks_applied_total", "source" => source).increment(1);
    if let Some(s) = seconds {
        histogram!("portcullis_fleet_lock_apply_seconds").record(s);
    }
}

/// The counter of connections worker `worker` accepts (thread-per-core), made once per accept loop.
pub fn worker_connections(worker: usize) -> metrics::Counter {
    counter!("portcullis_worker_connections_total", "worker" => worker.to_string())
}

/// A connection to the peer listener was refused (`reason`: its preamble's fault).
pub fn fleet_peer_refused(reason: &'static str) {
    counter!("portcullis_fleet_peer_refusals_total", "reason" => reason).increment(1);
}

/// A resume or an observer was carried to the instance that holds its session.
pub fn fleet_relayed(kind: &'static str, result: &'static str) {
    counter!("portcullis_fleet_relayed_total", "kind" => kind, "result" => result).increment(1);
}

/// The fleet's directory: sessions and instances known.
pub fn fleet_directory(sessions: usize, instances: usize) {
    gauge!("portcullis_fleet_directory_sessions").set(sessions as f64);
    gauge!("portcullis_fleet_instances").set(instances as f64);
}

/// A capped session asked the store for its places (`subject_caps = "reserved"`): `taken`,
/// `full` (refused with 429), `unreachable` or `error` (counted by the mirror, its place written
/// once the store answers).
pub fn fleet_cap_places(result: &'static str) {
    counter!("portcullis_fleet_cap_places_total", "result" => result).increment(1);
}

/// Whether this instance reads the fleet's events stream.
pub fn fleet_events_readable(yes: bool) {
    gauge!("portcullis_fleet_events_readable").set(if yes { 1.0 } else { 0.0 });
}

/// A new session was refused: the store has been unreachable for longer than `max_staleness`.
pub fn fleet_refused() {
    counter!("portcullis_fleet_refusals_total").increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_name_written_in_this_module_is_in_the_catalog() {
        let source = include_str!("metrics.rs");
        let code = &source[..source.find("#[cfg(test)]").unwrap_or(source.len())];
        let mut names: Vec<&str> =
            code.split('"').filter(|s| s.starts_with("portcullis_") && !s.contains(' ')).collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            assert!(CATALOG.iter().any(|&(_, n, _)| n == name), "{name} has no catalog entry (and no HELP)");
        }
    }
}
