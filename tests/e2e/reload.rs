//! Hot reload: live sessions survive route changes, invalid configs and certificate changes;
//! new connections see the new configuration; removed routes' sessions end after the grace.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis::config::Config;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::harness::*;

/// Held around each refused reload of this file's tests: the counter of refused reloads is the
/// test process's, and one test counts it exactly while another may be refusing its own.
static REFUSED_RELOADS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn parse(text: &str) -> Config {
    Config::parse(text, Path::new("reload.toml")).expect("valid config")
}

/// The certificate a fresh TLS client is served.
async fn served_certificate(addr: std::net::SocketAddr, trust: &[&Path]) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for p in trust {
        for c in CertificateDer::pem_file_iter(p).expect("read") {
            roots.add(c.expect("cert")).expect("root");
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(portcullis::crypto::provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("handshake");
    tls.get_ref().1.peer_certificates().expect("certs")[0].to_vec()
}

fn der_of(pem: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(pem).expect("read").next().expect("one").expect("cert").to_vec()
}

async fn echo_exact(c: &mut Client, n: u32) {
    let payload: Vec<u8> = (0..1000u32).map(|i| (i.wrapping_mul(n + 7) >> 3) as u8).collect();
    c.send(true, op::BINARY, &payload).await;
    let f = c.recv().await;
    assert_eq!(f.payload, payload, "byte-exact echo {n}");
}

#[tokio::test]
async fn live_session_survives_route_changes_invalid_config_and_certificate_change() {
    let backend = Backend::echo().await;
    let other = Backend::echo().await;
    let base = TestConfig::base(&[backend.addr.to_string()]);
    let text = base.text();
    let proxy = Proxy::start_with(&text).await;
    let mut live = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("101");
    echo_exact(&mut live, 0).await;

    // (a) Add a route and change this one's settings.
    let added = base.set("session.close_timeout", "2s").merge(
        "",
        json!({"routes": [{"name": "events", "path": "/agents/{agent}/events", "backends": [other.addr.to_string()]}]}),
    );
    proxy.handle.reload(parse(&added.text())).expect("reload a");
    echo_exact(&mut live, 1).await;
    let mut ev = upgrade(proxy.tls, true, "/agents/a1/events", &[]).await.expect("new route is live");
    echo_exact(&mut ev, 2).await;
    assert_eq!(other.log.requests.lock().expect("lock").len(), 1);

    // (b) An invalid configuration file is refused; everything keeps working.
    let bad = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(bad.path(), "[[routes]]\nname = \"x\"\npath = \"no-slash\"\n").expect("write");
    {
        let _counted = REFUSED_RELOADS.lock().await;
        assert!(portcullis::server::reload_from_file(&proxy.handle, bad.path()).is_err());
    }
    echo_exact(&mut live, 3).await;
    upgrade(proxy.tls, true, "/agents/a1/events", &[]).await.expect("still the reloaded config");
    let (_, body) = http_get(proxy.admin, "/metrics").await;
    assert!(metric(&body, "portcullis_reloads_total{result=\"error\"}") >= 1.0);
    assert!(metric(&body, "portcullis_reloads_total{result=\"ok\"}") >= 1.0);

    // (c) A new certificate: the live session is untouched, new sessions get the new one.
    let dir = tempfile::tempdir().expect("dir");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
    let (cert2, key2) = (dir.path().join("cert2.pem"), dir.path().join("key2.pem"));
    std::fs::write(&cert2, ck.cert.pem()).expect("write");
    std::fs::write(&key2, ck.signing_key.serialize_pem()).expect("write");
    let old = &certs().cert;
    assert_eq!(served_certificate(proxy.tls, &[old, &cert2]).await, der_of(old));
    let rotated =
        added.clone().set("tls.cert", cert2.display().to_string()).set("tls.key", key2.display().to_string()).text();
    proxy.handle.reload(parse(&rotated)).expect("reload c");
    echo_exact(&mut live, 4).await;
    assert_eq!(
        served_certificate(proxy.tls, &[old, &cert2]).await,
        der_of(&cert2),
        "new sessions see the new certificate"
    );
    echo_exact(&mut live, 5).await;
}

#[tokio::test]
async fn session_on_a_removed_route_closes_after_the_grace_period() {
    let backend = Backend::echo().await;
    let config = TestConfig::base(&[backend.addr.to_string()]).merge("server", json!({"removed_route_grace": "600ms"}));
    let text = config.text();
    let proxy = Proxy::start_with(&text).await;
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("101");
    let without = config.set("routes.0.name", "other").set("routes.0.path", "/other/{agent}").text();
    assert_ne!(without, text);
    let reloaded = Instant::now();
    proxy.handle.reload(parse(&without)).expect("reload");
    echo_exact(&mut c, 1).await;
    let err = upgrade(proxy.tls, true, "/agents/a2/terminal", &[]).await.err().expect("route gone for new sessions");
    assert_eq!(err.status, 404);
    let close = c.recv_close().await;
    assert_eq!(close.close_code(), Some(1001));
    assert_eq!(close.close_reason(), "route removed");
    assert!(reloaded.elapsed() >= Duration::from_millis(500), "not before the grace period");
}

#[tokio::test]
async fn config_file_change_and_sighup_trigger_reloads() {
    let backend = Backend::echo().await;
    let config =
        TestConfig::base(&[backend.addr.to_string()]).merge("server", json!({"reload_poll_interval": "100ms"}));
    let text = config.text();
    // File watch, in process.
    let file = tempfile::NamedTempFile::new().expect("temp");
    std::fs::write(file.path(), &text).expect("write");
    let proxy = Proxy::start_with(&text).await;
    tokio::spawn(portcullis::server::watch_config(
        proxy.handle.clone(),
        file.path().to_owned(),
        Duration::from_millis(100),
    ));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let extra =
        json!({"routes": [{"name": "added", "path": "/added/{agent}", "backends": [backend.addr.to_string()]}]});
    std::fs::write(file.path(), config.merge("", extra.clone()).text()).expect("write");
    eventually("the file change is picked up", async || {
        if let Ok(c) = upgrade(proxy.tls, true, "/added/a1", &[]).await {
            return Some(c);
        }
        // Each try is a new connection: no faster than the default per-address connection
        // rate (20/s) lets them in.
        tokio::time::sleep(Duration::from_millis(50)).await;
        None
    })
    .await;

    // SIGHUP, in a child process (file polling off, so only the signal can reload).
    let text =
        TestConfig::base(&[backend.addr.to_string()]).merge("server", json!({"reload_poll_interval": "0s"})).text();
    let proxy = ProxyProcess::start(&text).await;
    let path = proxy.dir.path().join("portcullis.toml");
    // The file as the child runs it (with the state directory the harness added), read back.
    let current = std::fs::read_to_string(&path).expect("read");
    std::fs::write(&path, TestConfig::parse(&current).merge("", extra).text()).expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        upgrade(proxy.plain, false, "/added/a1", &[]).await.err().map(|h| h.status),
        Some(404),
        "not before SIGHUP"
    );
    proxy.signal("HUP");
    eventually("SIGHUP reloads", async || {
        if let Ok(c) = upgrade(proxy.plain, false, "/added/a1", &[]).await {
            return Some(c);
        }
        // As above: no faster than the default per-address connection rate.
        tokio::time::sleep(Duration::from_millis(50)).await;
        None
    })
    .await;
}

#[tokio::test]
async fn reload_cannot_turn_a_tls_listener_into_a_plaintext_one() {
    let backend = Backend::echo().await;
    let base = TestConfig::base(&[backend.addr.to_string()]);
    let proxy = Proxy::start_with(&base.text()).await;
    // The same file with the TLS listener made plain and no [tls] section.
    let downgraded = base.set("listeners.0.tls", false).remove("tls").text();
    let counted = REFUSED_RELOADS.lock().await;
    let (_, before) = http_get(proxy.admin, "/metrics").await;
    let err = proxy.handle.reload(parse(&downgraded)).expect_err("a reload that downgrades a TLS listener is refused");
    assert!(err.to_string().contains("restart"), "{err}");
    let (_, after) = http_get(proxy.admin, "/metrics").await;
    drop(counted);
    let refused = |body: &str| metric(body, "portcullis_reloads_total{result=\"error\"}");
    assert_eq!(refused(&after), refused(&before) + 1.0, "counted as a refused reload");
    // The port still speaks TLS only: a plaintext upgrade gets no 101, a wss one does.
    let mut plain = tokio::net::TcpStream::connect(proxy.tls).await.expect("connect");
    let request = "GET /agents/a1/terminal HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    tokio::io::AsyncWriteExt::write_all(&mut plain, request.as_bytes()).await.expect("send");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(SOON, tokio::io::AsyncReadExt::read_to_end(&mut plain, &mut answer)).await;
    assert!(!answer.starts_with(b"HTTP/1.1 101"), "plaintext upgrade answered on the TLS port");
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("wss still works");
    echo_exact(&mut c, 0).await;
}

/// Found by an attacker review: a reload took a recording directory that `check-config` and a
/// start refuse (under a regular file), and from then on every session of the route ran
/// unrecorded. A reload loads every file the configuration names first, and is refused whole
/// when one does not.
#[tokio::test]
async fn a_reload_whose_recording_directory_cannot_be_written_is_refused() {
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().expect("dir");
    let recorded = |d: &std::path::Path| {
        TestConfig::base(&[backend.addr.to_string()])
            .merge("routes.0", json!({"recording": {"directory": d.display().to_string()}}))
    };
    let proxy = Proxy::start_with(&recorded(&dir.path().join("rec")).text()).await;
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a directory").expect("write");
    let counted = REFUSED_RELOADS.lock().await;
    let err = proxy.handle.reload(parse(&recorded(&file.join("rec")).text())).expect_err("refused");
    drop(counted);
    assert!(err.to_string().contains("recording directory"), "{err}");
    // The route still records where it did.
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("101");
    echo_exact(&mut c, 1).await;
    drop(c);
    eventually("the session is recorded in the old directory", async || {
        std::fs::read_dir(dir.path().join("rec")).ok()?.next().map(|_| ())
    })
    .await;
}

/// Found by a documentation review: `portcullis_connections_limit` was set from the reloaded
/// file at every scrape, while the cap in force is the one the process started with (a reload
/// does not change it). The gauge now says the cap in force, and the reload says which of the
/// settings read at start it did not apply.
#[tokio::test]
async fn a_reload_does_not_change_the_connection_cap_and_says_so() {
    let backend = Backend::echo().await;
    let text = TestConfig::base(&[backend.addr.to_string()])
        .merge("server", json!({"reload_poll_interval": "0s", "max_connections": 100}))
        .text();
    let mut proxy = ProxyProcess::start_with_log(&text, "info").await;
    let path = proxy.dir.path().join("portcullis.toml");
    let current = std::fs::read_to_string(&path).expect("read");
    let reloads = |body: &str| metric(body, "portcullis_reloads_total{result=\"ok\"}");
    // 100 → 50, 50 twice more, then back to 100: the first three leave 100 in force and say
    // so, the last asks for the value in force and says nothing (found by a review: the
    // comparison was with the last reload's file, so only the first and the last warned).
    for cap in [50, 50, 50, 100] {
        std::fs::write(&path, TestConfig::parse(&current).set("server.max_connections", cap).text()).expect("write");
        let (_, before) = http_get(proxy.admin, "/metrics").await;
        proxy.signal("HUP");
        let after = eventually("the reload", async || {
            let (_, m) = http_get(proxy.admin, "/metrics").await;
            (reloads(&m) > reloads(&before)).then_some(m)
        })
        .await;
        assert_eq!(metric(&after, "portcullis_connections_limit"), 100.0, "the cap in force is the one started with");
    }
    let logs = proxy.stop_and_collect_logs().await;
    let warned = logs.lines().filter(|l| l.contains("server.max_connections") && l.contains("until a restart")).count();
    assert_eq!(warned, 3, "one warning for each reload that asked for another cap than the one in force: {logs}");
}
