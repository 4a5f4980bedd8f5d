//! The server: binds listeners, runs the accept loops and the admin listener, and drains on
//! shutdown.
//!
//! [`Bound::bind`] binds every address first (so tests can bind port 0 and read the addresses
//! back); [`Server::serve`] takes the bound listeners and a shutdown future, and
//! [`Shared::reload`] swaps in a new configuration while it runs. On shutdown the server stops
//! accepting, `/ready` turns 503, every session is told to close with 1001 (spread over
//! `drain_spread`), and `serve` returns when all sessions are gone or at `drain_timeout`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io;
use std::net::SocketAddr;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::auth::{AuthConfigError, Authenticator, Denylist};
use crate::config::{Config, RouteConfig, WorkerModel};
use crate::metrics::{self, Metrics};
use crate::outbound::{self, Upstream, UpstreamSettings};
use crate::proxy::accept::{accept_loop, ListenerKind};
use crate::proxy::connect;
use crate::proxy::tls::{self, TlsConfigError};
use crate::routing::pool::RouteState;
use crate::routing::sticky::ConnCounts;
use crate::routing::table::RouteTable;
use crate::session::{Sessions, StopReason};
use crate::state::HttpRoute;
pub use crate::state::{Runtime, Shared};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// An address could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The TLS configuration is unusable.
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    /// A token verification key or JWKS source is unusable.
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
    /// The sockets of a handover could not be received.
    #[error("handover: {0}")]
    Handover(String),
    /// The thread-per-core model's worker threads could not start.
    #[error("cannot start the workers: {0}")]
    Workers(io::Error),
    /// The descriptor limit leaves no client connection or no member connection once what is
    /// reserved is held: the proxy would answer its probes and refuse every client.
    #[error(
        "the descriptor limit ({limit}) leaves {clients} client and {outbound} member connections once {reserve} \
         are reserved (what the process holds, twice [admin] max_connections, and spare): raise the limit \
         (LimitNOFILE, ulimit -n) or lower [admin] max_connections"
    )]
    Descriptors {
        /// The soft descriptor limit.
        limit: u64,
        /// Kept out of the budget.
        reserve: u64,
        /// Client connections it leaves.
        clients: usize,
        /// Outbound descriptors it leaves.
        outbound: usize,
    },
    /// A reload changes something only a restart can apply (listener addresses or their TLS
    /// setting, the admin address); it is refused as a whole.
    #[error("{0} changed: that needs a restart, so the reload is refused")]
    NeedsRestart(&'static str),
    /// The fleet's state store could not be opened (a state directory that cannot be created or
    /// read).
    #[error("fleet store: {0}")]
    Fleet(#[from] crate::fleet::StoreError),
    /// A file the configuration names does not load (a reload's: see [`check_files`]).
    #[error("{0}")]
    Files(String),
}

/// Reads every file the configuration names (certificates and keys, token keys, JWKS CA files)
/// as `run` would load them: one message per problem, each naming its file. Empty when all load.
/// `check-config` runs this after the configuration itself is valid.
pub fn check_files(config: &Config) -> Vec<String> {
    let mut problems: Vec<String> = Vec::new();
    if let Some(t) = &config.tls {
        problems.extend(tls::check_files(t).iter().map(ToString::to_string));
    }
    problems.extend(crate::auth::check_files(&config.auth).iter().map(ToString::to_string));
    for r in &config.routes {
        if let Some(rec) = &r.recording {
            if let Err(e) = crate::session::recording::check_directory(&rec.directory) {
                problems.push(format!("route {}: recording directory {}: {e}", r.name, rec.directory.display()));
            }
        }
    }
    problems
}

/// `portcullis health`: one GET of a running proxy's admin endpoint (`/live` or `/ready`),
/// bounded by `limit`. The answer's status and body when it is 200, else why not.
pub async fn health_check(url: &str, limit: Duration) -> Result<String, String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("{url} is not a URL"))?;
    let client = outbound::HttpClient::new(None)?;
    let (status, body) =
        client.get(&uri, http::HeaderMap::new(), 4096, limit).await.map_err(|e| format!("{url}: {e}"))?;
    let said = format!("{url}: {status} {}", String::from_utf8_lossy(&body).trim());
    if status == http::StatusCode::OK {
        Ok(said)
    } else {
        Err(said)
    }
}

/// One line for the log at start: what the configuration in force serves, and how.
pub fn summary(config: &Config) -> String {
    let listeners: Vec<String> = config
        .listeners
        .iter()
        .map(|l| {
            let addrs: Vec<String> = l.addresses.iter().map(ToString::to_string).collect();
            format!("{} {}{}", l.name, addrs.join(","), if l.tls { " tls" } else { "" })
        })
        .collect();
    let routes: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
    let s = &config.server;
    format!(
        "listeners [{}]; routes [{}]; {} static keys, {} JWKS sources; max_connections {}, per address {}; \
         worker_threads {} ({}); drain_timeout {:?}",
        listeners.join("; "),
        routes.join(", "),
        config.auth.keys.len(),
        config.auth.jwks.len(),
        s.max_connections,
        s.max_connections_per_ip,
        s.worker_threads,
        match s.worker_model {
            WorkerModel::WorkStealing => "work_stealing",
            WorkerModel::ThreadPerCore => "thread_per_core",
        },
        s.drain_timeout,
    )
}

