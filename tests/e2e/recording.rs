//! Terminal recording for audit: a recorded PTY session's asciicast v2 file (its output, no
//! token, playable by asciinema), input recorded only when asked, the admin API that lists and
//! serves recordings, and storage failures handled as the route chooses.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::demo::{demo_agent, read_until};
use crate::harness::*;

/// The route `terminal` recorded into `dir` with `extra` merged into its `recording` table, with
/// tokens from an HMAC key.
fn recorded(members: &[String], key: &Hmac, dir: &Path, extra: Value) -> TestConfig {
    TestConfig::base(members)
        .merge("", key.auth_keys())
        .merge("routes.0", json!({"auth": {"agent_claim": "agents"}}))
        .merge("routes.0", json!({"recording": {"directory": dir.display().to_string()}}))
        .merge("routes.0.recording", extra)
}

/// The recording in `dir` once it holds `want` (the writer flushes behind the session).
async fn cast_with(dir: &Path, want: &str) -> (std::path::PathBuf, String) {
    eventually(&format!("the one recording in {} has {want:?}", dir.display()), async || {
        let files: Vec<_> =
            std::fs::read_dir(dir).map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect()).unwrap_or_default();
        let [only] = files.as_slice() else { return None };
        let text = std::fs::read_to_string(only).unwrap_or_default();
        text.contains(want).then(|| (only.clone(), text))
    })
    .await
}

/// The output events' text, joined, after checking that every event line is `[t, code, text]`
/// with times that never go back.
fn events(cast: &str, code: &str) -> String {
    let mut last = 0.0;
    let mut out = String::new();
    for line in cast.lines().skip(1) {
        let e: Value = serde_json::from_str(line).expect("an event line is JSON");
        let t = e[0].as_f64().expect("time");
        assert!(t >= last, "times go forward: {line}");
        last = t;
        if e[1] == code {
            out.push_str(e[2].as_str().expect("text"));
        }
    }
    out
}

#[tokio::test]
async fn a_recorded_pty_session_holds_the_typed_commands_output_plays_and_holds_no_token() {
    let agent = demo_agent().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = hmac();
    let proxy = Proxy::start_with(&recorded(&[agent.addr.to_string()], &key, dir.path(), json!({})).text()).await;
    let token = key.token("alice", &["demo"], Duration::from_secs(600));
    let auth = format!("Bearer {token}");
    let mut c = upgrade(proxy.tls, true, "/agents/demo/terminal", &[("Authorization", &auth)]).await.expect("101");
    let word = format!("recorded-{}", rand::random::<u32>());
    c.send(true, op::BINARY, format!("echo {word}\r").as_bytes()).await;
    read_until(&mut c, &format!("{word}\r\n"), 2).await;
    c.send(true, op::BINARY, b"exit\r").await;
    assert_eq!(c.recv_close().await.close_code(), Some(1000));

    // The shell's echo of `exit` is the last output: once it is in the file, the writer is done.
    let (path, cast) = cast_with(dir.path(), "exit\\r\\n").await;
    let header: Value = serde_json::from_str(cast.lines().next().expect("header")).expect("header JSON");
    assert_eq!(
        (header["version"].as_u64(), header["width"].as_u64(), header["height"].as_u64()),
        (Some(2), Some(80), Some(24))
    );
    assert_eq!(header["portcullis"]["route"], "terminal");
    assert_eq!(header["portcullis"]["agent"], "demo");
    assert_eq!(header["portcullis"]["subject"], "alice");
    assert!(header["portcullis"]["session"].as_u64().is_some());
    let output = events(&cast, "o");
    assert_eq!(output.matches(&format!("{word}\r\n")).count(), 2, "the echoed line and the shell's output: {output}");
    assert_eq!(events(&cast, "i"), "", "input is not recorded unless asked");
    assert!(!cast.contains(&token), "no token in a recording");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "recordings are readable by the proxy's user only");
    }

    // The admin API lists and serves it; nothing outside the directory is reachable.
    let name = path.file_name().and_then(|n| n.to_str()).expect("name").to_owned();
    let (status, list) = admin_request(proxy.admin, "GET", "/recordings", "").await;
    assert_eq!(status, 200);
    let list: Value = serde_json::from_str(&list).expect("json");
    assert_eq!(list["recordings"][0]["name"], name.as_str());
    assert_eq!(list["recordings"][0]["route"], "terminal");
    let (status, served) = admin_request(proxy.admin, "GET", &format!("/recordings/{name}"), "").await;
    assert_eq!((status, served), (200, cast.clone()));
    for bad in ["/recordings/..%2f..%2fetc%2fpasswd", "/recordings/../x.cast", "/recordings/nope.cast"] {
        assert_eq!(admin_request(proxy.admin, "GET", bad, "").await.0, 404, "{bad}");
    }

    // It plays: `asciinema cat` prints the output. PORTCULLIS_ASCIINEMA (set by .ci/run, which
    // installs asciinema from PyPI) makes this part required; without it, an asciinema on the
    // PATH is used if there is one.
    let required = std::env::var_os("PORTCULLIS_ASCIINEMA");
    let program = required.clone().unwrap_or_else(|| "asciinema".into());
    match std::process::Command::new(&program).arg("cat").arg(&path).output() {
        Ok(out) => {
            assert!(out.status.success(), "asciinema cat failed: {}", String::from_utf8_lossy(&out.stderr));
            assert!(String::from_utf8_lossy(&out.stdout).contains(&word), "asciinema cat printed the output");
        }
        Err(e) if required.is_none() => eprintln!("asciinema not installed ({e}): play check skipped"),
        Err(e) => panic!("PORTCULLIS_ASCIINEMA={program:?}: {e}"),
    }
}

