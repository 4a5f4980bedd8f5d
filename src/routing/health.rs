//! Passive health: members that fail to connect, or that fail the handshakes of two different
//! requesters while completing none for others, are skipped for a while.
//!
//! The first failure ejects a member for `base`; each further failure before a success doubles
//! the ejection (`base * 2^(failures-1)`), capped at `max`. A success forgives the ejection
//! (not the record of failed handshakes, which only fades). A
//! member that has been quiet for `max` after its ejection ended starts again from `base`, and
//! such entries are dropped, so the table only holds members that failed recently.
//!
//! When every member is ejected, those ejected for failed handshakes are still the last resort
//! ([`PassiveHealth::last_resort`]): all callers for one whose handshakes were answered, one
//! caller at a time for one that let a handshake time out.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::sticky::Member;

/// How long a member that completed a WebSocket handshake is known to serve: failed handshakes
/// eject no member that completed one this recently. They may be the request's doing (an agent
/// that one user controls, behind a gateway shared by every agent), and any number of accounts
/// failing together must not take a member away from the users it is serving; a member that
/// serves no one any more is ejected this long after its last completed handshake at most.
const SERVING: Duration = Duration::from_secs(10);

/// How long a requester whose handshake a member completed keeps that member while it is
/// ejected for failed handshakes (not for failed connects): a member used less often than
/// [`SERVING`] can be ejected by others' failures between its users' sessions, and must not be
/// taken from the users it was serving.
const SERVED_RECENTLY: Duration = Duration::from_secs(15 * 60);

/// Connect-failure tracking for backend members, shared by every session (keyed by address).
#[derive(Debug)]
pub struct PassiveHealth {
    /// Ejection after the first failure.
    base: Duration,
    /// Longest ejection, however many failures.
    max: Duration,
    /// Members with failures not yet forgiven, by address.
    failing: Mutex<HashMap<String, Failing>>,
    /// Members' recent handshakes, by address ([`Handshakes`]), and the size at which the table
    /// is swept of forgotten ones next.
    handshakes: Mutex<(HashMap<String, Handshakes>, usize)>,
}

/// Failure state of one member.
#[derive(Debug, Clone, Copy)]
struct Failing {
    /// Consecutive failures without a success in between.
    failures: u32,
    /// End of the current ejection.
    until: Instant,
    /// Why, the worst cause of the ejection so far.
    cause: Cause,
}

/// Why a member is ejected, from the mildest to the worst: an ejection keeps the worst cause
/// it had until it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    /// Failed handshakes of two requesters, every one answered (an error status, a bad answer,
    /// a hang-up): requesters it served recently still get it ([`SERVED_RECENTLY`]), and it
    /// is the last resort for the others when no member is usable
    /// ([`PassiveHealth::last_resort`]).
    Answered,
    /// Failed handshakes of two requesters, one at least timed out within `max`: requesters it
    /// served recently still get it, and it is the last resort for one other requester at a
    /// time (`probed`: when one was last sent to it). A member that holds handshakes until
    /// they time out would hold every requester sent to it for the whole `handshake_timeout`;
    /// and whether a handshake times out can be an account's doing (its own agent, behind a
    /// gateway the others share, that never answers), so it must not refuse everyone else.
    TimedOut { probed: Option<Instant> },
    /// A failed connect: nothing of any request reached it, so it is out for everyone.
    Connect,
}

impl Cause {
    fn severity(self) -> u8 {
        match self {
            Cause::Answered => 0,
            Cause::TimedOut { .. } => 1,
            Cause::Connect => 2,
        }
    }
}

