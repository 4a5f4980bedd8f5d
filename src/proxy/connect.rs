//! Stage: connect. Opens a WebSocket to a backend member: TCP connect with a timeout, then the
//! opening handshake with the client's key, subprotocols and extensions passed through, plus
//! forwarding headers. Members are tried in order, each once, until one answers 101 with the
//! right `Sec-WebSocket-Accept`; the client's 101 is sent only after that.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};

use super::forward::backend_path;
use super::upgrade::{accept_value, header_has_token, WsRequest};
use crate::codec as frame;
use crate::config::{BackendSettings, Captures, RouteConfig};
use crate::metrics::Metrics;
use crate::routing::pool::{PoolError, Probe, RouteState};
use crate::routing::sticky::{ConnCounts, ConnGuard};
use crate::session::close::HEALTH_CHECK;

/// Largest backend handshake response accepted.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// Why no backend session could be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A member was reached but its handshake was refused or malformed (502).
    #[error("backend {member} failed the WebSocket handshake: {cause}")]
    BadHandshake {
        /// The member address.
        member: String,
        /// What went wrong.
        cause: HandshakeError,
    },
    /// Every member timed out, connecting or waiting for the handshake (504).
    #[error("backend timed out (connect timeout {0:?})")]
    Timeout(Duration),
    /// The route's pool has no member to offer (400, 404 or 503).
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The process's outbound descriptors are all in use (503): no member was tried.
    #[error(transparent)]
    Descriptors(crate::limits::Spent),
    /// No member could be reached (503).
    #[error("no backend member reachable ({attempts} tried): {last}")]
    Unreachable {
        /// Members tried.
        attempts: usize,
        /// The last connect error.
        last: io::Error,
    },
}

/// What was wrong with a backend's handshake response.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The backend answered with a status other than 101.
    #[error("answered {0} instead of 101")]
    Status(u16),
    /// The `Sec-WebSocket-Accept` value does not match the key.
    #[error("wrong Sec-WebSocket-Accept")]
    BadAccept,
    /// 101 without `Upgrade: websocket` / `Connection: upgrade`.
    #[error("101 without Upgrade: websocket")]
    NotWebSocket,
    /// The backend accepted an extension nobody offered it (RFC 6455 §9.1: the client side
    /// must fail the connection).
    #[error("101 with an extension that was not offered")]
    UnofferedExtension,
    /// The response could not be parsed or was too large.
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    /// The connection closed or failed before a full response head arrived.
    #[error("connection lost during the handshake: {0}")]
    Io(io::Error),
    /// No response within `handshake_timeout`.
    #[error("no handshake response within {0:?}")]
    Timeout(Duration),
}

/// A backend WebSocket ready to relay.
#[derive(Debug)]
pub struct BackendConn {
    /// The TCP stream, after the handshake.
    pub stream: TcpStream,
    /// Bytes the backend sent right after its 101 (first frames), to relay first.
    pub early: Vec<u8>,
    /// The member that answered.
    pub member: String,
    /// `Sec-WebSocket-Accept` to echo to the client.
    pub accept: HeaderValue,
    /// Subprotocol the backend chose.
    pub protocol: Option<HeaderValue>,
    /// Extensions the backend accepted (end to end with the client).
    pub extensions: Option<HeaderValue>,
    /// Counts this session for least-connections, and holds its connection's place in the
    /// descriptor budget, while held.
    pub guard: Option<ConnGuard>,
}

/// What goes into the backend request.
pub struct BackendRequest<'a> {
    /// Path and query requested by the client.
    pub path_and_query: &'a str,
    /// The validated upgrade.
    pub ws: &'a WsRequest,
    /// The headers for the backend, built by [`super::forward::backend_headers`] (without the
    /// handshake's own, which this stage writes).
    pub headers: &'a HeaderMap,
    /// Key for sticky member choice, when the route is sticky and the request has one.
    pub sticky_key: Option<Vec<u8>>,
    /// Who asks, hashed (the token's issuer and subject, else the client's address): a member
    /// is ejected for failed handshakes only when they are not all one requester's
    /// ([`crate::routing::health::PassiveHealth::record_refusal`]).
    pub requester: u64,
}

/// A slot in the process's outbound descriptor budget for a connection about to be opened to a
/// member or a peer instance, or the refusal (503).
pub(crate) fn outbound_slot() -> Result<crate::limits::OutboundSlot, ConnectError> {
    crate::limits::outbound_slot().map_err(ConnectError::Descriptors)
}

/// The active health check the pool runs: a TCP connect, or with a path a full WebSocket
/// handshake followed by a polite close.
pub(crate) fn probe() -> Probe {
    Arc::new(|addr, path, settings| Box::pin(async move { check_member(&addr, path.as_deref(), settings).await }))
}

