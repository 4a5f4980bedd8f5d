//! Resume after a network blip (`[routes.resume]`): a client whose connection drops without a
//! close frame is re-attached to the same backend session when it reconnects with the same
//! resume id, gets the output produced meanwhile first, and a reconnect after the window (or
//! after the buffer filled) starts fresh; another subject's token cannot take the id.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::harness::*;

/// An echo backend that also answers `later <n> <size>` with `n` binary frames (`gap <i>`,
/// padded to `size` bytes) 150 ms later, while the client may be gone. `sent` counts the
/// frames sent that way.
/// A backend that echoes, and answers `later N [SIZE]` with N frames 150 ms later; `gated N
/// [SIZE]` sends them once the test opens the gate (`sent.2.notify_one()`). Counts what it sent.
async fn ticker() -> (Backend, Arc<(AtomicUsize, tokio::sync::Notify, tokio::sync::Notify)>) {
    let sent = Arc::new((AtomicUsize::new(0), tokio::sync::Notify::new(), tokio::sync::Notify::new()));
    let counter = sent.clone();
    let handler: Handler = Arc::new(move |s: BackendSession| {
        let sent = counter.clone();
        Box::pin(async move {
            let (mut rd, wr) = tokio::io::split(s.stream);
            let wr = Arc::new(tokio::sync::Mutex::new(wr));
            loop {
                let Ok(f) = read_frame(&mut rd).await else {
                    *s.log.eofs.lock().expect("lock") += 1;
                    s.log.notify.notify_waiters();
                    return;
                };
                s.log.record(f.clone());
                let text = String::from_utf8_lossy(&f.payload).into_owned();
                let reply = match f.opcode {
                    op::CLOSE => {
                        let _ = wr.lock().await.write_all(&encode(true, 0, op::CLOSE, None, &f.payload)).await;
                        return;
                    }
                    op::PING => encode(true, 0, op::PONG, None, &f.payload),
                    op::PONG => continue,
                    _ if text.starts_with("later ") || text.starts_with("gated ") => {
                        let gated = text.starts_with("gated ");
                        let mut it = text.split(' ').skip(1).map(|n| n.parse::<usize>().unwrap_or(1));
                        let (n, size) = (it.next().unwrap_or(1), it.next().unwrap_or(0));
                        let (wr, sent) = (wr.clone(), sent.clone());
                        tokio::spawn(async move {
                            if gated {
                                sent.2.notified().await;
                            } else {
                                tokio::time::sleep(Duration::from_millis(150)).await;
                            }
                            for i in 0..n {
                                let mut payload = format!("gap {i}").into_bytes();
                                payload.resize(size.max(payload.len()), b'.');
                                if wr
                                    .lock()
                                    .await
                                    .write_all(&encode(true, 0, op::BINARY, None, &payload))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                                sent.0.fetch_add(1, Ordering::SeqCst);
                                sent.1.notify_waiters();
                            }
                        });
                        continue;
                    }
                    _ => encode(f.fin, f.rsv, f.opcode, None, &f.payload),
                };
                if wr.lock().await.write_all(&reply).await.is_err() {
                    return;
                }
            }
        })
    });
    (Backend::start(BackendOpts::default(), handler).await, sent)
}

async fn wait_sent(sent: &(AtomicUsize, tokio::sync::Notify, tokio::sync::Notify), n: usize) {
    tokio::time::timeout(SOON, async {
        loop {
            let notified = sent.1.notified();
            if sent.0.load(Ordering::SeqCst) >= n {
                return;
            }
            notified.await;
        }
    })
    .await
    .expect("the backend sent its frames in time");
}

/// A route `name` (metrics are per process: each test has its own) with a `resume` table
/// (`resume` merged into it) and a `session` table of its own.
fn resumable(
    name: &str,
    backend: std::net::SocketAddr,
    key: &Hmac,
    resume: serde_json::Value,
    session: serde_json::Value,
) -> TestConfig {
    TestConfig::base(&[backend.to_string()])
        .set("routes.0.name", name)
        .merge("", key.auth_keys())
        .merge("routes.0", json!({"auth": {"agent_claim": "agents", "required_claims": ["sub"]}}))
        .merge("routes.0", json!({"resume": {"notice": "fresh session"}}))
        .merge("routes.0.resume", resume)
        .merge("routes.0", json!({"session": session}))
}

