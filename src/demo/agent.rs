//! The demo agent: a small agent backend with the whole surface Portcullis fronts, on loopback.
//!
//! - `GET /agents/{agent}/api/status`: the agent's state (JSON);
//! - `GET|POST /agents/{agent}/api/tasks`: list tasks, or start one (`{"name": "...", "steps": N}`);
//! - `GET /agents/{agent}/api/tasks/{id}`: one task;
//! - `GET /agents/{agent}/api/tasks/{id}/output`: the task's output as Server-Sent Events, one
//!   `line` event per line as it is produced, then `done`; `Last-Event-ID` resumes;
//! - WebSocket `/agents/{agent}/terminal`: a shell on a real PTY. Binary (or plain text)
//!   messages are keystrokes; a text message `{"type":"resize","cols":C,"rows":R}` resizes the
//!   PTY; the PTY's output comes back as binary messages;
//! - WebSocket `/agents/{agent}/events`: a JSON agent event every second (and echoes);
//! - WebSocket `/agents/{agent}/echo`: echoes every message (for load tests);
//! - `GET /agents/{agent}/ui/...`: the web page, its script, and xterm.js from the npm
//!   packages the demo installed (see `assets`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fastwebsockets::{upgrade, FragmentCollectorRead, Frame, OpCode, Payload, WebSocketError};
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{Method, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};

type Body = BoxBody<Bytes, Infallible>;

/// Largest request body the agent reads (task requests are small).
const MAX_BODY: usize = 64 * 1024;
/// Tasks remembered; the oldest finished ones are forgotten first.
const MAX_TASKS: usize = 100;

/// What the demo agent serves and runs.
pub struct Agent {
    /// The program the terminal runs on its PTY.
    pub program: String,
    /// Where the installed npm packages are (`node_modules`), when they are.
    pub node_modules: Option<PathBuf>,
    started: Instant,
    tasks: StdMutex<Tasks>,
}

#[derive(Default)]
struct Tasks {
    next: u64,
    list: VecDeque<Arc<Task>>,
}

struct Task {
    id: u64,
    name: String,
    steps: u32,
    created: u64,
    /// Lines so far and whether the task is done; watchers wait for changes.
    progress: watch::Sender<(Vec<String>, bool)>,
}

impl Task {
    fn json(&self) -> Value {
        let (lines, done) = &*self.progress.borrow();
        json!({
            "id": self.id,
            "name": self.name,
            "steps": self.steps,
            "created": self.created,
            "lines": lines.len(),
            "status": if *done { "succeeded" } else { "running" },
        })
    }
}

impl Agent {
    /// An agent whose terminal runs `program`.
    pub fn new(program: String, node_modules: Option<PathBuf>) -> Agent {
        Agent { program, node_modules, started: Instant::now(), tasks: StdMutex::new(Tasks::default()) }
    }

    fn start_task(self: &Arc<Self>, name: String, steps: u32) -> Arc<Task> {
        let (progress, _) = watch::channel((Vec::new(), false));
        let task = {
            let mut t = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
            t.next += 1;
            let task = Arc::new(Task { id: t.next, name, steps, created: unix_ms(), progress });
            t.list.push_back(task.clone());
            while t.list.len() > MAX_TASKS {
                t.list.pop_front();
            }
            task
        };
        let running = task.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(400));
            for step in 1..=running.steps {
                tick.tick().await;
                let line = format!("[{}] step {step}/{}: {}", running.name, running.steps, work(step));
                running.progress.send_modify(|(lines, _)| lines.push(line));
            }
            running.progress.send_modify(|(_, done)| *done = true);
        });
        task
    }

    fn task(&self, id: u64) -> Option<Arc<Task>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).list.iter().find(|t| t.id == id).cloned()
    }
}

fn work(step: u32) -> &'static str {
    const WORK: [&str; 6] = [
        "reading the repository",
        "planning the change",
        "editing files",
        "running the tests",
        "reviewing the diff",
        "writing the summary",
    ];
    WORK[(step as usize - 1) % WORK.len()]
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Serves the demo agent on `listener` until the process ends.
pub async fn serve(listener: TcpListener, agent: Arc<Agent>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let agent = agent.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(agent.clone(), req));
            let _ = http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).with_upgrades().await;
        });
    }
}

