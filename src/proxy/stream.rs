//! Stage: stream. The bodies of a plain HTTP exchange, passed through frame by frame as they
//! arrive, never collected: [`Upload`] carries the client's request body to the backend and
//! [`Download`] carries the backend's response body to the client.
//!
//! Both cut a body that moves no byte for `idle_body_timeout` (only while waiting for the
//! sender: time the receiver takes to accept bytes does not count). The upload enforces
//! `max_request_body` and can be handed to another member while none of it was read. An
//! exchange with a body in flight either way is a governed session ([`Governance`]):
//! registered for `/sessions`, and ended on token expiry, revocation, lifetime, route removal
//! and drain (spread over `drain_spread` as for WebSockets). An upload is cut then; a download
//! ends cleanly when it is made of events (the last chunk written, so `EventSource`
//! reconnects), else is cut.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::Notify;
use tokio::time::Sleep;

use crate::metrics::{Direction, Metrics};
use crate::outbound::BoxError;
use crate::routing::sticky::ConnGuard;
use crate::session::clock::Clock;
use crate::session::close::Cause;
use crate::session::SessionGuard;

/// Why a body was cut.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The request body grew past `max_request_body`.
    #[error("request body over the limit of {0} bytes")]
    TooLarge(u64),
    /// No byte for `idle_body_timeout`.
    #[error("no body data for {0:?}")]
    Idle(Duration),
    /// The client's request body failed (it went away, or broke the framing).
    #[error("client body: {0}")]
    Client(String),
    /// The proxy ended a body with its session: an upload (the member's request is cut), or a
    /// response body that cannot end early and still look whole (a download: the client sees
    /// it cut, never complete).
    #[error("the body was ended by the proxy: {}", .0.http_end().label)]
    Ended(Cause),
    /// The exchange's answer ended while its upload was still in flight: the rest of the upload
    /// has nowhere to go.
    #[error("the exchange's answer ended before its upload")]
    AnswerEnded,
}

/// Progress of one request body, shared by its attempts and the exchange's log line.
#[derive(Debug)]
pub struct UploadState {
    limit: u64,
    bytes: AtomicU64,
    started: AtomicBool,
    finished: AtomicBool,
    too_large: AtomicBool,
    done: Notify,
}

impl UploadState {
    /// Body bytes read from the client so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether the body grew past the limit.
    pub fn too_large(&self) -> bool {
        self.too_large.load(Ordering::Relaxed)
    }

    /// Resolves once the whole body was read (at once for a request without one).
    pub async fn finished(&self) {
        loop {
            let notified = self.done.notified();
            if self.finished.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn finish(&self) {
        self.finished.store(true, Ordering::Release);
        self.done.notify_waiters();
    }
}

/// A client's request body on its way to a member.
pub struct Upload {
    /// The body until the first attempt reads it; a later attempt finds it here only if no
    /// byte was read.
    slot: Arc<Mutex<Option<Incoming>>>,
    body: Option<Incoming>,
    state: Arc<UploadState>,
    idle: Idle,
    metrics: Arc<Metrics>,
    /// A body the proxy read whole before forwarding it (an MCP message): sent as one frame by
    /// each attempt.
    whole: Option<Bytes>,
    /// The exchange's end, when the upload is governed: the body is cut then.
    end: Option<Arc<UploadEnd>>,
}

/// The end of a governed exchange, as its upload sees it. The upload is cut then, and so is the
/// backend's request: a request body in flight does not outlive its session. The upload reads
/// the session's stop and deadlines itself at each of its frames, so it ends whether or not
/// anything else is polled (a response body that hyper does not poll while the client reads
/// none of it). Whoever polls the exchange's stop (the request while it waits for an answer,
/// then the response body) sets it too, which wakes an upload waiting for the client, and so
/// does the end of the response.
#[derive(Debug)]
pub struct UploadEnd {
    /// How it ended, once it did.
    outcome: std::sync::OnceLock<UploadOutcome>,
    /// The upload's task, woken when the end is set from outside it.
    waker: futures_util::task::AtomicWaker,
    /// The session's stop.
    control: Arc<crate::session::SessionControl>,
    /// The session's clock (its token's expiry, its lifetime).
    clock: Clock,
    /// A later deadline of its own (a stream over the subject's caps), once set.
    grace: std::sync::OnceLock<(tokio::time::Instant, Cause)>,
}

/// How a governed upload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UploadOutcome {
    /// It was whole: nothing was left to cut.
    Whole,
    /// Its exchange's answer ended first.
    AnswerEnded,
    /// Its session ended.
    Cut(Cause),
}

impl UploadEnd {
    /// Why its session cut the upload, if it did (not when its answer ended it).
    fn cut_for(&self) -> Option<Cause> {
        match self.outcome.get() {
            Some(UploadOutcome::Cut(reason)) => Some(*reason),
            _ => None,
        }
    }

    /// Ends the upload with `outcome` (the first outcome stays: nothing happens to an upload
    /// that is whole or ended).
    fn set(&self, outcome: UploadOutcome) {
        if self.outcome.set(outcome).is_ok() && outcome != UploadOutcome::Whole {
            self.waker.wake();
        }
    }

