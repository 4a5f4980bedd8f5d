//! Trust boundaries (DESIGN.md §11, issue 24), each item as the attack that worked before it was
//! fixed: identity headers a client tried to strip or forge, and `Host` values that were not an
//! authority, over HTTP/1.1 (REST, SSE, WebSocket) and HTTP/2 (REST, RFC 8441).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;

use crate::harness::*;

/// A route of both kinds on `/agents/{agent}/api/{*rest}` to `member`, with the subject and the
/// `role` claim forwarded, `host` as given and `extra` merged into the route table.
fn config(key: &Hmac, member: SocketAddr, host: Option<&str>, extra: serde_json::Value) -> TestConfig {
    let mut route = json!({
        "name": "api",
        "path": "/agents/{agent}/api/{*rest}",
        "kind": "both",
        "backends": [member.to_string()],
        "auth": {"sources": ["bearer"], "agent_claim": "agents", "forward_claims": ["role"]},
    });
    if let Some(host) = host {
        route["host"] = host.into();
    }
    TestConfig::base(&["127.0.0.1:1".to_owned()])
        .merge("", key.auth_keys())
        .merge("", json!({"routes": [route]}))
        .merge("routes.1", extra)
}

fn alice(key: &Hmac) -> String {
    let token = key.token_with(serde_json::json!({ "sub": "alice", "agents": ["a1"], "role": "viewer" }));
    format!("Bearer {token}")
}

/// What the backend must have seen on every path: the proxy's identity once, no spelling of it
/// from the client, and the forwarding headers the proxy wrote.
fn assert_identity(seen: &Seen, path: &str) {
    let h = &seen.headers;
    assert_eq!(h.get("x-portcullis-sub").map(String::as_str), Some("alice"), "{path}: {h:?}");
    assert_eq!(h.get("x-portcullis-claim-role").map(String::as_str), Some("viewer"), "{path}: {h:?}");
    assert_eq!(h.get("x-forwarded-for").map(String::as_str), Some("127.0.0.1"), "{path}: {h:?}");
    for name in h.keys() {
        assert!(!name.contains('_'), "{path}: the client's {name} reached the backend: {h:?}");
    }
    assert!(!h.values().any(|v| v == "root" || v == "admin" || v.contains("6.6.6.6")), "{path}: {h:?}");
}

#[tokio::test]
async fn a_client_cannot_strip_or_forge_identity_headers_on_any_path() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = Proxy::start_with(&config(&key, backend.addr, None, json!({})).text()).await;
    let auth = alice(&key);
    let forged: &[(&str, &str)] = &[
        ("authorization", &auth),
        ("X_Portcullis_Sub", "root"),
        ("X_Portcullis_Claim_Role", "admin"),
        ("X_Forwarded_For", "6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
    ];
    let stripping =
        [forged, &[("connection", "close, x-portcullis-sub, x-portcullis-claim-role, x-forwarded-for")]].concat();

    // HTTP/1.1: REST, SSE and the WebSocket handshake.
    let mut c = H1::connect(proxy.tls, true).await;
    assert_eq!(c.get("/agents/a1/api/headers", &stripping).await.status, 200);
    let mut c = H1::connect(proxy.tls, true).await;
    let sse = c.get("/agents/a1/api/sse?n=1&gap_ms=0", &stripping).await;
    assert_eq!(sse.status, 200);
    let ws_extra = [forged, &[("connection", "x-portcullis-sub, x-portcullis-claim-role")]].concat();
    let ws = upgrade(proxy.tls, true, "/agents/a1/api/ws", &ws_extra).await.expect("h1 upgrade");
    drop(ws);
    // HTTP/2 has no Connection header: the underscore spellings, on a request and an
    // extended CONNECT.
    let mut h2 = H2::connect(proxy.tls).await;
    let (status, _) = h2.get("/agents/a1/api/headers", forged).await;
    assert_eq!(status, 200);
    let _ws = h2.websocket("/agents/a1/api/ws", forged).await.expect("h2 websocket");

    let seen = eventually("the backend saw five requests", async || {
        let s = backend.seen();
        (s.len() >= 5).then_some(s)
    })
    .await;
    for (s, path) in seen.iter().zip(["h1 rest", "h1 sse", "h1 websocket", "h2 rest", "h2 websocket"]) {
        assert_identity(s, path);
    }
}

#[tokio::test]
async fn underscore_header_names_are_dropped_by_default_refused_or_allowed_per_route() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let auth = alice(&key);
    let headers: &[(&str, &str)] = &[("authorization", &auth), ("x_trace_id", "t1")];
    for (rule, status, forwarded) in [(None, 200, false), (Some("reject"), 400, false), (Some("allow"), 200, true)] {
        let extra = rule.map(|r| json!({"headers_with_underscores": r})).unwrap_or_else(|| json!({}));
        let proxy = Proxy::start_with(&config(&key, backend.addr, None, extra).text()).await;
        let before = backend.seen().len();
        let mut c = H1::connect(proxy.tls, true).await;
        let a = c.get("/agents/a1/api/headers", headers).await;
        assert_eq!(a.status, status, "{rule:?}");
        let seen = backend.seen();
        match status {
            200 => assert_eq!(seen[before].headers.contains_key("x_trace_id"), forwarded, "{rule:?}"),
            _ => assert_eq!(seen.len(), before, "a refused request reached the backend"),
        }
        if rule == Some("reject") {
            let refused = upgrade(proxy.tls, true, "/agents/a1/api/ws", headers).await.err().expect("refused upgrade");
            assert_eq!(refused.status, 400);
        }
    }
}

#[tokio::test]
async fn a_host_that_is_not_an_authority_is_refused_before_routing_or_forwarding() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = Proxy::start_with(&config(&key, backend.addr, Some("127.0.0.1"), json!({})).text()).await;
    let auth = alice(&key);
    let request = |host: &str| {
        format!("GET /agents/a1/api/headers HTTP/1.1\r\n{host}Authorization: {auth}\r\nConnection: close\r\n\r\n")
    };
    for host in [
        "Host: 127.0.0.1:1\", for=6.6.6.6;proto=https;host=\"evil.example\r\n",
        "Host: 127.0.0.1 evil\r\n",
        "Host: user@127.0.0.1\r\n",
        "Host: 127.0.0.1:99999\r\n",
        "Host: 127.0.0.1\r\nHost: 127.0.0.1\r\n",
        "",
        // RFC 3986 reg-names that are no host name (an attacker review, 2026-12-06): they
        // matched no host route, and reached a fallback route's backend as X-Forwarded-Host.
        "Host: 127.0.0.1,x\r\n",
        "Host: 127%2e0.0.1\r\n",
        "Host: a..b\r\n",
    ] {
        let head = raw_request(proxy.plain, false, request(host).as_bytes()).await;
        assert_eq!(head.status, 400, "{host:?}");
    }
    assert!(backend.seen().is_empty(), "a bad Host reached the backend: {:?}", backend.seen());

    // A valid one, in any case, matches the host route and is what the backend is told.
    let head = raw_request(proxy.plain, false, request("Host: 127.0.0.1:1\r\n").as_bytes()).await;
    assert_eq!(head.status, 200);
    let seen = &backend.seen()[0];
    assert_eq!(seen.headers.get("x-forwarded-host").map(String::as_str), Some("127.0.0.1:1"));
    assert_eq!(
        seen.headers.get("forwarded").map(String::as_str),
        Some("for=127.0.0.1;proto=http;host=\"127.0.0.1:1\""),
        "one hop, with the host quoted"
    );
}

#[tokio::test]
async fn on_http2_a_host_header_naming_another_authority_is_refused() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = Proxy::start_with(&config(&key, backend.addr, None, json!({})).text()).await;
    let auth = alice(&key);
    let mut h2 = H2::connect(proxy.tls).await;
    let (status, _) = h2.get("/agents/a1/api/headers", &[("authorization", &auth), ("host", "evil.example")]).await;
    assert_eq!(status, 400);
    let refused = h2.websocket("/agents/a1/api/ws", &[("authorization", &auth), ("host", "evil.example")]).await;
    assert_eq!(refused.err().map(|h| h.status), Some(400));
    assert!(backend.seen().is_empty(), "{:?}", backend.seen());
    // The same authority in both (any case) is fine.
    let (status, _) = h2.get("/agents/a1/api/headers", &[("authorization", &auth), ("host", "LOCALHOST")]).await;
    assert_eq!(status, 200);
    assert_eq!(backend.seen()[0].headers.get("x-forwarded-host").map(String::as_str), Some("localhost"));
}

