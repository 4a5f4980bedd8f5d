//! The integrity header every load-test message carries, so loss, duplication, reordering and
//! corruption are counted rather than guessed.
//!
//! Layout (little endian), 32 bytes, then filler up to the message size:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `PCLT` |
//! | 4..8 | kind: 1 = client message (echoed back), 2 = backend-originated output |
//! | 8..16 | connection id (client messages) or 0 (backend output) |
//! | 16..24 | sequence number, per connection and kind |
//! | 24..32 | checksum of every other byte of the message |

/// Size of the header; the smallest message the harness sends.
pub const HEADER_LEN: usize = 32;

const MAGIC: [u8; 4] = *b"PCLT";

/// Who produced a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Sent by the client, expected back from an echoing backend.
    Client,
    /// Produced by the backend (source and terminal modes).
    Backend,
}

/// A parsed, checksum-verified header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Who produced the message.
    pub kind: Kind,
    /// Connection id (0 for backend output).
    pub conn: u64,
    /// Sequence number within the connection and kind.
    pub seq: u64,
}

/// Why a received message failed the integrity check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalid {
    /// Shorter than a header, wrong magic or unknown kind.
    Malformed,
    /// The checksum does not match; carries the sequence number as read (it may itself be damaged).
    Checksum {
        /// Sequence number found in the (possibly damaged) header.
        seq: u64,
    },
}

/// Builds a message of `size` bytes (at least [`HEADER_LEN`]) with a deterministic filler.
pub fn encode(kind: Kind, conn: u64, seq: u64, size: usize) -> Vec<u8> {
    let size = size.max(HEADER_LEN);
    let mut buf = vec![0u8; size];
    buf[0..4].copy_from_slice(&MAGIC);
    buf[4..8].copy_from_slice(&(kind as u32 + 1).to_le_bytes());
    buf[8..16].copy_from_slice(&conn.to_le_bytes());
    buf[16..24].copy_from_slice(&seq.to_le_bytes());
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in buf[HEADER_LEN..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let sum = checksum(&buf);
    buf[24..32].copy_from_slice(&sum.to_le_bytes());
    buf
}

/// Size of a message that carries a send time (see [`encode_at`]).
pub const TIMED_LEN: usize = HEADER_LEN + 8;

/// Like [`encode`], with `sent_us` (microseconds since the Unix epoch, the sender's clock) in
/// the 8 bytes after the header, covered by the checksum; at least [`TIMED_LEN`] bytes.
pub fn encode_at(kind: Kind, conn: u64, seq: u64, size: usize, sent_us: u64) -> Vec<u8> {
    let mut buf = encode(kind, conn, seq, size.max(TIMED_LEN));
    buf[HEADER_LEN..TIMED_LEN].copy_from_slice(&sent_us.to_le_bytes());
    let sum = checksum(&buf);
    buf[24..32].copy_from_slice(&sum.to_le_bytes());
    buf
}

/// The send time written by [`encode_at`] (check the message with [`decode`] first).
pub fn sent_us(buf: &[u8]) -> Option<u64> {
    buf.get(HEADER_LEN..TIMED_LEN).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes)
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Parses and verifies a received message.
pub fn decode(buf: &[u8]) -> Result<Header, Invalid> {
    if buf.len() < HEADER_LEN || buf[0..4] != MAGIC {
        return Err(Invalid::Malformed);
    }
    let kind = match u32::from_le_bytes(buf[4..8].try_into().unwrap_or_default()) {
        1 => Kind::Client,
        2 => Kind::Backend,
        _ => return Err(Invalid::Malformed),
    };
    let conn = u64::from_le_bytes(buf[8..16].try_into().unwrap_or_default());
    let seq = u64::from_le_bytes(buf[16..24].try_into().unwrap_or_default());
    let stored = u64::from_le_bytes(buf[24..32].try_into().unwrap_or_default());
    if stored != checksum(buf) {
        return Err(Invalid::Checksum { seq });
    }
    Ok(Header { kind, conn, seq })
}

/// FNV-1a over 8-byte words (fast enough for 64 KiB messages), skipping the checksum field.
fn checksum(buf: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            h = (h ^ u64::from_le_bytes(w.try_into().unwrap_or_default())).wrapping_mul(PRIME);
        }
        for &b in words.remainder() {
            h = (h ^ u64::from(b)).wrapping_mul(PRIME);
        }
    };
    eat(&buf[..24]);
    eat(&buf[HEADER_LEN..]);
    h ^ (h >> 29)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_flipped_byte_is_caught() {
        let msg = encode(Kind::Client, 7, 42, 100);
        assert_eq!(decode(&msg), Ok(Header { kind: Kind::Client, conn: 7, seq: 42 }));
        for i in 0..msg.len() {
            let mut bad = msg.clone();
            bad[i] ^= 0x20;
            assert!(decode(&bad).is_err(), "flip at {i} not detected");
        }
    }

    #[test]
    fn timed_messages_carry_their_send_time_under_the_checksum() {
        let msg = encode_at(Kind::Backend, 3, 9, 10, 1_234_567);
        assert_eq!(msg.len(), TIMED_LEN);
        assert_eq!(decode(&msg), Ok(Header { kind: Kind::Backend, conn: 3, seq: 9 }));
        assert_eq!(sent_us(&msg), Some(1_234_567));
        let mut bad = msg.clone();
        bad[HEADER_LEN] ^= 1;
        assert!(decode(&bad).is_err());
    }

    #[test]
    fn short_messages_are_padded_to_the_header() {
        assert_eq!(encode(Kind::Backend, 0, 1, 3).len(), HEADER_LEN);
        assert_eq!(decode(b"short"), Err(Invalid::Malformed));
    }
}
