//! The one session model: who the two sides are ([`Side`], defined in [`crate::codec`]), the
//! record every kind of session registers ([`SessionEntry`]: a relayed WebSocket, a fan-out
//! client, an observer, an SSE or other streamed response), how a session ended, the stop handle
//! each session's task watches (drain, revocation, route removal, rebalance), and the registry
//! behind `/sessions`; the interfaces features plug into: [`FinishStream`] (how a session's
//! stream is finished, and held while its client is away), [`PayloadSink`] and [`Taps`] (what a
//! relayed session's payloads are shown to), [`Attachment`] (what a feature adds to a session's
//! record).
//!
//! Beside it, the pieces every kind shares: [`clock`] (the deadlines), [`close`] (the close
//! table and the one end-of-session record), [`subscriber`] (what subscribers of a shared source
//! have in common). Below it, the features, each one module that owns its registry and its task
//! and imports no other: [`resume`], [`observe`], [`fanout`], [`recording`].
//!
//! Every session gets a [`SessionControl`]: the first [`StopReason`] set on it wins and wakes the
//! session's task, so stopping one control stops just that session. [`Sessions::drain`] cancels
//! the registry's token, the process's one drain signal ([`Sessions::drain_signal`]), and stops
//! every session registered before or after it, each closing at a random point within
//! `drain_spread` ([`drain_delay`]).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

pub mod clock;
pub mod close;
pub mod fanout;
pub mod observe;
pub(crate) mod rate;
pub mod recording;
pub mod resume;
pub mod subscriber;

pub use crate::codec::Side;

/// The direction of bytes read from `side`.
pub fn direction(side: Side) -> crate::metrics::Direction {
    match side {
        Side::Client => crate::metrics::Direction::ClientToBackend,
        Side::Backend => crate::metrics::Direction::BackendToClient,
    }
}

/// Who ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    /// The client sent a close frame or went away.
    Client,
    /// The backend sent a close frame or went away.
    Backend,
    /// The proxy closed the session (a deadline, limit or violation; drain, revocation, route
    /// removal or rebalance; a recording gap; a fan-out client or observer that fell behind,
    /// sent what it may not, or lost what it reads).
    Proxy,
}

impl Initiator {
    /// Every initiator, for pre-registering the metrics labelled by it.
    pub const ALL: [Initiator; 3] = [Initiator::Client, Initiator::Backend, Initiator::Proxy];

    /// Label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Initiator::Client => "client",
            Initiator::Backend => "backend",
            Initiator::Proxy => "proxy",
        }
    }
}

/// How a session ended, for the session log line and metrics.
#[derive(Debug, Clone)]
pub struct SessionEnd {
    /// Close code seen by the client (sent by the backend or the proxy), if any.
    pub close_code: Option<u16>,
    /// Who started the close.
    pub initiator: Initiator,
    /// Why: its cause's label ([`close::Cause::label`]: `client_close`, `idle_timeout`, ...), or
    /// a governed exchange's own end (`complete`, `client_gone`, ...).
    pub reason: &'static str,
    /// Bytes read from the client and from the backend.
    pub bytes: [u64; 2],
    /// Data and control frames read from the client and from the backend.
    pub frames: [u64; 2],
}

/// What holds a session's places under its subject's caps (on this instance, and with
/// `subject_caps = "reserved"` in the fleet's store) until it is dropped: the admission stage's,
/// opaque to the session layer.
pub type CapPlaces = Box<dyn Send + Sync>;

/// Why a session was told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The proxy is draining (SIGTERM or SIGINT, or after a handover): close with 1001 "going
    /// away", spread over time.
    Drain,
    /// An operator revoked the session: close with 1008 "session revoked" at once.
    Revoked,
    /// A reload removed the session's route and the grace period ended: 1001 "route removed".
    RouteRemoved,
    /// An operator rebalanced the route (`POST /sessions/rebalance`): 1001 "rebalance", so the
    /// client reconnects and the balance policy places it again.
    Rebalance,
}

