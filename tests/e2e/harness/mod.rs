//! Test harness: real sockets on 127.0.0.1 port 0, real TLS with a generated certificate, a raw
//! frame codec (so tests can send exactly the bytes they mean, including broken ones), a
//! recording test backend, and the proxy both in-process and as a child process, one file per
//! concern; configurations are built as TOML tables ([`config`]).

mod backend;
mod certs;
mod client;
mod codec;
mod config;
mod h2client;
mod http;
mod process;
mod proxy;
mod rest;
mod tokens;

pub use backend::*;
pub use certs::*;
pub use client::*;
pub use codec::*;
pub use config::*;
pub use h2client::*;
pub use http::*;
pub use process::*;
pub use proxy::*;
pub use rest::*;
pub use tokens::*;

use std::time::Duration;

/// Generous bound for anything that should happen "now" on a loaded 2-core machine.
pub const SOON: Duration = Duration::from_secs(10);

/// Polls `check` until it gives a value, for at most [`SOON`]: the one way these tests wait for
/// something another task or process does. Panics naming `what` when time runs out.
pub async fn eventually<T>(what: &str, check: impl AsyncFnMut() -> Option<T>) -> T {
    eventually_within(what, SOON, check).await
}

/// [`eventually`] with another bound than [`SOON`]: tries `check` every 10 ms until it gives a
/// value, and panics naming `what` once `limit` has passed without one (after one last try).
pub async fn eventually_within<T>(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
