//! Stage: auth. Finds the token, verifies it, checks that it grants the agent in the path and
//! that the Origin is allowed, and prepares what the backend may see.
//!
//! Token sources are tried in the route's configured order: `Authorization: Bearer`, a query
//! parameter, a cookie, or a `Sec-WebSocket-Protocol` entry with a prefix (browsers cannot set
//! headers on a WebSocket). Every configured source is inspected: two different tokens are
//! refused as ambiguous. Whatever carried the token is removed before forwarding (the query
//! parameter, the cookie, the subprotocol entry, and the `Authorization` header unless the route
//! sets `forward_token`), so the token reaches the backend only when a route asks for it.
//! The verified subject and the configured claims are set as `x-portcullis-sub` and
//! `x-portcullis-claim-<name>`, kept apart from the client's headers until
//! [`forward::backend_headers`] drops every client name that folds onto them.

use std::borrow::Cow;
use std::sync::Arc;

use http::header::{AUTHORIZATION, COOKIE, ORIGIN};
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;

use super::forward::{self, ForwardedFor, HeaderError};
use super::upgrade::WsRequest;
use crate::auth::{check_policy, AuthError, Authenticator, Claims, SignatureGate};
use crate::config::Captures;
use crate::config::{OriginPolicy, RouteConfig, TokenSource};

/// Prefix of the identity headers the proxy sets (and strips from clients).
pub const IDENTITY_PREFIX: &str = "x-portcullis-";

/// A request that passed the auth stage, reshaped for the backend.
pub struct Admitted {
    /// Verified claims, when the route requires a token.
    pub claims: Option<Arc<Claims>>,
    /// The client's headers less every token carrier; [`Admitted::backend_headers`] makes
    /// the backend's from them.
    pub headers: HeaderMap,
    /// Headers the proxy sets for the backend (the verified identity, a forwarded token):
    /// nothing the client sends can remove or pass for them.
    identity: HeaderMap,
    /// Path and query for the backend (the token and resume query parameters removed).
    pub path_and_query: String,
    /// The upgrade (none for a plain HTTP request), with a token subprotocol entry removed.
    pub ws: Option<WsRequest>,
    /// Subprotocol prefix that carries tokens; never echoed to the client.
    pub token_subprotocol: Option<String>,
    /// The route's subprotocol marker, when the client offered it (taken out of the list the
    /// backend sees): the 101 answers with it if the backend selects no subprotocol.
    pub subprotocol_marker: Option<String>,
}

