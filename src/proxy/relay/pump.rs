//! The byte pump: one direction of a session. Bytes read from `src` go to `dst` as they are;
//! the frame tracker sees them on the way, holds back incomplete headers and control frames,
//! and the session's own frames (pings, closes) are written between frames.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::pool;
use crate::codec::{self as frame, opcode, Event, FrameLimits, Tracker, Violation};
use crate::session::close::CloseFrame;
use crate::session::rate::Next;
use crate::session::{Behind, PayloadSink, Side};

pub(super) use crate::session::rate::Limit;

/// One direction's session rate: its GCRA, and the timer that wakes it while paused ("slow";
/// made the first time the sender is paused). Nothing runs for an idle session.
#[derive(Default)]
struct Throttle {
    gcra: crate::session::rate::Gcra,
    pause: Option<Pin<Box<Sleep>>>,
}

/// What [`Throttle::admit`] decided.
enum Admit {
    /// Read on.
    Go,
    /// Paused until the timer fires ("slow"; the waker is registered).
    Wait,
    /// Over the rate with `rate_action = "close"`.
    Over,
}

impl Throttle {
    /// Charges what was read since the last call (`bytes` and `frames` are totals so far),
    /// then says whether `src` may be read now.
    fn admit(&mut self, cx: &mut Context<'_>, limit: &Limit, bytes: u64, frames: u64) -> Admit {
        loop {
            let now = Instant::now();
            let at = match limit.decide(self.gcra.charge(limit, now, bytes, frames), now) {
                Next::Go => return Admit::Go,
                Next::Over => return Admit::Over,
                Next::WaitUntil(at) => at,
            };
            let pause = self.pause.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            pause.as_mut().reset(at);
            if pause.as_mut().poll(cx).is_pending() {
                return Admit::Wait;
            }
            // The timer had already fired: check again (nothing new to charge).
        }
    }
}

/// Where a ping the session injected is: see [`Direction::ping_progress`].
pub(super) enum PingProgress {
    /// Not written yet: `dst` is in the middle of a frame of `src`'s (a large one, trickling
    /// in), and a ping goes only between frames. With when `dst` last took bytes of it since the
    /// ping was queued: a peer that reads on is not blamed for the wait, one that stopped is.
    Waiting(Option<Instant>),
    /// Written whole at this instant.
    Written(Instant),
}

/// A frame the proxy writes itself (ping or close), at most 2 + 4 + 125 bytes.
pub(super) struct Injected {
    bytes: [u8; 131],
    len: u8,
    pos: u8,
    is_close: bool,
}

impl Injected {
    /// Encodes a control frame; masked with a random key when sent to the backend.
    pub(super) fn new(op: u8, payload: &[u8], to: Side) -> Injected {
        let payload = &payload[..payload.len().min(125)];
        let mask = (to == Side::Backend).then(rand::random::<[u8; 4]>);
        let len = frame::encoded_len(payload.len(), mask.is_some());
        let mut bytes = [0u8; 131];
        frame::encode_into(&mut bytes[..len], true, 0, op, mask, payload);
        Injected { bytes, len: len as u8, pos: 0, is_close: op == opcode::CLOSE }
    }

    pub(super) fn close(f: CloseFrame, to: Side) -> Injected {
        let (payload, len) = frame::close_payload(f.code, f.reason);
        Injected::new(opcode::CLOSE, &payload[..len], to)
    }
}

/// Bytes flowing from one side (`src`) to the other (`dst`).
pub(super) struct Direction {
    /// Relay buffer; `None` while the direction is quiet.
    buf: Option<Box<[u8]>>,
    buf_size: usize,
    /// `buf[start..safe]` may be written; `buf[safe..end]` is held back (incomplete header or
    /// control frame); `buf[scanned..end]` has not been seen by the tracker yet.
    start: usize,
    safe: usize,
    scanned: usize,
    end: usize,
    pub(super) tracker: Tracker,
    /// A proxy frame being written to `dst`, and a close frame queued behind it. Boxed: they
    /// are rarely present, and inline they would add half a KiB to every idle session.
    inject: Option<Box<Injected>>,
    queued_close: Option<Box<Injected>>,
    /// When the last injected ping was written whole, until the session takes it
    /// ([`Direction::ping_progress`]).
    ping_written: Option<Instant>,
    /// While a ping waits for a frame boundary: when `dst` last took bytes of the frame before
    /// it (a clock read per write only then).
    wrote_at: Option<Instant>,
    needs_flush: bool,
    /// The session rate's state: made at the first read of a session with a [`Limit`] for
    /// `src` (boxed: a session that never sends holds none of it).
    throttle: Option<Box<Throttle>>,
    /// What `src`'s data frames are shown to (recording, observers), on routes with either
    /// (boxed: other sessions hold a pointer's worth).
    tap: Option<Box<Tap>>,
    /// Times `src` was paused for its rate since the session last took the count.
    pub(super) pauses: u32,
    reading: Reading,
    writing: Writing,
    pub(super) bytes: u64,
    pub(super) frames: u64,
}

