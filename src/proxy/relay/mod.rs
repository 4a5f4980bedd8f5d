//! Stage: relay. Splices WebSocket bytes between client and backend until the session closes.
//!
//! Bytes are copied from one socket's read buffer to the other socket as they arrive; payloads
//! are never unmasked, re-masked or re-encoded (client frames reach the backend still masked
//! with the client's key; RSV bits pass through, so permessage-deflate negotiated end to end
//! works). A [`frame::Tracker`] per direction knows where frames start, enforces the protocol
//! rules and size limits, and holds back incomplete headers and control frames so that:
//!
//! - the proxy can insert its own frames (pings, close frames) between frames;
//! - a pong answering the proxy's own ping is consumed, not forwarded;
//! - a violation is caught before any byte of the offending frame is forwarded, so the other
//!   side is always at a frame boundary and gets a clean close frame.
//!
//! One buffer per direction, bounded by `buffer_size`, is read into only when the previous
//! bytes have been written and flushed: backpressure reaches the sender through TCP. Buffers
//! come from [`pool`] and are returned whenever a direction goes quiet.
//!
//! Deadlines (pings, idle, lifetime, close, drain) share one timer per session, re-armed lazily:
//! activity only moves deadlines later, so it is recorded with a timestamp and checked when the
//! timer fires; no per-connection polling loop runs.

pub mod close;
pub mod frame;
pub mod pool;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::config::SessionSettings;
use crate::metrics::Metrics;
pub use crate::session::{Initiator, SessionEnd, Side};
use crate::session::{SessionBytes, SessionControl, StopReason};
use close::{Cause, CloseFrame, REPLY_FOR_VANISHED_PEER};
use frame::{opcode, Event, FrameLimits, Tracker, Violation};

/// What a relay needs besides the two streams.
pub struct RelayParams {
    /// Deadlines and limits of the route.
    pub settings: SessionSettings,
    /// Window over which drain close notices are spread.
    pub drain_spread: Duration,
    /// RSV bits the negotiated extensions allow (`0x70` mask bits).
    pub allowed_rsv: u8,
    /// Stop signal and reason (drain, revocation).
    pub control: Arc<SessionControl>,
    /// Process metrics.
    pub metrics: Arc<Metrics>,
    /// When the client's token expires: the session is closed then (1008 to the client).
    pub expires_at: Option<Instant>,
    /// Live byte counters, shown by `/sessions`.
    pub bytes: Arc<SessionBytes>,
}

/// Runs a session to its end, then shuts both streams down (bounded by `close_timeout`).
///
/// `client_early` and `backend_early` are bytes already read from each side during the
/// handshakes; they are relayed first.
pub async fn relay<C, B>(
    mut client: C,
    client_early: Vec<u8>,
    mut backend: B,
    backend_early: Vec<u8>,
    params: RelayParams,
) -> SessionEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let close_timeout = params.settings.close_timeout;
    let end = {
        // The early bytes are copied into relay buffers here and not held afterwards.
        let mut session = Session::new(&mut client, &client_early, &mut backend, &backend_early, params);
        drop((client_early, backend_early));
        std::future::poll_fn(|cx| session.poll(cx)).await
    };
    let _ = tokio::time::timeout(close_timeout, async {
        let _ = tokio::join!(client.shutdown(), backend.shutdown());
    })
    .await;
    end
}

/// A frame the proxy writes itself (ping or close), at most 2 + 4 + 125 bytes.
struct Injected {
    bytes: [u8; 131],
    len: u8,
    pos: u8,
    is_close: bool,
}

impl Injected {
    /// Encodes a control frame; masked with a random key when sent to the backend.
    fn new(op: u8, payload: &[u8], to: Side) -> Injected {
        let payload = &payload[..payload.len().min(125)];
        let mask = (to == Side::Backend).then(rand::random::<[u8; 4]>);
        let len = frame::encoded_len(payload.len(), mask.is_some());
        let mut bytes = [0u8; 131];
        frame::encode_into(&mut bytes[..len], true, 0, op, mask, payload);
        Injected { bytes, len: len as u8, pos: 0, is_close: op == opcode::CLOSE }
    }

