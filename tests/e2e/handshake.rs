//! The HTTP phase: every status the upgrade, route and connect stages can answer.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

const UPGRADE_HEADERS: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

fn request(method: &str, path: &str, headers: &str) -> Vec<u8> {
    format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n").into_bytes()
}

#[tokio::test]
async fn upgrade_over_tls_is_answered_101_with_backend_accept() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let client = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("101");
    assert_eq!(client.response.header("upgrade").map(str::to_ascii_lowercase).as_deref(), Some("websocket"));
}

#[tokio::test]
async fn unknown_path_is_404() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let r = raw_request(proxy.tls, true, &request("GET", "/nothing/here", UPGRADE_HEADERS)).await;
    assert_eq!(r.status, 404);
    assert!(backend.log.requests.lock().expect("lock").is_empty(), "backend must not be contacted");
}

#[tokio::test]
async fn plain_request_on_websocket_route_is_426() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let r = raw_request(proxy.tls, true, &request("GET", "/agents/a1/terminal", "")).await;
    assert_eq!(r.status, 426);
    assert_eq!(r.header("upgrade"), Some("websocket"));
}

#[tokio::test]
async fn unsupported_websocket_version_is_426_naming_version_13() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let h = UPGRADE_HEADERS.replace("Version: 13", "Version: 8");
    let r = raw_request(proxy.tls, true, &request("GET", "/agents/a1/terminal", &h)).await;
    assert_eq!(r.status, 426);
    assert_eq!(r.header("sec-websocket-version"), Some("13"));
}

#[tokio::test]
async fn upgrade_with_post_is_400() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let r = raw_request(
        proxy.tls,
        true,
        &request("POST", "/agents/a1/terminal", &format!("{UPGRADE_HEADERS}Content-Length: 0\r\n")),
    )
    .await;
    assert_eq!(r.status, 400);
}

/// Found by an attacker review (2026-12-06): an HTTP/1.0 upgrade got a 101 and a backend
/// handshake, then hyper dropped the connection (it does not hand an HTTP/1.0 one over), and
/// the backend's session ended without a close. It is a 400 before any backend is asked.
#[tokio::test]
async fn an_http_1_0_upgrade_is_400_before_any_backend_is_contacted() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let head = format!("GET /agents/a1/terminal HTTP/1.0\r\nHost: localhost\r\n{UPGRADE_HEADERS}\r\n");
    for (addr, tls) in [(proxy.tls, true), (proxy.plain, false)] {
        let r = raw_request(addr, tls, head.as_bytes()).await;
        assert_eq!(r.status, 400);
    }
    assert!(backend.log.requests.lock().expect("lock").is_empty(), "a backend was asked");
    // Refused by the upgrade check (not, say, the Host check).
    let (_, m) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&m, "portcullis_upgrades_total{route=\"terminal\",result=\"bad_handshake\"}"), 2.0);
}

#[tokio::test]
async fn upgrade_without_connection_upgrade_is_400() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let h = UPGRADE_HEADERS.replace("Connection: Upgrade", "Connection: keep-alive");
    let r = raw_request(proxy.tls, true, &request("GET", "/agents/a1/terminal", &h)).await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn malformed_websocket_key_is_400() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    for bad in ["Sec-WebSocket-Key: c2hvcnQ=\r\n", "Sec-WebSocket-Key: !!!notbase64!!!\r\n", ""] {
        let h = UPGRADE_HEADERS.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", bad);
        let r = raw_request(proxy.tls, true, &request("GET", "/agents/a1/terminal", &h)).await;
        assert_eq!(r.status, 400, "key line {bad:?}");
    }
}

