//! The data path, one file per stage, called in order by one task per connection:
//!
//! ```text
//! accept ─▶ tls ─▶ http ─▶ route ─▶ upgrade ─▶ auth ─▶ connect ─▶ relay
//!                                   └▶ (plain) ─▶ auth ─▶ request ─▶ stream
//! ```
//!
//! [`serve_connection`] runs the HTTP phase with hyper. The route decides what a request may
//! be: an upgrade on a WebSocket route runs the upgrade, auth and connect stages and is
//! answered 101 only once the backend has accepted; a plain request on an HTTP route runs auth
//! and the request stage, and its bodies stream through [`stream`] on the client connection,
//! which hyper keeps alive for the next request. The
//! upgraded stream is then unwrapped back to the concrete client stream and [`relay`] takes
//! over in a task of its own, holding only what the session needs (the connection task, with
//! hyper's and the handshake's state, ends first).
//!
//! A TLS client that chose `h2` by ALPN is served by [`serve_h2`] instead: the same handler
//! runs once per stream, a WebSocket is an extended CONNECT (RFC 8441) answered 200, and its
//! relay runs in a task of its own on the upgraded stream while the connection task keeps the
//! connection's other streams going.

pub(crate) mod accept;
pub(crate) mod auth;
pub(crate) mod connect;
pub(crate) mod cors;
pub(crate) mod error;
pub(crate) mod forward;
pub(crate) mod frames;
pub mod host;
pub(crate) mod http;
pub(crate) mod login;
pub(crate) mod mcp;
pub(crate) mod peer;
pub mod proxy_protocol;
pub mod relay;
pub(crate) mod request;
pub(crate) mod route;
pub(crate) mod stream;
pub(crate) mod tls;
pub mod upgrade;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use ::http::header::{
    CONNECTION, HOST, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_PROTOCOL, UPGRADE,
};
use ::http::{HeaderValue, Request, Response, StatusCode};
use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::Instrument;

use crate::auth::Claims;
use crate::config::{Captures, RouteConfig};
use crate::proxy::error::RequestError;
use crate::session::close::Cause;
use crate::session::{SessionControl, SessionEntry, SessionGuard, SessionKind, StopReason};
use crate::state::{Runtime, Shared};
use connect::{BackendConn, BackendRequest};
use forward::ForwardedFor;
use relay::{RelayParams, SessionEnd};
use tls::ClientStream;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// State shared between the connection task and hyper's request handler.
struct ConnCtx {
    shared: Arc<Shared>,
    client_addr: SocketAddr,
    tls: bool,
    /// The connection's HTTP version.
    protocol: Protocol,
    /// HTTP/2: the streams open now, for the idle timeout.
    open_streams: Arc<http::OpenStreams>,
    /// Set by the handler when it answers 101; taken by the connection task after hyper hands
    /// the connection over (HTTP/1.1 only).
    pending: Mutex<Option<(OnUpgrade, Accepted)>>,
    /// The connection came through the peer listener from another instance of the fleet (its
    /// preamble verified): it carries a resume or an observer, and is never relayed again.
    from_peer: bool,
    /// The watch of the exchange an HTTP/1.1 connection serves, which closes the connection
    /// when that exchange's session ended and its answer is not taken (an HTTP/2 stream's
    /// watch is its task's, [`stream::Watched`]; see [`ConnCtx::watch`]).
    http1_watch: stream::Watch,
}

impl ConnCtx {
    /// The watch of an exchange on this connection: the connection's on HTTP/1.1, `None` on
    /// HTTP/2 (the stream task's, found by [`stream::Governance::watched_by`]).
    fn watch(&self) -> Option<&stream::Watch> {
        (self.protocol == Protocol::Http1).then_some(&self.http1_watch)
    }
}

/// A client connection's HTTP version: what an upgrade looks like on it, how it is answered, and
/// who holds the upgraded stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// HTTP/1.1: one request at a time; a WebSocket is a `GET` with `Upgrade`, answered 101, and
    /// takes the whole connection (its task parks the session until hyper releases it).
    Http1,
    /// HTTP/2: every request is a stream, a WebSocket an extended CONNECT (RFC 8441) answered
    /// 200, and each stream's session a task of its own.
    Http2,
}

impl Protocol {
    /// The label in `/sessions` and logs.
    fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "http/1.1",
            Protocol::Http2 => "h2",
        }
    }

    /// The status that accepts a WebSocket.
    fn accepts_upgrade_with(self) -> StatusCode {
        match self {
            Protocol::Http1 => StatusCode::SWITCHING_PROTOCOLS,
            Protocol::Http2 => StatusCode::OK,
        }
    }
}

/// An accepted upgrade: what the client stream becomes once hyper releases it. Every kind of
/// session is one variant, and [`Accepted::start`] is the one place that dispatches on it (as
/// mini-redis dispatches a `Command`); the handler answered already. Held for the moment
/// between the handler's answer and hyper's hand-over, once per connection: not worth a box
/// for the size of the larger variant.
#[allow(clippy::large_enum_variant)]
enum Accepted {
    /// A new relayed session (resumable or not).
    Relay(Pending),
    /// A new client for a held session.
    Resume(Resuming),
    /// A new client of a shared backend stream.
    Fanout(FanoutClient),
    /// A read-only watcher of a live session.
    Observe(Watching),
    /// A resume or an observer whose session another instance holds: spliced to it.
    Peer(PeerRelay),
}

/// A client carried to the instance that holds its session.
struct PeerRelay {
    link: peer::PeerLink,
    /// The link's slot in the process's outbound descriptor budget.
    slot: crate::limits::OutboundSlot,
    /// What its HTTP/2 stream holds (nothing on HTTP/1.1).
    stream: http::StreamHold,
}

impl Accepted {
    /// Starts what was accepted on the client's upgraded stream: `early` is what was read of
    /// it already, `slot` the connection's place under the connection caps when the session is
    /// its connection's only use (HTTP/1.1; an HTTP/2 stream holds its place through its
    /// `StreamHold`).
    fn start<C: relay::FinishStream + Send + 'static>(
        self,
        shared: &Arc<Shared>,
        client: C,
        early: Vec<u8>,
        slot: Option<accept::ConnSlot>,
    ) {
        match self {
            Accepted::Relay(p) => start_session(shared, p, client, early, slot),
            Accepted::Resume(r) => r.attach(Box::new(client), early, slot),
            Accepted::Fanout(FanoutClient { task, subject_slots, stream }) => {
                let run = crate::session::fanout::run_client(client, early, task);
                spawn_holding(shared, run, (slot, subject_slots, stream));
            }
            Accepted::Observe(Watching { observing, hub, watch, stream }) => {
                let run = crate::session::observe::run(client, early, observing, hub, watch, shared.metrics.clone());
                spawn_holding(shared, run, (slot, stream));
            }
            Accepted::Peer(PeerRelay { link, slot: outbound, stream }) => {
                spawn_holding(shared, peer::splice(client, early, link), (slot, outbound, stream));
            }
        }
    }

    /// The client's upgrade failed after the answer: give back what was claimed for it.
    fn abandon(self) {
        if let Accepted::Resume(r) = self {
            r.held.release_claim();
        }
    }
}

/// The one hand-off of an accepted upgrade: on HTTP/1.1 it waits in the connection task until
/// hyper releases the connection ([`serve_connection`] then starts it); on HTTP/2 the stream
/// is started by a task of its own once hyper has sent the 200, while the connection goes on
/// serving other streams.
fn hand_off(ctx: &Arc<ConnCtx>, on_upgrade: OnUpgrade, accepted: Accepted) {
    if ctx.protocol == Protocol::Http2 {
        let (shared, client_addr) = (ctx.shared.clone(), ctx.client_addr);
        ctx.shared.tasks.spawn(
            async move {
                match upgraded(on_upgrade, client_addr).await {
                    Some(up) => accepted.start(&shared, TokioIo::new(up), Vec::new(), None),
                    None => accepted.abandon(),
                }
            }
            .in_current_span(),
        );
    } else if let Ok(mut pending) = ctx.pending.lock() {
        *pending = Some((on_upgrade, accepted));
    }
}

/// An observer accepted by the handler: its place in the session's hub, and what it holds.
struct Watching {
    observing: crate::session::observe::Observer,
    hub: std::sync::Weak<crate::session::observe::Hub>,
    watch: crate::session::observe::Watch,
    /// What its HTTP/2 stream holds (nothing on HTTP/1.1).
    stream: http::StreamHold,
}

/// A fan-out client accepted by the handler: its subscription (with its session record), and
/// what it holds.
struct FanoutClient {
    task: crate::session::fanout::ClientTask,
    subject_slots: Vec<SubjectSlot>,
    /// What its HTTP/2 stream holds (nothing on HTTP/1.1).
    stream: http::StreamHold,
}

/// Runs a session's task (`run` records its own end) as a task of its own, holding `hold` (its
/// connection slot or HTTP/2 stream's hold, its subject slots) for as long as it runs.
fn spawn_holding<F: std::future::Future<Output = ()> + Send + 'static>(
    shared: &Arc<Shared>,
    run: F,
    hold: impl Send + 'static,
) {
    shared.tasks.spawn(
        async move {
            run.await;
            drop(hold);
        }
        .in_current_span(),
    );
}

/// A resume accepted by the handler: the claimed session, and what the new client brings.
struct Resuming {
    held: Arc<crate::session::resume::Held>,
    expires_at: Option<tokio::time::Instant>,
    /// What its HTTP/2 stream holds (nothing on HTTP/1.1).
    stream: http::StreamHold,
}

impl Resuming {
    /// Hands the new client's stream to the held session; when the session ended meanwhile,
    /// the stream is dropped (closing it) and the client reconnects to a fresh one.
    fn attach(self, io: Box<dyn crate::session::resume::Io>, early: Vec<u8>, slot: Option<accept::ConnSlot>) {
        let hold: Box<dyn Send> = Box::new((slot, self.stream));
        let attach = crate::session::resume::Attach { io, early, expires_at: self.expires_at, hold };
        if self.held.attach(attach).is_err() {
            tracing::info!(route = self.held.route, "the held session ended before its client was handed over");
        }
    }
}

/// An accepted upgrade waiting for hyper to release the client stream.
struct Pending {
    backend: BackendConn,
    route: Arc<RouteConfig>,
    claims: Option<Arc<Claims>>,
    /// The session's record, registered before the backend connect so that a revocation
    /// during the connect finds it.
    registered: SessionGuard,
    /// Its places under the subject's session caps.
    subject_slots: Vec<SubjectSlot>,
    /// What its HTTP/2 stream holds (nothing on HTTP/1.1).
    stream: http::StreamHold,
    /// Its resume registration, on a route with `[routes.resume]` when the client gave an id.
    resume: Option<crate::session::resume::Registration>,
    /// Its recording's place in the descriptor budget, on a recorded route.
    recording_slot: Option<crate::limits::OutboundSlot>,
}

