//! Fan-out (`[routes.fanout]`): the clients of one agent and path share one backend WebSocket;
//! every event reaches every client in order, a client that stops reading is dropped (1013)
//! without slowing the others, pings are answered by the proxy, input is refused (1008), a
//! revocation closes one client and not the stream, and the backend connection closes after
//! the last client leaves (after the linger) and is opened again by the next.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::harness::*;

/// A backend that, once `go` is set, sends `events` binary frames `<path> <seq>` padded to
/// `size` bytes on each connection, then keeps reading (pings answered, close echoed).
async fn broadcaster(events: usize, size: usize) -> (Backend, tokio::sync::watch::Sender<bool>) {
    broadcaster_reading(events, size, true).await
}

/// [`broadcaster`], reading nothing at all when `reads` is false (its socket fills up).
async fn broadcaster_reading(events: usize, size: usize, reads: bool) -> (Backend, tokio::sync::watch::Sender<bool>) {
    let (go, go_rx) = tokio::sync::watch::channel(false);
    let handler: Handler = Arc::new(move |s: BackendSession| {
        let mut go = go_rx.clone();
        Box::pin(async move {
            let path = s.request.path.clone();
            let (mut rd, wr) = tokio::io::split(s.stream);
            let wr = Arc::new(tokio::sync::Mutex::new(wr));
            let sender = wr.clone();
            let events = tokio::spawn(async move {
                let _ = go.wait_for(|g| *g).await;
                for i in 0..events {
                    if i % 100 == 99 {
                        // Paced like a live feed (20,000 events/s), not one burst.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    let mut payload = format!("{path} {i}").into_bytes();
                    payload.resize(size.max(payload.len()), b'.');
                    if sender.lock().await.write_all(&encode(true, 0, op::BINARY, None, &payload)).await.is_err() {
                        return;
                    }
                }
            });
            if !reads {
                let _ = events.await;
                // Held open, never read, until the test ends.
                std::future::pending::<()>().await;
            }
            while let Ok(f) = read_frame(&mut rd).await {
                s.log.record(f.clone());
                let reply = match f.opcode {
                    op::PING => encode(true, 0, op::PONG, None, &f.payload),
                    op::CLOSE => {
                        let _ = wr.lock().await.write_all(&encode(true, 0, op::CLOSE, None, &f.payload)).await;
                        return;
                    }
                    _ => continue,
                };
                let _ = wr.lock().await.write_all(&reply).await;
            }
        })
    });
    (Backend::start(BackendOpts::default(), handler).await, go)
}

fn fanned(name: &str, backend: std::net::SocketAddr, key: &Hmac, fanout: serde_json::Value) -> String {
    fanned_config(name, backend, key, fanout).text()
}

fn fanned_config(name: &str, backend: std::net::SocketAddr, key: &Hmac, fanout: serde_json::Value) -> TestConfig {
    TestConfig::base(&[backend.to_string()])
        .one_address_load()
        .set("routes.0.name", name)
        .set("routes.0.path", "/agents/{agent}/events")
        .merge("", key.auth_keys())
        .merge("auth", json!({"max_sessions_per_subject": 0}))
        .merge("routes.0", json!({"auth": {"agent_claim": "agents"}}))
        .merge("routes.0", json!({"fanout": fanout}))
}

async fn wait_metric(proxy: &Proxy, series: &str, want: f64) {
    eventually(&format!("{series} reaches {want}"), async || {
        let (_, m) = http_get(proxy.admin, "/metrics").await;
        (metric(&m, series) == want).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_thousand_clients_on_twenty_agents_make_twenty_backend_connections_and_get_every_event_in_order() {
    const AGENTS: usize = 20;
    const PER_AGENT: usize = 50;
    const EVENTS: usize = 20;
    let (backend, go) = broadcaster(EVENTS, 0).await;
    let key = hmac();
    let proxy = Proxy::start_with(&fanned("fanout-many", backend.addr, &key, json!({}))).await;
    let mut clients = Vec::new();
    for a in 0..AGENTS {
        let agent = format!("a{a}");
        let auth = format!("Bearer {}", key.token("viewer", &[&agent], Duration::from_secs(600)));
        for _ in 0..PER_AGENT {
            let (agent, auth, addr) = (agent.clone(), auth.clone(), proxy.plain);
            clients.push(tokio::spawn(async move {
                let path = format!("/agents/{agent}/events");
                (path.clone(), upgrade(addr, false, &path, &[("Authorization", &auth)]).await.expect("101"))
            }));
        }
    }
    let mut connected = Vec::new();
    for c in clients {
        connected.push(c.await.expect("client"));
    }
    wait_metric(&proxy, "portcullis_fanout_subscribers{route=\"fanout-many\"}", (AGENTS * PER_AGENT) as f64).await;
    assert_eq!(backend.log.requests.lock().expect("lock").len(), AGENTS, "one backend connection per agent");
    go.send_replace(true);
    let readers: Vec<_> = connected
        .into_iter()
        .map(|(path, mut c)| {
            tokio::spawn(async move {
                for i in 0..EVENTS {
                    let f = c.recv().await;
                    assert_eq!(f.payload, format!("{path} {i}").as_bytes(), "in order, from its own agent");
                }
            })
        })
        .collect();
    for r in readers {
        r.await.expect("every client got every event in order");
    }
    let (_, m) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&m, "portcullis_fanout_streams{route=\"fanout-many\"}"), AGENTS as f64);
    assert_eq!(metric(&m, "portcullis_fanout_streams_total{route=\"fanout-many\"}"), AGENTS as f64);
}

/// Four reading clients and one that reads nothing share a stream of more events than the
/// stalled client's socket buffers hold: the readers get every event in order, and the stalled
/// client is dropped. Returns once the drop is counted, with the stalled client unread and
/// the readers still connected.
async fn one_client_stalls(route: &str, fanout: serde_json::Value) -> (Proxy, Client, Vec<Client>, Backend) {
    const EVENTS: usize = 12_000;
    let (backend, go) = broadcaster(EVENTS, 1024).await;
    let key = hmac();
    let proxy = Proxy::start_with(&fanned(route, backend.addr, &key, fanout)).await;
    let auth = key.bearer(&["a1"]);
    let mut readers = Vec::new();
    for _ in 0..4 {
        readers.push(upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &auth)]).await.expect("101"));
    }
    let stalled = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &auth)]).await.expect("101");
    wait_metric(&proxy, &format!("portcullis_fanout_subscribers{{route=\"{route}\"}}"), 5.0).await;
    go.send_replace(true);
    let tasks: Vec<_> = readers
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                for i in 0..EVENTS {
                    let f = c.recv().await;
                    assert!(f.payload.starts_with(format!("/agents/a1/events {i}").as_bytes()), "event {i} in order");
                }
                c
            })
        })
        .collect();
    let mut readers = Vec::new();
    for t in tasks {
        readers.push(t.await.expect("the readers got every event"));
    }
    wait_metric(&proxy, &format!("portcullis_fanout_drops_total{{route=\"{route}\",reason=\"slow\"}}"), 1.0).await;
    assert_eq!(backend.log.requests.lock().expect("lock").len(), 1);
    (proxy, stalled, readers, backend)
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_and_the_others_get_everything() {
    // A long grace: the stalled client reads again in time to take its 1013.
    let (_proxy, mut stalled, _readers, _backend) =
        one_client_stalls("fanout-slow", json!({"queue": 1024, "drop_grace": "60s"})).await;
    let (_, close) = stalled.read_to_end().await;
    assert_eq!(close.and_then(|f| f.close_code()), Some(1013));
}

