//! The admin listener: `/metrics` (Prometheus text), `/live`, `/ready` (503 once draining), and
//! the operator API: `GET /sessions`, `DELETE /sessions/{id}`, `POST /sessions/revoke` with
//! `{"subject": ...}`, `{"agent": ...}` or `{"jti": ...}` (a subject or jti optionally with
//! `"issuer"`), `POST /sessions/rebalance`, `GET /routes`, `POST /routes/cache/purge`,
//! `GET /recordings`, `GET /recordings/{name}`, `GET /limits` and `GET /fleet` (the state
//! store: which, whether it answers, how stale this instance's view of the locks may be). With
//! the fleet on Redis, `GET /sessions?scope=fleet` lists every instance's sessions,
//! `DELETE /sessions/{instance}/{id}` reaches a session on any of them, and
//! `POST /sessions/rebalance` with `"scope": "fleet"` rebalances the route on all. Revoked sessions close with
//! 1008 "session revoked", and a revoked subject or token is refused on reconnect until it
//! expires.
//!
//! Bound to loopback by default; the operator API (everything but `/metrics`, `/live` and
//! `/ready`) can require a bearer token (`[admin] token_env` / `token_file`), and must when the
//! listener leaves loopback. Every request first passes [`refusal`]: a known `Host`, no
//! cross-origin caller, JSON bodies only.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::config::defaults;
use crate::fleet::{Lock, Target};
use crate::session::{Selector, StopReason};
use crate::state::Shared;

/// How long one admin connection may stay open, however it is used.
const ADMIN_CONNECTION_MAX_AGE: Duration = Duration::from_secs(30);

/// Serves admin requests until `stop` is cancelled: at most `[admin] max_connections` at once,
/// each request head read within the server's `header_read_timeout`, each connection closed
/// after [`ADMIN_CONNECTION_MAX_AGE`].
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    let (cap, per_ip) = shared
        .runtime
        .load()
        .config
        .admin
        .as_ref()
        .map_or((defaults::ADMIN_MAX_CONNECTIONS, defaults::ADMIN_MAX_CONNECTIONS_PER_IP), |a| {
            (a.max_connections, a.max_connections_per_ip)
        });
    let slots = Arc::new(Semaphore::new(cap));
    // One address takes at most its share: silent connections from one place cannot hold
    // every slot for a header_read_timeout each, and keep the probes and the scraper out.
    let per_address = Arc::new(crate::limits::PerIp::default());
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // An IPv6 client is counted by its network (`[server] ipv6_prefix_len`), as on the
        // proxy listeners: one host commonly holds a whole /64.
        let prefix = shared.runtime.load().config.server.ipv6_prefix_len;
        let key = crate::limits::ip_key(peer.ip(), prefix);
        let Ok(address_slot) = per_address.try_acquire(key, u32::try_from(per_ip).unwrap_or(u32::MAX)) else {
            crate::metrics::admin_refused("per_ip");
            tracing::info!(client = %peer.ip(), max_connections_per_ip = per_ip, "admin connection refused: its address is at its cap");
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            crate::metrics::admin_refused("connections");
            tracing::info!(max_connections = cap, "admin connection refused: at its connection cap");
            continue;
        };
        let Ok(local) = tcp.local_addr() else { continue };
        let shared = shared.clone();
        let stop = stop.clone();
        let header_timeout = shared.runtime.load().config.server.header_read_timeout;
        tokio::spawn(async move {
            let _slots = (slot, address_slot);
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move {
                    Ok::<_, Infallible>(match refusal(&shared, &req, local) {
                        None => route(&shared, req).await,
                        Some(refused) => refused.map(Either::Left),
                    })
                }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(tcp), svc);
            // A client that never reads its answers would hold its slot for ever: every
            // connection ends after a bounded age (scrapers and tools reconnect).
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(ADMIN_CONNECTION_MAX_AGE) => {}
            }
        });
    }
}

