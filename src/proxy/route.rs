//! Stage: route. Matches a request's host and path to a route and renders its backend members.
//!
//! Path patterns are segment lists (`/agents/{agent}/terminal`); a capture matches exactly one
//! segment and its value is validated (charset `[A-Za-z0-9._-]`, 1–128 bytes, never `.` or `..`)
//! before it is used anywhere, so `%2f`, `..`, NUL and over-long ids are refused with 400 before
//! a backend is contacted. The most specific route wins: exact host over wildcard host over any
//! host, then more literal segments.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer};

use crate::config::RouteConfig;

/// Largest accepted capture value, in bytes.
pub const MAX_CAPTURE_LEN: usize = 128;

/// Why no route could be used for a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// No route matches the host and path.
    #[error("no route matches the request")]
    NoRoute,
    /// A route matched, but a captured value is not a valid id.
    #[error("invalid value for path capture {0:?}")]
    InvalidCapture(String),
}

/// The routes of the running configuration, most specific first.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<Arc<RouteConfig>>,
}

/// Values captured from the path, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captures(Vec<(String, String)>);

impl Captures {
    /// Captures from name/value pairs (for values validated elsewhere, e.g. admin input).
    pub fn from_pairs(pairs: &[(&str, &str)]) -> Captures {
        Captures(pairs.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect())
    }

    /// The value captured for `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

impl RouteTable {
    /// Builds the table from configured routes.
    pub fn new(routes: &[RouteConfig]) -> Self {
        let mut routes: Vec<Arc<RouteConfig>> = routes.iter().cloned().map(Arc::new).collect();
        routes.sort_by_key(|r| std::cmp::Reverse(specificity(r)));
        RouteTable { routes }
    }

    /// Finds the route for `host` (without port, any case) and `path`.
    pub fn find(&self, host: Option<&str>, path: &str) -> Result<(Arc<RouteConfig>, Captures), RouteError> {
        let host = host.map(|h| h.to_ascii_lowercase());
        for route in &self.routes {
            if !host_matches(route.host.as_deref(), host.as_deref()) {
                continue;
            }
            if let Some(raw) = route.path.match_segments(path) {
                let mut caps = Vec::with_capacity(raw.len());
                for (name, value) in raw {
                    if !valid_capture(value) {
                        return Err(RouteError::InvalidCapture(name.to_owned()));
                    }
                    caps.push((name.to_owned(), value.to_owned()));
                }
                return Ok((route.clone(), Captures(caps)));
            }
        }
        Err(RouteError::NoRoute)
    }
}

fn specificity(r: &RouteConfig) -> (u8, usize, usize) {
    let host = match r.host.as_deref() {
        None => 0,
        Some(h) if h.starts_with("*.") => 1,
        Some(_) => 2,
    };
    (host, r.path.literal_count(), r.path.segments.len())
}

fn host_matches(pattern: Option<&str>, host: Option<&str>) -> bool {
    match (pattern, host) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(p), Some(h)) => match p.strip_prefix("*.") {
            Some(suffix) => {
                h.len() > suffix.len() + 1 && h.ends_with(suffix) && h.as_bytes()[h.len() - suffix.len() - 1] == b'.'
            }
            None => p == h,
        },
    }
}

/// Whether a captured value is safe to use as an id.
pub fn valid_capture(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_CAPTURE_LEN
        && v != "."
        && v != ".."
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A path pattern such as `/agents/{agent}/terminal`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    raw: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Capture(String),
}

impl PathPattern {
    /// Whether the pattern captures `name`.
    pub fn has_capture(&self, name: &str) -> bool {
        self.segments.iter().any(|s| matches!(s, Segment::Capture(n) if n == name))
    }

    fn literal_count(&self) -> usize {
        self.segments.iter().filter(|s| matches!(s, Segment::Literal(_))).count()
    }

    /// Matches `path` segment by segment; returns the raw (unvalidated) captures.
    fn match_segments<'p>(&'p self, path: &'p str) -> Option<Vec<(&'p str, &'p str)>> {
        let path = path.strip_prefix('/')?;
        let mut parts = path.split('/');
        let mut caps = Vec::new();
        for seg in &self.segments {
            let part = parts.next()?;
            match seg {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Capture(name) => caps.push((name.as_str(), part)),
            }
        }
        match parts.next() {
            None => Some(caps),
            // Tolerate one trailing slash.
            Some("") if parts.next().is_none() => Some(caps),
            Some(_) => None,
        }
    }
}

impl FromStr for PathPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let rest = s.strip_prefix('/').ok_or_else(|| format!("path pattern {s:?} must start with '/'"))?;
        let mut segments = Vec::new();
        for part in rest.split('/') {
            if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return Err(format!("invalid capture name {name:?} in path pattern {s:?}"));
                }
                if segments.iter().any(|x| matches!(x, Segment::Capture(n) if n == name)) {
                    return Err(format!("capture {{{name}}} appears twice in {s:?}"));
                }
                segments.push(Segment::Capture(name.to_owned()));
            } else if part.contains(['{', '}']) {
                return Err(format!("a capture must be a whole segment in path pattern {s:?}"));
            } else {
                segments.push(Segment::Literal(part.to_owned()));
            }
        }
        Ok(PathPattern { raw: s.to_owned(), segments })
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl<'de> Deserialize<'de> for PathPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A backend member address, possibly templated with captures: `{agent}.agents.internal:7681`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendTemplate {
    raw: String,
    parts: Vec<Segment>,
}

