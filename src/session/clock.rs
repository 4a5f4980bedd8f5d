//! The one deadline engine of every session: the token's expiry, the drain (spread), the
//! route's `max_lifetime` and `idle_timeout`, and the proxy's pings with their timeout. A
//! session's task keeps one [`Clock`] (and a [`Ping`] per peer it pings), sets a single timer to
//! [`Clock::next`], and asks [`Clock::due`] what is due when it fires. Activity only moves
//! deadlines later, so it is noted with a timestamp and nothing is re-armed for it: a timer that
//! fires early finds nothing due and is set again.
//!
//! The relay (both peers pinged), fan-out clients and streamed responses (SSE and others) all
//! use it; what each does when something is due is its own (the close table has the frames).

use std::time::Duration;

use tokio::time::Instant;

use crate::config::SessionSettings;

/// When a session's one timer is set with nothing due: `at`, or a year ahead.
pub fn or_far(at: Option<Instant>) -> Instant {
    at.unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600))
}

/// What a [`Clock`] says is due, in the order it is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// The token's `exp` (plus the leeway) passed.
    Expired,
    /// The drain reached this session (after its share of the spread).
    Drain,
    /// `max_lifetime` reached.
    Lifetime,
    /// No data either way for `idle_timeout`.
    Idle,
}

/// A session's deadlines.
#[derive(Debug, Clone)]
pub struct Clock {
    expires_at: Option<Instant>,
    drain_at: Option<Instant>,
    lifetime_at: Option<Instant>,
    idle: Duration,
    last_data: Instant,
}

impl Clock {
    /// A session starting now under `s` (its `max_lifetime` and `idle_timeout`; zero: none),
    /// whose token expires at `expires_at` when the route enforces it.
    pub fn new(s: &SessionSettings, expires_at: Option<Instant>) -> Clock {
        Clock::with(s.max_lifetime, s.idle_timeout, expires_at)
    }

    /// A clock with these limits (zero: none).
    pub fn with(max_lifetime: Duration, idle: Duration, expires_at: Option<Instant>) -> Clock {
        let now = Instant::now();
        Clock {
            expires_at,
            drain_at: None,
            lifetime_at: (!max_lifetime.is_zero()).then(|| now + max_lifetime),
            idle,
            last_data: now,
        }
    }

    /// A data frame went either way at `now`.
    #[inline]
    pub fn data(&mut self, now: Instant) {
        self.last_data = now;
    }

    /// The drain reached the session: it ends after a random share of `spread`.
    pub fn drain(&mut self, spread: Duration) {
        self.drain_at.get_or_insert_with(|| Instant::now() + super::drain_delay(spread));
    }

    /// The session goes on under another token (a resume): its expiry is that token's.
    pub fn renew(&mut self, expires_at: Option<Instant>) {
        self.expires_at = expires_at;
    }

    /// The earliest instant something may be due, if any.
    pub fn next(&self) -> Option<Instant> {
        let idle = (!self.idle.is_zero()).then(|| self.last_data + self.idle);
        [self.expires_at, self.drain_at, self.lifetime_at, idle].into_iter().flatten().min()
    }

    /// Ready with what comes due first, for a session whose clock changes no more (no activity
    /// to note: an observer, a streamed response); never, when nothing is set.
    pub async fn until_due(&self) -> Due {
        loop {
            let Some(at) = self.next() else { return std::future::pending().await };
            tokio::time::sleep_until(at).await;
            if let Some(due) = self.due(Instant::now()) {
                return due;
            }
        }
    }

    /// What is due at `now`, if anything.
    pub fn due(&self, now: Instant) -> Option<Due> {
        if self.expires_at.is_some_and(|at| now >= at) {
            Some(Due::Expired)
        } else if self.drain_at.is_some_and(|at| now >= at) {
            Some(Due::Drain)
        } else if self.lifetime_at.is_some_and(|at| now >= at) {
            Some(Due::Lifetime)
        } else if !self.idle.is_zero() && now >= self.last_data + self.idle {
            Some(Due::Idle)
        } else {
            None
        }
    }
}

/// The route's ping settings (`ping_interval`, `ping_timeout`), kept once per session kind
/// rather than in every peer's [`Ping`].
#[derive(Debug, Clone, Copy)]
pub struct Pings {
    /// A ping after this long without hearing from the peer; zero: no pings.
    pub interval: Duration,
    /// How long a ping may go unanswered.
    pub timeout: Duration,
}