/// Stop signal and reason for one session, and its live byte counters: one allocation per
/// session and nothing per waiter (the session's task registers its waker here), so that an idle
/// session pays for no cancellation tree node or boxed wait future.
#[derive(Debug)]
pub struct SessionControl {
    /// [`RUNNING`], or the [`StopReason`] the session was stopped for (the first one wins).
    state: AtomicU8,
    waker: AtomicWaker,
    /// Bytes relayed so far, shown by `/sessions`.
    pub bytes: SessionBytes,
    /// Set once the session's one end-of-session line is written ([`close::log_end`]).
    logged: std::sync::atomic::AtomicBool,
}

/// [`SessionControl::state`] of a session not stopped.
const RUNNING: u8 = u8::MAX;

impl SessionControl {
    /// A running session's control.
    pub fn new() -> Arc<Self> {
        Arc::new(SessionControl {
            state: AtomicU8::new(RUNNING),
            waker: AtomicWaker::new(),
            bytes: SessionBytes::default(),
            logged: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// `bytes` moved from `from`, `data` data frames among them: counted in the session's live
    /// record (`/sessions`) and the relay metrics. Every kind of session that moves frames (a
    /// relayed session, a fan-out client, an observer) counts through here.
    pub(crate) fn moved(&self, metrics: &crate::metrics::Metrics, from: Side, bytes: u64, data: u64) {
        let counter = match from {
            Side::Client => &self.bytes.from_client,
            Side::Backend => &self.bytes.from_backend,
        };
        counter.fetch_add(bytes, Ordering::Relaxed);
        metrics.relay_bytes(direction(from), bytes, data);
    }

    /// Notes that the session's end-of-session line is written; false if it already was.
    pub(crate) fn log_once(&self) -> bool {
        !self.logged.swap(true, Ordering::AcqRel)
    }

    /// Why the session was stopped, once it was.
    pub fn stopped(&self) -> Option<StopReason> {
        match self.state.load(Ordering::Acquire) {
            RUNNING => None,
            r if r == StopReason::Revoked as u8 => Some(StopReason::Revoked),
            r if r == StopReason::RouteRemoved as u8 => Some(StopReason::RouteRemoved),
            r if r == StopReason::Rebalance as u8 => Some(StopReason::Rebalance),
            _ => Some(StopReason::Drain),
        }
    }

    /// Stops this session for `reason` (a session already stopped keeps its first reason).
    pub fn stop(&self, reason: StopReason) {
        if self.state.compare_exchange(RUNNING, reason as u8, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            self.waker.wake();
        }
    }

    /// Ready with the reason once the session is stopped; otherwise the task is woken then.
    pub fn poll_stopped(&self, cx: &mut Context<'_>) -> Poll<StopReason> {
        if let Some(r) = self.stopped() {
            return Poll::Ready(r);
        }
        self.waker.register(cx.waker());
        match self.stopped() {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }

    /// Resolves with the reason once the session is stopped.
    pub async fn wait(&self) -> StopReason {
        std::future::poll_fn(|cx| self.poll_stopped(cx)).await
    }

    /// [`SessionControl::wait`], with a drain spread: a drained session's stop comes after a
    /// random [`drain_delay`] within `spread`, so the sessions of a draining process do not all
    /// reconnect at once. For the sessions without a timer of their own (fan-out clients,
    /// observers, streamed responses); the relay puts the same delay on its timer.
    pub async fn wait_spread(&self, spread: std::time::Duration) -> StopReason {
        let reason = self.wait().await;
        if reason == StopReason::Drain {
            tokio::time::sleep(drain_delay(spread)).await;
        }
        reason
    }
}

/// How long a drained session waits before it closes: random within `spread` (none for a
/// zero spread). The one place the drain spread is drawn.
pub fn drain_delay(spread: std::time::Duration) -> std::time::Duration {
    let spread = spread.as_millis() as u64;
    std::time::Duration::from_millis(if spread == 0 { 0 } else { rand::random::<u64>() % spread })
}

/// Bytes relayed by a session so far (read from the client, read from the backend).
#[derive(Debug, Default)]
pub struct SessionBytes {
    /// Bytes read from the client.
    pub from_client: std::sync::atomic::AtomicU64,
    /// Bytes read from the backend.
    pub from_backend: std::sync::atomic::AtomicU64,
}

/// What kind of session: a WebSocket, a streamed response (SSE or other), or an observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    /// A WebSocket relayed frame by frame to its own backend, or a fan-out client of a shared
    /// backend stream.
    WebSocket,
    /// A `text/event-stream` response (SSE) streamed chunk by chunk.
    Sse,
    /// Any other response body in flight (NDJSON, a long-poll, a download), or a request whose
    /// body is still uploading (the exchange, through its response): governed like an event
    /// stream; counted under subject caps when its length is unknown
    /// ([`SessionEntry::counted`]).
    Stream,
    /// A read-only observer of another session: its own token's expiry, revocation, drain and
    /// subject caps apply to it.
    Observer,
}

/// A session's kind, which a plain exchange learns from its answer: registered at its request's
/// head as a [`SessionKind::Stream`], it is an event stream when its answer is one.
#[derive(Debug)]
pub struct KindCell(std::sync::atomic::AtomicU8);

impl From<SessionKind> for KindCell {
    fn from(kind: SessionKind) -> KindCell {
        KindCell((kind as u8).into())
    }
}

impl KindCell {
    /// The kind now.
    pub fn get(&self) -> SessionKind {
        match self.0.load(Ordering::Acquire) {
            k if k == SessionKind::WebSocket as u8 => SessionKind::WebSocket,
            k if k == SessionKind::Sse as u8 => SessionKind::Sse,
            k if k == SessionKind::Observer as u8 => SessionKind::Observer,
            _ => SessionKind::Stream,
        }
    }
}

impl SessionKind {
    /// Label for `/sessions` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionKind::WebSocket => "websocket",
            SessionKind::Sse => "sse",
            SessionKind::Stream => "stream",
            SessionKind::Observer => "observer",
        }
    }
}

/// What the registry knows of a live session.
#[derive(Debug)]
pub struct SessionEntry {
    /// Process-unique session id.
    pub id: u64,
    /// WebSocket, SSE, other stream or observer.
    pub kind: KindCell,
    /// Route name.
    pub route: String,
    /// The `{agent}` capture, if the route has one.
    pub agent: Option<String>,
    /// Verified subject, when the route requires a token.
    pub subject: Option<String>,
    /// The token's issuer (`iss`), if any.
    pub issuer: Option<String>,
    /// Token id (`jti`), if any.
    pub jti: Option<String>,
    /// Token expiry (Unix seconds), if any.
    pub token_exp: Option<u64>,
    /// When its token was issued (`iat`, Unix seconds), if it says: a subject's revocation
    /// read again spares a later login's session by it, as the denylist spares its token.
    pub token_iat: Option<u64>,
    /// The fingerprint of the key that verified its token: the session ends when that key
    /// leaves the keys in force (a JWKS fetch retires it, a reload removes it).
    pub token_key: Option<[u8; 32]>,
    /// Counted under the subject's session caps: every session but an exchange whose bodies
    /// are of known length (transfers that end) and a stream over the caps (which ends after a
    /// grace). An exchange registered for its upload is counted from its response on when that
    /// is a stream ([`SessionGuard::count`]).
    pub(crate) counted: std::sync::atomic::AtomicBool,
    /// Client address.
    pub client: std::net::SocketAddr,
    /// The client's HTTP version: `http/1.1` or `h2`.
    pub http: &'static str,
    /// Backend member; unset while the backend connect runs, and never set on an observer.
    pub backend: std::sync::OnceLock<String>,
    /// Start time.
    pub started: std::time::SystemTime,
    /// Stop handle and live byte counters.
    pub control: Arc<SessionControl>,
    /// What features attached to it (its observer hub, its resume record): the one way a
    /// feature reaches the record, which has no field of any feature's.
    pub attached: Vec<Arc<dyn Attachment>>,
}

impl SessionEntry {
    /// The feature state of type `T` attached to the session, if any.
    pub fn attachment<T: Attachment>(&self) -> Option<Arc<T>> {
        self.attached.iter().find_map(|a| a.clone().into_any().downcast::<T>().ok())
    }
}

/// What a feature attaches to a session's record ([`SessionEntry::attached`]): what
/// `/sessions` shows of it, and what revocation must know of it.
pub trait Attachment: std::fmt::Debug + Send + Sync + 'static {
    /// Its key in the session's `/sessions` entry, and the value there.
    fn shown(&self) -> (&'static str, serde_json::Value);

    /// A token id, besides the one the session was opened with, whose revocation closes the
    /// session (the token that resumed it).
    fn revoking_jti(&self) -> Option<String> {
        None
    }

    /// For [`SessionEntry::attachment`].
    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync>;
}

/// Which sessions to revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// One session by id.
    Id(u64),
    /// Every session of a subject: of one issuer, or of every issuer when `issuer` is `None`.
    Subject {
        /// The `sub` claim.
        subject: String,
        /// The `iss` claim, when the revocation is for one issuer's subject.
        issuer: Option<String>,
    },
    /// Every session to an agent.
    Agent(String),
    /// Every session opened with a token id (of one issuer, or of any when `issuer` is `None`:
    /// token ids are unique per issuer only).
    Jti {
        /// The token id.
        jti: String,
        /// The issuer that narrows it.
        issuer: Option<String>,
    },
}

