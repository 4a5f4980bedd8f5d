//! Stage: relay to the owner. A resume or an observer whose session another instance of the
//! fleet holds is carried there: a TCP connection to that instance's peer listener, the signed
//! preamble ([`crate::fleet::peer`]), the client's own handshake, and once the owner has
//! answered 101, the two streams spliced byte for byte. The owner governs the session (its
//! token, its deadlines, revocation); this instance only carries the bytes, and answers the
//! client what the owner answered.
//!
//! The other side, the peer listener, is [`read_preamble`]: the first line of a connection, read
//! and checked before anything else.

use std::net::SocketAddr;
use std::time::Duration;

use ::http::header::{HeaderName, CONNECTION, HOST, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_PROTOCOL, UPGRADE};
use ::http::{HeaderMap, HeaderValue, Response, StatusCode};
use bytes::Bytes;
use http_body_util::{Either, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::upgrade::{accept_value, WsRequest};
use super::ProxyBody;
use crate::fleet::peer::{PeerAuth, PeerError, MAX_PREAMBLE};

/// A client stream's link to the instance that holds its session, after the owner's 101.
pub struct PeerLink {
    /// The connection to the owner's peer listener.
    pub stream: TcpStream,
    /// What the owner sent right after its 101.
    pub early: Vec<u8>,
}

/// Why the owner could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum PeerRelayError {
    /// The owner's peer listener did not answer in time or refused the connection.
    #[error("the instance that holds the session cannot be reached: {0}")]
    Unreachable(String),
    /// Its answer was not HTTP, or its 101 does not accept this client's key.
    #[error("the instance that holds the session answered wrongly: {0}")]
    BadAnswer(&'static str),
}

/// Headers of the client's request that are the connection's, not the request's: rewritten for
/// the link, never passed on as they came.
const HOP: &[&str] = &[
    "connection",
    "upgrade",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "proxy-connection",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "content-length",
];

/// Asks `owner` (at its peer listener) for the session: the owner's status and headers, and
/// the link when it accepted (101).
pub async fn ask(
    auth: &PeerAuth,
    owner: &super::Owner<'_>,
    client: SocketAddr,
    path_and_query: &str,
    headers: &HeaderMap,
    ws: &WsRequest,
    limit: Duration,
) -> Result<(StatusCode, HeaderMap, Option<PeerLink>), PeerRelayError> {
    let unreachable = |e: &dyn std::fmt::Display| PeerRelayError::Unreachable(e.to_string());
    let deadline = tokio::time::Instant::now() + limit;
    let mut stream = match tokio::time::timeout_at(deadline, crate::outbound::dial(owner.peer, &[], deadline)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(unreachable(&e)),
        Err(_) => return Err(PeerRelayError::Unreachable("connect timed out".into())),
    };
    let _ = stream.set_nodelay(true);
    let mut out = auth.sign(owner.instance, client);
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut line = |name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    if let Some(host) = headers.get(HOST) {
        line(b"host", host.as_bytes());
    }
    for (name, value) in headers {
        if name != HOST && !HOP.contains(&name.as_str()) {
            line(name.as_str().as_bytes(), value.as_bytes());
        }
    }
    line(b"upgrade", b"websocket");
    line(b"connection", b"Upgrade");
    line(b"sec-websocket-key", ws.key.as_bytes());
    line(b"sec-websocket-version", b"13");
    out.extend_from_slice(b"\r\n");
    let exchange = async {
        stream.write_all(&out).await.map_err(|e| unreachable(&e))?;
        let mut buf = Vec::with_capacity(1024);
        loop {
            if buf.len() > 16 * 1024 {
                return Err(PeerRelayError::BadAnswer("answer head too large"));
            }
            if stream.read_buf(&mut buf).await.map_err(|e| unreachable(&e))? == 0 {
                return Err(PeerRelayError::Unreachable("closed before answering".into()));
            }
            let mut h = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut h);
            let len = match resp.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => continue,
                Err(_) => return Err(PeerRelayError::BadAnswer("not HTTP")),
            };
            let status =
                StatusCode::from_u16(resp.code.unwrap_or(0)).map_err(|_| PeerRelayError::BadAnswer("status"))?;
            let mut map = HeaderMap::new();
            for h in resp.headers.iter() {
                if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(h.name.as_bytes()), HeaderValue::from_bytes(h.value)) {
                    map.append(n, v);
                }
            }
            return Ok((status, map, buf[len..].to_vec()));
        }
    };
    let (status, map, early) = match tokio::time::timeout(limit, exchange).await {
        Ok(r) => r?,
        Err(_) => return Err(PeerRelayError::Unreachable("no answer in time".into())),
    };
    if status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok((status, map, None));
    }
    let expected = accept_value(ws.key.as_bytes());
    if map.get(SEC_WEBSOCKET_ACCEPT).map(HeaderValue::as_bytes) != Some(expected.as_bytes()) {
        return Err(PeerRelayError::BadAnswer("its 101 does not accept the client's key"));
    }
    Ok((status, map, Some(PeerLink { stream, early })))
}

