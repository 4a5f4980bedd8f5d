//! The Redis (or Valkey) store, through `fred`.
//!
//! Keys, all under one hash tag so that a cluster keeps them on one slot and a transaction may
//! touch them together (`{prefix}` below is the configured `key_prefix` in braces):
//!
//! - `{prefix}:lock:{id}`: one lock as JSON, expiring (`EXAT`) when the lock lapses;
//! - `{prefix}:lock-index`: the ids of the locks, scored by when they lapse, so that a starting
//!   or reconnecting instance reads those in force with one range and one `MGET` (no `SCAN`);
//! - `{prefix}:locks`: a stream with one entry per lock, in the fleet's order, trimmed to about
//!   100,000 entries.
//!
//! A lock is written in one `MULTI`: its key, its index entry (lapsed ones pruned), its stream
//! entry. Every instance reads the stream (`XREAD BLOCK`, on a connection of its own) from the
//! last entry it saw; each answer, entries or not, tells [`Health`] the store is there. After an
//! error the reader backs off, and once the store answers again it reads every lock in force
//! from the index before going on with the stream: a lock made during the outage is applied
//! even when the stream has been trimmed past the last entry this instance saw. The directory's
//! events and the fleet's commands (`{prefix}:events`, [`directory`]) are read by a reader of
//! their own on another connection: nothing wrong with that stream holds up the locks.
//!
//! Every command has a deadline ([`COMMAND_TIMEOUT`]): a store that does not answer is a store
//! that is down, whatever the socket says.

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use fred::types::streams::XReadResponse;
use tokio::sync::mpsc;

use super::directory::{self, Directory, Mirror, Publisher};
use super::{now_secs, Event, Feed, Health, Lock, StoreError};

/// How long one command may take before the store counts as unreachable.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one `XREAD` waits for new entries (the longest a healthy store goes unheard).
const BLOCK: Duration = Duration::from_secs(1);

/// The stream's approximate length cap.
const STREAM_CAP: i64 = 100_000;

/// The writer's connection, the reader tasks, and the session directory.
pub struct Redis {
    client: Client,
    keys: Keys,
    /// The locks' reader and the events' reader.
    readers: [tokio::task::JoinHandle<()>; 2],
    pub(super) directory: Directory,
    instance: String,
}

impl Drop for Redis {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

/// The fleet's key names.
#[derive(Clone)]
struct Keys {
    stream: String,
    index: String,
    tag: String,
    dir: directory::Keys,
}

impl Keys {
    fn new(prefix: &str) -> Keys {
        let tag = format!("{{{prefix}}}");
        let dir = directory::Keys::new(&tag);
        Keys { stream: format!("{tag}:locks"), index: format!("{tag}:lock-index"), tag, dir }
    }

    fn lock(&self, id: &str) -> String {
        format!("{}:lock:{id}", self.tag)
    }
}

fn redis_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Redis(e.to_string())
}

/// Runs one command under [`COMMAND_TIMEOUT`].
pub(super) async fn timed<T>(f: impl std::future::Future<Output = Result<T, Error>>) -> Result<T, StoreError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
        Ok(r) => r.map_err(redis_error),
        Err(_) => Err(StoreError::Redis(format!("no answer within {}s", COMMAND_TIMEOUT.as_secs()))),
    }
}

/// How a `rediss://` store's certificate is checked.
pub struct Tls<'a> {
    /// More CA certificates (PEM) to trust besides the system's.
    pub ca_file: Option<&'a std::path::Path>,
}

