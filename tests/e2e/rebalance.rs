//! Gradual rebalancing: `POST /sessions/rebalance` sends 1001 "rebalance" to a fraction of a
//! route's sessions over a spread; their clients reconnect and the balance policy places them
//! on the members the route has now.

use std::collections::HashMap;

use serde_json::Value;

use crate::harness::*;

/// What one client saw: the close its first session got, if any.
struct Seen {
    close: Option<(u16, String)>,
}

/// Holds a session on `/agents/a{i}/terminal`; when it is closed, records the close and opens
/// the session again (as a client with reconnect logic does), then holds that one until `stop`.
async fn reconnecting_client(
    proxy: std::net::SocketAddr,
    i: usize,
    ready: tokio::sync::mpsc::Sender<()>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Seen {
    let path = format!("/agents/a{i}/terminal");
    let mut c = upgrade(proxy, false, &path, &[]).await.expect("101");
    let _ = ready.send(()).await;
    let mut seen = Seen { close: None };
    loop {
        let frame = tokio::select! {
            f = read_frame(&mut c.io) => f,
            _ = stop.wait_for(|s| *s) => return seen,
        };
        match frame {
            Ok(f) if f.opcode == op::CLOSE => {
                let reason = String::from_utf8_lossy(f.payload.get(2..).unwrap_or_default()).into_owned();
                seen.close = Some((f.close_code().unwrap_or(0), reason));
                c.send(true, op::CLOSE, &f.payload).await;
                c = upgrade(proxy, false, &path, &[]).await.expect("the reconnect is accepted");
                c.send(true, op::TEXT, b"back").await;
                assert_eq!(c.recv().await.payload, b"back");
                let _ = ready.send(()).await;
            }
            Ok(_) => {}
            Err(e) => panic!("session {i} ended without a close frame: {e}"),
        }
    }
}

async fn sessions_by_member(proxy: &Proxy) -> HashMap<String, usize> {
    let (_, body) = admin_request(proxy.admin, "GET", "/sessions", "").await;
    let v: Value = serde_json::from_str(&body).expect("json");
    let mut by = HashMap::new();
    for s in v["sessions"].as_array().expect("list") {
        *by.entry(s["backend"].as_str().unwrap_or("").to_owned()).or_default() += 1;
    }
    by
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalancing_half_of_a_route_after_a_scale_out_moves_sessions_to_the_new_member() {
    let (m1, m2) = (Backend::echo().await, Backend::echo().await);
    let config = TestConfig::base(&[m1.addr.to_string()])
        .set("routes.0.name", "rebalanced")
        .merge("routes.0.balance", json!({"policy": "least_connections"}))
        .set("server.max_connections_per_ip", 0)
        .set("server.handshake_rate_per_ip", 0)
        .set("server.connection_rate_per_ip", 0);
    let proxy = Proxy::start_with(&config.text()).await;

    let n = 100;
    let (ready_tx, mut ready) = tokio::sync::mpsc::channel(2 * n);
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let clients: Vec<_> =
        (0..n).map(|i| tokio::spawn(reconnecting_client(proxy.plain, i, ready_tx.clone(), stop.clone()))).collect();
    for _ in 0..n {
        tokio::time::timeout(SOON, ready.recv()).await.expect("sessions open").expect("client");
    }
    assert_eq!(sessions_by_member(&proxy).await.get(&m1.addr.to_string()), Some(&n));

    // Scale out: a second member; live sessions stay where they are.
    let scaled = config.set("routes.0.backends", vec![m1.addr.to_string(), m2.addr.to_string()]).text();
    proxy
        .handle
        .reload(portcullis::config::Config::parse(&scaled, std::path::Path::new("r.toml")).expect("config"))
        .expect("reload");
    assert_eq!(sessions_by_member(&proxy).await.get(&m2.addr.to_string()), None);

    // Bad asks are refused.
    for bad in [
        r#"{"route": "rebalanced", "fraction": 0}"#,
        r#"{"route": "rebalanced", "fraction": 1.5}"#,
        r#"{"route": "nope", "fraction": 0.5}"#,
        r#"{"route": "rebalanced", "fraction": 0.5, "spread": "soon"}"#,
    ] {
        assert_eq!(admin_post(proxy.admin, "/sessions/rebalance", bad).await.0, 400, "{bad}");
    }
    let (status, body) =
        admin_post(proxy.admin, "/sessions/rebalance", r#"{"route": "rebalanced", "fraction": 0.5, "spread": "1s"}"#)
            .await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("json");
    assert_eq!((answer["sessions"].as_u64(), answer["picked"].as_u64()), (Some(100), Some(50)));

    // Fifty reconnects, and least-connections sends them to the new member.
    for _ in 0..50 {
        tokio::time::timeout(SOON, ready.recv()).await.expect("rebalanced clients reconnect").expect("client");
    }
    // A replaced session leaves `/sessions` once its close handshake with its member is over,
    // which may be just after its client's new session is in.
    let want = (Some(50), Some(50));
    let mut by = sessions_by_member(&proxy).await;
    let deadline = tokio::time::Instant::now() + SOON;
    while (by.get(&m1.addr.to_string()).copied(), by.get(&m2.addr.to_string()).copied()) != want
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        by = sessions_by_member(&proxy).await;
    }
    assert_eq!((by.get(&m1.addr.to_string()).copied(), by.get(&m2.addr.to_string()).copied()), want, "{by:?}");

    let _ = stop_tx.send(true);
    let mut closes = Vec::new();
    for c in clients {
        closes.extend(c.await.expect("client task").close);
    }
    assert_eq!(closes.len(), 50, "exactly the picked sessions were closed");
    assert!(closes.iter().all(|(code, reason)| *code == 1001 && reason == "rebalance"), "{closes:?}");
    let (_, m) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&m, "portcullis_rebalance_closes_total{route=\"rebalanced\"}"), 50.0);
    // The backend sessions got 1001 "rebalance" too (the rest end later, when the test drops
    // its clients).
    let rebalanced = |f: &TFrame| f.opcode == op::CLOSE && f.payload.get(2..) == Some(&b"rebalance"[..]);
    assert_eq!(m1.log.frames().iter().filter(|f| rebalanced(f)).count(), 50);
    assert!(m1.log.frames().iter().filter(|f| rebalanced(f)).all(|f| f.close_code() == Some(1001)));
}
