//! The fleet: where governance state lives, so that it outlives a restart and, with Redis,
//! reaches every instance.
//!
//! A revocation is a [`Lock`] (Teleport's word): a target (a subject, a token id, an agent), when
//! it was made and until when it holds. A lock made on any instance is applied there at once
//! (its sessions cut, its tokens refused) and written to the store, from which every other
//! instance applies it too. The hot path never waits on the store: "is this token revoked?" reads
//! the process's denylist, the local mirror the store's feed keeps current.
//!
//! Two stores sit behind [`Fleet`]:
//!
//! - `local` (the default; one instance, no other process): an fsynced append log in `state_dir`
//!   ([`local`]). A lock is on disk before the revoke call answers, and every lock still in force
//!   is read before the first port accepts: a restart forgets nothing.
//! - `redis` (Redis or Valkey, through `fred`; [`redis`]): each lock is a key that expires with it
//!   plus an entry on a stream that gives the fleet one order. Every instance reads the stream
//!   from the last entry it saw, so one that lost the store catches up when it is back, and reads
//!   every lock key (`SCAN`) at start and after each outage, so none is missed even when the
//!   stream was trimmed meanwhile.
//!
//! While the store cannot be reached, [`Health`] counts the staleness, and `[fleet] staleness`
//! decides: `best_effort` serves on with the last view (a metric and an alert say so), `strict`
//! refuses new sessions once it has lasted `max_staleness`.

pub mod caps;
pub mod directory;
pub mod local;
pub mod peer;
pub mod redis;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use tokio::sync::mpsc;

use crate::config::{FleetSettings, Staleness, StoreKind, SubjectCaps};

/// What a lock refuses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// A subject's tokens issued up to the lock (of one issuer, or of every issuer), and its
    /// sessions.
    Subject {
        /// The `sub`.
        subject: String,
        /// Its issuer, or `None` for the subject at every issuer.
        issuer: Option<String>,
    },
    /// One token id (of one issuer, or of every issuer), and its sessions.
    Jti {
        /// The `jti`.
        jti: String,
        /// Its issuer, or `None` for the id at every issuer.
        issuer: Option<String>,
    },
    /// The sessions that reached an agent before the lock, and the tokens they were opened with.
    Agent {
        /// The `{agent}` capture.
        agent: String,
    },
    /// A session envelope whose session was ended (`DELETE` on an MCP route): refused by every
    /// instance until it would have expired.
    Envelope {
        /// `routing::affinity::digest` of the route and the envelope (never the envelope).
        digest: String,
    },
}

/// One revocation, as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lock {
    /// 128 random bits, base64url: the lock's key in the store.
    pub id: String,
    /// What it refuses.
    pub target: Target,
    /// When it was made, Unix milliseconds (a subject's tokens issued later are accepted).
    pub at_ms: u64,
    /// When it lapses, Unix seconds (the latest expiry of what it refuses).
    pub until: u64,
    /// The instance it was made on.
    pub origin: String,
}

impl Lock {
    /// A new lock on `target` made now by `origin`, holding until `until` (Unix seconds).
    pub fn new(target: Target, until: u64, origin: &str) -> Lock {
        let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>());
        Lock { id, target, at_ms: now_ms(), until, origin: origin.to_owned() }
    }

    /// When it was made, Unix seconds.
    pub fn at_secs(&self) -> u64 {
        Duration::from_millis(self.at_ms).as_secs()
    }

    /// True once it has lapsed.
    pub fn lapsed(&self) -> bool {
        self.until <= now_secs()
    }
}

/// One live session as the fleet's directory shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DirEntry {
    /// The instance that holds it.
    pub instance: String,
    /// Its id on that instance.
    pub id: u64,
    /// `websocket`, `observer`, `sse`, `stream`.
    pub kind: String,
    /// Route name.
    pub route: String,
    /// The `{agent}` capture.
    pub agent: Option<String>,
    /// The token's subject.
    pub subject: Option<String>,
    /// The token's issuer.
    pub issuer: Option<String>,
    /// Whether a token was checked (the session counts under its subject's caps).
    pub token: bool,
    /// Client address.
    pub client: String,
    /// When it started, Unix milliseconds.
    pub started_ms: u64,
    /// For a resumable session, [`resume_key`] of its resume id (never the id itself).
    #[serde(default)]
    pub resume: Option<String>,
    /// Where the owner takes relayed resumes and observers (its peer listener), if it has one.
    #[serde(default)]
    pub peer: Option<String>,
}

