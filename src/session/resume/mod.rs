//! Resume after a network blip: the sessions of routes with `[routes.resume]`, by resume id.
//!
//! The proxy issues each session of such a route its resume id: 128 random bits, never derived
//! from client input (as Azure Web PubSub's reconnection token), sent in the
//! [`ID_HEADER`] response header and, for browsers, as the session's first text frame. The
//! fresh session registers a [`Held`] under it, bound to the token's issuer, subject and the
//! agent it reached. When that client vanishes without a close frame the relay keeps the
//! backend session, buffering its output ([`Resumable`], over `park.rs`); a later handshake with the id
//! (`?resume=<id>`), a token of the same issuer and subject and the same agent claims the
//! session ([`Resumes::claim`]) and hands its upgraded stream over ([`Held::attach`]). Another
//! subject's handshake with the id is refused; one while the session is attached, or another
//! resume of it is under way, too. An id the proxy does not hold starts a fresh session under a
//! new id. The entry leaves the registry when its session ends.
//!
//! Held sessions live in the process that holds them: a reconnect must reach the same
//! instance (see `docs/resume.md`).

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::ResumeSettings;
use crate::metrics::Metrics;
use crate::session::FinishStream;

mod park;
use park::Parkable;

impl crate::session::Attachment for Held {
    fn shown(&self) -> (&'static str, serde_json::Value) {
        ("resume", self.state().as_str().into())
    }

    fn revoking_jti(&self) -> Option<String> {
        self.resumed_jti()
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

/// A resumable session's client stream, as the relay sees it: the [`Parkable`] stream (the
/// client's connection, or while it is away the output held for the next one) and the session's
/// registration, through which new clients arrive. The relay drives it through the hold of
/// [`FinishStream`], and knows nothing else of resume.
pub struct Resumable {
    stream: Parkable,
    reg: Registration,
    settings: Arc<ResumeSettings>,
    metrics: Arc<Metrics>,
    /// A new client that claimed the session, until the relay takes it or turns it away.
    claimant: Option<Attach>,
}

impl Resumable {
    /// The first client's stream `io`, with what its connection holds (`hold`: its connection
    /// slot, its HTTP/2 stream's hold), for the fresh session registered as `reg`.
    pub fn new(
        io: Box<dyn Io>,
        hold: Box<dyn Send>,
        reg: Registration,
        settings: Arc<ResumeSettings>,
        metrics: Arc<Metrics>,
    ) -> Resumable {
        reg.held.set_state(State::Attached);
        let stream = Parkable::new(io, hold, settings.buffer);
        Resumable { stream, reg, settings, metrics, claimant: None }
    }
}

impl FinishStream for Resumable {
    fn hold(&mut self) -> Option<Duration> {
        if !self.stream.park() {
            return None;
        }
        let route = &self.reg.held.route;
        self.reg.held.set_state(State::Parked);
        self.metrics.resume_parked(route);
        let window_ms = self.settings.window.as_millis() as u64;
        tracing::info!(route, window_ms, "client vanished; session held for it to resume");
        Some(self.settings.window)
    }

    fn poll_claim(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.claimant.is_none() {
            match self.reg.rx.poll_recv(cx) {
                Poll::Ready(Some(a)) => self.claimant = Some(a),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(())
    }

    fn take_claim(&mut self) -> Option<Instant> {
        let a = self.claimant.take()?;
        let expires_at = a.expires_at;
        self.stream.attach(a);
        self.reg.held.set_state(State::Attached);
        self.metrics.resume_resumed(&self.reg.held.route, true);
        tracing::info!(route = self.reg.held.route, "client resumed its session");
        expires_at
    }

    fn refuse_claim(&mut self) {
        // Dropping the new client's stream closes it.
        self.claimant = None;
        self.reg.held.release_claim();
        tracing::info!("a resume arrived for a session that cannot take it; its stream is closed");
    }

    fn let_go(&mut self, why: &'static str) {
        self.metrics.resume_expired(&self.reg.held.route, why);
        self.reg.withdraw();
    }
}

impl AsyncRead for Resumable {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Resumable {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A client stream of any kind (TCP, TLS, an HTTP/2 stream), boxed.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The response header of a fresh resumable session's 101 (HTTP/2: 200) that carries the
/// resume id the proxy issued it.
pub const ID_HEADER: &str = "portcullis-resume-id";

/// A new resume id: 128 bits from the thread's CSPRNG (ChaCha, seeded by the OS), base64url
/// without padding (22 characters).
fn new_id() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>())
}

/// A new client for a held session: its upgraded stream and what goes with it.
pub struct Attach {
    /// The stream, after the proxy's 101 (or HTTP/2 200).
    pub io: Box<dyn Io>,
    /// Bytes already read from it during the handshake.
    pub early: Vec<u8>,
    /// When the new token expires, when the route enforces it.
    pub expires_at: Option<Instant>,
    /// What the new connection holds while it is attached (its place under the connection
    /// caps, its HTTP/2 stream's hold), released when it goes.
    pub hold: Box<dyn Send>,
}

/// Where a held session's client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The first client's session is being set up (backend connect).
    Connecting,
    /// A client is attached.
    Attached,
    /// The client vanished; the session waits for it (`window`).
    Parked,
    /// A new client has claimed the session and is being handed over.
    Resuming,
}

impl State {
    /// The name in `/sessions`.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Attached => "attached",
            State::Parked => "parked",
            State::Resuming => "resuming",
        }
    }
}

/// One resumable session's registry record.
#[derive(Debug)]
pub struct Held {
    /// Route name.
    pub route: String,
    /// The issuer of the token that opened it: a subject is someone only at its issuer.
    pub issuer: Option<String>,
    /// The subject of the token that opened it.
    pub subject: Option<String>,
    /// The `{agent}` capture it reached.
    pub agent: Option<String>,
    /// The subprotocol the first client was answered with, answered again on a resume.
    pub protocol: std::sync::OnceLock<String>,
    /// The token id (`jti`) of the client that resumed it last: revoking that token closes the
    /// session, as revoking the first one does.
    resumed_jti: Mutex<Option<String>>,
    id: String,
    /// The state, and what it was before a claim (restored when the claim falls through).
    state: Mutex<(State, State)>,
    tx: mpsc::Sender<Attach>,
}

impl Held {
    /// The resume id the proxy issued the session.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Records the token id of the client now resuming the session.
    pub fn set_resumed_jti(&self, jti: Option<&str>) {
        if let Ok(mut j) = self.resumed_jti.lock() {
            *j = jti.map(str::to_owned);
        }
    }

