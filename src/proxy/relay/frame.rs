//! Incremental WebSocket frame-header tracker (RFC 6455 §5.2).
//!
//! The relay copies raw bytes between sockets; this tracker watches those bytes go by and knows
//! where every frame starts and ends, without decoding or re-encoding data payloads. State is
//! carried across reads, so a header split over two reads (or over twenty) is handled. It
//! enforces the per-direction rules of the protocol and the configured size limits, and it
//! collects the (at most 125-byte) payload of control frames, unmasked, so the relay can act on
//! close frames and recognise pongs that answer its own pings.

/// Which peer produced the bytes a tracker sees; decides the masking rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// Frames from the client: must be masked (RFC 6455 §5.1).
    Client,
    /// Frames from the backend: must not be masked.
    Backend,
}

/// Limits enforced on one direction.
#[derive(Debug, Clone, Copy)]
pub struct FrameLimits {
    /// Largest payload of a single frame, in bytes.
    pub max_frame_size: u64,
    /// Largest total payload of one (possibly fragmented) message, in bytes.
    pub max_message_size: u64,
    /// RSV bits (as `0x70` mask bits) that a negotiated extension allows; 0 when none was.
    pub allowed_rsv: u8,
}

/// Opcodes the tracker reports for control frames.
pub mod opcode {
    /// Continuation frame.
    pub const CONTINUATION: u8 = 0x0;
    /// Text data frame.
    pub const TEXT: u8 = 0x1;
    /// Binary data frame.
    pub const BINARY: u8 = 0x2;
    /// Close control frame.
    pub const CLOSE: u8 = 0x8;
    /// Ping control frame.
    pub const PING: u8 = 0x9;
    /// Pong control frame.
    pub const PONG: u8 = 0xA;
}

/// A rule broken by the bytes of one direction; every variant maps to a close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A client frame arrived without a mask.
    #[error("client frame not masked")]
    UnmaskedClientFrame,
    /// A backend frame arrived with a mask.
    #[error("backend frame masked")]
    MaskedBackendFrame,
    /// An opcode outside the ones RFC 6455 defines.
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// RSV bits set that no negotiated extension gives meaning to.
    #[error("reserved bits set without a negotiated extension")]
    ReservedBits,
    /// A control frame longer than 125 bytes.
    #[error("control frame longer than 125 bytes")]
    ControlTooLong,
    /// A control frame with FIN clear.
    #[error("fragmented control frame")]
    ControlFragmented,
    /// A continuation frame with no message in progress.
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    /// A new text or binary frame while a fragmented message is in progress.
    #[error("new message started before the previous one finished")]
    ExpectedContinuation,
    /// A 64-bit length with its most significant bit set.
    #[error("invalid 64-bit payload length")]
    InvalidLength,
    /// A close frame whose payload is one byte long (RFC 6455 §5.5.1).
    #[error("close frame with a one-byte payload")]
    InvalidClosePayload,
    /// A frame larger than `max_frame_size`.
    #[error("frame of {0} bytes exceeds the frame size limit")]
    FrameTooLarge(u64),
    /// A message larger than `max_message_size`.
    #[error("message exceeds the message size limit")]
    MessageTooLarge,
}

impl Violation {
    /// The close code the offending peer is sent: 1009 for size limits, 1002 otherwise.
    pub fn close_code(self) -> u16 {
        match self {
            Violation::FrameTooLarge(_) | Violation::MessageTooLarge => 1009,
            _ => 1002,
        }
    }

    /// A short, bounded label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Violation::FrameTooLarge(_) => "frame_too_large",
            Violation::MessageTooLarge => "message_too_large",
            Violation::UnmaskedClientFrame | Violation::MaskedBackendFrame => "masking",
            _ => "protocol",
        }
    }
}

/// What the tracker found while consuming bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A control frame finished; its opcode is given and its unmasked payload is
    /// [`Tracker::control_payload`]. Its bytes (header and payload, [`Tracker::frame_len`] of them)
    /// end exactly where consumption stopped.
    Control(u8),
    /// The bytes broke a rule; consumption stopped at the end of the offending header.
    Violation(Violation),
}

