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

#[tokio::test]
async fn worker_threads_sets_the_runtime_of_run() {
    let backend = Backend::echo().await;
    for n in [1, 3] {
        let text = TestConfig::base(&[backend.addr.to_string()]).set("server.worker_threads", n).text();
        let proxy = ProxyProcess::start(&text).await;
        let (_, body) = http_get(proxy.admin, "/metrics").await;
        assert_eq!(metric(&body, "portcullis_worker_threads"), n as f64, "worker_threads = {n}");
        // And it serves on them.
        let mut c = upgrade(proxy.plain, false, "/agents/a1/terminal", &[]).await.expect("101");
        c.send(true, op::TEXT, b"hi").await;
        assert_eq!(c.recv().await.payload, b"hi");
    }
}
