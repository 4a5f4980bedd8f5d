//! Test harness: real sockets on 127.0.0.1 port 0, real TLS with a generated certificate, a raw
//! frame codec (so tests can send exactly the bytes they mean, including broken ones), a
//! recording test backend, and the proxy both in-process and as a child process.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use portcullis::config::Config;
use portcullis::server::{self, Bound};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Generous bound for anything that should happen "now" on a loaded 2-core machine.
pub const SOON: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Certificates

pub struct Certs {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A self-signed certificate for localhost/127.0.0.1, generated once per test process.
pub fn certs() -> &'static Certs {
    static CERTS: OnceLock<Certs> = OnceLock::new();
    CERTS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("portcullis-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).expect("cert");
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).expect("write cert");
        std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
        Certs { dir, cert, key }
    })
}

fn tls_connector() -> tokio_rustls::TlsConnector {
    tls_connector_with(portcullis::crypto::provider())
}

/// A client trusting the test certificate, offering the suites of `provider` in its order.
pub fn tls_connector_with(provider: Arc<rustls::crypto::CryptoProvider>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&certs().cert).expect("read cert") {
        roots.add(c.expect("cert")).expect("add root");
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

// ---------------------------------------------------------------------------------------------
// Raw frame codec

pub mod op {
    pub const CONT: u8 = 0;
    pub const TEXT: u8 = 1;
    pub const BINARY: u8 = 2;
    pub const CLOSE: u8 = 8;
    pub const PING: u8 = 9;
    pub const PONG: u8 = 10;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TFrame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    /// Unmasked payload.
    pub payload: Vec<u8>,
    /// The bytes as they were on the wire.
    pub raw: Vec<u8>,
}

impl TFrame {
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == op::CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    pub fn close_reason(&self) -> String {
        String::from_utf8_lossy(self.payload.get(2..).unwrap_or_default()).into_owned()
    }
}

/// Encodes one frame with the proxy's own encoder; `rsv` is the three RSV bits (4 = RSV1).
pub fn encode(fin: bool, rsv: u8, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    portcullis::proxy::relay::frame::encode(fin, rsv << 4, opcode, mask, payload, &mut out);
    out
}

pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// Reads one frame; `Err` on EOF or I/O error.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<TFrame> {
    let mut raw = vec![0u8; 2];
    r.read_exact(&mut raw).await?;
    let fin = raw[0] & 0x80 != 0;
    let rsv = (raw[0] >> 4) & 7;
    let opcode = raw[0] & 0x0F;
    let masked = raw[1] & 0x80 != 0;
    let len = match raw[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).await?;
            raw.extend_from_slice(&b);
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b).await?;
            raw.extend_from_slice(&b);
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut key = [0u8; 4];
    if masked {
        r.read_exact(&mut key).await?;
        raw.extend_from_slice(&key);
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    raw.extend_from_slice(&payload);
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i & 3];
        }
    }
    Ok(TFrame { fin, rsv, opcode, masked, payload, raw })
}

/// Reads an HTTP head byte by byte (so nothing after it is consumed).
pub async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if r.read(&mut b).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(b[0]);
        if head.len() > 64 * 1024 {
            return Err(std::io::Error::other("head too large"));
        }
    }
    Ok(head)
}

#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

pub fn parse_response(head: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(head).expect("valid response");
    Head {
        status: resp.code.unwrap_or(0),
        method: String::new(),
        path: String::new(),
        headers: resp
            .headers
            .iter()
            .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
            .collect(),
    }
}

pub fn parse_request(head: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).expect("valid request");
    Head {
        status: 0,
        method: req.method.unwrap_or("").to_string(),
        path: req.path.unwrap_or("").to_string(),
        headers: req
            .headers
            .iter()
            .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
            .collect(),
    }
}

pub fn accept_for(key: &str) -> String {
    portcullis::proxy::upgrade::accept_value(key.as_bytes())
}

// ---------------------------------------------------------------------------------------------
// Client

pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Opens a TCP (and TLS when `tls`) connection to `addr`.
pub async fn dial(addr: SocketAddr, tls: bool) -> Box<dyn Io> {
    let tcp = TcpStream::connect(addr).await.expect("connect to proxy");
    tcp.set_nodelay(true).expect("nodelay");
    if tls {
        let s = tls_connector()
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
            .expect("tls handshake");
        Box::new(s)
    } else {
        Box::new(tcp)
    }
}

pub struct Client {
    pub io: Box<dyn Io>,
    pub response: Head,
    /// Every byte sent after the handshake.
    pub sent: Vec<u8>,
}

pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Sends an upgrade for `path` with `extra` header lines; returns the client if the answer is
/// 101, else the response head.
pub async fn upgrade(addr: SocketAddr, tls: bool, path: &str, extra: &[(&str, &str)]) -> Result<Client, Head> {
    let mut io = dial(addr, tls).await;
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (n, v) in extra {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    io.write_all(req.as_bytes()).await.expect("send request");
    let head = read_head(&mut io).await.expect("response head");
    let response = parse_response(&head);
    if response.status != 101 {
        return Err(response);
    }
    assert_eq!(response.header("sec-websocket-accept"), Some(accept_for(KEY).as_str()));
    Ok(Client { io, response, sent: Vec::new() })
}

/// Sends raw bytes as an HTTP request and returns the response head (and closes).
pub async fn raw_request(addr: SocketAddr, tls: bool, request: &[u8]) -> Head {
    let mut io = dial(addr, tls).await;
    io.write_all(request).await.expect("send request");
    let head = tokio::time::timeout(SOON, read_head(&mut io)).await.expect("response in time").expect("response head");
    parse_response(&head)
}

impl Client {
    pub async fn send(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let bytes = encode(fin, 0, opcode, Some(rand_mask()), payload);
        self.send_raw(&bytes).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("client write");
        self.io.flush().await.expect("client flush");
        self.sent.extend_from_slice(bytes);
    }

    pub async fn recv(&mut self) -> TFrame {
        tokio::time::timeout(SOON, read_frame(&mut self.io)).await.expect("frame in time").expect("frame")
    }

    /// Next frame, or `None` on EOF / reset.
    pub async fn try_recv(&mut self) -> Option<TFrame> {
        tokio::time::timeout(SOON, read_frame(&mut self.io)).await.expect("frame or EOF in time").ok()
    }

    /// Receives frames until a close frame, answering nothing; returns it.
    pub async fn recv_close(&mut self) -> TFrame {
        loop {
            let f = self.recv().await;
            if f.opcode == op::CLOSE {
                return f;
            }
        }
    }

    /// Waits for EOF (or reset) on the connection.
    pub async fn expect_eof(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(SOON, self.io.read(&mut buf)).await.expect("EOF in time") {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    }
}

pub fn rand_mask() -> [u8; 4] {
    rand::random()
}

// ---------------------------------------------------------------------------------------------
// Backend

/// How the test backend answers the handshake.
#[derive(Clone, Default)]
pub struct BackendOpts {
    /// Answer this status instead of 101.
    pub status: Option<u16>,
    /// Answer 101 with a wrong Sec-WebSocket-Accept.
    pub bad_accept: bool,
    /// Never answer the handshake.
    pub hang: bool,
    /// Extensions header to answer with.
    pub extensions: Option<String>,
    /// Choose the first offered subprotocol.
    pub pick_protocol: bool,
}

pub type Handler = Arc<dyn Fn(BackendSession) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

pub struct BackendSession {
    pub stream: TcpStream,
    pub request: Head,
    pub log: Arc<BackendLog>,
}

#[derive(Default)]
pub struct BackendLog {
    pub requests: Mutex<Vec<Head>>,
    /// Frames received from the proxy, across sessions.
    pub frames: Mutex<Vec<TFrame>>,
    /// Sessions whose connection ended (EOF or error) without a close frame.
    pub eofs: Mutex<usize>,
    pub notify: tokio::sync::Notify,
}

impl BackendLog {
    pub fn frames(&self) -> Vec<TFrame> {
        self.frames.lock().expect("lock").clone()
    }

    /// Waits until a frame matching `f` was received.
    pub async fn wait_for(&self, what: &str, f: impl Fn(&TFrame) -> bool) -> TFrame {
        let deadline = Instant::now() + SOON;
        loop {
            let notified = self.notify.notified();
            if let Some(fr) = self.frames.lock().expect("lock").iter().find(|x| f(x)) {
                return fr.clone();
            }
            if tokio::time::timeout_at(deadline.into(), notified).await.is_err() {
                panic!(
                    "backend never received {what}; got {:?}",
                    self.frames().iter().map(|f| f.opcode).collect::<Vec<_>>()
                );
            }
        }
    }

    pub fn record(&self, f: TFrame) {
        self.frames.lock().expect("lock").push(f);
        self.notify.notify_waiters();
    }
}

pub struct Backend {
    pub addr: SocketAddr,
    pub log: Arc<BackendLog>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn echo() -> Backend {
        Backend::start(BackendOpts::default(), echo_handler()).await
    }

    pub async fn start(opts: BackendOpts, handler: Handler) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        let log = Arc::new(BackendLog::default());
        let log2 = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { continue };
                let opts = opts.clone();
                let handler = handler.clone();
                let log = log2.clone();
                tokio::spawn(async move {
                    let Ok(head) = read_head(&mut stream).await else { return };
                    let request = parse_request(&head);
                    log.requests.lock().expect("lock").push(request.clone());
                    log.notify.notify_waiters();
                    if opts.hang {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                    if let Some(status) = opts.status {
                        let _ = stream
                            .write_all(format!("HTTP/1.1 {status} Nope\r\ncontent-length: 0\r\n\r\n").as_bytes())
                            .await;
                        return;
                    }
                    let key = request.header("sec-websocket-key").unwrap_or("").to_string();
                    let accept =
                        if opts.bad_accept { "d3JvbmcgYWNjZXB0IHZhbHVlIQ==".to_string() } else { accept_for(&key) };
                    let mut resp = format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n"
                    );
                    if let Some(e) = &opts.extensions {
                        resp.push_str(&format!("Sec-WebSocket-Extensions: {e}\r\n"));
                    }
                    if opts.pick_protocol {
                        if let Some(p) = request.header("sec-websocket-protocol") {
                            let first = p.split(',').next().unwrap_or("").trim().to_string();
                            resp.push_str(&format!("Sec-WebSocket-Protocol: {first}\r\n"));
                        }
                    }
                    resp.push_str("\r\n");
                    if stream.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                    handler(BackendSession { stream, request, log }).await;
                });
            }
        });
        Backend { addr, log, task }
    }
}

