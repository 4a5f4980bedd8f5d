//! Live observers: a subject with the route's observe scope watches a live session read-only,
//! the replay first, then the output as the owner gets it; a slow observer is closed with 1013
//! while the session goes on; a subject without the scope gets 403.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::*;

fn observed(backend: std::net::SocketAddr, key: &Hmac, observe: serde_json::Value) -> TestConfig {
    observed_as("observed", backend, key, observe)
}

fn observed_as(route: &str, backend: std::net::SocketAddr, key: &Hmac, observe: serde_json::Value) -> TestConfig {
    TestConfig::base(&[backend.to_string()])
        .set("routes.0.name", route)
        .merge("", key.auth_keys())
        .merge("routes.0", json!({"auth": {"agent_claim": "agents"}}))
        .merge("routes.0", json!({"observe": {"scope": "observe:{agent}"}}))
        .merge("routes.0.observe", observe)
}

async fn session_id(proxy: &Proxy) -> u64 {
    let (_, body) = admin_request(proxy.admin, "GET", "/sessions", "").await;
    let v: Value = serde_json::from_str(&body).expect("json");
    v["sessions"][0]["id"].as_u64().expect("one session")
}

/// A session's owner over plain ws (one message echoed, so the session is live), the path that
/// observes it, and an auditor's token.
async fn owner_over_plain(proxy: &Proxy, key: &Hmac) -> (Client, String, String) {
    let mut owner = upgrade(proxy.plain, false, "/agents/a1/terminal", &[("Authorization", &key.bearer(&["a1"]))])
        .await
        .expect("101");
    owner.send(true, op::BINARY, b"x").await;
    owner.recv().await;
    let id = session_id(proxy).await;
    let auditor = key.token_with(json!({"sub": "auditor", "scope": "observe:a1"}));
    (owner, format!("/agents/a1/terminal?observe={id}"), auditor)
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

#[tokio::test]
async fn an_observer_sees_the_replay_then_the_output_with_the_owner_and_cannot_send() {
    let backend = Backend::echo().await;
    let key = hmac();
    let proxy = Proxy::start_with(&observed(backend.addr, &key, json!({"replay": "1KiB"})).text()).await;
    let owner_auth = key.bearer(&["a1"]);
    let mut owner =
        upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &owner_auth)]).await.expect("101");
    owner.send(true, op::BINARY, b"before the observer").await;
    owner.recv().await;
    let id = session_id(&proxy).await;

    let auditor = key.token_with(json!({"sub": "auditor", "scope": "observe:a1"}));
    let path = format!("/agents/a1/terminal?observe={id}");
    let mut obs = upgrade(proxy.tls, true, &path, &[("Authorization", &bearer(&auditor))]).await.expect("observer 101");
    assert_eq!(obs.recv().await.payload, b"before the observer", "the replay first");
    let (_, body) = admin_request(proxy.admin, "GET", "/sessions", "").await;
    assert!(body.contains("\"observers\":1"), "{body}");

    // Live: the observer gets each output when the owner does (the median lag is what is held to
    // 100 ms, so that one stall of a loaded machine does not decide it).
    let mut lags = Vec::new();
    for n in 0..20u32 {
        let payload = format!("output {n}");
        owner.send(true, op::BINARY, payload.as_bytes()).await;
        let f = owner.recv().await;
        let owner_at = Instant::now();
        assert_eq!(f.payload, payload.as_bytes());
        let g = obs.recv().await;
        let lag = owner_at.elapsed();
        assert_eq!(g.payload, payload.as_bytes());
        assert!(lag < Duration::from_secs(2), "observer {lag:?} behind the owner");
        lags.push(lag);
    }
    lags.sort();
    assert!(lags[lags.len() / 2] < Duration::from_millis(100), "observer behind the owner: {lags:?}");
    // Pings are answered by the proxy; input is refused with 1008, and never reaches the backend.
    obs.send(true, op::PING, b"hi").await;
    let pong = obs.recv().await;
    assert_eq!((pong.opcode, pong.payload.as_slice()), (op::PONG, &b"hi"[..]));
    // The observer's own session counts what it moved, as a relayed session does: the replay and
    // the 20 outputs written to it (their payloads alone are 189 bytes), and its ping (2 + 4 +
    // 2 bytes). It counted nothing before.
    let (_, body) = admin_request(proxy.admin, "GET", "/sessions", "").await;
    let v: Value = serde_json::from_str(&body).expect("json");
    let own = v["sessions"].as_array().expect("list").iter().find(|e| e["kind"] == "observer").cloned();
    let own = own.unwrap_or_else(|| panic!("the observer's own session: {body}"));
    assert!(own["bytes_from_backend"].as_u64().is_some_and(|b| b >= 189), "{own}");
    assert_eq!(own["bytes_from_client"], 8, "{own}");
    obs.send(true, op::TEXT, b"rm -rf /").await;
    assert_eq!(obs.recv_close().await.close_code(), Some(1008));
    assert!(!backend.log.frames().iter().any(|f| f.payload == b"rm -rf /"));
    owner.send(true, op::BINARY, b"owner unaffected").await;
    assert_eq!(owner.recv().await.payload, b"owner unaffected");

    // A new observer, then the session ends: 1001.
    let mut obs = upgrade(proxy.tls, true, &path, &[("Authorization", &bearer(&auditor))]).await.expect("101");
    owner.send(true, op::CLOSE, &close_payload(1000, "")).await;
    owner.recv_close().await;
    let f = obs.recv_close().await;
    assert_eq!((f.close_code(), f.close_reason().as_str()), (Some(1001), "session ended"));
}

