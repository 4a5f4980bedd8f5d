//! The command line: `check-config` exit codes and messages, and what `run` takes from the
//! configuration before it starts (its worker threads).

use std::process::Command;

use crate::harness::*;

#[test]
fn check_config_exits_0_for_valid_and_64_naming_file_line_and_key_for_invalid() {
    let dir = tempfile::tempdir().expect("dir");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n[admin]\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis")).arg("check-config").arg(&good).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n\n[session]\nidle_timout = \"5m\"\n")
        .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis")).arg("check-config").arg(&bad).output().expect("run");
    assert_eq!(out.status.code(), Some(64));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("bad.toml:5:") && msg.contains("idle_timout"), "{msg}");

    // `run` refuses the same file with the same code, before binding anything.
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis")).args(["run", "--config"]).arg(&bad).output().expect("run");
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn check_config_reads_every_file_it_names_and_reports_each_problem_with_its_path() {
    let dir = tempfile::tempdir().expect("dir");
    let c = certs();
    let garbage = dir.path().join("garbage-cert.pem");
    std::fs::write(&garbage, "not a certificate").expect("write");
    let missing_key = dir.path().join("missing-key.pem");
    let missing_pub = dir.path().join("missing-public.pem");
    let config =
        |cert: &std::path::Path, key: &std::path::Path, sni_cert: &std::path::Path, public: &std::path::Path| {
            format!(
                "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\ntls = true\n[admin]\n\
             [tls]\ncert = {cert:?}\nkey = {key:?}\n\
             [[tls.sni]]\nserver_names = [\"a.example\"]\ncert = {sni_cert:?}\nkey = {:?}\n\
             [[auth.keys]]\nalgorithms = [\"ES256\"]\npublic_key = {public:?}\n",
                c.key
            )
        };
    let check = |path: &std::path::Path, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_portcullis")).arg("check-config").args(extra).arg(path).output().expect("run")
    };

    // Three broken files: each is named, on its own line, and the file is refused with 64.
    let bad = dir.path().join("bad-files.toml");
    std::fs::write(&bad, config(&c.cert, &missing_key, &garbage, &missing_pub)).expect("write");
    let out = check(&bad, &[]);
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stdout));
    let msg = String::from_utf8_lossy(&out.stderr);
    for file in [&missing_key, &garbage, &missing_pub] {
        let name = file.display().to_string();
        assert!(msg.lines().any(|l| l.contains(&name)), "{name} not reported:\n{msg}");
    }
    assert_eq!(msg.lines().count(), 3, "one line per problem:\n{msg}");
    // `run` refuses the same file the same way: 64, the same lines, before binding anything.
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis")).args(["run", "--config"]).arg(&bad).output().expect("run");
    assert_eq!(out.status.code(), Some(64));
    assert_eq!(String::from_utf8_lossy(&out.stderr), msg, "run and check-config say the same");
    // `--syntax-only` checks the configuration alone.
    let out = check(&bad, &["--syntax-only"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("files not read"));

    // A key that does not match its certificate is named too.
    let other = rcgen::generate_simple_self_signed(vec!["other".into()]).expect("cert");
    let other_key = dir.path().join("other-key.pem");
    std::fs::write(&other_key, other.signing_key.serialize_pem()).expect("write");
    let public = dir.path().join("public.pem");
    std::fs::write(&public, other.signing_key.public_key_pem()).expect("write");
    let mismatched = dir.path().join("mismatched.toml");
    std::fs::write(&mismatched, config(&c.cert, &other_key, &c.cert, &public)).expect("write");
    let out = check(&mismatched, &[]);
    assert_eq!(out.status.code(), Some(64));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains(&other_key.display().to_string()) && msg.lines().count() == 1, "{msg}");

    // Every file good: 0, and it says the files were read.
    let good = dir.path().join("good-files.toml");
    std::fs::write(&good, config(&c.cert, &c.key, &c.cert, &public)).expect("write");
    let out = check(&good, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("every file it names read"));
}