/// Sends `head` (and `body`) to the admin listener as one request; (status, body).
async fn admin_raw(admin: SocketAddr, head: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.expect("admin");
    let req = format!("{head}Connection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).await.expect("send");
    let mut out = Vec::new();
    tokio::time::timeout(SOON, s.read_to_end(&mut out)).await.expect("admin answers").expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

#[tokio::test]
async fn the_admin_api_answers_only_known_hosts_and_no_browser_can_drive_it() {
    let backend = Backend::echo().await;
    let text = TestConfig::base(&[backend.addr.to_string()])
        .set("admin.hosts", vec!["portcullis-admin.internal"])
        .set("admin.allow_origins", vec!["https://ops.example.com"])
        .text();
    let proxy = Proxy::start_with(&text).await;
    let mut session = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("session");
    let admin = proxy.admin;

    // DNS rebinding: a page on rebind.attacker.example that now resolves to the proxy.
    for host in ["rebind.attacker.example", "rebind.attacker.example:9090", "10.1.2.3"] {
        let (status, body) = admin_raw(admin, &format!("GET /sessions HTTP/1.1\r\nHost: {host}\r\n"), "").await;
        assert_eq!(status, 421, "{host}: {body}");
        assert!(!body.contains("a1"), "the session list leaked to {host}");
    }
    for host in [format!("{admin}"), "localhost:9090".into(), "[::1]".into(), "portcullis-admin.internal".into()] {
        let (status, _) = admin_raw(admin, &format!("GET /sessions HTTP/1.1\r\nHost: {host}\r\n"), "").await;
        assert_eq!(status, 200, "{host}");
    }

    // CSRF: a cross-site form or text/plain fetch, or any request from a foreign origin.
    let revoke = r#"{"agent":"a1"}"#;
    let h = format!("POST /sessions/revoke HTTP/1.1\r\nHost: {admin}\r\n");
    for (extra, status) in [
        ("Content-Type: text/plain\r\n", 415),
        ("Content-Type: application/x-www-form-urlencoded\r\n", 415),
        ("", 415),
        ("Content-Type: application/json\r\nOrigin: https://evil.example\r\n", 403),
        ("Content-Type: application/json\r\nOrigin: null\r\n", 403),
        ("Content-Type: application/json\r\nSec-Fetch-Site: cross-site\r\n", 403),
    ] {
        assert_eq!(admin_raw(admin, &format!("{h}{extra}"), revoke).await.0, status, "{extra:?}");
    }
    let (status, _) =
        admin_raw(admin, &format!("GET /recordings HTTP/1.1\r\nHost: {admin}\r\nOrigin: https://evil.example\r\n"), "")
            .await;
    assert_eq!(status, 403, "recordings are not for other origins either");
    session.send(true, 0x1, b"still here").await;
    assert_eq!(session.recv().await.payload, b"still here", "no refused request closed the session");

    // The operator's own tools (and a configured console origin) still work.
    let ok = format!("{h}Content-Type: application/json; charset=utf-8\r\nOrigin: https://ops.example.com\r\n");
    let (status, body) = admin_raw(admin, &ok, revoke).await;
    assert_eq!((status, body.trim()), (200, r#"{"closed":1}"#));
    assert_eq!(session.recv_close().await.close_code(), Some(1008));
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert!(metric(&metrics, "portcullis_admin_refusals_total{reason=\"host\"}") >= 3.0, "{metrics}");
    assert!(metric(&metrics, "portcullis_admin_refusals_total{reason=\"content_type\"}") >= 3.0);
}

#[tokio::test]
async fn the_admin_listener_has_a_header_timeout_and_a_connection_cap() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::echo().await;
    let text = TestConfig::base(&[backend.addr.to_string()])
        .set("server.header_read_timeout", "300ms")
        .set("admin.max_connections", 2)
        .text();
    let proxy = Proxy::start_with(&text).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(proxy.admin).await.expect("admin");
        s.write_all(b"GET /sessions HTTP/1.1\r\nHost: loc").await.expect("half a head");
        held.push(s);
    }
    // The third is over the cap: closed without an answer, while the two are held.
    let mut third = tokio::net::TcpStream::connect(proxy.admin).await.expect("admin");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(SOON, third.read(&mut buf)).await.expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)), "the third connection was served: {n:?}");
    // The half-sent heads are cut after the header timeout; then the listener serves again.
    for mut s in held {
        let mut out = Vec::new();
        let r = tokio::time::timeout(SOON, s.read_to_end(&mut out)).await;
        assert!(r.is_ok(), "a half-sent head was held open past the header timeout");
    }
    // `/live` once the listener has a free slot again (the cut connections' slots free as their
    // tasks end).
    let (status, _) = eventually("the admin listener serves /live again", async || {
        let (status, body) = http_get_lenient(proxy.admin, "/live").await;
        (status == 200).then_some((status, body))
    })
    .await;
    assert_eq!(status, 200);
    let (_, metrics) = http_get(proxy.admin, "/metrics").await;
    assert!(metric(&metrics, "portcullis_admin_refusals_total{reason=\"connections\"}") >= 1.0, "{metrics}");
}

/// Found by an attacker review: one address could take every admin slot with silent
/// connections (each held for `header_read_timeout`, reopened as soon as it was closed), and
/// the probes (`/live`, `/ready`) and the scraper were refused: liveness restarts, removal from
/// the Service. One address holds at most `max_connections_per_ip` of them now.
#[tokio::test]
async fn one_address_cannot_take_every_admin_slot() {
    use tokio::io::AsyncReadExt;
    let backend = Backend::echo().await;
    let text = TestConfig::base(&[backend.addr.to_string()])
        .set("server.header_read_timeout", "30s")
        .set("admin.max_connections", 4)
        .set("admin.max_connections_per_ip", 2)
        .text();
    let proxy = Proxy::start_with(&text).await;
    // The attacker, from 127.0.0.2: silent connections, as many as it can get.
    let mut held = Vec::new();
    for _ in 0..4 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind("127.0.0.2:0".parse().expect("addr")).expect("bind 127.0.0.2");
        held.push(socket.connect(proxy.admin).await.expect("admin"));
    }
    // Its third and fourth are closed at accept (counted first, so the reads below do not
    // race the accepts); its first two are held.
    let refused = async || {
        let (_, metrics) = http_get_lenient(proxy.admin, "/metrics").await;
        (metric(&metrics, "portcullis_admin_refusals_total{reason=\"per_ip\"}") >= 2.0).then_some(())
    };
    eventually("the address's connections over its cap are refused", refused).await;
    let mut closed = 0;
    for s in &mut held {
        let mut buf = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 2, "the address's connections over its cap are closed");
    // The probe, from 127.0.0.1, is served meanwhile.
    let (status, _) = http_get_lenient(proxy.admin, "/live").await;
    assert_eq!(status, 200, "the probe is not locked out");
}

/// The same cap over IPv6, where an address is counted by its network (`ipv6_prefix_len`):
/// from `::1`, the admin listener's third and fourth silent connections are closed at accept,
/// and once the address holds fewer, it is served again.
#[tokio::test]
async fn one_ipv6_address_cannot_take_every_admin_slot() {
    use tokio::io::AsyncReadExt;
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: this host has no IPv6 loopback");
        return;
    }
    let backend = Backend::echo().await;
    let text = TestConfig::base(&[backend.addr.to_string()])
        .set("admin.address", "[::1]:0")
        .set("server.header_read_timeout", "30s")
        .set("admin.max_connections", 4)
        .set("admin.max_connections_per_ip", 2)
        .text();
    let proxy = Proxy::start_with(&text).await;
    assert!(proxy.admin.is_ipv6(), "{}", proxy.admin);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(tokio::net::TcpStream::connect(proxy.admin).await.expect("admin over IPv6"));
    }
    let mut open = Vec::new();
    for mut s in held {
        let mut buf = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {}
            _ => open.push(s),
        }
    }
    assert_eq!(open.len(), 2, "the address's connections over its cap are closed");
    drop(open);
    let served = async || (http_get_lenient(proxy.admin, "/live").await.0 == 200).then_some(());
    eventually("the address is served once it holds fewer", served).await;
}

/// Like `http_get`, but a connection closed without an answer is status 0, not a panic.
async fn http_get_lenient(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { return (0, String::new()) };
    let _ = s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(SOON, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    (text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0), text)
}

