//! From the raw mirror to the typed [`Config`]: one function per section. Each fills absent
//! keys from [`super::defaults`] and checks that the values fit together; an error names the
//! dotted key (`routes[2].balance.sticky_key`) and what is wrong.

use std::path::Path;
use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily};

use super::defaults;
use super::raw::{
    Dur, RawAdmin, RawAuth, RawBackend, RawBalance, RawConfig, RawHealth, RawHttp2, RawKind, RawListener, RawMember,
    RawOrigin, RawRateAction, RawRegistry, RawRoute, RawRouteAuth, RawServer, RawSession, RawTls, RawUnderscores,
};
use super::{
    template_captures, AdminConfig, AuthSettings, BackendSettings, Balance, Config, HealthSettings, Http2Settings,
    JwksSettings, KeyMaterial, ListenerConfig, OriginPolicy, PathPattern, Policy, RateAction, RegistryConfig,
    RouteAuth, RouteConfig, RouteKind, Secret, ServerSettings, SessionRate, SessionSettings, StaticKey, StaticMember,
    StickyKey, TlsSettings, TokenSource, UnderscoreHeaders, CIPHER_SUITES,
};

/// The dotted key of an invalid value, and what is wrong with it.
pub(super) type Invalid = (String, String);

/// Validates every section, in file order.
/// Whether secret files and variables are read (`run`, `check-config`), or only named
/// (`check-config --syntax-only`: the secret lives where the proxy runs, as a mounted Secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Secrets {
    Read,
    Unread,
}

pub(super) fn config(raw: RawConfig, secrets: Secrets) -> Result<Config, Invalid> {
    let server = server(raw.server)?;
    let session = session(raw.session, SessionSettings::default(), "session")?;
    let backend = backend(raw.backend, BackendSettings::default(), "backend")?;
    let listeners = listeners(raw.listeners, raw.tls.is_some())?;
    let has_keys = !raw.auth.keys.is_empty() || !raw.auth.jwks.is_empty();
    let mut routes: Vec<RouteConfig> = Vec::with_capacity(raw.routes.len());
    for (i, r) in raw.routes.into_iter().enumerate() {
        let key = format!("routes[{i}]");
        if routes.iter().any(|x| x.name == r.name) {
            return Err(invalid(&format!("{key}.name"), "duplicate route name"));
        }
        routes.push(route(r, &key, session, backend.clone(), has_keys, secrets)?);
    }
    Ok(Config {
        server,
        tls: raw.tls.map(tls).transpose()?,
        listeners,
        admin: raw.admin.map(|a| admin(a, secrets)).transpose()?,
        routes,
        auth: auth(raw.auth, secrets)?,
        session,
        backend,
        http2: http2(raw.http2)?,
        fleet: fleet(raw.fleet, secrets)?,
    })
}

fn affinity(a: super::raw::RawAffinity, key: &str, secrets: Secrets) -> Result<super::AffinitySettings, Invalid> {
    let at = format!("{key}.affinity");
    let header = a.header.unwrap_or_else(|| "mcp-session-id".to_owned());
    let header = http::HeaderName::from_bytes(header.as_bytes())
        .map_err(|_| invalid(&format!("{at}.header"), "not a header name"))?;
    let what = format!("{at}.keys_file");
    let Some(text) = load_secret(a.keys_file.as_deref(), a.keys_env.as_deref(), &what, secrets)? else {
        return Err(invalid(&what, "affinity needs its keys (keys_file or keys_env): there is no default key"));
    };
    let keys: Vec<Secret> = match secrets {
        Secrets::Unread => vec![Secret::new(vec![0; 32])],
        Secrets::Read => {
            let text = String::from_utf8_lossy(text.expose()).into_owned();
            let mut keys = Vec::new();
            for (n, line) in
                text.lines().map(str::trim).enumerate().filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
            {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(line)
                    .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(line))
                    .map_err(|_| invalid(&what, &format!("line {}: not base64", n + 1)))?;
                if bytes.len() != 32 {
                    return Err(invalid(
                        &what,
                        &format!("line {}: a key is 32 bytes (base64 of 32 random bytes)", n + 1),
                    ));
                }
                keys.push(Secret::new(bytes));
            }
            if keys.is_empty() {
                return Err(invalid(&what, "holds no key"));
            }
            keys
        }
    };
    let ttl = a.ttl.map_or(std::time::Duration::from_secs(24 * 3600), |d| d.0);
    if ttl.is_zero() {
        return Err(invalid(&format!("{at}.ttl"), "must be more than 0s"));
    }
    Ok(super::AffinitySettings { header, keys, ttl })
}

