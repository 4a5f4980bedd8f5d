//! Token verification: static keys and JWKS, claims checks, the verified-token cache and the
//! revocation denylist. The auth *stage* of the data path (where tokens are found, which agent
//! they grant, Origin policy) is `proxy/auth.rs`; this module only answers "is this token
//! valid, and what does it say".
//!
//! - Every key has an explicit algorithm allowlist of one family, so `none` and algorithm
//!   confusion (an HS256 token "signed" with an RSA public key) are refused before any
//!   signature is checked.
//! - Verified tokens are cached by SHA-256 of the token until they expire, so a reconnect storm
//!   does not re-verify signatures; the denylist is consulted on every lookup, cached or not.
//! - Tokens and secrets never reach logs, metrics or error bodies: [`Secret`] redacts itself and
//!   errors carry only a reason.

pub mod jwks;

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub use crate::config::Secret;
use crate::config::{AuthSettings, KeyMaterial, RouteAuth};
use jwks::JwksSource;

/// Why a request was not authenticated or not authorized. Carries no token data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token in any configured source.
    #[error("no token")]
    Missing,
    /// The token is not a well-formed JWT.
    #[error("malformed token")]
    Malformed,
    /// The token is longer than `max_token_size`.
    #[error("token too large")]
    TooLarge,
    /// Two sources carried different tokens.
    #[error("conflicting tokens in several places")]
    Ambiguous,
    /// The signature does not verify, or the algorithm is not allowed for the key.
    #[error("invalid signature")]
    BadSignature,
    /// `exp` has passed.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iss` is not accepted on this route.
    #[error("wrong issuer")]
    WrongIssuer,
    /// `aud` is not accepted on this route.
    #[error("wrong audience")]
    WrongAudience,
    /// A required claim is missing.
    #[error("missing required claim")]
    MissingClaim,
    /// No key matches the token's `kid`.
    #[error("unknown signing key")]
    UnknownKey,
    /// The subject or token was revoked.
    #[error("token revoked")]
    Revoked,
    /// The token is valid but does not grant this agent.
    #[error("token does not grant access to this agent")]
    Forbidden,
    /// The request's Origin is not allowed on this route.
    #[error("origin not allowed")]
    Origin,
    /// The token is not in the verified cache and its signature check was refused: the
    /// client address made too many of them (`token_check_rate_per_ip`); try after the wait.
    #[error("too many token checks from this address")]
    Throttled(Duration),
}

/// Asked before the signature of a token that is not in the verified-token cache is checked:
/// `Err(wait)` refuses the check, with how long until one would be allowed.
pub type SignatureGate<'a> = &'a (dyn Fn() -> Result<(), Duration> + Sync);

impl AuthError {
    /// Every `portcullis_auth_failures_total{reason}` label ([`AuthError::Throttled`] is
    /// answered as a rate limit and counted elsewhere).
    pub const REASONS: &'static [&'static str] = &[
        "missing",
        "malformed",
        "too_large",
        "ambiguous",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "wrong_issuer",
        "wrong_audience",
        "missing_claim",
        "unknown_key",
        "revoked",
        "forbidden",
        "origin",
    ];

    /// Bounded label for `portcullis_auth_failures_total{reason}`.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::TooLarge => "too_large",
            AuthError::Ambiguous => "ambiguous",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::MissingClaim => "missing_claim",
            AuthError::UnknownKey => "unknown_key",
            AuthError::Revoked => "revoked",
            AuthError::Forbidden => "forbidden",
            AuthError::Origin => "origin",
            AuthError::Throttled(_) => "throttled",
        }
    }

    /// True for 403 (authenticated but not allowed); false for 401.
    pub fn is_forbidden(self) -> bool {
        matches!(self, AuthError::Forbidden | AuthError::Origin)
    }

    /// The RFC 6750 `error` value, if any (none when no token was sent at all).
    pub fn bearer_error(self) -> Option<&'static str> {
        match self {
            AuthError::Missing | AuthError::Origin | AuthError::Throttled(_) => None,
            AuthError::Malformed | AuthError::Ambiguous | AuthError::TooLarge => Some("invalid_request"),
            AuthError::Forbidden => Some("insufficient_scope"),
            _ => Some("invalid_token"),
        }
    }
}

