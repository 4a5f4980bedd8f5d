//! Authentication and authorization on the upgrade: token sources, algorithm families, JWKS
//! rotation, the attack table, expiry enforcement, revocation, and keeping tokens out of the
//! backend request and the logs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::mint;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

// ---------------------------------------------------------------------------------------------
// Keys and tokens

struct Key {
    alg: Algorithm,
    kid: Option<&'static str>,
    signing: EncodingKey,
    /// Public key PEM (or HMAC secret) bytes, as written for the proxy.
    public: Vec<u8>,
    path: PathBuf,
    raw_public: Vec<u8>,
}

fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let path = certs().dir.join(format!("{name}-{}", rand::random::<u32>()));
    std::fs::write(&path, bytes).expect("write key");
    path
}

fn key(alg: Algorithm, kid: Option<&'static str>) -> Key {
    use rcgen::KeyPair;
    let (private, public, raw) = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            let secret: [u8; 32] = rand::random();
            let s = URL_SAFE_NO_PAD.encode(secret).into_bytes();
            (s.clone(), s, Vec::new())
        }
        Algorithm::ES256 => {
            let kp = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("p256");
            (kp.serialize_pem().into_bytes(), kp.public_key_pem().into_bytes(), kp.public_key_raw().to_vec())
        }
        Algorithm::EdDSA => {
            let kp = KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519");
            (kp.serialize_pem().into_bytes(), kp.public_key_pem().into_bytes(), kp.public_key_raw().to_vec())
        }
        _ => {
            let kp = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("rsa");
            (kp.serialize_pem().into_bytes(), kp.public_key_pem().into_bytes(), kp.public_key_raw().to_vec())
        }
    };
    let signing = mint::encoding_key(alg, &private).expect("signing key");
    let path = write("key", &public);
    Key { alg, kid, signing, public, path, raw_public: raw }
}

impl Key {
    /// The `[[auth.keys]]` entry for this key.
    fn entry(&self) -> Value {
        let mut entry = json!({"algorithms": [format!("{:?}", self.alg)]});
        if let Some(kid) = self.kid {
            entry["kid"] = kid.into();
        }
        let material = match self.alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => "secret_file",
            _ => "public_key",
        };
        entry[material] = self.path.display().to_string().into();
        entry
    }

    /// `[[auth.keys]]` with this key alone, to merge at the top level.
    fn auth_keys(&self) -> Value {
        auth_keys(&[self])
    }

    fn token(&self, claims: Value) -> String {
        self.token_ttl(claims, Duration::from_secs(600))
    }

    fn token_ttl(&self, claims: Value, ttl: Duration) -> String {
        let Value::Object(map) = claims else { panic!("claims must be an object") };
        mint::mint(self.alg, &self.signing, self.kid, map, ttl).expect("mint")
    }
}

fn std_claims(sub: &str, agents: &[&str]) -> Value {
    json!({"sub": sub, "agents": agents, "iss": "https://idp.test", "aud": "agents"})
}

/// `[[auth.keys]]` with these keys, in this order, to merge at the top level.
fn auth_keys(keys: &[&Key]) -> Value {
    json!({"auth": {"keys": keys.iter().map(|k| k.entry()).collect::<Vec<_>>()}})
}

/// A proxy whose route `name` requires a token granting the agent.
/// `route` is more of the route (its `auth` table, its `origin`); `extra` is merged at the top
/// level (`[[auth.keys]]`, `[[auth.jwks]]`).
fn auth_config(backend: SocketAddr, name: &str, route: Value, extra: Value) -> TestConfig {
    TestConfig::base(&[backend.to_string()])
        .set("routes.0.name", name)
        .merge(
            "routes.0",
            json!({"auth": {"issuers": ["https://idp.test"], "audiences": ["agents"], "agent_claim": "agents"}}),
        )
        .merge("routes.0", route)
        .merge("auth", json!({"leeway": "2s", "max_token_size": "4KiB"}))
        .merge("", extra)
}

/// Response head and body of a raw request.
async fn request_full(addr: SocketAddr, request: &str) -> (Head, String) {
    let mut io = dial(addr, true).await;
    io.write_all(request.as_bytes()).await.expect("send");
    let head = tokio::time::timeout(SOON, read_head(&mut io)).await.expect("answer").expect("head");
    let head = parse_response(&head);
    let len: usize = head.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await.expect("body");
    (head, String::from_utf8_lossy(&body).into_owned())
}

fn upgrade_request(path: &str, extra: &[(&str, String)]) -> String {
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (n, v) in extra {
        r.push_str(&format!("{n}: {v}\r\n"));
    }
    r.push_str("\r\n");
    r
}

async fn failures(admin: SocketAddr, route: &str, reason: &str) -> f64 {
    let (_, body) = http_get(admin, "/metrics").await;
    metric(&body, &format!("portcullis_auth_failures_total{{route=\"{route}\",reason=\"{reason}\"}}"))
}

async fn echo_works(c: &mut Client) {
    c.send(true, op::TEXT, b"ping?").await;
    assert_eq!(c.recv().await.payload, b"ping?");
}