/// Serves one client connection (after accept and tls) to its end.
pub async fn serve_connection(
    shared: Arc<Shared>,
    stream: ClientStream,
    client_addr: SocketAddr,
    slot: accept::ConnSlot,
    from_peer: bool,
) {
    if stream.is_h2() {
        return serve_h2(shared, stream, client_addr, slot).await;
    }
    let settings = shared.runtime.load().config.server.clone();
    let ctx = Arc::new(ConnCtx {
        shared: shared.clone(),
        client_addr,
        tls: stream.is_tls(),
        protocol: Protocol::Http1,
        open_streams: Arc::default(),
        pending: Mutex::new(None),
        from_peer,
        http1_watch: stream::Watch::default(),
    });
    let head_done = Arc::new(AtomicBool::new(false));
    let timed_out = Arc::new(AtomicBool::new(false));
    let io = http::HeadIo::new(stream, settings.header_read_timeout, head_done.clone(), timed_out.clone())
        .send_timeout(settings.send_timeout);
    let io = TokioIo::new(io);
    let handler_ctx = ctx.clone();
    let svc = service_fn(move |req| {
        head_done.store(true, Ordering::Relaxed);
        handle(handler_ctx.clone(), req)
    });
    // Boxed so that hyper's connection state is freed before the relay starts.
    let mut conn = Box::pin(http::builder(&settings).serve_connection(io, svc).with_upgrades());
    let abandoned = std::future::poll_fn(|cx| ctx.http1_watch.poll_abandoned(cx));
    tokio::pin!(abandoned);
    let mut draining = false;
    let result = loop {
        tokio::select! {
            biased;
            r = conn.as_mut() => break r,
            _ = shared.sessions.drain_signal().cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            // The answer's session ended and its client did not take the rest of it within
            // close_timeout (it reads slowly, or not at all): the connection goes.
            reason = &mut abandoned => {
                tracing::info!(client = %client_addr, reason = reason.http_end().label, "an answer not taken by its client within close_timeout after its session ended; its connection is closed");
                break Ok(());
            }
        }
    };
    drop(conn);
    if timed_out.load(Ordering::Relaxed) {
        shared.metrics.upgrade("none", "header_timeout");
    }
    if let Err(e) = result {
        tracing::debug!(client = %client_addr, error = %e, "http connection ended with an error");
    }
    let pending = ctx.pending.lock().ok().and_then(|mut p| p.take());
    drop(ctx);
    let mut slot = slot;
    slot.handshake_done();
    if let Some((on_upgrade, accepted)) = pending {
        run_session(shared, on_upgrade, accepted, client_addr, slot).await;
    }
}

/// Serves an HTTP/2 connection (ALPN `h2`) until its last stream ends. Each stream's handler
/// is a task of its own (hyper's executor), and each WebSocket's relay another, so no stream
/// waits for another; flow control bounds what each may buffer (`[http2]`). On drain the
/// connection sends GOAWAY: streams already open finish (WebSockets get their 1001 from the
/// drain), new ones are refused.
async fn serve_h2(shared: Arc<Shared>, stream: ClientStream, client_addr: SocketAddr, mut slot: accept::ConnSlot) {
    let runtime = shared.runtime.load_full();
    let server = &runtime.config.server;
    let open_streams = Arc::new(http::OpenStreams::default());
    let ctx = Arc::new(ConnCtx {
        shared: shared.clone(),
        client_addr,
        tls: true,
        protocol: Protocol::Http2,
        open_streams: open_streams.clone(),
        pending: Mutex::new(None),
        from_peer: false,
        http1_watch: stream::Watch::default(),
    });
    let idle_timeout = runtime.config.http2.idle_timeout;
    let head_done = Arc::new(AtomicBool::new(false));
    let timed_out = Arc::new(AtomicBool::new(false));
    // No send_timeout on the connection: its writes carry every stream, WebSocket relays among
    // them, and one stream's slow reader would close them all. Flow control bounds what each
    // holds, and each answer has the deadline of its own (`stream::Stall`).
    let head = http::HeadIo::new(stream, server.header_read_timeout, head_done.clone(), timed_out.clone());
    let io = TokioIo::new(frames::Census::new(head.silent(), client_addr));
    // The connection counts as handshaking until its first stream is answered: a handover
    // waits for that, as it waits for an HTTP/1.1 connection's upgrade.
    let answered = Arc::new(tokio::sync::Notify::new());
    let svc = {
        let (ctx, answered) = (ctx.clone(), answered.clone());
        service_fn(move |req| {
            head_done.store(true, Ordering::Relaxed);
            let (ctx, answered) = (ctx.clone(), answered.clone());
            async move {
                let resp = handle(ctx, req).await;
                answered.notify_one();
                resp
            }
        })
    };
    shared.metrics.http2_connection();
    let mut conn = std::pin::pin!(http::h2_builder(server, &runtime.config.http2).serve_connection(io, svc));
    drop(runtime);
    let (mut first_answered, mut closing) = (false, false);
    // Closed (GOAWAY) once no stream has been open for `idle_timeout`.
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = open_streams.changed() => idle.as_mut().reset(tokio::time::Instant::now() + idle_timeout),
            _ = idle.as_mut(), if !closing => {
                if open_streams.is_idle() {
                    tracing::debug!(client = %client_addr, "http/2 connection idle; closing");
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                } else {
                    idle.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                }
            }
            _ = answered.notified(), if !first_answered => {
                first_answered = true;
                slot.handshake_done();
            }
            _ = shared.sessions.drain_signal().cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    };
    if timed_out.load(Ordering::Relaxed) {
        shared.metrics.upgrade("none", "header_timeout");
    }
    if let Err(e) = result {
        tracing::debug!(client = %client_addr, error = %e, "http/2 connection ended with an error");
    }
}

/// Where protected resources' metadata is served (RFC 9728 §3): followed by the resource's path.
const RESOURCE_METADATA: &str = "/.well-known/oauth-protected-resource";