/// Builds everything a configuration needs (certificates, keys) without touching the
/// running server; fails without side effects.
fn build_runtime(
    config: Config,
    denylist: &Arc<Denylist>,
    previous: Option<&Runtime>,
    metrics: &Metrics,
) -> Result<Runtime, ServerError> {
    let tls = match (&config.tls, config.listeners.iter().any(|l| l.tls)) {
        (Some(t), true) => Some(tls::server_config(t, config.http2.enabled)?),
        _ => None,
    };
    let authenticator = if config.auth.keys.is_empty() && config.auth.jwks.is_empty() {
        None
    } else {
        let previous = previous.and_then(|p| p.authenticator.as_deref());
        Some(Authenticator::new(&config.auth, denylist.clone(), previous)?)
    };
    let probe = connect::probe();
    let route_state = config
        .routes
        .iter()
        .map(|r| {
            let kept = previous.and_then(|p| {
                let old = p.config.routes.iter().find(|o| o.name == r.name)?;
                RouteState::reusable(old, r).then(|| p.route_state.get(&r.name).cloned()).flatten()
            });
            (r.name.clone(), kept.unwrap_or_else(|| Arc::new(RouteState::new(r, &probe))))
        })
        .collect();
    let upstreams = upstreams(&config, previous, metrics);
    for r in &config.routes {
        let guarded = r.auth.is_some() || r.origin.is_some();
        let reasons = if guarded { crate::auth::AuthError::REASONS } else { &[] };
        metrics.preregister_route(&r.name, r.kind.websocket(), reasons);
    }
    // The buckets survive a reload that keeps the rate.
    let keep = |old: Option<&Arc<crate::limits::RatePerIp>>, rate: (u32, u32)| {
        old.filter(|r| r.settings == rate)
            .cloned()
            .or_else(|| crate::limits::RatePerIp::new(rate.0, rate.1).map(Arc::new))
    };
    let s = &config.server;
    let handshake_rate =
        keep(previous.and_then(|p| p.handshake_rate.as_ref()), (s.handshake_rate_per_ip, s.handshake_burst_per_ip));
    let connection_rate =
        keep(previous.and_then(|p| p.connection_rate.as_ref()), (s.connection_rate_per_ip, s.connection_burst_per_ip));
    let token_check_rate = keep(
        previous.and_then(|p| p.token_check_rate.as_ref()),
        (s.token_check_rate_per_ip, s.token_check_burst_per_ip),
    );
    let mut credential_cookies: Vec<String> = previous.map(|p| p.credential_cookies.to_vec()).unwrap_or_default();
    for name in config.credential_cookies() {
        if !credential_cookies.iter().any(|n| n == name) {
            credential_cookies.push(name.to_owned());
        }
    }
    Ok(Runtime {
        credential_cookies: credential_cookies.into(),
        routes: RouteTable::new(&config.routes),
        authenticator,
        tls,
        route_state,
        upstreams,
        handshake_rate,
        connection_rate,
        token_check_rate,
        config,
    })
}

/// One keep-alive client per distinct upstream setting of the HTTP routes, the previous
/// configuration's kept where the settings are unchanged.
fn upstreams(config: &Config, previous: Option<&Runtime>, metrics: &Metrics) -> HashMap<String, HttpRoute> {
    // One member's idle connections are held to an eighth of the outbound budget, as an address's
    // or a subject's caps are, on a reload too: at a small descriptor limit one member could
    // otherwise keep three quarters of the pooled share idle, and every request to another
    // member would be asked to close its connection.
    let idle_share = usize::try_from(crate::limits::per_holder_share()).unwrap_or(usize::MAX);
    let settings = |r: &RouteConfig| UpstreamSettings {
        connect_timeout: r.backend.connect_timeout,
        max_idle_per_member: r.backend.max_idle_per_member.min(idle_share),
        pool_idle_timeout: r.backend.pool_idle_timeout,
    };
    let mut by_settings: HashMap<UpstreamSettings, Upstream> = HashMap::new();
    if let Some(p) = previous {
        for r in p.config.routes.iter().filter(|r| r.kind.http()) {
            if let Some(h) = p.upstreams.get(&r.name) {
                by_settings.entry(settings(r)).or_insert_with(|| h.client.clone());
            }
        }
    }
    config
        .routes
        .iter()
        .filter(|r| r.kind.http())
        .map(|r| {
            let client = by_settings.entry(settings(r)).or_insert_with(|| outbound::upstream(settings(r))).clone();
            // Built once per configuration, not per request: the keys' ids and ciphers.
            let affinity = r
                .affinity
                .as_ref()
                .and_then(|a| crate::routing::affinity::Keys::new(a.keys.iter().map(|k| k.expose())));
            (r.name.clone(), HttpRoute { client, metrics: metrics.http_route(&r.name), affinity })
        })
        .collect()
}

impl Shared {
    /// Validates and swaps in a new configuration: routes, certificates, keys and limits
    /// apply to new connections at once; live sessions keep the route settings they started
    /// with. Sessions on routes that no longer exist are closed (1001 "route removed") after
    /// `removed_route_grace`. A configuration whose listeners (addresses, TLS) or admin address
    /// differ is refused: those need a restart. On error the old configuration stays in force.
    pub fn reload(&self, config: Config) -> Result<(), ServerError> {
        let result = self.try_reload(config);
        metrics::reload(result.is_ok());
        match &result {
            Ok(()) => tracing::info!("configuration reloaded"),
            Err(e) => tracing::error!(error = %e, "configuration reload refused; the previous one stays in force"),
        }
        result
    }

