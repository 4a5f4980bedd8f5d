//! Fuzzes the one codec's whole-frame reader (`portcullis::codec::Reader`, which fan-out streams
//! and clients and observers read with) with arbitrary bytes in arbitrary chunks.
//!
//! Input layout: `[limits, seed, data...]`, as `frame_tracker`.
//!
//! Checked for both senders: no panic; the frames handed out are the input's bytes, in order,
//! with nothing skipped or repeated; each is one whole frame (a tracker fed the frames handed
//! out consumes exactly each, one at a time); a data frame's payload is within the frame limit and a control frame's within 125
//! bytes; nothing is handed out after a violation; and what comes out does not depend on how
//! the bytes were chunked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::codec::{Event, FrameLimits, ReadError, Reader, Side, Tracker};

mod frame_limits;
use frame_limits::limits;

/// The frames read (their bytes) and whether a violation ended the stream.
fn read(sender: Side, limits: FrameLimits, chunks: &[&[u8]]) -> (Vec<Vec<u8>>, bool) {
    let mut r = Reader::new(sender, limits, &[], 64);
    // The frames handed out, fed again in order to a tracker of their own: each is exactly one
    // frame (a continuation is valid only after its message's first fragment, hence one
    // tracker for the whole stream).
    let mut replay = Tracker::new(sender, limits);
    let mut frames = Vec::new();
    for chunk in chunks {
        r.extend(chunk);
        loop {
            match r.parse() {
                Ok(Some(f)) => {
                    let t = &mut replay;
                    let (n, ev) = t.feed(&f.bytes);
                    assert_eq!(n, f.bytes.len(), "a frame handed out is one whole frame");
                    assert!(matches!(ev, None | Some(Event::Control(_))), "{ev:?}");
                    assert!(t.at_boundary());
                    let payload = f.payload().len() as u64;
                    if f.opcode & 0x8 != 0 {
                        assert!(payload <= 125);
                    } else {
                        assert!(payload <= limits.max_frame_size);
                    }
                    frames.push(f.bytes.to_vec());
                }
                Ok(None) => break,
                Err(ReadError::Violation(_)) => return (frames, true),
                Err(ReadError::Io(e)) => panic!("no I/O here: {e}"),
            }
        }
    }
    (frames, false)
}

fuzz_target!(|input: &[u8]| {
    let [lim, seed, data @ ..] = input else { return };
    let limits = limits(*lim);
    let mut chunks = Vec::new();
    let (mut rest, mut s) = (data, *seed as usize | 1);
    while !rest.is_empty() {
        s = s.wrapping_mul(1103515245).wrapping_add(12345);
        let n = (s >> 8) % 17 + 1;
        let (a, b) = rest.split_at(n.min(rest.len()));
        chunks.push(a);
        rest = b;
    }
    for sender in [Side::Client, Side::Backend] {
        let (frames, violated) = read(sender, limits, &chunks);
        let joined: Vec<u8> = frames.concat();
        assert!(data.starts_with(&joined), "frames are the input's bytes in order");
        assert_eq!(read(sender, limits, &[data]), (frames, violated), "chunking changed the outcome");
    }
});
