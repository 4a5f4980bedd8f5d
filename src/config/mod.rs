//! Configuration: a TOML file parsed into typed values before any port is bound.
//!
//! Every value is parsed where it is read ("parse, don't validate"): durations (`"30s"`), sizes
//! (`"1MiB"`), socket addresses, path patterns and backend templates are typed by the
//! deserializer, so a bad value is reported with the file, line and key. Unknown keys are errors.
//! Per-route `session` and `backend` tables override the global defaults key by key.
//!
//! This module is a leaf: it uses no other module of the crate, and the stages build their
//! state from what it hands them. Its parts: `raw.rs` (the serde mirror of the file),
//! `validate.rs` (one function per section), `defaults.rs` (every default value), `pattern.rs`
//! (paths, templates, captures) and `values.rs` (token sources, Origin patterns, secrets).
//!
//! `config/portcullis.toml` is the annotated reference of every key.

pub mod defaults;
mod pattern;
mod raw;
mod validate;
mod values;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::de::{self, Deserializer};
use serde::Deserialize;

pub use pattern::{
    dns_name, is_rendering, render_path, render_url, template_captures, valid_capture, valid_rest, BackendTemplate,
    Captures, PathPattern, MAX_CAPTURE_LEN,
};
pub use values::{OriginPattern, Secret, TokenSource, CIPHER_SUITES};

/// A fully parsed and validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Process-wide limits and timeouts.
    pub server: ServerSettings,
    /// Certificates for TLS listeners; required when any listener has `tls = true`.
    pub tls: Option<TlsSettings>,
    /// Where clients connect.
    pub listeners: Vec<ListenerConfig>,
    /// The admin listener (`/metrics`, `/live`, `/ready`, and behind its token the session,
    /// route, recording and limit APIs); none when absent.
    pub admin: Option<AdminConfig>,
    /// Routes in file order; the most specific match wins.
    pub routes: Vec<RouteConfig>,
    /// Token verification keys and settings shared by all routes.
    pub auth: AuthSettings,
    /// The `[session]` table: what a route without its own `[routes.session]` key gets.
    pub session: SessionSettings,
    /// The `[backend]` table: what a route without its own `[routes.backend]` key gets.
    pub backend: BackendSettings,
    /// HTTP/2 on TLS listeners (`[http2]`).
    pub http2: Http2Settings,
    /// Where governance state lives, and how the instances of a fleet share it (`[fleet]`).
    pub fleet: FleetSettings,
}

/// `[routes.resource]`: the route as an OAuth 2.0 protected resource (RFC 9728): its metadata
/// is served at `/.well-known/oauth-protected-resource{path of id}`, every 401 on the route points
/// at it, and a token's audience must name the resource (RFC 8707).
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceSettings {
    /// The resource identifier, an absolute `https://` URL; `{capture}`s of the route's path are
    /// filled in (`https://edge.example.com/agents/{agent}/mcp`). Its scheme and authority are
    /// the external URL the metadata's address is built from, never the request's `Host`.
    pub id: String,
    /// The authorization servers' issuer URLs.
    pub authorization_servers: Vec<String>,
    /// Scopes the resource understands, when listed.
    pub scopes_supported: Vec<String>,
}

impl ResourceSettings {
    /// The metadata document's URL for the resource `id` (rendered): the well-known path
    /// inserted between its authority and its path (RFC 9728 §3.1).
    pub fn metadata_url(id: &str) -> Option<String> {
        let uri: http::Uri = id.parse().ok()?;
        let (scheme, authority) = (uri.scheme_str()?, uri.authority()?);
        let path = uri.path().trim_end_matches('/');
        Some(format!("{scheme}://{authority}/.well-known/oauth-protected-resource{path}"))
    }
}

/// `[routes.affinity]`: stateful session affinity by response header (MCP's `Mcp-Session-Id`),
/// with no shared store (`routing::affinity`).
#[derive(Debug, Clone, PartialEq)]
pub struct AffinitySettings {
    /// The header (default `mcp-session-id`).
    pub header: http::HeaderName,
    /// The envelope keys (32 bytes each), the sealing one first. There is no default.
    pub keys: Vec<Secret>,
    /// How long an envelope opens after it was sealed.
    pub ttl: std::time::Duration,
}

/// `[fleet]`: the state store that makes revocations outlive a restart and, with Redis, reach
/// every instance of a fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSettings {
    /// Which store.
    pub store: StoreKind,
    /// This instance's name in the fleet (default: the host name and the process id).
    pub instance: String,
    /// What a Redis-backed instance does while the store is unreachable.
    pub staleness: Staleness,
    /// How long the store may be unreachable before `strict` refuses new sessions.
    pub max_staleness: std::time::Duration,
    /// How the subject caps count the other instances' sessions.
    pub subject_caps: SubjectCaps,
    /// The instance-to-instance channel that carries a resume or an observer to the instance
    /// that holds the session (Redis only).
    pub peer: Option<PeerSettings>,
}

/// `[fleet] peer_*`: the listener other instances relay resumes and observers to, and the
/// fleet's secret that signs what they send it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerSettings {
    /// Where this instance listens for other instances (port 0: any free port).
    pub listen: std::net::SocketAddr,
    /// The `host:port` other instances dial; `None`: the address bound (when it is not a
    /// wildcard).
    pub advertise: Option<String>,
    /// The fleet's shared secret (HMAC-SHA256 key), at least 32 bytes.
    pub secret: Secret,
}

/// Where revocations (locks) are kept.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreKind {
    /// One instance: an fsynced append log in `state_dir`, read before the first port accepts.
    Local {
        /// The directory of `locks.log` (created 0700 when missing).
        state_dir: std::path::PathBuf,
    },
    /// A fleet: Redis or Valkey, read through a local mirror kept current by a stream.
    Redis {
        /// `redis://`, `rediss://` (TLS), `redis-cluster://` or `redis-sentinel://` URL (TLS:
        /// `rediss-cluster://`, `rediss-sentinel://`), with credentials if any. A secret: never
        /// logged.
        url: String,
        /// The prefix of every key the fleet writes (`{prefix}:locks`, `{prefix}:lock:{id}`).
        key_prefix: String,
        /// For a `rediss://` URL: more CA certificates (PEM) to trust besides the system's.
        ca_file: Option<std::path::PathBuf>,
    },
}

/// `[fleet] staleness`: the policy while the store cannot be reached (Teleport's lock modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staleness {
    /// Keep serving with the last view of the locks; the staleness is a metric and an alert.
    BestEffort,
    /// Refuse new sessions (503) once the store has been unreachable for `max_staleness`.
    Strict,
}

/// `[fleet] subject_caps`: how `max_sessions_per_subject` counts the sessions of the other
/// instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectCaps {
    /// From the directory's mirror, never waiting on the store: handshakes racing on several
    /// instances within the mirror's lag may pass the cap by up to the cap on each.
    Mirror,
    /// Exact: every capped session first takes a leased place in the store (one round trip),
    /// Teleport's semaphore. While the store cannot be reached, `staleness` decides: `strict`
    /// refuses (503), `best_effort` counts by the mirror.
    Reserved,
}

