//! Portcullis: an edge proxy for AI-agent fleets.
//!
//! It terminates TLS, checks each request's token and the agent it may reach, routes it to an
//! agent backend, and governs every session that results: a relayed WebSocket (resumable after
//! a network blip), a fan-out client of a shared backend stream, an observer of a live session,
//! an SSE or other streamed response. Frames are spliced without being re-encoded.
//!
//! # Layout
//!
//! The major components, bottom up (`docs/architecture.md` draws the arrows, which
//! `tests/architecture.rs` checks):
//!
//! * [`config`], [`metrics`], [`codec`], [`crypto`], [`limits`]: leaves. The typed
//!   configuration; every metric name; the one WebSocket codec (the fuzzed frame tracker every
//!   reader of frames uses, a whole-frame reader over it, the encoder and close frames); the TLS
//!   crypto provider; the per-address and per-subject counts.
//! * [`session`]: the session layer. Its core is the one session model: the record every kind
//!   of session registers (`SessionEntry`), the stop handle revocation and the drain reach it
//!   by, the registry behind `/sessions` (whose token is the process's one drain signal), the
//!   drain spread, the one deadline engine ([`session::clock`]), the close table every
//!   WebSocket session ends through ([`session::close`], with the one end-of-session record),
//!   what the subscribers of a shared source have in common ([`session::subscriber`]), and the
//!   interfaces features plug into: `FinishStream` (how a session's stream is finished, and
//!   held while its client is away), `PayloadSink` and `Taps` (what a relayed session's
//!   payloads are shown to), `Attachment` (what a feature adds to a session's record). Each
//!   feature is one module under it that owns its registry and its task, and none imports
//!   another (`tests/architecture.rs`): [`session::resume`] (the sessions held for a
//!   reconnect, by the id the proxy issued, and the client stream that can be held),
//!   [`session::observe`] (a session's observer hub and the observer's task),
//!   [`session::fanout`] (the shared backend streams by route, agent, path and subject, the
//!   stream's task and each client's), [`session::recording`] (a session's asciicast writer,
//!   its bounded queue and retention).
//! * `outbound` (the proxy's own HTTP clients: JWKS and registry requests, the members'
//!   keep-alive pools) and [`auth`] (token verification, JWKS, the denylist) and [`routing`]
//!   (route table, member pools, registry, health, balance).
//! * `state`: what every running part shares: the configuration in force with what was built
//!   from it (`Runtime`, swapped on reload) and the process handles (`Shared`).
//! * [`proxy`]: the data path, one file per stage. A connection's task accepts
//!   (`proxy/accept.rs`), terminates TLS, serves HTTP/1.1 or HTTP/2 (`proxy/http.rs`), routes,
//!   checks the upgrade ([`proxy::upgrade`]) and the token (`proxy/auth.rs`). An accepted
//!   upgrade becomes one variant of `Accepted` (relay, resume, fan-out, observe), handed off by
//!   one function and started in one place, which calls down into the feature's module
//!   (the relay, [`proxy::relay`], is the data path's own); the feature's task never calls
//!   back up. Plain requests go through `proxy/request.rs` and `proxy/stream.rs` (REST, SSE).
//! * [`server`] (listeners, reload, drain), `admin` (`/metrics`, `/live`, `/ready` and the
//!   operator API: `/sessions`, `/routes`, `/recordings`, `/limits`), [`handover`] (the
//!   zero-downtime upgrade).
//!
//! The binary (`main.rs`) adds the CLI: the one-command demo, the `connect` client and token
//! minting, none of which is library API.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub(crate) mod admin;
pub mod auth;
pub mod codec;
pub mod config;
pub mod crypto;
pub mod fleet;
pub mod handover;
pub mod limits;
pub mod metrics;
pub(crate) mod outbound;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod session;
pub(crate) mod state;
#[cfg(test)]
pub(crate) mod testing;

/// Entry points for the fuzz targets in `fuzz/`: the parts of the data path a client reaches
/// before authentication, callable with inputs the fuzzer controls. Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::proxy::auth::{admit, Admitted};
}