#[tokio::test]
async fn a_client_that_never_reads_again_is_cut_after_the_grace_and_holds_nothing() {
    // A queue (4 MiB) longer than the socket buffers hold: they are full, and the writer
    // blocked, when the queue fills.
    let (proxy, mut stalled, _readers, _backend) =
        one_client_stalls("fanout-stuck", json!({"queue": 4096, "drop_grace": "100ms"})).await;
    // Its task ends while it still reads nothing: a client that stopped reading holds no
    // task, queue or connection beyond the grace.
    wait_metric(&proxy, "portcullis_fanout_subscribers{route=\"fanout-stuck\"}", 4.0).await;
    // What its socket buffers held, then the end (its 1013 if the socket had room for it, else
    // none: a frame cut short cannot be followed by one).
    let (frames, close) = stalled.read_to_end().await;
    assert!(close.is_none_or(|c| c.close_code() == Some(1013)));
    assert!(frames > 0, "it had events in its socket buffers");
}

#[tokio::test]
async fn each_client_is_governed_alone_and_the_stream_outlives_none_of_them_for_long() {
    let (backend, _go) = broadcaster(0, 0).await;
    let key = hmac();
    let proxy = Proxy::start_with(&fanned("fanout-govern", backend.addr, &key, json!({"linger": "200ms"}))).await;
    let auth = key.bearer(&["a1"]);
    let mallory = format!("Bearer {}", key.token("mallory", &["a1"], Duration::from_secs(600)));
    let mut alice = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &auth)]).await.expect("101");
    let mut other =
        upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &mallory)]).await.expect("101");
    let mut typist = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &auth)]).await.expect("101");
    // Auth per client: no token, no stream; a token without the agent, 403.
    assert_eq!(upgrade(proxy.plain, false, "/agents/a1/events", &[]).await.err().expect("401").status, 401);
    let a2 = key.bearer(&["a2"]);
    assert_eq!(
        upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &a2)]).await.err().expect("403").status,
        403
    );
    // The proxy answers pings itself.
    alice.send(true, op::PING, b"are you there").await;
    let pong = alice.recv().await;
    assert_eq!((pong.opcode, pong.payload.as_slice()), (op::PONG, &b"are you there"[..]));
    // Input is refused (read-only by default), and never reaches the backend. What the typist
    // sends on is unread when its stream ends: it still gets a clean end, not a reset that can
    // come before it reads its close frame.
    let mut input = encode(true, 0, op::TEXT, Some(rand_mask()), b"rm -rf /");
    input.extend_from_slice(&[0u8; 64 * 1024]);
    typist.send_raw(&input).await;
    let f = typist.recv_close().await;
    assert_eq!((f.close_code(), f.close_reason().as_str()), (Some(1008), "read-only stream"));
    typist.expect_fin("a refused typist").await;
    assert!(!backend.log.frames().iter().any(|f| f.payload == b"rm -rf /"));
    // Revoking one subject closes its client only.
    let (status, _) = admin_post(proxy.admin, "/sessions/revoke", &json!({"subject": "mallory"}).to_string()).await;
    assert_eq!(status, 200);
    assert_eq!(other.recv_close().await.close_code(), Some(1008));
    alice.send(true, op::PING, b"still here").await;
    assert_eq!(alice.recv().await.payload, b"still here");
    // One backend stream per subject: alice's (shared by her two clients) and mallory's.
    assert_eq!(backend.log.requests.lock().expect("lock").len(), 2);
    // The last client leaves: after the linger the backend gets 1001; the next client opens a
    // new backend connection.
    alice.send(true, op::CLOSE, &close_payload(1000, "")).await;
    assert_eq!(alice.recv_close().await.close_code(), Some(1000));
    let close = backend.log.wait_for("the linger's close", |f| f.opcode == op::CLOSE).await;
    assert_eq!((close.close_code(), close.close_reason().as_str()), (Some(1001), "no clients"));
    wait_metric(&proxy, "portcullis_fanout_streams{route=\"fanout-govern\"}", 0.0).await;
    let mut again = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &auth)]).await.expect("101");
    again.send(true, op::PING, b"new stream").await;
    assert_eq!(again.recv().await.payload, b"new stream");
    assert_eq!(backend.log.requests.lock().expect("lock").len(), 3);
}