/// Verified claims. Only [`Authenticator::verify`] can make one.
#[derive(Debug)]
pub struct Claims {
    exp: u64,
    iat: Option<u64>,
    /// The fingerprint of the key that verified it: a session of the token ends when that key
    /// leaves the keys in force ([`Authenticator::keys_in_force`]).
    key: Option<KeyPrint>,
    sub: Option<String>,
    jti: Option<String>,
    all: Map<String, Value>,
}

impl Claims {
    /// The `sub` claim.
    pub fn subject(&self) -> Option<&str> {
        self.sub.as_deref()
    }

    /// The `iss` claim, when it is a string.
    pub fn issuer(&self) -> Option<&str> {
        self.all.get("iss").and_then(Value::as_str)
    }

    /// The fingerprint of the key that verified the token (none for claims not from a token).
    pub fn key(&self) -> Option<KeyPrint> {
        self.key
    }

    /// The `iat` claim (issued at, Unix seconds), if any.
    pub fn iat(&self) -> Option<u64> {
        self.iat
    }

    /// The `jti` claim.
    pub fn jti(&self) -> Option<&str> {
        self.jti.as_deref()
    }

    /// `exp`, in seconds since the Unix epoch.
    pub fn exp(&self) -> u64 {
        self.exp
    }

    /// True when the `aud` claim (a string, or an array of strings) names `audience`.
    pub fn has_audience(&self, audience: &str) -> bool {
        match self.all.get("aud") {
            Some(Value::String(a)) => a == audience,
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).any(|a| a == audience),
            _ => false,
        }
    }

    /// Claims from a JSON object, as a verified token would give them (for tests).
    #[cfg(test)]
    pub(crate) fn from_value(v: Value) -> Option<Claims> {
        match v {
            Value::Object(all) => claims_from(all).ok(),
            _ => None,
        }
    }

    /// Any claim by name.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.all.get(name)
    }

    /// Whether `value` is in claim `name` (an array of strings, or a space-separated string).
    pub fn contains(&self, name: &str, value: &str) -> bool {
        match self.all.get(name) {
            Some(Value::Array(items)) => items.iter().any(|v| v.as_str() == Some(value)),
            Some(Value::String(s)) => s.split(' ').any(|x| x == value),
            _ => false,
        }
    }

    /// Like [`Claims::contains`], with ASCII case ignored: for agent ids, which name DNS labels.
    pub fn contains_ignoring_case(&self, name: &str, value: &str) -> bool {
        self.any_value(name, |s| s.eq_ignore_ascii_case(value))
    }

    /// Whether claim `name` (a string array, or a space-separated string as `scope` is) has an
    /// entry that `f` accepts.
    pub fn any_value(&self, name: &str, f: impl Fn(&str) -> bool) -> bool {
        match self.all.get(name) {
            Some(Value::Array(items)) => items.iter().any(|v| v.as_str().is_some_and(&f)),
            Some(Value::String(s)) => s.split(' ').any(f),
            _ => false,
        }
    }
}

/// A loaded static key.
struct StaticKey {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
    print: KeyPrint,
}

/// A verification key's fingerprint (SHA-256 of its material, or of the JWK as published).
pub type KeyPrint = [u8; 32];

/// Why the authentication configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// A key file could not be read or parsed.
    #[error("key {path}: {message}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A JWKS source could not be set up.
    #[error("jwks {url}: {message}")]
    Jwks {
        /// The URL.
        url: String,
        /// What is wrong.
        message: String,
    },
}

/// The denylist key of a subject revocation: of one issuer, or of any. NUL cannot occur in a
/// JSON string's decoded issuer without an escape, and the two forms have different prefixes.
fn subject_key(issuer: Option<&str>, subject: &str) -> String {
    match issuer {
        Some(iss) => format!("sub-iss:{iss}\u{0}{subject}"),
        None => format!("sub-any:{subject}"),
    }
}

/// The denylist key of a token id: of one issuer (a `jti` is unique per issuer only, RFC 7519
/// §4.1.7), or of any.
fn jti_key(issuer: Option<&str>, jti: &str) -> String {
    match issuer {
        Some(iss) => format!("jti-iss:{iss}\u{0}{jti}"),
        None => format!("jti-any:{jti}"),
    }
}

