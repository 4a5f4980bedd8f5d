//! Configuration: a TOML file parsed into typed values before any port is bound.
//!
//! Every value is parsed where it is read ("parse, don't validate"): durations (`"30s"`), sizes
//! (`"1MiB"`), socket addresses, path patterns and backend templates are typed by the
//! deserializer, so a bad value is reported with the file, line and key. Unknown keys are errors.
//! Per-route `session` and `backend` tables override the global defaults key by key.
//!
//! `config/portcullis.toml` is the annotated reference of every key.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use jsonwebtoken::Algorithm;

use crate::auth::Secret;
use crate::proxy::auth::{OriginPattern, TokenSource};
use crate::proxy::route::{BackendTemplate, PathPattern};

/// A fully parsed and validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Process-wide limits and timeouts.
    pub server: ServerSettings,
    /// Certificates for TLS listeners; required when any listener has `tls = true`.
    pub tls: Option<TlsSettings>,
    /// Where clients connect.
    pub listeners: Vec<ListenerConfig>,
    /// The admin listener (`/metrics`, `/live`, `/ready`); none when absent.
    pub admin: Option<AdminConfig>,
    /// Routes in file order; the most specific match wins.
    pub routes: Vec<RouteConfig>,
    /// Token verification keys and settings shared by all routes.
    pub auth: AuthSettings,
}

/// Token verification keys and settings (`[auth]`, `[[auth.keys]]`, `[[auth.jwks]]`).
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Static verification keys.
    pub keys: Vec<StaticKey>,
    /// JWKS endpoints.
    pub jwks: Vec<JwksSettings>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Tokens longer than this are refused before any parsing.
    pub max_token_size: usize,
    /// Verified tokens kept in the cache.
    pub cache_capacity: u64,
    /// How long a revoked subject stays refused when no token expiry bounds it.
    pub revocation_ttl: Duration,
}

/// A static verification key with its algorithm allowlist.
#[derive(Debug, Clone)]
pub struct StaticKey {
    /// Key id: tokens whose header names this `kid` are verified with this key only.
    pub kid: Option<String>,
    /// Algorithms this key may verify (one family; never `none`).
    pub algorithms: Vec<Algorithm>,
    /// The key material.
    pub material: KeyMaterial,
}

/// Where a static key comes from.
#[derive(Debug, Clone)]
pub enum KeyMaterial {
    /// PEM public key (RSA, EC or Ed25519) file.
    PublicKeyPem(PathBuf),
    /// HMAC secret, read from a file or an environment variable at load time.
    Secret(Secret),
}

/// A JWKS endpoint.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// `http://` or `https://` URL of the key set.
    pub url: http::Uri,
    /// Algorithms keys from this set may verify.
    pub algorithms: Vec<Algorithm>,
    /// Periodic refresh.
    pub refresh_interval: Duration,
    /// An unknown `kid` triggers a refetch at most this often.
    pub min_refetch_interval: Duration,
    /// Time allowed for one fetch.
    pub timeout: Duration,
    /// CA file for an `https://` URL; the web PKI roots when absent.
    pub ca: Option<PathBuf>,
}

/// Authentication required on a route (`[routes.auth]`).
#[derive(Debug, Clone)]
pub struct RouteAuth {
    /// Where the token is looked for, in order.
    pub sources: Vec<TokenSource>,
    /// Accepted `iss` values; any when empty.
    pub issuers: Vec<String>,
    /// Accepted `aud` values (one must match); any when empty.
    pub audiences: Vec<String>,
    /// Claims that must be present.
    pub required_claims: Vec<String>,
    /// The captured `{agent}` must be listed in this claim (array or string).
    pub agent_claim: Option<String>,
    /// A scope built from captures (`terminal:{agent}`) that must be in `scope` or `scp`.
    pub agent_scope: Option<String>,
    /// Close the session with 1008 when the token expires.
    pub enforce_expiry: bool,
    /// Claims sent to the backend as `x-portcullis-claim-<name>`.
    pub forward_claims: Vec<String>,
    /// Forward the raw token to the backend (off by default).
    pub forward_token: bool,
}

/// Which browser origins may open sessions on a route (`[routes.origin]`).
#[derive(Debug, Clone)]
pub struct OriginPolicy {
    /// Allowed origins: exact (`https://app.example.com`) or wildcard (`*.example.com`).
    pub allow: Vec<OriginPattern>,
    /// Whether requests without an `Origin` header (non-browser clients) are allowed.
    pub allow_missing: bool,
}

