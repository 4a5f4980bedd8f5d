//! The fleet's session directory on Redis: what each instance publishes of its live sessions,
//! and the mirror every instance keeps of the others'.
//!
//! Each instance keeps a hash of its sessions (`{prefix}:sessions:{instance}`, one field per
//! session, the whole hash expiring [`TTL`] after the instance's last heartbeat) and its name in
//! `{prefix}:instances` (scored by that heartbeat). Sessions' starts and ends are queued to this
//! module's writer task (a session never waits for it), which writes them every [`FLUSH`] in
//! one pipeline: the hash's fields, and one `changes` event on `{prefix}:events`. A session that
//! starts and ends within one [`FLUSH`] costs Redis nothing. Every [`HEARTBEAT`] the writer
//! refreshes the expiry and the score, and adds a `beat` event.
//!
//! The others read the events with the locks ([`super::redis`]) into a [`Mirror`]: `/sessions`
//! with `scope=fleet` and the fleet-wide subject caps read the mirror, never Redis. An instance
//! not heard from for [`TTL`] (killed, or cut off) leaves the mirror, its sessions with it, and
//! its hash expires in Redis. After an outage of the store, an instance rewrites its whole hash
//! and says so (`snapshot`), and reads every live instance's hash again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fred::prelude::*;
use tokio::sync::mpsc;

use super::{now_ms, DirEntry, Event};
use crate::limits::SubjectKey;

/// How long the writer gathers changes before writing them (the directory is this much behind).
pub const FLUSH: Duration = Duration::from_millis(50);

/// How often an instance says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// How long an instance not heard from is still counted: its sessions leave the directory then.
pub const TTL: Duration = Duration::from_secs(6);

/// A change to this instance's sessions, for the writer.
#[derive(Debug)]
pub enum Change {
    /// A session started.
    Start(Box<DirEntry>),
    /// A session ended.
    End(u64),
    /// The process stops: say goodbye (the others forget this instance at once), then answer.
    Stop(tokio::sync::oneshot::Sender<()>),
}

/// The other instances' sessions, as their events told.
#[derive(Debug, Default)]
pub struct Mirror {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    instances: HashMap<String, Instance>,
    /// Sessions per subject key (over every route, and per route), for the caps.
    counts: HashMap<SubjectKey, u32>,
}

#[derive(Debug, Default)]
struct Instance {
    last_seen_ms: u64,
    sessions: HashMap<u64, DirEntry>,
}

/// The two subject keys a session counts under: over every route, and on its route.
fn keys(e: &DirEntry) -> Option<[SubjectKey; 2]> {
    // Sessions without a token count under no subject cap (as on the instance that holds them).
    e.token.then(|| {
        let key = |route: Option<String>| SubjectKey { route, issuer: e.issuer.clone(), subject: e.subject.clone() };
        [key(None), key(Some(e.route.clone()))]
    })
}

impl Inner {
    fn count(&mut self, e: &DirEntry, up: bool) {
        for k in keys(e).into_iter().flatten() {
            let n = self.counts.entry(k.clone()).or_default();
            *n = if up { *n + 1 } else { n.saturating_sub(1) };
            if *n == 0 {
                self.counts.remove(&k);
            }
        }
    }

    fn insert(&mut self, e: DirEntry) {
        let now = now_ms();
        let inst = self.instances.entry(e.instance.clone()).or_default();
        inst.last_seen_ms = now;
        if let Some(old) = inst.sessions.insert(e.id, e.clone()) {
            self.count(&old, false);
        }
        self.count(&e, true);
    }

    fn remove(&mut self, instance: &str, id: u64) {
        let Some(inst) = self.instances.get_mut(instance) else { return };
        inst.last_seen_ms = now_ms();
        if let Some(old) = inst.sessions.remove(&id) {
            self.count(&old, false);
        }
    }

    fn drop_instance(&mut self, instance: &str) {
        if let Some(inst) = self.instances.remove(instance) {
            for e in inst.sessions.values() {
                self.count(e, false);
            }
        }
    }
}

