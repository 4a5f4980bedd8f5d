//! What a request carries to the backend and what a response carries back, for upgrades and
//! plain requests alike: hop-by-hop headers removed (RFC 9110 §7.6.1, plus those named in
//! `Connection`), the forwarding headers set (`X-Forwarded-For`/`-Proto`/`-Host`, RFC 7239
//! `Forwarded`), and the backend path rendered from the route's template.
//!
//! Client-sent `X-Forwarded-*` and `Forwarded` are extended only when the client is a configured
//! trusted proxy; from anyone else they are dropped, so the leftmost address a backend sees cannot
//! be spoofed at the edge. Nothing a client sends can remove or pass for a header the proxy sets
//! ([`backend_headers`], `docs/security.md`, "Identity headers to the backend").

use std::io::Write as _;
use std::net::IpAddr;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

use super::auth::IDENTITY_PREFIX;
use super::host::Authority;
use crate::config::{render_path, Captures, RouteConfig, UnderscoreHeaders};

/// How the client reached the proxy, for `X-Forwarded-*` and `Forwarded`.
#[derive(Debug, Clone)]
pub struct ForwardedFor {
    /// The client's IP address.
    pub client_ip: IpAddr,
    /// The client reached a TLS listener ([`ForwardedFor::proto`]).
    pub tls: bool,
    /// The authority the client asked for, validated ([`super::host`]).
    pub host: Option<Authority>,
    /// The client is a configured trusted proxy: its `X-Forwarded-For` and `Forwarded` are
    /// extended instead of dropped.
    pub trusted: bool,
}

impl ForwardedFor {
    /// "https" for a TLS listener, "http" otherwise.
    pub fn proto(&self) -> &'static str {
        match self.tls {
            true => "https",
            false => "http",
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1 and the de-facto `Proxy-Connection`, `Keep-Alive`):
/// they describe one connection and are never passed on, either way.
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Whether `name` is hop-by-hop, by the RFC or because the message's `Connection` lists it.
fn hop_by_hop(name: &HeaderName, listed: &[&str]) -> bool {
    HOP_BY_HOP.contains(name)
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
        || listed.iter().any(|t| name.as_str().eq_ignore_ascii_case(t))
}

/// Header names listed in a message's `Connection` header (hop-by-hop by declaration), as
/// written: [`hop_by_hop`] compares them without regard to case.
fn connection_tokens(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(',').map(str::trim))
        .filter(|t| !t.is_empty())
        .collect()
}

/// A client header name the route refuses (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// A header name with an underscore, on a route with `headers_with_underscores = "reject"`.
    #[error("header names with underscores are not accepted")]
    Underscore,
}

