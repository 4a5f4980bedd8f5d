//! `kind = "mcp"`: what the proxy reads and checks of each MCP message before the server sees
//! it (the method, the tool, the headers that repeat them, the revision, the origin), what it
//! answers instead (a JSON-RPC error), a session's end, and the keep-alive of its streams.
//! The official SDK's client and server are driven through the proxy by `tests/mcp/run.sh`.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};

use super::harness::*;

/// A proxy with the route `mcp` (`/agents/{agent}/mcp`, kind mcp, `member`, a token granting
/// the agent, a tool scope), with `extra` merged into the route.
async fn start(key: &Hmac, member: std::net::SocketAddr, extra: Value) -> Proxy {
    let mut route = json!({
        "kind": "mcp",
        "mcp": {"tool_scope": "mcp:{agent}:tools/call:{tool}", "metric_tools": ["echo"]},
    });
    if let (Some(route), Value::Object(extra)) = (route.as_object_mut(), extra) {
        route.extend(extra);
    }
    super::affinity::start_route(key, &[member], route).await
}

/// A token for agents `a1` and `a2` with `scope`.
fn token(key: &Hmac, sub: &str, scope: &str) -> String {
    format!("Bearer {}", key.token_with(json!({"sub": sub, "agents": ["a1", "a2"], "scope": scope})))
}

/// POST `body` to `/agents/a1/mcp` as JSON with `auth` and `headers`.
async fn post(proxy: &Proxy, auth: &str, body: &str, headers: &[(&str, &str)]) -> Answer {
    post_to(proxy, "/agents/a1/mcp", auth, body, headers).await
}

async fn post_to(proxy: &Proxy, path: &str, auth: &str, body: &str, headers: &[(&str, &str)]) -> Answer {
    let mut all = vec![("authorization", auth), ("content-type", "application/json")];
    all.extend_from_slice(headers);
    let req = request("POST", path, &all, full(Bytes::from(body.to_owned())));
    H1::connect(proxy.tls, true).await.call(req).await
}

fn call_body(id: u64, tool: &str) -> String {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": {}}}).to_string()
}

/// The JSON-RPC error of a refusal: its id and code.
fn rpc_error(a: &Answer) -> (Value, i64) {
    assert_eq!(a.header("content-type"), Some("application/json"), "{}", a.text());
    let v: Value = serde_json::from_slice(&a.body).expect("a JSON-RPC error");
    assert_eq!(v["jsonrpc"], "2.0");
    (v["id"].clone(), v["error"]["code"].as_i64().expect("code"))
}

#[tokio::test]
async fn a_tool_is_called_only_when_the_token_grants_it_and_a_refusal_is_a_json_rpc_error() {
    let member = RestBackend::start("m1").await;
    let key = hmac();
    // A route name of its own: the metrics are the test process's.
    let proxy = start(&key, member.addr, json!({"name": "mcp-grants"})).await;
    let alice = token(&key, "alice", "mcp:a1:tools/call:echo");

    let ok = post(&proxy, &alice, &call_body(1, "echo"), &[]).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(member.seen()[0].headers["x-body"], call_body(1, "echo"), "forwarded unchanged");

    // A tool the token does not grant: 403, one JSON-RPC error with the call's id, the scope
    // that would grant it, and nothing reaches the server.
    let denied = post(&proxy, &alice, &call_body(7, "shell"), &[]).await;
    assert_eq!(denied.status, 403);
    assert_eq!(rpc_error(&denied), (json!(7), -32602));
    let challenge = denied.header("www-authenticate").expect("challenge");
    assert!(challenge.contains("insufficient_scope") && challenge.contains("mcp:a1:tools/call:shell"), "{challenge}");
    // The same tool hidden in a batch (2025-03-26), or behind a repeated key that another
    // parser would read differently: refused whole.
    let batch = format!("[{},{}]", call_body(8, "echo"), call_body(9, "shell"));
    let refused = post(&proxy, &alice, &batch, &[]).await;
    assert_eq!(refused.status, 403);
    let errors: Value = serde_json::from_slice(&refused.body).expect("errors");
    assert_eq!(errors.as_array().map(Vec::len), Some(2), "an error for each request: {errors}");
    // The refused call's error says why; the other's only that it went with the batch.
    assert_eq!((errors[1]["id"].clone(), errors[1]["error"]["code"].clone()), (json!(9), json!(-32602)));
    assert_eq!(errors[0]["error"]["message"], "refused with the batch it came in");
    for smuggled in [
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"echo","name":"shell"}}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/list","method":"tools/call","params":{"name":"shell"}}"#,
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"echo"}} {"x":1}"#,
        // Keys a server that ignores case reads as the ones checked (Go's encoding/json, and
        // go-sdk before 1.3.1, CVE-2026-27896; found by an attacker review, 2026-12-07): the
        // tool's name in another case, `ſ` for `s`, in a batch too.
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"echo","Name":"shell"}}"#,
        "{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"tools/call\",\"params\":{\"name\":\"echo\"},\"param\u{17f}\":{\"name\":\"shell\"}}",
        r#"[{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"NAME":"shell","name":"echo"}}]"#,
    ] {
        let a = post(&proxy, &alice, smuggled, &[]).await;
        assert_eq!(a.status, 400, "{smuggled}");
        assert!(matches!(rpc_error(&a).1, -32600 | -32602 | -32700), "{smuggled}");
    }
    // A body the proxy cannot read cannot pass: compressed, not JSON, over max_message.
    let req = request(
        "POST",
        "/agents/a1/mcp",
        &[("authorization", alice.as_str()), ("content-type", "application/json"), ("content-encoding", "gzip")],
        full(Bytes::from_static(b"\x1f\x8b")),
    );
    assert_eq!(H1::connect(proxy.tls, true).await.call(req).await.status, 415);
    let req = request(
        "POST",
        "/agents/a1/mcp",
        &[("authorization", alice.as_str()), ("content-type", "text/plain")],
        full(call_body(2, "shell")),
    );
    assert_eq!(H1::connect(proxy.tls, true).await.call(req).await.status, 415);
    let huge = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"x": "y".repeat(2 << 20)}}});
    assert_eq!(post(&proxy, &alice, &huge.to_string(), &[]).await.status, 413);
    assert_eq!(member.seen().len(), 1, "only the granted call reached the server");

    // The per-method metric, with the tool only when listed.
    let (_, text) = admin_request(proxy.admin, "GET", "/metrics", "").await;
    let series = |tool: &str, result: &str| {
        format!("portcullis_mcp_messages_total{{route=\"mcp-grants\",method=\"tools/call\",tool=\"{tool}\",result=\"{result}\"}}")
    };
    assert_eq!(metric(&text, &series("echo", "forwarded")), 1.0, "{text}");
    assert_eq!(metric(&text, &series("other", "denied")), 2.0, "shell alone, then in the batch");
    assert_eq!(metric(&text, &series("echo", "refused")), 1.0, "echo, refused with the batch it came in");
}