    /// The token id of the client that resumed the session last, if any.
    pub fn resumed_jti(&self) -> Option<String> {
        self.resumed_jti.lock().ok().and_then(|j| j.clone())
    }

    /// Where its client is now.
    pub fn state(&self) -> State {
        self.state.lock().map_or(State::Connecting, |s| s.0)
    }

    /// Set by the relay as its client comes and goes.
    pub fn set_state(&self, state: State) {
        if let Ok(mut s) = self.state.lock() {
            s.0 = state;
        }
    }

    /// Hands a claimed session its new client. Gives the client back when the session has
    /// ended meanwhile.
    pub fn attach(&self, a: Attach) -> Result<(), Attach> {
        self.tx.try_send(a).map_err(|e| match e {
            mpsc::error::TrySendError::Full(a) | mpsc::error::TrySendError::Closed(a) => a,
        })
    }

    /// A claim that will not be followed by [`Held::attach`] (the client went during the
    /// handshake): the session is resumable again.
    pub fn release_claim(&self) {
        if let Ok(mut s) = self.state.lock() {
            if s.0 == State::Resuming {
                s.0 = s.1;
            }
        }
    }
}

impl std::fmt::Debug for Attach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attach").field("early", &self.early.len()).finish_non_exhaustive()
    }
}

/// Why a handshake with a resume id is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// The id is held by a session of another issuer, subject or agent, or the token has no
    /// subject (403).
    #[error("the resume id belongs to another subject's session")]
    OtherSubject,
    /// The session's client is still attached, or it is being set up, or another client is
    /// resuming it (409): a reconnect is taken once the proxy has parked the session.
    #[error("the session is still attached, or being opened or resumed by another connection")]
    Busy,
}

impl ClaimError {
    /// Label in `portcullis_resume_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            ClaimError::OtherSubject => "other_subject",
            ClaimError::Busy => "busy",
        }
    }
}

/// What a handshake with a resume id gets.
#[derive(Debug)]
pub enum Claim {
    /// No session holds the id: a fresh one starts, registered under it.
    Fresh(Registration),
    /// A held session, now claimed for this client.
    Resume(Arc<Held>),
}

