//! Stateful session affinity by response header, with no shared store (as Envoy's stateful
//! session filter, sealed): when a member answers with the route's affinity header (MCP's
//! `Mcp-Session-Id`), the client is given a sealed [`Envelope`] in its place. It holds the member,
//! the backend's own id, the token's issuer and subject and an expiry, encrypted and
//! authenticated (XChaCha20-Poly1305, a random 192-bit nonce, the route's name and the path's
//! captures as associated data: an agent's session does not open on another agent's path). On a
//! later request any instance of the fleet opens it, routes to that member and restores the
//! backend's id; one that is forged, altered, expired, sealed for another route or agent, or
//! presented by another subject does not open ([`AffinityError`]).
//!
//! Keys: [`Keys`], several at once for rotation. The first seals; every one opens (found by a
//! key id, the first 4 bytes of SHA-256 of the key, written before the nonce). There is no
//! default key.

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::Digest as _;

/// What an envelope says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sealed {
    /// The member that created the session (its address).
    #[serde(rename = "m")]
    pub member: String,
    /// The backend's own session id.
    #[serde(rename = "s")]
    pub backend_id: String,
    /// The token's issuer, if any.
    #[serde(rename = "i")]
    pub issuer: Option<String>,
    /// The token's subject, if any.
    #[serde(rename = "u")]
    pub subject: Option<String>,
    /// When it stops opening, Unix seconds.
    #[serde(rename = "e")]
    pub expires: u64,
}

/// Why an envelope does not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AffinityError {
    /// Not an envelope of this proxy.
    #[error("not a session id this proxy issued")]
    Malformed,
    /// Sealed with a key this route no longer has (or never had).
    #[error("session id sealed with an unknown key")]
    UnknownKey,
    /// It does not authenticate: altered, forged, or sealed for another route or agent.
    #[error("session id does not authenticate")]
    Tampered,
    /// Past its expiry.
    #[error("session expired")]
    Expired,
    /// Sealed for another issuer or subject than the token's.
    #[error("session belongs to another subject")]
    OtherSubject,
    /// Its session was ended (a `DELETE` of an MCP session, on any instance of the fleet).
    #[error("session ended")]
    Ended,
}

impl AffinityError {
    /// Label in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            AffinityError::Malformed => "malformed",
            AffinityError::UnknownKey => "unknown_key",
            AffinityError::Tampered => "tampered",
            AffinityError::Expired => "expired",
            AffinityError::OtherSubject => "other_subject",
            AffinityError::Ended => "ended",
        }
    }
}

/// What a lock on an ended session names: SHA-256 of the route and the envelope, base64url.
/// An instance given the envelope can find the lock; the lock does not give the envelope.
pub fn digest(route: &str, envelope: &str) -> String {
    let d = sha2::Sha256::digest(format!("{route}\u{0}{envelope}").as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d)
}

/// The prefix of every envelope: a version, so that a later format can be told apart.
const PREFIX: &str = "pc1.";

/// A route's envelope keys: the first seals, all open.
pub struct Keys {
    keys: Vec<([u8; 4], XChaCha20Poly1305)>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys").field("count", &self.keys.len()).finish_non_exhaustive()
    }
}