    fn close(f: CloseFrame, to: Side) -> Injected {
        let mut p = [0u8; 125];
        p[..2].copy_from_slice(&f.code.to_be_bytes());
        let r = &f.reason.as_bytes()[..f.reason.len().min(123)];
        p[2..2 + r.len()].copy_from_slice(r);
        Injected::new(opcode::CLOSE, &p[..2 + r.len()], to)
    }
}

/// Bytes flowing from one side (`src`) to the other (`dst`).
struct Direction {
    /// Relay buffer; `None` while the direction is quiet.
    buf: Option<Box<[u8]>>,
    buf_size: usize,
    /// `buf[start..safe]` may be written; `buf[safe..end]` is held back (incomplete header or
    /// control frame); `buf[scanned..end]` has not been seen by the tracker yet.
    start: usize,
    safe: usize,
    scanned: usize,
    end: usize,
    tracker: Tracker,
    /// A proxy frame being written to `dst`, and a close frame queued behind it. Boxed: they
    /// are rarely present, and inline they would add half a KiB to every idle session.
    inject: Option<Box<Injected>>,
    queued_close: Option<Box<Injected>>,
    needs_flush: bool,
    /// No more reading from `src` (it sent a close frame, went away, or was abandoned).
    src_done: bool,
    /// The proxy's close frame has been written to `dst`: nothing may follow it.
    dst_closed: bool,
    bytes: u64,
    frames: u64,
}

/// What a direction needs the session to decide.
enum DirEvent {
    /// A complete control frame from `src` is held at the end of the forwardable bytes.
    Control(u8),
    /// `src` broke a rule.
    Violation(Violation),
    /// `src` closed its TCP connection or failed.
    SrcGone,
    /// Writing to `dst` failed.
    DstGone,
}

impl Direction {
    fn new(sender: Side, limits: FrameLimits, buf_size: usize, early: &[u8]) -> Direction {
        let mut d = Direction {
            buf: None,
            buf_size,
            start: 0,
            safe: 0,
            scanned: 0,
            end: 0,
            tracker: Tracker::new(sender, limits),
            inject: None,
            queued_close: None,
            needs_flush: false,
            src_done: false,
            dst_closed: false,
            bytes: 0,
            frames: 0,
        };
        if !early.is_empty() {
            let mut buf = pool::take(buf_size.max(early.len()));
            buf[..early.len()].copy_from_slice(early);
            d.end = early.len();
            d.bytes = early.len() as u64;
            d.buf = Some(buf);
        }
        d
    }

    /// Offset in `buf` where the frame being parsed began, if it began in this buffer fill.
    fn frame_start(&self) -> Option<usize> {
        let into = self.tracker.bytes_into_frame();
        (into <= self.scanned as u64).then(|| self.scanned - into as usize)
    }

    /// Drops the control frame that just completed (it is the last thing scanned).
    fn drop_last_control(&mut self) {
        let len = self.tracker.frame_len();
        let at = self.scanned - len;
        if let Some(buf) = self.buf.as_mut() {
            buf.copy_within(self.scanned..self.end, at);
        }
        self.end -= len;
        self.scanned = at;
        self.safe = at;
    }

    /// Stops reading from `src`; bytes read after the last scanned frame are dropped.
    fn stop_src(&mut self) {
        self.src_done = true;
        self.end = self.scanned;
    }

    /// Queues a proxy frame for `dst`. A close replaces a ping not yet started.
    fn queue(&mut self, frame: Injected) {
        let frame = Box::new(frame);
        match &self.inject {
            None => self.inject = Some(frame),
            Some(cur) if cur.pos == 0 && !cur.is_close && frame.is_close => self.inject = Some(frame),
            Some(_) if frame.is_close => self.queued_close = Some(frame),
            Some(_) => {} // a ping while another proxy frame is in flight: skip this one
        }
    }