/// Runs the auth stage for `route`.
pub async fn admit(
    route: &RouteConfig,
    caps: &Captures,
    headers: &HeaderMap,
    path_and_query: &str,
    mut ws: Option<WsRequest>,
    authenticator: Option<&Authenticator>,
    gate: SignatureGate<'_>,
) -> Result<Admitted, AuthError> {
    check_origin(route.origin.as_ref(), headers, caps.get("agent"))?;
    let mut out_headers = headers.clone();
    let mut identity = HeaderMap::new();
    // The resume id is the proxy's business: whoever holds it can take the session over (its
    // subject's), so it does not go on to the backend, as a token parameter does not.
    let mut forwarded = match &route.resume {
        Some(resume) => remove_query_param(path_and_query, &resume.param),
        None => path_and_query.to_owned(),
    };
    let Some(policy) = &route.auth else {
        return Ok(Admitted {
            claims: None,
            headers: out_headers,
            identity,
            path_and_query: forwarded,
            ws,
            token_subprotocol: None,
            subprotocol_marker: None,
        });
    };
    let authenticator = authenticator.ok_or(AuthError::UnknownKey)?;
    let max = authenticator.max_token_size();

    // Find the token in every configured source.
    let mut tokens: Vec<Cow<'_, str>> = Vec::new();
    let mut from_cookie = false;
    for source in &policy.sources {
        match source {
            TokenSource::Bearer => {
                for v in headers.get_all(AUTHORIZATION) {
                    tokens.push(Cow::Borrowed(bearer_token(v).ok_or(AuthError::Malformed)?));
                }
            }
            TokenSource::Query(name) => {
                if let Some((_, q)) = path_and_query.split_once('?') {
                    if q.len() > max * 4 + 4096 {
                        return Err(AuthError::TooLarge);
                    }
                    tokens.extend(
                        form_urlencoded::parse(q.as_bytes()).filter(|(k, _)| k == name.as_str()).map(|(_, v)| v),
                    );
                }
            }
            TokenSource::Cookie(name) => {
                let before = tokens.len();
                tokens.extend(cookie_values(headers, name).map(Cow::Borrowed));
                from_cookie |= tokens.len() > before;
            }
            TokenSource::Subprotocol(prefix) => {
                if let Some(p) = ws.as_ref().and_then(|w| w.protocol.as_ref()) {
                    let p = p.to_str().map_err(|_| AuthError::Malformed)?;
                    tokens
                        .extend(p.split(',').filter_map(|e| e.trim().strip_prefix(prefix.as_str())).map(Cow::Borrowed));
                }
            }
        }
    }
    if tokens.iter().any(|t| t.len() > max) {
        return Err(AuthError::TooLarge);
    }
    // A cookie rides on other sites' requests, and browsers send no Origin on their no-cors
    // GETs (an image, a script) or navigations: `Sec-Fetch-Site` tells them apart.
    if from_cookie && !headers.contains_key(ORIGIN) && cross_site(headers) {
        return Err(AuthError::Origin);
    }
    let token = tokens.first().ok_or(AuthError::Missing)?.to_string();
    if tokens.iter().any(|t| *t != token) {
        return Err(AuthError::Ambiguous);
    }
    drop(tokens);

    let claims = authenticator.verify_gated(&token, gate).await?;
    check_policy(&claims, policy)?;
    check_grant(&claims, policy, caps)?;

    // Remove every token carrier before forwarding.
    let mut token_subprotocol = None;
    let mut subprotocol_marker = None;
    for source in &policy.sources {
        match source {
            TokenSource::Bearer => {
                out_headers.remove(AUTHORIZATION);
            }
            TokenSource::Query(name) => forwarded = remove_query_param(&forwarded, name),
            // Every credential cookie comes off in the backend's header builder, on every route.
            TokenSource::Cookie(_) => {}
            TokenSource::Subprotocol(prefix) => {
                let Some(ws) = ws.as_mut() else { continue };
                let marker = &policy.subprotocol_marker;
                let offered = ws
                    .protocol
                    .as_ref()
                    .and_then(|p| p.to_str().ok())
                    .is_some_and(|p| p.split(',').any(|e| e.trim() == marker));
                ws.protocol = ws.protocol.as_ref().and_then(|p| without_entries(p, prefix, marker));
                token_subprotocol = Some(prefix.clone());
                subprotocol_marker = offered.then(|| marker.clone());
            }
        }
    }
    if policy.forward_token {
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
            identity.insert(AUTHORIZATION, v);
        }
    }
    if let Some(sub) = claims.subject().and_then(|s| HeaderValue::from_str(s).ok()) {
        identity.insert(HeaderName::from_static("x-portcullis-sub"), sub);
    }
    for name in &policy.forward_claims {
        let Some(value) = claims.get(name) else { continue };
        let text = match value {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let header = HeaderName::from_bytes(format!("{IDENTITY_PREFIX}claim-{}", name.to_ascii_lowercase()).as_bytes());
        if let (Ok(h), Ok(v)) = (header, HeaderValue::from_str(&text)) {
            identity.insert(h, v);
        }
    }
    Ok(Admitted {
        claims: Some(claims),
        headers: out_headers,
        identity,
        path_and_query: forwarded,
        ws,
        token_subprotocol,
        subprotocol_marker,
    })
}

impl Admitted {
    /// The backend request's headers ([`forward::backend_headers`]): the client's, then this
    /// request's identity, then the forwarding headers; `skip` names those the caller writes.
    pub(crate) fn backend_headers(
        &self,
        runtime: &crate::state::Runtime,
        route: &RouteConfig,
        f: &ForwardedFor,
        skip: &[HeaderName],
    ) -> Result<HeaderMap, HeaderError> {
        let credentials = &runtime.credential_cookies;
        forward::backend_headers(&self.headers, &self.identity, f, route.headers_with_underscores, skip, credentials)
    }
}

