//! The request's authority (`Host`, or `:authority` on HTTP/2), parsed before anything uses it.
//!
//! RFC 9110 §7.2 makes `Host` a `uri-host [ ":" port ]`, and RFC 3986 §3.2.2 defines the host:
//! a bracketed IPv6 literal, an IPv4 address or a reg-name. Of reg-names, only what can be a
//! DNS name is taken: dot-separated labels of letters, digits, `-` and `_`, with one trailing
//! dot (the absolute form of the same name) dropped. RFC 3986 also admits percent-encodings
//! and sub-delims (`,` `;` `=` ...), which name no host; a value like `open.example,x` would
//! match no host route yet reach the backend as an `X-Forwarded-Host` that a framework reading
//! it as a list takes for `open.example`. Anything else is refused with 400 before routing, so
//! a value like `127.0.0.1:1", for=6.6.6.6` can neither match a host route nor reach the
//! forwarding headers. Routes, `X-Forwarded-Host` and `Forwarded` all read the one [`Authority`]
//! this module returns, in its canonical form (host lowercased, no trailing dot).

use std::fmt;
use std::net::Ipv6Addr;

use http::header::HOST;
use http::{HeaderMap, Uri, Version};

/// Why a request's authority was refused (400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    /// An HTTP/1.1 request without `Host` (RFC 9112 §3.2).
    #[error("the request has no Host header")]
    Missing,
    /// More than one `Host` header (RFC 9112 §3.2).
    #[error("the request has more than one Host header")]
    Repeated,
    /// The value is not an RFC 3986 authority without userinfo.
    #[error("the Host header is not a valid authority")]
    Invalid,
    /// On HTTP/2, a `host` header naming another authority than `:authority` (RFC 9113 §8.3.1).
    #[error("the host header does not match :authority")]
    Mismatch,
}

/// A validated `host[:port]`: the host lowercased (an IPv6 literal without its brackets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    host: String,
    ipv6: bool,
    port: Option<u16>,
}

impl Authority {
    /// The host, lowercased, without port (an IPv6 literal without brackets): what host routes
    /// match.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port, when the client named one.
    pub fn port(&self) -> Option<u16> {
        self.port
    }
}

impl fmt::Display for Authority {
    /// The canonical `host[:port]`, with brackets around an IPv6 literal.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ipv6 {
            true => write!(f, "[{}]", self.host)?,
            false => f.write_str(&self.host)?,
        }
        match self.port {
            Some(p) => write!(f, ":{p}"),
            None => Ok(()),
        }
    }
}

/// The request's authority: the absolute-form target's (RFC 9112 §3.2.2) or `Host` on
/// HTTP/1.x, `:authority` or `host` on HTTP/2 (both present must agree). `None` only for an
/// HTTP/1.0 request that names none.
pub fn of_request(version: Version, uri: &Uri, headers: &HeaderMap) -> Result<Option<Authority>, HostError> {
    let mut hosts = headers.get_all(HOST).iter();
    let header = match (hosts.next(), hosts.next()) {
        (_, Some(_)) => return Err(HostError::Repeated),
        (h, None) => h.map(|v| parse(v.as_bytes())).transpose()?,
    };
    let target = uri.authority().map(|a| parse(a.as_str().as_bytes())).transpose()?;
    match (version, target, header) {
        (Version::HTTP_2, Some(t), Some(h)) if t != h => Err(HostError::Mismatch),
        // An absolute-form target (or `:authority`) names the authority; `Host` is ignored
        // beside it on HTTP/1.1 (RFC 9112 §3.2.2) and must agree on HTTP/2.
        (_, Some(t), _) => Ok(Some(t)),
        (_, None, Some(h)) => Ok(Some(h)),
        (Version::HTTP_09 | Version::HTTP_10, None, None) => Ok(None),
        (_, None, None) => Err(HostError::Missing),
    }
}

