//! The close table: every way a session ends, and what each side receives for it.
//!
//! Every WebSocket session kind ends through it: the relay, fan-out clients and their shared
//! backend stream, observers. Their handlers only pick a [`Cause`]; [`Cause::plan`] says which
//! close frame (code and reason) the proxy writes to each side and who initiated the end, and
//! [`Cause::label`] the end's one label, for the log lines and metrics of every kind of session
//! (a governed HTTP exchange's too, beside its answer, [`Cause::http_end`]). Close codes (RFC 6455 §7.4.1), as literals or by name,
//! are written here and nowhere else in the proxy (`tests/architecture.rs` checks it);
//! `docs/errors.md` carries the same table and a test holds the two together.

use crate::codec::Violation;
use crate::session::{Initiator, Side};

/// The close codes the proxy writes itself.
pub mod code {
    /// 1000: normal closure (idle timeout, or the reply on behalf of a vanished peer).
    pub const NORMAL: u16 = 1000;
    /// 1001: going away (drain, lifetime, ping timeout, route removed, the other side's end).
    pub const GOING_AWAY: u16 = 1001;
    /// 1002: protocol error.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// 1007: a payload that is not what it must be (a close reason that is not UTF-8).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// 1008: policy violation (token expired, session revoked, over the session rate).
    pub const POLICY: u16 = 1008;
    /// 1009: a frame or message over the configured size.
    pub const TOO_BIG: u16 = 1009;
    /// 1011: internal error (the session's audit recording fell behind or failed, on a
    /// route that closes then).
    pub const INTERNAL_ERROR: u16 = 1011;
    /// 1013: try again later (an observer that fell behind its session's output).
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// 1014: bad gateway (the backend failed or broke the protocol).
    pub const BAD_GATEWAY: u16 = 1014;
}

/// A close frame the proxy writes: its code and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseFrame {
    /// The close code.
    pub code: u16,
    /// The reason text (UTF-8, at most 123 bytes); may be empty.
    pub reason: &'static str,
}

impl CloseFrame {
    const fn new(code: u16, reason: &'static str) -> CloseFrame {
        CloseFrame { code, reason }
    }
}

/// The frame the proxy sends a side that started a close when the other side vanished instead
/// of replying: the close handshake is completed on the vanished side's behalf.
pub const REPLY_FOR_VANISHED_PEER: CloseFrame = CloseFrame::new(code::NORMAL, "");

/// The close an active health check sends after its handshake succeeded.
pub const HEALTH_CHECK: CloseFrame = CloseFrame::new(code::GOING_AWAY, "");

/// The proxy's reply to a close frame it answers itself (a fan-out client's or an observer's,
/// a fan-out backend's): the close handshake is complete.
pub const REPLY_TO_CLOSE: CloseFrame = CloseFrame::new(code::NORMAL, "");

/// What a fan-out stream's backend gets when the stream's last client left and the linger
/// passed.
pub const NO_CLIENTS: CloseFrame = CloseFrame::new(code::GOING_AWAY, "no clients");

/// A session that reads a shared source rather than a backend of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subscriber {
    /// A client of a fan-out stream (`[routes.fanout]`).
    FanoutClient,
    /// An observer of another session (`[routes.observe]`).
    Observer,
}

/// What a client sent that its session does not take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A data frame to a fan-out stream with `client_data = "refuse"`.
    ReadOnly,
    /// A fragment to a fan-out stream that forwards: another client's frames may come next.
    Fragmented,
    /// A data frame from an observer.
    Observer,
}