/// A member's recent WebSocket handshakes: when one last completed, and the requesters whose
/// handshakes failed since.
#[derive(Debug, Clone)]
struct Handshakes {
    /// When a handshake last completed.
    completed: Option<Instant>,
    /// Requesters whose handshakes it completed, with when each last did (at most
    /// [`REQUESTERS_KEPT`]).
    served: Vec<(u64, Instant)>,
    /// Requesters whose handshakes failed, with when each last did (at most
    /// [`REQUESTERS_KEPT`]; the oldest goes first).
    failed_for: Vec<(u64, Instant)>,
    /// When a handshake last timed out (the member never answered it).
    timed_out: Option<Instant>,
}

/// Requesters remembered per member.
const REQUESTERS_KEPT: usize = 64;

/// Members the handshake table holds at most; past it, members not in it have no record (their
/// failed handshakes eject nothing until the table is swept).
const MEMBERS_KEPT: usize = 65_536;

impl Handshakes {
    fn new() -> Self {
        Handshakes { completed: None, served: Vec::new(), failed_for: Vec::new(), timed_out: None }
    }

    /// A handshake of `requester` failed at `now` (`answered`: the member answered it, not
    /// timed out): the ejection, if the member is to be ejected (two different requesters
    /// failed on it within `max`, and it has completed no handshake for [`SERVING`]).
    fn failed(&mut self, requester: u64, answered: bool, now: Instant, max: Duration) -> Option<Cause> {
        if !answered {
            self.timed_out = Some(now);
        }
        self.failed_for.retain(|(r, at)| *r != requester && now.saturating_duration_since(*at) < max);
        if self.failed_for.len() == REQUESTERS_KEPT {
            self.failed_for.remove(0);
        }
        self.failed_for.push((requester, now));
        let serving = self.completed.is_some_and(|at| now.saturating_duration_since(at) < SERVING);
        let answered = self.timed_out.is_none_or(|at| now.saturating_duration_since(at) >= max);
        let cause = if answered { Cause::Answered } else { Cause::TimedOut { probed: None } };
        (self.failed_for.len() >= 2 && !serving).then_some(cause)
    }

    /// A handshake of `requester` completed at `now`.
    fn completed(&mut self, requester: u64, now: Instant) {
        self.completed = Some(now);
        self.served.retain(|(r, at)| *r != requester && now.saturating_duration_since(*at) < SERVED_RECENTLY);
        if self.served.len() == REQUESTERS_KEPT {
            self.served.remove(0);
        }
        self.served.push((requester, now));
    }

    /// Whether a handshake of `requester` failed on it within `max`.
    fn failed_for(&self, requester: u64, now: Instant, max: Duration) -> bool {
        self.failed_for.iter().any(|(r, at)| *r == requester && now.saturating_duration_since(*at) < max)
    }

    /// Whether it completed a handshake of `requester` within [`SERVED_RECENTLY`].
    fn served(&self, requester: u64, now: Instant) -> bool {
        self.served.iter().any(|(r, at)| *r == requester && now.saturating_duration_since(*at) < SERVED_RECENTLY)
    }

    /// Forgotten: nothing of it is recent.
    fn forgotten(&self, now: Instant, max: Duration) -> bool {
        let failed = self.failed_for.last().map(|(_, at)| *at);
        match self.completed {
            Some(at) => now.saturating_duration_since(at) > SERVED_RECENTLY,
            None => failed.is_none_or(|at| now.saturating_duration_since(at) > max.max(SERVING)),
        }
    }
}