#[tokio::test]
async fn observing_needs_the_scope_and_a_live_session_of_that_agent() {
    let backend = Backend::echo().await;
    let key = hmac();
    let proxy = Proxy::start_with(&observed(backend.addr, &key, json!({})).text()).await;
    let mut owner =
        upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &key.bearer(&["a1"]))]).await.expect("101");
    owner.send(true, op::BINARY, b"x").await;
    owner.recv().await;
    let id = session_id(&proxy).await;
    let path = format!("/agents/a1/terminal?observe={id}");
    // The owner's own kind of token (the agent grant) is not the observe scope.
    let refused = upgrade(proxy.tls, true, &path, &[("Authorization", &key.bearer(&["a1"]))]).await.err().expect("403");
    assert_eq!(refused.status, 403);
    let other = key.token_with(json!({"sub": "auditor", "scope": "observe:a2"}));
    let refused = upgrade(proxy.tls, true, &path, &[("Authorization", &bearer(&other))]).await.err().expect("403");
    assert_eq!(refused.status, 403);
    let none = upgrade(proxy.tls, true, &path, &[]).await.err().expect("401");
    assert_eq!(none.status, 401);
    // The right scope, but a session that is not there, or not this agent's.
    let a1 = key.token_with(json!({"sub": "auditor", "scope": "observe:a1"}));
    let missing = format!("/agents/a1/terminal?observe={}", id + 1000);
    assert_eq!(
        upgrade(proxy.tls, true, &missing, &[("Authorization", &bearer(&a1))]).await.err().expect("404").status,
        404
    );
    let a2 = key.token_with(json!({"sub": "auditor", "scope": "observe:a2"}));
    let elsewhere = format!("/agents/a2/terminal?observe={id}");
    assert_eq!(
        upgrade(proxy.tls, true, &elsewhere, &[("Authorization", &bearer(&a2))]).await.err().expect("404").status,
        404
    );
    let (_, m) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&m, "portcullis_upgrades_total{route=\"observed\",result=\"forbidden\"}"), 2.0);
}