/// The answer for the client: the owner's 101 (HTTP/2: 200) with its subprotocol and resume
/// id, or its refusal's status.
pub fn answer(http2: bool, status: StatusCode, owner: &HeaderMap) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Left(Full::new(Bytes::new())));
    let h = resp.headers_mut();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        if !http2 {
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
            if let Some(a) = owner.get(SEC_WEBSOCKET_ACCEPT) {
                h.insert(SEC_WEBSOCKET_ACCEPT, a.clone());
            }
        }
        for name in [SEC_WEBSOCKET_PROTOCOL, HeaderName::from_static(crate::session::resume::ID_HEADER)] {
            if let Some(v) = owner.get(&name) {
                h.insert(name, v.clone());
            }
        }
        *resp.status_mut() = if http2 { StatusCode::OK } else { StatusCode::SWITCHING_PROTOCOLS };
    } else {
        if let Some(v) = owner.get(::http::header::WWW_AUTHENTICATE) {
            h.insert(::http::header::WWW_AUTHENTICATE, v.clone());
        }
        *resp.status_mut() = status;
        *resp.body_mut() =
            Either::Left(Full::new(Bytes::from_static(b"refused by the instance that holds the session\n")));
    }
    resp
}

/// Splices the client and the owner until either side ends: the bytes already read from each
/// (`client_early`, the link's `early`) first.
pub async fn splice<C>(mut client: C, client_early: Vec<u8>, link: PeerLink)
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let PeerLink { mut stream, early } = link;
    let first = async {
        if !early.is_empty() {
            client.write_all(&early).await?;
            client.flush().await?;
        }
        if !client_early.is_empty() {
            stream.write_all(&client_early).await?;
        }
        tokio::io::copy_bidirectional(&mut client, &mut stream).await.map(drop)
    };
    if let Err(e) = first.await {
        tracing::debug!(error = %e, "relayed session's link ended");
    }
}

/// The peer listener's first step: reads the preamble line (peeked, then consumed exactly: the
/// client's request after it stays unread) within `limit`, and checks it.
pub async fn read_preamble(
    tcp: &mut TcpStream,
    auth: &PeerAuth,
    limit: Duration,
) -> Result<crate::fleet::peer::Preamble, PeerError> {
    let read = async {
        let mut buf = vec![0u8; MAX_PREAMBLE + 1];
        loop {
            let n = tcp.peek(&mut buf).await.map_err(|_| PeerError::Malformed)?;
            if n == 0 {
                return Err(PeerError::Malformed);
            }
            if let Some(end) = buf[..n].iter().position(|b| *b == b'\n') {
                let mut line = vec![0u8; end + 1];
                tcp.read_exact(&mut line).await.map_err(|_| PeerError::Malformed)?;
                return auth.verify(&line[..end]);
            }
            if n > MAX_PREAMBLE {
                return Err(PeerError::Malformed);
            }
            // The line is still arriving.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(limit, read).await.unwrap_or(Err(PeerError::Malformed))
}
