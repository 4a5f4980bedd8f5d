//! Opening one WebSocket session to the target: TCP (from a chosen source address), TLS, the
//! HTTP/1.1 upgrade with headers, Origin and a token; or, with `--h2-streams N`, an extended
//! CONNECT (RFC 8441) on an HTTP/2 connection that N sessions share.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use fastwebsockets::WebSocketError;
use http_body_util::Empty;
use hyper::Request;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use tokio::net::TcpSocket;

use crate::scenario::Scenario;
use crate::template;
use crate::token::{TokenMinter, TokenVia};

/// An open client session.
pub type Ws = fastwebsockets::WebSocket<TokioIo<hyper::upgrade::Upgraded>>;

/// Everything needed to open sessions to one target, prepared once per run.
pub struct Target {
    /// `ws` or `wss`.
    tls: Option<tokio_rustls::TlsConnector>,
    /// Host as written in the URL (Host header, SNI).
    host: String,
    /// Resolved address to connect to.
    addr: SocketAddr,
    /// Path and query template; `{conn}` is substituted per connection.
    path: String,
    /// Extra `Name: value` headers.
    headers: Vec<(String, String)>,
    /// Origin header, if any.
    origin: Option<String>,
    /// Subprotocol offered, if any (besides a token carried as one).
    subprotocol: Option<String>,
    /// Mints a token per connection, if configured.
    token: Option<TokenMinter>,
    /// Number of loopback source addresses to spread connections over (1 = let the kernel pick).
    source_addrs: u8,
    /// HTTP/2: sessions per connection, and the connections opened so far (by group).
    h2: Option<H2Conns>,
}

/// The HTTP/2 connections sessions share: group `conn / per_conn` is opened by its first
/// session and kept.
struct H2Conns {
    per_conn: u64,
    tls: tokio_rustls::TlsConnector,
    groups: std::sync::Mutex<std::collections::HashMap<u64, Arc<tokio::sync::OnceCell<H2Sender>>>>,
}

type H2Sender = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

/// Why a session could not be opened, classified for the error table.
#[derive(Debug)]
pub struct ConnectError {
    /// Short stable label: `connect`, `tls`, `http 401`, `handshake`, `timeout`, `token`.
    pub kind: String,
    /// Details for the first occurrence.
    pub detail: String,
}

