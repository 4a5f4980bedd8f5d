//! `portcullis demo`: the proxy in front of a built-in demo agent, with no files needed.
//!
//! It generates a self-signed certificate (written to the demo directory so clients can trust
//! it and `config/dev.toml` can use it), starts a demo agent backend on loopback, and serves
//! the proxy with TLS in front of it:
//!
//! - `/agents/{agent}/terminal`: echoes every message (an interactive shell stand-in);
//! - `/agents/{agent}/events`: pushes a JSON "agent event" every second, and echoes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{upgrade, FragmentCollectorRead, Frame, OpCode, Payload, WebSocketError};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

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

/// The demo configuration: a TLS listener on `listen`, admin on `admin`, routes to `backend`
/// that require a token granting the agent.
pub fn config_text(
    listen: SocketAddr,
    admin: SocketAddr,
    backend: SocketAddr,
    cert: &DemoCert,
    jwt: &DemoJwtKeys,
) -> String {
    format!(
        r#"[server]
drain_spread = "1s"
drain_timeout = "10s"

[tls]
cert = "{cert}"
key = "{key}"

[[listeners]]
name = "public"
addresses = ["{listen}"]
tls = true

[admin]
address = "{admin}"

[session]
ping_interval = "30s"
idle_timeout = "10m"

[[auth.keys]]
algorithms = ["ES256"]
public_key = "{jwt_public}"

[[routes]]
name = "terminal"
path = "/agents/{{agent}}/terminal"
backends = ["{backend}"]
[routes.auth]
sources = ["bearer", "subprotocol:bearer.", "query:access_token"]
agent_claim = "agents"

[[routes]]
name = "events"
path = "/agents/{{agent}}/events"
backends = ["{backend}"]
[routes.auth]
sources = ["bearer", "subprotocol:bearer.", "query:access_token"]
agent_claim = "agents"
"#,
        cert = cert.cert.display(),
        key = cert.key.display(),
        jwt_public = jwt.public_key.display(),
    )
}

/// Serves the demo agent backend on `listener` until the process ends.
pub async fn serve_backend(listener: TcpListener) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let conn =
                http1::Builder::new().serve_connection(TokioIo::new(tcp), service_fn(backend_request)).with_upgrades();
            let _ = conn.await;
        });
    }
}

async fn backend_request(mut req: Request<Incoming>) -> Result<Response<Empty<Bytes>>, Infallible> {
    let events = req.uri().path().ends_with("/events");
    let agent = req.uri().path().split('/').nth(2).unwrap_or("agent").to_owned();
    match upgrade::upgrade(&mut req) {
        Ok((resp, fut)) => {
            tokio::spawn(async move {
                if let Ok(ws) = fut.await {
                    let _ = agent_session(ws, events, agent).await;
                }
            });
            Ok(resp)
        }
        Err(_) => {
            let mut r = Response::new(Empty::new());
            *r.status_mut() = hyper::StatusCode::UPGRADE_REQUIRED;
            Ok(r)
        }
    }
}

type Ws = fastwebsockets::WebSocket<TokioIo<hyper::upgrade::Upgraded>>;

async fn agent_session(ws: Ws, events: bool, agent: String) -> Result<(), WebSocketError> {
    let (rx, tx) = ws.split(tokio::io::split);
    let mut rx = FragmentCollectorRead::new(rx);
    let tx = Arc::new(Mutex::new(tx));
    let ticker = events.then(|| {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut seq = 0u64;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                seq += 1;
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0);
                let msg =
                    format!(r#"{{"type":"agent.event","agent":"{agent}","seq":{seq},"ts":{ts},"status":"running"}}"#);
                let frame = Frame::text(Payload::Owned(msg.into_bytes()));
                if tx.lock().await.write_frame(frame).await.is_err() {
                    break;
                }
            }
        })
    });
    let result = loop {
        let frame = match rx
            .read_frame(&mut |f| {
                let tx = tx.clone();
                async move { tx.lock().await.write_frame(f).await }
            })
            .await
        {
            Ok(f) => f,
            Err(e) => break Err(e),
        };
        match frame.opcode {
            OpCode::Close => break Ok(()),
            OpCode::Text | OpCode::Binary => {
                let reply = Frame::new(true, frame.opcode, None, Payload::Owned(frame.payload.to_vec()));
                tx.lock().await.write_frame(reply).await?;
            }
            _ => {}
        }
    };
    if let Some(t) = ticker {
        t.abort();
    }
    result
}
