//! Plain HTTP on both sides of the proxy: a test agent backend (REST and SSE endpoints, counting
//! the connections it accepts and recording what it was asked), a raw backend that misbehaves
//! on purpose, and an HTTP/1.1 client (hyper) over TLS or plain TCP that keeps its connection.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

/// The body type of the test client's requests and the backend's responses.
pub type TBody = BoxBody<Bytes, std::io::Error>;

/// A request body from bytes.
pub fn full(b: impl Into<Bytes>) -> TBody {
    Full::new(b.into()).map_err(|never: Infallible| match never {}).boxed()
}

/// What the backend was asked.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: BTreeMap<String, String>,
    pub body_len: usize,
    /// The connection (by accept order) it came on.
    pub conn: usize,
}

/// A test agent backend. Endpoints (matched on the last path segment, so any backend_path works):
/// - `echo`: answers the request body back once it has all of it (`x-body-len` says its size);
/// - `upload`: reads the request body as it comes and answers "got N" at its end; what it
///   read and how the body ended (`x-upload-end`: `complete`, or `cut` when it failed) is in
///   [`RestBackend::seen`];
/// - `early?kib=K`: answers at once with K KiB (default 8192), and reads the request body
///   meanwhile, recorded as `upload`'s is when it ends;
/// - `headers`: answers 200 "ok" (what it saw is in [`RestBackend::seen`]);
/// - `sse?n=N&gap_ms=G&hold=1&partial=1`: `text/event-stream`, N events `data: i` G ms apart,
///   then (`partial=1`) the first line of an event that never ends, then ends (or with `hold=1`
///   stays open, sending nothing);
/// - `slow?ms=M`: the response head after M ms (recorded in [`RestBackend::seen`] at once);
/// - `big?kib=K&ms=M`: after M ms, K KiB with their `content-length`, a KiB every 10 ms;
/// - `late?ms=M`: recorded at once; after M ms a `text/event-stream` head, one event, then
///   nothing (a request `DROPPED <uri>` is recorded when the proxy drops the body);
/// - `stall`: the head and one chunk, then nothing; `ndjson`: the same as
///   `application/x-ndjson` (when the proxy drops either body, a request `DROPPED <uri>` is
///   recorded in [`RestBackend::seen`]); `chunks`: two chunks and the end, with no length (a
///   short chunked answer);
/// - `status?code=C`: answers C;
/// - `cookie`: sets `portcullis_token` (the proxy's credential cookie) and `theme`;
/// - `mcp`: a stateful session, as an MCP server's (see the handler).
pub struct RestBackend {
    pub addr: SocketAddr,
    /// TCP connections accepted.
    pub accepts: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Name in the `x-member` response header.
    pub name: String,
}

impl RestBackend {
    pub async fn start(name: &str) -> RestBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepts = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (a, s, n) = (accepts.clone(), seen.clone(), name.to_owned());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let conn = a.fetch_add(1, Ordering::SeqCst);
                let (s, n) = (s.clone(), n.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| respond(req, conn, s.clone(), n.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        RestBackend { addr, accepts, seen, name: name.to_owned() }
    }

    /// Requests received so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }

    /// Whether the proxy dropped a body of `subject`'s request (`DROPPED`, see the endpoints).
    pub fn dropped_for(&self, subject: &str) -> bool {
        let of = |s: &Seen| s.method == "DROPPED" && s.headers.get("x-portcullis-sub").is_some_and(|v| v == subject);
        self.seen().iter().any(of)
    }
}

/// The `mcp` endpoint's answer: a new session, the session it created, or 404.
fn mcp_session(parts: &hyper::http::request::Parts, conn: usize, name: &str) -> Response<TBody> {
    match parts.headers.get("mcp-session-id").and_then(|v| v.to_str().ok()) {
        None => {
            let mut r = Response::new(full(Bytes::from(format!("{name}:new"))));
            let id = format!("{name}-session-{conn}-{}", rand::random::<u32>());
            r.headers_mut().insert("mcp-session-id", id.parse().expect("id"));
            r
        }
        // As the SDK's server does, every answer of a session repeats its id.
        Some(id) if id.starts_with(&format!("{name}-session-")) => {
            let mut r = Response::new(full(Bytes::from(format!("{name}:{id}"))));
            r.headers_mut().insert("mcp-session-id", id.parse().expect("id"));
            r
        }
        Some(_) => {
            let mut r = Response::new(full(Bytes::from_static(b"unknown session")));
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    }
}

/// Reads an upload to its end into `record`: its length, and how it ended (`x-upload-end`).
async fn read_upload(mut body: Incoming, record: &mut Seen) {
    let mut ended = "complete";
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => record.body_len += f.data_ref().map_or(0, |d| d.len()),
            Err(_) => {
                ended = "cut";
                break;
            }
        }
    }
    record.headers.insert("x-upload-end".into(), ended.into());
}

