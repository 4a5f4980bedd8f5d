//! Throughput of the relay's frame-header tracker (`Tracker::feed`).
//!
//! The relay feeds each buffer fill (16 KiB by default) to the tracker, re-feeding the rest after
//! every control event; these benchmarks do the same over pre-encoded streams:
//!
//! - `client_64B_masked`: many small masked client frames (header-bound work);
//! - `backend_16KiB`: large unmasked backend frames (payload skipping);
//! - `client_ping_125B_masked`: control frames, whose payload is unmasked and copied.
//!
//! Run: `cargo bench --bench frame` (quick: `-- --warm-up-time 1 --measurement-time 2`).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use portcullis::codec::{encode, Event, FrameLimits, Side, Tracker};

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
/// Relay buffer size: the stream is fed in chunks of this many bytes.
const CHUNK: usize = 16 * 1024;
/// Approximate size of each benchmark stream.
const STREAM: usize = 4 << 20;

fn limits() -> FrameLimits {
    FrameLimits { max_frame_size: 1 << 20, max_message_size: 1 << 30, allowed_rsv: 0 }
}

/// A stream of `opcode` frames with `payload_len`-byte payloads, about `STREAM` bytes long.
fn stream(opcode: u8, mask: Option<[u8; 4]>, payload_len: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..payload_len).map(|i| i as u8).collect();
    let mut out = Vec::with_capacity(STREAM + payload_len + 14);
    while out.len() < STREAM {
        encode(true, 0, opcode, mask, &payload, &mut out);
    }
    out
}

/// Feeds `data` in relay-sized chunks; returns (data frames, control frames) so nothing is
/// optimised away.
fn feed_all(sender: Side, data: &[u8]) -> (u64, u64) {
    let mut t = Tracker::new(sender, limits());
    let mut controls = 0;
    for chunk in data.chunks(CHUNK) {
        let mut pos = 0;
        while pos < chunk.len() {
            let (n, ev) = t.feed(black_box(&chunk[pos..]));
            pos += n;
            match ev {
                None => {}
                Some(Event::Control(_)) => controls += black_box(t.control_payload()).len() as u64 / 125 + 1,
                Some(Event::Violation(v)) => panic!("benchmark stream violates the protocol: {v}"),
            }
        }
    }
    (t.take_data_frames(), controls)
}

fn bench_feed(c: &mut Criterion) {
    let cases = [
        ("client_64B_masked", Side::Client, stream(0x2, Some(MASK), 64)),
        ("backend_16KiB", Side::Backend, stream(0x2, None, 16 * 1024)),
        ("client_ping_125B_masked", Side::Client, stream(0x9, Some(MASK), 125)),
    ];
    let mut group = c.benchmark_group("tracker_feed");
    for (name, sender, data) in &cases {
        let (data_frames, controls) = feed_all(*sender, data);
        assert!(data_frames + controls > 0);
        group.throughput(Throughput::Bytes(data.len() as u64));
        group.bench_function(*name, |b| b.iter(|| feed_all(*sender, black_box(data))));
    }
    group.finish();
}

criterion_group!(benches, bench_feed);
criterion_main!(benches);