impl Selector {
    /// Whether a session of `subject` at `issuer`, to `agent`, is one this selects, as far as
    /// those say: `None` for a session id or a token id, which they do not. The one rule for a
    /// subject's and an agent's sessions, here and in the fleet's directory.
    pub fn selects(&self, subject: Option<&str>, issuer: Option<&str>, agent: Option<&str>) -> Option<bool> {
        match self {
            Selector::Subject { subject: s, issuer: i } => {
                Some(subject == Some(s.as_str()) && i.as_ref().is_none_or(|i| issuer == Some(i.as_str())))
            }
            Selector::Agent(a) => Some(agent == Some(a.as_str())),
            Selector::Id(_) | Selector::Jti { .. } => None,
        }
    }
}

/// Live sessions, for `/sessions`, revocation, rebalance and the drain.
#[derive(Debug, Default)]
pub struct Sessions {
    map: std::sync::Mutex<std::collections::HashMap<u64, Arc<SessionEntry>>>,
    /// The process's one drain signal: cancelled when the drain starts. Every session is then
    /// stopped, and so is one registered from then on; whatever else ends with the drain (a
    /// connection's HTTP serving, a fan-out stream's linger, `/ready`, a new upgrade or plain
    /// request, the configuration watcher, a removed route's grace timer) waits on or reads
    /// this token.
    drain: tokio_util::sync::CancellationToken,
    /// Set when the drain's `drain_timeout` passed: whatever is dropped from then on was cut
    /// by it, not left by its client.
    drain_over: std::sync::atomic::AtomicBool,
    /// The names of the routes in force (the configuration's, then each reload's): a session
    /// registered on another (its handshake began before a reload removed its route) is
    /// stopped at once, as [`Sessions::stop_removed`] stops those registered before.
    routes: arc_swap::ArcSwapOption<std::collections::HashSet<String>>,
    /// What learns of every session's start and end besides the registry (the fleet's
    /// directory), once set.
    watcher: std::sync::OnceLock<Arc<dyn Watcher>>,
}