#[tokio::test]
async fn client_data_can_be_forwarded_whole_messages_only() {
    let (backend, _go) = broadcaster(0, 0).await;
    let key = hmac();
    let proxy =
        Proxy::start_with(&fanned("fanout-forward", backend.addr, &key, json!({"client_data": "forward"}))).await;
    let auth = key.bearer(&["a1"]);
    let mut a = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &auth)]).await.expect("101");
    let mut b = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &auth)]).await.expect("101");
    a.send(true, op::TEXT, b"subscribe cpu").await;
    b.send(true, op::TEXT, b"subscribe mem").await;
    backend.log.wait_for("a's message", |f| f.payload == b"subscribe cpu").await;
    backend.log.wait_for("b's message", |f| f.payload == b"subscribe mem").await;
    b.send(false, op::TEXT, b"half").await;
    assert_eq!(b.recv_close().await.close_code(), Some(1008));
}

/// Attack: the fan-out reader checked only a frame's size, so a forwarding client could hand
/// the shared backend stream frames the protocol forbids (reserved bits, reserved opcodes),
/// which reach the backend in the middle of every other subscriber's traffic. The one codec now
/// reads fan-out clients: such a frame closes its sender with 1002 and is never forwarded.
#[tokio::test]
async fn a_forwarding_client_cannot_smuggle_a_frame_the_protocol_forbids_onto_the_shared_stream() {
    let (backend, _go) = broadcaster(0, 0).await;
    let key = hmac();
    let proxy =
        Proxy::start_with(&fanned("fanout-smuggle", backend.addr, &key, json!({"client_data": "forward"}))).await;
    let auth = key.bearer(&["a1"]);
    let mut a = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &auth)]).await.expect("101");
    let mut b = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &auth)]).await.expect("101");
    // RSV1 with no extension negotiated, then a reserved opcode.
    for (rsv, opcode) in [(4, op::TEXT), (0, 0x3)] {
        a.send_raw(&encode(true, rsv, opcode, Some(rand_mask()), b"smuggled")).await;
        assert_eq!(a.recv_close().await.close_code(), Some(1002));
        a = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &auth)]).await.expect("101");
    }
    b.send(true, op::TEXT, b"after").await;
    backend.log.wait_for("b's message", |f| f.payload == b"after").await;
    let frames = backend.log.frames.lock().expect("lock");
    assert!(!frames.iter().any(|f| f.payload == b"smuggled"), "a forbidden frame reached the backend");
}