// ---------------------------------------------------------------------------------------------
// Token sources

#[tokio::test]
async fn token_is_accepted_from_each_configured_source_and_never_forwarded() {
    let backend = Backend::start(BackendOpts { pick_protocol: true, ..Default::default() }, echo_handler()).await;
    let k = key(Algorithm::ES256, None);
    let text = auth_config(
        backend.addr,
        "sources",
        // A cookie source needs an origin policy; these clients send no Origin.
        json!({
            "auth": {"sources": ["bearer", "query:access_token", "cookie:pc_token", "subprotocol:bearer."]},
            "origin": {"allow": ["https://console.example.com"]},
        }),
        k.auth_keys(),
    );
    let proxy = Proxy::start_with(&text.text()).await;
    let t = k.token(std_claims("alice", &["a1"]));

    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &format!("Bearer {t}"))])
        .await
        .expect("bearer");
    echo_works(&mut c).await;
    let mut c =
        upgrade(proxy.tls, true, &format!("/agents/a1/terminal?cols=80&access_token={t}"), &[]).await.expect("query");
    echo_works(&mut c).await;
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Cookie", &format!("theme=dark; pc_token={t}"))])
        .await
        .expect("cookie");
    echo_works(&mut c).await;
    let mut c =
        upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Sec-WebSocket-Protocol", &format!("bearer.{t}, tty"))])
            .await
            .expect("subprotocol");
    assert_eq!(c.response.header("sec-websocket-protocol"), Some("tty"), "only the real subprotocol is echoed");
    echo_works(&mut c).await;

    let requests = backend.log.requests.lock().expect("lock").clone();
    assert_eq!(requests.len(), 4);
    for r in &requests {
        let all = format!("{} {:?}", r.path, r.headers);
        assert!(!all.contains(&t), "the token reached the backend: {all}");
        assert_eq!(r.header("x-portcullis-sub"), Some("alice"));
    }
    assert_eq!(requests[1].path, "/agents/a1/terminal?cols=80", "query token removed, other parameters kept");
    assert_eq!(requests[2].header("cookie"), Some("theme=dark"));
    assert_eq!(requests[3].header("sec-websocket-protocol"), Some("tty"));
}

#[tokio::test]
async fn each_algorithm_family_verifies() {
    let backend = Backend::echo().await;
    let keys = [
        key(Algorithm::HS256, Some("hs")),
        key(Algorithm::RS256, Some("rs")),
        key(Algorithm::PS256, Some("ps")),
        key(Algorithm::ES256, Some("es")),
        key(Algorithm::EdDSA, Some("ed")),
    ];
    let extra = auth_keys(&keys.iter().collect::<Vec<_>>());
    let proxy = Proxy::start_with(&auth_config(backend.addr, "families", json!({}), extra).text()).await;
    for k in &keys {
        let t = k.token(std_claims("alice", &["a1"]));
        let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &format!("Bearer {t}"))])
            .await
            .unwrap_or_else(|h| panic!("{:?} refused with {}", k.alg, h.status));
        echo_works(&mut c).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The attack table