/// What learns of every session's start and end besides the registry: the fleet's directory.
/// Called on the session's own path: it must not wait.
pub trait Watcher: Send + Sync + std::fmt::Debug {
    /// A session was registered.
    fn started(&self, entry: &SessionEntry);
    /// A session ended (its record leaves the registry).
    fn ended(&self, entry: &SessionEntry);
}

impl Sessions {
    /// Sets what learns of every session's start and end (once; later calls are ignored).
    pub fn watch(&self, watcher: Arc<dyn Watcher>) {
        let _ = self.watcher.set(watcher);
    }

    /// The drain signal (see [`Sessions::drain`]).
    pub fn drain_signal(&self) -> &tokio_util::sync::CancellationToken {
        &self.drain
    }

    /// True once the drain started.
    pub fn draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// The drain's `drain_timeout` passed: the connections left are closed from now on.
    pub fn drain_timed_out(&self) {
        self.drain_over.store(true, Ordering::Release);
    }

    /// True once the drain's `drain_timeout` passed: what ends unfinished now was cut by the
    /// drain.
    pub fn cut_by_drain(&self) -> bool {
        self.drain_over.load(Ordering::Acquire)
    }

    /// Registers a session; it is removed when the returned guard drops. During a drain it is
    /// stopped at once.
    pub fn register(self: &Arc<Self>, entry: SessionEntry) -> SessionGuard {
        let entry = Arc::new(entry);
        if let Ok(mut m) = self.map.lock() {
            m.insert(entry.id, entry.clone());
        }
        if let Some(w) = self.watcher.get() {
            w.started(&entry);
        }
        // After the insert: either this sees the drain, or the drain's walk sees the entry.
        if self.drain.is_cancelled() {
            entry.control.stop(StopReason::Drain);
        }
        // Likewise a reload that removed its route meanwhile.
        if self.routes.load().as_ref().is_some_and(|r| !r.contains(&entry.route)) {
            entry.control.stop(StopReason::RouteRemoved);
        }
        SessionGuard { sessions: self.clone(), entry }
    }