impl BackendTemplate {
    /// Names of the captures this template uses.
    pub fn captures(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Segment::Capture(n) => Some(n.as_str()),
            Segment::Literal(_) => None,
        })
    }

    /// Renders `host:port` with validated captures. A capture substituted into the host must
    /// be a single DNS label (no '.'), so a client cannot steer a templated member into another
    /// domain (`{agent}.agents.internal` with agent `x.evil.example`); `None` then.
    pub fn render(&self, caps: &Captures) -> Option<String> {
        let dotted = self.captures().any(|c| caps.get(c).is_some_and(|v| v.contains('.')));
        (!dotted).then(|| render_template(&self.parts, caps))
    }
}

fn render_template(parts: &[Segment], caps: &Captures) -> String {
    let mut out = String::new();
    for p in parts {
        match p {
            Segment::Literal(l) => out.push_str(l),
            Segment::Capture(n) => out.push_str(caps.get(n).unwrap_or_default()),
        }
    }
    out
}

/// Capture names used by a `{capture}` template string.
pub fn template_captures(template: &str) -> Vec<String> {
    parse_template(template)
        .map(|parts| {
            parts
                .into_iter()
                .filter_map(|p| match p {
                    Segment::Capture(n) => Some(n),
                    Segment::Literal(_) => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Renders a `/path/{capture}` template (used for `backend_path` and scopes).
pub fn render_path(template: &str, caps: &Captures) -> String {
    match parse_template(template) {
        Ok(parts) => render_template(&parts, caps),
        Err(_) => template.to_owned(),
    }
}

fn parse_template(s: &str) -> Result<Vec<Segment>, String> {
    let mut parts = Vec::new();
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Segment::Literal(rest[..open].to_owned()));
        }
        let close = rest[open..].find('}').ok_or_else(|| format!("unclosed '{{' in {s:?}"))? + open;
        let name = &rest[open + 1..close];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("invalid capture name {name:?} in {s:?}"));
        }
        parts.push(Segment::Capture(name.to_owned()));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Segment::Literal(rest.to_owned()));
    }
    Ok(parts)
}

impl FromStr for BackendTemplate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts = parse_template(s)?;
        let port = s.rsplit_once(':').map(|(_, p)| p).unwrap_or("");
        if port.parse::<u16>().is_err() {
            return Err(format!("backend {s:?} must be host:port"));
        }
        Ok(BackendTemplate { raw: s.to_owned(), parts })
    }
}

impl fmt::Display for BackendTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl<'de> Deserialize<'de> for BackendTemplate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendSettings, SessionSettings};

    fn route(name: &str, host: Option<&str>, path: &str) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            host: host.map(Into::into),
            path: path.parse().expect("pattern"),
            backends: vec![crate::config::StaticMember {
                template: "127.0.0.1:1".parse().expect("backend"),
                weight: 1,
            }],
            registry: None,
            balance: crate::config::Balance {
                policy: crate::config::Policy::Ordered,
                sticky_key: None,
                max_attempts: 0,
            },
            health: crate::config::HealthSettings {
                eject_base: std::time::Duration::from_secs(1),
                eject_max: std::time::Duration::from_secs(30),
                fail_open: false,
                active_interval: std::time::Duration::ZERO,
                active_path: None,
            },
            backend_path: None,
            session: SessionSettings::default(),
            backend: BackendSettings::default(),
            auth: None,
            origin: None,
        }
    }

    #[test]
    fn captures_are_validated() {
        let t = RouteTable::new(&[route("t", None, "/agents/{agent}/terminal")]);
        let (r, caps) = t.find(None, "/agents/a-1.b_c/terminal").expect("match");
        assert_eq!(r.name, "t");
        assert_eq!(caps.get("agent"), Some("a-1.b_c"));
        for bad in ["/agents/../terminal", "/agents/a%2fb/terminal", "/agents/a%00/terminal"] {
            assert_eq!(t.find(None, bad).unwrap_err(), RouteError::InvalidCapture("agent".into()), "{bad}");
        }
        let long = format!("/agents/{}/terminal", "a".repeat(129));
        assert!(matches!(t.find(None, &long), Err(RouteError::InvalidCapture(_))));
        assert_eq!(t.find(None, "/agents/a/b/terminal").unwrap_err(), RouteError::NoRoute);
    }

    #[test]
    fn most_specific_route_wins() {
        let t = RouteTable::new(&[
            route("any", None, "/agents/{agent}/terminal"),
            route("wild", Some("*.example.com"), "/agents/{agent}/terminal"),
            route("exact", Some("a.example.com"), "/agents/{agent}/terminal"),
            route("literal", None, "/agents/special/terminal"),
        ]);
        let name = |h: Option<&str>, p: &str| t.find(h, p).map(|(r, _)| r.name.clone());
        assert_eq!(name(Some("A.example.com"), "/agents/x/terminal").as_deref(), Ok("exact"));
        assert_eq!(name(Some("b.example.com"), "/agents/x/terminal").as_deref(), Ok("wild"));
        assert_eq!(name(Some("example.com"), "/agents/x/terminal").as_deref(), Ok("any"));
        assert_eq!(name(None, "/agents/special/terminal").as_deref(), Ok("literal"));
    }

    #[test]
    fn templates_render_captures() {
        let t = RouteTable::new(&[route("t", None, "/agents/{agent}/terminal")]);
        let (_, caps) = t.find(None, "/agents/a1/terminal").expect("match");
        let b: BackendTemplate = "{agent}.agents.internal:7681".parse().expect("template");
        assert_eq!(b.render(&caps).as_deref(), Some("a1.agents.internal:7681"));
        let (_, dotted) = t.find(None, "/agents/a1.evil.example/terminal").expect("match");
        assert_eq!(b.render(&dotted), None, "a dotted capture cannot pick another domain");
        assert_eq!(render_path("/shell/{agent}", &caps), "/shell/a1");
        assert!("nohost".parse::<BackendTemplate>().is_err());
    }
}