/// The settings a process reads once, at its start: the values in force however a reload
/// changes the file, which a reload compares with (and says so).
#[derive(Debug, Clone, PartialEq)]
pub struct StartOnly {
    max_connections: usize,
    worker_threads: usize,
    worker_model: WorkerModel,
    reload_poll_interval: std::time::Duration,
    admin: Option<(usize, usize)>,
}

impl StartOnly {
    /// What `config` starts a process with.
    pub fn of(config: &Config) -> StartOnly {
        let s = &config.server;
        StartOnly {
            max_connections: s.max_connections,
            worker_threads: s.worker_threads,
            worker_model: s.worker_model,
            reload_poll_interval: s.reload_poll_interval,
            admin: config.admin.as_ref().map(|a| (a.max_connections, a.max_connections_per_ip)),
        }
    }

    /// The settings `new` sets otherwise than the values in force (a reload leaves them).
    pub fn changed(&self, new: &Config) -> Vec<&'static str> {
        let n = StartOnly::of(new);
        [
            (self.max_connections != n.max_connections, "server.max_connections"),
            (self.worker_threads != n.worker_threads, "server.worker_threads"),
            (self.worker_model != n.worker_model, "server.worker_model"),
            (self.reload_poll_interval != n.reload_poll_interval, "server.reload_poll_interval"),
            (self.admin != n.admin, "admin.max_connections and max_connections_per_ip"),
        ]
        .into_iter()
        .filter_map(|(changed, name)| changed.then_some(name))
        .collect()
    }
}

/// How `run`'s workers share connections when there is more than one (`worker_model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerModel {
    /// Tokio's multi-thread runtime: every listener is one socket, and a task may run on any
    /// worker (an idle worker steals queued tasks from a busy one).
    WorkStealing,
    /// One current-thread runtime per worker, each with its own `SO_REUSEPORT` socket for every
    /// listener address: the kernel spreads new connections over the workers, and a connection
    /// lives its whole life on the thread that accepted it.
    ThreadPerCore,
}

/// HTTP/2 on TLS listeners (`[http2]`): offered by ALPN next to HTTP/1.1, with WebSockets by
/// extended CONNECT (RFC 8441).
///
/// Memory: what one connection can make the proxy hold in received but unrelayed data is
/// bounded by `initial_connection_window`; one stream, by `initial_stream_window`. The
/// connection window defaults to the stream window times `max_concurrent_streams`, so no
/// stream that stops reading (its client's or its backend's side) can take the window the
/// connection's other streams need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http2Settings {
    /// ALPN offers `h2` on TLS listeners (a client that does not ask for it gets HTTP/1.1).
    pub enabled: bool,
    /// Streams one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// Bytes a client may send on one stream before the proxy has relayed them.
    pub initial_stream_window: u32,
    /// Bytes a client may send on one connection before the proxy has relayed them.
    pub initial_connection_window: u32,
    /// Largest frame payload the proxy accepts (SETTINGS_MAX_FRAME_SIZE).
    pub max_frame_size: u32,
    /// HTTP/2 streams (requests and WebSockets) open at once from one client address, over
    /// all of its connections (0: no cap); over it 429.
    pub max_streams_per_ip: u32,
    /// An HTTP/2 PING this often on a connection, closed when unanswered within
    /// `keepalive_timeout` (zero: no pings).
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered.
    pub keepalive_timeout: Duration,
    /// A connection with no stream open for this long is closed (GOAWAY).
    pub idle_timeout: Duration,
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
    /// The proxy's own login exchange (a token in, an `HttpOnly` cookie out), when set.
    pub cookie_login: Option<CookieLogin>,
    /// Sessions one subject (of one issuer) holds at once over every route (0: no cap).
    pub max_sessions_per_subject: u32,
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
    /// A subprotocol a browser lists beside its `subprotocol:` token entry; the proxy answers
    /// with it when the backend selected none, because browsers fail a handshake that offered
    /// subprotocols and got none back. Never forwarded to the backend.
    pub subprotocol_marker: String,
    /// Sessions (WebSockets and SSE streams) one subject holds at once on this route (0: no
    /// cap); over it 429.
    pub max_sessions_per_subject: u32,
}

/// Which browser origins may open sessions on a route (`[routes.origin]`).
#[derive(Debug, Clone)]
pub struct OriginPolicy {
    /// Allowed origins: exact (`https://app.example.com`) or wildcard (`*.example.com`).
    pub allow: Vec<OriginPattern>,
    /// Whether requests without an `Origin` header (non-browser clients) are allowed.
    pub allow_missing: bool,
}

/// `[auth.cookie_login]`: the path where the proxy turns a token into an `HttpOnly` cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CookieLogin {
    /// The path served before routing (`GET` the page, `POST` the token, `DELETE` to log out).
    pub path: String,
    /// The cookie's name (the routes list it as `cookie:<name>`).
    pub cookie: String,
}

/// `[routes.cors]`: what a browser page on another origin may do with the route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsPolicy {
    /// Origins whose pages may call the route (exact or wildcard, as `[routes.origin]`).
    pub allow_origins: Vec<OriginPattern>,
    /// Methods a preflight may ask for.
    pub allow_methods: Vec<http::Method>,
    /// Request headers a preflight may ask for (lowercase).
    pub allow_headers: Vec<String>,
    /// Response headers the page may read beyond the CORS-safelisted ones.
    pub expose_headers: Vec<String>,
    /// Whether the page may send credentials (cookies, `Authorization`) and read the answer.
    pub allow_credentials: bool,
    /// How long a browser may cache a preflight's answer.
    pub max_age: Duration,
}

/// Process-wide limits and timeouts (`[server]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Connections held at once; more are closed at accept.
    pub max_connections: usize,
    /// Time allowed for the TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Time allowed for the client to send the request head (408 after).
    pub header_read_timeout: Duration,
    /// Time a client may take no byte of an HTTP answer the proxy has to write (its socket
    /// full) before the connection is closed, as NGINX's `send_timeout`; zero: no limit. Not
    /// after an upgrade (a relay has its own deadlines). On HTTP/2 it is each answer's: the
    /// connection carries other streams (WebSockets among them) that one slow stream must not
    /// close, so a stream whose client keeps its window shut this long is reset instead.
    pub send_timeout: Duration,
    /// Directory for the binary upgrade's hand-over socket, created 0700; when unset,
    /// `$XDG_RUNTIME_DIR/portcullis`, else `portcullis-<uid>` in the temporary directory.
    pub runtime_dir: Option<std::path::PathBuf>,
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
    /// Tokio worker threads of `run` (0: `TOKIO_WORKER_THREADS`, else one per core); read at
    /// start.
    pub worker_threads: usize,
    /// How more than one worker shares the work; read at start.
    pub worker_model: WorkerModel,
    /// Peers whose `X-Forwarded-For` and `Forwarded` headers are believed and extended; from
    /// any other peer they are dropped. Empty: the edge believes no one.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Client connections held at once from one client address (0: no cap); the address is
    /// the PROXY protocol's on listeners that use it.
    pub max_connections_per_ip: u32,
    /// IPv6 clients are counted per prefix of this length (a host usually has a whole /64).
    pub ipv6_prefix_len: u8,
    /// WebSocket handshakes per second per client address, sustained (0: no limit); over it 429.
    pub handshake_rate_per_ip: u32,
    /// Handshakes a client address may make at once before the rate applies.
    pub handshake_burst_per_ip: u32,
    /// New connections per second per client address, sustained (0: no limit); over it the
    /// connection is closed at accept.
    pub connection_rate_per_ip: u32,
    /// Connections a client address may open at once before the rate applies.
    pub connection_burst_per_ip: u32,
    /// Signature checks per second per client address of tokens not in the verified-token
    /// cache, sustained (0: no limit); over it 429, on WebSocket and HTTP routes alike.
    pub token_check_rate_per_ip: u32,
    /// Uncached token checks a client address may cause at once before the rate applies.
    pub token_check_burst_per_ip: u32,
}

