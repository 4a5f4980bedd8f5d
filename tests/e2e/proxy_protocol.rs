//! PROXY protocol v1 and v2 on a listener behind a load balancer: the client address it carries
//! is the client's in `/sessions` and in the backend's `X-Forwarded-For`; an untrusted source,
//! a missing header and a malformed one are closed without an answer, and counted.

use std::net::SocketAddr;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

/// The base config plus a plain listener that takes the PROXY protocol from loopback (`more[0]`)
/// and one that takes it only from 10.0.0.0/8 (`more[1]`), routing to `backend`.
async fn start(backend: SocketAddr) -> Proxy {
    let text = TestConfig::base(&[backend.to_string()])
        .proxy_protocol_listener("behind-lb", &["127.0.0.0/8", "::1/128"])
        .proxy_protocol_listener("other-lb", &["10.0.0.0/8"])
        .text();
    Proxy::start_with(&text).await
}

fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.push(0x20 | command);
    h.push(family);
    h.extend_from_slice(&(addresses.len() as u16).to_be_bytes());
    h.extend_from_slice(addresses);
    h
}

/// Sends `header` then an upgrade in one write; returns the open stream after its 101.
async fn upgrade_behind(addr: SocketAddr, header: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut bytes = header.to_vec();
    bytes.extend_from_slice(RAW_UPGRADE.as_bytes());
    s.write_all(&bytes).await.expect("send");
    let head = tokio::time::timeout(SOON, read_head(&mut s)).await.expect("answer in time").expect("head");
    let head = parse_response(&head);
    assert_eq!(head.status, 101, "{head:?}");
    s
}

/// The client address `/sessions` shows for the newest live session.
async fn session_client(admin: SocketAddr) -> String {
    let (_, body) = http_get(admin, "/sessions").await;
    let v: Value = serde_json::from_str(&body).expect("json");
    let list = v["sessions"].as_array().cloned().unwrap_or_default();
    list.last().and_then(|s| s["client"].as_str()).unwrap_or("").to_owned()
}

/// Whether the proxy closes `s` without answering anything.
async fn closed_without_answer(mut s: TcpStream) -> bool {
    let mut buf = [0u8; 256];
    matches!(tokio::time::timeout(SOON, s.read(&mut buf)).await, Ok(Ok(0)) | Ok(Err(_)))
}

#[tokio::test]
async fn a_v1_header_from_a_trusted_balancer_sets_the_client_address_everywhere() {
    let backend = RestBackend::start("m1").await;
    let proxy = start(backend.addr).await;
    let _s = upgrade_behind(proxy.more[0], b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\n").await;
    assert_eq!(session_client(proxy.admin).await, "203.0.113.7:5555");
    let seen = &backend.seen()[0];
    assert_eq!(seen.headers.get("x-forwarded-for").map(String::as_str), Some("203.0.113.7"));
    assert!(seen.headers.get("forwarded").is_some_and(|f| f.starts_with("for=203.0.113.7;")));
}

#[tokio::test]
async fn v2_tcp4_tcp6_and_local_headers() {
    let backend = RestBackend::start("m1").await;
    let proxy = start(backend.addr).await;

    let mut a4 = vec![198, 51, 100, 9, 10, 0, 0, 1];
    a4.extend_from_slice(&7777u16.to_be_bytes());
    a4.extend_from_slice(&443u16.to_be_bytes());
    let s = upgrade_behind(proxy.more[0], &v2(1, 0x11, &a4)).await;
    assert_eq!(session_client(proxy.admin).await, "198.51.100.9:7777");
    drop(s);

    let src: std::net::Ipv6Addr = "2001:db8::42".parse().expect("ip");
    let mut a6 = src.octets().to_vec();
    a6.extend_from_slice(&"2001:db8::1".parse::<std::net::Ipv6Addr>().expect("ip").octets());
    a6.extend_from_slice(&8888u16.to_be_bytes());
    a6.extend_from_slice(&443u16.to_be_bytes());
    let s = upgrade_behind(proxy.more[0], &v2(1, 0x21, &a6)).await;
    assert_eq!(session_client(proxy.admin).await, "[2001:db8::42]:8888");
    assert!(backend
        .seen()
        .iter()
        .any(|r| r.headers.get("x-forwarded-for").map(String::as_str) == Some("2001:db8::42")));
    drop(s);

    // LOCAL (the balancer's own health check): the connection's own peer is the client.
    let _s = upgrade_behind(proxy.more[0], &v2(0, 0x00, &[])).await;
    assert!(session_client(proxy.admin).await.starts_with("127.0.0.1:"));
}

#[tokio::test]
async fn untrusted_sources_missing_and_malformed_headers_are_closed_and_counted() {
    let backend = RestBackend::start("m1").await;
    let proxy = start(backend.addr).await;
    // From a source the listener does not trust, even with a valid header.
    let mut s = TcpStream::connect(proxy.more[1]).await.expect("connect");
    s.write_all(b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\n").await.expect("send");
    s.write_all(RAW_UPGRADE.as_bytes()).await.expect("send");
    assert!(closed_without_answer(s).await, "an untrusted source is closed");
    // No header at all: the listener never serves a connection without one.
    let mut s = TcpStream::connect(proxy.more[0]).await.expect("connect");
    s.write_all(RAW_UPGRADE.as_bytes()).await.expect("send");
    assert!(closed_without_answer(s).await, "a connection without a header is closed");
    // A malformed v1 header.
    let mut s = TcpStream::connect(proxy.more[0]).await.expect("connect");
    s.write_all(b"PROXY TCP4 999.0.113.7 10.0.0.1 5555 443\r\n").await.expect("send");
    assert!(closed_without_answer(s).await, "a malformed header is closed");
    assert!(backend.seen().is_empty(), "nothing reached the backend");
    let (_, m) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&m, r#"portcullis_proxy_protocol_total{result="untrusted"}"#), 1.0, "{m}");
    assert_eq!(metric(&m, r#"portcullis_proxy_protocol_total{result="malformed"}"#), 2.0, "{m}");
    // The plain listener without the protocol is unaffected.
    let _c = upgrade(proxy.plain, false, "/agents/a1/terminal", &[]).await.expect("101");
}

#[tokio::test]
async fn a_header_in_pieces_is_read_and_a_silent_peer_is_closed_at_the_handshake_timeout() {
    let backend = RestBackend::start("m1").await;
    let proxy = start(backend.addr).await;
    // Sent in two writes, the second after a pause: read whole.
    let mut s = TcpStream::connect(proxy.more[0]).await.expect("connect");
    s.write_all(b"PROXY TCP4 203.0.113.8 10.0").await.expect("send");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    s.write_all(b".0.1 6000 443\r\n").await.expect("send");
    s.write_all(RAW_UPGRADE.as_bytes()).await.expect("send");
    let head = tokio::time::timeout(SOON, read_head(&mut s)).await.expect("answer in time").expect("head");
    assert_eq!(parse_response(&head).status, 101);
    assert_eq!(session_client(proxy.admin).await, "203.0.113.8:6000");
    // A peer that connects and says nothing is closed at tls_handshake_timeout (2 s here).
    let started = std::time::Instant::now();
    let silent = TcpStream::connect(proxy.more[0]).await.expect("connect");
    assert!(closed_without_answer(silent).await);
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(1500) && waited < std::time::Duration::from_secs(6),
        "{waited:?}"
    );
    let (_, m) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&m, r#"portcullis_proxy_protocol_total{result="timeout"}"#), 1.0, "{m}");
}