/// Process-wide limits and timeouts (`[server]`).
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Connections held at once; more are closed at accept.
    pub max_connections: usize,
    /// Time allowed for the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Time allowed for the client to send the request head (408 after).
    pub header_read_timeout: Duration,
    /// Largest request head accepted (431 above).
    pub max_header_size: usize,
    /// On SIGTERM, close notices to sessions are spread over this window.
    pub drain_spread: Duration,
    /// On SIGTERM, the process exits at the latest after this.
    pub drain_timeout: Duration,
    /// After a reload removes a route, its live sessions may run this long before closing.
    pub removed_route_grace: Duration,
    /// How often the config file is checked for changes (`run` only); zero disables.
    pub reload_poll_interval: Duration,
}

/// Certificates served by TLS listeners (`[tls]`).
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// Default certificate chain (PEM), served when no SNI entry matches or no SNI is sent.
    pub cert: PathBuf,
    /// Private key (PEM) of the default certificate.
    pub key: PathBuf,
    /// Extra certificates chosen by SNI.
    pub sni: Vec<SniCertificate>,
    /// Cipher suites in the server's order of preference (names as in
    /// [`crate::proxy::tls::CIPHER_SUITES`]); the server's order wins over the client's.
    pub cipher_suites: Vec<String>,
}

/// A certificate chosen by SNI.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniCertificate {
    /// Server names this certificate is served for (exact names).
    pub server_names: Vec<String>,
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// One listener: a name and the addresses it binds.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Name used in logs.
    pub name: String,
    /// Addresses bound by this listener.
    pub addresses: Vec<SocketAddr>,
    /// Whether connections are TLS (`wss://`) or plain (`ws://`).
    pub tls: bool,
}

/// The admin listener.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address bound; loopback by default.
    pub address: SocketAddr,
    /// Bearer token required on `/sessions` endpoints, when set.
    pub token: Option<Secret>,
}

/// One route: which requests it matches and where they go.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Name used in metrics labels and logs.
    pub name: String,
    /// Host to match (exact, or `*.suffix`); any host when absent.
    pub host: Option<String>,
    /// Path pattern with `{capture}` segments.
    pub path: PathPattern,
    /// Static backend members; may use captures (`{agent}.agents.internal:7681`). Empty when
    /// the route uses a registry.
    pub backends: Vec<StaticMember>,
    /// Registry resolver for members, instead of static ones.
    pub registry: Option<RegistryConfig>,
    /// How a member is chosen, and how many are tried.
    pub balance: Balance,
    /// Passive health: ejection of members that fail to connect.
    pub health: HealthSettings,
    /// Path requested from the backend (may use captures); the client's path when absent.
    pub backend_path: Option<String>,
    /// Deadlines and limits of sessions on this route.
    pub session: SessionSettings,
    /// Connect settings for this route's backends.
    pub backend: BackendSettings,
    /// Token requirements; the route is open when absent.
    pub auth: Option<RouteAuth>,
    /// Origin allowlist; any origin when absent.
    pub origin: Option<OriginPolicy>,
}

/// A static member with its weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticMember {
    /// `host:port`, possibly templated with captures.
    pub template: BackendTemplate,
    /// Relative weight (default 1; 0 never chosen).
    pub weight: u32,
}

/// Where a route's members come from when they are looked up (`[routes.registry]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    /// URL template, e.g. `http://registry.internal/agents/{agent}`.
    pub url: String,
    /// Bearer token sent to the registry.
    pub token: Option<Secret>,
    /// Time allowed for one registry request.
    pub timeout: Duration,
    /// How long an answer with members is cached.
    pub ttl: Duration,
    /// How long a 404 is cached.
    pub negative_ttl: Duration,
    /// How long after `ttl` a cached answer may still be used while the registry fails.
    pub stale_ttl: Duration,
    /// Cached agents at most.
    pub max_capacity: u64,
}

/// Member choice (`[routes.balance]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    /// The policy.
    pub policy: Policy,
    /// Where the sticky key comes from (required for `sticky`).
    pub sticky_key: Option<StickyKey>,
    /// Members tried per session before giving up; 0 means every member once.
    pub max_attempts: usize,
}

/// How a member is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// In configured (or registry) order: the first healthy member, the next on failure.
    Ordered,
    /// Rotate across members.
    RoundRobin,
    /// The member with the fewest live sessions for its weight.
    LeastConnections,
    /// Rendezvous hashing on a key: the same key reaches the same member from any instance.
    Sticky,
}

/// Where a sticky key is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StickyKey {
    /// A claim of the verified token.
    Claim(String),
    /// A request header.
    Header(String),
    /// A cookie.
    Cookie(String),
    /// A query parameter.
    Query(String),
    /// A path capture.
    Capture(String),
}