#[tokio::test]
async fn attack_table_each_case_gets_its_status_and_reason() {
    let backend = Backend::echo().await;
    let es = key(Algorithm::ES256, Some("es"));
    let rs = key(Algorithm::RS256, Some("rs"));
    let extra = auth_keys(&[&es, &rs]);
    let route = json!({
        "auth": {"sources": ["bearer", "query:access_token"], "required_claims": ["sub"]},
        "origin": {"allow": ["https://app.example.com", "*.agents.example"]},
    });
    let proxy = Proxy::start_with(&auth_config(backend.addr, "attacks", route, extra).text()).await;
    let good = es.token(std_claims("alice", &["a1"]));
    let parts: Vec<&str> = good.split('.').collect();
    let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let now = portcullis::auth::now_secs();

    let alg_none = format!("{}.{}.", b64(&json!({"alg": "none", "kid": "es"})), parts[1]);
    let confusion = {
        // HS256 "signed" with the RSA public key as the HMAC secret.
        let hs = mint::encoding_key(Algorithm::HS256, &rs.public).expect("hs key");
        let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
        h.kid = Some("rs".into());
        jsonwebtoken::encode(&h, &std_claims("alice", &["a1"]), &hs).expect("encode")
    };
    let stripped = format!("{}.{}.", parts[0], parts[1]);
    let tampered = format!("{}.{}.{}", parts[0], b64(&std_claims("alice", &["a1", "a2"])), parts[2]);
    let with = |extra: Value| {
        let mut c = std_claims("alice", &["a1"]);
        if let (Value::Object(c), Value::Object(e)) = (&mut c, extra) {
            c.extend(e);
        }
        c
    };
    let expired = es.token(with(json!({"exp": now - 120})));
    let future = es.token(with(json!({"nbf": now + 600})));
    let wrong_iss = es.token(with(json!({"iss": "https://evil.test"})));
    let wrong_aud = es.token(with(json!({"aud": "billing"})));
    let unknown_kid = Key { kid: Some("nope"), ..key(Algorithm::ES256, None) }.token(std_claims("alice", &["a1"]));
    let other_agent = es.token(std_claims("alice", &["a2"]));
    let huge = es.token(with(json!({"pad": "x".repeat(5000)})));
    let bad_b64 = "!!!.@@@.###".to_string();
    let bad_json = format!("{}.{}.{}", URL_SAFE_NO_PAD.encode("{not json"), parts[1], parts[2]);
    let second = es.token(std_claims("alice", &["a1"]).clone());
    let no_sub = es.token(json!({"agents": ["a1"], "iss": "https://idp.test", "aud": "agents"}));

    let bearer = |t: &str| vec![("Authorization", format!("Bearer {t}"))];
    // (what, headers, query, status, reason)
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, String, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("alg none", bearer(&alg_none), String::new(), 401, "bad_signature"),
        ("HS/RS confusion", bearer(&confusion), String::new(), 401, "bad_signature"),
        ("signature stripped", bearer(&stripped), String::new(), 401, "bad_signature"),
        ("tampered payload", bearer(&tampered), String::new(), 401, "bad_signature"),
        ("expired", bearer(&expired), String::new(), 401, "expired"),
        ("nbf in the future", bearer(&future), String::new(), 401, "not_yet_valid"),
        ("wrong issuer", bearer(&wrong_iss), String::new(), 401, "wrong_issuer"),
        ("wrong audience", bearer(&wrong_aud), String::new(), 401, "wrong_audience"),
        ("unknown kid", bearer(&unknown_kid), String::new(), 401, "unknown_key"),
        ("token for another agent", bearer(&other_agent), String::new(), 403, "forbidden"),
        ("token too large", bearer(&huge), String::new(), 401, "too_large"),
        ("malformed base64", bearer(&bad_b64), String::new(), 401, "malformed"),
        ("malformed json", bearer(&bad_json), String::new(), 401, "malformed"),
        ("two sources, two tokens", bearer(&good), format!("?access_token={second}x"), 401, "ambiguous"),
        ("no token", vec![], String::new(), 401, "missing"),
        ("required claim missing", bearer(&no_sub), String::new(), 401, "missing_claim"),
        (
            "disallowed origin",
            vec![("Authorization", format!("Bearer {good}")), ("Origin", "https://evil.example".into())],
            String::new(),
            403,
            "origin",
        ),
    ];
    for (what, headers, query, status, reason) in cases {
        let before = failures(proxy.admin, "attacks", reason).await;
        let (head, body) =
            request_full(proxy.tls, &upgrade_request(&format!("/agents/a1/terminal{query}"), &headers)).await;
        assert_eq!(head.status, status, "{what}");
        let after = failures(proxy.admin, "attacks", reason).await;
        assert_eq!(after, before + 1.0, "{what}: counted as {reason}");
        for (_, v) in &headers {
            if let Some(t) = v.strip_prefix("Bearer ") {
                assert!(!body.contains(t) && !format!("{:?}", head.headers).contains(t), "{what}: token echoed");
            }
        }
        if status == 401 {
            let www = head.header("www-authenticate").unwrap_or_else(|| panic!("{what}: WWW-Authenticate"));
            assert!(www.starts_with("Bearer"), "{what}: {www}");
            if reason != "missing" {
                assert!(www.contains("error=\""), "{what}: RFC 6750 error in {www}");
            }
        }
    }
    assert!(backend.log.requests.lock().expect("lock").is_empty(), "no refused request reached the backend");

    // Allowed origins (exact and wildcard), and spoofed identity headers are replaced.
    for origin in ["https://app.example.com", "https://eu.agents.example"] {
        upgrade(
            proxy.tls,
            true,
            "/agents/a1/terminal",
            &[("Authorization", &format!("Bearer {good}")), ("Origin", origin)],
        )
        .await
        .unwrap_or_else(|h| panic!("{origin}: {}", h.status));
    }
    upgrade(
        proxy.tls,
        true,
        "/agents/a1/terminal",
        &[
            ("Authorization", &format!("Bearer {good}")),
            ("X-Portcullis-Sub", "root"),
            ("X-Portcullis-Claim-Role", "admin"),
        ],
    )
    .await
    .expect("101");
    let last = backend.log.requests.lock().expect("lock").last().cloned().expect("request");
    assert_eq!(last.header("x-portcullis-sub"), Some("alice"));
    assert_eq!(last.header("x-portcullis-claim-role"), None, "spoofed identity header stripped");
}

// ---------------------------------------------------------------------------------------------
// JWKS

struct JwksServer {
    addr: SocketAddr,
    doc: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
}

async fn jwks_server(doc: String) -> JwksServer {
    let doc = Arc::new(Mutex::new(doc));
    let d = doc.clone();
    let (addr, hits) = http_server(move |_| (200, d.lock().expect("lock").clone()), Duration::ZERO).await;
    JwksServer { addr, doc, hits }
}

fn jwk(k: &Key) -> Value {
    // Uncompressed P-256 point: 0x04 || X || Y.
    let raw = &k.raw_public;
    json!({
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": k.kid,
        "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
    })
}