#[tokio::test]
async fn input_is_recorded_when_the_route_asks_and_compression_is_not_negotiated() {
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = hmac();
    let proxy =
        Proxy::start_with(&recorded(&[backend.addr.to_string()], &key, dir.path(), json!({"input": true})).text())
            .await;
    let auth = key.bearer(&["a1"]);
    let mut c = upgrade(
        proxy.tls,
        true,
        "/agents/a1/terminal",
        &[("Authorization", &auth), ("Sec-WebSocket-Extensions", "permessage-deflate")],
    )
    .await
    .expect("101");
    assert_eq!(c.response.header("sec-websocket-extensions"), None, "a recorded route negotiates no compression");
    let offered = backend.log.requests.lock().expect("lock")[0].header("sec-websocket-extensions").map(str::to_owned);
    assert_eq!(offered, None, "the offer never reached the backend");
    // Typed in pieces, one UTF-8 character split over two frames.
    c.send(false, op::TEXT, b"ls -l caf\xc3").await;
    c.send(true, op::CONT, b"\xa9\r").await;
    let _ = (c.recv().await, c.recv().await);
    c.send(true, op::CLOSE, &close_payload(1000, "")).await;
    c.recv_close().await;
    // Split where the frames split it; the events join to the text.
    let (_, cast) = cast_with(dir.path(), r#""o","é\r""#).await;
    assert_eq!(events(&cast, "i"), "ls -l café\r", "the client's input, unmasked and joined");
    assert_eq!(events(&cast, "o"), "ls -l café\r", "the backend's echo");
    let header: Value = serde_json::from_str(cast.lines().next().expect("header")).expect("json");
    assert_eq!(header["portcullis"]["input_recorded"], true);

    // A backend that answers with compression nobody offered it is refused (502), never
    // relayed as payloads the recording could not read.
    let forcing = Backend::start(
        BackendOpts { extensions: Some("permessage-deflate".into()), ..Default::default() },
        echo_handler(),
    )
    .await;
    let text =
        recorded(&[forcing.addr.to_string()], &key, dir.path(), json!({})).set("routes.0.name", "rec-forced").text();
    let proxy = Proxy::start_with(&text).await;
    let refused =
        upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &auth)]).await.err().expect("502");
    assert_eq!(refused.status, 502);
}

