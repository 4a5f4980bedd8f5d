//! Per-client limits that must hold exactly under concurrency and release on every way a
//! connection ends: connections held per client address (IPv6 grouped by prefix), sessions
//! held per verified subject (over every route, or on one); and the process's descriptors,
//! split between client connections and the outbound ones (member connections, recordings).
//!
//! A leaf: it uses nothing of the crate. Checking and counting happen under one lock, so two
//! connections racing for the last slot cannot both get it; the slot is an RAII guard, so it is
//! freed whatever ends the connection (a close, an error, a panic unwinding the task).

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Live holders per key.
#[derive(Debug)]
pub struct Counts<K> {
    counts: Mutex<HashMap<K, u32>>,
    /// Caps held to [`per_holder_share`] of the outbound descriptor budget: each holder here (a
    /// client connection, an HTTP/2 stream, a session) holds a member connection.
    budgeted: bool,
}

impl<K> Default for Counts<K> {
    fn default() -> Self {
        Counts { counts: Mutex::new(HashMap::new()), budgeted: false }
    }
}

impl<K> Counts<K> {
    /// A table whose every cap is held to [`per_holder_share`]: the proxy's per-address and
    /// per-subject caps, whose holders each take a member connection, so that at a small
    /// descriptor limit no one address or subject can take the outbound budget (at 1,024, one
    /// address under the default caps of 256 held all of it). The admin endpoint's, whose
    /// connections are reserved apart, is not.
    pub(crate) fn budgeted() -> Self {
        Counts { budgeted: true, ..Counts::default() }
    }

    /// The cap in force for a configured `max` (0: no cap, which stays 0: every client behind
    /// one load balancer's address).
    pub(crate) fn cap(&self, max: u32) -> u32 {
        match (self.budgeted, max) {
            (true, n @ 1..) => n.min(per_holder_share()),
            _ => max,
        }
    }
}

/// Live connections per client address (see [`ip_key`]).
pub type PerIp = Counts<IpAddr>;

/// Live sessions per subject.
pub type PerSubject = Counts<SubjectKey>;

/// Whose sessions a subject cap counts: a subject of an issuer, over every route (`route`
/// `None`) or on one route.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubjectKey {
    /// The route, for a per-route cap.
    pub route: Option<String>,
    /// The token's `iss`.
    pub issuer: Option<String>,
    /// The token's `sub`; `None` for tokens without one, which all count as one subject of
    /// their issuer (they cannot be told apart, so none of them escapes the cap).
    pub subject: Option<String>,
}

/// One holder's place in its key's count; released when dropped.
#[derive(Debug)]
pub struct Slot<K: Hash + Eq> {
    table: Arc<Counts<K>>,
    key: K,
}

/// A connection's slot under the per-address cap.
pub type IpSlot = Slot<IpAddr>;

impl<K: Hash + Eq + Clone> Counts<K> {
    /// A slot for `key`, unless `max` (as [`Counts::cap`] holds it) are held already (then
    /// `Err` with the count); `max == 0` means no cap (and no counting).
    pub fn try_acquire(self: &Arc<Self>, key: K, max: u32) -> Result<Option<Slot<K>>, u32> {
        let max = self.cap(max);
        if max == 0 {
            return Ok(None);
        }
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(key.clone()).or_insert(0);
        if *n >= max {
            return Err(*n);
        }
        *n += 1;
        Ok(Some(Slot { table: self.clone(), key }))
    }

    /// The `n` keys holding the most, most first.
    pub fn top(&self, n: usize) -> Vec<(K, u32)>
    where
        K: Ord,
    {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(K, u32)> = counts.iter().map(|(k, v)| (k.clone(), *v)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(n);
        v
    }
}

impl<K: Hash + Eq> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Events (new connections, WebSocket handshakes) per client address: a token bucket per
/// address (governor's GCRA), `per_second` sustained with bursts of `burst`.
pub struct RatePerIp {
    limiter: governor::DefaultKeyedRateLimiter<IpAddr>,
    clock: governor::clock::DefaultClock,
    /// The settings it was built with (a reload keeps the buckets when they stay).
    pub settings: (u32, u32),
}

impl RatePerIp {
    /// A limiter, or `None` when `per_second` is 0 (no limit).
    pub fn new(per_second: u32, burst: u32) -> Option<RatePerIp> {
        let rate = std::num::NonZeroU32::new(per_second)?;
        let burst = std::num::NonZeroU32::new(burst.max(1)).unwrap_or(rate);
        let quota = governor::Quota::per_second(rate).allow_burst(burst);
        Some(RatePerIp {
            limiter: governor::RateLimiter::keyed(quota),
            clock: governor::clock::DefaultClock::default(),
            settings: (per_second, burst.get()),
        })
    }