/// Why a request is refused, or `None` when it may be served. The admin API is for operators'
/// tools, not browsers (`docs/security.md`, "No browser can drive the admin API"): a request is
/// served only when its `Host` is a name this listener is known by (loopback names and addresses,
/// the address the connection reached, `[admin] hosts`) or, on HTTP/1.0, it names none, so a
/// DNS-rebound page cannot read it; it carries no `Origin` and no cross-site `Sec-Fetch-Site`
/// unless its origin is in `[admin] allow_origins`; and a POST body is `application/json`, which no
/// form or `text/plain` fetch can send without a CORS preflight this listener never grants.
fn refusal(shared: &Shared, req: &Request<Incoming>, local: SocketAddr) -> Option<Response<Full<Bytes>>> {
    let runtime = shared.runtime.load();
    let admin = runtime.config.admin.as_ref();
    let refuse = |status: StatusCode, reason: &'static str, body: &'static str| {
        crate::metrics::admin_refused(reason);
        tracing::info!(reason, method = %req.method(), path = req.uri().path(), "admin request refused");
        Some(text(status, body))
    };
    let known = match crate::proxy::host::of_request(req.version(), req.uri(), req.headers()) {
        Ok(None) => true,
        Ok(Some(a)) => {
            let host = a.host();
            host == "localhost"
                || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback() || ip == local.ip())
                || admin.is_some_and(|c| c.hosts.iter().any(|h| h == host))
        }
        Err(_) => false,
    };
    if !known {
        return refuse(StatusCode::MISDIRECTED_REQUEST, "host", "this admin listener does not answer to that Host\n");
    }
    let allowed_origin = |o: &str| admin.is_some_and(|c| c.allow_origins.iter().any(|a| a.eq_ignore_ascii_case(o)));
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        if !origin.to_str().is_ok_and(allowed_origin) {
            return refuse(StatusCode::FORBIDDEN, "origin", "cross-origin requests to the admin API are refused\n");
        }
    } else if let Some(site) = req.headers().get("sec-fetch-site") {
        if !matches!(site.as_bytes(), b"none" | b"same-origin") {
            return refuse(StatusCode::FORBIDDEN, "origin", "cross-site requests to the admin API are refused\n");
        }
    }
    if req.method() == Method::POST {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "content_type",
                "POST bodies must be application/json\n",
            );
        }
    }
    None
}

/// Largest `top` of `GET /limits`.
const MAX_TOP: usize = 1_000;

/// `GET /limits?top=N`: the client addresses holding the most connections and the subjects
/// holding the most sessions now (at most N each, default 10, at most 1000), with the caps in
/// force; never the whole tables. (A subject's route is `null` for its count over all routes.)
fn limits(shared: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let top = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("top=")))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(10)
        .min(MAX_TOP);
    let server = &shared.runtime.load().config.server;
    let per_ip: Vec<Value> = shared
        .per_ip
        .top(top)
        .into_iter()
        .map(|(addr, n)| json!({ "addr": addr.to_string(), "connections": n }))
        .collect();
    let per_subject: Vec<Value> = shared
        .per_subject
        .top(top)
        .into_iter()
        .map(|(k, n)| json!({ "subject": k.subject, "issuer": k.issuer, "route": k.route, "sessions": n }))
        .collect();
    json_response(
        StatusCode::OK,
        &json!({
            // In force: held to the descriptor budget's share per address.
            "max_connections_per_ip": shared.per_ip.cap(server.max_connections_per_ip),
            "ipv6_prefix_len": server.ipv6_prefix_len,
            "max_sessions_per_subject": shared.per_subject.cap(shared.runtime.load().config.auth.max_sessions_per_subject),
            "per_ip": per_ip,
            "per_subject": per_subject,
        }),
    )
}

/// An admin answer's body: whole, or a recording's file read as it is sent (one may be up to
/// `max_file_size`, and several may be fetched at once: none is held in memory whole).
type AdminBody = Either<Full<Bytes>, http_body_util::StreamBody<RecordingFrames>>;

/// A recording file's frames, read as they are sent.
type RecordingFrames = futures_util::stream::MapOk<
    tokio_util::io::ReaderStream<tokio::io::Take<tokio::fs::File>>,
    fn(Bytes) -> hyper::body::Frame<Bytes>,
>;

/// Whether `path` is behind the admin token: everything but the probes' and the scraper's, so
/// a path added later is guarded without being listed.
fn guarded(path: &str) -> bool {
    !matches!(path, "/metrics" | "/live" | "/ready")
}

/// The one answer to a guarded path without the token (RFC 9110 §11.6.1: a 401 names its scheme).
fn unauthorized() -> Response<Full<Bytes>> {
    let mut r = text(StatusCode::UNAUTHORIZED, "admin token required\n");
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"portcullis-admin\""));
    r
}

async fn route(shared: &Shared, req: Request<Incoming>) -> Response<AdminBody> {
    let path = req.uri().path().to_owned();
    if guarded(&path) && !authorized(shared, &req) {
        return unauthorized().map(Either::Left);
    }
    if path == "/recordings" || path.starts_with("/recordings/") {
        if req.method() != Method::GET {
            return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n").map(Either::Left);
        }
        return recordings(shared, &path).await;
    }
    answer(shared, req, &path).await.map(Either::Left)
}