/// The metadata document of the protected resource whose path is `path` (RFC 9728 §3.2), or
/// 404 when no route with `[routes.resource]` has that resource there.
fn resource_metadata(
    runtime: &Runtime,
    authority: Option<&crate::proxy::host::Authority>,
    path: &str,
) -> Response<Full<Bytes>> {
    let path = if path.is_empty() { "/" } else { path };
    let found = route::find(&runtime.routes, authority, path).ok().and_then(|(r, caps)| {
        let res = r.resource.as_ref()?;
        let id = crate::config::render_path(&res.id, &caps);
        // The document is the one of the resource at exactly this path.
        let at = id.parse::<::http::Uri>().ok()?.path().trim_end_matches('/').to_owned();
        (at == path.trim_end_matches('/')).then(|| (id, res.clone()))
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    let Some((id, res)) = found else {
        *resp.status_mut() = StatusCode::NOT_FOUND;
        *resp.body_mut() = Full::new(Bytes::from_static(b"no protected resource here\n"));
        return resp;
    };
    let mut doc = serde_json::json!({
        "resource": id,
        "authorization_servers": res.authorization_servers,
        "bearer_methods_supported": ["header"],
    });
    if !res.scopes_supported.is_empty() {
        doc["scopes_supported"] = res.scopes_supported.clone().into();
    }
    *resp.body_mut() = Full::new(Bytes::from(doc.to_string()));
    let h = resp.headers_mut();
    h.insert(::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(::http::header::CACHE_CONTROL, HeaderValue::from_static("max-age=300"));
    resp
}

/// The sandbox of `sandbox = true` routes: scripts, forms and popups run, but never as this
/// origin (no `allow-same-origin`).
const SANDBOX: &str = "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads";

/// The response body of every answer: a fixed one (errors, 101), or a backend's streamed.
pub type ProxyBody = Either<Full<Bytes>, stream::Download>;

/// The request handler: picks the route, then runs the WebSocket or the plain HTTP path.
async fn handle(ctx: Arc<ConnCtx>, mut req: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let runtime = ctx.shared.runtime.load_full();
    let head_request = req.method() == ::http::Method::HEAD;
    let websocket = match ctx.protocol {
        Protocol::Http1 => upgrade::is_websocket(req.headers()),
        Protocol::Http2 => upgrade::is_extended_connect(&req),
    };
    if ctx.from_peer && !websocket {
        // Another instance relays resumes and observers, and nothing else.
        return Ok(reject_request(&ctx, &req, "none", started, RequestError::PeerOnly));
    }
    // The authority is parsed before anything reads it: routing, the forwarding headers and
    // the backend request all see its canonical form in `Host` (HTTP/2's `:authority` too).
    let authority = match host::of_request(req.version(), req.uri(), req.headers()) {
        Ok(a) => a,
        Err(e) => {
            let e = RequestError::Host(e);
            return Ok(match websocket {
                true => reject(&ctx, "none", e),
                false => reject_request(&ctx, &req, "none", started, e),
            });
        }
    };
    if let Some(v) = authority.as_ref().and_then(|a| HeaderValue::from_str(&a.to_string()).ok()) {
        req.headers_mut().insert(HOST, v);
    }
    // An HTTP/2 stream takes its place under max_streams_per_ip before anything is done for
    // it (a login exchange, a preflight, a route's work); only the Host check, which the
    // refusal's route label needs, comes first.
    let per_ip = match (ctx.protocol == Protocol::Http2).then(|| stream_slot(&ctx, &runtime)) {
        None | Some(Ok(None)) => None,
        Some(Ok(slot)) => slot,
        Some(Err(e)) => {
            let found = route::find(&runtime.routes, authority.as_ref(), req.uri().path());
            let route = found.as_ref().map_or("none", |(r, _)| r.name.as_str()).to_owned();
            return Ok(match websocket {
                true => reject(&ctx, &route, e),
                false => reject_request(&ctx, &req, &route, started, e),
            });
        }
    };
    // The proxy's own login exchange, before any route: a token in, an HttpOnly cookie out.
    if let Some(login) = runtime.config.auth.cookie_login.as_ref().filter(|l| l.path == req.uri().path()) {
        let scheme = if ctx.tls { "https" } else { "http" };
        let origin = format!("{scheme}://{}", authority.as_ref().map(ToString::to_string).unwrap_or_default());
        let gate = token_check_gate(&ctx, &runtime);
        let answer = login::serve(login, runtime.authenticator.as_deref(), &gate, &req, ctx.tls, &origin).await;
        return Ok(login_answer(&ctx, answer).map(Either::Left));
    }
    // A protected resource's metadata (RFC 9728), before any route or token.
    if let Some(path) = req.uri().path().strip_prefix(RESOURCE_METADATA) {
        return Ok(resource_metadata(&runtime, authority.as_ref(), path).map(Either::Left));
    }
    let found = route::find_for(&runtime.routes, authority.as_ref(), &mut req);
    // A 401 on a protected resource points at its metadata (built from the configured id,
    // never from the request's Host).
    let metadata_url = found.as_ref().ok().and_then(|(r, caps)| {
        let id = crate::config::render_path(&r.resource.as_ref()?.id, caps);
        crate::config::ResourceSettings::metadata_url(&id)
    });
    if !websocket && req.method() == ::http::Method::CONNECT {
        let route = found.as_ref().map_or("none", |(r, _)| r.name.as_str());
        return Ok(reject_request(&ctx, &req, route, started, upgrade::UpgradeError::ConnectTunnel.into()));
    }
    // A CORS preflight carries no credentials: the route's policy answers it, before any
    // token is asked for.
    if let Ok((route, caps)) = &found {
        let agent = caps.get("agent");
        if let Some(answer) = route.cors.as_ref().and_then(|c| cors::preflight(c, &route.name, &req, agent)) {
            return Ok(answer.map(Either::Left));
        }
    }
    let origin = req.headers().get(::http::header::ORIGIN).cloned();
    let mut stream = http::StreamHold { _per_ip: per_ip, _open: None };
    if ctx.protocol == Protocol::Http2 {
        stream._open = Some(ctx.open_streams.open());
        ctx.shared.metrics.http2_stream(if websocket { "websocket" } else { "request" });
    }
    let resp = match (found, websocket) {
        (Err(e), true) => reject(&ctx, "none", e.into()),
        (Err(e), false) => reject_request(&ctx, &req, "none", started, e.into()),
        (Ok((route, caps)), true) if route.kind.websocket() => {
            handle_upgrade(&ctx, &runtime, route, caps, req, stream).await
        }
        (Ok((route, _)), true) => reject(&ctx, &route.name, upgrade::UpgradeError::HttpOnlyRoute.into()),
        (Ok((route, caps)), false) if route.kind.http() => {
            let policy = route.cors.clone();
            let agent = policy.as_ref().and_then(|_| caps.get("agent").map(str::to_owned));
            let mut resp = handle_request(&ctx, &runtime, route, caps, req, started, stream).await;
            if let Some(p) = &policy {
                cors::decorate(p, origin.as_ref(), agent.as_deref(), resp.headers_mut());
            }
            resp
        }
        (Ok((route, _)), false) => reject(&ctx, &route.name, upgrade::UpgradeError::NotUpgrade.into()),
    };
    let mut resp = resp;
    if let Some(url) = metadata_url.filter(|_| resp.status() == StatusCode::UNAUTHORIZED) {
        // RFC 9728 §5.1: the challenge names the resource's metadata.
        let challenge = resp.headers().get(::http::header::WWW_AUTHENTICATE).and_then(|v| v.to_str().ok());
        let value = format!("{}, resource_metadata=\"{url}\"", challenge.unwrap_or("Bearer realm=\"portcullis\""));
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(::http::header::WWW_AUTHENTICATE, v);
        }
    }
    // An answer to HEAD has no body (RFC 9110 §9.3.2): hyper leaves it out over HTTP/1.1, but
    // would send the proxy's own answer's over HTTP/2.
    if head_request && matches!(resp.body(), Either::Left(_)) {
        *resp.body_mut() = Either::Left(Full::new(Bytes::new()));
    }
    Ok(resp)
}

/// An HTTP/2 stream's place under `max_streams_per_ip` (none when there is no cap), or 429.
fn stream_slot(ctx: &ConnCtx, runtime: &Runtime) -> Result<Option<crate::limits::IpSlot>, RequestError> {
    let max = runtime.config.http2.max_streams_per_ip;
    if max == 0 {
        return Ok(None);
    }
    let key = crate::limits::ip_key(ctx.client_addr.ip(), runtime.config.server.ipv6_prefix_len);
    ctx.shared.per_ip_streams.try_acquire(key, max).map_err(|_| {
        crate::metrics::limit_refused("per_ip_streams");
        RequestError::TooManyStreams
    })
}

/// Who asks for a backend connection, hashed, for passive health: the token's issuer and
/// subject, else the client's address (its network, for IPv6, as the per-address limits count
/// it). Never what the request names (its agent, its path): one client could name two.
fn requester(ctx: &ConnCtx, runtime: &Runtime, claims: Option<&Claims>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match claims.and_then(|c| c.subject()) {
        Some(sub) => (0u8, claims.and_then(|c| c.issuer()), sub).hash(&mut h),
        None => (1u8, crate::limits::ip_key(ctx.client_addr.ip(), runtime.config.server.ipv6_prefix_len)).hash(&mut h),
    }
    h.finish()
}

/// How the client reached the proxy, for the forwarding headers.
fn forwarded_for(ctx: &ConnCtx, runtime: &Runtime, headers: &::http::HeaderMap) -> ForwardedFor {
    ForwardedFor {
        client_ip: ctx.client_addr.ip(),
        tls: ctx.tls,
        host: headers.get(HOST).and_then(|h| host::parse(h.as_bytes()).ok()),
        trusted: runtime.config.server.is_trusted_proxy(ctx.client_addr.ip()),
    }
}

/// When a session opened with `claims` on `route` must end: the token's expiry plus leeway,
/// when the route enforces it.
fn session_deadline(route: &RouteConfig, runtime: &Runtime, claims: Option<&Claims>) -> Option<tokio::time::Instant> {
    let enforce = route.auth.as_ref().is_some_and(|a| a.enforce_expiry);
    let leeway = runtime.authenticator.as_ref().map_or(Duration::ZERO, |a| a.leeway());
    claims.filter(|_| enforce).map(|c| {
        let left = c.exp().saturating_sub(crate::auth::now_secs());
        tokio::time::Instant::now() + Duration::from_secs(left) + leeway
    })
}

/// A session's registry record.
fn session_entry(
    ctx: &ConnCtx,
    kind: SessionKind,
    route: &RouteConfig,
    caps: &Captures,
    claims: Option<&Claims>,
) -> SessionEntry {
    SessionEntry {
        id: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
        kind: kind.into(),
        route: route.name.clone(),
        agent: caps.get("agent").map(str::to_owned),
        subject: claims.and_then(|c| c.subject().map(str::to_owned)),
        issuer: claims.and_then(|c| c.issuer().map(str::to_owned)),
        jti: claims.and_then(|c| c.jti().map(str::to_owned)),
        token_exp: claims.map(|c| c.exp()),
        token_iat: claims.and_then(|c| c.iat()),
        token_key: claims.and_then(|c| c.key()),
        counted: true.into(),
        client: ctx.client_addr,
        http: ctx.protocol.label(),
        backend: OnceLock::new(),
        started: SystemTime::now(),
        control: SessionControl::new(),
        // A WebSocket session of a route with `[routes.observe]` has an observer hub.
        attached: route
            .observe
            .as_ref()
            .filter(|_| kind == SessionKind::WebSocket)
            .map(|o| crate::session::observe::Hub::new(o.clone()) as Arc<dyn crate::session::Attachment>)
            .into_iter()
            .collect(),
    }
}

/// The subject's places under its session caps (over every route, and on this route), or
/// 429 when either is full. Exact on this instance: each check and count is one step under the
/// cap's lock. Over the fleet, the others' sessions are counted by the directory's mirror, and
/// with `[fleet] subject_caps = "reserved"` the places are then taken in the store too (one
/// round trip, all or none), which no race between instances gets past.
async fn subject_slots(
    ctx: &ConnCtx,
    runtime: &Runtime,
    route: &RouteConfig,
    claims: Option<&Claims>,
) -> Result<Vec<SubjectSlot>, RequestError> {
    // No token, no subject: only the per-address caps apply. A token without `sub` counts
    // under its issuer's one subject-less key (`SubjectKey::subject` `None`).
    let Some(claims) = claims else { return Ok(Vec::new()) };
    let subject = claims.subject();
    let issuer = claims.issuer();
    let global = runtime.config.auth.max_sessions_per_subject;
    let per_route = route.auth.as_ref().map_or(0, |a| a.max_sessions_per_subject);
    let mut slots = Vec::new();
    // The keys to take places under in the fleet's store too (`subject_caps = "reserved"`).
    let reserving = ctx.shared.fleet.reserves();
    let mut capped = Vec::new();
    // Only the caps that are set build a key (no allocation per handshake when none is).
    let caps = [(global, None), (per_route, Some(&route.name))];
    for (max, route_name) in caps.into_iter().filter(|(max, _)| *max > 0) {
        let key = crate::limits::SubjectKey {
            route: route_name.cloned(),
            issuer: issuer.map(str::to_owned),
            subject: subject.map(str::to_owned),
        };
        // The fleet's other instances hold some of the subject's sessions (their directory's
        // mirror, read here without waiting on the store): this one may hold the rest.
        let elsewhere = ctx.shared.fleet.others_count(&key);
        if reserving {
            capped.push((key.clone(), max));
        }
        let acquired = match max.checked_sub(elsewhere).filter(|left| *left > 0) {
            Some(left) => ctx.shared.per_subject.try_acquire(key, left),
            None => Err(elsewhere),
        };
        match acquired {
            Ok(Some(slot)) => slots.push(SubjectSlot::Here { _slot: slot }),
            Ok(None) => {}
            Err(_) => {
                crate::metrics::limit_refused("subject_sessions");
                return Err(RequestError::TooManySessions);
            }
        }
    }
    match ctx.shared.fleet.reserve(&capped).await {
        Ok(Some(places)) => slots.push(SubjectSlot::Fleet { _slots: places }),
        Ok(None) => {}
        Err(crate::fleet::Full) => {
            crate::metrics::limit_refused("subject_sessions");
            return Err(RequestError::TooManySessions);
        }
    }
    Ok(slots)
}

/// A session's place under a subject cap: counted on this instance, or its places in the
/// fleet's store. Given back when dropped.
#[derive(Debug)]
pub(crate) enum SubjectSlot {
    Here { _slot: crate::limits::Slot<crate::limits::SubjectKey> },
    Fleet { _slots: crate::fleet::caps::Reservation },
}

/// A plain request not answered yet. When its handler is dropped before the answer (the client
/// closed its connection or reset its HTTP/2 stream while the request waited for its body, its
/// member or the caps), its access-log line is written then, with 499 and `client_gone`, as
/// NGINX writes one: no request goes unlogged. Only the line: no response head went out, so
/// `portcullis_http_requests_total` does not count it. One the drain's `drain_timeout` cut
/// (its connection closed with the process) is logged with status 0 (no answer went out, as
/// Envoy logs it) and `drain`: its client did not leave.
struct Unanswered<'a> {
    ctx: &'a ConnCtx,
    method: ::http::Method,
    uri: ::http::Uri,
    route: Arc<RouteConfig>,
    /// The agent its path names, for the line.
    agent: Option<String>,
    started: Instant,
    /// The token's claims, once the auth stage admitted it: the line names its subject.
    claims: Option<Arc<Claims>>,
    /// Cleared once the request has its answer, whose line is then the exchange's.
    armed: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        // A handler that panicked is not a client that left.
        if !self.armed || std::thread::panicking() {
            return;
        }
        let mut exchange = exchange_of_parts(self.ctx, &self.method, &self.uri, &self.route.name, self.started);
        let how = crate::session::close::Abandoned::of(&self.ctx.shared.sessions);
        exchange.status = how.status();
        exchange.agent = self.agent.take();
        exchange.subject = self.claims.as_ref().and_then(|c| c.subject().map(str::to_owned));
        exchange.finish(false, 0, how.label());
    }
}

/// The plain HTTP path (see [`answer_request`]), logged when its client leaves before the
/// answer.
async fn handle_request(
    ctx: &ConnCtx,
    runtime: &Runtime,
    route: Arc<RouteConfig>,
    caps: Captures,
    req: Request<Incoming>,
    started: Instant,
    stream: http::StreamHold,
) -> Response<ProxyBody> {
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let agent = caps.get("agent").map(str::to_owned);
    let mut unanswered =
        Unanswered { ctx, method, uri, route: route.clone(), agent, started, claims: None, armed: true };
    let answer = answer_request(ctx, runtime, route, caps, req, &mut unanswered, stream).await;
    unanswered.armed = false;
    answer
}