    /// Takes one token for `key`, or says how long until one is there.
    pub fn check(&self, key: IpAddr) -> Result<(), std::time::Duration> {
        use governor::clock::Clock;
        self.limiter.check_key(&key).map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Forgets the buckets that are full again (idle addresses), so the table stays small.
    pub fn purge(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

impl std::fmt::Debug for RatePerIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RatePerIp").field("settings", &self.settings).finish()
    }
}

/// The address connections from `ip` are counted under: itself for IPv4 (and IPv4-mapped
/// IPv6), its `/prefix` network for IPv6.
pub fn ip_key(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6);
                let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix.min(128))) };
                IpAddr::V6((bits & mask).into())
            }
        },
    }
}

/// Descriptors kept out of the budget, beyond those open at start and the admin endpoint's, for
/// what comes and goes uncounted: logs, JWKS and fleet-store connections, directory listings.
/// An eighth of a small limit.
pub const SPARE: u64 = 128;

/// How the process's descriptor limit is shared out: `clients` client connections (the cap
/// `max_connections` is held to) and `outbound` descriptors for what the proxy opens on their
/// behalf, one per member connection (a session's, a pooled one, a forward to a peer), per
/// registry lookup, per active health check and per open recording. Either side full is
/// refused cleanly (closed at accept; 503) instead of running the process out of descriptors,
/// where every accept, connect and file fails at once and the admin endpoint goes dark. Client connections never take more
/// than half, so a flood of idle ones cannot leave the sessions no member connection; HTTP/2
/// streams, whose member connections a client connection can hold by the hundred, are held to
/// the outbound side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The descriptor limit (the soft `RLIMIT_NOFILE`).
    pub limit: u64,
    /// Kept out of the budget: what is held already, and [`SPARE`].
    pub reserve: u64,
    /// Client connections at once: `max_connections`, at most half of what is not reserved.
    pub clients: usize,
    /// Outbound descriptors at once: the rest.
    pub outbound: usize,
}

impl Budget {
    /// The budget of `limit` descriptors, `held` of which are spoken for already (open, or kept
    /// for the admin endpoint), with `max_connections` configured.
    pub fn of(limit: u64, held: u64, max_connections: usize) -> Budget {
        let reserve = held.saturating_add(SPARE.min(limit / 8)).min(limit);
        let usable = limit - reserve;
        let clients = (max_connections as u64).min(usable / 2);
        let outbound = usable - clients;
        let fit = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Budget { limit, reserve, clients: fit(clients), outbound: fit(outbound) }
    }

    /// The budget of this process: its soft `RLIMIT_NOFILE` (1,024 when it cannot be read,
    /// Linux's usual default), less the descriptors it holds now (its listeners, every worker's
    /// runtime, logs, the fleet's store) and `admin` more for the admin endpoint (its connections,
    /// and the recordings they serve).
    pub fn of_process(admin: usize, max_connections: usize) -> Budget {
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(1024);
        Budget::of(limit, open_descriptors().saturating_add(admin as u64), max_connections)
    }
}

/// Descriptors this process holds now (Linux's `/proc/self/fd`; 0 where there is none).
pub fn open_descriptors() -> u64 {
    // Less the one that reads the directory.
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count().saturating_sub(1) as u64)
}

/// Raises the soft descriptor limit to the hard one, as HAProxy does by itself and NGINX with
/// `worker_rlimit_nofile`: a service manager's default soft limit (1,024) would otherwise cap a
/// proxy at a few hundred sessions. `(before, after)`, or the error.
pub fn raise_descriptor_limit() -> std::io::Result<(Option<u64>, Option<u64>)> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let before = getrlimit(Resource::Nofile);
    // An unlimited hard limit is not one Linux gives (it caps at `fs.nr_open`): left as it is.
    if let Some(hard) = before.maximum.filter(|&h| before.current.is_some_and(|c| c < h)) {
        setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: Some(hard) })?;
    }
    Ok((before.current, getrlimit(Resource::Nofile).current))
}

