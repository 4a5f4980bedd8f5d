//! Stage: upgrade. Checks that a request is a valid WebSocket opening handshake (RFC 6455
//! §4.2.1 on HTTP/1.1, RFC 8441 §4 extended CONNECT on HTTP/2) and computes the accept value.
//!
//! An HTTP/2 WebSocket carries no `Sec-WebSocket-Key` (the stream itself is the proof that
//! the server speaks WebSocket), but the backend is reached over HTTP/1.1 and needs one: the
//! proxy makes a fresh random key for it, and checks the backend's accept against that.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use http::header::{
    CONNECTION, SEC_WEBSOCKET_EXTENSIONS, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderMap, HeaderValue, Method, Request};
use sha1::{Digest, Sha1};

/// Why a request is not a valid WebSocket upgrade.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UpgradeError {
    /// No `Upgrade: websocket`: a plain HTTP request on a WebSocket route (426).
    #[error("this endpoint only accepts WebSocket upgrades")]
    NotUpgrade,
    /// An upgrade on a route that serves plain HTTP only (400).
    #[error("this endpoint does not accept WebSocket upgrades")]
    HttpOnlyRoute,
    /// The method is not GET (400).
    #[error("a WebSocket upgrade must use GET")]
    BadMethod,
    /// The request is HTTP/1.0: an upgrade needs HTTP/1.1 (RFC 6455 §4.1), and hyper would
    /// answer 101 and then not hand the connection over (400, before any backend is asked).
    #[error("a WebSocket upgrade needs HTTP/1.1")]
    OldHttp,
    /// `Connection` does not contain the `upgrade` token (400).
    #[error("the Connection header must contain \"upgrade\"")]
    MissingConnectionUpgrade,
    /// `Sec-WebSocket-Key` is missing or not 16 bytes in base64 (400).
    #[error("Sec-WebSocket-Key must be 16 bytes in base64")]
    BadKey,
    /// `Sec-WebSocket-Version` is not 13 (426 with `Sec-WebSocket-Version: 13`).
    #[error("only WebSocket version 13 is supported")]
    BadVersion,
    /// An HTTP/2 extended CONNECT asks for a `:protocol` other than `websocket` (400).
    #[error("an extended CONNECT must ask for :protocol websocket")]
    BadProtocol,
    /// A CONNECT that is not a WebSocket: the proxy opens no tunnels (405).
    #[error("CONNECT is only served for WebSockets (RFC 8441)")]
    ConnectTunnel,
}

/// The parts of a valid upgrade request that go on to the backend.
#[derive(Debug, Clone)]
pub struct WsRequest {
    /// The client's `Sec-WebSocket-Key`, passed to the backend unchanged.
    pub key: HeaderValue,
    /// `Sec-WebSocket-Protocol` offered by the client.
    pub protocol: Option<HeaderValue>,
    /// `Sec-WebSocket-Extensions` offered by the client.
    pub extensions: Option<HeaderValue>,
}

/// Whether the request asks for a WebSocket (`Upgrade: websocket`), valid or not.
pub fn is_websocket(headers: &HeaderMap) -> bool {
    header_has_token(headers, &UPGRADE, "websocket")
}

/// Whether an HTTP/2 request is an extended CONNECT (RFC 8441 §4), for any `:protocol`.
pub fn is_extended_connect<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT && req.extensions().get::<hyper::ext::Protocol>().is_some()
}

/// Validates an HTTP/2 WebSocket opening (RFC 8441 §5): `CONNECT` with `:protocol =
/// websocket` and `Sec-WebSocket-Version: 13`. The key passed to the backend is a new random
/// one.
pub fn check_extended_connect<B>(req: &Request<B>) -> Result<WsRequest, UpgradeError> {
    match req.extensions().get::<hyper::ext::Protocol>() {
        None => return Err(UpgradeError::NotUpgrade),
        Some(p) if p.as_str() != "websocket" => return Err(UpgradeError::BadProtocol),
        Some(_) => {}
    }
    if req.method() != Method::CONNECT {
        return Err(UpgradeError::BadMethod);
    }
    let headers = req.headers();
    let mut versions = headers.get_all(SEC_WEBSOCKET_VERSION).iter();
    match (versions.next(), versions.next()) {
        (Some(v), None) if v.as_bytes() == b"13" => {}
        _ => return Err(UpgradeError::BadVersion),
    }
    let key = BASE64.encode(rand::random::<[u8; 16]>());
    Ok(WsRequest {
        key: HeaderValue::from_str(&key).map_err(|_| UpgradeError::BadKey)?,
        protocol: joined(headers, &SEC_WEBSOCKET_PROTOCOL),
        extensions: joined(headers, &SEC_WEBSOCKET_EXTENSIONS),
    })
}