    /// Ready with the error to cut the upload with once it must be cut; pending while it goes
    /// on, or once it was whole.
    fn poll_ended(&self, cx: &mut Context<'_>) -> Poll<BodyError> {
        let ended = |outcome: &UploadOutcome| match *outcome {
            UploadOutcome::Whole => None,
            UploadOutcome::AnswerEnded => Some(BodyError::AnswerEnded),
            UploadOutcome::Cut(reason) => Some(BodyError::Ended(reason)),
        };
        if let Some(outcome) = self.outcome.get() {
            return ended(outcome).map_or(Poll::Pending, Poll::Ready);
        }
        let now = tokio::time::Instant::now();
        let grace = self.grace.get().filter(|(at, _)| now >= *at).map(|(_, r)| *r);
        let due = self.clock.due(now).map(Cause::from).or(grace);
        // The drain too, at once: an upload is a transfer, not a session that reconnects (whose
        // close the drain spreads), and nothing else may be polling the session's stop.
        if let Some(reason) = self.control.stopped().map(Cause::from).or(due) {
            self.set(UploadOutcome::Cut(reason));
        } else {
            self.waker.register(cx.waker());
        }
        self.outcome.get().and_then(ended).map_or(Poll::Pending, Poll::Ready)
    }
}

impl Upload {
    /// A body already read whole (within its limits), sent as one frame; any attempt may send
    /// it again.
    pub fn whole(bytes: Bytes, metrics: Arc<Metrics>) -> Upload {
        let state = Arc::new(UploadState {
            limit: u64::MAX,
            bytes: AtomicU64::new(bytes.len() as u64),
            started: AtomicBool::new(false),
            finished: AtomicBool::new(true),
            too_large: AtomicBool::new(false),
            done: Notify::new(),
        });
        metrics.http_body_bytes(Direction::ClientToBackend, bytes.len() as u64);
        let idle = Idle::new(Duration::MAX);
        Upload { slot: Arc::new(Mutex::new(None)), body: None, state, idle, metrics, whole: Some(bytes), end: None }
    }

    /// The body of the first attempt.
    pub fn new(body: Incoming, limit: u64, idle: Duration, metrics: Arc<Metrics>) -> Upload {
        let empty = body.is_end_stream();
        let state = Arc::new(UploadState {
            limit,
            bytes: AtomicU64::new(0),
            started: AtomicBool::new(false),
            finished: AtomicBool::new(empty),
            too_large: AtomicBool::new(false),
            done: Notify::new(),
        });
        Upload {
            slot: Arc::new(Mutex::new(Some(body))),
            body: None,
            state,
            idle: Idle::new(idle),
            metrics,
            whole: None,
            end: None,
        }
    }

    /// Cuts the body when `end` is set (see [`Governance::end_upload`]).
    pub fn ends_with(&mut self, end: Arc<UploadEnd>) {
        self.end = Some(end);
    }

    /// The shared progress record.
    pub fn state(&self) -> Arc<UploadState> {
        self.state.clone()
    }

    /// The same body for another attempt: always for a body read whole; for a streamed one,
    /// while no byte of it was read, or when it was empty.
    pub fn again(&self) -> Option<Upload> {
        if let Some(whole) = &self.whole {
            let idle = Idle::new(self.idle.limit);
            let (slot, state, metrics) = (self.slot.clone(), self.state.clone(), self.metrics.clone());
            let end = self.end.clone();
            return Some(Upload { slot, body: None, state, idle, metrics, whole: Some(whole.clone()), end });
        }
        let s = &self.state;
        let empty_and_done = s.finished.load(Ordering::Acquire) && s.bytes() == 0;
        (!s.started.load(Ordering::Acquire) || empty_and_done).then(|| Upload {
            slot: self.slot.clone(),
            body: None,
            state: self.state.clone(),
            idle: Idle::new(self.idle.limit),
            metrics: self.metrics.clone(),
            whole: None,
            end: self.end.clone(),
        })
    }

    /// The whole body was read: the answer's deadline runs from now, and nothing is left to cut.
    fn read_whole(&self) {
        self.state.finish();
        if let Some(end) = &self.end {
            end.set(UploadOutcome::Whole);
        }
    }

    fn with_slot<T>(&self, f: impl FnOnce(Option<&Incoming>) -> T) -> T {
        match &self.body {
            Some(b) => f(Some(b)),
            None => match self.slot.lock() {
                Ok(g) => f(g.as_ref()),
                Err(_) => f(None),
            },
        }
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(Poll::Ready(e)) = this.end.as_ref().map(|e| e.poll_ended(cx)) {
            return Poll::Ready(Some(Err(e.into())));
        }
        if let Some(whole) = this.whole.take() {
            this.state.started.store(true, Ordering::Release);
            return Poll::Ready(Some(Ok(Frame::data(whole))));
        }
        if this.body.is_none() {
            if this.state.finished.load(Ordering::Acquire) {
                return Poll::Ready(None);
            }
            this.body = this.slot.lock().ok().and_then(|mut g| g.take());
            this.state.started.store(true, Ordering::Release);
        }
        let Some(body) = this.body.as_mut() else { return Poll::Ready(None) };
        match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle.moved();
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    this.metrics.http_body_bytes(Direction::ClientToBackend, n);
                    if this.state.bytes.fetch_add(n, Ordering::Relaxed) + n > this.state.limit {
                        this.state.too_large.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(BodyError::TooLarge(this.state.limit).into())));
                    }
                }
                // A body of known length is whole with its last byte: hyper polls it no further.
                if body.is_end_stream() {
                    this.read_whole();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError::Client(e.to_string()).into()))),
            Poll::Ready(None) => {
                this.read_whole();
                Poll::Ready(None)
            }
            Poll::Pending => match this.idle.poll_expired(cx) {
                true => Poll::Ready(Some(Err(BodyError::Idle(this.idle.limit).into()))),
                false => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        if let Some(whole) = &self.whole {
            return whole.is_empty();
        }
        self.state.finished.load(Ordering::Acquire) || self.with_slot(|b| b.is_none_or(|b| b.is_end_stream()))
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(whole) = &self.whole {
            return SizeHint::with_exact(whole.len() as u64);
        }
        if self.state.finished.load(Ordering::Acquire) && self.body.is_none() {
            return SizeHint::with_exact(0);
        }
        self.with_slot(|b| b.map_or_else(|| SizeHint::with_exact(0), Body::size_hint))
    }
}