fn query(uri: &hyper::Uri, key: &str) -> Option<u64> {
    uri.query()?.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

async fn respond(
    mut req: Request<Incoming>,
    conn: usize,
    seen: Arc<Mutex<Vec<Seen>>>,
    name: String,
) -> Result<Response<TBody>, Infallible> {
    let upgrade = req.headers().get("sec-websocket-key").map(|k| accept_for(k.to_str().unwrap_or("")));
    let on_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let endpoint = parts.uri.path().rsplit('/').next().unwrap_or("").to_owned();
    let headers = parts
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    let mut record = Seen { method: parts.method.to_string(), uri: parts.uri.to_string(), headers, body_len: 0, conn };
    let mut resp = match endpoint.as_str() {
        // A WebSocket upgrade (any path): 101, then whatever the client sends is read and
        // dropped until it closes.
        _ if upgrade.is_some() => {
            if let Some(on) = on_upgrade {
                tokio::spawn(async move {
                    if let Ok(up) = on.await {
                        let mut io = TokioIo::new(up);
                        let mut sink = vec![0u8; 4096];
                        while matches!(io.read(&mut sink).await, Ok(n) if n > 0) {}
                    }
                });
            }
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut().insert("upgrade", "websocket".parse().expect("upgrade"));
            r.headers_mut().insert("connection", "Upgrade".parse().expect("connection"));
            r.headers_mut().insert("sec-websocket-accept", upgrade.unwrap_or_default().parse().expect("accept"));
            seen.lock().expect("seen").push(record);
            return Ok(r);
        }
        // A stateful session endpoint, as an MCP server: without `mcp-session-id` a session is
        // created here (its id names this member); with one, 200 "<member>:<id>" when this
        // member created it, else 404 (it knows no such session).
        "mcp" => {
            // The message as it arrived (what the proxy let through), for the tests to compare.
            let bytes = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            record.body_len = bytes.len();
            record.headers.insert("x-body".into(), String::from_utf8_lossy(&bytes).into_owned());
            mcp_session(&parts, conn, &name)
        }
        "echo" => {
            let bytes = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            record.body_len = bytes.len();
            let mut r = Response::new(full(bytes.clone()));
            r.headers_mut().insert("x-body-len", bytes.len().into());
            r
        }
        "upload" => {
            read_upload(body, &mut record).await;
            Response::new(full(Bytes::from(format!("got {}", record.body_len))))
        }
        "early" => {
            let kib = query(&parts.uri, "kib").unwrap_or(8192);
            tokio::spawn(async move {
                read_upload(body, &mut record).await;
                seen.lock().expect("seen").push(record);
            });
            let chunk = Bytes::from(vec![b'x'; 1024]);
            let chunks = futures_util::stream::iter((0..kib).map(move |_| Ok(Frame::data(chunk.clone()))));
            return Ok(Response::new(BodyExt::boxed(StreamBody::new(chunks))));
        }
        "sse" => {
            let n = query(&parts.uri, "n").unwrap_or(3);
            let gap = Duration::from_millis(query(&parts.uri, "gap_ms").unwrap_or(100));
            let hold = query(&parts.uri, "hold") == Some(1);
            // `partial=1`: then the start of an event that never ends.
            let partial = query(&parts.uri, "partial") == Some(1);
            // `wait_ms`: the member takes this long before it answers.
            tokio::time::sleep(Duration::from_millis(query(&parts.uri, "wait_ms").unwrap_or(0))).await;
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
            tokio::spawn(async move {
                for i in 0..n {
                    if i > 0 {
                        tokio::time::sleep(gap).await;
                    }
                    if tx.send(Ok(Frame::data(Bytes::from(format!("id: {i}\ndata: {i}\n\n"))))).await.is_err() {
                        return;
                    }
                }
                if partial && tx.send(Ok(Frame::data(Bytes::from_static(b"data: partial\n")))).await.is_err() {
                    return;
                }
                if hold {
                    tx.closed().await;
                }
            });
            let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut().insert("content-type", "text/event-stream".parse().expect("ct"));
            r.headers_mut().insert("cache-control", "no-cache".parse().expect("cc"));
            r
        }
        // Recorded as it arrives, before the wait.
        "slow" => {
            seen.lock().expect("seen").push(record);
            tokio::time::sleep(Duration::from_millis(query(&parts.uri, "ms").unwrap_or(1000))).await;
            let mut r = Response::new(full("slow"));
            r.headers_mut().insert("x-member", name.parse().expect("name"));
            return Ok(r);
        }
        "big" => {
            tokio::time::sleep(Duration::from_millis(query(&parts.uri, "ms").unwrap_or(0))).await;
            let kib = query(&parts.uri, "kib").unwrap_or(1024);
            let chunks = futures_util::stream::unfold(0u64, move |i| async move {
                (i < kib).then_some(())?;
                tokio::time::sleep(Duration::from_millis(10)).await;
                Some((Ok(Frame::data(Bytes::from(vec![b'b'; 1024]))), i + 1))
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(chunks)));
            r.headers_mut().insert("content-length", (kib * 1024).into());
            r
        }
        "late" => {
            seen.lock().expect("seen").push(record.clone());
            tokio::time::sleep(Duration::from_millis(query(&parts.uri, "ms").unwrap_or(1000))).await;
            let on_drop = Dropped(Some((Seen { method: "DROPPED".into(), ..record }, seen.clone())));
            let mut r = Response::new(held(b"data: first\n\n", on_drop));
            r.headers_mut().insert("content-type", "text/event-stream".parse().expect("ct"));
            return Ok(r);
        }
        "chunks" => {
            let chunks = [Ok(Frame::data(Bytes::from_static(b"a"))), Ok(Frame::data(Bytes::from_static(b"b")))];
            Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(chunks))))
        }
        "stall" | "ndjson" => {
            let dropped = Seen { method: "DROPPED".into(), ..record.clone() };
            let mut r = Response::new(held(b"first chunk", Dropped(Some((dropped, seen.clone())))));
            // `ndjson` is the same held body as a stream of JSON lines.
            if endpoint == "ndjson" {
                r.headers_mut().insert("content-type", hyper::header::HeaderValue::from_static("application/x-ndjson"));
            }
            r
        }
        // An agent trying to set the proxy's credential cookie, beside one of its own.
        "cookie" => {
            let mut r = Response::new(full("cookie"));
            let h = r.headers_mut();
            for c in ["portcullis_token=ATTACKER.TOKEN.VALUE; Path=/; HttpOnly", "theme=dark; Path=/"] {
                h.append("set-cookie", hyper::header::HeaderValue::from_static(c));
            }
            r
        }
        "status" => {
            let mut r = Response::new(full("status"));
            *r.status_mut() = StatusCode::from_u16(query(&parts.uri, "code").unwrap_or(200) as u16).expect("status");
            r
        }
        _ => {
            let _ = body.collect().await;
            Response::new(full("ok"))
        }
    };
    resp.headers_mut().insert("x-member", name.parse().expect("name"));
    resp.headers_mut().insert("connection", "x-backend-hop".parse().expect("conn"));
    resp.headers_mut().insert("x-backend-hop", "secret".parse().expect("hop"));
    resp.headers_mut().insert("keep-alive", "timeout=60".parse().expect("ka"));
    seen.lock().expect("seen").push(record);
    Ok(resp)
}