/// The `resume` state `/sessions` shows for the route's one session, once it is `want`.
async fn wait_state(proxy: &Proxy, want: &str) {
    eventually(&format!("a session is {want}"), async || {
        let (_, body) = admin_request(proxy.admin, "GET", "/sessions", "").await;
        let v: Value = serde_json::from_str(&body).expect("json");
        v["sessions"].as_array().into_iter().flatten().any(|s| s["resume"] == want).then_some(())
    })
    .await
}

async fn wait_bytes_from_backend(proxy: &Proxy, n: u64) {
    eventually(&format!("the proxy read {n} bytes from the backend"), async || {
        let (_, body) = admin_request(proxy.admin, "GET", "/sessions", "").await;
        let v: Value = serde_json::from_str(&body).expect("json");
        (v["sessions"][0]["bytes_from_backend"].as_u64().unwrap_or(0) >= n).then_some(())
    })
    .await
}

/// A fresh session: the 101 names the resume id the proxy issued it, and the session's first
/// frame says it again (for browsers, which cannot read the 101). Returns the client, the id and
/// the size of that frame.
async fn open(proxy: &Proxy, auth: &str) -> (Client, String, u64) {
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", auth)]).await.expect("101");
    let id = c.response.header("portcullis-resume-id").expect("the 101 names the resume id").to_owned();
    let f = c.recv().await;
    assert_eq!(f.opcode, op::TEXT, "the first frame announces the id");
    let v: Value = serde_json::from_slice(&f.payload).expect("json");
    assert_eq!(v["portcullis"]["resume_id"], id.as_str());
    assert_eq!(id.len(), 22, "128 random bits, base64url: {id}");
    (c, id, 2 + f.payload.len() as u64)
}

/// A reconnect with `id`.
async fn connect(proxy: &Proxy, auth: &str, id: &str) -> Client {
    let path = format!("/agents/a1/terminal?resume={id}");
    upgrade(proxy.tls, true, &path, &[("Authorization", auth)]).await.expect("101")
}

#[tokio::test]
async fn a_client_that_drops_gets_the_same_session_back_with_the_output_of_the_gap() {
    let (backend, sent) = ticker().await;
    let key = hmac();
    let proxy =
        Proxy::start_with(&resumable("resume-gap", backend.addr, &key, json!({"window": "10s"}), json!({})).text())
            .await;
    let auth = key.bearer(&["a1"]);
    let (mut first, id, _) = open(&proxy, &auth).await;
    first.send(true, op::BINARY, b"hello").await;
    assert_eq!(first.recv().await.payload, b"hello");
    // The backend will answer while the client is gone: the TCP connection just drops. (Once
    // the proxy has parked the session: what it wrote to the dead socket before it knew is lost,
    // as resume.md says.)
    first.send(true, op::TEXT, b"gated 5").await;
    drop(first);
    wait_state(&proxy, "parked").await;
    sent.2.notify_one();
    wait_sent(&sent, 5).await;
    // Held by the proxy (not still in flight): the echo and five frames of 7 bytes (the
    // announcement is the proxy's own, not the backend's).
    wait_bytes_from_backend(&proxy, 7 + 5 * 7).await;

    let mut second = connect(&proxy, &auth, &id).await;
    for i in 0..5 {
        let f = second.recv().await;
        assert_eq!(f.payload, format!("gap {i}").as_bytes(), "the gap's output first, in order, whole frames");
    }
    second.send(true, op::BINARY, b"still there").await;
    assert_eq!(second.recv().await.payload, b"still there");
    assert_eq!(backend.log.requests.lock().expect("lock").len(), 1, "one backend session throughout");
    wait_state(&proxy, "attached").await;
    let (_, m) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&m, "portcullis_resume_parked_total{route=\"resume-gap\"}"), 1.0);
    assert_eq!(metric(&m, "portcullis_resume_resumed_total{route=\"resume-gap\"}"), 1.0);
    assert_eq!(metric(&m, "portcullis_resume_held{route=\"resume-gap\"}"), 0.0);
    assert_eq!(metric(&m, "portcullis_upgrades_total{route=\"resume-gap\",result=\"resumed\"}"), 1.0);
    // The client's own close ends it for good.
    second.send(true, op::CLOSE, &close_payload(1000, "")).await;
    assert_eq!(second.recv_close().await.close_code(), Some(1000));
}

