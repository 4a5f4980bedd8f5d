//! Passive health: members that fail to connect, or that fail handshakes for two different
//! requesters as often as they complete them, are skipped for a while.
//!
//! The first failure ejects a member for `base`; each further failure before a success doubles
//! the ejection (`base * 2^(failures-1)`), capped at `max`. A success forgives everything. A
//! member that has been quiet for `max` after its ejection ended starts again from `base`, and
//! such entries are dropped, so the table only holds members that failed recently.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::sticky::Member;

/// How fast a member's record of handshakes forgets: a handshake counts half as much this long
/// after it. Envoy's failure-percentage detection looks at the last 10 s; this is a sliding
/// version of it, with no window start that a burst could be timed to.
const HALF_LIFE: Duration = Duration::from_secs(5);

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
}

/// A member's recent handshakes (and plain requests): completed and failed, each counting
/// less as it ages ([`HALF_LIFE`]), and the last two requesters that had one fail.
#[derive(Debug, Clone, Copy)]
struct Handshakes {
    ok: f64,
    failed: f64,
    /// When the counts were last brought up to date.
    at: Instant,
    /// The last requester whose handshake failed, and the one before it that was different;
    /// each with when.
    failed_for: [Option<(u64, Instant)>; 2],
}

impl Handshakes {
    fn new(now: Instant) -> Self {
        Handshakes { ok: 0.0, failed: 0.0, at: now, failed_for: [None, None] }
    }

    /// Ages the counts to `now`.
    fn decay(&mut self, now: Instant) {
        let halves = now.saturating_duration_since(self.at).as_secs_f64() / HALF_LIFE.as_secs_f64();
        let keep = 0.5f64.powf(halves);
        self.ok *= keep;
        self.failed *= keep;
        self.at = now;
    }

    /// Forgotten: its counts have aged to nothing and no failure is recent.
    fn forgotten(&self, now: Instant, max: Duration) -> bool {
        now.saturating_duration_since(self.at) > (HALF_LIFE * 8).max(max)
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
    /// one requester's failures never eject it. A member is ejected (as for a failed connect)
    /// once handshakes of two different requesters failed on it within `max`, and its recent
    /// handshakes failed at least as often as they completed (Envoy's failure-percentage
    /// detection at 50 %). A member that fails every handshake is out after the second
    /// requester's; a user whose own agent a shared member cannot serve takes it away from no
    /// one; and two accounts failing together can take away only a member that serves no one
    /// else as often as they fail on it.
    pub(crate) fn record_refusal(&self, addr: &str, requester: u64) {
        let now = Instant::now();
        let eject = {
            let mut table = self.handshakes.lock().unwrap_or_else(|p| p.into_inner());
            let (by_addr, _) = &mut *table;
            let h = by_addr.entry(addr.to_owned()).or_insert_with(|| Handshakes::new(now));
            h.decay(now);
            h.failed += 1.0;
            match h.failed_for[0] {
                Some((last, _)) if last == requester => h.failed_for[0] = Some((requester, now)),
                earlier => h.failed_for = [Some((requester, now)), earlier],
            }
            let two = h.failed_for[1].is_some_and(|(_, at)| now.saturating_duration_since(at) < self.max);
            two && h.failed >= h.ok
        };
        if eject {
            self.record_failure_at(addr, now);
        }
    }

    /// Records a successful connect and handshake (or a plain request's answer) of `addr`,
    /// forgiving its connect failures.
    pub fn record_success(&self, addr: &str) {
        self.lock().remove(addr);
        let now = Instant::now();
        let mut table = self.handshakes.lock().unwrap_or_else(|p| p.into_inner());
        let (by_addr, sweep_at) = &mut *table;
        match by_addr.get_mut(addr) {
            Some(h) => {
                h.decay(now);
                h.ok += 1.0;
            }
            None => {
                // Swept when it has doubled since the last sweep: members that left (a
                // registry's, a reloaded route's) do not stay for ever.
                if by_addr.len() >= *sweep_at {
                    let max = self.max;
                    by_addr.retain(|_, h| !h.forgotten(now, max));
                    *sweep_at = (by_addr.len() * 2).max(64);
                }
                by_addr.insert(addr.to_owned(), Handshakes { ok: 1.0, ..Handshakes::new(now) });
            }
        }
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
        assert!(h.is_ejected("a:1"), "a second requester's failure ejects a member that serves no one");
    }

    #[test]
    fn two_requesters_cannot_eject_a_member_that_serves_others_more_often_than_they_fail_on_it() {
        let h = PassiveHealth::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..10 {
            h.record_success("a:1");
        }
        // Two accounts, alternating, each failing on its own agent.
        for n in 0..9 {
            h.record_refusal("a:1", 7 + n % 2);
            assert!(!h.is_ejected("a:1"), "after {} failures against 10 answers", n + 1);
        }
        h.record_refusal("a:1", 8);
        assert!(h.is_ejected("a:1"), "as many failures as answers: half its handshakes fail");
    }

    #[test]
    fn a_member_that_stops_answering_is_ejected_once_its_failures_outweigh_its_fading_answers() {
        let h = PassiveHealth::new(Duration::from_secs(1), Duration::from_secs(30));
        let t0 = Instant::now();
        let mut hs = Handshakes { ok: 100.0, ..Handshakes::new(t0) };
        // Ten seconds (two half-lives) later, its 100 answers count 25: 25 failures eject it.
        hs.decay(t0 + 2 * HALF_LIFE);
        assert!((hs.ok - 25.0).abs() < 1e-6, "{}", hs.ok);
        h.handshakes.lock().expect("lock").0.insert("a:1".into(), Handshakes { at: Instant::now(), ..hs });
        for n in 0..24 {
            h.record_refusal("a:1", n % 3);
        }
        assert!(!h.is_ejected("a:1"));
        h.record_refusal("a:1", 1);
        assert!(h.is_ejected("a:1"));
    }

    #[test]
    fn the_handshake_table_forgets_members_that_left() {
        let h = PassiveHealth::new(Duration::from_secs(1), Duration::from_secs(30));
        for n in 0..64 {
            h.record_success(&format!("m{n}:1"));
        }
        let old = Instant::now().checked_sub(HALF_LIFE * 9).expect("up for 45 s");
        for v in h.handshakes.lock().expect("lock").0.values_mut() {
            v.at = old.min(v.at);
        }
        h.record_success("new:1");
        assert_eq!(h.handshakes.lock().expect("lock").0.len(), 1, "the 64 quiet members swept");
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
