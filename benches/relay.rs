//! Throughput of the whole relay (`portcullis::proxy::relay::relay`) over in-memory streams.
//!
//! One session runs for the whole benchmark between two `tokio::io::duplex` pipes: each
//! iteration writes ~1 MiB of masked client frames of one size (64 B to 64 KiB payloads) into the
//! client side and reads the same bytes out of the backend side, so it measures the relay's
//! steady state: buffer pool, frame tracking, the session state machine, deadlines and counters,
//! with no kernel in the way (the socket costs are measured by `loadtest/`, see BENCHMARKS.md).
//!
//! Run: `cargo bench --bench relay` (quick: `-- --warm-up-time 1 --measurement-time 2`).

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use portcullis::config::{RateAction, SessionRate, SessionSettings};
use portcullis::metrics::Metrics;
use portcullis::proxy::relay::{relay, RelayParams};
use portcullis::session::SessionControl;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Bytes written per iteration (rounded up to whole frames).
const BATCH: usize = 1 << 20;
/// Capacity of each in-memory pipe, like a socket buffer.
const PIPE: usize = 256 * 1024;

/// Session settings without session rates, or with rates so high they are never reached (the
/// throttle's bookkeeping runs on every read, no pause happens).
fn settings(rated: bool) -> SessionSettings {
    let hour = Duration::from_secs(3600);
    let rate = if rated { SessionRate { messages: u32::MAX, bytes: u64::MAX >> 1 } } else { SessionRate::default() };
    SessionSettings {
        ping_interval: Duration::ZERO,
        ping_timeout: hour,
        idle_timeout: hour,
        max_lifetime: Duration::ZERO,
        close_timeout: Duration::from_secs(1),
        max_frame_size: 1 << 20,
        max_message_size: 1 << 24,
        buffer_size: 16 * 1024,
        client_rate: rate,
        backend_rate: rate,
        rate_burst: Duration::from_secs(1),
        rate_action: RateAction::Slow,
    }
}

/// Masked binary client frames with `payload`-byte payloads, at least `BATCH` bytes in all.
fn batch(payload: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..payload).map(|i| i as u8).collect();
    let mut out = Vec::with_capacity(BATCH + payload + 14);
    while out.len() < BATCH {
        portcullis::codec::encode(true, 0, 2, Some([0x37, 0xfa, 0x21, 0x3d]), &data, &mut out);
    }
    out
}

/// The client's and the backend's ends of a live relay session.
fn session(rt: &tokio::runtime::Runtime, rated: bool) -> (DuplexStream, DuplexStream) {
    let (client_app, client_proxy) = tokio::io::duplex(PIPE);
    let (backend_proxy, backend_app) = tokio::io::duplex(PIPE);
    let params = RelayParams {
        settings: Arc::new(settings(rated)),
        drain_spread: Duration::ZERO,
        allowed_rsv: 0,
        control: SessionControl::new(),
        metrics: Metrics::global(),
        expires_at: None,
        taps: Default::default(),
    };
    rt.spawn(relay(client_proxy, Vec::new(), backend_proxy, Vec::new(), params));
    (client_app, backend_app)
}

fn bench_relay(c: &mut Criterion) {
    bench_group(c, "relay_client_to_backend", false);
    bench_group(c, "relay_client_to_backend_rated", true);
}

fn bench_group(c: &mut Criterion, name: &str, rated: bool) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut group = c.benchmark_group(name);
    for payload in [64usize, 1024, 16 * 1024, 64 * 1024] {
        let data = batch(payload);
        let (mut client, mut backend) = session(&rt, rated);
        let mut sink = vec![0u8; data.len()];
        group.throughput(Throughput::Bytes(data.len() as u64));
        group.bench_function(BenchmarkId::from_parameter(format!("{payload}B")), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let (w, r) = tokio::join!(client.write_all(&data), backend.read_exact(&mut sink));
                    w.expect("client write");
                    r.expect("backend read");
                })
            })
        });
        assert_eq!(sink, data, "the relay must deliver the client's frames byte for byte");
    }
    group.finish();
}

criterion_group!(benches, bench_relay);
criterion_main!(benches);
