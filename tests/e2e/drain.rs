//! Drain: SIGTERM closes every session with 1001 and the process exits 0 before drain_timeout.

use std::time::{Duration, Instant};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_100_open_sessions_sends_1001_to_each_and_exits_zero() {
    let backend = Backend::echo().await;
    drains_100_sessions(&draining(&backend).text()).await;
}

/// The same over thread-per-core workers: the sessions live on three threads' runtimes, and
/// the one drain reaches all of them before the workers stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_sessions_of_every_thread_per_core_worker() {
    let backend = Backend::echo().await;
    let text = draining(&backend).set("server.worker_threads", 3).set("server.worker_model", "thread_per_core").text();
    drains_100_sessions(&text).await;
}

fn draining(backend: &Backend) -> TestConfig {
    TestConfig::base(&[backend.addr.to_string()])
        .set("server.drain_timeout", "8s")
        .set("server.drain_spread", "1s")
        .one_address_load()
}

async fn drains_100_sessions(text: &str) {
    let mut proxy = ProxyProcess::start(text).await;
    let mut clients = Vec::new();
    for i in 0..100 {
        let mut c = upgrade(proxy.tls, true, &format!("/agents/a{i}/terminal"), &[]).await.expect("101");
        c.send(true, op::TEXT, b"hello").await;
        assert_eq!(c.recv().await.payload, b"hello");
        clients.push(c);
    }
    let (_, body) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&body, "portcullis_sessions_active"), 100.0);

    let started = Instant::now();
    proxy.signal("TERM");
    // /ready turns false as soon as the signal is handled, while sessions are still open.
    eventually_within(
        "/ready is 503 after SIGTERM",
        Duration::from_secs(2).saturating_sub(started.elapsed()),
        async || (http_get(proxy.admin, "/ready").await.0 == 503).then_some(()),
    )
    .await;

    let waits = clients.into_iter().map(|mut c| {
        tokio::spawn(async move {
            let f = c.recv_close().await;
            c.send(true, op::CLOSE, &f.payload).await;
            f.close_code()
        })
    });
    for w in waits {
        assert_eq!(w.await.expect("client task"), Some(1001));
    }
    let status = eventually_within(
        "the proxy exits, before drain_timeout",
        Duration::from_secs(8).saturating_sub(started.elapsed()),
        async || proxy.child.try_wait().expect("wait"),
    )
    .await;
    assert!(status.success(), "exit status {status}");
}

/// A session still open when `drain_timeout` closes what is left (its client did not answer the
/// drain's 1001 within the route's longer `close_timeout`) writes its end-of-session line too:
/// `drain`, by the proxy. Before, it went without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_drain_timeout_cuts_writes_its_end_line() {
    let backend = Backend::echo().await;
    let text = TestConfig::base(&[backend.addr.to_string()])
        .set("server.drain_timeout", "1s")
        .set("server.drain_spread", "0s")
        .set("routes.0.session.close_timeout", "30s")
        .text();
    let mut proxy = ProxyProcess::start_with_log(&text, "portcullis=info").await;
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("101");
    c.send(true, op::TEXT, b"hello").await;
    assert_eq!(c.recv().await.payload, b"hello");
    // The client reads the drain's close and never answers it.
    let logs = proxy.stop_and_collect_logs().await;
    assert_eq!(c.recv().await.close_code(), Some(1001));
    let ended: Vec<&str> = logs.lines().filter(|l| l.contains("session ended")).collect();
    assert_eq!(ended.len(), 1, "{logs}");
    for field in ["kind=\"websocket\"", "reason=\"drain\"", "closed_by=\"proxy\"", "close_code=1001"] {
        assert!(ended[0].contains(field), "{field} missing from {}", ended[0]);
    }
}
