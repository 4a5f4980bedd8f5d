//! Zero-downtime binary upgrade: SIGUSR2 hands the listening sockets to a new process (the
//! same binary here), which takes over while the old one drains.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::*;

/// Waits until the proxy's log (both processes write to it) has a line containing `what`.
async fn log_line(proxy: &ProxyProcess, what: &str) -> String {
    eventually(&format!("a log line has {what:?}"), async || {
        let log = std::fs::read_to_string(proxy.dir.path().join("proxy.log")).unwrap_or_default();
        log.lines().find(|l| l.contains(what)).map(str::to_owned)
    })
    .await
}

/// Stops the new process at the end of the test, whatever happens.
struct Reap(Option<u32>);

impl Drop for Reap {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_hands_the_listeners_to_a_new_process_without_refusing_a_connect() {
    let backend = Backend::echo().await;
    // Two listeners and the admin listener.
    hands_over_without_refusing(&handing_over(&backend).text(), 3).await;
}

/// The same with thread-per-core workers: each of the two workers has a socket per listener
/// address, and the new process takes every one of them (a socket it left would be closed with
/// the old process, and the connections in its queue reset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_hands_every_workers_socket_to_the_new_process() {
    let backend = Backend::echo().await;
    hands_over_without_refusing(&thread_per_core(handing_over(&backend), 2), 5).await;
}

/// Forty workers: 81 sockets, more than one message carries (64), so they go in two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_hands_over_more_sockets_than_one_message_carries() {
    let backend = Backend::echo().await;
    hands_over_without_refusing(&thread_per_core(handing_over(&backend), 40), 81).await;
}

fn handing_over(backend: &Backend) -> TestConfig {
    TestConfig::base(&[backend.addr.to_string()]).one_address_load().set("server.drain_spread", "300ms")
}

fn thread_per_core(config: TestConfig, workers: i64) -> String {
    config.set("server.worker_threads", workers).set("server.worker_model", "thread_per_core").text()
}

