//! The client side of a resumable session ([`Parkable`]): a stream whose connection can go and
//! be replaced while the relay runs on.
//!
//! While a client is attached, reads and writes go to its stream. When the session parks it
//! ([`Parkable::park`]), the stream is dropped: reads wait, and writes (the backend's output,
//! the proxy's pings) go to a buffer bounded by the route's `buffer`; past it a write fails,
//! which ends the session. When a new client attaches, the buffer is written to it first.
//!
//! The buffer starts at a message boundary, so the new client's first frame is a whole one:
//! the bytes of a message that was partly written to the old client are kept from the
//! message's first byte while it is written, and start the buffer. A message longer than the
//! buffer is not kept; its remainder is skipped instead, up to the next message. Output that
//! the old connection's kernel had accepted but never delivered is lost with it: nothing in
//! WebSocket acknowledges delivery.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{Attach, Io};
use crate::codec::{Event, Side, StopAtEnd, Tracker, UNLIMITED};

/// Message boundaries of a byte stream, found as it is walked by the one frame tracker
/// (`crate::codec`), which read these bytes once already, as the relay checked them.
#[derive(Debug)]
pub(super) struct Boundaries {
    tracker: Tracker,
}

impl Default for Boundaries {
    fn default() -> Self {
        // What the relay writes to the client: the backend's frames, already checked against
        // the route's limits, and the proxy's own.
        Boundaries { tracker: Tracker::new(Side::Backend, UNLIMITED) }
    }
}

/// Message boundaries within one chunk: the first and the last offset (0 when the walk was at
/// one before the chunk; the chunk's length when it ends at one).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Seen {
    pub(super) first: Option<usize>,
    pub(super) last: Option<usize>,
}

impl Boundaries {
    /// At a message boundary: between frames, outside a fragmented message.
    pub(super) fn at_message_boundary(&self) -> bool {
        self.tracker.at_boundary() && !self.tracker.in_message()
    }

    /// Walks `chunk`, returning the message boundaries in it.
    pub(super) fn walk(&mut self, chunk: &[u8]) -> Seen {
        self.walk_until(chunk, false)
    }

    /// Walks `chunk` up to its first message boundary; returns that offset, or `None` when
    /// the whole chunk was inside one message.
    pub(super) fn skip(&mut self, chunk: &[u8]) -> Option<usize> {
        self.walk_until(chunk, true).first
    }

    fn walk_until(&mut self, chunk: &[u8], stop_at_first: bool) -> Seen {
        let mut seen = Seen { first: None, last: None };
        let note = |at: usize, seen: &mut Seen| {
            seen.first.get_or_insert(at);
            seen.last = Some(at);
        };
        if self.at_message_boundary() {
            note(0, &mut seen);
        }
        let mut i = 0;
        while i < chunk.len() && !(stop_at_first && seen.first.is_some()) {
            let mut end = StopAtEnd { messages_only: true, hit: false };
            let (n, event) = self.tracker.feed_with(&chunk[i..], &mut end);
            i += n;
            match event {
                // A control frame between messages is a message of its own.
                Some(Event::Control(_)) => {
                    self.tracker.release_control();
                    if !self.tracker.in_message() {
                        note(i, &mut seen);
                    }
                }
                None if end.hit => note(i, &mut seen),
                None => {}
                // Bytes the relay checked cannot break a rule. Were they to, no later offset
                // is a boundary: the session is not resumed into the middle of something.
                Some(Event::Violation(_)) => break,
            }
        }
        seen
    }
}

/// A resumable session's client stream (see the module's documentation).
pub struct Parkable {
    io: Option<Box<dyn Io>>,
    /// What the attached connection holds (its connection slot), kept while parked until a new
    /// client's replaces it.
    hold: Option<Box<dyn Send>>,
    /// Bytes read from the new client during its handshake, read first.
    early: Vec<u8>,
    /// Output boundaries: of the bytes delivered to the attached stream, or while parked of
    /// the bytes taken into the buffer.
    out: Boundaries,
    /// While attached: the bytes of the message being written, from its first byte (`None`
    /// once it outgrew `cap`).
    partial: Option<Vec<u8>>,
    /// The output waiting for the next client (while parked), or still to be written to the
    /// new one (`backlog[sent..]`).
    backlog: Vec<u8>,
    sent: usize,
    /// Parked: skipping the rest of a message too long to have been kept.
    skipping: bool,
    cap: usize,
    overflowed: bool,
}

impl Parkable {
    /// The first client's stream; `cap` bounds the output held while no client is attached.
    pub fn new(io: Box<dyn Io>, hold: Box<dyn Send>, cap: usize) -> Parkable {
        Parkable {
            io: Some(io),
            hold: Some(hold),
            early: Vec::new(),
            out: Boundaries::default(),
            partial: Some(Vec::new()),
            backlog: Vec::new(),
            sent: 0,
            skipping: false,
            cap,
            overflowed: false,
        }
    }

