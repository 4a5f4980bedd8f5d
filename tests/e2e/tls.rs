//! The client-side TLS record layer (rustls's unbuffered API, driven by the proxy with pooled
//! buffers): records cut into single bytes, a handshake fragmented into small records, key
//! updates, alerts both ways, `close_notify` both ways, and an idle wss session holding no
//! buffer.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::harness::*;

/// A TCP stream that writes at most one byte per write (with `TCP_NODELAY`), so that every TLS
/// record reaches the proxy in many segments; and, once `corrupt` is set, flips a bit of the
/// last byte of the next write (the record's authentication tag).
struct Wire {
    tcp: TcpStream,
    trickle: bool,
    corrupt: Arc<AtomicBool>,
}

impl Wire {
    async fn connect(addr: std::net::SocketAddr, trickle: bool) -> Wire {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.set_nodelay(true).expect("nodelay");
        Wire { tcp, trickle, corrupt: Arc::new(AtomicBool::new(false)) }
    }
}

impl AsyncRead for Wire {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Wire {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.corrupt.swap(false, Ordering::SeqCst) {
            let mut bad = buf.to_vec();
            if let Some(last) = bad.last_mut() {
                *last ^= 0x01;
            }
            // Written whole, or not at all: a partial write of the corrupted copy would resend
            // good bytes after it.
            return match Pin::new(&mut self.tcp).poll_write(cx, &bad) {
                Poll::Ready(Ok(n)) if n == bad.len() => Poll::Ready(Ok(n)),
                other => panic!("corrupted record not written whole: {other:?}"),
            };
        }
        let n = if self.trickle { buf.len().min(1) } else { buf.len() };
        Pin::new(&mut self.tcp).poll_write(cx, &buf[..n])
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

type Tls = tokio_rustls::client::TlsStream<Wire>;

async fn tls_over(wire: Wire, config: rustls::ClientConfig) -> io::Result<Tls> {
    let name = ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, wire).await
}

fn client_config() -> rustls::ClientConfig {
    tls_client_config(portcullis::crypto::provider())
}

/// Sends the upgrade for `/agents/a1/terminal` and checks the 101.
async fn upgrade_on(s: &mut Tls) {
    let req = format!(
        "GET /agents/a1/terminal HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("send request");
    s.flush().await.expect("flush request");
    let head = read_head(s).await.expect("response head");
    assert_eq!(parse_response(&head).status, 101);
}

async fn echo_on(s: &mut Tls, payload: &[u8]) {
    s.write_all(&encode(true, 0, op::BINARY, Some(rand_mask()), payload)).await.expect("send");
    s.flush().await.expect("flush");
    let f = tokio::time::timeout(SOON, read_frame(s)).await.expect("echo in time").expect("echo");
    assert_eq!(f.payload, payload);
}

/// Reads to the end of the stream: `Ok` only if the proxy sent `close_notify` (a rustls client
/// reports an end without one as `UnexpectedEof`).
async fn read_to_end(s: &mut Tls) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    tokio::time::timeout(SOON, s.read_to_end(&mut out)).await.expect("end of stream in time")?;
    Ok(out)
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i as u32).wrapping_mul(2654435761).to_be_bytes()[0]).collect()
}

#[tokio::test]
async fn records_cut_into_single_bytes_and_a_handshake_in_64_byte_records_pass_intact() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let mut config = client_config();
    // Every record the client sends, the ClientHello and Finished included, carries at most 64
    // bytes, and reaches the proxy one byte per TCP segment.
    config.max_fragment_size = Some(64);
    let tls = tls_over(Wire::connect(proxy.tls, true).await, config).await.expect("handshake");
    let mut c = upgrade_over(Box::new(tls), "/agents/a1/terminal", &[]).await.expect("101");
    let message = pattern(3_000);
    c.send(true, op::BINARY, &message).await;
    let f = c.recv().await;
    assert!(f.payload == message, "3,000 bytes in 64-byte records, one byte per segment, echoed intact");
    backend.log.wait_for("the message", |f| f.payload.len() == message.len()).await;
}

#[tokio::test]
async fn key_updates_from_the_client_are_followed_and_answered() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let mut config = client_config();
    config.enable_secret_extraction = true;
    let mut s = tls_over(Wire::connect(proxy.tls, false).await, config).await.expect("handshake");
    upgrade_on(&mut s).await;
    for i in 0..3 {
        echo_on(&mut s, &pattern(100 + i)).await;
    }
    for i in 0..3 {
        // A KeyUpdate asking the proxy to update too, then a message under the new key.
        s.get_mut().1.refresh_traffic_keys().expect("TLS 1.3 key update");
        echo_on(&mut s, &pattern(200 + i)).await;
    }
    let (_, conn) = s.into_inner();
    #[allow(deprecated)] // the sequence numbers are all this test reads
    let secrets = conn.dangerous_extract_secrets().expect("secrets");
    // Each direction's record counter restarted at the last key update: the client's since its
    // KeyUpdate, and the proxy's since its own, which it sent before the echo.
    assert_eq!((secrets.tx.0, secrets.rx.0), (1, 1), "one record each way under the newest keys");
}

