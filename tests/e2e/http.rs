//! Plain HTTP routes (REST and SSE) through the proxy: streamed bodies both ways, limits,
//! hop-by-hop headers, keep-alive pools, timeouts, retries, SSE as governed sessions, and the
//! same auth and member choice as WebSockets.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::*;

/// The base configuration plus the route `api` (`/agents/{agent}/api/{*rest}` to
/// `/v1/{rest}`, kind http) to `members`, with `backend` merged into the route's `backend` table.
fn api_config(key: &Hmac, members: &[SocketAddr], backend: Value) -> TestConfig {
    let members: Vec<String> = members.iter().map(SocketAddr::to_string).collect();
    TestConfig::base(&["127.0.0.1:1".to_owned()])
        .merge("auth", json!({"leeway": "0s"}))
        .merge("", key.auth_keys())
        .merge(
            "",
            json!({"routes": [{
                "name": "api",
                "path": "/agents/{agent}/api/{*rest}",
                "kind": "http",
                "backends": members,
                "backend_path": "/v1/{rest}",
                "auth": {
                    "sources": ["bearer", "cookie:portcullis_token", "query:access_token"],
                    "agent_claim": "agents",
                },
                "origin": {"allow": ["https://console.example.com"]},
                "backend": {"connect_timeout": "1s"},
            }]}),
        )
        .merge("routes.1.backend", backend)
}

async fn start(key: &Hmac, members: &[SocketAddr], backend: Value) -> Proxy {
    Proxy::start_with(&api_config(key, members, backend).text()).await
}

fn post(path: &str, auth: &str, body: TBody) -> hyper::Request<TBody> {
    request("POST", path, &[("authorization", auth)], body)
}

/// A chunked body: `chunks` sent `gap` apart.
fn chunked(chunks: Vec<Bytes>, gap: Duration) -> TBody {
    let stream = futures_util::stream::unfold(chunks.into_iter(), move |mut it| async move {
        let next = it.next()?;
        tokio::time::sleep(gap).await;
        Some((Ok::<_, std::io::Error>(Frame::data(next)), it))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

#[tokio::test]
async fn rest_round_trips_bodies_of_0_bytes_1_mib_and_chunked_on_one_kept_alive_connection() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = start(&key, &[backend.addr], json!({})).await;
    let auth = key.bearer(&["a1"]);
    let mut c = H1::connect(proxy.tls, true).await;

    let empty = c.call(post("/agents/a1/api/echo", &auth, full(Bytes::new()))).await;
    assert_eq!((empty.status, empty.body.len()), (200, 0));

    let big: Vec<u8> = (0..(1 << 20)).map(|i| (i * 7 % 251) as u8).collect();
    let answer = c.call(post("/agents/a1/api/echo", &auth, full(big.clone()))).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-body-len"), Some("1048576"));
    assert!(answer.body == big, "the 1 MiB body came back changed");

    let parts: Vec<Bytes> = (0..5).map(|i| Bytes::from(format!("chunk-{i};"))).collect();
    let answer = c.call(post("/agents/a1/api/echo", &auth, chunked(parts, Duration::from_millis(20)))).await;
    assert_eq!(answer.text(), "chunk-0;chunk-1;chunk-2;chunk-3;chunk-4;");
    let seen = backend.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[2].headers.get("transfer-encoding").map(String::as_str), Some("chunked"));
    assert_eq!(seen[1].headers.get("content-length").map(String::as_str), Some("1048576"));
    assert_eq!(seen[1].uri, "/v1/echo", "the catch-all lands where backend_path puts it");
}

#[tokio::test]
async fn catch_all_captures_keep_the_rest_of_the_path_and_the_query() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = start(&key, &[backend.addr], json!({})).await;
    let mut c = H1::connect(proxy.plain, false).await;
    let a = c.get("/agents/a1/api/tasks/7/headers?since=3&x=y", &[("authorization", &key.bearer(&["a1"]))]).await;
    assert_eq!(a.status, 200);
    assert_eq!(backend.seen()[0].uri, "/v1/tasks/7/headers?since=3&x=y");
    // A segment that is not a valid id is refused at the route stage.
    let a = c.get("/agents/a1/api/tasks/%2e%2e/headers", &[("authorization", &key.bearer(&["a1"]))]).await;
    assert_eq!(a.status, 400);
}