impl Mirror {
    /// Applies an event of another instance.
    pub fn apply(&self, event: &Event) {
        let Ok(mut m) = self.inner.lock() else { return };
        match event {
            Event::Changes { instance, started, ended } => {
                for e in started {
                    m.insert(e.clone());
                }
                for id in ended {
                    m.remove(instance, *id);
                }
            }
            Event::Beat { instance } => m.instances.entry(instance.clone()).or_default().last_seen_ms = now_ms(),
            Event::Gone { instance } => m.drop_instance(instance),
            Event::Snapshot { .. } | Event::Kill { .. } | Event::Rebalance { .. } => {}
        }
    }

    /// Replaces what is known of `instance` with `sessions` (its hash, read whole).
    pub fn replace(&self, instance: &str, sessions: Vec<DirEntry>) {
        let Ok(mut m) = self.inner.lock() else { return };
        m.drop_instance(instance);
        m.instances.entry(instance.to_owned()).or_default().last_seen_ms = now_ms();
        for e in sessions {
            m.insert(e);
        }
    }

    /// Forgets the instances not heard from for [`TTL`]; returns their names.
    pub fn prune(&self) -> Vec<String> {
        let Ok(mut m) = self.inner.lock() else { return Vec::new() };
        let cutoff = now_ms().saturating_sub(TTL.as_millis() as u64);
        let gone: Vec<String> =
            m.instances.iter().filter(|(_, i)| i.last_seen_ms < cutoff).map(|(n, _)| n.clone()).collect();
        for g in &gone {
            m.drop_instance(g);
        }
        gone
    }

    /// Every session of the other instances.
    pub fn list(&self) -> Vec<DirEntry> {
        let Ok(m) = self.inner.lock() else { return Vec::new() };
        let mut all: Vec<DirEntry> = m.instances.values().flat_map(|i| i.sessions.values().cloned()).collect();
        all.sort_by(|a, b| (a.started_ms, &a.instance, a.id).cmp(&(b.started_ms, &b.instance, b.id)));
        all
    }

    /// The first of the other instances' sessions `f` picks, looked for in place (a request's
    /// lookup copies nothing of the mirror).
    pub fn find_map<T>(&self, mut f: impl FnMut(&DirEntry) -> Option<T>) -> Option<T> {
        let m = self.inner.lock().ok()?;
        m.instances.values().flat_map(|i| i.sessions.values()).find_map(&mut f)
    }

    /// How many sessions the other instances hold.
    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |m| m.instances.values().map(|i| i.sessions.len()).sum())
    }

    /// True when the other instances hold no session.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many sessions the other instances hold under `key`.
    pub fn count(&self, key: &SubjectKey) -> u32 {
        self.inner.lock().map_or(0, |m| m.counts.get(key).copied().unwrap_or(0))
    }

    /// The other instances heard from within [`TTL`].
    pub fn instances(&self) -> Vec<String> {
        let Ok(m) = self.inner.lock() else { return Vec::new() };
        let mut names: Vec<String> = m.instances.keys().cloned().collect();
        names.sort();
        names
    }
}

/// The directory's key names.
#[derive(Clone)]
pub struct Keys {
    pub(super) events: String,
    pub(super) instances: String,
    tag: String,
}

impl Keys {
    /// The keys under `tag` (the prefix in braces).
    pub fn new(tag: &str) -> Keys {
        Keys { events: format!("{tag}:events"), instances: format!("{tag}:instances"), tag: tag.to_owned() }
    }

    /// The hash of `instance`'s sessions.
    pub fn sessions(&self, instance: &str) -> String {
        format!("{}:sessions:{instance}", self.tag)
    }
}

/// The stream's approximate length cap.
const EVENTS_CAP: i64 = 100_000;

/// Adds `event` of `instance` to the events stream in `pipeline` (the instance in a field of its
/// own, so that it skips its own entries without parsing them).
async fn add_event(
    p: &fred::clients::Pipeline<Client>,
    keys: &Keys,
    instance: &str,
    event: &Event,
) -> Result<(), Error> {
    let json = serde_json::to_string(event).map_err(|e| Error::new(ErrorKind::Parse, e.to_string()))?;
    let fields = vec![("i", instance.to_owned()), ("e", json)];
    p.xadd::<(), _, _, _, _>(&keys.events, false, ("MAXLEN", "~", EVENTS_CAP), "*", fields).await
}