impl PassiveHealth {
    /// Tracking that ejects for `base` after one failure, growing to at most `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        PassiveHealth {
            base,
            max: max.max(base),
            failing: Mutex::new(HashMap::new()),
            handshakes: Mutex::new((HashMap::new(), 64)),
        }
    }

    /// Whether `addr` is ejected now.
    pub fn is_ejected(&self, addr: &str) -> bool {
        self.is_ejected_at(addr, Instant::now())
    }

    /// Records a failed connect to `addr`, ejecting it for the next backoff step.
    pub fn record_failure(&self, addr: &str) {
        self.record_failure_at(addr, Instant::now());
    }

    /// Records a handshake `addr` failed (an error status, a bad answer, a hang-up, a timeout)
    /// for a request of `requester` (a hash of who asked: the token's issuer and subject, else
    /// the client's address). What a member does with a request may be the request's doing, so
    /// one requester's failures never eject it, nor do any number of requesters' while it
    /// completes handshakes for others ([`SERVING`]). A member is ejected (as for a failed
    /// connect) once handshakes of two different requesters failed on it within `max` and it
    /// has completed none for [`SERVING`]: a member that fails every handshake is out after the
    /// second requester's, or `SERVING` after its last completed one. `answered`: the member
    /// answered the handshake (an error status, a bad answer, a hang-up); `false` for a timeout.
    pub(crate) fn record_refusal(&self, addr: &str, requester: u64, answered: bool) {
        self.record_refusal_at(addr, requester, answered, Instant::now());
    }

    fn record_refusal_at(&self, addr: &str, requester: u64, answered: bool, now: Instant) {
        let eject = self.with_handshakes(addr, now, |h| h.failed(requester, answered, now, self.max));
        if let Some(Some(cause)) = eject {
            self.eject_at(addr, now, cause);
        }
        // An answered failure ends a probe at once (a timed-out one held the next off for the
        // `handshake_timeout` it took): the next requester may have the next probe now.
        if answered {
            if let Some(Failing { cause: Cause::TimedOut { probed }, .. }) = self.lock().get_mut(addr) {
                *probed = None;
            }
        }
    }

    /// Records a completed connect and WebSocket handshake of `addr` for `requester`: forgives
    /// its failures, and shows it serving ([`SERVING`], [`SERVED_RECENTLY`]).
    pub(crate) fn record_handshake(&self, addr: &str, requester: u64) {
        self.record_handshake_at(addr, requester, Instant::now());
    }

    fn record_handshake_at(&self, addr: &str, requester: u64, now: Instant) {
        self.record_success(addr);
        self.with_handshakes(addr, now, |h| h.completed(requester, now));
    }

    /// Records a successful connect to `addr` (a plain request's answer, an active check),
    /// forgiving its failures. It does not count against failed handshakes: whatever a client
    /// makes a member answer must not keep a member that fails handshakes in the pool.
    pub fn record_success(&self, addr: &str) {
        self.lock().remove(addr);
    }

    /// Runs `f` on `addr`'s handshake record, made if new (`None` when the table is full of
    /// recent members). The table is swept of forgotten members whenever it has doubled since
    /// the last sweep: members that left (a registry's, a reloaded route's, templated ones a
    /// client named) do not stay for ever.
    fn with_handshakes<T>(&self, addr: &str, now: Instant, f: impl FnOnce(&mut Handshakes) -> T) -> Option<T> {
        let mut table = self.handshakes.lock().unwrap_or_else(|p| p.into_inner());
        let (by_addr, sweep_at) = &mut *table;
        if let Some(h) = by_addr.get_mut(addr) {
            return Some(f(h));
        }
        if by_addr.len() >= *sweep_at {
            let max = self.max;
            by_addr.retain(|_, h| !h.forgotten(now, max));
            *sweep_at = (by_addr.len() * 2).clamp(64, MEMBERS_KEPT);
        }
        if by_addr.len() >= MEMBERS_KEPT {
            return None;
        }
        Some(f(by_addr.entry(addr.to_owned()).or_insert_with(Handshakes::new)))
    }

    /// The members of `members` not ejected now, in their order.
    pub fn healthy<'m>(&self, members: &'m [Member]) -> Vec<&'m Member> {
        self.healthy_at(members, None, Instant::now())
    }

    /// The members of `members` `requester` may be sent to now, in their order: those not
    /// ejected, and those ejected for failed handshakes only that completed one of its own
    /// within [`SERVED_RECENTLY`] (others' failures do not take a member from its users).
    pub fn healthy_for<'m>(&self, members: &'m [Member], requester: Option<u64>) -> Vec<&'m Member> {
        self.healthy_at(members, requester, Instant::now())
    }

    /// The members of `members` ejected now for failed handshakes (never for a failed
    /// connect), in their order: the last resort when no member is usable, as Envoy's panic
    /// threshold sends to every member. Others' failed handshakes, from however many accounts,
    /// must not refuse a requester the member never served (a newcomer) a member that may
    /// serve it; one that serves no one answers with its own failure (502). Those whose
    /// handshakes all were answered are given to every caller (an answer comes at once); one
    /// that let a handshake time out to one caller per `spacing` (the route's
    /// `handshake_timeout`), as a circuit breaker's half-open probe: at most one requester
    /// waits on it at a time, and the first it serves puts it back for everyone.
    pub(crate) fn last_resort<'m>(
        &self,
        members: &'m [Member],
        spacing: Duration,
        requester: Option<u64>,
    ) -> Vec<&'m Member> {
        self.last_resort_at(members, spacing, requester, Instant::now())
    }

    fn last_resort_at<'m>(
        &self,
        members: &'m [Member],
        spacing: Duration,
        requester: Option<u64>,
        now: Instant,
    ) -> Vec<&'m Member> {
        let mut failing = self.lock();
        // The probe of a member that let a handshake time out is for a requester it has not
        // failed: those whose handshakes failed on it (the accounts that ejected it) cannot
        // take every probe by retrying faster than newcomers come.
        let failed_it = |addr: &str| {
            let Some(requester) = requester else { return false };
            let table = self.handshakes.lock().unwrap_or_else(|p| p.into_inner());
            table.0.get(addr).is_some_and(|h| h.failed_for(requester, now, self.max))
        };
        let mut last = Vec::new();
        for m in members {
            let Some(f) = failing.get_mut(&m.addr).filter(|f| now < f.until) else { continue };
            match &mut f.cause {
                Cause::Answered => last.push(m),
                Cause::TimedOut { probed } if probed.is_none_or(|at| now >= at + spacing) && !failed_it(&m.addr) => {
                    *probed = Some(now);
                    last.push(m);
                }
                Cause::TimedOut { .. } | Cause::Connect => {}
            }
        }
        last
    }

    /// How many members of `members` are ejected now (for the `member_healthy` gauge and admin).
    pub fn ejected_count(&self, members: &[Member]) -> usize {
        members.len() - self.healthy(members).len()
    }

    fn is_ejected_at(&self, addr: &str, now: Instant) -> bool {
        self.lock().get(addr).is_some_and(|f| now < f.until)
    }

    fn healthy_at<'m>(&self, members: &'m [Member], requester: Option<u64>, now: Instant) -> Vec<&'m Member> {
        let failing = self.lock();
        if failing.is_empty() {
            return members.iter().collect();
        }
        let served = |addr: &str| {
            let Some(requester) = requester else { return false };
            let table = self.handshakes.lock().unwrap_or_else(|p| p.into_inner());
            table.0.get(addr).is_some_and(|h| h.served(requester, now))
        };
        let usable = |m: &&Member| match failing.get(&m.addr) {
            None => true,
            Some(f) => now >= f.until || (f.cause != Cause::Connect && served(&m.addr)),
        };
        members.iter().filter(usable).collect()
    }

    fn record_failure_at(&self, addr: &str, now: Instant) {
        self.eject_at(addr, now, Cause::Connect);
    }

    /// Ejects `addr` for the next backoff step: for failed handshakes, or for a failed connect,
    /// which takes it from every requester and from the last resort until the ejection ends.
    fn eject_at(&self, addr: &str, now: Instant, cause: Cause) {
        let mut failing = self.lock();
        // Forget members that have been quiet for `max` since their ejection ended.
        let max = self.max;
        failing.retain(|_, f| now < f.until + max);
        let earlier = failing.get(addr);
        let failures = earlier.map_or(1, |f| f.failures.saturating_add(1));
        // An ejection still running keeps its worst cause (and a probe's time).
        let cause = match earlier.filter(|f| now < f.until) {
            Some(f) if f.cause.severity() >= cause.severity() => f.cause,
            _ => cause,
        };
        let until = now + self.backoff(failures);
        failing.insert(addr.to_owned(), Failing { failures, until, cause });
        tracing::debug!(member = addr, failures, ?cause, "backend member ejected");
    }

    /// Ejection after `failures` consecutive failures: `base * 2^(failures-1)`, capped at `max`.
    fn backoff(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.base.saturating_mul(1u32 << doublings).min(self.max)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Failing>> {
        // Every critical section leaves the map consistent (whole-entry inserts and removes), so
        // a panic while holding the lock cannot corrupt it.
        self.failing.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_requesters_failed_handshakes_never_eject_a_member_two_requesters_do() {
        let h = PassiveHealth::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..10 {
            h.record_refusal("a:1", 7, true);
        }
        assert!(!h.is_ejected("a:1"), "one requester's own failures");
        h.record_refusal("a:1", 8, true);
        assert!(h.is_ejected("a:1"), "a second requester's failure ejects a member that serves no one");
    }

    /// A newcomer (a requester none of the members served) must not be refused every member
    /// by two accounts' failed handshakes; nor be sent, one after another, to wait on a member
    /// that lets handshakes time out (the reverted first cut of this rule made such members a
    /// sink): that one takes one newcomer per `spacing`.
    #[test]
    fn members_ejected_for_failed_handshakes_are_the_last_resort_one_at_a_time_if_they_timed_out() {
        let h = PassiveHealth::new(Duration::from_secs(10), Duration::from_secs(30));
        let spacing = Duration::from_secs(1);
        let t0 = Instant::now();
        let members = pool();
        let addrs = |v: Vec<&Member>| v.into_iter().map(|m| m.addr.clone()).collect::<Vec<_>>();
        assert!(h.last_resort_at(&members, spacing, Some(9), t0).is_empty(), "none ejected");
        // Two accounts fail on a:1 (answered) and b:1 (one of them timed out); c:1 refuses
        // connections.
        for (m, answered) in [("a:1", true), ("b:1", false)] {
            h.record_refusal_at(m, 7, true, t0);
            h.record_refusal_at(m, 8, answered, t0);
        }
        h.record_failure_at("c:1", t0);
        assert!(h.healthy_at(&members, Some(9), t0).is_empty());
        // The accounts whose handshakes ejected b:1 cannot take its probe, however often they ask.
        for account in [7, 8] {
            assert_eq!(addrs(h.last_resort_at(&members, spacing, Some(account), t0)), ["a:1"], "account {account}");
        }
        assert_eq!(
            addrs(h.last_resort_at(&members, spacing, Some(9), t0)),
            ["a:1", "b:1"],
            "the first newcomer tries both"
        );
        let soon = t0 + Duration::from_millis(100);
        assert_eq!(
            addrs(h.last_resort_at(&members, spacing, Some(9), soon)),
            ["a:1"],
            "the next, within spacing, not b:1"
        );
        assert_eq!(
            addrs(h.last_resort_at(&members, spacing, Some(9), t0 + spacing)),
            ["a:1", "b:1"],
            "one per spacing"
        );
        // A probe that times out holds the next one off for `spacing`; one the member answers
        // (with an error) ends at once, and the next requester has the next probe. The timeout
        // keeps its mark while the ejection runs: the probe stays one at a time.
        let later = t0 + Duration::from_millis(1500);
        assert_eq!(addrs(h.last_resort_at(&members, spacing, Some(10), later)), ["a:1"], "b:1 was probed 500 ms ago");
        h.record_refusal_at("b:1", 9, true, later);
        assert_eq!(addrs(h.last_resort_at(&members, spacing, Some(10), later)), ["a:1", "b:1"], "the probe answered");
        assert_eq!(addrs(h.last_resort_at(&members, spacing, Some(11), later)), ["a:1"], "one at a time still");
        // A failed connect takes one out of the last resort.
        h.record_failure_at("a:1", later);
        assert!(h.last_resort_at(&members, spacing, Some(9), later).is_empty());
        // Once the ejections end, the members are usable again, and no longer a last resort.
        let much_later = later + Duration::from_secs(60);
        assert!(h.last_resort_at(&members, spacing, Some(9), much_later).is_empty());
        assert_eq!(h.healthy_at(&members, Some(9), much_later).len(), 3);
    }

    #[test]
    fn no_number_of_requesters_ejects_a_member_that_serves_others() {
        let h = PassiveHealth::new(Duration::from_secs(1), Duration::from_secs(30));
        let t0 = Instant::now();
        h.record_handshake_at("a:1", 1, t0);
        // Three accounts, as fast as they like, for as long as a user's handshake completed
        // within SERVING before each of theirs.
        for n in 0..3000u64 {
            let at = t0 + Duration::from_millis(n * 10);
            if n % 300 == 0 {
                h.record_handshake_at("a:1", 1, at);
            }
            h.record_refusal_at("a:1", 7 + n % 3, true, at);
            assert!(!h.is_ejected_at("a:1", at), "after {n} failures");
        }
        // The user stops: SERVING after their last handshake, the next failures eject.
        let quiet = t0 + Duration::from_millis(2700 * 10) + SERVING;
        h.record_refusal_at("a:1", 7, true, quiet);
        h.record_refusal_at("a:1", 8, true, quiet);
        assert!(h.is_ejected_at("a:1", quiet));
    }

    #[test]
    fn a_member_ejected_for_others_failures_stays_with_the_users_it_served() {
        let h = PassiveHealth::new(Duration::from_secs(1), Duration::from_secs(30));
        let t0 = Instant::now();
        let members = pool();
        let addrs = |v: Vec<&Member>| v.into_iter().map(|m| m.addr.clone()).collect::<Vec<_>>();
        // Alice (requester 1) used a:1 a minute ago; two accounts fail on it while she is away.
        h.record_handshake_at("a:1", 1, t0);
        let later = t0 + Duration::from_secs(60);
        h.record_refusal_at("a:1", 7, true, later);
        h.record_refusal_at("a:1", 8, true, later);
        assert!(h.is_ejected_at("a:1", later));
        assert_eq!(addrs(h.healthy_at(&members, Some(1), later)), ["a:1", "b:1", "c:1"], "alice keeps it");
        assert_eq!(addrs(h.healthy_at(&members, Some(9), later)), ["b:1", "c:1"], "a newcomer does not");
        assert_eq!(addrs(h.healthy_at(&members, None, later)), ["b:1", "c:1"]);
        // Her handshake completes there: it serves again, for everyone.
        h.record_handshake_at("a:1", 1, later);
        assert_eq!(h.healthy_at(&members, Some(9), later).len(), 3);
        // A failed connect takes it from her too.
        h.record_failure_at("a:1", later);
        assert_eq!(addrs(h.healthy_at(&members, Some(1), later)), ["b:1", "c:1"]);
        // And long after her last session, she is a newcomer.
        let much_later = later + SERVED_RECENTLY;
        h.record_refusal_at("c:1", 7, true, much_later);
        h.record_refusal_at("c:1", 8, true, much_later);
        assert!(!addrs(h.healthy_at(&members, Some(1), much_later)).contains(&"c:1".to_owned()));
    }

    #[test]
    fn plain_answers_and_active_checks_do_not_keep_a_member_that_fails_handshakes() {
        let h = PassiveHealth::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..100 {
            h.record_success("a:1");
        }
        h.record_refusal("a:1", 1, true);
        h.record_refusal("a:1", 2, true);
        assert!(h.is_ejected("a:1"));
    }

    #[test]
    fn the_handshake_table_forgets_members_that_left_and_stays_bounded() {
        let h = PassiveHealth::new(Duration::from_secs(1), Duration::from_secs(30));
        let t0 = Instant::now();
        for n in 0..64 {
            h.record_refusal_at(&format!("m{n}:1"), 1, true, t0);
        }
        h.record_handshake_at("new:1", 1, t0 + Duration::from_secs(31));
        assert_eq!(h.handshakes.lock().expect("lock").0.len(), 1, "the 64 quiet members swept");
        for n in 0..(MEMBERS_KEPT + 10) {
            h.record_refusal_at(&format!("x{n}:1"), 1, true, t0 + Duration::from_secs(31));
        }
        assert_eq!(h.handshakes.lock().expect("lock").0.len(), MEMBERS_KEPT);
    }

    const MS: Duration = Duration::from_millis(1);

    fn pool() -> Vec<Member> {
        ["a:1", "b:1", "c:1"].iter().map(|a| Member { addr: (*a).into(), weight: 1 }).collect()
    }

    #[test]
    fn a_failure_ejects_the_member_for_base() {
        let h = PassiveHealth::new(100 * MS, 1000 * MS);
        let t0 = Instant::now();
        h.record_failure_at("b:1", t0);
        assert!(h.is_ejected_at("b:1", t0 + 99 * MS));
        assert!(!h.is_ejected_at("b:1", t0 + 100 * MS));
        assert!(!h.is_ejected_at("a:1", t0));
        let members = pool();
        let healthy: Vec<&str> = h.healthy_at(&members, None, t0 + 50 * MS).iter().map(|m| m.addr.as_str()).collect();
        assert_eq!(healthy, ["a:1", "c:1"]);
        assert_eq!(h.healthy_at(&members, None, t0 + 100 * MS).len(), 3);
    }

    #[test]
    fn repeated_failures_double_the_ejection_up_to_max() {
        let h = PassiveHealth::new(100 * MS, 500 * MS);
        let mut t = Instant::now();
        for expected in [100, 200, 400, 500, 500] {
            h.record_failure_at("a:1", t);
            assert!(h.is_ejected_at("a:1", t + (expected - 1) * MS), "ejection shorter than {expected} ms");
            assert!(!h.is_ejected_at("a:1", t + expected * MS), "ejection longer than {expected} ms");
            t += expected * MS;
        }
    }

    #[test]
    fn a_success_forgives_failures() {
        let h = PassiveHealth::new(100 * MS, 1000 * MS);
        let t0 = Instant::now();
        h.record_failure_at("a:1", t0);
        h.record_failure_at("a:1", t0);
        h.record_success("a:1");
        assert!(!h.is_ejected_at("a:1", t0));
        h.record_failure_at("a:1", t0);
        assert!(!h.is_ejected_at("a:1", t0 + 100 * MS), "backoff restarted from base");
    }

    #[test]
    fn quiet_members_start_again_from_base_and_are_forgotten() {
        let h = PassiveHealth::new(100 * MS, 400 * MS);
        let t0 = Instant::now();
        h.record_failure_at("a:1", t0);
        h.record_failure_at("b:1", t0);
        // a:1 ejection ended at 100 ms; quiet for max (400 ms) after that.
        let later = t0 + 600 * MS;
        h.record_failure_at("a:1", later);
        assert!(!h.is_ejected_at("a:1", later + 100 * MS), "backoff restarted from base");
        assert!(!h.lock().contains_key("b:1"), "quiet member forgotten");
    }

    #[test]
    fn real_clock_ejection_expires() {
        let h = PassiveHealth::new(20 * MS, 20 * MS);
        h.record_failure("a:1");
        assert!(h.is_ejected("a:1") || h.lock()["a:1"].until <= Instant::now());
        std::thread::sleep(25 * MS);
        assert!(!h.is_ejected("a:1"));
        assert_eq!(h.ejected_count(&pool()), 0);
    }
}