/// The plain HTTP path: auth, then (an MCP route) the mcp stage, then the request stage; the
/// response streams back.
async fn answer_request(
    ctx: &ConnCtx,
    runtime: &Runtime,
    route: Arc<RouteConfig>,
    caps: Captures,
    req: Request<Incoming>,
    unanswered: &mut Unanswered<'_>,
    stream: http::StreamHold,
) -> Response<ProxyBody> {
    let started = unanswered.started;
    let (head, body) = req.into_parts();
    let exchange = || exchange_of_parts(ctx, &head.method, &head.uri, &route.name, started);
    let refuse = |e: RequestError| reject_exchange(ctx, exchange(), e);
    if ctx.shared.sessions.draining() {
        return refuse(RequestError::Draining);
    }
    let path_and_query = head.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let admitted = match admit(ctx, runtime, &route, &caps, &head.headers, path_and_query, None).await {
        Ok(a) => a,
        Err(e) => return refuse(e),
    };
    let (Some(state), Some(http)) = (runtime.route_state.get(&route.name), runtime.upstreams.get(&route.name)) else {
        return refuse(RequestError::Internal("no routing state for a configured route"));
    };
    unanswered.claims = admitted.claims.clone();
    let claims = admitted.claims.as_deref();
    // Every plain request is a session from here to its answer's end (kind `stream` until its
    // answer says otherwise): a revocation while its member takes its time finds it, and its
    // answer ends as it arrives. While its body is still to come, the token's expiry,
    // revocation, the route's lifetime and the drain cut it, and an upload of unknown length
    // (chunked, or an HTTP/2 stream without a length) takes a place under the subject's caps,
    // refused with 429 before a member sees it.
    let uploading = !hyper::body::Body::is_end_stream(&body);
    let places = match (uploading, hyper::body::Body::size_hint(&body).exact()) {
        (true, None) => match subject_slots(ctx, runtime, &route, claims).await {
            Ok(slots) => Places::Held(slots),
            Err(e) => return refuse(e),
        },
        _ => Places::Uncounted,
    };
    let entry = session_entry(ctx, SessionKind::Stream, &route, &caps, claims);
    let mut governance = govern(ctx, runtime, &route, claims, entry, stream::Cut::Abort, places);
    // Every refusal from here ends the exchange's session, if it has one, with its line.
    let refuse = |e: RequestError, g: stream::Governance| reject_governed(ctx, exchange(), g, e);
    // An MCP message is read and checked whole before any of it is sent.
    let mut incoming = Some(body);
    let mut whole = None;
    if let Some(settings) = &route.mcp {
        // The message is in flight until it has been read whole.
        let read = mcp_stage(settings, &route, &caps, claims, &head, &mut incoming);
        match unless_ended(&mut governance, None, std::future::pending(), read).await {
            Ok(Ok(body)) => whole = body,
            Ok(Err(e)) => return refuse(e, governance),
            Err(reason) => return refuse(request::ForwardError::Ended(reason).into(), governance),
        }
    }
    let sticky_key = route
        .balance
        .sticky_key
        .as_ref()
        .and_then(|k| crate::routing::pool::sticky_key(k, &head.headers, path_and_query, &caps, claims));
    let forwarded = forwarded_for(ctx, runtime, &head.headers);
    // The proxy answers `Expect: 100-continue` itself (hyper sends 100 when the body is first
    // read, which is when a member is ready for it).
    let mut headers = match admitted.backend_headers(runtime, &route, &forwarded, &[::http::header::EXPECT]) {
        Ok(h) => h,
        Err(e) => return refuse(e.into(), governance),
    };
    // A session's envelope: opened here (any instance can), its member pinned and the backend's
    // own id restored; one that does not open, or whose session was ended, is an unknown session.
    let affinity = route.affinity.as_ref().zip(http.affinity.as_ref());
    let mut pinned = None;
    let mut envelope = None;
    if let Some((settings, keys)) = &affinity {
        // The envelope's header is the proxy's: another spelling of it (`Mcp.Session.Id`,
        // which a backend folding names reads as `Mcp-Session-Id`) would carry a raw id past
        // the envelope's check.
        forward::drop_other_spellings(&mut headers, &settings.header);
        if let Some(presented) = head.headers.get(&settings.header) {
            match open_envelope(ctx, &route, &caps, keys, claims, presented) {
                Ok((opened, digest)) => {
                    let Ok(id) = HeaderValue::from_str(&opened.backend_id) else {
                        let e = RequestError::Affinity(crate::routing::affinity::AffinityError::Tampered);
                        return refuse(e, governance);
                    };
                    headers.insert(settings.header.clone(), id);
                    pinned = Some(opened.member.clone());
                    envelope = Some(Envelope { digest, expires: opened.expires, presented: presented.clone(), opened });
                }
                Err(e) => {
                    tracing::info!(route = %route.name, client = %ctx.client_addr, reason = e.label(), "session envelope refused");
                    return refuse(RequestError::Affinity(e), governance);
                }
            }
        }
    }
    let out = request::Outgoing {
        method: head.method.clone(),
        path: forward::backend_path(&route, &caps, &admitted.path_and_query),
        headers,
        sticky_key,
        pinned,
    };
    let metrics = ctx.shared.metrics.clone();
    let mut exchange = exchange();
    exchange.agent = caps.get("agent").map(str::to_owned);
    exchange.subject = claims.and_then(|c| c.subject().map(str::to_owned));
    exchange.route_metrics = Some(http.metrics.clone());
    let settings = &route.backend;
    let (limit, idle) = (settings.max_request_body, settings.idle_body_timeout);
    let mut body = match (whole, incoming) {
        (Some(bytes), _) => stream::Upload::whole(bytes, metrics.clone()),
        (None, Some(body)) => stream::Upload::new(body, limit, idle, metrics.clone()),
        (None, None) => return refuse(RequestError::Internal("the request body was taken"), governance),
    };
    // Only a body still to come has anything to cut (and a task to wake when it is).
    if uploading {
        body.ends_with(governance.end_upload());
    }
    let upload = body.state();
    exchange.upload = Some(upload.clone());
    let sent = request::forward(&route, state, &caps, &http.client, out, body, &ctx.shared.conns);
    let count = || subject_slots(ctx, runtime, &route, claims).boxed();
    let answered = match unless_ended(&mut governance, Some(&count), upload.finished(), sent)
        .await
        .unwrap_or_else(|r| Err(request::ForwardError::Ended(r)))
    {
        Ok(a) => a,
        Err(e) => {
            let e = RequestError::from(e);
            match &e {
                RequestError::Forward(request::ForwardError::Ended(reason)) => {
                    tracing::info!(route = %route.name, client = %ctx.client_addr, reason = reason.http_end().label, "request ended with its session");
                }
                _ => warn_backend_failed(ctx, &route.name, &e, "backend request failed"),
            }
            return reject_governed(ctx, exchange, governance, e);
        }
    };
    let (mut parts, body) = answered.response.into_parts();
    // The session ended while its member worked. Revoked, its answer is refused, head and all
    // (401): nothing of it reaches a revoked subject. Any other end (the token's expiry, the
    // lifetime, the drain, the route's removal) does not cut an answer its member may be
    // acting on (a tool call's result): it is given the route's close_timeout to be delivered,
    // then the end applies (an event stream ends cleanly, another body is cut).
    match governance.ended_while_waiting() {
        Some(Cause::Revoked) => {
            let e = RequestError::from(request::ForwardError::Ended(Cause::Revoked));
            tracing::info!(route = %route.name, client = %ctx.client_addr, "an answer refused: its session was revoked while its member worked");
            return reject_governed(ctx, exchange, governance, e);
        }
        Some(reason) => governance.defer_end(reason),
        None => {}
    }
    // A plain request is answered by a final response: a member's 101 (hyper gives no other
    // informational one as the answer) switches to nothing the client asked for.
    if parts.status.is_informational() {
        let cause = format!("answered {} to a plain request", parts.status.as_u16());
        let e = RequestError::from(request::ForwardError::Backend { member: answered.member.clone(), cause });
        tracing::warn!(route = %route.name, client = %ctx.client_addr, error = %e, "backend request failed");
        return reject_governed(ctx, exchange, governance, e);
    }
    forward::strip_response_headers(&mut parts.headers);
    // A session ended at the server (DELETE answered 2xx, or 404: it is gone) ends its envelope
    // here and, with a Redis fleet, on every instance, so that the envelope cannot be replayed.
    if let (&::http::Method::DELETE, Some(e)) = (&head.method, &envelope) {
        if parts.status.is_success() || parts.status == StatusCode::NOT_FOUND {
            end_envelope(ctx, e.digest.clone(), e.expires);
        }
    }
    // The backend's session id goes to the client sealed: the member, the id, the subject.
    if let Some((settings, keys)) = &affinity {
        if let Some(id) = parts.headers.get(&settings.header).and_then(|v| v.to_str().ok()) {
            // The session's own id again (servers repeat it on every answer): the client keeps
            // the envelope it sent, so its session id does not change under it.
            if let Some(e) =
                envelope.as_ref().filter(|e| e.opened.backend_id == id && e.opened.member == answered.member)
            {
                parts.headers.insert(settings.header.clone(), e.presented.clone());
            } else {
                let sealed = crate::routing::affinity::Sealed {
                    member: answered.member.clone(),
                    backend_id: id.to_owned(),
                    issuer: claims.and_then(|c| c.issuer().map(str::to_owned)),
                    subject: claims.and_then(|c| c.subject().map(str::to_owned)),
                    expires: crate::fleet::now_secs() + settings.ttl.as_secs(),
                };
                if let Ok(v) = HeaderValue::from_str(&keys.seal(&envelope_context(&route, &caps), &sealed)) {
                    parts.headers.insert(settings.header.clone(), v);
                }
            }
        }
    }
    // Only a response that sets cookies pays for the list of credential cookie names.
    if parts.headers.contains_key(::http::header::SET_COOKIE) {
        forward::protect_credential_cookies(&mut parts.headers, &runtime.credential_cookies, route.sandbox);
    }
    if route.sandbox {
        // Agent-served pages run in an opaque origin: no cookie of this origin, and every
        // request they make is cross-origin (`Origin: null`), refused by origin policies.
        parts.headers.append(::http::header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(SANDBOX));
        parts.headers.insert(::http::header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    }
    let sse = parts
        .headers
        .get(::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
    exchange.status = parts.status.as_u16();
    exchange.member = Some(answered.member.clone());
    // Every body still in flight is a governed session, ended on expiry, revocation, lifetime
    // and drain: SSE cleanly, any other body (NDJSON, a long-poll, a download) cleanly when it
    // is made of events, else cut. A stream counts under the subject's caps too. SSE over a cap
    // is answered 429. Any other body of unknown length (chunked, or until close) takes a
    // place when there is one; over a cap it is delivered for `OVER_CAP_GRACE`, then ended as
    // a revoked one is: a short answer (a chunked JSON reply) is never refused after its
    // backend acted on the request, and no subject holds more long streams than its caps. A
    // body of known length is a transfer that ends, and is not counted.
    // The exchange's session (registered at its head) takes its places now if its response is
    // a stream and it holds none yet, and its kind is the answer's.
    let ends = hyper::body::Body::is_end_stream(&body);
    let open_ended = !ends && hyper::body::Body::size_hint(&body).exact().is_none();
    let _ = governance.session.entry().backend.set(answered.member.clone());
    let governance = match (sse, ends) {
        // The answer was whole with its head: the exchange's session ends with it.
        (false, true) => {
            governance.ended("complete", crate::session::Initiator::Backend, [upload.bytes(), 0]);
            None
        }
        _ => {
            let mut g = governance;
            let counted = g.session.entry().counted.load(Ordering::Acquire);
            let places = match (sse || open_ended) && !counted {
                false => Places::Uncounted,
                true => match subject_slots(ctx, runtime, &route, claims).await {
                    Ok(slots) => Places::Held(slots),
                    Err(RequestError::TooManySessions) if !sse => Places::OverCap,
                    Err(e) => return reject_governed(ctx, exchange, g, e),
                },
            };
            let (kind, cut) = match sse {
                true => (SessionKind::Sse, stream::Cut::Clean),
                false => {
                    let content_type = parts.headers.get(::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
                    (SessionKind::Stream, stream::Cut::for_content_type(content_type))
                }
            };
            g.cut = cut;
            g.session.becomes(kind);
            place(ctx, &route, &mut g, places);
            Some(g)
        }
    };
    // Counted once the answer is the member's: an SSE stream refused over the caps above is
    // counted as its 429, not as the member's status as well.
    http.metrics.request(sse, exchange.status);
    let least_conns = (route.balance.policy == crate::config::Policy::LeastConnections)
        .then(|| ctx.shared.conns.acquire(&answered.member));
    if let Some(g) = &governance {
        g.watched_by(ctx.watch(), runtime.config.server.send_timeout);
    }
    let mut download = stream::Download::new(body, settings.idle_body_timeout, governance, sse, exchange, least_conns);
    download.keep_alive(settings.sse_keepalive);
    download.hold_stream(stream);
    Response::from_parts(parts, Either::Right(download))
}

/// The login exchange's answer, or its refusal (logged at info, without the token).
fn login_answer(ctx: &ConnCtx, answer: Result<Response<Full<Bytes>>, login::LoginError>) -> Response<Full<Bytes>> {
    let e = match answer {
        Ok(r) => return r,
        Err(e) => e,
    };
    tracing::info!(client = %ctx.client_addr, error = %e, "login refused");
    match e {
        login::LoginError::Auth(a) => RequestError::from(a).response(),
        other => {
            let status = match other {
                login::LoginError::Method => StatusCode::METHOD_NOT_ALLOWED,
                _ => StatusCode::FORBIDDEN,
            };
            let mut r = Response::new(Full::new(Bytes::from(format!("{other}\n"))));
            *r.status_mut() = status;
            r
        }
    }
}

/// A streamed response's places under the subject's session caps.
enum Places {
    /// Taken, freed when the stream ends.
    Held(Vec<SubjectSlot>),
    /// A body of unknown length over a cap: delivered for [`OVER_CAP_GRACE`], then ended.
    OverCap,
    /// A body of known length: a transfer, not counted.
    Uncounted,
}

/// How long a body of unknown length over the subject's caps is delivered before it is ended:
/// long enough for a short answer to arrive whole, as the 429's `Retry-After` is for a retry.
const OVER_CAP_GRACE: Duration = Duration::from_secs(5);

/// Registers a plain exchange as a session (`entry`) at its request's head and sets what ends
/// it: the token's expiry, the route's `max_lifetime`, revocation, route removal and drain,
/// and for a stream over the subject's caps [`OVER_CAP_GRACE`].
fn govern(
    ctx: &ConnCtx,
    runtime: &Runtime,
    route: &RouteConfig,
    claims: Option<&Claims>,
    mut entry: SessionEntry,
    cut: stream::Cut,
    places: Places,
) -> stream::Governance {
    entry.counted = matches!(places, Places::Held(_)).into();
    let registered = ctx.shared.sessions.register(entry);
    let deadline = session_deadline(route, runtime, claims);
    let lifetime = Some(route.session.max_lifetime).filter(|l| !l.is_zero());
    let drain_spread = runtime.config.server.drain_spread;
    let close_within = route.session.close_timeout;
    let mut g = stream::Governance::new(registered, deadline, lifetime, drain_spread, cut, close_within);
    place(ctx, route, &mut g, places);
    g
}

/// Gives a governed session its `places`: held (counted from now on), none, or over the caps
/// (ended after [`OVER_CAP_GRACE`]).
fn place(ctx: &ConnCtx, route: &RouteConfig, g: &mut stream::Governance, places: Places) {
    match places {
        Places::Held(slots) => {
            g.session.count();
            g.slots = slots;
        }
        Places::Uncounted => {}
        Places::OverCap => {
            tracing::info!(route = %route.name, client = %ctx.client_addr, grace = ?OVER_CAP_GRACE, "a stream over the subject's session cap; it ends after the grace");
            g.end_at(tokio::time::Instant::now() + OVER_CAP_GRACE, Cause::OverCap);
        }
    }
}

/// Answers a request that got no answer of its member's with `e`, and ends its exchange's
/// session with its line: for the session's own reason (`revoked`,
/// `token_expired`, ...) when it was stopped, else the refusal's label; by the client when its
/// body failed, else by the proxy.
fn reject_governed(
    ctx: &ConnCtx,
    exchange: stream::Exchange,
    mut governance: stream::Governance,
    e: RequestError,
) -> Response<ProxyBody> {
    let reason = match &e {
        RequestError::Forward(request::ForwardError::Ended(cause)) => cause.http_end().label,
        other => other.result_label(),
    };
    let by = match e {
        RequestError::Forward(request::ForwardError::ClientBody(_)) => crate::session::Initiator::Client,
        _ => crate::session::Initiator::Proxy,
    };
    let bytes = exchange.upload.as_ref().map_or(0, |u| u.bytes());
    governance.ended(reason, by, [bytes, 0]);
    reject_exchange(ctx, exchange, e)
}

/// What takes an upload's places under its subject's caps.
type CountUpload<'a> =
    dyn Fn() -> futures_util::future::BoxFuture<'a, Result<Vec<SubjectSlot>, RequestError>> + Sync + 'a;

/// `work`, unless the exchange's session ends first while its upload is in flight (`until` resolves when the upload is whole): then its reason. A request whose
/// body has all arrived waits for its answer as one without a body does: the drain, a
/// rebalance or its token's expiry do not cut an answer its member may be acting on.
///
/// An upload not counted under its subject's caps (its length was given) that is still in
/// flight after [`OVER_CAP_GRACE`] is given to `count`, which takes its places or ends it: the
/// client sets both the length and the pace, so a length must not keep a trickled upload
/// outside the caps.
async fn unless_ended<T>(
    g: &mut stream::Governance,
    count: Option<&CountUpload<'_>>,
    until: impl std::future::Future<Output = ()>,
    work: impl std::future::Future<Output = T>,
) -> Result<T, Cause> {
    let mut counting = count.filter(|_| !g.session.entry().counted.load(Ordering::Acquire));
    let mut taking = None;
    let grace = tokio::time::sleep(OVER_CAP_GRACE);
    tokio::pin!(work, until, grace);
    loop {
        tokio::select! {
            out = &mut work => return Ok(out),
            reason = std::future::poll_fn(|cx| g.poll_stop(cx)) => return Err(reason),
            () = &mut until => break,
            () = &mut grace, if counting.is_some() => taking = counting.take().map(|count| count()),
            taken = async {
                match taking.as_mut() {
                    Some(taking) => taking.await,
                    None => std::future::pending().await,
                }
            }, if taking.is_some() => {
                taking = None;
                let Ok(slots) = taken else { return Err(Cause::OverCap) };
                g.session.count();
                g.slots = slots;
            }
        }
    }
    Ok(work.await)
}

/// Answers a plain request that got no backend response, and writes its access-log line.
fn reject_request(
    ctx: &ConnCtx,
    req: &Request<Incoming>,
    route: &str,
    started: Instant,
    e: RequestError,
) -> Response<ProxyBody> {
    reject_exchange(ctx, new_exchange(ctx, req, route, started), e)
}

/// The record of a plain request on `route`, before anything is known of its answer.
fn new_exchange(ctx: &ConnCtx, req: &Request<Incoming>, route: &str, started: Instant) -> stream::Exchange {
    exchange_of_parts(ctx, req.method(), req.uri(), route, started)
}

/// [`new_exchange`] of a request taken apart.
fn exchange_of_parts(
    ctx: &ConnCtx,
    method: &::http::Method,
    uri: &::http::Uri,
    route: &str,
    started: Instant,
) -> stream::Exchange {
    stream::Exchange {
        method: method.clone(),
        route: route.to_owned(),
        agent: None,
        subject: None,
        path: uri.path().to_owned(),
        client: ctx.client_addr,
        member: None,
        status: 0,
        started,
        upload: None,
        metrics: ctx.shared.metrics.clone(),
        route_metrics: None,
    }
}

fn reject_exchange(ctx: &ConnCtx, mut exchange: stream::Exchange, e: RequestError) -> Response<ProxyBody> {
    log_refusal(ctx, &exchange.route, &e);
    let resp = e.response();
    exchange.status = resp.status().as_u16();
    match &exchange.route_metrics {
        Some(m) => m.request(false, exchange.status),
        None => ctx.shared.metrics.http_request(&exchange.route, "request", exchange.status),
    }
    note_error(&ctx.shared.metrics, &exchange.route, &e);
    let sent = hyper::body::Body::size_hint(resp.body()).exact().unwrap_or(0);
    exchange.finish(false, sent, e.result_label());
    resp.map(Either::Left)
}

/// The WebSocket path: upgrade, auth and connect stages; answers 101 or an error.
///
/// Its future is as large as its largest awaited stage, and it is moved whole into hyper's
/// connection state for every request. So the rare paths (fan-out, observers, relays to
/// another instance, and below it the registry lookup and the JWKS fetch) are awaited boxed:
/// inline they made every request's future 50 KB, which hyper holds for each connection (a held
/// SSE stream took 53 KiB, 41 since).
async fn handle_upgrade(
    ctx: &Arc<ConnCtx>,
    runtime: &Runtime,
    route: Arc<RouteConfig>,
    caps: Captures,
    mut req: Request<Incoming>,
    stream: http::StreamHold,
) -> Response<ProxyBody> {
    // Before any token is looked at: a flood of handshakes (with bad tokens or none) costs one
    // bucket check per attempt, not a signature check.
    if let Some(rate) = &runtime.handshake_rate {
        let key = crate::limits::ip_key(ctx.client_addr.ip(), runtime.config.server.ipv6_prefix_len);
        if let Err(wait) = rate.check(key) {
            crate::metrics::limit_refused("handshake_rate");
            return reject(ctx, &route.name, RequestError::HandshakeRate(wait));
        }
    }
    let checked = match ctx.protocol {
        Protocol::Http1 => upgrade::check(&req),
        Protocol::Http2 => upgrade::check_extended_connect(&req),
    };
    let ws = match checked {
        Ok(ws) => ws,
        Err(e) => return reject(ctx, &route.name, e.into()),
    };
    if ctx.shared.sessions.draining() {
        return reject(ctx, &route.name, RequestError::Draining);
    }
    let path_and_query = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let observed = route.observe.as_ref().and_then(|_| crate::session::observe::requested(path_and_query));
    let resume_id = route.resume.as_ref().and_then(|s| query_param(path_and_query, &s.param));
    if ctx.from_peer && observed.is_none() && resume_id.is_none() {
        // Another instance relays resumes and observers, and nothing else.
        return reject(ctx, &route.name, RequestError::PeerOnly);
    }
    if let (Some(observe), Some((instance, id))) = (route.observe.clone(), observed) {
        match instance.filter(|i| i != ctx.shared.fleet.instance()) {
            None => return Box::pin(handle_observer(ctx, runtime, &route, &caps, req, ws, &observe, id, stream)).await,
            Some(owner) => {
                let peer = ctx.shared.fleet.session_peer(&owner, id).filter(|_| !ctx.from_peer);
                let Some(peer) = peer else { return reject(ctx, &route.name, RequestError::NoSuchSession) };
                let to = Owner { instance: &owner, peer: &peer, kind: "observe" };
                return Box::pin(relay_to_owner(ctx, &route, &caps, req, &ws, to, stream)).await;
            }
        }
    }
    // A resume id this instance does not hold, held by another: the client goes there.
    let elsewhere = resume_id
        .as_deref()
        .filter(|id| {
            !ctx.from_peer && crate::session::resume::valid_id(id) && !ctx.shared.resumes.holds(&route.name, id)
        })
        .and_then(|id| ctx.shared.fleet.resume_owner(&route.name, id));
    if let Some((owner, peer)) = elsewhere {
        let to = Owner { instance: &owner, peer: &peer, kind: "resume" };
        return Box::pin(relay_to_owner(ctx, &route, &caps, req, &ws, to, stream)).await;
    }
    let admitted = match admit(ctx, runtime, &route, &caps, req.headers(), path_and_query, Some(ws)).await {
        Ok(a) => a,
        Err(e) => return reject(ctx, &route.name, e),
    };
    let Some(ws) = admitted.ws.as_ref() else {
        return reject(ctx, &route.name, RequestError::Internal("the auth stage dropped the upgrade"));
    };
    let mut registration = None;
    if let Some(settings) = &route.resume {
        let id = query_param(path_and_query, &settings.param);
        if id.as_deref().is_some_and(|id| !crate::session::resume::valid_id(id)) {
            ctx.shared.metrics.resume_refused(&route.name, "invalid");
            return reject(ctx, &route.name, RequestError::BadResumeId);
        }
        let claims = admitted.claims.as_deref();
        let (issuer, subject) = (claims.and_then(|c| c.issuer()), claims.and_then(|c| c.subject()));
        match ctx.shared.resumes.claim(&route.name, id.as_deref(), issuer, subject, caps.get("agent")) {
            Err(e) => {
                ctx.shared.metrics.resume_refused(&route.name, e.label());
                tracing::info!(route = %route.name, client = %ctx.client_addr, error = %e, "resume refused");
                return reject(ctx, &route.name, RequestError::Resume(e));
            }
            Ok(crate::session::resume::Claim::Resume(held)) => {
                // The session goes on under the new token: revoking it closes the session.
                held.set_resumed_jti(claims.and_then(|c| c.jti()));
                return handle_resume(ctx, runtime, &route, req, &admitted, held, stream);
            }
            Ok(crate::session::resume::Claim::Fresh(r)) => registration = Some(r),
        }
    }
    let subject_slots = match subject_slots(ctx, runtime, &route, admitted.claims.as_deref()).await {
        Ok(s) => s,
        Err(e) => return reject(ctx, &route.name, e),
    };
    let forwarded = forwarded_for(ctx, runtime, req.headers());
    let backend_headers = match admitted.backend_headers(runtime, &route, &forwarded, connect::SET_BY_HANDSHAKE) {
        Ok(h) => h,
        Err(e) => return reject(ctx, &route.name, e.into()),
    };
    let sticky_key = route.balance.sticky_key.as_ref().and_then(|k| {
        crate::routing::pool::sticky_key(k, req.headers(), path_and_query, &caps, admitted.claims.as_deref())
    });
    // A recorded route reads the backend's payloads, so they must not be compressed: no
    // extension offer reaches the backend (permessage-deflate is not negotiated end to end).
    // An observed route neither: its observers read the same payloads, and the client whose
    // session they watch must not be able to make them unreadable.
    let unextended;
    // A resumable route neither: a compression context would not survive a new client.
    // Nor a fan-out route: its backend's frames go to clients that negotiated nothing.
    let plain =
        route.recording.is_some() || route.observe.is_some() || route.resume.is_some() || route.fanout.is_some();
    let ws = match plain && ws.extensions.is_some() {
        true => {
            unextended = upgrade::WsRequest { extensions: None, ..ws.clone() };
            &unextended
        }
        false => ws,
    };
    let requester = requester(ctx, runtime, admitted.claims.as_deref());
    let breq = BackendRequest {
        path_and_query: &admitted.path_and_query,
        ws,
        headers: &backend_headers,
        sticky_key,
        requester,
    };
    let Some(state) = runtime.route_state.get(&route.name) else {
        return reject(ctx, &route.name, RequestError::Internal("no routing state for a configured route"));
    };
    // Registered from here on: a revocation or drain while the backend connect runs (its
    // timeouts can add up to seconds) finds the session and stops it.
    let claims = admitted.claims.as_deref();
    let mut entry = session_entry(ctx, SessionKind::WebSocket, &route, &caps, claims);
    if let Some(r) = &registration {
        entry.attached.push(r.held.clone());
    }
    let registered = ctx.shared.sessions.register(entry);
    if let Some(settings) = route.fanout.clone() {
        // One stream per subject (of one issuer): another subject never reads output produced
        // for this one's identity, nor types into it.
        let identity =
            claims.map_or(String::new(), |c| format!("{}\u{0}{}", c.issuer().unwrap_or(""), c.subject().unwrap_or("")));
        let key =
            (route.name.clone(), caps.get("agent").unwrap_or("").to_owned(), admitted.path_and_query.clone(), identity);
        let join = JoinFanout { key, settings, breq: &breq, state, caps: &caps };
        let task = match Box::pin(join_fanout(ctx, runtime, &route, join, registered, claims)).await {
            Ok(t) => t,
            Err(e) => return reject(ctx, &route.name, e),
        };
        let protocol = task.stream.protocol.clone();
        let resp = own_answer(ctx, &req, &admitted, protocol.as_deref());
        let _ = task.registered.entry().backend.set(task.stream.member.clone());
        ctx.shared.metrics.upgrade(&route.name, "ok");
        let on_upgrade = hyper::upgrade::on(&mut req);
        hand_off(ctx, on_upgrade, Accepted::Fanout(FanoutClient { task, subject_slots, stream }));
        return resp;
    }
    // A recorded session holds its file's descriptor too: its place is taken first, so that a
    // session that could not be recorded is refused before anything is opened for it.
    let recording_slot = match route.recording.is_some().then(connect::outbound_slot).transpose() {
        Ok(p) => p,
        Err(e) => return reject(ctx, &route.name, e.into()),
    };
    let backend = match connect::connect(&route, state, &caps, &breq, &ctx.shared.conns, &ctx.shared.metrics).await {
        Ok(b) => b,
        Err(e) => {
            let e = RequestError::from(e);
            warn_backend_failed(ctx, &route.name, &e, "backend connect failed");
            return reject(ctx, &route.name, e);
        }
    };
    let _ = registered.entry().backend.set(backend.member.clone());
    if let Some(reason) = registered.entry().control.stopped() {
        let e = match reason {
            StopReason::Revoked => RequestError::Auth(crate::auth::AuthError::Revoked),
            StopReason::Drain | StopReason::RouteRemoved | StopReason::Rebalance => RequestError::Draining,
        };
        return reject(ctx, &route.name, e);
    }
    let mut resp = Response::new(Either::Left(Full::new(Bytes::new())));
    let h = resp.headers_mut();
    if ctx.protocol == Protocol::Http1 {
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(SEC_WEBSOCKET_ACCEPT, backend.accept.clone());
    }
    // HTTP/2 accepts an extended CONNECT with 200 (RFC 8441 §5).
    *resp.status_mut() = ctx.protocol.accepts_upgrade_with();
    let h = resp.headers_mut();
    // Only a real subprotocol is echoed, never a token-carrying entry.
    let token_entry = |p: &HeaderValue| {
        admitted.token_subprotocol.as_deref().is_some_and(|prefix| p.as_bytes().starts_with(prefix.as_bytes()))
    };
    match (backend.protocol.as_ref().filter(|p| !token_entry(p)), &admitted.subprotocol_marker) {
        (Some(p), _) => {
            h.insert(SEC_WEBSOCKET_PROTOCOL, p.clone());
        }
        // A browser that offered subprotocols fails a 101 that selects none: answer with the
        // marker it listed beside its token entry.
        (None, Some(marker)) => {
            if let Ok(v) = HeaderValue::from_str(marker) {
                h.insert(SEC_WEBSOCKET_PROTOCOL, v);
            }
        }
        (None, None) => {}
    }
    if let (Some(r), Some(p)) = (&registration, h.get(SEC_WEBSOCKET_PROTOCOL).and_then(|p| p.to_str().ok())) {
        let _ = r.held.protocol.set(p.to_owned());
    }
    if let Some(id) = registration.as_ref().and_then(|r| HeaderValue::from_str(r.held.id()).ok()) {
        h.insert(crate::session::resume::ID_HEADER, id);
    }
    if let Some(e) = &backend.extensions {
        h.insert(SEC_WEBSOCKET_EXTENSIONS, e.clone());
    }
    ctx.shared.metrics.upgrade(&route.name, "ok");
    let on_upgrade = hyper::upgrade::on(&mut req);
    let pending = Pending {
        backend,
        route,
        claims: admitted.claims,
        registered,
        subject_slots,
        stream,
        resume: registration,
        recording_slot,
    };
    hand_off(ctx, on_upgrade, Accepted::Relay(pending));
    resp
}

/// The route as an observer's token is checked against: the observe scope instead of the
/// agent grant.
fn observer_route(route: &RouteConfig, observe: &crate::config::ObserveSettings) -> RouteConfig {
    let mut as_observer = route.clone();
    if let Some(a) = as_observer.auth.as_mut() {
        a.agent_claim = None;
        a.agent_scope = Some(observe.scope.clone());
    }
    as_observer
}

/// The other instance a resume or an observer is carried to.
pub(crate) struct Owner<'a> {
    /// Its name (the preamble is addressed to it).
    instance: &'a str,
    /// Its peer listener.
    peer: &'a str,
    /// `resume` or `observe`.
    kind: &'static str,
}

/// A resume or an observer whose session another instance holds (`to`):
/// asks the owner with the client's own handshake and, when it accepts, answers the client as it
/// did and carries the session's bytes both ways. The client's token is checked here first (as
/// for any upgrade) and again by the owner, which governs the session.
async fn relay_to_owner(
    ctx: &Arc<ConnCtx>,
    route: &RouteConfig,
    caps: &Captures,
    mut req: Request<Incoming>,
    ws: &upgrade::WsRequest,
    owner: Owner<'_>,
    stream: http::StreamHold,
) -> Response<ProxyBody> {
    let (peer, kind) = (owner.peer, owner.kind);
    let runtime = ctx.shared.runtime.load_full();
    let path_and_query = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    // The token is checked here as for any upgrade (an observer's against the observe scope): a
    // client without one never reaches the other instance.
    let policy = match (kind, &route.observe) {
        ("observe", Some(observe)) => observer_route(route, observe),
        _ => route.clone(),
    };
    if let Err(e) = admit(ctx, &runtime, &policy, caps, req.headers(), path_and_query, Some(ws.clone())).await {
        return reject(ctx, &route.name, e);
    }
    let Some(auth) = ctx.shared.fleet.peer_auth() else {
        return reject(ctx, &route.name, RequestError::NoSuchSession);
    };
    let limit = route.backend.connect_timeout + route.backend.handshake_timeout;
    let place = match connect::outbound_slot() {
        Ok(p) => p,
        Err(e) => return reject(ctx, &route.name, e.into()),
    };
    let asked = peer::ask(auth, &owner, ctx.client_addr, path_and_query, req.headers(), ws, limit).await;
    let (status, owner, link) = match asked {
        Ok(answer) => answer,
        Err(e) => {
            crate::metrics::fleet_relayed(kind, "unreachable");
            tracing::warn!(route = %route.name, %peer, error = %e, "the instance that holds the session did not answer");
            return reject(ctx, &route.name, RequestError::PeerUnreachable);
        }
    };
    let resp = peer::answer(ctx.protocol == Protocol::Http2, status, &owner);
    let Some(link) = link else {
        crate::metrics::fleet_relayed(kind, "refused");
        return resp;
    };
    crate::metrics::fleet_relayed(kind, "ok");
    ctx.shared.metrics.upgrade(&route.name, "relayed");
    let on_upgrade = hyper::upgrade::on(&mut req);
    hand_off(ctx, on_upgrade, Accepted::Peer(PeerRelay { link, slot: place, stream }));
    resp
}

/// A client reconnecting to a held session (`?resume=<id>`, already claimed for it): the proxy
/// answers the upgrade itself, with the subprotocol the session's first client was answered,
/// and hands the upgraded stream to the session once hyper releases it.
fn handle_resume(
    ctx: &Arc<ConnCtx>,
    runtime: &Runtime,
    route: &RouteConfig,
    mut req: Request<Incoming>,
    admitted: &auth::Admitted,
    held: Arc<crate::session::resume::Held>,
    stream: http::StreamHold,
) -> Response<ProxyBody> {
    let resp = own_answer(ctx, &req, admitted, held.protocol.get().map(String::as_str));
    ctx.shared.metrics.upgrade(&route.name, "resumed");
    let on_upgrade = hyper::upgrade::on(&mut req);
    let resuming = Resuming {
        held,
        expires_at: session_deadline(route, runtime, admitted.claims.as_deref()),
        // An HTTP/2 stream keeps its place under max_streams_per_ip while it is attached.
        stream,
    };
    hand_off(ctx, on_upgrade, Accepted::Resume(resuming));
    resp
}

/// The proxy's own answer to an upgrade it serves without a backend handshake of its own (an
/// observer, a resume, a fan-out client): 101 (HTTP/2: 200) with the accept for the client's key, and `protocol` (what the backend
/// chose for the session or stream) when this client offers it too, else the marker.
fn own_answer(
    ctx: &ConnCtx,
    req: &Request<Incoming>,
    admitted: &auth::Admitted,
    protocol: Option<&str>,
) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Left(Full::new(Bytes::new())));
    let h = resp.headers_mut();
    if ctx.protocol == Protocol::Http1 {
        let key = admitted.ws.as_ref().map(|ws| upgrade::accept_value(ws.key.as_bytes()));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Some(v) = key.and_then(|k| HeaderValue::from_str(&k).ok()) {
            h.insert(SEC_WEBSOCKET_ACCEPT, v);
        }
    }
    let offered = |p: &str| {
        req.headers()
            .get_all(SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|o| o.trim() == p))
    };
    let protocol = protocol.filter(|p| offered(p)).or(admitted.subprotocol_marker.as_deref());
    if let Some(v) = protocol.and_then(|p| HeaderValue::from_str(p).ok()) {
        h.insert(SEC_WEBSOCKET_PROTOCOL, v);
    }
    *resp.status_mut() = ctx.protocol.accepts_upgrade_with();
    resp
}

