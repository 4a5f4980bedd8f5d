//! `portcullis connect`: a minimal interactive WebSocket client, so the demo can be tried with
//! nothing but this binary.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::WWW_AUTHENTICATE;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use portcullis::session::close::code;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader};
use tokio::net::TcpStream;

/// Connects to `url` and bridges stdin/stdout until either side closes.
pub async fn run(url: &str, ca: Option<&Path>, headers: &[String]) -> anyhow::Result<()> {
    let uri: hyper::Uri = url.parse().context("invalid URL")?;
    let tls = match uri.scheme_str() {
        Some("wss") => true,
        Some("ws") => false,
        _ => bail!("the URL must start with ws:// or wss://"),
    };
    let host = uri.host().context("the URL has no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp =
        TcpStream::connect((host.as_str(), port)).await.with_context(|| format!("cannot connect to {host}:{port}"))?;
    let _ = tcp.set_nodelay(true);
    let mut req = Request::get(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header("host", format!("{host}:{port}"))
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header("sec-websocket-key", fastwebsockets::handshake::generate_key())
        .header("sec-websocket-version", "13");
    for h in headers {
        let (name, value) = h.split_once(':').context("headers are written `Name: value`")?;
        req = req.header(name.trim(), value.trim());
    }
    let req = req.body(Empty::<Bytes>::new())?;
    if tls {
        let mut roots = rustls::RootCertStore::empty();
        let ca = ca.context("wss:// needs --ca FILE (the demo prints its certificate path)")?;
        for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("cannot read {}", ca.display()))? {
            roots.add(cert?)?;
        }
        let config = rustls::ClientConfig::builder_with_provider(portcullis::crypto::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let stream = connector.connect(ServerName::try_from(host)?, tcp).await.context("tls handshake failed")?;
        bridge(stream, req).await
    } else {
        bridge(tcp, req).await
    }
}

async fn bridge<S>(stream: S, req: Request<Empty<Bytes>>) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // The handshake by hand (hyper), so that a refusal shows the proxy's reason: its status,
    // its body and its `WWW-Authenticate`.
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.context("websocket handshake failed")?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let resp = sender.send_request(req).await.context("websocket handshake failed")?;
    let status = resp.status();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(|v| format!(" (WWW-Authenticate: {v})"))
            .unwrap_or_default();
        let body = Limited::new(resp.into_body(), 4096).collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let reason = String::from_utf8_lossy(&body).trim().to_owned();
        bail!("the proxy refused the WebSocket: {status}: {reason}{challenge}");
    }
    let upgraded = hyper::upgrade::on(resp).await.context("websocket handshake failed")?;
    eprintln!("connected ({status})");
    let ws = fastwebsockets::WebSocket::after_handshake(TokioIo::new(upgraded), fastwebsockets::Role::Client);
    let mut ws = fastwebsockets::FragmentCollector::new(ws);
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            line = lines.next_line(), if stdin_open => match line? {
                Some(l) => ws.write_frame(Frame::text(Payload::Owned(l.into_bytes()))).await?,
                None => {
                    stdin_open = false;
                    ws.write_frame(Frame::close(code::NORMAL, b"bye")).await?;
                }
            },
            frame = ws.read_frame() => {
                let frame = match frame {
                    Ok(f) => f,
                    // Our close was sent: the peer ending the connection is the end.
                    Err(_) if !stdin_open => return Ok(()),
                    Err(e) => return Err(e.into()),
                };
                match frame.opcode {
                    OpCode::Text | OpCode::Binary => println!("{}", String::from_utf8_lossy(&frame.payload)),
                    OpCode::Close => {
                        let p = &frame.payload;
                        match p.get(..2) {
                            Some(c) => eprintln!(
                                "closed: {} {}",
                                u16::from_be_bytes([c[0], c[1]]),
                                String::from_utf8_lossy(p.get(2..).unwrap_or_default())
                            ),
                            None => eprintln!("closed (no status code)"),
                        }
                        return Ok(());
                    }
                    _ => {}
                }
            }
        }
    }
}
