//! Registry resolver: an agent's members from the fleet's HTTP registry, cached in moka.
//!
//! The registry answers `GET {url}` (the route's template with the validated captures already
//! substituted by the caller) with:
//!
//! - `200` and `{"members":[{"addr":"10.1.2.3:7681","weight":1}]}` (`weight` optional, default 1;
//!   unknown fields ignored): the agent's members, cached for `ttl`;
//! - `404`: no such agent, cached for `negative_ttl`;
//! - anything else, a timeout or a connection error: a failure, held for
//!   [`STALE_RETRY_INTERVAL`] (at most `ttl`): lookups of that URL meanwhile fail at once
//!   without asking, so clients retrying through an outage cannot turn into a request flood on
//!   a registry trying to recover.
//!
//! Concurrent misses for one URL share a single registry request (moka `try_get_with`). The last
//! good members of each URL are also kept for `ttl + stale_ttl`; when the registry fails, those
//! are served (stale-if-error), so a registry outage of up to `stale_ttl` does not affect agents
//! that were looked up recently. A served stale answer is itself cached for
//! [`STALE_RETRY_INTERVAL`] (at most), so during an outage each agent costs one failing registry
//! request per interval rather than one per session, and sessions do not each wait for the
//! timeout. Without a stale copy the lookup fails with [`ResolveError::Unavailable`] (503 for the
//! client).
//!
//! Metrics: `portcullis_route_cache_total{result=hit|miss|stale|negative|failed}` once per lookup,
//! `portcullis_registry_requests_total{result=ok|not_found|error}` and
//! `portcullis_registry_seconds` once per registry request. No label carries the URL or agent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{ACCEPT, AUTHORIZATION};
use http::{HeaderMap, HeaderValue, StatusCode, Uri};

use super::sticky::Member;

/// Largest registry answer accepted.
const MAX_BODY_BYTES: usize = 1 << 20;

/// Longest a stale answer, served because the registry failed, is reused before the registry is
/// asked again (also capped by `ttl` and by what is left of the stale window).
pub const STALE_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Longest lifetime given to any cache entry (moka refuses durations beyond about 1,000 years).
const MAX_CACHE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// How to reach the registry and how long its answers are trusted: the route's
/// `[routes.registry]` settings, used as they are.
pub use crate::config::RegistryConfig as RegistrySettings;

/// What the registry knows about an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// The agent's members (possibly empty, which the caller treats as "none available").
    Members(Vec<Member>),
    /// The registry does not know the agent (404).
    NotFound,
}

/// Why a lookup produced no members.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The registry failed (down, timeout, unexpected status) and nothing usable was cached.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// The registry answered 200 with a body that is not a member list, and nothing usable was
    /// cached.
    #[error("invalid registry answer: {0}")]
    Invalid(String),
    /// The registry was not asked: the process's outbound descriptors are all in use. The
    /// proxy's own want, held against neither the agent nor the registry host.
    #[error(transparent)]
    Descriptors(crate::limits::Spent),
    /// The registry could not be asked: the process is out of descriptors or ports
    /// ([`crate::limits::exhausted`]). As [`Self::Descriptors`], held against neither the agent
    /// nor the registry host.
    #[error("registry not asked: {0}")]
    Exhausted(String),
}

/// Cache sizes and request count, for the admin `/routes` view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolverStats {
    /// URLs with a fresh answer (members or not-found); approximate, moka counts lazily.
    pub entries: u64,
    /// URLs with last good members kept for stale-if-error; approximate.
    pub stale_entries: u64,
    /// Registry requests sent since start.
    pub requests: u64,
}

/// Registry lookups with caching, request coalescing and stale-if-error.
pub struct RegistryResolver {
    settings: RegistrySettings,
    /// Answers within their TTL: `ttl` for members, `negative_ttl` for not-found, up to
    /// [`STALE_RETRY_INTERVAL`] for stale members served while the registry fails.
    fresh: moka::future::Cache<String, Entry>,
    /// Last good members per URL and when they were fetched, kept `ttl + stale_ttl`, served only
    /// when the registry fails.
    stale: moka::future::Cache<String, (Arc<Resolved>, Instant)>,
    /// Failures with nothing usable cached, held for [`STALE_RETRY_INTERVAL`] (at most `ttl`).
    failed: moka::future::Cache<String, ResolveError>,
    /// Registry hosts (`host:port`) that could not be connected to, held as long: every URL on
    /// such a host fails at once meanwhile, whichever agent it names (a connect fails before
    /// anything of the request is sent: no client's request can be its cause).
    unreachable: moka::future::Cache<String, String>,
    /// Registry hosts connected to within the hold: requests to them go at once.
    reachable: moka::future::Cache<String, ()>,
    /// When each registry host was last connected to, kept as long as a connect may take: a
    /// connect that fails after another went through holds nothing.
    connected: moka::future::Cache<String, Instant>,
    /// One request at a time to a host not known reachable, so a burst of lookups naming
    /// different agents sends one connect to a host that cannot be reached, not one each: the
    /// others wait for its outcome (within their own timeout) and find the host held.
    gates: moka::sync::Cache<String, Arc<tokio::sync::Semaphore>>,
    /// Client TLS for `https://` registries (webpki roots); `None` if it could not be set up.
    client: Option<crate::outbound::HttpClient>,
    /// Registry requests sent, for stats.
    requests: AtomicU64,
}

