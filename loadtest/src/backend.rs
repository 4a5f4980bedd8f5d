//! `portcullis-loadtest backend`: the agent side of a benchmark, a small fast WebSocket server.
//!
//! Modes: `echo` (every data message back), `sink` (read and discard), `source` (push messages
//! of `size` at `rate` per connection), `terminal` (echo keystrokes, plus bursts of output).
//! Two fault injections exist to prove the harness itself: `corrupt_every` flips a byte in
//! every Nth echoed message, `stall_after` stops reading once, for `stall_for`.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{upgrade, FragmentCollector, FragmentCollectorRead, Frame, OpCode, Payload, WebSocketError};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rand::Rng;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::wire::{self, Kind};

/// What the backend does with each session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Echo every data message.
    Echo,
    /// Read and discard.
    Sink,
    /// Push messages of `size` bytes at `rate` per second per connection (0 = as fast as possible).
    Source,
    /// Echo keystrokes and send bursts of output at random intervals.
    Terminal,
    /// Dashboards: sessions on the same path are one agent's watchers. Once `watchers` of them
    /// have joined (or `start_after` passed), the agent publishes `events` timed messages at
    /// `rate` per second to all of them, in order, then closes each with 1000.
    Broadcast,
}

/// Backend settings.
#[derive(Clone, Debug, clap::Args)]
pub struct BackendOptions {
    /// What to do with each session.
    #[arg(long, value_enum, default_value = "echo")]
    pub mode: Mode,
    /// Size of backend-originated messages (source and terminal modes), bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Messages per second per connection in source mode (0 = as fast as possible).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Fault injection: flip one byte in every Nth echoed message (0 = never).
    #[arg(long, default_value_t = 0)]
    pub corrupt_every: u64,
    /// Fault injection: after this many messages received in total, stop reading once...
    #[arg(long)]
    pub stall_after: Option<u64>,
    /// ...for this long.
    #[arg(long, default_value = "1s", value_parser = crate::parse_duration)]
    pub stall_for: Duration,
    /// Serve wss:// with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Select no subprotocol, whatever the client offers (as most agent backends do); by
    /// default the first offered one is selected.
    #[arg(long)]
    pub no_subprotocol: bool,
    /// Broadcast: watchers per agent (path) before its events start.
    #[arg(long, default_value_t = 50)]
    pub watchers: usize,
    /// Broadcast: events each agent publishes.
    #[arg(long, default_value_t = 100)]
    pub events: u64,
    /// Broadcast: start an agent's events this long after its first watcher joined, even if
    /// fewer than `watchers` came.
    #[arg(long, default_value = "30s", value_parser = crate::parse_duration)]
    pub start_after: Duration,
}

impl BackendOptions {
    /// A plain backend in `mode` with no fault injection.
    pub fn new(mode: Mode) -> Self {
        BackendOptions {
            mode,
            size: 1024,
            rate: 100.0,
            corrupt_every: 0,
            stall_after: None,
            stall_for: Duration::ZERO,
            tls_cert: None,
            tls_key: None,
            no_subprotocol: false,
            watchers: 50,
            events: 100,
            start_after: Duration::from_secs(30),
        }
    }
}

/// State shared by all sessions of one backend.
struct Shared {
    /// Settings.
    opts: BackendOptions,
    /// Data messages received over all sessions: drives `corrupt_every` and `stall_after`.
    received: AtomicU64,
    /// Whether the one stall has happened.
    stalled: AtomicBool,
    /// Broadcast: one group of watchers per path.
    groups: Arc<std::sync::Mutex<std::collections::HashMap<String, Arc<Group>>>>,
    /// MCP: the session ids issued.
    sessions: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// One agent's watchers (broadcast mode): the events go out on `tx` once enough joined.
struct Group {
    tx: tokio::sync::broadcast::Sender<Bytes>,
    joined: std::sync::atomic::AtomicUsize,
    start: tokio::sync::Notify,
}

/// Serves WebSocket sessions on an already bound `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, opts: BackendOptions) {
    serve_with(listener, opts, None).await
}

/// A TLS acceptor from a PEM certificate chain and private key, for a `wss://` backend.
pub fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad PEM in {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("cannot read a key from {}", key.display()))?;
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Like [`serve`], over TLS when `tls` is given.
pub async fn serve_with(listener: TcpListener, opts: BackendOptions, tls: Option<tokio_rustls::TlsAcceptor>) {
    let shared = Arc::new(Shared {
        opts,
        received: AtomicU64::new(0),
        stalled: AtomicBool::new(false),
        groups: Arc::default(),
        sessions: Default::default(),
    });
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(x) => x,
            Err(_) => {
                // Usually descriptor exhaustion: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| request(req, shared.clone()));
            match tls {
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                        let _ = conn.with_upgrades().await;
                    }
                }
                None => {
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(tcp), service).with_upgrades().await;
                }
            }
        });
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn empty() -> Body {
    Empty::<Bytes>::new().boxed()
}