impl ServerSettings {
    /// Whether a connection from `peer` comes from a configured trusted proxy.
    pub fn is_trusted_proxy(&self, peer: std::net::IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.trusted_proxies.iter().any(|n| n.contains(&peer))
    }
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
    /// [`CIPHER_SUITES`]); the server's order wins over the client's.
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
    /// PROXY protocol (v1 or v2) required on every connection, accepted only from these
    /// sources (the load balancers); `None` when the listener does not use it.
    pub proxy_protocol: Option<Vec<ipnet::IpNet>>,
    /// `SO_REUSEPORT` on its sockets: several processes may listen on the same address and
    /// the kernel spreads new connections over them.
    pub reuse_port: bool,
}

/// The admin listener.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address bound; loopback by default.
    pub address: SocketAddr,
    /// Bearer token required on every endpoint but `/metrics`, `/live` and `/ready`, when set
    /// (`/sessions`, `/routes`, `/recordings`, `/limits`); required whenever `address`
    /// is not loopback.
    pub token: Option<Secret>,
    /// Host names (lowercase) the listener answers to besides loopback names and addresses and
    /// the address a connection reached: any other `Host` is refused (DNS rebinding).
    pub hosts: Vec<String>,
    /// Origins (`scheme://host[:port]`) whose requests are served; a request with any other
    /// `Origin` is refused, so a browser page cannot drive the API.
    pub allow_origins: Vec<String>,
    /// Admin connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Admin connections one client address may hold at once (0: no cap of its own), so that
    /// one address cannot take every slot from the probes and the scraper.
    pub max_connections_per_ip: usize,
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
    /// WebSocket upgrades, plain HTTP requests, or both.
    pub kind: RouteKind,
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
    /// What happens to a client header whose name has an underscore (`X_Portcullis_Sub`),
    /// which CGI, WSGI, PHP and many frameworks read as the dashed name.
    pub headers_with_underscores: UnderscoreHeaders,
    /// Deadlines and limits of sessions on this route.
    pub session: std::sync::Arc<SessionSettings>,
    /// Connect settings for this route's backends.
    pub backend: BackendSettings,
    /// Token requirements; the route is open when absent.
    pub auth: Option<RouteAuth>,
    /// Origin allowlist; any origin when absent.
    pub origin: Option<OriginPolicy>,
    /// CORS answered by the proxy (preflights and response headers), when set.
    pub cors: Option<std::sync::Arc<CorsPolicy>>,
    /// Every response gets `Content-Security-Policy: sandbox ...`: agent-served pages run in an
    /// opaque origin, with no access to the proxy origin's cookies or same-origin requests.
    pub sandbox: bool,
    /// Terminal recording (asciicast v2) of the route's WebSocket sessions, when set.
    pub recording: Option<std::sync::Arc<RecordingSettings>>,
    /// Live observers of the route's WebSocket sessions, when set.
    pub observe: Option<std::sync::Arc<ObserveSettings>>,
    /// Resume after a network blip, when set.
    pub resume: Option<std::sync::Arc<ResumeSettings>>,
    /// One backend WebSocket shared by every client of the same agent and path, when set.
    pub fanout: Option<std::sync::Arc<FanoutSettings>>,
    /// `[routes.affinity]`: the member that answered with a session header keeps the session's
    /// requests, through a sealed envelope (HTTP routes).
    pub affinity: Option<std::sync::Arc<AffinitySettings>>,
    /// `[routes.resource]`: the route is an OAuth protected resource (RFC 9728).
    pub resource: Option<std::sync::Arc<ResourceSettings>>,
    /// `kind = "mcp"`: what the proxy reads and checks of each MCP message (`[routes.mcp]`).
    pub mcp: Option<std::sync::Arc<McpSettings>>,
}

/// The MCP protocol revisions the proxy knows, oldest first: the session-based ones (2025-03-26
/// to 2025-11-25) and the stateless one (2026-07-28).
pub const MCP_REVISIONS: &[&str] = &["2025-03-26", "2025-06-18", "2025-11-25", "2026-07-28"];

/// `kind = "mcp"` and `[routes.mcp]`: an MCP server's Streamable HTTP endpoint. Every `POST`
/// body (a JSON-RPC message or batch) is read, up to `max_message`, far enough to learn each
/// method and, for `tools/call`, the tool; it is checked against the `Mcp-Method`/`Mcp-Name`
/// headers and authorized before it is forwarded unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct McpSettings {
    /// `MCP-Protocol-Version` values served; any other is refused (400). A request without the
    /// header is taken as 2025-03-26, as the specification says.
    pub protocol_versions: Vec<String>,
    /// Largest message body read (413 above); at most `[routes.backend] max_request_body`.
    pub max_message: u64,
    /// The whole message must have arrived within this (408 after), however it trickles.
    pub read_timeout: std::time::Duration,
    /// When set, a JSON-RPC request (other than `initialize` and `ping`) needs this scope,
    /// rendered with the route's captures and `{method}`; a scope with `*` for the method grants
    /// every method.
    pub method_scope: Option<String>,
    /// When set, a `tools/call` needs this scope, rendered with the route's captures and
    /// `{tool}`; a scope with `*` for the tool grants every tool.
    pub tool_scope: Option<String>,
    /// Tool names that get a label of their own in the metrics (any other is `other`).
    pub metric_tools: Vec<String>,
}

/// How long a subscriber (a fan-out client, an observer) dropped for falling behind has, by
/// default, to take the frame being written to it and its 1013 before its connection is cut.
pub const DROP_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// `[routes.fanout]`: the clients of one agent and path share one backend WebSocket; the
/// backend's data frames go to each of them (the same bytes, reference-counted).
#[derive(Debug, Clone, PartialEq)]
pub struct FanoutSettings {
    /// Whether a client's data frames are forwarded to the shared backend (else it is closed
    /// with 1008).
    pub forward_client_data: bool,
    /// How long the backend connection stays open after its last client left.
    pub linger: std::time::Duration,
    /// Frames a client may have waiting; one that falls further behind is dropped (1013).
    pub queue: usize,
    /// How long a dropped client has to take the frame in flight and its 1013 before its
    /// connection is cut.
    pub drop_grace: std::time::Duration,
}