impl RegistryResolver {
    /// A resolver with empty caches; nothing is fetched until the first lookup.
    pub fn new(settings: RegistrySettings) -> Arc<Self> {
        let fresh = moka::future::Cache::builder()
            .max_capacity(settings.max_capacity)
            .expire_after(PerEntryTtl { ttl: settings.ttl, negative_ttl: settings.negative_ttl })
            .build();
        let stale = moka::future::Cache::builder()
            .max_capacity(settings.max_capacity)
            .time_to_live(settings.ttl.saturating_add(settings.stale_ttl).min(MAX_CACHE_TTL))
            .build();
        let hold = STALE_RETRY_INTERVAL.min(settings.ttl).max(Duration::from_millis(1));
        let failed = moka::future::Cache::builder().max_capacity(settings.max_capacity).time_to_live(hold).build();
        let unreachable = moka::future::Cache::builder().max_capacity(settings.max_capacity).time_to_live(hold).build();
        let reachable = moka::future::Cache::builder().max_capacity(settings.max_capacity).time_to_live(hold).build();
        let connected = moka::future::Cache::builder()
            .max_capacity(settings.max_capacity)
            .time_to_live(settings.timeout.max(hold))
            .build();
        let gates = moka::sync::Cache::builder()
            .max_capacity(settings.max_capacity)
            .time_to_idle(settings.timeout.saturating_mul(2).max(hold))
            .build();
        Arc::new(RegistryResolver {
            settings,
            fresh,
            stale,
            failed,
            unreachable,
            reachable,
            connected,
            gates,
            client: crate::outbound::HttpClient::new(None).ok(),
            requests: AtomicU64::new(0),
        })
    }

    /// The settings this resolver was built with.
    pub fn settings(&self) -> &RegistrySettings {
        &self.settings
    }

    /// What the registry says about `url` (already rendered), from the cache when fresh.
    pub async fn resolve(&self, url: &str) -> Result<Arc<Resolved>, ResolveError> {
        if let Some(cached) = self.fresh.get(url).await {
            let result = match (cached.stale, &*cached.answer) {
                (true, _) => "stale",
                (false, Resolved::Members(_)) => "hit",
                (false, Resolved::NotFound) => "negative",
            };
            crate::metrics::route_cache(result);
            return Ok(cached.answer);
        }
        if let Some(error) = self.failed.get(url).await {
            crate::metrics::route_cache("failed");
            return Err(error);
        }
        // Only one of the concurrent callers for `url` runs this future; the others wait for
        // its result. Errors are handed to all of them, and held briefly.
        match self.fresh.try_get_with(url.to_owned(), self.fetch_or_stale(url)).await {
            Ok(entry) => {
                let result = if entry.stale { "stale" } else { "miss" };
                crate::metrics::route_cache(result);
                Ok(entry.answer)
            }
            Err(error) => {
                crate::metrics::route_cache("miss");
                let error = (*error).clone();
                // Held briefly for the agent, unless the registry was never asked.
                if !matches!(error, ResolveError::Descriptors(_) | ResolveError::Exhausted(_)) {
                    self.failed.insert(url.to_owned(), error.clone()).await;
                }
                Err(error)
            }
        }
    }

    /// Forgets the fresh answer for one URL, or for all when `url` is `None`, so the next lookup
    /// asks the registry. The last good members stay as a fallback in case the registry fails.
    pub async fn purge(&self, url: Option<&str>) {
        match url {
            Some(url) => {
                self.fresh.invalidate(url).await;
                self.failed.invalidate(url).await;
            }
            None => {
                self.fresh.invalidate_all();
                self.failed.invalidate_all();
            }
        }
    }

    /// Cache sizes and request count.
    pub fn stats(&self) -> ResolverStats {
        ResolverStats {
            entries: self.fresh.entry_count(),
            stale_entries: self.stale.entry_count(),
            requests: self.requests.load(Ordering::Relaxed),
        }
    }