impl FromStr for StickyKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, name) = s.split_once(':').ok_or_else(|| format!("invalid sticky key {s:?}"))?;
        if name.is_empty() {
            return Err(format!("invalid sticky key {s:?}: empty name"));
        }
        let name = name.to_owned();
        Ok(match kind {
            "claim" => StickyKey::Claim(name),
            "header" => StickyKey::Header(name.to_ascii_lowercase()),
            "cookie" => StickyKey::Cookie(name),
            "query" => StickyKey::Query(name),
            "capture" => StickyKey::Capture(name),
            _ => return Err(format!("invalid sticky key {s:?}: use claim:, header:, cookie:, query: or capture:")),
        })
    }
}

impl<'de> Deserialize<'de> for StickyKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// Passive health (`[routes.health]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    /// First ejection after a failed connect; doubles on each further failure.
    pub eject_base: Duration,
    /// Longest ejection.
    pub eject_max: Duration,
    /// When every member is ejected, try them anyway instead of answering 503.
    pub fail_open: bool,
    /// Active checks of static members every interval; zero disables.
    pub active_interval: Duration,
    /// Active check: a WebSocket handshake to this path; a TCP connect when absent.
    pub active_path: Option<String>,
}

/// Deadlines and limits for a session (`[session]`, overridable per route).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionSettings {
    /// Proxy pings a peer after this much silence from it; zero disables pings.
    pub ping_interval: Duration,
    /// A peer that does not answer a proxy ping within this is considered gone.
    pub ping_timeout: Duration,
    /// No data frame either way for this long closes the session (1000); zero disables.
    pub idle_timeout: Duration,
    /// A session is closed (1001) after this long; zero disables.
    pub max_lifetime: Duration,
    /// After a close frame, the other side's reply is awaited this long.
    pub close_timeout: Duration,
    /// Largest frame payload accepted from either side (1009 above).
    pub max_frame_size: u64,
    /// Largest message (sum of fragments) accepted from either side (1009 above).
    pub max_message_size: u64,
    /// Relay buffer per direction, held only while bytes are in flight.
    pub buffer_size: usize,
}

/// Backend connect settings (`[backend]`, overridable per route).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendSettings {
    /// Time allowed for the TCP connect to one member (504 after, when no member is left).
    pub connect_timeout: Duration,
    /// Time allowed for the backend's WebSocket handshake response.
    pub handshake_timeout: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            max_connections: 100_000,
            tls_handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            max_header_size: 16 * 1024,
            drain_spread: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(25),
            removed_route_grace: Duration::from_secs(600),
            reload_poll_interval: Duration::from_secs(2),
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
        }
    }
}

impl Default for BackendSettings {
    fn default() -> Self {
        BackendSettings { connect_timeout: Duration::from_secs(5), handshake_timeout: Duration::from_secs(10) }
    }
}

/// A configuration that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed, a key is unknown, or a value does not parse.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending key or value.
        line: usize,
        /// What is wrong, naming the key.
        message: String,
    },
    /// The values parse but do not fit together.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Dotted path of the offending key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(&text, path)
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text.as_bytes()[..s.start.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1)
                .unwrap_or(1);
            ConfigError::Parse { path: origin.to_owned(), line, message: e.message().trim().to_owned() }
        })?;
        raw.into_config().map_err(|(key, message)| ConfigError::Invalid { path: origin.to_owned(), key, message })
    }
}

