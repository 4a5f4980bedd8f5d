//! Session rates (frames and bytes per second, each direction; the sender slowed or the session
//! closed) and the bounded cost of a sender that floods, stalls inside a frame header, or talks
//! to a backend that never reads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

/// What a counting backend has received: data frames and their payload bytes.
#[derive(Default)]
struct Counts {
    frames: AtomicU64,
    bytes: AtomicU64,
}

/// A backend that counts what it receives (storing nothing) and sends the client a text frame
/// `tick` every 100 ms, so a test sees the other direction flow while one is held back.
fn counting_backend(counts: Arc<Counts>) -> Handler {
    Arc::new(move |s: BackendSession| {
        let counts = counts.clone();
        Box::pin(async move {
            let (mut rd, mut wr) = tokio::io::split(s.stream);
            let ticks = tokio::spawn(async move {
                let tick = encode(true, 0, op::TEXT, None, b"tick");
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if wr.write_all(&tick).await.is_err() {
                        return;
                    }
                }
            });
            while let Ok(f) = read_frame(&mut rd).await {
                if f.opcode == op::CLOSE {
                    break;
                }
                counts.frames.fetch_add(1, Ordering::Relaxed);
                counts.bytes.fetch_add(f.payload.len() as u64, Ordering::Relaxed);
            }
            ticks.abort();
        })
    })
}

/// Writes `chunk` over and over to `w` until `until`, each write bounded by that deadline (a
/// write blocked by backpressure is abandoned then). Returns the bytes the kernel took.
async fn flood<W: AsyncWriteExt + Unpin>(w: &mut W, chunk: &[u8], until: Instant) -> u64 {
    let mut written = 0u64;
    while Instant::now() < until {
        match tokio::time::timeout_at(until.into(), w.write(chunk)).await {
            Ok(Ok(n)) if n > 0 => written += n as u64,
            _ => break,
        }
    }
    written
}

/// `n` masked one-byte binary frames back to back (7 bytes each).
fn tiny_frames(n: usize) -> Vec<u8> {
    (0..n).flat_map(|_| encode(true, 0, op::BINARY, Some(rand_mask()), b"x")).collect()
}

