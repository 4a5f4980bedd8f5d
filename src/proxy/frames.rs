//! An HTTP/2 connection's frame census: the flood limits Envoy keeps for frames that cost the
//! server work and the client next to nothing, which hyper (h2) leaves unbounded.
//!
//! - `WINDOW_UPDATE`: a client may send at most `1 + 2 × (streams + 10 × DATA frames sent to
//!   it)` (Envoy's `max_inbound_window_update_frames_per_data_frame_sent`, 10). A reader returns
//!   window as it reads, about one update per frame it was sent; a flood of 1-byte updates on a
//!   connection it is sent nothing on kept a core busy for as long as it lasted.
//! - `PRIORITY`: at most `1 + 100 × (1 + streams)` (Envoy's
//!   `max_inbound_priority_frames_per_stream`, 100). h2 reads and drops them.
//! - Empty frames: `DATA`, `HEADERS` or `CONTINUATION` with no payload and no END_STREAM, more
//!   than one in a row (Envoy's `max_consecutive_inbound_frames_with_empty_payload`, 1,
//!   CVE-2019-9518): they carry nothing and cost a frame's handling each.
//!
//! Over a limit, the connection's next read fails and hyper closes the connection with all its
//! streams (`portcullis_http2_floods_total{frame}`, a log line at most once a second). The
//! census reads only frame headers (9 bytes), in both directions, as the bytes pass: the
//! client's preface is skipped, payloads are not looked at.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 §3.4), which comes before its first frame.
const PREFACE_LEN: usize = 24;

/// Frame types (RFC 9113 §6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

/// Flags.
const END_STREAM: u8 = 0x1;

/// Envoy's defaults, as above.
const WINDOW_UPDATES_PER_DATA_FRAME: u64 = 10;
const PRIORITY_PER_STREAM: u64 = 100;
const EMPTY_IN_A_ROW: u32 = 1;

/// A frame's header: its payload's length, type, flags and stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

/// Finds frame headers in one direction's bytes as they pass, whatever pieces they come in.
#[derive(Debug)]
struct Splitter {
    /// Bytes still to skip: the preface, then each frame's payload.
    skip: usize,
    /// The header being read.
    header: [u8; 9],
    have: usize,
}

impl Splitter {
    fn new(preface: usize) -> Splitter {
        Splitter { skip: preface, header: [0; 9], have: 0 }
    }

    /// Calls `frame` for each header completed in `bytes`.
    fn feed(&mut self, mut bytes: &[u8], mut frame: impl FnMut(Header)) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 9 {
                let h = &self.header;
                let header = Header {
                    len: usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]),
                    kind: h[3],
                    flags: h[4],
                    stream: u32::from_be_bytes([h[5] & 0x7f, h[6], h[7], h[8]]),
                };
                self.have = 0;
                self.skip = header.len;
                frame(header);
            }
        }
    }
}

/// What the census counts, and the limits it holds the client to.
#[derive(Debug, Default)]
struct Counts {
    /// Streams the client opened (a `HEADERS` frame on a stream above every earlier one).
    streams: u64,
    last_stream: u32,
    window_updates: u64,
    priority: u64,
    /// `DATA` frames the server sent.
    data_sent: u64,
    empty_in_a_row: u32,
}

impl Counts {
    /// Counts a frame from the client; the limit it goes over, if any.
    fn inbound(&mut self, h: Header) -> Option<&'static str> {
        if h.kind == HEADERS && h.stream > self.last_stream {
            self.last_stream = h.stream;
            self.streams += 1;
        }
        let empty = matches!(h.kind, DATA | HEADERS | CONTINUATION) && h.len == 0 && h.flags & END_STREAM == 0;
        self.empty_in_a_row = if empty { self.empty_in_a_row + 1 } else { 0 };
        if self.empty_in_a_row > EMPTY_IN_A_ROW {
            return Some("empty_frames");
        }
        match h.kind {
            WINDOW_UPDATE => {
                self.window_updates += 1;
                let allowed = 1 + 2 * (self.streams + WINDOW_UPDATES_PER_DATA_FRAME * self.data_sent);
                (self.window_updates > allowed).then_some("window_update")
            }
            PRIORITY => {
                self.priority += 1;
                (self.priority > 1 + PRIORITY_PER_STREAM * (1 + self.streams)).then_some("priority")
            }
            _ => None,
        }
    }

    fn outbound(&mut self, h: Header) {
        if h.kind == DATA {
            self.data_sent += 1;
        }
    }
}

/// A server-side HTTP/2 connection's stream with its frame census (see the module).
pub struct Census<S> {
    inner: S,
    client: SocketAddr,
    from_client: Splitter,
    to_client: Splitter,
    counts: Counts,
    /// The limit the client went over: every read fails from then on.
    flood: Option<&'static str>,
}

