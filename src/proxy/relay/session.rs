//! The session: both directions, the per-side close handshake state, the deadlines on one
//! lazily re-armed timer, and the handlers that pick a [`Cause`] from the close table.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::pump::{DirEvent, Direction, Injected, Limit, PingProgress, Tap};
use super::{FinishStream, RelayParams};
use crate::codec::{opcode, FrameLimits};
use crate::config::SessionSettings;
use crate::metrics::Metrics;
use crate::session::clock::{Clock, Ping, PingDue, Pings};
use crate::session::close::{check_peer_close, Cause, CloseFrame, REPLY_FOR_VANISHED_PEER};
use crate::session::{poll_end, Ending, Initiator, SessionControl, SessionEnd, Side, StopReason};

/// What has come from one side, as far as the close handshake is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Inbound {
    /// Frames may still arrive.
    #[default]
    Open,
    /// It sent its close frame, or is no longer waited for (its reply will not come).
    Closed,
    /// Its connection is gone.
    Gone,
}

/// What has gone to one side, as far as the close handshake is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Outbound {
    /// No close frame sent yet.
    #[default]
    Open,
    /// The other side's close frame was forwarded to it: its reply is forwarded back.
    PeerClose,
    /// The proxy's own close frame was queued to it: its reply, and anything else it sends, is
    /// consumed, not forwarded.
    ProxyClose,
}

/// Per-side state: liveness and the close handshake.
#[derive(Default)]
struct Peer {
    /// The proxy's pings to this side (the session clock's: heard from when any byte arrives).
    ping: Ping,
    /// The payload of the outstanding ping, to tell its pong from the peer's own.
    ping_payload: [u8; 8],
    inbound: Inbound,
    outbound: Outbound,
    /// Its stream ends with a lingering close: the session stopped reading it before it had
    /// finished sending ([`Cause::lingers_on`], or bytes after its close frame).
    lingering: bool,
    /// While finishing: how far its stream's end has gone.
    ending: Ending,
}

impl Peer {
    fn gone(&self) -> bool {
        self.inbound == Inbound::Gone
    }

    /// Nothing more is awaited from this side.
    fn closed_in(&self) -> bool {
        self.inbound != Inbound::Open
    }

    /// A close frame was sent (or queued) to this side.
    fn closed_out(&self) -> bool {
        self.outbound != Outbound::Open
    }

    /// Stop waiting for this side (it closed, or will not reply); a gone side stays gone.
    fn stop_waiting(&mut self) {
        if self.inbound == Inbound::Open {
            self.inbound = Inbound::Closed;
        }
    }
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Relaying.
    Open,
    /// Relaying for a client that went away: the client stream holds the session for a new one
    /// ([`FinishStream::hold`]) until `until`.
    Held { until: Instant },
    /// Ending: data is discarded while the close handshake finishes, by `deadline`.
    Closing { deadline: Instant },
    /// Ended: both streams are being finished (a TLS `close_notify`; a lingering close for a
    /// side that broke the protocol, see [`crate::session::poll_end`]), for up to
    /// `close_timeout`.
    Finishing,
}

pub(super) struct Session<C, B> {
    client: C,
    backend: B,
    /// Client to backend, and backend to client.
    c2b: Direction,
    b2c: Direction,
    peers: [Peer; 2],
    /// The route's settings, shared by its sessions (a pointer here, not a copy per session).
    settings: Arc<SessionSettings>,
    drain_spread: Duration,
    control: Arc<SessionControl>,
    metrics: Arc<Metrics>,
    stop_seen: bool,
    timer: Pin<Box<Sleep>>,
    started: Instant,
    /// The session's deadlines (token expiry, drain, lifetime, idle): the one clock every
    /// session kind keeps. Pings are per peer ([`Peer`]), their payloads matched to pongs.
    clock: Clock,
    phase: Phase,
    /// Why the session is ending, once it is.
    outcome: Option<Cause>,
    /// The close owed to a side that broke the protocol, sent once the other side is done.
    deferred_close: Option<(Side, CloseFrame)>,
    bytes_reported: [u64; 2],
}