#[tokio::test]
async fn a_slow_observer_is_closed_with_1013_and_the_session_goes_on() {
    let backend = Backend::echo().await;
    let key = hmac();
    // A long grace: the slow observer reads again in time to take its 1013.
    let proxy = Proxy::start_with(
        &observed(backend.addr, &key, json!({"replay": "0", "queue": 32, "drop_grace": "60s"})).text(),
    )
    .await;
    let mut owner =
        upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &key.bearer(&["a1"]))]).await.expect("101");
    owner.send(true, op::BINARY, b"x").await;
    owner.recv().await;
    let id = session_id(&proxy).await;
    let auditor = key.token_with(json!({"sub": "auditor", "scope": "observe:a1"}));
    let path = format!("/agents/a1/terminal?observe={id}");
    let mut slow = upgrade(proxy.tls, true, &path, &[("Authorization", &bearer(&auditor))]).await.expect("101");
    let mut fast = upgrade(proxy.tls, true, &path, &[("Authorization", &bearer(&auditor))]).await.expect("101");
    // 64 KiB outputs, 12.5 MiB in all: the slow observer reads nothing, so its socket
    // buffers fill, then its queue of 32 chunks.
    let big = vec![7u8; 64 * 1024];
    for _ in 0..200 {
        owner.send(true, op::BINARY, &big).await;
        assert_eq!(owner.recv().await.payload.len(), big.len(), "the session is never held up");
        // Observers get the output as a byte stream, in the chunks the proxy read it in.
        let mut got = 0;
        while got < big.len() {
            got += fast.recv().await.payload.len();
        }
        assert_eq!(got, big.len(), "a reading observer keeps up");
    }
    let f = slow.recv_close().await;
    assert_eq!((f.close_code(), f.close_reason().as_str()), (Some(1013), "observer too slow"));
    let (_, m) = http_get(proxy.admin, "/metrics").await;
    assert!(metric(&m, "portcullis_observer_closes_total{route=\"observed\",reason=\"lagged\"}") >= 1.0);
}

#[tokio::test]
async fn an_observer_that_never_reads_again_is_cut_after_the_grace() {
    let backend = Backend::echo().await;
    let key = hmac();
    // A queue (16 MiB) longer than the socket buffers hold: they are full, and the writer
    // blocked, when the queue fills.
    let proxy = Proxy::start_with(
        &observed_as(
            "observed-stuck",
            backend.addr,
            &key,
            json!({"replay": "0", "queue": 1024, "drop_grace": "100ms"}),
        )
        .text(),
    )
    .await;
    let (mut owner, path, auditor) = owner_over_plain(&proxy, &key).await;
    let mut stuck = upgrade(proxy.plain, false, &path, &[("Authorization", &bearer(&auditor))]).await.expect("101");
    let big = vec![7u8; 64 * 1024];
    let deadline = std::time::Instant::now() + SOON;
    // Output until the observer's task has ended, while it reads nothing: one that stopped
    // reading holds no task, queue or connection beyond the grace.
    let series = "portcullis_observer_closes_total{route=\"observed-stuck\",reason=\"lagged\"}";
    loop {
        owner.send(true, op::BINARY, &big).await;
        assert_eq!(owner.recv().await.payload.len(), big.len(), "the session is never held up");
        let (_, m) = http_get(proxy.admin, "/metrics").await;
        if metric(&m, series) == 1.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the stuck observer is still there");
    }
    // What its socket buffers held, then the end (its 1013 if the socket had room for it, else
    // none: a frame cut short cannot be followed by one).
    let (frames, close) = stuck.read_to_end().await;
    assert!(close.is_none_or(|c| c.close_code() == Some(1013)));
    assert!(frames > 0, "it had output in its socket buffers");
}