/// Plain HTTP (the `http` and `sse` scenarios): a path with `sse` in it streams events at
/// `rate` per second (or the query's `rate=N`; 0: as fast as the client reads),
/// `data: <seq> <sent µs>`, until the client goes; a POST gets its body back; any other request gets `size` bytes (a backend
/// message with the integrity header).
async fn plain(req: Request<Incoming>, shared: Arc<Shared>) -> Response<Body> {
    if req.uri().path().contains("sse") {
        let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(16);
        // `?rate=N` overrides the backend's --rate for this stream.
        let rate = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("rate=")))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(shared.opts.rate);
        tokio::spawn(async move {
            let gap = if rate > 0.0 { Duration::from_secs_f64(1.0 / rate) } else { Duration::ZERO };
            let mut next = tokio::time::Instant::now();
            for seq in 0u64.. {
                if !gap.is_zero() {
                    tokio::time::sleep_until(next).await;
                    next += gap;
                }
                let event = format!("id: {seq}\ndata: {seq} {}\n\n", wire::now_us());
                if tx.send_data(Bytes::from(event)).await.is_err() {
                    return;
                }
            }
        });
        let mut r = Response::new(body.boxed());
        r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("text/event-stream"));
        r.headers_mut().insert("cache-control", hyper::header::HeaderValue::from_static("no-cache"));
        return r;
    }
    if req.method() == hyper::Method::POST && req.uri().path().contains("mcp") {
        return mcp(req, &shared).await;
    }
    if req.method() == hyper::Method::POST {
        return match http_body_util::Limited::new(req.into_body(), 64 << 20).collect().await {
            Ok(b) => Response::new(Full::new(b.to_bytes()).boxed()),
            Err(_) => {
                let mut r = Response::new(empty());
                *r.status_mut() = hyper::StatusCode::PAYLOAD_TOO_LARGE;
                r
            }
        };
    }
    Response::new(Full::new(Bytes::from(wire::encode(Kind::Backend, 0, 0, shared.opts.size))).boxed())
}

/// An MCP server's Streamable HTTP endpoint (a path with `mcp` in it), as far as the `mcp`
/// scenario needs: `initialize` issues a session id, which every later request must carry (404
/// otherwise, as MCP answers an unknown session); `tools/call` of `echo` answers its arguments
/// as text; any other method an empty result. Answers are `application/json`.
async fn mcp(req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    let session = req.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let status = |code: u16, text: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())).boxed());
        *r.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::BAD_REQUEST);
        r
    };
    let Ok(body) = http_body_util::Limited::new(req.into_body(), 64 << 20).collect().await else {
        return status(413, "too large");
    };
    let Ok(msg) = serde_json::from_slice::<serde_json::Value>(&body.to_bytes()) else {
        return status(400, "not JSON");
    };
    let known = |id: &str| shared.sessions.lock().map(|s| s.contains(id)).unwrap_or(false);
    let mut issued = None;
    let result = match msg["method"].as_str() {
        Some("initialize") => {
            let id = format!("lt-{:032x}", rand::random::<u128>());
            if let Ok(mut s) = shared.sessions.lock() {
                s.insert(id.clone());
            }
            issued = Some(id);
            serde_json::json!({"protocolVersion": msg["params"]["protocolVersion"], "capabilities": {"tools": {}},
                "serverInfo": {"name": "portcullis-loadtest", "version": env!("CARGO_PKG_VERSION")}})
        }
        _ if !session.as_deref().is_some_and(known) => return status(404, "unknown session"),
        Some("tools/call") if msg["params"]["name"] == "echo" => {
            serde_json::json!({"content": [{"type": "text", "text": msg["params"]["arguments"].to_string()}]})
        }
        _ => serde_json::json!({}),
    };
    let answer = serde_json::json!({"jsonrpc": "2.0", "id": msg["id"], "result": result});
    let mut r = Response::new(Full::new(Bytes::from(answer.to_string())).boxed());
    r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/json"));
    if let Some(id) = issued.as_deref().or(session.as_deref()).and_then(|v| v.parse().ok()) {
        r.headers_mut().insert("mcp-session-id", id);
    }
    r
}