/// What a fan-out client's join needs.
struct JoinFanout<'a> {
    key: crate::session::fanout::Key,
    settings: Arc<crate::config::FanoutSettings>,
    breq: &'a BackendRequest<'a>,
    state: &'a crate::routing::pool::RouteState,
    caps: &'a Captures,
}

/// Subscribes a client to its key's shared stream, opening the stream (one backend connect,
/// which concurrent first clients wait for) when there is none.
async fn join_fanout(
    ctx: &ConnCtx,
    runtime: &Runtime,
    route: &Arc<RouteConfig>,
    j: JoinFanout<'_>,
    registered: SessionGuard,
    claims: Option<&Claims>,
) -> Result<crate::session::fanout::ClientTask, RequestError> {
    let shared = &ctx.shared;
    let slot = shared.fanouts.slot(&j.key);
    let open = async {
        let b =
            connect::connect(route, j.state, j.caps, j.breq, &shared.conns, &shared.metrics).await.map_err(|e| {
                let e = RequestError::from(e);
                warn_backend_failed(ctx, &route.name, &e, "backend connect failed");
                e
            })?;
        let (commands, commands_rx) = tokio::sync::mpsc::unbounded_channel();
        // Forwarded client frames (each up to max_frame_size) wait here for the stream's task:
        // two at most beside its outbox, so a backend that stops reading holds a bounded
        // amount, not 64 frames of up to max_frame_size each.
        let (data, data_rx) = tokio::sync::mpsc::channel(2);
        let protocol = b.protocol.as_ref().and_then(|p| p.to_str().ok()).map(str::to_owned);
        let stream =
            Arc::new(crate::session::fanout::Stream::new(route.name.clone(), b.member, protocol, commands, data));
        let task = crate::session::fanout::StreamTask {
            backend: b.stream,
            early: b.early,
            stream: stream.clone(),
            commands: commands_rx,
            data: data_rx,
            settings: j.settings.clone(),
            session: route.session.clone(),
            key: j.key.clone(),
            fanouts: shared.fanouts.clone(),
            metrics: shared.metrics.clone(),
            drain: shared.sessions.drain_signal().clone(),
            _guard: b.guard,
        };
        shared.tasks.spawn(crate::session::fanout::run_stream(task).in_current_span());
        Ok::<_, RequestError>(stream)
    };
    let stream = slot.get_or_open(open).await?;
    let Some((id, rx, lagged)) = stream.subscribe(j.settings.queue) else {
        return Err(RequestError::Draining);
    };
    Ok(crate::session::fanout::ClientTask {
        stream,
        id,
        rx,
        lagged,
        settings: j.settings,
        control: registered.entry().control.clone(),
        registered,
        expires_at: session_deadline(route, runtime, claims),
        session: route.session.clone(),
        drain_spread: runtime.config.server.drain_spread,
        metrics: shared.metrics.clone(),
    })
}