/// The idle-body deadline: armed when a poll finds no data, disarmed when data moves.
struct Idle {
    limit: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Idle {
    fn new(limit: Duration) -> Idle {
        Idle { limit, sleep: None }
    }

    fn moved(&mut self) {
        self.sleep = None;
    }

    /// Called when the sender has nothing: arms the deadline if needed; true once it passed.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        sleep.as_mut().poll(cx).is_ready()
    }
}

/// One plain HTTP exchange, for its access-log line and metrics, written when the response
/// (and so the exchange) ends, however it ends.
pub struct Exchange {
    /// Request method.
    pub method: Method,
    /// Route name ("none" when no route matched).
    pub route: String,
    /// The `{agent}` capture.
    pub agent: Option<String>,
    /// Verified subject.
    pub subject: Option<String>,
    /// The request path, without its query (which may carry a token).
    pub path: String,
    /// Client address.
    pub client: SocketAddr,
    /// The member that answered.
    pub member: Option<String>,
    /// Status sent to the client.
    pub status: u16,
    /// When the request head arrived.
    pub started: Instant,
    /// The request body's progress, once one was read.
    pub upload: Option<Arc<UploadState>>,
    /// Metrics to record into.
    pub metrics: Arc<Metrics>,
    /// The route's pre-registered series (none before a route was found).
    pub route_metrics: Option<Arc<crate::metrics::RouteHttpMetrics>>,
}

impl Exchange {
    /// Logs and counts the exchange: `sent` response body bytes, ended for `end`.
    pub fn finish(&self, sse: bool, sent: u64, end: &'static str) {
        let elapsed = self.started.elapsed();
        if sse {
            self.metrics.sse_end(&self.route, end);
        } else {
            match &self.route_metrics {
                Some(m) => m.seconds(elapsed.as_secs_f64()),
                None => self.metrics.http_request_seconds(&self.route, elapsed.as_secs_f64()),
            }
        }
        tracing::info!(
            target: "portcullis::access",
            method = %self.method,
            route = self.route,
            agent = self.agent.as_deref().unwrap_or(""),
            subject = self.subject.as_deref().unwrap_or(""),
            client = %self.client,
            backend = self.member.as_deref().unwrap_or(""),
            path = self.path,
            status = self.status,
            kind = if sse { "sse" } else { "request" },
            bytes_in = self.upload.as_ref().map_or(0, |u| u.bytes()),
            bytes_out = sent,
            duration_ms = elapsed.as_millis() as u64,
            end,
            "request"
        );
    }
}

/// What ends a governed stream.
pub type StopFuture = Pin<Box<dyn Future<Output = Cause> + Send>>;

/// A governed exchange's stop, shared by its response body and by what serves its stream (a
/// [`Watch`]). The body ends itself on the stop when hyper polls it; hyper does not while the
/// client gives the body no room (an HTTP/2 stream with no window, an HTTP/1.1 client that reads
/// nothing), and then the [`Watch`] drops the whole stream once `close_within` has passed, so the
/// session, its places and the member's request go, whatever the client does. Whoever polls it
/// first ends the exchange's upload too. It is polled only by the task that serves the stream
/// (the handler, the body and the watch all run there), so the stop future's one waker is
/// that task's.
struct Stop {
    /// Resolves with the reason when the session must end.
    future: Mutex<StopFuture>,
    /// The reason, once the stop resolved.
    reason: std::sync::OnceLock<Cause>,
    /// The exchange's upload, when it is governed too: cut when the stop resolves.
    upload: std::sync::OnceLock<Arc<UploadEnd>>,
    /// Set by [`Governance::poll_stop`] (the handler's, then the body's): the stop was polled
    /// since the watch last looked, so the body is still polled and sees the stop itself.
    polled: AtomicBool,
    /// How long a body whose session ended is given to end itself (the route's close_timeout).
    close_within: Duration,
    /// Armed once the stop resolved: when it passes, the stream is dropped.
    abandon: Mutex<Option<Pin<Box<Sleep>>>>,
    /// HTTP/2: the answer's send deadline ([`Stall`]); `None` on HTTP/1.1 (its socket has one).
    stall: Mutex<Option<Stall>>,
    /// Polls of the response body so far, and whether the last one handed hyper a frame: what
    /// the stream's task reads to tell whether hyper is waiting for its client ([`Stall`]).
    body_polls: AtomicU64,
    body_handed: AtomicBool,
}

impl Stop {
    fn poll(&self, cx: &mut Context<'_>) -> Poll<Cause> {
        if let Some(reason) = self.reason.get() {
            return Poll::Ready(*reason);
        }
        let mut future = locked(&self.future);
        let polled = std::task::ready!(future.as_mut().poll(cx));
        let reason = *self.reason.get_or_init(|| polled);
        if let Some(upload) = self.upload.get() {
            upload.set(UploadOutcome::Cut(reason));
        }
        Poll::Ready(reason)
    }

    /// Ready with the reason once the session ended and its body, not polled since, was given
    /// `close_within` to end itself.
    fn poll_abandoned(&self, cx: &mut Context<'_>) -> Poll<Cause> {
        if self.polled.swap(false, Ordering::Relaxed) {
            return Poll::Pending;
        }
        let reason = std::task::ready!(self.poll(cx));
        let mut abandon = locked(&self.abandon);
        let within = self.close_within;
        std::task::ready!(abandon.get_or_insert_with(|| Box::pin(tokio::time::sleep(within))).as_mut().poll(cx));
        Poll::Ready(reason)
    }

