//! The configuration's value parsers that shape what a request is matched against: path
//! patterns, member templates, token sources and Origin patterns, each parsed from fuzzed text
//! and then used: a path matched and rendered, an Origin header value checked.
#![no_main]

use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use portcullis::config::{
    render_path, template_captures, valid_capture, BackendTemplate, Captures, OriginPattern, PathPattern, TokenSource,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // "pattern\ninput": the first line is parsed as each kind of pattern, the rest is what a
    // client sends (a path, an Origin value, a capture).
    let (pattern, input) = text.split_once('\n').unwrap_or((text, "/agents/a1/terminal"));
    if let Ok(p) = PathPattern::from_str(pattern) {
        let _ = p.has_capture("agent");
        assert_eq!(p.to_string(), pattern);
    }
    let caps = Captures::from_pairs(&[("agent", input)]);
    if let Ok(t) = BackendTemplate::from_str(pattern) {
        if let Some(rendered) = t.render(&caps) {
            assert!(!input.contains('.') || !t.captures().any(|c| c == "agent") || !rendered.is_empty());
        }
    }
    let _ = template_captures(pattern);
    let _ = render_path(pattern, &caps);
    let _ = valid_capture(input);
    let _ = TokenSource::from_str(pattern);
    if let Ok(o) = OriginPattern::from_str(pattern) {
        let _ = o.matches(input);
        let _ = o.to_string();
    }
});