fn fleet(f: super::raw::RawFleet, secrets: Secrets) -> Result<super::FleetSettings, Invalid> {
    use super::raw::{RawStaleness, RawStore, RawSubjectCaps};
    let store = match f.store.unwrap_or(RawStore::Local) {
        RawStore::Local => {
            if f.redis_url.is_some() || f.redis_url_env.is_some() || f.key_prefix.is_some() || f.redis_ca_file.is_some()
            {
                return Err(invalid(
                    "fleet.store",
                    "is \"local\": redis_url, redis_url_env, redis_ca_file and key_prefix are for store = \"redis\"",
                ));
            }
            let state_dir = f.state_dir.unwrap_or_else(|| defaults::STATE_DIR.into());
            if state_dir.as_os_str().is_empty() {
                return Err(invalid("fleet.state_dir", "must not be empty"));
            }
            super::StoreKind::Local { state_dir }
        }
        RawStore::Redis => {
            if f.state_dir.is_some() {
                return Err(invalid(
                    "fleet.state_dir",
                    "is for store = \"local\"; a redis fleet keeps its state in Redis",
                ));
            }
            let url = match (f.redis_url, f.redis_url_env) {
                (Some(_), Some(_)) => {
                    return Err(invalid("fleet.redis_url", "set redis_url or redis_url_env, not both"))
                }
                (Some(u), None) => u,
                (None, Some(var)) => match secrets {
                    Secrets::Unread => format!("redis://unread-{var}"),
                    Secrets::Read => std::env::var(&var)
                        .map_err(|_| invalid("fleet.redis_url_env", &format!("the variable {var} is not set")))?,
                },
                (None, None) => {
                    return Err(invalid("fleet.redis_url", "store = \"redis\" needs redis_url or redis_url_env"))
                }
            };
            let schemes = [
                "redis://",
                "rediss://",
                "redis-cluster://",
                "rediss-cluster://",
                "redis-sentinel://",
                "rediss-sentinel://",
            ];
            if !schemes.iter().any(|s| url.starts_with(s)) {
                return Err(invalid(
                    "fleet.redis_url",
                    "must be a redis://, rediss:// (TLS), redis-cluster://, rediss-cluster://, redis-sentinel:// or rediss-sentinel:// URL",
                ));
            }
            let tls = url.starts_with("rediss");
            let ca_file = f.redis_ca_file;
            if let Some(ca) = &ca_file {
                if !tls {
                    return Err(invalid("fleet.redis_ca_file", "is for a TLS URL (rediss://)"));
                }
                if secrets == Secrets::Read && std::fs::metadata(ca).is_err() {
                    return Err(invalid("fleet.redis_ca_file", &format!("cannot read {}", ca.display())));
                }
            }
            let key_prefix = f.key_prefix.unwrap_or_else(|| "portcullis".to_owned());
            if key_prefix.is_empty() || !key_prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)) {
                return Err(invalid("fleet.key_prefix", "must be 1 or more characters of [A-Za-z0-9-_.:]"));
            }
            super::StoreKind::Redis { url, key_prefix, ca_file }
        }
    };
    let instance = match f.instance {
        Some(i) if i.is_empty() || i.len() > 128 || i.chars().any(char::is_control) => {
            return Err(invalid("fleet.instance", "must be 1-128 printable characters"))
        }
        Some(i) => i,
        None => default_instance(),
    };
    let redis = matches!(store, super::StoreKind::Redis { .. });
    let peer = match f.peer_listen {
        None if f.peer_advertise.is_some()
            || f.peer_advertise_env.is_some()
            || f.peer_secret_file.is_some()
            || f.peer_secret_env.is_some() =>
        {
            return Err(invalid("fleet.peer_listen", "the peer_* keys need peer_listen"))
        }
        None => None,
        Some(_) if !redis => {
            return Err(invalid("fleet.peer_listen", "is for store = \"redis\": instances find each other through it"))
        }
        Some(listen) => {
            let secret = load_secret(
                f.peer_secret_file.as_deref(),
                f.peer_secret_env.as_deref(),
                "fleet.peer_secret_file",
                secrets,
            )?
            .ok_or_else(|| {
                invalid(
                    "fleet.peer_secret_file",
                    "peer_listen needs the fleet's secret: peer_secret_file or peer_secret_env",
                )
            })?;
            if secrets == Secrets::Read && secret.expose().len() < 32 {
                return Err(invalid("fleet.peer_secret_file", "the fleet's secret must be at least 32 bytes"));
            }
            let advertise = match (f.peer_advertise, f.peer_advertise_env) {
                (Some(_), Some(_)) => return Err(invalid("fleet.peer_advertise", "set peer_advertise or peer_advertise_env, not both")),
                (Some(a), None) => Some(a),
                (None, Some(var)) => match secrets {
                    Secrets::Unread => Some(format!("unread-{var}:{}", listen.port())),
                    Secrets::Read => {
                        let host = std::env::var(&var)
                            .map_err(|_| invalid("fleet.peer_advertise_env", &format!("the variable {var} is not set")))?;
                        Some(advertised(&host, listen.port()))
                    }
                },
                (None, None) if listen.ip().is_unspecified() => {
                    return Err(invalid("fleet.peer_advertise", "peer_listen is a wildcard address: say which address other instances dial (peer_advertise, or peer_advertise_env = \"POD_IP\")"))
                }
                (None, None) => None,
            };
            Some(super::PeerSettings { listen, advertise, secret })
        }
    };
    let max_staleness = f.max_staleness.map_or(defaults::MAX_STALENESS, |d| d.0);
    if max_staleness.is_zero() {
        return Err(invalid("fleet.max_staleness", "must be more than 0s"));
    }
    let subject_caps = match f.subject_caps.unwrap_or(RawSubjectCaps::Mirror) {
        RawSubjectCaps::Mirror => super::SubjectCaps::Mirror,
        RawSubjectCaps::Reserved if !redis => {
            return Err(invalid(
                "fleet.subject_caps",
                "\"reserved\" is for store = \"redis\": one instance counts exactly on its own",
            ))
        }
        RawSubjectCaps::Reserved => super::SubjectCaps::Reserved,
    };
    Ok(super::FleetSettings {
        store,
        instance,
        staleness: match f.staleness.unwrap_or(RawStaleness::BestEffort) {
            RawStaleness::BestEffort => super::Staleness::BestEffort,
            RawStaleness::Strict => super::Staleness::Strict,
        },
        max_staleness,
        subject_caps,
        peer,
    })
}

/// The host name and the process id: unique among the instances of one fleet without setup
/// (a Kubernetes pod's host name is its name).
fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "portcullis".to_owned());
    format!("{host}-{}", std::process::id())
}

fn recording(r: super::raw::RawRecording, key: &str) -> Result<std::sync::Arc<super::RecordingSettings>, Invalid> {
    let queue = r.queue.map_or(1024 * 1024, |v| v.0 as usize);
    if queue < 4096 {
        return Err(invalid(&format!("{key}.recording.queue"), "must be at least 4KiB"));
    }
    if r.directory.as_os_str().is_empty() {
        return Err(invalid(&format!("{key}.recording.directory"), "must not be empty"));
    }
    let max_total_size = r.max_total_size.map_or(10 << 30, |v| v.0);
    if max_total_size < 4096 {
        return Err(invalid(&format!("{key}.recording.max_total_size"), "must be at least 4KiB"));
    }
    let max_file_size = r.max_file_size.map_or(256 << 20, |v| v.0).min(max_total_size);
    if max_file_size < 4096 {
        return Err(invalid(&format!("{key}.recording.max_file_size"), "must be at least 4KiB"));
    }
    let sweep_interval = interval(
        &format!("{key}.recording.sweep_interval"),
        dur(r.sweep_interval, Duration::from_secs(60)),
        Zero::Refused,
    )?;
    Ok(std::sync::Arc::new(super::RecordingSettings {
        directory: r.directory,
        input: r.input.unwrap_or(false),
        on_backlog: match r.on_backlog {
            None | Some(super::raw::RawBacklog::Slow) => super::Backlog::Slow,
            Some(super::raw::RawBacklog::Close) => super::Backlog::Close,
        },
        queue,
        max_age: dur(r.max_age, Duration::from_secs(30 * 24 * 3600)),
        max_total_size,
        max_file_size,
        when_full: match r.when_full {
            None | Some(super::raw::RawWhenFull::Refuse) => super::WhenFull::Refuse,
            Some(super::raw::RawWhenFull::EvictOldest) => super::WhenFull::EvictOldest,
        },
        sweep_interval,
        on_limit: match r.on_limit {
            None | Some(super::raw::RawOnLimit::Close) => super::Backlog::Close,
            Some(super::raw::RawOnLimit::Continue) => super::Backlog::Slow,
        },
        width: r.width.unwrap_or(80).max(1),
        height: r.height.unwrap_or(24).max(1),
    }))
}

/// The largest flow-control window HTTP/2 allows (RFC 9113 §6.9.1).
const MAX_WINDOW: u64 = (1 << 31) - 1;

/// The address other instances dial for `host`, the value of `peer_advertise_env`: an address
/// or name alone takes the listener's `port` (an IPv6 address in brackets), one with a port
/// (`10.0.0.7:9444`, `[fd00::7]:9444`, `peer-0.example:9444`) is kept as it is.
pub(super) fn advertised(host: &str, port: u16) -> String {
    if let Ok(v6) = host.parse::<std::net::Ipv6Addr>() {
        return format!("[{v6}]:{port}");
    }
    let bracketed = host.starts_with('[') && host.ends_with(']');
    if bracketed || !host.contains(':') {
        return format!("{host}:{port}");
    }
    host.to_owned()
}