#[test]
fn an_admin_listener_off_loopback_without_a_token_is_refused_by_check_config_and_run() {
    let dir = tempfile::tempdir().expect("dir");
    let open = dir.path().join("open-admin.toml");
    std::fs::write(&open, "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n[admin]\naddress = \"0.0.0.0:0\"\n")
        .expect("write");
    for args in [&["check-config"][..], &["run", "--config"][..]] {
        let out =
            std::process::Command::new(env!("CARGO_BIN_EXE_portcullis")).args(args).arg(&open).output().expect("run");
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let msg = String::from_utf8_lossy(&out.stderr);
        assert!(msg.contains("admin.address") && msg.contains("token"), "{args:?}: {msg}");
    }
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "a-long-admin-token\n").expect("write");
    let guarded = dir.path().join("guarded-admin.toml");
    std::fs::write(
        &guarded,
        format!(
            "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n[admin]\naddress = \"0.0.0.0:0\"\ntoken_file = {token:?}\n"
        ),
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("check-config")
        .arg(&guarded)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_member_host_made_only_of_an_agent_capture_is_refused_by_check_config() {
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("any-host.toml");
    std::fs::write(
        &config,
        "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n[admin]\n\
         [[routes]]\nname = \"t\"\npath = \"/agents/{agent}/terminal\"\nbackends = [\"{agent}:7681\"]\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("check-config")
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("routes[0].backends") && msg.contains("literal part"), "{msg}");
}

#[tokio::test]
async fn an_agent_id_is_one_agent_in_any_case_for_grants_sessions_and_revocation() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = Proxy::start_with(&config(&key, backend.addr, None, json!({})).text()).await;
    // A grant written "Box1" opens the agent however the path spells it.
    let token = format!("Bearer {}", key.token("alice", &["Box1"], std::time::Duration::from_secs(600)));
    let mut streams = Vec::new();
    for spelling in ["BOX1", "box1"] {
        let mut c = H1::connect(proxy.tls, true).await;
        let resp = c
            .send(request(
                "GET",
                &format!("/agents/{spelling}/api/sse?n=0&hold=1"),
                &[("authorization", &token)],
                full(""),
            ))
            .await;
        assert_eq!(resp.status(), 200, "{spelling}");
        streams.push((c, resp));
    }
    let (_, list) = admin_request(proxy.admin, "GET", "/sessions", "").await;
    assert_eq!(list.matches("\"agent\":\"box1\"").count(), 2, "one agent id in the registry: {list}");
    // Revoking the agent in another case still finds both.
    let (status, body) = admin_post(proxy.admin, "/sessions/revoke", r#"{"agent":"Box1"}"#).await;
    assert_eq!((status, body.trim()), (200, r#"{"closed":2}"#));
}

/// Found by an attacker review (2026-12-06): grants compare agent ids in any case, but the
/// client's spelling went on to the backend, so a backend keying agents by case saw an id no
/// grant named. The backend now sees the agent as grants, routing and revocation read it
/// (lowercase), on a plain request and a WebSocket handshake alike; the rest of the path as sent.
#[tokio::test]
async fn the_backend_sees_the_agent_id_in_its_one_case() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = Proxy::start_with(&config(&key, backend.addr, None, json!({})).text()).await;
    let token = format!("Bearer {}", key.token("alice", &["Box1"], std::time::Duration::from_secs(600)));
    let mut c = H1::connect(proxy.tls, true).await;
    assert_eq!(c.get("/agents/BOX1/api/Tasks/7?Q=X", &[("authorization", &token)]).await.status, 200);
    drop(upgrade(proxy.tls, true, "/agents/BoX1/api/Ws", &[("authorization", &token)]).await.expect("101"));
    let seen: Vec<String> = backend.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(seen, ["/agents/box1/api/Tasks/7?Q=X", "/agents/box1/api/Ws"]);
}

/// Found by an attacker review (2026-12-06): a scope grant compared in any case as a whole, so
/// a grant for tenant `acme` opened `/t/ACME/...`, and the backend got `ACME`, another tenant
/// to it. Only the agent is compared in any case; the rest of a scope, other captures
/// included, is what the token says (RFC 6749 §3.3).
#[tokio::test]
async fn only_the_agent_of_a_scope_grant_is_compared_in_any_case() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let route = json!({
        "name": "tenant",
        "path": "/t/{tenant}/agents/{agent}/api/{*rest}",
        "kind": "http",
        "backends": [backend.addr.to_string()],
        "auth": {"sources": ["bearer"], "agent_scope": "api:{tenant}:{agent}"},
    });
    let text =
        TestConfig::base(&["127.0.0.1:1".to_owned()]).merge("", key.auth_keys()).merge("", json!({"routes": [route]}));
    let proxy = Proxy::start_with(&text.text()).await;
    let auth = format!("Bearer {}", key.token_with(json!({"sub": "alice", "scope": "api:acme:a1"})));
    let status = |path: &'static str| {
        let (tls, auth) = (proxy.tls, auth.clone());
        async move { H1::connect(tls, true).await.get(path, &[("authorization", &auth)]).await.status }
    };
    assert_eq!(status("/t/acme/agents/a1/api/x").await, 200);
    assert_eq!(status("/t/acme/agents/A1/api/x").await, 200, "the agent in any case");
    assert_eq!(status("/t/ACME/agents/a1/api/x").await, 403, "another spelling of the tenant");
    let seen: Vec<String> = backend.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(seen, ["/t/acme/agents/a1/api/x", "/t/acme/agents/a1/api/x"]);
}

#[test]
fn check_config_refuses_jwks_over_http_unless_allowed_and_warns_of_routes_without_an_audience() {
    let dir = tempfile::tempdir().expect("dir");
    let write = |name: &str, extra: &str| {
        let path = dir.path().join(name);
        let text = format!(
            "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n[admin]\n\
             [[auth.jwks]]\nurl = \"http://127.0.0.1:1/jwks.json\"\nalgorithms = [\"ES256\"]\n{extra}\n\
             [[routes]]\nname = \"t\"\npath = \"/agents/{{agent}}/terminal\"\nbackends = [\"{{agent}}.agents.internal:7681\"]\n\
             [routes.auth]\nagent_claim = \"agents\"\n"
        );
        std::fs::write(&path, text).expect("write");
        path
    };
    let check = check_config;
    let out = check(&write("http-jwks.toml", ""));
    assert_eq!(out.status.code(), Some(64));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("auth.jwks[0].url") && msg.contains("https://"), "{msg}");
    let out = check(&write("allowed.toml", "danger_allow_http = true"));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{msg}");
    assert!(msg.contains("warning: routes[0] (t)") && msg.contains("audiences"), "{msg}");
}

#[tokio::test]
async fn a_revoked_token_id_is_refused_for_its_issuer_only() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = Proxy::start_with(&config(&key, backend.addr, None, json!({})).text()).await;
    let token = |iss: &str| {
        let t = key.token_with(serde_json::json!({ "sub": "alice", "agents": ["a1"], "iss": iss, "jti": "j1" }));
        format!("Bearer {t}")
    };
    let (a, b) = (token("https://idp-a.example"), token("https://idp-b.example"));
    // A session of issuer A's token j1, cut by an agent revocation: j1 of A is refused after.
    let mut c = H1::connect(proxy.tls, true).await;
    let held = c.send(request("GET", "/agents/a1/api/sse?n=0&hold=1", &[("authorization", &a)], full(""))).await;
    assert_eq!(held.status(), 200);
    let (status, body) = admin_post(proxy.admin, "/sessions/revoke", r#"{"agent":"a1"}"#).await;
    assert_eq!((status, body.trim()), (200, r#"{"closed":1}"#));
    let mut c = H1::connect(proxy.tls, true).await;
    assert_eq!(c.get("/agents/a1/api/headers", &[("authorization", &a)]).await.status, 401);
    // Issuer B's j1 is another token.
    let mut c = H1::connect(proxy.tls, true).await;
    assert_eq!(c.get("/agents/a1/api/headers", &[("authorization", &b)]).await.status, 200);
    // A revocation by jti narrowed to issuer B refuses B's only.
    let (status, _) =
        admin_post(proxy.admin, "/sessions/revoke", r#"{"jti":"j1","issuer":"https://idp-b.example"}"#).await;
    assert_eq!(status, 200);
    let mut c = H1::connect(proxy.tls, true).await;
    assert_eq!(c.get("/agents/a1/api/headers", &[("authorization", &b)]).await.status, 401);
}

/// Reads `body` until it ends: `Ok(bytes)` for a clean end, `Err` when it was cut.
async fn read_body(mut body: hyper::body::Incoming) -> Result<Vec<u8>, String> {
    use http_body_util::BodyExt;
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(SOON, body.frame()).await.expect("the body ends in time") {
            None => return Ok(got),
            Some(Ok(f)) => got.extend_from_slice(f.data_ref().map_or(&b""[..], |d| &d[..])),
            Some(Err(e)) => return Err(format!("{e} after {} bytes", got.len())),
        }
    }
}

#[tokio::test]
async fn every_response_in_flight_is_a_session_ended_by_revocation_expiry_and_drain() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let mut proxy =
        Proxy::start_with(&config(&key, backend.addr, None, json!({})).set("auth.leeway", "0s").text()).await;
    let auth = alice(&key);
    let open = |path: &'static str, auth: String| {
        let tls = proxy.tls;
        async move {
            let mut c = H1::connect(tls, true).await;
            let resp = c.send(request("GET", path, &[("authorization", &auth)], full(""))).await;
            assert_eq!(resp.status(), 200, "{path}");
            (c, resp.into_body())
        }
    };

    // Revocation: a download in flight (no content type) is cut, an NDJSON stream ends cleanly.
    let (_c1, download) = open("/agents/a1/api/stall", auth.clone()).await;
    let (_c2, ndjson) = open("/agents/a1/api/ndjson", auth.clone()).await;
    let (_, list) = admin_request(proxy.admin, "GET", "/sessions", "").await;
    assert_eq!(list.matches("\"kind\":\"stream\"").count(), 2, "{list}");
    let (status, body) = admin_post(proxy.admin, "/sessions/revoke", r#"{"agent":"a1"}"#).await;
    assert_eq!((status, body.trim()), (200, r#"{"closed":2}"#));
    let cut = read_body(download).await;
    assert!(cut.is_err(), "a revoked download looked complete: {cut:?}");
    assert_eq!(read_body(ndjson).await.as_deref(), Ok(&b"first chunk"[..]), "NDJSON ends with its last line");

    // Token expiry: a token valid for 2 s cuts its download then.
    let short = format!("Bearer {}", key.token("bob", &["a1"], std::time::Duration::from_secs(2)));
    let (_c3, download) = open("/agents/a1/api/stall", short).await;
    assert!(read_body(download).await.is_err(), "a download outlived its token");

    // Drain: a download in flight is cut, not left to run.
    let (_c4, download) = open("/agents/a1/api/stall", auth.clone()).await;
    proxy.drain();
    assert!(read_body(download).await.is_err(), "a download outlived the drain");
}

/// The attack: the subject caps counted WebSockets and SSE streams only, so one subject held
/// any number of NDJSON streams or long-polls open (each a backend connection), bounded only
/// per address. Every open stream now counts: SSE over a cap is answered 429; any other body
/// of unknown length over a cap is delivered for a grace (5 s) and then ended, so a short
/// chunked answer is never refused after its backend acted; a body of known length is a
/// transfer and does not count.
#[tokio::test]
async fn every_open_stream_counts_under_the_subject_caps() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    // A route name of its own: the metrics below are the process's, shared by parallel tests.
    let text = config(&key, backend.addr, None, json!({}))
        .set("routes.1.name", "capped")
        .merge("auth", json!({"max_sessions_per_subject": 2}));
    let proxy = Proxy::start_with(&text.text()).await;
    let auth = alice(&key);
    let get = |path: &'static str| {
        let (tls, auth) = (proxy.tls, auth.clone());
        async move {
            let mut c = H1::connect(tls, true).await;
            let resp = c.send(request("GET", path, &[("authorization", &auth)], full(""))).await;
            (c, resp)
        }
    };
    let (_c1, first) = get("/agents/a1/api/ndjson").await;
    assert_eq!(first.status(), 200);
    let (_c2, second) = get("/agents/a1/api/stall").await;
    assert_eq!(second.status(), 200);
    let limits = async || {
        let (_, top) = http_get(proxy.admin, "/limits?top=1").await;
        let top: serde_json::Value = serde_json::from_str(&top).expect("json");
        top["per_subject"][0]["sessions"].as_u64()
    };
    assert_eq!(limits().await, Some(2), "both open streams count");
    // Alice holds two: SSE over the cap is refused up front.
    let (_c3, sse) = get("/agents/a1/api/sse?n=1&hold=1").await;
    assert_eq!(sse.status(), 429, "an SSE stream over the cap");
    assert_eq!(sse.headers().get("retry-after").map(|v| v.as_bytes()), Some(&b"5"[..]));
    // A short chunked answer and one of known length arrive whole at the cap.
    let (_c4, chunked) = get("/agents/a1/api/chunks").await;
    assert_eq!(chunked.status(), 200);
    assert_eq!(read_body(chunked.into_body()).await.as_deref(), Ok(&b"ab"[..]));
    let (_c5, sized) = get("/agents/a1/api/headers").await;
    assert_eq!(sized.status(), 200);
    // A third open stream is delivered, and ended after the grace: NDJSON cleanly, a download
    // cut so that it never looks complete. Neither took a place.
    let started = std::time::Instant::now();
    let (_c6, third) = get("/agents/a1/api/ndjson").await;
    assert_eq!(third.status(), 200);
    let (_c7, fourth) = get("/agents/a1/api/stall").await;
    assert_eq!(limits().await, Some(2), "over the cap, nothing more is counted");
    assert_eq!(read_body(third.into_body()).await.as_deref(), Ok(&b"first chunk"[..]));
    assert!(started.elapsed() >= std::time::Duration::from_secs(4), "ended before the grace");
    assert!(read_body(fourth.into_body()).await.is_err(), "a download over the cap looked complete");
    // The two within the cap go on; one that ends gives its place back.
    drop((_c1, first));
    eventually("the closed stream's place is free", async || (limits().await == Some(1)).then_some(())).await;
    let (_c8, again) = get("/agents/a1/api/sse?n=1&hold=1").await;
    assert_eq!(again.status(), 200);
    // The refused SSE stream counts as its 429 only, not as the member's 200 as well.
    let (_, m) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&m, r#"portcullis_http_requests_total{route="capped",kind="sse",class="2xx"}"#), 1.0, "{m}");
}

/// A request body the test sends piece by piece: the sender, and the body (chunked: its length
/// is not known), which starts with `first`.
async fn trickled(first: &'static [u8]) -> (tokio::sync::mpsc::Sender<Bytes>, TBody) {
    use http_body_util::BodyExt;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tx.send(Bytes::from_static(first)).await.expect("first piece");
    let pieces = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(hyper::body::Frame::data(b)), rx))
    });
    (tx, http_body_util::StreamBody::new(pieces).boxed())
}