/// A JWKS source at `url` (plain http, allowed for the test server) for ES256 keys, refreshed
/// hourly and refetched at most once a second for an unknown kid.
fn jwks_source(url: String) -> Value {
    json!({
        "url": url,
        "algorithms": ["ES256"],
        "danger_allow_http": true,
        "refresh_interval": "1h",
        "min_refetch_interval": "1s",
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_rotation_is_picked_up_with_bounded_fetches() {
    let backend = Backend::echo().await;
    let k1 = key(Algorithm::ES256, Some("k1"));
    let k2 = key(Algorithm::ES256, Some("k2"));
    let server = jwks_server(json!({"keys": [jwk(&k1)]}).to_string()).await;
    let extra = json!({"auth": {"jwks": [jwks_source(format!("http://{}/.well-known/jwks.json", server.addr))]}});
    // 50 concurrent connects from one address below: the per-address limits are not under test.
    let text = auth_config(backend.addr, "jwks", json!({}), extra).one_address_load().text();
    let proxy = Proxy::start_with(&text).await;
    let t1 = k1.token(std_claims("alice", &["a1"]));
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &format!("Bearer {t1}"))])
        .await
        .expect("k1");
    echo_works(&mut c).await;
    let after_start = server.hits.load(Ordering::SeqCst);
    assert!((1..=2).contains(&after_start), "fetched at start: {after_start}");

    // The identity provider rotates to k2.
    *server.doc.lock().expect("lock") = json!({"keys": [jwk(&k2)]}).to_string();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let t2 = k2.token(std_claims("alice", &["a1"]));
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &format!("Bearer {t2}"))])
        .await
        .expect("k2 after one refetch");
    echo_works(&mut c).await;
    assert_eq!(server.hits.load(Ordering::SeqCst), after_start + 1, "exactly one refetch for the new kid");

    // 50 concurrent connects with an unknown kid: refetches stay rate-limited and coalesced.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = server.hits.load(Ordering::SeqCst);
    let burst = std::time::Instant::now();
    let unknown = Key { kid: Some("k-unknown"), ..key(Algorithm::ES256, None) }.token(std_claims("alice", &["a1"]));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let t = unknown.clone();
            let addr = proxy.tls;
            tokio::spawn(async move {
                upgrade(addr, true, "/agents/a1/terminal", &[("Authorization", &format!("Bearer {t}"))])
                    .await
                    .err()
                    .map(|h| h.status)
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task"), Some(401));
    }
    let fetched = server.hits.load(Ordering::SeqCst) - before;
    // One fetch per `min_refetch_interval` (1 s) at most: one, unless the burst itself took longer
    // than that on a loaded machine.
    let took = burst.elapsed();
    let allowed = 1 + took.as_secs() as usize;
    assert!(fetched <= allowed, "50 unknown-kid connects over {took:?} caused {fetched} JWKS fetches");
    // Old key k1 left the set: its tokens are now refused, the one verified with it before
    // the rotation (in the verified-token cache) too.
    let stale = k1.token(std_claims("alice", &["a1"]));
    for token in [&stale, &t1] {
        let err = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &format!("Bearer {token}"))])
            .await
            .err()
            .expect("refused");
        assert_eq!(err.status, 401);
    }
}

/// Found by an attacker review: a key replaced under its `kid` (a rotation after a compromise
/// that keeps the name) went on authorizing the tokens verified with the old key, from the
/// verified-token cache, until they expired (a forger picks any `exp`). A fetch that replaces
/// or drops a key now sends every cached token through verification again.
#[tokio::test]
async fn a_key_replaced_under_its_kid_authorizes_nothing_it_verified_before() {
    let backend = Backend::echo().await;
    let k1 = key(Algorithm::ES256, Some("k1"));
    let server = jwks_server(json!({"keys": [jwk(&k1)]}).to_string()).await;
    let extra = json!({"auth": {"jwks": [jwks_source(format!("http://{}/jwks", server.addr))]}});
    let proxy = Proxy::start_with(&auth_config(backend.addr, "jwks_replaced", json!({}), extra).text()).await;
    let bearer = |t: &str| format!("Bearer {t}");
    let old = k1.token(std_claims("alice", &["a1"]));
    let mut opened =
        upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &bearer(&old))]).await.expect("k1");
    echo_works(&mut opened).await;
    // The provider replaces k1's material under the same kid and adds k3; a k3 token makes the
    // proxy fetch the new set.
    let (k1_new, k3) = (key(Algorithm::ES256, Some("k1")), key(Algorithm::ES256, Some("k3")));
    *server.doc.lock().expect("lock") = json!({"keys": [jwk(&k1_new), jwk(&k3)]}).to_string();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let t3 = k3.token(std_claims("alice", &["a1"]));
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &bearer(&t3))]).await.expect("k3");
    echo_works(&mut c).await;
    let err = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &bearer(&old))])
        .await
        .err()
        .expect("the token of the replaced key is refused");
    assert_eq!(err.status, 401);
    let fresh = k1_new.token(std_claims("alice", &["a1"]));
    upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &bearer(&fresh))]).await.expect("the new k1");
    // Found by the verification of that fix: the session the old key's token opened went on.
    // It ends with the key, as a revoked one does.
    let close = opened.recv_close().await;
    assert_eq!((close.close_code(), close.close_reason().as_str()), (Some(1008), "session revoked"));
}

