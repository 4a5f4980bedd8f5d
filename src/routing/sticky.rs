//! Member choice: weighted rendezvous hashing for sticky keys, round robin, least connections.
//!
//! Rendezvous (highest-random-weight) hashing scores every member against the key and picks the
//! highest score. The score depends only on the key, the member's address and its weight, so:
//! - every proxy instance with the same member set picks the same member for a key;
//! - removing a member moves only the keys that were on it (the others keep their maximum);
//! - adding a member takes about `1/n` of the keys, from every member alike.
//!
//! Weights use the logarithmic method (`score = -weight / ln(u)`, `u` uniform in (0, 1) from the
//! hash), which gives each member a share of keys proportional to its weight. The hash is xxh3,
//! whose output is specified and stable across builds, Rust versions and platforms; std's
//! `DefaultHasher` is not.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use xxhash_rust::xxh3::xxh3_64;

/// Byte placed between the key and the member address in the hashed input, so that
/// `("ab", "c")` and `("a", "bc")` hash differently (0xFF never occurs in UTF-8 addresses).
const SEPARATOR: u8 = 0xFF;

/// One backend member of a pool: an address and its share of new sessions.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Member {
    /// Where to connect, `host:port`.
    pub addr: String,
    /// Relative share of sessions; 0 means "take no new sessions" (draining).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// The members with a non-zero weight, best first for `key`: the first is the sticky choice, the
/// rest are the order to fall back in when connecting fails.
///
/// Members with weight 0 are left out, so a retry never lands on a draining member. Equal scores
/// (practically impossible) are ordered by address, so the order is fully deterministic.
pub fn rank<'m>(key: &[u8], members: &'m [Member]) -> Vec<&'m Member> {
    let mut buf = Vec::with_capacity(key.len() + 1 + 64);
    let mut scored: Vec<(f64, &'m Member)> = members
        .iter()
        .filter(|m| m.weight > 0)
        .map(|m| {
            buf.clear();
            buf.extend_from_slice(key);
            buf.push(SEPARATOR);
            buf.extend_from_slice(m.addr.as_bytes());
            (score(xxh3_64(&buf), m.weight), m)
        })
        .collect();
    scored.sort_by(|(sa, a), (sb, b)| sb.total_cmp(sa).then_with(|| a.addr.cmp(&b.addr)));
    scored.into_iter().map(|(_, m)| m).collect()
}

/// Weighted rendezvous score of a member whose hash with the key is `h`.
fn score(h: u64, weight: u32) -> f64 {
    // u is in (0, 1]: never 0, so ln(u) is finite; it rounds to 1 only for the top ~2^10 of 2^64
    // hash values, where the score becomes -inf and the member ranks last among equals.
    let u = (h as f64 + 1.0) / (u64::MAX as f64 + 2.0);
    -(f64::from(weight)) / u.ln()
}

/// Round-robin position shared by every session on a pool.
#[derive(Debug, Default)]
pub struct RoundRobin {
    /// Sessions placed so far; only its value modulo the pool size matters.
    next: AtomicUsize,
}

impl RoundRobin {
    /// A counter starting at the first member.
    pub fn new() -> Self {
        Self::default()
    }

    /// The index (in `0..n`) of the member for the next session; 0 when `n` is 0.
    pub fn next(&self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        self.next.fetch_add(1, Ordering::Relaxed) % n
    }
}

/// Live session counts per member address, for least-connections choice.
///
/// Shared as an `Arc` by every session of a pool (or of the whole proxy: addresses are the keys).
/// An address whose count drops to 0 is removed, so the map holds only members in use.
#[derive(Debug, Default)]
pub struct ConnCounts {
    /// Active sessions by member address.
    active: Mutex<HashMap<String, usize>>,
}

impl ConnCounts {
    /// Empty counts.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts one more session on `addr` until the returned guard is dropped.
    pub fn acquire(self: &Arc<Self>, addr: &str) -> ConnGuard {
        *self.lock().entry(addr.to_owned()).or_insert(0) += 1;
        ConnGuard { counts: Arc::clone(self), addr: addr.to_owned(), _slot: None }
    }

    /// Sessions active on `addr` now.
    pub fn active(&self, addr: &str) -> usize {
        self.lock().get(addr).copied().unwrap_or(0)
    }

