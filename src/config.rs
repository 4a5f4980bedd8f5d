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
    /// Backend members, tried in order; may use captures (`{agent}.agents.internal:7681`).
    pub backends: Vec<BackendTemplate>,
    /// Path requested from the backend (may use captures); the client's path when absent.
    pub backend_path: Option<String>,
    /// Deadlines and limits of sessions on this route.
    pub session: SessionSettings,
    /// Connect settings for this route's backends.
    pub backend: BackendSettings,
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
            drain_timeout: Duration::from_secs(30),
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
            let line = e.span().map(|s| text[..s.start.min(text.len())].lines().count().max(1)).unwrap_or(1);
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
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    #[serde(default)]
    sni: Vec<SniCertificate>,
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
    address: SocketAddr,
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
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: String,
    host: Option<String>,
    path: PathPattern,
    backends: Vec<BackendTemplate>,
    backend_path: Option<String>,
    #[serde(default)]
    session: RawSession,
    #[serde(default)]
    backend: RawBackend,
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
            if r.backends.is_empty() {
                return Err(invalid(&format!("{key}.backends"), "at least one backend is required"));
            }
            for b in &r.backends {
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
            routes.push(RouteConfig {
                name: r.name,
                host: r.host.map(|h| h.to_ascii_lowercase()),
                path: r.path,
                backends: r.backends,
                backend_path: r.backend_path,
                session: r.session.merge(session_defaults, &format!("{key}.session"))?,
                backend: r.backend.merge(backend_defaults),
            });
        }

        Ok(Config {
            server,
            tls: self.tls.map(|t| TlsSettings { cert: t.cert, key: t.key, sni: t.sni }),
            listeners,
            admin: self.admin.map(|a| AdminConfig { address: a.address }),
            routes,
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
