//! HTTP/2 on the client side: ALPN, WebSockets by extended CONNECT (RFC 8441) relayed to
//! HTTP/1.1 backends, auth and close codes as on HTTP/1.1, many WebSockets on one connection,
//! a stalled stream beside a live one, the per-address stream cap, plain requests, and the
//! refusals (CONNECT tunnels, other `:protocol`s). The client is the `h2` crate's.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use crate::harness::*;

const PATH: &str = "/agents/a1/terminal";

async fn echo_round_trip(c: &mut Client, payload: &[u8]) {
    c.send(true, op::BINARY, payload).await;
    let f = c.recv().await;
    assert_eq!((f.opcode, f.payload.as_slice()), (op::BINARY, payload));
}

async fn metrics(proxy: &Proxy) -> String {
    http_get(proxy.admin, "/metrics").await.1
}

#[tokio::test]
async fn a_websocket_over_h2_echoes_byte_identical_and_reaches_the_backend_over_http1() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let mut h2 = H2::connect(proxy.tls).await;
    let mut c = h2.websocket(PATH, &[]).await.expect("200");
    assert!(h2.extended_connect(), "SETTINGS_ENABLE_CONNECT_PROTOCOL is sent");
    assert_eq!(c.response.header("sec-websocket-accept"), None, "RFC 8441: no accept value over h2");

    c.send(true, op::TEXT, "héllo über h2".as_bytes()).await;
    let f = c.recv().await;
    assert_eq!((f.fin, f.opcode, f.payload.as_slice()), (true, op::TEXT, "héllo über h2".as_bytes()));
    assert!(!f.masked);
    c.send(false, op::TEXT, b"frag-1 ").await;
    c.send(true, op::PING, b"between").await;
    c.send(true, op::CONT, b"frag-2").await;
    let frames = [c.recv().await, c.recv().await, c.recv().await];
    let got: Vec<(u8, &[u8])> = frames.iter().map(|f| (f.opcode, f.payload.as_slice())).collect();
    assert_eq!(got, [(op::TEXT, &b"frag-1 "[..]), (op::PONG, b"between"), (op::CONT, b"frag-2")]);
    // 1 MiB, more than every flow-control window on the way.
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i * 7 % 251) as u8).collect();
    echo_round_trip(&mut c, &big).await;

    // The backend got an HTTP/1.1 upgrade with a key the proxy made (and checked the accept of).
    let req = backend.log.requests.lock().expect("lock")[0].clone();
    assert_eq!((req.method.as_str(), req.path.as_str()), ("GET", PATH));
    assert_eq!(req.header("upgrade").map(str::to_ascii_lowercase).as_deref(), Some("websocket"));
    let key = req.header("sec-websocket-key").expect("a key for the backend");
    assert_eq!(base64_len(key), 16);
    assert_eq!(req.header("x-forwarded-proto"), Some("https"));
    assert_eq!(req.header("x-forwarded-host"), Some("localhost"), ":authority is the host");

    let (_, sessions) = admin_request(proxy.admin, "GET", "/sessions", "").await;
    let sessions: Value = serde_json::from_str(&sessions).expect("json");
    assert_eq!(sessions["sessions"][0]["http"], "h2", "{sessions}");
    let m = metrics(&proxy).await;
    assert!(metric(&m, "portcullis_http2_connections_total") >= 1.0);
    assert!(metric(&m, "portcullis_http2_streams_total{kind=\"websocket\"}") >= 1.0);

    // The close handshake, then END_STREAM (the stream reads to its end).
    c.send(true, op::CLOSE, &close_payload(1000, "done")).await;
    assert_eq!(c.recv_close().await.close_code(), Some(1000));
    c.expect_eof().await;
}

fn base64_len(v: &str) -> usize {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(v).map(|b| b.len()).unwrap_or(0)
}