/// Why a session ended. Every end of a session is one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A side sent a close frame; it was forwarded unchanged, with the code it carried.
    PeerClose {
        /// The side that sent it.
        from: Side,
        /// Its close code, if it had one.
        code: Option<u16>,
    },
    /// A side's TCP connection ended (EOF, reset) without a close frame.
    Lost(Side),
    /// A side broke the protocol or a size limit.
    Violation {
        /// The side whose frame broke the rule.
        by: Side,
        /// The rule.
        violation: Violation,
    },
    /// A side went over its session rate, with `rate_action = "close"`.
    RateLimit(Side),
    /// No data frame either way for `idle_timeout`.
    IdleTimeout,
    /// `max_lifetime` reached.
    Lifetime,
    /// A side did not answer a proxy ping within `ping_timeout`.
    PingTimeout,
    /// The token's `exp` plus the leeway passed.
    TokenExpired,
    /// An operator revoked the session through the admin API.
    Revoked,
    /// A reload removed the session's route and the grace period ran out.
    RouteRemoved,
    /// The proxy is draining (SIGTERM).
    Drain,
    /// An operator rebalanced the session's route.
    Rebalance,
    /// The recording could not keep up or failed (`on_backlog = "close"`).
    RecordingGap,
    /// A resumable session's client vanished and did not come back within the window
    /// (`overflow`: its buffered output outgrew `[routes.resume] buffer` first).
    ResumeExpired {
        /// The buffer filled before the window ended.
        overflow: bool,
    },
    /// A subscriber fell behind what it reads (its queue was full) and was dropped; what it
    /// reads goes on without it.
    Lagged(Subscriber),
    /// What a subscriber reads ended: a fan-out client's shared backend stream went without a
    /// close, or an observer's session ended.
    SourceEnded(Subscriber),
    /// A client sent what its session does not take.
    Refused(Refusal),
    /// A stream over its subject's session caps, after the grace it was given: a governed HTTP
    /// exchange (an answer of unknown length, an upload of given length still in flight). A
    /// WebSocket over the caps is refused at its handshake (429) instead, so none is closed for
    /// it; were one, it would get 1008 `too many sessions`.
    OverCap,
}

impl From<crate::session::StopReason> for Cause {
    /// A session stopped from outside: revoked, drained, its route removed, rebalanced.
    fn from(r: crate::session::StopReason) -> Cause {
        use crate::session::StopReason;
        match r {
            StopReason::Revoked => Cause::Revoked,
            StopReason::Drain => Cause::Drain,
            StopReason::RouteRemoved => Cause::RouteRemoved,
            StopReason::Rebalance => Cause::Rebalance,
        }
    }
}

impl From<crate::session::clock::Due> for Cause {
    /// A deadline of the session's clock.
    fn from(d: crate::session::clock::Due) -> Cause {
        use crate::session::clock::Due;
        match d {
            Due::Expired => Cause::TokenExpired,
            Due::Drain => Cause::Drain,
            Due::Lifetime => Cause::Lifetime,
            Due::Idle => Cause::IdleTimeout,
        }
    }
}

/// What the proxy does for a [`Cause`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The close frame the proxy writes to the client; `None` when it writes none (the peer's
    /// own close frame is forwarded, or the client is gone).
    pub to_client: Option<CloseFrame>,
    /// The close frame the proxy writes to the backend; `None` likewise.
    pub to_backend: Option<CloseFrame>,
    /// Who ended the session.
    pub initiator: Initiator,
}

impl Plan {
    /// The close frame for `side`.
    pub fn to(&self, side: Side) -> Option<CloseFrame> {
        match side {
            Side::Client => self.to_client,
            Side::Backend => self.to_backend,
        }
    }

    /// The close code the client sees: the proxy's, or else the one a peer close carried.
    pub fn client_code(&self, cause: Cause) -> Option<u16> {
        match cause {
            Cause::PeerClose { code, .. } => code,
            _ => self.to_client.map(|f| f.code),
        }
    }
}

impl Cause {
    /// The side whose connection ends with a lingering close ([`crate::session::poll_end`]):
    /// the one the session stopped reading before it had finished sending, because it broke
    /// the protocol or sent what it may not (a subscriber's input).
    pub fn lingers_on(self) -> Option<Side> {
        match self {
            Cause::Violation { by, .. } => Some(by),
            Cause::Refused(_) => Some(Side::Client),
            _ => None,
        }
    }