    /// HTTP/2: ready with `send_timeout` once the answer has waited that long for its client
    /// ([`Stall`]), `polls_before` being its body's polls before the task's wake.
    fn poll_stalled(&self, cx: &mut Context<'_>, polls_before: Option<u64>) -> Poll<Duration> {
        let mut stall = locked(&self.stall);
        let Some(stall) = stall.as_mut() else { return Poll::Pending };
        let polled = polls_before != Some(self.body_polls.load(Ordering::Relaxed));
        stall.poll(cx, polled, self.body_handed.load(Ordering::Relaxed))
    }
}

/// An HTTP/2 answer's send deadline (`send_timeout`). hyper 1.12 holds one frame of the body in
/// hand and polls the body again only once h2 has assigned the stream more send capacity (of
/// its window and the connection's) than it still buffers, so a client that keeps its window
/// shut stops the body where it stands, with no read and no timer of the body's own running:
/// the exchange (its member connection, its session) would be held until its lifetime. So the
/// stream's task ([`Watched`]) looks, each time it wakes, at what the body did meanwhile: a
/// body that handed hyper a frame, or that hyper did not poll at all although the task woke,
/// waits on the client; one that hyper polled and that waits on its member does not. A wait on
/// the client that lasts `send_timeout` drops the stream, as an HTTP/1.1 client that takes no
/// byte for `send_timeout` loses its connection (there the socket's write has that deadline; an
/// HTTP/2 connection's writes carry its other streams, so it is each answer's). Frames handed
/// to hyper are at most [`H2_FRAME`], so a client that reads on, however slowly, takes one
/// within it.
struct Stall {
    /// `send_timeout`.
    within: Duration,
    /// Since when the body has waited on the client; `None` while it waits on its member.
    since: Option<tokio::time::Instant>,
    /// Set for `since + within` when a wait starts; when it fires early (the wait ended and
    /// another began since), set again: once per wait at most, never per frame.
    timer: Option<Pin<Box<Sleep>>>,
}

/// The largest frame of an answer handed to hyper on HTTP/2 ([`Stall`]): a client reading on
/// at 16 KiB per `send_timeout` (273 bytes a second at the default) is never cut.
const H2_FRAME: usize = 16 * 1024;

impl Stall {
    /// Notes what the body did since the task last looked (`polled`: hyper polled it; `handed`:
    /// its last poll gave hyper a frame), then ready with the deadline once a wait on the
    /// client has lasted it. A poll is progress: the wait, if any, starts again from it.
    fn poll(&mut self, cx: &mut Context<'_>, polled: bool, handed: bool) -> Poll<Duration> {
        let since = match (polled, handed, self.since) {
            // Polled, and waiting on its member: hyper comes back once the member sends.
            (true, false, _) => {
                self.since = None;
                self.timer = None;
                return Poll::Pending;
            }
            // Polled, and gave hyper a frame: waits on the client from now.
            (true, true, _) | (false, _, None) => *self.since.insert(tokio::time::Instant::now()),
            // Not polled although the task woke: hyper holds it back for window.
            (false, _, Some(since)) => since,
        };
        let due = since + self.within;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() < due {
            timer.as_mut().reset(due);
        }
        std::task::ready!(timer.as_mut().poll(cx));
        Poll::Ready(self.within)
    }
}

/// A lock of the stop's state: one poisoned by a panic while it was held still guards a value
/// that is whole (each is replaced in one step), so it is taken all the same.
fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

tokio::task_local! {
    /// The [`Watch`] of the HTTP/2 stream whose task runs (see [`Watched`]).
    static STREAM_WATCH: Arc<Watch>;
}

/// What serves a governed exchange's stream, told of its stop when the response body is handed
/// to hyper: an HTTP/2 stream's task ([`Watched`]), or an HTTP/1.1 connection's (one exchange
/// at a time). [`Watch::poll_abandoned`] is ready when that stream must be dropped.
#[derive(Debug, Default)]
pub struct Watch {
    current: Mutex<std::sync::Weak<Stop>>,
}

impl Watch {
    /// Ready with the session's reason once the exchange now served ended and its body was not
    /// polled within its `close_within` after that: the stream is to be dropped.
    pub fn poll_abandoned(&self, cx: &mut Context<'_>) -> Poll<Cause> {
        self.current().map_or(Poll::Pending, |stop| stop.poll_abandoned(cx))
    }

    /// The stop of the exchange now served, while one is.
    fn current(&self) -> Option<Arc<Stop>> {
        locked(&self.current).upgrade()
    }
}

pin_project_lite::pin_project! {
    /// An HTTP/2 stream's task (hyper's, through the connection's executor) with its [`Watch`]:
    /// dropped, and so its stream reset, when the exchange it serves ended and its body cannot
    /// be written.
    pub struct Watched<F> {
        #[pin]
        inner: Option<tokio::task::futures::TaskLocalFuture<Arc<Watch>, F>>,
        watch: Arc<Watch>,
    }
}

impl<F: Future<Output = ()>> Watched<F> {
    /// `task` under a watch of its own.
    pub fn new(task: F) -> Watched<F> {
        let watch = Arc::new(Watch::default());
        Watched { inner: Some(STREAM_WATCH.scope(watch.clone(), task)), watch }
    }
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let Some(inner) = this.inner.as_mut().as_pin_mut() else { return Poll::Ready(()) };
        let polls_before = this.watch.current().map(|stop| stop.body_polls.load(Ordering::Relaxed));
        if inner.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        // The exchange may have handed its stop to the watch during that poll.
        let Some(stop) = this.watch.current() else { return Poll::Pending };
        if let Poll::Ready(limit) = stop.poll_stalled(cx, polls_before) {
            // A client can do this at will: counted, and logged at debug as HTTP/1.1's is.
            crate::metrics::send_timeout();
            tracing::debug!(timeout = ?limit, "the client took nothing of its answer for send_timeout; its stream is reset");
        } else {
            let reason = std::task::ready!(stop.poll_abandoned(cx)).http_end().label;
            tracing::info!(
                reason,
                "an answer not taken by its client within close_timeout after its session ended; its stream is reset"
            );
        }
        this.inner.set(None);
        Poll::Ready(())
    }
}