#[tokio::test]
async fn a_flood_of_tiny_frames_is_slowed_to_the_client_rate_with_bounded_memory() {
    let counts = Arc::new(Counts::default());
    let backend = Backend::start(BackendOpts::default(), counting_backend(counts.clone())).await;
    // A child process: the relay-buffer gauge and the resident memory are this session's alone.
    let session = json!({
        "client_message_rate": 100,
        "client_byte_rate": "0",
        "rate_burst": "500ms",
        "rate_action": "slow",
        "buffer_size": "1KiB",
    });
    let proxy =
        ProxyProcess::start(&TestConfig::base(&[backend.addr.to_string()]).merge("session", session).text()).await;
    let c = upgrade(proxy.plain, false, "/agents/a1/terminal", &[]).await.expect("101");
    let (mut rd, mut wr) = tokio::io::split(c.io);
    let started = Instant::now();
    let flood_for = Duration::from_secs(2);
    // Counts the backend's ticks that reach the client while the flood runs.
    let ticks = tokio::spawn(async move {
        let mut n = 0;
        while let Ok(Ok(f)) = tokio::time::timeout_at((started + flood_for).into(), read_frame(&mut rd)).await {
            if f.opcode == op::CLOSE {
                break;
            }
            n += 1;
        }
        n
    });
    let rss_before = rss_kib(proxy.child.id());
    let chunk = tiny_frames(1000);
    let sampler = {
        let admin = proxy.admin;
        tokio::spawn(async move {
            let mut max = 0.0f64;
            while started.elapsed() < flood_for {
                tokio::time::sleep(Duration::from_millis(100)).await;
                max = max.max(metric(&http_get(admin, "/metrics").await.1, "portcullis_relay_buffer_bytes"));
            }
            max
        })
    };
    let written = flood(&mut wr, &chunk, started + flood_for).await;
    let elapsed = started.elapsed().as_secs_f64();
    let received = counts.frames.load(Ordering::Relaxed);
    let max_buffered = sampler.await.expect("sampler");
    let rss_after = rss_kib(proxy.child.id());

    // At most the rate over the elapsed time, plus the burst, plus what one read of the 1 KiB
    // buffer held when the limit was reached (146 frames).
    let bound = 100.0 * (elapsed + 0.5) + 146.0;
    assert!((received as f64) <= bound * 1.1, "backend got {received} frames in {elapsed:.2}s; bound {bound:.0}");
    assert!(received >= 100, "the client was slowed, not stopped: {received} frames");
    let sent = written / 7;
    assert!(sent > 10 * received, "the flood was held back by TCP: {sent} frames written, {received} relayed");
    assert!(max_buffered <= 4.0 * 1024.0, "relay buffers held {max_buffered} bytes");
    assert!(rss_after < rss_before + 4096, "proxy memory grew from {rss_before} KiB to {rss_after} KiB");
    let (_, body) = http_get(proxy.admin, "/metrics").await;
    let pauses = metric(&body, r#"portcullis_session_rate_pauses_total{direction="client_to_backend"}"#);
    assert!(pauses >= 1.0, "pauses counted: {pauses}");
    // The other direction kept flowing while the client was held back.
    drop(wr);
    let ticks = ticks.await.expect("reader");
    assert!(ticks >= 10, "the backend's ticks reached the client during the flood: {ticks}");
}

#[tokio::test]
async fn a_byte_flood_is_slowed_to_the_client_byte_rate() {
    let counts = Arc::new(Counts::default());
    let backend = Backend::start(BackendOpts::default(), counting_backend(counts.clone())).await;
    let session = json!({
        "client_message_rate": 0,
        "client_byte_rate": "256KiB",
        "rate_burst": "500ms",
        "buffer_size": "16KiB",
    });
    let proxy =
        Proxy::start_with(&TestConfig::base(&[backend.addr.to_string()]).merge("session", session).text()).await;
    let c = upgrade(proxy.plain, false, "/agents/a1/terminal", &[]).await.expect("101");
    let (_rd, mut wr) = tokio::io::split(c.io);
    let chunk = encode(true, 0, op::BINARY, Some(rand_mask()), &[5u8; 16 * 1024]);
    let started = Instant::now();
    let written = flood(&mut wr, &chunk, started + Duration::from_secs(2)).await;
    let elapsed = started.elapsed().as_secs_f64();
    let received = counts.bytes.load(Ordering::Relaxed) as f64;
    let bound = 256.0 * 1024.0 * (elapsed + 0.5) + 16.0 * 1024.0;
    assert!(received <= bound * 1.1, "backend got {received} bytes in {elapsed:.2}s; bound {bound:.0}");
    assert!(received >= 256.0 * 1024.0, "slowed, not stopped: {received} bytes");
    assert!(written as f64 > 2.0 * received, "held back by TCP: {written} written, {received} relayed");
}

#[tokio::test]
async fn over_the_rate_with_the_close_action_the_client_gets_1008_and_the_slot_is_freed() {
    let backend = Backend::echo().await;
    let session = json!({
        "client_message_rate": 20,
        "rate_burst": "1s",
        "rate_action": "close",
    });
    let text = TestConfig::base(&[backend.addr.to_string()])
        .merge("session", session)
        .merge("server", json!({"max_connections_per_ip": 1}))
        .text();
    let proxy = Proxy::start_with(&text).await;
    let series = r#"portcullis_limit_refusals_total{reason="session_rate"}"#;
    let before = metric(&http_get(proxy.admin, "/metrics").await.1, series);
    let mut c = upgrade(proxy.plain, false, "/agents/a1/terminal", &[]).await.expect("101");
    // Within the burst: delivered and echoed.
    c.send(true, op::TEXT, b"hello").await;
    assert_eq!(c.recv().await.payload, b"hello");
    // A hundred frames at once: over 20/s with a one-second burst.
    c.send_raw(&tiny_frames(100)).await;
    let close = c.recv_close().await;
    assert_eq!(close.close_code(), Some(1008));
    assert_eq!(&close.payload[2..], b"rate limit");
    let to_backend = backend.log.wait_for("the proxy's close", |f| f.opcode == op::CLOSE).await;
    assert_eq!(to_backend.close_code(), Some(1001));
    assert_eq!(&to_backend.payload[2..], b"client rate limit");
    let after = metric(&http_get(proxy.admin, "/metrics").await.1, series);
    assert!(after >= before + 1.0, "refusal counted: {before} -> {after}");
    // The session and its per-address slot are released: a new session opens.
    drop(c);
    eventually("the slot of the closed session is free", async || {
        if let Ok(c) = upgrade(proxy.plain, false, "/agents/a1/terminal", &[]).await {
            return Some(c);
        }
        // Each try is a new connection: no faster than the default per-address connection
        // rate (20/s) lets them in.
        tokio::time::sleep(Duration::from_millis(50)).await;
        None
    })
    .await;
}

#[tokio::test]
async fn a_backend_over_its_rate_is_slowed_and_closed_with_1008_under_the_close_action() {
    // Slow: a backend flooding tiny frames reaches the client at its rate.
    let flood_handler: Handler = Arc::new(|mut s: BackendSession| {
        Box::pin(async move {
            let chunk: Vec<u8> = (0..1000).flat_map(|_| encode(true, 0, op::BINARY, None, b"y")).collect();
            let _ = flood(&mut s.stream, &chunk, Instant::now() + Duration::from_secs(2)).await;
            let mut sink = [0u8; 1024];
            while matches!(s.stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
    });
    let backend = Backend::start(BackendOpts::default(), flood_handler).await;
    let session = json!({
        "backend_message_rate": 100,
        "rate_burst": "500ms",
        "buffer_size": "1KiB",
    });
    let proxy =
        Proxy::start_with(&TestConfig::base(&[backend.addr.to_string()]).merge("session", session).text()).await;
    let mut c = upgrade(proxy.plain, false, "/agents/a1/terminal", &[]).await.expect("101");
    let started = Instant::now();
    let mut received = 0u64;
    while started.elapsed() < Duration::from_secs(2) {
        match tokio::time::timeout(Duration::from_millis(100), read_frame(&mut c.io)).await {
            Ok(Ok(_)) => received += 1,
            Ok(Err(e)) => panic!("session ended: {e}"),
            Err(_) => {}
        }
    }
    let bound = 100.0 * (started.elapsed().as_secs_f64() + 0.5) + 342.0; // + one 1 KiB read of 3-byte frames
    assert!((received as f64) <= bound * 1.1, "client got {received} frames; bound {bound:.0}");
    assert!(received >= 100, "slowed, not stopped: {received}");

    // Close: the backend gets 1008, the client 1001.
    let session = json!({
        "backend_message_rate": 20,
        "rate_burst": "1s",
        "rate_action": "close",
    });
    let proxy =
        Proxy::start_with(&TestConfig::base(&[backend.addr.to_string()]).merge("session", session).text()).await;
    let mut c = upgrade(proxy.plain, false, "/agents/a1/terminal", &[]).await.expect("101");
    let close = c.recv_close().await;
    assert_eq!(close.close_code(), Some(1001));
    assert_eq!(&close.payload[2..], b"backend rate limit");
}

#[tokio::test]
async fn a_frame_header_left_half_sent_is_closed_at_the_idle_timeout() {
    let backend = Backend::start(BackendOpts::default(), silent_handler()).await;
    let proxy = Proxy::start_with_session(backend.addr, json!({"idle_timeout": "400ms"})).await;
    let mut c = upgrade(proxy.plain, false, "/agents/a1/terminal", &[]).await.expect("101");
    // The first byte of a masked binary frame's header, then nothing.
    c.send_raw(&[0x82]).await;
    let started = Instant::now();
    let close = c.recv_close().await;
    assert_eq!(close.close_code(), Some(1000));
    assert_eq!(&close.payload[2..], b"idle timeout");
    assert!(started.elapsed() < Duration::from_secs(3), "closed after {:?}", started.elapsed());
    // The held byte was never forwarded: the backend's first frame is the proxy's close, whole.
    let f = backend.log.wait_for("the proxy's close", |f| f.opcode == op::CLOSE).await;
    assert_eq!(f.close_code(), Some(1000));
    assert_eq!(backend.log.frames().len(), 1, "{:?}", backend.log.frames());
}

#[tokio::test]
async fn a_backend_that_never_reads_holds_the_client_back_and_harms_no_other_session() {
    let handler: Handler = Arc::new(|s: BackendSession| {
        if s.request.path.contains("/stall/") {
            Box::pin(async move {
                let _held = s.stream;
                tokio::time::sleep(Duration::from_secs(30)).await;
            })
        } else {
            (echo_handler())(s)
        }
    });
    let backend = Backend::start(BackendOpts::default(), handler).await;
    // Client rates off: only TCP backpressure holds the flood back here.
    let session = json!({
        "client_message_rate": 0,
        "client_byte_rate": "0",
        "buffer_size": "16KiB",
    });
    let text = TestConfig::base(&[backend.addr.to_string()])
        .merge("session", session)
        .merge(
            "",
            json!({"routes": [{"name": "stall", "path": "/stall/{agent}", "backends": [backend.addr.to_string()]}]}),
        )
        .text();
    let proxy = ProxyProcess::start(&text).await;
    let c = upgrade(proxy.plain, false, "/stall/a1", &[]).await.expect("101");
    let (_rd, mut wr) = tokio::io::split(c.io);
    let chunk = encode(true, 0, op::BINARY, Some(rand_mask()), &[9u8; 16 * 1024]);
    let flooding = tokio::spawn(async move { flood(&mut wr, &chunk, Instant::now() + Duration::from_secs(3)).await });
    // Meanwhile another session on the same proxy echoes promptly.
    let mut other = upgrade(proxy.plain, false, "/agents/a2/terminal", &[]).await.expect("101");
    let mut max_buffered = 0.0f64;
    for i in 0..10u8 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let sent = Instant::now();
        other.send(true, op::TEXT, &[b'a' + i]).await;
        assert_eq!(other.recv().await.payload, vec![b'a' + i]);
        assert!(sent.elapsed() < Duration::from_secs(1), "echo took {:?}", sent.elapsed());
        max_buffered =
            max_buffered.max(metric(&http_get(proxy.admin, "/metrics").await.1, "portcullis_relay_buffer_bytes"));
    }
    let written = flooding.await.expect("flood");
    assert!(written < 48 << 20, "backpressure reached the client: it wrote {written} bytes in 3 s");
    assert!(max_buffered <= 3.0 * 16.0 * 1024.0, "relay buffers held {max_buffered} bytes");
}