    /// The close table.
    pub fn plan(self) -> Plan {
        use code::*;
        let proxy = |client: CloseFrame, backend: CloseFrame| Plan {
            to_client: Some(client),
            to_backend: Some(backend),
            initiator: Initiator::Proxy,
        };
        let both = |c, reason| proxy(CloseFrame::new(c, reason), CloseFrame::new(c, reason));
        // A subscriber's end: only the client is written to (the stream or the session it
        // read goes on, or is gone already).
        let subscriber = |code, reason| Plan {
            to_client: Some(CloseFrame::new(code, reason)),
            to_backend: None,
            initiator: Initiator::Proxy,
        };
        match self {
            Cause::PeerClose { from: Side::Client, .. } => {
                Plan { to_client: None, to_backend: None, initiator: Initiator::Client }
            }
            Cause::PeerClose { from: Side::Backend, .. } => {
                Plan { to_client: None, to_backend: None, initiator: Initiator::Backend }
            }
            // The side that is gone is written nothing; its entry only says what the session's
            // close code is counted as (for a lost client, 1001).
            Cause::Lost(Side::Backend) => Plan {
                to_client: Some(CloseFrame::new(BAD_GATEWAY, "bad gateway")),
                to_backend: Some(CloseFrame::new(GOING_AWAY, "")),
                initiator: Initiator::Backend,
            },
            Cause::Lost(Side::Client) => Plan {
                to_client: Some(CloseFrame::new(GOING_AWAY, "")),
                to_backend: Some(CloseFrame::new(GOING_AWAY, "going away")),
                initiator: Initiator::Client,
            },
            Cause::Violation { by: Side::Client, violation } => proxy(
                CloseFrame::new(violation_code(violation), violation_reason(violation)),
                CloseFrame::new(GOING_AWAY, violation_reason(violation)),
            ),
            Cause::Violation { by: Side::Backend, violation } => proxy(
                CloseFrame::new(BAD_GATEWAY, "bad gateway"),
                CloseFrame::new(violation_code(violation), violation_reason(violation)),
            ),
            Cause::RateLimit(Side::Client) => {
                proxy(CloseFrame::new(POLICY, "rate limit"), CloseFrame::new(GOING_AWAY, "client rate limit"))
            }
            Cause::RateLimit(Side::Backend) => {
                proxy(CloseFrame::new(GOING_AWAY, "backend rate limit"), CloseFrame::new(POLICY, "rate limit"))
            }
            Cause::IdleTimeout => both(NORMAL, "idle timeout"),
            Cause::Lifetime => both(GOING_AWAY, "session lifetime reached"),
            Cause::PingTimeout => {
                proxy(CloseFrame::new(GOING_AWAY, "ping timeout"), CloseFrame::new(GOING_AWAY, "going away"))
            }
            Cause::TokenExpired => {
                proxy(CloseFrame::new(POLICY, "token expired"), CloseFrame::new(GOING_AWAY, "token expired"))
            }
            Cause::Revoked => {
                proxy(CloseFrame::new(POLICY, "session revoked"), CloseFrame::new(GOING_AWAY, "session revoked"))
            }
            Cause::RouteRemoved => both(GOING_AWAY, "route removed"),
            Cause::Drain => both(GOING_AWAY, "going away"),
            Cause::Rebalance => both(GOING_AWAY, "rebalance"),
            Cause::RecordingGap => proxy(
                CloseFrame::new(INTERNAL_ERROR, "recording failed"),
                CloseFrame::new(GOING_AWAY, "recording failed"),
            ),
            // The client is gone (written nothing); its code counts as 1001, as for a lost one.
            Cause::ResumeExpired { overflow } => Plan {
                to_client: Some(CloseFrame::new(GOING_AWAY, "")),
                to_backend: Some(CloseFrame::new(
                    GOING_AWAY,
                    if overflow { "resume buffer full" } else { "resume window over" },
                )),
                initiator: Initiator::Client,
            },
            Cause::Lagged(Subscriber::FanoutClient) => subscriber(TRY_AGAIN_LATER, "client too slow"),
            Cause::Lagged(Subscriber::Observer) => subscriber(TRY_AGAIN_LATER, "observer too slow"),
            Cause::SourceEnded(Subscriber::FanoutClient) => subscriber(GOING_AWAY, "stream ended"),
            Cause::SourceEnded(Subscriber::Observer) => subscriber(GOING_AWAY, "session ended"),
            Cause::Refused(r) => subscriber(
                POLICY,
                match r {
                    Refusal::ReadOnly => "read-only stream",
                    Refusal::Fragmented => "fragmented messages are not forwarded",
                    Refusal::Observer => "observers cannot send",
                },
            ),
            Cause::OverCap => {
                proxy(CloseFrame::new(POLICY, "too many sessions"), CloseFrame::new(GOING_AWAY, "too many sessions"))
            }
        }
    }