#[tokio::test]
async fn a_resume_id_never_reaches_the_backend_of_a_plain_request_either() {
    // A route that resumes WebSocket sessions and proxies plain requests: a resume id is a
    // credential for the user's parked session, so no request carries it on to the backend.
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let text = api_config(&key, &[backend.addr], json!({}))
        .set("routes.1.kind", "both")
        .merge("routes.1.auth", json!({"required_claims": ["sub"]}))
        .merge("routes.1", json!({"resume": {}}))
        .text();
    let proxy = Proxy::start_with(&text).await;
    let mut c = H1::connect(proxy.plain, false).await;
    let a = c.get("/agents/a1/api/headers?resume=r3sume-1d&x=y", &[("authorization", &key.bearer(&["a1"]))]).await;
    assert_eq!(a.status, 200);
    assert_eq!(backend.seen()[0].uri, "/v1/headers?x=y");
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_and_never_reaches_the_backend() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = start(&key, &[backend.addr], json!({"max_request_body": "1KiB"})).await;
    let auth = key.bearer(&["a1"]);
    // Content-Length over the limit with Expect: 100-continue: 413 at once, no 100, no body sent.
    let mut s = tokio::net::TcpStream::connect(proxy.plain).await.expect("connect");
    let head = format!(
        "POST /agents/a1/api/echo HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 4096\r\nExpect: 100-continue\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("send");
    let mut got = vec![0u8; 512];
    let n = tokio::time::timeout(SOON, s.read(&mut got)).await.expect("answer in time").expect("read");
    let text = String::from_utf8_lossy(&got[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    // A chunked body that grows past the limit is cut with 413 too.
    let mut c = H1::connect(proxy.plain, false).await;
    let parts: Vec<Bytes> = (0..4).map(|_| Bytes::from(vec![b'x'; 600])).collect();
    let a = c.call(post("/agents/a1/api/echo", &auth, chunked(parts, Duration::from_millis(5)))).await;
    assert_eq!(a.status, 413);
    assert!(backend.seen().iter().all(|s| s.body_len <= 1024), "no over-limit body was delivered");
}

#[tokio::test]
async fn expect_100_continue_is_answered_and_the_body_goes_through() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = start(&key, &[backend.addr], json!({})).await;
    let mut s = tokio::net::TcpStream::connect(proxy.plain).await.expect("connect");
    let head = format!(
        "POST /agents/a1/api/echo HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        key.bearer(&["a1"])
    );
    s.write_all(head.as_bytes()).await.expect("send head");
    let mut got = vec![0u8; 64];
    let n = tokio::time::timeout(SOON, s.read(&mut got)).await.expect("100 in time").expect("read");
    assert!(String::from_utf8_lossy(&got[..n]).starts_with("HTTP/1.1 100 Continue"));
    s.write_all(b"hello").await.expect("send body");
    let mut rest = vec![0u8; 1024];
    let n = tokio::time::timeout(SOON, s.read(&mut rest)).await.expect("200 in time").expect("read");
    let text = String::from_utf8_lossy(&rest[..n]);
    assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("hello"), "{text}");
    assert!(!backend.seen()[0].headers.contains_key("expect"), "the proxy answered Expect itself");
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways_and_forwarding_headers_set() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = start(&key, &[backend.addr], json!({})).await;
    let mut c = H1::connect(proxy.tls, true).await;
    let a = c
        .get(
            "/agents/a1/api/headers",
            &[
                ("authorization", &key.bearer(&["a1"])),
                ("connection", "x-client-hop"),
                ("x-client-hop", "1"),
                ("keep-alive", "timeout=5"),
                ("te", "trailers"),
                ("proxy-authorization", "Basic c2VjcmV0"),
                ("x-forwarded-for", "6.6.6.6"),
                ("x-end-to-end", "kept"),
            ],
        )
        .await;
    assert_eq!(a.status, 200);
    let seen = &backend.seen()[0];
    for gone in ["x-client-hop", "keep-alive", "te", "proxy-authorization", "authorization"] {
        assert!(!seen.headers.contains_key(gone), "{gone} reached the backend: {:?}", seen.headers);
    }
    assert_eq!(seen.headers.get("x-end-to-end").map(String::as_str), Some("kept"));
    assert_eq!(seen.headers.get("x-forwarded-for").map(String::as_str), Some("127.0.0.1"));
    assert_eq!(seen.headers.get("x-forwarded-proto").map(String::as_str), Some("https"));
    assert_eq!(seen.headers.get("x-portcullis-sub").map(String::as_str), Some("alice"));
    assert!(seen.headers.get("forwarded").is_some_and(|f| f.starts_with("for=127.0.0.1;proto=https")));
    assert!(a.header("x-backend-hop").is_none() && a.header("keep-alive").is_none(), "{:?}", a.headers);
    assert_eq!(a.header("x-member"), Some("m1"));
}

#[tokio::test]
async fn keep_alive_connections_to_the_backend_are_reused() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = start(&key, &[backend.addr], json!({})).await;
    let auth = key.bearer(&["a1"]);
    for _ in 0..3 {
        // A new client connection each time: the pool is per member, not per client.
        let mut c = H1::connect(proxy.plain, false).await;
        for _ in 0..5 {
            assert_eq!(c.get("/agents/a1/api/headers", &[("authorization", &auth)]).await.status, 200);
        }
    }
    assert_eq!(backend.seen().len(), 15);
    assert_eq!(backend.accepts.load(std::sync::atomic::Ordering::SeqCst), 1, "15 requests, one backend connection");
}