/// A change not written yet.
enum Pending {
    Start(Box<DirEntry>),
    End,
}

/// The writer: this instance's changes (gathered for [`FLUSH`], then written in one pipeline)
/// and heartbeats, until `changes` closes (the process ends), then the instance's entry is
/// removed (`gone`).
pub async fn write(client: Client, keys: Keys, instance: String, mut changes: mpsc::UnboundedReceiver<Change>) {
    let mut own: HashMap<u64, DirEntry> = HashMap::new();
    let mut pending: HashMap<u64, Pending> = HashMap::new();
    // Sessions whose entry may be in the hash (a start of theirs went out in a batch or a
    // rewrite): their end is written even when a later start of theirs (a record changed:
    // counted, an event stream) is still pending, or the written entry would stay behind.
    let mut announced: std::collections::HashSet<u64> = std::collections::HashSet::new();
    // The hash in Redis may not match `own` (at start, after an error): rewritten whole at the
    // next beat, and nothing is written piecemeal meanwhile.
    let mut stale = true;
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flush = tokio::time::interval(FLUSH);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let hash = keys.sessions(&instance);
    let mut done = None;
    loop {
        tokio::select! {
            change = changes.recv() => match change {
                None => break,
                Some(Change::Stop(ack)) => {
                    done = Some(ack);
                    break;
                }
                Some(Change::Start(e)) => {
                    own.insert(e.id, (*e).clone());
                    pending.insert(e.id, Pending::Start(e));
                }
                Some(Change::End(id)) => {
                    own.remove(&id);
                    let unwritten = matches!(pending.remove(&id), Some(Pending::Start(_)));
                    // Started and ended before any start of it was written: nothing to write.
                    if announced.remove(&id) || !unwritten {
                        pending.insert(id, Pending::End);
                    }
                }
            },
            _ = flush.tick(), if !pending.is_empty() => {
                let batch = std::mem::take(&mut pending);
                announced.extend(batch.iter().filter(|(_, c)| matches!(c, Pending::Start(_))).map(|(id, _)| *id));
                if stale {
                    continue;
                }
                let written = tokio::time::timeout(super::redis::COMMAND_TIMEOUT, write_changes(&client, &keys, &instance, batch)).await;
                stale = !matches!(written, Ok(Ok(())));
            }
            _ = beat.tick() => {
                if stale {
                    announced.extend(own.keys().copied());
                }
                let result = tokio::time::timeout(super::redis::COMMAND_TIMEOUT, heartbeat(&client, &keys, &instance, &own, stale)).await;
                stale = !matches!(result, Ok(Ok(true)));
            }
        }
    }
    // A clean stop: the others forget this instance now rather than after TTL.
    let bye = async {
        let p = client.pipeline();
        p.del::<(), _>(&hash).await?;
        p.zrem::<(), _, _>(&keys.instances, instance.as_str()).await?;
        add_event(&p, &keys, &instance, &Event::Gone { instance: instance.clone() }).await?;
        p.all::<Value>().await
    };
    let _ = tokio::time::timeout(super::redis::COMMAND_TIMEOUT, bye).await;
    if let Some(ack) = done {
        let _ = ack.send(());
    }
}

/// One batch of changes: the hash's fields and one `changes` event, in one pipeline.
async fn write_changes(
    client: &Client,
    keys: &Keys,
    instance: &str,
    batch: HashMap<u64, Pending>,
) -> Result<(), Error> {
    let hash = keys.sessions(instance);
    let (mut started, mut ended) = (Vec::new(), Vec::new());
    for (id, change) in batch {
        match change {
            Pending::Start(e) => started.push(*e),
            Pending::End => ended.push(id),
        }
    }
    let p = client.pipeline();
    if !started.is_empty() {
        let fields: Vec<(String, String)> =
            started.iter().map(|e| (e.id.to_string(), serde_json::to_string(e).unwrap_or_default())).collect();
        p.hset::<(), _, _>(&hash, fields).await?;
    }
    if !ended.is_empty() {
        let fields: Vec<String> = ended.iter().map(u64::to_string).collect();
        p.hdel::<(), _, _>(&hash, fields).await?;
    }
    add_event(&p, keys, instance, &Event::Changes { instance: instance.to_owned(), started, ended }).await?;
    p.all::<Value>().await.map(drop)
}

