//! The proxy as a child process, for signals and process-wide numbers.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

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

/// An address that refuses connections for as long as it lives (a member that is down, a
/// health URL with nothing behind it): a socket bound to a port of its own and never listening,
/// so a connection gets a reset and no one else can take the port meanwhile. (Not a port bound,
/// released and hoped to stay free.)
pub struct Refusing {
    _socket: tokio::net::TcpSocket,
    /// The address.
    pub addr: SocketAddr,
}

impl Refusing {
    pub fn new() -> Refusing {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = socket.local_addr().expect("addr");
        Refusing { _socket: socket, addr }
    }
}

impl ProxyProcess {
    /// Runs `portcullis run` with `text` (listeners named `tls` and `plain`, and an admin
    /// listener, on port 0); the child binds them itself and the addresses are read back from
    /// its "listening" log lines. Waits until /live answers.
    pub async fn start(text: &str) -> ProxyProcess {
        ProxyProcess::start_with_log(text, "portcullis=info").await
    }

    /// Like [`ProxyProcess::start`], with `RUST_LOG` set to `filter` (it must keep `info` of
    /// `portcullis::server`); logs go to a file.
    pub async fn start_with_log(text: &str, filter: &str) -> ProxyProcess {
        ProxyProcess::start_limited(text, filter, None).await
    }

    /// Like [`ProxyProcess::start_with_log`], with the process's descriptor limits set to
    /// `nofile` (soft, hard) when given (`ulimit` in a shell that then runs the proxy in its place).
    pub async fn start_limited(text: &str, filter: &str, nofile: Option<(u32, u32)>) -> ProxyProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("portcullis.toml");
        let text = match text.contains("[fleet]") {
            true => text.to_owned(),
            false => format!("{text}\n[fleet]\nstate_dir = {:?}\n", dir.path().join("state").display().to_string()),
        };
        std::fs::write(&path, text).expect("write config");
        let log_path = dir.path().join("proxy.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let bin = env!("CARGO_BIN_EXE_portcullis");
        let mut command = match nofile {
            Some((soft, hard)) => {
                let mut c = Command::new("sh");
                let limits = format!("ulimit -S -n {soft} && ulimit -H -n {hard}");
                c.arg("-c").arg(format!("{limits} && exec \"$0\" \"$@\"")).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = command
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", filter)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn portcullis");
        let deadline = Instant::now() + SOON;
        let (tls, plain, admin) = loop {
            let logged = std::fs::read_to_string(&log_path).unwrap_or_default();
            if let Some(addrs) = bound_addresses(&logged) {
                break addrs;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("proxy process exited ({status}) before listening:\n{logged}");
            }
            assert!(Instant::now() < deadline, "proxy process did not log its addresses:\n{logged}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let pp = ProxyProcess { child, tls, plain, admin, dir };
        loop {
            if let Ok(mut s) = TcpStream::connect(pp.admin).await {
                let _ = s.write_all(b"GET /live HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
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
        self.wait_exit().await;
        std::fs::read_to_string(self.dir.path().join("proxy.log")).expect("read log")
    }

    /// Waits (up to `SOON`) for the process to exit; its status.
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        eventually("the proxy stops", async || self.child.try_wait().expect("wait")).await
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([&format!("-{sig}"), &self.child.id().to_string()]).status().expect("kill");
        assert!(ok.success());
    }
}

/// The `tls`, `plain` and admin addresses from a proxy's log, once all three are logged.
fn bound_addresses(log: &str) -> Option<(SocketAddr, SocketAddr, SocketAddr)> {
    let field = |line: &str, name: &str| -> Option<String> {
        line.split_whitespace().find_map(|w| w.strip_prefix(name)).map(|v| v.trim_matches('"').to_owned())
    };
    let (mut tls, mut plain, mut admin) = (None, None, None);
    for line in log.lines() {
        let addr = field(line, "addr=").and_then(|a| a.parse::<SocketAddr>().ok());
        if line.contains("admin listening") {
            admin = addr;
        } else if line.contains(" listening ") {
            match field(line, "listener=").as_deref() {
                Some("tls") => tls = addr,
                Some("plain") => plain = addr,
                _ => {}
            }
        }
    }
    Some((tls?, plain?, admin?))
}

/// The names of a process's threads (Linux `/proc`).
pub fn thread_names(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the proxy's threads");
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_owned())
        .collect()
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS line")
}