#[tokio::test]
async fn an_observer_may_watch_over_http2_a_session_opened_over_http1() {
    let backend = Backend::echo().await;
    let key = hmac();
    let proxy = Proxy::start_with(&observed(backend.addr, &key, json!({})).text()).await;
    let mut owner =
        upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &key.bearer(&["a1"]))]).await.expect("101");
    owner.send(true, op::BINARY, b"seen before").await;
    owner.recv().await;
    let id = session_id(&proxy).await;
    let auditor = key.token_with(json!({"sub": "auditor", "scope": "observe:a1"}));
    let mut h2 = H2::connect(proxy.tls).await;
    let mut obs = h2
        .websocket(&format!("/agents/a1/terminal?observe={id}"), &[("authorization", &bearer(&auditor))])
        .await
        .expect("200");
    assert_eq!(obs.recv().await.payload, b"seen before");
    owner.send(true, op::BINARY, b"and now").await;
    owner.recv().await;
    assert_eq!(obs.recv().await.payload, b"and now");
    assert_eq!(backend.log.requests.lock().expect("lock").len(), 1, "an observer opens no backend session");
}

#[tokio::test]
async fn an_observer_connection_counts_under_the_per_address_cap_while_it_watches() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = Backend::echo().await;
    let key = hmac();
    let text = observed(backend.addr, &key, json!({})).merge("server", json!({"max_connections_per_ip": 2})).text();
    let proxy = Proxy::start_with(&text).await;
    let (_owner, path, auditor) = owner_over_plain(&proxy, &key).await;
    let mut obs = upgrade(proxy.plain, false, &path, &[("Authorization", &bearer(&auditor))]).await.expect("101");
    assert_eq!(obs.recv().await.payload, b"x");
    // Two connections from this address are open: a third is closed at accept.
    let mut third = tokio::net::TcpStream::connect(proxy.plain).await.expect("tcp");
    let _ = third.write_all(b"GET /agents/a1/terminal HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(SOON, third.read(&mut buf)).await.expect("closed in time").unwrap_or(0);
    assert_eq!(n, 0, "refused at accept, not answered: {:?}", String::from_utf8_lossy(&buf[..n]));
}

/// Opens an observer of `path` with `auth`; the replay (one frame) is read.
async fn observer(proxy: &Proxy, path: &str, auth: &str) -> Client {
    let mut obs = upgrade(proxy.plain, false, path, &[("Authorization", auth)]).await.expect("observer 101");
    obs.recv().await;
    obs
}