/// The attack: a request body in flight was not a session. A client trickled an upload (a piece
/// within every `idle_body_timeout`) past its token's expiry and its revocation, and held any
/// number of such uploads open beside its subject's capped sessions. An exchange with a body
/// still to come is now a session from its head on: revocation, the token's expiry and the
/// drain cut its upload (and the backend's request, which never sees a whole body) and answer
/// 401 or 503; an upload of unknown length holds a place under the subject's caps (over them:
/// 429, before any member sees it); and an exchange whose upload has a length takes its place
/// when its answer is a stream.
#[tokio::test]
async fn an_upload_in_flight_is_a_session_ended_by_revocation_expiry_and_drain_and_counted() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let text = config(&key, backend.addr, None, json!({}))
        .set("routes.1.name", "uploads")
        .set("auth.leeway", "0s")
        .merge("auth", json!({"max_sessions_per_subject": 1}));
    let mut proxy = Proxy::start_with(&text.text()).await;
    let bearer = |sub: &str, ttl: u64| format!("Bearer {}", key.token(sub, &["a1"], Duration::from_secs(ttl)));
    let upload = |auth: String, path: &'static str| {
        let tls = proxy.tls;
        async move {
            let (pieces, body) = trickled(b"first").await;
            let mut c = H1::connect(tls, true).await;
            let answer = tokio::spawn(async move {
                let resp = c.send(request("POST", path, &[("authorization", &auth)], body)).await;
                let status = resp.status().as_u16();
                let www = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap_or("").to_owned());
                (status, www, c)
            });
            (pieces, answer)
        }
    };
    let cut_uploads =
        || backend.seen().iter().filter(|s| s.headers.get("x-upload-end").is_some_and(|e| e == "cut")).count();
    let places = async |sub: &str| {
        let (_, list) = http_get(proxy.admin, "/sessions").await;
        let list: serde_json::Value = serde_json::from_str(&list).expect("json");
        let live = list["sessions"].as_array().cloned().unwrap_or_default();
        live.iter().filter(|s| s["subject"] == sub && s["kind"] == "stream").count()
    };

    // Alice's upload is a session, and holds her one place: a second upload and an SSE stream
    // are refused, and no member sees the refused upload.
    let alice = bearer("alice", 600);
    let (pieces, answer) = upload(alice.clone(), "/agents/a1/api/upload").await;
    eventually("the upload is a session", async || (places("alice").await == 1).then_some(())).await;
    let (_more, second) = upload(alice.clone(), "/agents/a1/api/upload").await;
    assert_eq!(second.await.expect("answer").0, 429, "a second upload over the cap");
    let mut c = H1::connect(proxy.tls, true).await;
    let sse = c.send(request("GET", "/agents/a1/api/sse?n=1&hold=1", &[("authorization", &alice)], full(""))).await;
    assert_eq!(sse.status(), 429, "an SSE stream beside a capped upload");
    // Revocation cuts the upload in flight: 401, and the backend's request is cut. Another
    // subject's upload in flight beside it goes on to its end.
    let (zed_pieces, zed_answer) = upload(bearer("zed", 600), "/agents/a1/api/upload").await;
    eventually("zed's upload is a session", async || (places("zed").await == 1).then_some(())).await;
    pieces.send(Bytes::from_static(b"-second")).await.expect("piece");
    let (status, body) = admin_post(proxy.admin, "/sessions/revoke", r#"{"subject":"alice"}"#).await;
    assert_eq!((status, body.trim()), (200, r#"{"closed":1}"#));
    let (status, www, _c) = answer.await.expect("answer");
    assert_eq!(status, 401, "a revoked upload");
    assert!(www.is_some_and(|w| w.contains("invalid_token")));
    eventually("the backend's request is cut", async || (cut_uploads() == 1).then_some(())).await;
    assert_eq!(places("alice").await, 0);
    zed_pieces.send(Bytes::from_static(b"-and-the-rest")).await.expect("zed's piece");
    drop(zed_pieces);
    assert_eq!(zed_answer.await.expect("answer").0, 200, "another subject's upload is not cut");
    let whole = backend.seen().iter().any(|s| s.headers.get("x-upload-end").is_some_and(|e| e == "complete"));
    assert!(whole, "zed's upload reached the member whole");

    // The token's expiry cuts an upload that outlives it.
    let started = std::time::Instant::now();
    let (_pieces, answer) = upload(bearer("bob", 2), "/agents/a1/api/upload").await;
    let (status, _, _c) = answer.await.expect("answer");
    assert_eq!(status, 401, "an upload past its token's expiry");
    let lasted = started.elapsed();
    assert!(lasted >= Duration::from_millis(900) && lasted < Duration::from_secs(8), "ended after {lasted:?}");
    eventually("the backend's request is cut", async || (cut_uploads() == 2).then_some(())).await;

    // An upload of known length (a POST answered with an event stream) takes its place when
    // its answer is a stream: Carol's SSE over the cap is refused while it runs.
    let carol = bearer("carol", 600);
    let mut c = H1::connect(proxy.tls, true).await;
    let posted = request("POST", "/agents/a1/api/sse?n=1&hold=1", &[("authorization", &carol)], full("{}"));
    let stream = c.send(posted).await;
    assert_eq!(stream.status(), 200);
    let mut other = H1::connect(proxy.tls, true).await;
    let sse = other.send(request("GET", "/agents/a1/api/sse?n=1&hold=1", &[("authorization", &carol)], full(""))).await;
    assert_eq!(sse.status(), 429, "an SSE stream beside a POST answered with one");

    // The drain cuts an upload in flight: 503. A request whose body has all arrived is one
    // waiting for its answer, which its member may be acting on: the drain lets it finish.
    let (_pieces, answer) = upload(bearer("dave", 600), "/agents/a1/api/upload").await;
    eventually("the upload is a session", async || (places("dave").await == 1).then_some(())).await;
    let mut c = H1::connect(proxy.tls, true).await;
    let erin = bearer("erin", 600);
    let waiting = tokio::spawn(async move {
        c.call(request("POST", "/agents/a1/api/slow?ms=1500", &[("authorization", &erin)], full("{}"))).await
    });
    let asked = async || backend.seen().iter().any(|s| s.uri.contains("slow")).then_some(());
    eventually("the member has the whole request", asked).await;
    proxy.drain();
    assert_eq!(answer.await.expect("answer").0, 503, "an upload in flight at the drain");
    let answered = waiting.await.expect("answer");
    assert_eq!((answered.status, answered.text()), (200, "slow".to_owned()), "a request waiting for its answer");
    drop(stream);
}

/// An upload that outlives its route's `max_lifetime` is cut then and answered 408, its
/// member's request with it.
#[tokio::test]
async fn an_upload_ends_at_its_routes_lifetime() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let text = config(&key, backend.addr, None, json!({"session": {"max_lifetime": "1s"}}));
    let proxy = Proxy::start_with(&text.text()).await;
    let (_pieces, body) = trickled(b"first").await;
    let mut c = H1::connect(proxy.tls, true).await;
    let started = std::time::Instant::now();
    let answer = c.send(request("POST", "/agents/a1/api/upload", &[("authorization", &alice(&key))], body)).await;
    assert_eq!(answer.status(), 408, "an upload past the route's lifetime");
    assert!(started.elapsed() >= Duration::from_millis(900), "ended after {:?}", started.elapsed());
    let upload = async || backend.seen().into_iter().find(|s| s.uri.contains("upload"));
    let seen = eventually("the member's request ends", upload).await;
    assert_eq!(seen.headers.get("x-upload-end").map(String::as_str), Some("cut"), "{seen:?}");
}

/// The attack (a review of the upload sessions): an upload of given length was never counted,
/// but the client sets both the length and the pace: a `content-length` of up to
/// `max_request_body`, trickled within `idle_body_timeout`, held an upload open beside the
/// subject's capped sessions. Such an upload is counted once it has been in flight for the
/// grace (5 s, as a stream over the caps gets): over the caps it is ended with 429, and its
/// member's request is cut.
#[tokio::test]
async fn an_upload_of_given_length_still_in_flight_after_the_grace_counts_under_the_caps() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let text = config(&key, backend.addr, None, json!({})).merge("auth", json!({"max_sessions_per_subject": 1}));
    let proxy = Proxy::start_with(&text.text()).await;
    let auth = alice(&key);
    let mut c = H1::connect(proxy.tls, true).await;
    let sse = c.send(request("GET", "/agents/a1/api/sse?n=1&hold=1", &[("authorization", &auth)], full(""))).await;
    assert_eq!(sse.status(), 200, "alice's one place");
    let (pieces, body) = trickled(b"first").await;
    let mut up = H1::connect(proxy.tls, true).await;
    let started = std::time::Instant::now();
    let given = [("authorization", auth.as_str()), ("content-length", "100")];
    let answer = up.send(request("POST", "/agents/a1/api/upload", &given, body)).await;
    assert_eq!(answer.status(), 429, "an upload of given length still in flight after the grace, over the cap");
    assert!(started.elapsed() >= Duration::from_secs(4), "ended before the grace: {:?}", started.elapsed());
    let upload = async || backend.seen().into_iter().find(|s| s.uri.contains("upload"));
    let seen = eventually("the member's request ends", upload).await;
    assert_eq!(seen.headers.get("x-upload-end").map(String::as_str), Some("cut"), "{seen:?}");
    drop((pieces, sse));
}