/// A reload that removes a static key ends the sessions of the tokens it verified, as a JWKS
/// fetch that retires a key does: a compromised key authorizes nothing from then on.
#[tokio::test]
async fn a_reload_that_removes_a_key_ends_the_sessions_it_verified() {
    let backend = Backend::echo().await;
    let (old_key, other) = (hmac(), hmac());
    let config = |key: &Hmac| {
        TestConfig::base(&[backend.addr.to_string()])
            .merge("", key.auth_keys())
            .merge("routes.0", json!({"auth": {"agent_claim": "agents"}}))
    };
    let proxy = Proxy::start_with(&config(&old_key).text()).await;
    let mut opened = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &old_key.bearer(&["a1"]))])
        .await
        .expect("101");
    echo_works(&mut opened).await;
    let parsed =
        portcullis::config::Config::parse(&config(&other).text(), std::path::Path::new("reload.toml")).expect("valid");
    proxy.handle.reload(parsed).expect("reload");
    let close = opened.recv_close().await;
    assert_eq!((close.close_code(), close.close_reason().as_str()), (Some(1008), "session revoked"));
    // A token of the key in force opens one.
    upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &other.bearer(&["a1"]))]).await.expect("101");
}

#[tokio::test]
async fn jwks_outage_keeps_the_last_good_keys() {
    let backend = Backend::echo().await;
    let k1 = key(Algorithm::ES256, Some("k1"));
    let server = jwks_server(json!({"keys": [jwk(&k1)]}).to_string()).await;
    let mut source = jwks_source(format!("http://{}/jwks", server.addr));
    (source["refresh_interval"], source["min_refetch_interval"]) = (json!("200ms"), json!("100ms"));
    let extra = json!({"auth": {"jwks": [source]}});
    let proxy = Proxy::start_with(&auth_config(backend.addr, "jwks_outage", json!({}), extra).text()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    *server.doc.lock().expect("lock") = "this is not a key set".into();
    let hits = server.hits.load(Ordering::SeqCst);
    eventually("the key set was fetched twice more", async || {
        (server.hits.load(Ordering::SeqCst) >= hits + 2).then_some(())
    })
    .await;
    let t = k1.token(std_claims("alice", &["a1"]));
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &format!("Bearer {t}"))])
        .await
        .expect("stale key still used");
    echo_works(&mut c).await;
    let (_, body) = http_get(proxy.admin, "/metrics").await;
    assert!(metric(&body, "portcullis_jwks_fetches_total{result=\"error\"}") >= 1.0);
}

// ---------------------------------------------------------------------------------------------
// Expiry and revocation

#[tokio::test]
async fn session_is_closed_with_1008_when_its_token_expires() {
    let backend = Backend::echo().await;
    let k = key(Algorithm::ES256, None);
    let text = auth_config(backend.addr, "expiry", json!({}), k.auth_keys()).set("auth.leeway", "0s").text();
    let proxy = Proxy::start_with(&text).await;
    let minted = Instant::now();
    let t = k.token_ttl(std_claims("alice", &["a1"]), Duration::from_secs(2));
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &format!("Bearer {t}"))])
        .await
        .expect("101");
    echo_works(&mut c).await;
    let close = c.recv_close().await;
    assert_eq!(close.close_code(), Some(1008));
    assert_eq!(close.close_reason(), "token expired");
    let elapsed = minted.elapsed();
    assert!(elapsed >= Duration::from_millis(900) && elapsed <= Duration::from_millis(3000 + 500), "{elapsed:?}");
    assert_eq!(backend.log.wait_for("close", |f| f.opcode == op::CLOSE).await.close_code(), Some(1001));
}