    /// Asks the registry and updates the stale-if-error copy from the answer; when the registry
    /// fails, falls back to that copy if it is still within the stale window.
    async fn fetch_or_stale(&self, url: &str) -> Result<Entry, ResolveError> {
        let error = match self.fetch(url).await {
            Ok(answer) => {
                let answer = Arc::new(answer);
                match *answer {
                    Resolved::Members(_) => {
                        self.stale.insert(url.to_owned(), (Arc::clone(&answer), Instant::now())).await
                    }
                    // The registry says the agent is gone: its old members must not be served.
                    Resolved::NotFound => self.stale.invalidate(url).await,
                }
                return Ok(Entry { answer, stale: false, hold: Duration::ZERO });
            }
            Err(error) => error,
        };
        if let Some((answer, fetched_at)) = self.stale.get(url).await {
            let window = self.settings.ttl.saturating_add(self.settings.stale_ttl);
            let left =
                fetched_at.checked_add(window).map_or(window, |end| end.saturating_duration_since(Instant::now()));
            if !left.is_zero() {
                tracing::warn!(url, %error, "registry failed; serving the last good members");
                let hold = STALE_RETRY_INTERVAL.min(self.settings.ttl).min(left);
                return Ok(Entry { answer, stale: true, hold });
            }
        }
        tracing::warn!(url, %error, "registry failed and nothing usable is cached");
        Err(error)
    }

    /// One registry request, bounded by the timeout, counted and timed.
    async fn fetch(&self, url: &str) -> Result<Resolved, ResolveError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = self.request(url).await;
        let label = match &result {
            Ok(Resolved::Members(_)) => "ok",
            Ok(Resolved::NotFound) => "not_found",
            Err(_) => "error",
        };
        crate::metrics::registry_request(label, started.elapsed().as_secs_f64());
        result
    }

    async fn request(&self, url: &str) -> Result<Resolved, ResolveError> {
        let uri: Uri = url.parse().map_err(|e| ResolveError::Unavailable(format!("invalid registry url: {e}")))?;
        let client = self.client.as_ref().ok_or_else(|| ResolveError::Unavailable("http client unavailable".into()))?;
        let host = uri.authority().map_or_else(String::new, |a| a.as_str().to_owned());
        let held = |why: String| ResolveError::Unavailable(format!("{why} (not tried again yet)"));
        if let Some(why) = self.unreachable.get(&host).await {
            return Err(held(why));
        }
        let timeout = self.settings.timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        // A host not known reachable: one connect at a time, until one succeeds. The gate is
        // held for the connect only, never for the answer: behind a registry that answers in
        // most of the timeout, lookups waiting for the first one's answer would have too little
        // of theirs left for their own. `waited`: this lookup waited there, and has less than
        // its timeout left for its connect.
        let mut waited = false;
        let gate = match self.reachable.contains_key(&host) {
            true => None,
            false => {
                let gate = self.gates.get_with(host.clone(), || Arc::new(tokio::sync::Semaphore::new(1)));
                let permit = match gate.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(_) => {
                        waited = true;
                        let Ok(Ok(permit)) = tokio::time::timeout_at(deadline, gate.acquire_owned()).await else {
                            return Err(ResolveError::Unavailable(format!("no connection within {timeout:?}")));
                        };
                        permit
                    }
                };
                if let Some(why) = self.unreachable.get(&host).await {
                    return Err(held(why));
                }
                // The connect before this one succeeded: the rest go at once, not one by one.
                (!self.reachable.contains_key(&host)).then_some(permit)
            }
        };
        // A lookup's connection is counted as a member's is: a burst of lookups for agents not
        // cached (a cold start, a flood of made-up names) is held to the outbound budget.
        let _slot = crate::limits::outbound_slot().map_err(ResolveError::Descriptors)?;
        let tried = Instant::now();
        let tcp = match client.open(&uri, deadline).await {
            Ok(tcp) => tcp,
            Err(e) => {
                use crate::outbound::OutboundError::{Connect, ConnectTimeout, Exhausted};
                let why = e.to_string();
                // A connect refused, or not made in the whole timeout (a host that drops SYNs),
                // holds the host; one not made in what was left after a wait at the gate says
                // less of it, and the proxy's own exhaustion nothing. Nor does one lost while
                // another connect to the host went through (a registry whose accept queue
                // overflowed for a moment): the others would be refused for the hold.
                let holds = (matches!(e, Connect(_)) || (matches!(e, ConnectTimeout) && !waited))
                    && self.connected.get(&host).await.is_none_or(|at| at <= tried);
                if holds {
                    self.reachable.invalidate(&host).await;
                    self.unreachable.insert(host, why.clone()).await;
                }
                return Err(match e {
                    Exhausted(_) => ResolveError::Exhausted(why),
                    _ => ResolveError::Unavailable(why),
                });
            }
        };
        // Each connect renews the mark: a registry in use is not gated again. A connect made
        // disproves a hold that one failing meanwhile put on the host.
        self.connected.insert(host.clone(), Instant::now()).await;
        self.unreachable.invalidate(&host).await;
        self.reachable.insert(host, ()).await;
        drop(gate);
        let (status, body) = client
            .get_on(&uri, tcp, self.request_headers()?, MAX_BODY_BYTES, deadline)
            .await
            .map_err(|e| ResolveError::Unavailable(e.to_string()))?;
        match status {
            StatusCode::NOT_FOUND => Ok(Resolved::NotFound),
            s if s.is_success() => parse_members(&body).map(Resolved::Members),
            s => Err(ResolveError::Unavailable(format!("registry answered {}", s.as_u16()))),
        }
    }

    fn request_headers(&self) -> Result<HeaderMap, ResolveError> {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(token) = &self.settings.token {
            let mut value = HeaderValue::from_bytes(&[b"Bearer ", token.expose()].concat())
                // The error names no bytes, so the token cannot leak through it.
                .map_err(|_| ResolveError::Unavailable("registry token is not a valid header value".into()))?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        Ok(headers)
    }
}