#[tokio::test]
async fn storage_that_fails_closes_the_session_with_1011_or_leaves_it_unrecorded_as_the_route_chooses() {
    let backend = Backend::echo().await;
    let key = hmac();
    let auth = key.bearer(&["a1"]);
    // The "directory" is a file: no recording can be created in it.
    let blocker = tempfile::NamedTempFile::new().expect("file");

    let text = recorded(&[backend.addr.to_string()], &key, blocker.path(), json!({"on_backlog": "close"}))
        .set("routes.0.name", "rec-close")
        .text();
    let proxy = Proxy::start_with(&text).await;
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &auth)]).await.expect("101");
    let f = c.recv_close().await;
    assert_eq!((f.close_code(), f.close_reason().as_str()), (Some(1011), "recording failed"));
    let (_, m) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&m, "portcullis_recording_failures_total{route=\"rec-close\",reason=\"io\"}"), 1.0);
    drop(proxy);

    let text = recorded(&[backend.addr.to_string()], &key, blocker.path(), json!({"on_backlog": "slow"}))
        .set("routes.0.name", "rec-slow")
        .text();
    let proxy = Proxy::start_with(&text).await;
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &auth)]).await.expect("101");
    eventually("the gap is counted", async || {
        let (_, m) = http_get(proxy.admin, "/metrics").await;
        (metric(&m, "portcullis_recording_failures_total{route=\"rec-slow\",reason=\"io\"}") == 1.0).then_some(())
    })
    .await;
    for n in 0..5u8 {
        c.send(true, op::BINARY, &[n; 100]).await;
        assert_eq!(c.recv().await.payload, vec![n; 100], "the session goes on, unrecorded");
    }
}

/// A finished recording of `size` bytes named as the proxy names them, last written `age` ago.
fn earlier_recording(dir: &Path, name: &str, size: usize, age: Duration) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut text = String::from("{\"version\":2,\"width\":80,\"height\":24}\n");
    text.push_str(&"x".repeat(size.saturating_sub(text.len())));
    std::fs::write(&path, text).expect("write an earlier recording");
    let file = std::fs::File::options().write(true).open(&path).expect("open");
    file.set_modified(std::time::SystemTime::now() - age).expect("set mtime");
    path
}

/// The value of a recording metric series once it reaches `want`.
async fn metric_reaches(admin: std::net::SocketAddr, series: &str, want: f64) {
    eventually(&format!("{series} reaches {want}"), async || {
        let (_, m) = http_get(admin, "/metrics").await;
        (metric(&m, series) >= want).then_some(())
    })
    .await
}

#[tokio::test]
async fn no_session_can_erase_earlier_or_live_recordings_and_one_recording_stops_at_its_cap() {
    let backend = Backend::echo().await;
    let key = hmac();
    let auth = key.bearer(&["a1"]);
    let dir = tempfile::tempdir().expect("dir");
    // An earlier session's recording fills most of the directory's 64 KiB.
    let earlier = earlier_recording(dir.path(), "1700000000-terminal-1.cast", 50 * 1024, Duration::from_secs(60));
    let extra = json!({"max_total_size": "64KiB", "max_file_size": "16KiB", "on_limit": "continue"});
    let proxy = Proxy::start_with(&recorded(&[backend.addr.to_string()], &key, dir.path(), extra).text()).await;

    // A live session writes 10 KiB, then 20 KiB more: past its own cap, its recording ends with
    // a gap marker while the session goes on (on_limit = "continue").
    let mut live = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &auth)]).await.expect("101");
    for i in 0..10u8 {
        let line = vec![b'a' + i; 1024];
        live.send(true, op::TEXT, &line).await;
        assert_eq!(live.recv().await.payload, line);
    }
    let (live_file, _) = cast_with_among(dir.path(), &earlier, "jjjj").await;
    for i in 0..20u8 {
        let line = vec![b'k' + (i % 10); 1024];
        live.send(true, op::TEXT, &line).await;
        assert_eq!(live.recv().await.payload, line, "the session goes on past its recording's cap");
    }
    metric_reaches(proxy.admin, "portcullis_recording_failures_total{route=\"terminal\",reason=\"file_size\"}", 1.0)
        .await;
    // The series is the process's, and another test's recording counts in it too: this one's
    // writer may still be catching up. The file says when it has stopped.
    let cast = eventually("the live recording ends with a gap marker", async || {
        let cast = std::fs::read_to_string(&live_file).expect("the live recording is there");
        cast.lines().last().is_some_and(|l| l.contains(r#","m","#)).then_some(cast)
    })
    .await;
    assert!(cast.len() as u64 <= 16 * 1024, "{} bytes past max_file_size", cast.len());
    let last: Value = serde_json::from_str(cast.lines().last().expect("a last line")).expect("json");
    assert_eq!(last[1], "m", "the recording ends with a gap marker: {last}");

    // The directory is full now: a second session's start erases nothing; its recording is
    // refused (a counted gap) and the session itself goes on (on_limit = "continue").
    let mut second = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &auth)]).await.expect("101");
    metric_reaches(
        proxy.admin,
        "portcullis_recording_failures_total{route=\"terminal\",reason=\"directory_full\"}",
        1.0,
    )
    .await;
    second.send(true, op::TEXT, b"unrecorded").await;
    assert_eq!(second.recv().await.payload, b"unrecorded");
    assert!(earlier.exists(), "an earlier session's recording was erased");
    assert!(live_file.exists(), "a live session's recording was erased");
}

