//! The routing table: host and path matching over the routes of the running configuration.
//!
//! The most specific route wins: exact host over wildcard host over any host, then more literal
//! segments. Captured values are validated here (see [`crate::config::valid_capture`]) before
//! anything else sees them.

use std::sync::Arc;

use crate::config::{valid_capture, valid_rest, Captures, RouteConfig};

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

impl RouteTable {
    /// Builds the table from configured routes.
    pub fn new(routes: &[RouteConfig]) -> Self {
        let mut routes: Vec<Arc<RouteConfig>> = routes.iter().cloned().map(Arc::new).collect();
        routes.sort_by_key(|r| std::cmp::Reverse(specificity(r)));
        RouteTable { routes }
    }

    /// Finds the route for `host` (without port, any case) and `path`; see
    /// [`RouteTable::find_canonical`].
    pub fn find(&self, host: Option<&str>, path: &str) -> Result<(Arc<RouteConfig>, Captures), RouteError> {
        self.find_canonical(host, path).map(|(route, caps, _)| (route, caps))
    }

    /// Finds the route for `host` (without port, any case) and `path` in its canonical form:
    /// an agent id is a host name's label for DNS, one case for grants, routing, stickiness and
    /// revocation alike, so a matched `{agent}` segment with an upper-case letter is lowercased
    /// and the path matched again. An agent id's case then cannot pick another route than the
    /// one its own spelling gets (a literal route for one agent, with a stricter policy, over a
    /// route that captures every agent). Also returns the canonical path when it differs from
    /// `path`, for the request to go on with.
    pub fn find_canonical(
        &self,
        host: Option<&str>,
        path: &str,
    ) -> Result<(Arc<RouteConfig>, Captures, Option<String>), RouteError> {
        // Copied only when it has an upper-case letter to fold (it seldom has).
        let host = host.map(|h| match h.bytes().any(|b| b.is_ascii_uppercase()) {
            true => std::borrow::Cow::Owned(h.to_ascii_lowercase()),
            false => std::borrow::Cow::Borrowed(h),
        });
        let mut canonical: Option<String> = None;
        loop {
            let current = canonical.as_deref().unwrap_or(path);
            let (route, caps, folded) = self.find_as_spelled(host.as_deref(), current)?;
            // Each turn lowercases one more segment, so this ends within the path's segments.
            let Some(span) = folded.then(|| route.path.capture_span(current, "agent")).flatten() else {
                return Ok((route, caps, canonical));
            };
            let mut next = current.to_owned();
            if let Some(agent) = next.get_mut(span) {
                agent.make_ascii_lowercase();
            }
            canonical = Some(next);
        }
    }

    /// The first route matching `path` as it is spelled, its validated captures (`{agent}`
    /// lowercased), and whether the `{agent}` segment had an upper-case letter.
    fn find_as_spelled(
        &self,
        host: Option<&str>,
        path: &str,
    ) -> Result<(Arc<RouteConfig>, Captures, bool), RouteError> {
        for route in &self.routes {
            if !host_matches(route.host.as_deref(), host) {
                continue;
            }
            if let Some(raw) = route.path.match_segments(path) {
                let mut caps = Vec::with_capacity(raw.len());
                let mut folded = false;
                for (name, value) in raw {
                    let valid = if route.path.is_rest(name) { valid_rest(value) } else { valid_capture(value) };
                    if !valid {
                        return Err(RouteError::InvalidCapture(name.to_owned()));
                    }
                    match name {
                        "agent" => {
                            folded = value.bytes().any(|b| b.is_ascii_uppercase());
                            caps.push((name.to_owned(), value.to_ascii_lowercase()));
                        }
                        _ => caps.push((name.to_owned(), value.to_owned())),
                    }
                }
                return Ok((route.clone(), Captures(caps), folded));
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
    (host, r.path.literal_count(), r.path.segment_count())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteConfig;
    use crate::config::{BackendSettings, SessionSettings};

    fn route(name: &str, host: Option<&str>, path: &str) -> RouteConfig {
        RouteConfig {
            recording: None,
            observe: None,
            resume: None,
            fanout: None,
            affinity: None,
            resource: None,
            mcp: None,
            name: name.into(),
            host: host.map(Into::into),
            path: path.parse().expect("pattern"),
            kind: crate::config::RouteKind::WebSocket,
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
            headers_with_underscores: Default::default(),
            cors: None,
            sandbox: false,
            session: std::sync::Arc::new(SessionSettings::default()),
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

    /// Found by an attacker review: `/agents/PROD-DB/terminal` matched the route that captures
    /// every agent (its `{agent}` lowercased to `prod-db`) instead of `prod-db`'s own literal
    /// route, and so escaped that route's stricter policy.
    #[test]
    fn an_agent_ids_case_cannot_pick_another_route_than_its_own() {
        let t = RouteTable::new(&[
            route("any", None, "/agents/{agent}/terminal"),
            route("prod", None, "/agents/prod-db/terminal"),
            route("deep", None, "/agents/prod-db/{agent}"),
            route("two", None, "/agents/{agent}/{tab}"),
        ]);
        for spelled in ["/agents/PROD-DB/terminal", "/agents/Prod-Db/terminal", "/agents/prod-db/terminal"] {
            let (r, _, canonical) = t.find_canonical(None, spelled).expect("match");
            assert_eq!(r.name, "prod", "{spelled}");
            let changed = (spelled != "/agents/prod-db/terminal").then(|| "/agents/prod-db/terminal".to_owned());
            assert_eq!(canonical, changed, "{spelled}");
        }
        // Two turns: the first lowercases the segment `two` captures, the second the one `deep` does.
        let (r, caps, canonical) = t.find_canonical(None, "/agents/PROD-DB/X1").expect("match");
        assert_eq!((r.name.as_str(), caps.get("agent")), ("deep", Some("x1")));
        assert_eq!(canonical.as_deref(), Some("/agents/prod-db/x1"));
        let (r, caps, canonical) = t.find_canonical(None, "/agents/Other/terminal").expect("match");
        assert_eq!(
            (r.name.as_str(), caps.get("agent"), canonical.as_deref()),
            ("any", Some("other"), Some("/agents/other/terminal"))
        );
    }
}