/// `[routes.resume]`: a WebSocket session whose client vanishes without a close frame (its
/// connection dropped, or its pings went unanswered) is held for `window`, the backend's output
/// buffered up to `buffer` bytes; a client that opens the route again with the resume id the
/// proxy issued it (`?{param}=<id>`) and a token of the same subject for the same agent is
/// attached to it.
#[derive(Debug, Clone, PartialEq)]
pub struct ResumeSettings {
    /// How long a session without its client is held.
    pub window: std::time::Duration,
    /// Bytes of backend output held for the client while it is away; over it, the session
    /// ends (1001 to the backend).
    pub buffer: usize,
    /// The query parameter that carries the resume id on a reconnect.
    pub param: String,
    /// A text frame sent to a client whose resume id names no held session (a fresh session
    /// starts), when set.
    pub notice: Option<String>,
    /// Whether a fresh session's first frame is the issued id as a text frame
    /// (`{"portcullis":{"resume_id":"<id>"}}`), for clients that cannot read handshake headers
    /// (browsers). The id is in the `portcullis-resume-id` response header either way.
    pub announce: bool,
}

/// `[routes.observe]`: a subject whose token holds `scope` (rendered with the captures, in
/// `scope` or `scp`) may watch a live session of the route read-only, by opening a WebSocket
/// on the route's path with `?observe=<session id>`.
#[derive(Debug, Clone, PartialEq)]
pub struct ObserveSettings {
    /// The scope an observer's token must hold (`observe:{agent}`).
    pub scope: String,
    /// Bytes of the latest output an observer gets first.
    pub replay: usize,
    /// Chunks an observer may have waiting; one that falls further behind is closed (1013).
    pub queue: usize,
    /// Observers one session may have at once.
    pub max_observers: usize,
    /// Of those, how many one subject (of one issuer) may hold: no one holder of the scope
    /// can take every place and keep the others from watching.
    pub max_observers_per_subject: usize,
    /// How long a dropped observer has to take the frame in flight and its 1013 before its
    /// connection is cut.
    pub drop_grace: std::time::Duration,
}

/// `[routes.recording]`: every WebSocket session of the route is written to an asciicast v2
/// file: the backend's output as `o` events, the client's input as `i` events when `input`.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordingSettings {
    /// Where the `.cast` files go (one per session).
    pub directory: PathBuf,
    /// Record the client's input too (off by default: it may hold passwords).
    pub input: bool,
    /// What happens when the writer falls `queue` bytes behind or fails.
    pub on_backlog: Backlog,
    /// Bytes a session may have waiting for the writer.
    pub queue: usize,
    /// Finished recordings older than this are deleted by the sweep.
    pub max_age: Duration,
    /// The directory's recordings are kept under this many bytes: what `when_full` says
    /// happens past it.
    pub max_total_size: u64,
    /// One recording's largest size: past it, a gap marker ends the recording and
    /// `on_backlog` decides whether the session goes on unrecorded or closes.
    pub max_file_size: u64,
    /// What a new recording does when the directory holds `max_total_size` already.
    pub when_full: WhenFull,
    /// What the session does when a cap its output can reach (`max_file_size`, a full
    /// directory) stops its recording: `Close` (the default: a session that cannot be recorded
    /// does not go on) or `Slow`, read as "continue unrecorded".
    pub on_limit: Backlog,
    /// How often the directory is swept (age, and `when_full = "evict_oldest"`).
    pub sweep_interval: Duration,
    /// The terminal width the header declares (columns).
    pub width: u16,
    /// The terminal height the header declares (rows).
    pub height: u16,
}

/// What a new recording does when its directory is full (`when_full`). Recordings are
/// evidence: by default a cap stops new recordings, it never erases older ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// The new recording does not start: a gap, handled as `on_backlog` says (the session
    /// unrecorded, or closed), logged and counted.
    Refuse,
    /// The oldest finished recordings are deleted to make room (never a live one); each is
    /// counted in `portcullis_recording_evictions_total{reason="size"}` and alerted.
    EvictOldest,
}

/// What a recorded session does when its recording cannot keep up or fails: an audit gap is
/// never silent (a log line and `portcullis_recording_failures_total` either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backlog {
    /// Stop reading the session's sender until the writer catches up (TCP backpressure); a
    /// writer that failed leaves the rest of the session unrecorded.
    Slow,
    /// Close the session: 1011 to the client.
    Close,
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
    /// What the client may send per second (`client_message_rate`, `client_byte_rate`).
    pub client_rate: SessionRate,
    /// What the backend may send per second (`backend_message_rate`, `backend_byte_rate`).
    pub backend_rate: SessionRate,
    /// How far ahead of its rate a sender may get (a burst of `rate × rate_burst`).
    pub rate_burst: Duration,
    /// What happens to a sender over its rate.
    pub rate_action: RateAction,
}

/// A per-session rate on what one side sends; zero means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionRate {
    /// Frames per second: every frame counts, data, continuation and control.
    pub messages: u32,
    /// Bytes per second as read from the wire (frame headers included).
    pub bytes: u64,
}

impl SessionRate {
    /// True when neither rate is set.
    pub fn is_off(&self) -> bool {
        self.messages == 0 && self.bytes == 0
    }
}

/// What the relay does with a sender over its session rate (`rate_action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateAction {
    /// Stop reading from it until it is back within its rate: TCP backpressure (the default).
    Slow,
    /// Close the session: 1008 "rate limit" to the sender.
    Close,
}

/// Backend connect settings (`[backend]`, overridable per route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSettings {
    /// Time allowed for the TCP connect to one member (504 after, when no member is left).
    pub connect_timeout: Duration,
    /// Time allowed for the backend's WebSocket handshake response.
    pub handshake_timeout: Duration,
    /// HTTP routes: time from the request's last byte sent to the response head (504 after).
    pub response_header_timeout: Duration,
    /// HTTP routes: a request or response body that moves no byte for this long is cut.
    pub idle_body_timeout: Duration,
    /// HTTP routes: largest request body passed to a backend (413 above).
    pub max_request_body: u64,
    /// HTTP routes: idle keep-alive connections kept per backend member.
    pub max_idle_per_member: usize,
    /// HTTP routes: an idle keep-alive connection is closed after this long.
    pub pool_idle_timeout: Duration,
    /// WebSocket routes: local addresses the connections to members are made from, in turn
    /// (empty: the kernel's choice). Each address has its own source ports towards a member.
    pub source_addresses: std::sync::Arc<[std::net::IpAddr]>,
    /// HTTP routes: an event stream (SSE) whose backend has sent nothing for this long, at an
    /// event boundary, gets a comment line (`: keep-alive`), so that idle intermediaries do not
    /// cut it; such a stream is not cut for the backend's silence (it is governed: expiry,
    /// revocation, lifetime, drain end it). Zero: no comments, and `idle_body_timeout` applies.
    pub sse_keepalive: Duration,
}

/// `headers_with_underscores`: a client header whose name has an underscore. Whatever the
/// choice, a name that folds (lowercase, `_` to `-`) onto a header the proxy sets never reaches
/// the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnderscoreHeaders {
    /// Removed before forwarding (the default, as NGINX's `underscores_in_headers off`).
    #[default]
    Drop,
    /// The request is refused with 400 (as Envoy's `REJECT_REQUEST`).
    Reject,
    /// Forwarded, unless it folds onto a header the proxy sets.
    Allow,
}

