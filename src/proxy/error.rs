//! One place that maps every request-stage error to its HTTP status, headers and metric label.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, SEC_WEBSOCKET_VERSION, UPGRADE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::auth::AuthError;
use crate::proxy::connect::ConnectError;
use crate::proxy::request::ForwardError;
use crate::proxy::route::RouteError;
use crate::proxy::upgrade::UpgradeError;
use crate::routing::pool::PoolError;

/// `Retry-After` (seconds) of a 429 for a subject over its session cap.
const SESSION_RETRY_AFTER: &str = "5";

/// Why a request (an upgrade, or a plain HTTP request) got no answer from a backend.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The request's `Host` or `:authority` is missing, repeated or not an authority (400).
    #[error(transparent)]
    Host(#[from] crate::proxy::host::HostError),
    /// Route stage.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// Upgrade stage.
    #[error(transparent)]
    Upgrade(#[from] UpgradeError),
    /// Auth stage (401 or 403).
    #[error(transparent)]
    Auth(AuthError),
    /// Connect stage.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// Request stage (plain HTTP).
    #[error(transparent)]
    Forward(#[from] ForwardError),
    /// The proxy is draining and takes no new sessions.
    #[error("the proxy is shutting down")]
    Draining,
    /// The subject holds as many sessions as `max_sessions_per_subject` allows (429).
    #[error("too many sessions for this subject")]
    TooManySessions,
    /// The client address made handshakes faster than `handshake_rate_per_ip` (429); a token
    /// is there again after the duration.
    #[error("too many handshakes from this address")]
    HandshakeRate(std::time::Duration),
    /// The client address caused uncached token checks faster than `token_check_rate_per_ip`
    /// (429, `Retry-After` like [`RequestError::HandshakeRate`]).
    #[error("too many token checks from this address")]
    TokenCheckRate(std::time::Duration),
    /// The session has `max_observers` observers already (429).
    #[error("this session has as many observers as it may")]
    TooManyObservers,
    /// The observer's subject holds `max_observers_per_subject` of the session's observer
    /// places already (429).
    #[error("this subject watches the session as many times as it may")]
    TooManyObserversForSubject,
    /// No live session with that id on this route and agent (404), for an observer.
    #[error("no such live session")]
    NoSuchSession,
    /// The resume id is not 1-128 characters of `[A-Za-z0-9_-]` (400).
    #[error("the resume id must be 1-128 characters of [A-Za-z0-9_-]")]
    BadResumeId,
    /// The resume id is held by another subject's session (403), or the session is being
    /// opened or resumed by another connection (409).
    #[error(transparent)]
    Resume(crate::session::resume::ClaimError),
    /// The client address holds `max_streams_per_ip` HTTP/2 streams already (429).
    #[error("too many HTTP/2 streams from this address")]
    TooManyStreams,
    /// A client header the route refuses (400): a name with an underscore under
    /// `headers_with_underscores = "reject"`.
    #[error(transparent)]
    Header(#[from] crate::proxy::forward::HeaderError),
    /// `[fleet] staleness = "strict"`, and the fleet store has been unreachable for longer than
    /// `max_staleness` (503): a revocation made meanwhile might not be known here.
    #[error("revocations cannot be checked: the fleet store has been unreachable for {}s (fleet.staleness = strict)", .0.as_secs())]
    FleetStale(std::time::Duration),
    /// The request's affinity envelope does not open (404, as MCP answers an unknown session).
    #[error(transparent)]
    Affinity(crate::routing::affinity::AffinityError),
    /// An MCP route refused the request before it reached the server (its status, and a
    /// JSON-RPC error body).
    #[error(transparent)]
    Mcp(#[from] crate::proxy::mcp::Refusal),
    /// A request on the fleet's peer listener that is neither a resume nor an observer (403).
    #[error("the peer listener carries resumes and observers only")]
    PeerOnly,
    /// The instance that holds the session did not answer (502).
    #[error("the instance that holds the session cannot be reached")]
    PeerUnreachable,
    /// A broken invariant inside the proxy (500); the detail goes to the log, never the body.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

impl From<AuthError> for RequestError {
    /// A refused token check is a rate limit (429), not an authentication failure.
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Throttled(wait) => RequestError::TokenCheckRate(wait),
            other => RequestError::Auth(other),
        }
    }
}

impl RequestError {
    /// The HTTP status answered to the client.
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::Route(RouteError::NoRoute) => StatusCode::NOT_FOUND,
            RequestError::Route(RouteError::InvalidCapture(_)) | RequestError::Host(_) => StatusCode::BAD_REQUEST,
            RequestError::Upgrade(UpgradeError::NotUpgrade | UpgradeError::BadVersion) => StatusCode::UPGRADE_REQUIRED,
            RequestError::Upgrade(UpgradeError::ConnectTunnel) => StatusCode::METHOD_NOT_ALLOWED,
            RequestError::Upgrade(_) => StatusCode::BAD_REQUEST,
            RequestError::Auth(a) if a.is_forbidden() => StatusCode::FORBIDDEN,
            RequestError::Auth(_) => StatusCode::UNAUTHORIZED,
            RequestError::Connect(ConnectError::BadHandshake { .. }) => StatusCode::BAD_GATEWAY,
            RequestError::Connect(ConnectError::Pool(PoolError::InvalidMember)) => StatusCode::BAD_REQUEST,
            RequestError::Connect(ConnectError::Pool(PoolError::UnknownAgent)) => StatusCode::NOT_FOUND,
            RequestError::Connect(ConnectError::Pool(PoolError::Registry(_) | PoolError::NoHealthyMember)) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            RequestError::Connect(ConnectError::Timeout(_)) => StatusCode::GATEWAY_TIMEOUT,
            RequestError::Connect(ConnectError::Unreachable { .. } | ConnectError::Descriptors(_))
            | RequestError::Draining
            | RequestError::FleetStale(_) => StatusCode::SERVICE_UNAVAILABLE,
            RequestError::Forward(f) => match f {
                ForwardError::Pool(PoolError::InvalidMember) | ForwardError::ClientBody(_) => StatusCode::BAD_REQUEST,
                ForwardError::Pool(PoolError::UnknownAgent) | ForwardError::MemberGone => StatusCode::NOT_FOUND,
                ForwardError::Pool(PoolError::Registry(_) | PoolError::NoHealthyMember)
                | ForwardError::Descriptors(_)
                | ForwardError::Unreachable { .. } => StatusCode::SERVICE_UNAVAILABLE,
                ForwardError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                ForwardError::ClientStalled(_) => StatusCode::REQUEST_TIMEOUT,
                ForwardError::ConnectTimeout | ForwardError::ResponseTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
                ForwardError::Backend { .. } => StatusCode::BAD_GATEWAY,
                ForwardError::Ended(cause) => cause.http_end().status,
            },
            RequestError::NoSuchSession => StatusCode::NOT_FOUND,
            RequestError::PeerOnly => StatusCode::FORBIDDEN,
            RequestError::Affinity(_) => StatusCode::NOT_FOUND,
            RequestError::Mcp(r) => r.error.status(),
            RequestError::PeerUnreachable => StatusCode::BAD_GATEWAY,
            RequestError::BadResumeId | RequestError::Header(_) => StatusCode::BAD_REQUEST,
            RequestError::Resume(crate::session::resume::ClaimError::OtherSubject) => StatusCode::FORBIDDEN,
            RequestError::Resume(crate::session::resume::ClaimError::Busy) => StatusCode::CONFLICT,
            RequestError::TooManySessions
            | RequestError::TooManyObservers
            | RequestError::TooManyObserversForSubject
            | RequestError::TooManyStreams
            | RequestError::HandshakeRate(_)
            | RequestError::TokenCheckRate(_) => StatusCode::TOO_MANY_REQUESTS,
            RequestError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether this is the proxy's own capacity refusal: its outbound descriptor budget spent,
    /// for a member connection, a recording, a forward to a peer or a registry lookup, or the
    /// process out of descriptors or ports for a registry lookup.
    pub fn descriptors_spent(&self) -> bool {
        use crate::routing::resolver::ResolveError::{Descriptors as Spent, Exhausted};
        matches!(
            self,
            RequestError::Connect(
                ConnectError::Descriptors(_) | ConnectError::Pool(PoolError::Registry(Spent(_) | Exhausted(_)))
            ) | RequestError::Forward(
                ForwardError::Descriptors(_) | ForwardError::Pool(PoolError::Registry(Spent(_) | Exhausted(_)))
            )
        )
    }

    /// Bounded label for `portcullis_upgrades_total{result}`.
    pub fn result_label(&self) -> &'static str {
        if self.descriptors_spent() {
            return "descriptors";
        }
        match self {
            RequestError::Route(RouteError::NoRoute) => "no_route",
            RequestError::Route(RouteError::InvalidCapture(_)) => "invalid_capture",
            RequestError::Host(_) => "bad_host",
            RequestError::Upgrade(UpgradeError::NotUpgrade) => "not_upgrade",
            RequestError::Upgrade(UpgradeError::BadVersion) => "bad_version",
            RequestError::Upgrade(UpgradeError::HttpOnlyRoute) => "upgrade_not_allowed",
            RequestError::Upgrade(UpgradeError::ConnectTunnel) => "connect_refused",
            RequestError::Upgrade(_) => "bad_handshake",
            RequestError::Auth(a) if a.is_forbidden() => "forbidden",
            RequestError::Auth(_) => "unauthorized",
            RequestError::Connect(ConnectError::BadHandshake { .. }) => "backend_bad_handshake",
            RequestError::Connect(ConnectError::Pool(PoolError::InvalidMember)) => "invalid_capture",
            RequestError::Connect(ConnectError::Pool(PoolError::UnknownAgent)) => "unknown_agent",
            RequestError::Connect(ConnectError::Pool(PoolError::Registry(_))) => "registry_unavailable",
            RequestError::Connect(ConnectError::Pool(PoolError::NoHealthyMember)) => "no_healthy_member",
            RequestError::Connect(ConnectError::Timeout(_)) => "backend_timeout",
            RequestError::Connect(ConnectError::Unreachable { .. }) => "backend_unreachable",
            RequestError::Connect(ConnectError::Descriptors(_)) => "descriptors",
            RequestError::Forward(f) => match f {
                ForwardError::Pool(PoolError::InvalidMember) => "invalid_capture",
                ForwardError::Pool(PoolError::UnknownAgent) => "unknown_agent",
                ForwardError::MemberGone => "affinity_member_gone",
                ForwardError::Pool(PoolError::Registry(_)) => "registry_unavailable",
                ForwardError::Pool(PoolError::NoHealthyMember) => "no_healthy_member",
                ForwardError::TooLarge(_) => "body_too_large",
                ForwardError::ClientStalled(_) => "client_body_timeout",
                ForwardError::ClientBody(_) => "client_body_error",
                ForwardError::Unreachable { .. } => "backend_unreachable",
                ForwardError::Descriptors(_) => "descriptors",
                ForwardError::ConnectTimeout => "backend_timeout",
                ForwardError::ResponseTimeout(_) => "backend_response_timeout",
                ForwardError::Backend { .. } => "backend_error",
                ForwardError::Ended(_) => "session_ended",
            },
            RequestError::Draining => "draining",
            RequestError::FleetStale(_) => "fleet_stale",
            RequestError::PeerOnly => "peer_only",
            RequestError::Affinity(_) => "affinity_refused",
            RequestError::Mcp(r) => r.error.label(),
            RequestError::PeerUnreachable => "peer_unreachable",
            RequestError::TooManySessions => "subject_sessions",
            RequestError::TooManyStreams => "per_ip_streams",
            RequestError::TooManyObservers => "observers_full",
            RequestError::TooManyObserversForSubject => "observers_per_subject",
            RequestError::NoSuchSession => "no_such_session",
            RequestError::BadResumeId => "invalid_resume_id",
            RequestError::Header(_) => "underscore_header",
            RequestError::Resume(crate::session::resume::ClaimError::OtherSubject) => "resume_refused",
            RequestError::Resume(crate::session::resume::ClaimError::Busy) => "resume_busy",
            RequestError::HandshakeRate(_) => "handshake_rate",
            RequestError::TokenCheckRate(_) => "token_check_rate",
            RequestError::Internal(_) => "internal",
        }
    }

    /// The response sent to the client. The body is a short fixed sentence: it never echoes
    /// request data, and backend details stay in the logs.
    pub fn response(&self) -> Response<Full<Bytes>> {
        if let RequestError::Mcp(refusal) = self {
            return refusal.response();
        }
        let status = self.status();
        let body = match self {
            RequestError::Connect(ConnectError::Pool(PoolError::InvalidMember | PoolError::UnknownAgent)) => {
                self.to_string()
            }
            RequestError::Forward(ForwardError::Pool(PoolError::InvalidMember | PoolError::UnknownAgent))
            | RequestError::Forward(ForwardError::MemberGone)
            | RequestError::Forward(
                ForwardError::TooLarge(_) | ForwardError::ClientStalled(_) | ForwardError::Ended(_),
            ) => self.to_string(),
            _ if self.descriptors_spent() => "the proxy holds as many connections as it can; retry later".to_owned(),
            RequestError::Connect(_) | RequestError::Forward(_) | RequestError::Internal(_) => {
                status.canonical_reason().unwrap_or("backend error").to_owned()
            }
            other => other.to_string(),
        };
        let mut resp = Response::new(Full::new(Bytes::from(body + "\n")));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        let bearer_error = match self {
            RequestError::Auth(a) => Some(a.bearer_error()),
            // The ends of a session that answer 401 are its token's: expired or revoked.
            RequestError::Forward(ForwardError::Ended(_)) if status == StatusCode::UNAUTHORIZED => {
                Some(Some("invalid_token"))
            }
            _ => None,
        };
        if let Some(code) = bearer_error {
            let value = match code {
                Some(code) => format!("Bearer realm=\"portcullis\", error=\"{code}\""),
                None => "Bearer realm=\"portcullis\"".to_owned(),
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(http::header::WWW_AUTHENTICATE, v);
            }
        }
        match self {
            // A place frees when one of the subject's sessions, the address's streams or the
            // session's observers ends, which may be soon.
            // And the proxy's outbound descriptors free as sessions end.
            RequestError::TooManySessions
            | RequestError::TooManyStreams
            | RequestError::TooManyObservers
            | RequestError::TooManyObserversForSubject => {
                h.insert(http::header::RETRY_AFTER, HeaderValue::from_static(SESSION_RETRY_AFTER));
            }
            _ if self.descriptors_spent() => {
                h.insert(http::header::RETRY_AFTER, HeaderValue::from_static(SESSION_RETRY_AFTER));
            }
            RequestError::Forward(ForwardError::Ended(_)) if status == StatusCode::TOO_MANY_REQUESTS => {
                h.insert(http::header::RETRY_AFTER, HeaderValue::from_static(SESSION_RETRY_AFTER));
            }
            // Whole seconds until the address's bucket has a token again, at least 1.
            RequestError::HandshakeRate(wait) | RequestError::TokenCheckRate(wait) => {
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            _ => {}
        }
        if status == StatusCode::UPGRADE_REQUIRED {
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(http::header::CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        }
        resp
    }
}
