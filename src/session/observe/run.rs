//! Stage: observer. A read-only WebSocket to a live session of a route with
//! `[routes.observe]`: the upgrade (or HTTP/2 extended CONNECT) names the session with
//! `?observe=<id>`, the token must hold the route's observe scope (instead of the agent grant
//! a session needs), and the answer comes from the proxy itself, with no backend.
//!
//! The observer gets the session's replay, then its output as it happens, as binary frames.
//! It never sends input: a data frame from it closes it with 1008. The proxy answers its pings.
//! It is closed with 1013 when it falls behind (the session never waits for it) and with 1001
//! when the session ends. Joining and leaving are logged with the session id and the
//! observer's subject, and `/sessions` shows each session's observer count.

use std::sync::{Arc, Weak};

use tokio::io::AsyncWriteExt;

use super::{Hub, Observer};
use crate::codec::{self, opcode, FrameLimits, ReadError, Reader, Side, Violation};
use crate::session::close::{Cause, Refusal, Subscriber, REPLY_TO_CLOSE};
use crate::session::subscriber::{close_subscriber, write_unless_dropped, Moved, Written};

/// The observed session, when the request asks to observe one: `?observe=<id>` (a session of
/// this instance), or `?observe=<instance>/<id>` (one of the fleet's).
pub fn requested(path_and_query: &str) -> Option<(Option<String>, u64)> {
    let (_, query) = path_and_query.split_once('?')?;
    let (_, v) = form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "observe")?;
    // `{instance}/{id}`: a session of the fleet's directory (`/sessions?scope=fleet`).
    match v.rsplit_once('/') {
        Some((instance, id)) if !instance.is_empty() => Some((Some(instance.to_owned()), id.parse().ok()?)),
        Some(_) => None,
        None => Some((None, v.parse().ok()?)),
    }
}

/// An observer the hub dropped for falling behind: 1013. (Each end is its metric label and its
/// cause in the close table.)
const SLOW: (&str, Cause) = ("lagged", Cause::Lagged(Subscriber::Observer));

/// What the observer's writer sends next: a chunk of the session's output (the hub's shared
/// buffer, not a copy) or the answer to a ping.
enum Out {
    Data(bytes::Bytes),
    Pong(Vec<u8>),
}

/// Who is watching which session, for the log lines.
pub struct Watch {
    /// The observed session.
    pub session: u64,
    /// The observer's subject.
    pub subject: String,
    /// Its route.
    pub route: String,
    /// The route's `drop_grace`.
    pub drop_grace: std::time::Duration,
    /// The observer's own session: registered, so revocation (its subject, token or agent) and
    /// drain reach it, and holding its places under the subject's caps.
    pub own: crate::session::SessionGuard,
    /// Its subject's places under the session caps, freed when it leaves.
    pub _slots: crate::session::CapPlaces,
    /// When its token expires (plus leeway), when the route enforces expiry.
    pub expires_at: Option<tokio::time::Instant>,
    /// `[server] drain_spread`: a drained observer closes within it, at a random point.
    pub drain_spread: std::time::Duration,
    /// The route's `max_lifetime` (zero: none), which an observer's session has too.
    pub lifetime: std::time::Duration,
    /// The route's client rate, which what an observer sends (pings) is held to too.
    pub rate: crate::session::rate::Metered,
}

/// What an observer may send: control frames only (at most 125 bytes), so a frame claiming
/// more is refused from its header, unread (1009; a control frame that long, 1002).
const OBSERVER_LIMITS: FrameLimits = FrameLimits { max_frame_size: 125, max_message_size: 125, allowed_rsv: 0 };

