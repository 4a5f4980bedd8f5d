//! `portcullis demo`: the proxy in front of a built-in demo agent, with no files needed.
//!
//! It generates a self-signed certificate (written to the demo directory so clients can trust
//! it and `config/dev.toml` can use it), starts the demo agent ([`agent`]) on loopback, and
//! serves the proxy with TLS in front of it: the agent's REST API and SSE task output, its
//! terminal (a shell on a real PTY) and event WebSockets, and a web page with a terminal
//! emulator (xterm.js) that uses all of them through the proxy.

pub mod agent;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Paths of the demo's generated certificate and key.
pub struct DemoCert {
    /// Self-signed certificate (PEM) for `localhost` and `127.0.0.1`; also the CA to trust.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

/// Generates a self-signed certificate for `localhost`/`127.0.0.1` into `dir`.
pub fn write_self_signed(dir: &Path) -> anyhow::Result<DemoCert> {
    std::fs::create_dir_all(dir)?;
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, ck.cert.pem())?;
    std::fs::write(&key, ck.signing_key.serialize_pem())?;
    Ok(DemoCert { cert, key })
}

/// Paths of the demo's token signing key pair (ES256).
pub struct DemoJwtKeys {
    /// PKCS#8 private key (PEM), for minting.
    pub private_key: PathBuf,
    /// SPKI public key (PEM), for verifying.
    pub public_key: PathBuf,
}

/// Generates an ES256 key pair for demo tokens into `dir`.
pub fn write_jwt_keys(dir: &Path) -> anyhow::Result<DemoJwtKeys> {
    std::fs::create_dir_all(dir)?;
    let kp = rcgen::KeyPair::generate()?;
    let private_key = dir.join("jwt-private.pem");
    let public_key = dir.join("jwt-public.pem");
    std::fs::write(&private_key, kp.serialize_pem())?;
    std::fs::write(&public_key, kp.public_key_pem())?;
    Ok(DemoJwtKeys { private_key, public_key })
}

/// Mints an ES256 token for subject "demo-user" granting `agent`.
pub fn mint_token(keys: &DemoJwtKeys, agent: &str, ttl: Duration) -> anyhow::Result<String> {
    let pem = std::fs::read(&keys.private_key)?;
    let key = crate::mint::encoding_key(jsonwebtoken::Algorithm::ES256, &pem)?;
    let mut claims = serde_json::Map::new();
    claims.insert("sub".into(), "demo-user".into());
    claims.insert("agents".into(), serde_json::json!([agent]));
    Ok(crate::mint::mint(jsonwebtoken::Algorithm::ES256, &key, None, claims, ttl)?)
}

/// The demo configuration: a TLS listener on `listen`, admin on `admin`, and routes to the
/// demo agent at `backend`: its WebSockets and API require a token that grants the agent; the
/// page itself (`/agents/{agent}/`) is open, since it carries no data and takes the token from
/// its URL fragment.
/// What the command line sets in the demo's routes.
pub struct PageOpts {
    /// The terminal's `[routes.resume] window` (`30s`).
    pub resume_window: String,
    /// Origins the page may be opened from besides the listener's own.
    pub origins: Vec<String>,
}

