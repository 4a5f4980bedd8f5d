//! Value types of the configuration that carry their own parsing: token sources, Origin
//! patterns, secrets and the cipher-suite names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// Cipher suites the server can offer, in the default order of preference.
///
/// AES-128-GCM comes first: it is as strong as anything a browser negotiates today, and its
/// TLS 1.3 key schedule runs on SHA-256, which x86-64 and ARMv8 CPUs accelerate (SHA-NI); the
/// SHA-384 schedule of AES-256-GCM runs in software on most of them and costs measurably more
/// per handshake (see docs/benchmarks-history.md). The server's order wins over the client's.
pub const CIPHER_SUITES: &[&str] = &[
    "TLS13_AES_128_GCM_SHA256",
    "TLS13_AES_256_GCM_SHA384",
    "TLS13_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
];

/// Secret bytes (HMAC keys, admin tokens) whose `Debug` never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps secret bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(bytes)
    }

    /// The secret bytes; only for the code that uses them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a token may be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `Authorization: Bearer <token>`.
    Bearer,
    /// A query parameter (`query:access_token`).
    Query(String),
    /// A cookie (`cookie:portcullis_token`).
    Cookie(String),
    /// A `Sec-WebSocket-Protocol` entry with this prefix (`subprotocol:bearer.`).
    Subprotocol(String),
}

impl TokenSource {
    /// Sources used when a route does not list any: the header, then the subprotocol.
    pub fn defaults() -> Vec<TokenSource> {
        vec![TokenSource::Bearer, TokenSource::Subprotocol("bearer.".into())]
    }
}

impl FromStr for TokenSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid token source {s:?}: use bearer, query:NAME, cookie:NAME or subprotocol:PREFIX");
        match s.split_once(':') {
            None if s == "bearer" => Ok(TokenSource::Bearer),
            Some(("query", n)) if !n.is_empty() => Ok(TokenSource::Query(n.to_owned())),
            Some(("cookie", n)) if !n.is_empty() => Ok(TokenSource::Cookie(n.to_owned())),
            Some(("subprotocol", p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_graphic() && b != b',') => {
                Ok(TokenSource::Subprotocol(p.to_owned()))
            }
            _ => Err(bad()),
        }
    }
}

impl<'de> Deserialize<'de> for TokenSource {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// An allowed Origin: `https://app.example.com`, `*.example.com`, `https://*.example.com`, or
/// `https://{agent}.agents.example.com`: the origin of the agent the request names, and of no
/// other (a wildcard over the agents' origins lets one agent's page use the user's credentials
/// on another agent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    scheme: Option<String>,
    /// The host, or the suffix (starting with '.') that a wildcard or an `{agent}` is before.
    host: String,
    kind: HostKind,
    port: Option<u16>,
}

/// How an [`OriginPattern`]'s host is matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostKind {
    /// `host` exactly.
    Exact,
    /// `*.suffix`: one or more labels before the suffix (any port unless one is given).
    Wildcard,
    /// `{agent}.suffix`: the request's agent (one DNS label) before the suffix.
    Agent,
}

impl OriginPattern {
    /// Whether the pattern names the request's `{agent}` (its route must capture one).
    pub fn per_agent(&self) -> bool {
        self.kind == HostKind::Agent
    }

    /// Whether an `Origin` header value matches, for a request naming `agent` (lowercase, as
    /// the route stage leaves it).
    pub fn matches(&self, origin: &str, agent: Option<&str>) -> bool {
        let Some((scheme, rest)) = origin.split_once("://") else { return false };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => match p.parse::<u16>() {
                Ok(p) => (h, Some(p)),
                Err(_) => return false,
            },
            _ => (rest, None),
        };
        if self.scheme.as_deref().is_some_and(|s| !s.eq_ignore_ascii_case(scheme)) {
            return false;
        }
        if self.port != port && (self.port.is_some() || self.kind != HostKind::Wildcard) {
            return false;
        }
        let host = host.to_ascii_lowercase();
        match self.kind {
            HostKind::Exact => host == self.host,
            HostKind::Wildcard => host.len() > self.host.len() && host.ends_with(&self.host),
            // One label: `x.a2.agents.example.com` is a page of a2's site, not agent `x.a2`'s.
            HostKind::Agent => agent
                .filter(|a| !a.is_empty() && !a.contains('.'))
                .is_some_and(|agent| host.strip_prefix(agent) == Some(self.host.as_str())),
        }
    }
}

