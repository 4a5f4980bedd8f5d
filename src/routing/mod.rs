//! Routing: which route a request takes, who the members of its pool are, which of them are
//! healthy, and in which order a session tries them.
//!
//! - [`table`]: host and path matching over the configured routes, with capture validation.
//! - `pool.rs`: a route's pool (`RouteState`): static or registry members, the health filter,
//!   the balance order and sticky keys, active checks. The connect stage only dials what it
//!   hands out.
//! - [`resolver`]: asks the fleet's HTTP registry for an agent's members and caches the answer in
//!   moka: a TTL for members, a shorter one for "not found", one registry request for any number
//!   of concurrent misses, and the last good members kept for a bounded time after expiry so a
//!   registry outage does not take known agents down (stale-if-error).
//! - `health.rs`: passive health. A failed connect ejects the member for a backoff that doubles
//!   on each further failure up to a cap, and so do failed handshakes of two requesters that
//!   outweigh the member's completed ones; a success forgives the backoff.
//! - [`sticky`]: member choice. Weighted rendezvous hashing for sticky keys, round robin and least
//!   connections otherwise.
//!
//! They compose in `pool::RouteState::candidates`: resolve the pool, keep its
//! `health::PassiveHealth::healthy` members, then order them ([`sticky::rank`] by the
//! session's key, or round robin, or [`sticky::ConnCounts::by_load`]); the connect stage tries
//! the first, falling back to the next on failure. The sticky choice is a pure function of the key and the healthy
//! member set, hashed with xxh3 (stable across builds and platforms), so every Portcullis
//! instance sends a key to the same member without sharing any state, and removing
//! a member moves only the keys that were on it.

pub mod affinity;
pub(crate) mod health;
pub(crate) mod pool;
pub mod resolver;
pub mod sticky;
pub mod table;