/// The registry's answer body.
#[derive(serde::Deserialize)]
struct Answer {
    members: Vec<Member>,
}

/// Parses and checks a 200 answer.
fn parse_members(body: &[u8]) -> Result<Vec<Member>, ResolveError> {
    let answer: Answer = serde_json::from_slice(body).map_err(|e| ResolveError::Invalid(e.to_string()))?;
    if let Some(bad) = answer.members.iter().find(|m| m.addr.is_empty() || m.addr.len() > 261) {
        return Err(ResolveError::Invalid(format!("member address of {} bytes", bad.addr.len())));
    }
    Ok(answer.members)
}

/// An answer in the fresh cache.
#[derive(Clone)]
struct Entry {
    /// What the lookup returns.
    answer: Arc<Resolved>,
    /// The registry failed and this is the last good answer (counted as `stale`, kept `hold`).
    stale: bool,
    /// How long a stale answer is reused before the registry is asked again.
    hold: Duration,
}

/// Per-entry lifetime in the fresh cache: `ttl` for members, `negative_ttl` for not-found,
/// `hold` for stale answers.
struct PerEntryTtl {
    ttl: Duration,
    negative_ttl: Duration,
}

impl moka::Expiry<String, Entry> for PerEntryTtl {
    fn expire_after_create(&self, _url: &String, entry: &Entry, _now: Instant) -> Option<Duration> {
        let ttl = match (entry.stale, &*entry.answer) {
            (true, _) => entry.hold,
            (false, Resolved::Members(_)) => self.ttl,
            (false, Resolved::NotFound) => self.negative_ttl,
        };
        Some(ttl.min(MAX_CACHE_TTL))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    use bytes::Bytes;
    use http::Request;
    use http_body_util::Full;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const MEMBERS: &str = r#"{"members":[{"addr":"10.1.2.3:7681","weight":2},{"addr":"10.1.2.4:7681"}]}"#;

    /// How the test registry answers.
    #[derive(Clone, Copy)]
    enum Reply {
        Members,
        NotFound,
        Fail,
        Invalid,
    }

    /// A tiny HTTP registry on 127.0.0.1:0 that counts its requests.
    struct TestRegistry {
        addr: SocketAddr,
        requests: AtomicUsize,
        /// Connections accepted.
        accepted: AtomicUsize,
        reply: Mutex<Reply>,
        delay: Mutex<Duration>,
        last_authorization: Mutex<Option<String>>,
    }

    impl TestRegistry {
        async fn start() -> Arc<TestRegistry> {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
            let (_, accepting) = tokio::sync::watch::channel(true);
            TestRegistry::start_on(listener, accepting)
        }

        /// A registry on `listener` that accepts connections while `accepting` says so (its
        /// accept queue fills meanwhile).
        fn start_on(listener: TcpListener, mut accepting: tokio::sync::watch::Receiver<bool>) -> Arc<TestRegistry> {
            let registry = Arc::new(TestRegistry {
                addr: listener.local_addr().expect("bound socket has an address"),
                requests: AtomicUsize::new(0),
                accepted: AtomicUsize::new(0),
                reply: Mutex::new(Reply::Members),
                delay: Mutex::new(Duration::ZERO),
                last_authorization: Mutex::new(None),
            });
            let server = Arc::clone(&registry);
            tokio::spawn(async move {
                while accepting.wait_for(|open| *open).await.is_ok() {
                    let Ok((tcp, _)) = listener.accept().await else { break };
                    server.accepted.fetch_add(1, Ordering::SeqCst);
                    let registry = Arc::clone(&server);
                    tokio::spawn(async move {
                        let service = service_fn(move |req| {
                            let registry = Arc::clone(&registry);
                            async move { Ok::<_, Infallible>(registry.answer(req).await) }
                        });
                        let _ = http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
                    });
                }
            });
            registry
        }

        async fn answer(&self, req: Request<hyper::body::Incoming>) -> hyper::Response<Full<Bytes>> {
            self.requests.fetch_add(1, Ordering::SeqCst);
            *self.last_authorization.lock().expect("test lock") =
                req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let delay = *self.delay.lock().expect("test lock");
            tokio::time::sleep(delay).await;
            let reply = *self.reply.lock().expect("test lock");
            let (status, body) = match reply {
                Reply::Members => (200, MEMBERS),
                Reply::NotFound => (404, "no such agent"),
                Reply::Fail => (500, "boom"),
                Reply::Invalid => (200, r#"{"members":"nope"}"#),
            };
            hyper::Response::builder()
                .status(status)
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .expect("static response is valid")
        }

        fn set(&self, reply: Reply) {
            *self.reply.lock().expect("test lock") = reply;
        }

        fn requests(&self) -> usize {
            self.requests.load(Ordering::SeqCst)
        }

        fn url(&self, agent: &str) -> String {
            format!("http://{}/agents/{agent}", self.addr)
        }
    }

    fn settings(ttl: Duration, negative_ttl: Duration, stale_ttl: Duration) -> RegistrySettings {
        RegistrySettings {
            url: "http://registry/agents/{agent}".into(),
            token: None,
            timeout: 1000 * MS,
            ttl,
            negative_ttl,
            stale_ttl,
            max_capacity: 1000,
        }
    }

    /// An address nothing listens on: a port bound and never listened on, held (with the
    /// socket returned) so that no other socket takes it.
    fn closed_port() -> (tokio::net::TcpSocket, std::net::SocketAddr) {
        let closed = tokio::net::TcpSocket::new_v4().expect("socket");
        closed.bind("127.0.0.1:0".parse().expect("addr")).expect("bind port 0");
        let addr = closed.local_addr().expect("bound socket has an address");
        (closed, addr)
    }

    /// An address whose connects hang: a listener with a full accept queue, so the kernel
    /// drops further SYNs (as a blackholed host does). Held with the connections that fill it.
    async fn syn_dropping() -> (socket2::Socket, Vec<tokio::net::TcpStream>, std::net::SocketAddr) {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind port 0");
        socket.listen(0).expect("listen");
        let addr = socket.local_addr().expect("addr").as_socket().expect("inet");
        let mut fillers = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(s)) = tokio::time::timeout(100 * MS, tokio::net::TcpStream::connect(addr)).await {
                fillers.push(s);
            }
        }
        (socket, fillers, addr)
    }