#[tokio::test]
async fn a_backend_that_stops_reading_holds_up_the_forwarding_clients_not_the_events() {
    const EVENTS: usize = 3_000;
    let (backend, go) = broadcaster_reading(EVENTS, 0, false).await;
    let key = hmac();
    // A queue longer than the whole feed: what is shown is that the stream never stops, not
    // how fast this test's reader is while the flood takes the proxy's time.
    let proxy =
        Proxy::start_with(&fanned("fanout-deaf", backend.addr, &key, json!({"client_data": "forward", "queue": 4096})))
            .await;
    let auth = key.bearer(&["a1"]);
    let mut typist = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &auth)]).await.expect("101");
    let mut reader = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &auth)]).await.expect("101");
    wait_metric(&proxy, "portcullis_fanout_subscribers{route=\"fanout-deaf\"}", 2.0).await;
    // 64 MiB of input for a backend that reads none of it: far more than the sockets between
    // them hold, so the typist's sends soon wait.
    let flood = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..1024 {
            typist.send(true, op::BINARY, &chunk).await;
        }
    });
    go.send_replace(true);
    for i in 0..EVENTS {
        let f = reader.recv().await;
        assert_eq!(f.payload, format!("/agents/a1/events {i}").as_bytes(), "event {i} in order");
    }
    assert!(!flood.is_finished(), "the typist is held up by the backend, not let through");
    flood.abort();
}

