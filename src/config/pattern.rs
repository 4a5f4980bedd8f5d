//! Path patterns and templates: the route's `path` (`/agents/{agent}/terminal`), templated
//! member addresses (`{agent}.agents.internal:7681`) and `{capture}` strings (`backend_path`,
//! registry URLs, scopes), with the captured values they are rendered from.
//!
//! A capture matches exactly one segment and its value is validated (charset
//! `[A-Za-z0-9._-]`, 1–128 bytes, never `.` or `..`) before it is used anywhere, so `%2f`, `..`,
//! NUL and over-long ids are refused before a backend is contacted.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// Largest accepted capture value, in bytes.
pub const MAX_CAPTURE_LEN: usize = 128;

/// Values captured from the path, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captures(pub(crate) Vec<(String, String)>);

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

/// Whether a catch-all value is safe to pass on: empty, or segments that are each a valid
/// capture (so no `..`, no empty segment, no percent-encoding).
pub fn valid_rest(v: &str) -> bool {
    let v = v.strip_suffix('/').unwrap_or(v);
    v.is_empty() || (v.len() <= 4 * MAX_CAPTURE_LEN && v.split('/').all(valid_capture))
}

/// Whether `name` can be a host's DNS name: dot-separated labels of `[A-Za-z0-9_-]`, each 1-63 bytes and not starting with `-`, at
/// most 253 bytes in all (RFC 1035 §2.3.4, RFC 1123 §2.1). A name whose last label is a
/// number (`127.1`, `0x7f.0.0.1`) is read as an IPv4 address by browsers' URL parsers: it must
/// be one, in its dotted-quad form.
pub fn dns_name(name: &[u8]) -> bool {
    let labels = || name.split(|&b| b == b'.');
    let ldh = |label: &[u8]| {
        (1..=63).contains(&label.len())
            && label[0] != b'-'
            && label.iter().all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.is_empty() || name.len() > 253 || !labels().all(ldh) {
        return false;
    }
    let last = labels().next_back().unwrap_or_default();
    let numeric = last.iter().all(u8::is_ascii_digit)
        || last
            .strip_prefix(b"0x")
            .or_else(|| last.strip_prefix(b"0X"))
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
    !numeric || std::str::from_utf8(name).is_ok_and(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
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
    /// `{*name}`, last in a path pattern only: zero or more segments, kept with their slashes.
    Rest(String),
}

impl PathPattern {
    /// Segments in the pattern, literal or captured.
    pub(crate) fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Whether the pattern captures `name`.
    pub fn has_capture(&self, name: &str) -> bool {
        self.segments.iter().any(|s| matches!(s, Segment::Capture(n) | Segment::Rest(n) if n == name))
    }

    /// Whether `name` is the pattern's catch-all capture (`{*name}`).
    pub fn is_rest(&self, name: &str) -> bool {
        matches!(self.segments.last(), Some(Segment::Rest(n)) if n == name)
    }

    /// Literal segments: more of them make a route more specific.
    pub(crate) fn literal_count(&self) -> usize {
        self.segments.iter().filter(|s| matches!(s, Segment::Literal(_))).count()
    }

    /// Where capture `name` sits in `path`: its byte range, or `None` when the pattern does not
    /// capture `name` or does not match.
    pub(crate) fn capture_span(&self, path: &str, name: &str) -> Option<std::ops::Range<usize>> {
        self.match_spans(path)?.into_iter().find_map(|(n, span)| (n == name).then_some(span))
    }

    /// Matches `path` segment by segment; returns the raw (unvalidated) captures.
    pub(crate) fn match_segments<'p>(&'p self, path: &'p str) -> Option<Vec<(&'p str, &'p str)>> {
        let spans = self.match_spans(path)?;
        Some(spans.into_iter().map(|(name, span)| (name, path.get(span).unwrap_or(""))).collect())
    }

    /// The one walk of `path` against the pattern: each capture's name and byte range in
    /// `path`, or `None` when it does not match.
    fn match_spans(&self, path: &str) -> Option<Vec<(&str, std::ops::Range<usize>)>> {
        let mut parts = path.strip_prefix('/')?.split('/');
        let mut caps = Vec::new();
        let mut consumed = 1; // bytes of `path` matched so far: its leading slash, then each segment with its slash
        for seg in &self.segments {
            if let Segment::Rest(name) = seg {
                // Everything left, possibly nothing: `/api` and `/api/` give "", `/api/a/b` "a/b".
                caps.push((name.as_str(), consumed.min(path.len())..path.len()));
                return Some(caps);
            }
            let part = parts.next()?;
            let start = consumed;
            consumed += part.len() + 1;
            match seg {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Capture(name) => caps.push((name.as_str(), start..start + part.len())),
                Segment::Rest(_) => unreachable!("handled above"),
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
        let parts: Vec<&str> = rest.split('/').collect();
        for (i, part) in parts.iter().copied().enumerate() {
            if let Some(name) = part.strip_prefix("{*").and_then(|p| p.strip_suffix('}')) {
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                    return Err(format!("invalid capture name {name:?} in path pattern {s:?}"));
                }
                if i + 1 != parts.len() {
                    return Err(format!("a catch-all {{*{name}}} must be the last segment of {s:?}"));
                }
                if segments.iter().any(|x| matches!(x, Segment::Capture(n) if n == name)) {
                    return Err(format!("capture {{{name}}} appears twice in {s:?}"));
                }
                segments.push(Segment::Rest(name.to_owned()));
            } else if let Some(name) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
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
            Segment::Capture(n) | Segment::Rest(n) => Some(n.as_str()),
            Segment::Literal(_) => None,
        })
    }

    /// Renders `host:port` with validated captures. A capture substituted into the host must
    /// be a single DNS label (no '.'), so a client cannot steer a templated member into another
    /// domain (`{agent}.agents.internal` with agent `x.evil.example`); `None` then, and when the
    /// host made is not one the template could mean ([`rendered_host_allowed`]: an IPv4
    /// shorthand, `localhost`). A host made only of captures is refused by validation
    /// ([`BackendTemplate::host_is_only_captures`]), so no agent id can spell an address
    /// (`2130706433`, `0x7f000001`, `0`) or `localhost`.
    pub fn render(&self, caps: &Captures) -> Option<String> {
        let dotted = self.captures().any(|c| caps.get(c).is_some_and(|v| v.contains('.')));
        if dotted {
            return None;
        }
        let addr = render_template(&self.parts, caps);
        let captured = self.captures().next().is_some();
        let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
        (!captured || rendered_host_allowed(host)).then_some(addr)
    }

    /// Whether the host part (before the port) fixes nothing of the name: it has no literal
    /// letter or digit (separators alone, as in `{agent}.{tab}` or `{agent}-{tab}`, fix
    /// nothing), so the whole host is what the client's path says.
    pub fn host_is_only_captures(&self) -> bool {
        if self.captures().next().is_none() {
            return false;
        }
        let mut host = Vec::new();
        for p in &self.parts {
            match p {
                // The port's colon ends the host.
                Segment::Literal(l) => match l.split_once(':') {
                    Some((h, _)) => {
                        host.push(Segment::Literal(h.to_owned()));
                        break;
                    }
                    None => host.push(p.clone()),
                },
                other => host.push(other.clone()),
            }
        }
        !fixes_a_part(&host)
    }
}

fn render_template(parts: &[Segment], caps: &Captures) -> String {
    let mut out = String::new();
    for p in parts {
        match p {
            Segment::Literal(l) => out.push_str(l),
            Segment::Capture(n) | Segment::Rest(n) => out.push_str(caps.get(n).unwrap_or_default()),
        }
    }
    out
}

/// Whether `value` is `template` rendered with `caps`, with the capture named `folded` compared
/// without regard to ASCII case and everything else exactly: a grant names the agent (one host
/// name) in any case, but a scope's other parts, and any other capture in it, are what the
/// token says (RFC 6749 §3.3: scopes are case-sensitive).
pub fn is_rendering(template: &str, caps: &Captures, folded: &str, value: &str) -> bool {
    let Ok(parts) = parse_template(template) else { return value == template };
    let mut rest = value.as_bytes();
    for p in &parts {
        let (text, fold) = match p {
            Segment::Literal(l) => (l.as_str(), false),
            Segment::Capture(n) | Segment::Rest(n) => (caps.get(n).unwrap_or_default(), n == folded),
        };
        let Some((head, tail)) = rest.split_at_checked(text.len()) else { return false };
        let same = match fold {
            true => head.eq_ignore_ascii_case(text.as_bytes()),
            false => head == text.as_bytes(),
        };
        if !same {
            return false;
        }
        rest = tail;
    }
    rest.is_empty()
}

/// Capture names used by a `{capture}` template string.
pub fn template_captures(template: &str) -> Vec<String> {
    parse_template(template)
        .map(|parts| {
            parts
                .into_iter()
                .filter_map(|p| match p {
                    Segment::Capture(n) | Segment::Rest(n) => Some(n),
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

/// A URL template's authority (`registry.internal:8080`, `{agent}.sidecars.internal`): what
/// follows `scheme://` up to its path, query or fragment.
fn url_authority(template: &str) -> &str {
    let rest = template.split_once("://").map_or(template, |(_, r)| r);
    rest.split(['/', '?', '#']).next().unwrap_or(rest)
}

/// Whether a URL template's host is captured and has no literal letter or digit (separators fix
/// nothing): the whole host is what the client's path says (`http://{agent}:8080/members`), as a member address may not be
/// ([`BackendTemplate::host_is_only_captures`]).
pub(crate) fn url_host_is_only_captures(template: &str) -> bool {
    let Ok(parts) = parse_template(url_host(url_authority(template))) else { return false };
    parts.iter().any(|p| !matches!(p, Segment::Literal(_))) && !fixes_a_part(&parts)
}

/// An authority's host: what comes before its port (`:8080`, `:{port}`, or a bare `:`); an
/// IPv6 literal's colons are inside its brackets.
fn url_host(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') && !host.is_empty() => host,
        _ => authority,
    }
}

/// Whether a templated host fixes part of the name: a literal letter or digit in it. Separators
/// alone (`.`, `-`, `:`) fix nothing: `{agent}.{tab}` names `127.1`.
fn fixes_a_part(host: &[Segment]) -> bool {
    host.iter().any(|p| matches!(p, Segment::Literal(l) if l.bytes().any(|b| b.is_ascii_alphanumeric())))
}

/// Whether a host rendered from a template with the client's captures is one the template
/// could mean: a DNS name (whose last label, when a number, is a dotted-quad address's: no
/// `127.1` or `0x7f.1` shorthand, [`dns_name`]), and not `localhost` or a name under it
/// (RFC 6761), which a literal part such as `{agent}host` would let a client spell.
pub(crate) fn rendered_host_allowed(host: &str) -> bool {
    // An IPv6 literal the template's own brackets and prefix make (`[fd00::{agent}]`).
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<std::net::Ipv6Addr>().is_ok_and(|ip| !ip.is_loopback() && !ip.is_unspecified());
    }
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    dns_name(host.as_bytes()) && host != "localhost" && !host.ends_with(".localhost")
}

/// Renders a URL template with validated captures; `None` when a capture in its authority has a
/// `.`, or the host it makes is an address or `localhost` ([`rendered_host_allowed`]), so a
/// client cannot steer the request (and the credentials sent with it) outside the domain the
/// template names (`{agent}.sidecars.internal` with agent `x.evil.example`), as with member
/// addresses.
pub fn render_url(template: &str, caps: &Captures) -> Option<String> {
    let captured = template_captures(url_authority(template));
    if captured.iter().any(|c| caps.get(c).is_some_and(|v| v.contains('.'))) {
        return None;
    }
    let url = render_path(template, caps);
    (captured.is_empty() || rendered_host_allowed(url_host(url_authority(&url)))).then_some(url)
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

    #[test]
    fn a_url_template_keeps_its_host_in_the_configured_domain() {
        for only in [
            "http://{agent}:8080/members",
            "https://{agent}/m",
            "http://{agent}{rest}/x",
            "http://{agent}",
            // Found by a verification attack: separators fix nothing of the name.
            "http://{agent}:/members",
            "http://{agent}:{port}/members",
            "http://{agent}.{tab}:9000/members",
            "http://{agent}-{tab}/members",
        ] {
            assert!(url_host_is_only_captures(only), "{only}");
        }
        for literal in
            ["http://{agent}.sidecars.internal/m", "http://reg.internal:8080/agents/{agent}", "http://reg/{agent}"]
        {
            assert!(!url_host_is_only_captures(literal), "{literal}");
        }
        let caps = |v: &str| Captures::from_pairs(&[("agent", v)]);
        let t = "http://{agent}.sidecars.internal:9000/agents/{agent}/members";
        assert_eq!(render_url(t, &caps("a1")).as_deref(), Some("http://a1.sidecars.internal:9000/agents/a1/members"));
        assert_eq!(render_url(t, &caps("x.evil.example")), None, "a dotted capture cannot pick another domain");
        // Whatever the literal part, the host made is a name: never an address or localhost.
        for (template, agent) in
            [("http://{agent}host/m", "local"), ("http://{agent}.localhost/m", "x"), ("http://0x{agent}.1/m", "7f")]
        {
            assert_eq!(render_url(template, &caps(agent)), None, "{template} with {agent}");
        }
        let path_only = "http://reg.internal/agents/{agent}";
        assert_eq!(render_url(path_only, &caps("v1.2")).as_deref(), Some("http://reg.internal/agents/v1.2"));
    }

    #[test]
    fn a_catch_all_takes_the_rest_of_the_path() {
        let p: PathPattern = "/agents/{agent}/api/{*rest}".parse().expect("pattern");
        assert!(p.has_capture("rest") && p.is_rest("rest") && !p.is_rest("agent"));
        let got =
            |path: &str| p.match_segments(path).map(|c| c.into_iter().map(|(_, v)| v.to_owned()).collect::<Vec<_>>());
        assert_eq!(got("/agents/a1/api/tasks/7/output"), Some(vec!["a1".into(), "tasks/7/output".into()]));
        assert_eq!(got("/agents/a1/api"), Some(vec!["a1".into(), String::new()]));
        assert_eq!(got("/agents/a1/api/"), Some(vec!["a1".into(), String::new()]));
        assert_eq!(got("/agents/a1/other/x"), None);
        assert!("/a/{*rest}/b".parse::<PathPattern>().is_err(), "only last");
        assert!("/a/{x}/{*x}".parse::<PathPattern>().is_err(), "no duplicate name");
        assert_eq!(render_path("/api/{rest}", &Captures::from_pairs(&[("rest", "tasks/7")])), "/api/tasks/7");
        assert!(valid_rest("tasks/7/output") && valid_rest("") && valid_rest("tasks/"));
        assert!(!valid_rest("tasks/../etc") && !valid_rest("a//b") && !valid_rest("a/%2e%2e") && !valid_rest("./x"));
    }

    #[test]
    fn a_capture_is_found_where_it_sits_in_the_path() {
        let p: PathPattern = "/agents/{agent}/api/{*rest}".parse().expect("pattern");
        let span = |path: &str, name: &str| p.capture_span(path, name).map(|r| path[r].to_owned());
        assert_eq!(span("/agents/Box1/api/x/y", "agent").as_deref(), Some("Box1"));
        assert_eq!(span("/agents/Box1/api/x/y", "rest").as_deref(), Some("x/y"));
        assert_eq!(span("/agents/Box1/api", "rest").as_deref(), Some(""));
        assert_eq!(span("/agents/Box1/api/x", "other"), None);
        let t: PathPattern = "/t/{agent}".parse().expect("pattern");
        assert_eq!(t.capture_span("/t/AB/", "agent").map(|r| &"/t/AB/"[r]), Some("AB"));
        assert_eq!(t.capture_span("/t", "agent"), None);
        assert_eq!(t.capture_span("/u/AB", "agent"), None, "a path the pattern does not match");
    }

    #[test]
    fn a_grant_names_the_agent_in_any_case_and_everything_else_exactly() {
        let caps = Captures::from_pairs(&[("tenant", "acme"), ("agent", "box1")]);
        let t = "api:{tenant}:{agent}";
        assert!(is_rendering(t, &caps, "agent", "api:acme:box1"));
        assert!(is_rendering(t, &caps, "agent", "api:acme:BOX1"), "the agent in any case");
        assert!(!is_rendering(t, &caps, "agent", "api:ACME:box1"), "another capture exactly");
        assert!(!is_rendering(t, &caps, "agent", "API:acme:box1"), "the literal exactly");
        assert!(!is_rendering(t, &caps, "agent", "api:acme:box1x"));
        assert!(!is_rendering(t, &caps, "agent", "api:acme:box"));
        let upper = Captures::from_pairs(&[("tenant", "ACME"), ("agent", "box1")]);
        assert!(!is_rendering(t, &upper, "agent", "api:acme:box1"), "a path's ACME is not a grant's acme");
    }

    #[test]
    fn templates_render_captures() {
        let caps = Captures::from_pairs(&[("agent", "a1")]);
        let b: BackendTemplate = "{agent}.agents.internal:7681".parse().expect("template");
        assert_eq!(b.render(&caps).as_deref(), Some("a1.agents.internal:7681"));
        let dotted = Captures::from_pairs(&[("agent", "a1.evil.example")]);
        assert_eq!(b.render(&dotted), None, "a dotted capture cannot pick another domain");
        assert_eq!(render_path("/shell/{agent}", &caps), "/shell/a1");
        assert!("nohost".parse::<BackendTemplate>().is_err());
        for only in ["{agent}:7681", "{agent}{n}:7681", "{agent}.{n}:7681", "{agent}-{n}:7681"] {
            assert!(only.parse::<BackendTemplate>().expect("template").host_is_only_captures(), "{only}");
        }
        assert!(!"[::1]:7681".parse::<BackendTemplate>().expect("template").host_is_only_captures());
        let local = Captures::from_pairs(&[("agent", "local")]);
        assert_eq!("{agent}host:7681".parse::<BackendTemplate>().expect("template").render(&local), None);
        let octet = Captures::from_pairs(&[("agent", "5")]);
        let subnet = "10.0.0.{agent}:7681".parse::<BackendTemplate>().expect("template");
        assert_eq!(subnet.render(&octet).as_deref(), Some("10.0.0.5:7681"), "the operator's own network");
        let v6 = "[fd00::{agent}]:7681".parse::<BackendTemplate>().expect("template");
        assert_eq!(v6.render(&octet).as_deref(), Some("[fd00::5]:7681"), "an IPv6 network of the operator's");
        for literal in ["{agent}.agents.internal:7681", "agent-{agent}:7681", "10.0.0.{agent}:7681"] {
            assert!(!literal.parse::<BackendTemplate>().expect("template").host_is_only_captures(), "{literal}");
        }
    }
}