/// A governed exchange's session (an upload in flight, a response body in flight, or both):
/// its registry entry, what ends it, and how; its end-of-session line when it drops.
pub struct Governance {
    /// What ends the session (polled through [`Governance::poll_stop`], which ends the upload
    /// too, and by the stream's [`Watch`]).
    stop: Arc<Stop>,
    /// The `/sessions` entry, removed when the stream ends.
    pub session: SessionGuard,
    /// The stream's places under the subject's session caps, freed when it ends.
    pub(crate) slots: Vec<super::SubjectSlot>,
    /// How the body ends when the session is stopped.
    pub cut: Cut,
    /// The session's clock, which its stop and its upload read.
    clock: Clock,
    /// When the session was registered, for the end-of-session line.
    started: Instant,
    /// How the session ended, once its owner knows; written in the end-of-session line when
    /// the governance drops (a client gone, when nobody said).
    end: Option<crate::session::SessionEnd>,
}

/// How a governed body ends when its session is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// With its last chunk: the client sees a complete response and (an EventSource, an NDJSON
    /// reader) reconnects. For streams of self-delimited events.
    Clean,
    /// Aborted (HTTP/1.1: the connection closes without the last chunk; HTTP/2: the stream is
    /// reset), so a download cut short never looks complete.
    Abort,
}

impl Cut {
    /// `Clean` for bodies made of self-delimited events (`text/event-stream`, NDJSON and JSON
    /// lines), `Abort` for every other body.
    pub fn for_content_type(content_type: Option<&str>) -> Cut {
        let essence = content_type.and_then(|v| v.split(';').next()).map(|v| v.trim().to_ascii_lowercase());
        match essence.as_deref() {
            Some(
                "text/event-stream"
                | "application/x-ndjson"
                | "application/ndjson"
                | "application/jsonl"
                | "application/x-jsonlines"
                | "application/stream+json"
                | "application/json-seq",
            ) => Cut::Clean,
            _ => Cut::Abort,
        }
    }
}

impl Governance {
    /// Ends on the session's stop (a drain after a random delay within `drain_spread`), at
    /// `expires_at` (the token's expiry plus leeway, when the route enforces it) or after
    /// `lifetime` (the route's `max_lifetime`, `None` for no limit). The session's time runs
    /// from now, as a WebSocket's runs from its relay's start.
    pub fn new(
        session: SessionGuard,
        expires_at: Option<tokio::time::Instant>,
        lifetime: Option<Duration>,
        drain_spread: Duration,
        cut: Cut,
        close_within: Duration,
    ) -> Governance {
        // The session's clock: the token's expiry and the lifetime (a governed exchange has no
        // idle timeout and no pings of the proxy's).
        let clock = Clock::with(lifetime.unwrap_or(Duration::ZERO), Duration::ZERO, expires_at);
        let (control, stop_clock) = (session.entry().control.clone(), clock.clone());
        let future: StopFuture = Box::pin(async move {
            tokio::select! {
                reason = control.wait_spread(drain_spread) => Cause::from(reason),
                due = stop_clock.until_due() => Cause::from(due),
            }
        });
        let stop = Arc::new(Stop {
            future: Mutex::new(future),
            reason: std::sync::OnceLock::new(),
            upload: std::sync::OnceLock::new(),
            polled: AtomicBool::new(false),
            close_within,
            abandon: Mutex::new(None),
            stall: Mutex::new(None),
            body_polls: AtomicU64::new(0),
            body_handed: AtomicBool::new(false),
        });
        Governance { stop, session, slots: Vec::new(), cut, clock, started: Instant::now(), end: None }
    }

    /// The signal that ends the exchange's upload (see [`UploadEnd`]).
    pub fn end_upload(&mut self) -> Arc<UploadEnd> {
        let end = Arc::new(UploadEnd {
            outcome: std::sync::OnceLock::new(),
            waker: futures_util::task::AtomicWaker::new(),
            control: self.session.entry().control.clone(),
            clock: self.clock.clone(),
            grace: std::sync::OnceLock::new(),
        });
        let _ = self.stop.upload.set(end.clone());
        end
    }

    /// Ends the session at `at` for `reason` too, if nothing ends it before.
    pub fn end_at(&mut self, at: tokio::time::Instant, reason: Cause) {
        let mut future = locked(&self.stop.future);
        let stop = std::mem::replace(&mut *future, Box::pin(std::future::pending()));
        *future = Box::pin(async move {
            tokio::select! {
                r = stop => r,
                () = tokio::time::sleep_until(at) => reason,
            }
        });
        drop(future);
        if let Some(end) = self.stop.upload.get() {
            let _ = end.grace.set((at, reason));
        }
    }

    /// Ready with the reason once the session must end; its upload, if still in flight, is
    /// ended then too. How the handler and the body poll the stop (the watch polls it when
    /// they do not).
    pub fn poll_stop(&mut self, cx: &mut Context<'_>) -> Poll<Cause> {
        self.stop.polled.store(true, Ordering::Relaxed);
        self.stop.poll(cx)
    }