/// Whether a direction reads from `src`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// Reading, within the session rate.
    Open,
    /// `src` went over its rate with `rate_action = "close"`: reported once, then read on
    /// without the rate (discarded once the close is out) so the close frames go at frame
    /// boundaries.
    OverRate,
    /// No more reading: `src` sent a close frame, went away, broke a rule, or was abandoned.
    Done,
}

/// Whether a direction writes to `dst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writing {
    /// Writing.
    Open,
    /// The proxy's close frame has been written to `dst`, or `dst` is gone, or no clean close
    /// can reach it: nothing more is written.
    Closed,
}

/// What a direction needs the session to decide.
pub(super) enum DirEvent {
    /// A complete control frame from `src` is held at the end of the forwardable bytes.
    Control(u8),
    /// `src` broke a rule.
    Violation(Violation),
    /// `src` closed its TCP connection or failed.
    SrcGone,
    /// Writing to `dst` failed.
    DstGone,
    /// `src` went over its session rate, and the action is to close.
    OverRate,
    /// A payload sink (the recording) fell behind or failed, and the session must close.
    SinkBehind,
}

/// What one direction's data-frame payloads are shown to: the session's payload sinks for that
/// direction (the recording; for the backend's output, the observers). Payloads are copied out
/// unmasked while the tracker scans, and handed on once per scan; the relay forwards the
/// original bytes either way.
pub(super) struct Tap {
    staging: Vec<u8>,
    sinks: Vec<Arc<dyn PayloadSink>>,
}

impl Tap {
    /// A tap, or none when there is nothing to show the payloads to.
    pub(super) fn new(sinks: Vec<Arc<dyn PayloadSink>>) -> Option<Tap> {
        (!sinks.is_empty()).then(|| Tap { staging: Vec::new(), sinks })
    }