/// Verifies tokens; rebuilt on config reload (the [`Denylist`] is kept across reloads).
pub struct Authenticator {
    keys: Vec<StaticKey>,
    jwks: Vec<Arc<JwksSource>>,
    leeway: Duration,
    max_token_size: usize,
    verified: moka::sync::Cache<[u8; 32], Verified>,
    /// Bumped by a JWKS fetch that takes a key away or replaces one: a cached token verified
    /// before is verified again, with the keys in force.
    key_epoch: Arc<std::sync::atomic::AtomicU64>,
    denylist: Arc<Denylist>,
}

/// A token of the verified-token cache: its claims, and the key set's epoch it was verified
/// under.
#[derive(Clone)]
struct Verified {
    claims: Arc<Claims>,
    epoch: u64,
}

/// Revoked subjects and token ids, refused until their tokens expire. One per process: it
/// outlives configuration reloads.
pub struct Denylist {
    /// `sub:<subject>` or `jti:<id>` → when revoked and until when.
    denied: moka::sync::Cache<String, Denial>,
    /// Ended session envelopes (by digest) → until when. A cache of its own: clients end their
    /// own sessions at will, and must never push an operator's revocation out of `denied`.
    envelopes: moka::sync::Cache<String, Denial>,
    /// The fingerprints of keys a JWKS fetch retired or replaced, for the server to end the
    /// sessions of the tokens they verified ([`Denylist::take_retired_keys`]), and its wake-up.
    retired_keys: std::sync::Mutex<Vec<KeyPrint>>,
    /// Told when `retired_keys` has some.
    pub keys_retired: tokio::sync::Notify,
}

impl Default for Denylist {
    fn default() -> Self {
        let cache = || moka::sync::Cache::builder().max_capacity(1_000_000).expire_after(ExpireAt).build();
        Denylist {
            denied: cache(),
            envelopes: cache(),
            retired_keys: std::sync::Mutex::default(),
            keys_retired: tokio::sync::Notify::new(),
        }
    }
}

#[derive(Clone, Copy)]
struct Denial {
    since: u64,
    until: u64,
}

/// Expires cache entries at their own deadline (token `exp`, or denial end).
struct ExpireAt;

impl moka::Expiry<[u8; 32], Verified> for ExpireAt {
    fn expire_after_create(&self, _: &[u8; 32], v: &Verified, _: std::time::Instant) -> Option<Duration> {
        Some(Duration::from_secs(v.claims.exp.saturating_sub(now_secs())))
    }
}

impl moka::Expiry<String, Denial> for ExpireAt {
    fn expire_after_create(&self, _: &String, v: &Denial, _: std::time::Instant) -> Option<Duration> {
        Some(Duration::from_secs(v.until.saturating_sub(now_secs()).max(1)))
    }

    fn expire_after_update(
        &self,
        _: &String,
        v: &Denial,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(Duration::from_secs(v.until.saturating_sub(now_secs()).max(1)))
    }
}

impl Authenticator {
    /// Loads static keys and sets up JWKS sources (fetched in the background, refreshed
    /// periodically). Needs a Tokio runtime when JWKS sources are configured.
    pub fn new(
        settings: &AuthSettings,
        denylist: Arc<Denylist>,
        previous: Option<&Authenticator>,
    ) -> Result<Arc<Self>, AuthConfigError> {
        let mut keys = Vec::with_capacity(settings.keys.len());
        for k in &settings.keys {
            let (key, print) = match &k.material {
                KeyMaterial::Secret(s) => (DecodingKey::from_secret(s.expose()), Sha256::digest(s.expose()).into()),
                KeyMaterial::PublicKeyPem(path) => load_public_key(path, k.algorithms[0])?,
            };
            keys.push(StaticKey { kid: k.kid.clone(), algorithms: k.algorithms.clone(), key, print });
        }
        let mut jwks = Vec::with_capacity(settings.jwks.len());
        let key_epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
        // A fetch that retires or replaces a key: cached tokens are verified again (the
        // epoch), and the sessions of tokens it verified end (the server's sweep).
        let retired: jwks::Retired = {
            let (epoch, denylist) = (key_epoch.clone(), denylist.clone());
            Arc::new(move |prints| {
                epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                denylist.retire_keys(prints);
            })
        };
        for j in &settings.jwks {
            let source = JwksSource::new(j.clone(), retired.clone())?;
            // A source the reload keeps starts from the keys it had: what its next fetch drops
            // is retired, as without the reload.
            if let Some(old) = previous.and_then(|p| p.jwks.iter().find(|o| o.url() == &j.url)) {
                source.seed_from(old);
            }
            source.spawn_refresher();
            jwks.push(source);
        }
        Ok(Arc::new(Authenticator {
            keys,
            jwks,
            leeway: settings.leeway,
            max_token_size: settings.max_token_size,
            verified: moka::sync::Cache::builder().max_capacity(settings.cache_capacity).expire_after(ExpireAt).build(),
            key_epoch,
            denylist,
        }))
    }