#[tokio::test]
async fn the_method_and_name_headers_must_say_what_the_body_says() {
    let member = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = start(&key, member.addr, json!({})).await;
    let alice = token(&key, "alice", "mcp:a1:tools/call:*");
    let body = call_body(1, "echo");
    let v2026 = ("mcp-protocol-version", "2026-07-28");
    for (headers, status) in [
        (vec![("mcp-method", "tools/call"), ("mcp-name", "echo")], 200),
        (vec![v2026, ("mcp-method", "tools/call"), ("mcp-name", "echo")], 200),
        (vec![v2026, ("mcp-method", "tools/call"), ("mcp-name", "=?base64?ZWNobw==?=")], 200),
        (vec![("mcp-method", "tools/list"), ("mcp-name", "echo")], 400),
        (vec![("mcp-method", "tools/call"), ("mcp-name", "shell")], 400),
        (vec![v2026], 400),
        (vec![v2026, ("mcp-method", "tools/call")], 400),
    ] {
        let a = post(&proxy, &alice, &body, &headers).await;
        assert_eq!(a.status, status, "{headers:?}: {}", a.text());
        if status == 400 {
            assert_eq!(rpc_error(&a), (json!(1), -32020), "HeaderMismatch, with the request's id");
        }
    }
    assert_eq!(member.seen().len(), 3);
}

#[tokio::test]
async fn a_foreign_origin_an_unknown_revision_and_another_method_are_refused() {
    let member = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = start(&key, member.addr, json!({})).await;
    let alice = token(&key, "alice", "");
    let ping = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    // A page of another site (DNS rebinding) is refused; a client that sends no Origin is not.
    assert_eq!(post(&proxy, &alice, ping, &[("origin", "https://evil.example")]).await.status, 403);
    assert_eq!(post(&proxy, &alice, ping, &[]).await.status, 200);
    let old = post(&proxy, &alice, ping, &[("mcp-protocol-version", "2024-11-05")]).await;
    assert_eq!(old.status, 400);
    assert_eq!(rpc_error(&old).1, -32022);
    let v: Value = serde_json::from_slice(&old.body).expect("json");
    assert_eq!(v["error"]["data"]["requested"], "2024-11-05");
    assert!(v["error"]["data"]["supported"].as_array().is_some_and(|s| s.contains(&json!("2025-11-25"))));
    let req = request("PUT", "/agents/a1/mcp", &[("authorization", alice.as_str())], full(ping));
    let put = H1::connect(proxy.tls, true).await.call(req).await;
    assert_eq!((put.status, put.header("allow")), (405, Some("GET, POST, DELETE")));
    // Only a POST carries a message: a GET or DELETE with one (for a backend that reads any
    // method's body, or honours an override) is refused, as is an override on a POST.
    let call = call_body(3, "secret");
    for (method, extra) in [("GET", None), ("DELETE", None), ("POST", Some(("x-http-method-override", "DELETE")))] {
        let mut headers = vec![("authorization", alice.as_str()), ("content-type", "application/json")];
        headers.extend(extra);
        let req = request(method, "/agents/a1/mcp", &headers, full(call.clone()));
        let a = H1::connect(proxy.tls, true).await.call(req).await;
        assert_eq!(a.status, 400, "{method} {extra:?}: {}", a.text());
    }
    // An origin the route lists is served.
    let listed = start(&key, member.addr, json!({"origin": {"allow": ["https://app.example"]}})).await;
    assert_eq!(post(&listed, &alice, ping, &[("origin", "https://app.example")]).await.status, 200);
    assert_eq!(member.seen().len(), 2);
}

