//! A recording test backend with pluggable handlers (echo, silent, ...).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::*;

/// How the test backend answers the handshake.
#[derive(Clone, Default)]
pub struct BackendOpts {
    /// Answer this status instead of 101.
    pub status: Option<u16>,
    /// Answer this status instead of 101 to a request whose path holds this text (an agent
    /// this member cannot serve, say), and 101 to the others.
    pub status_for: Option<(&'static str, u16)>,
    /// Answer 101 with a wrong Sec-WebSocket-Accept.
    pub bad_accept: bool,
    /// Never answer the handshake.
    pub hang: bool,
    /// Never answer the handshake of a request whose path holds this text (an agent that does
    /// not answer, behind a gateway that serves the others).
    pub hang_for: Option<&'static str>,
    /// Wait this long before answering the handshake.
    pub delay: Option<Duration>,
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
                    if opts.hang || opts.hang_for.is_some_and(|part| request.path.contains(part)) {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        return;
                    }
                    if let Some(d) = opts.delay {
                        tokio::time::sleep(d).await;
                    }
                    let refused = opts.status_for.filter(|(part, _)| request.path.contains(part)).map(|(_, s)| s);
                    if let Some(status) = opts.status.or(refused) {
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