// ---------------------------------------------------------------------------------------------
// Raw serde mirror of the file.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    tls: Option<RawTls>,
    #[serde(default)]
    listeners: Vec<RawListener>,
    admin: Option<RawAdmin>,
    #[serde(default)]
    session: RawSession,
    #[serde(default)]
    backend: RawBackend,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    auth: RawAuth,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    #[serde(default)]
    keys: Vec<RawKey>,
    #[serde(default)]
    jwks: Vec<RawJwks>,
    leeway: Option<Dur>,
    max_token_size: Option<Size>,
    cache_capacity: Option<u64>,
    revocation_ttl: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    public_key: Option<PathBuf>,
    secret_file: Option<PathBuf>,
    secret_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwks {
    url: String,
    algorithms: Vec<Algorithm>,
    refresh_interval: Option<Dur>,
    min_refetch_interval: Option<Dur>,
    timeout: Option<Dur>,
    ca: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouteAuth {
    sources: Option<Vec<TokenSource>>,
    #[serde(default)]
    issuers: Vec<String>,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    required_claims: Vec<String>,
    agent_claim: Option<String>,
    agent_scope: Option<String>,
    enforce_expiry: Option<bool>,
    #[serde(default)]
    forward_claims: Vec<String>,
    #[serde(default)]
    forward_token: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrigin {
    allow: Vec<OriginPattern>,
    #[serde(default = "yes")]
    allow_missing: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    max_connections: Option<usize>,
    tls_handshake_timeout: Option<Dur>,
    header_read_timeout: Option<Dur>,
    max_header_size: Option<Size>,
    drain_spread: Option<Dur>,
    drain_timeout: Option<Dur>,
    removed_route_grace: Option<Dur>,
    reload_poll_interval: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    sni: Vec<SniCertificate>,
    cipher_suites: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Option<String>,
    addresses: Vec<SocketAddr>,
    #[serde(default)]
    tls: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    address: Option<SocketAddr>,
    token_env: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RawSession {
    ping_interval: Option<Dur>,
    ping_timeout: Option<Dur>,
    idle_timeout: Option<Dur>,
    max_lifetime: Option<Dur>,
    close_timeout: Option<Dur>,
    max_frame_size: Option<Size>,
    max_message_size: Option<Size>,
    buffer_size: Option<Size>,
}

#[derive(Debug, Default, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    connect_timeout: Option<Dur>,
    handshake_timeout: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawMember {
    Addr(BackendTemplate),
    Weighted(RawWeighted),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeighted {
    addr: BackendTemplate,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    url: String,
    token_env: Option<String>,
    token_file: Option<PathBuf>,
    timeout: Option<Dur>,
    ttl: Option<Dur>,
    negative_ttl: Option<Dur>,
    stale_ttl: Option<Dur>,
    max_capacity: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBalance {
    policy: Option<Policy>,
    sticky_key: Option<StickyKey>,
    max_attempts: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    eject_base: Option<Dur>,
    eject_max: Option<Dur>,
    fail_open: Option<bool>,
    active_interval: Option<Dur>,
    active_path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: String,
    host: Option<String>,
    path: PathPattern,
    #[serde(default)]
    backends: Vec<RawMember>,
    registry: Option<RawRegistry>,
    #[serde(default)]
    balance: RawBalance,
    #[serde(default)]
    health: RawHealth,
    backend_path: Option<String>,
    #[serde(default)]
    session: RawSession,
    #[serde(default)]
    backend: RawBackend,
    auth: Option<RawRouteAuth>,
    origin: Option<RawOrigin>,
}

type Invalid = (String, String);

impl RawConfig {
    fn into_config(self) -> Result<Config, Invalid> {
        let d = ServerSettings::default();
        let s = self.server;
        let server = ServerSettings {
            max_connections: s.max_connections.unwrap_or(d.max_connections),
            tls_handshake_timeout: dur(s.tls_handshake_timeout, d.tls_handshake_timeout),
            header_read_timeout: dur(s.header_read_timeout, d.header_read_timeout),
            max_header_size: s.max_header_size.map_or(d.max_header_size, |v| v.0 as usize),
            drain_spread: dur(s.drain_spread, d.drain_spread),
            drain_timeout: dur(s.drain_timeout, d.drain_timeout),
            removed_route_grace: dur(s.removed_route_grace, d.removed_route_grace),
            reload_poll_interval: dur(s.reload_poll_interval, d.reload_poll_interval),
        };
        if server.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if server.max_header_size < 1024 {
            return Err(invalid("server.max_header_size", "must be at least 1KiB"));
        }
        let session_defaults = self.session.merge(SessionSettings::default(), "session")?;
        let backend_defaults = self.backend.merge(BackendSettings::default());

        if self.listeners.is_empty() {
            return Err(invalid("listeners", "at least one listener is required"));
        }
        let mut listeners = Vec::with_capacity(self.listeners.len());
        for (i, l) in self.listeners.into_iter().enumerate() {
            if l.addresses.is_empty() {
                return Err(invalid(&format!("listeners[{i}].addresses"), "must not be empty"));
            }
            if l.tls && self.tls.is_none() {
                return Err(invalid(
                    &format!("listeners[{i}].tls"),
                    "a TLS listener needs a [tls] section with cert and key",
                ));
            }
            listeners.push(ListenerConfig {
                name: l.name.unwrap_or_else(|| format!("listener-{i}")),
                addresses: l.addresses,
                tls: l.tls,
            });
        }

        let mut routes = Vec::with_capacity(self.routes.len());
        for (i, r) in self.routes.into_iter().enumerate() {
            let key = format!("routes[{i}]");
            if r.name.is_empty() || r.name.len() > 64 || !r.name.bytes().all(is_label_byte) {
                return Err(invalid(&format!("{key}.name"), "must be 1-64 characters of [A-Za-z0-9_-]"));
            }
            if routes.iter().any(|x: &RouteConfig| x.name == r.name) {
                return Err(invalid(&format!("{key}.name"), "duplicate route name"));
            }
            match (r.backends.is_empty(), r.registry.is_none()) {
                (true, true) => {
                    return Err(invalid(&format!("{key}.backends"), "give backends or a [routes.registry]"))
                }
                (false, false) => {
                    return Err(invalid(&format!("{key}.backends"), "give backends or a [routes.registry], not both"));
                }
                _ => {}
            }
            let backends: Vec<StaticMember> = r
                .backends
                .into_iter()
                .map(|m| match m {
                    RawMember::Addr(template) => StaticMember { template, weight: 1 },
                    RawMember::Weighted(w) => StaticMember { template: w.addr, weight: w.weight },
                })
                .collect();
            let registry = match r.registry {
                None => None,
                Some(g) => {
                    let rkey = format!("{key}.registry");
                    let url: http::Uri = g
                        .url
                        .replace(['{', '}'], "")
                        .parse()
                        .map_err(|_| invalid(&format!("{rkey}.url"), "not a valid URL"))?;
                    if url.scheme_str() != Some("http") && url.scheme_str() != Some("https") {
                        return Err(invalid(&format!("{rkey}.url"), "must be an http:// or https:// URL"));
                    }
                    if let Some(c) =
                        crate::proxy::route::template_captures(&g.url).into_iter().find(|c| !r.path.has_capture(c))
                    {
                        return Err(invalid(
                            &format!("{rkey}.url"),
                            &format!("uses {{{c}}}, which the path does not capture"),
                        ));
                    }
                    Some(RegistryConfig {
                        token: load_secret(g.token_file.as_deref(), g.token_env.as_deref(), &rkey)?,
                        url: g.url,
                        timeout: dur(g.timeout, Duration::from_secs(2)),
                        ttl: dur(g.ttl, Duration::from_secs(30)),
                        negative_ttl: dur(g.negative_ttl, Duration::from_secs(5)),
                        stale_ttl: dur(g.stale_ttl, Duration::from_secs(300)),
                        max_capacity: g.max_capacity.unwrap_or(100_000),
                    })
                }
            };
            let balance = Balance {
                policy: r.balance.policy.unwrap_or(Policy::Ordered),
                sticky_key: r.balance.sticky_key,
                max_attempts: r.balance.max_attempts.unwrap_or(0),
            };
            if balance.policy == Policy::Sticky && balance.sticky_key.is_none() {
                return Err(invalid(&format!("{key}.balance.sticky_key"), "the sticky policy needs a sticky_key"));
            }
            if let Some(StickyKey::Capture(c)) = &balance.sticky_key {
                if !r.path.has_capture(c) {
                    return Err(invalid(
                        &format!("{key}.balance.sticky_key"),
                        "names a capture the path does not have",
                    ));
                }
            }
            let health = HealthSettings {
                eject_base: dur(r.health.eject_base, Duration::from_secs(1)),
                eject_max: dur(r.health.eject_max, Duration::from_secs(30))
                    .max(dur(r.health.eject_base, Duration::from_secs(1))),
                fail_open: r.health.fail_open.unwrap_or(false),
                active_interval: dur(r.health.active_interval, Duration::ZERO),
                active_path: r.health.active_path,
            };
            if health.active_path.as_deref().is_some_and(|p| !p.starts_with('/')) {
                return Err(invalid(&format!("{key}.health.active_path"), "must start with '/'"));
            }
            for b in backends.iter().map(|m| &m.template) {
                if let Some(c) = b.captures().find(|c| !r.path.has_capture(c)) {
                    return Err(invalid(
                        &format!("{key}.backends"),
                        &format!("uses {{{c}}}, which the path does not capture"),
                    ));
                }
            }
            if let Some(p) = &r.backend_path {
                if !p.starts_with('/') {
                    return Err(invalid(&format!("{key}.backend_path"), "must start with '/'"));
                }
            }
            let auth = match r.auth {
                None => None,
                Some(a) => Some(a.into_route_auth(&key, &r.path)?),
            };
            if auth.is_some() && self.auth.keys.is_empty() && self.auth.jwks.is_empty() {
                return Err(invalid(&format!("{key}.auth"), "requires tokens but [auth] has no keys or jwks"));
            }
            routes.push(RouteConfig {
                auth,
                origin: r.origin.map(|o| OriginPolicy { allow: o.allow, allow_missing: o.allow_missing }),
                name: r.name,
                host: r.host.map(|h| h.to_ascii_lowercase()),
                path: r.path,
                backends,
                registry,
                balance,
                health,
                backend_path: r.backend_path,
                session: r.session.merge(session_defaults, &format!("{key}.session"))?,
                backend: r.backend.merge(backend_defaults),
            });
        }

        Ok(Config {
            server,
            tls: match self.tls {
                None => None,
                Some(t) => Some(TlsSettings {
                    cipher_suites: cipher_suites(t.cipher_suites)?,
                    cert: t.cert,
                    key: t.key,
                    sni: t.sni,
                }),
            },
            listeners,
            admin: match self.admin {
                None => None,
                Some(a) => Some(AdminConfig {
                    // Loopback unless told otherwise: the admin API is for operators.
                    address: a.address.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9090))),
                    token: load_secret(a.token_file.as_deref(), a.token_env.as_deref(), "admin")?,
                }),
            },
            routes,
            auth: self.auth.into_settings()?,
        })
    }
}

impl RawAuth {
    fn into_settings(self) -> Result<AuthSettings, Invalid> {
        let mut keys = Vec::with_capacity(self.keys.len());
        for (i, k) in self.keys.into_iter().enumerate() {
            let key = format!("auth.keys[{i}]");
            check_algorithms(&k.algorithms, &format!("{key}.algorithms"))?;
            let hmac = k.algorithms.iter().all(|a| family(*a) == 0);
            let material = match (k.public_key, hmac) {
                (Some(p), false) => {
                    if k.secret_file.is_some() || k.secret_env.is_some() {
                        return Err(invalid(&key, "set public_key or a secret, not both"));
                    }
                    KeyMaterial::PublicKeyPem(p)
                }
                (None, true) => match load_secret(k.secret_file.as_deref(), k.secret_env.as_deref(), &key)? {
                    Some(s) => KeyMaterial::Secret(s),
                    None => return Err(invalid(&key, "HS* keys need secret_file or secret_env")),
                },
                (Some(_), true) => return Err(invalid(&key, "HS* keys take a secret, not a public_key")),
                (None, false) => return Err(invalid(&key, "RS*/PS*/ES*/EdDSA keys need public_key (a PEM file)")),
            };
            keys.push(StaticKey { kid: k.kid, algorithms: k.algorithms, material });
        }
        let mut jwks = Vec::with_capacity(self.jwks.len());
        for (i, j) in self.jwks.into_iter().enumerate() {
            let key = format!("auth.jwks[{i}]");
            let url: http::Uri = j.url.parse().map_err(|_| invalid(&format!("{key}.url"), "not a valid URL"))?;
            if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
                return Err(invalid(&format!("{key}.url"), "must be an http:// or https:// URL"));
            }
            check_algorithms(&j.algorithms, &format!("{key}.algorithms"))?;
            if j.algorithms.iter().any(|a| family(*a) == 0) {
                return Err(invalid(&format!("{key}.algorithms"), "HS* algorithms cannot come from a JWKS"));
            }
            jwks.push(JwksSettings {
                url,
                algorithms: j.algorithms,
                refresh_interval: dur(j.refresh_interval, Duration::from_secs(300)),
                min_refetch_interval: dur(j.min_refetch_interval, Duration::from_secs(10)),
                timeout: dur(j.timeout, Duration::from_secs(5)),
                ca: j.ca,
            });
        }
        Ok(AuthSettings {
            keys,
            jwks,
            leeway: dur(self.leeway, Duration::from_secs(30)),
            max_token_size: self.max_token_size.map_or(8 * 1024, |s| s.0 as usize),
            cache_capacity: self.cache_capacity.unwrap_or(100_000),
            revocation_ttl: dur(self.revocation_ttl, Duration::from_secs(24 * 3600)),
        })
    }
}

/// 0 for HMAC, 1 RSA (RS and PS), 2 EC, 3 EdDSA.
fn family(a: Algorithm) -> u8 {
    match a.family() {
        jsonwebtoken::AlgorithmFamily::Hmac => 0,
        jsonwebtoken::AlgorithmFamily::Rsa => 1,
        jsonwebtoken::AlgorithmFamily::Ec => 2,
        jsonwebtoken::AlgorithmFamily::Ed => 3,
    }
}

fn check_algorithms(algs: &[Algorithm], key: &str) -> Result<(), Invalid> {
    match algs.first() {
        None => Err(invalid(key, "list at least one algorithm")),
        Some(first) if algs.iter().any(|a| family(*a) != family(*first)) => {
            Err(invalid(key, "all algorithms of one key must be of one family (no algorithm confusion)"))
        }
        Some(_) => Ok(()),
    }
}

fn load_secret(file: Option<&Path>, env: Option<&str>, key: &str) -> Result<Option<Secret>, Invalid> {
    match (file, env) {
        (Some(_), Some(_)) => Err(invalid(key, "set a secret file or an environment variable, not both")),
        (Some(f), None) => match std::fs::read(f) {
            Ok(mut bytes) => {
                while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
                    bytes.pop();
                }
                if bytes.is_empty() {
                    return Err(invalid(key, &format!("secret file {} is empty", f.display())));
                }
                Ok(Some(Secret::new(bytes)))
            }
            Err(e) => Err(invalid(key, &format!("cannot read secret file {}: {e}", f.display()))),
        },
        (None, Some(var)) => match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(Some(Secret::new(v.into_bytes()))),
            _ => Err(invalid(key, &format!("environment variable {var} is not set"))),
        },
        (None, None) => Ok(None),
    }
}