    /// True when everything this direction owes `dst` has been written and flushed.
    fn drained(&self) -> bool {
        self.inject.is_none()
            && self.queued_close.is_none()
            && !self.needs_flush
            && (self.dst_closed || self.start >= self.safe)
    }

    fn release_if_empty(&mut self) {
        if self.end == 0 {
            if let Some(b) = self.buf.take() {
                pool::give(b);
            }
        }
    }

    /// Moves the direction forward as far as it can go; returns an event or `Pending`.
    fn poll<S, D>(&mut self, cx: &mut Context<'_>, src: &mut S, dst: &mut D, dst_gone: bool) -> Poll<DirEvent>
    where
        S: AsyncRead + Unpin,
        D: AsyncWrite + Unpin,
    {
        loop {
            if dst_gone {
                // Nothing can be delivered; keep draining src so its close or EOF is seen.
                self.inject = None;
                self.queued_close = None;
                self.needs_flush = false;
                self.dst_closed = true;
            }
            if self.dst_closed {
                self.start = self.start.max(self.safe);
            }
            // Write: proxy frame at a boundary, else forwardable bytes.
            if self.inject.is_none() {
                self.inject = self.queued_close.take();
            }
            let boundary = self.frame_start().filter(|&b| b >= self.start);
            if self.inject.is_some() && boundary.is_none() && self.src_done && self.start >= self.safe {
                // src stopped in the middle of a frame already partly written to dst: no frame
                // boundary will come, so no clean close frame can be sent.
                self.inject = None;
                self.queued_close = None;
                self.dst_closed = true;
            }
            let limit = match (&self.inject, boundary) {
                (Some(_), Some(b)) => b.min(self.safe),
                _ => self.safe,
            };
            if self.inject.is_some() && boundary.is_some() && self.start >= limit {
                let inj = self.inject.as_mut().expect("checked is_some above");
                let bytes = &inj.bytes[inj.pos as usize..inj.len as usize];
                match Pin::new(&mut *dst).poll_write(cx, bytes) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        inj.pos += n as u8;
                        self.needs_flush = true;
                        if inj.pos == inj.len {
                            self.dst_closed |= inj.is_close;
                            self.inject = None;
                        }
                        continue;
                    }
                    Poll::Ready(_) => return Poll::Ready(DirEvent::DstGone),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.start < limit {
                let buf = self.buf.as_ref().expect("bytes are pending, so a buffer is held");
                match Pin::new(&mut *dst).poll_write(cx, &buf[self.start..limit]) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        self.start += n;
                        self.needs_flush = true;
                        continue;
                    }
                    Poll::Ready(_) => return Poll::Ready(DirEvent::DstGone),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.needs_flush {
                match Pin::new(&mut *dst).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.needs_flush = false,
                    Poll::Ready(Err(_)) => return Poll::Ready(DirEvent::DstGone),
                    Poll::Pending => return Poll::Pending,
                }
            }
            // Scan: let the tracker see newly read bytes.
            if self.scanned < self.end {
                let buf = self.buf.as_ref().expect("unscanned bytes, so a buffer is held");
                let (n, ev) = self.tracker.feed(&buf[self.scanned..self.end]);
                self.scanned += n;
                self.safe =
                    if self.tracker.holding() { self.frame_start().unwrap_or(self.scanned) } else { self.scanned };
                match ev {
                    Some(Event::Control(op)) => {
                        self.frames += 1;
                        return Poll::Ready(DirEvent::Control(op));
                    }
                    Some(Event::Violation(v)) => {
                        // Nothing of the offending frame is forwarded.
                        self.safe = self.frame_start().unwrap_or(self.scanned).max(self.start);
                        self.scanned = self.safe;
                        self.end = self.safe;
                        self.src_done = true;
                        self.tracker.reset();
                        return Poll::Ready(DirEvent::Violation(v));
                    }
                    None => continue,
                }
            }
            // Read: only once every forwardable byte is out.
            if self.src_done {
                return Poll::Pending;
            }
            if self.start > 0 {
                // Keep only held-back bytes (an incomplete header or control frame).
                if let Some(buf) = self.buf.as_mut() {
                    buf.copy_within(self.start..self.end, 0);
                }
                self.end -= self.start;
                self.scanned -= self.start;
                self.safe -= self.start;
                self.start = 0;
            }
            let buf_size = self.buf_size;
            let buf = self.buf.get_or_insert_with(|| pool::take(buf_size));
            if self.end == buf.len() {
                // Only a held control frame or header can fill the buffer, and both are far
                // smaller than the minimum buffer size; treat it as a broken peer.
                return Poll::Ready(DirEvent::SrcGone);
            }
            let mut rb = ReadBuf::new(&mut buf[self.end..]);
            match Pin::new(&mut *src).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        self.release_if_empty();
                        return Poll::Ready(DirEvent::SrcGone);
                    }
                    self.end += n;
                    self.bytes += n as u64;
                }
                Poll::Ready(Err(_)) => {
                    self.release_if_empty();
                    return Poll::Ready(DirEvent::SrcGone);
                }
                Poll::Pending => {
                    self.release_if_empty();
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Drop for Direction {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            pool::give(b);
        }
    }
}

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
    /// Last time any byte arrived from this side.
    last_rx: Option<Instant>,
    /// Payload and send time of the proxy's outstanding ping to this side.
    ping: Option<([u8; 8], Instant)>,
    inbound: Inbound,
    outbound: Outbound,
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