    /// Ends (as revoked) the sessions whose token a key `retired` says so of verified: one a
    /// JWKS fetch retired or replaced, one a reload removed. A compromised key authorizes
    /// nothing from then on, not even the sessions it opened.
    fn end_sessions_of_keys(&self, retired: impl Fn(&crate::auth::KeyPrint) -> bool) {
        let mut ended = 0;
        for e in self.sessions.list() {
            if e.token_key.as_ref().is_some_and(&retired) && e.control.stopped().is_none() {
                e.control.stop(StopReason::Revoked);
                ended += 1;
            }
        }
        if ended > 0 {
            tracing::info!(sessions = ended, "sessions ended: the key that verified their token is no longer in force");
        }
    }

    fn try_reload(&self, config: Config) -> Result<(), ServerError> {
        let old = self.runtime.load_full();
        // Bound sockets keep what they were bound with: a reload that would change them is
        // refused, never half-applied (a TLS listener must not turn plaintext).
        let listeners = |c: &Config| {
            c.listeners
                .iter()
                .map(|l| (l.addresses.clone(), l.tls, l.proxy_protocol.clone(), l.reuse_port))
                .collect::<Vec<_>>()
        };
        if listeners(&old.config) != listeners(&config) {
            return Err(ServerError::NeedsRestart("listener addresses, tls, proxy_protocol or reuse_port setting"));
        }
        if old.config.admin.as_ref().map(|a| a.address) != config.admin.as_ref().map(|a| a.address) {
            return Err(ServerError::NeedsRestart("admin address"));
        }
        if old.config.fleet != config.fleet {
            // The store is opened once, before the first port accepts; the locks it holds are
            // in force whatever the reload says.
            tracing::warn!("[fleet] changed: the store in use stays until a restart");
        }
        // Every file it names loads, as `check-config` and a start require: a reload is
        // refused as a whole, never applied with a recording directory no session can write.
        let problems = check_files(&config);
        if !problems.is_empty() {
            return Err(ServerError::Files(problems.join("; ")));
        }
        let grace = config.server.removed_route_grace;
        let runtime = build_runtime(config, &self.denylist, Some(&old), &self.metrics)?;
        // Applied: what it says of the settings read at start is compared with the values in
        // force, the ones the process started with (not the last reload's).
        for setting in self.start_only.changed(&runtime.config) {
            tracing::warn!(
                setting,
                "changed by a reload, which does not apply it: the value in force stays until a restart"
            );
        }
        self.sessions.routes_in_force(runtime.config.routes.iter().map(|r| r.name.clone()));
        // A key the reload removes (a static one, or a whole JWKS source's; a source it keeps
        // starts from the keys it had) ends the sessions of the tokens it verified.
        let known = |r: &Runtime| r.authenticator.as_ref().map(|a| a.known_keys()).unwrap_or_default();
        let removed: HashSet<_> = known(&old).difference(&known(&runtime)).copied().collect();
        self.runtime.store(Arc::new(runtime));
        if !removed.is_empty() {
            self.end_sessions_of_keys(|k| removed.contains(k));
        }
        let removed = self.sessions.on_removed_routes().len();
        if removed > 0 {
            tracing::info!(sessions = removed, grace = ?grace, "sessions on removed routes close after the grace period");
            let (sessions, drain) = (self.sessions.clone(), self.sessions.drain_signal().clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(grace) => {}
                    _ = drain.cancelled() => return,
                }
                // Whatever is on a route not in force then, a session whose handshake the
                // reload overtook included (a later reload may have brought its route back).
                for s in sessions.on_removed_routes() {
                    s.control.stop(StopReason::RouteRemoved);
                }
            });
        }
        Ok(())
    }
}

/// Why [`Server::serve`]'s shutdown future resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM or SIGINT: drain and exit.
    Shutdown,
    /// A new process took the listening sockets over: stop accepting, let the connections in
    /// their handshake become sessions, then drain and exit.
    HandedOver,
}

impl From<()> for Stop {
    fn from(_: ()) -> Stop {
        Stop::Shutdown
    }
}

/// A listener bound from the configuration.
pub struct BoundListener {
    /// Listener name from the configuration.
    pub name: String,
    /// Whether connections are TLS.
    pub tls: bool,
    /// PROXY protocol sources, when the listener requires the header.
    pub proxy_protocol: Option<Arc<[ipnet::IpNet]>>,
    /// The address as the configuration writes it (port 0 stays 0): what a handover matches.
    pub configured: SocketAddr,
    /// The socket.
    pub listener: TcpListener,
}

/// Every socket the server will serve, bound before serving starts.
pub struct Bound {
    /// Client listeners.
    pub listeners: Vec<BoundListener>,
    /// The admin listener, if configured.
    pub admin: Option<TcpListener>,
}

/// The name a handover gives the admin listener (listener names are labels, so it cannot clash).
pub const ADMIN_LISTENER: &str = "admin listener";

impl Bound {
    /// Binds every listener address and the admin address of `config`.
    pub async fn bind(config: &Config) -> Result<Bound, ServerError> {
        Bound::bind_with(config, |_, _| None)
    }

