//! End-to-end tests over real sockets: TLS and plain clients, the proxy (in-process, or as a
//! child process where signals or process-wide numbers matter), and real test backends.

#[allow(dead_code)]
mod harness;
#[path = "../../src/mint.rs"]
mod mint;

mod affinity;
mod auth;
mod cli;
mod dashboards;
mod deadlines;
mod deflate;
mod demo;
mod drain;
mod fanout;
mod faults;
mod fleet;
mod handover;
mod handshake;
mod http;
mod http2;
mod limits;
mod mcp;
mod metrics;
mod observe;
mod proxy_protocol;
mod rates;
mod readme;
mod rebalance;
mod recording;
mod relay;
mod reload;
mod resume;
mod routing;
mod tls;
mod trust;
mod workers;