    /// Hands the exchange's stop to what serves its stream: `conn`'s watch (HTTP/1.1), else the
    /// watch of the HTTP/2 stream whose task this is, which also drops the stream when its
    /// client takes nothing of the answer for `send_timeout` ([`Stall`]). Called when its
    /// response body goes to hyper, which may then stop polling it.
    pub fn watched_by(&self, conn: Option<&Watch>, send_timeout: Duration) {
        let set = |w: &Watch| *locked(&w.current) = Arc::downgrade(&self.stop);
        let watched = match conn {
            Some(w) => {
                set(w);
                true
            }
            None => {
                if !send_timeout.is_zero() {
                    *locked(&self.stop.stall) = Some(Stall { within: send_timeout, since: None, timer: None });
                }
                STREAM_WATCH.try_with(|w| set(w)).is_ok()
            }
        };
        if !watched {
            // Every HTTP/2 stream's task runs under `Watched` (the connection's executor).
            debug_assert!(watched, "a governed answer served outside any watch");
            tracing::warn!("a governed answer is served outside any watch: a client that takes none of it keeps it");
        }
    }

    /// How the session ended while nothing polled its stop (a request waiting for its answer),
    /// if it did: a stop, or a deadline passed.
    pub fn ended_while_waiting(&self) -> Option<Cause> {
        let control = &self.session.entry().control;
        let due = || self.clock.due(tokio::time::Instant::now()).map(Cause::from);
        self.stop.reason.get().copied().or_else(|| control.stopped().map(Cause::from)).or_else(due)
    }

    /// The session ended for `reason` while its member worked: its answer is given the route's
    /// close_timeout to be delivered before the end applies, and no more (the
    /// watch's grace runs from now too). A stop that comes after (a revocation of a session
    /// whose token expired in the wait) ends it at once.
    pub fn defer_end(&mut self, reason: Cause) {
        let within = self.stop.close_within;
        let control = self.session.entry().control.clone();
        let later = control.stopped().is_none();
        let mut future = locked(&self.stop.future);
        *future = Box::pin(async move {
            tokio::select! {
                () = tokio::time::sleep(within) => reason,
                stop = control.wait(), if later => Cause::from(stop),
            }
        });
        drop(future);
        let mut abandon = locked(&self.stop.abandon);
        *abandon = Some(Box::pin(tokio::time::sleep(within)));
    }

    /// The body is polled ([`Stall`]).
    fn polled(&self) {
        self.stop.body_polls.fetch_add(1, Ordering::Relaxed);
    }

    /// What the body's poll gave hyper: a frame (`true`), or nothing yet ([`Stall`]).
    fn gave(&self, handed: bool) {
        self.stop.body_handed.store(handed, Ordering::Relaxed);
    }

    /// The largest frame to hand hyper: [`H2_FRAME`] on HTTP/2, where the stream has a send
    /// deadline ([`Stall`]); no limit on HTTP/1.1.
    fn frame_limit(&self) -> usize {
        if locked(&self.stop.stall).is_some() {
            H2_FRAME
        } else {
            usize::MAX
        }
    }

    /// The reason the session's stop gave, once it did.
    fn stopped(&self) -> Option<Cause> {
        self.stop.reason.get().copied()
    }

    /// Says how the session ended, for its end-of-session line: for `reason` by `initiator`,
    /// after `bytes` (from the client, from the backend).
    pub fn ended(&mut self, reason: &'static str, initiator: crate::session::Initiator, bytes: [u64; 2]) {
        self.end = Some(crate::session::SessionEnd { close_code: None, initiator, reason, bytes, frames: [0, 0] });
    }
}

impl Drop for Governance {
    /// The session's one end-of-session line, however the exchange ended (dropped unanswered
    /// too: an HTTP/2 client that reset its stream); and an exchange's upload does not outlive
    /// its session, nor its response.
    fn drop(&mut self) {
        if let Some(end) = self.stop.upload.get() {
            end.set(UploadOutcome::AnswerEnded);
        }
        // Dropped with no end said: its client left, or the drain's drain_timeout cut it.
        let mut record = self.end.take().unwrap_or_else(|| self.session.abandoned().end([0, 0]));
        // An upload its session cut says why the session ended, whatever became of an answer
        // nobody polled after that.
        if let Some(cut) = self.stop.upload.get().and_then(|u| u.cut_for()) {
            (record.reason, record.initiator) = (cut.http_end().label, crate::session::Initiator::Proxy);
        }
        crate::session::close::log_end(self.session.entry(), self.started, &record);
    }
}

/// Chunks up to this size are joined with those already received behind them.
const COALESCE_BELOW: usize = 4 * 1024;
/// A joined chunk grows to at most about this size.
const COALESCE_MAX: usize = 16 * 1024;

/// What the coalescing read found behind the data it joined, returned by the next poll.
enum Held {
    Frame(Frame<Bytes>),
    Error(hyper::Error),
    End,
}

/// How a response body ended: its label in the access log, the event-stream metric and the
/// session's end line, and who ended it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyEnd {
    /// Passed on whole.
    Complete,
    /// The backend's body failed.
    BackendError,
    /// The backend sent nothing for `idle_body_timeout`.
    IdleTimeout,
    /// The client went before the end.
    ClientGone,
    /// Its session ended.
    Ended(Cause),
}

impl BodyEnd {
    fn label(self) -> &'static str {
        match self {
            BodyEnd::Complete => "complete",
            BodyEnd::BackendError => "backend_error",
            BodyEnd::IdleTimeout => "idle_timeout",
            BodyEnd::ClientGone => crate::session::close::Abandoned::ClientGone.label(),
            BodyEnd::Ended(reason) => reason.http_end().label,
        }
    }

    fn initiator(self) -> crate::session::Initiator {
        match self {
            BodyEnd::ClientGone => crate::session::close::Abandoned::ClientGone.initiator(),
            BodyEnd::Complete | BodyEnd::BackendError => crate::session::Initiator::Backend,
            BodyEnd::IdleTimeout | BodyEnd::Ended(_) => crate::session::Initiator::Proxy,
        }
    }
}

