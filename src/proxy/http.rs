//! Stage: http. Serves HTTP/1.1 on a client stream with hyper, with a header size limit (431)
//! and a header read timeout that answers 408; or HTTP/2 (ALPN `h2`) with the `[http2]`
//! settings and extended CONNECT (RFC 8441) enabled, the header list bounded the same way and
//! the first request's deadline closing the connection.
//!
//! hyper's own header timeout closes the connection silently, so the first request's deadline
//! is enforced here by [`HeadIo`], a thin wrapper that writes a `408 Request Timeout` and ends
//! the stream when the request head is not complete in time. Once the head has arrived the
//! wrapper is inert; after an upgrade it is unwrapped and the relay runs on the raw stream.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::TokioTimer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::config::{Http2Settings, ServerSettings};

const RESPONSE_408: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// The hyper HTTP/1.1 builder for client connections.
pub fn builder(settings: &ServerSettings) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        // Later requests on a kept-alive connection; the first one is bounded by HeadIo (408).
        .header_read_timeout(settings.header_read_timeout + Duration::from_secs(1))
        .max_header_size(settings.max_header_size)
        .max_buf_size(settings.max_header_size.max(8192))
        .keep_alive(true);
    b
}

/// The executor of a client HTTP/2 connection's streams: each a task of its own, under a
/// [`Watched`](super::stream::Watched) that resets the stream when its exchange's session ended
/// and its answer cannot be written.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamExecutor;

impl<F: std::future::Future<Output = ()> + Send + 'static> hyper::rt::Executor<F> for StreamExecutor {
    fn execute(&self, task: F) {
        // In the connection's span, as an HTTP/1.1 exchange's handler is.
        tokio::spawn(tracing::Instrument::in_current_span(super::stream::Watched::new(task)));
    }
}

/// The hyper HTTP/2 builder for client connections. Each stream's handler runs as a task of
/// its own (the executor), so a stream that waits never holds up the connection's others.
pub fn h2_builder(server: &ServerSettings, h2: &Http2Settings) -> http2::Builder<StreamExecutor> {
    let mut b = http2::Builder::new(StreamExecutor);
    b.timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(h2.max_concurrent_streams)
        .initial_stream_window_size(h2.initial_stream_window)
        .initial_connection_window_size(h2.initial_connection_window)
        .max_frame_size(h2.max_frame_size)
        .max_header_list_size(u32::try_from(server.max_header_size).unwrap_or(u32::MAX));
    if !h2.keepalive_interval.is_zero() {
        b.keep_alive_interval(h2.keepalive_interval).keep_alive_timeout(h2.keepalive_timeout);
    }
    b
}

/// An HTTP/2 connection's open streams (requests until their response body ends, WebSockets
/// until their session does), for its idle timeout.
#[derive(Debug, Default)]
pub struct OpenStreams {
    open: AtomicUsize,
    changed: tokio::sync::Notify,
}

impl OpenStreams {
    /// Counts a stream open until the returned guard is dropped.
    pub fn open(self: &Arc<Self>) -> OpenStream {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
        OpenStream(self.clone())
    }

    /// No stream is open.
    pub fn is_idle(&self) -> bool {
        self.open.load(Ordering::Relaxed) == 0
    }

    /// Resolves after a stream opened or ended (at once if one did since the last call).
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}

/// One open HTTP/2 stream, counted in its connection's [`OpenStreams`].
#[derive(Debug)]
pub struct OpenStream(Arc<OpenStreams>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.changed.notify_one();
    }
}

/// What an HTTP/2 stream holds until it ends: its place under `max_streams_per_ip` and its
/// count in the connection's open streams. Empty on HTTP/1.1.
#[derive(Debug, Default)]
pub struct StreamHold {
    pub(crate) _per_ip: Option<crate::limits::IpSlot>,
    pub(crate) _open: Option<OpenStream>,
}

/// A client stream during the HTTP phase: enforces the first request's header deadline, and
/// the send deadline (see [`HeadIo::send_timeout`]).
pub struct HeadIo<S> {
    inner: S,
    /// Written when the deadline passes (HTTP/1.1's 408; nothing on HTTP/2).
    answer: &'static [u8],
    deadline: Option<Pin<Box<Sleep>>>,
    head_done: Arc<AtomicBool>,
    timed_out: Arc<AtomicBool>,
    /// The deadline of a write the client takes nothing of.
    send: SendDeadline,
}

