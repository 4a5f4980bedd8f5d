//! The instance-to-instance channel: a resume or an observer that reaches an instance which does
//! not hold its session is relayed to the one that does, over a TCP connection to that
//! instance's peer listener (`[fleet] peer_listen`).
//!
//! The relaying instance opens the connection with one line, a [`Preamble`]: who it is, the
//! instance it is addressed to, the client it relays, when, a fresh nonce, and an HMAC-SHA256
//! over all of it with the fleet's secret. The listener reads that line before anything else and
//! refuses the connection (closed, counted in `portcullis_fleet_peer_refusals_total{reason}`)
//! when the signature does not verify, the preamble is addressed to another instance (a capture
//! replayed to an instance whose nonce cache never saw it), the time is more than [`WINDOW`]
//! away from its own clock, or the nonce was seen already (a replay). What follows is the client's own WebSocket handshake, which the owner checks as any
//! other (the token, the grant, the resume id's subject); the client address for the owner's
//! limits and logs is the signed one. A peer listener serves resumes and observers only.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::now_ms;

/// How far a preamble's time may be from the listener's clock (and how long a nonce is kept).
pub const WINDOW: Duration = Duration::from_secs(30);

/// The longest preamble line read.
pub const MAX_PREAMBLE: usize = 1024;

/// The first line a relaying instance sends.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preamble {
    /// The relaying instance.
    pub instance: String,
    /// The instance it is addressed to (the session's owner): no other takes it.
    pub to: String,
    /// The client whose request follows.
    pub client: SocketAddr,
    /// When it was sent, Unix milliseconds.
    pub time_ms: u64,
    /// 128 random bits, base64url: a preamble is good once.
    pub nonce: String,
    /// HMAC-SHA256 of the fields above, base64url.
    pub sig: String,
}

/// Why a preamble is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// Not a preamble line.
    #[error("not a peer preamble")]
    Malformed,
    /// The signature does not verify with the fleet's secret.
    #[error("bad signature")]
    Signature,
    /// Signed for another instance.
    #[error("addressed to another instance")]
    Misdirected,
    /// Its time is too far from this instance's clock.
    #[error("stale or future time")]
    Time,
    /// Its nonce was seen already.
    #[error("replayed")]
    Replay,
}

impl PeerError {
    /// Label in `portcullis_fleet_peer_refusals_total`.
    pub fn label(self) -> &'static str {
        match self {
            PeerError::Malformed => "malformed",
            PeerError::Signature => "signature",
            PeerError::Misdirected => "misdirected",
            PeerError::Time => "time",
            PeerError::Replay => "replay",
        }
    }
}

/// Signs and checks preambles with the fleet's secret.
pub struct PeerAuth {
    instance: String,
    secret: Vec<u8>,
    nonces: moka::sync::Cache<String, ()>,
}

impl std::fmt::Debug for PeerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerAuth").field("instance", &self.instance).finish_non_exhaustive()
    }
}

/// The signature over a preamble's fields (v2: the addressee is signed too; instance names hold
/// no newline, so the fields cannot be shifted into one another).
fn mac(secret: &[u8], p: &Preamble) -> Vec<u8> {
    // The key may be any length; HMAC accepts every one.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC takes any key"));
    let Preamble { instance, to, client, time_ms, nonce, .. } = p;
    m.update(format!("portcullis-peer-v2\n{instance}\n{to}\n{client}\n{time_ms}\n{nonce}").as_bytes());
    m.finalize().into_bytes().to_vec()
}

impl PeerAuth {
    /// For this `instance`, with the fleet's `secret`.
    pub fn new(instance: &str, secret: &[u8]) -> PeerAuth {
        let nonces = moka::sync::Cache::builder().max_capacity(1_000_000).time_to_live(WINDOW * 2).build();
        PeerAuth { instance: instance.to_owned(), secret: secret.to_vec(), nonces }
    }

    /// The preamble line (with its newline) for relaying `client` to instance `to`.
    pub fn sign(&self, to: &str, client: SocketAddr) -> Vec<u8> {
        let nonce = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 16]>());
        let mut p = Preamble {
            instance: self.instance.clone(),
            to: to.to_owned(),
            client,
            time_ms: now_ms(),
            nonce,
            sig: String::new(),
        };
        p.sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac(&self.secret, &p));
        let mut line = serde_json::to_vec(&p).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// Checks a preamble line (without its newline): the relayed client's address.
    pub fn verify(&self, line: &[u8]) -> Result<Preamble, PeerError> {
        let p: Preamble = serde_json::from_slice(line).map_err(|_| PeerError::Malformed)?;
        let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&p.sig).map_err(|_| PeerError::Malformed)?;
        let expected = mac(&self.secret, &p);
        if !bool::from(expected.ct_eq(&sig)) {
            return Err(PeerError::Signature);
        }
        if p.to != self.instance {
            return Err(PeerError::Misdirected);
        }
        if now_ms().abs_diff(p.time_ms) > WINDOW.as_millis() as u64 {
            return Err(PeerError::Time);
        }
        // Signed, so only a holder of the secret chose it; kept as long as its time is good.
        let fresh = self.nonces.entry(p.nonce.clone()).or_insert(()).is_fresh();
        if !fresh {
            return Err(PeerError::Replay);
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preamble_verifies_once_and_only_with_the_fleets_secret() {
        let (a, b) = (PeerAuth::new("a", &[7; 32]), PeerAuth::new("b", &[7; 32]));
        let client: SocketAddr = "10.1.2.3:4567".parse().expect("addr");
        let line = a.sign("b", client);
        let line = &line[..line.len() - 1];
        assert_eq!(b.verify(line).map(|p| (p.instance, p.client)), Ok(("a".to_owned(), client)));
        assert_eq!(b.verify(line), Err(PeerError::Replay), "a replay is refused");
        // Captured on its way to one instance, it is refused by every other, whose nonce cache
        // never saw it.
        let c = PeerAuth::new("c", &[7; 32]);
        assert_eq!(c.verify(line), Err(PeerError::Misdirected));
        let other = PeerAuth::new("x", &[8; 32]);
        let forged = other.sign("b", client);
        assert_eq!(b.verify(&forged[..forged.len() - 1]), Err(PeerError::Signature));
        // A field changed after signing (the client address, the addressee) breaks the signature.
        for change in [
            (|p: &mut Preamble| p.client = "10.9.9.9:1".parse().expect("addr")) as fn(&mut Preamble),
            |p: &mut Preamble| p.to = "c".into(),
        ] {
            let mut p: Preamble = serde_json::from_slice(&a.sign("b", client)[..]).expect("json");
            change(&mut p);
            assert_eq!(b.verify(&serde_json::to_vec(&p).expect("json")), Err(PeerError::Signature));
        }
        assert_eq!(b.verify(b"GET / HTTP/1.1"), Err(PeerError::Malformed));
    }
}