    /// Drops the client's stream and starts holding output for the next one. False when the
    /// session cannot be held (its buffer overflowed).
    pub(super) fn park(&mut self) -> bool {
        if self.overflowed {
            return false;
        }
        self.io = None;
        // The old connection's hold (its connection slot: the global cap and its address's
        // place under max_connections_per_ip) is kept while the session is parked: it still
        // holds a backend connection and a buffer. A new client's hold replaces it.
        self.early = Vec::new();
        // What the old client may have got of the message in flight is held again whole;
        // what was still to be written of the backlog follows it.
        let rest = self.backlog.split_off(self.sent.min(self.backlog.len()));
        self.sent = 0;
        match self.partial.take() {
            Some(mut partial) => {
                partial.extend_from_slice(&rest);
                self.out = Boundaries::default();
                self.out.walk(&partial);
                self.backlog = partial;
            }
            None => {
                // The message was too long to keep: the next client starts at the next one.
                self.skipping = !self.out.at_message_boundary();
                let mut kept = Vec::new();
                self.take_parked(&rest, &mut kept);
                self.backlog = kept;
            }
        }
        true
    }

    /// Appends `bytes` to `into`, skipping up to the next message boundary while `skipping`.
    fn take_parked(&mut self, bytes: &[u8], into: &mut Vec<u8>) {
        let mut bytes = bytes;
        if self.skipping {
            match self.out.skip(bytes) {
                Some(at) => {
                    self.skipping = false;
                    bytes = &bytes[at..];
                }
                None => return,
            }
        }
        self.out.walk(bytes);
        into.extend_from_slice(bytes);
    }

    /// Attaches a new client: the held output is written to it first.
    pub(super) fn attach(&mut self, a: Attach) {
        self.io = Some(a.io);
        self.hold = Some(a.hold);
        self.early = a.early;
        self.sent = 0;
        // The backlog starts at a message boundary, and so does what the new client is
        // delivered. While skipping (nothing kept yet), the walk stays inside the long message
        // and the new client starts once it ends.
        if !self.skipping {
            self.out = Boundaries::default();
            self.partial = Some(Vec::new());
        }
    }

    /// Notes `bytes` as delivered to the attached client.
    fn delivered(&mut self, bytes: &[u8]) {
        let seen = self.out.walk(bytes);
        let cap = self.cap;
        match (seen.last, self.partial.as_mut()) {
            (Some(at), _) => {
                let mut p = self.partial.take().unwrap_or_default();
                p.clear();
                p.extend_from_slice(&bytes[at..]);
                if p.capacity() > 4 * 1024 && p.is_empty() {
                    p = Vec::new();
                }
                self.partial = (p.len() <= cap).then_some(p);
            }
            (None, Some(p)) => {
                p.extend_from_slice(bytes);
                if p.len() > cap {
                    self.partial = None;
                }
            }
            (None, None) => {}
        }
    }

