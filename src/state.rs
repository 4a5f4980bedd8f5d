//! The state every part of a running proxy shares: the configuration in force with what was
//! built from it ([`Runtime`], swapped atomically on reload), and the process-wide handles
//! ([`Shared`]): metrics, the drain token, the connection cap, live sessions, revocations.
//!
//! It depends on the components (config, routing, auth, session, metrics) and on none of the
//! parts that use it: [`crate::server`] builds and reloads it, [`crate::proxy`] reads it per
//! connection, `admin` reads and acts on it.

use std::collections::HashMap;

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Semaphore;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Authenticator, Denylist};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbound::Upstream;
use crate::routing::pool::RouteState;
use crate::routing::sticky::ConnCounts;
use crate::routing::table::RouteTable;
use crate::session::Sessions;

/// The configuration in force, with everything built from it; swapped atomically on reload.
pub struct Runtime {
    /// The validated configuration.
    pub config: Config,
    /// Routes, most specific first.
    pub routes: RouteTable,
    /// Token verifier; none when no keys are configured.
    pub authenticator: Option<Arc<Authenticator>>,
    /// TLS server configuration with the current certificates; none when no listener is TLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Routing state per route name (resolver cache, health, round-robin cursor).
    pub route_state: HashMap<String, Arc<RouteState>>,
    /// What each route that serves plain HTTP needs per request: its keep-alive client
    /// (routes with the same settings share one, and a reload keeps it, with its idle
    /// connections, when they stay) and its pre-registered metric handles.
    pub upstreams: HashMap<String, HttpRoute>,
    /// The per-address handshake limiter, when `handshake_rate_per_ip` is set.
    pub handshake_rate: Option<Arc<crate::limits::RatePerIp>>,
    /// The per-address new-connection limiter, when `connection_rate_per_ip` is set.
    pub connection_rate: Option<Arc<crate::limits::RatePerIp>>,
    /// The per-address limiter of uncached token checks, when `token_check_rate_per_ip` is set.
    pub token_check_rate: Option<Arc<crate::limits::RatePerIp>>,
    /// Names of the cookies that carry tokens ([`crate::config::Config::credential_cookies`]),
    /// of this configuration and of every earlier one this process ran: a browser keeps
    /// sending a cookie a reload renamed, with a live token in it, and no backend may get it.
    pub credential_cookies: Arc<[String]>,
}

/// A plain-HTTP route's client and metrics.
pub struct HttpRoute {
    /// The keep-alive pool to the route's members.
    pub client: Upstream,
    /// Per-request series of the route.
    pub metrics: Arc<crate::metrics::RouteHttpMetrics>,
    /// The route's session-envelope keys (`[routes.affinity]`), when it has them.
    pub affinity: Option<crate::routing::affinity::Keys>,
}

/// State shared by every connection task.
pub struct Shared {
    /// The configuration in force.
    pub runtime: ArcSwap<Runtime>,
    /// Process metrics.
    pub metrics: Arc<Metrics>,
    /// Cancelled when the listeners stop accepting: at the drain, or earlier after a handover.
    pub stop_accepting: CancellationToken,
    /// Connections accepted and not yet a session nor ended (TLS handshake, HTTP phase): a
    /// handover waits for them before the drain, so none is refused.
    pub handshaking: Handshaking,
    /// Connection tasks, awaited during drain.
    pub tasks: TaskTracker,
    /// Connection cap (`max_connections`); a permit is held per connection.
    pub conn_limit: Arc<Semaphore>,
    /// The settings read once, at start, as they are in force.
    pub start_only: crate::config::StartOnly,
    /// Revoked subjects and tokens; kept across reloads.
    pub denylist: Arc<Denylist>,
    /// Live sessions, for `/sessions`, revocation and the drain: its token is the process's
    /// one drain signal ([`Sessions::drain`]).
    pub sessions: Arc<Sessions>,
    /// Live sessions per backend member (least connections); kept across reloads.
    pub conns: Arc<ConnCounts>,
    /// Client connections held per client address (`max_connections_per_ip`).
    pub per_ip: Arc<crate::limits::PerIp>,
    /// HTTP/2 streams held per client address (`max_streams_per_ip`).
    pub per_ip_streams: Arc<crate::limits::PerIp>,
    /// Sessions held per subject (`max_sessions_per_subject`, global and per route).
    pub per_subject: Arc<crate::limits::PerSubject>,
    /// What each recording directory holds, charged by every recording's write.
    pub recording_ledgers: crate::session::recording::Ledgers,
    /// Sessions of routes with `[routes.resume]`, by resume id.
    pub resumes: Arc<crate::session::resume::Resumes>,
    /// Shared backend streams of routes with `[routes.fanout]`.
    pub fanouts: Arc<crate::session::fanout::Fanouts>,
    /// The fleet's state store (revocations that outlive a restart and reach every instance);
    /// opened once, kept across reloads.
    pub fleet: Arc<crate::fleet::Fleet>,
    /// The workers of the thread-per-core model, once it runs (unset: tokio's runtime says).
    pub workers: std::sync::OnceLock<usize>,
}

/// A count of connections still handshaking, and a wake-up when it reaches zero (no polling).
#[derive(Debug, Default)]
pub struct Handshaking {
    n: std::sync::atomic::AtomicUsize,
    settled: tokio::sync::Notify,
}

impl Handshaking {
    /// A connection starts its handshake.
    pub fn enter(&self) {
        self.n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// A connection's handshake is over (it is a session, or it ended).
    pub fn leave(&self) {
        if self.n.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            self.settled.notify_waiters();
        }
    }

    /// Ready once no connection is handshaking.
    pub async fn settled(&self) {
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            // Registered before the count is read: a leave after the read wakes it.
            settled.as_mut().enable();
            if self.n.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                return;
            }
            settled.await;
        }
    }
}