#[tokio::test]
async fn run_logs_the_configuration_in_force_at_start() {
    let backend = Backend::echo().await;
    let mut proxy = ProxyProcess::start(&TestConfig::base(&[backend.addr.to_string()]).text()).await;
    let logs = proxy.stop_and_collect_logs().await;
    let line = logs.lines().find(|l| l.contains("configuration in force")).unwrap_or_else(|| panic!("{logs}"));
    for part in ["listeners [tls 127.0.0.1:0 tls; plain 127.0.0.1:0]", "routes [terminal]", "drain_timeout 10s"] {
        assert!(line.contains(part), "{part} missing from: {line}");
    }
}

#[tokio::test]
async fn worker_threads_sets_the_runtime_of_run() {
    let backend = Backend::echo().await;
    // One worker is the current-thread runtime on the main thread: no worker thread besides
    // it (blocking work, if any, is on `pc-blocking` threads). With more, the multi-thread
    // runtime's threads: its workers, and its blocking threads under the same name.
    for (n, worker_threads) in [(1, 0..=0), (3, 3..=usize::MAX)] {
        let text = TestConfig::base(&[backend.addr.to_string()]).set("server.worker_threads", n).text();
        let proxy = ProxyProcess::start(&text).await;
        let (_, body) = http_get(proxy.admin, "/metrics").await;
        assert_eq!(metric(&body, "portcullis_worker_threads"), n as f64, "worker_threads = {n}");
        // And it serves on them.
        let mut c = upgrade(proxy.plain, false, "/agents/a1/terminal", &[]).await.expect("101");
        c.send(true, op::TEXT, b"hi").await;
        assert_eq!(c.recv().await.payload, b"hi");
        let workers = thread_names(proxy.child.id()).iter().filter(|n| n.as_str() == "tokio-rt-worker").count();
        assert!(worker_threads.contains(&workers), "{workers} tokio worker threads with worker_threads = {n}");
    }
}

#[tokio::test]
async fn reuse_port_lets_two_processes_share_a_listener_and_the_kernel_spreads_sessions() {
    let backend = Backend::echo().await;
    let config = |port: u16, reuse: bool| {
        TestConfig::base(&[backend.addr.to_string()])
            .set("listeners.1.addresses", vec![toml::Value::from(format!("127.0.0.1:{port}"))])
            .set("listeners.1.reuse_port", reuse)
            .text()
    };
    // The first process binds a port of the kernel's choosing; the second joins it.
    let a = ProxyProcess::start(&config(0, true)).await;
    let port = a.plain.port();
    let b = ProxyProcess::start(&config(port, true)).await;
    assert_eq!((a.plain.port(), b.plain.port()), (port, port), "both bound the one port");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut clients = Vec::new();
    for i in 0..40 {
        let mut c = upgrade(addr, false, &format!("/agents/a{i}/terminal"), &[]).await.expect("101");
        c.send(true, op::TEXT, b"hi").await;
        assert_eq!(c.recv().await.payload, b"hi");
        clients.push(c);
    }
    let active = |admin| async move { metric(&http_get(admin, "/metrics").await.1, "portcullis_sessions_active") };
    let (on_a, on_b) = (active(a.admin).await, active(b.admin).await);
    assert_eq!(on_a + on_b, 40.0, "every session is held by one of the two");
    assert!(on_a >= 1.0 && on_b >= 1.0, "the kernel spread them: {on_a} and {on_b}");
    // Without reuse_port a third process cannot bind the port: it exits with an error.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, config(port, false)).expect("write");
    let out = tokio::time::timeout(
        SOON,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis")).args(["run", "--config"]).arg(&path).output(),
    )
    .await
    .expect("exits in time")
    .expect("run");
    assert!(!out.status.success(), "a second bind without reuse_port fails");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&port.to_string()), "the error names the address");
}

