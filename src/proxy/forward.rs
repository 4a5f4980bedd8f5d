//! What a request carries to the backend and what a response carries back, for upgrades and
//! plain requests alike: hop-by-hop headers removed (RFC 9110 §7.6.1, plus those named in
//! `Connection`), the forwarding headers set (`X-Forwarded-For`/`-Proto`/`-Host`, RFC 7239
//! `Forwarded`), and the backend path rendered from the route's template.
//!
//! Client-sent `X-Forwarded-*` and `Forwarded` are extended only when the client is a
//! configured trusted proxy; from anyone else they are dropped, so the leftmost address a
//! backend sees cannot be spoofed at the edge.

use std::net::IpAddr;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

use crate::config::{render_path, Captures, RouteConfig};

/// How the client reached the proxy, for `X-Forwarded-*` and `Forwarded`.
#[derive(Debug, Clone)]
pub struct ForwardedFor {
    /// The client's IP address.
    pub client_ip: IpAddr,
    /// "https" for TLS listeners, "http" otherwise.
    pub proto: &'static str,
    /// The Host the client asked for.
    pub host: Option<HeaderValue>,
    /// The client is a configured trusted proxy: its `X-Forwarded-For` and `Forwarded` are
    /// extended instead of dropped.
    pub trusted: bool,
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
fn hop_by_hop(name: &HeaderName, listed: &[String]) -> bool {
    HOP_BY_HOP.contains(name)
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
        || listed.iter().any(|t| name.as_str().eq_ignore_ascii_case(t))
}

/// Header names listed in a message's `Connection` header (hop-by-hop by declaration).
fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .filter(|t| !t.is_empty())
        .collect()
}

/// The headers a backend request carries: the client's end-to-end headers except `skip` (and
/// `Host`, which the caller sets to the member), then the forwarding headers.
pub fn request_headers(client: &HeaderMap, f: &ForwardedFor, skip: &[HeaderName]) -> HeaderMap {
    let listed = connection_tokens(client);
    let mut out = HeaderMap::with_capacity(client.len() + 5);
    let mut xff: Vec<u8> = Vec::new();
    let mut chain: Vec<u8> = Vec::new();
    for (name, value) in client {
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
        if name == header::HOST
            || name.as_str().starts_with("x-forwarded-")
            || skip.contains(name)
            || hop_by_hop(name, &listed)
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    let ip = f.client_ip.to_string();
    if !xff.is_empty() {
        xff.extend_from_slice(b", ");
    }
    xff.extend_from_slice(ip.as_bytes());
    let mut insert = |name: &'static str, value: Vec<u8>| {
        if let Ok(v) = HeaderValue::from_bytes(&value) {
            out.insert(HeaderName::from_static(name), v);
        }
    };
    insert("x-forwarded-for", xff);
    insert("x-forwarded-proto", f.proto.as_bytes().to_vec());
    let for_value = if f.client_ip.is_ipv6() { format!("\"[{ip}]\"") } else { ip };
    let mut fwd = String::from_utf8_lossy(&chain).into_owned();
    if !fwd.is_empty() {
        fwd.push_str(", ");
    }
    fwd.push_str(&format!("for={for_value};proto={}", f.proto));
    if let Some(host) = &f.host {
        insert("x-forwarded-host", host.as_bytes().to_vec());
        if let Ok(hs) = host.to_str() {
            fwd.push_str(&format!(";host=\"{hs}\""));
        }
    }
    insert("forwarded", fwd.into_bytes());
    out
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
/// captures (the client's query kept), or the client's own path and query.
pub fn backend_path(route: &RouteConfig, caps: &Captures, path_and_query: &str) -> String {
    match &route.backend_path {
        Some(t) => {
            let path = render_path(t, caps);
            match path_and_query.split_once('?') {
                Some((_, query)) => format!("{path}?{query}"),
                None => path,
            }
        }
        None => path_and_query.to_owned(),
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
            proto: "https",
            host: Some(HeaderValue::from_static("agents.example.com")),
            trusted,
        }
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
        let out = request_headers(&client, &from(false), &[]);
        for gone in ["connection", "keep-alive", "x-secret-hop", "te", "proxy-authorization", "host"] {
            assert!(out.get(gone).is_none(), "{gone} was forwarded");
        }
        assert_eq!(out.get("x-kept").map(|v| v.as_bytes()), Some(&b"yes"[..]));
        assert_eq!(out.get("x-forwarded-host").map(|v| v.as_bytes()), Some(&b"agents.example.com"[..]));
    }

    #[test]
    fn forwarded_chains_are_kept_only_from_trusted_proxies() {
        let client = headers(&[("x-forwarded-for", "10.9.9.9"), ("forwarded", "for=10.9.9.9")]);
        let untrusted = request_headers(&client, &from(false), &[]);
        assert_eq!(untrusted.get("x-forwarded-for").map(|v| v.as_bytes()), Some(&b"192.0.2.7"[..]));
        let trusted = request_headers(&client, &from(true), &[]);
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