#[tokio::test]
async fn revoking_a_subject_closes_its_sessions_with_1008_and_refuses_reconnects() {
    let backend = Backend::echo().await;
    let k = key(Algorithm::ES256, None);
    let proxy = Proxy::start_with(&auth_config(backend.addr, "revoke", json!({}), k.auth_keys()).text()).await;
    let mallory = k.token(std_claims("mallory", &["a1", "a2"]));
    let alice = k.token(std_claims("alice", &["a1"]));
    let bearer = |t: &str| format!("Bearer {t}");
    let mut m1 =
        upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &bearer(&mallory))]).await.expect("m1");
    let mut m2 =
        upgrade(proxy.tls, true, "/agents/a2/terminal", &[("Authorization", &bearer(&mallory))]).await.expect("m2");
    let mut a =
        upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &bearer(&alice))]).await.expect("alice");
    echo_works(&mut m1).await;
    echo_works(&mut m2).await;
    echo_works(&mut a).await;

    let (status, body) = http_get(proxy.admin, "/sessions").await;
    assert_eq!(status, 200);
    let list: Value = serde_json::from_str(&body).expect("json");
    let subjects: Vec<&str> =
        list["sessions"].as_array().expect("array").iter().filter_map(|s| s["subject"].as_str()).collect();
    assert_eq!(subjects.iter().filter(|s| **s == "mallory").count(), 2, "{body}");
    assert!(!body.contains(&mallory), "no token in /sessions");

    let (status, body) = admin_post(proxy.admin, "/sessions/revoke", &json!({"subject": "mallory"}).to_string()).await;
    assert_eq!((status, body.trim()), (200, "{\"closed\":2}"));
    for c in [&mut m1, &mut m2] {
        let f = c.recv_close().await;
        assert_eq!(f.close_code(), Some(1008));
        assert_eq!(f.close_reason(), "session revoked");
    }
    echo_works(&mut a).await;
    let err = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &bearer(&mallory))])
        .await
        .err()
        .expect("refused");
    assert_eq!(err.status, 401, "revoked subject cannot reconnect");
    assert!(failures(proxy.admin, "revoke", "revoked").await >= 1.0);

    // One session by id.
    let (_, body) = http_get(proxy.admin, "/sessions").await;
    let list: Value = serde_json::from_str(&body).expect("json");
    let id = list["sessions"]
        .as_array()
        .expect("array")
        .iter()
        .find(|s| s["subject"] == "alice")
        .and_then(|s| s["id"].as_u64())
        .expect("alice's session");
    let (status, _) = admin_request(proxy.admin, "DELETE", &format!("/sessions/{id}"), "").await;
    assert_eq!(status, 204);
    assert_eq!(a.recv_close().await.close_code(), Some(1008));
}

// ---------------------------------------------------------------------------------------------
// Tokens stay out of logs and the backend

#[tokio::test]
async fn query_token_never_reaches_the_backend_or_the_logs() {
    let backend = Backend::echo().await;
    let k = key(Algorithm::ES256, None);
    let route = json!({"auth": {"sources": ["query:access_token"]}});
    let text = auth_config(backend.addr, "logs", route, k.auth_keys()).text();
    let mut proxy = ProxyProcess::start_with_log(&text, "portcullis=trace").await;
    let t = k.token(std_claims("alice", &["a1"]));
    let mut c =
        upgrade(proxy.plain, false, &format!("/agents/a1/terminal?access_token={t}&cols=80"), &[]).await.expect("101");
    echo_works(&mut c).await;
    c.send(true, op::CLOSE, &close_payload(1000, "")).await;
    c.recv().await;
    // Refused tokens are not logged either.
    let bad = format!("{}x", &t[..t.len() - 1]);
    let err = upgrade(proxy.plain, false, &format!("/agents/a1/terminal?access_token={bad}"), &[])
        .await
        .err()
        .expect("refused");
    assert_eq!(err.status, 401);
    let req = backend.log.requests.lock().expect("lock")[0].clone();
    assert_eq!(req.path, "/agents/a1/terminal?cols=80");
    assert!(!format!("{:?}", req.headers).contains(&t));
    let logs = proxy.stop_and_collect_logs().await;
    assert!(logs.contains("session ended"), "logs were captured: {logs}");
    assert!(logs.contains("alice"), "the session line names the subject");
    let signature = t.rsplit('.').next().expect("signature");
    assert!(!logs.contains(&t) && !logs.contains(signature), "token in logs");
    assert!(!logs.contains(&bad), "refused token in logs");
}