/// Reads an SSE response's chunks with their arrival times until `n` events came.
pub async fn events(
    resp: hyper::Response<hyper::body::Incoming>,
    n: usize,
) -> (Vec<(std::time::Instant, String)>, hyper::body::Incoming) {
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let mut text = String::new();
    while got.len() < n {
        let frame = tokio::time::timeout(SOON, body.frame()).await.expect("event in time").expect("stream open");
        let frame = frame.expect("chunk");
        if let Some(d) = frame.data_ref() {
            text.push_str(&String::from_utf8_lossy(d));
            while let Some((event, rest)) = text.split_once("\n\n") {
                got.push((std::time::Instant::now(), event.to_owned()));
                text = rest.to_owned();
            }
        }
    }
    (got, body)
}

/// Waits for the body to end; true when it ended cleanly (last chunk), false on an error.
pub async fn ends_cleanly(mut body: Incoming) -> bool {
    loop {
        match tokio::time::timeout(SOON, body.frame()).await.expect("stream ends in time") {
            None => return true,
            Some(Ok(_)) => continue,
            Some(Err(_)) => return false,
        }
    }
}

/// A body of `first`, then nothing, held open until the proxy drops it (then `on_drop` records
/// it).
fn held(first: &'static [u8], on_drop: Dropped) -> TBody {
    let stream = futures_util::stream::unfold((0u8, on_drop), move |(i, on_drop)| async move {
        if i == 0 {
            Some((Ok(Frame::data(Bytes::from_static(first))), (1, on_drop)))
        } else {
            std::future::pending::<()>().await;
            None
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// Reads `tcp` until the peer closes it (or resets it), within [`SOON`].
pub async fn closed_by_peer(tcp: &mut tokio::net::TcpStream) {
    let mut sink = vec![0u8; 64 * 1024];
    let drained = tokio::time::timeout(SOON, async {
        loop {
            match tcp.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    drained.await.expect("the proxy closed the connection");
}

/// Records its request in `seen` when dropped (a response body the proxy let go of).
struct Dropped(Option<(Seen, Arc<Mutex<Vec<Seen>>>)>);

impl Drop for Dropped {
    fn drop(&mut self) {
        if let Some((record, seen)) = self.0.take() {
            seen.lock().expect("seen").push(record);
        }
    }
}

/// How a [`TrapBackend`] misbehaves once it has read a request head.
#[derive(Debug, Clone, Copy)]
pub enum Trap {
    /// Closes the connection without answering.
    Close,
    /// Answers bytes that are not HTTP.
    Garbage,
}

/// A backend that reads one request head per connection and then misbehaves; counts the
/// requests it read.
pub struct TrapBackend {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
}

impl TrapBackend {
    pub async fn start(trap: Trap) -> TrapBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let r = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else { continue };
                let r = r.clone();
                tokio::spawn(async move {
                    if read_head(&mut tcp).await.is_err() {
                        return;
                    }
                    r.fetch_add(1, Ordering::SeqCst);
                    if let Trap::Garbage = trap {
                        let _ = tcp.write_all(b"this is not HTTP at all\r\n\r\n").await;
                    }
                    let _ = tcp.shutdown().await;
                    let mut sink = [0u8; 1024];
                    let _ = tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut sink)).await;
                });
            }
        });
        TrapBackend { addr, requests }
    }
}

/// An HTTP/1.1 client connection to the proxy (one TCP/TLS connection, kept alive).
pub struct H1 {
    sender: hyper::client::conn::http1::SendRequest<TBody>,
    conn: tokio::task::JoinHandle<()>,
}

/// A response, its body read to the end.
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl H1 {
    pub async fn connect(addr: SocketAddr, tls: bool) -> H1 {
        let io = dial(addr, tls).await;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.expect("h1 handshake");
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        H1 { sender, conn }
    }

    /// Resolves when the server has closed the connection.
    pub async fn closed(&mut self) {
        let _ = (&mut self.conn).await;
    }

    /// Sends a request and returns the response head (body not read).
    pub async fn send(&mut self, req: Request<TBody>) -> Response<Incoming> {
        self.sender.ready().await.expect("connection ready");
        tokio::time::timeout(SOON, self.sender.send_request(req)).await.expect("response in time").expect("response")
    }

    /// Sends a request: its response head, or the error when the connection closes first.
    pub async fn try_send(&mut self, req: Request<TBody>) -> hyper::Result<Response<Incoming>> {
        self.sender.ready().await?;
        self.sender.send_request(req).await
    }

    /// Sends a request and reads the whole response.
    pub async fn call(&mut self, req: Request<TBody>) -> Answer {
        let resp = self.send(req).await;
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(SOON, body.collect()).await.expect("body in time").expect("body").to_bytes();
        Answer { status: parts.status.as_u16(), headers: parts.headers, body }
    }

    /// GET `path` with `headers`.
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.call(request("GET", path, headers, full(Bytes::new()))).await
    }
}

/// A request with a `Host` header.
pub fn request(method: &str, path: &str, headers: &[(&str, &str)], body: TBody) -> Request<TBody> {
    let mut b = Request::builder().method(method).uri(path).header("host", "localhost");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(body).expect("request")
}