/// The first value of the query parameter `name`, decoded.
fn query_param(path_and_query: &str, name: &str) -> Option<String> {
    let (_, query) = path_and_query.split_once('?')?;
    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// An observer of a live session (`?observe=<id>` on a route with `[routes.observe]`): the
/// route's auth with the observe scope in place of the agent grant, then the proxy answers the
/// upgrade itself and the observer runs as a task of its own on the upgraded stream.
#[allow(clippy::too_many_arguments)]
async fn handle_observer(
    ctx: &Arc<ConnCtx>,
    runtime: &Runtime,
    route: &RouteConfig,
    caps: &Captures,
    mut req: Request<Incoming>,
    ws: upgrade::WsRequest,
    observe: &crate::config::ObserveSettings,
    id: u64,
    stream: http::StreamHold,
) -> Response<ProxyBody> {
    let as_observer = observer_route(route, observe);
    let path_and_query = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let admitted = match admit(ctx, runtime, &as_observer, caps, req.headers(), path_and_query, Some(ws)).await {
        Ok(a) => a,
        Err(e) => return reject(ctx, &route.name, e),
    };
    let agent = caps.get("agent");
    let Some(hub) = crate::session::observe::hub_of(&ctx.shared.sessions, id, &route.name, agent) else {
        return reject(ctx, &route.name, RequestError::NoSuchSession);
    };
    let claims = admitted.claims.as_deref();
    // An observer is a session of its own: its subject's caps, its token's expiry, revocation
    // and drain apply to it as to any other.
    let slots = match subject_slots(ctx, runtime, route, claims).await {
        Ok(s) => s,
        Err(e) => return reject(ctx, &route.name, e),
    };
    let who = crate::session::observe::subject_key(claims.and_then(|c| c.issuer()), claims.and_then(|c| c.subject()));
    let observing = match hub.join(&who) {
        Ok(o) => o,
        Err(crate::session::observe::JoinError::Full) => {
            return reject(ctx, &route.name, RequestError::TooManyObservers)
        }
        Err(crate::session::observe::JoinError::SubjectFull) => {
            return reject(ctx, &route.name, RequestError::TooManyObserversForSubject)
        }
    };
    let registered = ctx.shared.sessions.register(session_entry(ctx, SessionKind::Observer, route, caps, claims));
    let expires_at = session_deadline(&as_observer, runtime, claims);
    let resp = own_answer(ctx, &req, &admitted, None);
    ctx.shared.metrics.upgrade(&route.name, "observer");
    let on_upgrade = hyper::upgrade::on(&mut req);
    let watch = crate::session::observe::Watch {
        session: id,
        subject: admitted.claims.as_ref().and_then(|c| c.subject().map(str::to_owned)).unwrap_or_default(),
        route: route.name.clone(),
        drop_grace: observe.drop_grace,
        own: registered,
        _slots: Box::new(slots),
        expires_at,
        drain_spread: runtime.config.server.drain_spread,
        lifetime: route.session.max_lifetime,
        rate: crate::session::rate::Metered::client(&route.session),
    };
    let hub = Arc::downgrade(&hub);
    hand_off(ctx, on_upgrade, Accepted::Observe(Watching { observing, hub, watch, stream }));
    resp
}

fn reject(ctx: &ConnCtx, route: &str, e: RequestError) -> Response<ProxyBody> {
    log_refusal(ctx, route, &e);
    ctx.shared.metrics.upgrade(route, e.result_label());
    note_error(&ctx.shared.metrics, route, &e);
    e.response().map(Either::Left)
}

/// The metric and log that some errors owe besides the answer.
/// The gate the auth stage asks before checking the signature of an uncached token: the client
/// address's bucket of `token_check_rate_per_ip`. Tokens in the verified cache never reach it,
/// so a flood of garbage tokens costs a bucket check each and a reconnect storm of valid ones
/// costs nothing.
fn token_check_gate<'a>(ctx: &'a ConnCtx, runtime: &'a Runtime) -> impl Fn() -> Result<(), Duration> + Sync + 'a {
    move || {
        let Some(rate) = &runtime.token_check_rate else { return Ok(()) };
        let key = crate::limits::ip_key(ctx.client_addr.ip(), runtime.config.server.ipv6_prefix_len);
        rate.check(key).inspect_err(|_| crate::metrics::limit_refused("token_check_rate"))
    }
}

/// One info line per refused request (at most one a second per reason, with how many were held
/// back): the route, the client's address, the status and why, never the token.
fn log_refusal(ctx: &ConnCtx, route: &str, e: &RequestError) {
    let reason = e.result_label();
    if let Some(held_back) = crate::limits::log_sample(reason) {
        let status = e.status().as_u16();
        tracing::info!(route, client = %ctx.client_addr, status, reason, held_back, error = %e, "request refused");
    }
}

fn note_error(metrics: &crate::metrics::Metrics, route: &str, e: &RequestError) {
    match e {
        RequestError::Auth(a) => metrics.auth_failure(route, a.reason()),
        RequestError::Internal(what) => tracing::error!(route, what, "internal error"),
        _ if e.descriptors_spent() => crate::metrics::limit_refused("descriptors"),
        _ => {}
    }
}

/// A warning for a backend that failed `route`'s request, but not for the proxy's own capacity
/// refusal, which [`log_refusal`] logs at most once a second: a flood of them would flood the log.
fn warn_backend_failed(ctx: &ConnCtx, route: &str, e: &RequestError, what: &'static str) {
    if !e.descriptors_spent() {
        tracing::warn!(route, client = %ctx.client_addr, error = %e, "{what}");
    }
}

/// What an envelope is sealed for (its associated data): the route and the path's captures, so
/// a session opened on one agent's path does not open on another's, whose grants differ.
fn envelope_context(route: &RouteConfig, caps: &Captures) -> String {
    let mut context = route.name.clone();
    for (name, value) in &caps.0 {
        context.push('\u{0}');
        context.push_str(name);
        context.push('=');
        context.push_str(value);
    }
    context
}

/// A session envelope a request presented, opened.
struct Envelope {
    /// What a lock on its end names.
    digest: String,
    /// When it stops opening (Unix seconds).
    expires: u64,
    /// As the client sent it.
    presented: HeaderValue,
    /// What it holds.
    opened: crate::routing::affinity::Sealed,
}

/// Opens a presented session envelope for this token: what it holds and its digest, unless it
/// does not open or its session was ended.
fn open_envelope(
    ctx: &ConnCtx,
    route: &RouteConfig,
    caps: &Captures,
    keys: &crate::routing::affinity::Keys,
    claims: Option<&Claims>,
    presented: &HeaderValue,
) -> Result<(crate::routing::affinity::Sealed, String), crate::routing::affinity::AffinityError> {
    use crate::routing::affinity::{digest, AffinityError};
    let text = presented.to_str().map_err(|_| AffinityError::Malformed)?;
    let (issuer, subject) = (claims.and_then(|c| c.issuer()), claims.and_then(|c| c.subject()));
    let opened = keys.open(&envelope_context(route, caps), text, issuer, subject, crate::fleet::now_secs())?;
    let digest = digest(&route.name, text);
    if ctx.shared.denylist.envelope_denied(&digest) {
        return Err(AffinityError::Ended);
    }
    Ok((opened, digest))
}

/// Ends a session envelope here at once, and on the fleet's other instances through the Redis
/// store (a lock until it would have expired), written off the request path: the answer never
/// waits on the store. The local store keeps no envelope lock (one instance, already refusing
/// it; after a restart the server that ended the session answers it 404). A store that does not
/// take it is logged, for the same reason.
fn end_envelope(ctx: &ConnCtx, digest: String, expires: u64) {
    let fleet = ctx.shared.fleet.clone();
    ctx.shared.denylist.deny_envelope(&digest, expires);
    crate::metrics::fleet_lock_applied("local", None);
    if !fleet.is_shared() {
        return;
    }
    let lock = crate::fleet::Lock::new(crate::fleet::Target::Envelope { digest }, expires, fleet.instance());
    tokio::spawn(async move {
        if let Err(e) = fleet.write(&lock).await {
            tracing::warn!(error = %e, "an ended MCP session was not written to the fleet store: other instances learn of it from the server's 404");
        }
    });
}

/// The mcp stage (`kind = "mcp"`): the method and revision, then a `POST` body read whole,
/// checked against its headers and authorized. Returns the body read, to be forwarded as it
/// came; `None` for a request without one (`GET`, `DELETE`), whose body stays in `incoming`.
async fn mcp_stage(
    settings: &crate::config::McpSettings,
    route: &RouteConfig,
    caps: &Captures,
    claims: Option<&Claims>,
    head: &::http::request::Parts,
    incoming: &mut Option<Incoming>,
) -> Result<Option<Bytes>, RequestError> {
    let has_body = incoming.as_ref().is_some_and(|b| !hyper::body::Body::is_end_stream(b));
    let revision = mcp::check_head(settings, &head.method, &head.headers, has_body).map_err(mcp::Refusal::from)?;
    if head.method != ::http::Method::POST {
        return Ok(None);
    }
    let Some(body) = incoming.take() else { return Err(RequestError::Internal("the request body was taken")) };
    let (idle, total) = (route.backend.idle_body_timeout, settings.read_timeout);
    let bytes =
        mcp::read_body(&head.headers, body, settings.max_message, idle, total).await.map_err(mcp::Refusal::from)?;
    let messages = mcp::parse(&bytes).map_err(mcp::Refusal::from)?;
    // The headers first (a body they disagree with is refused whole), then each message's grant;
    // one pass decides the answer and what each message counts as.
    let headers = mcp::check_headers(&head.headers, revision, &messages);
    let (granted, denied) = match &headers {
        Ok(()) => mcp::grants(settings, caps, claims, &messages),
        Err(_) => (Vec::new(), None),
    };
    for (i, m) in messages.all.iter().enumerate() {
        let Some(method) = m.method.as_deref() else { continue };
        let result = match (&headers, granted.get(i), &denied) {
            (Ok(()), _, None) => "forwarded",
            (Ok(()), Some(false), Some(_)) => "denied",
            _ => "refused",
        };
        let tool = match (method, m.name.as_deref()) {
            ("tools/call", Some(tool)) => mcp::tool_label(settings, tool),
            _ => "",
        };
        crate::metrics::mcp_message(&route.name, mcp::method_label(method), tool, result);
    }
    match (headers, denied) {
        (Ok(()), None) => Ok(Some(bytes)),
        (Err(e), _) => Err(mcp::refuse(e, &messages, None).into()),
        (Ok(()), Some((i, e))) => {
            if let mcp::McpError::Denied(d) = &e {
                tracing::info!(route = %route.name, subject = claims.and_then(|c| c.subject()).unwrap_or(""), denied = %d, "MCP message refused");
            }
            Err(mcp::refuse(e, &messages, Some(i)).into())
        }
    }
}

/// The auth stage for every kind of request, then the fleet's gate: under
/// `[fleet] staleness = "strict"`, a token-checked request is refused (503) while the store has
/// been unreachable for longer than `max_staleness`, as a revocation made meanwhile would not be
/// known here. Open routes check no token, so no revocation applies to them.
async fn admit(
    ctx: &ConnCtx,
    runtime: &Runtime,
    route: &RouteConfig,
    caps: &Captures,
    headers: &::http::HeaderMap,
    path_and_query: &str,
    ws: Option<upgrade::WsRequest>,
) -> Result<auth::Admitted, RequestError> {
    let gate = token_check_gate(ctx, runtime);
    let admitted =
        auth::admit(route, caps, headers, path_and_query, ws, runtime.authenticator.as_deref(), &gate).await?;
    // A protected resource (RFC 9728) takes only tokens minted for it (RFC 8707): the audience
    // names the resource.
    if let (Some(resource), Some(claims)) = (&route.resource, admitted.claims.as_deref()) {
        if !claims.has_audience(&crate::config::render_path(&resource.id, caps)) {
            return Err(RequestError::Auth(crate::auth::AuthError::WrongAudience));
        }
    }
    if admitted.claims.is_some() {
        if let Err(stale) = ctx.shared.fleet.health().admit() {
            crate::metrics::fleet_refused();
            return Err(RequestError::FleetStale(stale));
        }
    }
    Ok(admitted)
}

/// The client stream hyper hands over once it has sent the upgrade's answer.
async fn upgraded(on_upgrade: OnUpgrade, client_addr: SocketAddr) -> Option<hyper::upgrade::Upgraded> {
    on_upgrade.await.inspect_err(|e| tracing::debug!(client = %client_addr, error = %e, "client upgrade failed")).ok()
}

/// An HTTP/2 WebSocket's client side: the upgraded stream, finished with END_STREAM.
impl relay::FinishStream for TokioIo<hyper::upgrade::Upgraded> {}

/// Relays an upgraded HTTP/1.1 session on the connection's own stream.
async fn run_session(
    shared: Arc<Shared>,
    on_upgrade: OnUpgrade,
    accepted: Accepted,
    client_addr: SocketAddr,
    slot: accept::ConnSlot,
) {
    let Some(upgraded) = upgraded(on_upgrade, client_addr).await else {
        accepted.abandon();
        return;
    };
    let parts = match upgraded.downcast::<TokioIo<http::HeadIo<ClientStream>>>() {
        Ok(parts) => parts,
        Err(_) => {
            tracing::error!("upgraded connection is not the stream type it was served with");
            return;
        }
    };
    let client = parts.io.into_inner().into_inner();
    // `read_buf` is a view into hyper's whole read buffer (8 KiB or more): copy out the few
    // bytes it holds (usually none) and let the buffer go, or every idle session pins it.
    let client_early = parts.read_buf.to_vec();
    drop(parts.read_buf);
    accepted.start(&shared, client, client_early, Some(slot));
}

/// Starts the relay of an accepted session, registered for `/sessions`, as a task of its own;
/// it writes the session's log line at the end. `slot` is the client connection's, when the
/// session is its connection's only use (HTTP/1.1).
fn start_session<C: relay::FinishStream + Send + 'static>(
    shared: &Arc<Shared>,
    mut p: Pending,
    client: C,
    client_early: Vec<u8>,
    slot: Option<accept::ConnSlot>,
) {
    let expires_at = session_deadline(&p.route, &shared.runtime.load(), p.claims.as_deref());
    let registered = p.registered;
    let mut taps = crate::session::Taps::default();
    if let Some(settings) = &p.route.recording {
        let place = p.recording_slot.take();
        let e = registered.entry();
        let meta = crate::session::recording::Meta {
            session: e.id,
            route: e.route.clone(),
            agent: e.agent.clone(),
            subject: e.subject.clone(),
        };
        crate::session::recording::start(settings, meta, place, &shared.tasks, &shared.recording_ledgers, &mut taps);
    }
    if let Some(hub) = registered.entry().attachment::<crate::session::observe::Hub>() {
        taps.output.push(hub);
    }
    let params = RelayParams {
        settings: p.route.session.clone(),
        drain_spread: shared.runtime.load().config.server.drain_spread,
        allowed_rsv: if p.backend.extensions.is_some() { 0x70 } else { 0 },
        control: registered.entry().control.clone(),
        metrics: shared.metrics.clone(),
        expires_at,
        taps,
    };
    let started = Instant::now();
    shared.metrics.sessions_active.increment(1.0);
    let backend_early = std::mem::take(&mut p.backend.early);
    let backend_stream = p.backend.stream;
    let resume = p.resume.take().zip(p.route.resume.clone());
    let mut finish = Finish {
        started,
        metrics: shared.metrics.clone(),
        _least_conns: p.backend.guard,
        registered,
        _slot: None,
        _subject_slots: p.subject_slots,
        _stream: http::StreamHold::default(),
    };
    // The relay runs as its own task with only what it needs: the handshake-phase state of
    // this connection task (hyper, TLS handshake, request handling) is freed now, which keeps
    // an idle session's memory down.
    let Some((registration, settings)) = resume else {
        (finish._slot, finish._stream) = (slot, p.stream);
        let session = relay::relay(client, client_early, backend_stream, backend_early, params);
        shared.tasks.spawn(session.map(move |end| finish.done(&end)).in_current_span());
        return;
    };
    // Resumable: the client side can be replaced, and what its connection holds goes with it.
    // The resume greeting goes to the client before the relay starts: the proxy's frames, not
    // the backend's output (not recorded, not shown to observers, not counted or limited as
    // the backend's).
    let greeting = registration.greeting(&settings);
    let hold = Box::new((slot, p.stream));
    let mut client =
        crate::session::resume::Resumable::new(Box::new(client), hold, registration, settings, shared.metrics.clone());
    let write_within = p.route.session.close_timeout;
    let session = async move {
        if !greeting.is_empty() {
            use tokio::io::AsyncWriteExt as _;
            // A client that takes none of it within close_timeout is dealt with by the relay.
            let write = async {
                client.write_all(&greeting).await?;
                client.flush().await
            };
            let _ = tokio::time::timeout(write_within, write).await;
        }
        relay::relay(client, client_early, backend_stream, backend_early, params).await
    };
    shared.tasks.spawn(session.map(move |end| finish.done(&end)).in_current_span());
}

/// What is left to do when a session ends, and what it holds until then. Who and where come
/// from the session's one record in the registry.
struct Finish {
    started: Instant,
    metrics: Arc<crate::metrics::Metrics>,
    _least_conns: Option<crate::routing::sticky::ConnGuard>,
    registered: crate::session::SessionGuard,
    _slot: Option<accept::ConnSlot>,
    _subject_slots: Vec<SubjectSlot>,
    _stream: http::StreamHold,
}

impl Finish {
    fn done(self, end: &SessionEnd) {
        crate::session::close::record_end(&self.metrics, self.registered.entry(), self.started, end);
    }
}
