//! Stateful session affinity (`[routes.affinity]`): a member's session header goes to the
//! client sealed, and brings every later request back to that member, through any instance,
//! for the subject it was sealed for only.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use super::harness::*;

/// A proxy with the route `mcp` (`/agents/{agent}/mcp`, kind http, round robin over `members`,
/// a token granting the agent), with `extra` merged into the route.
pub(super) async fn start_route(key: &Hmac, members: &[SocketAddr], extra: serde_json::Value) -> Proxy {
    let members: Vec<String> = members.iter().map(SocketAddr::to_string).collect();
    let text = TestConfig::base(&["127.0.0.1:1".to_owned()])
        .merge("", key.auth_keys())
        .merge(
            "",
            json!({"routes": [{
                "name": "mcp",
                "path": "/agents/{agent}/mcp",
                "kind": "http",
                "backends": members,
                "balance": {"policy": "round_robin"},
                "auth": {"agent_claim": "agents", "required_claims": ["sub"]},
            }]}),
        )
        .merge("routes.1", extra)
        .text();
    Proxy::start_with(&text).await
}

/// The route `mcp` sealing `mcp-session-id` with the keys in `keys`.
async fn start(key: &Hmac, members: &[SocketAddr], keys: &std::path::Path) -> Proxy {
    start_route(key, members, json!({"affinity": {"keys_file": keys.display().to_string()}})).await
}

fn key_file(keys: &[[u8; 32]]) -> tempfile::NamedTempFile {
    use base64::Engine as _;
    let file = tempfile::NamedTempFile::new().expect("keys file");
    let text: Vec<String> = keys.iter().map(|k| base64::engine::general_purpose::STANDARD.encode(k)).collect();
    std::fs::write(file.path(), text.join("\n")).expect("write keys");
    file
}

/// POST /agents/a1/mcp with `auth`, and `session` as `mcp-session-id` when given.
async fn call(proxy: &Proxy, auth: &str, session: Option<&str>) -> Answer {
    let mut c = H1::connect(proxy.tls, true).await;
    let mut headers = vec![("authorization", auth)];
    if let Some(s) = session {
        headers.push(("mcp-session-id", s));
    }
    c.get("/agents/a1/mcp", &headers).await
}