    /// Like [`Bound::bind`], but takes the socket `inherited(name, configured address)` gives
    /// when it gives one (a handover from a running process), and binds the others.
    pub fn bind_with(
        config: &Config,
        mut inherited: impl FnMut(&str, SocketAddr) -> Option<std::net::TcpListener>,
    ) -> Result<Bound, ServerError> {
        let adopt = |addr: SocketAddr, l: std::net::TcpListener| {
            let err = |source| ServerError::Bind { addr, source };
            l.set_nonblocking(true).map_err(err)?;
            TcpListener::from_std(l).map_err(err)
        };
        // Thread-per-core: a socket per worker and address, so the kernel spreads connections
        // over the workers.
        let per_address = sockets_per_address(&config.server);
        let mut listeners = Vec::new();
        for l in &config.listeners {
            for &addr in &l.addresses {
                let (first, handed) = match inherited(&l.name, addr) {
                    Some(s) => (adopt(addr, s)?, true),
                    None => (bind(addr, l.reuse_port || per_address > 1)?, false),
                };
                let local = first.local_addr().map_err(|source| ServerError::Bind { addr, source })?;
                let mut sockets = vec![first];
                // Every further socket a handover gives for this address (the previous
                // process's other workers') is served too: closing one would reset the
                // connections waiting in its queue.
                while let Some(s) = inherited(&l.name, addr) {
                    sockets.push(adopt(addr, s)?);
                }
                while sockets.len() < per_address {
                    sockets.push(bind(local, true).map_err(|e| no_room(handed, &l.name, local, e))?);
                }
                for listener in sockets {
                    listeners.push(BoundListener {
                        name: l.name.clone(),
                        tls: l.tls,
                        proxy_protocol: l.proxy_protocol.as_deref().map(Arc::from),
                        configured: addr,
                        listener,
                    });
                }
            }
        }
        let admin = match &config.admin {
            Some(a) => Some(match inherited(ADMIN_LISTENER, a.address) {
                Some(s) => adopt(a.address, s)?,
                None => bind(a.address, false)?,
            }),
            None => None,
        };
        Ok(Bound { listeners, admin })
    }

    /// Duplicates of every listening socket, named as [`Bound::bind_with`] matches them: what
    /// a handover sends to the process taking over.
    pub fn handover_sockets(
        &self,
        config: &Config,
    ) -> std::io::Result<Vec<(String, SocketAddr, std::os::fd::OwnedFd)>> {
        use std::os::fd::AsFd;
        let mut out = Vec::new();
        for l in &self.listeners {
            out.push((l.name.clone(), l.configured, l.listener.as_fd().try_clone_to_owned()?));
        }
        if let (Some(admin), Some(a)) = (&self.admin, &config.admin) {
            out.push((ADMIN_LISTENER.to_owned(), a.address, admin.as_fd().try_clone_to_owned()?));
        }
        Ok(out)
    }

    /// Local addresses of the client listeners, in configuration order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|l| l.listener.local_addr().ok()).collect()
    }

    /// Local address of the admin listener.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }
}

fn bind(addr: SocketAddr, reuse_port: bool) -> Result<TcpListener, ServerError> {
    let err = |source| ServerError::Bind { addr, source };
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    if reuse_port {
        // Linux spreads new connections over every socket bound to the address with it, one
        // per process (or per listener), by a hash of the connection's addresses.
        socket.set_reuse_port(true).map_err(err)?;
    }
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(4096).map_err(err)?;
    TcpListener::from_std(socket.into()).map_err(err)
}

/// A further worker's socket that could not be bound beside a socket handed over: when the
/// address is in use, that socket was bound without `SO_REUSEPORT` (work stealing, no
/// `reuse_port`) and admits no other beside it, which only a restart changes.
fn no_room(handed: bool, listener: &str, local: SocketAddr, e: ServerError) -> ServerError {
    match &e {
        ServerError::Bind { source, .. } if handed && source.kind() == io::ErrorKind::AddrInUse => {
            ServerError::Handover(format!(
                "listener {listener:?} on {local}: the socket handed over has no room for a socket per worker ({e}); changing worker_model or worker_threads to more sockets than the running process has needs a restart"
            ))
        }
        _ => e,
    }
}

