//! Live sessions: the stop handle each relay watches (drain, revocation).
//!
//! Every session gets a [`SessionControl`] whose token is a child of the server's drain token:
//! cancelling the server drains every session at once, and cancelling one session's token (with
//! a reason set first) stops just that session.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// Why a session was told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The proxy is draining (SIGTERM): close with 1001 "going away", spread over time.
    Drain,
    /// An operator revoked the session: close with 1008 "session revoked" at once.
    Revoked,
}

/// Stop signal and reason for one session.
#[derive(Debug)]
pub struct SessionControl {
    token: CancellationToken,
    reason: AtomicU8,
}

impl SessionControl {
    /// A control whose token is cancelled when `parent` is (server drain).
    pub fn new(parent: &CancellationToken) -> Arc<Self> {
        Arc::new(SessionControl { token: parent.child_token(), reason: AtomicU8::new(StopReason::Drain as u8) })
    }

    /// The token the relay waits on.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Why the session was stopped (meaningful once the token is cancelled).
    pub fn reason(&self) -> StopReason {
        if self.reason.load(Ordering::Acquire) == StopReason::Revoked as u8 {
            StopReason::Revoked
        } else {
            StopReason::Drain
        }
    }

    /// Stops this session for `reason`.
    pub fn stop(&self, reason: StopReason) {
        self.reason.store(reason as u8, Ordering::Release);
        self.token.cancel();
    }
}
