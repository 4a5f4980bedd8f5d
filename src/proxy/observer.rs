//! Stage: observer. A read-only WebSocket to a live session of a route with
//! `[routes.observe]`: the upgrade (or HTTP/2 extended CONNECT) names the session with
//! `?observe=<id>`, the token must hold the route's observe scope (instead of the agent grant
//! a session needs), and the answer comes from the proxy itself, with no backend.
//!
//! The observer gets the session's replay, then its output as it happens, as binary frames.
//! It never sends input: a data frame from it closes it with 1008. The proxy answers its pings.
//! It is closed with 1013 when it falls behind (the session never waits for it) and with 1001
//! when the session ends. Joining and leaving are logged with the session id and the
//! observer's subject, and `/sessions` shows each session's observer count.

use std::sync::{Arc, Weak};

use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use metrics::{counter, gauge};
use tokio::sync::mpsc;

use super::relay::close::code::{GOING_AWAY, NORMAL, POLICY, TRY_AGAIN_LATER};
use crate::observe::{Hub, Observer};

/// The observed session's id, when the request asks to observe one (`?observe=<id>`).
pub fn requested(path_and_query: &str) -> Option<u64> {
    let (_, query) = path_and_query.split_once('?')?;
    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "observe").and_then(|(_, v)| v.parse().ok())
}

/// What the observer's client sent, as its writer needs to know.
enum Inbound {
    Ping(Vec<u8>),
    Close,
    Data,
}

/// Who is watching which session, for the log lines.
pub struct Watch {
    /// The observed session.
    pub session: u64,
    /// The observer's subject.
    pub subject: String,
    /// Its route.
    pub route: String,
}

/// Runs one observer on its upgraded stream until it leaves, falls behind or the session
/// ends. Holds the hub weakly: the session's end drops it, which ends the observer's queue.
pub async fn run(upgraded: Upgraded, mut observer: Observer, hub: Weak<Hub>, watch: Watch) {
    tracing::info!(session = watch.session, route = %watch.route, observer = %watch.subject, "observer joined");
    gauge!("portcullis_observers_active").increment(1.0);
    let ws = WebSocket::after_handshake(TokioIo::new(upgraded), Role::Server);
    let (mut rd, mut wr) = ws.split(tokio::io::split);
    rd.set_auto_close(false);
    rd.set_auto_pong(false);
    let (tx, mut inbound) = mpsc::channel(4);
    let reader = tokio::spawn(async move {
        let mut never = |_: Frame<'_>| async { Ok::<(), std::io::Error>(()) };
        loop {
            let event = match rd.read_frame(&mut never).await {
                Ok(f) => match f.opcode {
                    OpCode::Ping => Inbound::Ping(f.payload.to_vec()),
                    OpCode::Close => Inbound::Close,
                    OpCode::Pong => continue,
                    _ => Inbound::Data,
                },
                Err(_) => break,
            };
            let last = !matches!(event, Inbound::Ping(_));
            if tx.send(event).await.is_err() || last {
                break;
            }
        }
    });
    let end = loop {
        tokio::select! {
            chunk = observer.rx.recv() => match chunk {
                Some(bytes) => {
                    // Flushed at once: on TLS a frame left in the record buffer would wait
                    // for the next one, and an observer's screen must not lag.
                    let sent = wr.write_frame(Frame::binary(Payload::Borrowed(&bytes))).await;
                    if sent.is_err() || wr.flush().await.is_err() {
                        break "gone";
                    }
                }
                None if observer.lagged() => {
                    let _ = wr.write_frame(Frame::close(TRY_AGAIN_LATER, b"observer too slow")).await;
                    let _ = wr.flush().await;
                    break "lagged";
                }
                None => {
                    let _ = wr.write_frame(Frame::close(GOING_AWAY, b"session ended")).await;
                    let _ = wr.flush().await;
                    break "session_ended";
                }
            },
            event = inbound.recv() => match event {
                Some(Inbound::Ping(p)) => {
                    let sent = wr.write_frame(Frame::pong(Payload::Owned(p))).await;
                    if sent.is_err() || wr.flush().await.is_err() {
                        break "gone";
                    }
                }
                Some(Inbound::Close) => {
                    let _ = wr.write_frame(Frame::close(NORMAL, b"")).await;
                    let _ = wr.flush().await;
                    break "left";
                }
                Some(Inbound::Data) => {
                    let _ = wr.write_frame(Frame::close(POLICY, b"observers cannot send")).await;
                    let _ = wr.flush().await;
                    break "input";
                }
                None => break "gone",
            },
        }
    };
    reader.abort();
    if let Some(hub) = hub.upgrade() {
        hub.leave(observer.id);
    }
    gauge!("portcullis_observers_active").decrement(1.0);
    counter!("portcullis_observer_closes_total", "reason" => end).increment(1);
    tracing::info!(session = watch.session, route = %watch.route, observer = %watch.subject, reason = end, "observer left");
}

/// The hub of `session`, when it is a live session of `route` for `agent` with observers.
pub fn hub_of(sessions: &crate::session::Sessions, session: u64, route: &str, agent: Option<&str>) -> Option<Arc<Hub>> {
    let entry = sessions.get(session)?;
    (entry.route == route && entry.agent.as_deref() == agent && entry.control.stopped().is_none())
        .then(|| entry.observers.clone())
        .flatten()
}
