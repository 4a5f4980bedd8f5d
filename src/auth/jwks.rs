//! JWKS sources: keys fetched from an `http(s)://` URL, cached by `kid` in moka.
//!
//! - Fetched at start and every `refresh_interval`.
//! - An unknown `kid` triggers a refetch, at most once per `min_refetch_interval`; concurrent
//!   misses wait on the one fetch in flight instead of sending their own.
//! - When a fetch fails, the last good keys stay in use (stale-while-error), and the failure
//!   is logged and counted (`portcullis_jwks_fetches_total{result="error"}`,
//!   `portcullis_jwks_stale` = 1).
//! - A successful fetch drops keys that left the set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use sha2::Digest as _;

use super::AuthConfigError;
use crate::config::JwksSettings;

/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// A key from a JWKS, with the algorithms it may verify.
pub struct JwkKey {
    /// The verification key.
    pub key: DecodingKey,
    /// Allowed algorithms (the source's allowlist, narrowed by the JWK's own `alg`).
    pub algorithms: Vec<Algorithm>,
    /// The key's fingerprint (of its RFC 7638 thumbprint), to tell a key replaced under the
    /// same `kid`.
    pub fingerprint: super::KeyPrint,
}

/// One JWKS endpoint and its cached keys.
pub struct JwksSource {
    settings: JwksSettings,
    keys: moka::sync::Cache<String, Arc<JwkKey>>,
    /// Time of the last fetch triggered by an unknown kid; the lock coalesces such fetches.
    last_refetch: tokio::sync::Mutex<Option<Instant>>,
    client: crate::outbound::HttpClient,
    fetches: AtomicU64,
    /// Called when a fetch drops a key or replaces one under its `kid`: tokens verified with
    /// the old key set are verified again, and their sessions end.
    retired: Retired,
}

/// What a source calls when a fetch retires or replaces keys, with their fingerprints.
pub type Retired = Arc<dyn Fn(Vec<super::KeyPrint>) + Send + Sync>;

/// Why a JWKS fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// Connecting or talking to the endpoint failed.
    #[error("request failed: {0}")]
    Http(String),
    /// The endpoint answered a non-2xx status.
    #[error("status {0}")]
    Status(u16),
    /// The document is not a JWKS.
    #[error("invalid JWKS document: {0}")]
    Parse(String),
    /// The fetch took longer than the configured timeout.
    #[error("timed out")]
    Timeout,
}

impl JwksSource {
    /// Sets up a source; nothing is fetched until [`JwksSource::spawn_refresher`] or a lookup.
    /// `retired` is called whenever a fetch takes a key away or replaces one.
    pub fn new(settings: JwksSettings, retired: Retired) -> Result<Arc<Self>, AuthConfigError> {
        let err = |message: String| AuthConfigError::Jwks { url: crate::outbound::loggable(&settings.url), message };
        let client = crate::outbound::HttpClient::new(settings.ca.as_deref()).map_err(err)?;
        Ok(Arc::new(JwksSource {
            settings,
            keys: moka::sync::Cache::builder().max_capacity(10_000).build(),
            last_refetch: tokio::sync::Mutex::new(None),
            client,
            fetches: AtomicU64::new(0),
            retired,
        }))
    }

