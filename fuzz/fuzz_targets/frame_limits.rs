//! The frame limits the codec's fuzz targets draw from their first input byte: max frame size
//! (bits 0-1), max message size (bits 2-3) and the allowed RSV bits (bits 4-6, used as the
//! `0x70` mask directly).

use portcullis::codec::FrameLimits;

const SIZES: [u64; 4] = [0, 125, 4096, u64::MAX];

/// The limits `byte` picks.
pub fn limits(byte: u8) -> FrameLimits {
    FrameLimits {
        max_frame_size: SIZES[(byte & 3) as usize],
        max_message_size: SIZES[((byte >> 2) & 3) as usize],
        allowed_rsv: byte & 0x70,
    }
}
