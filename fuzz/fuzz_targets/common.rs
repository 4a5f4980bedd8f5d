//! What the pre-auth targets share: a configuration with routes of every kind and a route
//! whose auth takes tokens from every source, an authenticator with a known HS256 key, and a
//! runtime to drive the async auth stage.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use portcullis::auth::{Authenticator, Denylist};
use portcullis::config::Config;
use portcullis::routing::table::RouteTable;

/// The HMAC key the `jwt` target signs with, so that claims decoding is reached.
pub const SECRET: &[u8] = b"portcullis-fuzz-secret-0123456789";

pub struct World {
    pub table: RouteTable,
    pub authenticator: Arc<Authenticator>,
    pub runtime: tokio::runtime::Runtime,
}

pub fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("portcullis-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let secret = dir.join("secret");
        std::fs::write(&secret, SECRET).expect("secret");
        let text = format!(
            r#"
[[listeners]]
addresses = ["127.0.0.1:0"]

[[auth.keys]]
algorithms = ["HS256", "HS384"]
secret_file = "{}"

[[routes]]
name = "exact"
host = "a.example.com"
path = "/agents/{{agent}}/terminal"
backends = ["{{agent}}.agents.internal:7681"]

[[routes]]
name = "wild"
host = "*.example.com"
path = "/agents/{{agent}}/events"
backends = ["127.0.0.1:1"]

[[routes]]
name = "guarded"
path = "/agents/{{agent}}/terminal"
backends = ["127.0.0.1:1"]
[routes.auth]
sources = ["bearer", "query:access_token", "cookie:pc_token", "subprotocol:bearer."]
issuers = ["https://idp.test"]
audiences = ["agents"]
required_claims = ["sub"]
agent_claim = "agents"
agent_scope = "terminal:{{agent}}"
[routes.origin]
allow = ["https://app.example.com", "*.agents.example"]
allow_missing = true
"#,
            secret.display()
        );
        let config = Config::parse(&text, Path::new("fuzz.toml")).expect("fuzz config");
        let table = RouteTable::new(&config.routes);
        let authenticator = Authenticator::new(&config.auth, Arc::new(Denylist::default())).expect("authenticator");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        World { table, authenticator, runtime }
    })
}

/// Runs the route, upgrade and auth stages on a parsed request, as the proxy does.
pub fn through_the_stages(req: &http::Request<()>) {
    let w = world();
    // A plain request goes through auth as it is; an upgrade must be valid first.
    let ws = match portcullis::proxy::upgrade::check(req) {
        Ok(ws) => Some(ws),
        Err(portcullis::proxy::upgrade::UpgradeError::NotUpgrade) => None,
        Err(_) => return,
    };
    let host = req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok());
    let host = host.map(|h| h.rsplit_once(':').map_or(h, |(h, _)| h));
    let Ok((route, caps)) = w.table.find(host, req.uri().path()) else { return };
    let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let admitted = w.runtime.block_on(portcullis::fuzzing::admit(
        &route,
        &caps,
        req.headers(),
        path_and_query,
        ws,
        Some(&w.authenticator),
        // No signature-check rate limit: every input is checked.
        &|| Ok(()),
    ));
    if let Ok(a) = admitted {
        // Token carriers never reach the backend.
        assert!(a.headers.get(http::header::AUTHORIZATION).is_none() || route.auth.is_none());
        assert!(!a.path_and_query.contains("access_token=") || route.auth.is_none());
    }
}
