//! A session's rate (`client_message_rate`, `client_byte_rate`, `rate_burst`, `rate_action`):
//! GCRA over the bytes and the frames a sender has sent, for every kind of session that reads a
//! client (the relay, observers, fan-out clients), so no kind escapes it.

use std::time::Duration;

use tokio::time::Instant;

use crate::config::{RateAction, SessionRate, SessionSettings};

/// The rate a sender is held to.
#[derive(Clone, Copy)]
pub struct Limit {
    /// Bytes and frames a second.
    pub rate: SessionRate,
    /// How far ahead of the rate a sender may be before it is held to it (`rate_burst`).
    pub burst: Duration,
    /// What is done with a sender past it (`rate_action`).
    pub action: RateAction,
    /// The session's start: the origin of [`Gcra`]'s clocks.
    pub epoch: Instant,
}

impl Limit {
    /// What a sender `over` its burst at `now` ([`Gcra::charge`]) gets: go on, wait, or close.
    pub fn decide(&self, over: Duration, now: Instant) -> Next {
        match over {
            over if over.is_zero() => Next::Go,
            _ if self.action == RateAction::Close => Next::Over,
            over => Next::WaitUntil(now + over),
        }
    }

    /// The client's rate of a session that started at `epoch`, when `settings` set one.
    pub fn client(settings: &SessionSettings, epoch: Instant) -> Option<Limit> {
        Limit::of(settings, settings.client_rate, epoch)
    }

    /// `rate` held to `settings`' burst and action, when it is set.
    pub fn of(settings: &SessionSettings, rate: SessionRate, epoch: Instant) -> Option<Limit> {
        (!rate.is_off()).then_some(Limit { rate, burst: settings.rate_burst, action: settings.rate_action, epoch })
    }
}

/// GCRA state of one sender's rate (bytes and frames), kept inline: two clocks and two counts.
/// Nothing runs for a quiet sender.
#[derive(Default)]
pub struct Gcra {
    /// Theoretical arrival time (ns since the epoch) of the next byte and the next frame: how
    /// far the sender has used up its rate. It is over its rate when these are more than
    /// `burst` ahead of now.
    tat: [u64; 2],
    /// Bytes and frames already charged.
    bytes: u64,
    frames: u64,
}

impl Gcra {
    /// Charges what was sent since the last call (`bytes` and `frames` are totals so far), and
    /// says how long the sender is past its burst at `now`: zero when it may go on.
    pub fn charge(&mut self, limit: &Limit, now: Instant, bytes: u64, frames: u64) -> Duration {
        let now_ns = now.saturating_duration_since(limit.epoch).as_nanos() as u64;
        let charge = |tat: &mut u64, units: u64, per_sec: u64| {
            if per_sec > 0 && units > 0 {
                let cost = (units as u128 * 1_000_000_000 / per_sec as u128) as u64;
                *tat = (*tat).max(now_ns).saturating_add(cost);
            }
        };
        charge(&mut self.tat[0], bytes.saturating_sub(self.bytes), limit.rate.bytes);
        charge(&mut self.tat[1], frames.saturating_sub(self.frames), limit.rate.messages as u64);
        self.bytes = bytes;
        self.frames = frames;
        let ahead = self.tat[0].max(self.tat[1]).saturating_sub(now_ns);
        Duration::from_nanos(ahead.saturating_sub(limit.burst.as_nanos() as u64))
    }
}

/// A client read frame by frame (an observer, a fan-out client) held to its session's rate:
/// after each frame, whether to read on, pause ("slow": [`Metered::reading`] is false until
/// [`Metered::resumed`]) or close.
pub struct Metered {
    limit: Option<Limit>,
    gcra: Gcra,
    bytes: u64,
    frames: u64,
    /// Read nothing more before this instant.
    paused: Option<Instant>,
}

/// What [`Limit::decide`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Read on.
    Go,
    /// Read nothing more before this instant (`rate_action = "slow"`).
    WaitUntil(Instant),
    /// Over the rate with `rate_action = "close"`.
    Over,
}

/// A sender over its rate with `rate_action = "close"` (counted as a `session_rate` refusal).
#[derive(Debug, PartialEq, Eq)]
pub struct Over;

impl Metered {
    /// The client rate of `settings`, for a session that starts now.
    pub fn client(settings: &SessionSettings) -> Metered {
        Metered {
            limit: Limit::client(settings, Instant::now()),
            gcra: Gcra::default(),
            bytes: 0,
            frames: 0,
            paused: None,
        }
    }

    /// A frame of `len` bytes (header included) was read: it may pause the reading (counted
    /// in `metrics` as a relayed client's pause is), or end the session.
    pub fn frame(&mut self, len: usize, metrics: &crate::metrics::Metrics) -> Result<(), Over> {
        let Some(limit) = &self.limit else { return Ok(()) };
        self.bytes += len as u64;
        self.frames += 1;
        let now = Instant::now();
        match limit.decide(self.gcra.charge(limit, now, self.bytes, self.frames), now) {
            Next::Go => Ok(()),
            Next::WaitUntil(until) => {
                self.paused = Some(until);
                metrics.rate_paused(crate::metrics::Direction::ClientToBackend, 1);
                Ok(())
            }
            Next::Over => {
                crate::metrics::limit_refused("session_rate");
                Err(Over)
            }
        }
    }

    /// Whether the client may be read now (not paused).
    pub fn reading(&self) -> bool {
        self.paused.is_none()
    }

    /// Waits out a pause (at once when there is none).
    pub async fn resumed(&mut self) {
        if let Some(until) = self.paused {
            tokio::time::sleep_until(until).await;
        }
        self.paused = None;
    }
}
