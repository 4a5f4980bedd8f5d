//! Stage: proxy-protocol. On a listener behind an L4 load balancer, reads the PROXY protocol
//! header (v1 text or v2 binary, parsed by the `ppp` crate) that the balancer sends before
//! anything else, and returns the client address it carries: that address is then the
//! client's everywhere (logs, `/sessions`, `X-Forwarded-For`, per-client policy).
//!
//! Accepted only from the listener's `proxy_protocol_from` sources; a connection from anyone
//! else, or without a valid header, is closed (the listener never serves a connection without
//! one). The header is read with `peek` and then consumed exactly, so the bytes behind it (a
//! TLS ClientHello, an HTTP request) stay in the socket for the next stage. The whole read is
//! bounded by the TLS handshake timeout and by [`MAX_HEADER`] bytes.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::v1;
use ppp::v2;
use ppp::{HeaderResult, PartialResult};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Longest v1 header, CRLF included (the spec's 107 bytes).
const V1_MAX: usize = 107;

/// Largest header read: a v2 header with up to 4 KiB of TLVs (v1 is at most 107 bytes).
pub const MAX_HEADER: usize = 16 + 4096;

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The peer is not one of the listener's `proxy_protocol_from` sources.
    #[error("PROXY protocol from an untrusted source")]
    Untrusted,
    /// Not a PROXY header, or a malformed one.
    #[error("malformed PROXY protocol header")]
    Malformed,
    /// A header longer than [`MAX_HEADER`].
    #[error("PROXY protocol header over {MAX_HEADER} bytes")]
    TooLarge,
    /// No complete header within the time allowed.
    #[error("no PROXY protocol header within {0:?}")]
    Timeout(Duration),
    /// The peer closed (or the socket failed) before a complete header.
    #[error("connection closed before a complete PROXY protocol header")]
    Closed,
}

impl ProxyHeaderError {
    /// Bounded label for `portcullis_proxy_protocol_total{result}`.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyHeaderError::Untrusted => "untrusted",
            ProxyHeaderError::Malformed => "malformed",
            ProxyHeaderError::TooLarge => "too_large",
            ProxyHeaderError::Timeout(_) => "timeout",
            ProxyHeaderError::Closed => "closed",
        }
    }
}

/// What the start of a connection holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A complete header of `len` bytes that names the client: `Some(address)`, or `None`
    /// when it names none (v2 `LOCAL`, as balancers send for their own health checks; v1
    /// `UNKNOWN`; v2 `UNSPEC` or UNIX addresses); the connection's own peer is used then.
    Header {
        /// The client's address, if the header names one.
        client: Option<SocketAddr>,
        /// Bytes the header takes.
        len: usize,
    },
    /// Not enough bytes yet to tell.
    Incomplete,
}

/// Parses a PROXY header (v1 or v2) at the start of `buf`. Total: every input gives a result,
/// never a panic (the `proxy_header` fuzz target holds it to that).
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyHeaderError> {
    let result = HeaderResult::parse(buf);
    if result.is_incomplete() {
        return if buf.len() >= MAX_HEADER { Err(ProxyHeaderError::TooLarge) } else { Ok(Parsed::Incomplete) };
    }
    let (client, len) = match result {
        HeaderResult::V2(Ok(h)) => {
            let client = match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
            };
            (client, h.len())
        }
        HeaderResult::V1(Ok(h)) => {
            // The spec ends a v1 line with CRLF; `ppp` also takes a line that merely runs to
            // the end of the bytes it was given, which would make the result depend on how the
            // bytes were segmented (found by the `proxy_header` fuzz target). Without CRLF it
            // is incomplete while a line may still come, else malformed.
            if !h.header.ends_with("\r\n") {
                return if buf.len() < V1_MAX && !buf.contains(&b'\r') {
                    Ok(Parsed::Incomplete)
                } else {
                    Err(ProxyHeaderError::Malformed)
                };
            }
            let client = match h.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            };
            (client, h.header.len())
        }
        _ => return Err(ProxyHeaderError::Malformed),
    };
    if len == 0 || len > buf.len() || len > MAX_HEADER {
        return Err(if len > MAX_HEADER { ProxyHeaderError::TooLarge } else { ProxyHeaderError::Malformed });
    }
    Ok(Parsed::Header { client, len })
}