/// Whether `addr` passes the check; `None` when the proxy could not open the connection (its
/// outbound budget spent, or out of descriptors or ports), which says nothing of the member.
async fn check_member(addr: &str, path: Option<&str>, settings: BackendSettings) -> Option<bool> {
    // A check's connection is counted as a session's is: routes checked every 50 ms each would
    // otherwise open connections beside a spent budget.
    let _slot = crate::limits::outbound_slot().ok()?;
    // From the route's source addresses, as its sessions' connects: a firewall that lets only
    // those through would otherwise fail every check.
    let deadline = Instant::now() + settings.connect_timeout;
    let mut tcp = match timeout_at(deadline, crate::outbound::dial(addr, &settings.source_addresses, deadline)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) if crate::limits::exhausted(&e) => return None,
        _ => return Some(false),
    };
    let Some(path) = path else { return Some(true) };
    let key = "cG9ydGN1bGxpcy1oZWFsdGg=";
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let ws = WsRequest { key: HeaderValue::from_static("cG9ydGN1bGxpcy1oZWFsdGg="), protocol: None, extensions: None };
    let ok = matches!(timeout(settings.handshake_timeout, handshake(&mut tcp, req.as_bytes(), &ws)).await, Ok(Ok(_)));
    if ok {
        // A polite close, masked as a client must.
        let close = frame::close_frame(HEALTH_CHECK.code, HEALTH_CHECK.reason, Some(rand::random()));
        let _ = tcp.write_all(&close).await;
    }
    Some(ok)
}

/// Finds the route's members (static, or from the registry), orders the healthy ones by the
/// balance policy, and tries them in turn (at most `max_attempts`); returns the first backend
/// that completes the handshake. A member that cannot be connected to is ejected for a
/// growing backoff.
pub async fn connect(
    route: &RouteConfig,
    state: &RouteState,
    caps: &Captures,
    req: &BackendRequest<'_>,
    conns: &Arc<ConnCounts>,
    metrics: &Metrics,
) -> Result<BackendConn, ConnectError> {
    let order = state.candidates(route, caps, req.sticky_key.as_deref(), conns, Some(req.requester)).await?;
    // One place serves every attempt: each closes its socket before the next opens one. The
    // proxy's own want is no member's failure: none is tried, none is ejected.
    let place = outbound_slot()?;
    let attempts = order.len();
    let path = backend_path(route, caps, req.path_and_query);
    let started = Instant::now();
    let mut bad: Option<ConnectError> = None;
    let mut timed_out = false;
    let mut last_io: Option<io::Error> = None;
    for member in &order {
        let member = member.addr.as_str();
        match connect_member(member, &path, route, req).await {
            Ok(mut conn) => {
                state.health.record_handshake(member, req.requester);
                metrics.backend_connect_seconds.record(started.elapsed().as_secs_f64());
                conn.guard = Some(conns.acquire(member).holding(place));
                return Ok(conn);
            }
            Err(Attempt::Connect(e)) => {
                tracing::debug!(%member, error = %e, "backend connect failed");
                // Out of descriptors or ports is the proxy's own want, not the member's failure.
                if !crate::limits::exhausted(&e) {
                    state.health.record_failure(member);
                }
                last_io = Some(e);
            }
            Err(Attempt::ConnectTimeout) => {
                tracing::debug!(%member, "backend connect timed out");
                timed_out = true;
                state.health.record_failure(member);
            }
            Err(Attempt::Handshake(HandshakeError::Status(code))) if (400..500).contains(&code) => {
                // The member is up and refused this request (an unknown path or agent, a denied
                // client): not a member failure, or clients could eject healthy members; and
                // another member would answer the same.
                tracing::debug!(%member, status = code, "backend refused the upgrade");
                return Err(ConnectError::BadHandshake {
                    member: member.to_owned(),
                    cause: HandshakeError::Status(code),
                });
            }
            // Whatever the member does once it has the request (an error status, a bad or no
            // answer, a hang-up, a timeout) may be the request's doing: the agent it names, its
            // path or headers. One requester's failures never eject it, or one client could
            // eject members that serve everyone else (DESIGN §11); a member that fails the
            // handshakes of two requesters is (`record_refusal`). The next member is tried.
            Err(Attempt::Handshake(cause)) => {
                tracing::debug!(%member, error = %cause, "backend handshake failed");
                let timeout = matches!(cause, HandshakeError::Timeout(_));
                state.health.record_refusal(member, req.requester, !timeout);
                if timeout {
                    timed_out = true;
                } else {
                    bad.get_or_insert(ConnectError::BadHandshake { member: member.to_owned(), cause });
                }
            }
        }
    }
    if let Some(e) = bad {
        return Err(e);
    }
    match last_io {
        Some(last) if !timed_out => Err(ConnectError::Unreachable { attempts, last }),
        _ => Err(ConnectError::Timeout(route.backend.connect_timeout)),
    }
}

enum Attempt {
    Connect(io::Error),
    ConnectTimeout,
    Handshake(HandshakeError),
}