/// The one recording in `dir` besides `other` once it holds `want`.
async fn cast_with_among(dir: &Path, other: &Path, want: &str) -> (std::path::PathBuf, String) {
    eventually(
        &format!("the one recording in {} besides {} has {want:?}", dir.display(), other.display()),
        async || {
            let files: Vec<_> = std::fs::read_dir(dir)
                .map(|d| d.filter_map(Result::ok).map(|e| e.path()).filter(|p| p != other).collect())
                .unwrap_or_default();
            let [only] = files.as_slice() else { return None };
            let text = std::fs::read_to_string(only).unwrap_or_default();
            text.contains(want).then(|| (only.clone(), text))
        },
    )
    .await
}

#[tokio::test]
async fn the_sweep_runs_on_a_timer_and_evicting_for_room_spares_live_recordings_and_is_counted() {
    let backend = Backend::echo().await;
    let key = hmac();
    let auth = key.bearer(&["a1"]);
    let dir = tempfile::tempdir().expect("dir");
    let extra =
        json!({"max_age": "1h", "sweep_interval": "200ms", "max_total_size": "64KiB", "when_full": "evict_oldest"});
    let proxy = Proxy::start_with(&recorded(&[backend.addr.to_string()], &key, dir.path(), extra).text()).await;
    // Put there after the proxy started (and swept once): only a later sweep can find it.
    let (_, m) = http_get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&m, "portcullis_recording_evictions_total{route=\"terminal\",reason=\"age\"}"), 0.0);
    let expired = earlier_recording(dir.path(), "1600000000-terminal-1.cast", 1024, Duration::from_secs(7200));

    // No session starts: the timer alone removes the recording past max_age.
    metric_reaches(proxy.admin, "portcullis_recording_evictions_total{route=\"terminal\",reason=\"age\"}", 1.0).await;
    assert!(!expired.exists(), "the sweep did not run on its timer");

    // A live recording, then a finished one that fills the directory.
    let mut live = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &auth)]).await.expect("101");
    live.send(true, op::TEXT, b"live output").await;
    assert_eq!(live.recv().await.payload, b"live output");
    let filler = earlier_recording(dir.path(), "1700000000-terminal-2.cast", 70 * 1024, Duration::from_secs(60));
    let (live_file, _) = cast_with_among(dir.path(), &filler, "live output").await;
    // Both the next session's start and the sweep may make room; either way the finished
    // recording goes, counted as early, and the live one stays.
    let mut next = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &auth)]).await.expect("101");
    next.send(true, op::TEXT, b"next").await;
    assert_eq!(next.recv().await.payload, b"next");
    metric_reaches(proxy.admin, "portcullis_recording_evictions_total{route=\"terminal\",reason=\"size\"}", 1.0).await;
    assert!(!filler.exists(), "the oldest finished recording was kept over the cap");
    assert!(live_file.exists(), "a live recording was evicted");
}