/// Whether a failed connect or open is the process's or the host's resources running out
/// (descriptors, ephemeral ports, socket buffers, memory), not anything of the peer's: such a
/// failure must not count against a member or a registry host.
pub fn exhausted(e: &std::io::Error) -> bool {
    exhausted_with(e, near_limit)
}

/// Descriptors a resolver needs to look a name up: a file (`/etc/hosts`, `resolv.conf`) and a
/// socket, and a few to spare.
const RESOLVER_NEEDS: usize = 8;

/// [`exhausted`], with `near_limit` asked only for an error with neither an errno nor a timeout:
/// a name that did not resolve. Out of descriptors, the system resolver cannot open
/// `/etc/hosts` or its socket and says the name is unknown ("Name or service not known"), which
/// alone would eject a member named by DNS and hold a registry host.
fn exhausted_with(e: &std::io::Error, near_limit: impl FnOnce() -> bool) -> bool {
    use rustix::io::Errno;
    match Errno::from_io_error(e) {
        // EADDRINUSE: a bind to a source address (port 0) found its port range spent.
        Some(errno) => [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM, Errno::ADDRNOTAVAIL, Errno::ADDRINUSE]
            .contains(&errno),
        // Neither a timeout nor `outbound::dial`'s "no address to try" (a route's source
        // addresses of no family the member has: the configuration's, not a want) is probed.
        None => {
            !matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::AddrNotAvailable) && near_limit()
        }
    }
}

/// Whether the process could not open [`RESOLVER_NEEDS`] more descriptors now: it opens them
/// (`/dev/null`) and closes them again, a few system calls, where counting what it holds would
/// read a directory of every descriptor (and fail at the limit itself).
fn near_limit() -> bool {
    use rustix::io::Errno;
    let mut opened = Vec::with_capacity(RESOLVER_NEEDS);
    for _ in 0..RESOLVER_NEEDS {
        match std::fs::File::open("/dev/null") {
            Ok(f) => opened.push(f),
            Err(e) => return matches!(Errno::from_io_error(&e), Some(Errno::MFILE | Errno::NFILE)),
        }
    }
    false
}

/// The outbound side of the process's [`Budget`]: one semaphore for every outbound descriptor,
/// whatever opens it. Sized by the first server the process starts.
static OUTBOUND: std::sync::OnceLock<(usize, Arc<tokio::sync::Semaphore>)> = std::sync::OnceLock::new();

fn outbound_budget(size: impl FnOnce() -> usize) -> &'static (usize, Arc<tokio::sync::Semaphore>) {
    OUTBOUND.get_or_init(|| {
        let n = size().min(tokio::sync::Semaphore::MAX_PERMITS);
        (n, Arc::new(tokio::sync::Semaphore::new(n)))
    })
}

/// The share of the outbound budget that pooled keep-alive connections (in use or idle) may
/// hold: half. Idle ones linger for `pool_idle_timeout` whoever made them (a burst of
/// concurrent requests over one connection left 91 of 91 slots idle in the pool, and every new
/// session was refused for 90 s).
static POOLED: std::sync::OnceLock<(usize, Arc<tokio::sync::Semaphore>)> = std::sync::OnceLock::new();

/// The share that plain requests' connections may hold together: pooled ones and, past the
/// pooled share, those that serve one request and close ([`plain_slot`]): three quarters. The
/// last quarter stays for sessions, lookups and recordings, however many plain requests are in
/// flight.
static PLAIN: std::sync::OnceLock<(usize, Arc<tokio::sync::Semaphore>)> = std::sync::OnceLock::new();

/// The outbound budget in force: sized by the first server, or, used before any (a unit test, a
/// tool), from the process's limit alone.
fn outbound() -> &'static (usize, Arc<tokio::sync::Semaphore>) {
    outbound_budget(|| Budget::of_process(0, usize::MAX).outbound)
}

fn pooled_budget() -> &'static (usize, Arc<tokio::sync::Semaphore>) {
    POOLED.get_or_init(|| {
        let n = (outbound().0 / 2).max(1);
        (n, Arc::new(tokio::sync::Semaphore::new(n)))
    })
}

