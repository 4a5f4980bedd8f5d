//! Stage: relay. Splices WebSocket bytes between client and backend until the session closes.
//!
//! Bytes are copied from one socket's read buffer to the other socket as they arrive; payloads
//! are never unmasked, re-masked or re-encoded (client frames reach the backend still masked
//! with the client's key; RSV bits pass through, so permessage-deflate negotiated end to end
//! works). A [`crate::codec::Tracker`] per direction knows where frames start, enforces the protocol
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
//!
//! The files (the frame tracker and encoder are [`crate::codec`]): `pump.rs` (one
//! direction: read, scan, hold back, write), `session.rs` (both directions, the per-side close
//! handshake state, the timer), [`close`] (every way a session ends and what each side gets)
//! and [`pool`] (the relay buffers).

pub mod pool;
mod pump;
mod session;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::SessionSettings;
use crate::metrics::Metrics;
pub use crate::session::resume::Parkable;
pub use crate::session::FinishStream;
use crate::session::SessionControl;
pub use crate::session::{Initiator, SessionEnd, Side};
use session::Session;

/// What a relay needs besides the two streams.
pub struct RelayParams {
    /// Deadlines and limits of the route.
    pub settings: Arc<SessionSettings>,
    /// Window over which drain close notices are spread.
    pub drain_spread: Duration,
    /// RSV bits the negotiated extensions allow (`0x70` mask bits).
    pub allowed_rsv: u8,
    /// Stop signal and reason (drain, revocation), and the live byte counters.
    pub control: Arc<SessionControl>,
    /// Process metrics.
    pub metrics: Arc<Metrics>,
    /// When the client's token expires: the session is closed then (1008 to the client).
    pub expires_at: Option<Instant>,
    /// The session's recording sinks (output, and input when recorded), on recorded routes.
    pub recording: Option<(crate::recording::Sink, Option<crate::recording::Sink>)>,
    /// The session's observers, on routes with `[routes.observe]`.
    pub observers: Option<Arc<crate::session::observe::Hub>>,
    /// On routes with `[routes.resume]`: the session's resume registration (its new clients
    /// arrive through it). The client stream is then a [`Parkable`].
    pub resume: Option<(Arc<crate::config::ResumeSettings>, crate::session::resume::Registration)>,
}

/// Runs a session to its end, then finishes both streams (bounded by `close_timeout`).
///
/// `client_early` and `backend_early` are bytes already read from each side during the
/// handshakes; they are relayed first (copied into relay buffers here, not held afterwards).
pub fn relay<C, B>(
    client: C,
    client_early: Vec<u8>,
    backend: B,
    backend_early: Vec<u8>,
    params: RelayParams,
) -> Relay<C, B>
where
    C: FinishStream,
    B: FinishStream,
{
    Relay { session: Session::new(client, &client_early, backend, &backend_early, params), end: None }
}

/// The future [`relay`] returns: the session, which owns both streams, and its end once known.
/// A named future rather than an `async fn`, so that a session's task holds exactly this (an
/// `async fn` keeps its arguments beside the state they were moved into).
pub struct Relay<C, B> {
    session: Session<C, B>,
    end: Option<SessionEnd>,
}

impl<C, B> Future for Relay<C, B>
where
    C: FinishStream,
    B: FinishStream,
{
    type Output = SessionEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SessionEnd> {
        let this = self.get_mut();
        let end = match this.end.take() {
            Some(end) => end,
            None => ready!(this.session.poll(cx)),
        };
        match this.session.poll_shutdown(cx) {
            Poll::Ready(()) => Poll::Ready(end),
            Poll::Pending => {
                this.end = Some(end);
                Poll::Pending
            }
        }
    }
}
