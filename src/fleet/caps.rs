//! Exact subject caps over the fleet (`[fleet] subject_caps = "reserved"`): Teleport's
//! semaphore, on Redis.
//!
//! Each cap key (a subject over every route, or on one route) is a sorted set,
//! `{prefix}:cap:{digest}`, whose members are the places taken, each scored by when its lease
//! lapses (the store's clock, `TIME`, so the instances' clocks do not matter). Taking places is
//! one script: it first removes the places this process gave back since its last write (so a
//! client that closes and reconnects at its cap finds its place free, as the instance's own
//! count does), drops the lapsed leases of every key the session counts under, and adds the
//! session to all of them or, when one is full, to none. The places a process holds are
//! renewed every [`HEARTBEAT`] for [`TTL`] by this module's task, written again when the store
//! lost them, and given back as soon as their session ends: a process that dies leaves its
//! places to lapse within [`TTL`], as its directory entries do.
//!
//! A session admitted while the store could not be asked (`staleness = "best_effort"`) holds a
//! place that the next renewal writes once the store answers: it counts from then on.
//!
//! The digest names the key, so that the store's key names carry no subject.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;

use super::directory::{HEARTBEAT, TTL};
use super::redis::timed;
use super::{now_ms, StoreError};
use crate::limits::SubjectKey;

/// Takes a place under every cap key or none. KEYS\[1..n\] are the cap keys, ARGV\[3 + i\] the
/// cap of KEYS\[i\]; KEYS\[n + 1..\] are places given back, ARGV\[3 + i\] the member to remove
/// from KEYS\[i\]. ARGV\[1\] is the lease (ms), ARGV\[2\] the new member, ARGV\[3\] `n`. Answers
/// `0`, or the 1-based index of the first full key.
const TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1e3 + math.floor(tonumber(t[2]) / 1e3)
local n = tonumber(ARGV[3])
for i = n + 1, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[3 + i])
end
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  if redis.call('ZCARD', KEYS[i]) >= tonumber(ARGV[3 + i]) then return i end
end
for i = 1, n do
  redis.call('ZADD', KEYS[i], now + tonumber(ARGV[1]), ARGV[2])
  redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[1]))
end
return 0
";

/// Renews the leases of the places held (KEYS\[i\] holds ARGV\[i + 1\]); one the store lost is
/// written again, as its session is still there.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1e3 + math.floor(tonumber(t[2]) / 1e3)
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + tonumber(ARGV[1]), ARGV[i + 1])
  redis.call('PEXPIRE', key, tonumber(ARGV[1]))
end
return #KEYS
";

/// How long the keeper gathers places given back before it writes them.
const GATHER: Duration = Duration::from_millis(10);

/// How long a handshake waits for its places before the store counts as slow.
const TAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// What the handshakes and the keeper task share.
#[derive(Default)]
struct Book {
    /// The places held, by member: their keys. Renewed every beat.
    held: Mutex<HashMap<String, Vec<String>>>,
    /// Places given back (or perhaps taken by a take nobody waits for any more) that the keeper
    /// has not removed from the store yet. A take removes them too, first: the keeper's removal
    /// comes after any renewal in flight, which could otherwise write one back.
    released: Mutex<Vec<(String, Vec<String>)>>,
    /// Wakes the keeper to give places back.
    wake: tokio::sync::Notify,
    /// Until when (Unix ms) the store counts as slow: a take that timed out makes the next
    /// handshakes fall back at once rather than each wait.
    slow_until_ms: AtomicU64,
    /// The process is done with its places: the keeper ends.
    closed: AtomicBool,
}