#[tokio::test]
async fn a_session_stays_on_the_member_that_created_it_through_any_instance_for_its_subject_only() {
    let (m1, m2) = (RestBackend::start("m1").await, RestBackend::start("m2").await);
    let key = hmac();
    let keys = key_file(&[[7; 32]]);
    let a = start(&key, &[m1.addr, m2.addr], keys.path()).await;
    let b = start(&key, &[m1.addr, m2.addr], keys.path()).await;
    let alice = format!("Bearer {}", key.token("alice", &["a1"], Duration::from_secs(600)));

    let first = call(&a, &alice, None).await;
    assert_eq!(first.status, 200);
    let member = first.headers["x-member"].to_str().expect("member").to_owned();
    let envelope = first.headers["mcp-session-id"].to_str().expect("id").to_owned();
    assert!(envelope.starts_with("pc1."), "the client gets the sealed envelope: {envelope}");
    // Nothing of what it holds is readable in it: not the member's address, the backend's id or
    // the subject. (The member's two-letter name would turn up by chance in ~190 random
    // characters, so it is not what is looked for.)
    let raw = {
        use base64::Engine as _;
        let body = envelope.strip_prefix("pc1.").expect("prefix");
        base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(body).expect("base64url")
    };
    for plain in [b"127.0.0.1".as_slice(), b"-session-", b"alice"] {
        assert!(
            !raw.windows(plain.len()).any(|w| w == plain),
            "{:?} is readable in it",
            String::from_utf8_lossy(plain)
        );
    }
    // Round robin would alternate: the session keeps every request on its member, through
    // either instance, and the member gets its own id back.
    for proxy in [&a, &b, &a, &b] {
        let r = call(proxy, &alice, Some(&envelope)).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(r.headers["x-member"].to_str().ok(), Some(member.as_str()));
        assert_eq!(r.headers["mcp-session-id"].to_str().ok(), Some(envelope.as_str()), "the session's id is stable");
        let body = String::from_utf8_lossy(&r.body).into_owned();
        assert!(body.starts_with(&format!("{member}:{member}-session-")), "the backend's own id: {body}");
    }
    // Another subject replaying it, a tampered one, or the backend's raw id: 404.
    let mallory = format!("Bearer {}", key.token("mallory", &["a1"], Duration::from_secs(600)));
    assert_eq!(call(&a, &mallory, Some(&envelope)).await.status, 404);
    let mut tampered = envelope.clone().into_bytes();
    let last = tampered.len() - 2;
    tampered[last] = if tampered[last] == b'A' { b'B' } else { b'A' };
    assert_eq!(call(&a, &alice, Some(&String::from_utf8(tampered).expect("utf8"))).await.status, 404);
    assert_eq!(call(&a, &alice, Some("m1-session-0-1")).await.status, 404, "a raw id is not an envelope");
    // An instance with other keys cannot open it; one whose pool lost the member says so.
    let other_keys = key_file(&[[8; 32]]);
    let c = start(&key, &[m1.addr, m2.addr], other_keys.path()).await;
    assert_eq!(call(&c, &alice, Some(&envelope)).await.status, 404);
    let survivor = if member == "m1" { m2.addr } else { m1.addr };
    let d = start(&key, &[survivor], keys.path()).await;
    let gone = call(&d, &alice, Some(&envelope)).await;
    assert_eq!(gone.status, 404);
    assert!(String::from_utf8_lossy(&gone.body).contains("gone"), "{:?}", gone.body);
    // A rotated key set (a new key first, the old one still listed) opens it.
    let rotated = key_file(&[[9; 32], [7; 32]]);
    let e = start(&key, &[m1.addr, m2.addr], rotated.path()).await;
    assert_eq!(call(&e, &alice, Some(&envelope)).await.headers["x-member"].to_str().ok(), Some(member.as_str()));
}

/// Found by an attacker review (2026-12-06): `Mcp.Session.Id: <raw id>` is not the envelope's
/// header to the proxy, so it went to the backend unchecked, and a backend that folds header
/// names (PHP, CGI) read it as `Mcp-Session-Id`: another subject's raw session id, past the
/// envelope. Every other spelling of the header is dropped.
#[tokio::test]
async fn another_spelling_of_the_session_header_does_not_reach_the_backend() {
    let m1 = RestBackend::start("m1").await;
    let key = hmac();
    let keys = key_file(&[[7; 32]]);
    let extra =
        json!({"headers_with_underscores": "allow", "affinity": {"keys_file": keys.path().display().to_string()}});
    let proxy = start_route(&key, &[m1.addr], extra).await;
    let bob = format!("Bearer {}", key.token("bob", &["a1"], Duration::from_secs(600)));
    let mut c = H1::connect(proxy.tls, true).await;
    let headers =
        [("authorization", bob.as_str()), ("mcp.session.id", "m1-session-0-1"), ("mcp_session_id", "m1-session-0-1")];
    assert_eq!(c.get("/agents/a1/mcp", &headers).await.status, 200);
    let seen = &m1.seen()[0];
    let spelled: Vec<&String> =
        seen.headers.keys().filter(|k| k.replace(['_', '.'], "-") == "mcp-session-id").collect();
    assert!(spelled.is_empty(), "a spelling of the session header reached the backend: {:?}", seen.headers);
}

#[test]
fn affinity_without_keys_is_refused_by_validation() {
    let text =
        TestConfig::base(&["127.0.0.1:1".to_owned()]).merge("routes.0", json!({"kind": "http", "affinity": {}})).text();
    let err = portcullis::config::Config::parse(&text, std::path::Path::new("a.toml")).expect_err("refused");
    assert!(err.to_string().contains("no default key"), "{err}");
}