async fn connect_member(
    member: &str,
    path: &str,
    route: &RouteConfig,
    req: &BackendRequest<'_>,
) -> Result<BackendConn, Attempt> {
    let settings = &route.backend;
    let deadline = Instant::now() + settings.connect_timeout;
    let mut stream =
        match timeout_at(deadline, crate::outbound::dial(member, &settings.source_addresses, deadline)).await {
            Ok(Ok(s)) => s,
            // An address's share ran out: the member timed out, as when the whole did.
            Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut => return Err(Attempt::ConnectTimeout),
            Ok(Err(e)) => return Err(Attempt::Connect(e)),
            Err(_) => return Err(Attempt::ConnectTimeout),
        };
    let _ = stream.set_nodelay(true);
    let head = request_head(member, path, req);
    match timeout(settings.handshake_timeout, handshake(&mut stream, &head, req.ws)).await {
        Ok(Ok((early, accept, protocol, extensions))) => {
            Ok(BackendConn { stream, early, member: member.to_owned(), accept, protocol, extensions, guard: None })
        }
        Ok(Err(e)) => Err(Attempt::Handshake(e)),
        Err(_) => Err(Attempt::Handshake(HandshakeError::Timeout(settings.handshake_timeout))),
    }
}

/// Headers of the client's upgrade that the backend handshake sets itself.
/// Headers the backend handshake writes itself; the client's are not passed on.
pub(crate) const SET_BY_HANDSHAKE: &[HeaderName] = &[
    header::CONTENT_LENGTH,
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::SEC_WEBSOCKET_PROTOCOL,
    header::SEC_WEBSOCKET_EXTENSIONS,
];

fn request_head(member: &str, path: &str, req: &BackendRequest<'_>) -> Vec<u8> {
    let mut h = Vec::with_capacity(512);
    h.extend_from_slice(b"GET ");
    h.extend_from_slice(path.as_bytes());
    h.extend_from_slice(b" HTTP/1.1\r\n");
    let mut line = |name: &[u8], value: &[u8]| {
        h.extend_from_slice(name);
        h.extend_from_slice(b": ");
        h.extend_from_slice(value);
        h.extend_from_slice(b"\r\n");
    };
    line(b"host", member.as_bytes());
    line(b"upgrade", b"websocket");
    line(b"connection", b"Upgrade");
    line(b"sec-websocket-key", req.ws.key.as_bytes());
    line(b"sec-websocket-version", b"13");
    if let Some(p) = &req.ws.protocol {
        line(b"sec-websocket-protocol", p.as_bytes());
    }
    if let Some(e) = &req.ws.extensions {
        line(b"sec-websocket-extensions", e.as_bytes());
    }
    for (name, value) in req.headers {
        line(name.as_str().as_bytes(), value.as_bytes());
    }
    h.extend_from_slice(b"\r\n");
    h
}

type Handshake = (Vec<u8>, HeaderValue, Option<HeaderValue>, Option<HeaderValue>);

async fn handshake(stream: &mut TcpStream, head: &[u8], ws: &WsRequest) -> Result<Handshake, HandshakeError> {
    stream.write_all(head).await.map_err(HandshakeError::Io)?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() >= MAX_RESPONSE_HEAD {
            return Err(HandshakeError::Malformed("response head too large"));
        }
        buf.reserve(1024);
        let n = stream.read_buf(&mut buf).await.map_err(HandshakeError::Io)?;
        if n == 0 {
            return Err(HandshakeError::Io(io::ErrorKind::UnexpectedEof.into()));
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => continue,
            Err(_) => return Err(HandshakeError::Malformed("invalid HTTP response")),
        };
        let code = resp.code.unwrap_or(0);
        if code != 101 {
            return Err(HandshakeError::Status(code));
        }
        let mut map = HeaderMap::new();
        for h in resp.headers.iter() {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| HandshakeError::Malformed("invalid header name"))?;
            let value =
                HeaderValue::from_bytes(h.value).map_err(|_| HandshakeError::Malformed("invalid header value"))?;
            map.append(name, value);
        }
        if !header_has_token(&map, &header::UPGRADE, "websocket")
            || !header_has_token(&map, &header::CONNECTION, "upgrade")
        {
            return Err(HandshakeError::NotWebSocket);
        }
        let expected = accept_value(ws.key.as_bytes());
        let accept = map.get(header::SEC_WEBSOCKET_ACCEPT).cloned().ok_or(HandshakeError::BadAccept)?;
        if accept.as_bytes() != expected.as_bytes() {
            return Err(HandshakeError::BadAccept);
        }
        let extensions = map.get(header::SEC_WEBSOCKET_EXTENSIONS);
        if extensions.is_some() && ws.extensions.is_none() {
            return Err(HandshakeError::UnofferedExtension);
        }
        let early = buf[len..].to_vec();
        return Ok((
            early,
            accept,
            map.get(header::SEC_WEBSOCKET_PROTOCOL).cloned(),
            map.get(header::SEC_WEBSOCKET_EXTENSIONS).cloned(),
        ));
    }
}
