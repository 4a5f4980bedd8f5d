//! The one WebSocket codec (RFC 6455 §5.2): the incremental frame-header tracker every reader
//! of frames uses (the relay, parking, fan-out, observers), and the one frame encoder.
//!
//! A leaf: it uses nothing else of the crate (`tests/architecture.rs`).
//!
//! The relay copies raw bytes between sockets; this tracker watches those bytes go by and knows
//! where every frame starts and ends, without decoding or re-encoding data payloads. State is
//! carried across reads, so a header split over two reads (or over twenty) is handled. It
//! enforces the per-direction rules of the protocol and the configured size limits, and it
//! collects the (at most 125-byte) payload of control frames, unmasked, so the relay can act on
//! close frames and recognise pongs that answer its own pings.

/// Which side of a session: the peer that produced the bytes a tracker sees, which decides
/// the masking rule (client frames must be masked, RFC 6455 §5.1; backend frames must not be).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The WebSocket client (browser, CLI) that connected to the proxy.
    Client,
    /// The agent backend the proxy connected to.
    Backend,
}

impl Side {
    /// The other side.
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Backend,
            Side::Backend => Side::Client,
        }
    }

    /// 0 for the client, 1 for the backend: an index into per-side arrays.
    pub fn idx(self) -> usize {
        self as usize
    }
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
    /// A close frame with a code that may not appear on the wire (RFC 6455 §7.4: below 1000,
    /// 1004-1006, 1015, 1016-2999, 5000 and above). Found by the relay, not the tracker.
    #[error("close frame with code {0}, which is not allowed on the wire")]
    InvalidCloseCode(u16),
    /// A close frame whose reason is not UTF-8. Found by the relay, not the tracker.
    #[error("close frame reason is not UTF-8")]
    InvalidCloseReason,
    /// A frame larger than `max_frame_size`.
    #[error("frame of {0} bytes exceeds the frame size limit")]
    FrameTooLarge(u64),
    /// A message larger than `max_message_size`.
    #[error("message exceeds the message size limit")]
    MessageTooLarge,
}

impl Violation {
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

/// Length of the frame [`encode_into`] writes for a payload of `payload_len` bytes.
pub fn encoded_len(payload_len: usize, masked: bool) -> usize {
    let ext = match payload_len {
        0..=125 => 0,
        126..=0xFFFF => 2,
        _ => 8,
    };
    2 + ext + if masked { 4 } else { 0 } + payload_len
}

/// Writes one frame (the minimal length form) into `out`, which must be exactly
/// [`encoded_len`] bytes long. `rsv` holds the RSV bits in place (`0x70` mask bits); with a
/// `mask` the payload is masked with it, as a client must.
pub fn encode_into(out: &mut [u8], fin: bool, rsv: u8, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) {
    let m = if mask.is_some() { 0x80 } else { 0 };
    out[0] = (if fin { 0x80 } else { 0 }) | (rsv & 0x70) | (opcode & 0x0F);
    let n = payload.len();
    let mut at = match n {
        0..=125 => {
            out[1] = m | n as u8;
            2
        }
        126..=0xFFFF => {
            out[1] = m | 126;
            out[2..4].copy_from_slice(&(n as u16).to_be_bytes());
            4
        }
        _ => {
            out[1] = m | 127;
            out[2..10].copy_from_slice(&(n as u64).to_be_bytes());
            10
        }
    };
    match mask {
        Some(key) => {
            out[at..at + 4].copy_from_slice(&key);
            at += 4;
            for (i, (o, b)) in out[at..].iter_mut().zip(payload).enumerate() {
                *o = b ^ key[i & 3];
            }
        }
        None => out[at..].copy_from_slice(payload),
    }
}

/// Appends one frame (the minimal length form) to `out`; see [`encode_into`].
pub fn encode(fin: bool, rsv: u8, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + encoded_len(payload.len(), mask.is_some()), 0);
    encode_into(&mut out[start..], fin, rsv, opcode, mask, payload);
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

/// Sees the payload bytes of data frames as [`Tracker::feed_with`] consumes them (terminal
/// recording). `mask` is the sender's key rotated so that its first byte applies to
/// `bytes[0]`, for senders that mask.
pub trait PayloadTap {
    /// Some payload bytes of a text, binary or continuation frame.
    fn data(&mut self, bytes: &[u8], mask: Option<[u8; 4]>);

    /// A data frame ended; `ends_message` when it was its message's last. Returning `true`
    /// stops [`Tracker::feed_with`] right after it (readers of whole frames and message
    /// boundaries); the relay's taps never stop it.
    #[inline(always)]
    fn frame_end(&mut self, ends_message: bool) -> bool {
        let _ = ends_message;
        false
    }
}

/// The tap of a route that records nothing: [`Tracker::feed`] compiles to the untapped loop.
struct NoTap;

impl PayloadTap for NoTap {
    #[inline(always)]
    fn data(&mut self, _: &[u8], _: Option<[u8; 4]>) {}
}

/// Incremental header tracker for one direction of one session.
///
/// Small on purpose (under 100 bytes): one lives in every session, twice.
#[derive(Debug)]
pub struct Tracker {
    sender: Side,
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
    /// Unmasked payload of the current control frame: boxed, and only from a control frame's
    /// first payload byte until [`Tracker::release_control`], so an idle tracker holds none.
    control: Option<Box<[u8; 125]>>,
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
    pub fn new(sender: Side, limits: FrameLimits) -> Self {
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
            control: None,
            control_len: 0,
            in_message: false,
            message_len: 0,
            data_frames: 0,
            last_frame_len: 0,
        }
    }