/// The one place a backend request's headers are built, for REST, SSE and WebSocket
/// handshakes over HTTP/1.1 and HTTP/2 alike, in this order:
///
/// 1. the client's headers, less its hop-by-hop ones (by the RFC and by its own `Connection`
///    list), `Host` (the caller sets the member), `skip`, and any name that folds (lowercase,
///    `_` to `-`) onto a header the proxy sets: `x-portcullis-*`, the forwarding headers and
///    every name in `proxy_set`; a name with an underscore as the route says;
/// 2. then `proxy_set` (identity, a forwarded token), which nothing the client sent can remove;
/// 3. then the forwarding headers, from the validated authority in `f`.
///
/// The client's cookies go on in one `Cookie` header (RFC 9113 §8.2.3 joins an HTTP/2
/// request's for an HTTP/1.1 backend) less every cookie named in `credentials`: the cookies
/// that carry tokens reach no backend, whichever route the request is for, since a browser
/// sends them to every path of the origin and a route that takes its token from elsewhere
/// would hand the user's token to its agent.
pub fn backend_headers(
    client: &HeaderMap,
    proxy_set: &HeaderMap,
    f: &ForwardedFor,
    underscores: UnderscoreHeaders,
    skip: &[HeaderName],
    credentials: &[String],
) -> Result<HeaderMap, HeaderError> {
    let listed = connection_tokens(client);
    let mut out = HeaderMap::with_capacity(client.len() + proxy_set.len() + 5);
    let mut xff: Vec<u8> = Vec::new();
    let mut chain: Vec<u8> = Vec::new();
    if let Some(cookie) = cookies_for_backend(client, credentials) {
        out.insert(header::COOKIE, cookie);
    }
    for (name, value) in client {
        if name == header::COOKIE {
            continue;
        }
        let trusted_chain = match name.as_str() {
            "x-forwarded-for" => Some(&mut xff),
            "forwarded" => Some(&mut chain),
            _ => None,
        };
        if let Some(v) = trusted_chain {
            if f.trusted {
                if !v.is_empty() {
                    v.extend_from_slice(b", ");
                }
                v.extend_from_slice(value.as_bytes());
            }
            continue;
        }
        if name == header::HOST || skip.contains(name) || hop_by_hop(name, &listed) {
            continue;
        }
        let underscore = name.as_str().contains('_');
        if underscore && underscores == UnderscoreHeaders::Reject {
            return Err(HeaderError::Underscore);
        }
        if proxy_sets(name.as_str(), proxy_set) {
            crate::metrics::client_header_dropped("collision");
            continue;
        }
        if underscore && underscores == UnderscoreHeaders::Drop {
            crate::metrics::client_header_dropped("underscore");
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    for (name, value) in proxy_set {
        out.append(name.clone(), value.clone());
    }
    out.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static(f.proto()));
    // This runs for every request and upgrade: each value is written into one buffer, which
    // becomes the header's bytes without a copy (`Bytes` adds only its small shared header).
    // Writing to a `Vec` cannot fail, so `write!`'s results are not looked at.
    let mut insert = |name: &'static str, value: Vec<u8>| {
        if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
            out.insert(HeaderName::from_static(name), v);
        }
    };
    if !xff.is_empty() {
        xff.extend_from_slice(b", ");
    }
    let _ = write!(xff, "{}", f.client_ip);
    insert("x-forwarded-for", xff);
    let host = f.host.as_ref().map(|h| h.to_string());
    let mut fwd = chain;
    // `, for="[` + the longest IPv6 address (45) + `]";proto=https` is 63 bytes; `;host=` and
    // the quotes 8 more, besides the host.
    fwd.reserve(64 + host.as_ref().map_or(0, |h| h.len() + 8));
    if !fwd.is_empty() {
        fwd.extend_from_slice(b", ");
    }
    // RFC 7239 §4: an IPv6 node and the host need a quoted-string (`[`, `:`, and a reg-name's
    // sub-delims are not token characters); an IPv4 address is a token.
    let _ = match f.client_ip {
        IpAddr::V4(ip) => write!(fwd, "for={ip}"),
        IpAddr::V6(ip) => write!(fwd, "for=\"[{ip}]\""),
    };
    let _ = write!(fwd, ";proto={}", f.proto());
    if let Some(host) = host {
        fwd.extend_from_slice(b";host=");
        write_quoted_string(&mut fwd, &host);
        insert("x-forwarded-host", host.into_bytes());
    }
    insert("forwarded", fwd);
    Ok(out)
}

/// The client's `Cookie` headers as one, less the cookies named in `credentials` (a name is
/// compared trimmed, as servers read it); `None` when nothing is left. A single header that
/// carries none of them goes on as it was sent.
fn cookies_for_backend(client: &HeaderMap, credentials: &[String]) -> Option<HeaderValue> {
    let carries = |pair: &[u8]| {
        let name = pair.split(|b| *b == b'=').next().unwrap_or(pair).trim_ascii();
        credentials.iter().any(|n| n.as_bytes() == name)
    };
    let mut values = client.get_all(header::COOKIE).iter();
    let (first, second) = (values.next()?, values.next());
    if second.is_none() && !cookie_pairs(first).any(carries) {
        return Some(first.clone());
    }
    let mut joined: Vec<u8> = Vec::new();
    for value in client.get_all(header::COOKIE) {
        for pair in cookie_pairs(value).filter(|p| !p.is_empty() && !carries(p)) {
            if !joined.is_empty() {
                joined.extend_from_slice(b"; ");
            }
            joined.extend_from_slice(pair);
        }
    }
    match joined.is_empty() {
        true => None,
        false => HeaderValue::from_bytes(&joined).ok(),
    }
}

/// Removes every header that folds (`_` and `.` read as `-`, as CGI-style servers read them)
/// onto `name` without being it: the proxy sets `name`, and no client spelling may stand in.
pub fn drop_other_spellings(headers: &mut HeaderMap, name: &HeaderName) {
    let folds_onto = |n: &HeaderName| {
        n != name
            && n.as_str().len() == name.as_str().len()
            && n.as_str()
                .bytes()
                .zip(name.as_str().bytes())
                .all(|(a, b)| a == b || (matches!(a, b'_' | b'.') && b == b'-'))
    };
    let others: Vec<HeaderName> = headers.keys().filter(|n| folds_onto(n)).cloned().collect();
    for n in others {
        crate::metrics::client_header_dropped("collision");
        headers.remove(&n);
    }
}

/// A `Cookie` header's `name=value` pairs, trimmed.
fn cookie_pairs(v: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    v.as_bytes().split(|b| *b == b';').map(<[u8]>::trim_ascii)
}