/// A load of more requests at once than the pool used to keep (32 idle per member) closed most
/// connections as its responses ended and opened new ones for the next requests: 1,000 client
/// connections in a closed loop opened a member connection for 4 in 10 requests. At the default
/// the connections one burst opened carry the next.
#[tokio::test]
async fn the_connections_a_burst_of_concurrent_requests_opened_carry_the_next_burst() {
    // Over the old 32, and under one member's eighth of the budget at a descriptor limit of 1,024.
    const AT_ONCE: usize = 48;
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = start(&key, &[backend.addr], json!({})).await;
    let auth = key.bearer(&["a1"]);
    let h2 = H2::connect(proxy.tls).await;
    // AT_ONCE requests over one HTTP/2 connection, each held 300 ms by the member, so that each
    // holds a member connection of its own.
    let burst = async || {
        for t in h2.gets_at_once(AT_ONCE, "/agents/a1/api/sse?n=1&gap_ms=0&wait_ms=300", &[("authorization", &auth)]) {
            assert_eq!(t.await.expect("task"), 200);
        }
    };
    burst().await;
    let opened = backend.accepts.load(std::sync::atomic::Ordering::SeqCst);
    assert!(opened > 32, "the burst's requests were at the member at once: {opened} connections");
    burst().await;
    let reopened = backend.accepts.load(std::sync::atomic::Ordering::SeqCst) - opened;
    // A connection whose return to the pool races the next burst's request may be replaced; at
    // 32 kept, the second burst opens AT_ONCE - 32 = 16 of them.
    assert!(
        reopened <= 8,
        "the second burst opened {reopened} new member connections beside the first burst's {opened}"
    );
}

#[tokio::test]
async fn no_response_head_in_time_is_504_and_a_protocol_breaking_backend_is_502() {
    let slow = RestBackend::start("slow").await;
    let key = hmac();
    let proxy = start(&key, &[slow.addr], json!({"response_header_timeout": "300ms"})).await;
    let mut c = H1::connect(proxy.plain, false).await;
    let started = Instant::now();
    let a = c.get("/agents/a1/api/slow?ms=5000", &[("authorization", &key.bearer(&["a1"]))]).await;
    assert_eq!(a.status, 504);
    assert!(started.elapsed() < Duration::from_secs(3), "504 took {:?}", started.elapsed());
    // The same for a request with a body of known length: its deadline runs from its last
    // byte (hyper reads such a body no further than its length, so it was never armed).
    let mut c = H1::connect(proxy.plain, false).await;
    let started = Instant::now();
    let a = c.call(post("/agents/a1/api/slow?ms=5000", &key.bearer(&["a1"]), full("{}"))).await;
    assert_eq!(a.status, 504);
    assert!(started.elapsed() < Duration::from_secs(3), "504 took {:?}", started.elapsed());

    let garbage = TrapBackend::start(Trap::Garbage).await;
    let proxy = start(&key, &[garbage.addr], json!({})).await;
    let mut c = H1::connect(proxy.plain, false).await;
    let a = c.get("/agents/a1/api/anything", &[("authorization", &key.bearer(&["a1"]))]).await;
    assert_eq!(a.status, 502);
    assert!(!a.text().contains("not HTTP"), "backend bytes are not echoed to the client");
}