/// Echoes data frames (same fin, rsv, opcode and payload, unmasked), answers pings, and
/// answers a close with the same payload.
pub fn echo_handler() -> Handler {
    Arc::new(|mut s: BackendSession| {
        Box::pin(async move {
            loop {
                let f = match read_frame(&mut s.stream).await {
                    Ok(f) => f,
                    Err(_) => {
                        *s.log.eofs.lock().expect("lock") += 1;
                        s.log.notify.notify_waiters();
                        return;
                    }
                };
                s.log.record(f.clone());
                let reply = match f.opcode {
                    op::PING => encode(true, 0, op::PONG, None, &f.payload),
                    op::PONG => continue,
                    op::CLOSE => {
                        let _ = s.stream.write_all(&encode(true, 0, op::CLOSE, None, &f.payload)).await;
                        return;
                    }
                    _ => encode(f.fin, f.rsv, f.opcode, None, &f.payload),
                };
                if s.stream.write_all(&reply).await.is_err() {
                    return;
                }
            }
        })
    })
}

/// Records frames and answers nothing (not even pings or close).
pub fn silent_handler() -> Handler {
    Arc::new(|mut s: BackendSession| {
        Box::pin(async move {
            while let Ok(f) = read_frame(&mut s.stream).await {
                s.log.record(f);
            }
            *s.log.eofs.lock().expect("lock") += 1;
            s.log.notify.notify_waiters();
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Proxy in-process

pub struct Proxy {
    pub tls: SocketAddr,
    pub plain: SocketAddr,
    pub admin: SocketAddr,
    /// For reloads.
    pub handle: Arc<portcullis::server::Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Configuration for the test proxy: one TLS and one plain listener, admin, and a route
/// `/agents/{agent}/terminal` to `backends`. `session` and `server` are extra TOML lines for
/// those sections; `extra` is appended (more routes).
pub fn config_text(backends: &[String], server: &str, session: &str, extra: &str) -> String {
    let c = certs();
    let backends = backends.iter().map(|b| format!("\"{b}\"")).collect::<Vec<_>>().join(", ");
    let text = format!(
        r#"
[server]
tls_handshake_timeout = "2s"
header_read_timeout = "2s"
drain_timeout = "10s"
drain_spread = "200ms"
{server}

[tls]
cert = "{cert}"
key = "{key}"

[[listeners]]
name = "tls"
addresses = ["127.0.0.1:0"]
tls = true

[[listeners]]
name = "plain"
addresses = ["127.0.0.1:0"]

[admin]
address = "127.0.0.1:0"

[session]
ping_interval = "0s"
close_timeout = "1s"
max_frame_size = "2MiB"
max_message_size = "4MiB"
{session}

[backend]
connect_timeout = "1s"
handshake_timeout = "1s"

[[routes]]
name = "terminal"
path = "/agents/{{agent}}/terminal"
backends = [{backends}]
{extra}
"#,
        cert = c.cert.display(),
        key = c.key.display(),
    );
    // Extra lines override the base ones with the same key.
    let overridden: Vec<&str> =
        server.lines().chain(session.lines()).filter_map(|l| l.split_once('=').map(|(k, _)| k.trim())).collect();
    let mut out = String::new();
    let mut extras = false;
    for line in text.lines() {
        extras |= line.starts_with("[[routes]]");
        let key = line.split_once('=').map(|(k, _)| k.trim());
        let base_line = !server.lines().chain(session.lines()).any(|l| l == line);
        if !extras && base_line && key.is_some_and(|k| overridden.contains(&k)) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

impl Proxy {
    pub async fn start(backend: SocketAddr, session: &str) -> Proxy {
        Proxy::start_with(&config_text(&[backend.to_string()], "", session, "")).await
    }

    pub async fn start_with(text: &str) -> Proxy {
        let config = Config::parse(text, Path::new("test.toml")).expect("valid test config");
        let bound = Bound::bind(&config).await.expect("bind");
        let addrs = bound.addrs();
        let admin = bound.admin_addr().expect("admin");
        let (tx, rx) = oneshot::channel::<()>();
        let server = server::Server::new(config).expect("server");
        let handle = server.handle();
        let task = tokio::spawn(async move {
            server
                .serve(bound, async {
                    let _ = rx.await;
                })
                .await
                .expect("serve");
        });
        Proxy { tls: addrs[0], plain: addrs[1], admin, handle, shutdown: Some(tx), task: Some(task) }
    }
}

/// GET `path` on `addr` (plain HTTP); returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect admin");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.expect("send");
    let mut out = Vec::new();
    tokio::time::timeout(SOON, s.read_to_end(&mut out)).await.expect("admin answers").expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// Value of a metric line (`name{labels}` exactly as rendered) in a Prometheus text body.
pub fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.rsplit_once(' ').filter(|(k, _)| *k == series).and_then(|(_, v)| v.parse().ok()))
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------
// Proxy as a child process

pub struct ProxyProcess {
    pub child: Child,
    pub tls: SocketAddr,
    pub plain: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

impl ProxyProcess {
    /// Runs `portcullis run` with `text`, where "127.0.0.1:0" listener addresses are replaced by
    /// free ports in order (tls, plain, admin); waits until /live answers.
    pub async fn start(text: &str) -> ProxyProcess {
        ProxyProcess::start_with_log(text, "portcullis=info").await
    }

    /// Like [`ProxyProcess::start`], with `RUST_LOG` set to `filter`; logs go to a file.
    pub async fn start_with_log(text: &str, filter: &str) -> ProxyProcess {
        let ports = [free_port(), free_port(), free_port()];
        let mut t = text.to_string();
        for p in ports {
            t = t.replacen("\"127.0.0.1:0\"", &format!("\"127.0.0.1:{p}\""), 1);
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("portcullis.toml");
        std::fs::write(&path, t).expect("write config");
        let log = std::fs::File::create(dir.path().join("proxy.log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", filter)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn portcullis");
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let pp = ProxyProcess { child, tls: addr(ports[0]), plain: addr(ports[1]), admin: addr(ports[2]), dir };
        let deadline = Instant::now() + SOON;
        loop {
            if let Ok(mut s) = TcpStream::connect(pp.admin).await {
                let _ = s.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out).await;
                if out.starts_with(b"HTTP/1.1 200") {
                    return pp;
                }
            }
            assert!(Instant::now() < deadline, "proxy process did not become live");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the proxy (SIGTERM, then waits) and returns everything it logged.
    pub async fn stop_and_collect_logs(&mut self) -> String {
        self.signal("TERM");
        let deadline = Instant::now() + SOON;
        while self.child.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < deadline, "proxy did not stop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        std::fs::read_to_string(self.dir.path().join("proxy.log")).expect("read log")
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status().expect("kill");
        assert!(ok.success());
    }
}

pub fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

// ---------------------------------------------------------------------------------------------
// A tiny HTTP server (JWKS endpoints, registries)

/// Answers every request with `respond(path) -> (status, body)` after `delay`; returns its
/// address and a count of the requests it received.
pub async fn http_server(
    respond: impl Fn(&str) -> (u16, String) + Send + Sync + 'static,
    delay: Duration,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let respond = Arc::new(respond);
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let (h, respond) = (h.clone(), respond.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    h.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = respond(req.uri().path());
                    async move {
                        tokio::time::sleep(delay).await;
                        let mut r = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
                        *r.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, hits)
}