#[tokio::test]
async fn close_codes_over_h2_pass_through_come_from_the_proxy_and_drain_with_1001() {
    let backend = Backend::echo().await;
    let mut proxy = Proxy::start(backend.addr).await;
    let mut h2 = H2::connect(proxy.tls).await;

    // The client's code reaches the backend and the backend's echo of it comes back.
    let mut c = h2.websocket(PATH, &[]).await.expect("200");
    c.send(true, op::CLOSE, &close_payload(4000, "app bye")).await;
    let f = c.recv_close().await;
    assert_eq!((f.close_code(), &f.payload[2..]), (Some(4000), &b"app bye"[..]));
    backend.log.wait_for("the client's 4000", |f| f.close_code() == Some(4000)).await;

    // A protocol violation (an unmasked client frame) is closed by the proxy with 1002.
    let mut c = h2.websocket(PATH, &[]).await.expect("200");
    c.send_raw(&encode(true, 0, op::TEXT, None, b"unmasked")).await;
    assert_eq!(c.recv_close().await.close_code(), Some(1002));

    // On drain: 1001 on every live stream, then GOAWAY (a new stream is refused) and the
    // connection ends once its streams have.
    let mut a = h2.websocket(PATH, &[]).await.expect("200");
    let mut b = h2.websocket(PATH, &[]).await.expect("200");
    echo_round_trip(&mut a, b"before drain").await;
    proxy.drain();
    for c in [&mut a, &mut b] {
        let f = c.recv_close().await;
        assert_eq!(f.close_code(), Some(1001));
        c.send(true, op::CLOSE, &f.payload).await;
        c.expect_eof().await;
    }
    let ended = tokio::time::timeout(SOON, &mut h2.conn).await.expect("connection ends after the drain");
    assert!(ended.expect("connection task").is_ok(), "a graceful GOAWAY, not an error");
}

#[tokio::test]
async fn auth_over_h2_is_the_upgrade_path_s_auth() {
    let backend = Backend::echo().await;
    let key = hmac();
    let text = TestConfig::base(&[backend.addr.to_string()])
        .merge("", key.auth_keys())
        .set("routes.0.name", "h2auth")
        .merge("routes.0", json!({"auth": {"sources": ["bearer", "query:access_token"], "agent_claim": "agents"}}))
        .text();
    let proxy = Proxy::start_with(&text).await;
    let mut h2 = H2::connect(proxy.tls).await;

    let none = h2.websocket(PATH, &[]).await.err().expect("no token");
    assert_eq!(none.status, 401);
    assert!(none.header("www-authenticate").is_some_and(|v| v.starts_with("Bearer")));
    let other = h2.websocket(PATH, &[("authorization", &key.bearer(&["a2"]))]).await.err().expect("other agent");
    assert_eq!(other.status, 403);
    let bad = h2.websocket(PATH, &[("authorization", "Bearer not.a.token")]).await.err().expect("garbage");
    assert_eq!(bad.status, 401);

    let mut c = h2.websocket(PATH, &[("authorization", &key.bearer(&["a1"]))]).await.expect("bearer");
    echo_round_trip(&mut c, b"with a bearer token").await;
    let token = key.token("alice", &["a1"], Duration::from_secs(600));
    let mut c = h2.websocket(&format!("{PATH}?cols=80&access_token={token}"), &[]).await.expect("query");
    echo_round_trip(&mut c, b"with a query token").await;

    let requests = backend.log.requests.lock().expect("lock").clone();
    assert_eq!(requests.len(), 2, "refused openings never reach the backend");
    for r in &requests {
        let all = format!("{} {:?}", r.path, r.headers);
        assert!(!all.contains(&token) && !all.to_ascii_lowercase().contains("authorization"), "{all}");
    }
    assert_eq!(requests[1].path, format!("{PATH}?cols=80"));
    let m = metrics(&proxy).await;
    assert_eq!(metric(&m, "portcullis_upgrades_total{route=\"h2auth\",result=\"unauthorized\"}"), 2.0);
    assert_eq!(metric(&m, "portcullis_upgrades_total{route=\"h2auth\",result=\"forbidden\"}"), 1.0);
}

