//! Stage: fan-out (routes with `[routes.fanout]`). One task per shared backend stream reads
//! whole frames from the backend and hands each, as one reference-counted buffer, to every
//! subscriber's bounded queue; one task per client writes those buffers to its socket as they
//! are (the backend's frames are unmasked, as a server's frames to a client must be), answers
//! the client's pings, and ends the client on its own deadlines (token expiry, revocation,
//! drain) without touching the stream. A client whose queue is full is dropped (1013) and the
//! stream goes on; if it has stopped reading, its connection is cut after `drop_grace`
//! ([`write_unless_dropped`], which the observers' writer uses too). The registry is
//! `crate::fanout`. The stream's task never waits on the backend's reading either: what it
//! owes the backend waits in a bounded outbox.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::{Command, End, Fanouts, Key, Stream, Subscriber};
use crate::codec::{self as frame, opcode, FrameLimits, ReadError, Reader, Side};
use crate::config::{FanoutSettings, SessionSettings};
use crate::metrics::Metrics;
use crate::session::clock::{or_far, Clock, Ping, PingDue, Pings};
use crate::session::close::{
    check_peer_close, Cause, CloseFrame, Refusal, Subscriber as Kind, NO_CLIENTS, REPLY_TO_CLOSE,
};
use crate::session::rate::Metered;
use crate::session::subscriber::{
    close_subscriber, write_flushed, write_unless_dropped, Lag, Moved, Written, CLOSE_TIMEOUT,
};
use crate::session::SessionControl;

/// The close frame the proxy writes; masked toward the backend.
fn close_frame(f: CloseFrame, masked: bool) -> Vec<u8> {
    frame::close_frame(f.code, f.reason, masked.then(rand::random::<[u8; 4]>))
}

/// The frame limits of a route's `[session]`, for frames sent by a fan-out route's backend or
/// clients (no extension is negotiated on a fan-out route).
fn limits(s: &SessionSettings) -> FrameLimits {
    FrameLimits { max_frame_size: s.max_frame_size, max_message_size: s.max_message_size, allowed_rsv: 0 }
}

/// Bytes for the backend the stream holds before it takes no more forwarded client data (and
/// answers no more of the backend's pings: a backend this far behind is not reading them).
const OUTBOX_FORWARD: usize = 64 * 1024;

/// What a stream's task needs.
pub(crate) struct StreamTask {
    pub(crate) backend: tokio::net::TcpStream,
    pub(crate) early: Vec<u8>,
    pub(crate) stream: Arc<Stream>,
    pub(crate) commands: tokio::sync::mpsc::UnboundedReceiver<Command>,
    pub(crate) data: tokio::sync::mpsc::Receiver<Bytes>,
    pub(crate) settings: Arc<FanoutSettings>,
    /// The route's `[session]`: the frame and message limits of the backend's frames.
    pub(crate) session: Arc<SessionSettings>,
    pub(crate) key: Key,
    pub(crate) fanouts: Arc<Fanouts>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) drain: tokio_util::sync::CancellationToken,
    /// Counts the stream for least-connections while it is open.
    pub(crate) _guard: Option<crate::routing::sticky::ConnGuard>,
}

