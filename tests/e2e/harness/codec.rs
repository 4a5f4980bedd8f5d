//! A raw frame codec, so tests send exactly the bytes they mean (broken ones too).

use tokio::io::{AsyncRead, AsyncReadExt};

/// The opcodes, as the proxy's frame module names them (`op::CONT` is the continuation frame).
pub mod op {
    pub use portcullis::codec::opcode::*;
    pub const CONT: u8 = CONTINUATION;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TFrame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    /// Unmasked payload.
    pub payload: Vec<u8>,
    /// The bytes as they were on the wire.
    pub raw: Vec<u8>,
}

impl TFrame {
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == op::CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    pub fn close_reason(&self) -> String {
        String::from_utf8_lossy(self.payload.get(2..).unwrap_or_default()).into_owned()
    }
}

/// Encodes one frame with the proxy's own encoder; `rsv` is the three RSV bits (4 = RSV1).
pub fn encode(fin: bool, rsv: u8, opcode: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    portcullis::codec::encode(fin, rsv << 4, opcode, mask, payload, &mut out);
    out
}

pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// Reads one frame; `Err` on EOF or I/O error.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<TFrame> {
    let mut raw = vec![0u8; 2];
    r.read_exact(&mut raw).await?;
    let fin = raw[0] & 0x80 != 0;
    let rsv = (raw[0] >> 4) & 7;
    let opcode = raw[0] & 0x0F;
    let masked = raw[1] & 0x80 != 0;
    let len = match raw[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b).await?;
            raw.extend_from_slice(&b);
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            r.read_exact(&mut b).await?;
            raw.extend_from_slice(&b);
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut key = [0u8; 4];
    if masked {
        r.read_exact(&mut key).await?;
        raw.extend_from_slice(&key);
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    raw.extend_from_slice(&payload);
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i & 3];
        }
    }
    Ok(TFrame { fin, rsv, opcode, masked, payload, raw })
}

/// Reads an HTTP head byte by byte (so nothing after it is consumed).
pub async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if r.read(&mut b).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(b[0]);
        if head.len() > 64 * 1024 {
            return Err(std::io::Error::other("head too large"));
        }
    }
    Ok(head)
}

#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

pub fn parse_response(head: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(head).expect("valid response");
    Head {
        status: resp.code.unwrap_or(0),
        method: String::new(),
        path: String::new(),
        headers: resp
            .headers
            .iter()
            .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
            .collect(),
    }
}

pub fn parse_request(head: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).expect("valid request");
    Head {
        status: 0,
        method: req.method.unwrap_or("").to_string(),
        path: req.path.unwrap_or("").to_string(),
        headers: req
            .headers
            .iter()
            .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
            .collect(),
    }
}

pub fn accept_for(key: &str) -> String {
    portcullis::proxy::upgrade::accept_value(key.as_bytes())
}
