//! A client's request head, as bytes off the wire, through the stages that run before
//! authentication completes: HTTP parsing (httparse, as hyper uses it), the RFC 6455 upgrade
//! checks, route matching with capture validation, the Origin policy, and token extraction
//! from every source (header, query, cookie, subprotocol) up to the signature check.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = parsed.parse(data) else { return };
    let (Some(method), Some(path)) = (parsed.method, parsed.path) else { return };
    let mut builder = http::Request::builder().method(method).uri(path);
    for h in parsed.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    let Ok(req) = builder.body(()) else { return };
    common::through_the_stages(&req);
});