/// A backend's response body on its way to the client.
pub struct Download {
    inner: Incoming,
    held: Option<Held>,
    /// What is left of a frame larger than `max_frame`, handed hyper next.
    rest: Bytes,
    /// The largest frame handed hyper at once ([`Stall`]).
    max_frame: usize,
    idle: Idle,
    governance: Option<Governance>,
    /// An event stream (SSE): counted and logged as one.
    sse: bool,
    exchange: Exchange,
    sent: u64,
    /// How the body ended, once it did.
    end: Option<BodyEnd>,
    /// The body's length, when the member gave one.
    length: Option<u64>,
    _least_conns: Option<ConnGuard>,
    _stream: super::http::StreamHold,
    /// An event stream's keep-alive comments, when on.
    keepalive: Option<KeepAlive>,
}

/// The comment an idle event stream gets: ignored by every SSE parser, seen by every
/// intermediary as traffic.
const KEEPALIVE_COMMENT: &[u8] = b": keep-alive\n\n";

/// An event stream's keep-alive: a comment after `every` without data from the backend, written
/// only between events (never inside one the backend is still sending).
struct KeepAlive {
    every: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The last bytes sent, to tell whether the stream stands between events.
    tail: [u8; 4],
}

impl KeepAlive {
    fn new(every: Duration) -> KeepAlive {
        // Nothing sent yet: between events.
        KeepAlive { every, sleep: None, tail: *b"\n\n\n\n" }
    }

    fn sent(&mut self, data: &[u8]) {
        self.sleep = None;
        match data.len() {
            n if n >= 4 => self.tail.copy_from_slice(&data[n - 4..]),
            _ => {
                for &b in data {
                    self.tail.rotate_left(1);
                    self.tail[3] = b;
                }
            }
        }
    }

    /// Whether the stream ends with a blank line (an event's end): a line terminator (`\r\n`,
    /// `\r` or `\n`) right after another.
    fn between_events(&self) -> bool {
        let eol = |b: u8| b == b'\r' || b == b'\n';
        let t = &self.tail;
        if t[2] == b'\r' && t[3] == b'\n' {
            eol(t[1])
        } else {
            eol(t[3]) && eol(t[2])
        }
    }

    /// The comment, once `every` has passed without data (the stream stands between events).
    fn poll_due(&mut self, cx: &mut Context<'_>) -> Option<Bytes> {
        let every = self.every;
        let sleep = self.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
        if sleep.as_mut().poll(cx).is_pending() {
            return None;
        }
        self.sleep = None;
        Some(Bytes::from_static(KEEPALIVE_COMMENT))
    }
}

impl Download {
    /// Sends a comment on an event stream that has been idle for `every` (see
    /// `[backend] sse_keepalive`); such a stream is not cut for the backend's silence.
    pub fn keep_alive(&mut self, every: Duration) {
        // A body of a declared length has no room for a comment: it would take the place of the
        // member's last bytes.
        if self.sse && !every.is_zero() && self.inner.size_hint().exact().is_none() {
            self.keepalive = Some(KeepAlive::new(every));
        }
    }

    /// Holds what an HTTP/2 stream holds (its per-address place, its open count) until the
    /// body ends.
    pub fn hold_stream(&mut self, hold: super::http::StreamHold) {
        self._stream = hold;
    }

    /// Streams `inner` under `governance` (every body still in flight has one); `sse` for an
    /// event stream.
    pub fn new(
        inner: Incoming,
        idle: Duration,
        governance: Option<Governance>,
        sse: bool,
        exchange: Exchange,
        least_conns: Option<ConnGuard>,
    ) -> Download {
        if sse {
            exchange.metrics.sse_streams_active.increment(1.0);
        }
        Download {
            length: inner.size_hint().exact(),
            inner,
            held: None,
            rest: Bytes::new(),
            max_frame: governance.as_ref().map_or(usize::MAX, Governance::frame_limit),
            idle: Idle::new(idle),
            governance,
            sse,
            exchange,
            sent: 0,
            end: None,
            _least_conns: least_conns,
            _stream: Default::default(),
            keepalive: None,
        }
    }

    /// Joins small chunks that have already arrived behind `first` (an SSE burst, a chunked
    /// body read in pieces): fewer, larger writes to the client, and no wait added, since only
    /// what is ready now is taken.
    fn coalesce(&mut self, first: Bytes, cx: &mut Context<'_>) -> Bytes {
        if first.len() >= COALESCE_BELOW {
            return first;
        }
        let mut joined: Option<bytes::BytesMut> = None;
        while joined.as_ref().map_or(first.len(), |j| j.len()) < COALESCE_MAX {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(more) => {
                        joined.get_or_insert_with(|| bytes::BytesMut::from(&first[..])).extend_from_slice(&more)
                    }
                    Err(other) => {
                        self.held = Some(Held::Frame(other));
                        break;
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    self.held = Some(Held::Error(e));
                    break;
                }
                Poll::Ready(None) => {
                    self.held = Some(Held::End);
                    break;
                }
                Poll::Pending => break,
            }
        }
        joined.map_or(first, bytes::BytesMut::freeze)
    }
}

