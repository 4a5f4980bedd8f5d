//! The raw serde mirror of the configuration file: every table and key as written, nothing
//! checked beyond its type. `deny_unknown_fields` everywhere, so a typo is an error with its
//! line; [`super::validate`] turns this into the typed [`super::Config`].

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::de::{self, Deserializer};
use serde::Deserialize;

use super::{BackendTemplate, OriginPattern, PathPattern, Policy, SniCertificate, StickyKey, TokenSource};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    pub(super) tls: Option<RawTls>,
    #[serde(default)]
    pub(super) listeners: Vec<RawListener>,
    pub(super) admin: Option<RawAdmin>,
    #[serde(default)]
    pub(super) session: RawSession,
    #[serde(default)]
    pub(super) backend: RawBackend,
    #[serde(default)]
    pub(super) routes: Vec<RawRoute>,
    #[serde(default)]
    pub(super) auth: RawAuth,
    #[serde(default)]
    pub(super) http2: RawHttp2,
    #[serde(default)]
    pub(super) fleet: RawFleet,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResource {
    pub(super) id: String,
    pub(super) authorization_servers: Vec<String>,
    #[serde(default)]
    pub(super) scopes_supported: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMcp {
    pub(super) protocol_versions: Option<Vec<String>>,
    pub(super) max_message: Option<Size>,
    pub(super) read_timeout: Option<Dur>,
    pub(super) method_scope: Option<String>,
    pub(super) tool_scope: Option<String>,
    #[serde(default)]
    pub(super) metric_tools: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAffinity {
    pub(super) header: Option<String>,
    pub(super) keys_file: Option<PathBuf>,
    pub(super) keys_env: Option<String>,
    pub(super) ttl: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    pub(super) store: Option<RawStore>,
    pub(super) state_dir: Option<PathBuf>,
    pub(super) redis_url: Option<String>,
    pub(super) redis_url_env: Option<String>,
    pub(super) redis_ca_file: Option<PathBuf>,
    pub(super) key_prefix: Option<String>,
    pub(super) instance: Option<String>,
    pub(super) staleness: Option<RawStaleness>,
    pub(super) max_staleness: Option<Dur>,
    pub(super) subject_caps: Option<RawSubjectCaps>,
    pub(super) peer_listen: Option<SocketAddr>,
    pub(super) peer_advertise: Option<String>,
    pub(super) peer_advertise_env: Option<String>,
    pub(super) peer_secret_file: Option<PathBuf>,
    pub(super) peer_secret_env: Option<String>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawStore {
    Local,
    Redis,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawStaleness {
    BestEffort,
    Strict,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawSubjectCaps {
    Mirror,
    Reserved,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawWorkerModel {
    WorkStealing,
    ThreadPerCore,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp2 {
    pub(super) enabled: Option<bool>,
    pub(super) max_concurrent_streams: Option<u32>,
    pub(super) initial_stream_window: Option<Size>,
    pub(super) initial_connection_window: Option<Size>,
    pub(super) max_frame_size: Option<Size>,
    pub(super) max_streams_per_ip: Option<u32>,
    pub(super) keepalive_interval: Option<Dur>,
    pub(super) keepalive_timeout: Option<Dur>,
    pub(super) idle_timeout: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    #[serde(default)]
    pub(super) keys: Vec<RawKey>,
    #[serde(default)]
    pub(super) jwks: Vec<RawJwks>,
    pub(super) leeway: Option<Dur>,
    pub(super) max_token_size: Option<Size>,
    pub(super) cache_capacity: Option<u64>,
    pub(super) revocation_ttl: Option<Dur>,
    pub(super) max_sessions_per_subject: Option<u32>,
    pub(super) cookie_login: Option<RawCookieLogin>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCookieLogin {
    pub(super) path: Option<String>,
    pub(super) cookie: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
    pub(super) kid: Option<String>,
    pub(super) algorithms: Vec<Algorithm>,
    pub(super) public_key: Option<PathBuf>,
    pub(super) secret_file: Option<PathBuf>,
    pub(super) secret_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJwks {
    pub(super) url: String,
    pub(super) algorithms: Vec<Algorithm>,
    pub(super) refresh_interval: Option<Dur>,
    pub(super) min_refetch_interval: Option<Dur>,
    pub(super) timeout: Option<Dur>,
    pub(super) ca: Option<PathBuf>,
    #[serde(default)]
    pub(super) danger_allow_http: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouteAuth {
    pub(super) sources: Option<Vec<TokenSource>>,
    #[serde(default)]
    pub(super) issuers: Vec<String>,
    #[serde(default)]
    pub(super) audiences: Vec<String>,
    #[serde(default)]
    pub(super) required_claims: Vec<String>,
    pub(super) agent_claim: Option<String>,
    pub(super) agent_scope: Option<String>,
    pub(super) enforce_expiry: Option<bool>,
    #[serde(default)]
    pub(super) forward_claims: Vec<String>,
    #[serde(default)]
    pub(super) forward_token: bool,
    pub(super) subprotocol_marker: Option<String>,
    pub(super) max_sessions_per_subject: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCors {
    pub(super) allow_origins: Vec<OriginPattern>,
    pub(super) allow_methods: Option<Vec<String>>,
    pub(super) allow_headers: Option<Vec<String>>,
    #[serde(default)]
    pub(super) expose_headers: Vec<String>,
    pub(super) allow_credentials: Option<bool>,
    pub(super) max_age: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOrigin {
    pub(super) allow: Vec<OriginPattern>,
    pub(super) allow_missing: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) max_connections: Option<usize>,
    pub(super) tls_handshake_timeout: Option<Dur>,
    pub(super) header_read_timeout: Option<Dur>,
    pub(super) send_timeout: Option<Dur>,
    pub(super) runtime_dir: Option<PathBuf>,
    pub(super) max_header_size: Option<Size>,
    pub(super) drain_spread: Option<Dur>,
    pub(super) drain_timeout: Option<Dur>,
    pub(super) removed_route_grace: Option<Dur>,
    pub(super) reload_poll_interval: Option<Dur>,
    pub(super) worker_threads: Option<usize>,
    pub(super) worker_model: Option<RawWorkerModel>,
    pub(super) trusted_proxies: Option<Vec<ipnet::IpNet>>,
    pub(super) max_connections_per_ip: Option<u32>,
    pub(super) ipv6_prefix_len: Option<u8>,
    pub(super) handshake_rate_per_ip: Option<u32>,
    pub(super) handshake_burst_per_ip: Option<u32>,
    pub(super) connection_rate_per_ip: Option<u32>,
    pub(super) connection_burst_per_ip: Option<u32>,
    pub(super) token_check_rate_per_ip: Option<u32>,
    pub(super) token_check_burst_per_ip: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    #[serde(default)]
    pub(super) sni: Vec<SniCertificate>,
    pub(super) cipher_suites: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) name: Option<String>,
    pub(super) addresses: Vec<SocketAddr>,
    #[serde(default)]
    pub(super) tls: bool,
    #[serde(default)]
    pub(super) proxy_protocol: bool,
    #[serde(default)]
    pub(super) proxy_protocol_from: Vec<ipnet::IpNet>,
    #[serde(default)]
    pub(super) reuse_port: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) address: Option<SocketAddr>,
    pub(super) token_env: Option<String>,
    pub(super) token_file: Option<PathBuf>,
    #[serde(default)]
    pub(super) hosts: Vec<String>,
    #[serde(default)]
    pub(super) allow_origins: Vec<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) max_connections_per_ip: Option<usize>,
}

#[derive(Debug, Default, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSession {
    pub(super) ping_interval: Option<Dur>,
    pub(super) ping_timeout: Option<Dur>,
    pub(super) idle_timeout: Option<Dur>,
    pub(super) max_lifetime: Option<Dur>,
    pub(super) close_timeout: Option<Dur>,
    pub(super) max_frame_size: Option<Size>,
    pub(super) max_message_size: Option<Size>,
    pub(super) buffer_size: Option<Size>,
    pub(super) client_message_rate: Option<u32>,
    pub(super) client_byte_rate: Option<Size>,
    pub(super) backend_message_rate: Option<u32>,
    pub(super) backend_byte_rate: Option<Size>,
    pub(super) rate_burst: Option<Dur>,
    pub(super) rate_action: Option<RawRateAction>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawRateAction {
    Slow,
    Close,
}

#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) sse_keepalive: Option<Dur>,
    pub(super) connect_timeout: Option<Dur>,
    pub(super) handshake_timeout: Option<Dur>,
    pub(super) response_header_timeout: Option<Dur>,
    pub(super) idle_body_timeout: Option<Dur>,
    pub(super) max_request_body: Option<Size>,
    pub(super) max_idle_per_member: Option<usize>,
    pub(super) pool_idle_timeout: Option<Dur>,
    pub(super) source_addresses: Option<Vec<std::net::IpAddr>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawMember {
    Addr(BackendTemplate),
    Weighted(RawWeighted),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWeighted {
    pub(super) addr: BackendTemplate,
    #[serde(default = "one")]
    pub(super) weight: u32,
}

fn one() -> u32 {
    super::defaults::MEMBER_WEIGHT
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRegistry {
    pub(super) url: String,
    pub(super) token_env: Option<String>,
    pub(super) token_file: Option<PathBuf>,
    pub(super) timeout: Option<Dur>,
    pub(super) ttl: Option<Dur>,
    pub(super) negative_ttl: Option<Dur>,
    pub(super) stale_ttl: Option<Dur>,
    pub(super) max_capacity: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBalance {
    pub(super) policy: Option<Policy>,
    pub(super) sticky_key: Option<StickyKey>,
    pub(super) max_attempts: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) eject_base: Option<Dur>,
    pub(super) eject_max: Option<Dur>,
    pub(super) fail_open: Option<bool>,
    pub(super) active_interval: Option<Dur>,
    pub(super) active_path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) name: String,
    pub(super) host: Option<String>,
    pub(super) path: PathPattern,
    pub(super) kind: Option<RawKind>,
    #[serde(default)]
    pub(super) backends: Vec<RawMember>,
    pub(super) registry: Option<RawRegistry>,
    #[serde(default)]
    pub(super) balance: RawBalance,
    #[serde(default)]
    pub(super) health: RawHealth,
    pub(super) backend_path: Option<String>,
    pub(super) headers_with_underscores: Option<RawUnderscores>,
    #[serde(default)]
    pub(super) session: RawSession,
    #[serde(default)]
    pub(super) backend: RawBackend,
    pub(super) auth: Option<RawRouteAuth>,
    pub(super) origin: Option<RawOrigin>,
    pub(super) cors: Option<RawCors>,
    pub(super) sandbox: Option<bool>,
    pub(super) recording: Option<RawRecording>,
    pub(super) observe: Option<RawObserve>,
    pub(super) resume: Option<RawResume>,
    pub(super) fanout: Option<RawFanout>,
    pub(super) affinity: Option<RawAffinity>,
    pub(super) resource: Option<RawResource>,
    pub(super) mcp: Option<RawMcp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFanout {
    pub(super) client_data: Option<RawClientData>,
    pub(super) linger: Option<Dur>,
    pub(super) queue: Option<usize>,
    pub(super) drop_grace: Option<Dur>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawClientData {
    Refuse,
    Forward,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawResume {
    pub(super) window: Option<Dur>,
    pub(super) buffer: Option<Size>,
    pub(super) param: Option<String>,
    pub(super) notice: Option<String>,
    pub(super) announce: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawObserve {
    pub(super) scope: String,
    pub(super) replay: Option<Size>,
    pub(super) queue: Option<usize>,
    pub(super) max_observers: Option<usize>,
    pub(super) max_observers_per_subject: Option<usize>,
    pub(super) drop_grace: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRecording {
    pub(super) directory: PathBuf,
    pub(super) input: Option<bool>,
    pub(super) on_backlog: Option<RawBacklog>,
    pub(super) queue: Option<Size>,
    pub(super) max_age: Option<Dur>,
    pub(super) max_total_size: Option<Size>,
    pub(super) max_file_size: Option<Size>,
    pub(super) when_full: Option<RawWhenFull>,
    pub(super) on_limit: Option<RawOnLimit>,
    pub(super) sweep_interval: Option<Dur>,
    pub(super) width: Option<u16>,
    pub(super) height: Option<u16>,
}

/// `on_limit = "close" | "continue"`.
#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawOnLimit {
    Close,
    Continue,
}

/// `when_full = "refuse" | "evict_oldest"`.
#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawWhenFull {
    Refuse,
    EvictOldest,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawBacklog {
    Slow,
    Close,
}

/// `headers_with_underscores = "drop" | "reject" | "allow"`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawUnderscores {
    Drop,
    Reject,
    Allow,
}

/// `kind = "websocket" | "http" | "both" | "mcp"`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawKind {
    Websocket,
    Http,
    Both,
    Mcp,
}

/// A duration written as text: `"30s"`, `"500ms"`, `"15m"`, `"1h 30m"`, or `"0s"`. Nothing of
/// the proxy's is timed below a millisecond, so a duration under one that is not zero (`"10ns"`,
/// `"1us"`) is refused as the slip of a unit it most likely is: as a deadline it would refuse
/// every connection, as an interval spin. Nor does anything wait longer than
/// [`MAX_DURATION`]: a longer one is refused too, before it can overflow a clock or a cache's
/// expiry (`"600y"` as a registry `timeout` used to stop the proxy at start).
#[derive(Debug, Clone, Copy)]
pub(super) struct Dur(pub(super) Duration);

/// The longest duration any key takes: ten years (`"10y"`, of 365.25 days as humantime counts
/// them). `"0s"` turns off those that can be off.
pub(super) const MAX_DURATION: Duration = Duration::from_secs(10 * 31_557_600);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let v = humantime::parse_duration(&s)
            .map_err(|e| de::Error::custom(format!("invalid duration {s:?}: {e} (write e.g. \"30s\")")))?;
        if !v.is_zero() && v < Duration::from_millis(1) {
            return Err(de::Error::custom(format!(
                "duration {s:?} is under a millisecond, which nothing here is timed in (write e.g. \"30s\" or \"250ms\")"
            )));
        }
        if v > MAX_DURATION {
            return Err(de::Error::custom(format!(
                "duration {s:?} is over ten years, longer than anything here waits (\"0s\" turns off what can be off)"
            )));
        }
        Ok(Dur(v))
    }
}

/// A byte size: an integer, or text with a unit: `"16KiB"`, `"1MiB"`, `"1GiB"`, `"512B"`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Size(pub(super) u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 16384 or \"16KiB\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v).map(Size).map_err(|_| E::custom("size must not be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                Size::from_str(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Size, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            other => return Err(format!("invalid size unit {other:?} in {s:?} (use B, KiB, MiB or GiB)")),
        };
        n.checked_mul(mult).map(Size).ok_or_else(|| format!("size {s:?} is too large"))
    }
}