#[tokio::test]
async fn invalid_agent_id_is_400_before_any_backend_is_contacted() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let long = format!("/agents/{}/terminal", "a".repeat(129));
    for path in ["/agents/../terminal", "/agents/a%2fb/terminal", "/agents/a%00/terminal", long.as_str()] {
        let r = raw_request(proxy.tls, true, &request("GET", path, UPGRADE_HEADERS)).await;
        assert_eq!(r.status, 400, "{path}");
    }
    assert!(backend.log.requests.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn oversized_request_head_is_431() {
    let backend = Backend::echo().await;
    let text = TestConfig::base(&[backend.addr.to_string()]).merge("server", json!({"max_header_size": "8KiB"})).text();
    let proxy = Proxy::start_with(&text).await;
    let big = format!("{UPGRADE_HEADERS}X-Big: {}\r\n", "x".repeat(20 * 1024));
    let r = raw_request(proxy.plain, false, &request("GET", "/agents/a1/terminal", &big)).await;
    assert_eq!(r.status, 431);
}

#[tokio::test]
async fn slow_request_head_is_answered_408_at_header_read_timeout() {
    let backend = Backend::echo().await;
    let text =
        TestConfig::base(&[backend.addr.to_string()]).merge("server", json!({"header_read_timeout": "300ms"})).text();
    let proxy = Proxy::start_with(&text).await;
    for tls in [false, true] {
        // Timed from before the connect: the proxy's timer cannot start earlier.
        let started = Instant::now();
        let mut io = dial(if tls { proxy.tls } else { proxy.plain }, tls).await;
        io.write_all(b"GET /agents/a1/terminal HTTP/1.1\r\nHost: local").await.expect("partial head");
        let head = tokio::time::timeout(SOON, read_head(&mut io)).await.expect("answer in time").expect("head");
        assert_eq!(parse_response(&head).status, 408, "tls={tls}");
        assert!(started.elapsed() >= Duration::from_millis(300), "not before the timeout");
    }
}

#[tokio::test]
async fn tls_handshake_that_never_starts_is_closed_at_the_timeout() {
    let backend = Backend::echo().await;
    let text = TestConfig::base(&[backend.addr.to_string()]).set("server.tls_handshake_timeout", "300ms").text();
    let proxy = Proxy::start_with(&text).await;
    let started = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(proxy.tls).await.expect("connect");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(SOON, tcp.read(&mut buf)).await.expect("closed in time").unwrap_or(0);
    assert_eq!(n, 0, "the proxy closes without sending anything");
    assert!(started.elapsed() >= Duration::from_millis(300), "not before the timeout");
    let (_, body) = http_get(proxy.admin, "/metrics").await;
    assert!(metric(&body, "portcullis_tls_handshake_failures_total{reason=\"timeout\"}") >= 1.0, "{body}");
}

#[tokio::test]
async fn garbage_instead_of_tls_is_closed_and_counted() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let mut tcp = tokio::net::TcpStream::connect(proxy.tls).await.expect("connect");
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(SOON, tcp.read_to_end(&mut buf)).await.expect("closed in time");
    // The proxy still serves others.
    upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("101 after garbage");
}

#[tokio::test]
async fn backend_refusing_the_upgrade_is_502_and_no_101_is_sent() {
    let backend = Backend::start(BackendOpts { status: Some(403), ..Default::default() }, echo_handler()).await;
    let proxy = Proxy::start(backend.addr).await;
    let err = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.err().expect("not 101");
    assert_eq!(err.status, 502);
}

#[tokio::test]
async fn backend_with_wrong_accept_is_502() {
    let backend = Backend::start(BackendOpts { bad_accept: true, ..Default::default() }, echo_handler()).await;
    let proxy = Proxy::start(backend.addr).await;
    let err = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.err().expect("not 101");
    assert_eq!(err.status, 502);
}

#[tokio::test]
async fn backend_that_never_answers_the_handshake_is_504() {
    let backend = Backend::start(BackendOpts { hang: true, ..Default::default() }, echo_handler()).await;
    let proxy = Proxy::start(backend.addr).await;
    let err = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.err().expect("not 101");
    assert_eq!(err.status, 504);
}

#[tokio::test]
async fn backend_connect_timeout_is_504() {
    // A listener with a full accept queue drops further SYNs, so connects hang.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind");
    socket.listen(0).expect("listen");
    let addr = socket.local_addr().expect("addr").as_socket().expect("inet");
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    let proxy = Proxy::start(addr).await;
    let started = Instant::now();
    let err = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.err().expect("not 101");
    assert_eq!(err.status, 504);
    assert!(started.elapsed() >= Duration::from_millis(900), "answered only after connect_timeout (1s)");
}

#[tokio::test]
async fn no_reachable_member_is_503_after_trying_each_member() {
    let refusing = [Refusing::new(), Refusing::new()];
    let dead = refusing.each_ref().map(|r| r.addr.to_string());
    let proxy = Proxy::start_with(&TestConfig::base(&dead).text()).await;
    let err = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.err().expect("not 101");
    assert_eq!(err.status, 503);
}

#[tokio::test]
async fn refused_member_is_skipped_for_the_next_one() {
    let backend = Backend::echo().await;
    let refusing = Refusing::new();
    let members = [refusing.addr.to_string(), backend.addr.to_string()];
    let proxy = Proxy::start_with(&TestConfig::base(&members).text()).await;
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("101 from second member");
    c.send(true, op::TEXT, b"hi").await;
    assert_eq!(c.recv().await.payload, b"hi");
}

