//! Minting tokens, for operators (`portcullis token mint`) and the demo. A file of the binary,
//! not of the proxy library; the tests and the JWT bench include it by path.

use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily, EncodingKey, Header};
use serde_json::{Map, Value};

use portcullis::auth::now_secs;

/// Builds an encoding key for `alg` from PEM (RS/PS/ES/EdDSA) or secret bytes (HS).
pub fn encoding_key(alg: Algorithm, material: &[u8]) -> Result<EncodingKey, jsonwebtoken::errors::Error> {
    match alg.family() {
        AlgorithmFamily::Hmac => Ok(EncodingKey::from_secret(material)),
        AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(material),
        AlgorithmFamily::Ec => EncodingKey::from_ec_pem(material),
        AlgorithmFamily::Ed => EncodingKey::from_ed_pem(material),
    }
}

/// Signs a token with `claims` plus `iat` and `exp = now + ttl` (unless `claims` sets them).
pub fn mint(
    alg: Algorithm,
    key: &EncodingKey,
    kid: Option<&str>,
    mut claims: Map<String, Value>,
    ttl: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = now_secs();
    claims.entry("iat").or_insert(Value::from(now));
    claims.entry("exp").or_insert(Value::from(now + ttl.as_secs()));
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, &claims, key)
}