    fn expected_members() -> Resolved {
        Resolved::Members(vec![
            Member { addr: "10.1.2.3:7681".into(), weight: 2 },
            Member { addr: "10.1.2.4:7681".into(), weight: 1 },
        ])
    }

    /// Sleeps until `since + d` (a deadline, not a guess about how long work takes).
    async fn sleep_until(since: tokio::time::Instant, d: Duration) {
        tokio::time::sleep_until(since + d).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_misses_for_one_agent_send_one_registry_request() {
        let registry = TestRegistry::start().await;
        *registry.delay.lock().expect("test lock") = 200 * MS;
        let resolver = RegistryResolver::new(settings(10_000 * MS, 1000 * MS, 1000 * MS));
        let url = registry.url("a1");
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let (resolver, url) = (Arc::clone(&resolver), url.clone());
            tasks.spawn(async move { resolver.resolve(&url).await });
        }
        while let Some(done) = tasks.join_next().await {
            assert_eq!(*done.expect("task did not panic").expect("resolved"), expected_members());
        }
        assert_eq!(registry.requests(), 1);
        assert_eq!(resolver.stats().requests, 1);
    }

    #[tokio::test]
    async fn cached_members_send_no_request_until_ttl() {
        let registry = TestRegistry::start().await;
        let resolver = RegistryResolver::new(settings(300 * MS, 100 * MS, 1000 * MS));
        let url = registry.url("a1");
        assert_eq!(*resolver.resolve(&url).await.expect("resolved"), expected_members());
        // An entry's time runs from its answer: deadlines are counted from after it.
        let t0 = tokio::time::Instant::now();
        for _ in 0..10 {
            assert_eq!(*resolver.resolve(&url).await.expect("resolved"), expected_members());
        }
        assert_eq!(registry.requests(), 1, "cached lookups sent requests");
        // A different agent is a different entry.
        resolver.resolve(&registry.url("a2")).await.expect("resolved");
        assert_eq!(registry.requests(), 2);
        sleep_until(t0, 350 * MS).await;
        resolver.resolve(&url).await.expect("resolved");
        assert_eq!(registry.requests(), 3, "expired entry not re-fetched");
    }

    #[tokio::test]
    async fn not_found_is_cached_for_negative_ttl() {
        let registry = TestRegistry::start().await;
        registry.set(Reply::NotFound);
        let resolver = RegistryResolver::new(settings(10_000 * MS, 150 * MS, 1000 * MS));
        let url = registry.url("ghost");
        assert_eq!(*resolver.resolve(&url).await.expect("resolved"), Resolved::NotFound);
        let t0 = tokio::time::Instant::now();
        assert_eq!(*resolver.resolve(&url).await.expect("resolved"), Resolved::NotFound);
        assert_eq!(registry.requests(), 1, "negative answer not cached");
        sleep_until(t0, 200 * MS).await;
        registry.set(Reply::Members);
        assert_eq!(*resolver.resolve(&url).await.expect("resolved"), expected_members());
        assert_eq!(registry.requests(), 2, "negative answer cached beyond negative_ttl");
    }