/// Runs a shared backend stream until the backend closes, or its last client left and the
/// linger passed (at once during a drain).
pub(crate) async fn run_stream(mut t: StreamTask) {
    let route = t.stream.route.clone();
    t.metrics.fanout_stream(&route, 1.0);
    tracing::info!(route, backend = t.stream.member, "fan-out stream opened");
    let (mut rd, mut wr) = tokio::io::split(t.backend);
    let mut reader = Reader::new(Side::Backend, limits(&t.session), &t.early, 16 * 1024);
    let mut subs: Vec<(Subscriber, bool)> = Vec::new();
    let mut in_message = false;
    let linger = tokio::time::sleep(t.settings.linger);
    tokio::pin!(linger);
    let (mut lingering, mut draining) = (true, false);
    // What goes to the backend (pongs, forwarded client data, the close) waits here and is
    // written as the backend takes it: the task never waits on the backend's reading, so a
    // backend that stops reading does not stop its events reaching the clients.
    let mut outbox = BytesMut::new();
    let end = loop {
        tokio::select! {
            r = wr.write_buf(&mut outbox), if !outbox.is_empty() => {
                if !matches!(r, Ok(n) if n > 0) {
                    break End::BackendLost;
                }
            }
            f = reader.next(&mut rd) => {
                let f = match f {
                    Ok(Some(f)) => f,
                    Ok(None) | Err(ReadError::Io(_)) => break End::BackendLost,
                    Err(ReadError::Violation(violation)) => {
                        tracing::warn!(route, backend = t.stream.member, %violation, "fan-out backend broke the protocol");
                        if let Some(f) = (Cause::Violation { by: Side::Backend, violation }).plan().to_backend {
                            outbox.extend_from_slice(&close_frame(f, true));
                        }
                        break End::BackendLost;
                    }
                };
                match f.opcode {
                    opcode::PING if outbox.len() >= OUTBOX_FORWARD => {}
                    opcode::PING => {
                        let mut pong = Vec::new();
                        frame::encode(true, 0, opcode::PONG, Some(rand::random()), &f.payload(), &mut pong);
                        outbox.extend_from_slice(&pong);
                    }
                    opcode::PONG => {}
                    opcode::CLOSE => {
                        let p = f.payload();
                        // A code that may not be on the wire (1005, 1006, 1015...) or a reason
                        // that is not UTF-8 is the backend's violation: it never reaches a client.
                        if let Err(violation) = check_peer_close(&p) {
                            let cause = Cause::Violation { by: Side::Backend, violation };
                            if let Some(f) = cause.plan().to_backend {
                                outbox.extend_from_slice(&close_frame(f, true));
                            }
                            break End::BackendLost;
                        }
                        let code = p.first_chunk::<2>().map(|c| u16::from_be_bytes(*c));
                        outbox.extend_from_slice(&close_frame(REPLY_TO_CLOSE, true));
                        break End::BackendClosed(code);
                    }
                    _ => {
                        // The same buffer to every subscriber that is at a message boundary;
                        // a full queue drops its subscriber, never waits.
                        subs.retain(|(s, active)| {
                            if !active {
                                return true;
                            }
                            match s.tx.try_send(f.bytes.clone()) {
                                Ok(()) => true,
                                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                                    s.lagged.raise();
                                    t.metrics.fanout_drop(&route, "slow");
                                    false
                                }
                                Err(_) => false,
                            }
                        });
                        in_message = !f.fin;
                        if !in_message {
                            for (_, active) in subs.iter_mut() {
                                *active = true;
                            }
                        }
                    }
                }
            }
            c = t.commands.recv() => match c {
                Some(Command::Join(s)) => {
                    subs.push((s, !in_message));
                    lingering = false;
                }
                Some(Command::Leave(id)) => {
                    subs.retain(|(s, _)| s.id != id);
                    if subs.is_empty() {
                        lingering = true;
                        let wait = if draining { Duration::ZERO } else { t.settings.linger };
                        linger.as_mut().reset(Instant::now() + wait);
                    }
                }
                None => break End::Closed,
            },
            // Forwarded client data while the backend keeps up; past the bound the clients'
            // sends wait (their own reading stops), the stream does not.
            d = t.data.recv(), if outbox.len() < OUTBOX_FORWARD => {
                if let Some(bytes) = d {
                    outbox.extend_from_slice(&bytes);
                }
            }
            _ = &mut linger, if lingering && subs.is_empty() => {
                outbox.extend_from_slice(&close_frame(NO_CLIENTS, true));
                break End::Closed;
            }
            _ = t.drain.cancelled(), if !draining => {
                draining = true;
                if subs.is_empty() {
                    linger.as_mut().reset(Instant::now());
                    lingering = true;
                }
            }
        }
    };
    if let Ok(mut e) = t.stream.end.lock() {
        *e = Some(end);
    }
    t.fanouts.remove(&t.key, &t.stream);
    // Dropping the subscribers ends their queues: each client sends its close.
    drop(subs);
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let _ = wr.write_all(&outbox).await;
        let _ = wr.shutdown().await;
    })
    .await;
    t.metrics.fanout_stream(&route, -1.0);
    tracing::info!(route, backend = t.stream.member, end = ?end, "fan-out stream ended");
}

/// When a fan-out client's timer fires next: its deadlines (the session's [`Clock`]: token
/// expiry, `max_lifetime`, `idle_timeout`) or its ping's, or far ahead when none is set.
fn next_due(clock: &Clock, ping: &Ping, pings: &Pings) -> Instant {
    or_far([clock.next(), ping.next(pings)].into_iter().flatten().min())
}