#[tokio::test]
async fn a_resume_id_is_bound_to_its_subject_and_agent() {
    let (backend, _) = ticker().await;
    let key = hmac();
    let proxy = Proxy::start_with(&resumable("resume-bound", backend.addr, &key, json!({}), json!({})).text()).await;
    let (owner, id, _) = open(&proxy, &key.bearer(&["a1"])).await;
    drop(owner);
    wait_state(&proxy, "parked").await;
    // Another subject with a grant for the same agent.
    let mallory = format!("Bearer {}", key.token("mallory", &["a1"], Duration::from_secs(600)));
    let refused = upgrade(proxy.tls, true, &format!("/agents/a1/terminal?resume={id}"), &[("Authorization", &mallory)])
        .await
        .err()
        .expect("403");
    assert_eq!(refused.status, 403);
    // The same subject on another agent.
    let other_agent = upgrade(
        proxy.tls,
        true,
        &format!("/agents/a2/terminal?resume={id}"),
        &[("Authorization", &key.bearer(&["a1", "a2"]))],
    )
    .await
    .err()
    .expect("403");
    assert_eq!(other_agent.status, 403);
    let bad = upgrade(proxy.tls, true, "/agents/a1/terminal?resume=a%20b", &[("Authorization", &key.bearer(&["a1"]))])
        .await
        .err()
        .expect("400");
    assert_eq!(bad.status, 400);
    // The owner still gets it back.
    let mut back = connect(&proxy, &key.bearer(&["a1"]), &id).await;
    back.send(true, op::BINARY, b"mine").await;
    assert_eq!(back.recv().await.payload, b"mine");
    assert_eq!(backend.log.requests.lock().expect("lock").len(), 1);
    let (_, m) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&m, "portcullis_resume_refused_total{route=\"resume-bound\",reason=\"other_subject\"}"), 2.0);
    assert_eq!(metric(&m, "portcullis_resume_refused_total{route=\"resume-bound\",reason=\"invalid\"}"), 1.0);
}

/// Attack: with ids of the client's choosing, another subject who learns (or guesses) the id a
/// victim will use registers it first, and the victim's session is refused (403) or its
/// reconnects land nowhere. The proxy now issues every id: a client's own id registers nothing.
#[tokio::test]
async fn resume_ids_are_issued_by_the_proxy_so_a_chosen_id_cannot_be_squatted() {
    let (backend, _) = ticker().await;
    let key = hmac();
    let proxy = Proxy::start_with(&resumable("resume-squat", backend.addr, &key, json!({}), json!({})).text()).await;
    let mallory = format!("Bearer {}", key.token("mallory", &["a1"], Duration::from_secs(600)));
    let squat = connect(&proxy, &mallory, "alices-id").await;
    let issued = squat.response.header("portcullis-resume-id").expect("an id").to_owned();
    assert_ne!(issued, "alices-id", "the proxy does not take the client's id");
    // Alice, naming the id she was going to use, gets a fresh session of her own.
    let mut alice = connect(&proxy, &key.bearer(&["a1"]), "alices-id").await;
    let her_id = alice.response.header("portcullis-resume-id").expect("an id").to_owned();
    assert_ne!(her_id, issued);
    let announced: Value = serde_json::from_slice(&alice.recv().await.payload).expect("json");
    assert_eq!(announced["portcullis"]["resume_id"], her_id.as_str());
    alice.send(true, op::BINARY, b"mine").await;
    assert!(eventually_frame(&mut alice, b"mine").await);
    // A resume id is the proxy's business: it never goes on to the backend (found by an
    // attacker review: it did, in the query, where a backend given the token too held all it
    // takes to resume the user's parked session).
    let paths = backend.log.requests.lock().expect("lock").iter().map(|h| h.path.clone()).collect::<Vec<_>>();
    assert!(paths.iter().all(|p| !p.contains("resume")), "{paths:?}");
}

