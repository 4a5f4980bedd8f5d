//! The proxy in-process on port 0, and the admin HTTP helpers.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use portcullis::config::Config;
use portcullis::server::{self, Bound};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::*;

pub struct Proxy {
    pub tls: SocketAddr,
    pub plain: SocketAddr,
    /// Listener addresses after the first two, in configuration order.
    pub more: Vec<SocketAddr>,
    pub admin: SocketAddr,
    /// For reloads.
    pub handle: Arc<portcullis::server::Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// The state directory of a configuration that names none (each proxy its own, so no test
    /// sees another's revocations).
    _state: Option<tempfile::TempDir>,
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

impl Proxy {
    /// Starts the drain (as SIGTERM does) and leaves the server running until it is done.
    pub fn drain(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// The base configuration ([`TestConfig::base`]) to `backend`.
    pub async fn start(backend: SocketAddr) -> Proxy {
        Proxy::start_with(&TestConfig::base(&[backend.to_string()]).text()).await
    }

    /// The base configuration to `backend` with `session` merged into `[session]`.
    pub async fn start_with_session(backend: SocketAddr, session: impl IntoTable) -> Proxy {
        Proxy::start_with(&TestConfig::base(&[backend.to_string()]).merge("session", session).text()).await
    }

    pub async fn start_with(text: &str) -> Proxy {
        let (text, state) = with_state_dir(text);
        let config = Config::parse(&text, Path::new("test.toml")).expect("valid test config");
        let bound = Bound::bind(&config).await.expect("bind");
        let addrs = bound.addrs();
        let admin = bound.admin_addr().expect("admin");
        let (tx, rx) = oneshot::channel::<()>();
        let server = server::Server::new(config).await.expect("server");
        let handle = server.handle();
        let task = tokio::spawn(async move {
            server
                .serve(bound, async {
                    let _ = rx.await;
                })
                .await
                .expect("serve");
        });
        Proxy {
            tls: addrs[0],
            plain: addrs[1],
            more: addrs[2..].to_vec(),
            admin,
            handle,
            shutdown: Some(tx),
            task: Some(task),
            _state: state,
        }
    }
}

/// GET `path` on `addr` (plain HTTP); returns (status, body).
/// How many sessions `/sessions` on the admin listener `admin` lists for `subject`.
pub async fn sessions_of(admin: SocketAddr, subject: &str) -> usize {
    let (_, list) = http_get(admin, "/sessions").await;
    let list: serde_json::Value = serde_json::from_str(&list).expect("json");
    list["sessions"].as_array().map_or(0, |all| all.iter().filter(|s| s["subject"] == subject).count())
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect admin");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("send");
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

/// `method path` with a JSON `body` on the admin listener; returns (status, body).
pub async fn admin_request(admin: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(admin).await.expect("admin");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("send");
    let mut out = Vec::new();
    tokio::time::timeout(SOON, s.read_to_end(&mut out)).await.expect("admin answers").expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// POST `path` with a JSON `body` on the admin listener.
pub async fn admin_post(admin: SocketAddr, path: &str, body: &str) -> (u16, String) {
    admin_request(admin, "POST", path, body).await
}

/// `text` with a `[fleet]` table of its own (a fresh state directory, returned to be kept
/// alive) when it names none.
pub fn with_state_dir(text: &str) -> (String, Option<tempfile::TempDir>) {
    if text.contains("[fleet]") {
        return (text.to_owned(), None);
    }
    let dir = tempfile::tempdir().expect("state dir");
    let text = format!("{text}\n[fleet]\nstate_dir = {:?}\n", dir.path().display().to_string());
    (text, Some(dir))
}