/// A forwarding client waiting for room on a stream whose backend stopped reading used to wait
/// in the send, seeing none of its own ends: a revoked client stayed connected and listed. Its
/// wait now races its revocation (and drain, expiry, lifetime, being dropped).
#[tokio::test]
async fn a_forwarding_client_held_up_by_a_deaf_backend_still_ends_when_revoked() {
    let (backend, _go) = broadcaster_reading(0, 0, false).await;
    let key = hmac();
    let proxy =
        Proxy::start_with(&fanned("fanout-deaf-revoke", backend.addr, &key, json!({"client_data": "forward"}))).await;
    let token = format!("Bearer {}", key.token("typist", &["a1"], Duration::from_secs(600)));
    let typist = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &token)]).await.expect("101");
    let (mut rd, mut wr) = tokio::io::split(typist.io);
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let flood = {
        let written = written.clone();
        tokio::spawn(async move {
            let frame = encode(true, 0, op::BINARY, Some(rand_mask()), &vec![b'x'; 64 * 1024]);
            for _ in 0..1024 {
                if wr.write_all(&frame).await.is_err() {
                    return;
                }
                written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    // Held up: the proxy takes no more of the flood (every queue and buffer on the way is full).
    let mut last = usize::MAX;
    eventually("the typist is held up by the deaf backend", async || {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = written.load(std::sync::atomic::Ordering::Relaxed);
        let stalled = now == last && now > 0;
        last = now;
        stalled.then_some(())
    })
    .await;
    assert!(!flood.is_finished());
    let (status, body) = admin_post(proxy.admin, "/sessions/revoke", r#"{"subject":"typist"}"#).await;
    assert_eq!((status, body.trim()), (200, r#"{"closed":1}"#));
    let close = tokio::time::timeout(SOON, async {
        loop {
            let f = read_frame(&mut rd).await.expect("a frame before the connection ends");
            if f.opcode == op::CLOSE {
                return f;
            }
        }
    })
    .await
    .expect("the revoked client is closed while it waits");
    assert_eq!((close.close_code(), close.close_reason().as_str()), (Some(1008), "session revoked"));
    flood.abort();
}

/// A read-only client may send control frames only: a frame header claiming more is refused at
/// once (1009), its payload never buffered.
#[tokio::test]
async fn a_read_only_client_is_refused_a_large_frame_from_its_header() {
    let (backend, _go) = broadcaster(0, 0).await;
    let key = hmac();
    let proxy = Proxy::start_with(&fanned("fanout-readonly-big", backend.addr, &key, json!({}))).await;
    let mut c = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &key.bearer(&["a1"]))])
        .await
        .expect("101");
    // The header of a 1 MiB frame, and none of its payload.
    let mut header = encode(true, 0, op::BINARY, Some(rand_mask()), &[]);
    header[1] = 0x80 | 127;
    header.splice(2..2, (1u64 << 20).to_be_bytes());
    c.send_raw(&header).await;
    assert_eq!(c.recv_close().await.close_code(), Some(1009));
}

#[tokio::test]
async fn http2_streams_share_the_backend_stream_too() {
    let (backend, go) = broadcaster(30, 0).await;
    let key = hmac();
    let proxy = Proxy::start_with(&fanned("fanout-h2", backend.addr, &key, json!({}))).await;
    let auth = key.bearer(&["a1"]);
    // Three RFC 8441 WebSockets on one HTTP/2 connection, and one over HTTP/1.1.
    let mut h2 = H2::connect(proxy.tls).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(h2.websocket("/agents/a1/events", &[("authorization", &auth)]).await.expect("200"));
    }
    clients.push(upgrade(proxy.tls, true, "/agents/a1/events", &[("Authorization", &auth)]).await.expect("101"));
    wait_metric(&proxy, "portcullis_fanout_subscribers{route=\"fanout-h2\"}", 4.0).await;
    go.send_replace(true);
    for c in clients.iter_mut() {
        for i in 0..30 {
            assert_eq!(c.recv().await.payload, format!("/agents/a1/events {i}").as_bytes());
        }
        c.send(true, op::PING, b"h2?").await;
        assert_eq!(c.recv().await.payload, b"h2?");
    }
    assert_eq!(backend.log.requests.lock().expect("lock").len(), 1);
}

#[tokio::test]
async fn fan_out_clients_have_the_session_timeouts_of_their_route() {
    let (backend, _go) = broadcaster(0, 0).await;
    let key = hmac();
    let auth = key.bearer(&["a1"]);
    let with = |name: &str, session: serde_json::Value| {
        fanned_config(name, backend.addr, &key, json!({})).merge("routes.0", json!({"session": session})).text()
    };
    // Pings: a client that answers them stays, one that does not is closed.
    let proxy =
        Proxy::start_with(&with("fanout-pings", json!({"ping_interval": "100ms", "ping_timeout": "300ms"}))).await;
    let mut silent = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &auth)]).await.expect("101");
    let mut answering =
        upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &auth)]).await.expect("101");
    let answers = tokio::spawn(async move {
        for _ in 0..8 {
            let ping = answering.recv().await;
            assert_eq!(ping.opcode, op::PING);
            answering.send(true, op::PONG, &ping.payload).await;
        }
        answering
    });
    let f = silent.recv_close().await;
    assert_eq!((f.close_code(), f.close_reason().as_str()), (Some(1001), "ping timeout"));
    let mut answering = answers.await.expect("eight pings answered");
    answering.send(true, op::PING, b"still here").await;
    loop {
        let f = answering.recv().await;
        assert_ne!(f.opcode, op::CLOSE, "the answering client stays");
        if f.opcode == op::PONG {
            assert_eq!(f.payload, b"still here");
            break;
        }
        answering.send(true, op::PONG, &f.payload).await;
    }
    // No data either way for idle_timeout: 1000, as for a relayed session.
    let proxy = Proxy::start_with(&with("fanout-idle", json!({"idle_timeout": "300ms"}))).await;
    let mut idle = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &auth)]).await.expect("101");
    let f = idle.recv_close().await;
    assert_eq!((f.close_code(), f.close_reason().as_str()), (Some(1000), "idle timeout"));
    // max_lifetime: 1001.
    let proxy = Proxy::start_with(&with("fanout-lifetime", json!({"max_lifetime": "300ms"}))).await;
    let mut old = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &auth)]).await.expect("101");
    let f = old.recv_close().await;
    assert_eq!((f.close_code(), f.close_reason().as_str()), (Some(1001), "session lifetime reached"));
}

