//! The demo agent behind the proxy: its terminal is a real shell on a PTY (keystrokes in,
//! output out, window size changes reach the PTY), and its tasks stream their output as SSE.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;

use crate::harness::*;

/// `portcullis demo --backend-only` as a child process on a free port, killed on drop.
pub(crate) struct DemoAgent {
    child: Child,
    pub(crate) addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for DemoAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) async fn demo_agent() -> DemoAgent {
    let dir = tempfile::tempdir().expect("tempdir");
    // Port 0: the agent binds a port of the kernel's choosing and names it on stderr.
    let log = dir.path().join("agent.log");
    let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["demo", "--backend-only", "--no-npm", "--shell", "/bin/sh", "--backend", "127.0.0.1:0", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn the demo agent");
    let addr: std::net::SocketAddr = eventually("the demo agent names its address", async || {
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        let rest = logged.split("listening on http://").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    })
    .await;
    DemoAgent { child, addr, _dir: dir }
}

fn config(agent: std::net::SocketAddr) -> String {
    TestConfig::base(&[agent.to_string()])
        .merge(
            "",
            json!({"routes": [{
                "name": "api",
                "path": "/agents/{agent}/api/{*rest}",
                "kind": "http",
                "backends": [agent.to_string()],
                "backend_path": "/agents/{agent}/api/{rest}",
            }]}),
        )
        .text()
}

/// Reads the terminal's output until `want` shows up in it `times` times.
pub(crate) async fn read_until(c: &mut Client, want: &str, times: usize) -> String {
    let mut seen = String::new();
    let deadline = Instant::now() + SOON;
    while seen.matches(want).count() < times {
        assert!(Instant::now() < deadline, "{want:?} never appeared; the terminal showed:\n{seen}");
        let f = c.recv().await;
        assert_ne!(f.opcode, op::CLOSE, "terminal closed; it showed:\n{seen}");
        seen.push_str(&String::from_utf8_lossy(&f.payload));
    }
    seen
}

#[tokio::test]
async fn the_demo_terminal_is_a_real_shell_on_a_pty_through_the_proxy() {
    let agent = demo_agent().await;
    let proxy = Proxy::start_with(&config(agent.addr)).await;
    let mut c = upgrade(proxy.tls, true, "/agents/demo/terminal", &[]).await.expect("101");
    let word = format!("portcullis-{}", rand::random::<u32>());
    c.send(true, op::BINARY, format!("echo {word}\r").as_bytes()).await;
    // The PTY echoes the typed line, then the shell prints the word: twice in all.
    read_until(&mut c, &format!("{word}\r\n"), 2).await;
    c.send(true, op::TEXT, br#"{"type":"resize","cols":101,"rows":33}"#).await;
    c.send(true, op::BINARY, b"stty size\r").await;
    read_until(&mut c, "33 101", 1).await;
    c.send(true, op::BINARY, b"exit\r").await;
    let close = c.recv_close().await;
    assert_eq!(close.close_code(), Some(1000), "the shell exited: {}", close.close_reason());
}

#[tokio::test]
async fn a_demo_task_streams_its_output_line_by_line_as_sse() {
    let agent = demo_agent().await;
    let proxy = Proxy::start_with(&config(agent.addr)).await;
    let mut h = H1::connect(proxy.tls, true).await;
    let created = h.call(request("POST", "/agents/demo/api/tasks", &[], full(r#"{"name":"t","steps":5}"#))).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let task: serde_json::Value = serde_json::from_slice(&created.body).expect("json");
    let id = task["id"].as_u64().expect("id");
    let resp = h.send(request("GET", &format!("/agents/demo/api/tasks/{id}/output"), &[], full(Bytes::new()))).await;
    assert_eq!(resp.headers().get("content-type").map(|v| v.as_bytes()), Some(&b"text/event-stream"[..]));
    let mut body = resp.into_body();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(frame) = tokio::time::timeout(SOON, body.frame()).await.expect("event in time") {
        if let Some(d) = frame.expect("chunk").data_ref() {
            text.push_str(&String::from_utf8_lossy(d));
            arrivals.push(Instant::now());
        }
    }
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("data: [t] step")).collect();
    assert_eq!(
        lines,
        [
            "data: [t] step 1/5: reading the repository",
            "data: [t] step 2/5: planning the change",
            "data: [t] step 3/5: editing files",
            "data: [t] step 4/5: running the tests",
            "data: [t] step 5/5: reviewing the diff"
        ]
    );
    assert!(text.contains("event: done"));
    let spread = arrivals.last().copied().zip(arrivals.first().copied()).map(|(l, f)| l - f).unwrap_or_default();
    // Produced 400 ms apart over 1.6 s: a request up to just under a second late still sees
    // them spread out.
    assert!(spread >= Duration::from_millis(600), "the lines came together ({spread:?}), not as produced");
    let status = h.get("/agents/demo/api/status", &[]).await;
    assert!(status.text().contains("\"status\":\"running\""), "{}", status.text());
}
