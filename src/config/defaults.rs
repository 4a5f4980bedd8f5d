//! Every default of the configuration, in one place. `config/portcullis.toml` writes the same
//! values; a test (`reference_file_states_the_defaults`) checks that the two agree.

use std::net::SocketAddr;
use std::time::Duration;

use super::{
    BackendSettings, Balance, HealthSettings, Http2Settings, Policy, RateAction, ServerSettings, SessionRate,
    SessionSettings,
};

/// `[admin] address`: loopback, because the admin API is for operators.
pub const ADMIN_ADDRESS: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9090));
/// Admin connections open at once (`[admin] max_connections`).
pub const ADMIN_MAX_CONNECTIONS: usize = 64;
/// Admin connections one client address may hold at once (`[admin] max_connections_per_ip`).
pub const ADMIN_MAX_CONNECTIONS_PER_IP: usize = 8;

/// `[auth] max_sessions_per_subject`: sessions one subject holds over every route.
pub const AUTH_MAX_SESSIONS_PER_SUBJECT: u32 = 256;
/// `[auth] leeway`.
pub const AUTH_LEEWAY: Duration = Duration::from_secs(30);
/// `[auth] max_token_size`.
pub const AUTH_MAX_TOKEN_SIZE: usize = 8 * 1024;
/// `[auth] cache_capacity`.
pub const AUTH_CACHE_CAPACITY: u64 = 100_000;
/// `[auth] revocation_ttl`.
pub const AUTH_REVOCATION_TTL: Duration = Duration::from_secs(24 * 3600);
/// `[routes.auth] enforce_expiry`.
pub const ENFORCE_EXPIRY: bool = true;
/// `[routes.auth] subprotocol_marker`.
pub const SUBPROTOCOL_MARKER: &str = "portcullis";
/// `[routes.origin] allow_missing`.
pub const ORIGIN_ALLOW_MISSING: bool = true;

/// `[[auth.jwks]] refresh_interval`.
pub const JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(300);
/// `[[auth.jwks]] min_refetch_interval`.
pub const JWKS_MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(10);
/// `[[auth.jwks]] timeout`.
pub const JWKS_TIMEOUT: Duration = Duration::from_secs(5);

/// `[routes.registry] timeout`.
pub const REGISTRY_TIMEOUT: Duration = Duration::from_secs(2);
/// `[routes.registry] ttl`.
pub const REGISTRY_TTL: Duration = Duration::from_secs(30);
/// `[routes.registry] negative_ttl`.
pub const REGISTRY_NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// `[routes.registry] stale_ttl`.
pub const REGISTRY_STALE_TTL: Duration = Duration::from_secs(300);
/// `[routes.registry] max_capacity`.
pub const REGISTRY_MAX_CAPACITY: u64 = 100_000;

/// Weight of a member written without one.
pub const MEMBER_WEIGHT: u32 = 1;

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            max_connections: 100_000,
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(60),
            runtime_dir: None,
            max_header_size: 16 * 1024,
            drain_spread: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(25),
            removed_route_grace: Duration::from_secs(600),
            reload_poll_interval: Duration::from_secs(2),
            worker_threads: 0,
            worker_model: super::WorkerModel::WorkStealing,
            trusted_proxies: Vec::new(),
            max_connections_per_ip: 256,
            ipv6_prefix_len: 64,
            handshake_rate_per_ip: 20,
            handshake_burst_per_ip: 40,
            connection_rate_per_ip: 20,
            connection_burst_per_ip: 50,
            token_check_rate_per_ip: 10,
            token_check_burst_per_ip: 20,
        }
    }
}

impl Default for Http2Settings {
    fn default() -> Self {
        let (streams, window) = (100, 64 * 1024);
        Http2Settings {
            enabled: true,
            max_concurrent_streams: streams,
            initial_stream_window: window,
            initial_connection_window: streams * window,
            max_frame_size: 16 * 1024,
            // As many exchanges at once as `max_connections_per_ip`'s HTTP/1.1 connections carry:
            // an address holds no more backend connections over HTTP/2 than over HTTP/1.1.
            max_streams_per_ip: 256,
            keepalive_interval: Duration::ZERO,
            keepalive_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(180),
        }
    }
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            ping_interval: Duration::from_secs(30),
            ping_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(15 * 60),
            max_lifetime: Duration::from_secs(24 * 3600),
            close_timeout: Duration::from_secs(5),
            max_frame_size: 1 << 20,
            max_message_size: 16 << 20,
            buffer_size: 16 * 1024,
            client_rate: SessionRate { messages: 1_000, bytes: 8 << 20 },
            backend_rate: SessionRate { messages: 0, bytes: 0 },
            rate_burst: Duration::from_secs(1),
            rate_action: RateAction::Slow,
        }
    }
}

impl Default for BackendSettings {
    fn default() -> Self {
        BackendSettings {
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            response_header_timeout: Duration::from_secs(30),
            idle_body_timeout: Duration::from_secs(300),
            max_request_body: 10 << 20,
            // Above the requests a member has at once under load, so that a steady load keeps its
            // connections: at 32, 1,000 client connections in a closed loop to one member opened a
            // new member connection for 4 in 10 requests (BENCHMARKS.md, "Plain requests: the
            // connections kept per member"). Held to an eighth of the outbound budget.
            max_idle_per_member: 256,
            pool_idle_timeout: Duration::from_secs(90),
            source_addresses: std::sync::Arc::from([]),
            sse_keepalive: Duration::from_secs(15),
        }
    }
}

impl Default for Balance {
    fn default() -> Self {
        Balance { policy: Policy::Ordered, sticky_key: None, max_attempts: 0 }
    }
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            eject_base: Duration::from_secs(1),
            eject_max: Duration::from_secs(30),
            fail_open: false,
            active_interval: Duration::ZERO,
            active_path: None,
        }
    }
}

/// `[fleet] state_dir`: where the local store keeps its log (as Teleport's `/var/lib/teleport`).
pub const STATE_DIR: &str = "/var/lib/portcullis";

/// `[fleet] max_staleness`: how long a store may be unreachable before `strict` refuses.
pub const MAX_STALENESS: Duration = Duration::from_secs(10);
