//! The PROXY protocol header (v1 text and v2 binary, every length and address family) as the
//! proxy-protocol stage parses it from the first bytes of a load balancer's connection: never a
//! panic, and a complete header never claims more bytes than it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::proxy::proxy_protocol::{parse, Parsed, MAX_HEADER};

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_HEADER + 64)];
    if let Ok(Parsed::Header { len, .. }) = parse(data) {
        assert!(len > 0 && len <= data.len() && len <= MAX_HEADER);
        // The same bytes with anything behind them parse to the same header.
        let mut longer = data[..len].to_vec();
        longer.extend_from_slice(b"\x16\x03\x01GET / HTTP/1.1\r\n");
        assert_eq!(parse(&longer).ok(), parse(&data[..len]).ok());
    }
});