fn plain_budget() -> &'static (usize, Arc<tokio::sync::Semaphore>) {
    PLAIN.get_or_init(|| {
        let n = (outbound().0 * 3 / 4).max(1);
        (n, Arc::new(tokio::sync::Semaphore::new(n)))
    })
}

/// The most one address or subject may hold under each of its caps ([`Counts::budgeted`]):
/// an eighth of the outbound budget, so that one address under both of its caps (connections,
/// HTTP/2 streams) holds about a quarter of the budget (a recorded session holds two: its
/// member connection and its file). Only a small descriptor limit makes it bind: from about
/// 4,500 up the defaults are below it.
pub(crate) fn per_holder_share() -> u32 {
    u32::try_from(outbound().0 / 8).unwrap_or(u32::MAX).max(1)
}

/// Sizes the outbound budget from `budget` (the first call in the process decides); the size
/// in force.
pub fn init_outbound(budget: &Budget) -> usize {
    let size = outbound_budget(|| budget.outbound).0;
    pooled_budget();
    plain_budget();
    size
}

/// An outbound descriptor's slot in the budget, held as long as the descriptor is open.
#[derive(Debug)]
pub struct OutboundSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// A plain request's connection: its place in the plain share.
    _plain: Option<tokio::sync::OwnedSemaphorePermit>,
    /// A pooled connection: its place in the pooled share.
    _pooled: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// A slot for a pooled keep-alive connection: one of the pooled share's, one of the plain
/// share's, and one of the outbound budget's.
pub fn pooled_slot() -> Result<OutboundSlot, Spent> {
    let (size, sem) = pooled_budget();
    let pooled = sem.clone().try_acquire_owned().map_err(|_| Spent(*size))?;
    plain_slot().map(|s| OutboundSlot { _pooled: Some(pooled), ..s })
}

/// A slot for a plain request's connection that serves it alone (the pooled share held): one
/// of the plain share's, and one of the outbound budget's.
pub(crate) fn plain_slot() -> Result<OutboundSlot, Spent> {
    let (size, sem) = plain_budget();
    let plain = sem.clone().try_acquire_owned().map_err(|_| Spent(*size))?;
    outbound_slot().map(|s| OutboundSlot { _plain: Some(plain), ..s })
}

/// Whether pooled connections hold more than three quarters of their share: requests made now
/// ask their member to close the connection after its answer, so that connections idle in the
/// pool never keep the share from members not yet connected to.
pub fn pooled_pressure() -> bool {
    let (held, size) = usage(pooled_budget());
    held * 4 > size * 3
}

/// The outbound budget is spent: every slot is held by an open descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the process's {0} outbound descriptors are all in use")]
pub struct Spent(pub usize);

/// A slot for one more outbound descriptor, or [`Spent`]. Taken before the descriptor is
/// opened, and never waited for: a full budget refuses at once.
pub fn outbound_slot() -> Result<OutboundSlot, Spent> {
    let (size, sem) = outbound();
    sem.clone()
        .try_acquire_owned()
        .map(|p| OutboundSlot { _permit: p, _plain: None, _pooled: None })
        .map_err(|_| Spent(*size))
}

/// Pooled keep-alive connections `(held, share)`, for the metrics.
pub fn pooled_connections() -> (usize, usize) {
    usage(pooled_budget())
}

/// Outbound descriptors `(held, budget)`, for the metrics.
pub fn outbound_descriptors() -> (usize, usize) {
    usage(outbound())
}

/// What a budget's slots are: `(held, size)`.
fn usage((size, sem): &(usize, Arc<tokio::sync::Semaphore>)) -> (usize, usize) {
    (size.saturating_sub(sem.available_permits()), *size)
}

