//! A route's pool of backend members: where the members come from (static, or the registry),
//! which of them are healthy (passive ejection, active checks), and in which order one session
//! tries them (the balance policy, with sticky keys). The connect stage only dials what this
//! hands it and reports back how each attempt went.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};

use http::{header, HeaderMap};

use super::health::PassiveHealth;
use super::resolver::{RegistryResolver, ResolveError, Resolved};
use super::sticky::{rank, ConnCounts, Member, RoundRobin};
use crate::auth::Claims;
use crate::config::{render_url, BackendSettings, Captures, Policy, RouteConfig, StickyKey};

/// Why a route has no member to offer a session.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A capture cannot be used in a templated member host (400).
    #[error("path capture not usable in a backend host name")]
    InvalidMember,
    /// The registry does not know the agent (404).
    #[error("the registry does not know this agent")]
    UnknownAgent,
    /// The registry cannot be reached and nothing usable is cached (503).
    #[error("registry: {0}")]
    Registry(ResolveError),
    /// Every member is ejected (or the registry listed none) and `fail_open` is off (503).
    #[error("no healthy backend member")]
    NoHealthyMember,
}

/// An active health check of one member: `Some(true)` when it is healthy, `None` when the check
/// could not be made (the proxy out of descriptors or ports: nothing is learned of the member). Given the member address,
/// the route's `active_path` (a TCP connect only when `None`) and its backend timeouts. The
/// connect stage provides it, so that routing never reaches up into the stages.
pub type Probe = Arc<
    dyn Fn(String, Option<String>, BackendSettings) -> Pin<Box<dyn Future<Output = Option<bool>> + Send>> + Send + Sync,
>;

/// Per-route routing state that lives as long as the configuration: the registry resolver
/// (with its cache), passive health, and the round-robin cursor.
pub struct RouteState {
    /// Registry resolver, for routes with `[routes.registry]`.
    pub resolver: Option<Arc<RegistryResolver>>,
    /// Members ejected after failed connects (and failed active checks).
    pub health: Arc<PassiveHealth>,
    /// Round-robin cursor.
    round_robin: RoundRobin,
}

impl RouteState {
    /// Whether state built for `old` can serve `new` unchanged: same members, registry and
    /// health settings, and (when active checks run, since they hold them) the same backend
    /// timeouts. A reload keeps such state (registry cache with its stale copies, ejections,
    /// cursors) instead of starting cold.
    pub fn reusable(old: &RouteConfig, new: &RouteConfig) -> bool {
        let checks_unchanged = new.health.active_interval.is_zero() || old.backend == new.backend;
        old.backends == new.backends && old.registry == new.registry && old.health == new.health && checks_unchanged
    }

    /// State for `route`; its active checks (when configured) run `probe` until the state is
    /// dropped.
    pub fn new(route: &RouteConfig, probe: &Probe) -> RouteState {
        let resolver = route.registry.clone().map(RegistryResolver::new);
        let health = Arc::new(PassiveHealth::new(route.health.eject_base, route.health.eject_max));
        if !route.health.active_interval.is_zero() && !route.backends.is_empty() {
            spawn_active_checks(route, Arc::downgrade(&health), probe.clone());
        }
        RouteState { resolver, health, round_robin: RoundRobin::new() }
    }

    /// Static members of `route` that are ejected now.
    pub fn ejected(&self, route: &RouteConfig) -> Vec<String> {
        static_members(route).into_iter().filter(|addr| self.health.is_ejected(addr)).collect()
    }

    /// The members one session tries, in order: the route's members for these captures
    /// (static, or from the registry), weight 0 left out, the healthy ones for `requester` (or,
    /// when there are none, all of them with `fail_open` and the last resort without it; see
    /// [`PassiveHealth::healthy_for`] and [`PassiveHealth::last_resort`]) ordered by the
    /// balance policy, at most `max_attempts`.
    pub async fn candidates(
        &self,
        route: &RouteConfig,
        caps: &Captures,
        sticky_key: Option<&[u8]>,
        conns: &ConnCounts,
        requester: Option<u64>,
    ) -> Result<Vec<Member>, PoolError> {
        let mut members = self.members(route, caps).await?;
        // Weight 0 takes a member out of rotation under every policy (a drain knob), fail_open
        // included: a pool whose members are all drained has no member to offer.
        members.retain(|m| m.weight > 0);
        if members.is_empty() {
            return Err(PoolError::NoHealthyMember);
        }
        let healthy = self.health.healthy_for(&members, requester);
        let candidates: Vec<Member> = match (healthy.is_empty(), route.health.fail_open) {
            (false, _) => healthy.into_iter().cloned().collect(),
            (true, true) => members,
            // None usable: those out for failed handshakes are still tried (one that let a
            // handshake time out by one caller at a time).
            (true, false) => match self.health.last_resort(&members, route.backend.handshake_timeout, requester) {
                last if last.is_empty() => return Err(PoolError::NoHealthyMember),
                last => last.into_iter().cloned().collect(),
            },
        };
        let mut order = self.order(route, candidates, sticky_key, conns);
        if route.balance.max_attempts > 0 {
            order.truncate(route.balance.max_attempts);
        }
        Ok(order)
    }

