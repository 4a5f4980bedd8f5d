//! The thread-per-core model (`worker_model = "thread_per_core"`): a current-thread runtime and
//! a listening socket per worker, with the process's limits, registry and drain shared by all.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

fn thread_per_core(backend: &Backend, workers: i64) -> TestConfig {
    TestConfig::base(&[backend.addr.to_string()])
        .one_address_load()
        .set("server.worker_threads", workers)
        .set("server.worker_model", "thread_per_core")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_per_core_runs_a_runtime_per_worker_and_the_kernel_spreads_connections_over_them() {
    let backend = Backend::echo().await;
    let mut proxy = ProxyProcess::start(&thread_per_core(&backend, 3).text()).await;
    let names = thread_names(proxy.child.id());
    // Worker 0 is the main thread; workers 1 and 2 have threads of their own, and there is no
    // multi-thread runtime.
    for w in ["pc-worker-1", "pc-worker-2"] {
        assert!(names.iter().any(|n| n == w), "no thread {w}: {names:?}");
    }
    assert!(!names.iter().any(|n| n == "tokio-rt-worker"), "{names:?}");
    assert!(!names.iter().any(|n| n == "pc-worker-3"), "{names:?}");

    // 60 sessions, each from its own source port: the kernel hashes them over the three
    // sockets of each listener (the chance that a worker gets none of 30 is 3 × (2/3)^30, about
    // 1 in 60,000).
    let mut sessions = Vec::new();
    for i in 0..60 {
        let tls = i % 2 == 0;
        let addr = if tls { proxy.tls } else { proxy.plain };
        let mut c = upgrade(addr, tls, &format!("/agents/a{i}/terminal"), &[]).await.expect("101");
        c.send(true, op::TEXT, format!("hello {i}").as_bytes()).await;
        assert_eq!(c.recv().await.payload, format!("hello {i}").as_bytes());
        sessions.push(c);
    }
    let (_, body) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&body, "portcullis_worker_threads"), 3.0);
    assert_eq!(metric(&body, "portcullis_sessions_active"), 60.0);
    let per_worker: Vec<f64> =
        (0..3).map(|w| metric(&body, &format!("portcullis_worker_connections_total{{worker=\"{w}\"}}"))).collect();
    assert_eq!(per_worker.iter().sum::<f64>(), 60.0, "{per_worker:?}");
    assert!(per_worker.iter().all(|n| *n > 0.0), "every worker accepts: {per_worker:?}");
    // Every session still relays after the others opened.
    for (i, c) in sessions.iter_mut().enumerate() {
        c.send(true, op::TEXT, format!("again {i}").as_bytes()).await;
        assert_eq!(c.recv().await.payload, format!("again {i}").as_bytes());
    }
    drop(sessions);
    let logs = proxy.stop_and_collect_logs().await;
    assert!(logs.contains("worker_threads 3 (thread_per_core)"), "the model in the start line: {logs}");
    assert!(
        logs.contains("thread-per-core: one runtime and one socket per address on each worker workers=3"),
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_is_the_processs_not_each_workers() {
    let backend = Backend::echo().await;
    let text = thread_per_core(&backend, 2).set("server.max_connections", 20).text();
    let proxy = ProxyProcess::start(&text).await;
    let mut sessions = Vec::new();
    for i in 0..20 {
        let mut c = upgrade(proxy.plain, false, &format!("/agents/a{i}/terminal"), &[]).await.expect("101");
        c.send(true, op::TEXT, b"in").await;
        assert_eq!(c.recv().await.payload, b"in");
        sessions.push(c);
    }
    let (_, body) = http_get(proxy.admin, "/metrics").await;
    let per_worker = [0, 1].map(|w| metric(&body, &format!("portcullis_worker_connections_total{{worker=\"{w}\"}}")));
    assert!(per_worker.iter().all(|n| *n > 0.0), "both workers hold sessions: {per_worker:?}");

    // Ten more connections, whichever worker each lands on: each is closed unanswered, since
    // the 20 held on both workers fill the process's one cap.
    for _ in 0..10 {
        let mut s = TcpStream::connect(proxy.plain).await.expect("the kernel accepts");
        let request = "GET /agents/x/terminal HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        let _ = s.write_all(request.as_bytes()).await;
        let mut out = Vec::new();
        let read = tokio::time::timeout(SOON, s.read_to_end(&mut out)).await.expect("closed in time");
        assert!(read.is_err() || out.is_empty(), "over the cap, no answer: {:?}", String::from_utf8_lossy(&out));
    }
    let (_, body) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&body, "portcullis_connections_rejected_total"), 10.0);

    // One session ends: its place is free for a connection on either worker.
    let mut c = sessions.pop().expect("a session");
    c.send(true, op::CLOSE, &1000u16.to_be_bytes()).await;
    let _ = c.read_to_end().await;
    eventually("the session's place under the cap is free again", async || {
        let (_, body) = http_get(proxy.admin, "/metrics").await;
        (metric(&body, "portcullis_connections_active") == 19.0).then_some(())
    })
    .await;
    let mut again = upgrade(proxy.plain, false, "/agents/again/terminal", &[]).await.expect("101 under the cap");
    again.send(true, op::TEXT, b"again").await;
    assert_eq!(again.recv().await.payload, b"again");
    for c in &mut sessions {
        c.send(true, op::TEXT, b"still").await;
        assert_eq!(c.recv().await.payload, b"still");
    }
}