    fn commit(&mut self) {
        if self.staging.is_empty() {
            return;
        }
        // Taken, not cleared: an idle session keeps no staging buffer.
        let data = bytes::Bytes::from(std::mem::take(&mut self.staging));
        for sink in &self.sinks {
            sink.payload(&data);
        }
    }

    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<Result<(), Behind>> {
        for sink in &self.sinks {
            std::task::ready!(sink.poll_room(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl frame::PayloadTap for Tap {
    fn data(&mut self, bytes: &[u8], mask: Option<[u8; 4]>) {
        match mask {
            None => self.staging.extend_from_slice(bytes),
            Some(m) => self.staging.extend(bytes.iter().enumerate().map(|(i, b)| b ^ m[i & 3])),
        }
    }
}

impl Direction {
    pub(super) fn new(sender: Side, limits: FrameLimits, buf_size: usize, early: &[u8]) -> Direction {
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
            ping_written: None,
            wrote_at: None,
            needs_flush: false,
            throttle: None,
            tap: None,
            pauses: 0,
            reading: Reading::Open,
            writing: Writing::Open,
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

    /// Shows `src`'s data frames to `tap`.
    pub(super) fn tap(&mut self, tap: Tap) {
        self.tap = Some(Box::new(tap));
    }

    /// Offset in `buf` where the frame being parsed began, if it began in this buffer fill.
    pub(super) fn frame_start(&self) -> Option<usize> {
        let into = self.tracker.bytes_into_frame();
        (into <= self.scanned as u64).then(|| self.scanned - into as usize)
    }

    /// Drops the control frame that just completed (it is the last thing scanned).
    pub(super) fn drop_last_control(&mut self) {
        let len = self.tracker.frame_len();
        let at = self.scanned - len;
        if let Some(buf) = self.buf.as_mut() {
            buf.copy_within(self.scanned..self.end, at);
        }
        self.end -= len;
        self.scanned = at;
        self.safe = at;
    }

    /// True when everything read from `src` has been scanned and ends at a message boundary:
    /// another sender could take over `src`'s place without `dst` seeing a broken frame.
    pub(super) fn at_message_boundary(&self) -> bool {
        self.scanned == self.end && self.tracker.at_boundary() && !self.tracker.in_message()
    }

    /// Has `dst` flushed at the next poll (a new client's held output is written then).
    pub(super) fn flush_soon(&mut self) {
        self.needs_flush = true;
    }

    /// True when bytes were read from `src` past the last scanned frame.
    pub(super) fn read_past_scan(&self) -> bool {
        self.end > self.scanned
    }

    /// Stops reading from `src`; bytes read after the last scanned frame are dropped.
    pub(super) fn stop_src(&mut self) {
        self.reading = Reading::Done;
        self.end = self.scanned;
    }

    /// Queues a proxy frame for `dst`. A close replaces a ping not yet started.
    pub(super) fn queue(&mut self, frame: Injected) {
        if !frame.is_close {
            // A new ping: when an earlier one went out is no longer news.
            self.ping_written = None;
            self.wrote_at = None;
        }
        let frame = Box::new(frame);
        match &self.inject {
            None => self.inject = Some(frame),
            Some(cur) if cur.pos == 0 && !cur.is_close && frame.is_close => self.inject = Some(frame),
            Some(_) if frame.is_close => self.queued_close = Some(frame),
            Some(_) => {} // a ping while another proxy frame is in flight: skip this one
        }
    }

    /// How the ping injected towards `dst` is getting on: still waiting for a frame boundary
    /// (or written in part), or written whole at an instant (told once).
    pub(super) fn ping_progress(&mut self) -> Option<PingProgress> {
        match (&self.inject, self.ping_written.take()) {
            (Some(inj), _) if !inj.is_close => Some(PingProgress::Waiting(self.wrote_at)),
            (_, Some(at)) => Some(PingProgress::Written(at)),
            _ => None,
        }
    }

    /// True when everything this direction owes `dst` has been written and flushed.
    pub(super) fn drained(&self) -> bool {
        self.inject.is_none()
            && self.queued_close.is_none()
            && !self.needs_flush
            && (self.writing == Writing::Closed || self.start >= self.safe)
    }

    pub(super) fn release_if_empty(&mut self) {
        if self.end == 0 {
            if let Some(b) = self.buf.take() {
                pool::give(b);
            }
        }
    }

    /// Moves the direction forward as far as it can go; returns an event or `Pending`.
    pub(super) fn poll<S, D>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut S,
        dst: &mut D,
        dst_gone: bool,
        rate: Option<&Limit>,
    ) -> Poll<DirEvent>
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
                self.writing = Writing::Closed;
            }
            if self.writing == Writing::Closed {
                self.start = self.start.max(self.safe);
            }
            // Write: proxy frame at a boundary, else forwardable bytes.
            if self.inject.is_none() {
                self.inject = self.queued_close.take();
            }
            let boundary = self.frame_start().filter(|&b| b >= self.start);
            if self.inject.is_some() && boundary.is_none() && self.reading == Reading::Done && self.start >= self.safe {
                // src stopped in the middle of a frame already partly written to dst: no frame
                // boundary will come, so no clean close frame can be sent.
                self.inject = None;
                self.queued_close = None;
                self.writing = Writing::Closed;
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
                            if inj.is_close {
                                self.writing = Writing::Closed;
                            } else {
                                self.ping_written = Some(Instant::now());
                            }
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
                        if self.inject.as_ref().is_some_and(|i| !i.is_close) {
                            self.wrote_at = Some(Instant::now());
                        }
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
                // Once nothing more goes to dst, what src still sends is read only to find its
                // close: it is discarded, so no recording or observer is shown it as if it had
                // been delivered.
                let tap = self.tap.as_deref_mut().filter(|_| self.writing != Writing::Closed);
                let (n, ev) = match tap {
                    None => self.tracker.feed(&buf[self.scanned..self.end]),
                    Some(tap) => {
                        let fed = self.tracker.feed_with(&buf[self.scanned..self.end], tap);
                        tap.commit();
                        fed
                    }
                };
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
                        self.reading = Reading::Done;
                        self.tracker.reset();
                        return Poll::Ready(DirEvent::Violation(v));
                    }
                    None => continue,
                }
            }
            // Read: only once every forwardable byte is out.
            if self.reading == Reading::Done {
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
            if let Some(rate) = rate.filter(|_| self.reading == Reading::Open) {
                // Charged per read for what was read since the last one: a clock read and a
                // few arithmetic operations, none while the direction is quiet.
                let frames = self.frames + self.tracker.data_frames_pending();
                let throttle = self.throttle.get_or_insert_with(Box::default);
                match throttle.admit(cx, rate, self.bytes, frames) {
                    Admit::Go => {}
                    Admit::Wait => {
                        self.pauses += 1;
                        self.release_if_empty();
                        return Poll::Pending;
                    }
                    Admit::Over => {
                        self.reading = Reading::OverRate;
                        return Poll::Ready(DirEvent::OverRate);
                    }
                }
            }
            if let Some(tap) = self.tap.as_deref() {
                match tap.poll_room(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(Behind)) => {
                        self.tap = None;
                        return Poll::Ready(DirEvent::SinkBehind);
                    }
                    Poll::Pending => {
                        self.release_if_empty();
                        return Poll::Pending;
                    }
                }
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