impl Download {
    /// The next frame for hyper (see [`Body::poll_frame`]).
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self;
        if this.end.is_some() {
            return Poll::Ready(None);
        }
        if let Some(g) = this.governance.as_mut() {
            if let Poll::Ready(reason) = g.poll_stop(cx) {
                this.end = Some(BodyEnd::Ended(reason));
                return match g.cut {
                    // hyper writes the last chunk: a complete response, and (an EventSource)
                    // the client reconnects.
                    Cut::Clean => Poll::Ready(None),
                    // hyper aborts the response: the client sees it cut.
                    Cut::Abort => Poll::Ready(Some(Err(BodyError::Ended(reason).into()))),
                };
            }
        }
        // What is left of a frame too large to hand hyper at once comes first.
        let rest = std::mem::take(&mut this.rest);
        let from_rest = !rest.is_empty();
        let next = if from_rest { None } else { this.held.take() };
        let polled = match next {
            _ if from_rest => Poll::Ready(Some(Ok(Frame::data(rest)))),
            Some(Held::Frame(f)) => Poll::Ready(Some(Ok(f))),
            Some(Held::Error(e)) => Poll::Ready(Some(Err(e))),
            Some(Held::End) => Poll::Ready(None),
            None => Pin::new(&mut this.inner).poll_frame(cx),
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle.moved();
                let frame = match frame.into_data() {
                    Ok(data) => {
                        let mut data = if from_rest { data } else { this.coalesce(data, cx) };
                        if data.len() > this.max_frame {
                            this.rest = data.split_off(this.max_frame);
                        }
                        if let Some(k) = this.keepalive.as_mut() {
                            k.sent(&data);
                        }
                        let n = data.len() as u64;
                        this.sent += n;
                        this.exchange.metrics.http_body_bytes(Direction::BackendToClient, n);
                        if let Some(g) = &this.governance {
                            g.session.entry().control.bytes.from_backend.fetch_add(n, Ordering::Relaxed);
                        }
                        Frame::data(data)
                    }
                    Err(other) => other,
                };
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.end = Some(BodyEnd::BackendError);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.end = Some(BodyEnd::Complete);
                Poll::Ready(None)
            }
            // A kept-alive event stream between events is governed (expiry, revocation,
            // lifetime, drain): the backend's silence there does not end it. Silent in the middle
            // of an event, it is cut after idle_body_timeout like any body.
            Poll::Pending => match this.keepalive.as_mut().filter(|k| k.between_events()) {
                Some(k) => match k.poll_due(cx) {
                    Some(comment) => Poll::Ready(Some(Ok(Frame::data(comment)))),
                    None => Poll::Pending,
                },
                None => match this.idle.poll_expired(cx) {
                    true => {
                        this.end = Some(BodyEnd::IdleTimeout);
                        Poll::Ready(Some(Err(BodyError::Idle(this.idle.limit).into())))
                    }
                    false => Poll::Pending,
                },
            },
        }
    }
}

impl Body for Download {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(g) = &this.governance {
            g.polled();
        }
        let polled = this.poll_body(cx);
        if let Some(g) = &this.governance {
            g.gave(matches!(polled, Poll::Ready(Some(Ok(_)))));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let none_held = self.held.is_none() && self.rest.is_empty();
        self.end.is_some()
            || (self.governance.is_none() && none_held && self.inner.is_end_stream())
            || (self.rest.is_empty() && matches!(self.held, Some(Held::End)))
            // All of a declared length is passed on: the last frame ends the stream, with no
            // further poll (on HTTP/2, a poll that would wait for window the client owes nothing).
            || (none_held && self.length.is_some_and(|n| n == self.sent))
    }

    fn size_hint(&self) -> SizeHint {
        if self.held.is_some() || !self.rest.is_empty() {
            // Part of the body was taken ahead; what is left is no longer known exactly.
            return SizeHint::default();
        }
        self.inner.size_hint()
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        let sse = self.sse;
        if sse {
            self.exchange.metrics.sse_streams_active.decrement(1.0);
        }
        // A body of known length is not read to its end by hyper once it has written that
        // length: it is complete when all of it was passed on.
        let whole = self.length.is_some_and(|n| n == self.sent);
        // A body hyper did not poll after its session ended (dropped with its stream) ended for
        // the session's reason.
        let stopped = || self.governance.as_ref().and_then(Governance::stopped).map(BodyEnd::Ended);
        // Else its client left, or the drain's drain_timeout cut it.
        let abandoned = || match self.governance.as_ref().map(|g| g.session.abandoned()) {
            Some(crate::session::close::Abandoned::Drain) => BodyEnd::Ended(Cause::Drain),
            _ => BodyEnd::ClientGone,
        };
        let end = self.end.or_else(|| whole.then_some(BodyEnd::Complete)).or_else(stopped).unwrap_or_else(abandoned);
        self.exchange.finish(sse, self.sent, end.label());
        // A governed body is a session: it ends with the line every session ends with (written
        // when its governance drops, below).
        if let Some(g) = &mut self.governance {
            let upload = self.exchange.upload.as_ref().map_or(0, |u| u.bytes());
            g.ended(end.label(), end.initiator(), [upload, self.sent]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::KeepAlive;

    fn after(chunks: &[&[u8]]) -> bool {
        let mut k = KeepAlive::new(std::time::Duration::from_secs(1));
        for c in chunks {
            k.sent(c);
        }
        k.between_events()
    }

    #[test]
    fn a_comment_goes_only_between_events() {
        assert!(after(&[]), "nothing sent yet");
        assert!(after(&[b"data: a\n\n"]));
        assert!(after(&[b"data: a\r\n\r\n"]));
        assert!(after(&[b"data: a\r\r"]));
        assert!(after(&[b"data: a\n", b"\n"]), "the blank line in a chunk of its own");
        assert!(after(&[b"data: a\r\n", b"\r", b"\n"]));
        assert!(!after(&[b"data: a\n"]), "an event still open");
        assert!(!after(&[b"data: a\r\n"]));
        assert!(!after(&[b"data: a"]));
        assert!(!after(&[b"data: a\n\n", b"data: b"]));
        assert!(!after(&[b"data: a\n\n", b"d", b"\n"]));
    }
}