/// A fresh session's record and the receiving end of its new clients. The record leaves the
/// registry when this drops (with the session).
#[derive(Debug)]
pub struct Registration {
    /// The record.
    pub held: Arc<Held>,
    /// New clients, from [`Held::attach`].
    pub rx: mpsc::Receiver<Attach>,
    /// The client named an id the proxy does not hold (its session ended): it is told that
    /// this is a fresh session (`notice`).
    pub replaced: bool,
    resumes: Arc<Resumes>,
}

impl Registration {
    /// The proxy's own frames, for the client before anything of the backend's: the id it
    /// issued the session, with `announce` (for clients that cannot read the 101's headers),
    /// then, when the client named an id the proxy no longer holds, the `notice` that this is a
    /// fresh session. Empty when neither applies.
    pub fn greeting(&self, settings: &crate::config::ResumeSettings) -> Vec<u8> {
        let announce = settings.announce.then(|| serde_json::json!({"portcullis": {"resume_id": self.held.id()}}));
        let notice = settings.notice.as_deref().filter(|_| self.replaced);
        let mut frames = Vec::new();
        for text in [announce.map(|a| a.to_string()), notice.map(str::to_owned)].iter().flatten() {
            crate::codec::encode(true, 0, crate::codec::opcode::TEXT, None, text.as_bytes(), &mut frames);
        }
        frames
    }

