//! Exact subject caps over the fleet (`[fleet] subject_caps = "reserved"`): Teleport's
//! semaphore, on Redis.
//!
//! Each cap key (a subject over every route, or on one route) is a sorted set,
//! `{prefix}:cap:{digest}`, whose members are the places taken, each scored by when its lease
//! lapses (the store's clock, `TIME`, so the instances' clocks do not matter). Taking places is
//! one script: it drops the lapsed leases of every key the session counts under, and adds the
//! session to all of them or, when one is full, to none. The places a process holds are
//! renewed every [`directory::HEARTBEAT`] for [`directory::TTL`] by this module's task, and
//! given back when their session ends: a process that dies leaves its places to lapse within
//! [`directory::TTL`], as its directory entries do.
//!
//! The digest names the key, so that the store's key names carry no subject.

use std::collections::HashMap;

use fred::prelude::*;
use fred::types::scripts::Script;
use tokio::sync::mpsc;

use super::directory::{HEARTBEAT, TTL};
use super::redis::timed;
use crate::limits::SubjectKey;

/// Takes a place under every key or none: `0`, or the 1-based index of the first full key.
const TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1e3 + math.floor(tonumber(t[2]) / 1e3)
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= tonumber(ARGV[i + 2]) then return i end
end
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + tonumber(ARGV[1]), ARGV[2])
  redis.call('PEXPIRE', key, tonumber(ARGV[1]))
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

/// What the keeper task is told.
enum Change {
    /// Places taken: renew them until released.
    Held { member: String, sets: Vec<String> },
    /// Their session ended: give them back.
    Released { member: String },
}

/// The places of one process: how they are named, taken and given back.
pub struct Places {
    client: Client,
    tag: String,
    /// Unique to this process (an instance's name may repeat across restarts).
    member_prefix: String,
    next: std::sync::atomic::AtomicU64,
    take: Script,
    keeper: mpsc::UnboundedSender<Change>,
}

/// Why no place was taken.
#[derive(Debug)]
pub enum TakeError {
    /// The cap of the key at this index (of those asked for) is reached.
    Full(usize),
    /// The store did not answer, or failed.
    Store(super::StoreError),
}

impl Places {
    /// The places of `instance` on `client`, under the keys' hash tag `tag`; starts the task that
    /// renews and gives them back.
    pub fn new(client: Client, tag: &str, instance: &str) -> Places {
        let (keeper, rx) = mpsc::unbounded_channel();
        tokio::spawn(keep(client.clone(), rx));
        Places {
            client,
            tag: tag.to_owned(),
            member_prefix: format!("{instance}/{:016x}/", rand::random::<u64>()),
            next: std::sync::atomic::AtomicU64::new(1),
            take: Script::from_lua(TAKE),
            keeper,
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

    /// Takes a place under each of `caps` (a key and its cap) or none.
    pub async fn take(&self, caps: &[(&SubjectKey, u32)]) -> Result<Reservation, TakeError> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let member = format!("{}{n}", self.member_prefix);
        let sets: Vec<String> = caps.iter().map(|(k, _)| self.set(k)).collect();
        let mut args = vec![TTL.as_millis().to_string(), member.clone()];
        args.extend(caps.iter().map(|(_, max)| max.to_string()));
        let run = self.take.evalsha_with_reload::<i64, _, _>(&self.client, sets.clone(), args);
        let full = timed(run).await.map_err(TakeError::Store)?;
        if full > 0 {
            return Err(TakeError::Full(full as usize - 1));
        }
        let _ = self.keeper.send(Change::Held { member: member.clone(), sets });
        Ok(Reservation { member, keeper: self.keeper.clone() })
    }
}

/// A session's places under its subject's caps in the store: given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    member: String,
    keeper: mpsc::UnboundedSender<Change>,
}

impl std::fmt::Debug for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Held { member, .. } => write!(f, "Held({member})"),
            Change::Released { member } => write!(f, "Released({member})"),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let _ = self.keeper.send(Change::Released { member: std::mem::take(&mut self.member) });
    }
}

/// The keeper: renews the places held every heartbeat and gives back those released (gathered
/// for [`super::directory::FLUSH`]). A place whose release could not be written lapses with its
/// lease.
async fn keep(client: Client, mut changes: mpsc::UnboundedReceiver<Change>) {
    let renew = Script::from_lua(RENEW);
    let mut held: HashMap<String, Vec<String>> = HashMap::new();
    let mut released: Vec<(String, Vec<String>)> = Vec::new();
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flush = tokio::time::interval(super::directory::FLUSH);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            change = changes.recv() => match change {
                None => break,
                Some(Change::Held { member, sets }) => {
                    held.insert(member, sets);
                }
                Some(Change::Released { member }) => {
                    if let Some(sets) = held.remove(&member) {
                        released.push((member, sets));
                    }
                }
            },
            _ = flush.tick(), if !released.is_empty() => {
                let batch = std::mem::take(&mut released);
                let give_back = async {
                    let p = client.pipeline();
                    for (member, sets) in &batch {
                        for set in sets {
                            p.zrem::<(), _, _>(set, member.as_str()).await?;
                        }
                    }
                    p.all::<Value>().await
                };
                if let Err(e) = timed(give_back).await {
                    tracing::debug!(error = %e, "fleet cap places not given back: they lapse with their lease");
                }
            }
            _ = beat.tick(), if !held.is_empty() => {
                let pairs: Vec<(&String, &String)> =
                    held.iter().flat_map(|(member, sets)| sets.iter().map(move |set| (set, member))).collect();
                // In scripts of a bounded size: the store runs each whole before anything else.
                for chunk in pairs.chunks(1024) {
                    let sets: Vec<String> = chunk.iter().map(|(set, _)| (*set).clone()).collect();
                    let mut args = vec![TTL.as_millis().to_string()];
                    args.extend(chunk.iter().map(|(_, member)| (*member).clone()));
                    if let Err(e) = timed(renew.evalsha_with_reload::<i64, _, _>(&client, sets, args)).await {
                        tracing::debug!(error = %e, "fleet cap places not renewed: they lapse unless the next beat renews them");
                        break;
                    }
                }
            }
        }
    }
}
