//! permessage-deflate negotiated end to end: a soketto client and server (a Rust WebSocket
//! library with RFC 7692 support in both roles) exchange compressed messages through the proxy,
//! which passes RSV1 and the compressed payloads through untouched.

use soketto::extension::deflate::Deflate;
use soketto::handshake::{self, ServerResponse};
use soketto::{connection, Data, Mode};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::compat::TokioAsyncReadCompatExt;

use crate::harness::*;

/// An echo backend that accepts permessage-deflate.
async fn deflate_echo_backend() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut server = handshake::Server::new(tcp.compat());
                server.add_extension(Box::new(Deflate::new(Mode::Server)));
                let Ok(req) = server.receive_request().await else { return };
                let key = req.key();
                let accept = handshake::server::Response::Accept { key, protocol: None };
                if server.send_response(&accept).await.is_err() {
                    return;
                }
                let (mut tx, mut rx) = server.into_builder().finish();
                let mut message = Vec::new();
                loop {
                    message.clear();
                    let sent = match rx.receive_data(&mut message).await {
                        Ok(Data::Text(_)) => match std::str::from_utf8(&message) {
                            Ok(text) => tx.send_text(text).await,
                            Err(_) => return,
                        },
                        Ok(Data::Binary(_)) => tx.send_binary(&message).await,
                        Err(connection::Error::Closed) => return,
                        Err(e) => {
                            eprintln!("deflate backend: {e}");
                            return;
                        }
                    };
                    if sent.is_err() || tx.flush().await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn permessage_deflate_negotiated_end_to_end_passes_through() {
    let backend = deflate_echo_backend().await;
    let proxy = Proxy::start(backend).await;
    let tcp = TcpStream::connect(proxy.plain).await.expect("connect to the proxy");
    let host = proxy.plain.to_string();
    let mut client = handshake::Client::new(tcp.compat(), &host, "/agents/a1/terminal");
    client.add_extension(Box::new(Deflate::new(Mode::Client)));
    match client.handshake().await.expect("handshake through the proxy") {
        ServerResponse::Accepted { .. } => {}
        other => panic!("handshake refused: {other:?}"),
    }
    let (mut tx, mut rx) = client.into_builder().finish();

    let mut plain_bytes = 0;
    let mut reply = Vec::new();
    for i in 0..50 {
        let text = format!("agent output line {i} ").repeat(200);
        plain_bytes += text.len();
        tx.send_text(&text).await.expect("send text");
        tx.flush().await.expect("flush");
        reply.clear();
        let got = rx.receive_data(&mut reply).await.expect("echo through the proxy");
        assert!(matches!(got, Data::Text(_)), "{got:?}");
        assert_eq!(reply, text.as_bytes(), "message {i} came back intact");
    }
    let blob: Vec<u8> = (0..=255u8).cycle().take(256 * 400).collect();
    plain_bytes += blob.len();
    tx.send_binary(&blob).await.expect("send binary");
    tx.flush().await.expect("flush");
    reply.clear();
    assert!(matches!(rx.receive_data(&mut reply).await.expect("binary echo"), Data::Binary(_)));
    assert_eq!(reply, blob);

    // The bytes the proxy relayed for this session are the compressed ones: far fewer than the
    // messages' own size, so the extension was in force on the wire, end to end.
    let (_, sessions) = http_get(proxy.admin, "/sessions").await;
    let v: serde_json::Value = serde_json::from_str(&sessions).expect("sessions JSON");
    let relayed = v["sessions"][0]["bytes_from_client"].as_u64().expect("one live session");
    assert!(relayed * 4 < plain_bytes as u64, "relayed {relayed} bytes for {plain_bytes} bytes of messages");
    let (_, body) = http_get(proxy.admin, "/metrics").await;
    assert!(metric(&body, "portcullis_upgrades_total{route=\"terminal\",result=\"ok\"}") >= 1.0);
}

/// Found by an attacker review: on a route with `[routes.observe]` the owner's
/// permessage-deflate offer reached the backend, and from then on its observers (and the
/// replay) got the compressed bytes: the client watched decided whether it could be watched.
/// An observed route, like a recorded one, passes no extension offer: the owner's session runs
/// uncompressed and its observers read what it reads.
#[tokio::test]
async fn an_owner_offering_compression_cannot_make_its_observers_read_deflate() {
    let backend = deflate_echo_backend().await;
    let key = hmac();
    let text = TestConfig::base(&[backend.to_string()])
        .set("routes.0.name", "observed")
        .merge("", key.auth_keys())
        .merge(
            "routes.0",
            serde_json::json!({"auth": {"agent_claim": "agents"}, "observe": {"scope": "observe:{agent}"}}),
        )
        .text();
    let proxy = Proxy::start_with(&text).await;
    let tcp = TcpStream::connect(proxy.plain).await.expect("connect to the proxy");
    let host = proxy.plain.to_string();
    let auth = key.bearer(&["a1"]);
    let headers = [handshake::client::Header { name: "Authorization", value: auth.as_bytes() }];
    let mut client = handshake::Client::new(tcp.compat(), &host, "/agents/a1/terminal");
    client.set_headers(&headers);
    client.add_extension(Box::new(Deflate::new(Mode::Client)));
    match client.handshake().await.expect("handshake through the proxy") {
        ServerResponse::Accepted { .. } => {}
        other => panic!("handshake refused: {other:?}"),
    }
    let (mut tx, mut rx) = client.into_builder().finish();
    let mut reply = Vec::new();
    let echo =
        async |tx: &mut connection::Sender<_>, rx: &mut connection::Receiver<_>, reply: &mut Vec<u8>, text: &str| {
            tx.send_text(text).await.expect("send text");
            tx.flush().await.expect("flush");
            reply.clear();
            rx.receive_data(reply).await.expect("echo through the proxy");
            assert_eq!(reply, text.as_bytes());
        };
    let before = "TOP-SECRET-OUTPUT before the observer ".repeat(20);
    echo(&mut tx, &mut rx, &mut reply, &before).await;

    let (_, sessions) = http_get(proxy.admin, "/sessions").await;
    let v: serde_json::Value = serde_json::from_str(&sessions).expect("sessions JSON");
    let id = v["sessions"][0]["id"].as_u64().expect("one live session");
    let auditor = format!("Bearer {}", key.token_with(serde_json::json!({"sub": "auditor", "scope": "observe:a1"})));
    let path = format!("/agents/a1/terminal?observe={id}");
    let mut obs = upgrade(proxy.plain, false, &path, &[("Authorization", &auditor)]).await.expect("observer 101");
    let replayed = obs.recv().await;
    assert_eq!(replayed.payload, before.as_bytes(), "the replay is what the owner read");
    let live = "TOP-SECRET-OUTPUT while watched ".repeat(20);
    echo(&mut tx, &mut rx, &mut reply, &live).await;
    let watched = obs.recv().await;
    assert_eq!(watched.payload, live.as_bytes(), "the observer reads the output as the owner does");
}