    /// Sets the routes in force (at start and at each reload): a session registered on
    /// another from now on is stopped at once.
    pub fn routes_in_force(&self, names: impl IntoIterator<Item = String>) {
        self.routes.store(Some(Arc::new(names.into_iter().collect())));
    }

    /// The live sessions on routes no longer in force.
    pub fn on_removed_routes(&self) -> Vec<Arc<SessionEntry>> {
        let routes = self.routes.load();
        let removed = |e: &Arc<SessionEntry>| routes.as_ref().is_some_and(|r| !r.contains(&e.route));
        self.list().into_iter().filter(removed).collect()
    }

    /// Starts the drain: stops every session (each spreads its close over `drain_spread`).
    pub fn drain(&self) {
        self.drain.cancel();
        for e in self.list() {
            e.control.stop(StopReason::Drain);
        }
    }

    /// How many sessions are live.
    pub fn len(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }

    /// True when no session is live.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The live session `id`, if any.
    pub fn get(&self, id: u64) -> Option<Arc<SessionEntry>> {
        self.map.lock().ok().and_then(|m| m.get(&id).cloned())
    }

    /// A snapshot of live sessions, oldest first.
    pub fn list(&self) -> Vec<Arc<SessionEntry>> {
        let mut v: Vec<_> = self.map.lock().map(|m| m.values().cloned().collect()).unwrap_or_default();
        v.sort_by_key(|e| e.id);
        v
    }

    /// A random `fraction` (0 to 1) of `route`'s live sessions that reconnect (not its plain
    /// exchanges in flight), rounded to the nearest whole session, and how many the route has;
    /// not stopped yet.
    pub fn sample_route(&self, route: &str, fraction: f64) -> (Vec<Arc<SessionEntry>>, usize) {
        use rand::seq::SliceRandom;
        // A plain exchange in flight (kind `stream`: a transfer, an upload, a request waiting for
        // its answer) ends by itself, and cutting it moves nothing: WebSockets, event streams
        // and observers reconnect.
        let picked = |e: &Arc<SessionEntry>| {
            e.route == route && e.kind.get() != SessionKind::Stream && e.control.stopped().is_none()
        };
        let mut on_route: Vec<_> = self.list().into_iter().filter(picked).collect();
        let total = on_route.len();
        let take = ((total as f64) * fraction.clamp(0.0, 1.0)).round() as usize;
        on_route.shuffle(&mut rand::rng());
        on_route.truncate(take);
        (on_route, total)
    }

    /// The live sessions `selector` matches (not stopped by it).
    pub fn matching(&self, selector: &Selector) -> Vec<Arc<SessionEntry>> {
        self.list()
            .into_iter()
            .filter(|e| match selector {
                Selector::Id(id) => e.id == *id,
                Selector::Subject { .. } | Selector::Agent(_) => {
                    selector.selects(e.subject.as_deref(), e.issuer.as_deref(), e.agent.as_deref()) == Some(true)
                }
                Selector::Jti { jti, issuer } => {
                    (e.jti.as_deref() == Some(jti.as_str())
                        || e.attached.iter().any(|a| a.revoking_jti().as_deref() == Some(jti.as_str())))
                        && issuer.as_ref().is_none_or(|iss| e.issuer.as_deref() == Some(iss.as_str()))
                }
            })
            .collect()
    }