impl Target {
    /// Prepares a target from the scenario (parses the URL, resolves the host, loads TLS roots and keys).
    pub async fn new(s: &Scenario) -> anyhow::Result<Target> {
        let url = s.target.as_deref().context("no target URL (--target ws://host:port/path)")?;
        let (scheme, rest) = url.split_once("://").context("the target URL must start with ws:// or wss://")?;
        use crate::scenario::Kind;
        let http_kind = matches!(s.scenario, Kind::Http | Kind::Sse | Kind::Mcp);
        if http_kind != matches!(scheme, "http" | "https") {
            bail!(
                "the {} scenario takes {} URLs",
                s.scenario.name(),
                if http_kind { "http(s)://" } else { "ws(s)://" }
            );
        }
        let tls = match scheme {
            "ws" | "http" => false,
            "wss" | "https" => true,
            _ => bail!("the target URL must start with ws://, wss://, http:// or https://"),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || p.parse::<u16>().is_ok() => {
                (h.trim_matches(['[', ']']).to_owned(), p.parse::<u16>().context("bad port in target URL")?)
            }
            _ => (authority.to_owned(), if tls { 443 } else { 80 }),
        };
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .with_context(|| format!("cannot resolve {host}"))?
            .next()
            .with_context(|| format!("{host} has no address"))?;
        let tls = if tls { Some(tls_connector_alpn(s.ca.as_deref(), s.insecure, b"http/1.1")?) } else { None };
        let mut headers = Vec::new();
        for h in &s.headers {
            let (name, value) = h.split_once(':').context("headers are written `Name: value`")?;
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
        let token = TokenMinter::new(&s.token)?;
        let h2 = match (s.h2_streams, tls.is_some()) {
            (0, _) => None,
            (_, false) => bail!("--h2-streams needs a wss:// target (HTTP/2 is negotiated by ALPN)"),
            (per_conn, true) => Some(H2Conns {
                per_conn,
                tls: tls_connector_alpn(s.ca.as_deref(), s.insecure, b"h2")?,
                groups: Default::default(),
            }),
        };
        let source_addrs = if addr.ip().is_loopback() && addr.is_ipv4() { s.source_addrs.clamp(1, 254) } else { 1 };
        Ok(Target {
            tls,
            host: authority.to_owned(),
            addr,
            path,
            headers,
            origin: s.origin.clone(),
            subprotocol: s.subprotocol.clone(),
            token,
            source_addrs,
            h2,
        })
    }

    /// Opens session number `conn`, with a time limit.
    pub async fn connect(&self, conn: u64, timeout: Duration) -> Result<Ws, ConnectError> {
        match tokio::time::timeout(timeout, self.connect_inner(conn)).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError { kind: "timeout".into(), detail: format!("no session within {timeout:?}") }),
        }
    }

    /// Opens session number `conn` on a socket whose receive buffer is `rcvbuf` bytes (the
    /// kernel doubles it), for a client that will not read (HTTP/1.1 only).
    pub async fn connect_stalled(&self, conn: u64, timeout: Duration, rcvbuf: u32) -> Result<Ws, ConnectError> {
        match tokio::time::timeout(timeout, self.connect_with(conn, Some(rcvbuf))).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError { kind: "timeout".into(), detail: format!("no session within {timeout:?}") }),
        }
    }

    async fn connect_inner(&self, conn: u64) -> Result<Ws, ConnectError> {
        self.connect_with(conn, None).await
    }

    async fn connect_with(&self, conn: u64, rcvbuf: Option<u32>) -> Result<Ws, ConnectError> {
        let err = |kind: &str, e: &dyn std::fmt::Display| ConnectError { kind: kind.to_owned(), detail: e.to_string() };
        let mut path = template::expand(&self.path, conn);
        let mut protocols: Vec<String> = self.subprotocol.iter().cloned().collect();
        let mut auth = None;
        if let Some(minter) = &self.token {
            let token = minter.mint(conn).map_err(|e| err("token", &e))?;
            match &minter.via {
                TokenVia::Header => auth = Some(format!("Bearer {token}")),
                TokenVia::Query(param) => {
                    path.push(if path.contains('?') { '&' } else { '?' });
                    path.push_str(&format!("{param}={token}"));
                }
                TokenVia::Subprotocol(prefix) => protocols.insert(0, format!("{prefix}{token}")),
            }
        }
        if let Some(h2) = &self.h2 {
            if rcvbuf.is_some() {
                return Err(err("stall", &"a stalled watcher needs a connection of its own (not --h2-streams)"));
            }
            return self.connect_h2(h2, conn, path, auth, protocols).await;
        }
        let req = Request::get(path)
            .header("host", &self.host)
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .header("sec-websocket-key", fastwebsockets::handshake::generate_key())
            .header("sec-websocket-version", "13");
        let req =
            self.opening(req, conn, auth, &protocols).body(Empty::<Bytes>::new()).map_err(|e| err("request", &e))?;

        let tcp = self.tcp(conn, rcvbuf).await?;
        let result = match &self.tls {
            Some(connector) => {
                let stream = self.tls(connector, tcp).await?;
                fastwebsockets::handshake::client(&SpawnExecutor, req, stream).await
            }
            None => fastwebsockets::handshake::client(&SpawnExecutor, req, tcp).await,
        };
        match result {
            Ok((mut ws, _resp)) => {
                // The sessions answer close frames themselves (`scenario::close_reply`):
                // fastwebsockets 0.10 refuses close codes missing from its table, 1014 "bad
                // gateway" among them (IANA-registered), and would report the target's close as
                // a protocol error of ours instead of the code the target sent.
                ws.set_auto_close(false);
                Ok(ws)
            }
            Err(WebSocketError::InvalidStatusCode(code)) => Err(err(&format!("http {code}"), &"upgrade refused")),
            Err(e) => Err(err("handshake", &e)),
        }
    }
}

impl Target {
    /// The headers every opening of session `conn` carries, HTTP/1.1 or HTTP/2: its token,
    /// subprotocols, Origin and the extra headers.
    fn opening(
        &self,
        mut req: hyper::http::request::Builder,
        conn: u64,
        auth: Option<String>,
        protocols: &[String],
    ) -> hyper::http::request::Builder {
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        if !protocols.is_empty() {
            req = req.header("sec-websocket-protocol", protocols.join(", "));
        }
        if let Some(o) = &self.origin {
            req = req.header("origin", o);
        }
        for (k, v) in &self.headers {
            req = req.header(k, template::expand(v, conn));
        }
        req
    }