/// Every admin answer but a recording's file.
async fn answer(shared: &Shared, req: Request<Incoming>, path: &str) -> Response<Full<Bytes>> {
    let path = path.to_owned();
    if path == "/routes" || path.starts_with("/routes/") {
        return routes(shared, req, &path).await;
    }
    if (path == "/limits" || path == "/fleet") && req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    if path == "/limits" {
        return limits(shared, &req);
    }
    if path == "/fleet" {
        let fleet = &shared.fleet;
        let health = fleet.health();
        let (policy, max_staleness) = health.policy();
        return json_response(
            StatusCode::OK,
            &json!({
                "instance": fleet.instance(),
                "store": fleet.store_name(),
                "peer": fleet.advertised(),
                "instances": fleet.others().len() + 1,
                "reachable": health.reachable(),
                "staleness_ms": health.staleness().as_millis() as u64,
                "policy": match policy {
                    crate::config::Staleness::BestEffort => "best_effort",
                    crate::config::Staleness::Strict => "strict",
                },
                "max_staleness_ms": max_staleness.as_millis() as u64,
            }),
        );
    }
    if path == "/sessions" || path.starts_with("/sessions/") {
        return sessions(shared, req, &path).await;
    }
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match path.as_str() {
        "/metrics" => {
            let runtime = shared.runtime.load();
            for route in &runtime.config.routes {
                if let Some(state) = runtime.route_state.get(&route.name) {
                    if route.registry.is_none() {
                        let healthy = route.backends.len().saturating_sub(state.ejected(route).len());
                        crate::metrics::member_healthy(&route.name, healthy);
                    }
                }
            }
            shared.metrics.relay_buffer_bytes.set(crate::proxy::relay::pool::lent_bytes() as f64);
            crate::metrics::worker_threads(
                shared
                    .workers
                    .get()
                    .copied()
                    .unwrap_or_else(|| tokio::runtime::Handle::current().metrics().num_workers()),
            );
            let (held, limit) = crate::limits::outbound_descriptors();
            crate::metrics::outbound_descriptors(held, limit);
            let (held, limit) = crate::limits::pooled_connections();
            crate::metrics::pooled_connections(held, limit);
            if let Some(a) = &runtime.authenticator {
                crate::metrics::token_cache_entries(a.cached_tokens());
            }
            let mut r = Response::new(Full::new(Bytes::from(shared.metrics.render())));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
            r
        }
        "/live" => text(StatusCode::OK, "ok\n"),
        "/ready" if shared.sessions.draining() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/ready" => text(StatusCode::OK, "ready\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Whether the request carries the admin token (when one is configured).
fn authorized(shared: &Shared, req: &Request<Incoming>) -> bool {
    let runtime = shared.runtime.load();
    let Some(expected) = runtime.config.admin.as_ref().and_then(|a| a.token.as_ref()) else { return true };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    bool::from(given.as_bytes().ct_eq(expected.expose()))
}

/// `GET /sessions`, `DELETE /sessions/{id}`, `POST /sessions/revoke`, `POST /sessions/rebalance`.
async fn sessions(shared: &Shared, req: Request<Incoming>, path: &str) -> Response<Full<Bytes>> {
    match (req.method().clone(), path) {
        (Method::GET, "/sessions") => {
            let fleet_scope = req.uri().query().is_some_and(|q| q.split('&').any(|kv| kv == "scope=fleet"));
            let now = SystemTime::now();
            let list: Vec<Value> = shared
                .sessions
                .list()
                .iter()
                .map(|e| {
                    let mut entry = json!({
                        "id": e.id,
                        "route": e.route,
                        "agent": e.agent,
                        "subject": e.subject,
                        "issuer": e.issuer,
                        "client": e.client.to_string(),
                        "http": e.http,
                        // Every feature's key is there (null when not attached).
                        "observers": null,
                        "resume": null,
                        "kind": e.kind.get().as_str(),
                        "backend": e.backend.get(),
                        "age_seconds": now.duration_since(e.started).map(|d| d.as_secs_f64()).unwrap_or(0.0),
                        "token_expires_at": e.token_exp,
                        "bytes_from_client": e.control.bytes.from_client.load(Ordering::Relaxed),
                        "bytes_from_backend": e.control.bytes.from_backend.load(Ordering::Relaxed),
                    });
                    for a in &e.attached {
                        let (key, value) = a.shown();
                        entry[key] = value;
                    }
                    if fleet_scope {
                        entry["instance"] = shared.fleet.instance().into();
                    }
                    entry
                })
                .collect();
            let mut list = list;
            if fleet_scope {
                let now_ms = crate::fleet::now_ms();
                list.extend(shared.fleet.others_sessions().into_iter().map(|e| {
                    json!({
                        "instance": e.instance,
                        "id": e.id,
                        "kind": e.kind,
                        "route": e.route,
                        "agent": e.agent,
                        "subject": e.subject,
                        "issuer": e.issuer,
                        "client": e.client,
                        "age_seconds": Duration::from_millis(now_ms.saturating_sub(e.started_ms)).as_secs_f64(),
                    })
                }));
            }
            json_response(StatusCode::OK, &json!({ "sessions": list }))
        }
        (Method::POST, "/sessions/revoke") => {
            let ask: RevokeRequest = match json_body(req, "expected JSON with one of subject, agent, jti\n").await {
                Ok(a) => a,
                Err(r) => return r,
            };
            if ask.issuer.is_some() && ask.subject.is_none() && ask.jti.is_none() {
                return text(StatusCode::BAD_REQUEST, "issuer narrows a subject or jti revocation: give one too\n");
            }
            let selector = match (ask.subject, ask.agent, ask.jti) {
                (Some(subject), None, None) => Selector::Subject { subject, issuer: ask.issuer },
                (None, Some(a), None) => Selector::Agent(a.to_ascii_lowercase()),
                (None, None, Some(jti)) => Selector::Jti { jti, issuer: ask.issuer },
                _ => return text(StatusCode::BAD_REQUEST, "give exactly one of subject, agent, jti\n"),
            };
            revoke(shared, &selector).await
        }
        (Method::POST, "/sessions/rebalance") => {
            let ask: RebalanceRequest = match json_body(req, "expected JSON with route, fraction and spread\n").await {
                Ok(a) => a,
                Err(r) => return r,
            };
            let fleet_scope = ask.scope.as_deref() == Some("fleet");
            if ask.scope.as_deref().is_some_and(|s| s != "fleet" && s != "instance") {
                return text(StatusCode::BAD_REQUEST, "scope is \"instance\" (the default) or \"fleet\"\n");
            }
            let (route, fraction) = (ask.route.clone(), ask.fraction);
            match rebalance(shared, ask) {
                Ok(mut answer) if fleet_scope => {
                    let spread_ms =
                        answer["spread_seconds"].as_f64().map_or(0, |s| Duration::from_secs_f64(s).as_millis() as u64);
                    let by = shared.fleet.instance().to_owned();
                    let event = crate::fleet::Event::Rebalance { route, fraction, spread_ms, by };
                    let sent = shared.fleet.command(&event).await;
                    answer["instances"] = json!(shared.fleet.others().len() + 1);
                    match sent {
                        Ok(()) => json_response(StatusCode::OK, &answer),
                        Err(e) => {
                            tracing::warn!(error = %e, "fleet rebalance not sent to the other instances");
                            answer["error"] =
                                "rebalanced on this instance only: the fleet store did not take the command".into();
                            json_response(StatusCode::SERVICE_UNAVAILABLE, &answer)
                        }
                    }
                }
                Ok(answer) => json_response(StatusCode::OK, &answer),
                Err(why) => text(StatusCode::BAD_REQUEST, why),
            }
        }
        (Method::DELETE, p) if p.strip_prefix("/sessions/").is_some_and(|rest| rest.contains('/')) => {
            // `/sessions/{instance}/{id}`: a session of any instance of the fleet.
            let rest = &p["/sessions/".len()..];
            let Some((instance, id)) = rest.rsplit_once('/').and_then(|(i, id)| Some((i, id.parse::<u64>().ok()?)))
            else {
                return text(StatusCode::NOT_FOUND, "not found\n");
            };
            if instance == shared.fleet.instance() {
                if shared.sessions.get(id).is_none() {
                    return text(StatusCode::NOT_FOUND, "no such session\n");
                }
                return match revoke(shared, &Selector::Id(id)).await {
                    r if r.status() != StatusCode::OK => r,
                    _ => no_content(),
                };
            }
            if !shared.fleet.holds_elsewhere(instance, id) {
                return text(StatusCode::NOT_FOUND, "no such session in the fleet's directory\n");
            }
            let event =
                crate::fleet::Event::Kill { to: instance.to_owned(), id, by: shared.fleet.instance().to_owned() };
            match shared.fleet.command(&event).await {
                // The owner cuts it when the store brings it the command (within a second).
                Ok(()) => json_response(StatusCode::ACCEPTED, &json!({ "instance": instance, "id": id })),
                Err(e) => {
                    tracing::warn!(error = %e, "session kill not sent to its instance");
                    text(StatusCode::SERVICE_UNAVAILABLE, "the fleet store did not take the command; retry\n")
                }
            }
        }
        (Method::DELETE, p) => match p.strip_prefix("/sessions/").and_then(|id| id.parse::<u64>().ok()) {
            Some(id) if shared.sessions.get(id).is_none() => text(StatusCode::NOT_FOUND, "no such session\n"),
            Some(id) => match revoke(shared, &Selector::Id(id)).await {
                r if r.status() != StatusCode::OK => r,
                _ => no_content(),
            },
            None => text(StatusCode::NOT_FOUND, "not found\n"),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `GET /routes` (routes, members, health, cache stats), `POST /routes/cache/purge` of the
/// registry routes' caches with no body or `{}` (everything), `{"route": ...}`, `{"agent": ...}`
/// or both.
async fn routes(shared: &Shared, req: Request<Incoming>, path: &str) -> Response<Full<Bytes>> {
    let runtime = shared.runtime.load_full();
    match (req.method().clone(), path) {
        (Method::GET, "/routes") => {
            let list: Vec<Value> = runtime
                .config
                .routes
                .iter()
                .map(|r| {
                    let state = runtime.route_state.get(&r.name);
                    let cache = state.and_then(|s| s.resolver.as_ref()).map(|res| {
                        let st = res.stats();
                        json!({ "entries": st.entries, "stale_entries": st.stale_entries, "registry_requests": st.requests })
                    });
                    json!({
                        "name": r.name,
                        "host": r.host,
                        "path": r.path.to_string(),
                        "members": r.backends.iter().map(|m| json!({"addr": m.template.to_string(), "weight": m.weight})).collect::<Vec<_>>(),
                        "registry": r.registry.as_ref().map(|g| g.url.clone()),
                        "policy": format!("{:?}", r.balance.policy),
                        "ejected": state.map(|s| s.ejected(r)).unwrap_or_default(),
                        "cache": cache,
                        "auth": r.auth.is_some(),
                    })
                })
                .collect();
            json_response(StatusCode::OK, &json!({ "routes": list }))
        }
        (Method::POST, "/routes/cache/purge") => {
            let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return text(StatusCode::BAD_REQUEST, "body too large or unreadable\n"),
            };
            let ask: PurgeRequest = if body.is_empty() {
                PurgeRequest { route: None, agent: None }
            } else {
                match serde_json::from_slice(&body) {
                    Ok(a) => a,
                    Err(_) => return text(StatusCode::BAD_REQUEST, "expected JSON with optional route and agent\n"),
                }
            };
            let mut purged = 0;
            for r in &runtime.config.routes {
                if ask.route.as_ref().is_some_and(|n| n != &r.name) {
                    continue;
                }
                let (Some(g), Some(res)) =
                    (&r.registry, runtime.route_state.get(&r.name).and_then(|s| s.resolver.as_ref()))
                else {
                    continue;
                };
                match &ask.agent {
                    Some(agent) if crate::config::valid_capture(agent) => {
                        let caps = crate::config::Captures::from_pairs(&[("agent", agent.as_str())]);
                        res.purge(Some(&crate::config::render_path(&g.url, &caps))).await;
                    }
                    Some(_) => return text(StatusCode::BAD_REQUEST, "invalid agent id\n"),
                    None => res.purge(None).await,
                }
                purged += 1;
            }
            json_response(StatusCode::OK, &json!({ "purged_routes": purged }))
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PurgeRequest {
    route: Option<String>,
    agent: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    subject: Option<String>,
    issuer: Option<String>,
    agent: Option<String>,
    jti: Option<String>,
}

/// `POST /sessions/rebalance`: which sessions of a route to move, and over how long.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RebalanceRequest {
    route: String,
    /// `"fleet"`: every instance rebalances its own sessions of the route (default: this one).
    #[serde(default)]
    scope: Option<String>,
    /// Of the route's live sessions, more than 0 and at most 1.
    fraction: f64,
    /// The closes are spread evenly over this long (`"30s"`; default 0, all at once).
    #[serde(default)]
    spread: Option<String>,
}

/// The longest spread a rebalance may ask for.
const MAX_REBALANCE_SPREAD: Duration = Duration::from_secs(3600);

/// Picks `fraction` of the route's sessions at random and sends each 1001 "rebalance", spread
/// evenly over `spread` (the first at once): their clients reconnect and the route's balance
/// policy places them again, on the new members after a scale-out. Answers how many were
/// picked; the closes go on in the background.
fn rebalance(shared: &Shared, ask: RebalanceRequest) -> Result<Value, &'static str> {
    if !(ask.fraction > 0.0 && ask.fraction <= 1.0) {
        return Err("fraction must be more than 0 and at most 1\n");
    }
    let spread = match ask.spread.as_deref() {
        None => Duration::ZERO,
        Some(s) => humantime::parse_duration(s).map_err(|_| "spread must be a duration such as \"30s\"\n")?,
    };
    if spread > MAX_REBALANCE_SPREAD {
        return Err("spread must be at most 1h\n");
    }
    if !shared.runtime.load().config.routes.iter().any(|r| r.name == ask.route) {
        return Err("no such route\n");
    }
    Ok(rebalance_here(shared, &ask.route, ask.fraction, spread))
}

/// Rebalances this instance's sessions of `route` (checked to exist): for a request here, or
/// one another instance of the fleet sent.
pub(crate) fn rebalance_here(shared: &Shared, route: &str, fraction: f64, spread: Duration) -> Value {
    let (picked, total) = shared.sessions.sample_route(route, fraction);
    tracing::info!(route, picked = picked.len(), sessions = total, spread_ms = spread.as_millis() as u64, "rebalance");
    let count = picked.len();
    let metrics = shared.metrics.clone();
    let route = route.to_owned();
    let answer = json!({ "route": route, "sessions": total, "picked": count, "spread_seconds": spread.as_secs_f64() });
    tokio::spawn(async move {
        let step = if count > 1 { spread / (count as u32 - 1).max(1) } else { Duration::ZERO };
        let start = tokio::time::Instant::now();
        for (i, e) in picked.iter().enumerate() {
            tokio::time::sleep_until(start + step * i as u32).await;
            if e.control.stopped().is_none() {
                e.control.stop(StopReason::Rebalance);
                metrics.rebalance_close(&route);
            }
        }
    });
    answer
}

/// Closes matching sessions (1008 "session revoked") and refuses tokens on reconnect until they
/// expire, on every instance of the fleet: for a subject or token id, that subject's or id's
/// (one lock); for an agent, the sessions that reached it and the tokens they were opened with
/// (a lock each instance applies to its own); for a session id, that session and its tokens.
/// Applied here first, then written to the fleet store: the answer waits for the write, and is
/// 503 when the store did not take it (the sessions here are cut all the same).
async fn revoke(shared: &Shared, selector: &Selector) -> Response<Full<Bytes>> {
    let fleet = &shared.fleet;
    let now = crate::fleet::now_secs();
    let auth = &shared.runtime.load().config.auth;
    // Every lock holds `[auth] leeway` past the expiry of what it refuses, as tokens are
    // accepted that long past theirs: an instance that starts then still reads it.
    let leeway = auth.leeway.as_secs();
    let floor = now + auth.revocation_ttl.as_secs() + leeway;
    // A subject's or token's lock holds until the latest expiry of its tokens seen here, and at
    // least revocation_ttl (tokens of the subject not seen here may expire later).
    let latest_exp = shared.sessions.matching(selector).iter().filter_map(|e| e.token_exp).max();
    let target = match selector {
        Selector::Subject { subject, issuer } => {
            Some(Target::Subject { subject: subject.clone(), issuer: issuer.clone() })
        }
        Selector::Jti { jti, issuer } => Some(Target::Jti { jti: jti.clone(), issuer: issuer.clone() }),
        Selector::Agent(agent) => Some(Target::Agent { agent: agent.clone() }),
        Selector::Id(_) => None,
    };
    let (closed, mut writes) = match target {
        Some(target) => {
            let lock = Lock::new(target, latest_exp.map_or(floor, |e| (e + leeway).max(floor)), fleet.instance());
            let (closed, derived) = apply_lock(shared, &lock);
            (closed, std::iter::once(lock).chain(derived).collect::<Vec<_>>())
        }
        None => {
            let closed = shared.sessions.revoke(selector, crate::session::Spare::Nothing);
            let derived = deny_cut_tokens(shared, &closed, floor);
            (closed, derived)
        }
    };
    crate::metrics::fleet_lock_applied("local", None);
    let elsewhere = held_elsewhere(shared, selector);
    tracing::info!(?selector, closed = closed.len(), ?elsewhere, store = fleet.store_name(), "sessions revoked");
    // Written one after another; the first the store does not take ends the call (each waits
    // up to its deadline, and a store that failed one will fail the next).
    let mut failed = None;
    for lock in writes.drain(..) {
        if let Err(e) = fleet.write(&lock).await {
            failed = Some(e);
            break;
        }
    }
    match failed {
        None => {
            let mut answer = json!({ "closed": closed.len() });
            if let Some(n) = elsewhere {
                answer["elsewhere"] = json!(n);
            }
            json_response(StatusCode::OK, &answer)
        }
        Some(e) => {
            tracing::error!(error = %e, ?selector, "revocation not written to the fleet store: it holds on this instance only, until a restart");
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({
                    "closed": closed.len(),
                    "error": "the revocation was applied on this instance but not written to the fleet store; retry",
                }),
            )
        }
    }
}

/// How many sessions the fleet's directory says other instances hold that a revocation of
/// `selector` cuts there when its lock reaches them: `None` without a directory, and for a
/// token id, which the directory does not show.
fn held_elsewhere(shared: &Shared, selector: &Selector) -> Option<usize> {
    let fleet = &shared.fleet;
    if !fleet.has_directory() {
        return None;
    }
    if let Selector::Id(_) = selector {
        return Some(0);
    }
    // A token id is not in the directory: nothing to count it by.
    selector.selects(None, None, None)?;
    let mut n = 0;
    for e in fleet.others_sessions() {
        n += usize::from(selector.selects(e.subject.as_deref(), e.issuer.as_deref(), e.agent.as_deref())?);
    }
    Some(n)
}

/// Applies `lock` on this instance: cuts the sessions it targets and refuses its tokens until
/// it lapses (plus `[auth] leeway`); an ended session's envelope is refused until it lapses. An agent's lock cuts the sessions that reached the agent
/// before it was made, and refuses the exact tokens they were opened (and last resumed) with:
/// those refusals are returned as locks of their own, for the store, so that every instance
/// refuses them.
pub(crate) fn apply_lock(shared: &Shared, lock: &Lock) -> (Vec<Arc<crate::session::SessionEntry>>, Vec<Lock>) {
    // `until` covers `[auth] leeway` already (the maker added it).
    let until = lock.until;
    let denylist = &shared.denylist;
    // Whether it is applied as it is made or read again with every lock in force
    // (after an outage, or at start), a subject's lock cuts the sessions of the tokens it
    // refuses: issued no later than it was made. A new login's session goes on; one opened
    // with a revoked token meanwhile (on an instance cut off from the store) does not. A token
    // id's lock cuts every session of that token.
    let made = SystemTime::UNIX_EPOCH + Duration::from_millis(lock.at_ms) + crate::fleet::CLOCK_SLACK;
    match &lock.target {
        Target::Subject { subject, issuer } => {
            denylist.deny_subject(subject, issuer.as_deref(), lock.at_secs(), until);
            let selector = Selector::Subject { subject: subject.clone(), issuer: issuer.clone() };
            let closed = shared.sessions.revoke(&selector, crate::session::Spare::IssuedAfter(lock.at_secs()));
            let derived = outlived_by(shared, lock, &closed);
            (closed, derived)
        }
        Target::Jti { jti, issuer } => {
            denylist.deny_jti(jti, issuer.as_deref(), until);
            let selector = Selector::Jti { jti: jti.clone(), issuer: issuer.clone() };
            let closed = shared.sessions.revoke(&selector, crate::session::Spare::Nothing);
            let derived = outlived_by(shared, lock, &closed);
            (closed, derived)
        }
        Target::Agent { agent } => {
            // An agent's lock refuses no new session: it cuts those that reached the agent
            // before it, even when it arrives live (a session opened after it is not cut), by
            // this clock give or take CLOCK_SLACK (clocks apart, times kept to the millisecond).
            let closed =
                shared.sessions.revoke(&Selector::Agent(agent.clone()), crate::session::Spare::StartedAfter(made));
            let derived = deny_cut_tokens(shared, &closed, lock.until);
            (closed, derived)
        }
        Target::Envelope { digest } => {
            denylist.deny_envelope(digest, until);
            (Vec::new(), Vec::new())
        }
    }
}

/// The lock again, held until the latest expiry of the tokens of the `closed` sessions (plus
/// `[auth] leeway`), when one of them outlives it: the instance that made it knew only its own
/// sessions' tokens, and a token cut here must not be accepted again once the lock lapses.
/// Applied here at once; returned for the store, so that every instance holds it as long.
fn outlived_by(shared: &Shared, lock: &Lock, closed: &[Arc<crate::session::SessionEntry>]) -> Vec<Lock> {
    let leeway = shared.runtime.load().config.auth.leeway.as_secs();
    let Some(latest) = closed.iter().filter_map(|e| e.token_exp).max().map(|exp| exp + leeway) else {
        return Vec::new();
    };
    if latest <= lock.until {
        return Vec::new();
    }
    // Made when the lock was: a later login of the subject is not refused by it.
    let longer = Lock { at_ms: lock.at_ms, ..Lock::new(lock.target.clone(), latest, shared.fleet.instance()) };
    match &longer.target {
        Target::Subject { subject, issuer } => {
            shared.denylist.deny_subject(subject, issuer.as_deref(), longer.at_secs(), latest);
        }
        Target::Jti { jti, issuer } => shared.denylist.deny_jti(jti, issuer.as_deref(), latest),
        Target::Agent { .. } | Target::Envelope { .. } => {}
    }
    vec![longer]
}

/// Refuses the tokens the `closed` sessions were opened and last resumed with, each until it
/// expires (or `fallback`, for a token without `exp`); returns the locks that say so.
pub(crate) fn deny_cut_tokens(
    shared: &Shared,
    closed: &[Arc<crate::session::SessionEntry>],
    fallback: u64,
) -> Vec<Lock> {
    // The lock holds the leeway past the token's expiry (see `revoke`).
    let leeway = shared.runtime.load().config.auth.leeway.as_secs();
    let mut locks = Vec::new();
    for e in closed {
        // The resumed token's expiry is not kept: it is refused until `fallback`.
        let opened = e.jti.clone().map(|j| (j, e.token_exp.unwrap_or(fallback)));
        let resumed =
            e.attached.iter().filter_map(|a| a.revoking_jti()).map(|j| (j, fallback.max(e.token_exp.unwrap_or(0))));
        for (jti, until) in opened.into_iter().chain(resumed) {
            let until = until + leeway;
            shared.denylist.deny_jti(&jti, e.issuer.as_deref(), until);
            let target = Target::Jti { jti, issuer: e.issuer.clone() };
            locks.push(Lock::new(target, until, shared.fleet.instance()));
        }
    }
    locks
}

/// `GET /recordings` (every recorded route's files: name, route, bytes, modified) and
/// `GET /recordings/{name}` (one file, `application/x-asciicast`).
async fn recordings(shared: &Shared, path: &str) -> Response<AdminBody> {
    let runtime = shared.runtime.load_full();
    let dirs: Vec<(String, std::path::PathBuf)> = runtime
        .config
        .routes
        .iter()
        .filter_map(|r| r.recording.as_ref().map(|s| (r.name.clone(), s.directory.clone())))
        .collect();
    let listed = tokio::task::spawn_blocking(move || {
        let mut seen = std::collections::HashSet::new();
        let mut all = Vec::new();
        for (route, dir) in dirs {
            if seen.insert(dir.clone()) {
                all.extend(crate::session::recording::list(&dir).into_iter().map(|f| (route.clone(), f)));
            }
        }
        all
    })
    .await
    .unwrap_or_default();
    match path.strip_prefix("/recordings/") {
        None => {
            let list: Vec<Value> = listed
                .iter()
                .map(|(route, f)| {
                    let modified = f.modified.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                    json!({ "name": f.name, "route": route, "bytes": f.size, "modified": modified })
                })
                .collect();
            json_response(StatusCode::OK, &json!({ "recordings": list })).map(Either::Left)
        }
        Some(name) if crate::session::recording::valid_name(name) => {
            let missing = || text(StatusCode::NOT_FOUND, "no such recording\n").map(Either::Left);
            let Some((_, f)) = listed.into_iter().find(|(_, f)| f.name == name) else {
                return missing();
            };
            // Sent as it is read, as long as it is when opened (a live recording still grows).
            let opened = async {
                let file = tokio::fs::File::open(&f.path).await?;
                let len = file.metadata().await?.len();
                Ok::<_, std::io::Error>((file, len))
            };
            match opened.await {
                Ok((file, len)) => {
                    use futures_util::TryStreamExt as _;
                    use tokio::io::AsyncReadExt as _;
                    let frames: RecordingFrames = tokio_util::io::ReaderStream::new(file.take(len))
                        .map_ok(hyper::body::Frame::data as fn(Bytes) -> _);
                    let mut r = Response::new(Either::Right(http_body_util::StreamBody::new(frames)));
                    let h = r.headers_mut();
                    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-asciicast"));
                    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
                    r
                }
                Err(_) => missing(),
            }
        }
        Some(_) => text(StatusCode::NOT_FOUND, "no such recording\n").map(Either::Left),
    }
}

/// A request's JSON body (at most 64 KiB), or the 400 to answer: `shape` says what was expected.
async fn json_body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    shape: &'static str,
) -> Result<T, Response<Full<Bytes>>> {
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Err(text(StatusCode::BAD_REQUEST, "body too large or unreadable\n")),
    };
    serde_json::from_slice(&body).map_err(|_| text(StatusCode::BAD_REQUEST, shape))
}

/// 204, no body.
fn no_content() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    r
}

fn json_response(status: StatusCode, value: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}