    /// The end's one label, whatever kind of session it ends: the end-of-session line's
    /// `reason`, and for a governed HTTP exchange its access log's `end` and the event-stream
    /// metric's `reason`.
    pub fn label(self) -> &'static str {
        match self {
            Cause::PeerClose { from: Side::Client, .. } => "client_close",
            Cause::PeerClose { from: Side::Backend, .. } => "backend_close",
            Cause::Lost(Side::Backend) => "backend_lost",
            Cause::Lost(Side::Client) => "client_lost",
            Cause::Violation { by: Side::Client, .. } => "client_protocol_error",
            Cause::Violation { by: Side::Backend, .. } => "bad_gateway",
            Cause::RateLimit(Side::Client) => "client_rate_limit",
            Cause::RateLimit(Side::Backend) => "backend_rate_limit",
            Cause::IdleTimeout => "idle_timeout",
            Cause::Lifetime => "lifetime",
            Cause::PingTimeout => "ping_timeout",
            Cause::TokenExpired => "token_expired",
            Cause::Revoked => "revoked",
            Cause::RouteRemoved => "route_removed",
            Cause::Drain => "drain",
            Cause::Rebalance => "rebalance",
            Cause::RecordingGap => "recording_failed",
            Cause::ResumeExpired { overflow: true } => "resume_overflow",
            Cause::ResumeExpired { overflow: false } => "resume_expired",
            Cause::Lagged(Subscriber::FanoutClient) => "client_too_slow",
            Cause::Lagged(Subscriber::Observer) => "observer_too_slow",
            Cause::SourceEnded(Subscriber::FanoutClient) => "stream_ended",
            Cause::SourceEnded(Subscriber::Observer) => "session_ended",
            Cause::Refused(_) => "client_input_refused",
            Cause::OverCap => "subject_sessions",
        }
    }

    /// What a governed HTTP exchange (a request body or a response body in flight, see
    /// `proxy/stream.rs`) makes of this end: its answer when it comes before the member's (401
    /// with `invalid_token`, 408, 429 with `Retry-After`, 503: `proxy/error.rs` adds the
    /// headers by status), and its label in the access log, the event-stream metric and the
    /// exchange's end-of-session line. Once the member's answer has started, its body is cut,
    /// or an event stream ends cleanly.
    pub fn http_end(self) -> HttpEnd {
        let status = match self {
            Cause::TokenExpired | Cause::Revoked => http::StatusCode::UNAUTHORIZED,
            Cause::Lifetime | Cause::IdleTimeout => http::StatusCode::REQUEST_TIMEOUT,
            Cause::OverCap => http::StatusCode::TOO_MANY_REQUESTS,
            Cause::Drain | Cause::RouteRemoved | Cause::Rebalance => http::StatusCode::SERVICE_UNAVAILABLE,
            // A WebSocket's own ends: no governed HTTP exchange is ended for them.
            Cause::PeerClose { .. }
            | Cause::Lost(_)
            | Cause::Violation { .. }
            | Cause::RateLimit(_)
            | Cause::PingTimeout
            | Cause::RecordingGap
            | Cause::ResumeExpired { .. }
            | Cause::Lagged(_)
            | Cause::SourceEnded(_)
            | Cause::Refused(_) => http::StatusCode::SERVICE_UNAVAILABLE,
        };
        HttpEnd { status, label: self.label() }
    }
}

