//! Deadlines: proxy pings and ping timeout, idle timeout, max lifetime, close timeout.

use std::time::{Duration, Instant};

use crate::harness::*;

#[tokio::test]
async fn client_that_stops_answering_pings_is_closed_within_interval_plus_timeout() {
    let backend = Backend::echo().await;
    let proxy =
        Proxy::start_with_session(backend.addr, json!({"ping_interval": "300ms", "ping_timeout": "300ms"})).await;
    // Timed from before the upgrade: the proxy's clock for the session cannot start earlier.
    let started = Instant::now();
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("101");
    let ping = c.recv().await;
    assert_eq!(ping.opcode, op::PING, "the proxy pings a silent client");
    let close = c.recv_close().await;
    let elapsed = started.elapsed();
    assert_eq!(close.close_code(), Some(1001));
    assert!(elapsed >= Duration::from_millis(600), "not before interval + timeout: {elapsed:?}");
    assert!(elapsed <= Duration::from_millis(600 + 1500), "within interval + timeout + slack: {elapsed:?}");
    let at_backend = backend.log.wait_for("close", |f| f.opcode == op::CLOSE).await;
    assert_eq!(at_backend.close_code(), Some(1001));
}

#[tokio::test]
async fn pong_answering_the_proxy_ping_keeps_the_session_and_is_not_forwarded() {
    let backend = Backend::echo().await;
    let proxy =
        Proxy::start_with_session(backend.addr, json!({"ping_interval": "200ms", "ping_timeout": "200ms"})).await;
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("101");
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(1200) {
        let f = c.recv().await;
        assert_eq!(f.opcode, op::PING, "no close while pongs come back");
        c.send(true, op::PONG, &f.payload).await;
        pings += 1;
    }
    assert!(pings >= 3, "pinged every interval of silence: {pings}");
    c.send(true, op::TEXT, b"alive").await;
    loop {
        let f = c.recv().await;
        if f.opcode == op::TEXT {
            assert_eq!(f.payload, b"alive");
            break;
        }
        c.send(true, op::PONG, &f.payload).await;
    }
    assert!(backend.log.frames().iter().all(|f| f.opcode != op::PONG), "the proxy's pongs are consumed");
}

#[tokio::test]
async fn idle_session_is_closed_with_1000_at_idle_timeout_even_while_pongs_flow() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start_with_session(
        backend.addr,
        json!({"idle_timeout": "600ms", "ping_interval": "150ms", "ping_timeout": "1s"}),
    )
    .await;
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("101");
    c.send(true, op::TEXT, b"one message").await;
    let started = Instant::now();
    let close = loop {
        let f = c.recv().await;
        match f.opcode {
            op::PING => c.send(true, op::PONG, &f.payload).await,
            op::CLOSE => break f,
            _ => {}
        }
    };
    let elapsed = started.elapsed();
    assert_eq!(close.close_code(), Some(1000));
    assert_eq!(close.close_reason(), "idle timeout");
    assert!(elapsed >= Duration::from_millis(450) && elapsed <= Duration::from_millis(600 + 1500), "{elapsed:?}");
    let at_backend = backend.log.wait_for("close", |f| f.opcode == op::CLOSE).await;
    assert_eq!(at_backend.close_code(), Some(1000));
}

#[tokio::test]
async fn data_keeps_an_idle_timer_from_firing() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start_with_session(backend.addr, json!({"idle_timeout": "500ms"})).await;
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("101");
    for i in 0..8u8 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        c.send(true, op::TEXT, &[b'0' + i]).await;
        let f = c.recv().await;
        assert_eq!(f.opcode, op::TEXT, "message {i} echoed, not closed");
    }
}

#[tokio::test]
async fn session_reaching_max_lifetime_is_closed_with_1001() {
    let backend = Backend::echo().await;
    let proxy = Proxy::start_with_session(backend.addr, json!({"max_lifetime": "700ms"})).await;
    let started = Instant::now();
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("101");
    // Busy sessions are closed too.
    let close = loop {
        c.send(true, op::TEXT, b"busy").await;
        let f = c.recv().await;
        if f.opcode == op::CLOSE {
            break f;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(close.close_code(), Some(1001));
    assert_eq!(close.close_reason(), "session lifetime reached");
    assert!(started.elapsed() >= Duration::from_millis(700), "not before the lifetime");
    assert_eq!(backend.log.wait_for("close", |f| f.opcode == op::CLOSE).await.close_code(), Some(1001));
}

#[tokio::test]
async fn close_without_reply_ends_the_session_at_close_timeout() {
    let backend = Backend::start(BackendOpts::default(), silent_handler()).await;
    let proxy = Proxy::start_with_session(backend.addr, json!({"close_timeout": "400ms"})).await;
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("101");
    let started = Instant::now();
    c.send(true, op::CLOSE, &close_payload(1000, "done")).await;
    backend.log.wait_for("close", |f| f.opcode == op::CLOSE).await;
    c.expect_eof().await;
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(350), "waited for the reply: {elapsed:?}");
    assert!(elapsed <= Duration::from_millis(400 + 1500), "then gave up: {elapsed:?}");
}