impl Pings {
    /// The pings of `s`.
    pub fn of(s: &SessionSettings) -> Pings {
        Pings { interval: s.ping_interval, timeout: s.ping_timeout }
    }
}

/// The proxy's pings to one peer: one every `interval` after the peer was last heard from,
/// answered within `timeout` ([`Pings`]).
#[derive(Debug, Clone, Copy)]
pub struct Ping {
    /// When the unanswered ping was sent.
    sent: Option<Instant>,
    last_heard: Instant,
}

/// What a [`Ping`] says is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PingDue {
    /// Send a ping now (it is marked sent).
    Send,
    /// The ping sent went unanswered for `timeout`.
    TimedOut,
}

impl Default for Ping {
    fn default() -> Ping {
        Ping::new()
    }
}

impl Ping {
    /// No ping sent yet; the peer heard from now.
    pub fn new() -> Ping {
        Ping { sent: None, last_heard: Instant::now() }
    }

    /// The peer was heard from (any byte) at `now`.
    #[inline]
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// The peer answered the ping.
    pub fn answered(&mut self) {
        self.sent = None;
    }

    /// The ping awaiting its answer reached the peer at `at` (or, with `at` now, has not yet:
    /// it waits behind a frame): its timeout runs from then.
    pub fn sent_at(&mut self, at: Instant) {
        if self.sent.is_some() {
            self.sent = Some(at);
        }
    }

    /// Whether a ping is awaiting its answer.
    pub fn awaiting(&self) -> bool {
        self.sent.is_some()
    }

    /// The earliest instant a ping is due or times out, if pings are on.
    pub fn next(&self, p: &Pings) -> Option<Instant> {
        if p.interval.is_zero() {
            return None;
        }
        Some(match self.sent {
            Some(sent) => sent + p.timeout,
            None => self.last_heard + p.interval,
        })
    }

    /// What is due at `now`; a ping due is marked sent.
    pub fn due(&mut self, now: Instant, p: &Pings) -> Option<PingDue> {
        if p.interval.is_zero() {
            return None;
        }
        match self.sent {
            Some(sent) if now >= sent + p.timeout => Some(PingDue::TimedOut),
            Some(_) => None,
            None if now >= self.last_heard + p.interval => {
                self.sent = Some(now);
                Some(PingDue::Send)
            }
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn deadlines_come_due_in_order_and_activity_moves_idle_later() {
        let mut c = Clock::with(Duration::from_secs(100), Duration::from_secs(10), None);
        let start = Instant::now();
        assert_eq!(c.next(), Some(start + Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(6)).await;
        c.data(Instant::now());
        assert_eq!(c.due(Instant::now()), None);
        assert_eq!(c.next(), Some(start + Duration::from_secs(16)));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(c.due(Instant::now()), Some(Due::Idle));
        // Expiry, then drain, then lifetime take precedence, in that order.
        c.renew(Some(Instant::now()));
        c.drain(Duration::ZERO);
        assert_eq!(c.due(Instant::now()), Some(Due::Expired));
        c.renew(None);
        assert_eq!(c.due(Instant::now()), Some(Due::Drain));
    }

    #[tokio::test(start_paused = true)]
    async fn until_due_waits_for_the_first_deadline() {
        let start = Instant::now();
        let c = Clock::with(Duration::from_secs(30), Duration::ZERO, Some(start + Duration::from_secs(10)));
        assert_eq!(c.until_due().await, Due::Expired);
        assert_eq!(Instant::now() - start, Duration::from_secs(10));
        let none = Clock::with(Duration::ZERO, Duration::ZERO, None);
        assert!(tokio::time::timeout(Duration::from_secs(3600), none.until_due()).await.is_err(), "nothing set: never");
    }

    #[tokio::test(start_paused = true)]
    async fn a_ping_is_sent_after_the_interval_and_times_out_unanswered() {
        let s = Pings { interval: Duration::from_secs(5), timeout: Duration::from_secs(2) };
        let mut p = Ping::new();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(p.due(Instant::now(), &s), Some(PingDue::Send));
        assert!(p.awaiting());
        assert_eq!(p.due(Instant::now(), &s), None, "sent once");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(p.due(Instant::now(), &s), Some(PingDue::TimedOut));
        p.answered();
        p.heard(Instant::now());
        assert_eq!(p.next(&s), Some(Instant::now() + Duration::from_secs(5)));
        let off = Pings { interval: Duration::ZERO, timeout: Duration::from_secs(2) };
        assert_eq!((p.next(&off), p.due(Instant::now(), &off)), (None, None));
    }
}