#[test]
fn the_kubernetes_configmap_holds_a_configuration_that_check_config_accepts() {
    let root = env!("CARGO_MANIFEST_DIR");
    let manifest = std::fs::read_to_string(format!("{root}/deploy/kubernetes/configmap.yaml")).expect("configmap");
    let block = manifest.split("portcullis.toml: |\n").nth(1).expect("the portcullis.toml key");
    let toml: String = block.lines().map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l.trim()))).collect();
    // The files the pod mounts, here from the tests' own certificate and keys.
    let dir = tempfile::tempdir().expect("dir");
    let c = certs();
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "a-long-random-admin-token-for-the-test").expect("write");
    let public = dir.path().join("jwt-public.pem");
    let key = rcgen::KeyPair::generate().expect("key");
    std::fs::write(&public, key.public_key_pem()).expect("write");
    let toml = toml
        .replace("/etc/portcullis/tls/tls.crt", &c.cert.display().to_string())
        .replace("/etc/portcullis/tls/tls.key", &c.key.display().to_string())
        .replace("/etc/portcullis/secrets/admin-token", &token.display().to_string())
        .replace("/etc/portcullis/secrets/jwt-public.pem", &public.display().to_string());
    let fleet_secret = dir.path().join("fleet-secret");
    std::fs::write(&fleet_secret, "a-long-random-fleet-secret-for-the-test-of-32-bytes").expect("write");
    let toml = toml.replace("/etc/portcullis/secrets/fleet-secret", &fleet_secret.display().to_string());
    assert!(!toml.contains("/etc/portcullis"), "every mounted path is replaced:\n{toml}");
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, &toml).expect("write");
    // What the Deployment sets from the Valkey Secret and the pod's status.
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("check-config")
        .arg(&path)
        .env("PORTCULLIS_REDIS_URL", "redis://:password@portcullis-valkey.portcullis.svc:6379")
        .env("POD_IP", "10.1.2.3")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}\n{toml}", String::from_utf8_lossy(&out.stderr));

    // The pod's grace period covers the preStop pause and the whole drain.
    let deployment = std::fs::read_to_string(format!("{root}/deploy/kubernetes/deployment.yaml")).expect("deployment");
    let number_after = |text: &str, key: &str| -> u64 {
        let at = text.find(key).unwrap_or_else(|| panic!("{key} missing"));
        text[at + key.len()..]
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .expect(key)
    };
    let grace = number_after(&deployment, "terminationGracePeriodSeconds:");
    let pause = number_after(&deployment, "sleep:\n                seconds:");
    let drain = number_after(&toml, "drain_timeout = \"");
    assert!(grace >= pause + drain + 5, "grace {grace} s < preStop {pause} s + drain_timeout {drain} s + 5 s");
}

#[tokio::test]
async fn health_exits_0_for_a_live_proxy_and_1_for_an_absent_one_or_a_wrong_path() {
    let backend = Backend::echo().await;
    let proxy = ProxyProcess::start(&TestConfig::base(&[backend.addr.to_string()]).text()).await;
    let health = |url: String| async move {
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_portcullis"))
                .args(["health", "--timeout-ms", "2000", "--url", &url])
                .output()
        })
        .await
        .expect("join")
        .expect("run")
    };
    let out = health(format!("http://{}/live", proxy.admin)).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("200 OK"));
    let out = health(format!("http://{}/ready", proxy.admin)).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Nothing listening: 1, saying why.
    let refusing = Refusing::new();
    let out = health(format!("http://{}/live", refusing.addr)).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/live"), "{}", String::from_utf8_lossy(&out.stderr));
    // A path the admin listener does not serve: 404 is not healthy.
    let out = health(format!("http://{}/nope", proxy.admin)).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("404"));
}

#[test]
fn check_config_reports_a_recording_directory_it_cannot_write_in() {
    let dir = tempfile::tempdir().expect("dir");
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "not a directory").expect("write");
    let config = |recordings: &std::path::Path| {
        format!(
            "[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n[[routes]]\nname = \"t\"\npath = \"/agents/{{agent}}/terminal\"\n\
             backends = [\"127.0.0.1:1\"]\n[routes.recording]\ndirectory = {recordings:?}\n"
        )
    };
    let path = dir.path().join("portcullis.toml");
    std::fs::write(&path, config(&blocker)).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis")).arg("check-config").arg(&path).output().expect("run");
    assert_eq!(out.status.code(), Some(64));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("route t: recording directory") && msg.contains("a-file"), "{msg}");
    // A directory that can be made is fine (check-config makes it, as the first recording would).
    std::fs::write(&path, config(&dir.path().join("recordings"))).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis")).arg("check-config").arg(&path).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The configuration embedded in the shipped ConfigMap passes `check-config --syntax-only` as
