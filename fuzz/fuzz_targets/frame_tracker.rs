//! Fuzzes the relay's frame-header tracker with arbitrary bytes in arbitrary chunks.
//!
//! Input layout: `[limits, seed, data...]`.
//! - `limits` picks max frame size (bits 0-1), max message size (bits 2-3) and the allowed RSV
//!   bits (bits 4-6, used as the `0x70` mask directly);
//! - `seed` drives the chunk sizes;
//! - `data` is fed to a client-side and a backend-side tracker.
//!
//! Checked for both senders: no panic; every call consumes at most what it was given and all of
//! it unless it reports an event; nothing is fed after a violation; `bytes_into_frame()` stays
//! within one maximal frame; after a control event the payload is at most 125 bytes and the
//! frame at most 14 + 125 bytes; and the events (with their stream offsets) do not depend on
//! how the bytes were chunked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::codec::{Event, FrameLimits, Side, Tracker};

mod frame_limits;
use frame_limits::limits;

/// What the tracker reported: the event, the absolute offset where consumption stopped, and for
/// control frames the payload and wire length.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    event: Event,
    end: usize,
    payload: Vec<u8>,
    frame_len: usize,
}

/// Chunk sizes from a tiny xorshift; sizes 1..=max with a mix of small and large `max`.
struct Chunker(u32);

impl Chunker {
    fn next_len(&mut self) -> usize {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        let max = match x & 3 {
            0 | 1 => 4,
            2 => 32,
            _ => 1024,
        };
        1 + (x >> 8) as usize % max
    }
}

fn run(sender: Side, limits: FrameLimits, data: &[u8], mut chunker: Option<Chunker>) -> Vec<Seen> {
    let mut t = Tracker::new(sender, limits);
    let max_into = limits.max_frame_size.max(125).saturating_add(14);
    let mut seen = Vec::new();
    let mut offset = 0;
    while offset < data.len() {
        let len = chunker.as_mut().map_or(data.len(), Chunker::next_len).min(data.len() - offset);
        let chunk = &data[offset..offset + len];
        let mut pos = 0;
        while pos < chunk.len() {
            let (n, ev) = t.feed(&chunk[pos..]);
            assert!(n <= chunk.len() - pos, "consumed {n} of {} bytes", chunk.len() - pos);
            pos += n;
            assert!(t.bytes_into_frame() <= max_into, "bytes_into_frame {} > {max_into}", t.bytes_into_frame());
            match ev {
                None => assert_eq!(pos, chunk.len(), "stopped early without an event"),
                Some(event @ Event::Control(_)) => {
                    assert!(n > 0, "control event without consuming anything");
                    assert!(t.at_boundary() && !t.holding());
                    assert!(t.control_payload().len() <= 125);
                    assert!(t.frame_len() <= 139);
                    assert!(t.frame_len() >= 2 + t.control_payload().len());
                    seen.push(Seen {
                        event,
                        end: offset + pos,
                        payload: t.control_payload().to_vec(),
                        frame_len: t.frame_len(),
                    });
                }
                Some(event @ Event::Violation(v)) => {
                    assert!(matches!(portcullis::session::close::violation_code(v), 1002 | 1009));
                    seen.push(Seen { event, end: offset + pos, payload: Vec::new(), frame_len: 0 });
                    // Stop feeding after a violation, as the relay does.
                    return seen;
                }
            }
        }
        offset += len;
    }
    seen
}

fuzz_target!(|input: &[u8]| {
    let [limits_byte, seed, data @ ..] = input else { return };
    let limits = limits(*limits_byte);
    for sender in [Side::Client, Side::Backend] {
        let whole = run(sender, limits, data, None);
        let chunked = run(sender, limits, data, Some(Chunker((u32::from(*seed) * 0x0101_0101) | 1)));
        assert_eq!(whole, chunked, "{sender:?}: chunking changed the outcome");
    }
});