impl Keys {
    /// From 32-byte keys, the sealing one first; `None` when there is none or one is not 32
    /// bytes.
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a [u8]>) -> Option<Keys> {
        let mut out = Vec::new();
        for k in keys {
            if k.len() != 32 {
                return None;
            }
            let digest = sha2::Sha256::digest(k);
            let id = [digest[0], digest[1], digest[2], digest[3]];
            out.push((id, XChaCha20Poly1305::new_from_slice(k).ok()?));
        }
        (!out.is_empty()).then_some(Keys { keys: out })
    }

    /// Seals `what`. `context` is the associated data: the route and what else the envelope is
    /// bound to (the path's captures); an envelope opens only for the same context.
    pub fn seal(&self, context: &str, what: &Sealed) -> String {
        let (id, cipher) = &self.keys[0];
        let nonce: [u8; 24] = rand::random();
        let plain = serde_json::to_vec(what).unwrap_or_default();
        // Encryption with a valid key and nonce does not fail.
        let sealed = cipher
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: &plain, aad: context.as_bytes() })
            .unwrap_or_default();
        let mut raw = Vec::with_capacity(4 + 24 + sealed.len());
        raw.extend_from_slice(id);
        raw.extend_from_slice(&nonce);
        raw.extend_from_slice(&sealed);
        format!("{PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw))
    }

    /// Opens an envelope sealed for `context` for a request of `issuer`'s `subject` at `now`
    /// (Unix seconds).
    pub fn open(
        &self,
        context: &str,
        envelope: &str,
        issuer: Option<&str>,
        subject: Option<&str>,
        now: u64,
    ) -> Result<Sealed, AffinityError> {
        let body = envelope.strip_prefix(PREFIX).ok_or(AffinityError::Malformed)?;
        if body.len() > 4096 {
            return Err(AffinityError::Malformed);
        }
        let raw =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(body).map_err(|_| AffinityError::Malformed)?;
        if raw.len() < 4 + 24 + 16 {
            return Err(AffinityError::Malformed);
        }
        let (id, rest) = raw.split_at(4);
        let (nonce, sealed) = rest.split_at(24);
        let (_, cipher) = self.keys.iter().find(|(k, _)| k == id).ok_or(AffinityError::UnknownKey)?;
        let plain = cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: sealed, aad: context.as_bytes() })
            .map_err(|_| AffinityError::Tampered)?;
        let what: Sealed = serde_json::from_slice(&plain).map_err(|_| AffinityError::Tampered)?;
        if what.expires <= now {
            return Err(AffinityError::Expired);
        }
        if what.issuer.as_deref() != issuer || what.subject.as_deref() != subject {
            return Err(AffinityError::OtherSubject);
        }
        Ok(what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealed(expires: u64) -> Sealed {
        Sealed {
            member: "10.0.0.7:8080".into(),
            backend_id: "backend-session-42".into(),
            issuer: Some("https://idp".into()),
            subject: Some("alice".into()),
            expires,
        }
    }

    #[test]
    fn an_envelope_opens_for_its_route_and_subject_until_it_expires() {
        let keys = Keys::new([&[1u8; 32][..]]).expect("keys");
        let env = keys.seal("mcp", &sealed(1_000));
        assert!(env.starts_with("pc1."));
        assert!(!env.contains("backend-session-42") && !env.contains("10.0.0.7"), "sealed, not readable");
        assert_eq!(keys.open("mcp", &env, Some("https://idp"), Some("alice"), 999), Ok(sealed(1_000)));
        assert_eq!(keys.open("mcp", &env, Some("https://idp"), Some("alice"), 1_000), Err(AffinityError::Expired));
        // Another subject, or the same subject of another issuer, cannot use it.
        assert_eq!(keys.open("mcp", &env, Some("https://idp"), Some("mallory"), 999), Err(AffinityError::OtherSubject));
        assert_eq!(keys.open("mcp", &env, Some("https://other"), Some("alice"), 999), Err(AffinityError::OtherSubject));
        // Sealed for one route, it does not open on another.
        assert_eq!(keys.open("other", &env, Some("https://idp"), Some("alice"), 999), Err(AffinityError::Tampered));
        // Two seals of the same content differ (a fresh nonce each).
        assert_ne!(keys.seal("mcp", &sealed(1_000)), env);
    }

    #[test]
    fn a_tampered_or_forged_envelope_does_not_open() {
        let keys = Keys::new([&[1u8; 32][..]]).expect("keys");
        let env = keys.seal("mcp", &sealed(1_000));
        let mut raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&env[4..]).expect("b64");
        for i in [5, 30, raw.len() - 1] {
            raw[i] ^= 1;
            let bad = format!("pc1.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw));
            assert_eq!(
                keys.open("mcp", &bad, Some("https://idp"), Some("alice"), 999),
                Err(AffinityError::Tampered),
                "byte {i}"
            );
            raw[i] ^= 1;
        }
        // Sealed with another key of the same id space: unknown; the backend's raw id: malformed.
        let other = Keys::new([&[2u8; 32][..]]).expect("keys");
        assert_eq!(keys.open("mcp", &other.seal("mcp", &sealed(1_000)), None, None, 0), Err(AffinityError::UnknownKey));
        assert_eq!(keys.open("mcp", "backend-session-42", None, None, 0), Err(AffinityError::Malformed));
        assert_eq!(keys.open("mcp", "pc1.!!", None, None, 0), Err(AffinityError::Malformed));
        assert_eq!(keys.open("mcp", "pc1.AAAA", None, None, 0), Err(AffinityError::Malformed));
    }

    #[test]
    fn rotation_seals_with_the_first_key_and_opens_with_any() {
        let old = Keys::new([&[1u8; 32][..]]).expect("keys");
        let rotated = Keys::new([&[3u8; 32][..], &[1u8; 32][..]]).expect("keys");
        let before = old.seal("mcp", &sealed(1_000));
        assert_eq!(rotated.open("mcp", &before, Some("https://idp"), Some("alice"), 0), Ok(sealed(1_000)));
        let after = rotated.seal("mcp", &sealed(1_000));
        assert_eq!(old.open("mcp", &after, Some("https://idp"), Some("alice"), 0), Err(AffinityError::UnknownKey));
        // Once the old key is dropped, its envelopes stop opening.
        let dropped = Keys::new([&[3u8; 32][..]]).expect("keys");
        assert_eq!(dropped.open("mcp", &before, Some("https://idp"), Some("alice"), 0), Err(AffinityError::UnknownKey));
        assert!(Keys::new([&[1u8; 31][..]]).is_none(), "keys are 32 bytes");
        assert!(Keys::new(std::iter::empty::<&[u8]>()).is_none(), "no default key");
    }
}