impl Tls<'_> {
    /// The rustls client configuration: the system's roots and `ca_file`'s, the crate's one
    /// crypto provider, the server's name checked.
    fn connector(&self) -> Result<fred::types::config::TlsConnector, StoreError> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::CertificateDer;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = self.ca_file {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| StoreError::Redis(format!("redis_ca_file {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(StoreError::Redis(format!("redis_ca_file {}: no certificate", path.display())));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| StoreError::Redis(format!("redis_ca_file {}: {e}", path.display())))?;
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(crate::crypto::provider())
            .with_safe_default_protocol_versions()
            .map_err(redis_error)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(config.into())
    }
}

/// A client for `url` that reconnects for ever (every 500 ms), and does not wait for its first
/// connection.
fn client(url: &str, tls: &Tls<'_>) -> Result<Client, StoreError> {
    let mut config = Config::from_url(url).map_err(|e| StoreError::Redis(format!("redis_url: {e}")))?;
    if url.starts_with("rediss") {
        // The certificate is checked against the system's roots and redis_ca_file's, never
        // accepted unchecked.
        config.tls = Some(tls.connector()?.into());
    }
    // A command is never kept for a later connection: fred drops it at its deadline, and one
    // written to a connection that dies is not written again. (Kept, a command written while
    // the store is away would run after it is back, and blocking reads queued so would hold
    // every later command behind them.)
    Builder::from_config(config)
        .with_config(|c| c.fail_fast = false)
        .with_connection_config(|c| {
            c.connection_timeout = COMMAND_TIMEOUT;
            c.internal_command_timeout = COMMAND_TIMEOUT;
            c.max_command_attempts = 1;
        })
        .with_performance_config(|c| c.default_command_timeout = COMMAND_TIMEOUT)
        .set_policy(ReconnectPolicy::new_constant(0, 500))
        .build()
        .map_err(redis_error)
}

impl Redis {
    /// Connects to `url` (waiting up to [`COMMAND_TIMEOUT`] for it), reads the locks in force
    /// and starts the reader, which sends locks made elsewhere to `feed`. A store that cannot be
    /// reached now is not an error: the locks come once it can.
    pub async fn open(
        url: &str,
        prefix: &str,
        tls: Tls<'_>,
        instance: &str,
        health: Arc<Health>,
        feed: mpsc::UnboundedSender<Feed>,
    ) -> Result<(Redis, Vec<Lock>), StoreError> {
        let keys = Keys::new(prefix);
        let writer = client(url, &tls)?;
        let (reader, events) = (writer.clone_new(), writer.clone_new());
        // The connection tasks run for as long as the clients live.
        drop(writer.connect());
        drop(reader.connect());
        drop(events.connect());
        let mirror = Arc::new(Mirror::default());
        let first = async {
            timed(writer.wait_for_connect()).await?;
            // The reader too: its first read, sent before it is connected, would fail and count
            // the store as away for a moment.
            timed(reader.wait_for_connect()).await?;
            timed(events.wait_for_connect()).await?;
            // Where the streams end, before the locks and the directory are read: anything
            // written between the two is read twice, which applying again is harmless for.
            let from = [last_id(&writer, &keys.stream).await?, last_id(&writer, &keys.dir.events).await?];
            let locks = in_force(&writer, &keys).await?;
            for (name, sessions) in timed(directory::read_all(&writer, &keys.dir, instance)).await? {
                mirror.replace(&name, sessions);
            }
            Ok::<_, StoreError>((from, locks))
        };
        let (from, locks, synced) = match first.await {
            Ok((from, locks)) => {
                health.ok();
                (from, locks, true)
            }
            Err(e) => {
                tracing::debug!(error = %e, "fleet store read failed");
                health.failed(&e);
                (["$".to_owned(), "$".to_owned()], Vec::new(), false)
            }
        };
        let reading = Arc::new(Reading {
            keys: keys.clone(),
            instance: instance.to_owned(),
            health,
            feed,
            mirror: mirror.clone(),
        });
        let [locks_from, events_from] = from;
        let task = tokio::spawn(read_locks(reader, reading.clone(), locks_from, synced));
        let events_task = tokio::spawn(read_events(events, reading, events_from, synced));
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(directory::write(writer.clone(), keys.dir.clone(), instance.to_owned(), rx));
        let directory = Directory { mirror, publisher: Publisher { tx } };
        let readers = [task, events_task];
        Ok((Redis { client: writer, keys, readers, directory, instance: instance.to_owned() }, locks))
    }

    /// The subject caps' places of this process, on this store.
    pub fn places(&self, instance: &str) -> super::caps::Places {
        super::caps::Places::new(self.client.clone(), &self.keys.tag, instance)
    }

    /// See [`super::Fleet::first_nonce`]: `SET NX` of the nonce's key, kept as long as a
    /// preamble's time is good on any clock.
    pub async fn first_nonce(&self, nonce: &str) -> bool {
        let key = format!("{}:peer-nonce:{nonce}", self.keys.tag);
        let keep = Expiration::PX(2 * super::peer::WINDOW.as_millis() as i64);
        let set = self.client.set::<Option<String>, _, _>(key, "1", Some(keep), Some(SetOptions::NX), false);
        match tokio::time::timeout(Duration::from_millis(500), set).await {
            Ok(Ok(answer)) => answer.is_some(),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "peer nonce not checked in the fleet store: this process's cache decides");
                true
            }
            Err(_) => true,
        }
    }

    /// Adds a command for other instances to the events stream.
    pub async fn command(&self, event: &Event) -> Result<(), StoreError> {
        let json = serde_json::to_string(event).map_err(redis_error)?;
        let add = self.client.xadd::<(), _, _, _, _>(
            &self.keys.dir.events,
            false,
            None,
            "*",
            vec![("i", self.instance.clone()), ("e", json)],
        );
        timed(add).await
    }

    /// Writes `lock` (its key, its index entry, its stream entry) in one transaction.
    pub async fn write(&self, lock: &Lock) -> Result<(), StoreError> {
        let json = serde_json::to_string(lock).map_err(redis_error)?;
        let tx = self.client.multi();
        let now = now_secs() as f64;
        let write = async {
            let _: () = tx
                .set(self.keys.lock(&lock.id), json.as_str(), Some(Expiration::EXAT(lock.until as i64)), None, false)
                .await?;
            let _: () =
                tx.zadd(&self.keys.index, None, None, false, false, (lock.until as f64, lock.id.as_str())).await?;
            let _: () = tx.zremrangebyscore(&self.keys.index, f64::NEG_INFINITY, now).await?;
            let _: () = tx
                .xadd(&self.keys.stream, false, ("MAXLEN", "~", STREAM_CAP), "*", vec![("lock", json.as_str())])
                .await?;
            tx.exec::<Value>(true).await
        };
        timed(write).await.map(drop)
    }
}

