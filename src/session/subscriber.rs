//! What the sessions that read a shared source have in common (fan-out clients read their
//! agent's stream, observers read a session's output): the flag a publisher raises when it
//! drops a subscriber that fell a whole queue behind, and the bounded write that flag cuts
//! short. Not a feature of its own: the features under `session/` share it, and import
//! nothing of one another.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::session::close::Cause;
use crate::session::{SessionControl, SessionEnd, Side};

/// What a subscriber's session moved, as a relayed session counts it: the frames read from
/// its client, and the source's frames written to it (the proxy's own pings and pongs not
/// counted). Each is counted live ([`SessionControl::moved`]) and totalled for its end.
#[derive(Default)]
pub(crate) struct Moved {
    bytes: [u64; 2],
    frames: [u64; 2],
}

impl Moved {
    /// A frame of `len` bytes moved from `from` (a data frame, or a control frame).
    pub(crate) fn add(&mut self, control: &SessionControl, metrics: &Metrics, from: Side, len: usize, data: bool) {
        let i = usize::from(from == Side::Backend);
        self.bytes[i] += len as u64;
        self.frames[i] += 1;
        control.moved(metrics, from, len as u64, u64::from(data));
    }

    /// The session's end: `cause`, with what it moved.
    pub(crate) fn end(&self, cause: Cause) -> SessionEnd {
        SessionEnd { bytes: self.bytes, frames: self.frames, ..SessionEnd::of(cause) }
    }
}

/// Raised once, when a publisher drops a subscriber for falling a whole queue behind. The
/// subscriber's writer waits on it as well as on its queue: a client that stopped reading
/// blocks that writer in a socket write, and it must not hold its task, its connection and
/// its queued frames for ever. (Observer hubs use it too.)
#[derive(Debug, Default)]
pub struct Lag {
    raised: AtomicBool,
    notify: Notify,
}

impl Lag {
    /// Marks the subscriber dropped and wakes its writer.
    pub fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// True once raised.
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    /// Waits until it is raised.
    pub async fn raised(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a raise in between is not missed.
            notified.as_mut().enable();
            if self.is_raised() {
                return;
            }
            notified.await;
        }
    }
}

/// How long a client's close frame may take to write before its connection is dropped.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Ends a subscriber's connection after `cause`, all within [`CLOSE_TIMEOUT`]: its close frame
/// (if any) written and flushed, its write side shut down, and, when the close table says it
/// lingers ([`Cause::lingers_on`]: it sent what it may not), what it still sends read and
/// discarded until it closes (the lingering close). Called once the subscriber has left its
/// source, so a lingering peer holds nothing of it.
pub(crate) async fn close_subscriber<R, W>(rd: &mut R, wr: &mut W, close: Option<&[u8]>, cause: Cause)
where
    R: tokio::io::AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if let Some(frame) = close {
            if wr.write_all(frame).await.is_err() || wr.flush().await.is_err() {
                return;
            }
        }
        if cause.lingers_on() == Some(Side::Client) {
            crate::session::lingering_close(rd, wr).await;
        } else {
            let _ = wr.shutdown().await;
        }
    })
    .await;
}

/// What became of a write to a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Written {
    /// All of it, and the subscriber is still wanted.
    Done,
    /// The connection failed.
    Failed,
    /// All of it, but the publisher has dropped the subscriber: send it the close.
    Dropped,
    /// The publisher dropped the subscriber while the write waited on a client that does not
    /// read, and the write did not end within the grace: the frame is cut short, so no
    /// close frame may follow; drop the connection.
    Cut,
}

/// Runs `write` (a frame and its flush; `false` when the connection failed) unless the
/// publisher drops this subscriber first, and then for `grace` more at most. A client that
/// stopped reading blocks the write for as long as it likes: without this its task, its
/// connection and its queued frames would be held until it read again.
pub(crate) async fn write_unless_dropped(
    write: impl std::future::Future<Output = bool>,
    lag: &Lag,
    grace: Duration,
) -> Written {
    tokio::pin!(write);
    let ok = tokio::select! {
        biased;
        ok = &mut write => ok,
        () = lag.raised() => match tokio::time::timeout(grace, &mut write).await {
            Ok(ok) => ok,
            Err(_) => return Written::Cut,
        },
    };
    match (ok, lag.is_raised()) {
        (false, _) => Written::Failed,
        (true, true) => Written::Dropped,
        (true, false) => Written::Done,
    }
}

/// Writes `bytes` and flushes; `false` when the connection failed.
pub(crate) async fn write_flushed<W: AsyncWrite + Unpin>(wr: &mut W, bytes: &[u8]) -> bool {
    wr.write_all(bytes).await.is_ok() && wr.flush().await.is_ok()
}