/// Whether a client header named `name` would pass for one the proxy sets, once folded the
/// way CGI-style servers fold names (case, and `_` read as `-`).
fn proxy_sets(name: &str, proxy_set: &HeaderMap) -> bool {
    // Names are lowercase already (`http` lowercases them); `_` and `.` need folding (CGI
    // reads `_` as `-`, PHP turns `.` into `_`), and most names have neither, so they are not
    // copied.
    let folded = match name.contains(['_', '.']) {
        true => std::borrow::Cow::Owned(name.replace(['_', '.'], "-")),
        false => std::borrow::Cow::Borrowed(name),
    };
    folded.starts_with(IDENTITY_PREFIX)
        || folded.starts_with("x-forwarded-")
        || matches!(folded.as_ref(), "forwarded" | "x-real-ip")
        || proxy_set.keys().any(|k| k.as_str() == folded.as_ref())
}

/// Appends `value` to `out` as an RFC 7230 `quoted-string`, `"` and `\\` escaped.
fn write_quoted_string(out: &mut Vec<u8>, value: &str) {
    out.push(b'"');
    for b in value.bytes() {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

/// Removes a backend's `Set-Cookie` for a cookie the proxy authenticates with (`names`: the
/// login cookie and every `cookie:` token source), or every `Set-Cookie` when `all` (a sandboxed
/// route): an agent never sets, replaces or shadows the user's credential.
pub fn protect_credential_cookies(headers: &mut HeaderMap, names: &[String], all: bool) {
    let kept: Vec<HeaderValue> = headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| {
            let name = v.to_str().ok().and_then(|c| c.split_once('=')).map(|(n, _)| n.trim());
            !all && name.is_some_and(|n| !names.iter().any(|c| c == n))
        })
        .cloned()
        .collect();
    headers.remove(header::SET_COOKIE);
    for v in kept {
        headers.append(header::SET_COOKIE, v);
    }
}

/// Removes a backend response's hop-by-hop headers before it goes to the client.
pub fn strip_response_headers(headers: &mut HeaderMap) {
    let listed = connection_tokens(headers);
    let names: Vec<HeaderName> = headers.keys().filter(|n| hop_by_hop(n, &listed)).cloned().collect();
    for n in names {
        headers.remove(&n);
    }
}

/// The path and query asked of the backend: the route's `backend_path` rendered with the
/// captures (the client's query kept), or the client's own path and query with the `{agent}`
/// segment in its one case (lowercase, as grants, routing and revocation read it): the
/// backend never sees a spelling of the agent that the token did not name.
pub fn backend_path(route: &RouteConfig, caps: &Captures, path_and_query: &str) -> String {
    match &route.backend_path {
        Some(t) => {
            let path = render_path(t, caps);
            match path_and_query.split_once('?') {
                Some((_, query)) => format!("{path}?{query}"),
                None => path,
            }
        }
        None => {
            let mut out = path_and_query.to_owned();
            let path = path_and_query.split_once('?').map_or(path_and_query, |(p, _)| p);
            if let Some(agent) = route.path.capture_span(path, "agent").and_then(|r| out.get_mut(r)) {
                agent.make_ascii_lowercase();
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).expect("name"), HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    fn from(trusted: bool) -> ForwardedFor {
        ForwardedFor {
            client_ip: "192.0.2.7".parse().expect("ip"),
            tls: true,
            host: Some(super::super::host::parse(b"agents.example.com").expect("authority")),
            trusted,
        }
    }

    fn build(client: &HeaderMap, set: &HeaderMap, f: &ForwardedFor, u: UnderscoreHeaders) -> HeaderMap {
        backend_headers(client, set, f, u, &[], &[]).expect("headers")
    }

    #[test]
    fn the_client_cannot_remove_or_impersonate_a_header_the_proxy_sets() {
        let client = headers(&[
            ("connection", "close, x-portcullis-sub, x-portcullis-claim-role, x-forwarded-for, forwarded"),
            ("x_portcullis_sub", "root"),
            ("X_Portcullis_Claim_Role", "admin"),
            ("x_forwarded_for", "6.6.6.6"),
            ("x_real_ip", "6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
            ("x-portcullis-sub", "root"),
            ("x_custom", "1"),
            ("x-portcullis.claim-role", "admin"),
            ("x-kept", "yes"),
        ]);
        let set = headers(&[("x-portcullis-sub", "alice"), ("x-portcullis-claim-role", "viewer")]);
        for rule in [UnderscoreHeaders::Drop, UnderscoreHeaders::Allow] {
            let out = build(&client, &set, &from(false), rule);
            assert_eq!(out.get_all("x-portcullis-sub").iter().collect::<Vec<_>>(), ["alice"], "{rule:?}");
            assert_eq!(out.get_all("x-portcullis-claim-role").iter().collect::<Vec<_>>(), ["viewer"], "{rule:?}");
            assert_eq!(out.get("x-forwarded-for").map(|v| v.as_bytes()), Some(&b"192.0.2.7"[..]));
            assert!(out.get("forwarded").is_some() && out.get("x-real-ip").is_none(), "{out:?}");
            assert!(out.get("x-portcullis.claim-role").is_none(), "a dotted spelling was forwarded");
            for name in out.keys() {
                let n = name.as_str();
                assert!(
                    !(n.contains('_') && n.replace('_', "-").starts_with("x-")) || n == "x_custom",
                    "{n} forwarded"
                );
            }
            assert_eq!(out.contains_key("x_custom"), rule == UnderscoreHeaders::Allow, "{rule:?}");
            assert!(out.contains_key("x-kept"));
        }
        let refused = backend_headers(&client, &set, &from(false), UnderscoreHeaders::Reject, &[], &[]);
        assert_eq!(refused.err(), Some(HeaderError::Underscore));
    }

    #[test]
    fn forwarded_values_are_tokens_or_quoted_strings() {
        let mut escaped = Vec::new();
        write_quoted_string(&mut escaped, "a\"b\\c");
        assert_eq!(escaped, b"\"a\\\"b\\\\c\"");
        // An IPv6 node is a quoted-string (RFC 7239 §4), an IPv4 address a token.
        let mut v6 = from(false);
        (v6.client_ip, v6.host) = ("2001:db8::1".parse().expect("ip"), None);
        let out = build(&HeaderMap::new(), &HeaderMap::new(), &v6, UnderscoreHeaders::Drop);
        assert_eq!(out.get("forwarded").map(|v| v.as_bytes()), Some(&b"for=\"[2001:db8::1]\";proto=https"[..]));
        assert_eq!(out.get("x-forwarded-for").map(|v| v.as_bytes()), Some(&b"2001:db8::1"[..]));
        assert_eq!(out.get("x-forwarded-proto").map(|v| v.as_bytes()), Some(&b"https"[..]));
        let mut f = from(false);
        f.host = Some(super::super::host::parse(b"a.example:8443").expect("authority"));
        let out = build(&HeaderMap::new(), &HeaderMap::new(), &f, UnderscoreHeaders::Drop);
        assert_eq!(
            out.get("forwarded").map(|v| v.as_bytes()),
            Some(&b"for=192.0.2.7;proto=https;host=\"a.example:8443\""[..])
        );
        assert_eq!(out.get("x-forwarded-host").map(|v| v.as_bytes()), Some(&b"a.example:8443"[..]));
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_removed() {
        let client = headers(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("proxy-authorization", "Basic abc"),
            ("x-kept", "yes"),
            ("host", "agents.example.com"),
        ]);
        let out = build(&client, &HeaderMap::new(), &from(false), UnderscoreHeaders::Drop);
        for gone in ["connection", "keep-alive", "x-secret-hop", "te", "proxy-authorization", "host"] {
            assert!(out.get(gone).is_none(), "{gone} was forwarded");
        }
        assert_eq!(out.get("x-kept").map(|v| v.as_bytes()), Some(&b"yes"[..]));
        assert_eq!(out.get("x-forwarded-host").map(|v| v.as_bytes()), Some(&b"agents.example.com"[..]));
    }

    #[test]
    fn forwarded_chains_are_kept_only_from_trusted_proxies() {
        let client = headers(&[("x-forwarded-for", "10.9.9.9"), ("forwarded", "for=10.9.9.9")]);
        let untrusted = build(&client, &HeaderMap::new(), &from(false), UnderscoreHeaders::Drop);
        assert_eq!(untrusted.get("x-forwarded-for").map(|v| v.as_bytes()), Some(&b"192.0.2.7"[..]));
        let trusted = build(&client, &HeaderMap::new(), &from(true), UnderscoreHeaders::Drop);
        assert_eq!(trusted.get("x-forwarded-for").map(|v| v.as_bytes()), Some(&b"10.9.9.9, 192.0.2.7"[..]));
        let fwd = trusted.get("forwarded").and_then(|v| v.to_str().ok()).unwrap_or("");
        assert!(fwd.starts_with("for=10.9.9.9, for=192.0.2.7;proto=https"), "{fwd}");
    }

    #[test]
    fn response_hop_by_hop_headers_are_removed() {
        let mut h = headers(&[("connection", "close, x-hop"), ("x-hop", "1"), ("content-type", "text/plain")]);
        strip_response_headers(&mut h);
        assert!(h.get("connection").is_none() && h.get("x-hop").is_none());
        assert!(h.get("content-type").is_some());
    }
}