    #[tokio::test]
    async fn registry_failure_serves_last_good_members_within_stale_ttl() {
        let registry = TestRegistry::start().await;
        let resolver = RegistryResolver::new(settings(150 * MS, 100 * MS, 300 * MS));
        let url = registry.url("a1");
        assert_eq!(*resolver.resolve(&url).await.expect("resolved"), expected_members());
        let t0 = tokio::time::Instant::now();
        registry.set(Reply::Fail);
        sleep_until(t0, 200 * MS).await;
        // Past ttl (150 ms), within ttl + stale_ttl (450 ms): the registry is asked and fails.
        assert_eq!(*resolver.resolve(&url).await.expect("stale members"), expected_members());
        assert_eq!(registry.requests(), 2);
        // The stale answer is reused for a while (min(1 s, ttl, window left)) without asking.
        assert_eq!(*resolver.resolve(&url).await.expect("stale members"), expected_members());
        assert_eq!(registry.requests(), 2, "every lookup asked the failing registry");
        sleep_until(t0, 500 * MS).await;
        assert!(matches!(resolver.resolve(&url).await, Err(ResolveError::Unavailable(_))));
        // A failure is held for min(1 s, ttl): the next lookup within it does not ask, the one
        // after it does.
        let before = registry.requests();
        let t1 = tokio::time::Instant::now();
        assert!(matches!(resolver.resolve(&url).await, Err(ResolveError::Unavailable(_))));
        assert_eq!(registry.requests(), before);
        sleep_until(t1, 200 * MS).await;
        let _ = resolver.resolve(&url).await;
        assert_eq!(registry.requests(), before + 1);
    }

    #[tokio::test]
    async fn not_found_drops_the_stale_copy() {
        let registry = TestRegistry::start().await;
        let resolver = RegistryResolver::new(settings(100 * MS, 100 * MS, 10_000 * MS));
        let url = registry.url("a1");
        resolver.resolve(&url).await.expect("resolved");
        let t0 = tokio::time::Instant::now();
        registry.set(Reply::NotFound);
        sleep_until(t0, 150 * MS).await;
        assert_eq!(*resolver.resolve(&url).await.expect("resolved"), Resolved::NotFound);
        let t1 = tokio::time::Instant::now();
        registry.set(Reply::Fail);
        sleep_until(t1, 150 * MS).await;
        assert!(matches!(resolver.resolve(&url).await, Err(ResolveError::Unavailable(_))));
    }

    #[tokio::test]
    async fn registry_down_with_nothing_cached_is_unavailable() {
        let registry = TestRegistry::start().await;
        registry.set(Reply::Fail);
        let resolver = RegistryResolver::new(settings(1000 * MS, 1000 * MS, 1000 * MS));
        let err = resolver.resolve(&registry.url("a1")).await.expect_err("500 is a failure");
        assert_eq!(err, ResolveError::Unavailable("registry answered 500".into()));

        let (_closed, addr) = closed_port();
        let err = resolver.resolve(&format!("http://{addr}/agents/a1")).await.expect_err("refused");
        assert!(matches!(err, ResolveError::Unavailable(m) if m.starts_with("connect")));
    }

    /// Found by an attacker review: with the registry failing and nothing cached, every
    /// lookup asked it again (2,532 requests for 2,532 handshakes in 2 s), so clients retrying
    /// through an outage flooded a registry trying to recover. A failure is held briefly.
    #[tokio::test]
    async fn a_failing_registry_is_asked_once_per_hold_not_once_per_lookup() {
        let registry = TestRegistry::start().await;
        registry.set(Reply::Fail);
        let resolver = RegistryResolver::new(settings(300 * MS, 300 * MS, 1000 * MS));
        let url = registry.url("a1");
        let t0 = tokio::time::Instant::now();
        for _ in 0..50 {
            assert!(matches!(resolver.resolve(&url).await, Err(ResolveError::Unavailable(_))));
        }
        assert_eq!(registry.requests(), 1, "one request for 50 lookups within the hold");
        // The hold is min(1 s, ttl): after it the registry is asked again, and its recovery seen.
        registry.set(Reply::Members);
        sleep_until(t0, 400 * MS).await;
        assert_eq!(*resolver.resolve(&url).await.expect("recovered"), expected_members());
        assert_eq!(registry.requests(), 2);
    }

    /// Found by a verification attack: the hold is per URL, so a client naming a new agent
    /// each time still sent a registry that could not be reached one attempt per handshake. A
    /// registry host that refuses connections is held as a whole.
    #[tokio::test]
    async fn an_unreachable_registry_host_is_tried_once_per_hold_whatever_the_agent() {
        let (_closed, addr) = closed_port();
        let resolver = RegistryResolver::new(settings(1000 * MS, 1000 * MS, 1000 * MS));
        let first = resolver.resolve(&format!("http://{addr}/agents/a0")).await.expect_err("refused");
        assert!(matches!(&first, ResolveError::Unavailable(m) if m.starts_with("connect")), "{first:?}");
        for n in 1..50 {
            let err = resolver.resolve(&format!("http://{addr}/agents/a{n}")).await.expect_err("held");
            assert!(matches!(&err, ResolveError::Unavailable(m) if m.ends_with("(not tried again yet)")), "{err:?}");
        }
    }