/// Validates the opening handshake.
pub fn check<B>(req: &Request<B>) -> Result<WsRequest, UpgradeError> {
    let headers = req.headers();
    if !is_websocket(headers) {
        return Err(UpgradeError::NotUpgrade);
    }
    if req.method() != Method::GET {
        return Err(UpgradeError::BadMethod);
    }
    if req.version() != http::Version::HTTP_11 {
        return Err(UpgradeError::OldHttp);
    }
    if !header_has_token(headers, &CONNECTION, "upgrade") {
        return Err(UpgradeError::MissingConnectionUpgrade);
    }
    let mut versions = headers.get_all(SEC_WEBSOCKET_VERSION).iter();
    match (versions.next(), versions.next()) {
        (Some(v), None) if v.as_bytes() == b"13" => {}
        _ => return Err(UpgradeError::BadVersion),
    }
    let mut keys = headers.get_all(SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) => k,
        _ => return Err(UpgradeError::BadKey),
    };
    match BASE64.decode(key.as_bytes()) {
        Ok(raw) if raw.len() == 16 => {}
        _ => return Err(UpgradeError::BadKey),
    }
    Ok(WsRequest {
        key: key.clone(),
        protocol: joined(headers, &SEC_WEBSOCKET_PROTOCOL),
        extensions: joined(headers, &SEC_WEBSOCKET_EXTENSIONS),
    })
}

/// The `Sec-WebSocket-Accept` value for `key` (RFC 6455 §4.2.2).
pub fn accept_value(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    BASE64.encode(sha.finalize())
}

/// Whether any comma-separated element of header `name` equals `token` (ASCII case-insensitive).
pub fn header_has_token(headers: &HeaderMap, name: &http::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| v.to_str().map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))).unwrap_or(false))
}

/// All values of a header joined with ", " (a header may be sent on several lines).
fn joined(headers: &HeaderMap, name: &http::HeaderName) -> Option<HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let mut out = first.as_bytes().to_vec();
    for v in values {
        out.extend_from_slice(b", ");
        out.extend_from_slice(v.as_bytes());
    }
    HeaderValue::from_bytes(&out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> http::request::Builder {
        Request::get("/x")
            .header("upgrade", "WebSocket")
            .header("connection", "keep-alive, Upgrade")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13")
    }

    #[test]
    fn extended_connect_is_checked_and_gets_a_fresh_key() {
        let h2 = |protocol: Option<&'static str>, version: &str| {
            let mut r = Request::connect("https://a.example/x")
                .header("sec-websocket-version", version)
                .body(())
                .expect("request");
            if let Some(p) = protocol {
                r.extensions_mut().insert(hyper::ext::Protocol::from_static(p));
            }
            r
        };
        let a = check_extended_connect(&h2(Some("websocket"), "13")).expect("valid");
        let b = check_extended_connect(&h2(Some("websocket"), "13")).expect("valid");
        assert_eq!(BASE64.decode(a.key.as_bytes()).expect("base64").len(), 16);
        assert_ne!(a.key, b.key, "each opening gets its own key");
        assert_eq!(check_extended_connect(&h2(Some("connect-udp"), "13")).unwrap_err(), UpgradeError::BadProtocol);
        assert_eq!(check_extended_connect(&h2(Some("websocket"), "8")).unwrap_err(), UpgradeError::BadVersion);
        assert_eq!(check_extended_connect(&h2(None, "13")).unwrap_err(), UpgradeError::NotUpgrade);
        assert!(is_extended_connect(&h2(Some("connect-udp"), "13")));
        assert!(!is_extended_connect(&h2(None, "13")));
    }

    #[test]
    fn rfc_example_accept_value() {
        assert_eq!(accept_value(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn valid_request_passes() {
        let r = req().body(()).expect("request");
        assert!(check(&r).is_ok());
    }

    #[test]
    fn each_check_has_its_error() {
        let r = Request::get("/x").body(()).expect("request");
        assert_eq!(check(&r).unwrap_err(), UpgradeError::NotUpgrade);
        let r = req().method("POST").body(()).expect("request");
        assert_eq!(check(&r).unwrap_err(), UpgradeError::BadMethod);
        let r = req().version(http::Version::HTTP_10).body(()).expect("request");
        assert_eq!(check(&r).unwrap_err(), UpgradeError::OldHttp);
        let r = req().header("sec-websocket-version", "8").body(()).expect("request");
        assert_eq!(check(&r).unwrap_err(), UpgradeError::BadVersion);
        let mut r = req().body(()).expect("request");
        r.headers_mut().insert("sec-websocket-key", HeaderValue::from_static("c2hvcnQ="));
        assert_eq!(check(&r).unwrap_err(), UpgradeError::BadKey);
        r.headers_mut().insert("connection", HeaderValue::from_static("keep-alive"));
        assert_eq!(check(&r).unwrap_err(), UpgradeError::MissingConnectionUpgrade);
    }
}