/// What a governed HTTP exchange makes of its session's end ([`Cause::http_end`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpEnd {
    /// The answer's status, when the end comes before the member's answer.
    pub status: http::StatusCode,
    /// The end's label in the access log, the event-stream metric and the end-of-session line.
    pub label: &'static str,
}

/// Records the end of a WebSocket session of any kind (relayed, fan-out client, observer): its
/// close in `portcullis_closes_total`, its place in `portcullis_sessions_active` given back, and
/// the one end-of-session log line ([`log_end`]).
pub fn record_end(
    metrics: &crate::metrics::Metrics,
    s: &crate::session::SessionEntry,
    started: std::time::Instant,
    end: &crate::session::SessionEnd,
) {
    metrics.sessions_active.decrement(1.0);
    metrics.close(code_label(end.close_code), end.initiator.as_str());
    log_end(s, started, end);
}

/// The one end-of-session log line, `session ended`, of every kind of session (WebSockets
/// through [`record_end`]; governed HTTP exchanges, uploads, SSE and other streamed
/// responses, when their governance drops, beside their access-log line). It never carries a
/// token.
pub fn log_end(s: &crate::session::SessionEntry, started: std::time::Instant, end: &crate::session::SessionEnd) {
    log_end_after(s, started.elapsed(), end);
}

/// [`log_end`] of a session that lasted `lasted`; once per session (a second call writes
/// nothing).
pub fn log_end_after(s: &crate::session::SessionEntry, lasted: std::time::Duration, end: &crate::session::SessionEnd) {
    if !s.control.log_once() {
        return;
    }
    tracing::info!(
        session = s.id,
        kind = s.kind.get().as_str(),
        route = s.route,
        agent = s.agent.as_deref().unwrap_or(""),
        subject = s.subject.as_deref().unwrap_or(""),
        client = %s.client,
        backend = s.backend.get().map_or("", String::as_str),
        duration_ms = lasted.as_millis() as u64,
        bytes_from_client = end.bytes[0],
        bytes_from_backend = end.bytes[1],
        frames_from_client = end.frames[0],
        frames_from_backend = end.frames[1],
        close_code = end.close_code.unwrap_or(0),
        closed_by = end.initiator.as_str(),
        reason = end.reason,
        "session ended"
    );
}

/// How a session or a request ended that was dropped without saying how: cut by the drain's
/// `drain_timeout` (the process closed its connection), or else its client left first. The one
/// place that tells the two apart, for every kind of session (a request waiting for its answer,
/// a governed exchange, a body in flight, a relayed session's registration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abandoned {
    /// The drain's `drain_timeout` passed: the proxy cut it.
    Drain,
    /// Its client went.
    ClientGone,
}

impl Abandoned {
    /// Which of the two, by the live-session registry that ran the drain.
    pub fn of(sessions: &crate::session::Sessions) -> Abandoned {
        match sessions.cut_by_drain() {
            true => Abandoned::Drain,
            false => Abandoned::ClientGone,
        }
    }

    /// Its label (`drain`, `client_gone`): the end-of-session line's `reason`, the access log's
    /// `end`.
    pub fn label(self) -> &'static str {
        match self {
            Abandoned::Drain => Cause::Drain.label(),
            Abandoned::ClientGone => "client_gone",
        }
    }

    /// Who ended it.
    pub fn initiator(self) -> Initiator {
        match self {
            Abandoned::Drain => Initiator::Proxy,
            Abandoned::ClientGone => Initiator::Client,
        }
    }

    /// The status a request that got no answer is logged with: none went out at the drain (0,
    /// as Envoy logs it); NGINX's 499, "client closed request", when its client left.
    pub fn status(self) -> u16 {
        match self {
            Abandoned::Drain => 0,
            Abandoned::ClientGone => 499,
        }
    }

    /// The end of an exchange that said none (an HTTP exchange: no close frame), with `bytes`.
    pub fn end(self, bytes: [u64; 2]) -> crate::session::SessionEnd {
        crate::session::SessionEnd {
            close_code: None,
            initiator: self.initiator(),
            reason: self.label(),
            bytes,
            frames: [0, 0],
        }
    }
}