    /// Takes the id out of the registry now (the session is ending without its client): a
    /// reconnect with it starts a fresh session.
    pub fn withdraw(&self) {
        if let Ok(mut m) = self.resumes.map.lock() {
            let key = (self.held.route.clone(), self.held.id.clone());
            if m.get(&key).is_some_and(|h| Arc::ptr_eq(h, &self.held)) {
                m.remove(&key);
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.withdraw();
    }
}

/// The resumable sessions of this process, by route and resume id.
#[derive(Debug, Default)]
pub struct Resumes {
    map: Mutex<HashMap<(String, String), Arc<Held>>>,
}

impl Resumes {
    /// Claims `id` on `route` for a client of `issuer`'s `subject` reaching `agent`: a
    /// *parked* session opened by the same issuer, subject and agent, or, when the client
    /// named no id or one the proxy does not hold, a fresh registration under a new id the
    /// proxy issues. A token without a subject claims nothing (no one could be told apart
    /// from anyone else), and a session whose client is attached cannot be taken over: a
    /// reconnect waits (409) until the proxy has parked it (the old connection dropped, or
    /// missed its pings).
    pub fn claim(
        self: &Arc<Self>,
        route: &str,
        id: Option<&str>,
        issuer: Option<&str>,
        subject: Option<&str>,
        agent: Option<&str>,
    ) -> Result<Claim, ClaimError> {
        if subject.is_none() {
            return Err(ClaimError::OtherSubject);
        }
        let mut map = self.map.lock().map_err(|_| ClaimError::Busy)?;
        if let Some(held) = id.and_then(|id| map.get(&(route.to_owned(), id.to_owned()))) {
            if held.issuer.as_deref() != issuer || held.subject.as_deref() != subject || held.agent.as_deref() != agent
            {
                return Err(ClaimError::OtherSubject);
            }
            let mut state = held.state.lock().map_err(|_| ClaimError::Busy)?;
            return match state.0 {
                State::Parked => {
                    *state = (State::Resuming, state.0);
                    Ok(Claim::Resume(held.clone()))
                }
                State::Attached | State::Connecting | State::Resuming => Err(ClaimError::Busy),
            };
        }
        let key = loop {
            let key = (route.to_owned(), new_id());
            if !map.contains_key(&key) {
                break key;
            }
        };
        let (tx, rx) = mpsc::channel(1);
        let held = Arc::new(Held {
            route: route.to_owned(),
            issuer: issuer.map(str::to_owned),
            subject: subject.map(str::to_owned),
            agent: agent.map(str::to_owned),
            protocol: std::sync::OnceLock::new(),
            resumed_jti: Mutex::new(None),
            id: key.1.clone(),
            state: Mutex::new((State::Connecting, State::Connecting)),
            tx,
        });
        map.insert(key, held.clone());
        Ok(Claim::Fresh(Registration { held, rx, replaced: id.is_some(), resumes: self.clone() }))
    }

    /// True when a session of `route` holds resume id `id` here.
    pub fn holds(&self, route: &str, id: &str) -> bool {
        self.map.lock().is_ok_and(|m| m.contains_key(&(route.to_owned(), id.to_owned())))
    }

    /// Sessions registered now (held for a client or attached to one).
    pub fn len(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }

    /// True when no session is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A resume id as a client gave it: 1-128 characters of `[A-Za-z0-9_-]` (what the proxy issues
/// is 22 of them; anything else is refused before the registry is searched).
pub fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(c: Result<Claim, ClaimError>) -> Registration {
        match c {
            Ok(Claim::Fresh(r)) => r,
            other => panic!("expected a fresh registration, got {other:?}"),
        }
    }

    #[test]
    fn an_id_is_issued_by_the_proxy_bound_to_its_issuer_subject_and_agent_and_only_a_parked_session_is_claimed() {
        let r = Arc::new(Resumes::default());
        let (idp, other_idp) = (Some("https://idp-a"), Some("https://idp-b"));
        // The client's own choice of id is not taken: the proxy issues one.
        let reg = fresh(r.claim("t", Some("chosen-by-client"), idp, Some("alice"), Some("a1")));
        assert!(reg.replaced, "an id the proxy does not hold starts a fresh session");
        let id = reg.held.id().to_owned();
        assert_ne!(id, "chosen-by-client");
        assert_eq!(id.len(), 22, "128 bits, base64url");
        assert!(valid_id(&id));
        assert_eq!(r.claim("t", Some("chosen-by-client"), idp, Some("alice"), Some("a1")).map(|_| ()).err(), None);
        let id = Some(id.as_str());
        // Still connecting, then attached: nobody may claim it.
        assert_eq!(r.claim("t", id, idp, Some("alice"), Some("a1")).err(), Some(ClaimError::Busy));
        reg.held.set_state(State::Attached);
        assert_eq!(r.claim("t", id, idp, Some("alice"), Some("a1")).err(), Some(ClaimError::Busy));
        reg.held.set_state(State::Parked);
        assert_eq!(r.claim("t", id, idp, Some("mallory"), Some("a1")).err(), Some(ClaimError::OtherSubject));
        assert_eq!(r.claim("t", id, other_idp, Some("alice"), Some("a1")).err(), Some(ClaimError::OtherSubject));
        assert_eq!(r.claim("t", id, None, Some("alice"), Some("a1")).err(), Some(ClaimError::OtherSubject));
        assert_eq!(r.claim("t", id, idp, None, Some("a1")).err(), Some(ClaimError::OtherSubject));
        assert_eq!(r.claim("t", id, idp, Some("alice"), Some("a2")).err(), Some(ClaimError::OtherSubject));
        let Ok(Claim::Resume(h)) = r.claim("t", id, idp, Some("alice"), Some("a1")) else { panic!("resume") };
        assert_eq!(h.state(), State::Resuming);
        // A second client while the first is handed over.
        assert_eq!(r.claim("t", id, idp, Some("alice"), Some("a1")).err(), Some(ClaimError::Busy));
        h.release_claim();
        assert_eq!(h.state(), State::Parked);
        // The same id on another route names nothing there: a fresh session, another id.
        let other = fresh(r.claim("u", id, idp, Some("mallory"), None));
        assert_ne!(Some(other.held.id()), id);
        assert_eq!(r.claim("v", None, idp, None, None).err(), Some(ClaimError::OtherSubject));
        drop(reg);
        assert!(!fresh(r.claim("t", None, idp, Some("bob"), Some("a1"))).replaced);
    }

    #[test]
    fn issued_ids_are_distinct() {
        let r = Arc::new(Resumes::default());
        let regs: Vec<Registration> = (0..1000).map(|_| fresh(r.claim("t", None, None, Some("s"), None))).collect();
        let ids: std::collections::HashSet<&str> = regs.iter().map(|r| r.held.id()).collect();
        assert_eq!(ids.len(), 1000);
    }

    #[test]
    fn ids_are_short_and_plain() {
        assert!(valid_id("3f1c9e0a-7b2d-4c55-9a1e-0d2b6f8e4a11"));
        assert!(!valid_id(""));
        assert!(!valid_id("a b"));
        assert!(!valid_id(&"x".repeat(129)));
    }
}