#[tokio::test]
async fn ten_websockets_share_one_h2_connection() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let mut h2 = H2::connect(proxy.tls).await;
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(h2.websocket(PATH, &[]).await.expect("200"));
    }
    // All ten at once, each with its own payloads.
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                for n in 0..50u32 {
                    let payload = format!("stream {i} message {n}").repeat(1 + n as usize % 40);
                    echo_round_trip(&mut c, payload.as_bytes()).await;
                }
                c
            })
        })
        .collect();
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.expect("stream task"));
    }
    let (_, sessions) = admin_request(proxy.admin, "GET", "/sessions", "").await;
    let sessions: Value = serde_json::from_str(&sessions).expect("json");
    let list = sessions["sessions"].as_array().expect("list");
    assert_eq!(list.len(), 10);
    assert!(list.iter().all(|s| s["http"] == "h2"));
    // One client address and port: one TCP connection carries them all.
    assert!(list.iter().all(|s| s["client"] == list[0]["client"]), "{list:?}");
    // Closing one leaves the others running.
    let mut first = clients.remove(0);
    first.send(true, op::CLOSE, &close_payload(1000, "")).await;
    assert_eq!(first.recv_close().await.close_code(), Some(1000));
    for c in &mut clients {
        echo_round_trip(c, b"still here").await;
    }
}

#[tokio::test]
async fn a_stalled_stream_does_not_hold_up_another_on_the_same_connection() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let mut h2 = H2::connect(proxy.tls).await;
    let stalled = h2.websocket(PATH, &[]).await.expect("200");
    let mut live = h2.websocket(PATH, &[]).await.expect("200");

    // The stalled stream's client sends far more than every window and socket buffer on the
    // way can hold, and reads none of the echoes: its writer blocks for good, with the proxy's
    // stream window full one way and the client's the other.
    let (mut echoes, mut sink) = tokio::io::split(stalled.io);
    let frame = encode(true, 0, op::BINARY, Some(rand_mask()), &[0x5a; 64 * 1024]);
    let (tx, mut written) = tokio::sync::watch::channel(0usize);
    let writer = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        for n in 1..=1024 {
            sink.write_all(&frame).await.expect("stalled stream write");
            let _ = tx.send(n);
        }
    });
    // Until it is stalled: every buffer on the way full, its writer has made no progress for
    // a while (on a slow machine this may come early, which makes the test weaker, not wrong).
    tokio::time::timeout(SOON, written.wait_for(|n| *n >= 8)).await.expect("writes start").expect("writer");
    eventually_within("the stalled stream stalls", SOON * 3, async || {
        tokio::time::timeout(Duration::from_millis(300), written.changed()).await.is_err().then_some(())
    })
    .await;

    // The other stream works as if alone (a write that waits for a window gets no timeout
    // of its own: this one bounds the whole exchange).
    let exchange = async {
        for n in 0..20u32 {
            echo_round_trip(&mut live, format!("live {n}").as_bytes()).await;
        }
    };
    tokio::time::timeout(SOON, exchange).await.expect("the live stream is not held up");
    assert!(!writer.is_finished(), "64 MiB unread cannot all have been taken");

    // The stalled stream was only waiting: read again, its echoes come whole and in order,
    // and its writer moves on.
    let before = *written.borrow();
    for _ in 0..before + 8 {
        let f = tokio::time::timeout(SOON, read_frame(&mut echoes)).await.expect("echo in time").expect("echo");
        assert_eq!((f.opcode, f.payload.len()), (op::BINARY, 64 * 1024));
        assert!(f.payload.iter().all(|&b| b == 0x5a));
    }
    tokio::time::timeout(SOON, written.wait_for(|n| *n > before)).await.expect("writer resumes").expect("writer");
    echo_round_trip(&mut live, b"still live").await;
    writer.abort();
}