/// The attack (a review of the upload sessions): once its answer's head was sent, an upload's
/// session was checked only when hyper read the answer's body, which it does not while it
/// cannot write to the client. A client that gave the proxy no HTTP/2 window (or read nothing
/// on HTTP/1.1) went on uploading to the member past its revocation, its expiry, the lifetime
/// and the drain. The upload now reads the session's stop and deadlines at each frame.
#[tokio::test]
async fn an_upload_is_cut_at_revocation_while_its_answer_cannot_be_written() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let mut proxy = ProxyProcess::start(&config(&key, backend.addr, None, json!({})).text()).await;
    let mut h2 = H2::connect_with_window(proxy.tls, 0).await;
    let req = ::http::Request::post("https://localhost/agents/a1/api/early?kib=4096")
        .header("authorization", alice(&key))
        .body(())
        .expect("request");
    let (resp, mut up) = h2.open(req, false).await;
    assert_eq!(resp.status(), 200, "the member answers at once");
    up.send_data(Bytes::from_static(b"first"), false).expect("first piece");
    let listed = async || {
        let (_, list) = http_get(proxy.admin, "/sessions").await;
        list.contains("\"kind\":\"stream\"").then_some(())
    };
    eventually("the upload is a session", listed).await;
    let (status, body) = admin_post(proxy.admin, "/sessions/revoke", r#"{"subject":"alice"}"#).await;
    assert_eq!((status, body.trim()), (200, r#"{"closed":1}"#));
    // What the client sends after its revocation does not reach the member.
    let _ = up.send_data(Bytes::from_static(b"-after"), false);
    let _ = up.send_data(Bytes::from_static(b"-the-end"), true);
    let early = async || backend.seen().into_iter().find(|s| s.uri.contains("early"));
    let seen = eventually("the member's request ends", early).await;
    assert_eq!(seen.headers.get("x-upload-end").map(String::as_str), Some("cut"), "{seen:?}");
    assert!(seen.body_len <= b"first".len(), "bytes sent after the revocation reached the member: {seen:?}");
    // Its session's line names the revocation, though nobody polled its answer after it.
    h2.conn.abort();
    let gone = async || (!http_get(proxy.admin, "/sessions").await.1.contains("alice")).then_some(());
    eventually("the session ends with its connection", gone).await;
    let logs = proxy.stop_and_collect_logs().await;
    let line = logs.lines().find(|l| l.contains("session ended") && l.contains("subject=\"alice\""));
    assert!(line.is_some_and(|l| l.contains("reason=\"revoked\"")), "{line:?}");
}

/// Found by an attacker review (2026-12-06): an answer whose HTTP/2 stream the client gives no
/// window was never polled again by hyper, so its body never saw its session's end. A revoked
/// subject's stream stayed in `/sessions`, with its places and its member's request, for as
/// long as the client kept it. Its stream is now reset `close_timeout` after the session
/// ended; another subject's stream in the same state on the same connection is left alone,
/// and so is the connection.
#[tokio::test]
async fn an_answer_given_no_window_ends_with_its_session() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let text = config(&key, backend.addr, None, json!({"session": {"close_timeout": "1s"}}));
    let mut proxy = ProxyProcess::start(&text.text()).await;
    let bearer = |sub: &str| format!("Bearer {}", key.token(sub, &["a1"], Duration::from_secs(600)));
    let stall = |sub: &str| {
        let req = ::http::Request::get("https://localhost/agents/a1/api/stall").header("authorization", bearer(sub));
        req.body(()).expect("request")
    };
    let sessions = async |sub: &str| sessions_of(proxy.admin, sub).await;
    let dropped = |sub: &str| backend.dropped_for(sub);
    // Two subjects' answers on one connection that gives its streams no window.
    let mut a = H2::connect_with_window(proxy.tls, 0).await;
    let (answer, _) = a.open(stall("alice"), true).await;
    assert_eq!(answer.status(), 200);
    let (zed_answer, _) = a.open(stall("zed"), true).await;
    assert_eq!(zed_answer.status(), 200);
    let both = async || (sessions("alice").await == 1 && sessions("zed").await == 1).then_some(());
    eventually("both answers are sessions", both).await;
    let revoked = std::time::Instant::now();
    let (status, body) = admin_post(proxy.admin, "/sessions/revoke", r#"{"subject":"alice"}"#).await;
    assert_eq!((status, body.trim()), (200, r#"{"closed":1}"#));
    eventually("the revoked answer's session ends", async || (sessions("alice").await == 0).then_some(())).await;
    assert!(revoked.elapsed() >= Duration::from_millis(900), "given its close_timeout first: {:?}", revoked.elapsed());
    eventually("its member's request is cut", async || dropped("alice").then_some(())).await;
    // Its stream is reset: the client sees it end, never complete.
    let mut body = answer.into_body();
    let end = tokio::time::timeout(SOON, body.data()).await.expect("the stream ends in time");
    assert!(matches!(end, Some(Err(_))), "the stream is reset: {end:?}");
    // The other subject's answer, no more read than alice's and older than her close_timeout by
    // now, is still a session with its member's request.
    assert_eq!(sessions("zed").await, 1);
    assert!(!dropped("zed"), "{:?}", backend.seen());
    // The connection serves on.
    let headers =
        ::http::Request::get("https://localhost/agents/a1/api/headers").header("authorization", bearer("zed"));
    let (more, _) = a.open(headers.body(()).expect("request"), true).await;
    assert_eq!(more.status(), 200);
    drop((zed_answer, more, a));
    let logs = proxy.stop_and_collect_logs().await;
    let line = logs.lines().find(|l| l.contains("session ended") && l.contains("subject=\"alice\""));
    assert!(line.is_some_and(|l| l.contains("reason=\"revoked\"")), "{line:?}");
}

/// Found by an attacker review (2026-12-06): a request without a body was no session until its
/// answer's head came. Revoked while its member took its time (`{"closed":0}`), it was then
/// registered as a new session that nothing stopped, and its stream went on for as long as
/// the member sent. Every plain request is now a session from its head: the revocation
/// finds it, and its answer is refused (401 `invalid_token`, nothing of the member's reaches
/// the revoked subject, whether it has a body or not), the member's request cut.
#[tokio::test]
async fn a_request_waiting_for_its_answer_is_ended_by_a_revocation() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = Proxy::start_with(&config(&key, backend.addr, None, json!({})).text()).await;
    let asked = async || backend.seen().iter().any(|s| s.uri.contains("late") && s.method == "GET").then_some(());
    let dropped = async || backend.seen().iter().any(|s| s.method == "DROPPED").then_some(());
    let mut c = H1::connect(proxy.plain, false).await;
    let late = request("GET", "/agents/a1/api/late?ms=1500", &[("authorization", &alice(&key))], full(Bytes::new()));
    let answer = tokio::spawn(async move {
        let resp = c.send(late).await;
        let challenge = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap_or("").to_owned());
        // The connection serves on.
        let next = c.get("/agents/a1/api/headers", &[]).await.status;
        (resp.status().as_u16(), challenge, next)
    });
    eventually("the member has the request", asked).await;
    let (status, body) = admin_post(proxy.admin, "/sessions/revoke", r#"{"subject":"alice"}"#).await;
    assert_eq!((status, body.trim()), (200, r#"{"closed":1}"#), "the waiting request is a session");
    let (status, challenge, next) = answer.await.expect("answer");
    assert_eq!(status, 401, "nothing of the member's answer reaches a revoked subject");
    assert!(challenge.is_some_and(|c| c.contains("invalid_token")));
    assert_eq!(next, 401, "the next request on the connection is answered (no token)");
    eventually("the member's request is cut", dropped).await;
    let gone = async || (!http_get(proxy.admin, "/sessions").await.1.contains("alice")).then_some(());
    eventually("no session of alice's is left", gone).await;
}

/// Found by an attacker review of the above: once every request was a session from its head,
/// its token's expiry while its member worked cut the answer (an empty reply where the member
/// had acted). Only a revocation refuses it: after any other end the answer is given the
/// route's close_timeout to be delivered (an MCP tool call's result too), then an event stream
/// ends cleanly.
#[tokio::test]
async fn an_answer_whose_token_expired_while_its_member_worked_is_delivered() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let text = config(&key, backend.addr, None, json!({"session": {"close_timeout": "1s"}})).set("auth.leeway", "0s");
    let proxy = Proxy::start_with(&text.text()).await;
    let short = format!("Bearer {}", key.token("alice", &["a1"], Duration::from_secs(1)));
    let mut c = H1::connect(proxy.plain, false).await;
    let slow = c.get("/agents/a1/api/slow?ms=2500", &[("authorization", &short)]).await;
    assert_eq!((slow.status, slow.text()), (200, "slow".to_owned()), "delivered whole");
    let short = format!("Bearer {}", key.token("alice", &["a1"], Duration::from_secs(1)));
    let late = request("GET", "/agents/a1/api/late?ms=2500", &[("authorization", &short)], full(Bytes::new()));
    let resp = c.send(late).await;
    assert_eq!(resp.status().as_u16(), 200);
    let (got, body) = events(resp, 1).await;
    assert_eq!(got[0].1, "data: first", "its event is delivered");
    assert!(ends_cleanly(body).await, "then the expired event stream ends, cleanly");
}

/// Found by an attacker review of the above: the answer delivered after its token expired in
/// the wait no longer heard a revocation (its stop was the close_timeout alone), and a revoked
/// subject took in its member's body for as long as that. A revocation ends it at once.
#[tokio::test]
async fn a_revocation_cuts_an_answer_delivered_after_its_token_expired() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let text = config(&key, backend.addr, None, json!({"session": {"close_timeout": "20s"}})).set("auth.leeway", "0s");
    let proxy = Proxy::start_with(&text.text()).await;
    let short = format!("Bearer {}", key.token("alice", &["a1"], Duration::from_secs(1)));
    let mut c = H1::connect(proxy.plain, false).await;
    let big = request("GET", "/agents/a1/api/big?kib=2048&ms=1500", &[("authorization", &short)], full(Bytes::new()));
    let resp = c.send(big).await;
    assert_eq!(resp.status().as_u16(), 200, "delivered after its token's expiry");
    let (status, _) = admin_post(proxy.admin, "/sessions/revoke", r#"{"subject":"alice"}"#).await;
    assert_eq!(status, 200);
    let revoked = std::time::Instant::now();
    assert!(!ends_cleanly(resp.into_body()).await, "cut, not whole");
    assert!(
        revoked.elapsed() < Duration::from_secs(10),
        "at the revocation, not its close_timeout: {:?}",
        revoked.elapsed()
    );
}

/// A rebalance moves sessions that reconnect: a WebSocket gets 1001 `rebalance`, an event
/// stream ends cleanly, but a plain exchange in flight (a download, which every request now
/// is from its head) is not picked: cutting it would move nothing.
#[tokio::test]
async fn a_rebalance_picks_websockets_and_event_streams_not_transfers() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let text = config(&key, backend.addr, None, json!({})).set("routes.1.name", "moved");
    let proxy = Proxy::start_with(&text.text()).await;
    let auth = alice(&key);
    let mut ws = upgrade(proxy.plain, false, "/agents/a1/api/ws", &[("authorization", &auth)]).await.expect("101");
    let mut c = H1::connect(proxy.plain, false).await;
    let sse = c.send(request("GET", "/agents/a1/api/sse?n=1&hold=1", &[("authorization", &auth)], full(""))).await;
    let mut d = H1::connect(proxy.plain, false).await;
    let download = d.send(request("GET", "/agents/a1/api/stall", &[("authorization", &auth)], full(""))).await;
    assert_eq!((sse.status().as_u16(), download.status().as_u16()), (200, 200));
    let kinds = async || {
        let (_, list) = http_get(proxy.admin, "/sessions").await;
        let all = ["\"kind\":\"websocket\"", "\"kind\":\"sse\"", "\"kind\":\"stream\""];
        all.iter().all(|k| list.contains(k)).then_some(())
    };
    eventually("the three are sessions", kinds).await;
    let ask = r#"{"route": "moved", "fraction": 1, "spread": "0s"}"#;
    let (status, body) = admin_post(proxy.admin, "/sessions/rebalance", ask).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!((answer["sessions"].as_u64(), answer["picked"].as_u64()), (Some(2), Some(2)), "{answer}");
    let close = ws.recv().await;
    assert_eq!((close.opcode, close.close_code()), (op::CLOSE, Some(1001)));
    assert!(ends_cleanly(sse.into_body()).await, "the event stream ends cleanly");
    // The download goes on: still a session, its member's request whole.
    let (_, list) = http_get(proxy.admin, "/sessions").await;
    assert!(list.contains("\"kind\":\"stream\""), "{list}");
    assert!(!backend.seen().iter().any(|s| s.method == "DROPPED"), "{:?}", backend.seen());
    drop(download);
}

/// The same over HTTP/1.1: an answer whose client reads none of it outlived its session (its
/// route's `max_lifetime` here) until `send_timeout` closed its connection. The connection is
/// now closed `close_timeout` after the session ended.
#[tokio::test]
async fn an_answer_its_client_reads_nothing_of_ends_with_its_session_over_http1() {
    use tokio::io::AsyncWriteExt;
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let session = json!({"session": {"max_lifetime": "1s", "close_timeout": "1s"}});
    // Far beyond the test's bounds: send_timeout is not what closes the connection.
    let text = config(&key, backend.addr, None, session).set("server.send_timeout", "120s");
    let proxy = Proxy::start_with(&text.text()).await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small receive buffer");
    let mut tcp = socket.connect(proxy.plain).await.expect("connect");
    let auth = alice(&key);
    let head =
        format!("GET /agents/a1/api/early?kib=262144 HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.expect("request");
    let sent = std::time::Instant::now();
    let sessions = async || http_get(proxy.admin, "/sessions").await.1.matches("\"kind\":\"stream\"").count();
    eventually("the answer is a session", async || (sessions().await == 1).then_some(())).await;
    // Nothing is read: the session ends at its lifetime, and its connection a second later.
    eventually("the unread answer's session ends", async || (sessions().await == 0).then_some(())).await;
    closed_by_peer(&mut tcp).await;
    assert!(sent.elapsed() >= Duration::from_millis(1900), "lifetime, then close_timeout: {:?}", sent.elapsed());
}

/// Every governed exchange writes one end-of-session line with the reason it ended for: one
/// whose answer was written whole is `complete` (not a client gone, as when hyper stopped at
/// the known length), one the session's stop ended says why (`revoked`, not the refusal's
/// label), and one an HTTP/2 client reset before its answer still writes its line.
#[tokio::test]
async fn every_governed_exchange_writes_one_end_line_with_its_reason() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let mut proxy = ProxyProcess::start(&config(&key, backend.addr, None, json!({})).text()).await;
    let bearer = |sub: &str| format!("Bearer {}", key.token(sub, &["a1"], Duration::from_secs(600)));
    let sessions = async |sub: &str| sessions_of(proxy.admin, sub).await;
    // Complete: a POST echoed whole.
    let mut c = H1::connect(proxy.plain, false).await;
    let echoed =
        c.call(request("POST", "/agents/a1/api/echo", &[("authorization", &bearer("ann"))], full("hello"))).await;
    assert_eq!((echoed.status, echoed.text()), (200, "hello".to_owned()));
    // Reset by an HTTP/2 client before its answer.
    let h2 = H2::connect(proxy.tls).await;
    let req = ::http::Request::post("https://localhost/agents/a1/api/upload")
        .header("authorization", bearer("ben"))
        .body(())
        .expect("request");
    let mut up = h2.send.clone().ready().await.expect("ready");
    let (_answer, mut body) = up.send_request(req, false).expect("request");
    body.send_data(Bytes::from_static(b"part"), false).expect("piece");
    eventually("the upload is a session", async || (sessions("ben").await == 1).then_some(())).await;
    body.send_reset(::h2::Reason::CANCEL);
    eventually("the reset upload's session ends", async || (sessions("ben").await == 0).then_some(())).await;
    // Revoked before its answer.
    let (pieces, trickle) = trickled(b"first").await;
    let mut c2 = H1::connect(proxy.plain, false).await;
    let cal = bearer("cal");
    let answer = tokio::spawn(async move {
        c2.send(request("POST", "/agents/a1/api/upload", &[("authorization", &cal)], trickle)).await.status()
    });
    eventually("the upload is a session", async || (sessions("cal").await == 1).then_some(())).await;
    admin_post(proxy.admin, "/sessions/revoke", r#"{"subject":"cal"}"#).await;
    assert_eq!(answer.await.expect("answer"), 401);
    drop(pieces);
    let logs = proxy.stop_and_collect_logs().await;
    let ends: Vec<&str> = logs.lines().filter(|l| l.contains("session ended")).collect();
    let of = |sub: &str| {
        let lines: Vec<&&str> = ends.iter().filter(|l| l.contains(&format!("subject=\"{sub}\""))).collect();
        assert_eq!(lines.len(), 1, "one end line for {sub}'s exchange: {ends:#?}");
        lines[0].to_string()
    };
    assert!(of("ann").contains("reason=\"complete\""), "{}", of("ann"));
    // Gone before its answer: dropped with its stream, or its body's failure reached the
    // member's request first.
    let ben = of("ben");
    assert!(ben.contains("closed_by=\"client\""), "{ben}");
    assert!(ben.contains("reason=\"client_gone\"") || ben.contains("reason=\"client_body_error\""), "{ben}");
    assert!(of("cal").contains("reason=\"revoked\""), "{}", of("cal"));
}

#[test]
fn a_route_taking_its_token_from_a_cookie_needs_an_origin_policy() {
    let dir = tempfile::tempdir().expect("dir");
    let secret = dir.path().join("hmac");
    std::fs::write(&secret, "a-test-secret").expect("write");
    let keys = format!("[[auth.keys]]\nalgorithms = [\"HS256\"]\nsecret_file = {secret:?}\n");
    let route = "[[routes]]\nname = \"api\"\npath = \"/agents/{agent}/api/{*rest}\"\nkind = \"http\"\n\
                 backends = [\"{agent}.agents.internal:8080\"]\n[routes.auth]\nsources = [\"cookie:portcullis_token\"]\n";
    let write = |name: &str, extra: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n[admin]\n{keys}{route}{extra}"))
            .expect("write");
        path
    };
    let check = check_config;
    let out = check(&write("no-origin.toml", ""));
    assert_eq!(out.status.code(), Some(64));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("routes[0]") && msg.contains("cookie") && msg.contains("[routes.origin]"), "{msg}");
    let out = check(&write("origin.toml", "[routes.origin]\nallow = [\"https://console.example.com\"]\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn cors_preflights_are_answered_by_the_route_policy_and_responses_carry_its_headers() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let console = "https://console.example.com";
    let text = config(&key, backend.addr, None, json!({}))
        .merge(
            "routes.1",
            json!({
                "origin": {"allow": [console]},
                "cors": {
                    "allow_origins": [console],
                    "allow_credentials": true,
                    "expose_headers": ["x-member"],
                    "max_age": "5m",
                },
            }),
        )
        .text();
    let proxy = Proxy::start_with(&text).await;
    let preflight = |origin: &'static str, headers: &'static str| {
        let tls = proxy.tls;
        async move {
            let mut c = H1::connect(tls, true).await;
            let h = [
                ("origin", origin),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", headers),
            ];
            c.call(request("OPTIONS", "/agents/a1/api/echo", &h, full(""))).await
        }
    };
    // Allowed: answered by the proxy, without a token.
    let a = preflight(console, "Authorization, Content-Type").await;
    assert_eq!(a.status, 204, "{:?}", a.headers);
    assert_eq!(a.header("access-control-allow-origin"), Some(console));
    assert_eq!(a.header("access-control-allow-credentials"), Some("true"));
    assert!(a.header("access-control-allow-methods").is_some_and(|m| m.contains("POST")));
    assert_eq!(a.header("access-control-allow-headers"), Some("authorization, content-type"));
    assert_eq!(a.header("access-control-max-age"), Some("300"));
    // Another origin, or a header the policy does not list: refused, with no CORS headers.
    for (origin, headers) in [("https://evil.example", "authorization"), (console, "authorization, x-evil")] {
        let a = preflight(origin, headers).await;
        assert_eq!(a.status, 403, "{origin} {headers}");
        assert!(a.header("access-control-allow-origin").is_none());
    }
    assert!(backend.seen().is_empty(), "a preflight reached the backend");

    // Real requests: the allowed origin reads the answer (and the proxy's own refusals).
    let auth = alice(&key);
    let mut c = H1::connect(proxy.tls, true).await;
    let a = c.get("/agents/a1/api/headers", &[("origin", console), ("authorization", &auth)]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("access-control-allow-origin"), Some(console));
    assert_eq!(a.header("access-control-expose-headers"), Some("x-member"));
    assert!(
        a.headers.get_all("vary").iter().any(|v| v.to_str().is_ok_and(|v| v.contains("Origin"))),
        "{:?}",
        a.headers
    );
    let a = c.get("/agents/a1/api/headers", &[("origin", console)]).await;
    assert_eq!((a.status, a.header("access-control-allow-origin")), (401, Some(console)));
    // Another origin is refused by the origin policy and gets no CORS headers.
    let a = c.get("/agents/a1/api/headers", &[("origin", "https://evil.example"), ("authorization", &auth)]).await;
    assert_eq!((a.status, a.header("access-control-allow-origin")), (403, None));
}

#[tokio::test]
async fn one_agents_page_cannot_open_another_agents_terminal_with_the_users_cookie() {
    // Found by an attacker review in Chromium (2026-12-07): with each agent's pages on an origin
    // of its own (a1.agents.example.com) and the terminal route allowing `*.agents.example.com`,
    // a2's page opened the user's a1 terminal: sibling origins are same-site, so the
    // `SameSite=Strict` cookie rides on their WebSockets, and the wildcard let the Origin pass.
    // `https://{agent}.agents.example.com` allows the origin of the agent the request names.
    let backend = Backend::echo().await;
    let key = hmac();
    let text = TestConfig::base(&[backend.addr.to_string()])
        .merge("", key.auth_keys())
        .merge(
            "routes.0",
            json!({
                "auth": {"sources": ["cookie:portcullis_token"], "agent_claim": "agents"},
                "origin": {"allow": ["https://console.example.com", "https://{agent}.agents.example.com"]},
            }),
        )
        .text();
    let proxy = Proxy::start_with(&text).await;
    let cookie = format!("portcullis_token={}", key.token("carol", &["a1", "a2"], Duration::from_secs(600)));
    let open = async |origin: &str| {
        let headers = [("cookie", cookie.as_str()), ("origin", origin)];
        upgrade(proxy.plain, false, "/agents/a1/terminal", &headers).await.map(|_| 101).unwrap_or_else(|h| h.status)
    };
    assert_eq!(open("https://a2.agents.example.com").await, 403, "a2's page, on a1's terminal");
    assert_eq!(open("https://x.a1.agents.example.com").await, 403, "a page under a1's origin is not a1's origin");
    assert_eq!(open("https://a1.agents.example.com").await, 101, "a1's own page");
    assert_eq!(open("https://console.example.com").await, 101, "the console");
    assert!(
        portcullis::config::Config::parse(&text.replace("/agents/{agent}/terminal", "/terminal"), Path::new("."))
            .is_err(),
        "an {{agent}} origin on a route that names no agent is refused"
    );
}

#[tokio::test]
async fn the_cookie_login_sets_an_http_only_cookie_for_same_origin_requests_only() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let text =
        config(&key, backend.addr, None, json!({"sandbox": true})).merge("auth", json!({"cookie_login": {}})).text();
    let proxy = Proxy::start_with(&text).await;
    let auth = alice(&key);
    let origin = "https://localhost";
    let login = |method: &'static str, headers: Vec<(&'static str, String)>| {
        let tls = proxy.tls;
        async move {
            let mut c = H1::connect(tls, true).await;
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            c.call(request(method, "/.portcullis/login", &h, full(""))).await
        }
    };
    // The page: the proxy's own, under a CSP that admits its one script.
    let page = login("GET", vec![]).await;
    assert_eq!(page.status, 200);
    assert!(page.header("content-security-policy").is_some_and(|p| p.contains("script-src 'sha256-")));
    assert!(!page.text().contains("eyJ"));
    // Same origin, a good token: the cookie, HttpOnly, Secure, SameSite=Strict, until the token expires.
    let ok = login("POST", vec![("origin", origin.into()), ("authorization", auth.clone())]).await;
    assert_eq!(ok.status, 204);
    let cookie = ok.header("set-cookie").expect("set-cookie");
    let token = auth.trim_start_matches("Bearer ");
    assert!(cookie.starts_with(&format!("portcullis_token={token};")), "{cookie}");
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/", "Max-Age="] {
        assert!(cookie.contains(attr), "{attr} missing: {cookie}");
    }
    // Another origin, no origin, a cross-site fetch, a bad token: no cookie.
    for (headers, status) in [
        (vec![("origin", "https://evil.example".to_owned()), ("authorization", auth.clone())], 403),
        (vec![("authorization", auth.clone())], 403),
        (
            vec![("origin", origin.into()), ("sec-fetch-site", "cross-site".into()), ("authorization", auth.clone())],
            403,
        ),
        (vec![("origin", origin.into()), ("authorization", "Bearer not.a.token".into())], 401),
    ] {
        let a = login("POST", headers.clone()).await;
        assert_eq!(a.status, status, "{headers:?}");
        assert!(a.header("set-cookie").is_none(), "{headers:?}");
    }
    // Log out: the cookie is cleared.
    let out = login("DELETE", vec![("origin", origin.into())]).await;
    assert_eq!(out.status, 204);
    assert!(out.header("set-cookie").is_some_and(|c| c.contains("Max-Age=0")));

    // A sandboxed route's responses run in an opaque origin.
    let mut c = H1::connect(proxy.tls, true).await;
    let a = c.get("/agents/a1/api/headers", &[("authorization", &auth)]).await;
    assert_eq!(a.status, 200);
    let csp = a.header("content-security-policy").unwrap_or_default();
    assert!(csp.starts_with("sandbox") && !csp.contains("allow-same-origin"), "{csp}");
    assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
}

#[tokio::test]
async fn an_agent_cannot_set_the_users_credential_cookie_nor_a_cross_site_page_ride_on_it() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let extra = json!({"origin": {"allow": ["https://console.example.com"]}});
    let text = config(&key, backend.addr, None, json!({}))
        .merge("routes.1", extra)
        .set("routes.1.auth.sources", vec!["bearer", "cookie:portcullis_token"])
        .merge("auth", json!({"cookie_login": {}}))
        .text();
    let proxy = Proxy::start_with(&text).await;
    let auth = alice(&key);
    let cookie = format!("portcullis_token={}", auth.trim_start_matches("Bearer "));
    let mut c = H1::connect(proxy.tls, true).await;
    // The agent's Set-Cookie for the credential is dropped; its own cookie passes.
    let a = c.get("/agents/a1/api/cookie", &[("cookie", &cookie)]).await;
    assert_eq!(a.status, 200);
    let set: Vec<&str> = a.headers.get_all("set-cookie").iter().filter_map(|v| v.to_str().ok()).collect();
    assert_eq!(set, ["theme=dark; Path=/"], "the agent set the user's credential cookie");
    // A cross-site no-cors GET (an <img> on another site) carries the cookie and no Origin.
    for site in ["cross-site", "same-site"] {
        let a = c.get("/agents/a1/api/headers", &[("cookie", &cookie), ("sec-fetch-site", site)]).await;
        assert_eq!(a.status, 403, "{site}");
    }
    // The same from this origin, or from a client that is no browser, goes through.
    let a = c.get("/agents/a1/api/headers", &[("cookie", &cookie), ("sec-fetch-site", "same-origin")]).await;
    assert_eq!(a.status, 200);
    assert_eq!(c.get("/agents/a1/api/headers", &[("cookie", &cookie)]).await.status, 200);
}

