//! The proxy's own outbound HTTP client: one GET per fresh HTTP/1.1 connection, over TLS for
//! `https://` URLs. JWKS key sets and registry lookups both go through it; each caller gives
//! the whole request's timeout (or, to act on the connect first, connects and then asks on
//! that connection by one deadline) and reads the status itself. Below it, the pooled client
//! that carries plain requests to members ([`Upstream`]), each connection holding its place in
//! the descriptor budget, and [`dial`], the one way every other connect to a name (a member's
//! WebSocket, an active check, a fleet peer, the JWKS and registry hosts) is made.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Why an outbound request got no answer. The text never holds header values (tokens).
#[derive(Debug, Clone, thiserror::Error)]
pub enum OutboundError {
    /// The URL is not `http://` or `https://` with a host.
    #[error("invalid url: {0}")]
    Url(&'static str),
    /// The TCP connect was refused or failed.
    #[error("connect: {0}")]
    Connect(String),
    /// No TCP connection by the deadline (a host that drops SYNs, or one slow to accept).
    #[error("connect: no connection within the timeout")]
    ConnectTimeout,
    /// The proxy could not open a connection: out of descriptors or ports, not the host's doing.
    #[error("cannot open a connection: {0}")]
    Exhausted(String),
    /// Connected, but the answer did not come within the timeout.
    #[error("no answer within the timeout")]
    Timeout,
    /// The TLS handshake failed (or the host is not a valid server name).
    #[error("tls: {0}")]
    Tls(String),
    /// The HTTP exchange failed.
    #[error("http: {0}")]
    Http(String),
    /// The body could not be read or was over the limit.
    #[error("body: {0}")]
    Body(String),
}

/// An outbound client: plain HTTP, and HTTPS trusting either a CA file or the web PKI roots.
#[derive(Clone)]
pub struct HttpClient {
    tls: TlsConnector,
}

impl HttpClient {
    /// A client whose `https://` requests trust the certificates in `ca` (PEM), or the web PKI
    /// roots when `ca` is `None`.
    pub fn new(ca: Option<&Path>) -> Result<HttpClient, String> {
        let mut roots = rustls::RootCertStore::empty();
        match ca {
            Some(ca) => {
                for cert in CertificateDer::pem_file_iter(ca).map_err(|e| e.to_string())? {
                    roots.add(cert.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let config = rustls::ClientConfig::builder_with_provider(crate::crypto::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(HttpClient { tls: TlsConnector::from(Arc::new(config)) })
    }

    /// GETs `uri` with `headers` (plus `Host`) and reads at most `max_body` bytes of the body,
    /// all within `timeout`. A connect still pending when it runs out is
    /// [`OutboundError::ConnectTimeout`], so a caller can tell a host it cannot reach from one
    /// that was reached and did not answer.
    pub async fn get(
        &self,
        uri: &Uri,
        headers: HeaderMap,
        max_body: usize,
        timeout: std::time::Duration,
    ) -> Result<(StatusCode, Bytes), OutboundError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let tcp = self.open(uri, deadline).await?;
        self.get_on(uri, tcp, headers, max_body, deadline).await
    }

    /// A TCP connection to `uri`'s host, made by `deadline`: the first half of [`Self::get`],
    /// for a caller that acts on the connect before the answer (a registry gate opens on it).
    pub(crate) async fn open(&self, uri: &Uri, deadline: tokio::time::Instant) -> Result<TcpStream, OutboundError> {
        let (host, port) = host_and_port(uri)?;
        match tokio::time::timeout_at(deadline, connect(host, port, deadline)).await {
            Ok(tcp) => tcp,
            Err(_) => Err(OutboundError::ConnectTimeout),
        }
    }

    /// The second half of [`Self::get`]: the request on `tcp` (from [`Self::open`]), its
    /// answer read by `deadline` ([`OutboundError::Timeout`] past it).
    pub(crate) async fn get_on(
        &self,
        uri: &Uri,
        tcp: TcpStream,
        headers: HeaderMap,
        max_body: usize,
        deadline: tokio::time::Instant,
    ) -> Result<(StatusCode, Bytes), OutboundError> {
        let (host, _) = host_and_port(uri)?;
        match tokio::time::timeout_at(deadline, self.exchange(uri, host, tcp, headers, max_body)).await {
            Ok(answer) => answer,
            Err(_) => Err(OutboundError::Timeout),
        }
    }

    /// The request on `tcp`, connected to `host` (its TLS server name for `https://`).
    async fn exchange(
        &self,
        uri: &Uri,
        host: &str,
        tcp: TcpStream,
        headers: HeaderMap,
        max_body: usize,
    ) -> Result<(StatusCode, Bytes), OutboundError> {
        let https = uri.scheme_str() == Some("https");
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        // The host and port only: never what an authority may carry before them.
        let authority = match uri.port_u16() {
            Some(p) => format!("{}:{p}", uri.host().unwrap_or_default()),
            None => uri.host().unwrap_or_default().to_owned(),
        };
        let mut req = Request::get(path)
            .header(http::header::HOST, authority)
            .body(Empty::<Bytes>::new())
            .map_err(|e| OutboundError::Http(e.to_string()))?;
        req.headers_mut().extend(headers);
        if https {
            let name = ServerName::try_from(host.to_owned()).map_err(|e| OutboundError::Tls(e.to_string()))?;
            let stream = self.tls.connect(name, tcp).await.map_err(|e| OutboundError::Tls(e.to_string()))?;
            send(TokioIo::new(stream), req, max_body).await
        } else {
            send(TokioIo::new(tcp), req, max_body).await
        }
    }
}

/// Turns through `[backend] source_addresses` (process-wide: the count only spreads load).
static NEXT_SOURCE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Addresses of one name tried at most, in [`dial`]: a name that resolves to many (a CDN's,
/// or a hostile answer) would otherwise give each a share too short for one lost SYN's
/// retransmission (1 s), and send a SYN to every one that does not answer.
const MAX_ADDRESSES: usize = 4;

/// The TCP connection to `target` (a member, a fleet peer, a registry or JWKS host), made by
/// `deadline`: the one way the proxy connects to a name; the caller bounds the whole with the
/// same deadline, the lookup included. Plain requests' pooled connections share only its first
/// rule, one socket at a time, through hyper-util's connector ([`member_connector`]: the
/// resolver's order, equal fixed shares, no cap, no source addresses).
///
/// The name's addresses are tried one socket at a time, each closed before the next opens, so a
/// connect never holds more than its one place in the descriptor budget. When there are several,
/// the two families alternate from the first (RFC 8305 §4), at most [`MAX_ADDRESSES`] are tried,
/// and each gets what is left before `deadline` divided by the addresses still to try, so the
/// last gets all that is left: a dual-stack host whose IPv6 address does not answer is reached
/// over IPv4 in time, not timed out (and a member ejected) whole. A lone address has no timer of
/// its own. The error of a failed connect is one that stands for all of them ([`Failures`]).
///
/// With `sources`, each socket is bound to the next of them of its family, and an address of a
/// family none of them has is not tried. One source address has one ephemeral port range
/// (28,232 ports with Linux's default range), shared by every host it connects to; several
/// multiply it, and keep the kernel's port search short when a proxy holds tens of thousands of
/// connections to a few members.
pub(crate) async fn dial(
    target: impl tokio::net::ToSocketAddrs,
    sources: &[std::net::IpAddr],
    deadline: tokio::time::Instant,
) -> std::io::Result<TcpStream> {
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(target).await?.collect();
    dial_addrs(addrs, sources, deadline).await
}

/// [`dial`] once the name is looked up.
async fn dial_addrs(
    addrs: Vec<std::net::SocketAddr>,
    sources: &[std::net::IpAddr],
    deadline: tokio::time::Instant,
) -> std::io::Result<TcpStream> {
    let addrs = in_turn(addrs, sources);
    let lone = addrs.len() == 1;
    let mut failures = Failures::default();
    for (i, &addr) in addrs.iter().enumerate() {
        let attempt = async {
            let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
                .map_err(Opening::Socket)?;
            let family: Vec<_> = sources.iter().filter(|s| s.is_ipv4() == addr.is_ipv4()).collect();
            if !family.is_empty() {
                let n = NEXT_SOURCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                socket.bind(std::net::SocketAddr::new(*family[n % family.len()], 0)).map_err(Opening::Socket)?;
            }
            socket.connect(addr).await.map_err(Opening::Connect)
        };
        let result = match lone {
            // The caller's deadline is its deadline.
            true => attempt.await,
            false => {
                let share = deadline.saturating_duration_since(tokio::time::Instant::now()) / (addrs.len() - i) as u32;
                match tokio::time::timeout(share, attempt).await {
                    Ok(r) => r,
                    Err(_) => {
                        Err(Opening::Connect(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")))
                    }
                }
            }
        };
        match result {
            Ok(stream) => return Ok(stream),
            // Out of descriptors or ports: no other address would fare better.
            Err(Opening::Socket(e)) if crate::limits::exhausted(&e) => return Err(e),
            Err(Opening::Socket(e) | Opening::Connect(e)) => failures.add(e),
        }
    }
    Err(failures.into_error())
}

/// Where an attempt in [`dial_addrs`] failed.
enum Opening {
    /// Making or binding its socket.
    Socket(std::io::Error),
    /// The connect itself.
    Connect(std::io::Error),
}

/// A name's addresses in the order [`dial`] tries them: those of a family `sources` has (all
/// of them without `sources`), the families alternating from the first, at most
/// [`MAX_ADDRESSES`].
fn in_turn(addrs: Vec<std::net::SocketAddr>, sources: &[std::net::IpAddr]) -> Vec<std::net::SocketAddr> {
    let usable = |a: &std::net::SocketAddr| sources.is_empty() || sources.iter().any(|s| s.is_ipv4() == a.is_ipv4());
    if addrs.len() == 1 && usable(&addrs[0]) {
        return addrs;
    }
    let mut usable = addrs.into_iter().filter(usable).peekable();
    let Some(first_v4) = usable.peek().map(std::net::SocketAddr::is_ipv4) else { return Vec::new() };
    let (same, other): (Vec<_>, Vec<_>) = usable.partition(|a| a.is_ipv4() == first_v4);
    let (mut same, mut other) = (same.into_iter(), other.into_iter());
    let mut out = Vec::with_capacity(MAX_ADDRESSES);
    while out.len() < MAX_ADDRESSES {
        match (same.next(), other.next()) {
            (None, None) => break,
            (a, b) => out.extend(a.into_iter().chain(b)),
        }
    }
    out.truncate(MAX_ADDRESSES);
    out
}

/// The failed attempts of one [`dial`], and the one error that stands for them, whatever
/// order the addresses came in: a timeout when any address timed out (the host is slow or
/// gone: 504, as when the whole timed out); else the first error that is the host's (refused,
/// unreachable), not the proxy's own want of descriptors or ports (an IPv6 address on a host
/// without IPv6 fails with `EADDRNOTAVAIL`, which alone would read as the proxy's and spare a
/// member that refused); else the last.
#[derive(Default)]
struct Failures {
    timed_out: Option<std::io::Error>,
    hosts: Option<std::io::Error>,
    last: Option<std::io::Error>,
}

impl Failures {
    fn add(&mut self, e: std::io::Error) {
        if e.kind() == std::io::ErrorKind::TimedOut {
            self.timed_out.get_or_insert(e);
        } else if self.hosts.is_none() && !crate::limits::exhausted(&e) {
            self.hosts = Some(e);
        } else {
            self.last = Some(e);
        }
    }

    fn into_error(self) -> std::io::Error {
        self.timed_out.or(self.hosts).or(self.last).unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::AddrNotAvailable,
                "no address to connect to (none of a family of the source addresses)",
            )
        })
    }
}

/// The connection to `host`, made by `deadline` ([`dial`]).
async fn connect(host: &str, port: u16, deadline: tokio::time::Instant) -> Result<TcpStream, OutboundError> {
    let tcp = dial((host, port), &[], deadline).await.map_err(|e| match e {
        // An address's share ran out: the host timed out, as when the whole did.
        e if e.kind() == std::io::ErrorKind::TimedOut => OutboundError::ConnectTimeout,
        e if crate::limits::exhausted(&e) => OutboundError::Exhausted(e.to_string()),
        e => OutboundError::Connect(e.to_string()),
    })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// The host (without an IPv6 literal's brackets) and port `uri` names; only `http://` and
/// `https://` URLs with a host.
fn host_and_port(uri: &Uri) -> Result<(&str, u16), OutboundError> {
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(OutboundError::Url("must be http:// or https://")),
    };
    let host = uri.host().ok_or(OutboundError::Url("no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((host, uri.port_u16().unwrap_or(if https { 443 } else { 80 })))
}

/// Sends `req` on a fresh HTTP/1.1 connection and reads the body (at most `max_body` bytes).
async fn send<I>(io: I, req: Request<Empty<Bytes>>, max_body: usize) -> Result<(StatusCode, Bytes), OutboundError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(io).await.map_err(|e| OutboundError::Http(e.to_string()))?;
    // Drives the connection; it ends when `sender` is dropped at the end of this function.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.map_err(|e| OutboundError::Http(e.to_string()))?;
    let status = resp.status();
    let body =
        Limited::new(resp.into_body(), max_body).collect().await.map_err(|e| OutboundError::Body(e.to_string()))?;
    Ok((status, body.to_bytes()))
}

/// Error type of streamed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a request passed to a backend member.
pub type UpstreamBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// The client that carries plain HTTP requests to backend members: HTTP/1.1 with a bounded
/// pool of idle keep-alive connections per member (hyper-util's pooled client, keyed by
/// `host:port`). Cheap to clone; clones share the pool.
pub type Upstream = hyper_util::client::legacy::Client<Budgeted, UpstreamBody>;

/// hyper-util's connector, with each connection holding a place in the process's outbound
/// descriptor budget for as long as it is open, in use or idle in the pool: in the pooled
/// connections' share of it ([`crate::limits::pooled_slot`]), or, when that share is held, in
/// the plain requests' share for this request only (the connection is poisoned, so the pool
/// never keeps it; [`crate::limits::plain_slot`]): connections idle in the pool for members of
/// one burst never refuse a request to another member while plain requests hold less than
/// three quarters of the budget, and the last quarter stays for sessions. A spent budget fails the connect with
/// [`crate::limits::Spent`] in the error's sources, before any socket is opened.
#[derive(Debug, Clone)]
pub struct Budgeted(hyper_util::client::legacy::connect::HttpConnector);

impl tower_service::Service<Uri> for Budgeted {
    type Response = Held;
    type Error = BoxError;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Held, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let place = match crate::limits::pooled_slot() {
            Ok(slot) => Ok((slot, true)),
            Err(_) => crate::limits::plain_slot().map(|slot| (slot, false)),
        };
        let connecting = self.0.call(uri);
        Box::pin(async move {
            let (place, pooled) = place?;
            let io = connecting.await?;
            Ok(Held { io, pooled, _slot: place })
        })
    }
}

/// A pooled member connection and its place in the descriptor budget.
#[derive(Debug)]
pub struct Held {
    io: TokioIo<TcpStream>,
    /// In the pooled share; else for one request, never kept idle.
    pooled: bool,
    _slot: crate::limits::OutboundSlot,
}

impl hyper_util::client::legacy::connect::Connection for Held {
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        let connected = self.io.connected();
        if !self.pooled {
            connected.poison();
        }
        connected
    }
}

impl hyper::rt::Read for Held {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Held {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

/// Largest read or write buffer of one upstream connection.
const UPSTREAM_MAX_BUF: usize = 64 * 1024;

/// How an [`Upstream`] connects and pools; routes with equal settings share one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UpstreamSettings {
    /// TCP connect timeout per member.
    pub connect_timeout: std::time::Duration,
    /// Idle keep-alive connections kept per member (0: none).
    pub max_idle_per_member: usize,
    /// Idle connections are closed after this long.
    pub pool_idle_timeout: std::time::Duration,
}

/// A new upstream client: TCP_NODELAY, plain `http://` only, the `Host` header left to the
/// caller (the proxy sets it to the member), and a request whose pooled connection turns out
/// closed before the request was written is sent again on a new connection.
pub fn upstream(s: UpstreamSettings) -> Upstream {
    let connector = member_connector(hyper_util::client::legacy::connect::dns::GaiResolver::new(), s.connect_timeout);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .pool_idle_timeout(s.pool_idle_timeout)
        .pool_max_idle_per_host(s.max_idle_per_member)
        .retry_canceled_requests(true)
        // hyper's default lets a connection's buffers grow to about 400 KiB while a member
        // sends faster than the client reads (an SSE burst); 64 KiB keeps a stream's memory
        // bounded and small, and is still many events per read.
        .http1_max_buf_size(UPSTREAM_MAX_BUF)
        .set_host(false)
        .build(Budgeted(connector))
}

/// hyper-util's connector as members are reached: TCP_NODELAY, `http://` only, and one socket
/// at a time, as [`dial`] connects for everything else. A member named by DNS may resolve to
/// several addresses; they are tried in the resolver's order, each socket closed before the
/// next opens, each within an equal share of `connect_timeout` fixed at the start: a dual-stack
/// name whose IPv6 address does not answer waits half of it before IPv4 is tried. hyper-util's
/// default, happy eyeballs (RFC 6555), would start the other address family 300 ms into a slow
/// first attempt and hold two sockets on the one place in the descriptor budget that
/// [`Budgeted`] took for the connect.
fn member_connector<R>(
    resolver: R,
    connect_timeout: std::time::Duration,
) -> hyper_util::client::legacy::connect::HttpConnector<R> {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new_with_resolver(resolver);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_happy_eyeballs_timeout(None);
    connector.set_nodelay(true);
    connector.enforce_http(true);
    connector
}

/// `uri` as logs and errors may show it: scheme, host, port and path, without credentials or
/// the query (where an API key may ride).
pub fn loggable(uri: &Uri) -> String {
    let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
    format!("{}://{}{port}{}", uri.scheme_str().unwrap_or("http"), uri.host().unwrap_or_default(), uri.path())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::time::Duration;

    /// A resolver that answers every name with the same addresses, in order.
    #[derive(Clone)]
    struct Fixed(Vec<SocketAddr>);

    impl tower_service::Service<hyper_util::client::legacy::connect::dns::Name> for Fixed {
        type Response = std::vec::IntoIter<SocketAddr>;
        type Error = std::io::Error;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
            std::future::ready(Ok(self.0.clone().into_iter()))
        }
    }

    /// A member whose name resolves to an IPv6 address that does not answer and to an IPv4
    /// one: the IPv4 attempt starts only once the IPv6 socket is gone. Happy eyeballs (the
    /// connector's default) starts it 300 ms in, beside the first; through [`upstream`] that is
    /// two sockets on one budget place. The IPv6 address is a v4-mapped one (an IPv6 socket
    /// to 127.0.0.1), so the test needs IPv6 sockets but not an IPv6 loopback.
    #[tokio::test]
    async fn a_member_connect_holds_one_socket_at_a_time() {
        if socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).is_err() {
            eprintln!("skipped: this host has no IPv6 sockets");
            return;
        }
        let (first, _first_filler) = crate::testing::black_hole();
        let (second, _second_filler) = crate::testing::black_hole();
        let (v6_port, v4_port) =
            (first.local_addr().expect("first").port(), second.local_addr().expect("second").port());
        let v6: SocketAddr = format!("[::ffff:127.0.0.1]:{v6_port}").parse().expect("a v4-mapped address");
        let resolver = Fixed(vec![v6, second.local_addr().expect("second")]);
        // Two addresses: each attempt gets 1 s, three times happy eyeballs' 300 ms.
        let mut connector = member_connector(resolver, Duration::from_secs(2));
        // No port in the URI: hyper-util keeps each resolved address's own.
        let uri: Uri = "http://member.test/".parse().expect("a URI");
        let connecting = tokio::spawn(tower_service::Service::call(&mut connector, uri));
        let started = tokio::time::Instant::now();
        let mut first_seen = false;
        loop {
            // The test's runtime has one thread: the connector is not polled between the two
            // reads. IPv4 first: a switch from one attempt to the next between them reads (0, 0).
            let on_v4 = crate::testing::syn_sent_to("tcp", v4_port);
            let on_v6 = crate::testing::syn_sent_to("tcp6", v6_port);
            assert!(
                on_v6 + on_v4 <= 1,
                "{on_v6} socket(s) towards the IPv6 address and {on_v4} towards the IPv4 one at once"
            );
            first_seen |= on_v6 == 1;
            if on_v4 == 1 {
                assert!(first_seen, "the IPv4 attempt came first");
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "the IPv4 attempt never started");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        connecting.abort();
    }

    /// A name (a member's, a registry's) whose first address does not answer: the next address
    /// is reached within the connect timeout, after the first's socket is closed. With one
    /// timeout for the whole list (tokio's `TcpStream::connect` of the name), the first address
    /// spent all of it and the connect timed out.
    #[tokio::test]
    async fn a_name_whose_first_address_does_not_answer_is_reached_at_the_next() {
        let (hole, _filler) = crate::testing::black_hole();
        let open = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a listener");
        let addrs = [hole.local_addr().expect("the black hole"), open.local_addr().expect("the listener")];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let dialled = tokio::time::timeout_at(deadline, dial_addrs(addrs.to_vec(), &[], deadline))
            .await
            .expect("within the connect timeout");
        let stream = dialled.expect("connected");
        assert_eq!(stream.peer_addr().expect("its peer"), addrs[1]);
        assert_eq!(crate::testing::syn_sent_to("tcp", addrs[0].port()), 0, "the first attempt's socket is closed");
    }

    /// An address that refuses: a socket bound to it that does not listen (a reset answers
    /// the SYN). Returned with the socket that holds the address.
    fn refusing() -> (socket2::Socket, SocketAddr) {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
        socket.bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("an address").into()).expect("bind");
        let at = socket.local_addr().expect("its address").as_socket().expect("an IP address");
        (socket, at)
    }

    /// Whatever order a host's addresses come in, a connect that found one of them silent
    /// reports a timeout (504 for a member, as when the whole timed out), by its deadline; one
    /// that only found refusals reports the refusal.
    #[tokio::test]
    async fn a_failed_dial_reports_the_same_error_whatever_the_order_of_the_addresses() {
        let (hole, _filler) = crate::testing::black_hole();
        let (_held, refused) = refusing();
        let hole = hole.local_addr().expect("the black hole");
        for addrs in [vec![refused, hole], vec![hole, refused], vec![hole]] {
            let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
            let outer = deadline + Duration::from_millis(200);
            let e = tokio::time::timeout_at(outer, dial_addrs(addrs.clone(), &[], deadline))
                .await
                .ok()
                .map(|r| r.expect_err("nothing answers"));
            // A lone address has no timer of its own: its caller's deadline ends it.
            match addrs.len() {
                1 => assert!(e.is_none(), "{addrs:?}: a lone address waits for the caller's deadline"),
                _ => assert_eq!(e.map(|e| e.kind()), Some(std::io::ErrorKind::TimedOut), "{addrs:?}"),
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        let e = dial_addrs(vec![refused, refused], &[], deadline).await.expect_err("refused");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
    }

    /// The order a name's addresses are tried in: the families alternate from the first, at
    /// most four, and with source addresses only their families.
    #[test]
    fn a_names_addresses_alternate_families_and_are_capped() {
        let a = |s: &str| s.parse::<SocketAddr>().expect("an address");
        let (v6, v4): (Vec<_>, Vec<_>) = (
            (1..=4).map(|i| a(&format!("[2001:db8::{i}]:80"))).collect(),
            (1..=4).map(|i| a(&format!("192.0.2.{i}:80"))).collect(),
        );
        let all: Vec<_> = v6.iter().chain(&v4).copied().collect();
        assert_eq!(in_turn(all.clone(), &[]), vec![v6[0], v4[0], v6[1], v4[1]]);
        let v4_only: Vec<std::net::IpAddr> = vec!["192.0.2.100".parse().expect("a source")];
        assert_eq!(in_turn(all, &v4_only), vec![v4[0], v4[1], v4[2], v4[3]]);
        assert_eq!(in_turn(vec![v6[0]], &v4_only), Vec::<SocketAddr>::new(), "no source of its family");
        assert_eq!(in_turn(vec![v4[0]], &[]), vec![v4[0]]);
    }
}