#[tokio::test]
async fn after_the_window_the_backend_gets_1001_and_a_reconnect_starts_fresh() {
    let (backend, _) = ticker().await;
    let key = hmac();
    let proxy = Proxy::start_with(
        &resumable("resume-window", backend.addr, &key, json!({"window": "300ms"}), json!({})).text(),
    )
    .await;
    let auth = key.bearer(&["a1"]);
    let (first, id, _) = open(&proxy, &auth).await;
    drop(first);
    let close = backend.log.wait_for("the window's close", |f| f.opcode == op::CLOSE).await;
    assert_eq!((close.close_code(), close.close_reason().as_str()), (Some(1001), "resume window over"));
    let mut again = connect(&proxy, &auth, &id).await;
    let new_id = again.response.header("portcullis-resume-id").expect("a new id").to_owned();
    assert_ne!(new_id, id, "the fresh session has an id of its own");
    let announced: Value = serde_json::from_slice(&again.recv().await.payload).expect("json");
    assert_eq!(announced["portcullis"]["resume_id"], new_id.as_str());
    assert_eq!(again.recv().await.payload, b"fresh session", "told it is a fresh session");
    assert_eq!(backend.log.requests.lock().expect("lock").len(), 2, "a new backend session");
    let (_, m) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&m, "portcullis_resume_expired_total{route=\"resume-window\",reason=\"window\"}"), 1.0);
}

#[tokio::test]
async fn output_beyond_the_buffer_ends_the_held_session_with_1001() {
    let (backend, _) = ticker().await;
    let key = hmac();
    let proxy = Proxy::start_with(
        &resumable("resume-overflow", backend.addr, &key, json!({"window": "30s", "buffer": "4KiB"}), json!({})).text(),
    )
    .await;
    let (mut first, _, _) = open(&proxy, &key.bearer(&["a1"])).await;
    first.send(true, op::TEXT, b"later 10 1000").await;
    drop(first);
    let close = backend.log.wait_for("the overflow's close", |f| f.opcode == op::CLOSE).await;
    assert_eq!((close.close_code(), close.close_reason().as_str()), (Some(1001), "resume buffer full"));
    let (_, m) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&m, "portcullis_resume_expired_total{route=\"resume-overflow\",reason=\"overflow\"}"), 1.0);
}

#[tokio::test]
async fn an_attached_session_cannot_be_taken_over_and_a_reconnect_is_taken_once_it_is_parked() {
    let (backend, _) = ticker().await;
    let key = hmac();
    let proxy = Proxy::start_with(&resumable("resume-takeover", backend.addr, &key, json!({}), json!({})).text()).await;
    let auth = key.bearer(&["a1"]);
    // The attack: the victim is attached; another connection with the same id and a token of
    // the same subject (stolen id, second tab) tries to take the live shell.
    let (mut victim, id, _) = open(&proxy, &auth).await;
    wait_state(&proxy, "attached").await;
    let refused = upgrade(proxy.tls, true, &format!("/agents/a1/terminal?resume={id}"), &[("Authorization", &auth)])
        .await
        .err()
        .expect("refused while attached");
    assert_eq!(refused.status, 409);
    victim.send(true, op::BINARY, b"still mine").await;
    let echoed = eventually_frame(&mut victim, b"still mine").await;
    assert!(echoed, "the victim lost its session");
    // Once the victim's connection drops without a close, the session is parked and the same
    // subject's reconnect gets it back.
    drop(victim);
    wait_state(&proxy, "parked").await;
    let mut back = connect(&proxy, &auth, &id).await;
    back.send(true, op::BINARY, b"from the new connection").await;
    assert!(eventually_frame(&mut back, b"from the new connection").await);
    assert_eq!(backend.log.requests.lock().expect("lock").len(), 1);
}

/// Reads frames until one carries `payload` (the ticker's own frames come in between).
async fn eventually_frame(c: &mut Client, payload: &[u8]) -> bool {
    for _ in 0..1000 {
        if c.recv().await.payload == payload {
            return true;
        }
    }
    false
}