impl crate::session::SessionEnd {
    /// The end of a session with no byte counts of its own (a fan-out client, an observer),
    /// for `cause`.
    pub fn of(cause: Cause) -> crate::session::SessionEnd {
        let plan = cause.plan();
        crate::session::SessionEnd {
            close_code: plan.client_code(cause),
            initiator: plan.initiator,
            reason: cause.label(),
            bytes: [0, 0],
            frames: [0, 0],
        }
    }
}

/// The close code the side that broke a rule is sent: 1009 for size limits, 1007 for a close
/// reason that is not UTF-8, 1002 otherwise.
pub fn violation_code(v: Violation) -> u16 {
    match v {
        Violation::FrameTooLarge(_) | Violation::MessageTooLarge => code::TOO_BIG,
        Violation::InvalidCloseReason => code::INVALID_PAYLOAD,
        _ => code::PROTOCOL_ERROR,
    }
}

/// Checks a close frame a peer sent before it is forwarded (RFC 6455 §5.5.1, §7.4): a code, if
/// present, must be one allowed on the wire, and the reason must be UTF-8. (A one-byte payload
/// is refused earlier, by the frame tracker.)
pub fn check_peer_close(payload: &[u8]) -> Result<(), Violation> {
    let Some((code, reason)) = payload.split_first_chunk::<2>() else { return Ok(()) };
    let code = u16::from_be_bytes(*code);
    if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
        return Err(Violation::InvalidCloseCode(code));
    }
    std::str::from_utf8(reason).map(|_| ()).map_err(|_| Violation::InvalidCloseReason)
}

fn violation_reason(v: Violation) -> &'static str {
    match v {
        Violation::FrameTooLarge(_) => "frame too large",
        Violation::MessageTooLarge => "message too large",
        _ => "protocol error",
    }
}

/// Every label [`code_label`] gives, for pre-registering `portcullis_closes_total`.
pub const CODE_LABELS: &[&str] = &[
    "none", "1000", "1001", "1002", "1003", "1007", "1008", "1009", "1010", "1011", "1013", "1014", "3xxx", "4xxx",
    "other",
];