/// The number of workers `run` has for `configured` (`worker_threads`; 0: `TOKIO_WORKER_THREADS`
/// when it is a number, else one per core, as tokio counts them).
pub fn worker_count(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    let env = std::env::var_os("TOKIO_WORKER_THREADS").and_then(|v| v.to_str()?.parse::<usize>().ok());
    match env {
        Some(n) if n > 0 => n,
        _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

/// How many sockets each listener address gets: one per worker in the thread-per-core model
/// with more than one worker, else one.
fn sockets_per_address(s: &crate::config::ServerSettings) -> usize {
    match s.worker_model {
        WorkerModel::ThreadPerCore => worker_count(s.worker_threads),
        WorkerModel::WorkStealing => 1,
    }
}

/// The thread-per-core model's workers besides the one `serve` runs on: a thread each, with a
/// current-thread runtime that runs its listeners' accept loops and every connection they
/// accept, until [`Workers::stop`] (or the drop) ends it.
struct Workers {
    /// Worker k's runtime at k - 1: where its accept loops are spawned.
    handles: Vec<tokio::runtime::Handle>,
    /// The threads, joined by [`Workers::stop`].
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Ends every worker's runtime.
    stop: CancellationToken,
}

impl Workers {
    /// Starts `n` workers, named `pc-worker-1` … `pc-worker-N` (`serve`'s own thread is
    /// worker 0).
    async fn start(n: usize) -> io::Result<Workers> {
        let mut workers = Workers { handles: Vec::new(), threads: Vec::new(), stop: CancellationToken::new() };
        for k in 1..=n {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let stop = workers.stop.clone();
            let thread = std::thread::Builder::new().name(format!("pc-worker-{k}")).spawn(move || {
                // A share of tokio's 512 blocking threads each (the main thread's runtime keeps
                // its own 512): not 512 per worker.
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .thread_name("pc-blocking")
                    .max_blocking_threads((512 / (n + 1)).max(16))
                    .build();
                match runtime {
                    Ok(runtime) => {
                        let _ = tx.send(Ok(runtime.handle().clone()));
                        runtime.block_on(stop.cancelled());
                        // What is left after the drain ends with the worker, as at exit.
                        runtime.shutdown_timeout(Duration::from_secs(1));
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })?;
            workers.threads.push(thread);
            let handle =
                rx.await.map_err(|_| io::Error::other("a worker thread ended before its runtime started"))??;
            workers.handles.push(handle);
        }
        Ok(workers)
    }

    /// Ends every worker's runtime and waits for its thread.
    async fn stop(mut self) {
        self.stop.cancel();
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A server ready to serve: configuration validated, certificates and keys loaded.
pub struct Server {
    shared: Arc<Shared>,
    /// The thread-per-core model's further workers, started with the server (before a
    /// handover's new process says it is ready).
    workers: Option<Workers>,
}

impl Server {
    /// Builds the server state from a validated configuration: opens the fleet's store and
    /// applies every lock in force (the listeners accept only once this has returned).
    pub async fn new(config: Config) -> Result<Server, ServerError> {
        let denylist = Arc::new(Denylist::default());
        let (fleet, locks) = crate::fleet::Fleet::open(&config.fleet).await?;
        let workers = match sockets_per_address(&config.server) {
            n if n > 1 => Some(Workers::start(n - 1).await.map_err(ServerError::Workers)?),
            _ => None,
        };
        // Sized once the listeners are bound, the workers run and the store is open: what they
        // hold is reserved as it is, whatever the machine.
        // Each admin connection may hold a file too (a recording it serves).
        let admin = config.admin.as_ref().map_or(0, |a| a.max_connections.saturating_mul(2));
        let budget = crate::limits::Budget::of_process(admin, config.server.max_connections);
        if budget.clients == 0 || budget.outbound == 0 {
            let (limit, reserve, clients, outbound) = (budget.limit, budget.reserve, budget.clients, budget.outbound);
            return Err(ServerError::Descriptors { limit, reserve, clients, outbound });
        }
        let max_connections = budget.clients;
        let outbound = crate::limits::init_outbound(&budget);
        tracing::info!(
            descriptor_limit = budget.limit,
            reserved = budget.reserve,
            client_connections = max_connections,
            outbound,
            "descriptor budget"
        );
        // The default asks for as many as the descriptors allow; a number of one's own is warned of.
        let configured = config.server.max_connections != crate::config::ServerSettings::default().max_connections;
        if configured && max_connections < config.server.max_connections {
            tracing::warn!(
                configured = config.server.max_connections,
                in_force = max_connections,
                descriptor_limit = budget.limit,
                "max_connections is more than half of the descriptor budget; raise the descriptor limit \
                 (LimitNOFILE, ulimit -n) or lower max_connections"
            );
        }
        let share = crate::limits::per_holder_share();
        for (key, configured) in [
            ("max_connections_per_ip", config.server.max_connections_per_ip),
            ("max_streams_per_ip", config.http2.max_streams_per_ip),
            ("max_sessions_per_subject", config.auth.max_sessions_per_subject),
        ] {
            if configured > share {
                tracing::warn!(
                    key,
                    configured,
                    in_force = share,
                    descriptor_limit = budget.limit,
                    "a per-address or per-subject cap is held to an eighth of the outbound descriptor budget, or \
                     one client could hold all of it; raise the descriptor limit (LimitNOFILE, ulimit -n)"
                );
            }
        }
        let idle_share = usize::try_from(share).unwrap_or(usize::MAX);
        let held: Vec<&RouteConfig> =
            config.routes.iter().filter(|r| r.kind.http() && r.backend.max_idle_per_member > idle_share).collect();
        if !held.is_empty() {
            // The default is held without a warning at a small limit, as max_connections's is; a
            // number of one's own that is not kept is warned of.
            let default = crate::config::BackendSettings::default().max_idle_per_member;
            let configured = held.iter().any(|r| r.backend.max_idle_per_member != default);
            let routes = held.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", ");
            const HELD: &str = "max_idle_per_member is held to an eighth of the outbound descriptor budget, or one \
                                member's idle connections could keep most of the pooled share; raise the descriptor \
                                limit (LimitNOFILE, ulimit -n) for more";
            if configured {
                tracing::warn!(%routes, in_force = share, descriptor_limit = budget.limit, "{HELD}");
            } else {
                tracing::info!(%routes, in_force = share, descriptor_limit = budget.limit, "{HELD}");
            }
        }
        let start_only = crate::config::StartOnly::of(&config);
        // The recorder first: metric handles made before it would record nowhere.
        let metrics = Metrics::global();
        // The cap is the semaphore's, sized once here: a reload does not change it.
        crate::metrics::connections_limit(max_connections);
        metrics.preregister_closes(
            crate::session::close::CODE_LABELS,
            &crate::session::Initiator::ALL.map(crate::session::Initiator::as_str),
        );
        let runtime = build_runtime(config, &denylist, None, &metrics)?;
        let sessions = Arc::new(Sessions::default());
        sessions.routes_in_force(runtime.config.routes.iter().map(|r| r.name.clone()));
        Ok(Server {
            workers,
            shared: Arc::new(Shared {
                conn_limit: Arc::new(Semaphore::new(max_connections)),
                start_only,
                runtime: ArcSwap::from_pointee(runtime),
                metrics,
                tasks: TaskTracker::new(),
                stop_accepting: CancellationToken::new(),
                handshaking: Default::default(),
                denylist,
                sessions,
                conns: ConnCounts::new(),
                per_ip: Arc::new(crate::limits::PerIp::budgeted()),
                per_ip_streams: Arc::new(crate::limits::PerIp::budgeted()),
                per_subject: Arc::new(crate::limits::PerSubject::budgeted()),
                recording_ledgers: Default::default(),
                resumes: Arc::default(),
                fanouts: Arc::default(),
                workers: std::sync::OnceLock::new(),
                fleet,
            }),
        })
        .inspect(|server| {
            // Every session's start and end reaches the fleet's directory, when there is one
            // (nothing is built per session for the local store).
            if server.shared.fleet.has_directory() {
                server.shared.sessions.watch(Arc::new(Directory(server.shared.fleet.clone())));
            }
            // Before any port accepts, every lock in force refuses its tokens.
            for lock in &locks {
                server.shared.fleet.first_sight(lock);
                admin::apply_lock(&server.shared, lock);
                crate::metrics::fleet_lock_applied("local", None);
            }
            let s = &server.shared.fleet;
            tracing::info!(
                store = s.store_name(),
                instance = s.instance(),
                reachable = s.health().reachable(),
                locks = locks.len(),
                "fleet store opened"
            );
        })
    }

    /// A handle for [`Shared::reload`], usable while the server runs.
    pub fn handle(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Serves until `shutdown` resolves, then drains. Returns once every session has ended or
    /// `drain_timeout` has passed.
    pub async fn serve<F, S>(self, bound: Bound, shutdown: F) -> Result<(), ServerError>
    where
        F: Future<Output = S>,
        S: Into<Stop>,
    {
        let shared = self.shared;
        let metrics = shared.metrics.clone();
        let stop_admin = CancellationToken::new();
        let mut loops = Vec::new();
        // Thread-per-core: worker 0 is this thread, the others started with the server, and an
        // address's k-th socket is worker k's.
        let workers = self.workers;
        if let Some(w) = &workers {
            let n = w.handles.len() + 1;
            let _ = shared.workers.set(n);
            tracing::info!(workers = n, "thread-per-core: one runtime and one socket per address on each worker");
        }
        let mut nth: HashMap<(String, SocketAddr), usize> = HashMap::new();
        for l in bound.listeners {
            let addr = l.listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
            let kind = ListenerKind { tls: l.tls, proxy_protocol: l.proxy_protocol, peer: false };
            let k = {
                let n = nth.entry((l.name.clone(), l.configured)).or_default();
                *n += 1;
                *n - 1
            };
            let Some(workers) = &workers else {
                tracing::info!(listener = %l.name, %addr, tls = l.tls, proxy_protocol = kind.proxy_protocol.is_some(), "listening");
                loops.push(tokio::spawn(accept_loop(l.listener, kind, shared.clone(), false)));
                continue;
            };
            let worker = k % (workers.handles.len() + 1);
            tracing::info!(listener = %l.name, %addr, tls = l.tls, proxy_protocol = kind.proxy_protocol.is_some(), worker, "listening");
            if worker == 0 {
                loops.push(tokio::spawn(accept_loop(l.listener, kind, shared.clone(), true)));
                continue;
            }
            // The socket moves to the worker's own I/O driver: its connections are accepted,
            // served and woken there.
            let socket = l.listener.into_std().map_err(|source| ServerError::Bind { addr: l.configured, source })?;
            let shared = shared.clone();
            loops.push(workers.handles[worker - 1].spawn(async move {
                match TcpListener::from_std(socket) {
                    Ok(listener) => accept_loop(listener, kind, shared, true).await,
                    Err(e) => tracing::error!(error = %e, "a worker cannot take its listening socket"),
                }
            }));
        }
        // The fleet's peer listener, bound here (with SO_REUSEPORT: a handover's new process
        // binds it beside this one) before any session is published with its address.
        let peer = shared.runtime.load().config.fleet.peer.clone();
        if let (Some(p), Some(_)) = (peer, shared.fleet.peer_auth()) {
            let listener = bind(p.listen, true)?;
            let addr = listener.local_addr().map_err(|source| ServerError::Bind { addr: p.listen, source })?;
            let advertised = p.advertise.clone().unwrap_or_else(|| addr.to_string());
            tracing::info!(%addr, %advertised, "fleet peer listener listening");
            shared.fleet.set_advertised(advertised);
            let kind = ListenerKind { tls: false, proxy_protocol: None, peer: true };
            loops.push(tokio::spawn(accept_loop(listener, kind, shared.clone(), false)));
        }
        if let Some(addr) = bound.admin.as_ref().and_then(|l| l.local_addr().ok()) {
            tracing::info!(%addr, "admin listening");
        }
        let admin_task = bound.admin.map(|l| tokio::spawn(admin::serve(l, shared.clone(), stop_admin.clone())));
        let sweeper = tokio::spawn(sweep_recordings(shared.clone(), stop_admin.clone()));
        // A JWKS fetch that retires or replaces a key ends the sessions of the tokens it
        // verified (a reload that removes a key does the same, in `try_reload`).
        let retired = {
            let (shared, stop) = (shared.clone(), stop_admin.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        () = shared.denylist.keys_retired.notified() => {
                            let retired = shared.denylist.take_retired_keys();
                            shared.end_sessions_of_keys(|k| retired.contains(k));
                        }
                    }
                }
            })
        };
        let feed = shared.fleet.take_feed().map(|feed| tokio::spawn(apply_fleet_feed(shared.clone(), feed)));
        let upkeep = {
            let stop = stop_admin.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                let mut n = 0u64;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {
                            metrics.run_upkeep();
                            crate::metrics::fleet_staleness(shared.fleet.health().staleness().as_secs_f64());
                            let fleet = &shared.fleet;
                            crate::metrics::fleet_directory(fleet.others_len() + shared.sessions.len(), fleet.others().len() + 1);
                            n += 1;
                            // Every minute: forget the handshake buckets of idle addresses.
                            if n % 12 == 0 {
                                let runtime = shared.runtime.load();
                                let limiters = [&runtime.handshake_rate, &runtime.connection_rate, &runtime.token_check_rate];
                                for r in limiters.into_iter().flatten() {
                                    r.purge();
                                }
                            }
                        }
                    }
                }
            })
        };

        if let Stop::HandedOver = shutdown.await.into() {
            // The new process accepts on the same sockets now. Connections this one accepted
            // finish their handshake here (they become sessions, drained below with the rest)
            // rather than being refused by the drain.
            shared.stop_accepting.cancel();
            // Once the accept loops are done, every connection they took is counted.
            for l in loops.drain(..) {
                let _ = l.await;
            }
            let s = &shared.runtime.load().config.server;
            let limit = s.tls_handshake_timeout + s.header_read_timeout;
            let _ = tokio::time::timeout(limit, shared.handshaking.settled()).await;
        }
        let sessions = shared.tasks.len();
        tracing::info!(sessions, "draining");
        shared.stop_accepting.cancel();
        shared.sessions.drain();
        for l in loops {
            let _ = l.await;
        }
        shared.tasks.close();
        let drain_timeout = shared.runtime.load().config.server.drain_timeout;
        if tokio::time::timeout(drain_timeout, shared.tasks.wait()).await.is_err() {
            tracing::warn!(left = shared.tasks.len(), "drain timeout reached; closing remaining connections");
            // What is dropped from here on (an answer still waiting, a body not taken) was
            // cut by the drain: its lines say `drain`, not that its client left.
            shared.sessions.drain_timed_out();
        } else {
            tracing::info!("drained");
        }
        stop_admin.cancel();
        if let Some(t) = admin_task {
            let _ = t.await;
        }
        let _ = upkeep.await;
        let _ = sweeper.await;
        let _ = retired.await;
        if let Some(f) = feed {
            f.abort();
        }
        if let Some(workers) = workers {
            workers.stop().await;
        }
        shared.fleet.shutdown().await;
        Ok(())
    }
}