/// it is, although its secret files exist only in the pod.
#[test]
fn the_kubernetes_configmap_passes_check_config_syntax_only() {
    let yaml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/configmap.yaml"))
        .expect("configmap.yaml");
    let (_, body) = yaml.split_once("portcullis.toml: |\n").expect("the embedded file");
    let text: String = body
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or("")))
        .collect();
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("portcullis.toml");
    std::fs::write(&file, text).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check-config", "--syntax-only"])
        .arg(&file)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("warning"), "the shipped ConfigMap draws a warning: {stderr}");
    // Uncommenting the PROXY protocol hint gives a valid file too.
    let hinted =
        std::fs::read_to_string(&file).expect("read").replace("# proxy_protocol = true", "proxy_protocol = true");
    std::fs::write(&file, hinted.replace("# proxy_protocol_from", "proxy_protocol_from")).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["check-config", "--syntax-only"])
        .arg(&file)
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// `portcullis connect` says why the proxy refused the WebSocket (status, the proxy's reason,
/// its `WWW-Authenticate`), and bridges stdin and stdout once it is accepted.
#[tokio::test]
async fn connect_shows_the_proxys_reason_for_a_refusal_and_echoes_once_accepted() {
    let backend = Backend::echo().await;
    let key = hmac();
    let text = TestConfig::base(&[backend.addr.to_string()])
        .merge("", key.auth_keys())
        .merge("routes.0", json!({"auth": {"agent_claim": "agents"}}))
        .text();
    let proxy = Proxy::start_with(&text).await;
    let url = format!("ws://{}/agents/a1/terminal", proxy.plain);
    let run = |auth: String, input: &'static [u8]| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
                .args(["connect", &url, "-H", &format!("Authorization: {auth}")])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn connect");
            child.stdin.take().expect("stdin").write_all(input).expect("write");
            child.wait_with_output().expect("connect ends")
        })
    };
    let out = run(key.bearer(&["a2"]), b"").await.expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("403") && stderr.contains("token does not grant access to this agent"), "{stderr}");
    let out = run("Bearer not.a.token".into(), b"").await.expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("401") && stderr.contains("WWW-Authenticate: Bearer"), "{stderr}");
    // Accepted: a line typed comes back; stdin is closed only once it has.
    let auth = key.bearer(&["a1"]);
    let echoed = tokio::task::spawn_blocking(move || {
        use std::io::{BufRead, Write};
        let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["connect", &url, "-H", &format!("Authorization: {auth}")])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn connect");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"hello\n").expect("write");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
        drop(stdin);
        (line, child.wait().expect("connect ends"))
    })
    .await
    .expect("join");
    assert_eq!(echoed.0.trim(), "hello");
    assert!(echoed.1.success());
    // On a terminal route the line ends with Enter (CR), so a shell runs it.
    backend.log.wait_for("the line with its carriage return", |f| f.payload == b"hello\r").await;
}