/// A protected resource (RFC 9728): its metadata, the 401 challenge naming it, and tokens whose
/// audience is the resource (RFC 8707).
mod resource {
    use super::*;

    async fn start(key: &Hmac, member: SocketAddr) -> Proxy {
        let resource = json!({"resource": {
            "id": "https://edge.example.com/agents/{agent}/mcp",
            "authorization_servers": ["https://idp.example.com"],
            "scopes_supported": ["mcp:tools"],
        }});
        start_route(key, &[member], resource).await
    }

    /// GET `path` with `Host: host` and `headers`.
    async fn get_as(proxy: &Proxy, host: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut b = hyper::Request::builder().method("GET").uri(path).header("host", host);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        H1::connect(proxy.tls, true).await.call(b.body(full(bytes::Bytes::new())).expect("request")).await
    }

    #[tokio::test]
    async fn the_metadata_is_served_and_every_401_names_it_from_the_configured_url_not_the_host() {
        let member = RestBackend::start("m1").await;
        let key = hmac();
        let proxy = start(&key, member.addr).await;
        let meta = get_as(&proxy, "evil.example", "/.well-known/oauth-protected-resource/agents/a1/mcp", &[]).await;
        assert_eq!(meta.status, 200);
        let doc: serde_json::Value = serde_json::from_slice(&meta.body).expect("json");
        assert_eq!(doc["resource"], "https://edge.example.com/agents/a1/mcp");
        assert_eq!(doc["authorization_servers"], json!(["https://idp.example.com"]));
        assert_eq!(doc["scopes_supported"], json!(["mcp:tools"]));
        let none = get_as(&proxy, "localhost", "/.well-known/oauth-protected-resource/agents/a1/elsewhere", &[]).await;
        assert_eq!(none.status, 404);
        // No token: 401, and the challenge names the metadata (never the request's Host).
        let refused = get_as(&proxy, "evil.example", "/agents/a1/mcp", &[]).await;
        assert_eq!(refused.status, 401);
        let challenge = refused.headers["www-authenticate"].to_str().expect("ascii");
        assert!(
            challenge.contains(
                "resource_metadata=\"https://edge.example.com/.well-known/oauth-protected-resource/agents/a1/mcp\""
            ),
            "{challenge}"
        );
        assert!(!challenge.contains("evil"), "{challenge}");
    }

    #[tokio::test]
    async fn a_token_is_taken_only_when_its_audience_is_the_resource_and_never_reaches_the_member() {
        let member = RestBackend::start("m1").await;
        let key = hmac();
        let proxy = start(&key, member.addr).await;
        let token = |aud: &str| {
            let t = key.token_with(json!({"sub": "alice", "agents": ["a1"], "aud": aud}));
            format!("Bearer {t}")
        };
        let wrong =
            get_as(&proxy, "localhost", "/agents/a1/mcp", &[("authorization", &token("https://other.example"))]).await;
        assert_eq!(wrong.status, 401, "a token minted for another resource");
        assert!(wrong.headers["www-authenticate"].to_str().expect("ascii").contains("invalid_token"));
        let other_agent = get_as(
            &proxy,
            "localhost",
            "/agents/a1/mcp",
            &[("authorization", &token("https://edge.example.com/agents/a2/mcp"))],
        )
        .await;
        assert_eq!(other_agent.status, 401, "the resource of another agent");
        let good = get_as(
            &proxy,
            "localhost",
            "/agents/a1/mcp",
            &[("authorization", &token("https://edge.example.com/agents/a1/mcp"))],
        )
        .await;
        assert_eq!(good.status, 200, "{:?}", good.body);
        let seen = member.seen();
        assert!(!seen.last().expect("a request").headers.contains_key("authorization"), "the token stays at the edge");
    }
}
