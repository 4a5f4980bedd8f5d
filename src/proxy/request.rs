//! Stage: request. Sends a plain HTTP request (REST, SSE) to a member of the route's pool and
//! returns the response head as soon as it arrives; the bodies stream through [`super::stream`].
//!
//! Member choice is the WebSocket one ([`RouteState::candidates`]: registry, health, balance
//! policy, sticky key), so an agent's requests and sessions reach the same member. Connections
//! come from the route's keep-alive pool ([`crate::outbound::Upstream`]).
//!
//! Retries, on the next candidate member:
//! - a member that could not be connected to (nothing was sent): always; the member counts a
//!   failure for passive health;
//! - a member that failed after the request went out (reset, closed, broken response): only for
//!   idempotent methods (RFC 9110 §9.2.2) whose body is empty or was not read yet, since no
//!   byte of the response has reached the client. Not a member failure: one request can fail
//!   on a healthy member, and a client must not be able to eject members.
//!
//! A response head not received within `response_header_timeout` of the request's last byte is
//! 504 and is not retried (the member may still be working on it).

use std::error::Error as _;
use std::io;
use std::time::Duration;

use http::header::HOST;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Incoming};

use super::stream::{BodyError, Upload};
use crate::config::{Captures, RouteConfig};
use crate::outbound::Upstream;
use crate::routing::pool::{PoolError, RouteState};
use crate::routing::sticky::ConnCounts;

/// Why a request got no response from a member.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The route's pool has no member to offer (400, 404 or 503).
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The member that holds the request's session (its affinity envelope's) is no longer in
    /// the pool, or not healthy (404: the client starts a new session).
    #[error("the member that held this session is gone: start a new session")]
    MemberGone,
    /// The request body is larger than `max_request_body` (413).
    #[error("request body over the limit of {0} bytes")]
    TooLarge(u64),
    /// The client's request body stalled for `idle_body_timeout` (408).
    #[error("request body stalled for {0:?}")]
    ClientStalled(Duration),
    /// The client's request body failed (the client went away, or broke its framing) (400).
    #[error("request body: {0}")]
    ClientBody(String),
    /// The process's outbound descriptors are all in use (503): no member was tried.
    #[error(transparent)]
    Descriptors(crate::limits::Spent),
    /// No member could be reached (503).
    #[error("no backend member reachable ({attempts} tried): {last}")]
    Unreachable {
        /// Members tried.
        attempts: usize,
        /// The last connect error.
        last: String,
    },
    /// Every member that was tried timed out connecting (504).
    #[error("backend connect timed out")]
    ConnectTimeout,
    /// No response head within `response_header_timeout` (504).
    #[error("no response head within {0:?}")]
    ResponseTimeout(Duration),
    /// The exchange's session ended (its token expired or was revoked, its lifetime ran out, the
    /// proxy drains, an upload of given length still in flight after a grace finds its
    /// subject's caps full) before the answer came: the request body, if still in flight, is
    /// cut, and so is the backend's request. The status says which (401, 408, 429, 503).
    #[error("the session of this request was ended: {}", .0.http_end().label)]
    Ended(crate::session::close::Cause),
    /// The member broke the exchange: reset, closed early or sent a malformed response (502).
    #[error("backend {member} failed the request: {cause}")]
    Backend {
        /// The member address.
        member: String,
        /// What went wrong (hyper's error chain; never header values).
        cause: String,
    },
}

/// The request as it goes to the backend.
pub struct Outgoing {
    /// Method, unchanged.
    pub method: Method,
    /// Backend path and query.
    pub path: String,
    /// End-to-end and forwarding headers, without `Host` (set per member).
    pub headers: HeaderMap,
    /// Key for sticky member choice.
    pub sticky_key: Option<Vec<u8>>,
    /// The one member the request may go to (the session's, from its affinity envelope).
    pub pinned: Option<String>,
}

/// A member's response head, its body still to stream.
pub struct Answered {
    /// The response.
    pub response: Response<Incoming>,
    /// The member that answered.
    pub member: String,
}