#[tokio::test]
async fn subscribers_of_different_subjects_never_share_a_backend_identity_reading_or_forwarding() {
    let backend = Backend::echo().await;
    let key = hmac();
    let text = fanned("fanout-subjects", backend.addr, &key, json!({"client_data": "forward"}));
    let proxy = Proxy::start_with(&text).await;
    let alice = key.bearer(&["a1"]);
    let mallory = format!("Bearer {}", key.token("mallory", &["a1"], Duration::from_secs(600)));
    let mut a = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &alice)]).await.expect("101");
    let mut m = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &mallory)]).await.expect("101");
    // Mallory types: her input reaches her own stream, and alice never sees its echo.
    m.send(true, op::TEXT, b"typed by mallory").await;
    assert_eq!(m.recv().await.payload, b"typed by mallory");
    a.send(true, op::TEXT, b"typed by alice").await;
    assert_eq!(a.recv().await.payload, b"typed by alice", "alice got output produced for another subject");
    // Two backend connections, each with its own subscriber's identity.
    let requests = backend.log.requests.lock().expect("lock").clone();
    let subs: Vec<Option<&str>> = requests.iter().map(|r| r.header("x-portcullis-sub")).collect();
    assert_eq!(requests.len(), 2, "{subs:?}");
    assert!(subs.contains(&Some("alice")) && subs.contains(&Some("mallory")), "{subs:?}");
}