fn http2(h: RawHttp2) -> Result<Http2Settings, Invalid> {
    let d = Http2Settings::default();
    let streams = h.max_concurrent_streams.unwrap_or(d.max_concurrent_streams);
    if streams == 0 {
        return Err(invalid("http2.max_concurrent_streams", "must be at least 1"));
    }
    let stream_window = h.initial_stream_window.map_or(d.initial_stream_window as u64, |v| v.0);
    if !(1024..=MAX_WINDOW).contains(&stream_window) {
        return Err(invalid("http2.initial_stream_window", "must be 1KiB to 2GiB-1"));
    }
    let connection_window =
        h.initial_connection_window.map_or_else(|| (stream_window * streams as u64).min(MAX_WINDOW), |v| v.0);
    if !(stream_window..=MAX_WINDOW).contains(&connection_window) {
        return Err(invalid(
            "http2.initial_connection_window",
            "must be at least initial_stream_window and at most 2GiB-1",
        ));
    }
    if h.idle_timeout.is_some_and(|d| d.0.is_zero()) {
        return Err(invalid("http2.idle_timeout", "must be more than 0s"));
    }
    // A ping answered within no time at all would end every connection it is sent on.
    if h.keepalive_timeout.is_some_and(|d| d.0.is_zero()) {
        return Err(invalid(
            "http2.keepalive_timeout",
            "must be more than 0s (keepalive_interval = \"0s\" turns the pings off)",
        ));
    }
    let frame = h.max_frame_size.map_or(d.max_frame_size as u64, |v| v.0);
    if !(16_384..=16_777_215).contains(&frame) {
        return Err(invalid("http2.max_frame_size", "must be 16KiB to 16MiB-1 (RFC 9113 §6.5.2)"));
    }
    Ok(Http2Settings {
        enabled: h.enabled.unwrap_or(d.enabled),
        max_concurrent_streams: streams,
        initial_stream_window: stream_window as u32,
        initial_connection_window: connection_window as u32,
        max_frame_size: frame as u32,
        max_streams_per_ip: h.max_streams_per_ip.unwrap_or(d.max_streams_per_ip),
        keepalive_interval: interval(
            "http2.keepalive_interval",
            dur(h.keepalive_interval, d.keepalive_interval),
            Zero::Off,
        )?,
        keepalive_timeout: dur(h.keepalive_timeout, d.keepalive_timeout),
        idle_timeout: dur(h.idle_timeout, d.idle_timeout),
    })
}

fn server(s: RawServer) -> Result<ServerSettings, Invalid> {
    let d = ServerSettings::default();
    let server = ServerSettings {
        max_connections: s.max_connections.unwrap_or(d.max_connections),
        tls_handshake_timeout: dur(s.tls_handshake_timeout, d.tls_handshake_timeout),
        header_read_timeout: dur(s.header_read_timeout, d.header_read_timeout),
        send_timeout: dur(s.send_timeout, d.send_timeout),
        runtime_dir: s.runtime_dir,
        max_header_size: s.max_header_size.map_or(d.max_header_size, |v| v.0 as usize),
        drain_spread: dur(s.drain_spread, d.drain_spread),
        drain_timeout: dur(s.drain_timeout, d.drain_timeout),
        removed_route_grace: dur(s.removed_route_grace, d.removed_route_grace),
        reload_poll_interval: dur(s.reload_poll_interval, d.reload_poll_interval),
        worker_threads: s.worker_threads.unwrap_or(d.worker_threads),
        worker_model: match s.worker_model {
            None => d.worker_model,
            Some(super::raw::RawWorkerModel::WorkStealing) => super::WorkerModel::WorkStealing,
            Some(super::raw::RawWorkerModel::ThreadPerCore) => super::WorkerModel::ThreadPerCore,
        },
        trusted_proxies: s.trusted_proxies.unwrap_or(d.trusted_proxies),
        max_connections_per_ip: s.max_connections_per_ip.unwrap_or(d.max_connections_per_ip),
        ipv6_prefix_len: s.ipv6_prefix_len.unwrap_or(d.ipv6_prefix_len),
        handshake_rate_per_ip: s.handshake_rate_per_ip.unwrap_or(d.handshake_rate_per_ip),
        handshake_burst_per_ip: s.handshake_burst_per_ip.unwrap_or(d.handshake_burst_per_ip),
        connection_rate_per_ip: s.connection_rate_per_ip.unwrap_or(d.connection_rate_per_ip),
        connection_burst_per_ip: s.connection_burst_per_ip.unwrap_or(d.connection_burst_per_ip),
        token_check_rate_per_ip: s.token_check_rate_per_ip.unwrap_or(d.token_check_rate_per_ip),
        token_check_burst_per_ip: s.token_check_burst_per_ip.unwrap_or(d.token_check_burst_per_ip),
    };
    if server.token_check_burst_per_ip == 0 {
        return Err(invalid("server.token_check_burst_per_ip", "must be at least 1"));
    }
    if server.connection_burst_per_ip == 0 {
        return Err(invalid("server.connection_burst_per_ip", "must be at least 1"));
    }
    if server.handshake_burst_per_ip == 0 {
        return Err(invalid("server.handshake_burst_per_ip", "must be at least 1"));
    }
    if server.worker_threads > 1024 {
        return Err(invalid("server.worker_threads", "must be 0-1024"));
    }
    if server.ipv6_prefix_len > 128 {
        return Err(invalid("server.ipv6_prefix_len", "must be 0-128"));
    }
    if server.max_connections == 0 {
        return Err(invalid("server.max_connections", "must be at least 1"));
    }
    // No time at all, or next to none, would refuse every connection: a deadline cannot be
    // turned off here.
    deadline("server.tls_handshake_timeout", server.tls_handshake_timeout)?;
    deadline("server.header_read_timeout", server.header_read_timeout)?;
    interval("server.reload_poll_interval", server.reload_poll_interval, Zero::Off)?;
    if server.max_header_size < 1024 {
        return Err(invalid("server.max_header_size", "must be at least 1KiB"));
    }
    Ok(server)
}

fn listeners(raw: Vec<RawListener>, has_tls: bool) -> Result<Vec<ListenerConfig>, Invalid> {
    if raw.is_empty() {
        return Err(invalid("listeners", "at least one listener is required"));
    }
    let mut listeners = Vec::with_capacity(raw.len());
    for (i, l) in raw.into_iter().enumerate() {
        if l.addresses.is_empty() {
            return Err(invalid(&format!("listeners[{i}].addresses"), "must not be empty"));
        }
        if l.tls && !has_tls {
            return Err(invalid(
                &format!("listeners[{i}].tls"),
                "a TLS listener needs a [tls] section with cert and key",
            ));
        }
        let proxy_protocol = match (l.proxy_protocol, l.proxy_protocol_from.is_empty()) {
            (true, true) => {
                return Err(invalid(
                    &format!("listeners[{i}].proxy_protocol_from"),
                    "proxy_protocol = true needs the load balancers' addresses (CIDRs) it is accepted from",
                ))
            }
            (false, false) => {
                return Err(invalid(
                    &format!("listeners[{i}].proxy_protocol_from"),
                    "is only used with proxy_protocol = true",
                ))
            }
            (true, false) => Some(l.proxy_protocol_from),
            (false, true) => None,
        };
        let name = l.name.unwrap_or_else(|| format!("listener-{i}"));
        // A label: it names the listener's sockets in a handover, one per line.
        if name.is_empty() || name.len() > 64 || !name.bytes().all(is_label_byte) {
            return Err(invalid(&format!("listeners[{i}].name"), "must be 1-64 characters of [A-Za-z0-9_-]"));
        }
        listeners.push(ListenerConfig {
            name,
            addresses: l.addresses,
            tls: l.tls,
            proxy_protocol,
            reuse_port: l.reuse_port,
        });
    }
    Ok(listeners)
}

/// A configured host in the form a request's host is matched in (`proxy::host`): lowercased,
/// one trailing dot dropped, an IPv6 literal without brackets; `wildcard` admits `*.` before a
/// name. `None` when it can name no host.
fn host_name(h: &str, wildcard: bool) -> Option<String> {
    let lower = h.to_ascii_lowercase();
    let bare = lower.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        return Some(ip.to_string());
    }
    let (star, name) = match lower.strip_prefix("*.") {
        Some(rest) if wildcard => ("*.", rest),
        _ => ("", lower.as_str()),
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    super::dns_name(name.as_bytes()).then(|| format!("{star}{name}"))
}