/// The attack (found by an attacker review, 2026-12-06): after the login exchange the browser
/// sends the credential cookie, the user's whole token, with every request to the origin. A
/// route that takes its token from elsewhere (a bearer-only API, an open or sandboxed UI) left
/// the cookie in, so its agent's backend got the user's token and could replay it against
/// another agent. Every credential cookie now comes off every backend request, REST and
/// WebSocket alike; the client's other cookies pass as they were.
#[tokio::test]
async fn no_backend_gets_a_credential_cookie_whatever_its_route_takes_tokens_from() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let cookie_route = json!({
        "name": "console",
        "path": "/console/{agent}/{*rest}",
        "kind": "http",
        "backends": [backend.addr.to_string()],
        "origin": {"allow": ["https://console.example.com"]},
        "auth": {"sources": ["cookie:console_token"], "agent_claim": "agents"},
    });
    // A route with no auth at all, as an agent's own pages are.
    let open_route = json!({
        "name": "pages",
        "path": "/pages/{agent}/{*rest}",
        "kind": "http",
        "sandbox": true,
        "backends": [backend.addr.to_string()],
    });
    let text = config(&key, backend.addr, None, json!({}))
        .merge("", json!({"routes": [cookie_route, open_route]}))
        .merge("auth", json!({"cookie_login": {}}))
        .text();
    let proxy = Proxy::start_with(&text).await;
    let auth = alice(&key);
    let token = auth.trim_start_matches("Bearer ");
    // What a browser sends after the login, with another route's credential and a cookie of
    // the agent's own (split in two headers, as HTTP/2 clients do).
    let cookies = format!("portcullis_token={token}; theme=dark");
    let more = format!("console_token ={token};lang=en");
    let headers = [("authorization", auth.as_str()), ("cookie", cookies.as_str()), ("cookie", more.as_str())];
    let mut c = H1::connect(proxy.tls, true).await;
    assert_eq!(c.get("/agents/a1/api/headers", &headers).await.status, 200);
    let ws = upgrade(proxy.tls, true, "/agents/a1/api/ws", &headers).await.expect("101");
    drop(ws);
    assert_eq!(c.get("/pages/a1/index.html", &headers[1..]).await.status, 200);
    let mut h2 = H2::connect(proxy.tls).await;
    assert_eq!(h2.get("/pages/a1/app.js", &headers[1..]).await.0, 200);
    let seen = backend.seen();
    assert_eq!(seen.len(), 4, "{seen:?}");
    for s in &seen {
        // One header (RFC 9113 §8.2.3 joins HTTP/2's), the credentials out, the rest kept.
        assert_eq!(
            s.headers.get("cookie").map(String::as_str),
            Some("theme=dark; lang=en"),
            "{}: {:?}",
            s.uri,
            s.headers
        );
        assert!(!s.headers.values().any(|v| v.contains(token)), "{}: the token reached the backend", s.uri);
    }
    // A request carrying no credential cookie keeps its Cookie header as sent.
    let mut c = H1::connect(proxy.tls, true).await;
    let plain = [("authorization", auth.as_str()), ("cookie", "theme=dark;lang=en")];
    assert_eq!(c.get("/agents/a1/api/headers", &plain).await.status, 200);
    assert_eq!(backend.seen()[4].headers.get("cookie").map(String::as_str), Some("theme=dark;lang=en"));
    // A reload that renames the login cookie: browsers still send the old one, a live token in
    // it, and it still reaches no backend.
    let renamed =
        config(&key, backend.addr, None, json!({})).merge("auth", json!({"cookie_login": {"cookie": "pc_login"}}));
    let renamed =
        portcullis::config::Config::parse(&renamed.text(), std::path::Path::new("renamed.toml")).expect("valid");
    proxy.handle.reload(renamed).expect("reload");
    let old = format!("portcullis_token={token}; theme=dark");
    assert_eq!(
        c.get("/agents/a1/api/headers", &[("authorization", auth.as_str()), ("cookie", old.as_str())]).await.status,
        200
    );
    assert_eq!(backend.seen()[5].headers.get("cookie").map(String::as_str), Some("theme=dark"));
}

