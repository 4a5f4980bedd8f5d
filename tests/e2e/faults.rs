//! The fault suite: faults injected while the load-test harness (`portcullis-loadtest`, with its
//! integrity checks: sequence numbers and checksums in every message) drives traffic through a
//! proxy child process. For each fault: no message is corrupted, duplicated or reordered; what
//! is lost is at most what was in flight in sessions that were reported closed with the code the
//! close table gives; sessions the fault did not touch are unaffected; and afterwards the proxy's
//! descriptor count, `portcullis_sessions_active` and `portcullis_relay_buffer_bytes` are back
//! at their baseline. `docs/faults.md` records the figures.

use std::net::SocketAddr;
use std::time::Duration;

use portcullis_loadtest::backend::{self, BackendOptions, Mode};
use portcullis_loadtest::{run, Kind, Report, Scenario};
use tokio::io::AsyncWriteExt;

use crate::harness::*;

/// A load-test echo backend on a runtime of its own, so that it can be killed whole: every one
/// of its sockets closes at once, as when a backend process dies.
struct KillableBackend {
    addr: SocketAddr,
    kill: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KillableBackend {
    fn start() -> KillableBackend {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let (kill, killed) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt");
            rt.spawn(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
                backend::serve(listener, BackendOptions::new(Mode::Echo)).await;
            });
            let _ = killed.recv();
            rt.shutdown_background();
        });
        KillableBackend { addr, kill: Some(kill), thread: Some(thread) }
    }

    fn kill(&mut self) {
        if let Some(k) = self.kill.take() {
            let _ = k.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for KillableBackend {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An echo load of `connections` sessions for `duration` through the proxy's plain listener.
fn echo_load(proxy: SocketAddr, connections: u64, duration: Duration) -> Scenario {
    Scenario {
        scenario: Kind::Echo,
        target: Some(format!("ws://{proxy}/agents/agent-{{conn}}/terminal")),
        connections,
        duration,
        window: 4,
        size: 256,
        drain: Duration::from_secs(2),
        quiet: true,
        ..Scenario::default()
    }
}

/// Descriptors the process holds now.
fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// The proxy's resource baseline: descriptors, live sessions, lent relay buffer bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Use {
    fds: usize,
    sessions: f64,
    buffers: f64,
}

async fn usage(proxy: &ProxyProcess) -> Use {
    let (_, body) = http_get(proxy.admin, "/metrics").await;
    Use {
        fds: descriptors(proxy.child.id()),
        sessions: metric(&body, "portcullis_sessions_active"),
        buffers: metric(&body, "portcullis_relay_buffer_bytes"),
    }
}

/// Waits until the proxy has `n` live sessions.
async fn sessions_reach(proxy: &ProxyProcess, n: f64) {
    eventually(&format!("sessions reach {n}"), async || (usage(proxy).await.sessions >= n).then_some(())).await;
}

/// Waits until the proxy is back at its baseline (no leak); returns what it measured.
async fn settles_to(proxy: &ProxyProcess, baseline: Use) -> Use {
    eventually(&format!("the proxy is back at the baseline {baseline:?}"), async || {
        let now = usage(proxy).await;
        // The admin connection of this very measurement holds one descriptor.
        (now.sessions == 0.0 && now.buffers == 0.0 && now.fds <= baseline.fds + 1).then_some(now)
    })
    .await
}

/// One line of figures for `docs/faults.md` (`cargo test --test e2e faults -- --nocapture`).
fn figures(fault: &str, r: &Report, baseline: Use, after: Use) {
    let i = &r.integrity;
    println!(
        "fault {fault}: {} sessions, {} sent, {} received, {} lost, {} corrupted/duplicated/reordered, close codes {:?}; \
         descriptors {} before, {} after; sessions_active {}; relay buffer bytes {}",
        r.opened,
        r.sent,
        r.received,
        i.lost,
        i.corrupted + i.duplicated + i.reordered,
        r.close_codes,
        baseline.fds,
        after.fds,
        after.sessions,
        after.buffers
    );
}

/// An HTTP server (a registry, a JWKS endpoint) that answers `body`, or 503 once its flag is
/// set: an outage the proxy sees as failed requests.
async fn outage_server(body: String) -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let is_down = down.clone();
    let (addr, _hits) = http_server(
        move |_path| match is_down.load(std::sync::atomic::Ordering::SeqCst) {
            true => (503, "down".into()),
            false => (200, body.clone()),
        },
        Duration::ZERO,
    )
    .await;
    (addr, down)
}

fn assert_no_damage(r: &Report) {
    let i = &r.integrity;
    assert_eq!((i.corrupted, i.duplicated, i.reordered), (0, 0, 0), "{}", r.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_mid_stream_every_session_gets_1014_and_nothing_is_damaged() {
    let mut backend = KillableBackend::start();
    let proxy = ProxyProcess::start(&TestConfig::base(&[backend.addr.to_string()]).text()).await;
    let baseline = usage(&proxy).await;
    let load = tokio::spawn(async move { run(&echo_load(proxy.plain, 20, Duration::from_secs(4))).await });
    let proxy = proxy;
    sessions_reach(&proxy, 20.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // traffic flowing
    backend.kill();
    let r = load.await.expect("task").expect("run");
    assert_no_damage(&r);
    assert_eq!(r.close_codes.get(&1014), Some(&20), "every session is told the backend failed: {}", r.table());
    assert!(r.integrity.lost <= 20 * 4, "only what was in flight is lost: {}", r.table());
    assert!(r.received > 0);
    let after = settles_to(&proxy, baseline).await;
    figures("backend killed mid-stream", &r, baseline, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_reading_does_not_slow_the_others() {
    let echo = KillableBackend::start();
    // A second route whose backend floods its one client.
    let flood: Handler = std::sync::Arc::new(|mut s: BackendSession| {
        Box::pin(async move {
            let chunk = encode(true, 0, op::BINARY, None, &[7u8; 16 * 1024]);
            while s.stream.write_all(&chunk).await.is_ok() {}
        })
    });
    let flooder = Backend::start(BackendOpts::default(), flood).await;
    let text = TestConfig::base(&[echo.addr.to_string()])
        .merge(
            "",
            json!({"routes": [{"name": "flood", "path": "/flood/{agent}", "backends": [flooder.addr.to_string()]}]}),
        )
        .text();
    let proxy = ProxyProcess::start(&text).await;
    let baseline = usage(&proxy).await;
    let stuck = upgrade(proxy.plain, false, "/flood/a1", &[]).await.expect("101"); // never reads
    let r = run(&echo_load(proxy.plain, 20, Duration::from_secs(2))).await.expect("run");
    assert!(r.is_clean(), "{}", r.table());
    assert!(r.errors.is_empty(), "{}", r.table());
    assert_eq!(r.close_codes.get(&1000), Some(&20), "{}", r.table());
    let during = usage(&proxy).await;
    assert!(during.buffers <= 2.0 * 16.0 * 1024.0, "the stuck session holds bounded buffers: {during:?}");
    drop(stuck);
    let after = settles_to(&proxy, baseline).await;
    figures("slow consumer beside 20 fast sessions", &r, baseline, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_traffic_flowing_closes_every_session_with_1001_and_damages_nothing() {
    let echo = KillableBackend::start();
    let text = TestConfig::base(&[echo.addr.to_string()]).set("server.drain_spread", "300ms").text();
    let mut proxy = ProxyProcess::start(&text).await;
    let baseline = usage(&proxy).await;
    let load = tokio::spawn(async move { run(&echo_load(proxy.plain, 20, Duration::from_secs(5))).await });
    let proxy_ref = &mut proxy;
    sessions_reach(proxy_ref, 20.0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy_ref.signal("TERM");
    let r = load.await.expect("task").expect("run");
    assert_no_damage(&r);
    assert_eq!(r.close_codes.get(&1001), Some(&20), "every session gets the drain's 1001: {}", r.table());
    assert!(r.integrity.lost <= 20 * 4, "{}", r.table());
    let status = eventually("the proxy exits after draining", async || proxy.child.try_wait().expect("wait")).await;
    assert!(status.success(), "{status}");
    // The process is gone, and with it every descriptor and buffer it held.
    let gone = Use { fds: 0, sessions: 0.0, buffers: 0.0 };
    figures("SIGTERM drain with traffic flowing (process exited 0)", &r, baseline, gone);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_traffic_flowing_leaves_every_session_untouched() {
    let echo = KillableBackend::start();
    let config = TestConfig::base(&[echo.addr.to_string()]).set("server.reload_poll_interval", "0s");
    let proxy = ProxyProcess::start(&config.text()).await;
    let baseline = usage(&proxy).await;
    let plain = proxy.plain;
    let load = tokio::spawn(async move { run(&echo_load(plain, 20, Duration::from_secs(3))).await });
    sessions_reach(&proxy, 20.0).await;
    let path = proxy.dir.path().join("portcullis.toml");
    let added = json!({"routes": [{"name": "added", "path": "/added/{agent}", "backends": [echo.addr.to_string()]}]});
    std::fs::write(&path, config.merge("", added).set("session.close_timeout", "2s").text()).expect("write");
    proxy.signal("HUP");
    let r = load.await.expect("task").expect("run");
    assert!(r.is_clean(), "{}", r.table());
    assert!(r.errors.is_empty(), "{}", r.table());
    assert_eq!(r.close_codes.get(&1000), Some(&20), "{}", r.table());
    drop(upgrade(proxy.plain, false, "/added/a1", &[]).await.expect("the reload applied"));
    let after = settles_to(&proxy, baseline).await;
    figures("reload with traffic flowing", &r, baseline, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_vanishing_without_a_close_do_not_touch_the_other_sessions() {
    let echo = KillableBackend::start();
    let proxy = ProxyProcess::start(&TestConfig::base(&[echo.addr.to_string()]).text()).await;
    let baseline = usage(&proxy).await;
    let plain = proxy.plain;
    let load = tokio::spawn(async move { run(&echo_load(plain, 20, Duration::from_secs(3))).await });
    sessions_reach(&proxy, 20.0).await;
    // Ten more sessions that send a message and drop their TCP connection, no close frame.
    for i in 0..10 {
        let mut c = upgrade(proxy.plain, false, &format!("/agents/vanishing-{i}/terminal"), &[]).await.expect("101");
        c.send(true, op::BINARY, &[i as u8; 64]).await;
        drop(c);
    }
    let r = load.await.expect("task").expect("run");
    assert!(r.is_clean(), "{}", r.table());
    assert!(r.errors.is_empty(), "{}", r.table());
    assert_eq!(r.close_codes.get(&1000), Some(&20), "{}", r.table());
    let after = settles_to(&proxy, baseline).await;
    figures("10 clients vanishing without a close beside 20 sessions", &r, baseline, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_outage_with_traffic_flowing_touches_no_session_and_known_agents_stay_reachable() {
    let echo = KillableBackend::start();
    let (registry, down) = outage_server(format!("{{\"members\":[{{\"addr\":\"{}\"}}]}}", echo.addr)).await;
    let text = TestConfig::base(&[])
        .remove("routes.0.backends")
        .merge(
            "routes.0.registry",
            json!({"url": format!("http://{registry}/agents/{{agent}}"), "ttl": "200ms", "stale_ttl": "1m"}),
        )
        .text();
    let proxy = ProxyProcess::start(&text).await;
    let baseline = usage(&proxy).await;
    let plain = proxy.plain;
    let load = tokio::spawn(async move { run(&echo_load(plain, 20, Duration::from_secs(2))).await });
    sessions_reach(&proxy, 20.0).await;
    down.store(true, std::sync::atomic::Ordering::SeqCst);
    let during = load.await.expect("task").expect("run");
    assert!(during.is_clean() && during.errors.is_empty(), "{}", during.table());
    assert_eq!(during.close_codes.get(&1000), Some(&20), "{}", during.table());
    // The registry is still down and the answers are past their ttl: the same agents reconnect
    // through the stale-if-error copy.
    let again = run(&echo_load(plain, 20, Duration::from_secs(1))).await.expect("run");
    assert_eq!(again.opened, 20, "known agents stay reachable during the outage: {}", again.table());
    assert!(again.is_clean() && again.errors.is_empty(), "{}", again.table());
    let after = settles_to(&proxy, baseline).await;
    figures("registry outage with traffic flowing (then 20 reconnects served stale)", &again, baseline, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_of_10000_sessions_leaves_nothing_behind() {
    let echo = KillableBackend::start();
    let text = TestConfig::base(&[echo.addr.to_string()]).one_address_load().text();
    let proxy = ProxyProcess::start(&text).await;
    let baseline = usage(&proxy).await;
    let storm = Scenario {
        scenario: Kind::Storm,
        connections: 8,
        sessions: 10_000,
        duration: Duration::from_secs(300),
        source_addrs: 8,
        ..echo_load(proxy.plain, 8, Duration::ZERO)
    };
    let r = run(&storm).await.expect("run");
    assert_eq!(r.opened, 10_000, "{}", r.table());
    assert!(r.is_clean() && r.errors.is_empty(), "{}", r.table());
    assert_eq!(r.received, 10_000, "every session's message came back: {}", r.table());
    let after = settles_to(&proxy, baseline).await;
    figures(&format!("reconnect storm ({:.0} sessions/s)", r.handshakes_per_s), &r, baseline, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_outage_with_traffic_flowing_touches_no_session_and_the_last_keys_still_verify() {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let echo = KillableBackend::start();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("p256");
    let private = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(private.path(), key.serialize_pem()).expect("write key");
    let raw = key.public_key_raw();
    let jwks = serde_json::json!({"keys": [{
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "k1",
        "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
    }]})
    .to_string();
    let (server, down) = outage_server(jwks).await;
    let text = TestConfig::base(&[echo.addr.to_string()])
        .merge("routes.0.auth", json!({"agent_claim": "agents"}))
        .merge(
            "",
            json!({"auth": {"jwks": [{
                "url": format!("http://{server}/jwks.json"),
                "algorithms": ["ES256"],
                "danger_allow_http": true,
                "refresh_interval": "200ms",
            }]}}),
        )
        .text();
    let proxy = ProxyProcess::start(&text).await;
    let baseline = usage(&proxy).await;
    let with_tokens = |duration| Scenario {
        token: portcullis_loadtest::token::TokenOptions {
            jwt_key: Some(private.path().to_owned()),
            kid: Some("k1".into()),
            alg: "ES256".into(),
            claims: vec!["sub=user-{conn}".into(), "agents=[\"agent-{conn}\"]".into()],
            token_ttl: Duration::from_secs(3600),
            token_via: "header".into(),
            ..Default::default()
        },
        ..echo_load(proxy.plain, 20, duration)
    };
    let during = {
        let s = with_tokens(Duration::from_secs(2));
        let load = tokio::spawn(async move { run(&s).await });
        sessions_reach(&proxy, 20.0).await;
        down.store(true, std::sync::atomic::Ordering::SeqCst);
        load.await.expect("task").expect("run")
    };
    assert!(during.is_clean() && during.errors.is_empty(), "{}", during.table());
    assert_eq!(during.close_codes.get(&1000), Some(&20), "{}", during.table());
    let (_, metrics) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&metrics, "portcullis_jwks_stale"), 1.0, "the refresher saw the outage");
    // New tokens, still verified with the last good key set.
    let again = run(&with_tokens(Duration::from_secs(1))).await.expect("run");
    assert_eq!(again.opened, 20, "{}", again.table());
    assert!(again.is_clean() && again.errors.is_empty(), "{}", again.table());
    let after = settles_to(&proxy, baseline).await;
    figures(
        "JWKS outage with traffic flowing (then 20 new tokens verified with the last keys)",
        &again,
        baseline,
        after,
    );
}