fn route(
    r: RawRoute,
    key: &str,
    session_defaults: SessionSettings,
    backend_defaults: BackendSettings,
    has_keys: bool,
    secrets: Secrets,
) -> Result<RouteConfig, Invalid> {
    if r.name.is_empty() || r.name.len() > 64 || !r.name.bytes().all(is_label_byte) {
        return Err(invalid(&format!("{key}.name"), "must be 1-64 characters of [A-Za-z0-9_-]"));
    }
    // In the form requests' hosts are matched in (`proxy::host`), or the route never matches.
    let host = match r.host.as_deref() {
        None => None,
        Some(h) => Some(host_name(h, true).ok_or_else(|| {
            invalid(&format!("{key}.host"), "must be a host name (labels of letters, digits, '-' and '_'), '*.' and one, or an IP address, without port")
        })?),
    };
    match (r.backends.is_empty(), r.registry.is_none()) {
        (true, true) => return Err(invalid(&format!("{key}.backends"), "give backends or a [routes.registry]")),
        (false, false) => {
            return Err(invalid(&format!("{key}.backends"), "give backends or a [routes.registry], not both"));
        }
        _ => {}
    }
    let backends: Vec<StaticMember> = r
        .backends
        .into_iter()
        .map(|m| match m {
            RawMember::Addr(template) => StaticMember { template, weight: defaults::MEMBER_WEIGHT },
            RawMember::Weighted(w) => StaticMember { template: w.addr, weight: w.weight },
        })
        .collect();
    for b in backends.iter().map(|m| &m.template) {
        if let Some(c) = b.captures().find(|c| !r.path.has_capture(c)) {
            return Err(invalid(&format!("{key}.backends"), &format!("uses {{{c}}}, which the path does not capture")));
        }
        if let Some(c) = b.captures().find(|c| r.path.is_rest(c)) {
            return Err(invalid(
                &format!("{key}.backends"),
                &format!("uses the catch-all {{{c}}} in a member address"),
            ));
        }
        if b.host_is_only_captures() {
            return Err(invalid(
                &format!("{key}.backends"),
                &format!(
                    "{b}: a member host made only of captures lets a token's agent name any host the proxy can resolve \
                     (an address, localhost, a cluster service): give it a literal part, as \"{{agent}}.agents.internal:7681\""
                ),
            ));
        }
    }
    let registry = r.registry.map(|g| registry(g, key, &r.path, secrets)).transpose()?;
    let balance = balance(r.balance, key, &r.path)?;
    let health = health(r.health, key)?;
    if let Some(p) = &r.backend_path {
        if !p.starts_with('/') {
            return Err(invalid(&format!("{key}.backend_path"), "must start with '/'"));
        }
    }
    let auth = r.auth.map(|a| route_auth(a, key, &r.path)).transpose()?;
    if auth.is_some() && !has_keys {
        return Err(invalid(&format!("{key}.auth"), "requires tokens but [auth] has no keys or jwks"));
    }
    let http_only = matches!(r.kind, Some(RawKind::Http | RawKind::Mcp));
    if r.recording.is_some() && http_only {
        return Err(invalid(&format!("{key}.recording"), "records WebSocket sessions; this route serves HTTP only"));
    }
    let recording = r.recording.map(|rec| recording(rec, key)).transpose()?;
    let observe = match r.observe {
        None => None,
        Some(_) if http_only => {
            return Err(invalid(&format!("{key}.observe"), "watches WebSocket sessions; this route serves HTTP only"))
        }
        Some(o) if o.scope.trim().is_empty() => {
            return Err(invalid(&format!("{key}.observe.scope"), "must name the scope observers need"))
        }
        Some(_) if auth.is_none() => {
            return Err(invalid(&format!("{key}.observe"), "needs [routes.auth]: observers are authorized by token"))
        }
        Some(o) if o.max_observers_per_subject == Some(0) => {
            return Err(invalid(&format!("{key}.observe.max_observers_per_subject"), "must be at least 1"))
        }
        Some(o) => Some(std::sync::Arc::new(super::ObserveSettings {
            scope: o.scope,
            replay: o.replay.map_or(16 * 1024, |v| v.0 as usize),
            queue: queue(o.queue, &format!("{key}.observe.queue"))?,
            max_observers: o.max_observers.unwrap_or(8),
            max_observers_per_subject: o.max_observers_per_subject.unwrap_or(2),
            drop_grace: o.drop_grace.map_or(super::DROP_GRACE, |d| d.0),
        })),
    };
    let resume = match r.resume {
        None => None,
        Some(_) if auth.is_none() => {
            return Err(invalid(
                &format!("{key}.resume"),
                "needs [routes.auth]: a resume id is bound to the token's subject",
            ))
        }
        Some(_) if http_only => {
            return Err(invalid(&format!("{key}.resume"), "resumes WebSocket sessions; this route serves HTTP only"))
        }
        Some(_) if !auth.as_ref().is_some_and(|a| a.required_claims.iter().any(|c| c == "sub")) => {
            return Err(invalid(
                &format!("{key}.resume"),
                "needs required_claims = [\"sub\"] in [routes.auth]: a held session is resumed only by a token of \
                 the same issuer and subject, so tokens without one cannot use the route",
            ))
        }
        Some(rs) => {
            let param = rs.param.unwrap_or_else(|| "resume".to_owned());
            if param.is_empty() || param.len() > 64 || !param.bytes().all(is_label_byte) {
                return Err(invalid(&format!("{key}.resume.param"), "must be 1-64 characters of [A-Za-z0-9_-]"));
            }
            let window = rs.window.map_or(std::time::Duration::from_secs(30), |d| d.0);
            if window.is_zero() {
                return Err(invalid(&format!("{key}.resume.window"), "must be more than 0s"));
            }
            let buffer = rs.buffer.map_or(256 * 1024, |v| v.0 as usize);
            if buffer < 4096 {
                return Err(invalid(&format!("{key}.resume.buffer"), "must be at least 4KiB"));
            }
            if rs.notice.as_ref().is_some_and(|n| n.len() > 1024) {
                return Err(invalid(&format!("{key}.resume.notice"), "must be at most 1024 bytes"));
            }
            let announce = rs.announce.unwrap_or(true);
            Some(std::sync::Arc::new(super::ResumeSettings { window, buffer, param, notice: rs.notice, announce }))
        }
    };
    let fanout = match r.fanout {
        None => None,
        Some(_) if recording.is_some() || observe.is_some() || resume.is_some() => {
            return Err(invalid(
                &format!("{key}.fanout"),
                "shares one backend stream; it cannot be combined with recording, observe or resume",
            ))
        }
        Some(_) if http_only => {
            return Err(invalid(&format!("{key}.fanout"), "shares WebSockets; this route serves HTTP only"))
        }
        Some(f) => Some(std::sync::Arc::new(super::FanoutSettings {
            forward_client_data: matches!(f.client_data, Some(super::raw::RawClientData::Forward)),
            linger: f.linger.map_or(std::time::Duration::from_secs(5), |d| d.0),
            queue: queue(f.queue, &format!("{key}.fanout.queue"))?,
            drop_grace: f.drop_grace.map_or(super::DROP_GRACE, |d| d.0),
        })),
    };
    let cors = r.cors.map(|c| cors(c, key)).transpose()?;
    let affinity = match r.affinity {
        None => None,
        Some(_) if matches!(r.kind, None | Some(RawKind::Websocket)) => {
            return Err(invalid(
                &format!("{key}.affinity"),
                "routes plain HTTP requests: set kind = \"http\", \"both\" or \"mcp\"",
            ))
        }
        Some(_) if auth.as_ref().is_some_and(|a| !a.required_claims.iter().any(|c| c == "sub")) => {
            return Err(invalid(
                &format!("{key}.affinity"),
                "needs required_claims = [\"sub\"] in [routes.auth]: a session is bound to its token's issuer and \
                 subject, so tokens without one would share each other's sessions",
            ))
        }
        Some(a) => Some(std::sync::Arc::new(affinity(a, key, secrets)?)),
    };
    let resource = match r.resource {
        None => None,
        Some(_) if auth.is_none() => {
            return Err(invalid(
                &format!("{key}.resource"),
                "a protected resource needs [routes.auth] (tokens are checked)",
            ))
        }
        Some(res) => {
            let probe = res.id.replace(['{', '}'], "");
            let uri: Option<http::Uri> = probe.parse().ok();
            let ok = uri
                .as_ref()
                .is_some_and(|u| u.scheme_str() == Some("https") && u.authority().is_some() && u.query().is_none());
            if !ok {
                return Err(invalid(
                    &format!("{key}.resource.id"),
                    "must be an absolute https:// URL without a query (RFC 9728)",
                ));
            }
            if res.authorization_servers.is_empty() {
                return Err(invalid(
                    &format!("{key}.resource.authorization_servers"),
                    "must list at least one issuer URL",
                ));
            }
            for (i, s) in res.authorization_servers.iter().enumerate() {
                if !s.starts_with("https://") {
                    return Err(invalid(
                        &format!("{key}.resource.authorization_servers[{i}]"),
                        "must be an https:// issuer URL",
                    ));
                }
            }
            Some(std::sync::Arc::new(super::ResourceSettings {
                id: res.id,
                authorization_servers: res.authorization_servers,
                scopes_supported: res.scopes_supported,
            }))
        }
    };
    // A cookie rides along on any site's request: only an origin policy tells the route's
    // own pages from another site's (CSRF, cross-site WebSocket hijacking).
    let cookie = auth.as_ref().is_some_and(|a| a.sources.iter().any(|s| matches!(s, TokenSource::Cookie(_))));
    if cookie && r.origin.is_none() {
        return Err(invalid(
            key,
            "this route takes its token from a cookie, which the browser sends on any site's requests: add [routes.origin] \
             with allow = [\"https://your.app.example\"] (the origins of your own pages; requests with any other \
             Origin are refused, and clients that send none, like curl, still work)",
        ));
    }
    let backend = backend(r.backend, backend_defaults, &format!("{key}.backend"))?;
    let mcp = match (r.kind, r.mcp) {
        (Some(RawKind::Mcp), m) => {
            Some(std::sync::Arc::new(mcp(m.unwrap_or_default(), key, &backend, auth.is_some(), &r.path)?))
        }
        (_, None) => None,
        (_, Some(_)) => return Err(invalid(&format!("{key}.mcp"), "is for kind = \"mcp\" routes")),
    };
    // An `{agent}` origin is the origin of the agent the request names: the route must name one.
    let per_agent = |o: &[super::OriginPattern]| o.iter().any(super::OriginPattern::per_agent);
    if !r.path.has_capture("agent") {
        if r.origin.as_ref().is_some_and(|o| per_agent(&o.allow)) {
            return Err(invalid(&format!("{key}.origin.allow"), "an {agent} origin needs a path with {agent}"));
        }
        if cors.as_ref().is_some_and(|c| per_agent(&c.allow_origins)) {
            return Err(invalid(&format!("{key}.cors.allow_origins"), "an {agent} origin needs a path with {agent}"));
        }
    }
    // An MCP route checks Origin by default (the specification's DNS-rebinding rule): a request
    // that carries one is refused unless [routes.origin] lists it; clients that send none
    // (every non-browser MCP client) are served.
    let origin_policy = match (r.origin, &mcp) {
        (Some(o), _) => Some(origin(o)),
        (None, Some(_)) => Some(super::OriginPolicy { allow: Vec::new(), allow_missing: true }),
        (None, None) => None,
    };
    Ok(RouteConfig {
        auth,
        origin: origin_policy,
        mcp,
        cors,
        sandbox: r.sandbox.unwrap_or(false),
        recording,
        observe,
        resume,
        fanout,
        affinity,
        resource,
        name: r.name,
        host,
        path: r.path,
        kind: match r.kind {
            None | Some(RawKind::Websocket) => RouteKind::WebSocket,
            Some(RawKind::Http) => RouteKind::Http,
            Some(RawKind::Both) => RouteKind::Both,
            Some(RawKind::Mcp) => RouteKind::Mcp,
        },
        backends,
        registry,
        balance,
        health,
        backend_path: r.backend_path,
        headers_with_underscores: match r.headers_with_underscores {
            None | Some(RawUnderscores::Drop) => UnderscoreHeaders::Drop,
            Some(RawUnderscores::Reject) => UnderscoreHeaders::Reject,
            Some(RawUnderscores::Allow) => UnderscoreHeaders::Allow,
        },
        session: std::sync::Arc::new(session(r.session, session_defaults, &format!("{key}.session"))?),
        backend,
    })
}