#[tokio::test]
async fn retries_go_to_the_next_member_only_when_nothing_was_sent_or_the_method_is_idempotent() {
    let key = hmac();
    let auth = key.bearer(&["a1"]);
    // A member that cannot be connected to: nothing was sent, so even a POST with a body moves on.
    // (Bound and never listening, and held for the whole test: no other socket takes the port.)
    let refusing = Refusing::new();
    let dead = refusing.addr;
    let good = RestBackend::start("good").await;
    let proxy = start(&key, &[dead, good.addr], json!({})).await;
    let mut c = H1::connect(proxy.plain, false).await;
    let a = c.call(post("/agents/a1/api/echo", &auth, full("payload"))).await;
    assert_eq!((a.status, a.text().as_str()), (200, "payload"));

    // A member that reads the request and closes: the request went out. GET is retried on the
    // next member; POST is not (it may have been acted on) and is answered 502.
    let trap = TrapBackend::start(Trap::Close).await;
    let good = RestBackend::start("good").await;
    let proxy = start(&key, &[trap.addr, good.addr], json!({})).await;
    let mut c = H1::connect(proxy.plain, false).await;
    let a = c.get("/agents/a1/api/headers", &[("authorization", &auth)]).await;
    assert_eq!((a.status, a.header("x-member")), (200, Some("good")));
    assert_eq!(trap.requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    let a = c.call(post("/agents/a1/api/echo", &auth, full("once"))).await;
    assert_eq!(a.status, 502);
    assert!(good.seen().iter().all(|s| s.method != "POST"), "the POST was not sent a second time");
    assert_eq!(trap.requests.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn sse_events_arrive_one_by_one_as_the_backend_sends_them() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = start(&key, &[backend.addr], json!({})).await;
    let mut c = H1::connect(proxy.tls, true).await;
    let started = Instant::now();
    let resp = c
        .send(request(
            "GET",
            "/agents/a1/api/sse?n=5&gap_ms=250",
            &[("authorization", &key.bearer(&["a1"]))],
            full(Bytes::new()),
        ))
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("content-type").map(|v| v.as_bytes()), Some(&b"text/event-stream"[..]));
    let (got, body) = events(resp, 5).await;
    assert_eq!(
        got.iter().map(|(_, e)| e.as_str()).collect::<Vec<_>>(),
        ["id: 0\ndata: 0", "id: 1\ndata: 1", "id: 2\ndata: 2", "id: 3\ndata: 3", "id: 4\ndata: 4"]
    );
    // Each event came on its own, as sent: not held back until the stream ended, nor in pairs.
    // (One short gap is a reader that stalled on a loaded machine and then read two at once.)
    let mut gaps: Vec<Duration> = got.windows(2).map(|w| w[1].0 - w[0].0).collect();
    gaps.sort();
    assert!(gaps[1] >= Duration::from_millis(150), "events bunched: gaps {gaps:?}");
    assert!(got[0].0 - started < Duration::from_millis(900), "first event late: {:?}", got[0].0 - started);
    assert!(ends_cleanly(body).await);
}

/// An SSE stream is a session: when it ends it writes the one end-of-session line every session
/// writes (`session ended`, with its kind), beside its access-log line.
#[tokio::test]
async fn an_sse_stream_ends_with_the_session_ended_line_of_every_session() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let mut proxy = ProxyProcess::start(&api_config(&key, &[backend.addr], json!({})).text()).await;
    let mut c = H1::connect(proxy.plain, false).await;
    let resp = c
        .send(request(
            "GET",
            "/agents/a1/api/sse?n=2&gap_ms=10",
            &[("authorization", &key.bearer(&["a1"]))],
            full(Bytes::new()),
        ))
        .await;
    assert_eq!(resp.status(), 200);
    let (got, body) = events(resp, 2).await;
    assert_eq!(got.len(), 2);
    assert!(ends_cleanly(body).await);
    drop(c);
    let logs = proxy.stop_and_collect_logs().await;
    let line = logs
        .lines()
        .find(|l| l.contains("session ended") && l.contains("kind=\"sse\""))
        .unwrap_or_else(|| panic!("no session ended line for the stream:\n{logs}"));
    assert!(line.contains("reason=\"complete\"") && line.contains("closed_by=\"backend\""), "{line}");
}

#[tokio::test]
async fn an_sse_stream_is_a_session_ended_by_revocation_and_its_expiry() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = start(&key, &[backend.addr], json!({})).await;
    let mut c = H1::connect(proxy.plain, false).await;
    let bob = key.token("bob", &["a1"], Duration::from_secs(600));
    let resp = c
        .send(request(
            "GET",
            "/agents/a1/api/sse?n=1&hold=1",
            &[("cookie", &format!("portcullis_token={bob}"))],
            full(Bytes::new()),
        ))
        .await;
    let (_, body) = events(resp, 1).await;
    let (_, list) = http_get(proxy.admin, "/sessions").await;
    let list: Value = serde_json::from_str(&list).expect("json");
    let s = &list["sessions"][0];
    assert_eq!(
        (s["kind"].as_str(), s["route"].as_str(), s["subject"].as_str()),
        (Some("sse"), Some("api"), Some("bob"))
    );
    assert_eq!(s["backend"].as_str(), Some(backend.addr.to_string().as_str()));
    let (status, _) = admin_post(proxy.admin, "/sessions/revoke", &json!({"subject": "bob"}).to_string()).await;
    assert_eq!(status, 200);
    assert!(ends_cleanly(body).await, "revocation ends the stream with its last chunk");

    // A token that expires ends the stream at its expiry.
    let short = key.token("carol", &["a1"], Duration::from_secs(2));
    let mut c = H1::connect(proxy.plain, false).await;
    let started = Instant::now();
    let resp = c
        .send(request(
            "GET",
            "/agents/a1/api/sse?n=1&hold=1",
            &[("authorization", &format!("Bearer {short}"))],
            full(Bytes::new()),
        ))
        .await;
    let (_, body) = events(resp, 1).await;
    assert!(ends_cleanly(body).await);
    let lasted = started.elapsed();
    assert!(lasted >= Duration::from_millis(900) && lasted < Duration::from_secs(5), "ended after {lasted:?}");
    let (_, list) = http_get(proxy.admin, "/sessions").await;
    assert!(!list.contains("carol") && !list.contains("bob"), "ended streams leave /sessions: {list}");
}

