//! The configuration parser: any text is an error with a file, line and key, or a config; never
//! a panic. (A reload reads an operator's file; `check-config` reads anything.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Config::parse(text, std::path::Path::new("fuzz.toml")) {
        Ok(c) => assert!(!c.listeners.is_empty()),
        Err(e) => assert!(e.to_string().starts_with("fuzz.toml")),
    }
});