/// Publishes this instance's sessions to the fleet's directory (nothing with the local store).
struct Directory(Arc<crate::fleet::Fleet>);

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Directory").field(&self.0.instance()).finish()
    }
}

impl crate::session::Watcher for Directory {
    fn started(&self, e: &crate::session::SessionEntry) {
        let started_ms = e.started.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        self.0.session_started(crate::fleet::DirEntry {
            instance: self.0.instance().to_owned(),
            id: e.id,
            kind: e.kind.get().as_str().to_owned(),
            route: e.route.clone(),
            agent: e.agent.clone(),
            subject: e.subject.clone(),
            issuer: e.issuer.clone(),
            // Counted under the subject's caps as on this instance (see `SessionEntry::counted`).
            token: e.counted.load(std::sync::atomic::Ordering::Acquire)
                && (e.token_exp.is_some() || e.subject.is_some() || e.issuer.is_some()),
            client: e.client.to_string(),
            started_ms,
            resume: e.attachment::<crate::session::resume::Held>().map(|h| crate::fleet::resume_key(&h.route, h.id())),
            peer: self.0.advertised().map(str::to_owned),
        });
    }

    fn ended(&self, e: &crate::session::SessionEntry) {
        self.0.session_ended(e.id);
    }
}

/// Applies what the store's feed brings: the locks other instances make, and the commands they
/// send this one, for as long as the process serves (revocations keep applying during the
/// drain).
async fn apply_fleet_feed(shared: Arc<Shared>, mut feed: tokio::sync::mpsc::UnboundedReceiver<crate::fleet::Feed>) {
    use crate::fleet::Feed;
    while let Some(item) = feed.recv().await {
        let lock = match item {
            Feed::Lock { lock } => lock,
            Feed::Kill { id, by } => {
                let cut = shared.sessions.revoke(&crate::session::Selector::Id(id), crate::session::Spare::Nothing);
                tracing::info!(session = id, asked_on = %by, closed = cut.len(), "session revoked for another instance");
                let floor = crate::fleet::now_secs() + shared.runtime.load().config.auth.revocation_ttl.as_secs();
                for d in admin::deny_cut_tokens(&shared, &cut, floor) {
                    write_derived(&shared, d);
                }
                continue;
            }
            Feed::Rebalance { route, fraction, spread, by } => {
                if shared.runtime.load().config.routes.iter().any(|r| r.name == route) {
                    tracing::info!(route, asked_on = %by, "fleet rebalance");
                    admin::rebalance_here(
                        &shared,
                        &route,
                        fraction.clamp(0.0, 1.0),
                        spread.min(Duration::from_secs(3600)),
                    );
                }
                continue;
            }
        };
        // A lock this process made was applied when it was made (`Fleet::write` marks it);
        // one of this instance's name from before a restart was not, and is applied now.
        if !shared.fleet.first_sight(&lock) {
            continue;
        }
        let (closed, derived) = admin::apply_lock(&shared, &lock);
        let latency = Duration::from_millis(crate::fleet::now_ms().saturating_sub(lock.at_ms));
        crate::metrics::fleet_lock_applied("fleet", Some(latency.as_secs_f64()));
        tracing::info!(lock = %lock.id, origin = %lock.origin, closed = closed.len(), latency_ms = latency.as_millis() as u64, "fleet lock applied");
        for d in derived {
            write_derived(&shared, d);
        }
    }
}