async fn hands_over_without_refusing(text: &str, sockets: usize) {
    let mut proxy = ProxyProcess::start(text).await;

    // 200 live wss sessions, each with traffic.
    let mut sessions = Vec::new();
    for i in 0..200 {
        let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("101");
        c.send(true, op::TEXT, format!("before {i}").as_bytes()).await;
        assert_eq!(c.recv().await.payload, format!("before {i}").as_bytes());
        sessions.push(c);
    }

    // A client connecting in a loop through the whole handover: every connect must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let looper = {
        let (stop, addr) = (stop.clone(), proxy.tls);
        tokio::spawn(async move {
            let mut opened = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let mut c =
                    upgrade(addr, true, "/agents/a1/terminal", &[]).await.expect("a connect during the handover");
                c.send(true, op::TEXT, b"looping").await;
                // A session the old process accepted in the last moment of the overlap may be
                // drained (1001) before its echo: still a connect that was not refused.
                let f = c.recv().await;
                assert!(
                    f.payload == b"looping" || (f.opcode == op::CLOSE && f.close_code() == Some(1001)),
                    "an echo, or the old process's drain: {f:?}"
                );
                opened += 1;
            }
            opened
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    proxy.signal("USR2");
    let started = log_line(&proxy, "handover: new process started").await;
    let new_pid: u32 = started
        .split_whitespace()
        .find_map(|w| w.strip_prefix("new_pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{started}"));
    let _reap = Reap(Some(new_pid));
    let received = log_line(&proxy, "handover: listening sockets received").await;
    for part in [format!("received={sockets}"), "not_in_this_configuration=0".to_owned()] {
        assert!(received.contains(&part), "{part} in {received}");
    }
    log_line(&proxy, "handover: serving; the previous process drains").await;

    // Every session open before the handover is closed by the old process's drain with 1001.
    for (i, mut s) in sessions.into_iter().enumerate() {
        let f = s.recv_close().await;
        assert_eq!(f.close_code(), Some(1_001), "session {i}");
    }
    // And the old process exits 0 once drained.
    let status = proxy.wait_exit().await;
    assert!(status.success(), "old process: {status}");

    // The loop went on through it all, and new sessions land on the new process (the only one).
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let opened = looper.await.expect("no connect was refused or failed");
    assert!(opened > 0);
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("the new process serves");
    c.send(true, op::TEXT, b"after").await;
    assert_eq!(c.recv().await.payload, b"after");
    let (status, _) = http_get(proxy.admin, "/ready").await;
    assert_eq!(status, 200, "the admin listener was handed over too");
}

#[tokio::test]
async fn a_new_process_that_refuses_its_configuration_leaves_the_old_one_serving() {
    let backend = Backend::echo().await;
    let proxy = ProxyProcess::start(&TestConfig::base(&[backend.addr.to_string()]).text()).await;
    let mut c = upgrade(proxy.plain, false, "/agents/a1/terminal", &[]).await.expect("101");
    // The file now fails validation: the new process exits 64 before it takes anything.
    let path = proxy.dir.path().join("portcullis.toml");
    let broken = std::fs::read_to_string(&path).expect("config") + "\n[session]\nidle_timout = \"5m\"\n";
    std::fs::write(&path, broken).expect("write");
    proxy.signal("USR2");
    log_line(&proxy, "handover failed; serving on").await;
    // The old process still serves its session and new ones.
    c.send(true, op::TEXT, b"still here").await;
    assert_eq!(c.recv().await.payload, b"still here");
    let mut d = upgrade(proxy.plain, false, "/agents/a2/terminal", &[]).await.expect("new sessions still accepted");
    d.send(true, op::TEXT, b"new").await;
    assert_eq!(d.recv().await.payload, b"new");
}

/// A running work-stealing process's sockets were bound without `SO_REUSEPORT`: a new process
/// configured for thread-per-core cannot bind its further workers' sockets beside them, tells
/// the old process why, and exits; the old process logs the reason and serves on.
#[tokio::test]
async fn a_handover_to_more_sockets_than_the_old_process_has_room_for_is_refused() {
    let backend = Backend::echo().await;
    let proxy = ProxyProcess::start(&TestConfig::base(&[backend.addr.to_string()]).text()).await;
    let mut c = upgrade(proxy.plain, false, "/agents/a1/terminal", &[]).await.expect("101");
    let state = proxy.dir.path().join("state").display().to_string();
    let text = thread_per_core(TestConfig::base(&[backend.addr.to_string()]).set("fleet.state_dir", state.as_str()), 2);
    std::fs::write(proxy.dir.path().join("portcullis.toml"), text).expect("write");
    proxy.signal("USR2");
    // The old process logs the new one's reason.
    let failed = log_line(&proxy, "handover failed; serving on").await;
    assert!(
        failed.contains("the new process refused the sockets")
            && failed.contains("has no room for a socket per worker"),
        "{failed}"
    );
    c.send(true, op::TEXT, b"still here").await;
    assert_eq!(c.recv().await.payload, b"still here");
    let mut d = upgrade(proxy.plain, false, "/agents/a2/terminal", &[]).await.expect("new sessions still accepted");
    d.send(true, op::TEXT, b"new").await;
    assert_eq!(d.recv().await.payload, b"new");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_racing_to_the_handover_socket_receives_nothing_and_the_upgrade_completes() {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let backend = Backend::echo().await;
    let runtime = tempfile::tempdir().expect("dir");
    let run_dir = runtime.path().join("run");
    let text = TestConfig::base(&[backend.addr.to_string()])
        .one_address_load()
        .set("server.drain_spread", "300ms")
        .set("server.runtime_dir", run_dir.display().to_string())
        .text();
    let proxy = ProxyProcess::start(&text).await;
    let pid = proxy.child.id();

    // The attacker: a process of the same user polling for the socket (where it is now, and
    // where it was before: beside the pid in the shared temporary directory), connecting the
    // moment it appears, before the new process can.
    let candidates = [
        run_dir.join(format!("handover-{pid}.sock")),
        std::env::temp_dir().join(format!("portcullis-handover-{pid}.sock")),
    ];
    let attacker = std::thread::spawn(move || {
        let deadline = Instant::now() + SOON;
        while Instant::now() < deadline {
            for path in &candidates {
                if let Ok(mut s) = std::os::unix::net::UnixStream::connect(path) {
                    s.set_read_timeout(Some(SOON)).expect("timeout");
                    let mut got = vec![0u8; 64 * 1024];
                    return Some(s.read(&mut got).unwrap_or(0));
                }
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        None
    });

    // A client connecting in a loop through the whole handover: every connect must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let looper = {
        let (stop, addr) = (stop.clone(), proxy.tls);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut c =
                    upgrade(addr, true, "/agents/a1/terminal", &[]).await.expect("a connect during the handover");
                c.send(true, op::TEXT, b"looping").await;
                // A session the old process accepted in the last moment of the overlap may be
                // drained (1001) before its echo: still a connect that was not refused.
                let f = c.recv().await;
                assert!(
                    f.payload == b"looping" || (f.opcode == op::CLOSE && f.close_code() == Some(1001)),
                    "an echo, or the old process's drain: {f:?}"
                );
            }
        })
    };
    proxy.signal("USR2");
    let started = log_line(&proxy, "handover: new process started").await;
    let new_pid: Option<u32> =
        started.split_whitespace().find_map(|w| w.strip_prefix("new_pid=")).and_then(|p| p.parse().ok());
    let _reap = Reap(new_pid);
    let received = tokio::task::spawn_blocking(move || attacker.join().expect("attacker")).await.expect("join");
    assert_eq!(received, Some(0), "the racing process connected and must have been sent nothing");
    log_line(&proxy, "a process other than the new one connected").await;
    log_line(&proxy, "handover: serving; the previous process drains").await;
    stop.store(true, Ordering::Relaxed);
    looper.await.expect("no connect was refused during the handover");
    let mode = std::fs::metadata(&run_dir).expect("runtime dir").permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "the runtime directory admits only the proxy's user");
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[]).await.expect("the new process serves");
    c.send(true, op::TEXT, b"after").await;
    assert_eq!(c.recv().await.payload, b"after");
}