impl RawRouteAuth {
    fn into_route_auth(self, key: &str, path: &PathPattern) -> Result<RouteAuth, Invalid> {
        if let Some(scope) = &self.agent_scope {
            if let Some(c) = crate::proxy::route::template_captures(scope).into_iter().find(|c| !path.has_capture(c)) {
                return Err(invalid(
                    &format!("{key}.auth.agent_scope"),
                    &format!("uses {{{c}}}, which the path does not capture"),
                ));
            }
        }
        if (self.agent_claim.is_some() || self.agent_scope.is_some()) && !path.has_capture("agent") {
            return Err(invalid(&format!("{key}.auth"), "agent grants need an {agent} capture in the path"));
        }
        let sources = self.sources.unwrap_or_else(TokenSource::defaults);
        if sources.is_empty() {
            return Err(invalid(&format!("{key}.auth.sources"), "list at least one token source"));
        }
        Ok(RouteAuth {
            sources,
            issuers: self.issuers,
            audiences: self.audiences,
            required_claims: self.required_claims,
            agent_claim: self.agent_claim,
            agent_scope: self.agent_scope,
            enforce_expiry: self.enforce_expiry.unwrap_or(true),
            forward_claims: self.forward_claims,
            forward_token: self.forward_token,
        })
    }
}