/// Parses `uri-host [ ":" port ]` (RFC 3986 §3.2.2-3.2.3; no userinfo, no IPvFuture, a port of
/// 1-5 digits up to 65535).
pub fn parse(value: &[u8]) -> Result<Authority, HostError> {
    let (host, ipv6, rest) = if let Some(inner) = value.strip_prefix(b"[") {
        let end = inner.iter().position(|&b| b == b']').ok_or(HostError::Invalid)?;
        let literal = std::str::from_utf8(&inner[..end]).map_err(|_| HostError::Invalid)?;
        let ip: Ipv6Addr = literal.parse().map_err(|_| HostError::Invalid)?;
        (ip.to_string(), true, &inner[end + 1..])
    } else {
        let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
        let name = &value[..end];
        let name = name.strip_suffix(b".").unwrap_or(name);
        if !crate::config::dns_name(name) {
            return Err(HostError::Invalid);
        }
        // ASCII by construction.
        let name = String::from_utf8_lossy(name).to_ascii_lowercase();
        (name, false, &value[end..])
    };
    let port = match rest {
        [] => None,
        [b':', digits @ ..] if (1..=5).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit) => {
            let n = digits.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
            // Port 0 names no service.
            Some(u16::try_from(n).ok().filter(|p| *p != 0).ok_or(HostError::Invalid)?)
        }
        _ => return Err(HostError::Invalid),
    };
    Ok(Authority { host, ipv6, port })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> String {
        parse(s.as_bytes()).map(|a| a.to_string()).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn names_addresses_and_ports_parse_to_their_canonical_form() {
        assert_eq!(ok("Agents.Example.COM"), "agents.example.com");
        assert_eq!(ok("agents.example.com:8443"), "agents.example.com:8443");
        assert_eq!(ok("127.0.0.1:1"), "127.0.0.1:1");
        assert_eq!(ok("[::1]:8443"), "[::1]:8443");
        assert_eq!(ok("[0:0::1]"), "[::1]");
        assert_eq!(ok("xn--bcher-kva.example"), "xn--bcher-kva.example");
        assert_eq!(ok("agents.example.com.:8443"), "agents.example.com:8443", "the absolute form");
        assert_eq!(ok("agent_1.internal"), "agent_1.internal");
        assert_eq!(ok("a-.b1"), "a-.b1");
        assert_eq!(ok(&"a".repeat(63)), "a".repeat(63));
        assert!(parse("a".repeat(64).as_bytes()).is_err(), "a label over 63");
        let long = vec!["a".repeat(63); 4].join(".");
        assert!(parse(long.as_bytes()).is_err(), "a name over 253");
        let a = parse(b"[::1]:8443").expect("v6");
        assert_eq!((a.host(), a.port()), ("::1", Some(8443)));
    }

    #[test]
    fn anything_that_is_not_an_authority_is_refused() {
        for bad in [
            "127.0.0.1:1\", for=6.6.6.6;proto=https;host=\"evil.example",
            "",
            ":8443",
            "a b",
            "a\"b",
            "user@host",
            "host:",
            "host:65536",
            "host:123456",
            "host:80:80",
            "host:8x",
            "[::1",
            "[v1.fe80]",
            "[::1]x",
            "[fe80::1%25eth0]",
            "a%zz",
            "a%2",
            // RFC 3986 reg-names that name no host.
            "open.example,x",
            "open%2eexample",
            "a;b",
            "a=b",
            "a!b",
            "a$b",
            "a&b",
            "a'b",
            "a(b)",
            "a*b",
            "a+b",
            "a~b",
            "a..b",
            ".a",
            ".",
            "a..",
            "-a.example",
            "127.1",
            "0x7f.0.0.1",
            "999.999.999.999",
            "host:0",
            "host/path",
            "h\u{e9}.example",
        ] {
            assert_eq!(parse(bad.as_bytes()), Err(HostError::Invalid), "{bad:?}");
        }
    }

    #[test]
    fn http2_host_must_agree_with_authority_and_http1_needs_exactly_one_host() {
        let mut h = HeaderMap::new();
        h.insert(HOST, "b.example".parse().expect("value"));
        let uri: Uri = "https://a.example/x".parse().expect("uri");
        assert_eq!(of_request(Version::HTTP_2, &uri, &h), Err(HostError::Mismatch));
        h.insert(HOST, "A.example".parse().expect("value"));
        assert_eq!(
            of_request(Version::HTTP_2, &uri, &h).map(|a| a.map(|a| a.to_string())),
            Ok(Some("a.example".into()))
        );
        let origin_form: Uri = "/x".parse().expect("uri");
        assert_eq!(of_request(Version::HTTP_11, &origin_form, &HeaderMap::new()), Err(HostError::Missing));
        assert_eq!(of_request(Version::HTTP_10, &origin_form, &HeaderMap::new()), Ok(None));
        h.append(HOST, "a.example".parse().expect("value"));
        assert_eq!(of_request(Version::HTTP_11, &origin_form, &h), Err(HostError::Repeated));
    }
}