#[tokio::test]
async fn by_default_a_session_that_cannot_be_recorded_does_not_go_on() {
    let backend = Backend::echo().await;
    let key = hmac();
    let auth = key.bearer(&["a1"]);
    let dir = tempfile::tempdir().expect("dir");
    let extra = json!({"max_total_size": "24KiB", "max_file_size": "8KiB"});
    let proxy = Proxy::start_with(&recorded(&[backend.addr.to_string()], &key, dir.path(), extra).text()).await;
    // A user who writes past the cap to go on unrecorded is closed instead.
    let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &auth)]).await.expect("101");
    let mut closed = None;
    for i in 0..200u8 {
        c.send(true, op::TEXT, &vec![b'a' + (i % 20); 1024]).await;
        let f = c.recv().await;
        if f.opcode == op::CLOSE {
            closed = Some(f);
            break;
        }
    }
    let f = closed.expect("the session was closed at its recording's cap");
    assert_eq!((f.close_code(), f.close_reason().as_str()), (Some(1011), "recording failed"));
    metric_reaches(proxy.admin, "portcullis_recording_failures_total{route=\"terminal\",reason=\"file_size\"}", 1.0)
        .await;
    // A full directory refuses new sessions rather than letting them run unrecorded.
    let _filler = earlier_recording(dir.path(), "1700000000-terminal-9.cast", 24 * 1024, Duration::from_secs(60));
    let mut next = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &auth)]).await.expect("101");
    let f = next.recv_close().await;
    assert_eq!((f.close_code(), f.close_reason().as_str()), (Some(1011), "recording failed"));
}

/// Found by an attacker review: `max_total_size` was checked only when a recording started, so
/// sessions opened together (each under the cap at its start) grew the directory past it; on a
/// disk that filled up, the sessions then went on unrecorded. Every write is charged to the
/// directory now: the session whose output would take it past the cap ends its recording with
/// a marker and, by default (`on_limit = "close"`), is closed with 1011.
#[tokio::test]
async fn sessions_together_cannot_grow_the_directory_past_its_cap() {
    let backend = Backend::echo().await;
    let key = hmac();
    let auth = key.bearer(&["a1"]);
    let dir = tempfile::tempdir().expect("dir");
    let extra = json!({"max_total_size": "64KiB", "max_file_size": "64KiB"});
    let proxy = Proxy::start_with(&recorded(&[backend.addr.to_string()], &key, dir.path(), extra).text()).await;
    let mut open = Vec::new();
    for _ in 0..4 {
        let mut c = upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &auth)]).await.expect("101");
        c.send(true, op::TEXT, b"hello").await;
        assert_eq!(c.recv().await.payload, b"hello");
        open.push(c);
    }
    // 4 sessions of 32 KiB each would be twice the directory's cap.
    let mut closes = Vec::new();
    for i in 0..32u8 {
        let mut still = Vec::new();
        for mut c in open {
            c.send(true, op::TEXT, &vec![b'a' + (i % 20); 1024]).await;
            let f = c.recv().await;
            match f.opcode {
                op::CLOSE => closes.push((f.close_code(), f.close_reason())),
                _ => still.push(c),
            }
        }
        open = still;
    }
    assert!(!closes.is_empty(), "no session was stopped at the directory's cap");
    for close in &closes {
        assert_eq!((close.0, close.1.as_str()), (Some(1011), "recording failed"));
    }
    drop(open);
    metric_reaches(
        proxy.admin,
        "portcullis_recording_failures_total{route=\"terminal\",reason=\"directory_full\"}",
        1.0,
    )
    .await;
    // Once every writer is done (the live ones end with their sessions; a writer holds a
    // shared lock on its file while it writes), the directory holds no more than the cap and
    // the gap markers.
    eventually("every recording is finished", async || {
        let files: Vec<_> = std::fs::read_dir(dir.path()).ok()?.filter_map(Result::ok).collect();
        let done = |e: &std::fs::DirEntry| {
            let f = std::fs::File::open(e.path()).ok();
            f.is_some_and(|f| rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok())
        };
        files.iter().all(done).then_some(())
    })
    .await;
    let total: u64 = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert!(total <= 64 * 1024 + 4 * 128, "the directory holds {total} bytes");
    let cast = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(Result::ok)
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .find(|c| c.contains("max_total_size reached"));
    assert!(cast.is_some(), "a recording ends with its gap marker");
}