impl RawSession {
    fn merge(self, d: SessionSettings, key: &str) -> Result<SessionSettings, Invalid> {
        let s = SessionSettings {
            ping_interval: dur(self.ping_interval, d.ping_interval),
            ping_timeout: dur(self.ping_timeout, d.ping_timeout),
            idle_timeout: dur(self.idle_timeout, d.idle_timeout),
            max_lifetime: dur(self.max_lifetime, d.max_lifetime),
            close_timeout: dur(self.close_timeout, d.close_timeout),
            max_frame_size: self.max_frame_size.map_or(d.max_frame_size, |v| v.0),
            max_message_size: self.max_message_size.map_or(d.max_message_size, |v| v.0),
            buffer_size: self.buffer_size.map_or(d.buffer_size, |v| v.0 as usize),
        };
        if !(1024..=(1 << 20)).contains(&s.buffer_size) {
            return Err(invalid(&format!("{key}.buffer_size"), "must be between 1KiB and 1MiB"));
        }
        if s.max_message_size < s.max_frame_size {
            return Err(invalid(&format!("{key}.max_message_size"), "must be at least max_frame_size"));
        }
        if !s.ping_interval.is_zero() && s.ping_timeout.is_zero() {
            return Err(invalid(&format!("{key}.ping_timeout"), "must be non-zero when pings are on"));
        }
        if s.close_timeout.is_zero() {
            return Err(invalid(&format!("{key}.close_timeout"), "must be non-zero"));
        }
        Ok(s)
    }
}