#[tokio::test]
async fn an_observer_is_a_session_its_token_expiry_and_revocation_close_it_and_it_counts_under_caps() {
    let backend = Backend::echo().await;
    let key = hmac();
    let text = observed_as("observer-governed", backend.addr, &key, json!({"replay": "1KiB"}))
        .set("auth.leeway", "0s")
        .set("auth.max_sessions_per_subject", 1);
    let proxy = Proxy::start_with(&text.text()).await;
    let (_owner, path, auditor) = owner_over_plain(&proxy, &key).await;

    // Revoking the observer's subject closes it (and counts it).
    let mut obs = observer(&proxy, &path, &bearer(&auditor)).await;
    let (_, list) = admin_request(proxy.admin, "GET", "/sessions", "").await;
    assert!(list.contains("\"kind\":\"observer\""), "{list}");
    // It holds the auditor's one session: a second observer of the same subject is refused.
    let second = upgrade(proxy.plain, false, &path, &[("Authorization", &bearer(&auditor))]).await;
    assert_eq!(second.err().map(|h| h.status), Some(429), "observers count toward the subject's cap");
    let (status, body) = admin_post(proxy.admin, "/sessions/revoke", r#"{"subject":"auditor"}"#).await;
    assert_eq!((status, body.trim()), (200, r#"{"closed":1}"#));
    let f = obs.recv_close().await;
    assert_eq!((f.close_code(), f.close_reason().as_str()), (Some(1008), "session revoked"));

    // An observer's own token expiry closes it.
    // The claims an auditor has, with a two-second life.
    let short = key.token_with(json!({"sub": "auditor-2", "scope": "observe:a1", "exp": portcullis_now() + 2}));
    let mut obs = observer(&proxy, &path, &bearer(&short)).await;
    let started = Instant::now();
    let f = obs.recv_close().await;
    assert_eq!((f.close_code(), f.close_reason().as_str()), (Some(1008), "token expired"));
    assert!(started.elapsed() >= Duration::from_millis(500), "closed before its token expired");
}

fn portcullis_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs()
}

#[tokio::test]
async fn an_observer_frame_larger_than_a_control_frame_is_refused_from_its_header() {
    let backend = Backend::echo().await;
    let key = hmac();
    let proxy = Proxy::start_with(&observed_as("observer-bomb", backend.addr, &key, json!({})).text()).await;
    let (_owner, path, auditor) = owner_over_plain(&proxy, &key).await;
    let mut obs = upgrade(proxy.plain, false, &path, &[("Authorization", &bearer(&auditor))]).await.expect("101");
    // A frame header that claims 64 MiB, then only 1 KiB of it: the proxy closes at once
    // (it would otherwise wait for, and buffer, the whole frame).
    let mut header = vec![0x82u8, 0xFF];
    header.extend_from_slice(&(64u64 << 20).to_be_bytes());
    header.extend_from_slice(&rand_mask());
    obs.send_raw(&header).await;
    obs.send_raw(&[0u8; 1024]).await;
    let f = obs.recv_close().await;
    assert_eq!((f.close_code(), f.close_reason().as_str()), (Some(1009), "frame too large"));
}

#[tokio::test]
async fn an_observer_over_http2_holds_its_place_under_max_streams_per_ip() {
    let backend = Backend::echo().await;
    let key = hmac();
    let text = observed_as("observer-h2-cap", backend.addr, &key, json!({})).set("http2.max_streams_per_ip", 1).text();
    let proxy = Proxy::start_with(&text).await;
    let (_owner, path, auditor) = owner_over_plain(&proxy, &key).await;
    let mut h2 = H2::connect(proxy.tls).await;
    let mut obs = h2.websocket(&path, &[("authorization", &bearer(&auditor))]).await.expect("observer over h2");
    obs.recv().await;
    // The observer's stream holds the address's one place while it watches.
    let (status, _) = h2.get("/agents/a1/terminal", &[]).await;
    assert_eq!(status, 429, "an observer's stream escaped max_streams_per_ip");
    drop(obs);
}

/// The attack: one holder of the observe scope opens observer after observer on a session to
/// take every place and keep the security team from watching it. Each subject holds at most
/// `max_observers_per_subject` (2 by default) of the session's places; the others stay open.
#[tokio::test]
async fn one_subject_cannot_take_every_observer_place_of_a_session() {
    let backend = Backend::echo().await;
    let key = hmac();
    let proxy = Proxy::start_with(&observed(backend.addr, &key, json!({"max_observers": 3})).text()).await;
    let (_owner, path, auditor) = owner_over_plain(&proxy, &key).await;
    let mallory = bearer(&key.token_with(json!({"sub": "mallory", "scope": "observe:a1"})));
    let _first = observer(&proxy, &path, &mallory).await;
    let _second = observer(&proxy, &path, &mallory).await;
    let third = upgrade(proxy.plain, false, &path, &[("Authorization", &mallory)]).await.err().expect("429");
    assert_eq!(third.status, 429);
    // The place mallory could not take is the auditor's.
    let mut watching = observer(&proxy, &path, &bearer(&auditor)).await;
    watching.send(true, op::PING, b"here").await;
    assert_eq!(watching.recv().await.opcode, op::PONG);
    // Now the session is full for everyone.
    let other = bearer(&key.token_with(json!({"sub": "someone", "scope": "observe:a1"})));
    let full = upgrade(proxy.plain, false, &path, &[("Authorization", &other)]).await.err().expect("429");
    assert_eq!(full.status, 429);
    for refused in [&third, &full] {
        assert_eq!(refused.header("retry-after"), Some("5"), "every 429 says when to retry");
    }
    // Told apart by their reasons.
    let (_, m) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&m, "portcullis_upgrades_total{route=\"observed\",result=\"observers_per_subject\"}"), 1.0);
    assert_eq!(metric(&m, "portcullis_upgrades_total{route=\"observed\",result=\"observers_full\"}"), 1.0);
}