#[tokio::test]
async fn the_per_address_stream_cap_answers_429_and_frees_when_a_stream_ends() {
    let backend = Backend::echo().await;
    let text = TestConfig::base(&[backend.addr.to_string()])
        .set("routes.0.name", "h2cap")
        .merge("http2", json!({"max_streams_per_ip": 2}))
        .text();
    let proxy = Proxy::start_with(&text).await;
    let mut one = H2::connect(proxy.tls).await;
    let mut two = H2::connect(proxy.tls).await;
    let mut a = one.websocket(PATH, &[]).await.expect("first");
    let _b = two.websocket(PATH, &[]).await.expect("second, on another connection");
    let refused = one.websocket(PATH, &[]).await.err().expect("third is over the cap");
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("retry-after"), Some("5"), "every 429 says when to retry");
    // Counted before anything is done for the stream: an answer the proxy gives before any
    // route (protected-resource metadata, like the login exchange and a preflight) is over
    // the cap too. It was answered (404, no such resource) before it was.
    let (status, _) = one.get("/.well-known/oauth-protected-resource/agents/a1", &[]).await;
    assert_eq!(status, 429, "a stream answered before its route escaped max_streams_per_ip");
    let m = metrics(&proxy).await;
    // The reason's counter is the process's (other tests refuse streams too); the route's is this one's.
    assert!(metric(&m, "portcullis_limit_refusals_total{reason=\"per_ip_streams\"}") >= 1.0);
    assert_eq!(metric(&m, "portcullis_upgrades_total{route=\"h2cap\",result=\"per_ip_streams\"}"), 1.0);

    a.send(true, op::CLOSE, &close_payload(1000, "")).await;
    a.recv_close().await;
    a.expect_eof().await;
    // The place frees when the session's task ends, just after the stream's end.
    let mut c = eventually("the cap frees", async || match one.websocket(PATH, &[]).await {
        Ok(c) => Some(c),
        Err(h) if h.status == 429 => None,
        Err(h) => panic!("the cap did not free: {}", h.status),
    })
    .await;
    echo_round_trip(&mut c, b"in the freed place").await;
}

/// One raw HTTP/2 frame.
fn raw_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Found by an attacker review: a connection sending nothing but 1-byte WINDOW_UPDATE frames
/// kept a core busy for as long as it lasted (h2 bounds PING, SETTINGS, resets and
/// CONTINUATION, not these). Each flood Envoy bounds now closes its connection, and a client
/// beside it is served on.
#[tokio::test]
async fn window_update_priority_and_empty_frame_floods_close_their_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let mut neighbour = H2::connect(proxy.tls).await;
    let mut live = neighbour.websocket(PATH, &[]).await.expect("200");
    let floods: [(&str, Vec<u8>); 3] = [
        ("window_update", raw_frame(0x8, 0, 0, &[0, 0, 0, 1])),
        ("priority", raw_frame(0x2, 0, 3, &[0, 0, 0, 1, 16])),
        ("empty_frames", raw_frame(0x0, 0, 1, &[])),
    ];
    for (frame, one) in floods {
        let (mut tls, _) = dial_alpn(proxy.tls, &[b"h2"]).await;
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend(raw_frame(0x4, 0, 0, &[]));
        // A request first (GET /, its body left open), so that the connection is past its
        // header deadline and the empty DATA frames have a stream to be on.
        let get = [0x82, 0x87, 0x84, 0x41, 0x09, b'l', b'o', b'c', b'a', b'l', b'h', b'o', b's', b't'];
        bytes.extend(raw_frame(0x1, 0x4, 1, &get));
        for _ in 0..5_000 {
            bytes.extend_from_slice(&one);
        }
        // The proxy may close before it has read all of it.
        let _ = tls.write_all(&bytes).await;
        let mut sink = Vec::new();
        let closed = tokio::time::timeout(SOON, tls.read_to_end(&mut sink)).await;
        assert!(closed.is_ok(), "a {frame} flood left its connection open");
        let m = metrics(&proxy).await;
        assert!(metric(&m, &format!("portcullis_http2_floods_total{{frame=\"{frame}\"}}")) >= 1.0, "{frame}");
        echo_round_trip(&mut live, frame.as_bytes()).await;
    }
}

