//! Live observers of a session: read-only WebSocket clients that receive what the backend
//! sends the session's client, as it is sent.
//!
//! A session of a route with `[routes.observe]` has a [`Hub`]. The relay hands it each chunk
//! of the backend's data-frame payloads (the bytes the recording reads, taken at the same
//! point); the hub keeps the latest `replay` bytes, so an observer that joins sees the screen's
//! recent past first, and passes each chunk to every observer's queue (a reference-counted
//! buffer, not a copy per observer). A queue is bounded (`queue` chunks): an observer that
//! falls behind is dropped from the hub and closed with 1013, and the session never waits
//! for an observer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::config::ObserveSettings;

mod run;
use crate::session::subscriber::Lag;
pub use run::{hub_of, requested, run, Watch};

impl crate::session::Attachment for Hub {
    fn shown(&self) -> (&'static str, serde_json::Value) {
        ("observers", self.observers().into())
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

/// The observers of one session, and the output they start with.
#[derive(Debug)]
pub struct Hub {
    settings: Arc<ObserveSettings>,
    inner: Mutex<Inner>,
    next: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    replay: VecDeque<Bytes>,
    replay_len: usize,
    observers: Vec<Watcher>,
}

#[derive(Debug)]
struct Watcher {
    id: u64,
    /// Who watches: its subject, of its issuer ([`subject_key`]).
    subject: Who,
    tx: mpsc::Sender<Bytes>,
    lagged: Arc<Lag>,
}

/// One observer's end: the chunks, and whether it was dropped for falling behind.
#[derive(Debug)]
pub struct Observer {
    /// Its id within the hub.
    pub id: u64,
    /// The replay first, then the live output; ends when the session ends or the observer
    /// was dropped.
    pub rx: mpsc::Receiver<Bytes>,
    /// Raised when the hub dropped this observer for falling behind (close with 1013).
    pub lagged: Arc<Lag>,
}

impl Observer {
    /// True when the hub dropped this observer for falling behind (close with 1013).
    pub fn lagged(&self) -> bool {
        self.lagged.is_raised()
    }
}

/// Why an observer could not join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// The session has `max_observers` already.
    #[error("the session has as many observers as it may")]
    Full,
    /// This subject holds `max_observers_per_subject` of the session's places already.
    #[error("this subject watches the session as many times as it may")]
    SubjectFull,
}

/// Who an observer is, for `max_observers_per_subject`: its token's issuer and subject.
pub type Who = (Option<String>, Option<String>);

/// The [`Who`] of a token's issuer and subject. Tokens without `sub` are one subject of their
/// issuer, as under the subject session caps.
pub fn subject_key(issuer: Option<&str>, subject: Option<&str>) -> Who {
    (issuer.map(str::to_owned), subject.map(str::to_owned))
}

impl Hub {
    /// A hub with the route's settings.
    pub fn new(settings: Arc<ObserveSettings>) -> Arc<Hub> {
        Arc::new(Hub { settings, inner: Mutex::new(Inner::default()), next: AtomicU64::new(1) })
    }

    /// Observers watching now.
    pub fn observers(&self) -> usize {
        self.inner.lock().map(|i| i.observers.len()).unwrap_or(0)
    }

    /// Adds an observer for `subject` ([`subject_key`]), its queue primed with the replay.
    /// The per-subject place is checked first: a subject at its own limit is told so even when
    /// the session is full too.
    pub fn join(&self, subject: &Who) -> Result<Observer, JoinError> {
        let mut inner = self.inner.lock().map_err(|_| JoinError::Full)?;
        let held = inner.observers.iter().filter(|w| &w.subject == subject).count();
        if held >= self.settings.max_observers_per_subject {
            return Err(JoinError::SubjectFull);
        }
        if inner.observers.len() >= self.settings.max_observers {
            return Err(JoinError::Full);
        }
        let (tx, rx) = mpsc::channel(self.settings.queue.max(inner.replay.len() + 1));
        for chunk in &inner.replay {
            let _ = tx.try_send(chunk.clone());
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let lagged = Arc::new(Lag::default());
        inner.observers.push(Watcher { id, subject: subject.clone(), tx, lagged: lagged.clone() });
        Ok(Observer { id, rx, lagged })
    }

    /// Removes an observer that left.
    pub fn leave(&self, id: u64) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.observers.retain(|w| w.id != id);
        }
    }

