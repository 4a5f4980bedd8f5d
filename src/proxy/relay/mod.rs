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
pub use crate::session::FinishStream;
pub use crate::session::{Initiator, SessionEnd, Side};
use crate::session::{SessionControl, Taps};
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
    /// What the session's payloads are shown to: the features' sinks (the recording, the
    /// observers). A client stream that can be held while its client is away (resume's) says
    /// so through [`FinishStream`].
    pub taps: Taps,
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

/// The session's deadlines on paused time: each test's clock only moves when every task waits,
/// so a deadline fires at its exact instant, with no sleep racing it.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{opcode, Reader, UNLIMITED};
    use tokio::io::{AsyncWriteExt as _, DuplexStream};

    /// A live session over in-memory pipes: the client's end, the backend's end, and the
    /// relay's task.
    struct Ends {
        client: DuplexStream,
        backend: DuplexStream,
        relay: tokio::task::JoinHandle<SessionEnd>,
    }

    fn start(settings: SessionSettings, expires_in: Option<Duration>) -> Ends {
        let (client, client_proxy) = tokio::io::duplex(64 * 1024);
        let (backend_proxy, backend) = tokio::io::duplex(64 * 1024);
        let params = RelayParams {
            settings: Arc::new(settings),
            drain_spread: Duration::ZERO,
            allowed_rsv: 0,
            control: SessionControl::new(),
            metrics: Metrics::global(),
            expires_at: expires_in.map(|d| Instant::now() + d),
            taps: Taps::default(),
        };
        let relay = tokio::spawn(relay(client_proxy, Vec::new(), backend_proxy, Vec::new(), params));
        Ends { client, backend, relay }
    }

    /// Settings with every deadline off: each test turns on the one it is about.
    fn quiet() -> SessionSettings {
        SessionSettings {
            ping_interval: Duration::ZERO,
            idle_timeout: Duration::ZERO,
            max_lifetime: Duration::ZERO,
            close_timeout: Duration::from_secs(1),
            ..SessionSettings::default()
        }
    }

    /// The close frame the proxy sent `to` (frames before it, pings, are skipped): its code
    /// and reason.
    async fn close_to(end: &mut DuplexStream, to: Side) -> (u16, String) {
        // What the client is sent is unmasked (a server's frames); the backend's, masked.
        let mut reader = Reader::new(to.other(), UNLIMITED, &[], 1024);
        loop {
            let frame = reader.next(end).await.expect("frames").expect("a close before EOF");
            if frame.opcode == opcode::CLOSE {
                let p = frame.payload();
                return (u16::from_be_bytes([p[0], p[1]]), String::from_utf8_lossy(&p[2..]).into_owned());
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_session_closes_at_its_idle_timeout_and_data_moves_it() {
        let mut ends = start(SessionSettings { idle_timeout: Duration::from_secs(60), ..quiet() }, None);
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(40)).await;
        let mut frame = Vec::new();
        crate::codec::encode(true, 0, opcode::TEXT, Some([1, 2, 3, 4]), b"still here", &mut frame);
        ends.client.write_all(&frame).await.expect("write");
        let (code, reason) = close_to(&mut ends.client, Side::Client).await;
        assert_eq!((code, reason.as_str()), (1000, "idle timeout"));
        assert_eq!(Instant::now() - t0, Duration::from_secs(100), "60 s after the last data, not after the start");
        let end = ends.relay.await.expect("relay");
        assert_eq!(end.reason, "idle_timeout");
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_closes_when_its_token_expires() {
        let mut ends = start(quiet(), Some(Duration::from_secs(10)));
        let t0 = Instant::now();
        let (code, reason) = close_to(&mut ends.client, Side::Client).await;
        assert_eq!((code, reason.as_str()), (1008, "token expired"));
        assert_eq!(Instant::now() - t0, Duration::from_secs(10));
        let (code, _) = close_to(&mut ends.backend, Side::Backend).await;
        assert_eq!(code, 1001);
        assert_eq!(ends.relay.await.expect("relay").reason, "token_expired");
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_closes_at_its_lifetime_however_busy() {
        let mut ends = start(SessionSettings { max_lifetime: Duration::from_secs(20), ..quiet() }, None);
        let t0 = Instant::now();
        let mut frame = Vec::new();
        crate::codec::encode(true, 0, opcode::BINARY, Some([9, 8, 7, 6]), &[0; 16], &mut frame);
        for _ in 0..19 {
            ends.client.write_all(&frame).await.expect("write");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let (code, reason) = close_to(&mut ends.client, Side::Client).await;
        assert_eq!((code, reason.as_str()), (1001, "session lifetime reached"));
        assert_eq!(Instant::now() - t0, Duration::from_secs(20));
        assert_eq!(ends.relay.await.expect("relay").reason, "lifetime");
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_answers_no_ping_is_closed_after_the_ping_timeout() {
        let settings =
            SessionSettings { ping_interval: Duration::from_secs(5), ping_timeout: Duration::from_secs(3), ..quiet() };
        let mut ends = start(settings, None);
        let t0 = Instant::now();
        let (code, reason) = close_to(&mut ends.client, Side::Client).await;
        assert_eq!((code, reason.as_str()), (1001, "ping timeout"));
        assert_eq!(Instant::now() - t0, Duration::from_secs(8), "the ping at 5 s, unanswered for 3 s");
        assert_eq!(ends.relay.await.expect("relay").reason, "ping_timeout");
    }

    /// Writes `frame` to `end` 2,000 bytes every 100 ms (until the pipe breaks), then hands the
    /// end back.
    fn trickle(mut end: DuplexStream, frame: Vec<u8>) -> tokio::task::JoinHandle<DuplexStream> {
        tokio::spawn(async move {
            for piece in frame.chunks(2_000) {
                if end.write_all(piece).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            end
        })
    }

    /// Found by an attacker review: a ping goes only between frames, and one due while the
    /// backend trickled a large frame to the client waited behind it, but its timeout ran from
    /// when it was due: a client reading every byte was closed for not answering a ping it had
    /// not been sent. The wait runs from when the ping is written.
    #[tokio::test(start_paused = true)]
    async fn a_ping_waiting_behind_a_trickling_frame_is_not_held_against_the_peer() {
        let settings =
            SessionSettings { ping_interval: Duration::from_secs(1), ping_timeout: Duration::from_secs(2), ..quiet() };
        let ends = start(settings, None);
        // One 100 KB binary frame from the backend, 2 KB every 100 ms: 5 s in all.
        let mut frame = Vec::new();
        crate::codec::encode(true, 0, opcode::BINARY, None, &[7u8; 100_000], &mut frame);
        let (backend, mut client) = (ends.backend, ends.client);
        let trickle = trickle(backend, frame);
        // The client reads everything, and answers every ping.
        let mut reader = Reader::new(Side::Backend, UNLIMITED, &[], 1024);
        let mut got = 0;
        let t0 = Instant::now();
        while Instant::now() - t0 < Duration::from_secs(7) {
            let f = match tokio::time::timeout(Duration::from_secs(1), reader.next(&mut client)).await {
                Err(_) => continue,
                Ok(Ok(Some(f))) => f,
                Ok(other) => panic!("the client's stream ended: {:?}", other.map(|f| f.map(|f| f.opcode))),
            };
            match f.opcode {
                opcode::BINARY => got += f.payload().len(),
                opcode::PING => {
                    let mut pong = Vec::new();
                    crate::codec::encode(true, 0, opcode::PONG, Some([1, 2, 3, 4]), &f.payload(), &mut pong);
                    client.write_all(&pong).await.expect("pong");
                }
                opcode::CLOSE => panic!("closed: {:?}", String::from_utf8_lossy(&f.payload()[2..])),
                _ => {}
            }
        }
        assert_eq!(got, 100_000, "the whole frame arrived");
        assert!(!ends.relay.is_finished(), "the session goes on");
        drop(trickle.await.expect("trickle"));
    }

    /// Found by a review of the fix above: a client that stopped reading in the middle of the
    /// backend's large frame kept its ping waiting, and was never timed out. The wait runs from
    /// the client's last read, so one that reads nothing more is closed as before. The backend
    /// trickles the frame and stays heard from (no ping of its own is due) until the pipe to the
    /// client and the relay's buffer are full.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_mid_frame_is_still_pinged_out() {
        let settings =
            SessionSettings { ping_interval: Duration::from_secs(1), ping_timeout: Duration::from_secs(2), ..quiet() };
        let ends = start(settings, None);
        let mut frame = Vec::new();
        crate::codec::encode(true, 0, opcode::BINARY, None, &vec![7u8; 1_000_000], &mut frame);
        let (backend, client) = (ends.backend, ends.client);
        let writer = trickle(backend, frame);
        let t0 = Instant::now();
        let end = ends.relay.await.expect("relay");
        assert_eq!(end.reason, "ping_timeout");
        // The client's ping times out 2 s after its last read (6.2 s on this paused clock); the
        // backend's own, once the relay stops reading it, would end the session at 7.2 s, which
        // is when it ended while a waiting ping's timeout kept being pushed back.
        let took = Instant::now() - t0;
        assert!(took < Duration::from_millis(6_800), "closed by the client's ping only after {took:?}");
        writer.abort();
        drop(client);
    }

    /// A resumable session whose first client is `client`'s far end, and the registry it is
    /// held in.
    fn start_held(window: Duration) -> (Ends, Arc<crate::session::resume::Resumes>, String) {
        use crate::session::resume::{Claim, Resumable, Resumes};
        let resumes = Arc::new(Resumes::default());
        let Ok(Claim::Fresh(reg)) = resumes.claim("r", None, Some("iss"), Some("alice"), Some("a1")) else {
            panic!("a fresh claim")
        };
        let id = reg.held.id().to_owned();
        let settings = Arc::new(crate::config::ResumeSettings {
            window,
            buffer: 64 * 1024,
            param: "resume".into(),
            notice: None,
            announce: false,
        });
        let (client, client_proxy) = tokio::io::duplex(64 * 1024);
        let (backend_proxy, backend) = tokio::io::duplex(64 * 1024);
        let held = Resumable::new(Box::new(client_proxy), Box::new(()), reg, settings, Metrics::global());
        let params = RelayParams {
            settings: Arc::new(quiet()),
            drain_spread: Duration::ZERO,
            allowed_rsv: 0,
            control: SessionControl::new(),
            metrics: Metrics::global(),
            expires_at: None,
            taps: Taps::default(),
        };
        let relay = tokio::spawn(relay(held, Vec::new(), backend_proxy, Vec::new(), params));
        (Ends { client, backend, relay }, resumes, id)
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_session_ends_when_its_window_passes_without_its_client() {
        let (mut ends, resumes, _) = start_held(Duration::from_secs(30));
        let t0 = Instant::now();
        drop(std::mem::replace(&mut ends.client, tokio::io::duplex(1).0));
        let (code, reason) = close_to(&mut ends.backend, Side::Backend).await;
        assert_eq!((code, reason.as_str()), (1001, "resume window over"));
        assert_eq!(Instant::now() - t0, Duration::from_secs(30));
        assert_eq!(ends.relay.await.expect("relay").reason, "resume_expired");
        assert!(resumes.is_empty(), "the id leaves the registry with the session");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_client_takes_a_held_session_over_with_the_output_held_for_it() {
        use crate::session::resume::{Attach, Claim};
        let (mut ends, resumes, id) = start_held(Duration::from_secs(30));
        drop(std::mem::replace(&mut ends.client, tokio::io::duplex(1).0));
        let mut frame = Vec::new();
        crate::codec::encode(true, 0, opcode::TEXT, None, b"while you were away", &mut frame);
        ends.backend.write_all(&frame).await.expect("write");
        tokio::time::sleep(Duration::from_secs(20)).await;
        // Another subject cannot claim it; its own subject can, once.
        assert!(resumes.claim("r", Some(&id), Some("iss"), Some("mallory"), Some("a1")).is_err());
        let Ok(Claim::Resume(held)) = resumes.claim("r", Some(&id), Some("iss"), Some("alice"), Some("a1")) else {
            panic!("the held session is claimed")
        };
        let (mut client, client_proxy) = tokio::io::duplex(64 * 1024);
        let attach = Attach { io: Box::new(client_proxy), early: Vec::new(), expires_at: None, hold: Box::new(()) };
        held.attach(attach).expect("handed over");
        let mut reader = Reader::new(Side::Backend, UNLIMITED, &[], 1024);
        let got = reader.next(&mut client).await.expect("frames").expect("the held output");
        assert_eq!(got.payload(), b"while you were away");
        // Past the old window: the session is attached again, not expired.
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(!ends.relay.is_finished());
        let mut bye = Vec::new();
        crate::codec::encode(true, 0, opcode::CLOSE, Some([1, 2, 3, 4]), &[3, 232], &mut bye);
        client.write_all(&bye).await.expect("write");
        let (code, _) = close_to(&mut ends.backend, Side::Backend).await;
        assert_eq!(code, 1000, "the new client's close is the backend's");
    }
}