impl RawBackend {
    fn merge(self, d: BackendSettings) -> BackendSettings {
        BackendSettings {
            connect_timeout: dur(self.connect_timeout, d.connect_timeout),
            handshake_timeout: dur(self.handshake_timeout, d.handshake_timeout),
        }
    }
}

/// Checks `tls.cipher_suites` (known names, no repeats, not empty); absent means the default order.
fn cipher_suites(names: Option<Vec<String>>) -> Result<Vec<String>, Invalid> {
    let Some(names) = names else {
        return Ok(crate::proxy::tls::CIPHER_SUITES.iter().map(|s| s.to_string()).collect());
    };
    if names.is_empty() {
        return Err(invalid("tls.cipher_suites", "must name at least one cipher suite"));
    }
    for (i, name) in names.iter().enumerate() {
        if !crate::proxy::tls::CIPHER_SUITES.contains(&name.as_str()) {
            let known = crate::proxy::tls::CIPHER_SUITES.join(", ");
            return Err(invalid("tls.cipher_suites", &format!("unknown cipher suite {name:?} (known: {known})")));
        }
        if names[..i].contains(name) {
            return Err(invalid("tls.cipher_suites", &format!("{name} is listed twice")));
        }
    }
    if !names.iter().any(|n| n.starts_with("TLS13_")) {
        return Err(invalid("tls.cipher_suites", "must include at least one TLS 1.3 suite (TLS13_...)"));
    }
    Ok(names)
}