#[tokio::test]
async fn refusals_are_logged_at_info_with_route_client_and_reason_never_the_token_and_sampled() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let mut proxy = ProxyProcess::start(&config(&key, backend.addr, None, json!({})).text()).await;
    // Another agent's token: 403 on a WebSocket handshake and on a REST call.
    let other = key.bearer(&["a2"]);
    let refused = upgrade(proxy.tls, true, "/agents/a1/api/ws", &[("authorization", &other)]).await.err().expect("403");
    assert_eq!(refused.status, 403);
    let mut c = H1::connect(proxy.tls, true).await;
    // A flood of bad tokens (401, then 429 once the address's token-check rate runs out):
    // counted in full, logged at most once a second per reason.
    for _ in 0..50 {
        let status = c.get("/agents/a1/api/headers", &[("authorization", "Bearer not.a.token")]).await.status;
        assert!(status == 401 || status == 429, "{status}");
    }
    let log = proxy.stop_and_collect_logs().await;
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("request refused")).collect();
    let forbidden = refusals.iter().find(|l| l.contains("reason=\"forbidden\"")).expect("the 403 is logged");
    assert!(
        forbidden.contains("INFO") && forbidden.contains("route=\"api\"") && forbidden.contains("client=127.0.0.1")
    );
    let flood =
        refusals.iter().filter(|l| l.contains("reason=\"unauthorized\"") || l.contains("reason=\"token_check_rate\""));
    let lines = flood.count();
    assert!((1..10).contains(&lines), "{lines} lines for 50 refusals: sampled per reason");
    let token = other.trim_start_matches("Bearer ");
    assert!(!log.contains(token) && !log.contains("not.a.token"), "a token reached the log");
}

