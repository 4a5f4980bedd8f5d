//! Portcullis: an edge WebSocket proxy for AI-agent fleets.
//!
//! It terminates TLS, checks the WebSocket upgrade, routes each session to an agent backend and
//! splices frames between the two without re-encoding them, enforcing deadlines and limits.
//!
//! # Layout
//!
//! The data path, in the order a connection meets it (one file per stage under [`proxy`]):
//!
//! 1. `proxy/accept.rs`: connection caps (global and per client address, [`limits`]),
//!    TCP_NODELAY, per-connection span; [`proxy::proxy_protocol`] behind a load balancer.
//! 2. `proxy/tls.rs`: rustls handshake with SNI, ALPN and a timeout.
//! 3. `proxy/http.rs`: hyper HTTP/1.1, header size limit (431), header timeout (408).
//! 4. `proxy/route.rs`: host and path matching, capture validation (400/404).
//! 5. [`proxy::upgrade`]: RFC 6455 handshake checks (400/426).
//! 6. `proxy/auth.rs`: Origin policy, token sources, JWT verification ([`auth`]), agent grants
//!    (401/403), identity headers for the backend.
//! 7. `proxy/connect.rs`: backend connect and handshake (502/503/504); for plain HTTP
//!    requests `proxy/request.rs` and `proxy/stream.rs` instead (REST, SSE).
//! 8. [`proxy::relay`]: frame-aware splice, pings, deadlines (idle, lifetime, token expiry),
//!    close codes.
//!
//! Beneath it, arrows pointing down (`docs/architecture.md`): [`config`], [`metrics`] and
//! [`limits`] (leaves),
//! [`crypto`], [`session`] (sides, session ends, registry, stop handles), `outbound` (the
//! HTTP client for JWKS and the registry), [`auth`] (token verification), [`routing`] (route
//! table, pools, registry, health, member choice) and `state` (what the running parts share).
//! Above it: `admin` (`/metrics`, `/live`, `/ready`, `/sessions`) and [`server`] (listeners,
//! reload, drain). The binary (`main.rs`) adds the CLI: the one-command demo, the `connect`
//! client and token minting, none of which is library API.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub(crate) mod admin;
pub mod auth;
pub mod codec;
pub mod config;
pub mod crypto;
pub mod fanout;
pub mod handover;
pub mod limits;
pub mod metrics;
pub mod observe;
pub(crate) mod outbound;
pub mod proxy;
pub mod recording;
pub mod resume;
pub mod routing;
pub mod server;
pub mod session;
pub(crate) mod state;

/// Entry points for the fuzz targets in `fuzz/`: the parts of the data path a client reaches
/// before authentication, callable with inputs the fuzzer controls. Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::proxy::auth::{admit, Admitted};
}
