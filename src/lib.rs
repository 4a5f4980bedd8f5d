//! Portcullis: an edge WebSocket proxy for AI-agent fleets.
//!
//! It terminates TLS, checks the WebSocket upgrade, routes each session to an agent backend and
//! splices frames between the two without re-encoding them, enforcing deadlines and limits.
//!
//! # Layout
//!
//! The data path, in the order a connection meets it (one file per stage under [`proxy`]):
//!
//! 1. [`proxy::accept`]: connection cap, TCP_NODELAY, per-connection span.
//! 2. [`proxy::tls`]: rustls handshake with SNI, ALPN and a timeout.
//! 3. [`proxy::http`]: hyper HTTP/1.1, header size limit (431), header timeout (408).
//! 4. [`proxy::upgrade`]: RFC 6455 handshake checks (400/426).
//! 5. [`proxy::route`]: host and path matching, capture validation (400/404).
//! 6. [`proxy::connect`]: backend connect and handshake (502/503/504).
//! 7. [`proxy::relay`]: frame-aware splice, pings, deadlines, close codes.
//!
//! Around it: [`config`] (typed configuration), [`server`] (listeners, drain), [`admin`]
//! (`/metrics`, `/live`, `/ready`), [`metrics`], [`session`] (stop handles), [`error`] (status
//! mapping), [`demo`] (the one-command demo).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod config;
pub mod demo;
pub mod error;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod session;
