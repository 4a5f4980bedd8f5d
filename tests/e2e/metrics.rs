//! `/metrics` shows the core counters moving.

use crate::harness::*;

#[tokio::test]
async fn metrics_move_with_a_session() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start(backend.addr, "").await;
    let (status, before) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(status, 200);
    let series = [
        "portcullis_connections_total",
        "portcullis_upgrades_total{route=\"terminal\",result=\"ok\"}",
        "portcullis_frames_total{direction=\"client_to_backend\"}",
        "portcullis_frames_total{direction=\"backend_to_client\"}",
        "portcullis_bytes_total{direction=\"client_to_backend\"}",
        "portcullis_bytes_total{direction=\"backend_to_client\"}",
        "portcullis_closes_total{code=\"1000\",initiator=\"client\"}",
        "portcullis_backend_connect_seconds_count",
    ];
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("101");
    for _ in 0..3 {
        c.send(true, op::TEXT, b"count me").await;
        c.recv().await;
    }
    c.send(true, op::CLOSE, &close_payload(1000, "")).await;
    c.recv().await;
    c.expect_eof().await;
    let _ = raw_request(proxy.tls, true, b"GET /nope HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n").await;
    // The session's end is recorded right after its sockets close.
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let (_, after) = http_get(proxy.admin, "/metrics").await;
        let moved: Vec<_> = series.iter().filter(|s| metric(&after, s) > metric(&before, s)).collect();
        if moved.len() == series.len()
            && metric(&after, "portcullis_upgrades_total{route=\"none\",result=\"no_route\"}") >= 1.0
        {
            assert!(after.contains("portcullis_connections_active"));
            assert!(after.contains("portcullis_sessions_active"));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not all moved: {moved:?}\n{after}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (live, _) = http_get(proxy.admin, "/live").await;
    let (ready, _) = http_get(proxy.admin, "/ready").await;
    assert_eq!((live, ready), (200, 200));
}