    /// Stops the matching sessions but those `spare` says are not the revoked ones, with
    /// "session revoked"; returns them.
    pub fn revoke(&self, selector: &Selector, spare: Spare) -> Vec<Arc<SessionEntry>> {
        let mut matched = self.matching(selector);
        match spare {
            Spare::Nothing => {}
            Spare::StartedAfter(by) => matched.retain(|e| e.started <= by),
            // A token that does not say when it was issued cannot be told from the revoked
            // ones: it is cut, as the denylist refuses it.
            Spare::IssuedAfter(at) => matched.retain(|e| e.token_iat.is_none_or(|iat| iat <= at)),
        }
        for e in &matched {
            e.control.stop(StopReason::Revoked);
        }
        matched
    }
}

/// Which of a revocation's matching sessions are not the revoked ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spare {
    /// None: every matching session is cut.
    Nothing,
    /// Those that started after this time (an agent's lock cuts what reached the agent
    /// before it).
    StartedAfter(std::time::SystemTime),
    /// Those whose token was issued after this time (Unix seconds): a subject's new login,
    /// whenever its session started (one opened with a revoked token during an outage is cut
    /// when the lock is read).
    IssuedAfter(u64),
}

/// A registered session: its one record of who and where, removed from the registry when
/// dropped.
pub struct SessionGuard {
    sessions: Arc<Sessions>,
    entry: Arc<SessionEntry>,
}

impl SessionGuard {
    /// The session's record, as `/sessions` shows it.
    pub fn entry(&self) -> &SessionEntry {
        &self.entry
    }

    /// Counts the session under its subject's caps from now on (it holds its places), and
    /// tells the watcher again, whose record says what is counted.
    pub(crate) fn count(&self) {
        if !self.entry.counted.swap(true, Ordering::AcqRel) {
            if let Some(w) = self.sessions.watcher.get() {
                w.started(&self.entry);
            }
        }
    }

    /// How the session ended if it is dropped now without saying how (see
    /// [`close::Abandoned`]).
    pub fn abandoned(&self) -> close::Abandoned {
        close::Abandoned::of(&self.sessions)
    }

    /// The session is of `kind` from now on (a plain exchange whose answer is an event
    /// stream); the watcher is told again when that changes its record.
    pub(crate) fn becomes(&self, kind: SessionKind) {
        if self.entry.kind.0.swap(kind as u8, Ordering::AcqRel) != kind as u8 {
            if let Some(w) = self.sessions.watcher.get() {
                w.started(&self.entry);
            }
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        // Every session ends with its line. One whose task the drain's `drain_timeout`
        // dropped before it wrote one (a relay whose client did not answer the drain's close
        // within a longer `close_timeout`, a held session, an observer) ends `drain`, by the
        // proxy, with the bytes its counters have.
        if self.abandoned() == close::Abandoned::Drain && !self.entry.control.logged.load(Ordering::Acquire) {
            let bytes = &self.entry.control.bytes;
            let end = SessionEnd {
                bytes: [bytes.from_client.load(Ordering::Relaxed), bytes.from_backend.load(Ordering::Relaxed)],
                ..SessionEnd::of(close::Cause::Drain)
            };
            let lasted = std::time::SystemTime::now().duration_since(self.entry.started).unwrap_or_default();
            close::log_end_after(&self.entry, lasted, &end);
        }
        if let Ok(mut m) = self.sessions.map.lock() {
            m.remove(&self.entry.id);
        }
        if let Some(w) = self.sessions.watcher.get() {
            w.ended(&self.entry);
        }
    }
}

/// The relay's one interface to a session's streams: how a stream is finished when its session
/// ends, and, for a client stream a feature can hold while its client is away (resume's), the
/// hold.
///
/// A TCP stream needs nothing to finish: closing it sends the FIN, so a `shutdown(2)` first
/// would be one more system call per side for nothing. A TLS stream sends its `close_notify`.
///
/// The hold, in order: the relay asks for it when the client vanishes ([`FinishStream::hold`]);
/// while it lasts the stream buffers what is written to it; a new client that claims the
/// session is announced by [`FinishStream::poll_claim`] and taken ([`FinishStream::take_claim`])
/// or turned away ([`FinishStream::refuse_claim`]); a hold that ends without one is let go
/// ([`FinishStream::let_go`]). Streams that cannot be held keep the defaults.
pub trait FinishStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {
    /// Finishes the stream (by default, an orderly shutdown of its write side).
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(self).poll_shutdown(cx)
    }