    /// The fingerprints of the keys it knows: the static keys and every JWKS source's last
    /// good set. A reload ends the sessions of the keys the old authenticator knew and the new
    /// one does not ([`KeyPrint`]).
    pub fn known_keys(&self) -> HashSet<KeyPrint> {
        let jwks = self.jwks.iter().flat_map(|s| s.prints());
        self.keys.iter().map(|k| k.print).chain(jwks).collect()
    }

    /// The configured clock-skew leeway.
    pub fn leeway(&self) -> Duration {
        self.leeway
    }

    /// The largest token accepted, in bytes.
    pub fn max_token_size(&self) -> usize {
        self.max_token_size
    }

    /// Tokens in the verified-token cache now (each one verified; garbage never enters).
    pub fn cached_tokens(&self) -> u64 {
        self.verified.run_pending_tasks();
        self.verified.entry_count()
    }

    /// Verifies signature, algorithm, `exp` and `nbf`, and the denylist.
    pub async fn verify(&self, token: &str) -> Result<Arc<Claims>, AuthError> {
        self.verify_gated(token, &|| Ok(())).await
    }

    /// [`Authenticator::verify`], asking `gate` before a signature is checked (a cache miss):
    /// a refused gate is [`AuthError::Throttled`]. A cached token never asks it.
    pub async fn verify_gated(&self, token: &str, gate: SignatureGate<'_>) -> Result<Arc<Claims>, AuthError> {
        if token.len() > self.max_token_size {
            return Err(AuthError::TooLarge);
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Read before the check: keys retired while it runs leave its entry stale.
        let epoch = self.key_epoch.load(std::sync::atomic::Ordering::Acquire);
        // A token verified under a key set since changed (a key retired or replaced) is
        // verified again, as one never seen: a retired key authorizes nothing.
        // Whether the cache held it from an older key set (then it is forgotten if it fails).
        let stale = match self.verified.get(&digest) {
            Some(v) if v.epoch == epoch => {
                if now_secs() > v.claims.exp + self.leeway.as_secs() {
                    return Err(AuthError::Expired);
                }
                self.check_denied(&v.claims)?;
                return Ok(v.claims);
            }
            cached => cached.is_some(),
        };
        gate().map_err(AuthError::Throttled)?;
        let claims = match self.verify_uncached(token).await {
            Ok(c) => Arc::new(c),
            Err(e) => {
                // Verified once, under a key since retired: forgotten.
                if stale {
                    self.verified.invalidate(&digest);
                }
                return Err(e);
            }
        };
        self.check_denied(&claims)?;
        self.verified.insert(digest, Verified { claims: claims.clone(), epoch });
        Ok(claims)
    }

    async fn verify_uncached(&self, token: &str) -> Result<Claims, AuthError> {
        let header = parse_header(token)?;
        let alg = Algorithm::from_str(&header.alg).map_err(|_| AuthError::BadSignature)?;
        // Candidate keys: by kid when the token names one, else the static keys without kid.
        let mut candidates: Vec<(&DecodingKey, &[Algorithm], KeyPrint)> = Vec::new();
        let jwk_holder;
        match header.kid.as_deref() {
            Some(kid) => {
                candidates.extend(
                    self.keys
                        .iter()
                        .filter(|k| k.kid.as_deref() == Some(kid))
                        .map(|k| (&k.key, k.algorithms.as_slice(), k.print)),
                );
                if candidates.is_empty() {
                    let mut found = None;
                    for source in &self.jwks {
                        // Boxed: rare and large; inline, it would size every request handler's future (see
                        // `handle_upgrade`).
                        if let Some(k) = Box::pin(source.get(kid)).await {
                            found = Some(k);
                            break;
                        }
                    }
                    jwk_holder = found;
                    if let Some(k) = &jwk_holder {
                        candidates.push((&k.key, k.algorithms.as_slice(), k.fingerprint));
                    }
                }
            }
            None => candidates.extend(
                self.keys.iter().filter(|k| k.kid.is_none()).map(|k| (&k.key, k.algorithms.as_slice(), k.print)),
            ),
        }
        if candidates.is_empty() {
            return Err(AuthError::UnknownKey);
        }
        candidates.retain(|(_, algs, _)| algs.contains(&alg));
        if candidates.is_empty() {
            // The token's algorithm is not on any matching key's allowlist.
            return Err(AuthError::BadSignature);
        }
        let mut validation = Validation::new(alg);
        validation.leeway = self.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.required_spec_claims = HashSet::from(["exp".to_owned()]);
        let mut last = AuthError::BadSignature;
        for (key, _, print) in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation) {
                Ok(data) => return claims_from(data.claims).map(|c| Claims { key: Some(print), ..c }),
                Err(e) => {
                    last = map_jwt_error(e.kind());
                    if last != AuthError::BadSignature {
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }

    fn check_denied(&self, c: &Claims) -> Result<(), AuthError> {
        let denied = &self.denylist.denied;
        if let Some(jti) = &c.jti {
            let keys = [Some(jti_key(None, jti)), c.issuer().map(|iss| jti_key(Some(iss), jti))];
            if keys.into_iter().flatten().any(|k| denied.contains_key(&k)) {
                return Err(AuthError::Revoked);
            }
        }
        if let Some(sub) = &c.sub {
            // A subject is revoked for every issuer, or for one: `alice` of one identity
            // provider is not `alice` of another.
            let keys = [Some(subject_key(None, sub)), c.issuer().map(|iss| subject_key(Some(iss), sub))];
            for d in keys.into_iter().flatten().filter_map(|k| denied.get(&k)) {
                // A token issued after the revocation (a new login) is accepted.
                if c.iat.is_none_or(|iat| iat <= d.since) {
                    return Err(AuthError::Revoked);
                }
            }
        }
        Ok(())
    }
}

impl Denylist {
    /// Keys (by fingerprint) that no longer authorize anything: the sessions their tokens
    /// opened are to end.
    pub fn retire_keys(&self, prints: Vec<KeyPrint>) {
        self.retired_keys.lock().unwrap_or_else(|p| p.into_inner()).extend(prints);
        self.keys_retired.notify_one();
    }

    /// The keys retired since the last call.
    pub fn take_retired_keys(&self) -> Vec<KeyPrint> {
        std::mem::take(&mut *self.retired_keys.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Refuses tokens of `subject` (of `issuer` only, or of every issuer when `None`) issued at
    /// or before `since`, until `until` (both Unix seconds): a token issued later (a new login)
    /// is accepted.
    pub fn deny_subject(&self, subject: &str, issuer: Option<&str>, since: u64, until: u64) {
        self.insert(subject_key(issuer, subject), since, until);
    }

    /// Refuses the token with this `jti` (of `issuer` only, or of every issuer when `None`)
    /// until `until` (Unix seconds).
    pub fn deny_jti(&self, jti: &str, issuer: Option<&str>, until: u64) {
        self.insert(jti_key(issuer, jti), now_secs(), until);
    }

    /// Refuses a session envelope (`routing::affinity::digest` of it) until `until`: its
    /// session was ended.
    pub fn deny_envelope(&self, digest: &str, until: u64) {
        let now = now_secs();
        self.envelopes.insert(digest.to_owned(), Denial { since: now, until: until.max(now + 1) });
    }

    /// Whether a session envelope (by its digest) was ended.
    pub fn envelope_denied(&self, digest: &str) -> bool {
        self.envelopes.get(digest).is_some_and(|d| d.until > now_secs())
    }

    /// Merges a denial with the one the key holds: the later of each bound.
    fn insert(&self, key: String, since: u64, until: u64) {
        let until = until.max(now_secs() + 1);
        let (since, until) = match self.denied.get(&key) {
            Some(d) => (d.since.max(since), d.until.max(until)),
            None => (since, until),
        };
        self.denied.insert(key, Denial { since, until });
    }
}

/// Checks route policy on verified claims: issuer, audience, required claims.
pub fn check_policy(c: &Claims, policy: &RouteAuth) -> Result<(), AuthError> {
    if !policy.issuers.is_empty() {
        match c.all.get("iss").and_then(Value::as_str) {
            Some(iss) if policy.issuers.iter().any(|i| i == iss) => {}
            _ => return Err(AuthError::WrongIssuer),
        }
    }
    if !policy.audiences.is_empty() {
        let ok = match c.all.get("aud") {
            Some(Value::String(a)) => policy.audiences.iter().any(|x| x == a),
            Some(Value::Array(items)) => {
                items.iter().filter_map(Value::as_str).any(|a| policy.audiences.iter().any(|x| x == a))
            }
            _ => false,
        };
        if !ok {
            return Err(AuthError::WrongAudience);
        }
    }
    if policy.required_claims.iter().any(|name| c.all.get(name).is_none_or(Value::is_null)) {
        return Err(AuthError::MissingClaim);
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct JwtHeader {
    alg: String,
    kid: Option<String>,
}

/// Parses the JOSE header without trusting anything in it yet.
fn parse_header(token: &str) -> Result<JwtHeader, AuthError> {
    let mut parts = token.split('.');
    let (Some(h), Some(_), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(AuthError::Malformed);
    };
    let raw = URL_SAFE_NO_PAD.decode(h).map_err(|_| AuthError::Malformed)?;
    let header: JwtHeader = serde_json::from_slice(&raw).map_err(|_| AuthError::Malformed)?;
    if header.alg.eq_ignore_ascii_case("none") {
        return Err(AuthError::BadSignature);
    }
    Ok(header)
}

fn claims_from(all: Map<String, Value>) -> Result<Claims, AuthError> {
    let exp = all.get("exp").and_then(Value::as_u64).ok_or(AuthError::Malformed)?;
    let iat = all.get("iat").and_then(Value::as_u64);
    let sub = match all.get("sub") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(AuthError::Malformed),
    };
    let jti = all.get("jti").and_then(Value::as_str).map(str::to_owned);
    Ok(Claims { exp, iat, key: None, sub, jti, all })
}

fn map_jwt_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::MissingRequiredClaim(_) => AuthError::MissingClaim,
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_)
        | ErrorKind::InvalidClaimFormat(_) => AuthError::Malformed,
        _ => AuthError::BadSignature,
    }
}

/// Reads every file `[auth]` names (PEM public keys, JWKS CA files) as `run` would, fetching
/// nothing: one error for each that fails. HMAC secrets are read with the configuration.
pub fn check_files(settings: &AuthSettings) -> Vec<AuthConfigError> {
    let mut problems = Vec::new();
    for k in &settings.keys {
        if let (KeyMaterial::PublicKeyPem(path), Some(alg)) = (&k.material, k.algorithms.first()) {
            problems.extend(load_public_key(path, *alg).err());
        }
    }
    for j in settings.jwks.iter().filter(|j| j.ca.is_some()) {
        if let Err(message) = crate::outbound::HttpClient::new(j.ca.as_deref()) {
            let path = j.ca.as_deref().map(|p| p.display().to_string()).unwrap_or_default();
            problems.push(AuthConfigError::Key {
                path,
                message: format!("CA file of {}: {message}", crate::outbound::loggable(&j.url)),
            });
        }
    }
    problems
}

/// A PEM public key file's key, and its fingerprint: of the encoded key between the armour
/// lines (whitespace, line endings and text around them left out), read once.
fn load_public_key(path: &std::path::Path, alg: Algorithm) -> Result<(DecodingKey, KeyPrint), AuthConfigError> {
    let err = |message: String| AuthConfigError::Key { path: path.display().to_string(), message };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let text = String::from_utf8_lossy(&pem);
    let body: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()))
        .collect();
    let print: KeyPrint = Sha256::digest(body.as_bytes()).into();
    let key = match alg.family() {
        AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(&pem),
        AlgorithmFamily::Ec => DecodingKey::from_ec_pem(&pem),
        AlgorithmFamily::Ed => DecodingKey::from_ed_pem(&pem),
        AlgorithmFamily::Hmac => return Err(err("HS* keys take a secret".into())),
    };
    key.map(|k| (k, print)).map_err(|e| err(e.to_string()))
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::AuthError;

    #[test]
    fn every_counted_reason_is_in_the_preregistered_list() {
        use AuthError::*;
        let all = [
            Missing,
            Malformed,
            TooLarge,
            Ambiguous,
            BadSignature,
            Expired,
            NotYetValid,
            WrongIssuer,
            WrongAudience,
            MissingClaim,
            UnknownKey,
            Revoked,
            Forbidden,
            Origin,
        ];
        assert_eq!(all.map(AuthError::reason).as_slice(), AuthError::REASONS);
    }
}
