//! Tokens with a fuzzed JOSE header and claims, signed with the authenticator's own HS256 key so
//! that decoding goes past the signature: header parsing, algorithm and key choice, claims
//! decoding, `exp`/`nbf`/`iss`/`aud`/required claims and the agent grant. Input: header JSON,
//! a 0xFF byte, claims JSON (without 0xFF the whole input is the claims).
#![no_main]

#[path = "common.rs"]
mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

fuzz_target!(|data: &[u8]| {
    let (header, claims) = match data.iter().position(|b| *b == 0xFF) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&br#"{"alg":"HS256","typ":"JWT"}"#[..], data),
    };
    let signing_input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
    let mut mac = Hmac::<Sha256>::new_from_slice(common::SECRET).expect("any key length");
    mac.update(signing_input.as_bytes());
    let token = format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()));
    let Ok(req) = http::Request::builder()
        .uri("/agents/a1/terminal")
        .header("host", "proxy.test")
        .header("upgrade", "websocket")
        .header("connection", "Upgrade")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-version", "13")
        .header("authorization", format!("Bearer {token}"))
        .body(())
    else {
        return;
    };
    common::through_the_stages(&req);
});