    /// Writes the rest of the backlog to the attached client.
    fn poll_backlog(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.backlog.len() {
            let Some(io) = self.io.as_mut() else { return Poll::Ready(Ok(())) };
            let n = std::task::ready!(Pin::new(io).poll_write(cx, &self.backlog[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let chunk = self.backlog[self.sent..self.sent + n].to_vec();
            self.delivered(&chunk);
            self.sent += n;
        }
        self.backlog = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Parkable {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.early.is_empty() {
            let n = this.early.len().min(buf.remaining());
            buf.put_slice(&this.early[..n]);
            this.early.drain(..n);
            return Poll::Ready(Ok(()));
        }
        match this.io.as_mut() {
            Some(io) => Pin::new(io).poll_read(cx, buf),
            // The session wakes on its new-client channel, not here.
            None => Poll::Pending,
        }
    }
}

impl AsyncWrite for Parkable {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.io.is_none() {
            let mut backlog = std::mem::take(&mut this.backlog);
            this.take_parked(bytes, &mut backlog);
            this.backlog = backlog;
            if this.backlog.len() > this.cap {
                this.overflowed = true;
                return Poll::Ready(Err(io::Error::other("resume buffer full")));
            }
            return Poll::Ready(Ok(bytes.len()));
        }
        if this.skipping {
            // The rest of a message the client before had part of: not for this one.
            match this.out.skip(bytes) {
                None => return Poll::Ready(Ok(bytes.len())),
                Some(at) => {
                    this.skipping = false;
                    this.partial = Some(Vec::new());
                    if at > 0 {
                        return Poll::Ready(Ok(at));
                    }
                }
            }
        }
        std::task::ready!(this.poll_backlog(cx))?;
        let Some(io) = this.io.as_mut() else { return Poll::Ready(Err(io::ErrorKind::NotConnected.into())) };
        let n = std::task::ready!(Pin::new(io).poll_write(cx, bytes))?;
        this.delivered(&bytes[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.io.is_none() {
            return Poll::Ready(Ok(()));
        }
        std::task::ready!(this.poll_backlog(cx))?;
        match this.io.as_mut() {
            Some(io) => Pin::new(io).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.io.as_mut() {
            Some(io) => Pin::new(io).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        crate::codec::encode(fin, 0, op, None, payload, &mut out);
        out
    }

    #[test]
    fn boundaries_are_found_at_message_ends_only() {
        let mut b = Boundaries::default();
        let (one, two) = (frame(true, 2, b"abc"), frame(true, 2, &[7; 300]));
        let mut chunk = one.clone();
        chunk.extend_from_slice(&two);
        assert_eq!(b.walk(&chunk), Seen { first: Some(0), last: Some(chunk.len()) });
        // A fragmented message with a ping inside it: no boundary until its final fragment.
        let mut frag = frame(false, 1, b"he");
        frag.extend_from_slice(&frame(true, 9, b"p"));
        let end = frame(true, 0, b"llo");
        assert_eq!(b.walk(&frag), Seen { first: Some(0), last: Some(0) });
        assert!(!b.at_message_boundary());
        assert_eq!(b.walk(&end), Seen { first: Some(end.len()), last: Some(end.len()) });
        // Byte by byte: the frame ends with its last byte, and nowhere before.
        let mut b = Boundaries::default();
        let ends: Vec<bool> = two.iter().map(|x| b.walk(std::slice::from_ref(x)).last == Some(1)).collect();
        assert_eq!(ends.iter().filter(|e| **e).count(), 1);
        assert!(ends[ends.len() - 1]);
    }

    struct Sink(Vec<u8>);
    impl AsyncWrite for Sink {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
            // Half of what is offered, at most: partial writes.
            let n = b.len().div_ceil(2);
            self.0.extend_from_slice(&b[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }
    impl AsyncRead for Sink {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    fn write_all(p: &mut Parkable, mut bytes: &[u8]) -> io::Result<()> {
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        while !bytes.is_empty() {
            match Pin::new(&mut *p).poll_write(&mut cx, bytes) {
                Poll::Ready(Ok(n)) => bytes = &bytes[n..],
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => unreachable!("the test sink is always ready"),
            }
        }
        Ok(())
    }

    #[test]
    fn a_parked_stream_holds_output_from_the_start_of_the_message_in_flight() {
        let (a, b, c) = (frame(true, 2, b"first"), frame(true, 2, b"second"), frame(true, 2, b"third"));
        let mut p = Parkable::new(Box::new(Sink(Vec::new())), Box::new(()), 4096);
        write_all(&mut p, &a).expect("write");
        // Half of `b` reaches the old client, then it vanishes.
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let Poll::Ready(Ok(n)) = Pin::new(&mut p).poll_write(&mut cx, &b) else { panic!("write") };
        assert!(n < b.len());
        assert!(p.park());
        write_all(&mut p, &b[n..]).expect("parked write");
        write_all(&mut p, &c).expect("parked write");
        let mut expected = b.clone();
        expected.extend_from_slice(&c);
        assert_eq!(p.backlog, expected);
        // Over the cap, the write fails and the session can no longer be held.
        assert!(write_all(&mut p, &frame(true, 2, &[0; 5000])).is_err());
        assert!(!p.park());
    }

    #[test]
    fn a_message_longer_than_the_buffer_is_skipped_to_the_next_one() {
        let long = frame(true, 2, &[1; 10_000]);
        let next = frame(true, 2, b"next");
        let mut p = Parkable::new(Box::new(Sink(Vec::new())), Box::new(()), 4096);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut sent = 0;
        while sent < 6000 {
            let Poll::Ready(Ok(n)) = Pin::new(&mut p).poll_write(&mut cx, &long[sent..]) else { panic!("write") };
            sent += n;
        }
        assert!(p.park());
        write_all(&mut p, &long[sent..]).expect("parked write");
        write_all(&mut p, &next).expect("parked write");
        assert_eq!(p.backlog, next);
    }

    #[test]
    fn a_new_client_gets_the_held_output_before_anything_else() {
        let (a, b) = (frame(true, 2, b"held"), frame(true, 2, b"live"));
        let mut p = Parkable::new(Box::new(Sink(Vec::new())), Box::new(()), 4096);
        assert!(p.park());
        write_all(&mut p, &a).expect("parked write");
        let (client, mut far) = tokio::io::duplex(64 * 1024);
        p.attach(Attach { io: Box::new(client), early: Vec::new(), expires_at: None, hold: Box::new(()) });
        write_all(&mut p, &b).expect("write");
        let mut got = vec![0; a.len() + b.len()];
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut rb = ReadBuf::new(&mut got);
        while rb.remaining() > 0 {
            let Poll::Ready(Ok(())) = Pin::new(&mut far).poll_read(&mut cx, &mut rb) else { panic!("read") };
        }
        let mut expected = a.clone();
        expected.extend_from_slice(&b);
        assert_eq!(got, expected);
    }
}