struct Session<'a, C, B> {
    client: &'a mut C,
    backend: &'a mut B,
    /// Client to backend, and backend to client.
    c2b: Direction,
    b2c: Direction,
    peers: [Peer; 2],
    settings: SessionSettings,
    drain_spread: Duration,
    control: Arc<SessionControl>,
    metrics: Arc<Metrics>,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
    stop_seen: bool,
    timer: Pin<Box<Sleep>>,
    started: Instant,
    last_data: Instant,
    /// When the close handshake must be over.
    close_deadline: Option<Instant>,
    /// When a drain close notice is due.
    drain_at: Option<Instant>,
    /// When the client's token expires.
    expires_at: Option<Instant>,
    live_bytes: Arc<SessionBytes>,
    /// Why the session is ending, once it is.
    outcome: Option<Cause>,
    bytes_reported: [u64; 2],
}

impl<'a, C, B> Session<'a, C, B>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    fn new(client: &'a mut C, client_early: &[u8], backend: &'a mut B, backend_early: &[u8], p: RelayParams) -> Self {
        let s = p.settings;
        let limits = FrameLimits {
            max_frame_size: s.max_frame_size,
            max_message_size: s.max_message_size,
            allowed_rsv: p.allowed_rsv,
        };
        let now = Instant::now();
        let stop = Box::pin(p.control.token().cancelled_owned());
        let mut session = Session {
            client,
            backend,
            c2b: Direction::new(Side::Client, limits, s.buffer_size, client_early),
            b2c: Direction::new(Side::Backend, limits, s.buffer_size, backend_early),
            peers: [Peer::default(), Peer::default()],
            settings: s,
            drain_spread: p.drain_spread,
            control: p.control,
            metrics: p.metrics,
            stop,
            stop_seen: false,
            timer: Box::pin(tokio::time::sleep_until(now)),
            started: now,
            last_data: now,
            close_deadline: None,
            drain_at: None,
            expires_at: p.expires_at,
            live_bytes: p.bytes,
            outcome: None,
            bytes_reported: [0, 0],
        };
        session.peers[0].last_rx = Some(now);
        session.peers[1].last_rx = Some(now);
        session.rearm();
        session
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<SessionEnd> {
        if !self.stop_seen && self.stop.as_mut().poll(cx).is_ready() {
            self.stop_seen = true;
            self.on_stop();
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
            let gone = self.peers[Side::Backend.idx()].gone();
            if let Poll::Ready(ev) = self.c2b.poll(cx, &mut *self.client, &mut *self.backend, gone) {
                self.on_event(Side::Client, ev);
                progressed = true;
            }
            let gone = self.peers[Side::Client.idx()].gone();
            if let Poll::Ready(ev) = self.b2c.poll(cx, &mut *self.backend, &mut *self.client, gone) {
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

    fn dir(&mut self, from: Side) -> &mut Direction {
        match from {
            Side::Client => &mut self.c2b,
            Side::Backend => &mut self.b2c,
        }
    }

    /// Records liveness and data activity, and feeds the byte and frame counters.
    fn note_activity(&mut self) {
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
                let delta = bytes - self.bytes_reported[i];
                self.metrics.relay_bytes(side.direction(), delta, data);
                let counter = if i == 0 { &self.live_bytes.from_client } else { &self.live_bytes.from_backend };
                counter.fetch_add(delta, std::sync::atomic::Ordering::Relaxed);
                self.bytes_reported[i] = bytes;
                self.peers[i].last_rx = Some(now);
            }
            if data > 0 || mid_data {
                self.last_data = now;
            }
        }
    }

    fn on_event(&mut self, from: Side, ev: DirEvent) {
        match ev {
            DirEvent::Control(op) => self.on_control(from, op),
            DirEvent::Violation(violation) => {
                self.metrics.violation(violation.label());
                tracing::debug!(side = ?from, %violation, "protocol violation");
                // Fail the connection of the offender: close frame, no reply awaited.
                self.peers[from.idx()].stop_waiting();
                self.end_with(Cause::Violation { by: from, violation });
            }
            DirEvent::SrcGone => self.on_gone(from),
            DirEvent::DstGone => self.on_gone(from.other()),
        }
    }

    fn on_control(&mut self, from: Side, op: u8) {
        let closing_by_proxy = self.peers[from.idx()].outbound == Outbound::ProxyClose;
        match op {
            opcode::CLOSE => {
                let code = close_code(self.dir(from).tracker.control_payload());
                self.peers[from.idx()].stop_waiting();
                if closing_by_proxy {
                    self.dir(from).drop_last_control();
                } else {
                    // Forwarded as is; the other side's reply is forwarded back.
                    let to = &mut self.peers[from.other().idx()].outbound;
                    if *to == Outbound::Open {
                        *to = Outbound::PeerClose;
                    }
                    self.outcome.get_or_insert(Cause::PeerClose { from, code });
                    self.start_closing();
                }
                self.dir(from).stop_src();
            }
            opcode::PONG => {
                let ours = match self.peers[from.idx()].ping {
                    Some((p, _)) => self.dir(from).tracker.control_payload() == p,
                    None => false,
                };
                if ours {
                    self.peers[from.idx()].ping = None;
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
    }

    /// The stop signal fired: drain (spread over `drain_spread`) or a revocation.
    fn on_stop(&mut self) {
        match self.control.reason() {
            StopReason::Drain => {
                let spread = self.drain_spread.as_millis() as u64;
                let delay = if spread == 0 { 0 } else { rand::random::<u64>() % spread };
                self.drain_at = Some(Instant::now() + Duration::from_millis(delay));
                self.rearm();
            }
            StopReason::Revoked => self.end_with(Cause::Revoked),
            StopReason::RouteRemoved => self.end_with(Cause::RouteRemoved),
        }
    }

    /// Ends the session for `cause`: the close table's frame to each side still there (a
    /// proxy-initiated close: data from both sides is then discarded while their close replies
    /// are awaited, up to `close_timeout`).
    fn end_with(&mut self, cause: Cause) {
        let plan = cause.plan();
        if self.outcome.is_none() || plan.initiator == Initiator::Proxy && self.close_deadline.is_none() {
            self.outcome = Some(cause);
        }
        for side in [Side::Client, Side::Backend] {
            let p = &mut self.peers[side.idx()];
            if let Some(f) = plan.to(side).filter(|_| !p.gone() && !p.closed_out()) {
                p.outbound = Outbound::ProxyClose;
                self.dir(side.other()).queue(Injected::close(f, side));
            }
        }
        self.start_closing();
    }

    fn start_closing(&mut self) {
        if self.close_deadline.is_none() {
            self.close_deadline = Some(Instant::now() + self.settings.close_timeout);
            self.rearm();
        }
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if self.close_deadline.is_some_and(|d| now >= d) {
            self.peers[0].inbound = Inbound::Gone;
            self.peers[1].inbound = Inbound::Gone;
            return;
        }
        if self.close_deadline.is_some() {
            return;
        }
        let s = self.settings;
        if self.expires_at.is_some_and(|d| now >= d) {
            return self.end_with(Cause::TokenExpired);
        }
        if self.drain_at.is_some_and(|d| now >= d) {
            return self.end_with(Cause::Drain);
        }
        if !s.max_lifetime.is_zero() && now >= self.started + s.max_lifetime {
            return self.end_with(Cause::Lifetime);
        }
        if !s.idle_timeout.is_zero() && now >= self.last_data + s.idle_timeout {
            return self.end_with(Cause::IdleTimeout);
        }
        if s.ping_interval.is_zero() {
            return;
        }
        for side in [Side::Client, Side::Backend] {
            let p = &mut self.peers[side.idx()];
            match p.ping {
                Some((_, sent)) if now >= sent + s.ping_timeout => {
                    // Unreachable: no reply will come, so none is awaited.
                    p.stop_waiting();
                    self.metrics.ping_timeout();
                    return self.end_with(Cause::PingTimeout);
                }
                Some(_) => {}
                None => {
                    let last = p.last_rx.unwrap_or(self.started);
                    if now >= last + s.ping_interval {
                        let payload: [u8; 8] = rand::random();
                        p.ping = Some((payload, now));
                        self.dir(side.other()).queue(Injected::new(opcode::PING, &payload, side));
                    }
                }
            }
        }
    }

    /// Sets the timer to the earliest deadline.
    fn rearm(&mut self) {
        let s = self.settings;
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(d) = self.close_deadline {
            consider(d);
        } else {
            if let Some(d) = self.drain_at {
                consider(d);
            }
            if let Some(d) = self.expires_at {
                consider(d);
            }
            if !s.max_lifetime.is_zero() {
                consider(self.started + s.max_lifetime);
            }
            if !s.idle_timeout.is_zero() {
                consider(self.last_data + s.idle_timeout);
            }
            if !s.ping_interval.is_zero() {
                for p in &self.peers {
                    match p.ping {
                        Some((_, sent)) => consider(sent + s.ping_timeout),
                        None => consider(p.last_rx.unwrap_or(self.started) + s.ping_interval),
                    }
                }
            }
        }
        // With nothing scheduled, sleep far ahead (a year).
        let at = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600));
        self.timer.as_mut().reset(at);
    }

    /// True when both sides are closed and everything owed to them is delivered.
    fn finished(&self) -> bool {
        let side_done = |side: Side, into: &Direction| {
            let p = &self.peers[side.idx()];
            p.gone() || (p.closed_in() && p.closed_out() && into.drained())
        };
        self.close_deadline.is_some() && side_done(Side::Client, &self.b2c) && side_done(Side::Backend, &self.c2b)
    }

    fn end(&mut self) -> SessionEnd {
        self.note_activity();
        let (close_code, initiator, reason) = match self.outcome {
            Some(cause) => {
                let plan = cause.plan();
                (plan.client_code(cause), plan.initiator, plan.label)
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