/// Found by an attacker review: the route's client rate held relayed sessions only, so a
/// fan-out client could ping as fast as it liked (each answered) and, on a forwarding route,
/// push data at the shared backend with no rate at all. Its frames are now held to the rate as
/// a relayed session's are (here `rate_action = "close"`: 1008 `rate limit`).
#[tokio::test]
async fn a_fan_out_client_is_held_to_its_routes_client_rate() {
    let (backend, _go) = broadcaster(0, 0).await;
    let key = hmac();
    let text = fanned_config("fanout-rate", backend.addr, &key, json!({"client_data": "forward"}))
        .merge(
            "routes.0",
            json!({"session": {"client_message_rate": 20, "rate_burst": "100ms", "rate_action": "close"}}),
        )
        .text();
    let proxy = Proxy::start_with(&text).await;
    let auth = key.bearer(&["a1"]);
    for (what, opcode) in [("pings", op::PING), ("data", op::BINARY)] {
        let mut c = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &auth)]).await.expect("101");
        let flood: Vec<u8> = (0..200).flat_map(|_| encode(true, 0, opcode, Some(rand_mask()), b"x")).collect();
        c.send_raw(&flood).await;
        let close = loop {
            let f = c.recv().await;
            if f.opcode == op::CLOSE {
                break f;
            }
        };
        assert_eq!(close.close_code(), Some(1008), "{what}: over the rate");
    }
    let forwarded = backend.log.frames.lock().expect("lock").iter().filter(|f| f.opcode == op::BINARY).count();
    assert!(forwarded < 50, "{forwarded} of 200 data frames reached the shared backend");
}

/// Found by an attacker review: a forwarding route's stream held up to 64 whole client frames
/// (each up to `max_frame_size`) for a backend that stopped reading: 75 MiB for one client at
/// 1 MiB frames. What waits for the stream is now two frames beside its outbox. And its
/// sessions counted nothing they moved (`/sessions`, the metrics, the end line said 0).
#[tokio::test]
async fn a_deaf_backend_holds_a_bounded_amount_of_forwarded_data_and_the_session_counts_what_it_moved() {
    let (backend, _go) = broadcaster_reading(0, 0, false).await;
    let key = hmac();
    let text = fanned_config("fanout-bounded", backend.addr, &key, json!({"client_data": "forward"}))
        .merge("routes.0", json!({"session": {"max_frame_size": "1MiB", "max_message_size": "1MiB"}}))
        .text();
    let proxy = ProxyProcess::start(&text).await;
    let auth = key.bearer(&["a1"]);
    let mut c = upgrade(proxy.plain, false, "/agents/a1/events", &[("Authorization", &auth)]).await.expect("101");
    c.send(true, op::BINARY, b"counted").await;
    eventually("the session counts the client's frame", async || {
        let (_, body) = http_get(proxy.admin, "/sessions").await;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (v["sessions"][0]["bytes_from_client"].as_u64() >= Some(7)).then_some(())
    })
    .await;
    let rss_before = rss_kib(proxy.child.id());
    let flood = tokio::spawn(async move {
        let frame = vec![b'x'; 1024 * 1024 - 64];
        for _ in 0..80 {
            c.send(true, op::BINARY, &frame).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after = rss_kib(proxy.child.id());
    flood.abort();
    assert!(rss_after < rss_before + 16 * 1024, "proxy memory grew from {rss_before} KiB to {rss_after} KiB");
}
