//! Test clients: dial plain or TLS, upgrade, send and receive frames.

use std::net::SocketAddr;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;

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
    upgrade_over(dial(addr, tls).await, path, extra).await
}

/// [`upgrade`] over a connection the test opened itself.
pub async fn upgrade_over(mut io: Box<dyn Io>, path: &str, extra: &[(&str, &str)]) -> Result<Client, Head> {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (n, v) in extra {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    io.write_all(req.as_bytes()).await.expect("send request");
    io.flush().await.expect("flush request");
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

    /// Reads until a close frame or the end of the connection: the data frames read before,
    /// and the close frame if one came.
    pub async fn read_to_end(&mut self) -> (usize, Option<TFrame>) {
        let mut frames = 0;
        while let Some(f) = self.try_recv().await {
            if f.opcode == op::CLOSE {
                return (frames, Some(f));
            }
            frames += 1;
        }
        (frames, None)
    }

    /// The next read ends the connection cleanly: a FIN, not a reset (which can destroy what
    /// was written before it, unread). `what` names the case in the failure.
    pub async fn expect_fin(&mut self, what: &str) {
        let mut rest = [0u8; 16];
        let end = tokio::time::timeout(SOON, self.io.read(&mut rest)).await.expect("an end in time");
        assert_eq!(end.map_err(|e| e.kind()), Ok(0), "{what}: the connection ends with a FIN, not a reset");
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

/// A valid upgrade request for `/agents/a1/terminal`, as raw bytes go on the wire (for tests
/// that write something before it, such as a PROXY protocol header).
pub const RAW_UPGRADE: &str = "GET /agents/a1/terminal HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