#[tokio::test]
async fn drain_ends_sse_streams_cleanly_and_refuses_new_requests() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let mut proxy = start(&key, &[backend.addr], json!({})).await;
    let auth = key.bearer(&["a1"]);
    let mut c = H1::connect(proxy.plain, false).await;
    let resp =
        c.send(request("GET", "/agents/a1/api/sse?n=1&hold=1", &[("authorization", &auth)], full(Bytes::new()))).await;
    let (_, body) = events(resp, 1).await;
    let mut other = H1::connect(proxy.plain, false).await;
    proxy.drain();
    assert!(ends_cleanly(body).await, "drain ends the stream with its last chunk (EventSource reconnects)");
    // An idle kept-alive client connection is closed by the drain.
    tokio::time::timeout(SOON, other.closed()).await.expect("the idle client connection is closed by the drain");
}

/// A client that asks for an answer and reads none of it held its connection, its backend
/// request and (a stream) its session and places for as long as it liked, past its
/// revocation too: the session's end is written into the answer's body, which waits on the
/// client's socket. `[server] send_timeout` closes a connection whose client takes no byte of
/// its answer for that long, as NGINX's `send_timeout` and HAProxy's `timeout client` do.
#[tokio::test]
async fn a_client_that_reads_nothing_of_its_answer_is_closed_after_send_timeout() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let text = api_config(&key, &[backend.addr], json!({})).set("server.send_timeout", "2s").text();
    let proxy = Proxy::start_with(&text).await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("small receive buffer");
    let mut tcp = socket.connect(proxy.plain).await.expect("connect");
    let auth = key.bearer(&["a1"]);
    let head =
        format!("GET /agents/a1/api/early?kib=262144 HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.expect("request");
    let sessions = async || http_get(proxy.admin, "/sessions").await.1.matches("\"kind\":\"stream\"").count();
    eventually("the answer is a session", async || (sessions().await == 1).then_some(())).await;
    // Nothing is read: the proxy's writes fill the socket, wait send_timeout, and fail.
    eventually("the unread answer's session ends", async || (sessions().await == 0).then_some(())).await;
    let (_, m) = http_get(proxy.admin, "/metrics").await;
    assert!(metric(&m, "portcullis_send_timeouts_total") >= 1.0, "{m}");
    // The connection was closed: what is left to read ends.
    closed_by_peer(&mut tcp).await;
}

#[tokio::test]
async fn an_idle_body_is_cut_after_idle_body_timeout() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = start(&key, &[backend.addr], json!({"idle_body_timeout": "300ms"})).await;
    let mut c = H1::connect(proxy.plain, false).await;
    let resp = c
        .send(request("GET", "/agents/a1/api/stall", &[("authorization", &key.bearer(&["a1"]))], full(Bytes::new())))
        .await;
    assert_eq!(resp.status(), 200);
    let started = Instant::now();
    assert!(!ends_cleanly(resp.into_body()).await, "a cut body does not look complete");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn http_routes_take_the_same_auth_token_sources_and_origin_policy() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = start(&key, &[backend.addr], json!({})).await;
    let mut c = H1::connect(proxy.plain, false).await;
    let a = c.get("/agents/a1/api/headers", &[]).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.header("www-authenticate"), Some("Bearer realm=\"portcullis\""));
    let forged = hmac().bearer(&["a1"]);
    let a = c.get("/agents/a1/api/headers", &[("authorization", &forged)]).await;
    assert_eq!(a.status, 401, "a token signed with another key");
    assert!(a.header("www-authenticate").is_some_and(|v| v.contains("invalid_token")));
    let a = c.get("/agents/a2/api/headers", &[("authorization", &key.bearer(&["a1"]))]).await;
    assert_eq!(a.status, 403, "the token does not grant agent a2");
    let a = c
        .get("/agents/a1/api/headers", &[("authorization", &key.bearer(&["a1"])), ("origin", "https://evil.example")])
        .await;
    assert_eq!(a.status, 403, "Origin not allowed");
    assert!(backend.seen().is_empty(), "no refused request reached the backend");

    let token = key.token("alice", &["a1"], Duration::from_secs(600));
    let a = c
        .get(
            "/agents/a1/api/headers",
            &[("cookie", &format!("theme=dark; portcullis_token={token}")), ("origin", "https://console.example.com")],
        )
        .await;
    assert_eq!(a.status, 200);
    let a = c.get(&format!("/agents/a1/api/headers?access_token={token}&page=2"), &[]).await;
    assert_eq!(a.status, 200);
    let seen = backend.seen();
    assert_eq!(seen[0].headers.get("cookie").map(String::as_str), Some("theme=dark"), "the token cookie is stripped");
    assert_eq!(seen[1].uri, "/v1/headers?page=2", "the token query parameter is stripped");
    for s in &seen {
        assert!(!format!("{s:?}").contains(&token), "the token reached the backend");
    }
}

#[tokio::test]
async fn route_kinds_refuse_the_other_kind_of_request() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = start(&key, &[backend.addr], json!({})).await;
    // An upgrade on the HTTP-only route.
    let err = upgrade(proxy.plain, false, "/agents/a1/api/terminal", &[("authorization", &key.bearer(&["a1"]))])
        .await
        .err()
        .expect("refused");
    assert_eq!(err.status, 400);
    // A plain request on the WebSocket-only route `terminal`.
    let mut c = H1::connect(proxy.plain, false).await;
    let a = c.get("/agents/a1/terminal", &[]).await;
    assert_eq!(a.status, 426);
}