pub fn config_text(
    listen: SocketAddr,
    admin: SocketAddr,
    backend: SocketAddr,
    cert: &DemoCert,
    jwt: &DemoJwtKeys,
    page: &PageOpts,
    state_dir: &Path,
) -> String {
    let port = listen.port();
    let extra_origins: String = page.origins.iter().map(|o| format!(", \"{o}\"")).collect();
    let resume_window = &page.resume_window;
    format!(
        r#"[server]
drain_spread = "1s"
drain_timeout = "10s"
# Every client of the demo is this machine (the browser, the bundled load-test harness): the
# per-address limits, an internet-facing edge's by default, would count them all as one.
max_connections_per_ip = 0
connection_rate_per_ip = 0
handshake_rate_per_ip = 0
token_check_rate_per_ip = 0

[tls]
cert = "{cert}"
key = "{key}"

[[listeners]]
name = "public"
addresses = ["{listen}"]
tls = true

[admin]
address = "{admin}"

# Revocations made through the admin API outlive a restart of the demo: they are kept here.
[fleet]
state_dir = "{state_dir}"

[session]
ping_interval = "30s"
idle_timeout = "10m"

# One machine, one clock: a token's expiry is enforced within two seconds.
[auth]
leeway = "2s"

[[auth.keys]]
algorithms = ["ES256"]
public_key = "{jwt_public}"

# The proxy's login page (/.portcullis/login#token=...&next=...) turns the banner's token into
# an HttpOnly cookie that no page script can read; the page's calls all ride on it.
[auth.cookie_login]

# The terminal: a shell on a PTY. Browsers send the token as a subprotocol entry (with the
# "portcullis" marker) or a cookie; command-line clients as a bearer header.
[[routes]]
name = "terminal"
path = "/agents/{{agent}}/terminal"
backends = ["{backend}"]
[routes.auth]
sources = ["bearer", "subprotocol:bearer.", "cookie:portcullis_token", "query:access_token"]
agent_claim = "agents"
# A held terminal is resumed only by a token of the same issuer and subject.
required_claims = ["sub"]
[routes.origin]
allow = ["https://localhost:{port}", "https://127.0.0.1:{port}"{extra_origins}]
# The page reconnects with its resume id after a network blip and gets the same shell back,
# with what it printed meanwhile; after the window, a new shell (and this notice).
[routes.resume]
window = "{resume_window}"
buffer = "1MiB"
notice = "\r\n\u001b[33m[portcullis] new terminal session\u001b[0m\r\n"

[[routes]]
name = "events"
path = "/agents/{{agent}}/events"
backends = ["{backend}"]
[routes.auth]
sources = ["bearer", "subprotocol:bearer.", "cookie:portcullis_token", "query:access_token"]
agent_claim = "agents"
[routes.origin]
allow = ["https://localhost:{port}", "https://127.0.0.1:{port}"{extra_origins}]

# An echo WebSocket, for the load-test harness.
[[routes]]
name = "echo"
path = "/agents/{{agent}}/echo"
backends = ["{backend}"]
[routes.auth]
sources = ["bearer", "subprotocol:bearer.", "query:access_token"]
agent_claim = "agents"

# The agent's REST API and SSE task output.
[[routes]]
name = "api"
path = "/agents/{{agent}}/api/{{*rest}}"
kind = "http"
backends = ["{backend}"]
backend_path = "/agents/{{agent}}/api/{{rest}}"
[routes.auth]
sources = ["bearer", "cookie:portcullis_token"]
agent_claim = "agents"
[routes.origin]
allow = ["https://localhost:{port}", "https://127.0.0.1:{port}"{extra_origins}]

# The agent's web page and its scripts; open (they hold no data).
[[routes]]
name = "ui"
path = "/agents/{{agent}}/{{*rest}}"
kind = "http"
backends = ["{backend}"]
backend_path = "/agents/{{agent}}/ui/{{rest}}"
"#,
        cert = cert.cert.display(),
        state_dir = state_dir.display(),
        key = cert.key.display(),
        jwt_public = jwt.public_key.display(),
    )
}

/// The page, its script, and the npm packages it uses.
pub mod web {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// The page (`{{AGENT}}` is replaced by the agent's name).
    pub const INDEX: &str = include_str!("web/index.html");
    /// The page's script.
    pub const APP: &str = include_str!("web/app.js");
    const PACKAGE_JSON: &str = include_str!("web/package.json");
    const PACKAGE_LOCK: &str = include_str!("web/package-lock.json");

    /// Where a `/ui/vendor/` asset is inside `node_modules`.
    pub fn vendor_path(asset: &str) -> Option<&'static str> {
        match asset {
            "xterm.js" => Some("@xterm/xterm/lib/xterm.js"),
            "xterm.css" => Some("@xterm/xterm/css/xterm.css"),
            "addon-fit.js" => Some("@xterm/addon-fit/lib/addon-fit.js"),
            _ => None,
        }
    }

    /// The `node_modules` directory with xterm.js under `dir/web`, installing the pinned
    /// packages (`package-lock.json`, with integrity hashes) with `npm ci` the first time.
    /// `Err` says in one line why the page runs without xterm.js.
    pub fn ensure_installed(dir: &Path, npm: bool) -> Result<PathBuf, String> {
        let web = dir.join("web");
        let modules = web.join("node_modules");
        let installed = |m: &Path| vendor_path("xterm.js").is_some_and(|p| m.join(p).is_file());
        if installed(&modules) {
            return Ok(modules);
        }
        if !npm {
            return Err("--no-npm: xterm.js not installed (run the demo without --no-npm once)".into());
        }
        if Command::new("npm").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
            return Err(
                "npm not found: install Node.js and npm, then run the demo again (it runs `npm ci` once)".into()
            );
        }
        std::fs::create_dir_all(&web).map_err(|e| format!("cannot create {}: {e}", web.display()))?;
        for (name, text) in [("package.json", PACKAGE_JSON), ("package-lock.json", PACKAGE_LOCK)] {
            std::fs::write(web.join(name), text).map_err(|e| format!("cannot write {name}: {e}"))?;
        }
        eprintln!("installing xterm.js from the npm registry into {} (once) ...", web.display());
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"])
            .current_dir(&web)
            .output()
            .map_err(|e| format!("npm ci failed to start: {e}"))?;
        if !out.status.success() || !installed(&modules) {
            let why = String::from_utf8_lossy(&out.stderr);
            let first = why.lines().find(|l| !l.trim().is_empty()).unwrap_or("no output");
            return Err(format!("npm ci in {} failed ({first}); run it there by hand, then restart", web.display()));
        }
        Ok(modules)
    }
}