impl FromStr for OriginPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid origin pattern {s:?}: use https://host[:port], *.domain, https://*.domain or \
                 https://{{agent}}.domain"
            )
        };
        let (scheme, rest) = match s.split_once("://") {
            Some((sc, r)) if !sc.is_empty() => (Some(sc.to_ascii_lowercase()), r),
            Some(_) => return Err(bad()),
            None => (None, s),
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| bad())?)),
            None => (rest, None),
        };
        let (kind, host) = match (host.strip_prefix("*."), host.strip_prefix("{agent}.")) {
            (Some(suffix), _) => (HostKind::Wildcard, format!(".{}", suffix.to_ascii_lowercase())),
            (_, Some(suffix)) => (HostKind::Agent, format!(".{}", suffix.to_ascii_lowercase())),
            _ => (HostKind::Exact, host.to_ascii_lowercase()),
        };
        let no_scheme = kind != HostKind::Wildcard && scheme.is_none();
        if host.is_empty() || host == "." || host.contains(['/', '*', '{', '}']) || no_scheme {
            return Err(bad());
        }
        Ok(OriginPattern { scheme, host, kind, port })
    }
}

impl fmt::Display for OriginPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(s) = &self.scheme {
            write!(f, "{s}://")?;
        }
        match self.kind {
            HostKind::Exact => f.write_str(&self.host)?,
            HostKind::Wildcard => write!(f, "*{}", self.host)?,
            HostKind::Agent => write!(f, "{{agent}}{}", self.host)?,
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

impl<'de> Deserialize<'de> for OriginPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_patterns_match() {
        let exact: OriginPattern = "https://app.example.com".parse().expect("pattern");
        assert!(exact.matches("https://app.example.com", None));
        assert!(!exact.matches("http://app.example.com", None));
        assert!(!exact.matches("https://app.example.com:8443", None));
        assert!(!exact.matches("https://evil.app.example.com", None));
        let wild: OriginPattern = "*.example.com".parse().expect("pattern");
        assert!(wild.matches("https://a.example.com", None));
        assert!(wild.matches("http://b.c.example.com:8080", None));
        assert!(!wild.matches("https://example.com", None));
        assert!(!wild.matches("https://evilexample.com", None));
        assert!(!wild.matches("null", None));
        let https_wild: OriginPattern = "https://*.example.com".parse().expect("pattern");
        assert!(!https_wild.matches("http://a.example.com", None));
        assert!("example.com".parse::<OriginPattern>().is_err());
    }

    #[test]
    fn an_agent_origin_matches_the_requests_agent_and_no_other() {
        let own: OriginPattern = "https://{agent}.agents.example.com".parse().expect("pattern");
        assert!(own.per_agent());
        assert_eq!(own.to_string(), "https://{agent}.agents.example.com");
        assert!(own.matches("https://a1.agents.example.com", Some("a1")));
        assert!(own.matches("https://A1.Agents.Example.com", Some("a1")));
        assert!(!own.matches("https://a2.agents.example.com", Some("a1")), "another agent's page");
        assert!(!own.matches("https://x.a1.agents.example.com", Some("a1")));
        assert!(!own.matches("https://x.a1.agents.example.com", Some("x.a1")), "a dotted agent is no one label");
        assert!(!own.matches("https://a1.agents.example.com", None), "a route without an agent");
        assert!(!own.matches("http://a1.agents.example.com", Some("a1")));
        assert!(!own.matches("https://a1.agents.example.com:8443", Some("a1")));
        assert!(!own.matches("https://agents.example.com", Some("")));
        for bad in
            ["{agent}.agents.example.com", "https://{agent}", "https://{agent}.", "https://x.{agent}.example.com"]
        {
            assert!(bad.parse::<OriginPattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn token_sources_parse() {
        assert_eq!("bearer".parse(), Ok(TokenSource::Bearer));
        assert_eq!("query:t".parse(), Ok(TokenSource::Query("t".into())));
        assert_eq!("subprotocol:bearer.".parse(), Ok(TokenSource::Subprotocol("bearer.".into())));
        assert!("header:x".parse::<TokenSource>().is_err());
        assert!("query:".parse::<TokenSource>().is_err());
    }
}