#[tokio::test]
async fn close_notify_both_ways() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;

    // The client ends with close_notify: the proxy reads it as the end of the stream, ends the
    // session, and answers with its own close_notify.
    let mut s = tls_over(Wire::connect(proxy.tls, false).await, client_config()).await.expect("handshake");
    upgrade_on(&mut s).await;
    echo_on(&mut s, b"before close_notify").await;
    s.get_mut().1.send_close_notify();
    s.flush().await.expect("send close_notify");
    read_to_end(&mut s).await.expect("the proxy's close_notify");
    backend.log.wait_for("the close for the vanished client", |f| f.opcode == op::CLOSE).await;

    // The proxy ends the session (the close handshake completes): close_notify follows the
    // close frame.
    let mut s = tls_over(Wire::connect(proxy.tls, false).await, client_config()).await.expect("handshake");
    upgrade_on(&mut s).await;
    s.write_all(&encode(true, 0, op::CLOSE, Some(rand_mask()), &close_payload(1_000, "bye"))).await.expect("close");
    s.flush().await.expect("flush");
    let f = tokio::time::timeout(SOON, read_frame(&mut s)).await.expect("close in time").expect("close frame");
    assert_eq!((f.opcode, f.close_code()), (op::CLOSE, Some(1_000)));
    read_to_end(&mut s).await.expect("close_notify after the close frame");
}

#[tokio::test]
async fn a_corrupted_record_is_answered_with_an_alert_and_harms_no_other_session() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let mut other = tls_over(Wire::connect(proxy.tls, false).await, client_config()).await.expect("handshake");
    upgrade_on(&mut other).await;

    let wire = Wire::connect(proxy.tls, false).await;
    let corrupt = wire.corrupt.clone();
    let mut s = tls_over(wire, client_config()).await.expect("handshake");
    upgrade_on(&mut s).await;
    echo_on(&mut s, b"intact").await;
    corrupt.store(true, Ordering::SeqCst);
    s.write_all(&encode(true, 0, op::BINARY, Some(rand_mask()), b"tampered")).await.expect("send");
    s.flush().await.expect("flush");
    let e = read_to_end(&mut s).await.expect_err("the proxy's fatal alert");
    let alert = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    assert_eq!(alert, Some(&rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac)), "{e}");
    assert!(
        !backend.log.frames().iter().any(|f| f.payload == b"tampered"),
        "nothing of the tampered record reached the backend"
    );

    echo_on(&mut other, b"the other session is unharmed").await;
}

/// A client handshake driven by hand until it fails, then the client's alert is sent (a
/// `tokio-rustls` client drops it): the error the client saw.
async fn handshake_sending_the_alert(addr: std::net::SocketAddr, config: rustls::ClientConfig) -> rustls::Error {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).expect("encode");
        }
        tcp.write_all(&out).await.expect("send");
        let n = tokio::time::timeout(SOON, tcp.read(&mut buf)).await.expect("answer in time").expect("read");
        assert!(n > 0, "the proxy closed before the client failed");
        conn.read_tls(&mut &buf[..n]).expect("buffer");
        if let Err(e) = conn.process_new_packets() {
            let mut alert = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut alert).expect("encode the alert");
            }
            assert!(!alert.is_empty(), "the client queued an alert");
            tcp.write_all(&alert).await.expect("send the alert");
            return e;
        }
    }
}

#[tokio::test]
async fn a_client_alert_during_the_handshake_is_counted_and_the_listener_serves_on() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let before = metric(
        &http_get(proxy.admin, "/metrics").await.1,
        r#"portcullis_tls_handshake_failures_total{reason="protocol"}"#,
    );
    // A client that trusts nothing rejects the certificate with a fatal alert.
    let untrusting = rustls::ClientConfig::builder_with_provider(portcullis::crypto::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let e = handshake_sending_the_alert(proxy.tls, untrusting).await;
    assert!(matches!(e, rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer)), "{e}");
    eventually("the alert is counted", async || {
        let m = http_get(proxy.admin, "/metrics").await.1;
        (metric(&m, r#"portcullis_tls_handshake_failures_total{reason="protocol"}"#) > before).then_some(())
    })
    .await;
    let mut s = tls_over(Wire::connect(proxy.tls, false).await, client_config()).await.expect("handshake");
    upgrade_on(&mut s).await;
    echo_on(&mut s, b"served on").await;
}

#[tokio::test]
async fn an_idle_wss_session_holds_no_buffer() {
    let backend = Backend::echo().await;
    // A child process: the buffer gauge below is this proxy's alone.
    let proxy = ProxyProcess::start(&TestConfig::base(&[backend.addr.to_string()]).text()).await;
    let mut s = tls_over(Wire::connect(proxy.tls, false).await, client_config()).await.expect("handshake");
    upgrade_on(&mut s).await;
    // A 1 MiB message each way fills every buffer the session has: the TLS record buffers on
    // the client side and the relay's.
    echo_on(&mut s, &pattern(1 << 20)).await;
    eventually("the idle session holds no buffer", async || {
        let m = http_get(proxy.admin, "/metrics").await.1;
        (metric(&m, "portcullis_relay_buffer_bytes") == 0.0).then_some(())
    })
    .await;
    assert_eq!(metric(&http_get(proxy.admin, "/metrics").await.1, "portcullis_sessions_active"), 1.0);
    // And it takes buffers again when bytes come.
    echo_on(&mut s, b"still open").await;
}