/// The id of `stream`'s last entry (`0-0` when it has none).
async fn last_id(client: &impl StreamsInterface, stream: &str) -> Result<String, StoreError> {
    let last: Vec<(String, std::collections::HashMap<String, String>)> =
        timed(client.xrevrange(stream, "+", "-", Some(1))).await?;
    Ok(last.into_iter().next().map_or_else(|| "0-0".to_owned(), |(id, _)| id))
}

/// Every lock in force, from the index.
async fn in_force(client: &(impl SortedSetsInterface + KeysInterface), keys: &Keys) -> Result<Vec<Lock>, StoreError> {
    // Scores as floats: fred reads an integer bound as an index.
    let now = now_secs() as f64;
    let ids: Vec<String> = timed(client.zrangebyscore(&keys.index, now, f64::INFINITY, false, None)).await?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<String> = ids.iter().map(|id| keys.lock(id)).collect();
    let values: Vec<Option<String>> = timed(client.mget(names)).await?;
    Ok(values.into_iter().flatten().filter_map(|v| parse(&v)).filter(|l| !l.lapsed()).collect())
}

/// A lock from its JSON; `None` (logged) when it is not one.
fn parse(json: &str) -> Option<Lock> {
    serde_json::from_str(json)
        .inspect_err(|e| tracing::warn!(error = %e, "a lock in the fleet store is not one this version reads; skipped"))
        .ok()
}

/// What the reader needs besides its connection.
struct Reading {
    keys: Keys,
    instance: String,
    health: Arc<Health>,
    feed: mpsc::UnboundedSender<Feed>,
    mirror: Arc<Mirror>,
}

impl Reading {
    /// An event of another instance: the mirror follows it; a command for this instance goes
    /// to the server.
    async fn event(&self, client: &impl HashesInterface, event: Event) {
        match &event {
            Event::Changes { instance, .. } | Event::Beat { instance } | Event::Gone { instance }
                if *instance == self.instance =>
            {
                return
            }
            Event::Snapshot { instance } if *instance != self.instance => {
                // Its hash was rewritten whole: read it again.
                if let Ok(Ok(sessions)) =
                    tokio::time::timeout(COMMAND_TIMEOUT, directory::read_one(client, &self.keys.dir, instance)).await
                {
                    self.mirror.replace(instance, sessions);
                }
                return;
            }
            Event::Kill { to, id, by } if *to == self.instance => {
                let _ = self.feed.send(Feed::Kill { id: *id, by: by.clone() });
            }
            Event::Rebalance { route, fraction, spread_ms, by } => {
                let spread = Duration::from_millis(*spread_ms);
                let _ = self.feed.send(Feed::Rebalance {
                    route: route.clone(),
                    fraction: *fraction,
                    spread,
                    by: by.clone(),
                });
            }
            _ => {}
        }
        self.mirror.apply(&event);
    }
}