fn mcp(
    m: super::raw::RawMcp,
    key: &str,
    backend: &BackendSettings,
    has_auth: bool,
    path: &PathPattern,
) -> Result<super::McpSettings, Invalid> {
    let at = format!("{key}.mcp");
    let protocol_versions = match m.protocol_versions {
        None => super::MCP_REVISIONS.iter().map(|v| (*v).to_owned()).collect(),
        Some(v) if v.is_empty() => {
            return Err(invalid(&format!("{at}.protocol_versions"), "must list at least one revision"))
        }
        Some(v) => {
            for (i, rev) in v.iter().enumerate() {
                if !super::MCP_REVISIONS.contains(&rev.as_str()) {
                    return Err(invalid(
                        &format!("{at}.protocol_versions[{i}]"),
                        &format!(
                            "{rev:?} is not an MCP revision this proxy knows ({})",
                            super::MCP_REVISIONS.join(", ")
                        ),
                    ));
                }
            }
            v
        }
    };
    let read_timeout = m.read_timeout.map_or(std::time::Duration::from_secs(30), |d| d.0);
    if read_timeout.is_zero() {
        return Err(invalid(&format!("{at}.read_timeout"), "must be more than 0s"));
    }
    let max_message = m.max_message.map_or(1 << 20, |s| s.0);
    if max_message == 0 || max_message > backend.max_request_body {
        return Err(invalid(
            &format!("{at}.max_message"),
            &format!("must be more than 0 and at most backend.max_request_body ({})", backend.max_request_body),
        ));
    }
    for (name, template, placeholder) in
        [("method_scope", &m.method_scope, "{method}"), ("tool_scope", &m.tool_scope, "{tool}")]
    {
        if let Some(t) = template {
            if !has_auth {
                return Err(invalid(&format!("{at}.{name}"), "needs [routes.auth]: scopes are read from the token"));
            }
            if !t.contains(placeholder) || t.contains(char::is_whitespace) {
                return Err(invalid(
                    &format!("{at}.{name}"),
                    &format!("must be one scope (no spaces) holding {placeholder}, e.g. \"mcp:{placeholder}\""),
                ));
            }
            let own = &placeholder[1..placeholder.len() - 1];
            if let Some(c) = template_captures(t).into_iter().find(|c| c != own && !path.has_capture(c)) {
                return Err(invalid(
                    &format!("{at}.{name}"),
                    &format!("uses {{{c}}}, which the path does not capture"),
                ));
            }
        }
    }
    if m.metric_tools.len() > 256 {
        return Err(invalid(&format!("{at}.metric_tools"), "lists at most 256 tools (each is a metric label)"));
    }
    Ok(super::McpSettings {
        protocol_versions,
        max_message,
        read_timeout,
        method_scope: m.method_scope,
        tool_scope: m.tool_scope,
        metric_tools: m.metric_tools,
    })
}

/// Refuses credentials in an outbound URL's authority (`user:password@`): they would be
/// written wherever the URL is (logs, errors, `/routes`), and no request sends them.
fn no_credentials(url: &http::Uri, key: &str, instead: &str) -> Result<(), Invalid> {
    match url.authority().is_some_and(|a| a.as_str().contains('@')) {
        true => {
            Err(invalid(key, &format!("must not carry credentials (user:password@): they would be logged; {instead}")))
        }
        false => Ok(()),
    }
}