#[tokio::test]
async fn a_resume_id_is_bound_to_the_issuer_and_a_route_with_resume_requires_a_subject() {
    let (backend, _) = ticker().await;
    let key = hmac();
    let proxy = Proxy::start_with(&resumable("resume-issuer", backend.addr, &key, json!({}), json!({})).text()).await;
    let token = |iss: &str| {
        format!("Bearer {}", key.token_with(serde_json::json!({ "sub": "alice", "agents": ["a1"], "iss": iss })))
    };
    let (victim, id, _) = open(&proxy, &token("https://idp-a.example")).await;
    drop(victim);
    wait_state(&proxy, "parked").await;
    // The same subject name from another issuer is someone else.
    let other = upgrade(
        proxy.tls,
        true,
        &format!("/agents/a1/terminal?resume={id}"),
        &[("Authorization", &token("https://idp-b.example"))],
    )
    .await
    .err()
    .expect("another issuer's alice is refused");
    assert_eq!(other.status, 403);
    // A token without a subject is refused by the route.
    let no_sub = format!("Bearer {}", key.token_with(serde_json::json!({ "agents": ["a1"] })));
    let refused = upgrade(proxy.tls, true, &format!("/agents/a1/terminal?resume={id}"), &[("Authorization", &no_sub)])
        .await
        .err()
        .expect("401");
    assert_eq!(refused.status, 401);
    // Validation: a resumable route whose tokens need no subject is refused.
    let text = TestConfig::base(&["127.0.0.1:1".to_string()])
        .merge("", key.auth_keys())
        .merge("routes.0", json!({"auth": {"agent_claim": "agents"}}))
        .merge("routes.0", json!({"resume": {"window": "5s"}}))
        .text();
    let err = portcullis::config::Config::parse(&text, std::path::Path::new("test.toml")).expect_err("refused");
    assert!(err.to_string().contains("required_claims"), "{err}");
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_held_like_a_dropped_one() {
    let (backend, _) = ticker().await;
    let key = hmac();
    let session = json!({"ping_interval": "100ms", "ping_timeout": "100ms"});
    let proxy = Proxy::start_with(&resumable("resume-ping", backend.addr, &key, json!({}), session).text()).await;
    let auth = key.bearer(&["a1"]);
    // This client reads nothing and answers no ping: as if its network vanished.
    let (mut silent, id, _) = open(&proxy, &auth).await;
    wait_state(&proxy, "parked").await;
    silent.expect_eof().await;
    let mut back = connect(&proxy, &auth, &id).await;
    back.send(true, op::BINARY, b"back").await;
    // Pings from the proxy may come first; the echo follows them.
    loop {
        let f = back.recv().await;
        if f.opcode == op::PING {
            back.send(true, op::PONG, &f.payload).await;
            continue;
        }
        assert_eq!(f.payload, b"back");
        break;
    }
    assert_eq!(backend.log.requests.lock().expect("lock").len(), 1);
}

#[tokio::test]
async fn a_client_that_drops_in_the_middle_of_a_frame_is_not_held() {
    let (backend, _) = ticker().await;
    let key = hmac();
    let proxy = Proxy::start_with(&resumable("resume-midframe", backend.addr, &key, json!({}), json!({})).text()).await;
    let (mut first, _, _) = open(&proxy, &key.bearer(&["a1"])).await;
    // The header and half the payload of a 100-byte frame, then the connection drops: the
    // backend has half a frame, and no other client may continue it.
    let frame = encode(true, 0, op::BINARY, Some(rand_mask()), &[7; 100]);
    first.send_raw(&frame[..60]).await;
    drop(first);
    // The partial frame cannot be closed cleanly: the backend's connection just ends.
    tokio::time::timeout(SOON, async {
        loop {
            let notified = backend.log.notify.notified();
            if *backend.log.eofs.lock().expect("lock") > 0 {
                return;
            }
            notified.await;
        }
    })
    .await
    .expect("the backend connection ends");
    let (_, m) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&m, "portcullis_resume_parked_total{route=\"resume-midframe\"}"), 0.0);
}

#[tokio::test]
async fn resume_needs_auth_on_its_route() {
    let text =
        TestConfig::base(&["127.0.0.1:1".to_string()]).merge("routes.0", json!({"resume": {"window": "5s"}})).text();
    let err = portcullis::config::Config::parse(&text, std::path::Path::new("test.toml")).expect_err("refused");
    assert!(err.to_string().contains("resume"), "{err}");
}

#[tokio::test]
async fn a_drain_ends_a_held_session_with_1001_to_the_backend() {
    let (backend, _) = ticker().await;
    let key = hmac();
    let mut proxy =
        Proxy::start_with(&resumable("resume-drain", backend.addr, &key, json!({"window": "30s"}), json!({})).text())
            .await;
    let (first, _, _) = open(&proxy, &key.bearer(&["a1"])).await;
    drop(first);
    wait_state(&proxy, "parked").await;
    proxy.drain();
    let close = backend.log.wait_for("the drain's close", |f| f.opcode == op::CLOSE).await;
    assert_eq!((close.close_code(), close.close_reason().as_str()), (Some(1001), "going away"));
    // The admin listener closes with the drain: the process's metrics, read directly.
    let m = portcullis::metrics::Metrics::global().render();
    assert_eq!(metric(&m, "portcullis_resume_expired_total{route=\"resume-drain\",reason=\"closed\"}"), 1.0);
    assert_eq!(metric(&m, "portcullis_resume_held{route=\"resume-drain\"}"), 0.0);
}