/// Writes a token refusal this instance derived (from a lock or a command of another), in the
/// background, retried (backing off to 10 s) until the store takes it or it lapses: until then
/// only this instance refuses the token.
fn write_derived(shared: &Arc<Shared>, lock: crate::fleet::Lock) {
    let fleet = shared.fleet.clone();
    tokio::spawn(async move {
        let mut wait = Duration::from_millis(200);
        while let Err(e) = fleet.write(&lock).await {
            if lock.lapsed() {
                return;
            }
            tracing::warn!(error = %e, retry_ms = wait.as_millis() as u64, "a token refusal derived from a fleet lock was not written to the store");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(10));
        }
    });
}

/// Sweeps each recorded route's directory every `sweep_interval` ([`crate::session::recording::sweep`]),
/// under the configuration in force at each turn, until `stop`.
async fn sweep_recordings(shared: Arc<Shared>, stop: CancellationToken) {
    let mut last: HashMap<String, std::time::Instant> = HashMap::new();
    loop {
        let routes: Vec<(String, Arc<crate::config::RecordingSettings>)> = shared
            .runtime
            .load()
            .config
            .routes
            .iter()
            .filter_map(|r| r.recording.clone().map(|rec| (r.name.clone(), rec)))
            .collect();
        let now = std::time::Instant::now();
        let mut next = Duration::from_secs(60);
        for (route, settings) in routes {
            let due = last.get(&route).is_none_or(|at| now.duration_since(*at) >= settings.sweep_interval);
            if due {
                last.insert(route.clone(), now);
                let settings = settings.clone();
                let ledger = shared.recording_ledgers.of(&settings.directory);
                let _ =
                    tokio::task::spawn_blocking(move || crate::session::recording::sweep(&route, &settings, &ledger))
                        .await;
            }
            next = next.min(settings.sweep_interval);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
        }
    }
}