/// What a client's task needs.
pub(crate) struct ClientTask {
    pub(crate) stream: Arc<Stream>,
    pub(crate) id: u64,
    pub(crate) rx: tokio::sync::mpsc::Receiver<Bytes>,
    pub(crate) lagged: Arc<Lag>,
    pub(crate) settings: Arc<FanoutSettings>,
    pub(crate) control: Arc<SessionControl>,
    /// The client's session record (removed from the registry when the client ends).
    pub(crate) registered: crate::session::SessionGuard,
    pub(crate) expires_at: Option<Instant>,
    /// The route's `[session]`: the frame size limit and the client's timeouts.
    pub(crate) session: Arc<SessionSettings>,
    /// `[server] drain_spread`: a drained client closes within it, at a random point.
    pub(crate) drain_spread: Duration,
    pub(crate) metrics: Arc<Metrics>,
}

impl Drop for ClientTask {
    /// Leaves the stream, also when the client never started (its upgrade failed).
    fn drop(&mut self) {
        let _ = self.stream.commands.send(Command::Leave(self.id));
    }
}

/// How a fan-out client ends: why (the close table's [`Cause`]), and whether its close frame
/// can be written (not when its connection failed, nor after a frame cut short).
type ClientEnd = (Cause, bool);

/// A client the stream dropped for falling behind: 1013, with its close frame.
const SLOW: ClientEnd = (Cause::Lagged(Kind::FanoutClient), true);

/// The end a write to a client means, if it ends the client.
fn ends_client(w: Written) -> Option<ClientEnd> {
    match w {
        Written::Done => None,
        Written::Failed => Some((Cause::Lost(Side::Client), false)),
        Written::Dropped => Some(SLOW),
        // Cut in the middle of a frame: no close frame can follow.
        Written::Cut => Some((SLOW.0, false)),
    }
}