/// What the directory shows of a resume id: SHA-256 of the route and the id, hex. An instance
/// that is given the id can find its session; one that reads the directory learns nothing it
/// could resume with.
pub fn resume_key(route: &str, id: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("{route}\u{0}{id}").as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// An entry of the fleet's events stream: the directory's changes, and commands for one
/// instance or all.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Event {
    /// Sessions of one instance started and ended since its last such event (one event per
    /// [`directory::FLUSH`] at most; a session that started and ended within it is in neither).
    Changes {
        /// The instance.
        instance: String,
        /// The sessions that started.
        started: Vec<DirEntry>,
        /// The ids of those that ended.
        ended: Vec<u64>,
    },
    /// The instance is alive.
    Beat {
        /// The instance.
        instance: String,
    },
    /// The instance rewrote its sessions' hash whole (after losing the store): read it again.
    Snapshot {
        /// The instance.
        instance: String,
    },
    /// The instance stopped.
    Gone {
        /// The instance.
        instance: String,
    },
    /// `DELETE /sessions/{instance}/{id}` asked elsewhere, for the owner.
    Kill {
        /// The owner.
        to: String,
        /// The session's id there.
        id: u64,
        /// The instance the request reached.
        by: String,
    },
    /// `POST /sessions/rebalance` with `"scope": "fleet"`: every instance rebalances its own.
    Rebalance {
        /// The route.
        route: String,
        /// The fraction of its sessions.
        fraction: f64,
        /// Over how long.
        spread_ms: u64,
        /// The instance the request reached.
        by: String,
    },
}

/// What the store's feed brings the server.
#[derive(Debug)]
pub enum Feed {
    /// A lock made by another instance (from the stream, as it was made), or read again with
    /// every lock in force after an outage: applied the same way either way (see
    /// `admin::apply_lock`).
    Lock {
        /// The lock.
        lock: Lock,
    },
    /// Revoke this instance's session `id` (asked on instance `by`).
    Kill {
        /// The session.
        id: u64,
        /// Where it was asked.
        by: String,
    },
    /// Rebalance this instance's sessions of `route`.
    Rebalance {
        /// The route.
        route: String,
        /// The fraction.
        fraction: f64,
        /// The spread.
        spread: Duration,
        /// Where it was asked.
        by: String,
    },
}

/// How far apart the instances' clocks may be: an agent's lock cuts the sessions that started
/// up to this long after it was made.
pub const CLOCK_SLACK: Duration = Duration::from_secs(1);

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    unix_now().as_millis() as u64
}