/// Folds a close code into a bounded label for `portcullis_closes_total{code}`.
pub fn code_label(code: Option<u16>) -> &'static str {
    match code {
        None => "none",
        Some(1000) => "1000",
        Some(1001) => "1001",
        Some(1002) => "1002",
        Some(1003) => "1003",
        Some(1007) => "1007",
        Some(1008) => "1008",
        Some(1009) => "1009",
        Some(1010) => "1010",
        Some(1011) => "1011",
        Some(1013) => "1013",
        Some(1014) => "1014",
        Some(3000..=3999) => "3xxx",
        Some(4000..=4999) => "4xxx",
        Some(_) => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_labels_lists_every_label_of_every_code() {
        for code in std::iter::once(None).chain((0..=u16::MAX).map(Some)) {
            assert!(CODE_LABELS.contains(&code_label(code)), "{code:?}");
        }
    }

    /// Every cause, with the `docs/errors.md` row (by the start of its "event" cell) that
    /// documents it.
    fn documented() -> Vec<(Cause, &'static str)> {
        let v = |by, violation| Cause::Violation { by, violation };
        vec![
            (Cause::IdleTimeout, "no data frame either way"),
            (Cause::Lifetime, "`max_lifetime` reached"),
            (Cause::PingTimeout, "a side did not answer a proxy ping"),
            (Cause::Drain, "drain (SIGTERM/SIGINT)"),
            (v(Side::Client, Violation::ReservedBits), "client frame breaks the protocol"),
            (v(Side::Client, Violation::UnmaskedClientFrame), "client frame breaks the protocol"),
            (v(Side::Client, Violation::InvalidCloseCode(1005)), "client frame breaks the protocol"),
            (
                v(Side::Client, Violation::InvalidCloseReason),
                "a close frame whose reason is not UTF-8, from the client",
            ),
            (
                v(Side::Backend, Violation::InvalidCloseReason),
                "a close frame whose reason is not UTF-8, from the backend",
            ),
            (v(Side::Client, Violation::FrameTooLarge(1)), "client frame or message over the limit"),
            (v(Side::Client, Violation::MessageTooLarge), "client frame or message over the limit"),
            (v(Side::Backend, Violation::MaskedBackendFrame), "backend frame breaks the protocol"),
            (v(Side::Backend, Violation::FrameTooLarge(1)), "backend frame or message over the limit"),
            (v(Side::Backend, Violation::MessageTooLarge), "backend frame or message over the limit"),
            (Cause::Lost(Side::Backend), "backend TCP connection lost"),
            (Cause::Lost(Side::Client), "client TCP connection lost"),
            (Cause::TokenExpired, "the token's `exp`"),
            (Cause::Revoked, "session revoked through the admin API"),
            (Cause::RouteRemoved, "a reload removed the session's route"),
            (Cause::Rebalance, "rebalanced through the admin API"),
            (Cause::RecordingGap, "the recording fell behind or failed"),
            (Cause::ResumeExpired { overflow: false }, "a resumable session's client did not come back"),
            (Cause::ResumeExpired { overflow: true }, "a resumable session's buffered output outgrew"),
            (Cause::Lagged(Subscriber::FanoutClient), "fan-out: the client's queue was full"),
            (Cause::Lagged(Subscriber::Observer), "observer: its queue was full"),
            (Cause::SourceEnded(Subscriber::FanoutClient), "fan-out: the shared backend stream ended"),
            (Cause::SourceEnded(Subscriber::Observer), "observer: the observed session ended"),
            (Cause::Refused(Refusal::ReadOnly), "fan-out: a data frame with `client_data = \"refuse\"`"),
            (Cause::Refused(Refusal::Fragmented), "fan-out: a fragment with `client_data = \"forward\"`"),
            (Cause::Refused(Refusal::Observer), "observer: a data frame"),
        ]
    }

    /// The cells of the relay close table in `docs/errors.md`, by row.
    fn doc_rows() -> Vec<Vec<String>> {
        let doc = include_str!("../../docs/errors.md");
        let table = doc.split("## Relay: close codes").nth(1).expect("docs/errors.md has the relay close table");
        table
            .lines()
            .skip_while(|l| !l.starts_with("| event"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| l.trim_matches('|').split('|').map(|c| c.trim().to_owned()).collect())
            .collect()
    }

    /// A cell like "1009 `frame too large` / `message too large`" documents this frame.
    fn cell_documents(cell: &str, frame: Option<CloseFrame>) -> bool {
        match frame {
            None => cell.is_empty(),
            Some(f) => {
                cell.starts_with(&f.code.to_string())
                    && (f.reason.is_empty()
                        || cell.contains(&format!("`{}`", f.reason))
                        || cell.contains("(same reason)"))
            }
        }
    }

    #[test]
    fn close_table_matches_docs_errors_md() {
        let rows = doc_rows();
        for (cause, event) in documented() {
            let row = rows
                .iter()
                .find(|r| r[0].starts_with(event))
                .unwrap_or_else(|| panic!("docs/errors.md has no row starting {event:?}"));
            let plan = cause.plan();
            for (side, cell) in [(Side::Client, &row[1]), (Side::Backend, &row[2])] {
                // A side that is gone is written nothing, whatever the plan holds for it.
                let gone =
                    cause == Cause::Lost(side) || side == Side::Client && matches!(cause, Cause::ResumeExpired { .. });
                let written = if gone { None } else { plan.to(side) };
                assert!(cell_documents(cell, written), "{cause:?}: to the {side:?}: doc {cell:?}, table {written:?}");
            }
            assert_eq!(row[3], format!("`{}`", plan.initiator.as_str()), "{cause:?}: initiator");
            assert_eq!(row[4], format!("`{}`", cause.label()), "{cause:?}: reason");
        }
    }

    /// The ends a governed HTTP exchange has (its session's stops and deadlines, and the caps)
    /// and what its client gets before the member's answer, as `docs/errors.md` says
    /// (`ForwardError::Ended`).
    #[test]
    fn a_governed_exchange_answers_each_end_of_its_session() {
        use crate::session::clock::Due;
        use crate::session::StopReason;
        let ends = [
            (Cause::from(Due::Expired), 401, "token_expired"),
            (Cause::from(StopReason::Revoked), 401, "revoked"),
            (Cause::from(Due::Lifetime), 408, "lifetime"),
            (Cause::OverCap, 429, "subject_sessions"),
            (Cause::from(StopReason::Drain), 503, "drain"),
            (Cause::from(Due::Drain), 503, "drain"),
            (Cause::from(StopReason::RouteRemoved), 503, "route_removed"),
            (Cause::from(StopReason::Rebalance), 503, "rebalance"),
        ];
        for (cause, status, label) in ends {
            assert_eq!((cause.http_end().status.as_u16(), cause.http_end().label), (status, label), "{cause:?}");
        }
        let doc = include_str!("../../docs/errors.md");
        let row = doc.lines().find(|l| l.contains("`ForwardError::Ended`")).expect("errors.md documents the ends");
        for said in
            ["(401, `WWW-Authenticate: Bearer error=\"invalid_token\"`)", "(408)", "(429, `Retry-After: 5`)", "(503)"]
        {
            assert!(row.contains(said), "errors.md's row lost {said}: {row}");
        }
    }

    #[test]
    fn a_peer_close_is_forwarded_not_answered_by_the_proxy() {
        for from in [Side::Client, Side::Backend] {
            let cause = Cause::PeerClose { from, code: Some(4000) };
            let plan = cause.plan();
            assert_eq!((plan.to_client, plan.to_backend), (None, None));
            assert_eq!(plan.client_code(cause), Some(4000));
        }
    }

    #[test]
    fn peer_close_frames_are_checked_for_the_wire() {
        let frame = |code: u16, reason: &[u8]| [&code.to_be_bytes()[..], reason].concat();
        assert_eq!(check_peer_close(&[]), Ok(()), "no code at all is allowed");
        for ok in [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999] {
            assert_eq!(check_peer_close(&frame(ok, b"fine")), Ok(()), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
            assert_eq!(check_peer_close(&frame(bad, b"")), Err(Violation::InvalidCloseCode(bad)), "{bad}");
        }
        assert_eq!(
            check_peer_close(&frame(
                1000,
                &[0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5, 0xed, 0xa0, 0x80]
            )),
            Err(Violation::InvalidCloseReason)
        );
        assert_eq!(violation_code(Violation::InvalidCloseReason), code::INVALID_PAYLOAD);
        assert_eq!(violation_code(Violation::InvalidCloseCode(1005)), code::PROTOCOL_ERROR);
    }

    #[test]
    fn every_violation_maps_to_1002_or_1009() {
        assert_eq!(violation_code(Violation::FrameTooLarge(5)), code::TOO_BIG);
        assert_eq!(violation_code(Violation::MessageTooLarge), code::TOO_BIG);
        assert_eq!(violation_code(Violation::UnmaskedClientFrame), code::PROTOCOL_ERROR);
        assert_eq!(violation_code(Violation::InvalidClosePayload), code::PROTOCOL_ERROR);
    }
}
