//! Portcullis load-test harness: a WebSocket load generator with integrity checks and
//! coordinated-omission-corrected latency, plus the backends it measures against.
//!
//! # Layout
//!
//! - [`scenario`]: what a run does (`echo`, `rate`, `idle`, `storm`, `terminal`) and the loop
//!   that drives sessions; [`run`] is the entry point.
//! - [`target`]: opening one session (TCP from a chosen source address, TLS, upgrade, token).
//! - [`token`]: minting a JWT per connection from claim templates ([`template`]).
//! - [`wire`]: the 32-byte integrity header every message carries.
//! - [`stats`]: live counters, histograms and the final [`Report`].
//! - [`backend`]: the echo/sink/source/terminal WebSocket server (with fault injection).
//! - [`html`]: the `--html` report with SVG plots.
//! - [`compare`]: the same scenario against several targets, interleaved, medians and ratios.
//! - [`procs`]: `--procs N`, splitting a run over worker processes and merging their reports.
//! - [`sys`]: descriptor limit and /proc sampling of a target process.

pub mod backend;
pub mod compare;
pub mod headline;
pub mod html;
pub mod procs;
pub mod scenario;
pub mod stats;
pub mod sys;
pub mod target;
pub mod template;
pub mod token;
pub mod wire;

use std::time::Duration;

pub use scenario::{run, Kind, Scenario};
pub use stats::Report;

/// Parses `250ms`, `10s`, `2m`, `1h`, `500us`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid duration `{text}` (use 500ms, 10s, 2m)"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("invalid duration unit in `{text}` (use us, ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration `{text}`: {e}"))
}

/// Serde helper: a duration written as `"10s"` or a number of seconds.
pub fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Secs(f64),
    }
    match Raw::deserialize(d)? {
        Raw::Text(t) => parse_duration(&t).map_err(serde::de::Error::custom),
        Raw::Secs(s) => Duration::try_from_secs_f64(s).map_err(serde::de::Error::custom),
    }
}

use serde::Deserialize;

/// Serde helper: writes a duration as `"1.5s"` (read back by [`de_duration`]).
pub fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}s", d.as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("ten").is_err());
    }
}
