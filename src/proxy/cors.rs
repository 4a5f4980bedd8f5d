//! Stage: CORS, for routes with `[routes.cors]` (off by default). The proxy owns the route's
//! CORS answers, so a platform UI on another origin can call an agent's API:
//!
//! - a preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is answered by
//!   the proxy itself, before any token is asked for (a browser never sends credentials on a
//!   preflight): 204 with the policy's headers when the origin, the method and every requested
//!   header are allowed, else 403 without CORS headers (the browser then refuses the call);
//! - a real response to an allowed origin carries `Access-Control-Allow-Origin` (the origin
//!   itself, never `*`), `Vary: Origin`, and `Access-Control-Allow-Credentials` /
//!   `Access-Control-Expose-Headers` as configured. The backend's own `Access-Control-*`
//!   headers are removed: one owner per route.
//!
//! CORS only decides what a browser lets a page read. Which origins may use the route at all is
//! `[routes.origin]`, enforced on every request (a cookie route must have one).

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::Full;

use crate::config::CorsPolicy;

/// The proxy's answer to a CORS preflight for `policy`, or `None` when `req` is not a
/// preflight (it goes on through the route as usual). `agent`: the agent the request names.
pub(crate) fn preflight<B>(
    policy: &CorsPolicy,
    route: &str,
    req: &Request<B>,
    agent: Option<&str>,
) -> Option<Response<Full<Bytes>>> {
    let h = req.headers();
    if req.method() != Method::OPTIONS || !h.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
        return None;
    }
    let origin = h.get(header::ORIGIN)?;
    let allowed_origin = origin.to_str().ok().filter(|o| policy.allow_origins.iter().any(|p| p.matches(o, agent)));
    let method_ok = h
        .get(header::ACCESS_CONTROL_REQUEST_METHOD)
        .and_then(|m| m.to_str().ok())
        .is_some_and(|m| policy.allow_methods.iter().any(|a| a.as_str() == m));
    let headers_ok = h
        .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .all(|n| policy.allow_headers.contains(&n));
    let mut resp = Response::new(Full::new(Bytes::new()));
    let Some(origin_value) = allowed_origin.filter(|_| method_ok && headers_ok) else {
        crate::metrics::cors_preflight(route, "refused");
        tracing::info!(route, "CORS preflight refused: origin, method or headers not allowed");
        *resp.status_mut() = StatusCode::FORBIDDEN;
        resp.headers_mut().insert(header::VARY, HeaderValue::from_static("Origin"));
        return Some(resp);
    };
    crate::metrics::cors_preflight(route, "allowed");
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let out = resp.headers_mut();
    out.insert(header::VARY, HeaderValue::from_static("Origin"));
    allow_origin(policy, origin_value, out);
    let methods: Vec<&str> = policy.allow_methods.iter().map(Method::as_str).collect();
    put(out, header::ACCESS_CONTROL_ALLOW_METHODS, &methods.join(", "));
    if !policy.allow_headers.is_empty() {
        put(out, header::ACCESS_CONTROL_ALLOW_HEADERS, &policy.allow_headers.join(", "));
    }
    out.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(policy.max_age.as_secs()));
    Some(resp)
}

/// Sets the CORS headers of a real response (the backend's, or the proxy's own refusal) to a
/// request from `origin`, naming `agent`, when the policy allows it; the backend's own are
/// removed either way.
pub(crate) fn decorate(
    policy: &CorsPolicy,
    origin: Option<&HeaderValue>,
    agent: Option<&str>,
    headers: &mut HeaderMap,
) {
    let theirs: Vec<HeaderName> =
        headers.keys().filter(|n| n.as_str().starts_with("access-control-")).cloned().collect();
    for n in theirs {
        headers.remove(n);
    }
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    let Some(origin) = origin.and_then(|o| o.to_str().ok()) else { return };
    if !policy.allow_origins.iter().any(|p| p.matches(origin, agent)) {
        return;
    }
    allow_origin(policy, origin, headers);
    if !policy.expose_headers.is_empty() {
        put(headers, header::ACCESS_CONTROL_EXPOSE_HEADERS, &policy.expose_headers.join(", "));
    }
}

/// `Access-Control-Allow-Origin` (the request's origin) and, with credentials, `-Credentials`.
fn allow_origin(policy: &CorsPolicy, origin: &str, headers: &mut HeaderMap) {
    put(headers, header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    if policy.allow_credentials {
        headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
}

fn put(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}