/// Runs one observer on its upgraded stream until it leaves, falls behind or the session
/// ends. Holds the hub weakly: the session's end drops it, which ends the observer's queue.
pub async fn run<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    io: S,
    early: Vec<u8>,
    mut observer: Observer,
    hub: Weak<Hub>,
    mut watch: Watch,
    metrics: Arc<crate::metrics::Metrics>,
) {
    tracing::info!(
        session = watch.session,
        route = watch.route.as_str(),
        observer = watch.subject.as_str(),
        own = watch.own.entry().id,
        "observer joined"
    );
    crate::metrics::observers_active(&watch.route, 1.0);
    metrics.sessions_active.increment(1.0);
    let started = std::time::Instant::now();
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut reader = Reader::new(Side::Client, OBSERVER_LIMITS, &early, 256);
    // The frame being written, reused.
    let mut wire = Vec::new();
    // Its own session's end: revoked or drained, or its token expired.
    let control = watch.own.entry().control.clone();
    let stopped = control.wait_spread(watch.drain_spread);
    tokio::pin!(stopped);
    // Its deadlines, from the session clock: its token's expiry and the route's lifetime (an
    // observer has no idle timeout: the session it watches may be quiet for long).
    let clock = crate::session::clock::Clock::with(watch.lifetime, std::time::Duration::ZERO, watch.expires_at);
    let deadline = clock.until_due();
    tokio::pin!(deadline);
    // What it was sent and what it sent, counted as a relayed session's.
    let mut moved = Moved::default();
    // Every write is bounded: an observer that stops reading must not hold this task.
    // Why it ended (its metric label), and whether its close frame can be written (not when its
    // connection failed, nor after a frame cut short).
    let (end, cause, write_close) = loop {
        // Dropped between writes: the chunks still queued are not sent. (Waiting in `recv`,
        // its queue is empty: it cannot be dropped meanwhile.)
        let next = if observer.lagged() {
            Err(SLOW)
        } else {
            tokio::select! {
                chunk = observer.rx.recv() => match chunk {
                    Some(bytes) => Ok(Out::Data(bytes)),
                    None if observer.lagged() => Err(SLOW),
                    None => Err(("session_ended", Cause::SourceEnded(Subscriber::Observer))),
                },
                () = watch.rate.resumed(), if !watch.rate.reading() => continue,
                // Cancel-safe: a frame in part stays in the reader.
                read = reader.next(&mut rd), if watch.rate.reading() => match read {
                    Ok(Some(f)) => {
                        moved.add(&control, &metrics, Side::Client, f.bytes.len(), !codec::is_control(f.opcode));
                        match watch.rate.frame(f.bytes.len(), &metrics) {
                            Err(_) => Err(("rate_limit", Cause::RateLimit(Side::Client))),
                            Ok(()) => match f.opcode {
                                opcode::PING => Ok(Out::Pong(f.payload())),
                                opcode::PONG => continue,
                                opcode::CLOSE => {
                                    let code = f.payload().first_chunk::<2>().map(|c| u16::from_be_bytes(*c));
                                    Err(("left", Cause::PeerClose { from: Side::Client, code }))
                                }
                                _ => Err(("input", Cause::Refused(Refusal::Observer))),
                            },
                        }
                    }
                    Ok(None) | Err(ReadError::Io(_)) => break ("gone", Cause::Lost(Side::Client), false),
                    Err(ReadError::Violation(violation)) => {
                        let label = if matches!(violation, Violation::FrameTooLarge(_)) { "too_big" } else { "protocol" };
                        Err((label, Cause::Violation { by: Side::Client, violation }))
                    }
                },
                reason = &mut stopped => Err(match reason {
                    crate::session::StopReason::Revoked => ("revoked", Cause::Revoked),
                    crate::session::StopReason::Drain => ("drain", Cause::Drain),
                    crate::session::StopReason::RouteRemoved => ("route_removed", Cause::RouteRemoved),
                    crate::session::StopReason::Rebalance => ("rebalance", Cause::Rebalance),
                }),
                due = &mut deadline => Err(match due {
                    crate::session::clock::Due::Expired => ("token_expired", Cause::TokenExpired),
                    other => ("lifetime", Cause::from(other)),
                }),
            }
        };
        let out = match next {
            Ok(out) => out,
            // The end (its metric label); its close frame is sent once it has left the hub.
            Err((why, cause)) => break (why, cause, true),
        };
        wire.clear();
        match &out {
            Out::Data(bytes) => codec::encode(true, 0, opcode::BINARY, None, bytes, &mut wire),
            Out::Pong(p) => codec::encode(true, 0, opcode::PONG, None, p, &mut wire),
        }
        if wire.capacity() > 64 * 1024 {
            wire.shrink_to(64 * 1024);
        }
        // Flushed at once: on TLS a frame left in the record buffer would wait for the next
        // one, and an observer's screen must not lag.
        let write = async { wr.write_all(&wire).await.is_ok() && wr.flush().await.is_ok() };
        match write_unless_dropped(write, &observer.lagged, watch.drop_grace).await {
            Written::Done | Written::Dropped => {
                if matches!(out, Out::Data(_)) {
                    // One frame of the session's output, as a relayed session reads its backend's.
                    moved.add(&control, &metrics, Side::Backend, wire.len(), true);
                }
            }
            Written::Failed => break ("gone", Cause::Lost(Side::Client), false),
            // Cut in the middle of a frame: no close frame can follow.
            Written::Cut => break (SLOW.0, SLOW.1, false),
        }
    };
    if let Some(hub) = hub.upgrade() {
        hub.leave(observer.id);
    }
    crate::metrics::observers_active(&watch.route, -1.0);
    crate::metrics::observer_closed(&watch.route, end);
    tracing::info!(
        session = watch.session,
        route = watch.route.as_str(),
        observer = watch.subject.as_str(),
        reason = end,
        "observer left"
    );
    crate::session::close::record_end(&metrics, watch.own.entry(), started, &moved.end(cause));
    if write_close {
        // A close is answered; every other end is the close table's.
        let close = match cause {
            Cause::PeerClose { .. } => Some(REPLY_TO_CLOSE),
            _ => cause.plan().to_client,
        };
        let frame = close.map(|f| codec::close_frame(f.code, f.reason, None));
        close_subscriber(&mut rd, &mut wr, frame.as_deref(), cause).await;
    }
}

/// The hub of `session`, when it is a live session of `route` for `agent` with observers.
pub fn hub_of(sessions: &crate::session::Sessions, session: u64, route: &str, agent: Option<&str>) -> Option<Arc<Hub>> {
    let entry = sessions.get(session)?;
    (entry.route == route && entry.agent.as_deref() == agent && entry.control.stopped().is_none())
        .then(|| entry.attachment::<Hub>())
        .flatten()
}