async fn handle(agent: Arc<Agent>, mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let mut parts = path.trim_start_matches('/').split('/');
    let (Some("agents"), Some(name)) = (parts.next(), parts.next()) else {
        return Ok(text(StatusCode::NOT_FOUND, "not found"));
    };
    // The proxy validates captures; the agent checks again, since the name goes into its page.
    if !portcullis::config::valid_capture(name) {
        return Ok(text(StatusCode::NOT_FOUND, "not found"));
    }
    let name = name.to_owned();
    let rest: Vec<&str> = parts.collect();
    if upgrade::is_upgrade_request(&req) {
        let kind = match rest.as_slice() {
            ["terminal"] => Kind::Terminal,
            ["events"] => Kind::Events,
            ["echo"] => Kind::Echo,
            _ => return Ok(text(StatusCode::NOT_FOUND, "no such WebSocket")),
        };
        return Ok(match upgrade::upgrade(&mut req) {
            Ok((resp, fut)) => {
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Ok(ws) = fut.await {
                        let _ = match kind {
                            Kind::Terminal => terminal(ws, &agent.program).await,
                            Kind::Events => echo(ws, Some(name)).await,
                            Kind::Echo => echo(ws, None).await,
                        };
                    }
                });
                resp.map(|b| b.map_err(|never| match never {}).boxed())
            }
            Err(_) => text(StatusCode::BAD_REQUEST, "bad WebSocket upgrade"),
        });
    }
    let method = req.method().clone();
    Ok(match (method, rest.as_slice()) {
        (Method::GET, ["api", "status"]) => {
            let tasks = agent.tasks.lock().unwrap_or_else(|p| p.into_inner()).list.len();
            let uptime = agent.started.elapsed().as_secs();
            json_response(
                StatusCode::OK,
                &json!({"agent": name, "status": "running", "uptime_seconds": uptime, "tasks": tasks}),
            )
        }
        (Method::GET, ["api", "tasks"]) => {
            let list: Vec<Value> =
                agent.tasks.lock().unwrap_or_else(|p| p.into_inner()).list.iter().map(|t| t.json()).collect();
            json_response(StatusCode::OK, &json!({ "tasks": list }))
        }
        (Method::POST, ["api", "tasks"]) => {
            let body = match http_body_util::Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return Ok(text(StatusCode::PAYLOAD_TOO_LARGE, "task request too large")),
            };
            let spec: Value =
                if body.is_empty() { json!({}) } else { serde_json::from_slice(&body).unwrap_or(Value::Null) };
            if !spec.is_object() {
                return Ok(text(StatusCode::BAD_REQUEST, "the body must be a JSON object"));
            }
            let name = spec["name"]
                .as_str()
                .unwrap_or("task")
                .chars()
                .filter(|c| c.is_ascii_graphic() || *c == ' ')
                .take(40)
                .collect();
            let steps = spec["steps"].as_u64().unwrap_or(8).clamp(1, 100) as u32;
            let task = agent.start_task(name, steps);
            json_response(StatusCode::CREATED, &task.json())
        }
        (Method::GET, ["api", "tasks", id]) => match id.parse().ok().and_then(|id| agent.task(id)) {
            Some(t) => json_response(StatusCode::OK, &t.json()),
            None => text(StatusCode::NOT_FOUND, "no such task"),
        },
        (Method::GET, ["api", "tasks", id, "output"]) => match id.parse().ok().and_then(|id| agent.task(id)) {
            Some(t) => {
                let from = req
                    .headers()
                    .get("last-event-id")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<usize>().ok())
                    .map_or(0, |last| last + 1);
                task_output(t, from)
            }
            None => text(StatusCode::NOT_FOUND, "no such task"),
        },
        (Method::GET, ["ui", file @ ..]) => ui(&agent, &name, file),
        _ => text(StatusCode::NOT_FOUND, "not found"),
    })
}