#[tokio::test]
async fn session_api_requires_the_admin_token_when_configured() {
    let backend = Backend::echo().await;
    let secret = write("admin-token", b"s3cret-admin-token\n");
    let text =
        TestConfig::base(&[backend.addr.to_string()]).set("admin.token_file", secret.display().to_string()).text();
    assert!(text.contains("token_file"));
    let proxy = Proxy::start_with(&text).await;
    let (status, _) = http_get(proxy.admin, "/sessions").await;
    assert_eq!(status, 401);
    let (status, _) = admin_request(proxy.admin, "DELETE", "/sessions/1", "").await;
    assert_eq!(status, 401);
    let mut s = tokio::net::TcpStream::connect(proxy.admin).await.expect("admin");
    s.write_all(
        b"GET /sessions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer s3cret-admin-token\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("send");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    assert!(out.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&out));
    let (status, _) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(status, 200, "metrics stay open to scrapers");
    // Every guarded path answers alike without it: 401 naming the scheme (RFC 9110 §11.6.1);
    // only /sessions did before. /limits and /fleet read and change nothing but with GET.
    let raw = |request: String| async move {
        let mut s = tokio::net::TcpStream::connect(proxy.admin).await.expect("admin");
        s.write_all(request.as_bytes()).await.expect("send");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        String::from_utf8_lossy(&out).to_ascii_lowercase()
    };
    for path in ["/sessions", "/routes", "/recordings", "/recordings/x.cast", "/limits", "/fleet"] {
        let out = raw(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")).await;
        assert!(out.starts_with("http/1.1 401"), "{path}: {out}");
        assert!(out.contains("www-authenticate: bearer realm=\"portcullis-admin\""), "{path}: {out}");
    }
    for path in ["/limits", "/fleet"] {
        let out = raw(format!(
            "DELETE {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer s3cret-admin-token\r\nConnection: close\r\n\r\n"
        ))
        .await;
        assert!(out.starts_with("http/1.1 405"), "{path}: {out}");
    }
}

#[tokio::test]
async fn revoking_a_subject_of_one_issuer_leaves_the_same_subject_of_another_alone() {
    let backend = Backend::echo().await;
    let k = key(Algorithm::ES256, None);
    let text = auth_config(backend.addr, "issuers", json!({}), k.auth_keys())
        .set("routes.0.auth.issuers", vec!["https://idp.test", "https://other.test"])
        .text();
    let proxy = Proxy::start_with(&text).await;
    let claims = |iss: &str| json!({"sub": "alice", "agents": ["a1"], "iss": iss, "aud": "agents"});
    let (ours, theirs) = (k.token(claims("https://idp.test")), k.token(claims("https://other.test")));
    let bearer = |t: &str| format!("Bearer {t}");
    let open = |t: String| async move {
        upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &bearer(&t))]).await
    };
    let mut a = open(ours.clone()).await.expect("alice of idp.test");
    let mut b = open(theirs.clone()).await.expect("alice of other.test");
    echo_works(&mut a).await;
    echo_works(&mut b).await;

    let ask = json!({"subject": "alice", "issuer": "https://idp.test"}).to_string();
    let (status, body) = admin_post(proxy.admin, "/sessions/revoke", &ask).await;
    assert_eq!((status, body.trim()), (200, "{\"closed\":1}"));
    assert_eq!(a.recv_close().await.close_code(), Some(1008));
    echo_works(&mut b).await;
    assert_eq!(open(ours).await.err().expect("refused").status, 401, "idp.test's alice is revoked");
    let mut again = open(theirs).await.expect("other.test's alice is not");
    echo_works(&mut again).await;
}

#[tokio::test]
async fn a_revocation_during_the_backend_connect_refuses_the_session() {
    let opts = BackendOpts { delay: Some(Duration::from_millis(1500)), ..Default::default() };
    let backend = Backend::start(opts, echo_handler()).await;
    let k = key(Algorithm::ES256, None);
    let text =
        auth_config(backend.addr, "slow", json!({}), k.auth_keys()).set("backend.handshake_timeout", "5s").text();
    let proxy = Proxy::start_with(&text).await;
    let mallory = k.token(std_claims("mallory", &["a1"]));
    let tls = proxy.tls;
    let connecting = tokio::spawn(async move {
        upgrade(tls, true, "/agents/a1/terminal", &[("Authorization", &format!("Bearer {mallory}"))]).await
    });
    // The session is listed while its backend connect runs, and the revocation finds it.
    eventually("the connecting session is listed", async || {
        let (_, body) = http_get(proxy.admin, "/sessions").await;
        if !body.contains("\"mallory\"") {
            return None;
        }
        assert!(body.contains("\"backend\":null"), "listed before its member is known: {body}");
        Some(())
    })
    .await;
    let (status, body) = admin_post(proxy.admin, "/sessions/revoke", &json!({"subject": "mallory"}).to_string()).await;
    assert_eq!((status, body.trim()), (200, "{\"closed\":1}"));
    let refused = connecting.await.expect("task").err().expect("no 101 for a revoked session");
    assert_eq!(refused.status, 401);
}

#[tokio::test]
async fn a_browser_offering_its_token_and_the_marker_gets_the_marker_when_the_backend_selects_none() {
    // Browsers fail a handshake that offered subprotocols when the 101 selects none. A page
    // lists ["bearer.<token>", "portcullis"]; the proxy answers "portcullis".
    let silent = Backend::echo().await; // selects no subprotocol
    let k = key(Algorithm::ES256, None);
    let proxy = Proxy::start_with(&auth_config(silent.addr, "marker", json!({}), k.auth_keys()).text()).await;
    let t = k.token(std_claims("alice", &["a1"]));
    let offer = format!("bearer.{t}, portcullis");
    let c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Sec-WebSocket-Protocol", &offer)]).await.expect("101");
    assert_eq!(c.response.header("sec-websocket-protocol"), Some("portcullis"));
    let req = silent.log.requests.lock().expect("lock")[0].clone();
    assert_eq!(req.header("sec-websocket-protocol"), None, "neither the token entry nor the marker is forwarded");

    // A backend that selects a real subprotocol is answered with it, never with the token.
    let picking = Backend::start(BackendOpts { pick_protocol: true, ..Default::default() }, echo_handler()).await;
    let proxy = Proxy::start_with(&auth_config(picking.addr, "marker2", json!({}), k.auth_keys()).text()).await;
    let offer = format!("bearer.{t}, portcullis, tty");
    let c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Sec-WebSocket-Protocol", &offer)]).await.expect("101");
    assert_eq!(c.response.header("sec-websocket-protocol"), Some("tty"));
    let req = picking.log.requests.lock().expect("lock")[0].clone();
    assert_eq!(req.header("sec-websocket-protocol"), Some("tty"));
    assert!(!format!("{:?}", c.response).contains(&t), "the token is never echoed");
}