/// Sends `out` with `body` to the route's members in turn (see the module docs for retries).
pub async fn forward(
    route: &RouteConfig,
    state: &RouteState,
    caps: &Captures,
    client: &Upstream,
    out: Outgoing,
    body: Upload,
    conns: &ConnCounts,
) -> Result<Answered, ForwardError> {
    let limit = route.backend.max_request_body;
    if body.size_hint().lower() > limit {
        return Err(ForwardError::TooLarge(limit));
    }
    let mut order = state.candidates(route, caps, out.sticky_key.as_deref(), conns, None).await?;
    if let Some(member) = &out.pinned {
        // A session lives on the member that created it: no other may take its requests.
        order.retain(|c| c.addr == *member);
        if order.is_empty() {
            return Err(ForwardError::MemberGone);
        }
    }
    let attempts = order.len();
    let idempotent = matches!(
        out.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    let progress = body.state();
    let header_timeout = route.backend.response_header_timeout;
    let mut last: Option<ForwardError> = None;
    let mut timed_out = false;
    let Outgoing { method, path, headers, .. } = out;
    let mut headers = Some(headers);
    for (i, member) in order.iter().enumerate() {
        let member = member.addr.as_str();
        // The body for this attempt: the first one always has it; a later one only while no
        // byte of it was read.
        let Some(attempt) = body.again() else { break };
        // The headers are copied only for an attempt that may be followed by another.
        let these = if i + 1 == order.len() { headers.take() } else { headers.clone() }.unwrap_or_default();
        let req = build(&method, &path, these, member, attempt)?;
        let sent = client.request(req);
        let deadline = async {
            progress.finished().await;
            tokio::time::sleep(header_timeout).await;
        };
        let result = tokio::select! {
            r = sent => r,
            () = deadline => return Err(ForwardError::ResponseTimeout(header_timeout)),
        };
        let e = match result {
            Ok(response) => {
                state.health.record_success(member);
                return Ok(Answered { response, member: member.to_owned() });
            }
            Err(e) => e,
        };
        if let Some(client_side) = client_body_error(&e, limit) {
            return Err(client_side);
        }
        // The proxy's own want, not the member's: no member is tried, none is ejected.
        if let Some(spent) = source_of::<crate::limits::Spent>(&e) {
            return Err(ForwardError::Descriptors(*spent));
        }
        if e.is_connect() {
            tracing::debug!(%member, error = %chain(&e), "backend connect failed");
            // Out of descriptors or ports is the proxy's own want too.
            if !source_of::<io::Error>(&e).is_some_and(crate::limits::exhausted) {
                state.health.record_failure(member);
            }
            if is_timeout(&e) {
                timed_out = true;
            } else {
                last = Some(ForwardError::Unreachable { attempts, last: chain(&e) });
            }
            continue;
        }
        tracing::debug!(%member, error = %chain(&e), "backend request failed");
        let failed = ForwardError::Backend { member: member.to_owned(), cause: chain(&e) };
        if !idempotent {
            return Err(failed);
        }
        last = Some(failed);
    }
    match last {
        Some(e @ ForwardError::Backend { .. }) => Err(e),
        _ if timed_out => Err(ForwardError::ConnectTimeout),
        Some(e) => Err(e),
        None => Err(ForwardError::Unreachable { attempts, last: "no member tried".to_owned() }),
    }
}

fn build(
    method: &Method,
    path: &str,
    headers: HeaderMap,
    member: &str,
    body: Upload,
) -> Result<Request<UnsyncBoxBody<bytes::Bytes, crate::outbound::BoxError>>, ForwardError> {
    let bad = |what: &str| ForwardError::Backend { member: member.to_owned(), cause: what.to_owned() };
    let uri: Uri =
        format!("http://{member}{path}").parse().map_err(|_| bad("member address is not a valid URI authority"))?;
    let mut req = Request::new(UnsyncBoxBody::new(body));
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    let host = HeaderValue::from_str(member).map_err(|_| bad("member address is not a valid Host"))?;
    req.headers_mut().insert(HOST, host);
    // Pooled connections near their share of the descriptor budget: this one is not kept.
    if crate::limits::pooled_pressure() {
        crate::metrics::pooled_pressure_close();
        req.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(req)
}

/// The client-side cause of a failed attempt: our own upload cut it (too large, stalled), or
/// the client's body failed.
fn client_body_error(e: &hyper_util::client::legacy::Error, limit: u64) -> Option<ForwardError> {
    Some(match source_of::<BodyError>(e)? {
        BodyError::TooLarge(_) => ForwardError::TooLarge(limit),
        BodyError::Idle(d) => ForwardError::ClientStalled(*d),
        BodyError::Client(why) => ForwardError::ClientBody(why.clone()),
        BodyError::Ended(why) => ForwardError::Ended(*why),
        // Only after the answer was given, which no one then waits for.
        e @ BodyError::AnswerEnded => ForwardError::ClientBody(e.to_string()),
    })
}

fn is_timeout(e: &hyper_util::client::legacy::Error) -> bool {
    source_of::<io::Error>(e).is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
}

/// The first of `e`'s causes that is a `T`.
fn source_of<T: std::error::Error + 'static>(e: &hyper_util::client::legacy::Error) -> Option<&T> {
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(t) = s.downcast_ref::<T>() {
            return Some(t);
        }
        source = s.source();
    }
    None
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(": ");
        s.push_str(&c.to_string());
        source = c.source();
    }
    s
}