/// Builds a [`Server`] and serves until `shutdown` resolves (see [`Server::serve`]).
pub async fn serve(config: Config, bound: Bound, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    Server::new(config).await?.serve(bound, shutdown).await
}

/// Reloads the configuration at `path` into the running server. A file that does not parse or
/// validate is refused (logged, counted as `portcullis_reloads_total{result="error"}`) and the
/// running configuration stays.
pub fn reload_from_file(shared: &Shared, path: &std::path::Path) -> Result<(), String> {
    match Config::load(path) {
        Ok(config) => shared.reload(config).map_err(|e| e.to_string()),
        Err(e) => {
            metrics::reload(false);
            tracing::error!(error = %e, "configuration reload refused; the previous one stays in force");
            Err(e.to_string())
        }
    }
}

/// Reloads on SIGHUP, and when the file's content changes (checked every `poll`; a change is
/// applied once two consecutive reads agree, so a half-written file is not loaded). Runs until
/// the server drains.
pub async fn watch_config(shared: Arc<Shared>, path: std::path::PathBuf, poll: Duration) {
    let fingerprint = |p: &std::path::Path| std::fs::read(p).ok().map(|b| xxhash_rust::xxh3::xxh3_64(&b));
    let mut current = fingerprint(&path);
    let mut candidate = None;
    let mut tick = tokio::time::interval(if poll.is_zero() { Duration::from_secs(3600) } else { poll });
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = shared.sessions.drain_signal().cancelled() => return,
            _ = hangup => {
                tracing::info!(path = %path.display(), "SIGHUP: reloading configuration");
                let _ = reload_from_file(&shared, &path);
                current = fingerprint(&path);
                candidate = None;
            }
            _ = tick.tick(), if !poll.is_zero() => {
                let seen = fingerprint(&path);
                if seen == current || seen.is_none() {
                    candidate = None;
                } else if seen == candidate {
                    tracing::info!(path = %path.display(), "configuration file changed: reloading");
                    let _ = reload_from_file(&shared, &path);
                    current = seen;
                    candidate = None;
                } else {
                    candidate = seen;
                }
            }
        }
    }
}