    /// A chunk of the session's output: kept for the replay and queued to every observer; an
    /// observer whose queue is full is dropped (it closes with 1013).
    pub fn publish(&self, chunk: &Bytes) {
        let Ok(mut inner) = self.inner.lock() else { return };
        if inner.observers.is_empty() && self.settings.replay == 0 {
            return;
        }
        inner.observers.retain(|w| match w.tx.try_send(chunk.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                w.lagged.raise();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        let limit = self.settings.replay;
        if limit > 0 {
            inner.replay_len += chunk.len();
            inner.replay.push_back(chunk.clone());
            while inner.replay_len > limit {
                match inner.replay.pop_front() {
                    Some(old) => inner.replay_len -= old.len(),
                    None => break,
                }
            }
        }
    }
}

/// The observers see the backend's output as the relay scans it.
impl crate::session::PayloadSink for Hub {
    fn payload(&self, data: &Bytes) {
        self.publish(data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(replay: usize, queue: usize) -> Arc<Hub> {
        Hub::new(Arc::new(ObserveSettings {
            scope: "observe:{agent}".into(),
            replay,
            queue,
            max_observers: 2,
            max_observers_per_subject: 2,
            drop_grace: crate::config::DROP_GRACE,
        }))
    }

    #[test]
    fn a_joiner_gets_the_latest_output_then_the_live_one() {
        let h = hub(8, 16);
        for c in [&b"0123"[..], b"4567", b"89ab"] {
            h.publish(&Bytes::copy_from_slice(c));
        }
        let mut o = h.join(&subject_key(None, Some("auditor"))).expect("join");
        h.publish(&Bytes::from_static(b"live"));
        let got: Vec<Bytes> = std::iter::from_fn(|| o.rx.try_recv().ok()).collect();
        assert_eq!(got, [&b"4567"[..], b"89ab", b"live"], "the last 8 bytes, then live");
    }

    #[test]
    fn a_full_queue_drops_that_observer_only_and_the_cap_holds() {
        let h = hub(0, 2);
        let who = |s: &str| subject_key(None, Some(s));
        let mut slow = h.join(&who("a")).expect("slow");
        let mut fast = h.join(&who("b")).expect("fast");
        assert_eq!(h.join(&who("c")).unwrap_err(), JoinError::Full);
        for i in 0..3u8 {
            h.publish(&Bytes::copy_from_slice(&[i]));
            assert_eq!(fast.rx.try_recv().ok().as_deref(), Some(&[i][..]));
        }
        assert!(slow.lagged() && !fast.lagged());
        assert_eq!(h.observers(), 1);
        assert_eq!(std::iter::from_fn(|| slow.rx.try_recv().ok()).count(), 2, "what it had queued");
        h.leave(fast.id);
        assert_eq!(h.observers(), 0);
    }

    #[test]
    fn one_subject_holds_at_most_its_share_of_the_places() {
        let h = Hub::new(Arc::new(ObserveSettings {
            scope: "observe:{agent}".into(),
            replay: 0,
            queue: 4,
            max_observers: 3,
            max_observers_per_subject: 2,
            drop_grace: crate::config::DROP_GRACE,
        }));
        let mallory = subject_key(Some("idp"), Some("mallory"));
        let first = h.join(&mallory).expect("first");
        let _second = h.join(&mallory).expect("second");
        assert_eq!(h.join(&mallory).unwrap_err(), JoinError::SubjectFull);
        // The same name from another issuer is another subject.
        let _other = h.join(&subject_key(Some("other-idp"), Some("mallory"))).expect("another issuer's");
        assert_eq!(h.join(&subject_key(Some("idp"), Some("auditor"))).unwrap_err(), JoinError::Full);
        h.leave(first.id);
        assert!(h.join(&mallory).is_ok(), "a place given back is the subject's again");
    }
}