    /// The client vanished: drop its connection and hold the session for a new one. Returns
    /// how long the session is held, or `None` when this stream cannot be held.
    fn hold(&mut self) -> Option<std::time::Duration> {
        None
    }

    /// Ready when a new client has claimed the session (it waits in the stream until taken or
    /// refused). Never ready for a stream that cannot be held.
    fn poll_claim(&mut self, _cx: &mut Context<'_>) -> Poll<()> {
        Poll::Pending
    }

    /// Attaches the client [`FinishStream::poll_claim`] announced, in place of the held one;
    /// returns when its token expires (when the route enforces it).
    fn take_claim(&mut self) -> Option<tokio::time::Instant> {
        None
    }

    /// Turns away the client [`FinishStream::poll_claim`] announced: the session is ending, or
    /// its client cannot be held now.
    fn refuse_claim(&mut self) {}

    /// The hold ended without a new client: `why` is `window`, `overflow` or `closed`.
    fn let_go(&mut self, _why: &'static str) {}
}

/// How far a stream's end has gone once its session ended: see [`poll_end`].
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Being finished ([`FinishStream::poll_finish`]: a TLS `close_notify`); then a lingering
    /// close when `lingering`.
    #[default]
    Finishing,
    /// Its write side being shut down (the FIN), before the lingering close reads.
    HalfClosing,
    /// A lingering close: reading and discarding what its peer still sends, until the peer
    /// closes or this much more has been charged (see [`LINGERING_CLOSE_BYTES`]).
    Lingering(usize),
    /// Done: the stream may be dropped.
    Done,
}

/// Moves a stream's end forward: finishes it and, when `lingering`, closes it the way NGINX's
/// `lingering_close` does: shuts its write side, then reads and discards what its peer still
/// sends until the peer closes. The caller bounds the whole (the relay by `close_timeout`).
///
/// A lingering close is for a peer the session stopped reading before it had finished sending
/// (it broke the protocol: [`close::Cause::lingers_on`]): closing a socket that holds unread
/// bytes resets the connection instead of ending it, and a peer still writing then learns of
/// the reset before it reads what was last written to it (the message before its violation,
/// the close frame that says why). A peer that ended its side cleanly (its close frame, its
/// FIN) is not lingered on: its socket is closed at once, one system call less.
pub(crate) fn poll_end<S: FinishStream + ?Sized>(
    s: &mut S,
    ending: &mut Ending,
    lingering: bool,
    cx: &mut Context<'_>,
) -> Poll<()> {
    loop {
        *ending = match ending {
            Ending::Finishing => {
                std::task::ready!(s.poll_finish(cx)).ok();
                if lingering {
                    Ending::HalfClosing
                } else {
                    Ending::Done
                }
            }
            Ending::HalfClosing => match std::task::ready!(std::pin::Pin::new(&mut *s).poll_shutdown(cx)) {
                Ok(()) => Ending::Lingering(LINGERING_CLOSE_BYTES),
                Err(_) => Ending::Done,
            },
            Ending::Lingering(left) => {
                std::task::ready!(poll_discard(s, left, cx));
                Ending::Done
            }
            Ending::Done => return Poll::Ready(()),
        };
    }
}

/// How much a lingering close reads and discards at most, each read charged at least
/// [`DISCARD_CHUNK`] (so at most 64 reads: over TLS, where a record may carry a byte of data,
/// about 1 MiB from the wire). A peer that broke the protocol has a frame or two in flight, not
/// a stream; one that floods is reset (its own loss), so no peer gets unmetered reading out of
/// a violation.
pub(crate) const LINGERING_CLOSE_BYTES: usize = 256 * 1024;

/// What one read of a lingering close takes, and is charged at least.
const DISCARD_CHUNK: usize = 4096;