fn registry(g: RawRegistry, route_key: &str, path: &PathPattern, secrets: Secrets) -> Result<RegistryConfig, Invalid> {
    let key = format!("{route_key}.registry");
    let url: http::Uri =
        g.url.replace(['{', '}'], "").parse().map_err(|_| invalid(&format!("{key}.url"), "not a valid URL"))?;
    if url.scheme_str() != Some("http") && url.scheme_str() != Some("https") {
        return Err(invalid(&format!("{key}.url"), "must be an http:// or https:// URL"));
    }
    no_credentials(&url, &format!("{key}.url"), "give the registry's token with token_file or token_env")?;
    if let Some(c) = template_captures(&g.url).into_iter().find(|c| !path.has_capture(c)) {
        return Err(invalid(&format!("{key}.url"), &format!("uses {{{c}}}, which the path does not capture")));
    }
    if let Some(c) = template_captures(&g.url).into_iter().find(|c| path.is_rest(c)) {
        return Err(invalid(
            &format!("{key}.url"),
            &format!("uses the catch-all {{{c}}}: a lookup is per agent, not per path under it"),
        ));
    }
    if super::pattern::url_host_is_only_captures(&g.url) {
        return Err(invalid(
            &format!("{key}.url"),
            "a registry host made only of captures lets a token's agent name any host the proxy can reach, which \
             would be sent the registry's token and trusted for the members: give it a literal part, as \
             \"http://{agent}.registries.internal/members\"",
        ));
    }
    Ok(RegistryConfig {
        token: load_secret(g.token_file.as_deref(), g.token_env.as_deref(), &key, secrets)?,
        url: g.url,
        timeout: deadline(&format!("{key}.timeout"), dur(g.timeout, defaults::REGISTRY_TIMEOUT))?,
        ttl: dur(g.ttl, defaults::REGISTRY_TTL),
        negative_ttl: dur(g.negative_ttl, defaults::REGISTRY_NEGATIVE_TTL),
        stale_ttl: dur(g.stale_ttl, defaults::REGISTRY_STALE_TTL),
        max_capacity: match g.max_capacity.unwrap_or(defaults::REGISTRY_MAX_CAPACITY) {
            // The gate and the reachable marks are caches of this size too: none at all would
            // send a connect per lookup to a host that drops them.
            0 => return Err(invalid(&format!("{key}.max_capacity"), "must be at least 1")),
            n => n,
        },
    })
}

fn balance(b: RawBalance, key: &str, path: &PathPattern) -> Result<Balance, Invalid> {
    let d = Balance::default();
    let balance = Balance {
        policy: b.policy.unwrap_or(d.policy),
        sticky_key: b.sticky_key,
        max_attempts: b.max_attempts.unwrap_or(d.max_attempts),
    };
    if balance.policy == Policy::Sticky && balance.sticky_key.is_none() {
        return Err(invalid(&format!("{key}.balance.sticky_key"), "the sticky policy needs a sticky_key"));
    }
    if let Some(StickyKey::Capture(c)) = &balance.sticky_key {
        if !path.has_capture(c) {
            return Err(invalid(&format!("{key}.balance.sticky_key"), "names a capture the path does not have"));
        }
    }
    Ok(balance)
}

fn health(h: RawHealth, key: &str) -> Result<HealthSettings, Invalid> {
    let d = HealthSettings::default();
    let eject_base = dur(h.eject_base, d.eject_base);
    let health = HealthSettings {
        eject_base,
        eject_max: dur(h.eject_max, d.eject_max).max(eject_base),
        fail_open: h.fail_open.unwrap_or(d.fail_open),
        active_interval: interval(
            &format!("{key}.health.active_interval"),
            dur(h.active_interval, d.active_interval),
            Zero::Off,
        )?,
        active_path: h.active_path,
    };
    if health.active_path.as_deref().is_some_and(|p| !p.starts_with('/')) {
        return Err(invalid(&format!("{key}.health.active_path"), "must start with '/'"));
    }
    Ok(health)
}

fn route_auth(a: RawRouteAuth, key: &str, path: &PathPattern) -> Result<RouteAuth, Invalid> {
    if let Some(scope) = &a.agent_scope {
        if let Some(c) = template_captures(scope).into_iter().find(|c| !path.has_capture(c)) {
            return Err(invalid(
                &format!("{key}.auth.agent_scope"),
                &format!("uses {{{c}}}, which the path does not capture"),
            ));
        }
    }
    if (a.agent_claim.is_some() || a.agent_scope.is_some()) && !path.has_capture("agent") {
        return Err(invalid(&format!("{key}.auth"), "agent grants need an {agent} capture in the path"));
    }
    let sources = a.sources.unwrap_or_else(TokenSource::defaults);
    if sources.is_empty() {
        return Err(invalid(&format!("{key}.auth.sources"), "list at least one token source"));
    }
    let marker = a.subprotocol_marker.unwrap_or_else(|| defaults::SUBPROTOCOL_MARKER.to_owned());
    let token_char = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if marker.is_empty() || !marker.bytes().all(token_char) {
        return Err(invalid(&format!("{key}.auth.subprotocol_marker"), "must be an HTTP token (RFC 9110 tchar)"));
    }
    if sources.iter().any(|s| matches!(s, TokenSource::Subprotocol(p) if marker.starts_with(p.as_str()))) {
        return Err(invalid(
            &format!("{key}.auth.subprotocol_marker"),
            "must not start with a subprotocol token prefix",
        ));
    }
    Ok(RouteAuth {
        max_sessions_per_subject: a.max_sessions_per_subject.unwrap_or(0),
        sources,
        issuers: a.issuers,
        audiences: a.audiences,
        required_claims: a.required_claims,
        agent_claim: a.agent_claim,
        agent_scope: a.agent_scope,
        enforce_expiry: a.enforce_expiry.unwrap_or(defaults::ENFORCE_EXPIRY),
        forward_claims: a.forward_claims,
        forward_token: a.forward_token,
        subprotocol_marker: marker,
    })
}

fn cors(c: super::raw::RawCors, key: &str) -> Result<std::sync::Arc<super::CorsPolicy>, Invalid> {
    if c.allow_origins.is_empty() {
        return Err(invalid(&format!("{key}.cors.allow_origins"), "must name at least one origin"));
    }
    let methods = c.allow_methods.unwrap_or_else(|| vec!["GET".into(), "HEAD".into(), "POST".into()]);
    let mut allow_methods = Vec::with_capacity(methods.len());
    for m in methods {
        let method = http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
            .map_err(|_| invalid(&format!("{key}.cors.allow_methods"), &format!("{m:?} is not a method")))?;
        allow_methods.push(method);
    }
    let header_names = |names: Vec<String>, field: &str| -> Result<Vec<String>, Invalid> {
        names
            .into_iter()
            .map(|n| {
                http::HeaderName::from_bytes(n.as_bytes())
                    .map(|h| h.as_str().to_owned())
                    .map_err(|_| invalid(&format!("{key}.cors.{field}"), &format!("{n:?} is not a header name")))
            })
            .collect()
    };
    let allow_headers = header_names(
        c.allow_headers.unwrap_or_else(|| vec!["authorization".into(), "content-type".into()]),
        "allow_headers",
    )?;
    Ok(std::sync::Arc::new(super::CorsPolicy {
        allow_origins: c.allow_origins,
        allow_methods,
        allow_headers,
        expose_headers: header_names(c.expose_headers, "expose_headers")?,
        allow_credentials: c.allow_credentials.unwrap_or(false),
        max_age: dur(c.max_age, Duration::from_secs(600)),
    }))
}