/// Found by an attacker review: a recording's file name was `{unix}-{route}-{session id}`, and
/// session ids start at 1 in every process, so two instances sharing a directory (or a process
/// and its handover successor) picked the same name in the same second: the second recording
/// failed and its session went unrecorded. Anyone able to write in the directory could do the
/// same ahead of time. The name now carries a tag drawn once per process.
#[tokio::test]
async fn a_file_made_ahead_under_a_recordings_name_leaves_it_unrecorded_no_more() {
    let backend = Backend::echo().await;
    let key = hmac();
    let dir = tempfile::tempdir().expect("dir");
    // A process of its own: its session ids start at 1.
    let text = recorded(&[backend.addr.to_string()], &key, dir.path(), json!({"on_backlog": "slow"})).text();
    let proxy = ProxyProcess::start(&text).await;
    // The names the first sessions of a process would have had, for the next minute.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    for t in now..now + 60 {
        for id in 1..=3 {
            std::fs::write(dir.path().join(format!("{t}-terminal-{id}.cast")), "").expect("decoy");
        }
    }
    let mut c =
        upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &key.bearer(&["a1"]))]).await.expect("101");
    c.send(true, op::TEXT, b"recorded all the same").await;
    assert_eq!(c.recv().await.payload, b"recorded all the same");
    let recorded_with = async |text: &str| {
        eventually("the session's own recording holds its output", async || {
            let files = std::fs::read_dir(dir.path()).ok()?.filter_map(Result::ok);
            files
                .map(|e| (e.file_name(), std::fs::read_to_string(e.path()).unwrap_or_default()))
                .find(|f| f.1.contains(text))
        })
        .await
    };
    let (name, _) = recorded_with("recorded all the same").await;
    // Found by the verification of that fix: the tag is in every recording's name, so whoever
    // can read the directory can make the next names ahead too. A name taken already is not
    // the recording's end: another is drawn.
    let name = name.to_string_lossy().into_owned();
    let tag = name.trim_end_matches(".cast").rsplit('-').next().expect("a tag").to_owned();
    for t in now..now + 60 {
        for id in 1..=20 {
            let ahead = dir.path().join(format!("{t}-terminal-{id}-{tag}.cast"));
            let _ = std::fs::OpenOptions::new().write(true).create_new(true).open(ahead);
        }
    }
    let mut c =
        upgrade(proxy.tls, true, "/agents/a1/terminal", &[("Authorization", &key.bearer(&["a1"]))]).await.expect("101");
    c.send(true, op::TEXT, b"and the next one").await;
    assert_eq!(c.recv().await.payload, b"and the next one");
    recorded_with("and the next one").await;
}

/// Found by an attacker review: what a client sent after the proxy had closed its session (a
/// revocation here) was read only to find the client's close, and discarded, but the recording
/// showed it as input: `rm -rf` typed after the cut, which never reached the backend, looked
/// like a command the session ran. A recording shows only what went on to the other side.
#[tokio::test]
async fn input_sent_after_the_proxy_closed_the_session_is_not_recorded_as_if_delivered() {
    let backend = Backend::echo().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = hmac();
    let text = recorded(&[backend.addr.to_string()], &key, dir.path(), json!({"input": true}))
        .set("routes.0.name", "rec-after-close")
        .text();
    let proxy = Proxy::start_with(&text).await;
    let auth = key.bearer(&["a1"]);
    let mut c = upgrade(proxy.plain, false, "/agents/a1/terminal", &[("Authorization", &auth)]).await.expect("101");
    c.send(true, op::TEXT, b"normal input\r").await;
    assert_eq!(c.recv().await.payload, b"normal input\r");
    let (_, sessions) = http_get(proxy.admin, "/sessions").await;
    let v: Value = serde_json::from_str(&sessions).expect("json");
    let id = v["sessions"][0]["id"].as_u64().expect("one session");
    let (status, _) = admin_request(proxy.admin, "DELETE", &format!("/sessions/{id}"), "").await;
    assert_eq!(status, 204);
    assert_eq!(c.recv_close().await.close_code(), Some(1008));
    for n in 0..3 {
        c.send(true, op::TEXT, format!("AFTER-CLOSE {n}: rm -rf /important\r").as_bytes()).await;
    }
    c.send(true, op::CLOSE, &close_payload(1000, "")).await;
    // The recording ends with its session (its writer task used to hold its own channel open,
    // so no recording ever ended: its file stayed open and counted as live).
    metric_reaches(proxy.admin, "portcullis_recordings_total{route=\"rec-after-close\"}", 1.0).await;
    let (_, cast) = cast_with(dir.path(), "normal input").await;
    assert_eq!(events(&cast, "i"), "normal input\r", "only the input the backend got: {cast}");
    let delivered = backend.log.frames.lock().expect("lock").iter().filter(|f| f.opcode == op::TEXT).count();
    assert_eq!(delivered, 1, "the input after the close never reached the backend");
}