/// One heartbeat: the hash's expiry and the instance's score refreshed, and (after a gap) the
/// hash rewritten whole. `Ok(false)` when the hash should hold sessions and Redis has none of
/// it (a Redis restarted empty, which fred reconnects to without a failed command): the next
/// beat rewrites it.
async fn heartbeat(
    client: &Client,
    keys: &Keys,
    instance: &str,
    own: &HashMap<u64, DirEntry>,
    rewrite: bool,
) -> Result<bool, Error> {
    let hash = keys.sessions(instance);
    let p = client.pipeline();
    // Where the expiry's answer (1: the hash is there) is among the pipeline's.
    let mut at = 0;
    if rewrite {
        p.del::<(), _>(&hash).await?;
        at += 1;
        for chunk in own.values().collect::<Vec<_>>().chunks(512) {
            let fields: Vec<(String, String)> =
                chunk.iter().map(|e| (e.id.to_string(), serde_json::to_string(e).unwrap_or_default())).collect();
            p.hset::<(), _, _>(&hash, fields).await?;
            at += 1;
        }
    }
    p.expire::<(), _>(&hash, TTL.as_secs() as i64, None).await?;
    p.zadd::<(), _, _>(&keys.instances, None, None, false, false, (now_ms() as f64, instance)).await?;
    let cutoff = now_ms().saturating_sub(TTL.as_millis() as u64) as f64;
    p.zremrangebyscore::<(), _, _, _>(&keys.instances, f64::NEG_INFINITY, cutoff).await?;
    let event = match rewrite {
        true => Event::Snapshot { instance: instance.to_owned() },
        false => Event::Beat { instance: instance.to_owned() },
    };
    add_event(&p, keys, instance, &event).await?;
    let answers: Vec<Value> = p.all().await?;
    let present = matches!(answers.get(at), Some(Value::Integer(1)));
    Ok(present || own.is_empty())
}

/// Every live instance's sessions, read whole (but `me`'s): for a start, and after an outage.
pub async fn read_all(
    client: &(impl SortedSetsInterface + HashesInterface),
    keys: &Keys,
    me: &str,
) -> Result<Vec<(String, Vec<DirEntry>)>, Error> {
    let cutoff = now_ms().saturating_sub(TTL.as_millis() as u64) as f64;
    let names: Vec<String> = client.zrangebyscore(&keys.instances, cutoff, f64::INFINITY, false, None).await?;
    let mut all = Vec::new();
    for name in names.into_iter().filter(|n| n != me) {
        all.push(read_one(client, keys, &name).await.map(|s| (name, s))?);
    }
    Ok(all)
}

/// One instance's sessions, read whole.
pub async fn read_one(client: &impl HashesInterface, keys: &Keys, instance: &str) -> Result<Vec<DirEntry>, Error> {
    let fields: HashMap<String, String> = client.hgetall(keys.sessions(instance)).await?;
    Ok(fields.values().filter_map(|v| serde_json::from_str(v).ok()).collect())
}

/// A handle on the writer: where this instance's changes go.
#[derive(Clone)]
pub struct Publisher {
    pub(super) tx: mpsc::UnboundedSender<Change>,
}

impl Publisher {
    /// Queues a change (never waits; dropped when the writer is gone).
    pub fn send(&self, change: Change) {
        let _ = self.tx.send(change);
    }
}

/// The mirror and the publisher of one instance.
pub struct Directory {
    pub(super) mirror: Arc<Mirror>,
    pub(super) publisher: Publisher,
}