async fn request(mut req: Request<Incoming>, shared: Arc<Shared>) -> Result<Response<Body>, Infallible> {
    if !upgrade::is_upgrade_request(&req) {
        return Ok(plain(req, shared).await);
    }
    let protocol = req.headers().get("sec-websocket-protocol").cloned();
    let select_none = shared.opts.no_subprotocol;
    let path = req.uri().path().to_owned();
    // Broadcast groups: the backend's mode, or any mode on a path with `/broadcast` in it (so
    // one backend serves every scenario of a comparison), with `?watchers=&events=&rate=`
    // overriding the backend's flags.
    let broadcast = (shared.opts.mode == Mode::Broadcast || path.contains("/broadcast"))
        .then(|| broadcast_opts(&shared.opts, req.uri().query()));
    match upgrade::upgrade(&mut req) {
        Ok((mut resp, fut)) => {
            tokio::spawn(async move {
                if let Ok(ws) = fut.await {
                    let _ = match broadcast {
                        Some(opts) => watcher(ws, &shared, &path, opts).await,
                        None => session(ws, &shared).await,
                    };
                }
            });
            // Accept the first offered subprotocol so clients that offer one are satisfied.
            let offered = protocol.as_ref().filter(|_| !select_none);
            if let Some(first) = offered.and_then(|p| p.to_str().ok()).and_then(|p| p.split(',').next()) {
                if let Ok(v) = first.trim().parse() {
                    resp.headers_mut().insert("sec-websocket-protocol", v);
                }
            }
            Ok(resp.map(|b| b.boxed()))
        }
        Err(_) => {
            let mut r = Response::new(empty());
            *r.status_mut() = hyper::StatusCode::BAD_REQUEST;
            Ok(r)
        }
    }
}

type Ws = fastwebsockets::WebSocket<TokioIo<hyper::upgrade::Upgraded>>;

async fn session(ws: Ws, shared: &Shared) -> Result<(), WebSocketError> {
    match shared.opts.mode {
        Mode::Echo | Mode::Sink => echo_or_sink(ws, shared).await,
        Mode::Source | Mode::Terminal => with_output(ws, shared).await,
        Mode::Broadcast => Ok(()),
    }
}

/// The group for `path`, made (with its publisher) by its first watcher.
/// The backend's options with a request's `watchers`, `events` and `rate` query values.
fn broadcast_opts(base: &BackendOptions, query: Option<&str>) -> BackendOptions {
    let mut o = base.clone();
    for (k, v) in query.unwrap_or("").split('&').filter_map(|kv| kv.split_once('=')) {
        match k {
            "watchers" => o.watchers = v.parse().unwrap_or(o.watchers),
            "events" => o.events = v.parse().unwrap_or(o.events),
            "rate" => o.rate = v.parse().unwrap_or(o.rate),
            "size" => o.size = v.parse().unwrap_or(o.size),
            _ => {}
        }
    }
    o
}

fn group(shared: &Shared, path: &str, opts: &BackendOptions) -> Arc<Group> {
    let mut groups = shared.groups.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(g) = groups.get(path) {
        return g.clone();
    }
    let capacity = (opts.events as usize).clamp(1, 1 << 16);
    let g = Arc::new(Group {
        tx: tokio::sync::broadcast::channel(capacity).0,
        joined: std::sync::atomic::AtomicUsize::new(0),
        start: tokio::sync::Notify::new(),
    });
    groups.insert(path.to_owned(), g.clone());
    let (publisher, opts, groups, path) = (g.clone(), opts.clone(), shared.groups.clone(), path.to_owned());
    tokio::spawn(async move {
        let _ = tokio::time::timeout(opts.start_after, publisher.start.notified()).await;
        let gap = if opts.rate > 0.0 { Duration::from_secs_f64(1.0 / opts.rate) } else { Duration::ZERO };
        let mut next = tokio::time::Instant::now();
        for seq in 0..opts.events {
            if !gap.is_zero() {
                tokio::time::sleep_until(next).await;
                next += gap;
            }
            let msg = wire::encode_at(Kind::Backend, 0, seq, opts.size, wire::now_us());
            let _ = publisher.tx.send(Bytes::from(msg));
        }
        // The group is done: a later watcher of this path starts a new one. Dropping the last
        // sender ends every watcher's stream after the last event.
        groups.lock().unwrap_or_else(|p| p.into_inner()).remove(&path);
    });
    g
}