/// Reads and consumes the PROXY header of `tcp` (whose peer is `peer`, already checked to be
/// a trusted source) within `limit`; returns the client address to use.
pub async fn read(tcp: &mut TcpStream, peer: SocketAddr, limit: Duration) -> Result<SocketAddr, ProxyHeaderError> {
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; MAX_HEADER];
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.peek(&mut buf)).await {
            Err(_) => return Err(ProxyHeaderError::Timeout(limit)),
            Ok(Err(_)) | Ok(Ok(0)) => return Err(ProxyHeaderError::Closed),
            Ok(Ok(n)) => n,
        };
        match parse(&buf[..n])? {
            Parsed::Header { client, len } => {
                // Consume exactly the header; what follows stays for the next stage.
                match tokio::time::timeout_at(deadline, tcp.read_exact(&mut buf[..len])).await {
                    Err(_) => return Err(ProxyHeaderError::Timeout(limit)),
                    Ok(Err(_)) => return Err(ProxyHeaderError::Closed),
                    Ok(Ok(_)) => return Ok(client.unwrap_or(peer)),
                }
            }
            // Part of a header: balancers send it in one segment, so this is rare. `peek`
            // leaves the socket readable, so wait a little before looking again.
            Parsed::Incomplete => {
                if tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(5))).await.is_err() {
                    return Err(ProxyHeaderError::Timeout(limit));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&((addresses.len() + tlvs.len()) as u16).to_be_bytes());
        h.extend_from_slice(addresses);
        h.extend_from_slice(tlvs);
        h
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let h = b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\nGET / HTTP/1.1\r\n";
        let len = b"PROXY TCP4 203.0.113.7 10.0.0.1 5555 443\r\n".len();
        assert_eq!(parse(h).ok(), Some(Parsed::Header { client: Some("203.0.113.7:5555".parse().unwrap()), len }));
        let h = b"PROXY TCP6 2001:db8::7 2001:db8::1 6666 443\r\n";
        assert_eq!(
            parse(h).ok(),
            Some(Parsed::Header { client: Some("[2001:db8::7]:6666".parse().unwrap()), len: h.len() })
        );
        let h = b"PROXY UNKNOWN\r\n";
        assert_eq!(parse(h).ok(), Some(Parsed::Header { client: None, len: h.len() }));
        assert_eq!(parse(b"PROXY TCP4 203.0.113.7").ok(), Some(Parsed::Incomplete));
    }

    #[test]
    fn v2_proxy_local_and_tlvs() {
        let mut a = vec![203, 0, 113, 7, 10, 0, 0, 1];
        a.extend_from_slice(&5555u16.to_be_bytes());
        a.extend_from_slice(&443u16.to_be_bytes());
        let h = v2(1, 0x11, &a, &[]);
        assert_eq!(
            parse(&h).ok(),
            Some(Parsed::Header { client: Some("203.0.113.7:5555".parse().unwrap()), len: h.len() })
        );
        // TLVs (here a NOOP) are skipped with the header.
        let h = v2(1, 0x11, &a, &[0x04, 0x00, 0x01, 0x00]);
        assert_eq!(
            parse(&h).ok(),
            Some(Parsed::Header { client: Some("203.0.113.7:5555".parse().unwrap()), len: h.len() })
        );
        let h = v2(0, 0x00, &[], &[]);
        assert_eq!(parse(&h).ok(), Some(Parsed::Header { client: None, len: 16 }));
        assert_eq!(parse(&h[..10]).ok(), Some(Parsed::Incomplete));
    }

    #[test]
    fn a_v1_line_without_crlf_is_not_a_header() {
        // The fuzz target's first find: `ppp` accepted this line ending in a bare LF when the
        // buffer ended there, and refused it with more bytes behind.
        let crash = b"PROXY TCP6 :: 2001::166 6 446 \n";
        assert_eq!(parse(crash).ok(), Some(Parsed::Incomplete));
        let mut longer = crash.to_vec();
        longer.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert!(matches!(parse(&longer), Err(ProxyHeaderError::Malformed)));
        assert!(matches!(parse(&[b'x'; 200]), Err(ProxyHeaderError::Malformed)));
    }

    #[test]
    fn garbage_is_malformed_not_incomplete() {
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Err(ProxyHeaderError::Malformed)));
        assert!(matches!(parse(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), Err(ProxyHeaderError::Malformed)));
        let mut bad_version = v2(1, 0x11, &[0; 12], &[]);
        bad_version[12] = 0x31;
        assert!(parse(&bad_version).is_err());
    }
}