fn dur(v: Option<Dur>, default: Duration) -> Duration {
    v.map_or(default, |d| d.0)
}

fn invalid(key: &str, message: &str) -> Invalid {
    (key.to_owned(), message.to_owned())
}

fn is_label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// A duration written as text: `"30s"`, `"500ms"`, `"15m"`, `"1h 30m"`, or `"0s"`.
#[derive(Debug, Clone, Copy)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(Dur)
            .map_err(|e| de::Error::custom(format!("invalid duration {s:?}: {e} (write e.g. \"30s\")")))
    }
}

/// A byte size: an integer, or text with a unit: `"16KiB"`, `"1MiB"`, `"1GiB"`, `"512B"`.
#[derive(Debug, Clone, Copy)]
struct Size(u64);

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_in_config_dir_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).expect("config/ exists") {
            let path = entry.expect("dir entry").path();
            if path.extension().and_then(|e| e.to_str()) == Some("toml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 2, "expected at least portcullis.toml and dev.toml");
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n\n[session]\nidle_timout = \"1s\"\n";
        let err = Config::parse(text, Path::new("x.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("x.toml:5:"), "{msg}");
        assert!(msg.contains("idle_timout"), "{msg}");
    }

    #[test]
    fn cipher_suites_default_to_aes_128_first_and_are_checked() {
        let base = "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let c = Config::parse(base, Path::new("x.toml")).expect("valid");
        let tls = c.tls.expect("tls");
        assert_eq!(tls.cipher_suites[0], "TLS13_AES_128_GCM_SHA256");
        assert_eq!(tls.cipher_suites.len(), crate::proxy::tls::CIPHER_SUITES.len());
        for (list, wanted) in [
            ("[\"TLS13_AES_128_GCM_SHA265\"]", "unknown cipher suite"),
            ("[]", "at least one"),
            ("[\"TLS13_AES_128_GCM_SHA256\", \"TLS13_AES_128_GCM_SHA256\"]", "listed twice"),
            ("[\"TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256\"]", "TLS 1.3"),
        ] {
            let text = format!("{base}cipher_suites = {list}\n");
            let msg = Config::parse(&text, Path::new("x.toml")).unwrap_err().to_string();
            assert!(msg.contains("tls.cipher_suites") && msg.contains(wanted), "{list}: {msg}");
        }
    }

    #[test]
    fn bad_duration_is_reported_with_line() {
        let text = "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n[session]\nidle_timeout = \"soon\"\n";
        let msg = Config::parse(text, Path::new("x.toml")).unwrap_err().to_string();
        assert!(msg.starts_with("x.toml:4:"), "{msg}");
        assert!(msg.contains("invalid duration"), "{msg}");
    }

    #[test]
    fn route_overrides_merge_over_defaults() {
        let text = r#"
[[listeners]]
addresses = ["127.0.0.1:0"]
[session]
idle_timeout = "10m"
max_frame_size = "64KiB"
[[routes]]
name = "t"
path = "/agents/{agent}/terminal"
backends = ["127.0.0.1:1"]
[routes.session]
idle_timeout = "1s"
"#;
        let c = Config::parse(text, Path::new("x.toml")).expect("valid");
        let s = c.routes[0].session;
        assert_eq!(s.idle_timeout, Duration::from_secs(1));
        assert_eq!(s.max_frame_size, 64 * 1024);
        assert_eq!(s.ping_interval, SessionSettings::default().ping_interval);
    }

    #[test]
    fn tls_listener_without_tls_section_is_invalid() {
        let text = "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\ntls = true\n";
        let msg = Config::parse(text, Path::new("x.toml")).unwrap_err().to_string();
        assert!(msg.contains("listeners[0].tls"), "{msg}");
    }

    #[test]
    fn backend_template_must_use_known_captures() {
        let text = r#"
[[listeners]]
addresses = ["127.0.0.1:0"]
[[routes]]
name = "t"
path = "/agents/{agent}"
backends = ["{host}:80"]
"#;
        let msg = Config::parse(text, Path::new("x.toml")).unwrap_err().to_string();
        assert!(msg.contains("routes[0].backends"), "{msg}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(Size::from_str("16KiB").map(|s| s.0), Ok(16384));
        assert_eq!(Size::from_str("1MiB").map(|s| s.0), Ok(1 << 20));
        assert_eq!(Size::from_str("12").map(|s| s.0), Ok(12));
        assert!(Size::from_str("1MB").is_err());
    }
}
