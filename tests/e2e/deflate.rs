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