#[tokio::test]
async fn connect_tunnels_and_other_protocols_are_refused() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr).await;
    let mut h2 = H2::connect(proxy.tls).await;
    // A classic CONNECT (no :protocol): the proxy opens no tunnels.
    let req =
        ::http::Request::builder().method(::http::Method::CONNECT).uri("localhost:443").body(()).expect("request");
    let (resp, _) = h2.open(req, false).await;
    assert_eq!(resp.status(), 405);
    // An extended CONNECT for another protocol.
    let req = ::http::Request::builder()
        .method(::http::Method::CONNECT)
        .uri(format!("https://localhost{PATH}"))
        .header("sec-websocket-version", "13")
        .extension(::h2::ext::Protocol::from_static("connect-udp"))
        .body(())
        .expect("request");
    let (resp, _) = h2.open(req, false).await;
    assert_eq!(resp.status(), 400);
    // A WebSocket of another version.
    let refused = h2.websocket(PATH, &[("sec-websocket-version", "8")]).await.err().expect("version 8");
    assert_eq!(refused.status, 426);
    assert_eq!(refused.header("sec-websocket-version"), Some("13"));
    assert_eq!(refused.header("upgrade"), None, "no connection headers on HTTP/2");
    // A plain GET on the WebSocket route.
    let (status, _) = h2.get(PATH, &[]).await;
    assert_eq!(status, 426);
    // The connection is still good.
    let mut c = h2.websocket(PATH, &[]).await.expect("200");
    echo_round_trip(&mut c, b"after the refusals").await;
    assert!(backend.log.requests.lock().expect("lock").len() == 1);
}

#[tokio::test]
async fn rest_requests_over_h2_reach_the_http_route_with_the_host_and_auth() {
    let rest = RestBackend::start("m1").await;
    let key = hmac();
    let text = TestConfig::base(&["127.0.0.1:1".to_owned()])
        .merge(
            "",
            json!({
                "auth": {"keys": [{"algorithms": ["HS256"], "secret_file": key.path.display().to_string()}]},
                "routes": [{
                    "name": "h2api",
                    "path": "/agents/{agent}/api/{*rest}",
                    "kind": "http",
                    "backends": [rest.addr.to_string()],
                    "backend_path": "/v1/{rest}",
                    "auth": {"agent_claim": "agents"},
                }],
            }),
        )
        .text();
    let proxy = Proxy::start_with(&text).await;
    let mut h2 = H2::connect(proxy.tls).await;
    let (status, _) = h2.get("/agents/a1/api/headers", &[]).await;
    assert_eq!(status, 401);
    let auth = key.bearer(&["a1"]);
    for _ in 0..3 {
        let (status, body) = h2.get("/agents/a1/api/headers", &[("authorization", &auth)]).await;
        assert_eq!((status, body), (200, Bytes::from_static(b"ok")));
    }
    let seen = rest.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].uri, "/v1/headers");
    assert_eq!(seen[0].headers.get("x-forwarded-host").map(String::as_str), Some("localhost"));
    assert_eq!(seen[0].headers.get("host").map(String::as_str), Some(rest.addr.to_string().as_str()));
    let m = metrics(&proxy).await;
    assert!(metric(&m, "portcullis_http2_streams_total{kind=\"request\"}") >= 4.0);
    assert_eq!(metric(&m, "portcullis_http_requests_total{route=\"h2api\",kind=\"request\",class=\"2xx\"}"), 3.0);
}

#[tokio::test]
async fn alpn_offers_h2_unless_disabled_and_http1_clients_are_unchanged() {
    let backend = Backend::echo().await;
    let on = Proxy::start(backend.addr).await;
    let (_, agreed) = dial_alpn(on.tls, &[b"h2", b"http/1.1"]).await;
    assert_eq!(agreed.as_deref(), Some(&b"h2"[..]));
    let (_, agreed) = dial_alpn(on.tls, &[b"http/1.1"]).await;
    assert_eq!(agreed.as_deref(), Some(&b"http/1.1"[..]));
    // No ALPN at all is HTTP/1.1, as before.
    let mut c = upgrade(on.tls, true, PATH, &[]).await.expect("101");
    echo_round_trip(&mut c, b"http/1.1 as ever").await;

    let text = TestConfig::base(&[backend.addr.to_string()]).merge("http2", json!({"enabled": false})).text();
    let off = Proxy::start_with(&text).await;
    let (_, agreed) = dial_alpn(off.tls, &[b"h2", b"http/1.1"]).await;
    assert_eq!(agreed.as_deref(), Some(&b"http/1.1"[..]), "h2 not offered when disabled");
}