    /// The route's members for these captures.
    async fn members(&self, route: &RouteConfig, caps: &Captures) -> Result<Vec<Member>, PoolError> {
        if let (Some(resolver), Some(g)) = (&self.resolver, &route.registry) {
            // A capture in the registry's host with a `.` would pick another domain.
            let Some(url) = render_url(&g.url, caps) else { return Err(PoolError::InvalidMember) };
            // Boxed: rare and large; inline, it would size every request handler's future (see
            // `handle_upgrade`).
            return match Box::pin(resolver.resolve(&url)).await {
                Ok(r) => match r.as_ref() {
                    Resolved::Members(m) if m.is_empty() => Err(PoolError::NoHealthyMember),
                    Resolved::Members(m) => Ok(m.clone()),
                    Resolved::NotFound => Err(PoolError::UnknownAgent),
                },
                Err(e) => Err(PoolError::Registry(e)),
            };
        }
        route
            .backends
            .iter()
            .map(|m| {
                m.template.render(caps).map(|addr| Member { addr, weight: m.weight }).ok_or(PoolError::InvalidMember)
            })
            .collect()
    }

    /// Orders candidates by the balance policy: the first is tried first, the rest are fallbacks.
    fn order(
        &self,
        route: &RouteConfig,
        candidates: Vec<Member>,
        sticky_key: Option<&[u8]>,
        conns: &ConnCounts,
    ) -> Vec<Member> {
        match (route.balance.policy, sticky_key) {
            (Policy::Sticky, Some(key)) => rank(key, &candidates).into_iter().cloned().collect(),
            (Policy::LeastConnections, _) => conns.by_load(&candidates).into_iter().cloned().collect(),
            // Sticky without a key (absent from the request) falls back to round robin.
            (Policy::RoundRobin | Policy::Sticky, _) => {
                let first = self.round_robin.next(candidates.len());
                let mut v = candidates;
                v.rotate_left(first);
                v
            }
            (Policy::Ordered, _) => candidates,
        }
    }
}

/// Addresses of the route's static members that need no capture (the ones that can be checked
/// and listed without a request).
fn static_members(route: &RouteConfig) -> Vec<String> {
    route.backends.iter().filter(|m| m.template.captures().next().is_none()).map(|m| m.template.to_string()).collect()
}

/// Checks every static (untemplated) member each `active_interval` with `probe`. Failures eject
/// like failed sessions do; a success readmits. Stops when the route's state is dropped (after
/// a reload).
fn spawn_active_checks(route: &RouteConfig, health: Weak<PassiveHealth>, probe: Probe) {
    let members = static_members(route);
    let (interval, path, mut settings) =
        (route.health.active_interval, route.health.active_path.clone(), route.backend.clone());
    // A check leaves from the addresses the route's connections leave from: the source
    // addresses are the WebSocket connect's, and plain requests use the kernel's choice.
    if !route.kind.websocket() {
        settings.source_addresses = Arc::from([]);
    }
    let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
    handle.spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for addr in &members {
                let ok = probe(addr.clone(), path.clone(), settings.clone()).await;
                let Some(h) = health.upgrade() else { return };
                match ok {
                    Some(true) => h.record_success(addr),
                    Some(false) => {
                        tracing::debug!(member = %addr, "active health check failed");
                        h.record_failure(addr);
                    }
                    // The proxy could not open the check's connection: it says nothing of the member.
                    None => {
                        tracing::debug!(member = %addr, "active health check not made: out of descriptors or ports")
                    }
                }
            }
        }
    });
}

/// The sticky key for a request, read from where the route says.
pub fn sticky_key(
    key: &StickyKey,
    headers: &HeaderMap,
    path_and_query: &str,
    caps: &Captures,
    claims: Option<&Claims>,
) -> Option<Vec<u8>> {
    let found: Option<Vec<u8>> = match key {
        StickyKey::Claim(name) => claims.and_then(|c| c.get(name)).map(|v| match v {
            serde_json::Value::String(s) => s.as_bytes().to_vec(),
            other => other.to_string().into_bytes(),
        }),
        StickyKey::Header(name) => headers.get(name.as_str()).map(|v| v.as_bytes().to_vec()),
        StickyKey::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(';'))
            .find_map(|kv| kv.trim().split_once('=').filter(|(k, _)| k == name).map(|(_, v)| v.as_bytes().to_vec())),
        StickyKey::Query(name) => path_and_query.split_once('?').and_then(|(_, q)| {
            form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == name.as_str()).map(|(_, v)| v.as_bytes().to_vec())
        }),
        StickyKey::Capture(name) => caps.get(name).map(|v| v.as_bytes().to_vec()),
    };
    found.filter(|k| !k.is_empty())
}