impl Book {
    fn held(&self) -> MutexGuard<'_, HashMap<String, Vec<String>>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn released(&self) -> MutexGuard<'_, Vec<(String, Vec<String>)>> {
        self.released.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The places of one process: how they are named, taken and given back.
pub struct Places {
    client: Client,
    tag: String,
    /// Unique to this process (an instance's name may repeat across restarts).
    member_prefix: String,
    next: AtomicU64,
    take: Script,
    book: Arc<Book>,
}

impl Drop for Places {
    fn drop(&mut self) {
        self.book.closed.store(true, Ordering::Release);
        self.book.wake.notify_one();
    }
}

/// Why no place was taken.
#[derive(Debug)]
pub enum TakeError {
    /// A cap is reached.
    Full,
    /// The store did not answer (in time), or failed.
    Store(StoreError),
}

impl Places {
    /// The places of `instance` on `client`, under the keys' hash tag `tag`; starts the task that
    /// renews and gives them back.
    pub fn new(client: Client, tag: &str, instance: &str) -> Places {
        let book = Arc::new(Book::default());
        tokio::spawn(keep(client.clone(), book.clone()));
        Places {
            client,
            tag: tag.to_owned(),
            member_prefix: format!("{instance}/{:016x}/", rand::random::<u64>()),
            next: AtomicU64::new(1),
            take: Script::from_lua(TAKE),
            book,
        }
    }

    /// The set of `key`'s places.
    fn set(&self, key: &SubjectKey) -> String {
        use sha2::Digest as _;
        let named = serde_json::json!([key.route, key.issuer, key.subject]).to_string();
        let digest = sha2::Sha256::digest(named.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("{}:cap:{hex}", self.tag)
    }

    /// A new place under `caps`' keys, not in the store yet.
    fn reservation(&self, caps: &[(SubjectKey, u32)]) -> Reservation {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Reservation {
            member: format!("{}{n}", self.member_prefix),
            sets: caps.iter().map(|(k, _)| self.set(k)).collect(),
            state: State::Asking,
            book: self.book.clone(),
        }
    }

    /// Takes a place under each of `caps` (a key and its cap) or none.
    pub async fn take(&self, caps: &[(SubjectKey, u32)]) -> Result<Reservation, TakeError> {
        if self.book.slow_until_ms.load(Ordering::Acquire) > now_ms() {
            return Err(TakeError::Store(StoreError::Redis("slow: a take timed out lately".into())));
        }
        // Made before the script runs: if this future is dropped while it waits (the client
        // left), or the answer comes too late, the place the script may have taken is given back.
        let mut reservation = self.reservation(caps);
        // A bounded number: after an outage the keeper gives back the rest.
        let released: Vec<(String, Vec<String>)> = self.book.released().iter().take(64).cloned().collect();
        let mut keys = reservation.sets.clone();
        let mut args = vec![TTL.as_millis().to_string(), reservation.member.clone(), caps.len().to_string()];
        args.extend(caps.iter().map(|(_, max)| max.to_string()));
        for (member, sets) in &released {
            for set in sets {
                keys.push(set.clone());
                args.push(member.clone());
            }
        }
        let run = self.take.evalsha_with_reload::<i64, _, _>(&self.client, keys, args);
        let answer = match tokio::time::timeout(TAKE_TIMEOUT, run).await {
            Ok(answer) => answer.map_err(|e| StoreError::Redis(e.to_string())),
            Err(_) => {
                self.book.slow_until_ms.store(now_ms() + HEARTBEAT.as_millis() as u64, Ordering::Release);
                Err(StoreError::Redis(format!("no answer within {TAKE_TIMEOUT:?}")))
            }
        };
        let full = match answer {
            Ok(full) => full,
            // Whether the script ran is not known: the place it may have taken is given back
            // when `reservation` drops.
            Err(e) => return Err(TakeError::Store(e)),
        };
        if full > 0 {
            reservation.state = State::Refused;
            return Err(TakeError::Full);
        }
        self.book.held().insert(reservation.member.clone(), reservation.sets.clone());
        reservation.state = State::Held;
        Ok(reservation)
    }

    /// The process stops: every place it holds, and every one given back and not yet removed,
    /// is removed from the store now (waiting up to the command deadline), and the keeper ends.
    pub async fn give_back_all(&self) {
        self.book.closed.store(true, Ordering::Release);
        self.book.wake.notify_one();
        let held: Vec<(String, Vec<String>)> = self.book.held().drain().collect();
        let mut all = std::mem::take(&mut *self.book.released());
        all.extend(held);
        if let Err(e) = timed(give_back(&self.client, &all)).await {
            tracing::debug!(error = %e, "fleet cap places not given back at the stop: they lapse with their lease");
        }
    }

    /// A place for a session admitted while the store could not be asked: the next renewal that
    /// reaches the store writes it, whatever the cap, and it counts from then on.
    pub fn unplaced(&self, caps: &[(SubjectKey, u32)]) -> Reservation {
        let mut reservation = self.reservation(caps);
        self.book.held().insert(reservation.member.clone(), reservation.sets.clone());
        reservation.state = State::Held;
        reservation
    }
}

/// Where a reservation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Its take was sent; whether it ran is not known.
    Asking,
    /// The store refused it: it holds nothing.
    Refused,
    /// Held (and renewed).
    Held,
}

/// A session's places under its subject's caps in the store: given back when dropped.
pub struct Reservation {
    member: String,
    sets: Vec<String>,
    state: State,
    book: Arc<Book>,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation").field("member", &self.member).field("state", &self.state).finish()
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.state == State::Refused {
            return;
        }
        if self.state == State::Held {
            self.book.held().remove(&self.member);
        }
        let given = (std::mem::take(&mut self.member), std::mem::take(&mut self.sets));
        self.book.released().push(given);
        self.book.wake.notify_one();
    }
}

/// Removes `places` (members and their keys) from the store, in one pipeline.
async fn give_back(client: &Client, places: &[(String, Vec<String>)]) -> Result<(), Error> {
    let p = client.pipeline();
    for (member, sets) in places {
        for set in sets {
            p.zrem::<(), _, _>(set, member.as_str()).await?;
        }
    }
    p.all::<Value>().await.map(drop)
}

/// The keeper: gives places back within [`GATHER`] of their release (a take of this process
/// gives them back first if it comes sooner), and renews the places held every heartbeat. A place whose release
/// could not be written is tried again at the next beat, and lapses with its lease meanwhile
/// at the latest.
async fn keep(client: Client, book: Arc<Book>) {
    let renew = Script::from_lua(RENEW);
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !book.closed.load(Ordering::Acquire) {
        let renewing = tokio::select! {
            () = book.wake.notified() => {
                // Gathered for a moment: one pipeline for the sessions that end together. A
                // client reconnecting here meanwhile has its place freed by its own take.
                tokio::time::sleep(GATHER).await;
                false
            }
            _ = beat.tick() => true,
        };
        if book.closed.load(Ordering::Acquire) {
            return;
        }
        let released = std::mem::take(&mut *book.released());
        if !released.is_empty() {
            if let Err(e) = timed(give_back(&client, &released)).await {
                tracing::debug!(error = %e, "fleet cap places not given back yet: tried again at the next beat");
                book.released().extend(released);
            }
        }
        if !renewing {
            continue;
        }
        let held: Vec<(String, String)> = book
            .held()
            .iter()
            .flat_map(|(member, sets)| sets.iter().map(move |set| (set.clone(), member.clone())))
            .collect();
        // In scripts of a bounded size: the store runs each whole before anything else.
        for chunk in held.chunks(1024) {
            // A stop gave everything back meanwhile: nothing is written again.
            if book.closed.load(Ordering::Acquire) {
                return;
            }
            let sets: Vec<String> = chunk.iter().map(|(set, _)| set.clone()).collect();
            let mut args = vec![TTL.as_millis().to_string()];
            args.extend(chunk.iter().map(|(_, member)| member.clone()));
            if let Err(e) = timed(renew.evalsha_with_reload::<i64, _, _>(&client, sets, args)).await {
                tracing::debug!(error = %e, "fleet cap places not renewed: they lapse unless the next beat renews them");
                break;
            }
        }
    }
}