    /// Fetches now, then every `refresh_interval` until the source is dropped.
    pub fn spawn_refresher(self: &Arc<Self>) {
        let weak: Weak<JwksSource> = Arc::downgrade(self);
        let interval = self.settings.refresh_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let Some(source) = weak.upgrade() else { return };
                let _ = source.refresh().await;
            }
        });
    }

    /// The fingerprints of the keys in the last good set.
    pub fn prints(&self) -> Vec<super::KeyPrint> {
        self.keys.iter().map(|(_, k)| k.fingerprint).collect()
    }

    /// The URL it fetches.
    pub fn url(&self) -> &http::Uri {
        &self.settings.url
    }

    /// Takes `previous`'s keys as its last good set (a reload that keeps the source): a key the
    /// next fetch drops is then told retired, as it would have been without the reload.
    pub fn seed_from(&self, previous: &JwksSource) {
        for (kid, key) in previous.keys.iter() {
            self.keys.insert((*kid).clone(), key);
        }
    }

    /// Number of fetches attempted so far.
    pub fn fetch_count(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// The key for `kid`, refetching (rate-limited, coalesced) when it is unknown.
    pub async fn get(&self, kid: &str) -> Option<Arc<JwkKey>> {
        if let Some(k) = self.keys.get(kid) {
            return Some(k);
        }
        {
            let mut last = self.last_refetch.lock().await;
            // Another caller may have fetched while this one waited for the lock.
            if let Some(k) = self.keys.get(kid) {
                return Some(k);
            }
            let allowed = last.is_none_or(|t| t.elapsed() >= self.settings.min_refetch_interval);
            if !allowed {
                return None;
            }
            *last = Some(Instant::now());
            let _ = self.refresh().await;
        }
        self.keys.get(kid)
    }

    /// Fetches the key set and replaces the cached keys; on failure the old keys stay.
    pub async fn refresh(&self) -> Result<usize, JwksError> {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let result = self.fetch().await;
        let url = crate::outbound::loggable(&self.settings.url);
        match result {
            Ok(set) => {
                let mut loaded = Vec::new();
                for jwk in &set.keys {
                    let Some(kid) = jwk.common.key_id.clone() else { continue };
                    match self.load(jwk) {
                        Some(k) => loaded.push((kid, Arc::new(k))),
                        None => tracing::debug!(%url, %kid, "jwk skipped: unusable or algorithm not allowed"),
                    }
                }
                let fresh: std::collections::HashSet<String> = loaded.iter().map(|(k, _)| k.clone()).collect();
                // A key taken away or replaced under its kid (a rotation after a compromise)
                // must stop authorizing tokens already verified with it, cached or not, and the
                // sessions they opened.
                let mut retired = Vec::new();
                for (kid, key) in loaded {
                    if let Some(old) = self.keys.get(&kid).filter(|old| old.fingerprint != key.fingerprint) {
                        retired.push(old.fingerprint);
                    }
                    self.keys.insert(kid, key);
                }
                let stale: Vec<(String, Arc<JwkKey>)> = self
                    .keys
                    .iter()
                    .filter(|(k, _)| !fresh.contains(k.as_str()))
                    .map(|(k, v)| ((*k).clone(), v))
                    .collect();
                for (kid, key) in stale {
                    retired.push(key.fingerprint);
                    self.keys.invalidate(&kid);
                }
                if !retired.is_empty() {
                    (self.retired)(retired);
                    tracing::info!(%url, "jwks keys retired or replaced; tokens verified with them are refused, and their sessions end");
                }
                crate::metrics::jwks_fetch(true);
                tracing::debug!(%url, keys = fresh.len(), "jwks refreshed");
                Ok(fresh.len())
            }
            Err(e) => {
                crate::metrics::jwks_fetch(false);
                tracing::warn!(%url, error = %e, cached_keys = self.keys.entry_count(), "jwks fetch failed; keeping the last good keys");
                Err(e)
            }
        }
    }

    fn load(&self, jwk: &Jwk) -> Option<JwkKey> {
        let key = DecodingKey::from_jwk(jwk).ok()?;
        let mut algorithms = self.settings.algorithms.clone();
        if let Some(alg) = jwk.common.key_algorithm.and_then(algorithm_of) {
            algorithms.retain(|a| *a == alg);
        }
        // Keep only algorithms whose family matches the key type.
        algorithms.retain(|a| key.family() == a.family());
        // The key itself (RFC 7638's thumbprint: its required members only), not how the
        // document writes it: a provider that adds `x5c` or `use` to an unchanged key has not
        // replaced it.
        let thumbprint = jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256).ok()?;
        let fingerprint = sha2::Sha256::digest(thumbprint.as_bytes()).into();
        (!algorithms.is_empty()).then_some(JwkKey { key, algorithms, fingerprint })
    }

    async fn fetch(&self) -> Result<JwkSet, JwksError> {
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::ACCEPT, http::HeaderValue::from_static("application/json"));
        let (status, body) =
            self.client.get(&self.settings.url, headers, MAX_JWKS_BYTES, self.settings.timeout).await.map_err(|e| {
                match e {
                    crate::outbound::OutboundError::Timeout | crate::outbound::OutboundError::ConnectTimeout => {
                        JwksError::Timeout
                    }
                    e => JwksError::Http(e.to_string()),
                }
            })?;
        if !status.is_success() {
            return Err(JwksError::Status(status.as_u16()));
        }
        serde_json::from_slice(&body).map_err(|e| JwksError::Parse(e.to_string()))
    }
}

fn algorithm_of(a: KeyAlgorithm) -> Option<Algorithm> {
    use Algorithm::*;
    Some(match a {
        KeyAlgorithm::HS256 => HS256,
        KeyAlgorithm::HS384 => HS384,
        KeyAlgorithm::HS512 => HS512,
        KeyAlgorithm::RS256 => RS256,
        KeyAlgorithm::RS384 => RS384,
        KeyAlgorithm::RS512 => RS512,
        KeyAlgorithm::PS256 => PS256,
        KeyAlgorithm::PS384 => PS384,
        KeyAlgorithm::PS512 => PS512,
        KeyAlgorithm::ES256 => ES256,
        KeyAlgorithm::ES384 => ES384,
        KeyAlgorithm::EdDSA => EdDSA,
        _ => return None,
    })
}