/// Serves one fan-out client until it leaves, falls behind, or its own deadline ends it; its
/// end is recorded as every session's is (`record_end`).
pub(crate) async fn run_client<S>(io: S, early: Vec<u8>, mut t: ClientTask)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let route = t.stream.route.clone();
    let started = std::time::Instant::now();
    t.metrics.sessions_active.increment(1.0);
    t.metrics.fanout_subscriber(&route, 1.0);
    let (mut rd, mut wr) = tokio::io::split(io);
    // A client that may only read sends control frames only: a frame claiming more than one is
    // refused from its header, unread (as an observer's is).
    let client_limits = match t.settings.forward_client_data {
        true => limits(&t.session),
        false => FrameLimits { max_frame_size: 125, max_message_size: 125, allowed_rsv: 0 },
    };
    let mut reader = Reader::new(Side::Client, client_limits, &early, 256);
    let mut clock = Clock::new(&t.session, t.expires_at);
    let (pings, mut ping) = (Pings::of(&t.session), Ping::new());
    let timer = tokio::time::sleep_until(next_due(&clock, &ping, &pings));
    tokio::pin!(timer);
    let control = t.control.clone();
    let stopped = control.wait_spread(t.drain_spread);
    tokio::pin!(stopped);
    // What the client sends (pings, and data on a forwarding route) is held to the route's
    // client rate, as a relayed session's is: read nothing more before `paused` ("slow").
    let mut rate = Metered::client(&t.session);
    let mut moved = Moved::default();
    // The timer is set again only when it fires or a pong comes: data only moves the idle
    // deadline later, and a timer that fires early finds nothing due and is set again.
    let (cause, write_close): ClientEnd = loop {
        // Dropped while not waiting on its socket (it had frames queued, or was forwarding):
        // the frames still queued are not sent. An atomic load, not the Lag's notify: a client
        // waiting in `recv` has an empty queue, so it cannot be dropped meanwhile.
        if t.lagged.is_raised() {
            break SLOW;
        }
        tokio::select! {
            b = t.rx.recv() => match b {
                Some(bytes) => {
                    let w = write_unless_dropped(write_flushed(&mut wr, &bytes), &t.lagged, t.settings.drop_grace).await;
                    if let Some(end) = ends_client(w) {
                        break end;
                    }
                    // One of the backend's frames, whole.
                    moved.add(&t.control, &t.metrics, Side::Backend, bytes.len(), true);
                    clock.data(Instant::now());
                }
                None if t.lagged.is_raised() => break SLOW,
                None => match t.stream.ended() {
                    Some(End::BackendClosed(code)) => break (Cause::PeerClose { from: Side::Backend, code }, true),
                    _ => break (Cause::SourceEnded(Kind::FanoutClient), true),
                },
            },
            () = rate.resumed(), if !rate.reading() => {}
            f = reader.next(&mut rd), if rate.reading() => {
                let f = match f {
                    Ok(Some(f)) => f,
                    Ok(None) | Err(ReadError::Io(_)) => break (Cause::Lost(Side::Client), false),
                    Err(ReadError::Violation(violation)) => break (Cause::Violation { by: Side::Client, violation }, true),
                };
                moved.add(&t.control, &t.metrics, Side::Client, f.bytes.len(), !frame::is_control(f.opcode));
                if rate.frame(f.bytes.len(), &t.metrics).is_err() {
                    break (Cause::RateLimit(Side::Client), true);
                }
                match f.opcode {
                    opcode::PING => {
                        let mut pong = Vec::new();
                        frame::encode(true, 0, opcode::PONG, None, &f.payload(), &mut pong);
                        let w = write_unless_dropped(write_flushed(&mut wr, &pong), &t.lagged, t.settings.drop_grace).await;
                        if let Some(end) = ends_client(w) {
                            break end;
                        }
                    }
                    opcode::PONG => {
                        ping.answered();
                        ping.heard(Instant::now());
                        timer.as_mut().reset(next_due(&clock, &ping, &pings));
                    }
                    opcode::CLOSE => {
                        let p = f.payload();
                        if let Err(violation) = check_peer_close(&p) {
                            break (Cause::Violation { by: Side::Client, violation }, true);
                        }
                        let code = p.first_chunk::<2>().map(|c| u16::from_be_bytes(*c));
                        break (Cause::PeerClose { from: Side::Client, code }, true);
                    }
                    // Only whole messages are forwarded: another client's frames may come next.
                    op if t.settings.forward_client_data && (!f.fin || op == opcode::CONTINUATION) => {
                        break (Cause::Refused(Refusal::Fragmented), true);
                    }
                    _ if t.settings.forward_client_data => {
                        clock.data(Instant::now());
                        // A backend that stops reading fills the stream's queue: this client
                        // then waits for room, and its own ends (revocation, drain, its token's
                        // expiry, its lifetime, being dropped) still end it meanwhile.
                        let room = async {
                            loop {
                                let wake = or_far(clock.next());
                                tokio::select! {
                                    permit = t.stream.data.reserve() => {
                                        return permit.map_err(|_| (Cause::SourceEnded(Kind::FanoutClient), true));
                                    }
                                    r = &mut stopped => return Err((Cause::from(r), true)),
                                    () = t.lagged.raised() => return Err(SLOW),
                                    () = tokio::time::sleep_until(wake) => {
                                        if let Some(due) = clock.due(Instant::now()) {
                                            return Err((Cause::from(due), true));
                                        }
                                    }
                                }
                            }
                        };
                        match room.await {
                            Ok(permit) => permit.send(f.bytes),
                            Err(end) => break end,
                        }
                    }
                    _ => {
                        t.metrics.fanout_drop(&route, "input");
                        break (Cause::Refused(Refusal::ReadOnly), true);
                    }
                }
            }
            r = &mut stopped => break (Cause::from(r), true),
            () = &mut timer => {
                let now = Instant::now();
                if let Some(due) = clock.due(now) {
                    break (Cause::from(due), true);
                }
                match ping.due(now, &pings) {
                    None => timer.as_mut().reset(next_due(&clock, &ping, &pings)),
                    Some(PingDue::Send) => {
                        timer.as_mut().reset(next_due(&clock, &ping, &pings));
                        let mut frame = Vec::new();
                        frame::encode(true, 0, opcode::PING, None, b"portcullis", &mut frame);
                        let w = write_unless_dropped(write_flushed(&mut wr, &frame), &t.lagged, t.settings.drop_grace).await;
                        if let Some(end) = ends_client(w) {
                            break end;
                        }
                    }
                    Some(PingDue::TimedOut) => {
                        t.metrics.ping_timeout();
                        break (Cause::PingTimeout, true);
                    }
                }
            }
        }
    };
    let close = match cause {
        // A client's close is answered; the backend's close reaches the client with its code.
        Cause::PeerClose { from: Side::Client, .. } => Some(close_frame(REPLY_TO_CLOSE, false)),
        // A close without a code is passed on as a normal closure, as before.
        Cause::PeerClose { from: Side::Backend, code } => Some(match code {
            Some(code) => frame::close_frame(code, "", None),
            None => close_frame(REPLY_TO_CLOSE, false),
        }),
        _ => cause.plan().to_client.map(|f| close_frame(f, false)),
    };
    t.metrics.fanout_subscriber(&route, -1.0);
    crate::session::close::record_end(&t.metrics, t.registered.entry(), started, &moved.end(cause));
    // Leaves the stream before the connection ends: a lingering client holds nothing of it.
    drop(t);
    if write_close {
        close_subscriber(&mut rd, &mut wr, close.as_deref(), cause).await;
    }
}