impl<S> Census<S> {
    /// `inner` from its first byte (the client's preface comes first).
    pub fn new(inner: S, client: SocketAddr) -> Census<S> {
        Census {
            inner,
            client,
            from_client: Splitter::new(PREFACE_LEN),
            to_client: Splitter::new(0),
            counts: Counts::default(),
            flood: None,
        }
    }

    fn flooded(&self, frame: &'static str) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, format!("HTTP/2 {frame} flood from {}", self.client))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Census<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(frame) = this.flood {
            return Poll::Ready(Err(this.flooded(frame)));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let (counts, mut over) = (&mut this.counts, None);
            this.from_client.feed(&buf.filled()[before..], |h| {
                if let Some(frame) = counts.inbound(h) {
                    over.get_or_insert(frame);
                }
            });
            if let Some(frame) = over {
                this.flood = Some(frame);
                crate::metrics::http2_flood(frame);
                if let Some(held_back) = crate::limits::log_sample("http2_flood") {
                    tracing::info!(client = %this.client, frame, held_back, "HTTP/2 connection closed: frame flood");
                }
                return Poll::Ready(Err(this.flooded(frame)));
            }
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Census<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            let counts = &mut this.counts;
            this.to_client.feed(&buf[..n], |h| counts.outbound(h));
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = polled {
            let counts = &mut this.counts;
            for b in bufs {
                let take = n.min(b.len());
                this.to_client.feed(&b[..take], |h| counts.outbound(h));
                n -= take;
                if n == 0 {
                    break;
                }
            }
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn headers(bytes: &[u8], preface: usize, piece: usize) -> Vec<Header> {
        let mut s = Splitter::new(preface);
        let mut out = Vec::new();
        for chunk in bytes.chunks(piece) {
            s.feed(chunk, |h| out.push(h));
        }
        out
    }

    #[test]
    fn frame_headers_are_found_whatever_pieces_the_bytes_come_in() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(frame(0x4, 0, 0, &[0; 12]));
        bytes.extend(frame(HEADERS, 0x4, 1, &[0x82; 20]));
        bytes.extend(frame(DATA, END_STREAM, 1, &[7; 70_000]));
        bytes.extend(frame(WINDOW_UPDATE, 0, 0, &[0, 0, 0, 1]));
        let want = [
            Header { len: 12, kind: 0x4, flags: 0, stream: 0 },
            Header { len: 20, kind: HEADERS, flags: 0x4, stream: 1 },
            Header { len: 70_000, kind: DATA, flags: END_STREAM, stream: 1 },
            Header { len: 4, kind: WINDOW_UPDATE, flags: 0, stream: 0 },
        ];
        for piece in [1, 2, 5, 9, 10, 4096, bytes.len()] {
            assert_eq!(headers(&bytes, PREFACE_LEN, piece), want, "in pieces of {piece}");
        }
    }

    #[test]
    fn window_updates_are_held_to_what_was_sent_and_streams() {
        let wu = Header { len: 4, kind: WINDOW_UPDATE, flags: 0, stream: 0 };
        let mut c = Counts::default();
        // One at the start (a client widening its connection window), none more.
        assert_eq!(c.inbound(wu), None);
        assert_eq!(c.inbound(wu), Some("window_update"));
        // A reader: a stream, then about two updates per DATA frame it is sent.
        let mut c = Counts::default();
        c.inbound(Header { len: 20, kind: HEADERS, flags: 0x4, stream: 1 });
        for _ in 0..1_000 {
            c.outbound(Header { len: 16_384, kind: DATA, flags: 0, stream: 1 });
            assert_eq!(c.inbound(wu), None);
            assert_eq!(c.inbound(Header { stream: 1, ..wu }), None);
        }
        // Past ten per frame sent (twice over), a flood.
        let allowed = 1 + 2 * (1 + 10 * 1_000) - 2_000;
        for _ in 0..allowed {
            assert_eq!(c.inbound(wu), None);
        }
        assert_eq!(c.inbound(wu), Some("window_update"));
    }

    #[test]
    fn priority_frames_are_held_per_stream_and_empty_frames_may_not_follow_each_other() {
        let mut c = Counts::default();
        let priority = Header { len: 5, kind: PRIORITY, flags: 0, stream: 3 };
        for _ in 0..101 {
            assert_eq!(c.inbound(priority), None);
        }
        assert_eq!(c.inbound(priority), Some("priority"));
        let mut c = Counts::default();
        let empty = Header { len: 0, kind: DATA, flags: 0, stream: 1 };
        assert_eq!(c.inbound(empty), None);
        assert_eq!(c.inbound(Header { len: 1, ..empty }), None, "a frame with a payload between");
        assert_eq!(c.inbound(empty), None);
        assert_eq!(c.inbound(Header { flags: END_STREAM, ..empty }), None, "an empty end of stream is not");
        assert_eq!(c.inbound(empty), None);
        assert_eq!(c.inbound(empty), Some("empty_frames"));
    }
}