    /// Consumes `input`, stopping early (with an event) after a complete control frame or at a
    /// violation (or, with a tap, where [`PayloadTap::frame_end`] asks). Returns how many bytes
    /// were consumed.
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<Event>) {
        self.feed_with(input, &mut NoTap)
    }

    /// [`Tracker::feed`], showing `tap` the payload bytes of data frames.
    pub fn feed_with<T: PayloadTap>(&mut self, input: &[u8], tap: &mut T) -> (usize, Option<Event>) {
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
                    if tap.frame_end(!self.in_message) {
                        return (i, None);
                    }
                }
                continue;
            }
            let take = (self.remaining.min((input.len() - i) as u64)) as usize;
            if is_control(self.opcode) {
                let offset = (self.payload_len - self.remaining) as usize;
                let control = self.control.get_or_insert_with(|| Box::new([0; 125]));
                for (k, b) in input[i..i + take].iter().enumerate() {
                    let pos = offset + k;
                    let key = if self.masked { self.mask[pos & 3] } else { 0 };
                    control[pos] = b ^ key;
                }
                self.control_len = (offset + take) as u8;
            } else {
                let offset = (self.payload_len - self.remaining) as usize;
                let m = self.mask;
                let mask =
                    self.masked.then(|| [m[offset & 3], m[(offset + 1) & 3], m[(offset + 2) & 3], m[(offset + 3) & 3]]);
                tap.data(&input[i..i + take], mask);
            }
            self.remaining -= take as u64;
            i += take;
            if self.remaining == 0 {
                if let Some(ev) = self.finish_frame() {
                    return (i, Some(ev));
                }
                if tap.frame_end(!self.in_message) {
                    return (i, None);
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

    /// True between the first and the final fragment of a data message.
    pub fn in_message(&self) -> bool {
        self.in_message
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
        match &self.control {
            Some(c) => &c[..self.control_len as usize],
            None => &[],
        }
    }

    /// Frees the control payload once it has been acted on (it is empty afterwards).
    pub fn release_control(&mut self) {
        self.control = None;
        self.control_len = 0;
    }

    /// Data frames seen since the last [`Tracker::take_data_frames`], without resetting it.
    pub fn data_frames_pending(&self) -> u64 {
        self.data_frames
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
            (Side::Client, false) => return Err(Violation::UnmaskedClientFrame),
            (Side::Backend, true) => return Err(Violation::MaskedBackendFrame),
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

/// Limits that check nothing but the protocol: for bytes some other tracker has checked already
/// (what the relay writes to a resumable session's client, read again for its message
/// boundaries).
pub const UNLIMITED: FrameLimits =
    FrameLimits { max_frame_size: u64::MAX, max_message_size: u64::MAX, allowed_rsv: 0x70 };

/// The close frame the proxy writes: `code` and `reason` (cut to the 123 bytes a control frame
/// has room for, at a character boundary), masked when it goes to a backend.
pub fn close_frame(code: u16, reason: &str, mask: Option<[u8; 4]>) -> Vec<u8> {
    let (payload, len) = close_payload(code, reason);
    let mut out = Vec::with_capacity(len + 6);
    encode(true, 0, opcode::CLOSE, mask, &payload[..len], &mut out);
    out
}

/// A close frame's payload: `code`, then `reason` cut to the 123 bytes a control frame has room
/// for, at a character boundary; with its length.
pub fn close_payload(code: u16, reason: &str) -> ([u8; 125], usize) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = [0u8; 125];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + end].copy_from_slice(&reason.as_bytes()[..end]);
    (payload, 2 + end)
}

/// One whole frame as it came off the wire, read by a [`Reader`].
#[derive(Debug)]
pub struct WholeFrame {
    /// Header and payload, unchanged (still masked, if the sender masked).
    pub bytes: bytes::Bytes,
    /// The FIN bit.
    pub fin: bool,
    /// The opcode.
    pub opcode: u8,
    header_len: usize,
    mask: Option<[u8; 4]>,
}

impl WholeFrame {
    /// The payload, unmasked.
    pub fn payload(&self) -> Vec<u8> {
        let p = &self.bytes[self.header_len..];
        match self.mask {
            None => p.to_vec(),
            Some(m) => p.iter().enumerate().map(|(i, b)| b ^ m[i & 3]).collect(),
        }
    }
}

/// Why a [`Reader`] gives no more frames.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The connection failed.
    #[error("read: {0}")]
    Io(#[from] std::io::Error),
    /// The sender broke a rule of the protocol or a limit; nothing of the frame was returned.
    #[error("{0}")]
    Violation(Violation),
}

/// Reads whole frames off a stream, every byte checked by a [`Tracker`] (the rules of RFC 6455
/// §5 and the limits) before a frame is handed out: the readers of fan-out streams and their
/// clients, and of observers. A frame over the limit is refused from its header, unread.
#[derive(Debug)]
pub struct Reader {
    buf: bytes::BytesMut,
    tracker: Tracker,
    /// Bytes of `buf` the tracker has seen.
    scanned: usize,
    /// Room made for each read: small for a client (pings, a close), larger for a backend.
    chunk: usize,
}

/// A tap that stops the tracker where the next data frame ends (`messages_only`: the next one
/// that ends its message); `hit` tells whether it stopped there. For the readers of whole
/// frames and of message boundaries.
#[derive(Debug, Default)]
pub struct StopAtEnd {
    /// Stop only where a message ends.
    pub messages_only: bool,
    /// The tracker stopped at an end.
    pub hit: bool,
}

impl PayloadTap for StopAtEnd {
    fn data(&mut self, _: &[u8], _: Option<[u8; 4]>) {}

    fn frame_end(&mut self, ends_message: bool) -> bool {
        self.hit = ends_message || !self.messages_only;
        self.hit
    }
}

impl Reader {
    /// A reader of frames sent by `sender` under `limits`, starting with the `early` bytes
    /// already read (during the handshake).
    pub fn new(sender: Side, limits: FrameLimits, early: &[u8], chunk: usize) -> Reader {
        Reader { buf: bytes::BytesMut::from(early), tracker: Tracker::new(sender, limits), scanned: 0, chunk }
    }

    /// The next frame; `None` at EOF. Cancel-safe: a partial frame stays in the buffer.
    pub async fn next<R: tokio::io::AsyncRead + Unpin>(&mut self, rd: &mut R) -> Result<Option<WholeFrame>, ReadError> {
        use tokio::io::AsyncReadExt as _;
        loop {
            if let Some(f) = self.parse()? {
                return Ok(Some(f));
            }
            if self.buf.capacity() == self.buf.len() {
                self.buf.reserve(self.chunk);
            }
            if rd.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Adds bytes read elsewhere (the sync face of [`Reader::next`], for the fuzz target).
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame among the bytes read so far, if one is complete.
    pub fn parse(&mut self) -> Result<Option<WholeFrame>, ReadError> {
        let mut end = StopAtEnd::default();
        let (n, event) = self.tracker.feed_with(&self.buf[self.scanned..], &mut end);
        self.scanned += n;
        match event {
            Some(Event::Violation(v)) => return Err(ReadError::Violation(v)),
            Some(Event::Control(_)) => self.tracker.release_control(),
            None if !end.hit => return Ok(None),
            None => {}
        }
        let bytes = self.buf.split_to(std::mem::take(&mut self.scanned)).freeze();
        // The tracker has checked this header whole.
        let header_len = header_len_needed(&bytes[..2]);
        let mask = (bytes[1] & 0x80 != 0).then(|| {
            let m = &bytes[header_len - 4..header_len];
            [m[0], m[1], m[2], m[3]]
        });
        Ok(Some(WholeFrame { fin: bytes[0] & 0x80 != 0, opcode: bytes[0] & 0x0F, header_len, mask, bytes }))
    }
}

/// Whether `opcode` is a control opcode.
pub fn is_control(opcode: u8) -> bool {
    opcode & 0x8 != 0
}

/// Total header length implied by the header bytes seen so far (at least 2).
pub(crate) fn header_len_needed(seen: &[u8]) -> usize {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::close::violation_code;

    #[tokio::test]
    async fn the_reader_returns_whole_checked_frames_and_refuses_a_frame_over_the_limit_from_its_header() {
        let mut wire = Vec::new();
        encode(true, 0, opcode::TEXT, Some(MASK), b"one", &mut wire);
        encode(false, 0, opcode::BINARY, Some([1, 2, 3, 4]), &[9; 300], &mut wire);
        encode(true, 0, opcode::PING, Some(MASK), b"p", &mut wire);
        let mut r = Reader::new(Side::Client, limits(), &wire[..3], 16);
        let mut rest = &wire[3..];
        let a = r.next(&mut rest).await.expect("read").expect("frame");
        assert_eq!((a.opcode, a.fin, a.payload()), (opcode::TEXT, true, b"one".to_vec()));
        let b = r.next(&mut rest).await.expect("read").expect("frame");
        assert_eq!((b.opcode, b.fin, b.payload()), (opcode::BINARY, false, vec![9; 300]));
        assert_eq!(b.bytes.len(), 4 + 4 + 300);
        let c = r.next(&mut rest).await.expect("read").expect("a ping inside the message");
        assert_eq!((c.opcode, c.payload()), (opcode::PING, b"p".to_vec()));
        assert!(r.next(&mut rest).await.expect("eof").is_none());
        // Only the header of a 64 MiB frame is read: the limit refuses it there.
        let mut bomb = Vec::new();
        encode(true, 0, opcode::BINARY, Some(MASK), &[], &mut bomb);
        bomb[1] = 0x80 | 127;
        bomb.splice(2..2, (64u64 << 20).to_be_bytes());
        let mut r = Reader::new(Side::Client, limits_with(125, 125, 0), &[], 16);
        let e = r.next(&mut &bomb[..]).await.expect_err("refused");
        assert!(matches!(e, ReadError::Violation(Violation::FrameTooLarge(n)) if n == 64 << 20), "{e:?}");
        // The rules of the protocol, too: an unmasked client frame.
        let mut plain = Vec::new();
        encode(true, 0, opcode::TEXT, None, b"x", &mut plain);
        let mut r = Reader::new(Side::Client, limits(), &plain, 16);
        let e = r.next(&mut &[][..]).await.expect_err("refused");
        assert!(matches!(e, ReadError::Violation(Violation::UnmaskedClientFrame)), "{e:?}");
    }

    #[test]
    fn a_close_frame_reason_is_cut_at_a_character_boundary() {
        let reason = "é".repeat(100);
        let f = close_frame(1001, &reason, None);
        let (n, ev) = Tracker::new(Side::Backend, limits()).feed(&f);
        assert_eq!((n, ev), (f.len(), Some(Event::Control(opcode::CLOSE))));
        assert!(f.len() <= 2 + 125);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }

    /// The masking key of the RFC 6455 §5.7 examples.
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn limits() -> FrameLimits {
        FrameLimits { max_frame_size: 1 << 20, max_message_size: 4 << 20, allowed_rsv: 0 }
    }

    fn limits_with(max_frame_size: u64, max_message_size: u64, allowed_rsv: u8) -> FrameLimits {
        FrameLimits { max_frame_size, max_message_size, allowed_rsv }
    }

    /// How the payload length is written in an encoded header.
    #[derive(Debug, Clone, Copy)]
    enum LenForm {
        /// Always the 16-bit extended form.
        Ext16,
        /// Always the 64-bit extended form.
        Ext64,
    }

    /// Test-only encoder for the non-minimal length forms a peer may legally send.
    fn encode_form(fin: bool, rsv: u8, op: u8, mask: Option<[u8; 4]>, payload: &[u8], form: LenForm) -> Vec<u8> {
        let mut out = Vec::with_capacity(payload.len() + 14);
        out.push((if fin { 0x80 } else { 0 }) | (rsv & 0x70) | (op & 0x0F));
        let m = if mask.is_some() { 0x80 } else { 0 };
        let n = payload.len();
        let bits = match form {
            LenForm::Ext16 => 16,
            LenForm::Ext64 => 64,
        };
        match bits {
            16 => {
                out.push(m | 126);
                out.extend_from_slice(&u16::try_from(n).expect("fits 16 bits").to_be_bytes());
            }
            _ => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(key) => {
                out.extend_from_slice(&key);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i & 3]));
            }
            None => out.extend_from_slice(payload),
        }
        out
    }

    /// A frame in the minimal length form, from the encoder the proxy itself uses.
    fn frame(fin: bool, rsv: u8, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        super::encode(fin, rsv, opcode, mask, payload, &mut out);
        out
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i.wrapping_mul(31) + 7) as u8).collect()
    }

    fn header_len(payload_len: usize, masked: bool) -> usize {
        let ext = match payload_len {
            0..=125 => 0,
            126..=0xFFFF => 2,
            _ => 8,
        };
        2 + ext + if masked { 4 } else { 0 }
    }

    /// Something the tracker reported, with the absolute stream offset where consumption stopped.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Seen {
        Control { op: u8, payload: Vec<u8>, frame_len: usize, end: usize },
        Violation { v: Violation, end: usize },
    }

    /// Everything observable after feeding a stream.
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        seen: Vec<Seen>,
        data_frames: u64,
        at_boundary: bool,
        holding: bool,
        bytes_into_frame: u64,
    }

    /// Feeds `chunks` like the relay does (re-feeding the rest after each control event), stopping
    /// at the first violation; checks the per-call invariants along the way.
    fn run_chunks<'a>(sender: Side, limits: FrameLimits, chunks: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
        let mut t = Tracker::new(sender, limits);
        let max_into = 14 + limits.max_frame_size.max(125);
        let mut seen = Vec::new();
        let mut base = 0;
        'chunks: for chunk in chunks {
            let mut pos = 0;
            while pos < chunk.len() {
                let (n, ev) = t.feed(&chunk[pos..]);
                assert!(n <= chunk.len() - pos, "consumed {n} of {} bytes", chunk.len() - pos);
                pos += n;
                assert!(t.bytes_into_frame() <= max_into);
                match ev {
                    None => assert_eq!(pos, chunk.len(), "stopped early without an event"),
                    Some(Event::Control(op)) => {
                        assert!(n > 0);
                        assert!(t.at_boundary() && !t.holding());
                        assert!(t.control_payload().len() <= 125 && t.frame_len() <= 139);
                        seen.push(Seen::Control {
                            op,
                            payload: t.control_payload().to_vec(),
                            frame_len: t.frame_len(),
                            end: base + pos,
                        });
                    }
                    Some(Event::Violation(v)) => {
                        seen.push(Seen::Violation { v, end: base + pos });
                        break 'chunks;
                    }
                }
            }
            base += chunk.len();
        }
        Outcome {
            seen,
            data_frames: t.take_data_frames(),
            at_boundary: t.at_boundary(),
            holding: t.holding(),
            bytes_into_frame: t.bytes_into_frame(),
        }
    }

    fn run_whole(sender: Side, limits: FrameLimits, data: &[u8]) -> Outcome {
        run_chunks(sender, limits, [data])
    }

    fn run_split(sender: Side, limits: FrameLimits, data: &[u8], at: usize) -> Outcome {
        let (a, b) = data.split_at(at);
        run_chunks(sender, limits, [a, b])
    }

    fn run_bytewise(sender: Side, limits: FrameLimits, data: &[u8]) -> Outcome {
        run_chunks(sender, limits, data.chunks(1))
    }

    /// Feeds `data` (in one piece, re-feeding after control events) until a violation.
    fn violation(sender: Side, limits: FrameLimits, data: &[u8]) -> (usize, Violation) {
        match run_whole(sender, limits, data).seen.pop() {
            Some(Seen::Violation { v, end }) => (end, v),
            other => panic!("expected a violation for {data:02x?}, got {other:?}"),
        }
    }

    /// Feeds `data` and asserts that no violation occurs; returns the outcome.
    fn accepted(sender: Side, limits: FrameLimits, data: &[u8]) -> Outcome {
        let out = run_whole(sender, limits, data);
        assert!(!out.seen.iter().any(|s| matches!(s, Seen::Violation { .. })), "unexpected violation: {:?}", out.seen);
        out
    }

    fn cat(frames: &[Vec<u8>]) -> Vec<u8> {
        frames.concat()
    }

    const DIRECTIONS: [(Side, Option<[u8; 4]>); 2] = [(Side::Client, Some(MASK)), (Side::Backend, None)];

    // ---- the encoder itself --------------------------------------------------------------

    #[test]
    fn test_encoder_matches_rfc6455_examples() {
        // RFC 6455 §5.7.
        assert_eq!(frame(true, 0, opcode::TEXT, None, b"Hello"), [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        assert_eq!(
            frame(true, 0, opcode::TEXT, Some(MASK), b"Hello"),
            [0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58]
        );
        assert_eq!(frame(true, 0, opcode::BINARY, None, &[0; 256])[..4], [0x82, 0x7E, 0x01, 0x00]);
        assert_eq!(
            frame(true, 0, opcode::BINARY, None, &[0; 65536])[..10],
            [0x82, 0x7F, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00]
        );
    }

    // ---- splitting: state carried across feeds -------------------------------------------

    #[test]
    fn header_split_at_every_byte_gives_same_result_as_one_feed() {
        // 7-bit, 16-bit and 64-bit lengths, each followed by a ping so that the state after the
        // data frame matters.
        for (sender, mask) in DIRECTIONS {
            for len in [0usize, 1, 5, 125, 126, 300, 0xFFFF, 0x10000, 70_000] {
                let data = cat(&[
                    frame(true, 0, opcode::BINARY, mask, &pattern(len)),
                    frame(true, 0, opcode::PING, mask, b"after"),
                ]);
                let header = header_len(len, mask.is_some());
                let whole = run_whole(sender, limits(), &data);
                assert_eq!(
                    whole,
                    Outcome {
                        seen: vec![Seen::Control {
                            op: opcode::PING,
                            payload: b"after".to_vec(),
                            frame_len: header_len(5, mask.is_some()) + 5,
                            end: data.len(),
                        }],
                        data_frames: 1,
                        at_boundary: true,
                        holding: false,
                        bytes_into_frame: 0,
                    },
                    "{sender:?} len {len}"
                );
                let cuts: Vec<usize> = if data.len() <= 1000 {
                    (0..=data.len()).collect()
                } else {
                    (0..=header + 8).chain(data.len() - 20..=data.len()).collect()
                };
                for at in cuts {
                    assert_eq!(run_split(sender, limits(), &data, at), whole, "{sender:?} len {len} split at {at}");
                }
                assert_eq!(run_bytewise(sender, limits(), &data), whole, "{sender:?} len {len} one byte at a time");
            }
        }
    }

    #[test]
    fn control_frame_split_at_every_byte_gives_same_result_as_one_feed() {
        for (sender, mask) in DIRECTIONS {
            for (op, payload) in [
                (opcode::PING, Vec::new()),
                (opcode::PING, pattern(7)),
                (opcode::PONG, pattern(125)),
                (opcode::CLOSE, vec![0x03, 0xE8, b'b', b'y', b'e']),
            ] {
                let ctl = frame(true, 0, op, mask, &payload);
                let data = cat(&[ctl.clone(), frame(true, 0, opcode::TEXT, mask, b"tail")]);
                let whole = run_whole(sender, limits(), &data);
                assert_eq!(
                    whole.seen,
                    vec![Seen::Control { op, payload: payload.clone(), frame_len: ctl.len(), end: ctl.len() }]
                );
                assert_eq!(whole.data_frames, 1);
                for at in 0..=data.len() {
                    assert_eq!(run_split(sender, limits(), &data, at), whole, "{sender:?} op {op} split at {at}");
                }
                assert_eq!(run_bytewise(sender, limits(), &data), whole);
            }
        }
    }

    #[test]
    fn header_split_into_three_feeds_gives_same_result_as_one_feed() {
        // Every pair of cut points over a 64-bit-length header (14 bytes when masked).
        for (sender, mask) in DIRECTIONS {
            let data = cat(&[
                frame(true, 0, opcode::BINARY, mask, &pattern(0x10000)),
                frame(true, 0, opcode::PONG, mask, b"xy"),
            ]);
            let whole = run_whole(sender, limits(), &data);
            let span = header_len(0x10000, mask.is_some()) + 3;
            for a in 0..=span {
                for b in a..=span {
                    let chunks = [&data[..a], &data[a..b], &data[b..]];
                    assert_eq!(run_chunks(sender, limits(), chunks), whole, "{sender:?} cuts {a},{b}");
                }
            }
        }
    }

    #[test]
    fn violation_is_reported_at_the_same_offset_however_the_header_is_split() {
        // A 64-bit length with the top bit set, after a valid frame.
        let mut bad = vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0];
        bad.extend_from_slice(&MASK);
        let data = cat(&[frame(true, 0, opcode::TEXT, Some(MASK), b"ok"), bad, pattern(20)]);
        let whole = run_whole(Side::Client, limits(), &data);
        assert_eq!(whole.seen, vec![Seen::Violation { v: Violation::InvalidLength, end: 8 + 14 }]);
        for at in 0..=data.len() {
            assert_eq!(run_split(Side::Client, limits(), &data, at), whole, "split at {at}");
        }
        assert_eq!(run_bytewise(Side::Client, limits(), &data), whole);
    }

    // ---- holding, at_boundary, bytes_into_frame ------------------------------------------

    #[test]
    fn holding_while_header_incomplete_but_not_during_data_payload() {
        let data = frame(true, 0, opcode::BINARY, Some(MASK), &pattern(300)); // 8-byte header
        let mut t = Tracker::new(Side::Client, limits());
        assert!(t.at_boundary() && !t.holding());
        assert_eq!(t.bytes_into_frame(), 0);
        for i in 0..8 {
            assert_eq!(t.feed(&data[i..i + 1]), (1, None));
            assert_eq!(t.bytes_into_frame(), i as u64 + 1);
            assert!(!t.at_boundary());
            assert_eq!(t.holding(), i < 7, "after {} header bytes", i + 1);
        }
        assert_eq!(t.feed(&data[8..108]), (100, None));
        assert!(!t.holding() && !t.at_boundary());
        assert_eq!(t.bytes_into_frame(), 108);
        assert_eq!(t.feed(&data[108..data.len() - 1]), (199, None));
        assert!(!t.holding() && !t.at_boundary());
        assert_eq!(t.bytes_into_frame(), data.len() as u64 - 1);
        assert_eq!(t.feed(&data[data.len() - 1..]), (1, None));
        assert!(t.at_boundary() && !t.holding());
        assert_eq!(t.bytes_into_frame(), 0);
    }

    #[test]
    fn holding_while_control_frame_incomplete() {
        let data = frame(true, 0, opcode::PING, Some(MASK), b"0123456789"); // 6-byte header
        let mut t = Tracker::new(Side::Client, limits());
        assert_eq!(t.feed(&data[..3]), (3, None));
        assert!(t.holding() && !t.at_boundary());
        assert_eq!(t.bytes_into_frame(), 3);
        assert_eq!(t.feed(&data[3..10]), (7, None));
        assert!(t.holding(), "control payload in progress");
        assert_eq!(t.bytes_into_frame(), 10);
        assert_eq!(t.feed(&data[10..]), (6, Some(Event::Control(opcode::PING))));
        assert!(!t.holding() && t.at_boundary());
        assert_eq!(t.bytes_into_frame(), 0);
        assert_eq!(t.control_payload(), b"0123456789");
        assert_eq!(t.frame_len(), data.len());
    }

    #[test]
    fn empty_data_frame_returns_to_boundary_when_header_completes() {
        let data = frame(false, 0, opcode::TEXT, None, b"");
        let mut t = Tracker::new(Side::Backend, limits());
        assert_eq!(t.feed(&data[..1]), (1, None));
        assert!(t.holding() && !t.at_boundary());
        assert_eq!(t.feed(&data[1..]), (1, None));
        assert!(t.at_boundary() && !t.holding());
        assert_eq!(t.take_data_frames(), 1);
    }

    #[test]
    fn bytes_into_frame_locates_frame_start_within_a_buffer() {
        // What the relay does: frame start = scanned - bytes_into_frame.
        let first = frame(true, 0, opcode::BINARY, Some(MASK), &pattern(40));
        let second = frame(true, 0, opcode::BINARY, Some(MASK), &pattern(300));
        let data = cat(&[first.clone(), second]);
        let mut t = Tracker::new(Side::Client, limits());
        for scanned in [first.len() + 1, first.len() + 5, first.len() + 8, first.len() + 100] {
            let mut t2 = Tracker::new(Side::Client, limits());
            assert_eq!(t2.feed(&data[..scanned]), (scanned, None));
            assert_eq!(scanned as u64 - t2.bytes_into_frame(), first.len() as u64, "scanned {scanned}");
        }
        assert_eq!(t.feed(&data[..first.len()]), (first.len(), None));
        assert!(t.at_boundary());
        assert_eq!(t.bytes_into_frame(), 0);
    }

    // ---- control frames ------------------------------------------------------------------

    #[test]
    fn client_ping_payload_is_unmasked_and_frame_len_counts_header() {
        // RFC 6455 §5.7 masked "Hello", as a ping.
        let data = [0x89, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58];
        let mut t = Tracker::new(Side::Client, limits());
        assert_eq!(t.feed(&data), (11, Some(Event::Control(opcode::PING))));
        assert_eq!(t.control_payload(), b"Hello");
        assert_eq!(t.frame_len(), 11);
        // Fed one byte at a time, the mask index follows the payload offset.
        let out = run_bytewise(Side::Client, limits(), &data);
        assert_eq!(
            out.seen,
            vec![Seen::Control { op: opcode::PING, payload: b"Hello".to_vec(), frame_len: 11, end: 11 }]
        );
    }

    #[test]
    fn full_length_masked_control_payload_is_unmasked() {
        let payload = pattern(125);
        let data = frame(true, 0, opcode::PONG, Some([0xde, 0xad, 0xbe, 0xef]), &payload);
        let mut t = Tracker::new(Side::Client, limits());
        assert_eq!(t.feed(&data), (131, Some(Event::Control(opcode::PONG))));
        assert_eq!(t.control_payload(), &payload[..]);
        assert_eq!(t.frame_len(), 6 + 125);
    }

    #[test]
    fn backend_control_payload_is_passed_unchanged() {
        let close = frame(true, 0, opcode::CLOSE, None, &[0x03, 0xE8, b'b', b'y', b'e']);
        let mut t = Tracker::new(Side::Backend, limits());
        assert_eq!(t.feed(&close), (7, Some(Event::Control(opcode::CLOSE))));
        assert_eq!(t.control_payload(), [0x03, 0xE8, b'b', b'y', b'e']);
        assert_eq!(t.frame_len(), 7);
    }

    #[test]
    fn control_event_stops_consumption_at_end_of_control_frame() {
        let before = frame(true, 0, opcode::BINARY, Some(MASK), &pattern(10));
        let ping = frame(true, 0, opcode::PING, Some(MASK), b"abc");
        let after = frame(true, 0, opcode::BINARY, Some(MASK), &pattern(5));
        let data = cat(&[before.clone(), ping.clone(), after.clone()]);
        let mut t = Tracker::new(Side::Client, limits());
        assert_eq!(t.feed(&data), (before.len() + ping.len(), Some(Event::Control(opcode::PING))));
        assert_eq!(t.frame_len(), ping.len());
        assert_eq!(t.control_payload(), b"abc");
        assert_eq!(t.feed(&data[before.len() + ping.len()..]), (after.len(), None));
        assert_eq!(t.take_data_frames(), 2);
    }

    #[test]
    fn control_payload_does_not_leak_into_the_next_control_frame() {
        let data = cat(&[frame(true, 0, opcode::PING, None, b"abcdef"), frame(true, 0, opcode::PONG, None, b"")]);
        let out = accepted(Side::Backend, limits(), &data);
        assert_eq!(
            out.seen,
            vec![
                Seen::Control { op: opcode::PING, payload: b"abcdef".to_vec(), frame_len: 8, end: 8 },
                Seen::Control { op: opcode::PONG, payload: vec![], frame_len: 2, end: 10 },
            ]
        );
    }

    #[test]
    fn non_minimal_length_encoding_is_counted_in_frame_len() {
        // RFC 6455 asks for the minimal length form, but the tracker does not enforce it; the
        // relay relies on frame_len to cut the frame out, so it must include the long header.
        for (form, header) in [(LenForm::Ext16, 8), (LenForm::Ext64, 14)] {
            let data = encode_form(true, 0, opcode::PONG, Some(MASK), &pattern(125), form);
            let mut t = Tracker::new(Side::Client, limits());
            assert_eq!(t.feed(&data), (header + 125, Some(Event::Control(opcode::PONG))));
            assert_eq!(t.frame_len(), header + 125);
            assert!(t.frame_len() <= 139);
            assert_eq!(t.control_payload(), &pattern(125)[..]);
        }
    }

    #[test]
    fn control_frames_between_fragments_of_a_message_are_accepted() {
        for (sender, mask) in DIRECTIONS {
            let frames = [
                frame(false, 0, opcode::TEXT, mask, b"one "),
                frame(true, 0, opcode::PING, mask, b"p"),
                frame(false, 0, opcode::CONTINUATION, mask, b"two "),
                frame(true, 0, opcode::PONG, mask, b""),
                frame(true, 0, opcode::PING, mask, &pattern(125)),
                frame(true, 0, opcode::CONTINUATION, mask, b"three"),
                frame(true, 0, opcode::BINARY, mask, b"next message"),
            ];
            let data = cat(&frames);
            let out = accepted(sender, limits(), &data);
            let ops: Vec<u8> = out
                .seen
                .iter()
                .map(|s| match s {
                    Seen::Control { op, .. } => *op,
                    Seen::Violation { .. } => unreachable!(),
                })
                .collect();
            assert_eq!(ops, [opcode::PING, opcode::PONG, opcode::PING]);
            assert_eq!(out.data_frames, 4);
            assert!(out.at_boundary);
            assert_eq!(run_bytewise(sender, limits(), &data), out);
        }
    }

    // ---- take_data_frames ----------------------------------------------------------------

    #[test]
    fn take_data_frames_counts_data_frames_and_resets() {
        let data = cat(&[
            frame(false, 0, opcode::TEXT, Some(MASK), b"a"),
            frame(true, 0, opcode::PING, Some(MASK), b""),
            frame(true, 0, opcode::CONTINUATION, Some(MASK), b""),
            frame(true, 0, opcode::BINARY, Some(MASK), &pattern(200)),
            frame(true, 0, opcode::CLOSE, Some(MASK), &[0x03, 0xE8]),
        ]);
        let mut t = Tracker::new(Side::Client, limits());
        let mut pos = 0;
        let mut controls = 0;
        while pos < data.len() {
            let (n, ev) = t.feed(&data[pos..]);
            pos += n;
            match ev {
                Some(Event::Control(_)) => controls += 1,
                Some(Event::Violation(v)) => panic!("{v}"),
                None => {}
            }
        }
        assert_eq!(controls, 2);
        assert_eq!(t.take_data_frames(), 3);
        assert_eq!(t.take_data_frames(), 0);
    }

    #[test]
    fn data_frame_is_counted_once_its_header_completes() {
        let data = frame(true, 0, opcode::BINARY, None, &pattern(1000));
        let mut t = Tracker::new(Side::Backend, limits());
        assert_eq!(t.feed(&data[..3]), (3, None));
        assert_eq!(t.take_data_frames(), 0, "header incomplete");
        assert_eq!(t.feed(&data[3..10]), (7, None));
        assert_eq!(t.take_data_frames(), 1);
        assert_eq!(t.feed(&data[10..]), (data.len() - 10, None));
        assert_eq!(t.take_data_frames(), 0);
    }

    // ---- violations ----------------------------------------------------------------------

    #[test]
    fn unmasked_client_frame_is_a_protocol_error() {
        let data = frame(true, 0, opcode::TEXT, None, b"hi");
        assert_eq!(violation(Side::Client, limits(), &data), (2, Violation::UnmaskedClientFrame));
        let ping = frame(true, 0, opcode::PING, None, b"");
        assert_eq!(violation(Side::Client, limits(), &ping), (2, Violation::UnmaskedClientFrame));
        assert_eq!(violation_code(Violation::UnmaskedClientFrame), 1002);
    }

    #[test]
    fn masked_backend_frame_is_a_protocol_error() {
        let data = frame(true, 0, opcode::BINARY, Some(MASK), b"hi");
        assert_eq!(violation(Side::Backend, limits(), &data), (6, Violation::MaskedBackendFrame));
        assert_eq!(violation_code(Violation::MaskedBackendFrame), 1002);
    }

    #[test]
    fn reserved_opcodes_are_protocol_errors() {
        for (sender, mask) in DIRECTIONS {
            for op in (0x3..=0x7).chain(0xB..=0xF) {
                let data = frame(true, 0, op, mask, b"x");
                let header = header_len(1, mask.is_some());
                assert_eq!(violation(sender, limits(), &data), (header, Violation::ReservedOpcode(op)), "{op:#x}");
                assert_eq!(violation_code(Violation::ReservedOpcode(op)), 1002);
            }
        }
    }

    #[test]
    fn rsv_bits_without_negotiated_extension_are_protocol_errors() {
        for rsv in [0x40, 0x20, 0x10, 0x70] {
            let data = frame(true, rsv, opcode::TEXT, Some(MASK), b"x");
            assert_eq!(violation(Side::Client, limits(), &data), (6, Violation::ReservedBits), "{rsv:#x}");
        }
        assert_eq!(violation_code(Violation::ReservedBits), 1002);
    }

    #[test]
    fn rsv_bits_allowed_by_negotiated_extension_are_accepted() {
        // permessage-deflate sets RSV1 on the first frame of a compressed message.
        let deflate = limits_with(1 << 20, 4 << 20, 0x40);
        let msg = cat(&[
            frame(false, 0x40, opcode::TEXT, Some(MASK), b"compressed"),
            frame(true, 0, opcode::CONTINUATION, Some(MASK), b"rest"),
        ]);
        assert_eq!(accepted(Side::Client, deflate, &msg).data_frames, 2);
        // Only the negotiated bit: RSV2 is still an error.
        let rsv2 = frame(true, 0x20, opcode::BINARY, Some(MASK), b"x");
        assert_eq!(violation(Side::Client, deflate, &rsv2), (6, Violation::ReservedBits));
        // allowed_rsv = 0x70 lets every RSV bit through, in both directions.
        let all = limits_with(1 << 20, 4 << 20, 0x70);
        for (sender, mask) in DIRECTIONS {
            for rsv in [0x40, 0x20, 0x10, 0x70] {
                let data = frame(true, rsv, opcode::BINARY, mask, b"payload");
                assert_eq!(accepted(sender, all, &data).data_frames, 1, "{sender:?} rsv {rsv:#x}");
            }
        }
    }

    #[test]
    fn control_frame_longer_than_125_bytes_is_a_protocol_error() {
        for op in [opcode::PING, opcode::PONG, opcode::CLOSE] {
            let data = frame(true, 0, op, Some(MASK), &pattern(126));
            assert_eq!(violation(Side::Client, limits(), &data), (8, Violation::ControlTooLong));
            let long = encode_form(true, 0, op, None, &pattern(200), LenForm::Ext64);
            assert_eq!(violation(Side::Backend, limits(), &long), (10, Violation::ControlTooLong));
            let ok = frame(true, 0, op, Some(MASK), &pattern(125));
            assert_eq!(accepted(Side::Client, limits(), &ok).seen.len(), 1);
        }
        assert_eq!(violation_code(Violation::ControlTooLong), 1002);
    }

    #[test]
    fn fragmented_control_frame_is_a_protocol_error() {
        for op in [opcode::PING, opcode::PONG, opcode::CLOSE] {
            let data = frame(false, 0, op, Some(MASK), b"ab");
            assert_eq!(violation(Side::Client, limits(), &data), (6, Violation::ControlFragmented));
        }
        assert_eq!(violation_code(Violation::ControlFragmented), 1002);
    }

    #[test]
    fn continuation_without_a_message_in_progress_is_a_protocol_error() {
        let data = frame(true, 0, opcode::CONTINUATION, Some(MASK), b"x");
        assert_eq!(violation(Side::Client, limits(), &data), (6, Violation::UnexpectedContinuation));
        // Also after a message that has finished.
        let first = frame(true, 0, opcode::TEXT, None, b"done");
        let data = cat(&[first.clone(), frame(false, 0, opcode::CONTINUATION, None, b"x")]);
        assert_eq!(violation(Side::Backend, limits(), &data), (first.len() + 2, Violation::UnexpectedContinuation));
        assert_eq!(violation_code(Violation::UnexpectedContinuation), 1002);
    }

    #[test]
    fn new_message_during_fragmented_message_is_a_protocol_error() {
        for op in [opcode::TEXT, opcode::BINARY] {
            let first = frame(false, 0, opcode::TEXT, Some(MASK), b"part");
            let ping = frame(true, 0, opcode::PING, Some(MASK), b"");
            let data = cat(&[first.clone(), ping.clone(), frame(true, 0, op, Some(MASK), b"new")]);
            assert_eq!(
                violation(Side::Client, limits(), &data),
                (first.len() + ping.len() + 6, Violation::ExpectedContinuation)
            );
        }
        assert_eq!(violation_code(Violation::ExpectedContinuation), 1002);
    }

    #[test]
    fn length_with_most_significant_bit_set_is_a_protocol_error() {
        for top in [0x80u8, 0xFF] {
            let mut backend = vec![0x82, 0x7F, top, 0, 0, 0, 0, 0, 0, 1];
            assert_eq!(violation(Side::Backend, limits(), &backend), (10, Violation::InvalidLength));
            backend[1] |= 0x80;
            backend.extend_from_slice(&MASK);
            assert_eq!(violation(Side::Client, limits(), &backend), (14, Violation::InvalidLength));
        }
        assert_eq!(violation_code(Violation::InvalidLength), 1002);
    }

    #[test]
    fn close_with_one_byte_payload_is_a_protocol_error() {
        let data = frame(true, 0, opcode::CLOSE, Some(MASK), &[0x03]);
        assert_eq!(violation(Side::Client, limits(), &data), (6, Violation::InvalidClosePayload));
        assert_eq!(violation_code(Violation::InvalidClosePayload), 1002);
        for payload in [&[][..], &[0x03, 0xE8][..], &[0x03, 0xE8, b'x'][..]] {
            let ok = frame(true, 0, opcode::CLOSE, Some(MASK), payload);
            assert_eq!(accepted(Side::Client, limits(), &ok).seen.len(), 1);
        }
    }

    #[test]
    fn frame_over_max_frame_size_is_a_size_error_reported_at_its_header() {
        let small = limits_with(1000, 1 << 20, 0);
        let at_limit = frame(true, 0, opcode::BINARY, Some(MASK), &pattern(1000));
        assert_eq!(accepted(Side::Client, small, &at_limit).data_frames, 1);
        let over = frame(true, 0, opcode::BINARY, Some(MASK), &pattern(1001));
        assert_eq!(violation(Side::Client, small, &over), (8, Violation::FrameTooLarge(1001)));
        // A huge declared length is caught from the header alone, before any payload.
        let mut huge = vec![0x02, 0x7F];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        assert_eq!(violation(Side::Backend, small, &huge), (10, Violation::FrameTooLarge(1 << 40)));
        assert_eq!(violation_code(Violation::FrameTooLarge(1001)), 1009);
        assert_eq!(Violation::FrameTooLarge(1001).label(), "frame_too_large");
    }

    #[test]
    fn message_over_max_message_size_across_fragments_is_a_size_error() {
        let lim = limits_with(1000, 2500, 0);
        let a = frame(false, 0, opcode::TEXT, Some(MASK), &pattern(1000));
        let ping = frame(true, 0, opcode::PING, Some(MASK), &pattern(125)); // not counted
        let b = frame(false, 0, opcode::CONTINUATION, Some(MASK), &pattern(1000));
        let over = frame(true, 0, opcode::CONTINUATION, Some(MASK), &pattern(501));
        let data = cat(&[a.clone(), ping.clone(), b.clone(), over]);
        assert_eq!(
            violation(Side::Client, lim, &data),
            (a.len() + ping.len() + b.len() + 8, Violation::MessageTooLarge)
        );
        assert_eq!(violation_code(Violation::MessageTooLarge), 1009);
        assert_eq!(Violation::MessageTooLarge.label(), "message_too_large");
        // Exactly at the limit is fine, and the next message starts counting from zero.
        let last = frame(true, 0, opcode::CONTINUATION, Some(MASK), &pattern(500));
        let next = frame(true, 0, opcode::BINARY, Some(MASK), &pattern(1000));
        let data = cat(&[a, ping, b, last, next.clone(), next]);
        assert_eq!(accepted(Side::Client, lim, &data).data_frames, 5);
    }

    #[test]
    fn close_codes_and_labels_follow_the_violation_kind() {
        let all = [
            (Violation::UnmaskedClientFrame, 1002, "masking"),
            (Violation::MaskedBackendFrame, 1002, "masking"),
            (Violation::ReservedOpcode(3), 1002, "protocol"),
            (Violation::ReservedBits, 1002, "protocol"),
            (Violation::ControlTooLong, 1002, "protocol"),
            (Violation::ControlFragmented, 1002, "protocol"),
            (Violation::UnexpectedContinuation, 1002, "protocol"),
            (Violation::ExpectedContinuation, 1002, "protocol"),
            (Violation::InvalidLength, 1002, "protocol"),
            (Violation::InvalidClosePayload, 1002, "protocol"),
            (Violation::FrameTooLarge(u64::MAX), 1009, "frame_too_large"),
            (Violation::MessageTooLarge, 1009, "message_too_large"),
        ];
        for (v, code, label) in all {
            assert_eq!((violation_code(v), v.label()), (code, label), "{v:?}");
        }
    }

    // ---- randomized ----------------------------------------------------------------------

    /// xorshift64: deterministic, dependency-free.
    struct Rng(u64);

    impl Rng {
        fn new(seed: u64) -> Rng {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }

        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        /// Uniform in `lo..=hi` (close enough for tests).
        fn range(&mut self, lo: u64, hi: u64) -> u64 {
            lo + self.next() % (hi - lo + 1)
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.next() % 100 < percent
        }

        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// A random stream of valid frames; returns it with the expected control events and data
    /// frame count.
    fn random_stream(rng: &mut Rng, sender: Side, allowed_rsv: u8) -> (Vec<u8>, Vec<Seen>, u64) {
        let mut data = Vec::new();
        let mut expected = Vec::new();
        let mut data_frames = 0;
        let mut in_message = false;
        for _ in 0..rng.range(1, 40) {
            let mask = match sender {
                Side::Client => Some((rng.next() as u32).to_be_bytes()),
                Side::Backend => None,
            };
            if rng.chance(30) {
                let op = [opcode::PING, opcode::PONG, opcode::CLOSE][rng.range(0, 2) as usize];
                let mut len = rng.range(0, 125) as usize;
                if op == opcode::CLOSE && len == 1 {
                    len = 2;
                }
                let payload = rng.bytes(len);
                let f = frame(true, 0, op, mask, &payload);
                data.extend_from_slice(&f);
                expected.push(Seen::Control { op, payload, frame_len: f.len(), end: data.len() });
            } else {
                let op = if in_message {
                    opcode::CONTINUATION
                } else if rng.chance(50) {
                    opcode::TEXT
                } else {
                    opcode::BINARY
                };
                let fin = rng.chance(60);
                let len = match rng.range(0, 99) {
                    0..=69 => rng.range(0, 125),
                    70..=94 => rng.range(126, 3000),
                    95..=97 => rng.range(3000, 0xFFFF),
                    _ => rng.range(0x10000, 0x12000),
                } as usize;
                let rsv = if rng.chance(50) { allowed_rsv & rng.next() as u8 } else { 0 };
                data.extend_from_slice(&frame(fin, rsv, op, mask, &pattern(len)));
                data_frames += 1;
                in_message = !fin;
            }
        }
        (data, expected, data_frames)
    }

    fn random_chunks<'a>(rng: &mut Rng, mut data: &'a [u8]) -> Vec<&'a [u8]> {
        let mut chunks = Vec::new();
        while !data.is_empty() {
            let max = match rng.range(0, 9) {
                0..=4 => 16,
                5..=7 => 1500,
                _ => 20_000,
            };
            let n = (rng.range(1, max) as usize).min(data.len());
            let (a, rest) = data.split_at(n);
            chunks.push(a);
            data = rest;
        }
        chunks
    }

    #[test]
    fn random_valid_streams_in_random_chunks_give_expected_events() {
        let mut rng = Rng::new(0x5EED);
        for round in 0..300 {
            let sender = if round % 2 == 0 { Side::Client } else { Side::Backend };
            let allowed_rsv = [0, 0x40, 0x70][round % 3];
            let lim = limits_with(1 << 20, u64::MAX, allowed_rsv);
            let (data, expected, data_frames) = random_stream(&mut rng, sender, allowed_rsv);
            let chunks = random_chunks(&mut rng, &data);
            let out = run_chunks(sender, lim, chunks);
            assert_eq!(
                out,
                Outcome { seen: expected, data_frames, at_boundary: true, holding: false, bytes_into_frame: 0 },
                "round {round}"
            );
        }
    }

    #[test]
    fn random_chunking_never_changes_the_outcome_of_corrupted_streams() {
        // Valid streams with a few bytes flipped: whatever the verdict, it must not depend on how
        // the bytes were split.
        let mut rng = Rng::new(0xC0FFEE);
        for round in 0..500 {
            let sender = if round % 2 == 0 { Side::Client } else { Side::Backend };
            let lim = limits_with(rng.range(0, 5000), rng.range(0, 20_000), [0, 0x40][round % 2]);
            let (mut data, _, _) = random_stream(&mut rng, sender, 0x40);
            for _ in 0..rng.range(1, 3) {
                let at = rng.range(0, data.len() as u64 - 1) as usize;
                data[at] ^= 1 << rng.range(0, 7);
            }
            let whole = run_whole(sender, lim, &data);
            let chunks = random_chunks(&mut rng, &data);
            assert_eq!(run_chunks(sender, lim, chunks), whole, "round {round}");
        }
    }
}