/// Checks the request's `Origin` against `policy`, for a request naming `agent` (an
/// `{agent}` pattern allows that agent's own origin only).
pub(crate) fn check_origin(
    policy: Option<&OriginPolicy>,
    headers: &HeaderMap,
    agent: Option<&str>,
) -> Result<(), AuthError> {
    let Some(policy) = policy else { return Ok(()) };
    let mut origins = headers.get_all(ORIGIN).iter();
    match (origins.next(), origins.next()) {
        (None, _) if policy.allow_missing => Ok(()),
        (Some(o), None) => {
            let o = o.to_str().map_err(|_| AuthError::Origin)?;
            if policy.allow.iter().any(|p| p.matches(o, agent)) {
                Ok(())
            } else {
                Err(AuthError::Origin)
            }
        }
        _ => Err(AuthError::Origin),
    }
}

/// Checks that the claims grant the captured `{agent}`: listed in `agent_claim`, or the
/// `agent_scope` template present in `scope`/`scp`. Either rule suffices when both are set.
fn check_grant(c: &Claims, policy: &crate::config::RouteAuth, caps: &Captures) -> Result<(), AuthError> {
    if policy.agent_claim.is_none() && policy.agent_scope.is_none() {
        return Ok(());
    }
    let agent = caps.get("agent").ok_or(AuthError::Forbidden)?;
    // The capture is lowercase already (the route stage); a grant names the agent in any case.
    let by_claim = policy.agent_claim.as_deref().is_some_and(|name| c.contains_ignoring_case(name, agent));
    // The agent in any case; the rest of the scope, and any other capture in it, exactly.
    let by_scope = policy.agent_scope.as_deref().is_some_and(|t| {
        let granted = |s: &str| crate::config::is_rendering(t, caps, "agent", s);
        c.any_value("scope", granted) || c.any_value("scp", granted)
    });
    if by_claim || by_scope {
        Ok(())
    } else {
        Err(AuthError::Forbidden)
    }
}

/// Whether a browser says the request comes from another site or another origin of this one
/// (`Sec-Fetch-Site` other than `same-origin` and `none`); clients that send none are not.
fn cross_site(headers: &HeaderMap) -> bool {
    headers.get("sec-fetch-site").is_some_and(|s| !matches!(s.as_bytes(), b"same-origin" | b"none"))
}

fn bearer_token(v: &HeaderValue) -> Option<&str> {
    let s = v.to_str().ok()?;
    let (scheme, token) = s.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}

/// The values of the cookies named `name`, read pair by pair: another cookie's bytes (a
/// non-ASCII value) do not hide this one.
fn cookie_values<'h>(headers: &'h HeaderMap, name: &'h str) -> impl Iterator<Item = &'h str> + 'h {
    headers.get_all(COOKIE).iter().flat_map(move |v| {
        v.as_bytes().split(|b| *b == b';').filter_map(move |pair| {
            let (k, value) = pair.trim_ascii().split_at(pair.trim_ascii().iter().position(|b| *b == b'=')?);
            (k == name.as_bytes()).then(|| std::str::from_utf8(value[1..].trim_ascii()).ok()).flatten()
        })
    })
}

pub(crate) fn remove_query_param(path_and_query: &str, name: &str) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else { return path_and_query.to_owned() };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            !pair.is_empty() && form_urlencoded::parse(pair.as_bytes()).next().is_none_or(|(k, _)| k != name)
        })
        .collect();
    if kept.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

/// The subprotocol list without token entries (`prefix`) and without the marker.
fn without_entries(protocols: &HeaderValue, prefix: &str, marker: &str) -> Option<HeaderValue> {
    let s = protocols.to_str().ok()?;
    let kept: Vec<&str> =
        s.split(',').map(str::trim).filter(|p| !p.is_empty() && !p.starts_with(prefix) && *p != marker).collect();
    if kept.is_empty() {
        None
    } else {
        HeaderValue::from_str(&kept.join(", ")).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_param_is_removed_and_others_kept() {
        assert_eq!(remove_query_param("/a?access_token=x&cols=80", "access_token"), "/a?cols=80");
        assert_eq!(remove_query_param("/a?access_token=x", "access_token"), "/a");
        assert_eq!(remove_query_param("/a?acc%65ss_token=x&b=1", "access_token"), "/a?b=1");
        assert_eq!(remove_query_param("/a", "access_token"), "/a");
    }
}