/// Reads and discards from `r` until its end (or an error), or until `left` is spent (each
/// read charged at least [`DISCARD_CHUNK`]); `Pending` while the peer sends nothing. At most 16
/// reads per call: a peer flooding it cannot hold its task's thread.
fn poll_discard<R: tokio::io::AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    left: &mut usize,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let mut scratch = [0u8; DISCARD_CHUNK];
    for _ in 0..16 {
        if *left == 0 {
            return Poll::Ready(());
        }
        let mut buf = tokio::io::ReadBuf::new(&mut scratch);
        match std::pin::Pin::new(&mut *r).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if !buf.filled().is_empty() => *left = left.saturating_sub(DISCARD_CHUNK),
            Poll::Ready(_) => return Poll::Ready(()),
            Poll::Pending => return Poll::Pending,
        }
    }
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// [`poll_end`]'s lingering close for a stream split in halves, after the proxy's last write to
/// it: its write side shut down, then what its peer still sends read and discarded until the
/// peer closes or [`LINGERING_CLOSE_BYTES`] are spent. The caller bounds it in time.
pub(crate) async fn lingering_close<R, W>(rd: &mut R, wr: &mut W)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt as _;
    if wr.shutdown().await.is_ok() {
        let mut left = LINGERING_CLOSE_BYTES;
        std::future::poll_fn(|cx| poll_discard(rd, &mut left, cx)).await;
    }
}

/// What a feature shows a relayed session's data-frame payloads to (the recording, the
/// observers): the relay's one interface for them. The relay copies the payloads out unmasked
/// as it scans, and hands over what one read brought, in order.
pub trait PayloadSink: Send + Sync {
    /// The payload bytes of the data frames one read brought.
    fn payload(&self, data: &bytes::Bytes);

    /// Whether the sender may be read now: `Pending` (the task woken later) while the sink is
    /// behind and waits for it, [`Behind`] when the session must close.
    fn poll_room(&self, _cx: &mut Context<'_>) -> Poll<Result<(), Behind>> {
        Poll::Ready(Ok(()))
    }
}

/// A payload sink fell behind or failed, and the session must close (a recording's
/// `on_backlog = "close"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Behind;

/// The payload sinks of a relayed session: what the backend's output is shown to, and what the
/// client's input is shown to. Features add theirs as the session is set up.
#[derive(Default)]
pub struct Taps {
    /// Shown the backend's output.
    pub output: Vec<Arc<dyn PayloadSink>>,
    /// Shown the client's input.
    pub input: Vec<Arc<dyn PayloadSink>>,
}

impl FinishStream for tokio::net::TcpStream {
    fn poll_finish(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl FinishStream for tokio::io::DuplexStream {}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64) -> SessionEntry {
        SessionEntry {
            id,
            kind: SessionKind::WebSocket.into(),
            route: "r".into(),
            agent: None,
            subject: None,
            issuer: None,
            jti: None,
            token_exp: None,
            token_iat: None,
            token_key: None,
            counted: true.into(),
            client: "127.0.0.1:1".parse().expect("addr"),
            http: "http/1.1",
            backend: std::sync::OnceLock::new(),
            started: std::time::SystemTime::now(),
            control: SessionControl::new(),
            attached: Vec::new(),
        }
    }

    #[tokio::test]
    async fn the_drain_stops_sessions_registered_before_and_after_it_and_wakes_the_waiter() {
        let sessions = Arc::new(Sessions::default());
        let before = sessions.register(entry(1));
        let control = before.entry().control.clone();
        let waiter = tokio::spawn(async move { control.wait().await });
        tokio::task::yield_now().await;
        sessions.drain();
        assert_eq!(waiter.await.expect("waiter"), StopReason::Drain);
        let after = sessions.register(entry(2));
        assert_eq!(after.entry().control.stopped(), Some(StopReason::Drain));
    }

    #[test]
    fn a_stopped_session_keeps_its_first_reason() {
        let c = SessionControl::new();
        assert_eq!(c.stopped(), None);
        c.stop(StopReason::Revoked);
        c.stop(StopReason::Drain);
        assert_eq!(c.stopped(), Some(StopReason::Revoked));
    }
}