#[tokio::test]
async fn backend_receives_key_protocol_extensions_and_forwarding_headers() {
    let backend = Backend::start(
        BackendOpts { pick_protocol: true, extensions: Some("x-test-ext".into()), ..Default::default() },
        echo_handler(),
    )
    .await;
    // The test client stands for a trusted proxy, so its X-Forwarded-For is extended.
    let trusted = json!({"trusted_proxies": ["127.0.0.1/32"]});
    let proxy = Proxy::start_with(&TestConfig::base(&[backend.addr.to_string()]).merge("server", trusted).text()).await;
    let c = upgrade(
        proxy.tls,
        true,
        "/agents/a1/terminal?cols=80",
        &[
            ("Sec-WebSocket-Protocol", "tty, json"),
            ("Sec-WebSocket-Extensions", "x-test-ext"),
            ("X-Forwarded-For", "203.0.113.7"),
            ("User-Agent", "e2e"),
            ("Keep-Alive", "timeout=5"),
        ],
    )
    .await
    .expect("101");
    assert_eq!(c.response.header("sec-websocket-protocol"), Some("tty"));
    assert_eq!(c.response.header("sec-websocket-extensions"), Some("x-test-ext"));
    let req = backend.log.requests.lock().expect("lock")[0].clone();
    assert_eq!(req.path, "/agents/a1/terminal?cols=80");
    assert_eq!(req.header("sec-websocket-key"), Some(KEY));
    assert_eq!(req.header("sec-websocket-version"), Some("13"));
    assert_eq!(req.header("sec-websocket-protocol"), Some("tty, json"));
    assert_eq!(req.header("sec-websocket-extensions"), Some("x-test-ext"));
    assert_eq!(req.header("x-forwarded-for"), Some("203.0.113.7, 127.0.0.1"));
    assert_eq!(req.header("x-forwarded-proto"), Some("https"));
    assert_eq!(req.header("x-forwarded-host"), Some("localhost"));
    assert_eq!(req.header("forwarded"), Some("for=127.0.0.1;proto=https;host=\"localhost\""));
    assert_eq!(req.header("user-agent"), Some("e2e"));
    assert_eq!(req.header("keep-alive"), None, "hop-by-hop headers are not forwarded");
}

/// Completes a TLS handshake offering `offered` (in that order of preference); the suite the
/// proxy chose, or the handshake error.
async fn negotiated_suite(
    addr: std::net::SocketAddr,
    offered: &[rustls::SupportedCipherSuite],
) -> std::io::Result<String> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = offered.to_vec();
    let connector = tls_connector_with(std::sync::Arc::new(provider));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio::time::timeout(SOON, connector.connect(name, tcp)).await.expect("handshake in time")?;
    let suite = tls.get_ref().1.negotiated_cipher_suite().expect("negotiated");
    Ok(format!("{:?}", suite.suite()))
}

#[tokio::test]
async fn tls_server_order_prefers_aes_128_gcm_over_the_clients_choice() {
    use rustls::crypto::aws_lc_rs::cipher_suite::*;
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    // The client prefers AES-256-GCM (rustls' own default order); the server's order wins.
    let offered = [TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256, TLS13_AES_128_GCM_SHA256];
    assert_eq!(negotiated_suite(proxy.tls, &offered).await.expect("handshake"), "TLS13_AES_128_GCM_SHA256");
    // A client that offers only ChaCha20 still gets it.
    let only = [TLS13_CHACHA20_POLY1305_SHA256];
    assert_eq!(negotiated_suite(proxy.tls, &only).await.expect("handshake"), "TLS13_CHACHA20_POLY1305_SHA256");
}

#[tokio::test]
async fn configured_cipher_suites_are_the_only_ones_offered() {
    use rustls::crypto::aws_lc_rs::cipher_suite::*;
    let backend = Backend::echo().await;
    let text = TestConfig::base(&[backend.addr.to_string()])
        .merge("tls", json!({"cipher_suites": ["TLS13_AES_256_GCM_SHA384", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"]}))
        .text();
    let proxy = Proxy::start_with(&text).await;
    let offered = [TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384];
    assert_eq!(negotiated_suite(proxy.tls, &offered).await.expect("handshake"), "TLS13_AES_256_GCM_SHA384");
    // Nothing in common: the handshake fails, and the proxy keeps serving.
    assert!(negotiated_suite(proxy.tls, &[TLS13_AES_128_GCM_SHA256]).await.is_err());
    upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("101 after a failed handshake");
}

#[tokio::test]
async fn forwarding_headers_from_an_untrusted_client_are_dropped_and_from_a_trusted_one_extended() {
    let backend = Backend::echo().await;
    let spoof = [("X-Forwarded-For", "6.6.6.6"), ("Forwarded", "for=6.6.6.6;proto=https")];
    let untrusted = Proxy::start(backend.addr).await;
    upgrade(untrusted.plain, false, "/agents/a1/terminal", &spoof).await.expect("101");
    let trusted_text = TestConfig::base(&[backend.addr.to_string()])
        .merge("server", json!({"trusted_proxies": ["10.0.0.0/8", "127.0.0.0/8"]}))
        .text();
    let trusted = Proxy::start_with(&trusted_text).await;
    upgrade(trusted.plain, false, "/agents/a1/terminal", &spoof).await.expect("101");
    let requests = backend.log.requests.lock().expect("lock").clone();
    assert_eq!(requests[0].header("x-forwarded-for"), Some("127.0.0.1"), "an untrusted client's XFF is dropped");
    assert_eq!(requests[0].header("forwarded"), Some("for=127.0.0.1;proto=http;host=\"localhost\""));
    assert_eq!(requests[1].header("x-forwarded-for"), Some("6.6.6.6, 127.0.0.1"), "a trusted proxy's XFF is extended");
    assert_eq!(
        requests[1].header("forwarded"),
        Some("for=6.6.6.6;proto=https, for=127.0.0.1;proto=http;host=\"localhost\"")
    );
}