    /// Session `conn` as an extended CONNECT on its group's HTTP/2 connection.
    async fn connect_h2(
        &self,
        h2: &H2Conns,
        conn: u64,
        path: String,
        auth: Option<String>,
        protocols: Vec<String>,
    ) -> Result<Ws, ConnectError> {
        let err = |kind: &str, e: &dyn std::fmt::Display| ConnectError { kind: kind.to_owned(), detail: e.to_string() };
        let group = conn / h2.per_conn.max(1);
        let cell = h2.groups.lock().map_err(|_| err("h2", &"lock"))?.entry(group).or_default().clone();
        let sender = cell
            .get_or_try_init(|| async {
                let tcp = self.tcp(conn, None).await?;
                let stream = self.tls(&h2.tls, tcp).await?;
                if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(err("h2", &"the target did not choose h2 by ALPN"));
                }
                let (sender, driver) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| err("h2", &e))?;
                tokio::spawn(driver);
                Ok(sender)
            })
            .await?;
        let req = Request::connect(format!("https://{}{path}", self.host))
            .header("sec-websocket-version", "13")
            .extension(hyper::ext::Protocol::from_static("websocket"));
        let req =
            self.opening(req, conn, auth, &protocols).body(Empty::<Bytes>::new()).map_err(|e| err("request", &e))?;
        let mut sender = sender.clone();
        let resp = sender.send_request(req).await.map_err(|e| err("h2", &e))?;
        if resp.status() != hyper::StatusCode::OK {
            return Err(err(&format!("http {}", resp.status().as_u16()), &"extended CONNECT refused"));
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(|e| err("handshake", &e))?;
        let mut ws = fastwebsockets::WebSocket::after_handshake(TokioIo::new(upgraded), fastwebsockets::Role::Client);
        ws.set_auto_close(false);
        Ok(ws)
    }

    /// A TCP connection for session `conn`, from its source address.
    async fn tcp(&self, conn: u64, rcvbuf: Option<u32>) -> Result<tokio::net::TcpStream, ConnectError> {
        let err = |kind: &str, e: &dyn std::fmt::Display| ConnectError { kind: kind.to_owned(), detail: e.to_string() };
        let socket = if self.addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.and_then(|s| {
            if self.addr.is_ipv4() && self.source_addrs > 1 {
                let last = 1 + (conn % u64::from(self.source_addrs)) as u8;
                s.bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), 0))?;
            }
            if let Some(n) = rcvbuf {
                s.set_recv_buffer_size(n)?;
            }
            Ok(s)
        });
        let tcp = socket.map_err(|e| err("socket", &e))?.connect(self.addr).await.map_err(|e| err("connect", &e))?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    async fn tls(
        &self,
        connector: &tokio_rustls::TlsConnector,
        tcp: tokio::net::TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, ConnectError> {
        let err = |e: &dyn std::fmt::Display| ConnectError { kind: "tls".to_owned(), detail: e.to_string() };
        let name = ServerName::try_from(self.host.rsplit_once(':').map_or(self.host.as_str(), |(h, _)| h))
            .map_err(|e| err(&e))?
            .to_owned();
        connector.connect(name, tcp).await.map_err(|e| err(&e))
    }

    /// Opens a kept-alive HTTP/1.1 connection for session `conn` (plain or TLS), with a time
    /// limit.
    pub async fn http(&self, conn: u64, timeout: Duration) -> Result<HttpConn, ConnectError> {
        let inner = async {
            let err = |e: &dyn std::fmt::Display| ConnectError { kind: "http".to_owned(), detail: e.to_string() };
            let tcp = self.tcp(conn, None).await?;
            let (sender, driver) = match &self.tls {
                Some(connector) => {
                    let stream = self.tls(connector, tcp).await?;
                    let (s, c) =
                        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| err(&e))?;
                    (s, tokio::spawn(async move { c.await.is_ok() }))
                }
                None => {
                    let (s, c) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| err(&e))?;
                    (s, tokio::spawn(async move { c.await.is_ok() }))
                }
            };
            Ok(HttpConn { sender, driver })
        };
        match tokio::time::timeout(timeout, inner).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError { kind: "timeout".into(), detail: format!("no connection within {timeout:?}") }),
        }
    }

    /// A request of session `conn` to the target path, with its headers, Origin and token.
    pub fn request(
        &self,
        conn: u64,
        method: &str,
        body: Bytes,
    ) -> Result<Request<http_body_util::Full<Bytes>>, ConnectError> {
        let err = |kind: &str, e: &dyn std::fmt::Display| ConnectError { kind: kind.to_owned(), detail: e.to_string() };
        let mut path = template::expand(&self.path, conn);
        let mut auth = None;
        if let Some(minter) = &self.token {
            let token = minter.mint(conn).map_err(|e| err("token", &e))?;
            match &minter.via {
                TokenVia::Header | TokenVia::Subprotocol(_) => auth = Some(format!("Bearer {token}")),
                TokenVia::Query(param) => {
                    path.push(if path.contains('?') { '&' } else { '?' });
                    path.push_str(&format!("{param}={token}"));
                }
            }
        }
        let mut req = Request::builder().method(method).uri(path).header("host", &self.host);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        if let Some(o) = &self.origin {
            req = req.header("origin", o);
        }
        for (k, v) in &self.headers {
            req = req.header(k, template::expand(v, conn));
        }
        req.body(http_body_util::Full::new(body)).map_err(|e| err("request", &e))
    }
}

/// A kept-alive HTTP/1.1 client connection.
pub struct HttpConn {
    /// Sends requests, one at a time.
    pub sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
    /// Drives the connection; true if it ended cleanly.
    pub driver: tokio::task::JoinHandle<bool>,
}

/// A client TLS connector: roots from `ca` (PEM), or no verification at all with `insecure`.
fn tls_connector_alpn(ca: Option<&Path>, insecure: bool, alpn: &[u8]) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder =
        rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let mut config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(DangerousAcceptAnyCert(provider)))
            .with_no_client_auth()
    } else {
        let ca = ca.context("wss:// needs --ca FILE or --insecure")?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("cannot read {}", ca.display()))? {
            roots.add(cert.with_context(|| format!("bad PEM in {}", ca.display()))?)?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    // One protocol: http/1.1 for the RFC 6455 upgrade, h2 for RFC 8441.
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Accepts any server certificate: for load tests against self-signed certificates only.
#[derive(Debug)]
struct DangerousAcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for DangerousAcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Runs hyper's connection future on the tokio runtime.
struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}
