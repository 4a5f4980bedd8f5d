//! Fan-out: one backend WebSocket shared by every client of the same route, agent and path
//! (`[routes.fanout]`, the dashboards' case).
//!
//! The registry ([`Fanouts`]) maps a key to its [`Stream`]; the first client of a key opens the
//! backend connection (later ones wait for that one connect, never open a second), the stream's
//! task (`session/fanout/run.rs`) reads the backend's frames and hands each whole frame, as one
//! reference-counted buffer, to every subscriber's bounded queue. A subscriber whose queue is
//! full is dropped at once: no client ever slows the stream or the others. The stream leaves the
//! registry when it ends (its last client left and the linger passed, or the backend closed).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, OnceCell};

pub use crate::session::subscriber::Lag;

mod run;
pub(crate) use run::{run_client, run_stream, ClientTask, StreamTask};

/// One client's end of a stream: whole backend frames, as they come.
#[derive(Debug)]
pub struct Subscriber {
    /// Its id within the stream.
    pub id: u64,
    /// The frames.
    pub tx: mpsc::Sender<Bytes>,
    /// Raised when the stream dropped it for falling a whole queue behind.
    pub lagged: Arc<Lag>,
}

/// What a client asks of its stream.
#[derive(Debug)]
pub enum Command {
    /// Start receiving (at the next message boundary).
    Join(Subscriber),
    /// Stop receiving.
    Leave(u64),
}

/// How a stream ended, for its clients' close frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The backend sent a close frame with this code (none when it had none).
    BackendClosed(Option<u16>),
    /// The backend's connection ended without one, or broke the protocol.
    BackendLost,
    /// The proxy closed it (drain, last client gone).
    Closed,
}

/// A shared backend stream.
#[derive(Debug)]
pub struct Stream {
    /// The route's name.
    pub route: String,
    /// The member that answered.
    pub member: String,
    /// The subprotocol the backend chose, answered to each client that offered it.
    pub protocol: Option<String>,
    /// Joins and leaves (unbounded: each client sends at most two).
    pub commands: mpsc::UnboundedSender<Command>,
    /// Client data frames for the backend (`client_data = "forward"`), whole and masked.
    pub data: mpsc::Sender<Bytes>,
    /// How it ended, once it has.
    pub end: Mutex<Option<End>>,
    next: AtomicU64,
}

impl Stream {
    /// A stream's handle; `commands` and `data` lead to its task.
    pub fn new(
        route: String,
        member: String,
        protocol: Option<String>,
        commands: mpsc::UnboundedSender<Command>,
        data: mpsc::Sender<Bytes>,
    ) -> Stream {
        Stream { route, member, protocol, commands, data, end: Mutex::new(None), next: AtomicU64::new(1) }
    }

    /// Subscribes a client with a queue of `queue` frames; `None` when the stream has ended.
    pub fn subscribe(&self, queue: usize) -> Option<(u64, mpsc::Receiver<Bytes>, Arc<Lag>)> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let lagged = Arc::new(Lag::default());
        self.commands.send(Command::Join(Subscriber { id, tx, lagged: lagged.clone() })).ok()?;
        Some((id, rx, lagged))
    }

    /// How it ended, if it has.
    pub fn ended(&self) -> Option<End> {
        self.end.lock().ok().and_then(|e| *e)
    }
}

/// A key's place: its stream once opened (the cell makes concurrent first clients wait for one
/// connect).
#[derive(Debug, Default)]
pub struct Slot {
    cell: OnceCell<Arc<Stream>>,
}

impl Slot {
    /// The stream, opening it with `open` when there is none yet. Another caller's failed
    /// `open` leaves the cell empty for the next.
    pub async fn get_or_open<F, E>(&self, open: F) -> Result<Arc<Stream>, E>
    where
        F: std::future::Future<Output = Result<Arc<Stream>, E>>,
    {
        self.cell.get_or_try_init(|| open).await.cloned()
    }
}

/// `(route, agent, path, identity)`: the identity is the subscribers' issuer and subject, so
/// subscribers of different subjects never share a backend stream (its handshake carries the
/// first subscriber's identity headers, and with `client_data = "forward"` its input).
pub type Key = (String, String, String, String);

/// The shared streams of this process.
#[derive(Debug, Default)]
pub struct Fanouts {
    map: Mutex<HashMap<Key, Arc<Slot>>>,
}

impl Fanouts {
    /// The slot for `key`: its live stream, or a place to open one. A slot whose stream has
    /// ended is replaced.
    pub fn slot(&self, key: &Key) -> Arc<Slot> {
        let Ok(mut map) = self.map.lock() else { return Arc::default() };
        if let Some(slot) = map.get(key) {
            if slot.cell.get().is_none_or(|s| s.ended().is_none()) {
                return slot.clone();
            }
        }
        let slot = Arc::new(Slot::default());
        map.insert(key.clone(), slot.clone());
        slot
    }

    /// Removes `key`'s slot when it still holds `stream` (the stream ended).
    pub fn remove(&self, key: &Key, stream: &Arc<Stream>) {
        if let Ok(mut map) = self.map.lock() {
            if map.get(key).and_then(|s| s.cell.get()).is_some_and(|s| Arc::ptr_eq(s, stream)) {
                map.remove(key);
            }
        }
    }

    /// Streams registered now.
    pub fn len(&self) -> usize {
        self.map.lock().map_or(0, |m| m.len())
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