#[tokio::test]
async fn one_agent_reaches_the_same_sticky_member_over_websocket_and_http() {
    let members = [RestBackend::start("m1").await, RestBackend::start("m2").await, RestBackend::start("m3").await];
    let addrs: Vec<SocketAddr> = members.iter().map(|m| m.addr).collect();
    let key = hmac();
    let text = api_config(&key, &addrs, json!({}))
        .set("routes.1.kind", "both")
        .merge("routes.1.balance", json!({"policy": "sticky", "sticky_key": "capture:agent"}))
        .text();
    let proxy = Proxy::start_with(&text).await;
    // 24 agents over 3 members: all on one member by chance is 3^-23, not the 3^-7 of 8.
    let agents: Vec<String> = (0..24).map(|i| format!("agent{i}")).collect();
    let names: Vec<&str> = agents.iter().map(String::as_str).collect();
    let auth = key.bearer(&names);
    let mut c = H1::connect(proxy.plain, false).await;
    let mut used = std::collections::HashSet::new();
    for agent in &agents {
        let _ws = upgrade(
            proxy.plain,
            false,
            &format!("/agents/{agent}/api/terminal"),
            &[("authorization", &auth), ("x-test-agent", agent)],
        )
        .await
        .unwrap_or_else(|h| panic!("upgrade refused: {}", h.status));
        let a = c.get(&format!("/agents/{agent}/api/headers"), &[("authorization", &auth)]).await;
        assert_eq!(a.status, 200);
        let http_member = a.header("x-member").expect("member").to_owned();
        let ws_member = members.iter().find(|m| {
            m.seen().iter().any(|s| {
                s.headers.contains_key("sec-websocket-key")
                    && s.headers.get("x-test-agent").map(String::as_str) == Some(agent.as_str())
            })
        });
        assert_eq!(ws_member.map(|m| m.name.as_str()), Some(http_member.as_str()), "agent {agent}");
        used.insert(http_member);
    }
    assert!(used.len() > 1, "24 agents spread over more than one member: {used:?}");
}

