//! An HTTP/2 client made with the `h2` crate: TLS with ALPN `h2`, WebSockets opened by
//! extended CONNECT (RFC 8441), and a stream adapter so that the frame codec and [`Client`]
//! work on an HTTP/2 stream as on a TCP connection.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use ::h2::client::SendRequest;
use ::h2::{RecvStream, SendStream};
use bytes::{Buf, Bytes};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::*;

/// One HTTP/2 connection to the proxy.
pub struct H2 {
    pub send: SendRequest<Bytes>,
    pub conn: tokio::task::JoinHandle<Result<(), ::h2::Error>>,
}

/// The flow-control windows of the test client: streams get 64 KiB, the connection 16 MiB, so
/// a stream the test leaves unread never takes the window another stream needs.
const STREAM_WINDOW: u32 = 64 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Connects to a TLS listener offering `alpn`; returns the stream and the protocol agreed.
pub async fn dial_alpn(
    addr: SocketAddr,
    alpn: &[&[u8]],
) -> (tokio_rustls::client::TlsStream<TcpStream>, Option<Vec<u8>>) {
    let mut config = tls_client_config(portcullis::crypto::provider());
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.expect("connect to proxy");
    tcp.set_nodelay(true).expect("nodelay");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("tls handshake");
    let agreed = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    (tls, agreed)
}

impl H2 {
    /// An HTTP/2 connection to a TLS listener (ALPN `h2` and nothing else, so it fails loudly
    /// when the proxy does not offer it), after the proxy's SETTINGS are in.
    pub async fn connect(addr: SocketAddr) -> H2 {
        H2::connect_with_window(addr, STREAM_WINDOW).await
    }

    /// [`H2::connect`] with another window for each stream (0: the proxy can send no DATA).
    pub async fn connect_with_window(addr: SocketAddr, stream_window: u32) -> H2 {
        let (tls, agreed) = dial_alpn(addr, &[b"h2"]).await;
        assert_eq!(agreed.as_deref(), Some(&b"h2"[..]), "the proxy chose h2 by ALPN");
        let (send, conn) = ::h2::client::Builder::new()
            .initial_window_size(stream_window)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake::<_, Bytes>(tls)
            .await
            .expect("h2 handshake");
        let conn = tokio::spawn(conn);
        let send = tokio::time::timeout(SOON, send.ready()).await.expect("settings in time").expect("h2 ready");
        H2 { send, conn }
    }

    /// `n` GETs of `path` (`/agents/...`) with `headers`, all at once as tasks of their own, each
    /// body read to its end: the tasks give the statuses. For bursts of requests that each hold
    /// a member connection (a member's `sse?wait_ms=...`).
    pub fn gets_at_once(&self, n: usize, path: &str, headers: &[(&str, &str)]) -> Vec<tokio::task::JoinHandle<u16>> {
        let headers: Arc<Vec<(String, String)>> =
            Arc::new(headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect());
        (0..n)
            .map(|_| {
                let (send, headers, uri) = (self.send.clone(), headers.clone(), format!("https://localhost{path}"));
                tokio::spawn(async move {
                    let mut send = send.ready().await.expect("ready");
                    let mut req = ::http::Request::get(uri);
                    for (k, v) in headers.iter() {
                        req = req.header(k, v);
                    }
                    let (resp, _) = send.send_request(req.body(()).expect("request"), true).expect("send");
                    let resp = resp.await.expect("response");
                    let status = resp.status().as_u16();
                    let mut body = resp.into_body();
                    while let Some(chunk) = body.data().await {
                        let chunk = chunk.expect("body chunk");
                        let _ = body.flow_control().release_capacity(chunk.len());
                    }
                    status
                })
            })
            .collect()
    }

    /// Whether the proxy's SETTINGS enable extended CONNECT (SETTINGS_ENABLE_CONNECT_PROTOCOL).
    pub fn extended_connect(&self) -> bool {
        self.send.is_extended_connect_protocol_enabled()
    }

    /// Opens a WebSocket on `path` with `extra` headers: the [`Client`] on its stream when the
    /// proxy answers 200, else the response head.
    pub async fn websocket(&mut self, path: &str, extra: &[(&str, &str)]) -> Result<Client, Head> {
        let mut req = ::http::Request::builder()
            .method(::http::Method::CONNECT)
            .uri(format!("https://localhost{path}"))
            .header("sec-websocket-version", "13")
            .extension(::h2::ext::Protocol::from_static("websocket"));
        for (n, v) in extra {
            req = req.header(*n, *v);
        }
        let (resp, stream) = self.open(req.body(()).expect("request"), false).await;
        let response = head(&resp);
        if response.status != 200 {
            return Err(response);
        }
        let io = H2Stream { send: stream, recv: resp.into_body(), buf: Bytes::new(), ended: false };
        Ok(Client { io: Box::new(io), response, sent: Vec::new() })
    }

    /// Sends `req` (its body ends at once when `end`), and waits for the response head.
    pub async fn open(
        &mut self,
        req: ::http::Request<()>,
        end: bool,
    ) -> (::http::Response<RecvStream>, SendStream<Bytes>) {
        self.send = tokio::time::timeout(SOON, self.send.clone().ready()).await.expect("stream slot").expect("ready");
        let (resp, stream) = self.send.send_request(req, end).expect("send request");
        let resp = tokio::time::timeout(SOON, resp).await.expect("response in time").expect("response");
        (resp, stream)
    }

    /// GET `path` with `extra` headers: status and body.
    pub async fn get(&mut self, path: &str, extra: &[(&str, &str)]) -> (u16, Bytes) {
        let mut req = ::http::Request::get(format!("https://localhost{path}"));
        for (n, v) in extra {
            req = req.header(*n, *v);
        }
        let (resp, _) = self.open(req.body(()).expect("request"), true).await;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut all = Vec::new();
        while let Some(chunk) = tokio::time::timeout(SOON, body.data()).await.expect("body in time") {
            let chunk = chunk.expect("body chunk");
            let _ = body.flow_control().release_capacity(chunk.len());
            all.extend_from_slice(&chunk);
        }
        (status, all.into())
    }
}

fn head<B>(resp: &::http::Response<B>) -> Head {
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect();
    Head { status: resp.status().as_u16(), method: String::new(), path: String::new(), headers }
}

/// An HTTP/2 stream as a byte stream: writes wait for the peer's window, reads give DATA
/// payloads and return their window as they are read; shutdown sends END_STREAM. A reset or
/// connection error reads and writes as an I/O error.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    buf: Bytes,
    ended: bool,
}

fn io_error(e: ::h2::Error) -> io::Error {
    io::Error::other(e)
}

impl AsyncRead for H2Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        while self.buf.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                Some(Ok(chunk)) => {
                    let _ = self.recv.flow_control().release_capacity(chunk.len());
                    self.buf = chunk;
                }
            }
        }
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.send.reserve_capacity(data.len());
        loop {
            let n = self.send.capacity();
            if n > 0 {
                let n = n.min(data.len());
                self.send.send_data(Bytes::copy_from_slice(&data[..n]), false).map_err(io_error)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(self.send.poll_capacity(cx)) {
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                Some(Ok(_)) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.ended {
            self.ended = true;
            self.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}
