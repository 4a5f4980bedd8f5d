//! The server: binds listeners, runs the accept loops and the admin listener, and drains on
//! shutdown.
//!
//! [`Bound::bind`] binds every address first (so tests can bind port 0 and read the addresses
//! back); [`serve`] takes the bound listeners and a shutdown future. On shutdown the server stops
//! accepting, `/ready` turns 503, every session is told to close with 1001 (spread over
//! `drain_spread`), and `serve` returns when all sessions are gone or at `drain_timeout`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::auth::{AuthConfigError, Authenticator};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::accept::accept_loop;
use crate::proxy::route::RouteTable;
use crate::proxy::tls::{self, TlsConfigError};
use crate::session::Sessions;

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
}

/// The configuration in force, swapped atomically on reload.
#[derive(Debug)]
pub struct Runtime {
    /// The validated configuration.
    pub config: Config,
    /// Routes, most specific first.
    pub routes: RouteTable,
}

/// State shared by every connection task.
pub struct Shared {
    /// The configuration in force.
    pub runtime: ArcSwap<Runtime>,
    /// Process metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled when the server drains; every session's stop token is a child of it.
    pub drain: CancellationToken,
    /// Connection tasks, awaited during drain.
    pub tasks: TaskTracker,
    /// Connection cap (`max_connections`); a permit is held per connection.
    pub conn_limit: Arc<Semaphore>,
    /// True once draining began (`/ready` answers 503).
    pub draining: AtomicBool,
    /// Token verifier; none when no keys are configured.
    pub authenticator: Option<Arc<Authenticator>>,
    /// Live sessions, for `/sessions` and revocation.
    pub sessions: Arc<Sessions>,
}

/// A listener bound from the configuration.
pub struct BoundListener {
    /// Listener name from the configuration.
    pub name: String,
    /// Whether connections are TLS.
    pub tls: bool,
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

impl Bound {
    /// Binds every listener address and the admin address of `config`.
    pub async fn bind(config: &Config) -> Result<Bound, ServerError> {
        let mut listeners = Vec::new();
        for l in &config.listeners {
            for &addr in &l.addresses {
                listeners.push(BoundListener { name: l.name.clone(), tls: l.tls, listener: bind(addr)? });
            }
        }
        let admin = match &config.admin {
            Some(a) => Some(bind(a.address)?),
            None => None,
        };
        Ok(Bound { listeners, admin })
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

fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    let err = |source| ServerError::Bind { addr, source };
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(4096).map_err(err)?;
    TcpListener::from_std(socket.into()).map_err(err)
}

/// Serves until `shutdown` resolves, then drains. Returns once every session has ended or
/// `drain_timeout` has passed.
pub async fn serve(config: Config, bound: Bound, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    let acceptor = match (&config.tls, bound.listeners.iter().any(|l| l.tls)) {
        (Some(t), true) => Some(TlsAcceptor::from(tls::server_config(t)?)),
        _ => None,
    };
    let metrics = Metrics::global();
    let authenticator = if config.auth.keys.is_empty() && config.auth.jwks.is_empty() {
        None
    } else {
        Some(Authenticator::new(&config.auth)?)
    };
    let drain_timeout = config.server.drain_timeout;
    let shared = Arc::new(Shared {
        conn_limit: Arc::new(Semaphore::new(config.server.max_connections)),
        runtime: ArcSwap::from_pointee(Runtime { routes: RouteTable::new(&config.routes), config }),
        metrics: metrics.clone(),
        drain: CancellationToken::new(),
        tasks: TaskTracker::new(),
        draining: AtomicBool::new(false),
        authenticator,
        sessions: Arc::new(Sessions::default()),
    });
    let stop_admin = CancellationToken::new();
    let mut loops = Vec::new();
    for l in bound.listeners {
        tracing::info!(listener = %l.name, addr = %l.listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), tls = l.tls, "listening");
        let acceptor = if l.tls { acceptor.clone() } else { None };
        loops.push(tokio::spawn(accept_loop(l.listener, acceptor, shared.clone())));
    }
    let admin_task = bound.admin.map(|l| tokio::spawn(admin::serve(l, shared.clone(), stop_admin.clone())));
    let upkeep = {
        let metrics = metrics.clone();
        let stop = stop_admin.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => metrics.run_upkeep(),
                }
            }
        })
    };

    shutdown.await;
    let sessions = shared.tasks.len();
    tracing::info!(sessions, "draining");
    shared.draining.store(true, Ordering::SeqCst);
    shared.drain.cancel();
    for l in loops {
        let _ = l.await;
    }
    shared.tasks.close();
    if tokio::time::timeout(drain_timeout, shared.tasks.wait()).await.is_err() {
        tracing::warn!(left = shared.tasks.len(), "drain timeout reached; closing remaining connections");
    } else {
        tracing::info!("drained");
    }
    stop_admin.cancel();
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    let _ = upkeep.await;
    Ok(())
}