    #[tokio::test]
    async fn a_registry_host_that_drops_connects_is_tried_once_per_hold_whatever_the_agent() {
        let (_socket, _fillers, addr) = syn_dropping().await;
        let mut s = settings(1000 * MS, 1000 * MS, 1000 * MS);
        s.timeout = 200 * MS;
        let resolver = RegistryResolver::new(s);
        let first = resolver.resolve(&format!("http://{addr}/agents/a0")).await.expect_err("no connection");
        assert!(matches!(&first, ResolveError::Unavailable(m) if m.starts_with("connect: no connection")), "{first:?}");
        // Each lookup below would wait the whole timeout again if the host were not held: 20 of
        // them would take 4 s, and the hold is 1 s.
        let started = Instant::now();
        for n in 1..20 {
            let err = resolver.resolve(&format!("http://{addr}/agents/a{n}")).await.expect_err("held");
            assert!(matches!(&err, ResolveError::Unavailable(m) if m.ends_with("(not tried again yet)")), "{err:?}");
        }
        assert!(started.elapsed() < 1000 * MS, "held lookups do not wait for the host");
    }

    #[tokio::test]
    async fn a_burst_of_lookups_naming_different_agents_sends_one_connect_to_a_host_that_drops_them() {
        let (_socket, _fillers, addr) = syn_dropping().await;
        let mut s = settings(1000 * MS, 1000 * MS, 1000 * MS);
        s.timeout = 300 * MS;
        let resolver = RegistryResolver::new(s);
        let lookups = (0..40).map(|n| {
            let resolver = resolver.clone();
            tokio::spawn(async move { resolver.resolve(&format!("http://{addr}/agents/a{n}")).await })
        });
        let mut tried = 0;
        for lookup in lookups.collect::<Vec<_>>() {
            match lookup.await.expect("lookup task") {
                Err(ResolveError::Unavailable(m)) if m.ends_with("(not tried again yet)") => {}
                Err(ResolveError::Unavailable(m)) if m.starts_with("connect: ") => tried += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(tried, 1, "one connect for the burst, the other lookups held");
    }

    #[tokio::test]
    async fn a_burst_to_a_slow_registry_that_answers_goes_at_once_after_the_first() {
        let registry = TestRegistry::start().await;
        *registry.delay.lock().expect("test lock") = 300 * MS;
        let resolver = RegistryResolver::new(settings(1000 * MS, 1000 * MS, 1000 * MS));
        let started = Instant::now();
        let lookups: Vec<_> = (0..10)
            .map(|n| {
                let (resolver, url) = (resolver.clone(), registry.url(&format!("a{n}")));
                tokio::spawn(async move { resolver.resolve(&url).await })
            })
            .collect();
        for lookup in lookups {
            lookup.await.expect("lookup task").expect("members");
        }
        // One by one, ten answers of 300 ms would take 3 s; the first, then the nine together.
        assert!(started.elapsed() < 1500 * MS, "{:?}", started.elapsed());
    }

    /// The attack: a registry answering in most of the timeout. With the gate held until the
    /// first lookup's answer, each lookup behind it had what was left of its timeout for an
    /// answer as slow: all but the first failed (29 of 30 against a release build).
    #[tokio::test]
    async fn a_burst_to_a_registry_answering_in_most_of_the_timeout_is_answered_whole() {
        let registry = TestRegistry::start().await;
        *registry.delay.lock().expect("test lock") = 600 * MS;
        let resolver = RegistryResolver::new(settings(1000 * MS, 1000 * MS, 1000 * MS));
        let lookups: Vec<_> = (0..20)
            .map(|n| {
                let (resolver, url) = (resolver.clone(), registry.url(&format!("a{n}")));
                tokio::spawn(async move { resolver.resolve(&url).await })
            })
            .collect();
        let mut answered = 0;
        for lookup in lookups {
            answered += usize::from(lookup.await.expect("lookup task").is_ok());
        }
        assert_eq!(answered, 20, "every lookup of the burst answered within its own timeout");
    }

    /// A registry whose accept queue overflowed for a moment: a connect lost while another to
    /// the same host goes through fails its own lookup and holds nothing, so the next lookup of
    /// an agent not cached is sent.
    #[tokio::test]
    async fn one_connect_lost_while_others_reach_the_registry_does_not_hold_it() {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
        socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind port 0");
        socket.listen(0).expect("listen");
        socket.set_nonblocking(true).expect("nonblocking");
        let listener = TcpListener::from_std(socket.into()).expect("tokio listener");
        let (accepting, open) = tokio::sync::watch::channel(true);
        let registry = TestRegistry::start_on(listener, open);
        let mut s = settings(1000 * MS, 1000 * MS, 1000 * MS);
        s.timeout = 500 * MS;
        let resolver = RegistryResolver::new(s);
        resolver.resolve(&registry.url("a0")).await.expect("the registry is reached");
        // It stops accepting (its accept loop, already waiting, takes one more connection) and
        // its queue of one fills: the next SYN is dropped, and sent again only after a second.
        accepting.send_replace(false);
        let mut fillers = Vec::new();
        for _ in 0..4 {
            if let Ok(Ok(s)) = tokio::time::timeout(100 * MS, tokio::net::TcpStream::connect(registry.addr)).await {
                fillers.push(s);
            }
        }
        assert_eq!(fillers.len(), 2, "one connection taken, one queued, the others' SYNs dropped");
        let lost = tokio::spawn({
            let (resolver, url) = (resolver.clone(), registry.url("a1"));
            async move { resolver.resolve(&url).await }
        });
        tokio::time::sleep(50 * MS).await;
        // The registry takes its queue; another lookup connects and is answered meanwhile.
        let queued = registry.accepted.load(Ordering::SeqCst);
        accepting.send_replace(true);
        let taken = async {
            while registry.accepted.load(Ordering::SeqCst) == queued {
                tokio::time::sleep(5 * MS).await;
            }
        };
        tokio::time::timeout(1000 * MS, taken).await.expect("the registry takes its queue");
        resolver.resolve(&registry.url("a2")).await.expect("answered while the first connect waits");
        let err = lost.await.expect("lookup task").expect_err("its SYN was dropped");
        assert!(matches!(&err, ResolveError::Unavailable(m) if m.starts_with("connect: no connection")), "{err:?}");
        // The host answered since that connect began: it is not held.
        resolver.resolve(&registry.url("a3")).await.expect("the registry is not held");
        drop(fillers);
    }

    #[tokio::test]
    async fn slow_registry_times_out() {
        let registry = TestRegistry::start().await;
        *registry.delay.lock().expect("test lock") = 2000 * MS;
        let mut s = settings(1000 * MS, 1000 * MS, 1000 * MS);
        s.timeout = 100 * MS;
        let resolver = RegistryResolver::new(s);
        let started = Instant::now();
        let err = resolver.resolve(&registry.url("a1")).await.expect_err("timed out");
        assert!(matches!(err, ResolveError::Unavailable(m) if m.contains("no answer within")));
        assert!(started.elapsed() < 1000 * MS);
    }

    #[tokio::test]
    async fn invalid_json_is_invalid() {
        let registry = TestRegistry::start().await;
        registry.set(Reply::Invalid);
        let resolver = RegistryResolver::new(settings(1000 * MS, 1000 * MS, 1000 * MS));
        let err = resolver.resolve(&registry.url("a1")).await.expect_err("invalid body");
        assert!(matches!(err, ResolveError::Invalid(_)), "{err:?}");
        assert_eq!(resolver.stats().entries, 0);
    }

    #[tokio::test]
    async fn bearer_token_is_sent_and_not_shown_in_debug() {
        let registry = TestRegistry::start().await;
        let mut s = settings(1000 * MS, 1000 * MS, 1000 * MS);
        s.token = Some(crate::config::Secret::new(b"s3cret".to_vec()));
        assert!(!format!("{s:?}").contains("s3cret"));
        let resolver = RegistryResolver::new(s);
        resolver.resolve(&registry.url("a1")).await.expect("resolved");
        assert_eq!(registry.last_authorization.lock().expect("test lock").as_deref(), Some("Bearer s3cret"));
    }

    #[tokio::test]
    async fn purge_makes_the_next_lookup_ask_again() {
        let registry = TestRegistry::start().await;
        let resolver = RegistryResolver::new(settings(10_000 * MS, 1000 * MS, 1000 * MS));
        let (a1, a2) = (registry.url("a1"), registry.url("a2"));
        resolver.resolve(&a1).await.expect("resolved");
        resolver.resolve(&a2).await.expect("resolved");
        resolver.purge(Some(&a1)).await;
        resolver.resolve(&a1).await.expect("resolved");
        resolver.resolve(&a2).await.expect("resolved");
        assert_eq!(registry.requests(), 3);
        resolver.purge(None).await;
        resolver.resolve(&a1).await.expect("resolved");
        resolver.resolve(&a2).await.expect("resolved");
        assert_eq!(registry.requests(), 5);
    }

    #[test]
    fn answer_schema() {
        assert_eq!(parse_members(br#"{"members":[],"version":7}"#), Ok(vec![]));
        assert!(matches!(parse_members(br#"{"members":[{"addr":""}]}"#), Err(ResolveError::Invalid(_))));
        assert!(matches!(parse_members(br#"{"members":[{"weight":1}]}"#), Err(ResolveError::Invalid(_))));
        assert!(matches!(parse_members(b"<html>"), Err(ResolveError::Invalid(_))));
    }
}