/// The locks' reader: the locks' stream from `from`, for as long as the process runs, on a
/// connection of its own; it alone tells [`Health`] whether the store answers. `synced`: the
/// locks in force were read already (else they are read as soon as the store answers).
async fn read_locks(client: Client, r: Arc<Reading>, mut from: String, mut synced: bool) {
    let mut backoff = Duration::from_millis(100);
    // Fails at once, rather than wait, while the connection is down.
    let quick = Options { fail_fast: true, ..Default::default() };
    let keys = r.keys.clone();
    loop {
        let step = async {
            if !synced {
                // The stream's end first, then every lock in force: nothing made meanwhile is
                // missed, whatever the stream kept.
                let c = client.with_options(&quick);
                let last = last_id(&c, &keys.stream).await?;
                for lock in in_force(&c, &keys).await? {
                    let _ = r.feed.send(Feed::Lock { lock });
                }
                if from == "$" {
                    from = last;
                }
                synced = true;
            }
            for (id, fields) in next_entries(&client, &quick, &keys.stream, &from).await? {
                if let Some(lock) = fields.get("lock").and_then(|j| parse(j)) {
                    let _ = r.feed.send(Feed::Lock { lock });
                }
                from = id;
            }
            Ok::<_, StoreError>(())
        };
        match step.await {
            Ok(()) => {
                r.health.ok();
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                tracing::debug!(error = %e, "fleet store read failed");
                r.health.failed(&e);
                synced = false;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The events' reader: the directory's events and the fleet's commands from `from`, for as long
/// as the process runs, on a connection of its own, so that nothing wrong with the events stream
/// holds up the locks. `synced`: every instance's sessions were read already (else they are read
/// as soon as the store answers).
async fn read_events(client: Client, r: Arc<Reading>, mut from: String, mut synced: bool) {
    let mut backoff = Duration::from_millis(100);
    let quick = Options { fail_fast: true, ..Default::default() };
    let keys = r.keys.clone();
    // Whether this reader hears the events: only then are instances not heard from forgotten
    // (cut off itself, it cannot tell a dead instance from a live one, and keeps what it knew).
    let mut hearing = synced;
    crate::metrics::fleet_events_readable(hearing);
    loop {
        if hearing {
            for gone in r.mirror.prune() {
                tracing::info!(instance = %gone, "fleet instance not heard from: its sessions leave the directory");
            }
        }
        let step = async {
            if !synced {
                let c = client.with_options(&quick);
                let last = last_id(&c, &keys.dir.events).await?;
                for (name, sessions) in timed(directory::read_all(&c, &keys.dir, &r.instance)).await? {
                    r.mirror.replace(&name, sessions);
                }
                if from == "$" {
                    from = last;
                }
                synced = true;
            }
            for (id, fields) in next_entries(&client, &quick, &keys.dir.events, &from).await? {
                // This instance's own entries are skipped unparsed.
                let own = fields.get("i").is_some_and(|i| *i == r.instance);
                let event = fields.get("e").filter(|_| !own).and_then(|j| serde_json::from_str::<Event>(j).ok());
                if let Some(event) = event {
                    r.event(&client.with_options(&quick), event).await;
                }
                from = id;
            }
            Ok::<_, StoreError>(())
        };
        match step.await {
            Ok(()) => {
                if !hearing {
                    tracing::info!("fleet events read again");
                    crate::metrics::fleet_events_readable(true);
                }
                hearing = true;
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                if hearing {
                    tracing::warn!(error = %e, "fleet events cannot be read: the directory and fleet commands wait (locks are read apart)");
                    crate::metrics::fleet_events_readable(false);
                }
                hearing = false;
                synced = false;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// The entries of `stream` after `from`: one `XREAD` that blocks on the server for up to
/// [`BLOCK`] (its own deadline allows for it); none when nothing new came meanwhile.
async fn next_entries(
    client: &Client,
    quick: &Options,
    stream: &str,
    from: &str,
) -> Result<Vec<(String, std::collections::HashMap<String, String>)>, StoreError> {
    let options = Options { timeout: Some(COMMAND_TIMEOUT + BLOCK), ..quick.clone() };
    let reader = client.with_options(&options);
    let read = reader.xread::<Value, _, _>(Some(512), Some(BLOCK.as_millis() as u64), stream, from);
    let got = match tokio::time::timeout(COMMAND_TIMEOUT + BLOCK, read).await {
        Ok(r) => r.map_err(redis_error)?,
        Err(_) => return Err(StoreError::Redis("XREAD did not return".into())),
    };
    // Nothing new within BLOCK is a nil answer.
    let got: XReadResponse<String, String, String, String> = match got {
        Value::Null => Default::default(),
        v => v.into_xread_response().map_err(redis_error)?,
    };
    Ok(got.into_values().flatten().collect())
}