#[tokio::test]
async fn an_h2_client_that_sends_no_request_is_closed_at_the_header_deadline() {
    let backend = Backend::echo().await;
    let text = TestConfig::base(&[backend.addr.to_string()]).set("server.header_read_timeout", "300ms").text();
    let proxy = Proxy::start_with(&text).await;
    let (mut tls, agreed) = dial_alpn(proxy.tls, &[b"h2"]).await;
    assert_eq!(agreed.as_deref(), Some(&b"h2"[..]));
    // Not even the connection preface: the proxy closes the connection (`header_timeout` in
    // portcullis_upgrades_total, a process-wide series other tests count too).
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(SOON, async {
        use tokio::io::AsyncReadExt;
        let mut total = 0;
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .expect("closed in time");
    // The proxy's SETTINGS may come first; no HTTP/1.1 408 is written on an h2 connection.
    assert!(!String::from_utf8_lossy(&buf[..n.min(256)]).contains("408"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_test_harness_runs_websockets_over_h2_with_sessions_sharing_connections() {
    use portcullis_loadtest::{run, Kind, Scenario};
    let backend = Backend::echo().await;
    let text = TestConfig::base(&[backend.addr.to_string()]).set("routes.0.name", "h2load").text();
    let proxy = Proxy::start_with(&text).await;
    let s = Scenario {
        scenario: Kind::Echo,
        target: Some(format!("wss://localhost:{}/agents/agent-{{conn}}/terminal", proxy.tls.port())),
        ca: Some(certs().cert.clone()),
        connections: 10,
        h2_streams: 5,
        window: 4,
        size: 512,
        duration: Duration::from_secs(1),
        drain: Duration::from_secs(2),
        quiet: true,
        ..Scenario::default()
    };
    let r = run(&s).await.expect("run");
    assert!(r.is_clean() && r.errors.is_empty(), "{}", r.table());
    assert_eq!(r.opened, 10, "{}", r.table());
    assert!(r.received > 100 && r.sent == r.received, "{}", r.table());
    let m = metrics(&proxy).await;
    assert_eq!(metric(&m, "portcullis_upgrades_total{route=\"h2load\",result=\"ok\"}"), 10.0);
    // Ten sessions came on two connections: the backend saw ten upgrades from the proxy, and
    // the harness insists on ALPN h2 for every one of its connections.
    assert_eq!(backend.log.requests.lock().expect("lock").len(), 10);
}

#[tokio::test]
async fn an_h2_connection_with_no_open_stream_is_closed_after_the_idle_timeout() {
    let backend = Backend::echo().await;
    let text = TestConfig::base(&[backend.addr.to_string()]).merge("http2", json!({"idle_timeout": "300ms"})).text();
    let proxy = Proxy::start_with(&text).await;

    // A request, then nothing: the connection ends with a GOAWAY (not an error).
    let mut idle = H2::connect(proxy.tls).await;
    let (status, _) = idle.get(PATH, &[]).await;
    assert_eq!(status, 426);
    let ended = tokio::time::timeout(SOON, &mut idle.conn).await.expect("an idle connection is closed");
    assert!(ended.expect("connection task").is_ok(), "a graceful GOAWAY");

    // A WebSocket is an open stream: three idle timeouts later its connection still carries
    // it; once it closes, the connection goes idle and ends.
    let mut busy = H2::connect(proxy.tls).await;
    let mut c = busy.websocket(PATH, &[]).await.expect("200");
    tokio::time::sleep(Duration::from_millis(900)).await;
    echo_round_trip(&mut c, b"still open").await;
    assert!(!busy.conn.is_finished());
    c.send(true, op::CLOSE, &close_payload(1000, "")).await;
    assert_eq!(c.recv_close().await.close_code(), Some(1000));
    let ended = tokio::time::timeout(SOON, &mut busy.conn).await.expect("closed once idle");
    assert!(ended.expect("connection task").is_ok());
}

/// Found by an attacker review (2026-12-06): the proxy's own answer to HEAD (a 401 here) went
/// out over HTTP/2 with its body, which a strict client takes as a protocol error of the whole
/// connection. It has none; and a member's 101 to a plain request is the member's failure, 502.
#[tokio::test]
async fn an_answer_to_head_has_no_body_and_a_members_101_is_a_bad_gateway() {
    let rest = RestBackend::start("m1").await;
    let key = hmac();
    let text = TestConfig::base(&["127.0.0.1:1".to_owned()])
        .merge("", key.auth_keys())
        .merge(
            "",
            json!({"routes": [{
                "name": "h2head",
                "path": "/agents/{agent}/api/{*rest}",
                "kind": "http",
                "backends": [rest.addr.to_string()],
                "auth": {"agent_claim": "agents"},
            }]}),
        )
        .text();
    let proxy = Proxy::start_with(&text).await;
    let mut h2 = H2::connect(proxy.tls).await;
    let head = ::http::Request::head("https://localhost/agents/a1/api/headers").body(()).expect("request");
    let (resp, _) = h2.open(head, true).await;
    assert_eq!(resp.status(), 401);
    let mut body = resp.into_body();
    let data = tokio::time::timeout(SOON, body.data()).await.expect("the stream ends");
    assert!(data.is_none(), "no body on an answer to HEAD: {data:?}");
    let (status, _) = h2.get("/agents/a1/api/status?code=101", &[("authorization", &key.bearer(&["a1"]))]).await;
    assert_eq!(status, 502);
}

#[tokio::test]
async fn an_answer_whose_client_gives_it_no_window_is_reset_after_send_timeout() {
    // Found by an attacker review (2026-12-07): a stream whose client keeps its window shut
    // held its member's connection and its session for the route's lifetime (24 h), since
    // send_timeout was the HTTP/1.1 socket's only and hyper then polls the body no more; one
    // address held 973 member connections over 20 client connections.
    let rest = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = Proxy::start_with(&send_timeout_config(&key, &rest, "1s", json!({})).text()).await;
    let bearer = |sub: &str| format!("Bearer {}", key.token(sub, &["a1"], Duration::from_secs(600)));
    let stall = |sub: &str| get_request("/agents/a1/api/stall", &bearer(sub));
    let sessions = async |sub: &str| sessions_of(proxy.admin, sub).await;
    let dropped = |sub: &str| rest.dropped_for(sub);
    // Bob reads his answer; its member then sends nothing more: a silent member is no stall.
    let mut reading = H2::connect(proxy.tls).await;
    let (bobs, _) = reading.open(stall("bob"), true).await;
    let mut bobs = bobs.into_body();
    let first = tokio::time::timeout(SOON, bobs.data()).await.expect("the first chunk").expect("data").expect("ok");
    let _ = bobs.flow_control().release_capacity(first.len());
    // Mallory gives her answer no window: the proxy can hand hyper its first chunk, no more.
    let mut shut = H2::connect_with_window(proxy.tls, 0).await;
    let (mallorys, _) = shut.open(stall("mallory"), true).await;
    assert_eq!(mallorys.status(), 200);
    eventually("her answer is a session", async || (sessions("mallory").await == 1).then_some(())).await;
    let started = std::time::Instant::now();
    eventually("her stalled answer's session ends", async || (sessions("mallory").await == 0).then_some(())).await;
    assert!(started.elapsed() < Duration::from_secs(5), "within about send_timeout: {:?}", started.elapsed());
    eventually("her member's request is cut", async || dropped("mallory").then_some(())).await;
    let mut body = mallorys.into_body();
    let end = tokio::time::timeout(SOON, body.data()).await.expect("the stream ends in time");
    assert!(matches!(end, Some(Err(_))), "the stream is reset: {end:?}");
    let m = metrics(&proxy).await;
    assert!(metric(&m, "portcullis_send_timeouts_total") >= 1.0, "{m}");
    // Bob's, older than send_timeout by now, is still served.
    assert_eq!(sessions("bob").await, 1);
    assert!(!dropped("bob"), "{:?}", rest.seen());
}

/// An HTTP route `/agents/{agent}/api/{*rest}` to `rest` with `[server] send_timeout` and
/// `backend` as the route's `[backend]`.
fn send_timeout_config(key: &Hmac, rest: &RestBackend, send_timeout: &str, backend: Value) -> TestConfig {
    TestConfig::base(&["127.0.0.1:1".to_owned()]).merge(
        "",
        json!({
            "auth": {"keys": [{"algorithms": ["HS256"], "secret_file": key.path.display().to_string()}]},
            "server": {"send_timeout": send_timeout},
            "routes": [{
                "name": "h2stall",
                "path": "/agents/{agent}/api/{*rest}",
                "kind": "http",
                "backends": [rest.addr.to_string()],
                "backend_path": "/v1/{rest}",
                "auth": {"agent_claim": "agents"},
                "backend": backend,
            }],
        }),
    )
}

fn get_request(path: &str, auth: &str) -> ::http::Request<()> {
    let req = ::http::Request::get(format!("https://localhost{path}")).header("authorization", auth);
    req.body(()).expect("request")
}

#[tokio::test]
async fn an_event_stream_whose_keep_alives_fill_a_window_never_opened_again_is_reset() {
    // Found by the review of the first send deadline: a keep-alive comment filling the window
    // was handed without starting the deadline, so the stream stayed for its lifetime.
    let rest = RestBackend::start("m1").await;
    let key = hmac();
    let text = send_timeout_config(&key, &rest, "1s", json!({"sse_keepalive": "50ms"})).text();
    let proxy = Proxy::start_with(&text).await;
    let auth = format!("Bearer {}", key.token("mallory", &["a1"], Duration::from_secs(600)));
    // 100 bytes of window: the event and a few comments, then nothing more.
    let mut shut = H2::connect_with_window(proxy.tls, 100).await;
    let (answer, _) = shut.open(get_request("/agents/a1/api/sse?n=1&hold=1", &auth), true).await;
    assert_eq!(answer.status(), 200);
    let mut body = answer.into_body();
    let ended = tokio::time::timeout(SOON, async {
        loop {
            match body.data().await {
                Some(Ok(_)) => continue,
                other => return other.map(|r| r.map(|_| ())),
            }
        }
    })
    .await
    .expect("the stream ends in time");
    assert!(matches!(ended, Some(Err(_))), "reset, not completed: {ended:?}");
    let m = metrics(&proxy).await;
    assert!(metric(&m, "portcullis_send_timeouts_total") >= 1.0, "{m}");
}

#[tokio::test]
async fn a_client_reading_slowly_but_steadily_gets_its_whole_answer_and_a_known_length_ends_without_more_window() {
    let rest = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = Proxy::start_with(&send_timeout_config(&key, &rest, "2s", json!({})).text()).await;
    let auth = format!("Bearer {}", key.token("bob", &["a1"], Duration::from_secs(600)));
    // 4 KiB of window, given back 100 ms after each read: 40 KB/s, well above 16 KiB per
    // send_timeout, though a 64 KiB frame would take longer than it.
    let mut slow = H2::connect_with_window(proxy.tls, 4096).await;
    let (answer, _) = slow.open(get_request("/agents/a1/api/big?kib=96", &auth), true).await;
    assert_eq!(answer.status(), 200);
    let mut body = answer.into_body();
    let mut got = 0;
    let end = loop {
        match tokio::time::timeout(SOON, body.data()).await.expect("data in time") {
            Some(Ok(chunk)) => {
                got += chunk.len();
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            other => break other.map(|r| r.map(|_| ())),
        }
    };
    assert!(end.is_none(), "the answer ended whole: {end:?} after {got} bytes");
    assert_eq!(got, 96 * 1024);
    // A declared length, exactly the window: it ends with its last DATA frame, with no window
    // given back (else it would wait for one byte of window it does not need, and be reset).
    let mut exact = H2::connect_with_window(proxy.tls, 4096).await;
    let (answer, _) = exact.open(get_request("/agents/a1/api/big?kib=4", &auth), true).await;
    let mut body = answer.into_body();
    let mut got = 0;
    let end = loop {
        match tokio::time::timeout(SOON, body.data()).await.expect("data in time") {
            Some(Ok(chunk)) => got += chunk.len(),
            other => break other.map(|r| r.map(|_| ())),
        }
    };
    assert!(end.is_none() && got == 4096, "{end:?} after {got} bytes");
}