/// Unix time in seconds.
pub fn now_secs() -> u64 {
    unix_now().as_secs()
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Why the store could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The local log could not be read or written.
    #[error("state directory {path}: {source}")]
    Local {
        /// The file or directory.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// Redis answered with an error or could not be reached in time.
    #[error("redis: {0}")]
    Redis(String),
}

/// Whether the store is reachable, and since when it is not: what `staleness` decides on.
#[derive(Debug)]
pub struct Health {
    policy: Staleness,
    max_staleness: Duration,
    reachable: AtomicBool,
    /// When the store last answered, Unix milliseconds; until it first has, when the process
    /// opened it (a process that never read the locks in force is stale from its start).
    last_ok_ms: AtomicU64,
    /// The locks in force have been read once: until then `strict` refuses.
    synced: AtomicBool,
}

impl Health {
    fn new(settings: &FleetSettings) -> Health {
        Health {
            policy: settings.staleness,
            max_staleness: settings.max_staleness,
            reachable: AtomicBool::new(false),
            last_ok_ms: AtomicU64::new(now_ms()),
            synced: AtomicBool::new(false),
        }
    }

    /// The store answered (with the locks in force read: the reader calls this only once it has
    /// them).
    pub fn ok(&self) {
        self.synced.store(true, Ordering::Relaxed);
        self.last_ok_ms.store(now_ms(), Ordering::Relaxed);
        if !self.reachable.swap(true, Ordering::Relaxed) {
            tracing::info!("fleet store reachable again");
        }
        crate::metrics::fleet_store_reachable(true);
    }

    /// The store did not answer, or failed.
    pub fn failed(&self, error: &dyn std::fmt::Display) {
        if self.reachable.swap(false, Ordering::Relaxed) {
            tracing::warn!(%error, policy = ?self.policy, "fleet store unreachable: locks made elsewhere wait until it is back");
        }
        crate::metrics::fleet_store_reachable(false);
    }

    /// The policy in force while the store is away, and after how long `strict` refuses.
    pub fn policy(&self) -> (Staleness, Duration) {
        (self.policy, self.max_staleness)
    }

    /// True while the store answers.
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    /// How long the view of the locks may be behind: zero while the store answers, else the
    /// time since it last did.
    pub fn staleness(&self) -> Duration {
        if self.reachable() {
            return Duration::ZERO;
        }
        Duration::from_millis(now_ms().saturating_sub(self.last_ok_ms.load(Ordering::Relaxed)))
    }

    /// Whether a new session may start: under `strict`, not once the store has been
    /// unreachable for longer than `max_staleness` (the answer is how long).
    pub fn admit(&self) -> Result<(), Duration> {
        let stale = self.staleness();
        // A process that has never read the locks in force knows of no revocation at all.
        let never_synced = !self.synced.load(Ordering::Relaxed);
        match self.policy {
            Staleness::Strict if never_synced || stale > self.max_staleness => Err(stale),
            _ => Ok(()),
        }
    }
}

/// The store behind the fleet.
enum Store {
    Local(local::Log),
    Redis(redis::Redis),
}

/// This instance's handle on the fleet's state (one per process, kept across reloads).
pub struct Fleet {
    instance: String,
    store: Store,
    health: Arc<Health>,
    /// Signs and checks the instance-to-instance channel's preambles (`peer_listen` set).
    peer: Option<peer::PeerAuth>,
    /// The locks applied here, by id: one read again after an outage is not applied again (it
    /// would cut the sessions of a subject's later login).
    applied: moka::sync::Cache<String, ()>,
    /// The address other instances dial for this one's peer listener, once it is bound.
    advertised: std::sync::OnceLock<String>,
    /// Locks and commands from other instances, in the store's order, until the server takes them.
    feed: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Feed>>>,
    /// The subject caps' places in the store (`subject_caps = "reserved"`).
    places: Option<caps::Places>,
    /// When a failed take was last logged.
    cap_errors: std::sync::Mutex<Option<std::time::Instant>>,
}

/// A subject cap is reached over the fleet: the session gets no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

impl Fleet {
    /// Opens the store and reads every lock in force: the caller applies them before any port
    /// accepts. With Redis, the feed of locks made elsewhere starts here; an unreachable Redis
    /// is not an error (the feed retries, and `staleness` decides meanwhile), a local log that
    /// cannot be read or created is.
    pub async fn open(settings: &FleetSettings) -> Result<(Arc<Fleet>, Vec<Lock>), StoreError> {
        let health = Arc::new(Health::new(settings));
        let (tx, rx) = mpsc::unbounded_channel();
        let (store, locks) = match &settings.store {
            StoreKind::Local { state_dir } => {
                let (log, locks) = local::Log::open(state_dir).await?;
                health.ok();
                (Store::Local(log), locks)
            }
            StoreKind::Redis { url, key_prefix, ca_file } => {
                let tls = redis::Tls { ca_file: ca_file.as_deref() };
                let (r, locks) =
                    redis::Redis::open(url, key_prefix, tls, &settings.instance, health.clone(), tx).await?;
                (Store::Redis(r), locks)
            }
        };
        let places = match (&store, settings.subject_caps) {
            (Store::Redis(r), SubjectCaps::Reserved) => Some(r.places(&settings.instance)),
            _ => None,
        };
        let peer = settings.peer.as_ref().map(|p| peer::PeerAuth::new(&settings.instance, p.secret.expose()));
        let fleet = Fleet {
            instance: settings.instance.clone(),
            store,
            health,
            peer,
            applied: moka::sync::Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(Duration::from_secs(48 * 3600))
                .build(),
            advertised: std::sync::OnceLock::new(),
            feed: std::sync::Mutex::new(Some(rx)),
            places,
            cap_errors: std::sync::Mutex::new(None),
        };
        Ok((Arc::new(fleet), locks))
    }

    /// This instance's name.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The store's health.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// Whether the store is shared by other instances (Redis), so a lock written there reaches
    /// them.
    pub fn is_shared(&self) -> bool {
        matches!(self.store, Store::Redis(_))
    }

    /// Which store, for logs and `/fleet`.
    pub fn store_name(&self) -> &'static str {
        match self.store {
            Store::Local(_) => "local",
            Store::Redis(_) => "redis",
        }
    }

    /// Locks and commands from other instances, as they arrive (taken once, by the server).
    pub fn take_feed(&self) -> Option<mpsc::UnboundedReceiver<Feed>> {
        self.feed.lock().ok().and_then(|mut f| f.take())
    }

    /// Writes `lock` where a restart and every instance will find it: on disk (fsynced) for the
    /// local store, in Redis (its key and its stream entry) for a fleet. Answers once it is
    /// there, or with why it is not.
    pub async fn write(&self, lock: &Lock) -> Result<(), StoreError> {
        // Applied by this process as it made it: not again when the store gives it back.
        self.applied.insert(lock.id.clone(), ());
        let result = match &self.store {
            Store::Local(log) => log.append(lock).await,
            Store::Redis(r) => r.write(lock).await,
        };
        crate::metrics::fleet_lock_written(self.store_name(), result.is_ok());
        result
    }
    /// Tells the fleet a session of this instance started (never waits; nothing with the
    /// local store).
    pub fn session_started(&self, entry: DirEntry) {
        if let Store::Redis(r) = &self.store {
            r.directory.publisher.send(directory::Change::Start(Box::new(entry)));
        }
    }

    /// Tells the fleet a session of this instance ended.
    pub fn session_ended(&self, id: u64) {
        if let Store::Redis(r) = &self.store {
            r.directory.publisher.send(directory::Change::End(id));
        }
    }

    /// The other instances' live sessions (none with the local store).
    pub fn others_sessions(&self) -> Vec<DirEntry> {
        self.mirror().map(directory::Mirror::list).unwrap_or_default()
    }

    /// The other instances heard from lately.
    pub fn others(&self) -> Vec<String> {
        self.mirror().map(directory::Mirror::instances).unwrap_or_default()
    }

    /// How many sessions the other instances hold under the subject cap key `key`.
    pub fn others_count(&self, key: &crate::limits::SubjectKey) -> u32 {
        self.mirror().map_or(0, |m| m.count(key))
    }

    /// True when capped sessions take places in the store (`subject_caps = "reserved"`).
    pub fn reserves(&self) -> bool {
        self.places.is_some()
    }

    /// With `subject_caps = "reserved"`, takes the session's places under each of `caps` (a key
    /// and its cap) in the store, all or none, and holds them until the answer is dropped;
    /// otherwise `Ok(None)` (the caller counted by the mirror). A store that cannot be asked
    /// (unreachable, or lately too slow to answer within a second, or failing the script)
    /// leaves the count to the mirror, and the session's place is written to the store once it
    /// answers; `staleness = "strict"` refuses every token-checked session anyway once the store
    /// has been away for `max_staleness` (before this is asked).
    pub async fn reserve(&self, caps: &[(crate::limits::SubjectKey, u32)]) -> Result<Option<caps::Reservation>, Full> {
        let Some(places) = self.places.as_ref().filter(|_| !caps.is_empty()) else { return Ok(None) };
        // Known to be away: not waited on for every handshake.
        if !self.health.reachable() {
            crate::metrics::fleet_cap_places("unreachable");
            return Ok(Some(places.unplaced(caps)));
        }
        // Boxed: the store's round trip is a future of about 7 KB, which inline would size every
        // caller's future (every upgrade's and request's handler) for `subject_caps = "reserved"`.
        match Box::pin(places.take(caps)).await {
            Ok(reservation) => {
                crate::metrics::fleet_cap_places("taken");
                Ok(Some(reservation))
            }
            Err(caps::TakeError::Full) => {
                crate::metrics::fleet_cap_places("full");
                Err(Full)
            }
            Err(caps::TakeError::Store(e)) => {
                // The locks' reader, not this, tells the store's health: a failed script is not
                // an outage, and is said once a minute at most.
                let say = self.cap_errors.lock().is_ok_and(|mut last| {
                    let due = last.is_none_or(|at| at.elapsed() > Duration::from_secs(60));
                    if due {
                        *last = Some(std::time::Instant::now());
                    }
                    due
                });
                if say {
                    tracing::warn!(error = %e, "fleet cap places not taken: counted by the mirror until the store answers");
                }
                crate::metrics::fleet_cap_places("error");
                Ok(Some(places.unplaced(caps)))
            }
        }
    }

    /// Sends a command to other instances through the store.
    pub async fn command(&self, event: &Event) -> Result<(), StoreError> {
        match &self.store {
            Store::Redis(r) => r.command(event).await,
            Store::Local(_) => Err(StoreError::Redis("the local store has no other instance".into())),
        }
    }

    /// The process stops: its sessions leave the directory now, and their places under the
    /// subject caps are given back, not after the TTL (waits for the store up to its command
    /// deadline).
    pub async fn shutdown(&self) {
        // The places too: a client reconnecting to another instance finds them free.
        if let Some(places) = &self.places {
            places.give_back_all().await;
        }
        if let Store::Redis(r) = &self.store {
            let (tx, rx) = tokio::sync::oneshot::channel();
            r.directory.publisher.send(directory::Change::Stop(tx));
            let _ = tokio::time::timeout(Duration::from_secs(3), rx).await;
        }
    }

    /// True the first time `lock` is seen here (it is to be applied), false after.
    pub fn first_sight(&self, lock: &Lock) -> bool {
        self.applied.entry(lock.id.clone()).or_insert(()).is_fresh()
    }

    /// Whether a peer preamble's `nonce` (one this process had not seen) is new to the fleet's
    /// store too, which outlives a process: a preamble replayed to a restarted instance, or to a
    /// handover's successor, under the same name is refused. A store that is away, or does not
    /// answer within half a second, leaves it to the process's own cache (`true`).
    pub async fn first_nonce(&self, nonce: &str) -> bool {
        match &self.store {
            // Known to be away: not waited on.
            Store::Redis(r) if self.health.reachable() => r.first_nonce(nonce).await,
            Store::Redis(_) | Store::Local(_) => true,
        }
    }

    /// The instance-to-instance channel's signer and checker, when `peer_listen` is set.
    pub fn peer_auth(&self) -> Option<&peer::PeerAuth> {
        self.peer.as_ref()
    }

    /// Records where other instances reach this one's peer listener (once, when it is bound).
    pub fn set_advertised(&self, addr: String) {
        let _ = self.advertised.set(addr);
    }

    /// Where other instances reach this one's peer listener, once it is bound.
    pub fn advertised(&self) -> Option<&str> {
        self.advertised.get().map(String::as_str)
    }

    /// The other instance that holds the resumable session of `route` with resume id `id`, and
    /// its peer listener: from the directory's mirror.
    pub fn resume_owner(&self, route: &str, id: &str) -> Option<(String, String)> {
        let key = resume_key(route, id);
        self.mirror()?.find_map(|e| {
            (e.route == route && e.resume.as_deref() == Some(key.as_str()))
                .then(|| Some((e.instance.clone(), e.peer.clone()?)))
                .flatten()
        })
    }

    /// The peer listener of the other instance that holds session `id`, when the directory
    /// knows the session and its instance takes relayed requests.
    pub fn session_peer(&self, instance: &str, id: u64) -> Option<String> {
        self.mirror()?.find_map(|e| (e.instance == instance && e.id == id).then(|| e.peer.clone()).flatten())
    }

    /// True when another instance holds session `id` (by the directory).
    pub fn holds_elsewhere(&self, instance: &str, id: u64) -> bool {
        self.mirror().is_some_and(|m| m.find_map(|e| (e.instance == instance && e.id == id).then_some(())).is_some())
    }

    /// How many sessions the other instances hold.
    pub fn others_len(&self) -> usize {
        self.mirror().map_or(0, directory::Mirror::len)
    }

    /// True when this instance publishes its sessions to a directory (the Redis store).
    pub fn has_directory(&self) -> bool {
        self.mirror().is_some()
    }

    fn mirror(&self) -> Option<&directory::Mirror> {
        match &self.store {
            Store::Redis(r) => Some(&r.directory.mirror),
            Store::Local(_) => None,
        }
    }
}