#[tokio::test]
async fn requests_and_streams_are_counted_by_route_and_status_class() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = start(&key, &[backend.addr], json!({})).await;
    let mut c = H1::connect(proxy.plain, false).await;
    let auth = key.bearer(&["a1"]);
    assert_eq!(c.get("/agents/a1/api/headers", &[("authorization", &auth)]).await.status, 200);
    assert_eq!(c.get("/agents/a1/api/status?code=503", &[("authorization", &auth)]).await.status, 503);
    assert_eq!(c.get("/agents/a1/api/headers", &[]).await.status, 401);
    let resp =
        c.send(request("GET", "/agents/a1/api/sse?n=1&hold=1", &[("authorization", &auth)], full(Bytes::new()))).await;
    let (_, body) = events(resp, 1).await;
    let (_, m) = http_get(proxy.admin, "/metrics").await;
    assert!(metric(&m, r#"portcullis_http_requests_total{route="api",kind="request",class="2xx"}"#) >= 1.0, "{m}");
    assert!(metric(&m, r#"portcullis_http_requests_total{route="api",kind="request",class="5xx"}"#) >= 1.0);
    assert!(metric(&m, r#"portcullis_http_requests_total{route="api",kind="request",class="4xx"}"#) >= 1.0);
    assert!(metric(&m, r#"portcullis_http_requests_total{route="api",kind="sse",class="2xx"}"#) >= 1.0);
    assert!(metric(&m, "portcullis_sse_streams_active") >= 1.0);
    assert!(metric(&m, r#"portcullis_http_request_duration_seconds_count{route="api"}"#) >= 2.0);
    drop(body);
}

#[tokio::test]
async fn every_request_gets_one_access_log_line_without_its_token_or_query() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let text = api_config(&key, &[backend.addr], json!({})).text();
    let mut proxy = ProxyProcess::start_with_log(&text, "portcullis=info").await;
    let token = key.token("alice", &["a1"], Duration::from_secs(600));
    let mut c = H1::connect(proxy.plain, false).await;
    let a = c.call(post(&format!("/agents/a1/api/echo?access_token={token}&q=1"), "", full("12345"))).await;
    assert_eq!(a.status, 401, "an empty Authorization header is malformed, whatever the query holds");
    let a = c.call(request("POST", &format!("/agents/a1/api/echo?access_token={token}&q=1"), &[], full("12345"))).await;
    assert_eq!(a.status, 200);
    let a = c.get("/agents/a1/api/headers", &[]).await;
    assert_eq!(a.status, 401);
    drop(c);
    let logs = proxy.stop_and_collect_logs().await;
    assert!(!logs.contains(&token), "a token was logged");
    assert!(!logs.contains("q=1"), "a query string was logged");
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains("portcullis::access")).collect();
    assert_eq!(lines.len(), 3, "one line per request:\n{logs}");
    let ok = lines[1];
    for field in [
        "method=POST",
        "route=\"api\"",
        "agent=\"a1\"",
        "subject=\"alice\"",
        "status=200",
        "bytes_in=5",
        "bytes_out=5",
        "path=\"/agents/a1/api/echo\"",
        "duration_ms=",
    ] {
        assert!(ok.contains(field), "{field} missing from {ok}");
    }
    assert!(lines[2].contains("status=401"), "{}", lines[2]);
}

/// A request whose client leaves before its answer (an HTTP/1.1 connection closed, an HTTP/2
/// stream reset, while the member thinks) wrote no access-log line when its handler was
/// dropped with it. Each now gets one: 499 `client_gone`, as NGINX writes, with its subject.
#[tokio::test]
async fn a_request_its_client_abandons_before_the_answer_is_logged_499() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let text = api_config(&key, &[backend.addr], json!({})).text();
    let mut proxy = ProxyProcess::start_with_log(&text, "portcullis=info").await;
    let auth = key.bearer(&["a1"]);
    let asked = async |n: usize| (backend.seen().iter().filter(|s| s.uri.contains("slow")).count() == n).then_some(());
    let mut c = H1::connect(proxy.plain, false).await;
    assert_eq!(c.get("/agents/a1/api/headers", &[("authorization", &auth)]).await.status, 200);
    let slow = request("GET", "/agents/a1/api/slow?ms=5000", &[("authorization", &auth)], full(Bytes::new()));
    let waiting = tokio::spawn(async move { c.send(slow).await.status() });
    eventually("the member has the HTTP/1.1 request", async || asked(1).await).await;
    waiting.abort();
    let _ = waiting.await;
    let h2 = H2::connect(proxy.tls).await;
    let req = ::http::Request::get("https://localhost/agents/a1/api/slow?ms=5000")
        .header("authorization", auth.as_str())
        .body(())
        .expect("request");
    let mut sender = h2.send.clone().ready().await.expect("ready");
    let (answer, mut stream) = sender.send_request(req, true).expect("request");
    eventually("the member has the HTTP/2 request", async || asked(2).await).await;
    stream.send_reset(::h2::Reason::CANCEL);
    drop(answer);
    let logs = proxy.stop_and_collect_logs().await;
    let lines: Vec<&str> = logs.lines().filter(|l| l.contains("portcullis::access")).collect();
    assert_eq!(lines.len(), 3, "one line per request:\n{logs}");
    assert!(lines[0].contains("status=200"), "{}", lines[0]);
    for line in &lines[1..] {
        for field in
            ["status=499", "end=\"client_gone\"", "subject=\"alice\"", "agent=\"a1\"", "path=\"/agents/a1/api/slow\""]
        {
            assert!(line.contains(field), "{field} missing from {line}");
        }
    }
}

/// What the drain's `drain_timeout` cuts did not lose its client: a request still waiting for
/// its member, and an answer the member gave during the drain (an event stream, given the
/// route's longer `close_timeout`) still open. Their access-log lines say `drain` (the waiting
/// one with status 0: no answer went out), and so do their end-of-session lines, by the proxy.
/// Before, all of them said `client_gone`, by the client.
#[tokio::test]
async fn what_the_drain_timeout_cuts_is_logged_as_the_drains() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let text = api_config(&key, &[backend.addr], json!({}))
        .merge("routes.1.session", json!({"close_timeout": "30s"}))
        .merge("server", json!({"drain_timeout": "2s", "drain_spread": "0s"}))
        .text();
    let mut proxy = ProxyProcess::start_with_log(&text, "portcullis=info").await;
    let auth = key.bearer(&["a1"]);
    let mut c = H1::connect(proxy.plain, false).await;
    let slow = request("GET", "/agents/a1/api/slow?ms=8000", &[("authorization", &auth)], full(Bytes::new()));
    let waiting = tokio::spawn(async move { c.try_send(slow).await.map(|r| r.status()) });
    // Answered 1 s into the drain: delivered, and still open at the drain's end.
    let mut d = H1::connect(proxy.plain, false).await;
    let late = request("GET", "/agents/a1/api/late?ms=1000", &[("authorization", &auth)], full(Bytes::new()));
    // The client keeps its connection and the answer, unread.
    let answered = tokio::spawn(async move { (d.try_send(late).await, d) });
    let asked = async || (backend.seen().iter().filter(|s| s.method == "GET").count() == 2).then_some(());
    eventually("the member has both requests", asked).await;
    let logs = proxy.stop_and_collect_logs().await;
    assert!(waiting.await.expect("client task").is_err(), "closed with no answer");
    let (answer, _held) = answered.await.expect("client task");
    assert_eq!(answer.map(|r| r.status().as_u16()).ok(), Some(200));
    let line = |path: &str| {
        let of = |l: &&str| l.contains("portcullis::access") && l.contains(path);
        logs.lines().find(of).unwrap_or_else(|| panic!("no line for {path}:\n{logs}")).to_owned()
    };
    // The waiting one got no answer (its connection closed with the process): status 0.
    for (path, status) in [("/agents/a1/api/slow", 0), ("/agents/a1/api/late", 200)] {
        let line = line(path);
        for field in
            [format!("status={status}"), "end=\"drain\"".into(), "subject=\"alice\"".into(), "agent=\"a1\"".into()]
        {
            assert!(line.contains(&field), "{field} missing from {line}");
        }
    }
    let ended: Vec<&str> = logs.lines().filter(|l| l.contains("session ended")).collect();
    assert_eq!(ended.len(), 2, "{logs}");
    for line in ended {
        for field in ["reason=\"drain\"", "closed_by=\"proxy\""] {
            assert!(line.contains(field), "{field} missing from {line}");
        }
    }
}

/// An upload in flight is a session as a stream is: a reload that removes its route ends it
/// after `removed_route_grace`, with 503, and the member's request is cut (it never sees a
/// whole body).
#[tokio::test]
async fn an_upload_on_a_removed_route_is_cut_after_the_grace_period() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let config = api_config(&key, &[backend.addr], json!({})).merge("server", json!({"removed_route_grace": "500ms"}));
    let proxy = Proxy::start_with(&config.text()).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tx.send(Bytes::from_static(b"first")).await.expect("first piece");
    let pieces = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(Frame::data(b)), rx))
    });
    let mut c = H1::connect(proxy.plain, false).await;
    let upload = post("/agents/a1/api/upload", &key.bearer(&["a1"]), BodyExt::boxed(StreamBody::new(pieces)));
    let answer = tokio::spawn(async move { c.send(upload).await.status() });
    let listed = async || http_get(proxy.admin, "/sessions").await.1.contains("\"kind\":\"stream\"").then_some(());
    eventually("the upload is a session", listed).await;
    let without = config.set("routes.1.name", "renamed").set("routes.1.path", "/elsewhere/{agent}/{*rest}").text();
    let reloaded = Instant::now();
    let parsed = portcullis::config::Config::parse(&without, std::path::Path::new("reload.toml")).expect("valid");
    proxy.handle.reload(parsed).expect("reload");
    let status = tokio::time::timeout(SOON, answer).await.expect("answered in time").expect("answer");
    assert_eq!(status, 503);
    assert!(reloaded.elapsed() >= Duration::from_millis(400), "not before the grace period");
    let cut = async || backend.seen().into_iter().find(|s| s.uri.contains("upload"));
    let seen = eventually("the member's request ends", cut).await;
    assert_eq!(seen.headers.get("x-upload-end").map(String::as_str), Some("cut"), "{seen:?}");
    drop(tx);
}