/// A watcher of one agent (broadcast mode): every event of its group, then a 1000 close.
async fn watcher(ws: Ws, shared: &Shared, path: &str, opts: BackendOptions) -> Result<(), WebSocketError> {
    let g = group(shared, path, &opts);
    let mut events = g.tx.subscribe();
    if g.joined.fetch_add(1, Ordering::AcqRel) + 1 >= opts.watchers {
        g.start.notify_one();
    }
    // Only the publisher task holds the sender from here on: when it is done the stream ends.
    drop(g);
    let (rx, mut tx) = ws.split(tokio::io::split);
    let mut rx = FragmentCollectorRead::new(rx);
    let reader = tokio::spawn(async move {
        // Read (and answer nothing to) whatever the client sends until it goes.
        while let Ok(f) = rx.read_frame(&mut |_| async { Ok::<_, WebSocketError>(()) }).await {
            if f.opcode == OpCode::Close {
                break;
            }
        }
    });
    let result = loop {
        match events.recv().await {
            Ok(msg) => {
                if let Err(e) = tx.write_frame(Frame::binary(Payload::Borrowed(&msg))).await {
                    break Err(e);
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                break tx.write_frame(Frame::close(1000, b"events done")).await;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
    result
}

/// Counts a received data message and applies the stall fault; returns its 1-based number.
async fn on_received(shared: &Shared) -> u64 {
    let n = shared.received.fetch_add(1, Ordering::Relaxed) + 1;
    if shared.opts.stall_after.is_some_and(|after| n > after) && !shared.stalled.swap(true, Ordering::Relaxed) {
        tokio::time::sleep(shared.opts.stall_for).await;
    }
    n
}

/// The reply to a data message: the same bytes, with one flipped if the corrupt fault fires.
fn reply(payload: &[u8], n: u64, shared: &Shared) -> Vec<u8> {
    let mut out = payload.to_vec();
    if shared.opts.corrupt_every > 0 && n % shared.opts.corrupt_every == 0 && !out.is_empty() {
        let i = out.len() - 1;
        out[i] ^= 0x01;
    }
    out
}

async fn echo_or_sink(ws: Ws, shared: &Shared) -> Result<(), WebSocketError> {
    let mut ws = FragmentCollector::new(ws);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => return Ok(()),
            OpCode::Text | OpCode::Binary => {
                let n = on_received(shared).await;
                if shared.opts.mode == Mode::Echo {
                    let out = reply(&frame.payload, n, shared);
                    ws.write_frame(Frame::new(true, frame.opcode, None, Payload::Owned(out))).await?;
                }
            }
            _ => {}
        }
    }
}

async fn with_output(ws: Ws, shared: &Shared) -> Result<(), WebSocketError> {
    let (rx, tx) = ws.split(tokio::io::split);
    let mut rx = FragmentCollectorRead::new(rx);
    let tx = Arc::new(Mutex::new(tx));
    let producer = {
        let tx = tx.clone();
        let (mode, size, rate) = (shared.opts.mode, shared.opts.size, shared.opts.rate);
        tokio::spawn(async move {
            let mut seq = 0u64;
            loop {
                let burst = if mode == Mode::Terminal {
                    let (pause, burst) = {
                        let mut rng = rand::rng();
                        (rng.random_range(100..1000u64), rng.random_range(1..20usize))
                    };
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    burst
                } else {
                    if rate > 0.0 {
                        tokio::time::sleep(Duration::from_secs_f64(1.0 / rate)).await;
                    } else {
                        tokio::task::yield_now().await;
                    }
                    1
                };
                let mut tx = tx.lock().await;
                for _ in 0..burst {
                    let msg = wire::encode(Kind::Backend, 0, seq, size);
                    seq += 1;
                    if tx.write_frame(Frame::binary(Payload::Owned(msg))).await.is_err() {
                        return;
                    }
                }
            }
        })
    };
    let result = loop {
        let frame = match rx
            .read_frame(&mut |f| {
                let tx = tx.clone();
                async move { tx.lock().await.write_frame(f).await }
            })
            .await
        {
            Ok(f) => f,
            Err(e) => break Err(e),
        };
        match frame.opcode {
            OpCode::Close => break Ok(()),
            OpCode::Text | OpCode::Binary => {
                let n = on_received(shared).await;
                if shared.opts.mode == Mode::Terminal {
                    let out = reply(&frame.payload, n, shared);
                    let frame = Frame::new(true, frame.opcode, None, Payload::Owned(out));
                    if let Err(e) = tx.lock().await.write_frame(frame).await {
                        break Err(e);
                    }
                }
            }
            _ => {}
        }
    };
    producer.abort();
    result
}