/// Found by an attacker review: the observer's subject (its token's `sub`, which its issuer
/// lets users shape: an LDAP DN, a display name) went into the observer's log lines raw, so a
/// newline forged a whole line and escape sequences reached the operator's terminal. It is
/// written quoted and escaped, as every other subject field is.
#[tokio::test]
async fn an_observers_subject_cannot_forge_a_log_line() {
    let backend = Backend::echo().await;
    let key = hmac();
    let text = observed(backend.addr, &key, json!({})).text();
    let mut proxy = ProxyProcess::start_with_log(&text, "portcullis=info").await;
    let mut owner = upgrade(proxy.plain, false, "/agents/a1/terminal", &[("Authorization", &key.bearer(&["a1"]))])
        .await
        .expect("101");
    owner.send(true, op::BINARY, b"x").await;
    owner.recv().await;
    let (_, body) = admin_request(proxy.admin, "GET", "/sessions", "").await;
    let v: Value = serde_json::from_str(&body).expect("json");
    let id = v["sessions"][0]["id"].as_u64().expect("one session");
    let forged = "auditor\n2026-12-06T00:00:00.000000Z  INFO portcullis::admin: sessions revoked closed=0 \u{1b}[2J";
    let auditor = key.token_with(json!({"sub": forged, "scope": "observe:a1"}));
    let path = format!("/agents/a1/terminal?observe={id}");
    let mut obs = upgrade(proxy.plain, false, &path, &[("Authorization", &bearer(&auditor))]).await.expect("observer");
    obs.send(true, op::CLOSE, &1000u16.to_be_bytes()).await;
    let logs = proxy.stop_and_collect_logs().await;
    assert!(logs.lines().any(|l| l.contains("observer joined")), "{logs}");
    assert!(!logs.lines().any(|l| l.starts_with("2026-12-06T00:00:00")), "a forged line:\n{logs}");
    assert!(!logs.contains('\u{1b}'), "an escape sequence reached the log:\n{logs}");
}

/// Found by an attacker review: an observer's pings were answered as fast as it sent them
/// (20,000 pongs in a second on a route whose client rate was 20 frames a second). What an
/// observer sends is held to the route's client rate, as a relayed session's is.
#[tokio::test]
async fn an_observers_pings_are_held_to_the_routes_client_rate() {
    let backend = Backend::echo().await;
    let key = hmac();
    let text = observed_as("observed-rate", backend.addr, &key, json!({}))
        .merge(
            "routes.0",
            json!({"session": {"client_message_rate": 20, "rate_burst": "100ms", "rate_action": "close"}}),
        )
        .text();
    let proxy = Proxy::start_with(&text).await;
    let (_owner, path, auditor) = owner_over_plain(&proxy, &key).await;
    let mut obs = upgrade(proxy.plain, false, &path, &[("Authorization", &bearer(&auditor))]).await.expect("observer");
    let flood: Vec<u8> = (0..500).flat_map(|_| encode(true, 0, op::PING, Some(rand_mask()), b"p")).collect();
    obs.send_raw(&flood).await;
    let mut pongs = 0;
    let close = loop {
        let f = obs.recv().await;
        match f.opcode {
            op::PONG => pongs += 1,
            op::CLOSE => break f,
            _ => {}
        }
    };
    assert_eq!(close.close_code(), Some(1008), "over the rate");
    assert!(pongs < 50, "{pongs} pongs for 500 pings");
}