/// What a route serves (`kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// WebSocket upgrades only; any other request is answered 426 (the default).
    WebSocket,
    /// Plain HTTP requests only (REST, SSE); an upgrade is answered 400.
    Http,
    /// Both: upgrades are relayed as WebSockets, other requests proxied as HTTP.
    Both,
    /// An MCP server's Streamable HTTP endpoint: plain HTTP requests, each message read and
    /// checked ([`McpSettings`]); an upgrade is answered 400.
    Mcp,
}

impl RouteKind {
    /// Whether the route takes WebSocket upgrades.
    pub fn websocket(self) -> bool {
        matches!(self, RouteKind::WebSocket | RouteKind::Both)
    }

    /// Whether the route takes plain HTTP requests.
    pub fn http(self) -> bool {
        matches!(self, RouteKind::Http | RouteKind::Both | RouteKind::Mcp)
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
    /// Names of the cookies the proxy takes tokens from: the login cookie and every route's
    /// `cookie:` source (all routes share the origin, so an agent could set another route's,
    /// and a browser sends each to every route).
    pub(crate) fn credential_cookies(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.auth.cookie_login.iter().map(|l| l.cookie.as_str()).collect();
        for source in self.routes.iter().filter_map(|r| r.auth.as_ref()).flat_map(|a| &a.sources) {
            if let TokenSource::Cookie(name) = source {
                names.push(name);
            }
        }
        names
    }

    /// What is valid but weak, one sentence each, for `check-config` to print and `run` to log:
    /// no route at all (the container image's default), routes that accept a token of any
    /// audience.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.routes.is_empty() {
            out.push(
                "no routes: every request gets 404; write [[routes]] (see the annotated reference, \
                 config/portcullis.toml, at /etc/portcullis/reference.toml in the image)"
                    .to_owned(),
            );
        }
        for (i, r) in self.routes.iter().enumerate() {
            // A protected resource checks the audience itself (its `id`).
            if r.auth.as_ref().is_some_and(|a| a.audiences.is_empty()) && r.resource.is_none() {
                out.push(format!(
                    "routes[{i}] ({}): [routes.auth] has no audiences, so a token the same keys signed for any other \
                     service is accepted here; set audiences",
                    r.name
                ));
            }
            let Some(m) = &r.mcp else { continue };
            if m.tool_scope.is_some() && m.method_scope.is_none() {
                out.push(format!(
                    "routes[{i}] ({}): [routes.mcp] tool_scope without method_scope authorizes tools/call only: \
                     any token for the agent may still call resources/read, prompts/get and every other method; \
                     set method_scope to hold those to scopes too",
                    r.name
                ));
            }
            if r.auth.is_some() && r.affinity.is_none() {
                out.push(format!(
                    "routes[{i}] ({}): an MCP route with tokens but without [routes.affinity]: the server's session \
                     ids reach clients as they are, bound to no subject, and a second user who learns one can use it",
                    r.name
                ));
            }
        }
        out
    }

    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse(&text, path)
    }

    /// Like [`Config::load`], but secret files and variables are only named, not read (they
    /// exist where the proxy runs, a mounted Kubernetes Secret say): for `check-config
    /// --syntax-only`. The result is for checking only; it holds stand-ins for the secrets.
    pub fn load_unread_secrets(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Config::parse_with(&text, path, validate::Secrets::Unread)
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        Config::parse_with(text, origin, validate::Secrets::Read)
    }

    fn parse_with(text: &str, origin: &Path, secrets: validate::Secrets) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|s| text.as_bytes()[..s.start.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1)
                .unwrap_or(1);
            ConfigError::Parse { path: origin.to_owned(), line, message: e.message().trim().to_owned() }
        })?;
        validate::config(raw, secrets).map_err(|(key, message)| ConfigError::Invalid {
            path: origin.to_owned(),
            key,
            message,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::raw::Size;
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

    /// Found by an attacker review: credentials in a JWKS or registry URL were written to
    /// every failed fetch's log line and sent as the request's `Host`. They are refused.
    #[test]
    fn outbound_urls_carry_no_credentials() {
        let listener = "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n";
        let jwks = "[[auth.jwks]]\nurl = \"https://user:s3cret@keys.example/jwks\"\nalgorithms = [\"ES256\"]\n";
        let registry = "[[routes]]\nname = \"r\"\npath = \"/agents/{agent}\"\n\
                        [routes.registry]\nurl = \"https://user:s3cret@registry.example/agents/{agent}\"\n";
        for (text, key) in [(jwks, "auth.jwks[0].url"), (registry, ".registry.url")] {
            let err = Config::parse(&format!("{listener}{text}"), Path::new("x.toml")).expect_err("refused");
            let msg = err.to_string();
            assert!(msg.contains(key) && msg.contains("must not carry credentials"), "{msg}");
            assert!(!msg.contains("s3cret"), "the secret echoed: {msg}");
        }
        let u: http::Uri = "https://user:pw@keys.example:8443/jwks?api_key=QS".parse().expect("uri");
        assert_eq!(crate::outbound::loggable(&u), "https://keys.example:8443/jwks");
    }

    /// A configuration that states no per-client limit gets them all: one address may open
    /// 50 connections at once then 20 a second, and 40 handshakes at once then 20 a second.
    #[test]
    fn per_client_limits_are_on_when_none_is_configured() {
        let c = Config::parse("[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n", Path::new("x.toml")).expect("valid");
        let s = &c.server;
        assert_eq!((s.connection_burst_per_ip, s.connection_rate_per_ip), (50, 20));
        assert_eq!((s.handshake_burst_per_ip, s.handshake_rate_per_ip), (40, 20));
    }

    /// Found by a documentation review: these zeros passed the check and then refused every
    /// connection (every TLS handshake and request head timed out at once, every HTTP/2 ping
    /// ended its connection, the admin listener had no slot for the probes).
    #[test]
    fn a_zero_that_would_refuse_every_connection_is_refused() {
        let listener = "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n";
        for (section, key) in [
            ("server", "tls_handshake_timeout = \"0s\""),
            ("server", "header_read_timeout = \"0s\""),
            ("http2", "keepalive_timeout = \"0s\""),
            ("admin", "max_connections = 0"),
        ] {
            let admin = if section == "admin" { "address = \"127.0.0.1:0\"\n" } else { "" };
            let text = format!("{listener}[{section}]\n{admin}{key}\n");
            let msg = Config::parse(&text, Path::new("x.toml")).expect_err(key).to_string();
            let name = key.split(' ').next().unwrap_or(key);
            assert!(msg.contains(&format!("{section}.{name}")), "{key}: {msg}");
        }
        let text = format!("{listener}[admin]\naddress = \"127.0.0.1:0\"\nmax_connections_per_ip = 0\n");
        Config::parse(&text, Path::new("x.toml")).expect("max_connections_per_ip = 0 is no cap per address");
    }

    /// Found by a documentation review: `[fd00::7]:9444` became `[fd00::7]:9444:9444`, and an
    /// IPv6 address alone `fd00::7:9444`, neither of which another instance can dial.
    #[test]
    fn an_advertised_address_from_the_environment_takes_the_port_only_when_it_has_none() {
        for (host, want) in [
            ("10.0.0.7", "10.0.0.7:9444"),
            ("10.0.0.7:7000", "10.0.0.7:7000"),
            ("fd00::7", "[fd00::7]:9444"),
            ("[fd00::7]", "[fd00::7]:9444"),
            ("[fd00::7]:7000", "[fd00::7]:7000"),
            ("peer-0.example", "peer-0.example:9444"),
            ("peer-0.example:7000", "peer-0.example:7000"),
        ] {
            assert_eq!(validate::advertised(host, 9444), want, "{host}");
        }
    }

    /// Found by a documentation review: a recording or observers on a route that serves HTTP
    /// only were accepted and did nothing (resume and fan-out were refused there already).
    #[test]
    fn a_websocket_feature_on_a_route_that_serves_http_only_is_refused() {
        let head = "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n\
                    [[auth.keys]]\nalgorithms = [\"HS256\"]\nsecret_env = \"UNSET\"\n";
        for kind in ["http", "mcp"] {
            for (table, feature) in [
                ("recording", "[routes.recording]\ndirectory = \"/tmp\"\n"),
                ("observe", "[routes.observe]\nscope = \"watch\"\n"),
                ("resume", "[routes.resume]\n"),
                ("fanout", "[routes.fanout]\n"),
            ] {
                let text = format!(
                    "{head}[[routes]]\nname = \"r\"\npath = \"/agents/{{agent}}\"\nbackends = [\"127.0.0.1:9\"]\n\
                     kind = \"{kind}\"\n[routes.auth]\nrequired_claims = [\"sub\"]\n{feature}"
                );
                let msg = Config::parse_with(&text, Path::new("x.toml"), validate::Secrets::Unread)
                    .expect_err(table)
                    .to_string();
                assert!(
                    msg.contains(&format!("routes[0].{table}")) && msg.contains("HTTP only"),
                    "{kind} {table}: {msg}"
                );
            }
        }
    }

    /// Found by an attacker review: `url = "http://{agent}:8080/members"` was accepted, and an
    /// agent id of `127.0.0.1` or `localhost` sent the registry's token to that host and took
    /// its answer for the agent's members (a connect anywhere the proxy reaches).
    #[test]
    fn a_registry_url_cannot_be_steered_by_the_path() {
        let route = |path: &str, url: &str| {
            format!(
                "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n[[routes]]\nname = \"r\"\npath = \"{path}\"\n\
                 [routes.registry]\nurl = \"{url}\"\n"
            )
        };
        for (path, url, says) in [
            ("/agents/{agent}", "http://{agent}:8080/members", "only of captures"),
            ("/agents/{agent}", "https://{agent}/members", "only of captures"),
            ("/agents/{agent}/{*rest}", "http://reg.internal/{rest}", "catch-all"),
        ] {
            let msg = Config::parse(&route(path, url), Path::new("x.toml")).expect_err(url).to_string();
            assert!(msg.contains("routes[0].registry.url") && msg.contains(says), "{url}: {msg}");
        }
        for url in ["http://{agent}.registries.internal/members", "http://reg.internal:8080/agents/{agent}"] {
            Config::parse(&route("/agents/{agent}", url), Path::new("x.toml")).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }

    #[test]
    fn a_listener_name_is_a_label() {
        for bad in ["", "public\nmore", "tab\there", "admin listener"] {
            let text = format!("[[listeners]]\nname = {bad:?}\naddresses = [\"127.0.0.1:0\"]\n");
            let msg = Config::parse(&text, Path::new("x.toml")).unwrap_err().to_string();
            assert!(msg.contains("listeners[0].name"), "{bad:?}: {msg}");
        }
        let c = Config::parse(
            "[[listeners]]\nname = \"public-v4_1\"\naddresses = [\"127.0.0.1:0\"]\n",
            Path::new("x.toml"),
        );
        assert_eq!(c.expect("valid").listeners[0].name, "public-v4_1");
    }

    #[test]
    fn worker_model_is_work_stealing_unless_thread_per_core_is_asked_for() {
        let base = "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n";
        let c = Config::parse(base, Path::new("x.toml")).expect("valid");
        assert_eq!(c.server.worker_model, WorkerModel::WorkStealing);
        let text = format!("[server]\nworker_model = \"thread_per_core\"\n{base}");
        let c = Config::parse(&text, Path::new("x.toml")).expect("valid");
        assert_eq!(c.server.worker_model, WorkerModel::ThreadPerCore);
        let text = format!("[server]\nworker_model = \"per_core\"\n{base}");
        let msg = Config::parse(&text, Path::new("x.toml")).unwrap_err().to_string();
        assert!(msg.contains("x.toml:2") && msg.contains("expected `work_stealing` or `thread_per_core`"), "{msg}");
    }

    #[test]
    fn cipher_suites_default_to_aes_128_first_and_are_checked() {
        let base = "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let c = Config::parse(base, Path::new("x.toml")).expect("valid");
        let tls = c.tls.expect("tls");
        assert_eq!(tls.cipher_suites[0], "TLS13_AES_128_GCM_SHA256");
        assert_eq!(tls.cipher_suites.len(), CIPHER_SUITES.len());
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
    fn fleet_settings_are_checked() {
        let base = "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n[fleet]\n";
        let c = Config::parse(base, Path::new("x.toml")).expect("valid");
        assert_eq!(c.fleet.store, StoreKind::Local { state_dir: defaults::STATE_DIR.into() });
        assert_eq!(c.fleet.subject_caps, SubjectCaps::Mirror);
        let redis = format!("{base}store = \"redis\"\nredis_url = \"redis://r\"\nsubject_caps = \"reserved\"\n");
        assert_eq!(
            Config::parse(&redis, Path::new("x.toml")).expect("valid").fleet.subject_caps,
            SubjectCaps::Reserved
        );
        for (fleet, key, wanted) in [
            ("store = \"redis\"\nredis_url = \"redis://r\"\nredis_ca_file = \"ca.pem\"", "fleet.redis_ca_file", "TLS URL"),
            ("store = \"redis\"\nredis_url = \"http://r\"", "fleet.redis_url", "redis://"),
            ("store = \"redis\"", "fleet.redis_url", "needs redis_url"),
            ("redis_url = \"redis://r\"", "fleet.store", "local"),
            ("store = \"redis\"\nredis_url = \"redis://r\"\npeer_listen = \"0.0.0.0:9444\"\npeer_secret_env = \"PORTCULLIS_NO_SUCH_VAR_\"", "fleet.peer_secret_file", "not set"),
            ("peer_listen = \"127.0.0.1:9444\"", "fleet.peer_listen", "store = \"redis\""),
            ("max_staleness = \"0s\"", "fleet.max_staleness", "more than 0s"),
            ("subject_caps = \"reserved\"", "fleet.subject_caps", "store = \"redis\""),
        ] {
            let text = format!("{base}{fleet}\n");
            let msg = Config::parse(&text, Path::new("x.toml")).unwrap_err().to_string();
            assert!(msg.contains(key) && msg.contains(wanted), "{fleet}: {msg}");
        }
    }

    #[test]
    fn a_route_host_is_kept_in_the_form_request_hosts_are_matched_in() {
        let route = |host: &str| {
            format!(
                "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n[[routes]]\nname = \"t\"\nhost = {host:?}\npath = \"/t\"\nbackends = [\"127.0.0.1:1\"]\n"
            )
        };
        for (given, kept) in [
            ("Agents.Example.COM.", "agents.example.com"),
            ("*.Example.com", "*.example.com"),
            ("127.0.0.1", "127.0.0.1"),
            ("[::1]", "::1"),
        ] {
            let c = Config::parse(&route(given), Path::new("x.toml")).expect("valid");
            assert_eq!(c.routes[0].host.as_deref(), Some(kept), "{given}");
        }
        for bad in ["a~b.example", "open.example,x", "a..b", "host:8080", "*.", "x.*.example"] {
            let msg = Config::parse(&route(bad), Path::new("x.toml")).unwrap_err().to_string();
            assert!(msg.contains("routes[0].host"), "{bad}: {msg}");
        }
    }

    #[test]
    fn observers_per_subject_default_to_two_and_are_at_least_one() {
        let route = |extra: &str| {
            format!(
                "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n[[auth.keys]]\nalgorithms = [\"HS256\"]\nsecret_env = \"PATH\"\n[[routes]]\nname = \"t\"\npath = \"/agents/{{agent}}/terminal\"\nbackends = [\"127.0.0.1:1\"]\n[routes.auth]\nagent_claim = \"agents\"\n[routes.observe]\nscope = \"observe:{{agent}}\"\n{extra}"
            )
        };
        let c = Config::parse(&route(""), Path::new("x.toml")).expect("valid");
        let observe = c.routes[0].observe.as_ref().expect("observe");
        assert_eq!((observe.max_observers, observe.max_observers_per_subject), (8, 2));
        let msg =
            Config::parse(&route("max_observers_per_subject = 0\n"), Path::new("x.toml")).unwrap_err().to_string();
        assert!(msg.contains("max_observers_per_subject") && msg.contains("at least 1"), "{msg}");
    }

    #[test]
    fn a_protected_resource_is_checked_and_its_metadata_url_built_from_its_id() {
        let route = |resource: &str, auth: &str| {
            format!(
                "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n[[auth.keys]]\nalgorithms = [\"HS256\"]\nsecret_env = \"PATH\"\n[[routes]]\nname = \"m\"\npath = \"/agents/{{agent}}/mcp\"\nkind = \"http\"\nbackends = [\"127.0.0.1:1\"]\n{auth}[routes.resource]\n{resource}\n"
            )
        };
        let auth = "[routes.auth]\nagent_claim = \"agents\"\n";
        let ok = "id = \"https://e.example/agents/{agent}/mcp\"\nauthorization_servers = [\"https://idp.example\"]";
        let c = Config::parse(&route(ok, auth), Path::new("x.toml")).expect("valid");
        // The resource's id is the audience checked: no warning of a route without audiences.
        assert!(c.warnings().iter().all(|w| !w.contains("audiences")), "{:?}", c.warnings());
        for (resource, auth, wanted) in [
            (ok, "", "needs [routes.auth]"),
            ("id = \"http://e.example/mcp\"\nauthorization_servers = [\"https://idp.example\"]", auth, "https://"),
            ("id = \"https://e.example/mcp\"\nauthorization_servers = []", auth, "at least one"),
        ] {
            let msg = Config::parse(&route(resource, auth), Path::new("x.toml")).unwrap_err().to_string();
            assert!(msg.contains("resource") && msg.contains(wanted), "{resource}: {msg}");
        }
        assert_eq!(
            ResourceSettings::metadata_url("https://e.example/agents/a1/mcp").as_deref(),
            Some("https://e.example/.well-known/oauth-protected-resource/agents/a1/mcp")
        );
        assert_eq!(
            ResourceSettings::metadata_url("https://e.example").as_deref(),
            Some("https://e.example/.well-known/oauth-protected-resource")
        );
    }

    #[test]
    fn bad_duration_is_reported_with_line() {
        let text = "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n[session]\nidle_timeout = \"soon\"\n";
        let msg = Config::parse(text, Path::new("x.toml")).unwrap_err().to_string();
        assert!(msg.starts_with("x.toml:4:"), "{msg}");
        assert!(msg.contains("invalid duration"), "{msg}");
    }

    /// `tls_handshake_timeout = "1ns"` passed the check (it is not zero) and refused every TLS
    /// connection: a duration under a millisecond is refused wherever it is written.
    #[test]
    fn a_duration_under_a_millisecond_is_refused_as_a_slip_of_the_unit() {
        let base = "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n";
        for (section, line) in [
            ("server", "tls_handshake_timeout = \"1ns\""),
            ("server", "header_read_timeout = \"999us\""),
            ("session", "ping_interval = \"10ns\""),
            ("backend", "connect_timeout = \"500us\""),
        ] {
            let text = format!("{base}[{section}]\n{line}\n");
            let msg = Config::parse(&text, Path::new("x.toml")).unwrap_err().to_string();
            assert!(msg.starts_with("x.toml:4:") && msg.contains("under a millisecond"), "{line}: {msg}");
        }
        for ok in ["\"0s\"", "\"1ms\"", "\"1ms 500us\""] {
            let text = format!("{base}[session]\nidle_timeout = {ok}\n");
            assert!(Config::parse(&text, Path::new("x.toml")).is_ok(), "{ok}");
        }
    }

    /// Found by an attack on the proxy: each of these passed `check-config` and then broke the
    /// proxy. A registry `timeout` of `"600y"` stopped it at start (exit 101: a cache's expiry
    /// of twice that is past what moka takes) and, arriving by reload, killed the reloader; a
    /// JWKS `refresh_interval` of `"0s"` panicked its refresher; `eject_base` or `max_lifetime`
    /// of billions of years overflowed the clock per request or session; a `"1ms"`
    /// `tls_handshake_timeout` failed handshakes on loopback; a `"1ms"` `sse_keepalive` kept a
    /// core busy. Each is now an error naming its key.
    #[test]
    fn durations_that_would_break_the_proxy_are_refused_by_check_config() {
        let listener = "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n";
        let route = "[[routes]]\nname = \"r\"\npath = \"/agents/{agent}\"\n";
        let registry =
            |line: &str| format!("{route}[routes.registry]\nurl = \"http://reg.internal/{{agent}}\"\n{line}\n");
        let jwks = |line: &str| {
            format!(
                "[[auth.jwks]]\nurl = \"https://keys.example/jwks\"\nalgorithms = [\"ES256\"]\n{line}\n\
                 {route}backends = [\"127.0.0.1:1\"]\n"
            )
        };
        let routed =
            |section: &str, line: &str| format!("{route}backends = [\"127.0.0.1:1\"]\n[routes.{section}]\n{line}\n");
        let cases = [
            (registry("timeout = \"600y\""), "over ten years"),
            (registry("timeout = \"0s\""), "registry.timeout: must be more than 0s"),
            (registry("timeout = \"1ms\""), "registry.timeout: must be at least 100ms"),
            (routed("backend", "connect_timeout = \"1ms\""), "connect_timeout: must be at least 100ms"),
            (routed("session", "ping_timeout = \"10ms\""), "ping_timeout: must be at least 100ms"),
            (jwks("refresh_interval = \"0s\""), "refresh_interval: must be more than 0s"),
            (jwks("refresh_interval = \"1ms\""), "refresh_interval: must be at least 50ms"),
            (jwks("min_refetch_interval = \"0s\""), "min_refetch_interval: must be more than 0s"),
            (jwks("timeout = \"0s\""), "jwks[0].timeout: must be more than 0s"),
            (routed("health", "eject_base = \"500000000000y\""), "over ten years"),
            (routed("health", "active_interval = \"5ms\""), "active_interval: must be at least 50ms"),
            (routed("session", "max_lifetime = \"500000000000y\""), "over ten years"),
            (routed("session", "ping_interval = \"1ms\""), "ping_interval: must be at least 50ms"),
            (routed("backend", "sse_keepalive = \"1ms\""), "sse_keepalive: must be at least 50ms"),
            ("[server]\ntls_handshake_timeout = \"1ms\"\n".to_owned(), "tls_handshake_timeout: must be at least 100ms"),
            ("[server]\nheader_read_timeout = \"20ms\"\n".to_owned(), "header_read_timeout: must be at least 100ms"),
            ("[server]\nreload_poll_interval = \"1ms\"\n".to_owned(), "reload_poll_interval: must be at least 50ms"),
            ("[http2]\nkeepalive_interval = \"1ms\"\n".to_owned(), "keepalive_interval: must be at least 50ms"),
        ];
        for (text, says) in cases {
            let msg = Config::parse(&format!("{listener}{text}"), Path::new("x.toml")).expect_err(&text).to_string();
            assert!(msg.contains(says), "{text}: {msg}");
        }
        // The bounds themselves, and "off", pass.
        for text in [
            registry("timeout = \"10y\""),
            jwks("refresh_interval = \"50ms\""),
            routed("session", "ping_interval = \"0s\"\nmax_lifetime = \"3650d\""),
            routed("backend", "sse_keepalive = \"0s\""),
            "[server]\ntls_handshake_timeout = \"100ms\"\nreload_poll_interval = \"0s\"\n".to_owned(),
        ] {
            Config::parse(&format!("{listener}{text}"), Path::new("x.toml")).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
    }

    /// Found by the attack on the descriptor budget's build: a `queue` of 2^61 or more panicked
    /// every fan-out request (and, for observers, poisoned the hub's lock), and a registry
    /// `max_capacity` of 0 sized its connect gate to nothing (30 connects at once to a host
    /// that drops them, where the gate sends 1).
    #[test]
    fn counts_that_would_break_the_proxy_are_refused_by_check_config() {
        let base = "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n\
                    [[auth.keys]]\nalgorithms = [\"HS256\"]\nsecret_env = \"UNSET\"\n\
                    [[routes]]\nname = \"r\"\npath = \"/agents/{agent}\"\n";
        for (table, says) in [
            ("backends = [\"127.0.0.1:1\"]\n[routes.auth]\n[routes.fanout]\nqueue = 2305843009213693952\n", "fanout.queue: must be 1 to 65536"),
            ("backends = [\"127.0.0.1:1\"]\n[routes.auth]\n[routes.fanout]\nqueue = 0\n", "fanout.queue: must be 1 to 65536"),
            ("backends = [\"127.0.0.1:1\"]\n[routes.auth]\n[routes.observe]\nscope = \"watch\"\nqueue = 2305843009213693952\n", "observe.queue: must be 1 to 65536"),
            ("[routes.registry]\nurl = \"http://reg.internal/{agent}\"\nmax_capacity = 0\n", "registry.max_capacity: must be at least 1"),
            ("backends = [\"127.0.0.1:1\"]\n[admin]\nmax_connections = 10000\n", "admin.max_connections: must be 1 to 1024"),
            (
                "backends = [\"127.0.0.1:1\"]\n[routes.recording]\ndirectory = \"/tmp\"\nmax_total_size = 0\n",
                "recording.max_total_size: must be at least 4KiB",
            ),
        ] {
            let text = format!("{base}{table}");
            let msg = Config::parse_with(&text, Path::new("x.toml"), validate::Secrets::Unread).expect_err(table).to_string();
            assert!(msg.contains(says), "{table}: {msg}");
        }
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
        let s = *c.routes[0].session;
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
    fn proxy_protocol_needs_its_sources_and_sources_need_it() {
        let on = "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\nproxy_protocol = true\n";
        let msg = Config::parse(on, Path::new("x.toml")).unwrap_err().to_string();
        assert!(msg.contains("listeners[0].proxy_protocol_from"), "{msg}");
        let off = "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\nproxy_protocol_from = [\"10.0.0.0/8\"]\n";
        let msg = Config::parse(off, Path::new("x.toml")).unwrap_err().to_string();
        assert!(msg.contains("only used with proxy_protocol"), "{msg}");
        let ok = format!("{on}proxy_protocol_from = [\"10.0.0.0/8\", \"::1/128\"]\n");
        let c = Config::parse(&ok, Path::new("x.toml")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.listeners[0].proxy_protocol.as_ref().map(Vec::len), Some(2));
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
    /// `config/portcullis.toml` says every key it sets is "set to its default value unless the
    /// comment says otherwise": hold it to that for every section it sets without an override.
    #[test]
    fn reference_file_states_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/portcullis.toml");
        let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.server, ServerSettings::default());
        assert_eq!(c.session, SessionSettings::default());
        assert_eq!(c.backend, BackendSettings::default());
        assert_eq!(c.http2, Http2Settings::default());
        assert_eq!(c.http2.max_streams_per_ip, 256, "an address holds no more over HTTP/2 than over HTTP/1.1");
        assert_eq!(c.admin.as_ref().map(|a| a.address), Some(defaults::ADMIN_ADDRESS));
        assert_eq!(c.auth.leeway, defaults::AUTH_LEEWAY);
        assert_eq!(c.auth.max_sessions_per_subject, defaults::AUTH_MAX_SESSIONS_PER_SUBJECT);
        assert_eq!(c.auth.max_token_size, defaults::AUTH_MAX_TOKEN_SIZE);
        assert_eq!(c.auth.cache_capacity, defaults::AUTH_CACHE_CAPACITY);
        assert_eq!(c.auth.revocation_ttl, defaults::AUTH_REVOCATION_TTL);
        assert_eq!(c.tls.as_ref().map(|t| t.cipher_suites.len()), Some(CIPHER_SUITES.len()));
        for r in &c.routes {
            assert_eq!(r.health, HealthSettings::default(), "routes {}: health", r.name);
            assert_eq!(r.balance.max_attempts, Balance::default().max_attempts, "routes {}", r.name);
        }
    }
}
