//! The harness over real sockets on 127.0.0.1: its integrity check and its coordinated-omission
//! correction are proven against backends that misbehave on purpose.

use std::net::SocketAddr;
use std::time::Duration;

use portcullis_loadtest::backend::{self, BackendOptions, Mode};
use portcullis_loadtest::{run, Kind, Scenario};

/// Starts a backend on an ephemeral port; it lives as long as the test's runtime.
async fn start_backend(opts: BackendOptions) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(backend::serve(listener, opts));
    addr
}

fn scenario(kind: Kind, addr: SocketAddr) -> Scenario {
    Scenario {
        scenario: kind,
        target: Some(format!("ws://{addr}/agents/agent-{{conn}}/terminal")),
        connections: 4,
        duration: Duration::from_secs(1),
        drain: Duration::from_secs(2),
        quiet: true,
        ..Scenario::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_against_the_echo_backend_is_clean() {
    let addr = start_backend(BackendOptions::new(Mode::Echo)).await;
    let s = Scenario { window: 8, size: 1024, ..scenario(Kind::Echo, addr) };
    let r = run(&s).await.unwrap();
    assert!(r.is_clean(), "{}", r.table());
    assert!(r.errors.is_empty(), "{}", r.table());
    assert_eq!(r.opened, 4);
    assert!(r.received > 100, "{}", r.table());
    assert_eq!(r.sent, r.received);
    assert_eq!(r.close_codes.get(&1000), Some(&4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_calls_run_in_their_sessions_and_are_checked() {
    let addr = start_backend(BackendOptions::new(Mode::Echo)).await;
    let s = Scenario { target: Some(format!("http://{addr}/agents/a1/mcp")), size: 512, ..scenario(Kind::Mcp, addr) };
    let r = run(&s).await.unwrap();
    assert!(r.is_clean(), "{}", r.table());
    assert!(r.errors.is_empty(), "{}", r.table());
    assert!(r.received > 100, "{}", r.table());
    assert_eq!(r.sent, r.received);
    // A call without the session is refused by the backend, as an MCP server refuses it.
    let client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(client)).await.unwrap();
    tokio::spawn(conn);
    let call = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#;
    let req = hyper::Request::post("/agents/a1/mcp")
        .header("host", "x")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(call.as_bytes())))
        .unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupting_backend_is_reported_as_corruption() {
    let addr = start_backend(BackendOptions { corrupt_every: 7, ..BackendOptions::new(Mode::Echo) }).await;
    let r = run(&Scenario { window: 4, ..scenario(Kind::Echo, addr) }).await.unwrap();
    assert!(!r.is_clean());
    assert!(r.integrity.corrupted > 0, "{}", r.table());
    // Damaged messages are counted once, as corrupted, not also as lost.
    assert_eq!(r.integrity.lost, 0, "{}", r.table());
    assert!(r.table().contains("INTEGRITY FAILURE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_exits_non_zero_on_corruption() {
    let addr = start_backend(BackendOptions { corrupt_every: 5, ..BackendOptions::new(Mode::Echo) }).await;
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis-loadtest"))
        .args(["echo", "--target", &format!("ws://{addr}/x"), "-c", "2", "-d", "1s", "-q"])
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .unwrap();
    assert_eq!(status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_second_stall_shows_in_the_rate_latency() {
    // 200 msg/s for 4 s; the backend stops reading for 1 s after the 200th message (≈1 s in).
    let opts =
        BackendOptions { stall_after: Some(200), stall_for: Duration::from_secs(1), ..BackendOptions::new(Mode::Echo) };
    let addr = start_backend(opts).await;
    let s = Scenario { rate: 200.0, connections: 2, duration: Duration::from_secs(4), ..scenario(Kind::Rate, addr) };
    let r = run(&s).await.unwrap();
    assert!(r.is_clean(), "{}", r.table());
    assert!(r.received >= 780, "{}", r.table());
    // Every message meant to be sent during the stall waited for it: about 1/4 of the run.
    assert!(r.latency_us.p999 >= 500_000, "{}", r.table());
    assert!(r.latency_us.p90 >= 200_000, "{}", r.table());
    assert!(r.latency_us.p50 < 100_000, "{}", r.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_counts_handshakes() {
    let addr = start_backend(BackendOptions::new(Mode::Echo)).await;
    let r = run(&scenario(Kind::Storm, addr)).await.unwrap();
    assert!(r.is_clean(), "{}", r.table());
    assert!(r.handshakes_per_s > 10.0, "{}", r.table());
    assert_eq!(r.handshake_us.count, r.opened);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_storm_opens_sessions_at_its_rate_not_as_fast_as_it_can() {
    let addr = start_backend(BackendOptions::new(Mode::Echo)).await;
    // 100 a second over 4 workers for 1 s: each worker's 25 sessions are due 40 ms apart.
    let r = run(&Scenario { ramp: 100.0, ..scenario(Kind::Storm, addr) }).await.unwrap();
    assert!(r.is_clean(), "{}", r.table());
    // Unpaced, the same storm opens thousands. A worker that runs late near the end loses the
    // sessions due after the window closes: one for a delay of 10 ms, two or three for a stall
    // of 100 ms on a loaded machine.
    assert!((88..=100).contains(&r.opened), "{}", r.table());
    assert_eq!(r.handshake_us.count, r.opened);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_are_held_and_measured() {
    let addr = start_backend(BackendOptions::new(Mode::Echo)).await;
    let s = Scenario {
        connections: 50,
        ramp: 200.0,
        ping_interval: Duration::from_millis(200),
        pid: Some(std::process::id().into()),
        ..scenario(Kind::Idle, addr)
    };
    let r = run(&s).await.unwrap();
    assert_eq!(r.held, 50, "{}", r.table());
    assert!(r.process.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_checks_keystrokes_and_bursty_output() {
    let addr = start_backend(BackendOptions { size: 512, ..BackendOptions::new(Mode::Terminal) }).await;
    let s = Scenario { keystroke_rate: 20.0, duration: Duration::from_secs(2), ..scenario(Kind::Terminal, addr) };
    let r = run(&s).await.unwrap();
    assert!(r.is_clean(), "{}", r.table());
    assert!(r.latency_us.count > 50, "{}", r.table());
    // Backend output arrives too, beyond the echoes.
    assert!(r.received > r.latency_us.count, "{}", r.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_files_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Scenario::from_file(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn procs_split_the_run_and_merge_the_reports() {
    let addr = start_backend(BackendOptions::new(Mode::Echo)).await;
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let status = tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis-loadtest"))
        .args(["echo", "--target", &format!("ws://{addr}/x/{{conn}}"), "-c", "5", "-d", "1s", "--procs", "2", "-q"])
        .arg("--json")
        .arg(&json)
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let r: portcullis_loadtest::Report = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r.connections, 5);
    assert_eq!(r.opened, 5);
    assert!(r.is_clean());
    assert_eq!(r.latency_us.count, r.received);
    assert!(r.notes.iter().any(|n| n.contains("2 worker processes")), "{:?}", r.notes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_works_with_a_ca_file_and_with_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tls = backend::tls_acceptor(&cert, &key).unwrap();
    tokio::spawn(backend::serve_with(listener, BackendOptions::new(Mode::Echo), Some(tls)));
    let base = Scenario {
        scenario: Kind::Echo,
        target: Some(format!("wss://localhost:{port}/agents/agent-{{conn}}/terminal")),
        connections: 2,
        duration: Duration::from_millis(500),
        quiet: true,
        ..Scenario::default()
    };
    let with_ca = run(&Scenario { ca: Some(cert.clone()), ..base.clone() }).await.unwrap();
    assert_eq!(with_ca.opened, 2, "{}", with_ca.table());
    assert!(with_ca.is_clean() && with_ca.received > 0, "{}", with_ca.table());
    let insecure = run(&Scenario { insecure: true, ..base.clone() }).await.unwrap();
    assert_eq!(insecure.opened, 2, "{}", insecure.table());
    // Without a CA the self-signed certificate is refused, and the error says why.
    let other_ca = dir.path().join("other.pem");
    std::fs::write(&other_ca, rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap().cert.pem()).unwrap();
    let refused = run(&Scenario { ca: Some(other_ca), ..base }).await.unwrap();
    assert_eq!(refused.opened, 0);
    assert!(refused.errors.contains_key("tls"), "{}", refused.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_counted_as_sent_while_the_run_goes_on_not_only_at_its_end() {
    // The live progress line and the timeline read the same counter; it used to stay 0 until
    // each session ended, so the line showed `sent 0` while `recv` climbed.
    let addr = start_backend(BackendOptions::new(Mode::Echo)).await;
    let s = Scenario { window: 4, duration: Duration::from_secs(3), ..scenario(Kind::Echo, addr) };
    let r = run(&s).await.unwrap();
    assert!(r.is_clean(), "{}", r.table());
    let during: Vec<_> = r.timeline.iter().filter(|p| p.t_s < 2.5).collect();
    assert!(!during.is_empty(), "timeline points during the run");
    assert!(during.iter().all(|p| p.sent > 0), "sent counted live: {:?}", r.timeline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_on_thresholds_set_the_exit_code_and_name_what_broke() {
    let addr = start_backend(BackendOptions::new(Mode::Echo)).await;
    let run = |thresholds: &'static [&'static str]| {
        let mut args = vec!["echo".to_owned(), "--target".into(), format!("ws://{addr}/x"), "-c".into(), "2".into()];
        args.extend(["-d", "1s", "-q"].map(String::from));
        for t in thresholds {
            args.extend(["--fail-on".to_owned(), (*t).to_owned()]);
        }
        tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis-loadtest")).args(args).output()
    };
    // Bounds the run meets: 0.
    let out = run(&["p99>10s", "refused>0%", "errors>0"]).await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    // A latency no run meets: 3, and the breach named.
    let out = run(&["p50>1us"]).await.unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("threshold p50>1us failed"));
    // A malformed bound is an argument error.
    let out = run(&["p99<50ms"]).await.unwrap();
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
}

#[test]
fn thresholds_judge_a_report() {
    use portcullis_loadtest::stats::{Report, Threshold};
    let mut r = Report { connections: 100, opened: 20, ..Report::default() };
    r.latency_us.p99 = 62_100;
    let t: Threshold = "refused>5%".parse().unwrap();
    assert!(t.breach(&r).unwrap().contains("80.0% (80 of 100 sessions not opened)"));
    let t: Threshold = "p99>50ms".parse().unwrap();
    assert!(t.breach(&r).unwrap().contains("62.1ms"));
    let t: Threshold = "p99>100ms".parse().unwrap();
    assert!(t.breach(&r).is_none());
    assert!("latency>1ms".parse::<Threshold>().is_err());
    assert!("refused>5".parse::<Threshold>().is_err());
}

/// Load from several machines: four worker processes of the binary, each running its share
/// (`--shard K/4`) and writing its report, then `merge`: the totals are the sums, and the
/// percentiles are those of all the samples together (from the merged histograms), not averages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_worker_processes_merged_give_the_sums_and_the_percentiles_of_all_samples() {
    let addr = start_backend(BackendOptions::new(Mode::Echo)).await;
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_portcullis-loadtest");
    let mut workers = Vec::new();
    for k in 0..4 {
        let out = dir.path().join(format!("worker-{k}.json"));
        let child = tokio::process::Command::new(bin)
            .args(["echo", "-q", "-c", "10", "--window", "2", "--size", "64", "-d", "1s"])
            .arg("--target")
            .arg(format!("ws://{addr}/agents/agent-{{conn}}/terminal"))
            .arg("--shard")
            .arg(format!("{k}/4"))
            .arg("--json")
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        workers.push((child, out));
    }
    let mut parts = Vec::new();
    for (mut child, out) in workers {
        assert!(child.wait().await.unwrap().success());
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        parts.push((out, v));
    }
    let merged_path = dir.path().join("merged.json");
    let status = tokio::process::Command::new(bin)
        .arg("merge")
        .args(parts.iter().map(|(p, _)| p))
        .arg("--json")
        .arg(&merged_path)
        .arg("--html")
        .arg(dir.path().join("merged.html"))
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let merged: serde_json::Value = serde_json::from_slice(&std::fs::read(&merged_path).unwrap()).unwrap();
    let sum = |k: &str| parts.iter().map(|(_, v)| v[k].as_u64().unwrap()).sum::<u64>();
    // Sessions 0..10 split 2, 3, 2, 3: every session once.
    let shares: Vec<u64> = parts.iter().map(|(_, v)| v["connections"].as_u64().unwrap()).collect();
    assert_eq!(shares, vec![2, 3, 2, 3]);
    for k in ["connections", "opened", "sent", "received"] {
        assert_eq!(merged[k].as_u64(), Some(sum(k)), "{k}");
    }
    assert!(sum("received") > 100);
    // The percentiles of every sample: from the workers' histograms put together here.
    let mut all = std::collections::BTreeMap::new();
    for (_, v) in &parts {
        for pair in v["latency_hist"].as_array().unwrap() {
            *all.entry(pair[0].as_u64().unwrap()).or_insert(0u64) += pair[1].as_u64().unwrap();
        }
    }
    let total: u64 = all.values().sum();
    assert_eq!(merged["latency_us"]["count"].as_u64(), Some(total));
    for (q, key) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99")] {
        let rank = (q * total as f64).ceil() as u64;
        let mut seen = 0;
        let expected = all.iter().find(|(_, n)| {
            seen += **n;
            seen >= rank
        });
        let expected = *expected.unwrap().0 as f64;
        let got = merged["latency_us"][key].as_u64().unwrap() as f64;
        // Three significant digits: within 0.1 %, and a microsecond of rounding.
        assert!((got - expected).abs() <= expected * 0.002 + 1.0, "{key}: merged {got}, all samples {expected}");
    }
    assert!(std::fs::read_to_string(dir.path().join("merged.html")).unwrap().contains("<svg"));
}