#[tokio::test]
async fn a_burst_of_events_arrives_whole_and_in_order_when_chunks_are_joined() {
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = start(&key, &[backend.addr], json!({})).await;
    let mut c = H1::connect(proxy.plain, false).await;
    let a = c.get("/agents/a1/api/sse?n=500&gap_ms=0", &[("authorization", &key.bearer(&["a1"]))]).await;
    let events: Vec<String> = a.text().split("\n\n").filter(|e| !e.is_empty()).map(str::to_owned).collect();
    let expected: Vec<String> = (0..500).map(|i| format!("id: {i}\ndata: {i}")).collect();
    assert_eq!(events, expected);
}

#[tokio::test]
async fn a_refused_post_sent_whole_still_gets_its_answer_and_a_clean_end() {
    // The client sends its whole body at once; the proxy refuses it (over the limit: 413; no
    // token: 401) without reading all of it and closes: the unread bytes must not turn that
    // close into a reset that destroys the answer before the client reads it.
    let backend = RestBackend::start("m1").await;
    let key = hmac();
    let proxy = start(&key, &[backend.addr], json!({"max_request_body": "1KiB"})).await;
    let auth = format!("Authorization: {}\r\n", key.bearer(&["a1"]));
    for (credentials, status) in [(auth.as_str(), "413"), ("", "401")] {
        let mut s = tokio::net::TcpStream::connect(proxy.plain).await.expect("connect");
        let mut request =
            format!("POST /agents/a1/api/echo HTTP/1.1\r\nHost: x\r\n{credentials}Content-Length: 262144\r\n\r\n")
                .into_bytes();
        request.extend_from_slice(&[b'x'; 256 * 1024]);
        let (mut rd, mut wr) = s.split();
        let send = async {
            let _ = wr.write_all(&request).await;
        };
        let read = async {
            let mut got = Vec::new();
            let end = tokio::time::timeout(SOON, rd.read_to_end(&mut got)).await.expect("an end in time");
            (got, end.map_err(|e| e.kind()))
        };
        let ((), (got, end)) = tokio::join!(send, read);
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with(&format!("HTTP/1.1 {status}")), "{text}");
        assert!(end.is_ok(), "{status}: the connection ends with a FIN, not a reset: {end:?}");
    }
}