/// At most one log line per refusal reason per second, so a flood of refusals is visible
/// without flooding the log: `Some(n)` when a line may be written now, `n` being the lines of
/// that reason held back since the last one; `None` to hold this one back.
pub fn log_sample(reason: &'static str) -> Option<u64> {
    static LAST: std::sync::OnceLock<Mutex<HashMap<&'static str, (std::time::Instant, u64)>>> =
        std::sync::OnceLock::new();
    let mut map = LAST.get_or_init(Default::default).lock().ok()?;
    let now = std::time::Instant::now();
    match map.get_mut(reason) {
        Some((at, held)) if now.duration_since(*at) < std::time::Duration::from_secs(1) => {
            *held += 1;
            None
        }
        Some((at, held)) => {
            let n = *held;
            (*at, *held) = (now, 0);
            Some(n)
        }
        None => {
            map.insert(reason, (now, 0));
            Some(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_budget_keeps_what_is_held_and_never_gives_clients_more_than_half() {
        // This machine's limit, 20 descriptors open at start and the admin endpoint's 64.
        let b = Budget::of(20_000, 84, 100_000);
        assert_eq!((b.reserve, b.clients, b.outbound), (212, 9_894, 9_894));
        assert_eq!(b.reserve + b.clients as u64 + b.outbound as u64, b.limit);
        // A service manager's default, and a small limit: an eighth spare below 1,024.
        assert_eq!(Budget::of(1_024, 84, 100_000), Budget { limit: 1_024, reserve: 212, clients: 406, outbound: 406 });
        assert_eq!(Budget::of(256, 84, 100_000), Budget { limit: 256, reserve: 116, clients: 70, outbound: 70 });
        // A lower max_connections leaves the rest to the outbound side.
        let b = Budget::of(20_000, 84, 1_000);
        assert_eq!((b.clients, b.outbound), (1_000, 18_788));
        // Nothing left: nothing given.
        assert_eq!(Budget::of(100, 500, 10), Budget { limit: 100, reserve: 100, clients: 0, outbound: 0 });
    }

    #[test]
    fn running_out_of_descriptors_or_ports_is_the_processs_own_want() {
        use rustix::io::Errno;
        for own in [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM, Errno::ADDRNOTAVAIL, Errno::ADDRINUSE] {
            assert!(exhausted(&std::io::Error::from(own)), "{own:?}");
        }
        for peers in [Errno::CONNREFUSED, Errno::TIMEDOUT, Errno::HOSTUNREACH, Errno::CONNRESET] {
            assert!(!exhausted(&std::io::Error::from(peers)), "{peers:?}");
        }
        assert!(!exhausted(&std::io::Error::other("no errno")));
        // A name that did not resolve: the process's want only when it is at its limit (its
        // resolver could not open what it reads), else the name's.
        let unknown = std::io::Error::other("failed to lookup address information: Name or service not known");
        assert!(exhausted_with(&unknown, || true), "at the limit");
        assert!(!exhausted_with(&unknown, || false), "far from it");
        assert!(!exhausted_with(&std::io::Error::from(Errno::CONNREFUSED), || true), "an errno decides alone");
        let timeout = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
        assert!(!exhausted_with(&timeout, || true), "a timeout is the peer's, whatever the process holds");
        let no_address = std::io::Error::new(std::io::ErrorKind::AddrNotAvailable, "no address to connect to");
        assert!(!exhausted_with(&no_address, || true), "dial's no address to try is the configuration's");
        assert!(!near_limit(), "this test process is far from its limit");
    }

    /// Set in the child process of [`near_limit_sees_a_real_emfile`], which runs that test alone.
    const EMFILE_CHILD: &str = "PORTCULLIS_TEST_EMFILE_CHILD";

    /// The probe and the lookup at a real `EMFILE`, not an injected one. The test runs itself
    /// again in a child process (this binary, this test alone) so that lowering the descriptor
    /// limit and spending it touch no other test.
    #[test]
    fn near_limit_sees_a_real_emfile() {
        use rustix::io::Errno;
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        const NAME: &str = "limits::tests::near_limit_sees_a_real_emfile";
        // The child is the process this test's own process started: a variable set outside
        // the test run does not make every test's process lower its limit.
        let parent = std::os::unix::process::parent_id().to_string();
        if std::env::var_os(EMFILE_CHILD).is_none_or(|v| v != parent.as_str()) {
            let out = std::process::Command::new(std::env::current_exe().expect("this test binary"))
                .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
                .env(EMFILE_CHILD, std::process::id().to_string())
                .output()
                .expect("the child runs");
            let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success(), "the child failed:\n{stdout}\n{stderr}");
            assert!(stdout.contains("test result: ok. 1 passed"), "the child did not run the test:\n{stdout}");
            return;
        }
        // 64 above the highest descriptor the process holds (the limit bounds descriptor
        // numbers, and the gaps below the highest are free too).
        let highest = std::fs::read_dir("/proc/self/fd")
            .expect("this process's descriptors")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .max()
            .unwrap_or(2);
        let limit = highest + 1 + 64;
        let hard = getrlimit(Resource::Nofile).maximum;
        setrlimit(Resource::Nofile, Rlimit { current: Some(limit), maximum: hard }).expect("a lower soft limit");
        let mut held = Vec::new();
        let spent = loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) => held.push(f),
                Err(e) => break e,
            }
            assert!(held.len() as u64 <= limit, "no EMFILE at a limit of {limit}");
        };
        assert!(held.len() >= RESOLVER_NEEDS, "only {} opened below the limit", held.len());
        assert_eq!(Errno::from_io_error(&spent), Some(Errno::MFILE));
        assert!(near_limit(), "at the limit");
        // The system resolver at the limit cannot open what it reads. glibc then says the name
        // is not known (no errno); whatever it says, the failure is the process's.
        let lookup = std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 80)).map(|a| a.count());
        eprintln!("the lookup at the limit: {lookup:?}");
        let lookup = lookup.expect_err("no lookup without descriptors");
        assert!(exhausted(&lookup), "{lookup}");
        // Where the probe draws its line: RESOLVER_NEEDS - 1 free is still near the limit,
        // RESOLVER_NEEDS free is not.
        held.truncate(held.len() - (RESOLVER_NEEDS - 1));
        assert!(near_limit(), "{} free", RESOLVER_NEEDS - 1);
        held.pop();
        assert!(!near_limit(), "{RESOLVER_NEEDS} free");
        assert!(!near_limit(), "the probe closed what it opened");
        assert!(std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 80)).is_ok(), "a lookup once it has room");
    }

    #[test]
    fn caps_per_address_and_frees_on_drop() {
        let t: Arc<PerIp> = Arc::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = t.try_acquire(ip_key(ip, 64), 2).unwrap();
        let b = t.try_acquire(ip_key(ip, 64), 2).unwrap();
        assert_eq!(t.try_acquire(ip_key(ip, 64), 2).unwrap_err(), 2);
        assert!(
            t.try_acquire(ip_key("192.0.2.2".parse().unwrap(), 64), 2).is_ok(),
            "another address has its own count"
        );
        drop(a);
        assert!(t.try_acquire(ip_key(ip, 64), 2).is_ok());
        drop(b);
        assert!(t.top(10).is_empty(), "released slots leave no entry");
        assert!(t.try_acquire(ip, 0).unwrap().is_none(), "0 is no cap");
    }

    #[test]
    fn ipv6_is_grouped_by_prefix_and_mapped_ipv4_by_address() {
        let t: Arc<PerIp> = Arc::default();
        let _a = t.try_acquire(ip_key("2001:db8:1:2::1".parse().unwrap(), 64), 1).unwrap();
        assert!(t.try_acquire(ip_key("2001:db8:1:2:ffff::9".parse().unwrap(), 64), 1).is_err(), "same /64");
        assert!(t.try_acquire(ip_key("2001:db8:1:3::1".parse().unwrap(), 64), 1).is_ok(), "another /64");
        let _b = t.try_acquire(ip_key("::ffff:192.0.2.9".parse().unwrap(), 64), 1).unwrap();
        assert!(t.try_acquire(ip_key("192.0.2.9".parse().unwrap(), 64), 1).is_err(), "mapped IPv4 counts as IPv4");
    }

    #[test]
    fn handshakes_are_limited_per_address_with_a_burst() {
        let r = RatePerIp::new(1, 3).expect("limiter");
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            assert!(r.check(ip).is_ok());
        }
        let wait = r.check(ip).unwrap_err();
        assert!(wait > std::time::Duration::ZERO && wait <= std::time::Duration::from_secs(1), "{wait:?}");
        assert!(r.check("192.0.2.2".parse().unwrap()).is_ok(), "another address has its own bucket");
        assert!(RatePerIp::new(0, 3).is_none(), "0 is no limit");
    }

    #[test]
    fn exact_under_concurrency() {
        let t: Arc<PerIp> = Arc::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let got: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..16).map(|_| s.spawn(|| t.try_acquire(ip, 5).ok().flatten())).collect();
            handles.into_iter().filter_map(|h| h.join().ok().flatten()).collect()
        });
        assert_eq!(got.len(), 5);
    }
}