#[tokio::test]
async fn revoking_the_token_that_resumed_a_session_closes_it() {
    let (backend, _) = ticker().await;
    let key = hmac();
    let proxy = Proxy::start_with(&resumable("resume-jti", backend.addr, &key, json!({}), json!({})).text()).await;
    let token = |jti: &str| {
        format!("Bearer {}", key.token_with(serde_json::json!({ "sub": "alice", "agents": ["a1"], "jti": jti })))
    };
    let (first, id, _) = open(&proxy, &token("first")).await;
    drop(first);
    wait_state(&proxy, "parked").await;
    // The same subject comes back with a fresh token.
    let mut back = connect(&proxy, &token("second"), &id).await;
    wait_state(&proxy, "attached").await;
    let (status, body) = admin_post(proxy.admin, "/sessions/revoke", r#"{"jti":"second"}"#).await;
    assert_eq!((status, body.trim()), (200, r#"{"closed":1}"#), "the resumed session runs on the new token");
    let f = back.recv_close().await;
    assert_eq!((f.close_code(), f.close_reason().as_str()), (Some(1008), "session revoked"));
}

#[tokio::test]
async fn a_parked_session_counts_under_its_addresss_connection_cap_until_it_ends() {
    let (backend, _) = ticker().await;
    let key = hmac();
    let text = resumable("resume-per-ip", backend.addr, &key, json!({"window": "1s"}), json!({}))
        .merge("server", json!({"max_connections_per_ip": 64}))
        .text();
    let proxy = Proxy::start_with(&text).await;
    let connections = |top: &str| -> u64 {
        let v: serde_json::Value = serde_json::from_str(top).expect("json");
        v["per_ip"].as_array().and_then(|a| a.first()).and_then(|e| e["connections"].as_u64()).unwrap_or(0)
    };
    let (client, _, _) = open(&proxy, &key.bearer(&["a1"])).await;
    drop(client);
    wait_state(&proxy, "parked").await;
    // Parked: it holds a backend connection and a buffer, so it still counts for its address.
    let (_, top) = http_get(proxy.admin, "/limits?top=5").await;
    assert_eq!(connections(&top), 1, "a parked session escaped its address's cap: {top}");
    // The window ends: the place is free.
    eventually("the parked session's place is free", async || {
        let (_, top) = http_get(proxy.admin, "/limits?top=5").await;
        (connections(&top) == 0).then_some(())
    })
    .await;
}

/// CPU time `pid` has used so far, in clock ticks (user and system, `/proc/PID/stat`).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name and state.
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// Found by the attack on the descriptor budget's build: once `ping_interval` had passed in a
/// parked session, its client's ping (skipped while no client is attached) kept the session's
/// timer firing at once, and each parked session spun more than a core until its window ended
/// (four took the whole machine). Parked, a session waits on its backend and its window alone.
#[tokio::test]
async fn a_parked_session_waits_without_spinning() {
    let (backend, _) = ticker().await;
    let key = hmac();
    let session = json!({"ping_interval": "100ms", "ping_timeout": "1s"});
    let text = resumable("resume-spin", backend.addr, &key, json!({"window": "30s"}), session).text();
    let proxy = ProxyProcess::start_limited(&text, "portcullis=info", None).await;
    let auth = key.bearer(&["a1"]);
    let c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &auth)]).await.expect("101");
    drop(c);
    eventually("the session is parked", async || {
        let (_, body) = admin_request(proxy.admin, "GET", "/sessions", "").await;
        let v: Value = serde_json::from_str(&body).expect("json");
        v["sessions"].as_array().into_iter().flatten().any(|s| s["resume"] == "parked").then_some(())
    })
    .await;
    // Past the ping interval, then a second measured: a spinning task takes all of it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = proxy.child.id();
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_ticks(pid) - before;
    assert!(used < 30, "the proxy used {used} ticks (of 100 a second) in a second with one parked session");
}