/// Incremental header tracker for one direction of one session.
///
/// Small on purpose (about 170 bytes): one lives in every session, twice.
#[derive(Debug)]
pub struct Tracker {
    sender: Sender,
    limits: FrameLimits,
    /// Header bytes collected so far for the frame being parsed.
    header: [u8; 14],
    header_len: u8,
    /// True while the payload of the current frame is being consumed.
    in_payload: bool,
    /// Opcode, mask and length of the current frame (valid once the header is complete).
    opcode: u8,
    mask: [u8; 4],
    masked: bool,
    payload_len: u64,
    remaining: u64,
    /// Unmasked payload of the current control frame.
    control: [u8; 125],
    control_len: u8,
    /// True between the first and the final fragment of a data message.
    in_message: bool,
    message_len: u64,
    /// Data frames whose header completed since the last [`Tracker::take_data_frames`].
    data_frames: u64,
    /// Wire length of the last completed control frame.
    last_frame_len: u8,
}

impl Tracker {
    /// A tracker for bytes sent by `sender`, enforcing `limits`.
    pub fn new(sender: Sender, limits: FrameLimits) -> Self {
        Tracker {
            sender,
            limits,
            header: [0; 14],
            header_len: 0,
            in_payload: false,
            opcode: 0,
            mask: [0; 4],
            masked: false,
            payload_len: 0,
            remaining: 0,
            control: [0; 125],
            control_len: 0,
            in_message: false,
            message_len: 0,
            data_frames: 0,
            last_frame_len: 0,
        }
    }