/// `connect --ca` with the certificate `openssl req -x509` makes (self-signed, CA:TRUE): curl
/// accepts it, WebPKI alone refuses it as an end entity (`CaUsedAsEndEntity`). `connect`
/// trusts a server certificate that is itself in the file, when its names cover the host.
#[tokio::test]
async fn connect_trusts_a_self_signed_ca_certificate_given_with_ca_for_its_own_name() {
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().expect("dir");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).expect("cert");
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).expect("write");
    std::fs::write(&key_path, key.serialize_pem()).expect("write");
    let text = TestConfig::base(&[backend.addr.to_string()])
        .set("tls.cert", cert_path.display().to_string())
        .set("tls.key", key_path.display().to_string())
        .text();
    let proxy = Proxy::start_with(&text).await;
    let connect = |host: &str, ca: &std::path::Path| {
        let url = format!("wss://{host}:{}/agents/a1/terminal", proxy.tls.port());
        let ca = ca.to_owned();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
                .args(["connect", &url, "--ca"])
                .arg(&ca)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn connect");
            child.stdin.take().expect("stdin").write_all(b"over tls\n").expect("write");
            child.wait_with_output().expect("connect ends")
        })
    };
    let out = connect("localhost", &cert_path).await.expect("join");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("connected"), "{}", String::from_utf8_lossy(&out.stderr));
    backend.log.wait_for("the line over TLS", |f| f.payload == b"over tls\r").await;
    // The name still has to match: the same certificate does not vouch for 127.0.0.1.
    let out = connect("127.0.0.1", &cert_path).await.expect("join");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tls handshake failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another certificate in the file: refused.
    let other = dir.path().join("other.pem");
    std::fs::write(&other, std::fs::read(&certs().cert).expect("read")).expect("write");
    let out = connect("localhost", &other).await.expect("join");
    assert!(!out.status.success(), "a certificate the file does not hold is refused");
    // The same kind of certificate, expired: WebPKI's refusal stands, given with --ca or not.
    let old_key = rcgen::KeyPair::generate().expect("key");
    let mut expired = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    expired.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    expired.not_before = rcgen::date_time_ymd(2020, 1, 1);
    expired.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let expired = expired.self_signed(&old_key).expect("cert");
    let (expired_cert, expired_key) = (dir.path().join("expired.pem"), dir.path().join("expired-key.pem"));
    std::fs::write(&expired_cert, expired.pem()).expect("write");
    std::fs::write(&expired_key, old_key.serialize_pem()).expect("write");
    let stale = Proxy::start_with(
        &TestConfig::base(&[backend.addr.to_string()])
            .set("tls.cert", expired_cert.display().to_string())
            .set("tls.key", expired_key.display().to_string())
            .text(),
    )
    .await;
    let url = format!("wss://localhost:{}/agents/a1/terminal", stale.tls.port());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["connect", &url, "--ca"])
            .arg(&expired_cert)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run")
    })
    .await
    .expect("join");
    assert!(!out.status.success(), "an expired pinned certificate is refused");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tls handshake failed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --system-roots alone: the system's store is read, and it does not vouch for a
    // self-signed certificate.
    let url = format!("wss://localhost:{}/agents/a1/terminal", proxy.tls.port());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["connect", &url, "--system-roots"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run")
    })
    .await
    .expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("tls handshake failed") || stderr.contains("no certificate found in the system trust store"),
        "{stderr}"
    );
}

/// The container image starts with nothing mounted: its default configuration (what the
/// Dockerfile copies to the path its CMD runs) passes `check-config` as shipped, reading no file,
/// warns that it has no routes, and runs: `/live` answers and every request gets 404.
#[tokio::test]
async fn the_container_images_default_configuration_starts_with_nothing_mounted() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dockerfile = std::fs::read_to_string(format!("{root}/Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains(r#"CMD ["run", "--config", "/etc/portcullis/portcullis.toml"]"#),
        "the image runs /etc/portcullis/portcullis.toml"
    );
    let shipped = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("COPY ")?.strip_suffix(" /etc/portcullis/portcullis.toml"))
        .expect("the Dockerfile copies a configuration to /etc/portcullis/portcullis.toml");
    let path = format!("{root}/{shipped}");
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis")).arg("check-config").arg(&path).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the image's default configuration is refused: {stderr}");
    assert!(stderr.contains("no routes"), "it says it routes nothing: {stderr}");
    // Run as shipped, but on port 0: the container's fixed ports are not free here.
    let text = std::fs::read_to_string(&path).expect("read");
    let text = text.replace("0.0.0.0:8080", "127.0.0.1:0").replace("127.0.0.1:9090", "127.0.0.1:0");
    let dir = tempfile::tempdir().expect("dir");
    let config = dir.path().join("portcullis.toml");
    std::fs::write(&config, text).expect("write");
    let log = dir.path().join("log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "portcullis=info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    let addr = |logged: &str, what: &str| -> Option<std::net::SocketAddr> {
        let line = logged.lines().find(|l| l.contains(what))?;
        line.split_whitespace().find_map(|w| w.strip_prefix("addr="))?.trim_matches('"').parse().ok()
    };
    let (listener, admin) = eventually("the default configuration's listeners are up", async || {
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        Some((addr(&logged, " listening ")?, addr(&logged, "admin listening")?))
    })
    .await;
    let (status, _) = http_get(admin, "/live").await;
    assert_eq!(status, 200);
    let (status, _) = http_get(listener, "/agents/a1/terminal").await;
    assert_eq!(status, 404, "no route: 404");
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains("no routes"), "run logs the warning too: {logged}");
    let _ = child.kill();
    let _ = child.wait();
}