#[tokio::test]
async fn a_deleted_session_cannot_be_replayed() {
    let member = RestBackend::start("m1").await;
    let key = hmac();
    let keys = tempfile::NamedTempFile::new().expect("keys");
    std::fs::write(keys.path(), "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n").expect("write keys");
    let affinity = json!({"affinity": {"keys_file": keys.path().display().to_string()}});
    let proxy = start(&key, member.addr, affinity).await;
    let alice = token(&key, "alice", "");
    let init = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#;
    let first = post(&proxy, &alice, init, &[]).await;
    let envelope = first.header("mcp-session-id").expect("envelope").to_owned();
    let ping = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    assert_eq!(post(&proxy, &alice, ping, &[("mcp-session-id", &envelope)]).await.status, 200);
    // Sealed for agent a1's path: on a2's, whose grants may differ, it does not open.
    let other = post_to(&proxy, "/agents/a2/mcp", &alice, ping, &[("mcp-session-id", &envelope)]).await;
    assert_eq!(other.status, 404, "{}", other.text());

    let req = request(
        "DELETE",
        "/agents/a1/mcp",
        &[("authorization", alice.as_str()), ("mcp-session-id", envelope.as_str())],
        full(Bytes::new()),
    );
    assert_eq!(H1::connect(proxy.tls, true).await.call(req).await.status, 200);
    let deleted = member.seen().last().cloned().expect("the DELETE");
    assert_eq!(deleted.method, "DELETE");
    assert!(deleted.headers["mcp-session-id"].starts_with("m1-session-"), "the server ends its own id");
    // This test server would take the id again; the proxy does not let the envelope through.
    let replay = post(&proxy, &alice, ping, &[("mcp-session-id", &envelope)]).await;
    assert_eq!(replay.status, 404, "{}", replay.text());
    assert!(replay.text().contains("ended"), "{}", replay.text());
    assert_eq!(member.seen().len(), 3);
}

#[tokio::test]
async fn an_idle_event_stream_gets_keep_alive_comments_between_events_and_is_not_cut() {
    let member = RestBackend::start("m1").await;
    let key = hmac();
    let text = TestConfig::base(&["127.0.0.1:1".to_owned()])
        .merge("", key.auth_keys())
        .merge(
            "",
            json!({"routes": [{
                "name": "events",
                "path": "/agents/{agent}/sse",
                "kind": "mcp",
                "backends": [member.addr.to_string()],
                "auth": {"agent_claim": "agents"},
                "backend": {"sse_keepalive": "100ms", "idle_body_timeout": "300ms"},
            }]}),
        )
        .text();
    let proxy = Proxy::start_with(&text).await;
    let alice = token(&key, "alice", "");
    // One event, then the server says nothing (an MCP server's GET stream between messages).
    let req = request("GET", "/agents/a1/sse?n=1&hold=1", &[("authorization", alice.as_str())], full(Bytes::new()));
    let mut c = H1::connect(proxy.tls, true).await;
    let resp = c.send(req).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = String::new();
    // Three comments take 300 ms and more: past idle_body_timeout, the stream is still open.
    while got.matches(": keep-alive\n\n").count() < 4 {
        use http_body_util::BodyExt as _;
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("a frame in time")
            .expect("the stream is open")
            .expect("a frame");
        if let Ok(data) = frame.into_data() {
            got.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(got.starts_with("id: 0\ndata: 0\n\n: keep-alive\n\n"), "{got:?}");

    // A member silent in the middle of an event gets no comment (it would split the event) and
    // is cut after idle_body_timeout, as any body.
    let req =
        request("GET", "/agents/a1/sse?n=1&hold=1&partial=1", &[("authorization", alice.as_str())], full(Bytes::new()));
    let resp = H1::connect(proxy.tls, true).await.send(req).await;
    let mut body = resp.into_body();
    let mut got = String::new();
    let ended = loop {
        use http_body_util::BodyExt as _;
        match tokio::time::timeout(Duration::from_secs(5), body.frame()).await.expect("cut in time") {
            Some(Ok(frame)) => got.push_str(&String::from_utf8_lossy(&frame.into_data().unwrap_or_default())),
            Some(Err(_)) | None => break got,
        }
    };
    assert_eq!(ended, "id: 0\ndata: 0\n\ndata: partial\n", "no comment inside the open event");
}