/// `portcullis check-config PATH`, as an operator runs it.
fn check_config(path: &std::path::Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_portcullis")).arg("check-config").arg(path).output().expect("run")
}

/// Found by an attacker review: an agent's own literal route (a stricter policy: another
/// required claim, its own member) was skipped by spelling the agent in another case, which
/// the route that captures every agent matched (and lowercased, so the token's grant passed).
/// The path is matched in its canonical form: one spelling of an agent, one route.
#[tokio::test]
async fn an_agents_own_route_cannot_be_skipped_by_spelling_the_agent_in_another_case() {
    let generic = Backend::echo().await;
    let hardened = Backend::echo().await;
    let key = hmac();
    let routes = json!({"routes": [
        {"name": "any", "path": "/agents/{agent}/terminal", "backends": [generic.addr.to_string()],
         "auth": {"agent_claim": "agents"}},
        {"name": "prod", "path": "/agents/prod-db/terminal", "backends": [hardened.addr.to_string()],
         "auth": {"required_claims": ["sub", "mfa"]}},
    ]});
    let text =
        TestConfig::base(&["127.0.0.1:1".to_owned()]).remove("routes").merge("", key.auth_keys()).merge("", routes);
    let proxy = Proxy::start_with(&text.text()).await;
    let bob = format!("Bearer {}", key.token_with(json!({"sub": "bob", "agents": ["prod-db"]})));
    for path in ["/agents/prod-db/terminal", "/agents/PROD-DB/terminal", "/agents/Prod-Db/terminal"] {
        let refused = upgrade(proxy.plain, false, path, &[("Authorization", &bob)]).await.err();
        assert_eq!(refused.map(|h| h.status), Some(401), "{path}: the agent's own route asks for mfa");
    }
    assert!(generic.log.requests.lock().expect("lock").is_empty(), "the generic route's member was reached");
    let with_mfa = format!("Bearer {}", key.token_with(json!({"sub": "bob", "agents": ["prod-db"], "mfa": true})));
    let mut c = upgrade(proxy.plain, false, "/agents/PROD-DB/terminal", &[("Authorization", &with_mfa)])
        .await
        .expect("101 on the agent's own route");
    c.send(true, op::TEXT, b"ok").await;
    assert_eq!(c.recv().await.payload, b"ok");
    let seen = hardened.log.requests.lock().expect("lock").iter().map(|h| h.path.clone()).collect::<Vec<_>>();
    assert_eq!(seen, ["/agents/prod-db/terminal"], "the backend sees the one spelling");
}