/// How long a write may wait on a client that reads nothing: armed when a write finds the
/// socket full, disarmed when bytes move (the kernel wakes a blocked writer once part of its
/// send buffer has drained, so a reader slow enough is closed too, as by NGINX's
/// `send_timeout`). HTTP/1.1 only; a relay runs on the stream taken out of [`HeadIo`].
struct SendDeadline {
    /// How long; zero: no limit.
    limit: Duration,
    /// Armed while a write waits.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl SendDeadline {
    /// The result of a write that returned `polled`: bytes moved disarm the deadline; a write
    /// that waits arms it, and fails once it has passed.
    fn check<T>(&mut self, polled: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if !polled.is_pending() {
            self.stalled = None;
            return polled;
        }
        if self.limit.is_zero() {
            return polled;
        }
        let limit = self.limit;
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if stalled.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        crate::metrics::send_timeout();
        tracing::debug!(timeout = ?limit, "the client took nothing of its answer for send_timeout; closing");
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client read nothing for send_timeout")))
    }
}

impl<S> HeadIo<S> {
    /// Wraps `inner`; `head_done` is set by the service when the request head has arrived, and
    /// `timed_out` is set here when the deadline passes first.
    pub fn new(inner: S, limit: Duration, head_done: Arc<AtomicBool>, timed_out: Arc<AtomicBool>) -> Self {
        let deadline = Some(Box::pin(tokio::time::sleep(limit)));
        let send = SendDeadline { limit: Duration::ZERO, stalled: None };
        HeadIo { inner, answer: RESPONSE_408, deadline, head_done, timed_out, send }
    }

    /// Closes the connection (a write fails with `TimedOut`) once a write has waited `limit`
    /// on a client that takes none of it (zero: never).
    pub fn send_timeout(mut self, limit: Duration) -> Self {
        self.send = SendDeadline { limit, stalled: None };
        self
    }

    /// The same deadline, which ends the stream without writing an answer (HTTP/2, where a
    /// client that sent no request has no stream to answer on).
    pub fn silent(mut self) -> Self {
        self.answer = b"";
        self
    }

    /// The wrapped stream.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeadIo<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.timed_out.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        if let Some(deadline) = this.deadline.as_mut() {
            if this.head_done.load(Ordering::Relaxed) {
                this.deadline = None;
            } else if deadline.as_mut().poll(cx).is_ready() {
                this.deadline = None;
                this.timed_out.store(true, Ordering::Relaxed);
                // Best effort: the socket's send buffer is empty at this point, so this write
                // completes at once in practice; if it does not, the client just sees a close.
                if !this.answer.is_empty() {
                    let _ = Pin::new(&mut this.inner).poll_write(cx, this.answer);
                    let _ = Pin::new(&mut this.inner).poll_flush(cx);
                }
                return Poll::Ready(Ok(()));
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeadIo<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.send.check(polled, cx)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.send.check(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

use std::future::Future;

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that waits: what the deadline makes of it after `waited`.
    async fn after(deadline: &mut SendDeadline, waited: Duration) -> Poll<io::Result<()>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let _ = deadline.check(Poll::<io::Result<()>>::Pending, &mut cx);
        tokio::time::advance(waited).await;
        deadline.check(Poll::Pending, &mut cx)
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_waits_fails_after_send_timeout_and_never_with_zero() {
        let mut limited = SendDeadline { limit: Duration::from_secs(60), stalled: None };
        assert!(after(&mut limited, Duration::from_secs(59)).await.is_pending());
        let failed = after(&mut limited, Duration::from_secs(1)).await;
        assert!(matches!(failed, Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::TimedOut));
        // Bytes that move disarm it: the next wait has the whole limit again.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut moving = SendDeadline { limit: Duration::from_secs(60), stalled: None };
        assert!(after(&mut moving, Duration::from_secs(59)).await.is_pending());
        assert!(moving.check(Poll::Ready(Ok(())), &mut cx).is_ready());
        assert!(after(&mut moving, Duration::from_secs(59)).await.is_pending());
        let mut unlimited = SendDeadline { limit: Duration::ZERO, stalled: None };
        assert!(after(&mut unlimited, Duration::from_secs(86_400)).await.is_pending(), "\"0s\": no limit");
    }
}