impl<C, B> Session<C, B>
where
    C: FinishStream,
    B: FinishStream,
{
    pub(super) fn new(client: C, client_early: &[u8], backend: B, backend_early: &[u8], p: RelayParams) -> Self {
        let s = &*p.settings;
        let limits = FrameLimits {
            max_frame_size: s.max_frame_size,
            max_message_size: s.max_message_size,
            allowed_rsv: p.allowed_rsv,
        };
        let now = Instant::now();
        let (mut c2b, mut b2c) = (
            Direction::new(Side::Client, limits, s.buffer_size, client_early),
            Direction::new(Side::Backend, limits, s.buffer_size, backend_early),
        );
        if let Some(tap) = Tap::new(p.taps.output) {
            b2c.tap(tap);
        }
        if let Some(tap) = Tap::new(p.taps.input) {
            c2b.tap(tap);
        }
        let mut session = Session {
            client,
            backend,
            c2b,
            b2c,
            peers: [Peer::default(), Peer::default()],
            settings: p.settings.clone(),
            drain_spread: p.drain_spread,
            control: p.control,
            metrics: p.metrics,
            stop_seen: false,
            timer: Box::pin(tokio::time::sleep_until(now)),
            started: now,
            clock: Clock::new(&p.settings, p.expires_at),
            phase: Phase::Open,
            outcome: None,
            deferred_close: None,
            bytes_reported: [0, 0],
        };
        session.rearm();
        session
    }

    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<SessionEnd> {
        if !self.stop_seen {
            if let Poll::Ready(reason) = self.control.poll_stopped(cx) {
                self.stop_seen = true;
                self.on_stop(reason);
            }
        }
        while self.client.poll_claim(cx).is_ready() {
            self.on_claim();
        }
        loop {
            if self.timer.as_mut().poll(cx).is_ready() {
                self.on_timer();
                if self.finished() {
                    return Poll::Ready(self.end());
                }
                self.rearm();
                continue;
            }
            let mut progressed = false;
            let (c_limit, b_limit) = (self.limit(Side::Client), self.limit(Side::Backend));
            let gone = self.peers[Side::Backend.idx()].gone();
            if let Poll::Ready(ev) = self.c2b.poll(cx, &mut self.client, &mut self.backend, gone, c_limit.as_ref()) {
                self.on_event(Side::Client, ev);
                progressed = true;
            }
            let gone = self.peers[Side::Client.idx()].gone();
            if let Poll::Ready(ev) = self.b2c.poll(cx, &mut self.backend, &mut self.client, gone, b_limit.as_ref()) {
                self.on_event(Side::Backend, ev);
                progressed = true;
            }
            self.note_activity();
            if self.finished() {
                return Poll::Ready(self.end());
            }
            if !progressed {
                return Poll::Pending;
            }
        }
    }

    /// After [`Session::poll`] returned the end: finishes both streams (a TLS `close_notify`),
    /// lingering on a side that broke the protocol, giving up on either that has not finished
    /// within `close_timeout`.
    pub(super) fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.phase != Phase::Finishing {
            self.phase = Phase::Finishing;
            self.timer.as_mut().reset(Instant::now() + self.settings.close_timeout);
        }
        let [client, backend] = &mut self.peers;
        let done = poll_end(&mut self.client, &mut client.ending, client.lingering, cx).is_ready()
            & poll_end(&mut self.backend, &mut backend.ending, backend.lingering, cx).is_ready();
        if done || self.timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// The session rate `from` is held to, if it has one. Not once the session is closing:
    /// what comes then is discarded, and the close replies should not wait behind it.
    fn limit(&self, from: Side) -> Option<Limit> {
        let s = &self.settings;
        if self.closing() {
            return None;
        }
        let rate = match from {
            Side::Client => s.client_rate,
            Side::Backend => s.backend_rate,
        };
        Limit::of(s, rate, self.started)
    }

    fn dir(&mut self, from: Side) -> &mut Direction {
        match from {
            Side::Client => &mut self.c2b,
            Side::Backend => &mut self.b2c,
        }
    }

    /// Records liveness and data activity, and feeds the byte and frame counters.
    fn note_activity(&mut self) {
        for side in [Side::Client, Side::Backend] {
            let pauses = std::mem::take(&mut self.dir(side).pauses);
            if pauses > 0 {
                self.metrics.rate_paused(crate::session::direction(side), pauses as u64);
            }
        }
        let now_needed = self.c2b.bytes != self.bytes_reported[0] || self.b2c.bytes != self.bytes_reported[1];
        if !now_needed {
            return;
        }
        let now = Instant::now();
        for (i, side) in [Side::Client, Side::Backend].into_iter().enumerate() {
            let d = self.dir(side);
            let bytes = d.bytes;
            let data = d.tracker.take_data_frames();
            let mid_data = !d.tracker.at_boundary() && !d.tracker.holding();
            d.frames += data;
            if bytes != self.bytes_reported[i] {
                self.control.moved(&self.metrics, side, bytes - self.bytes_reported[i], data);
                self.bytes_reported[i] = bytes;
                self.peers[i].ping.heard(now);
            }
            if data > 0 || mid_data {
                self.clock.data(now);
            }
        }
    }

    fn on_event(&mut self, from: Side, ev: DirEvent) {
        match ev {
            DirEvent::Control(op) => {
                self.on_control(from, op);
                self.dir(from).tracker.release_control();
            }
            DirEvent::Violation(violation) => {
                self.metrics.violation(violation.label());
                tracing::debug!(side = ?from, %violation, "protocol violation");
                // Fail the connection of the offender: close frame, no reply awaited.
                self.peers[from.idx()].stop_waiting();
                self.end_with(Cause::Violation { by: from, violation });
            }
            DirEvent::SrcGone => self.on_gone(from),
            DirEvent::DstGone => self.on_gone(from.other()),
            DirEvent::SinkBehind => {
                tracing::warn!(side = ?from, "session closed: its recording fell behind or failed");
                self.end_with(Cause::RecordingGap);
            }
            DirEvent::OverRate => {
                crate::metrics::limit_refused("session_rate");
                tracing::info!(side = ?from, "session closed: over its session rate");
                self.end_with(Cause::RateLimit(from));
            }
        }
    }

    fn on_control(&mut self, from: Side, op: u8) {
        let closing_by_proxy = self.peers[from.idx()].outbound == Outbound::ProxyClose;
        match op {
            opcode::CLOSE => {
                let payload = self.dir(from).tracker.control_payload();
                let (code, checked) = (close_code(payload), check_peer_close(payload));
                self.peers[from.idx()].stop_waiting();
                if closing_by_proxy {
                    self.dir(from).drop_last_control();
                    // The close the proxy was waiting for before closing the other side.
                    self.release_deferred();
                } else if let Err(violation) = checked {
                    // A close frame that is not valid on the wire is its sender's protocol
                    // error: it is not forwarded.
                    self.dir(from).drop_last_control();
                    self.metrics.violation(violation.label());
                    tracing::debug!(side = ?from, %violation, "protocol violation");
                    self.end_with(Cause::Violation { by: from, violation });
                } else {
                    // Forwarded as is; the other side's reply is forwarded back.
                    let to = &mut self.peers[from.other().idx()].outbound;
                    if *to == Outbound::Open {
                        *to = Outbound::PeerClose;
                    }
                    self.outcome.get_or_insert(Cause::PeerClose { from, code });
                    self.start_closing();
                }
                if self.dir(from).read_past_scan() {
                    // It sent more after its close frame: unread, it would reset the
                    // connection as its stream ends.
                    self.peers[from.idx()].lingering = true;
                }
                self.dir(from).stop_src();
            }
            opcode::PONG => {
                let (awaiting, payload) = (self.peers[from.idx()].ping.awaiting(), self.peers[from.idx()].ping_payload);
                let ours = awaiting && self.dir(from).tracker.control_payload() == payload;
                if ours {
                    self.peers[from.idx()].ping.answered();
                }
                if ours || closing_by_proxy {
                    self.dir(from).drop_last_control();
                }
            }
            _ => {
                if closing_by_proxy {
                    self.dir(from).drop_last_control();
                }
            }
        }
    }

    /// A side's connection ended without (or after) a close frame.
    fn on_gone(&mut self, side: Side) {
        if self.peers[side.idx()].gone() {
            return;
        }
        if side == Side::Client && self.parked() {
            // Writing to a parked client only fails when its buffer is full.
            return self.expire_parked(true);
        }
        if side == Side::Client && self.try_park() {
            return;
        }
        self.peers[side.idx()].inbound = Inbound::Gone;
        self.dir(side).stop_src();
        let other = &mut self.peers[side.other().idx()];
        if !other.closed_out() && !other.gone() {
            if other.closed_in() {
                // The other side started a close and this one vanished instead of replying.
                other.outbound = Outbound::ProxyClose;
                self.dir(side).queue(Injected::close(REPLY_FOR_VANISHED_PEER, side.other()));
            } else {
                self.end_with(Cause::Lost(side));
            }
        }
        self.start_closing();
        self.release_deferred();
    }

    /// The stop signal fired: drain (spread over `drain_spread`) or a revocation.
    fn on_stop(&mut self, reason: StopReason) {
        match reason {
            StopReason::Drain => {
                self.clock.drain(self.drain_spread);
                self.rearm();
            }
            StopReason::Revoked => self.end_with(Cause::Revoked),
            StopReason::RouteRemoved => self.end_with(Cause::RouteRemoved),
            StopReason::Rebalance => self.end_with(Cause::Rebalance),
        }
    }

    /// Ends the session for `cause`: the close table's frame to each side still there (a
    /// proxy-initiated close: data from both sides is then discarded while their close replies
    /// are awaited, up to `close_timeout`).
    ///
    /// After a violation the offender's own close waits ([`Session::release_deferred`]) until
    /// the other side has answered the proxy's close or gone: what the other side had already
    /// sent towards the offender is delivered first, not lost with the session.
    fn end_with(&mut self, cause: Cause) {
        let plan = cause.plan();
        if self.outcome.is_none() || plan.initiator == Initiator::Proxy && !self.closing() {
            self.outcome = Some(cause);
        }
        let offender = match cause {
            Cause::Violation { by, .. } => Some(by),
            _ => None,
        };
        if let Some(side) = cause.lingers_on() {
            // What it still sends is read and discarded as its stream ends.
            self.peers[side.idx()].lingering = true;
        }
        for side in [Side::Client, Side::Backend] {
            let p = &mut self.peers[side.idx()];
            if let Some(f) = plan.to(side).filter(|_| !p.gone() && !p.closed_out()) {
                p.outbound = Outbound::ProxyClose;
                if offender == Some(side) {
                    self.deferred_close = Some((side, f));
                } else {
                    self.dir(side.other()).queue(Injected::close(f, side));
                }
            }
        }
        self.start_closing();
        self.release_deferred();
    }

    /// Sends the offender its deferred close once the other side is done sending: it answered
    /// the proxy's close, or went away.
    fn release_deferred(&mut self) {
        let Some((offender, frame)) = self.deferred_close else { return };
        if self.peers[offender.other().idx()].closed_in() {
            self.deferred_close = None;
            if !self.peers[offender.idx()].gone() {
                self.dir(offender.other()).queue(Injected::close(frame, offender));
            }
        }
    }

    fn start_closing(&mut self) {
        if self.parked() {
            // Ending while its client is away: nothing more will reach that client.
            self.drop_parked("closed");
        }
        if !self.closing() {
            self.phase = Phase::Closing { deadline: Instant::now() + self.settings.close_timeout };
            self.rearm();
        }
    }

    /// True once the session is ending (its close handshake under way).
    fn closing(&self) -> bool {
        matches!(self.phase, Phase::Closing { .. } | Phase::Finishing)
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        let settings = self.settings.clone();
        if let Phase::Closing { deadline } = self.phase {
            if now < deadline {
                return;
            }
            if let Some((offender, frame)) = self.deferred_close.take() {
                // The other side never answered: stop waiting for it, and still tell the
                // offender why it is being closed (one more close_timeout for that write).
                let other = offender.other();
                self.peers[other.idx()].inbound = Inbound::Gone;
                self.dir(other).stop_src();
                if !self.peers[offender.idx()].gone() {
                    self.dir(other).queue(Injected::close(frame, offender));
                    self.phase = Phase::Closing { deadline: now + self.settings.close_timeout };
                    return;
                }
            }
            self.peers[0].inbound = Inbound::Gone;
            self.peers[1].inbound = Inbound::Gone;
            return;
        }
        let s = &*settings;
        if let Phase::Held { until } = self.phase {
            if now >= until {
                return self.expire_parked(false);
            }
        }
        if let Some(due) = self.clock.due(now) {
            return self.end_with(Cause::from(due));
        }
        let pings = Pings::of(s);
        for side in [Side::Client, Side::Backend] {
            if side == Side::Client && self.parked() {
                continue;
            }
            // A ping's answer is awaited from when it went out: it goes only between frames,
            // so it may wait behind a large frame that trickles in, which is no fault of a peer
            // that reads it on (the wait runs from its last read); a peer that stopped reading
            // is timed out as if the ping had gone.
            if self.peers[side.idx()].ping.awaiting() {
                match self.dir(side.other()).ping_progress() {
                    Some(PingProgress::Waiting(Some(at)) | PingProgress::Written(at)) => {
                        self.peers[side.idx()].ping.sent_at(at)
                    }
                    Some(PingProgress::Waiting(None)) | None => {}
                }
            }
            match self.peers[side.idx()].ping.due(now, &pings) {
                None => {}
                Some(PingDue::TimedOut) if side == Side::Client && self.try_park() => {
                    // A client that stopped answering is treated as one whose connection
                    // dropped: the session is held for it.
                    self.metrics.ping_timeout();
                }
                Some(PingDue::TimedOut) => {
                    // Unreachable: no reply will come, so none is awaited.
                    self.peers[side.idx()].stop_waiting();
                    self.metrics.ping_timeout();
                    return self.end_with(Cause::PingTimeout);
                }
                Some(PingDue::Send) => {
                    let payload: [u8; 8] = rand::random();
                    self.peers[side.idx()].ping_payload = payload;
                    self.dir(side.other()).queue(Injected::new(opcode::PING, &payload, side));
                }
            }
        }
    }

    /// Sets the timer to the earliest deadline.
    fn rearm(&mut self) {
        let settings = self.settings.clone();
        let s = &*settings;
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Phase::Closing { deadline } = self.phase {
            consider(deadline);
        } else {
            if let Some(d) = self.clock.next() {
                consider(d);
            }
            if let Phase::Held { until } = self.phase {
                consider(until);
            }
            let pings = Pings::of(s);
            let parked = self.parked();
            for side in [Side::Client, Side::Backend] {
                // A held session's client is not pinged (`on_timer` skips it): its ping, come
                // due, would wake the timer at once and again, a core spun until the window ends.
                if side == Side::Client && parked {
                    continue;
                }
                if let Some(t) = self.peers[side.idx()].ping.next(&pings) {
                    consider(t);
                }
            }
        }
        self.timer.as_mut().reset(crate::session::clock::or_far(next));
    }

    /// True while the session is held for a client that went away.
    fn parked(&self) -> bool {
        matches!(self.phase, Phase::Held { .. })
    }

    /// Holds the session for a client that vanished without a close, when its stream can be
    /// held (a resumable route's): the stream drops the connection and buffers the backend's
    /// output, and a new client may claim the session within the window. Not when the session
    /// is closing, when the client had sent a close, or when it vanished in the middle of a
    /// message (the backend would get a broken one).
    fn try_park(&mut self) -> bool {
        let client = &self.peers[Side::Client.idx()];
        if self.phase != Phase::Open
            || client.inbound != Inbound::Open
            || client.outbound != Outbound::Open
            || !self.c2b.at_message_boundary()
        {
            return false;
        }
        let Some(window) = self.client.hold() else { return false };
        self.phase = Phase::Held { until: Instant::now() + window };
        self.peers[Side::Client.idx()] = Peer::default();
        self.rearm();
        true
    }

    /// A new client claimed this session: it takes a held session's place (a session attached
    /// again meanwhile is held first, when it can be).
    fn on_claim(&mut self) {
        if self.closing() || (!self.parked() && !self.try_park()) {
            // Ending, or the current client is in the middle of a message: the new client's
            // stream is dropped (it reconnects and gets a fresh session once this one is gone).
            return self.client.refuse_claim();
        }
        let expires_at = self.client.take_claim();
        // The output held meanwhile goes out now, not with the backend's next frame.
        self.b2c.flush_soon();
        self.phase = Phase::Open;
        self.peers[Side::Client.idx()] = Peer::default();
        self.clock.renew(expires_at);
        self.rearm();
    }

    /// The client did not come back in time (`overflow`: the buffer filled first): the
    /// backend gets 1001, and the resume id is free for a fresh session.
    fn expire_parked(&mut self, overflow: bool) {
        self.drop_parked(if overflow { "overflow" } else { "window" });
        tracing::info!(overflow, "held session ended: its client did not come back");
        self.end_with(Cause::ResumeExpired { overflow });
    }

    /// Gives up on a held client: it is gone, and the stream lets its hold go.
    fn drop_parked(&mut self, why: &'static str) {
        if !self.parked() {
            return;
        }
        self.phase = Phase::Open;
        self.client.let_go(why);
        let p = &mut self.peers[Side::Client.idx()];
        p.inbound = Inbound::Gone;
        p.outbound = Outbound::ProxyClose;
        self.c2b.stop_src();
    }

    /// True when both sides are closed and everything owed to them is delivered.
    fn finished(&self) -> bool {
        let side_done = |side: Side, into: &Direction| {
            let p = &self.peers[side.idx()];
            let owed = self.deferred_close.is_some_and(|(offender, _)| offender == side);
            p.gone() || (p.closed_in() && p.closed_out() && !owed && into.drained())
        };
        self.closing() && side_done(Side::Client, &self.b2c) && side_done(Side::Backend, &self.c2b)
    }

    fn end(&mut self) -> SessionEnd {
        self.note_activity();
        if self.parked() {
            self.drop_parked("closed");
        }
        let (close_code, initiator, reason) = match self.outcome {
            Some(cause) => {
                let plan = cause.plan();
                (plan.client_code(cause), plan.initiator, cause.label())
            }
            None => (None, Initiator::Proxy, "closed"),
        };
        SessionEnd {
            close_code,
            initiator,
            reason,
            bytes: [self.c2b.bytes, self.b2c.bytes],
            frames: [self.c2b.frames, self.b2c.frames],
        }
    }
}

/// The close code in a close frame's payload, if it has one.
fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}