/// Found by an attacker review: a reload that removes a route while a handshake on it waits in
/// the auth stage (its JWKS key still being fetched) missed that session. The reload cut the
/// sessions it listed, and the late one got its 101 and lived on the removed route until a
/// deadline. A session registered on a route no longer in force is refused now (503), and the
/// grace period's end cuts whatever is on a removed route then.
#[tokio::test]
async fn a_handshake_a_reload_overtakes_gets_no_session_on_its_removed_route() {
    let backend = Backend::echo().await;
    let (k0, k1) = (key(Algorithm::ES256, Some("k0")), key(Algorithm::ES256, Some("k1")));
    let doc = Arc::new(Mutex::new(json!({"keys": [jwk(&k0)]}).to_string()));
    let d = doc.clone();
    // Every key-set fetch takes 3 s: the reload below (in-process, milliseconds) is done well
    // before the waiting handshake's fetch returns.
    let (addr, hits) = http_server(move |_| (200, d.lock().expect("lock").clone()), Duration::from_secs(3)).await;
    let mut source = jwks_source(format!("http://{addr}/jwks"));
    source["timeout"] = json!("10s");
    let extra = json!({"auth": {"jwks": [source]}, "server": {"removed_route_grace": "300ms"}});
    let config = auth_config(backend.addr, "leaving", json!({}), extra);
    let proxy = Proxy::start_with(&config.text()).await;
    let bearer = |t: &str| format!("Bearer {t}");
    let t0 = k0.token(std_claims("alice", &["a1"]));
    eventually("the first key set is in", async || {
        upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &bearer(&t0))]).await.ok()
    })
    .await;
    // A k1 token waits in the auth stage for the key set's next fetch.
    *doc.lock().expect("lock") = json!({"keys": [jwk(&k0), jwk(&k1)]}).to_string();
    let before = hits.load(Ordering::SeqCst);
    let t1 = k1.token(std_claims("alice", &["a1"]));
    let tls = proxy.tls;
    let late = tokio::spawn(async move {
        upgrade(tls, true, "/agents/a1/terminal", &[("Authorization", &format!("Bearer {t1}"))])
            .await
            .err()
            .map(|h| h.status)
    });
    eventually("the handshake waits for the fetch", async || (hits.load(Ordering::SeqCst) > before).then_some(()))
        .await;
    let without = config.set("routes.0.name", "other").set("routes.0.path", "/other/{agent}").text();
    let parsed = portcullis::config::Config::parse(&without, std::path::Path::new("reload.toml")).expect("valid");
    proxy.handle.reload(parsed).expect("reload");
    assert_eq!(late.await.expect("task"), Some(503), "no session on the removed route");
    let (_, sessions) = admin_request(proxy.admin, "GET", "/sessions", "").await;
    assert!(!sessions.contains("\"route\":\"leaving\""), "{sessions}");
}

/// Found by a review of the key-retirement fix: a reload built its JWKS sources afresh, so a
/// source it removed (or a key its kept source's next fetch dropped) ended no session. A reload
/// that removes a source ends the sessions of its keys; a source it keeps starts from the keys
/// it had, and its sessions go on.
#[tokio::test]
async fn a_reload_ends_the_sessions_of_a_jwks_source_it_removes_and_keeps_those_of_one_it_keeps() {
    let backend = Backend::echo().await;
    let (k1, k2) = (key(Algorithm::ES256, Some("k1")), key(Algorithm::ES256, Some("k2")));
    let (one, two) = (
        jwks_server(json!({"keys": [jwk(&k1)]}).to_string()).await,
        jwks_server(json!({"keys": [jwk(&k2)]}).to_string()).await,
    );
    let source = |s: &JwksServer| jwks_source(format!("http://{}/jwks", s.addr));
    let both =
        auth_config(backend.addr, "jwks_reload", json!({}), json!({"auth": {"jwks": [source(&one), source(&two)]}}));
    let proxy = Proxy::start_with(&both.text()).await;
    let bearer = |t: &str| format!("Bearer {t}");
    let open = async |k: &Key| {
        let t = k.token(std_claims("alice", &["a1"]));
        eventually("the source's keys are in", async || {
            upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &bearer(&t))]).await.ok()
        })
        .await
    };
    let (mut kept, mut dropped) = (open(&k1).await, open(&k2).await);
    let only_one = auth_config(backend.addr, "jwks_reload", json!({}), json!({"auth": {"jwks": [source(&one)]}}));
    let parsed =
        portcullis::config::Config::parse(&only_one.text(), std::path::Path::new("reload.toml")).expect("valid");
    proxy.handle.reload(parsed).expect("reload");
    let close = dropped.recv_close().await;
    assert_eq!((close.close_code(), close.close_reason().as_str()), (Some(1008), "session revoked"));
    echo_works(&mut kept).await;
}
