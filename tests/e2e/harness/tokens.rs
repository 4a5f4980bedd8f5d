//! Tokens for tests: an HMAC key written for `[[auth.keys]]` and the tokens it signs.

use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde_json::{json, Value};

use super::certs;
use crate::mint;

/// An HMAC key for the `[[auth.keys]]` of these tests.
pub struct Hmac {
    pub secret: Vec<u8>,
    pub path: std::path::PathBuf,
}

pub fn hmac() -> Hmac {
    let secret: Vec<u8> = format!("http-test-secret-{}", rand::random::<u64>()).into_bytes();
    let path = certs().dir.join(format!("hmac-{}", rand::random::<u32>()));
    std::fs::write(&path, &secret).expect("write secret");
    Hmac { secret, path }
}

impl Hmac {
    pub fn token(&self, sub: &str, agents: &[&str], ttl: Duration) -> String {
        let key = mint::encoding_key(Algorithm::HS256, &self.secret).expect("key");
        let claims = json!({ "sub": sub, "agents": agents });
        let Value::Object(claims) = claims else { unreachable!() };
        mint::mint(Algorithm::HS256, &key, None, claims, ttl).expect("mint")
    }

    pub fn bearer(&self, agents: &[&str]) -> String {
        format!("Bearer {}", self.token("alice", agents, Duration::from_secs(600)))
    }

    /// The `[[auth.keys]]` entry that verifies this key's tokens, to merge at the top level.
    pub fn auth_keys(&self) -> Value {
        json!({"auth": {"keys": [{"algorithms": ["HS256"], "secret_file": self.path.display().to_string()}]}})
    }
}

impl Hmac {
    /// A token with exactly these claims (an object), valid for ten minutes.
    pub fn token_with(&self, claims: Value) -> String {
        let key = mint::encoding_key(Algorithm::HS256, &self.secret).expect("key");
        let Value::Object(claims) = claims else { panic!("claims must be an object") };
        mint::mint(Algorithm::HS256, &key, None, claims, Duration::from_secs(600)).expect("mint")
    }
}
