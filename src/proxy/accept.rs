//! Stage: accept. Takes connections off a bound listener, enforces the connection cap, sets
//! TCP_NODELAY, runs the proxy-protocol stage when the listener is behind a load balancer and
//! the tls stage when it is TLS, and hands over to the http stage.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;

use tracing::Instrument;

use super::tls::{self, ClientStream};
use crate::metrics::Metrics;
use crate::state::Shared;

/// How a bound listener's connections start.
#[derive(Debug, Clone)]
pub struct ListenerKind {
    /// TLS (`wss://`, `https://`) or plain.
    pub tls: bool,
    /// PROXY protocol required, accepted from these sources only.
    pub proxy_protocol: Option<Arc<[ipnet::IpNet]>>,
    /// The fleet's peer listener: each connection opens with a signed preamble from another
    /// instance ([`super::peer::read_preamble`]), which names the client it carries.
    pub peer: bool,
}

/// Accepts connections until the server drains; with `per_worker` (the thread-per-core model),
/// counts each under the worker whose thread runs the loop.
pub async fn accept_loop(listener: TcpListener, kind: ListenerKind, shared: Arc<Shared>, per_worker: bool) {
    let per_worker = per_worker.then(|| crate::metrics::worker_connections(current_worker()));
    let tls = kind.tls;
    loop {
        let accepted = tokio::select! {
            _ = shared.stop_accepting.cancelled() => break,
            r = listener.accept() => r,
        };
        let (tcp, addr) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Some(c) = &per_worker {
            c.increment(1);
        }
        let permit = match shared.conn_limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                shared.metrics.connections_rejected.increment(1);
                tracing::debug!(client = %addr, "connection limit reached; closing");
                drop(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let shared2 = shared.clone();
        // The TLS configuration in force now: a reload with new certificates applies to new
        // connections.
        // A TLS listener never serves plaintext: without certificates the connection is closed.
        let acceptor = if tls { Security::Tls(shared.runtime.load().tls.clone()) } else { Security::Plain };
        let span = tracing::debug_span!("conn", peer = %addr);
        let proxy_from = kind.proxy_protocol.clone();
        let from_peer = kind.peer;
        // Counted before the task runs: a handover that stops accepting now waits for it.
        let slot = ConnSlot::new(permit, &shared2);
        shared.tasks.spawn(
            async move {
                let Some((mut tcp, mut client)) = proxy_header(&shared2, tcp, addr, proxy_from.as_deref()).await else {
                    return;
                };
                if from_peer {
                    // Boxed: the fleet store's nonce check is a future of about 7 KB, which inline
                    // would double the size of every connection's task (moved whole as it is
                    // spawned), for the peer listener's connections only.
                    let Some(relayed) = Box::pin(peer_client(&shared2, &mut tcp, addr)).await else { return };
                    client = relayed;
                }
                let Some(slot) = per_ip(&shared2, client, slot) else { return };
                connection(shared2, tcp, client, acceptor, slot, from_peer).await;
            }
            .instrument(span),
        );
    }
}

/// A connection on the fleet's peer listener: the client its signed, fresh preamble names, or
/// `None` (counted and logged) when the preamble is missing, bad or replayed.
async fn peer_client(shared: &Shared, tcp: &mut TcpStream, addr: SocketAddr) -> Option<SocketAddr> {
    let auth = shared.fleet.peer_auth()?;
    let limit = shared.runtime.load().config.server.tls_handshake_timeout;
    let checked = match super::peer::read_preamble(tcp, auth, limit).await {
        // Fresh here; and over the fleet, where the store says so: a process that took this
        // instance's name (a restart, a handover) saw none of its nonces.
        Ok(p) if shared.fleet.first_nonce(&p.nonce).await => Ok(p.client),
        Ok(_) => Err(crate::fleet::peer::PeerError::Replay),
        Err(e) => Err(e),
    };
    match checked {
        Ok(relayed) => Some(relayed),
        Err(e) => {
            crate::metrics::fleet_peer_refused(e.label());
            tracing::warn!(peer = %addr, error = %e, "peer connection refused");
            None
        }
    }
}

/// The thread-per-core worker this thread is: k on `pc-worker-k`, else 0 (the main thread).
fn current_worker() -> usize {
    let thread = std::thread::current();
    thread.name().and_then(|n| n.strip_prefix("pc-worker-")).and_then(|k| k.parse().ok()).unwrap_or(0)
}

/// A connection's place under `max_connections`, counted in `portcullis_connections_active`;
/// held by whichever task serves the connection (the relay task once upgraded).
pub struct ConnSlot {
    _permit: OwnedSemaphorePermit,
    _per_ip: Option<crate::limits::IpSlot>,
    metrics: Arc<Metrics>,
    /// Counted in `Shared::handshaking` from accept until the connection is a session.
    handshaking: Option<Arc<Shared>>,
}

impl ConnSlot {
    fn new(permit: OwnedSemaphorePermit, shared: &Arc<Shared>) -> Self {
        shared.metrics.connections_total.increment(1);
        shared.metrics.connections_active.increment(1.0);
        shared.handshaking.enter();
        ConnSlot { _permit: permit, _per_ip: None, metrics: shared.metrics.clone(), handshaking: Some(shared.clone()) }
    }

    /// The connection's handshake phase is over (it is a session now, or about to end).
    pub fn handshake_done(&mut self) {
        if let Some(shared) = self.handshaking.take() {
            shared.handshaking.leave();
        }
    }
}

/// The per-address rate and cap (`connection_rate_per_ip`, `max_connections_per_ip`), on the
/// client address (the PROXY protocol's when the listener uses it): over either the connection
/// is closed before TLS or HTTP, as over the global cap; the slot is held with the connection's
/// and freed with it.
fn per_ip(shared: &Shared, client: SocketAddr, mut slot: ConnSlot) -> Option<ConnSlot> {
    let runtime = shared.runtime.load();
    let max = runtime.config.server.max_connections_per_ip;
    let prefix = runtime.config.server.ipv6_prefix_len;
    let key = crate::limits::ip_key(client.ip(), prefix);
    // The new-connection rate first (`connection_rate_per_ip`): a flood of connections is
    // refused before it costs a TLS handshake.
    if let Some(rate) = &runtime.connection_rate {
        if rate.check(key).is_err() {
            crate::metrics::limit_refused("connection_rate");
            if let Some(held_back) = crate::limits::log_sample("connection_rate") {
                tracing::info!(%client, reason = "connection_rate", held_back, "connection refused: per-address connection rate reached");
            }
            return None;
        }
    }
    match shared.per_ip.try_acquire(key, max) {
        Ok(held) => {
            slot._per_ip = held;
            Some(slot)
        }
        Err(n) => {
            crate::metrics::limit_refused("per_ip_connections");
            if let Some(held_back) = crate::limits::log_sample("per_ip_connections") {
                tracing::info!(%client, held = n, reason = "per_ip_connections", held_back, "connection refused: per-address connection cap reached");
            }
            None
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.handshake_done();
        self.metrics.connections_active.decrement(1.0);
    }
}

/// What a listener speaks, fixed when it is bound.
enum Security {
    /// Plain TCP.
    Plain,
    /// TLS with the configuration in force; `None` if the running configuration has none, and then
    /// the connection is refused rather than served in plaintext.
    Tls(Option<Arc<rustls::ServerConfig>>),
}

/// The proxy-protocol stage: on a listener that requires it, the client address from the
/// load balancer's header (the connection is closed, and counted, when its peer is not a
/// trusted source or the header is missing or malformed); elsewhere the peer itself.
async fn proxy_header(
    shared: &Shared,
    mut tcp: TcpStream,
    peer: SocketAddr,
    trusted: Option<&[ipnet::IpNet]>,
) -> Option<(TcpStream, SocketAddr)> {
    let Some(trusted) = trusted else { return Some((tcp, peer)) };
    let result = if trusted.iter().any(|net| net.contains(&peer.ip())) {
        let limit = shared.runtime.load().config.server.tls_handshake_timeout;
        super::proxy_protocol::read(&mut tcp, peer, limit).await
    } else {
        Err(super::proxy_protocol::ProxyHeaderError::Untrusted)
    };
    match result {
        Ok(client) => {
            crate::metrics::proxy_protocol("ok");
            tracing::debug!(%peer, %client, "PROXY protocol header read");
            Some((tcp, client))
        }
        Err(e) => {
            crate::metrics::proxy_protocol(e.reason());
            tracing::debug!(%peer, error = %e, "PROXY protocol refused; connection closed");
            None
        }
    }
}

async fn connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    addr: SocketAddr,
    security: Security,
    slot: ConnSlot,
    from_peer: bool,
) {
    let m = &shared.metrics;
    let stream = match security {
        Security::Plain => Some(ClientStream::Plain(tcp)),
        Security::Tls(None) => {
            m.tls_failure("no_certificate");
            tracing::error!(client = %addr, "tls listener without certificates in the running configuration; connection closed");
            None
        }
        Security::Tls(Some(config)) => {
            let limit = shared.runtime.load().config.server.tls_handshake_timeout;
            match tls::accept(&config, tcp, limit).await {
                Ok(s) => Some(ClientStream::Tls(Box::new(s))),
                Err(e) => {
                    m.tls_failure(e.reason());
                    tracing::debug!(client = %addr, error = %e, "tls handshake failed");
                    None
                }
            }
        }
    };
    if let Some(stream) = stream {
        super::serve_connection(shared.clone(), stream, addr, slot, from_peer).await;
    }
}