fn origin(o: RawOrigin) -> OriginPolicy {
    OriginPolicy { allow: o.allow, allow_missing: o.allow_missing.unwrap_or(defaults::ORIGIN_ALLOW_MISSING) }
}

fn session(s: RawSession, d: SessionSettings, key: &str) -> Result<SessionSettings, Invalid> {
    let s = SessionSettings {
        ping_interval: dur(s.ping_interval, d.ping_interval),
        ping_timeout: dur(s.ping_timeout, d.ping_timeout),
        idle_timeout: dur(s.idle_timeout, d.idle_timeout),
        max_lifetime: dur(s.max_lifetime, d.max_lifetime),
        close_timeout: dur(s.close_timeout, d.close_timeout),
        max_frame_size: s.max_frame_size.map_or(d.max_frame_size, |v| v.0),
        max_message_size: s.max_message_size.map_or(d.max_message_size, |v| v.0),
        buffer_size: s.buffer_size.map_or(d.buffer_size, |v| v.0 as usize),
        client_rate: SessionRate {
            messages: s.client_message_rate.unwrap_or(d.client_rate.messages),
            bytes: s.client_byte_rate.map_or(d.client_rate.bytes, |v| v.0),
        },
        backend_rate: SessionRate {
            messages: s.backend_message_rate.unwrap_or(d.backend_rate.messages),
            bytes: s.backend_byte_rate.map_or(d.backend_rate.bytes, |v| v.0),
        },
        rate_burst: dur(s.rate_burst, d.rate_burst),
        rate_action: match s.rate_action {
            None => d.rate_action,
            Some(RawRateAction::Slow) => RateAction::Slow,
            Some(RawRateAction::Close) => RateAction::Close,
        },
    };
    if s.rate_burst.is_zero() && !(s.client_rate.is_off() && s.backend_rate.is_off()) {
        return Err(invalid(&format!("{key}.rate_burst"), "must be non-zero when a session rate is set"));
    }
    if !(1024..=(1 << 20)).contains(&s.buffer_size) {
        return Err(invalid(&format!("{key}.buffer_size"), "must be between 1KiB and 1MiB"));
    }
    if s.max_message_size < s.max_frame_size {
        return Err(invalid(&format!("{key}.max_message_size"), "must be at least max_frame_size"));
    }
    interval(&format!("{key}.ping_interval"), s.ping_interval, Zero::Off)?;
    if !s.ping_interval.is_zero() {
        deadline(&format!("{key}.ping_timeout"), s.ping_timeout)?;
    }
    deadline(&format!("{key}.close_timeout"), s.close_timeout)?;
    Ok(s)
}

fn backend(b: RawBackend, d: BackendSettings, key: &str) -> Result<BackendSettings, Invalid> {
    let s = BackendSettings {
        connect_timeout: dur(b.connect_timeout, d.connect_timeout),
        handshake_timeout: dur(b.handshake_timeout, d.handshake_timeout),
        response_header_timeout: dur(b.response_header_timeout, d.response_header_timeout),
        idle_body_timeout: dur(b.idle_body_timeout, d.idle_body_timeout),
        max_request_body: b.max_request_body.map_or(d.max_request_body, |s| s.0),
        max_idle_per_member: b.max_idle_per_member.unwrap_or(d.max_idle_per_member),
        pool_idle_timeout: dur(b.pool_idle_timeout, d.pool_idle_timeout),
        source_addresses: b.source_addresses.map_or(d.source_addresses.clone(), |a| a.into()),
        sse_keepalive: dur(b.sse_keepalive, d.sse_keepalive),
    };
    for (name, v) in [
        ("connect_timeout", s.connect_timeout),
        ("handshake_timeout", s.handshake_timeout),
        ("response_header_timeout", s.response_header_timeout),
        ("idle_body_timeout", s.idle_body_timeout),
        ("pool_idle_timeout", s.pool_idle_timeout),
    ] {
        deadline(&format!("{key}.{name}"), v)?;
    }
    interval(&format!("{key}.sse_keepalive"), s.sse_keepalive, Zero::Off)?;
    Ok(s)
}

fn tls(t: RawTls) -> Result<TlsSettings, Invalid> {
    Ok(TlsSettings { cipher_suites: cipher_suites(t.cipher_suites)?, cert: t.cert, key: t.key, sni: t.sni })
}

fn admin(a: RawAdmin, secrets: Secrets) -> Result<AdminConfig, Invalid> {
    let address = a.address.unwrap_or(defaults::ADMIN_ADDRESS);
    let token = load_secret(a.token_file.as_deref(), a.token_env.as_deref(), "admin", secrets)?;
    if token.is_none() && !address.ip().is_loopback() {
        return Err(invalid(
            "admin.address",
            "is not a loopback address, so the session API would be open to the network: set admin.token_file or admin.token_env, or bind to 127.0.0.1",
        ));
    }
    let mut hosts = Vec::with_capacity(a.hosts.len());
    for (i, h) in a.hosts.iter().enumerate() {
        let Some(name) = host_name(h, false) else {
            return Err(invalid(&format!("admin.hosts[{i}]"), "must be a host name or address without port"));
        };
        hosts.push(name);
    }
    for (i, o) in a.allow_origins.iter().enumerate() {
        let uri: http::Uri = o.parse().map_err(|_| invalid(&format!("admin.allow_origins[{i}]"), "not an origin"))?;
        if uri.scheme().is_none() || uri.authority().is_none() || !matches!(uri.path(), "" | "/") {
            return Err(invalid(&format!("admin.allow_origins[{i}]"), "must be scheme://host[:port]"));
        }
    }
    // Unlike max_connections_per_ip's 0 (no cap per address), no slot at all would refuse the
    // probes and the scraper too; and each slot is reserved out of the descriptor limit twice
    // (a connection and a recording it serves), so thousands would leave clients none.
    if !(1..=MAX_ADMIN_CONNECTIONS).contains(&a.max_connections.unwrap_or(1)) {
        return Err(invalid("admin.max_connections", &format!("must be 1 to {MAX_ADMIN_CONNECTIONS}")));
    }
    Ok(AdminConfig {
        address,
        token,
        hosts,
        allow_origins: a.allow_origins.iter().map(|o| o.trim_end_matches('/').to_ascii_lowercase()).collect(),
        max_connections: a.max_connections.unwrap_or(defaults::ADMIN_MAX_CONNECTIONS),
        max_connections_per_ip: a.max_connections_per_ip.unwrap_or(defaults::ADMIN_MAX_CONNECTIONS_PER_IP),
    })
}

