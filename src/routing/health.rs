//! Passive health: members that fail to connect, or fail the handshakes of two different
//! requesters, are skipped for a while.
//!
//! The first failure ejects a member for `base`; each further failure before a success doubles
//! the ejection (`base * 2^(failures-1)`), capped at `max`. A success forgives everything. A
//! member that has been quiet for `max` after its ejection ended starts again from `base`, and
//! such entries are dropped, so the table only holds members that failed recently.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::sticky::Member;

/// Connect-failure tracking for backend members, shared by every session (keyed by address).
#[derive(Debug)]
pub struct PassiveHealth {
    /// Ejection after the first failure.
    base: Duration,
    /// Longest ejection, however many failures.
    max: Duration,
    /// Members with failures not yet forgiven, by address.
    failing: Mutex<HashMap<String, Failing>>,
    /// Members that failed a handshake since their last success: for whose request (a hash of
    /// it), and when.
    refused: Mutex<HashMap<String, (u64, Instant)>>,
}

/// Failure state of one member.
#[derive(Debug, Clone, Copy)]
struct Failing {
    /// Consecutive failures without a success in between.
    failures: u32,
    /// End of the current ejection.
    until: Instant,
}

impl PassiveHealth {
    /// Tracking that ejects for `base` after one failure, growing to at most `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        PassiveHealth {
            base,
            max: max.max(base),
            failing: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
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
    /// for a request of `requester` (a hash of who asked: the token's issuer and subject, else the
    /// client's address). What a member does with a request may be the request's doing, so one requester's
    /// failures never eject it: a member is ejected (as for a failed connect) once handshakes
    /// of two different requesters failed on it with no success in between, within `max`. A
    /// member that fails every handshake is out after the second requester's; a user whose own
    /// agent a shared member cannot serve takes it away from no one.
    pub(crate) fn record_refusal(&self, addr: &str, requester: u64) {
        let now = Instant::now();
        let earlier = {
            let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
            let max = self.max;
            refused.retain(|_, (_, at)| now < *at + max);
            refused.insert(addr.to_owned(), (requester, now))
        };
        if earlier.is_some_and(|(by, _)| by != requester) {
            self.record_failure_at(addr, now);
        }
    }

    /// Records a successful connect to `addr`, forgiving its failures.
    pub fn record_success(&self, addr: &str) {
        self.lock().remove(addr);
        self.refused.lock().unwrap_or_else(|p| p.into_inner()).remove(addr);
    }

    /// The members of `members` not ejected now, in their order.
    pub fn healthy<'m>(&self, members: &'m [Member]) -> Vec<&'m Member> {
        self.healthy_at(members, Instant::now())
    }

    /// How many members of `members` are ejected now (for the `member_healthy` gauge and admin).
    pub fn ejected_count(&self, members: &[Member]) -> usize {
        members.len() - self.healthy(members).len()
    }

    fn is_ejected_at(&self, addr: &str, now: Instant) -> bool {
        self.lock().get(addr).is_some_and(|f| now < f.until)
    }

    fn healthy_at<'m>(&self, members: &'m [Member], now: Instant) -> Vec<&'m Member> {
        let failing = self.lock();
        if failing.is_empty() {
            return members.iter().collect();
        }
        members.iter().filter(|m| failing.get(&m.addr).is_none_or(|f| now >= f.until)).collect()
    }

    fn record_failure_at(&self, addr: &str, now: Instant) {
        let mut failing = self.lock();
        // Forget members that have been quiet for `max` since their ejection ended.
        let max = self.max;
        failing.retain(|_, f| now < f.until + max);
        let failures = failing.get(addr).map_or(1, |f| f.failures.saturating_add(1));
        let until = now + self.backoff(failures);
        failing.insert(addr.to_owned(), Failing { failures, until });
        tracing::debug!(member = addr, failures, "backend member ejected");
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
            h.record_refusal("a:1", 7);
        }
        assert!(!h.is_ejected("a:1"), "one requester's own failures");
        h.record_refusal("a:1", 8);
        assert!(h.is_ejected("a:1"), "a second requester's failure ejects");
        h.record_success("a:1");
        assert!(!h.is_ejected("a:1"));
        h.record_refusal("a:1", 8);
        assert!(!h.is_ejected("a:1"), "a success forgave the earlier requester");
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
        let healthy: Vec<&str> = h.healthy_at(&members, t0 + 50 * MS).iter().map(|m| m.addr.as_str()).collect();
        assert_eq!(healthy, ["a:1", "c:1"]);
        assert_eq!(h.healthy_at(&members, t0 + 100 * MS).len(), 3);
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