enum Kind {
    Terminal,
    Events,
    Echo,
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

/// A task's output as an event stream, from line `from`: each line as it is produced, then a
/// `done` event, then the end of the stream.
fn task_output(task: Arc<Task>, from: usize) -> Response<Body> {
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(8);
    let mut progress = task.progress.subscribe();
    tokio::spawn(async move {
        let mut next = from;
        loop {
            let (lines, done) = {
                let p = progress.borrow_and_update();
                (p.0[next.min(p.0.len())..].to_vec(), p.1)
            };
            for line in lines {
                let event = format!("id: {next}\nevent: line\ndata: {line}\n\n");
                if tx.send_data(Bytes::from(event)).await.is_err() {
                    return;
                }
                next += 1;
            }
            if done {
                let _ = tx.send_data(Bytes::from(format!("event: done\ndata: {}\n\n", task.json()))).await;
                return;
            }
            if progress.changed().await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(body.boxed());
    r.headers_mut().insert(CONTENT_TYPE, http::HeaderValue::from_static("text/event-stream"));
    r.headers_mut().insert(CACHE_CONTROL, http::HeaderValue::from_static("no-cache"));
    r
}

/// The page and its scripts. xterm.js comes from the npm packages the demo installed; without
/// them the page runs a plain fallback terminal.
fn ui(agent: &Agent, name: &str, file: &[&str]) -> Response<Body> {
    let (body, ctype): (Bytes, &'static str) = match file {
        [] | [""] | ["index.html"] => {
            (Bytes::from(super::web::INDEX.replace("{{AGENT}}", name)), "text/html; charset=utf-8")
        }
        ["app.js"] => (Bytes::from_static(super::web::APP.as_bytes()), "text/javascript; charset=utf-8"),
        ["vendor", asset] => {
            let Some(path) = super::web::vendor_path(asset) else { return text(StatusCode::NOT_FOUND, "not found") };
            let Some(bytes) = agent.node_modules.as_ref().and_then(|d| std::fs::read(d.join(path)).ok()) else {
                return text(StatusCode::NOT_FOUND, "xterm.js is not installed (see the demo banner)");
            };
            let ctype = if asset.ends_with(".css") { "text/css" } else { "text/javascript; charset=utf-8" };
            (Bytes::from(bytes), ctype)
        }
        _ => return text(StatusCode::NOT_FOUND, "not found"),
    };
    let mut r = Response::new(Full::new(body).boxed());
    r.headers_mut().insert(CONTENT_TYPE, http::HeaderValue::from_static(ctype));
    r.headers_mut().insert(CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    r
}

type Ws = fastwebsockets::WebSocket<TokioIo<hyper::upgrade::Upgraded>>;

/// Echoes every message; with an agent name, also pushes an agent event every second.
async fn echo(ws: Ws, events_of: Option<String>) -> Result<(), WebSocketError> {
    let (rx, tx) = ws.split(tokio::io::split);
    let mut rx = FragmentCollectorRead::new(rx);
    let tx = Arc::new(Mutex::new(tx));
    let ticker = events_of.map(|agent| {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut seq = 0u64;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                seq += 1;
                let msg = format!(
                    r#"{{"type":"agent.event","agent":"{agent}","seq":{seq},"ts":{},"status":"running"}}"#,
                    unix_ms()
                );
                if tx.lock().await.write_frame(Frame::text(Payload::Owned(msg.into_bytes()))).await.is_err() {
                    break;
                }
            }
        })
    });
    let result = loop {
        let frame = match rx
            .read_frame(&mut |f| {
                let tx = tx.clone();
                async move { tx.lock().await.write_frame(f).await }
            })
            .await
        {
            Ok(f) => f,
            Err(e) => break Err(e),
        };
        match frame.opcode {
            OpCode::Close => break Ok(()),
            OpCode::Text | OpCode::Binary => {
                let reply = Frame::new(true, frame.opcode, None, Payload::Owned(frame.payload.to_vec()));
                tx.lock().await.write_frame(reply).await?;
            }
            _ => {}
        }
    };
    if let Some(t) = ticker {
        t.abort();
    }
    result
}

/// A shell on a PTY, for as long as the WebSocket lasts (the shell is killed when it ends).
async fn terminal(ws: Ws, program: &str) -> Result<(), WebSocketError> {
    let (rx, tx) = ws.split(tokio::io::split);
    let mut rx = FragmentCollectorRead::new(rx);
    let tx = Arc::new(Mutex::new(tx));
    let (pty, pts) = match pty_process::open() {
        Ok(p) => p,
        Err(e) => return refuse(&tx, &format!("cannot open a PTY: {e}")).await,
    };
    let _ = pty.resize(pty_process::Size::new(24, 80));
    let child = pty_process::Command::new(program).env("TERM", "xterm-256color").kill_on_drop(true).spawn(pts);
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return refuse(&tx, &format!("cannot start {program}: {e}")).await,
    };
    let (mut pty_out, mut pty_in) = pty.into_split();
    // PTY output → binary messages.
    let out_tx = tx.clone();
    let output = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match pty_out.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let frame = Frame::binary(Payload::Owned(buf[..n].to_vec()));
                    if out_tx.lock().await.write_frame(frame).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = out_tx.lock().await.write_frame(Frame::close(1000, b"the shell exited")).await;
    });
    let result = loop {
        // When the shell exits, the output task sees the PTY close and sends a close frame;
        // the client's answer ends this loop.
        let frame = rx
            .read_frame(&mut |f| {
                let tx = tx.clone();
                async move { tx.lock().await.write_frame(f).await }
            })
            .await;
        let frame = match frame {
            Ok(f) => f,
            Err(e) => break Err(e),
        };
        let resize = match frame.opcode {
            OpCode::Close => break Ok(()),
            OpCode::Text => serde_json::from_slice::<Value>(&frame.payload).ok().filter(|v| v["type"] == "resize"),
            OpCode::Binary => None,
            _ => continue,
        };
        match resize {
            Some(v) => {
                let (cols, rows) = (v["cols"].as_u64().unwrap_or(80), v["rows"].as_u64().unwrap_or(24));
                let _ = pty_in.resize(pty_process::Size::new(rows.clamp(1, 1000) as u16, cols.clamp(1, 1000) as u16));
            }
            // Keystrokes: binary messages, and text that is not a control message.
            None => {
                if pty_in.write_all(&frame.payload).await.is_err() {
                    break Ok(());
                }
            }
        }
    };
    let _ = child.start_kill();
    let _ = child.wait().await;
    output.abort();
    result
}

async fn refuse<W>(tx: &Arc<Mutex<fastwebsockets::WebSocketWrite<W>>>, why: &str) -> Result<(), WebSocketError>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    tracing::warn!(why, "demo terminal unavailable");
    tx.lock().await.write_frame(Frame::close(1011, b"terminal unavailable")).await
}