fn auth(a: RawAuth, secrets: Secrets) -> Result<AuthSettings, Invalid> {
    let mut keys = Vec::with_capacity(a.keys.len());
    for (i, k) in a.keys.into_iter().enumerate() {
        let key = format!("auth.keys[{i}]");
        check_algorithms(&k.algorithms, &format!("{key}.algorithms"))?;
        let hmac = k.algorithms.iter().all(|a| a.family() == AlgorithmFamily::Hmac);
        let material = match (k.public_key, hmac) {
            (Some(p), false) => {
                if k.secret_file.is_some() || k.secret_env.is_some() {
                    return Err(invalid(&key, "set public_key or a secret, not both"));
                }
                KeyMaterial::PublicKeyPem(p)
            }
            (None, true) => match load_secret(k.secret_file.as_deref(), k.secret_env.as_deref(), &key, secrets)? {
                Some(s) => KeyMaterial::Secret(s),
                None => return Err(invalid(&key, "HS* keys need secret_file or secret_env")),
            },
            (Some(_), true) => return Err(invalid(&key, "HS* keys take a secret, not a public_key")),
            (None, false) => return Err(invalid(&key, "RS*/PS*/ES*/EdDSA keys need public_key (a PEM file)")),
        };
        keys.push(StaticKey { kid: k.kid, algorithms: k.algorithms, material });
    }
    let mut jwks = Vec::with_capacity(a.jwks.len());
    for (i, j) in a.jwks.into_iter().enumerate() {
        let key = format!("auth.jwks[{i}]");
        let url: http::Uri = j.url.parse().map_err(|_| invalid(&format!("{key}.url"), "not a valid URL"))?;
        if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
            return Err(invalid(&format!("{key}.url"), "must be an http:// or https:// URL"));
        }
        no_credentials(&url, &format!("{key}.url"), "a key set is public: serve it without them")?;
        // Keys fetched in clear text can be replaced by anyone on the path: then they sign
        // every token they like.
        if url.scheme_str() == Some("http") && !j.danger_allow_http {
            return Err(invalid(
                &format!("{key}.url"),
                "is http://: anyone on the path could swap the keys; use https://, or set danger_allow_http = true for a trusted local key server",
            ));
        }
        check_algorithms(&j.algorithms, &format!("{key}.algorithms"))?;
        if j.algorithms.iter().any(|a| a.family() == AlgorithmFamily::Hmac) {
            return Err(invalid(&format!("{key}.algorithms"), "HS* algorithms cannot come from a JWKS"));
        }
        jwks.push(JwksSettings {
            url,
            algorithms: j.algorithms,
            refresh_interval: interval(
                &format!("{key}.refresh_interval"),
                dur(j.refresh_interval, defaults::JWKS_REFRESH_INTERVAL),
                Zero::Refused,
            )?,
            // An unknown `kid` refetches the keys: without a pause between refetches, tokens
            // made up by anyone would have the key server asked for each.
            min_refetch_interval: interval(
                &format!("{key}.min_refetch_interval"),
                dur(j.min_refetch_interval, defaults::JWKS_MIN_REFETCH_INTERVAL),
                Zero::Refused,
            )?,
            timeout: deadline(&format!("{key}.timeout"), dur(j.timeout, defaults::JWKS_TIMEOUT))?,
            ca: j.ca,
        });
    }
    let cookie_login = match a.cookie_login {
        None => None,
        Some(l) => {
            let path = l.path.unwrap_or_else(|| "/.portcullis/login".to_owned());
            if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
                return Err(invalid("auth.cookie_login.path", "must be a path starting with '/'"));
            }
            let cookie = l.cookie.unwrap_or_else(|| "portcullis_token".to_owned());
            if cookie.is_empty() || !cookie.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                return Err(invalid("auth.cookie_login.cookie", "must be a cookie name of [A-Za-z0-9_-]"));
            }
            Some(super::CookieLogin { path, cookie })
        }
    };
    Ok(AuthSettings {
        cookie_login,
        max_sessions_per_subject: a.max_sessions_per_subject.unwrap_or(defaults::AUTH_MAX_SESSIONS_PER_SUBJECT),
        keys,
        jwks,
        leeway: dur(a.leeway, defaults::AUTH_LEEWAY),
        max_token_size: a.max_token_size.map_or(defaults::AUTH_MAX_TOKEN_SIZE, |s| s.0 as usize),
        cache_capacity: a.cache_capacity.unwrap_or(defaults::AUTH_CACHE_CAPACITY),
        revocation_ttl: dur(a.revocation_ttl, defaults::AUTH_REVOCATION_TTL),
    })
}

/// One key verifies one algorithm family: no HS/RS confusion, never `none`.
fn check_algorithms(algs: &[Algorithm], key: &str) -> Result<(), Invalid> {
    match algs.first() {
        None => Err(invalid(key, "list at least one algorithm")),
        Some(first) if algs.iter().any(|a| a.family() != first.family()) => {
            Err(invalid(key, "all algorithms of one key must be of one family (no algorithm confusion)"))
        }
        Some(_) => Ok(()),
    }
}

fn load_secret(file: Option<&Path>, env: Option<&str>, key: &str, secrets: Secrets) -> Result<Option<Secret>, Invalid> {
    match (file, env) {
        (Some(_), Some(_)) => Err(invalid(key, "set a secret file or an environment variable, not both")),
        // Named, not read: a stand-in that is never used to verify or authorize anything.
        (Some(_), None) | (None, Some(_)) if secrets == Secrets::Unread => Ok(Some(Secret::new(b"unread".to_vec()))),
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

/// Checks `tls.cipher_suites` (known names, no repeats, not empty); absent means the default order.
fn cipher_suites(names: Option<Vec<String>>) -> Result<Vec<String>, Invalid> {
    let Some(names) = names else {
        return Ok(CIPHER_SUITES.iter().map(|s| s.to_string()).collect());
    };
    if names.is_empty() {
        return Err(invalid("tls.cipher_suites", "must name at least one cipher suite"));
    }
    for (i, name) in names.iter().enumerate() {
        if !CIPHER_SUITES.contains(&name.as_str()) {
            let known = CIPHER_SUITES.join(", ");
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

/// The shortest interval of anything repeated (a keep-alive, a ping, a poll, a sweep, a fetch):
/// a shorter one is a busy loop, per stream or per connection for some (`sse_keepalive =
/// "1ms"` kept a core busy with a handful of streams).
const MIN_INTERVAL: Duration = Duration::from_millis(50);

/// The shortest deadline a peer is held to (a client's handshake or request head, a member's
/// connect, handshake or answer, a registry's or key server's answer): a shorter one fails
/// them on any network, loopback included (`tls_handshake_timeout = "1ms"` did), and a member
/// or registry host failed so is ejected or held.
const MIN_DEADLINE: Duration = Duration::from_millis(100);

/// Whether an interval of something repeated may be turned off with `"0s"`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Zero {
    Off,
    Refused,
}

/// `v`, the interval at `key`, if it is [`MIN_INTERVAL`] or more (or `"0s"` where `zero` is
/// [`Zero::Off`]).
fn interval(key: &str, v: Duration, zero: Zero) -> Result<Duration, Invalid> {
    match (v.is_zero(), zero) {
        (true, Zero::Off) => Ok(v),
        (true, Zero::Refused) => Err(invalid(key, "must be more than 0s")),
        (false, _) if v < MIN_INTERVAL => Err(invalid(
            key,
            &format!("must be at least {MIN_INTERVAL:?}: anything repeated more often is a busy loop"),
        )),
        (false, _) => Ok(v),
    }
}

/// The most admin connections at once: probes, a scraper and operators need a few dozen.
const MAX_ADMIN_CONNECTIONS: usize = 1024;

/// The longest queue of a subscriber (an observer's chunks, a fan-out client's frames): more is
/// memory no slow reader should hold, and a count past the channel's own limit panicked.
const MAX_QUEUE: usize = 65_536;

/// A subscriber's queue at `key`: 256 when unset, 1 to [`MAX_QUEUE`].
fn queue(v: Option<usize>, key: &str) -> Result<usize, Invalid> {
    match v.unwrap_or(256) {
        n @ 1..=MAX_QUEUE => Ok(n),
        _ => Err(invalid(key, &format!("must be 1 to {MAX_QUEUE}"))),
    }
}

/// `v`, a deadline at `key` that cannot be off, if it is [`MIN_DEADLINE`] or more.
fn deadline(key: &str, v: Duration) -> Result<Duration, Invalid> {
    match v.is_zero() {
        true => Err(invalid(key, "must be more than 0s")),
        false if v < MIN_DEADLINE => {
            Err(invalid(key, &format!("must be at least {MIN_DEADLINE:?}: no peer meets less")))
        }
        false => Ok(v),
    }
}

fn invalid(key: &str, message: &str) -> Invalid {
    (key.to_owned(), message.to_owned())
}

fn is_label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}