    /// Members ordered by active sessions per unit of weight, fewest first; among equals the
    /// heavier, then the earlier in `members`. Members with weight 0 are left out. This is the
    /// least-connections policy: the first is tried first, the rest are its fallbacks.
    pub fn by_load<'m>(&self, members: &'m [Member]) -> Vec<&'m Member> {
        let active = self.lock();
        let mut loaded: Vec<(usize, &'m Member)> =
            members.iter().filter(|m| m.weight > 0).map(|m| (active.get(&m.addr).copied().unwrap_or(0), m)).collect();
        drop(active);
        // n / w < bn / bw  <=>  n * bw < bn * w; u128 cannot overflow (usize * u32). The sort is
        // stable, so equals keep their order in `members`.
        loaded.sort_by(|(n, a), (bn, b)| {
            let lhs = *n as u128 * u128::from(b.weight);
            let rhs = *bn as u128 * u128::from(a.weight);
            lhs.cmp(&rhs).then_with(|| b.weight.cmp(&a.weight))
        });
        loaded.into_iter().map(|(_, m)| m).collect()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, usize>> {
        // The map is left consistent by every critical section (single increments and
        // decrements), so a panic elsewhere while holding the lock cannot corrupt it.
        self.active.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One counted session on a member, with its connection's place in the process's descriptor
/// budget when it has one; dropping it gives both back.
#[derive(Debug)]
pub struct ConnGuard {
    counts: Arc<ConnCounts>,
    addr: String,
    _slot: Option<crate::limits::OutboundSlot>,
}

impl ConnGuard {
    /// The member address this session is counted on.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The guard, holding the member connection's `place` as long as itself.
    pub fn holding(mut self, place: crate::limits::OutboundSlot) -> ConnGuard {
        self._slot = Some(place);
        self
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut active = self.counts.lock();
        if let Some(n) = active.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                active.remove(&self.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<Member> {
        (0..n).map(|i| Member { addr: format!("10.0.0.{}:7681", i + 1), weight: 1 }).collect()
    }

    fn key(i: usize) -> Vec<u8> {
        format!("agent-{i}").into_bytes()
    }

    #[test]
    fn choice_is_stable_across_builds_and_platforms() {
        // Computed once and hard-coded: if these change, instances running different builds
        // would send the same key to different members.
        let pool = members(5);
        let expected = [EXPECTED_0, EXPECTED_1, EXPECTED_2, EXPECTED_3, EXPECTED_4];
        for (i, want) in expected.iter().enumerate() {
            let got = rank(&key(i), &pool).first().copied().map(|m| m.addr.as_str());
            assert_eq!(got, Some(*want), "key {i}");
        }
        let order: Vec<&str> = rank(b"user-42", &pool).iter().map(|m| m.addr.as_str()).collect();
        assert_eq!(order, EXPECTED_RANK);
    }

    const EXPECTED_0: &str = "10.0.0.4:7681";
    const EXPECTED_1: &str = "10.0.0.2:7681";
    const EXPECTED_2: &str = "10.0.0.5:7681";
    const EXPECTED_3: &str = "10.0.0.3:7681";
    const EXPECTED_4: &str = "10.0.0.1:7681";
    const EXPECTED_RANK: [&str; 5] =
        ["10.0.0.2:7681", "10.0.0.5:7681", "10.0.0.3:7681", "10.0.0.4:7681", "10.0.0.1:7681"];

    #[test]
    fn hash_is_reference_xxh3() {
        // XXH3_64bits("") from the xxHash reference implementation.
        assert_eq!(xxh3_64(b""), 0x2D06_8005_38D3_94C2);
    }

    #[test]
    fn least_connections_orders_every_weighted_member_for_fallback() {
        let counts = ConnCounts::new();
        let pool = vec![
            Member { addr: "a:1".into(), weight: 1 },
            Member { addr: "b:1".into(), weight: 1 },
            Member { addr: "c:1".into(), weight: 0 },
            Member { addr: "d:1".into(), weight: 1 },
        ];
        let _a = [counts.acquire("a:1"), counts.acquire("a:1")];
        let _d = counts.acquire("d:1");
        let order: Vec<&str> = counts.by_load(&pool).iter().map(|m| m.addr.as_str()).collect();
        assert_eq!(order, ["b:1", "d:1", "a:1"], "fewest first, weight 0 left out");
    }

    #[test]
    fn rank_orders_every_weighted_member_once() {
        let pool = members(5);
        let mut order: Vec<&str> = rank(b"k", &pool).iter().map(|m| m.addr.as_str()).collect();
        order.sort();
        let mut all: Vec<&str> = pool.iter().map(|m| m.addr.as_str()).collect();
        all.sort();
        assert_eq!(order, all);
    }

    #[test]
    fn removing_one_of_five_members_moves_only_its_keys() {
        let pool = members(5);
        let removed = pool[3].addr.clone();
        let smaller: Vec<Member> = pool.iter().filter(|m| m.addr != removed).cloned().collect();
        let mut moved = 0;
        for i in 0..1000 {
            let before = &rank(&key(i), &pool).first().copied().expect("non-empty pool").addr;
            let after = &rank(&key(i), &smaller).first().copied().expect("non-empty pool").addr;
            if before == &removed {
                moved += 1;
            } else {
                assert_eq!(before, after, "key {i} moved although its member stayed");
            }
            // The fallback order is the choice after removal: retries agree with a smaller pool.
            if before == &removed {
                assert_eq!(&rank(&key(i), &pool)[1].addr, after);
            }
        }
        // About a fifth of the keys were on the removed member.
        assert!((120..=280).contains(&moved), "moved {moved}");
    }

    #[test]
    fn adding_a_member_moves_about_one_nth_of_keys_all_to_it() {
        let pool = members(4);
        let bigger = members(5);
        let added = &bigger[4].addr;
        let mut moved = 0;
        for i in 0..1000 {
            let before = &rank(&key(i), &pool).first().copied().expect("non-empty pool").addr;
            let after = &rank(&key(i), &bigger).first().copied().expect("non-empty pool").addr;
            if before != after {
                assert_eq!(after, added, "a key moved between old members");
                moved += 1;
            }
        }
        // Expected 1000 / 5 = 200.
        assert!((140..=260).contains(&moved), "moved {moved}");
    }

    #[test]
    fn weights_are_honoured() {
        let pool = vec![Member { addr: "a:1".into(), weight: 3 }, Member { addr: "b:1".into(), weight: 1 }];
        let heavy =
            (0..10_000).filter(|&i| rank(&key(i), &pool).first().copied().is_some_and(|m| m.addr == "a:1")).count();
        assert!((7000..=8000).contains(&heavy), "weight 3 of 4 got {heavy} of 10000");
    }

    #[test]
    fn weight_zero_is_never_chosen() {
        let mut pool = members(3);
        pool[1].weight = 0;
        for i in 0..2000 {
            assert_ne!(rank(&key(i), &pool).first().copied().map(|m| m.addr.as_str()), Some(pool[1].addr.as_str()));
            assert!(rank(&key(i), &pool).iter().all(|m| m.weight > 0));
        }
        let drained = vec![Member { addr: "a:1".into(), weight: 0 }];
        assert_eq!(rank(b"k", &drained).first().copied(), None);
        assert!(rank(b"k", &drained).is_empty());
        assert_eq!(rank(b"k", &[]).first().copied(), None);
    }

    #[test]
    fn member_weight_defaults_to_one() {
        let m: Member = serde_json::from_str(r#"{"addr":"10.1.2.3:7681"}"#).expect("valid json");
        assert_eq!(m, Member { addr: "10.1.2.3:7681".into(), weight: 1 });
    }

    #[test]
    fn round_robin_cycles_through_the_pool() {
        let rr = RoundRobin::new();
        let got: Vec<usize> = (0..7).map(|_| rr.next(3)).collect();
        assert_eq!(got, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(rr.next(0), 0);
    }

    #[test]
    fn least_connections_weighs_active_sessions() {
        let counts = ConnCounts::new();
        let pool = vec![
            Member { addr: "a:1".into(), weight: 1 },
            Member { addr: "b:1".into(), weight: 2 },
            Member { addr: "c:1".into(), weight: 0 },
        ];
        // Equal (zero) load: the heavier member first.
        assert_eq!(counts.by_load(&pool).first().map(|m| m.addr.as_str()), Some("b:1"));
        let b1 = counts.acquire("b:1");
        // a: 0/1, b: 1/2 -> a.
        assert_eq!(counts.by_load(&pool).first().map(|m| m.addr.as_str()), Some("a:1"));
        let a1 = counts.acquire("a:1");
        // a: 1/1, b: 1/2 -> b.
        assert_eq!(counts.by_load(&pool).first().map(|m| m.addr.as_str()), Some("b:1"));
        let b2 = counts.acquire("b:1");
        assert_eq!(counts.active("b:1"), 2);
        // a: 1/1, b: 2/2 -> tie, heavier b.
        assert_eq!(counts.by_load(&pool).first().map(|m| m.addr.as_str()), Some("b:1"));
        drop(a1);
        assert_eq!(counts.active("a:1"), 0);
        assert_eq!(counts.by_load(&pool).first().map(|m| m.addr.as_str()), Some("a:1"));
        drop((b1, b2));
        assert_eq!(counts.active("b:1"), 0);
        assert!(counts.lock().is_empty(), "idle members are forgotten");
        assert_eq!(counts.by_load(&pool[2..]).first(), None);
    }
}