    /// Consumes `input`, stopping early (with an event) after a complete control frame or at a
    /// violation. Returns how many bytes were consumed.
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<Event>) {
        let mut i = 0;
        while i < input.len() {
            if !self.in_payload {
                let need = header_len_needed(&self.header[..self.header_len as usize]);
                let have = self.header_len as usize;
                let take = (need - have).min(input.len() - i);
                self.header[have..have + take].copy_from_slice(&input[i..i + take]);
                self.header_len += take as u8;
                i += take;
                if (self.header_len as usize) < header_len_needed(&self.header[..self.header_len as usize]) {
                    continue;
                }
                if let Err(v) = self.on_header() {
                    return (i, Some(Event::Violation(v)));
                }
                if self.remaining == 0 {
                    if let Some(ev) = self.finish_frame() {
                        return (i, Some(ev));
                    }
                }
                continue;
            }
            let take = (self.remaining.min((input.len() - i) as u64)) as usize;
            if is_control(self.opcode) {
                let offset = (self.payload_len - self.remaining) as usize;
                for (k, b) in input[i..i + take].iter().enumerate() {
                    let pos = offset + k;
                    let key = if self.masked { self.mask[pos & 3] } else { 0 };
                    self.control[pos] = b ^ key;
                }
                self.control_len = (offset + take) as u8;
            }
            self.remaining -= take as u64;
            i += take;
            if self.remaining == 0 {
                if let Some(ev) = self.finish_frame() {
                    return (i, Some(ev));
                }
            }
        }
        (i, None)
    }

    /// Forgets the frame in progress (after a violation, nothing more is parsed).
    pub fn reset(&mut self) {
        self.header_len = 0;
        self.in_payload = false;
    }

    /// True when the tracker is between frames.
    pub fn at_boundary(&self) -> bool {
        !self.in_payload && self.header_len == 0
    }

    /// True while the bytes of the current frame must be held back from the other side: its
    /// header is incomplete, or it is a control frame not yet complete.
    pub fn holding(&self) -> bool {
        (!self.in_payload && self.header_len > 0) || (self.in_payload && is_control(self.opcode))
    }

    /// Bytes of the current frame consumed so far (header plus payload); 0 at a boundary.
    pub fn bytes_into_frame(&self) -> u64 {
        if self.in_payload {
            self.header_len as u64 + (self.payload_len - self.remaining)
        } else {
            self.header_len as u64
        }
    }

    /// Length on the wire of the control frame that just completed (after an
    /// [`Event::Control`]); at most 14 + 125 bytes.
    pub fn frame_len(&self) -> usize {
        self.last_frame_len as usize
    }

    /// Unmasked payload of the control frame that just completed.
    pub fn control_payload(&self) -> &[u8] {
        &self.control[..self.control_len as usize]
    }

    /// Returns and resets the count of data frames seen since the last call.
    pub fn take_data_frames(&mut self) -> u64 {
        std::mem::take(&mut self.data_frames)
    }

    /// Finishes the frame whose payload just ended; returns an event for control frames.
    fn finish_frame(&mut self) -> Option<Event> {
        self.in_payload = false;
        if is_control(self.opcode) {
            self.last_frame_len = (self.header_len as u64 + self.payload_len) as u8;
            self.header_len = 0;
            return Some(Event::Control(self.opcode));
        }
        self.header_len = 0;
        None
    }

    /// Validates a complete header and sets up payload tracking.
    fn on_header(&mut self) -> Result<(), Violation> {
        let b0 = self.header[0];
        let b1 = self.header[1];
        let fin = b0 & 0x80 != 0;
        let rsv = b0 & 0x70;
        let opcode = b0 & 0x0F;
        let masked = b1 & 0x80 != 0;
        let len = match b1 & 0x7F {
            126 => u16::from_be_bytes([self.header[2], self.header[3]]) as u64,
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.header[2..10]);
                let v = u64::from_be_bytes(b);
                if v >> 63 != 0 {
                    return Err(Violation::InvalidLength);
                }
                v
            }
            n => n as u64,
        };
        match (self.sender, masked) {
            (Sender::Client, false) => return Err(Violation::UnmaskedClientFrame),
            (Sender::Backend, true) => return Err(Violation::MaskedBackendFrame),
            _ => {}
        }
        if masked {
            let at = self.header_len as usize - 4;
            self.mask.copy_from_slice(&self.header[at..at + 4]);
        }
        if rsv & !self.limits.allowed_rsv != 0 {
            return Err(Violation::ReservedBits);
        }
        match opcode {
            opcode::CONTINUATION => {
                if !self.in_message {
                    return Err(Violation::UnexpectedContinuation);
                }
            }
            opcode::TEXT | opcode::BINARY => {
                if self.in_message {
                    return Err(Violation::ExpectedContinuation);
                }
                self.message_len = 0;
            }
            opcode::CLOSE | opcode::PING | opcode::PONG => {
                if len > 125 {
                    return Err(Violation::ControlTooLong);
                }
                if !fin {
                    return Err(Violation::ControlFragmented);
                }
                if opcode == opcode::CLOSE && len == 1 {
                    return Err(Violation::InvalidClosePayload);
                }
            }
            other => return Err(Violation::ReservedOpcode(other)),
        }
        if !is_control(opcode) {
            if len > self.limits.max_frame_size {
                return Err(Violation::FrameTooLarge(len));
            }
            self.message_len = self.message_len.saturating_add(len);
            if self.message_len > self.limits.max_message_size {
                return Err(Violation::MessageTooLarge);
            }
            self.in_message = !fin;
            self.data_frames += 1;
        }
        self.opcode = opcode;
        self.masked = masked;
        self.payload_len = len;
        self.remaining = len;
        self.control_len = 0;
        self.in_payload = true;
        Ok(())
    }
}

/// Whether `opcode` is a control opcode.
fn is_control(opcode: u8) -> bool {
    opcode & 0x8 != 0
}

/// Total header length implied by the header bytes seen so far (at least 2).
fn header_len_needed(seen: &[u8]) -> usize {
    if seen.len() < 2 {
        return 2;
    }
    let ext = match seen[1] & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if seen[1] & 0x80 != 0 { 4 } else { 0 };
    2 + ext + mask
}
