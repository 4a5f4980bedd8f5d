//! Minting a JWT per connection from a key and claim templates.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Deserialize;

use crate::template;

/// How the token is presented, and where; parsed by [`TokenMinter::new`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenVia {
    /// `Authorization: Bearer <token>`.
    Header,
    /// A query parameter with this name.
    Query(String),
    /// A `Sec-WebSocket-Protocol` entry with this prefix.
    Subprotocol(String),
}

/// Token settings of a scenario.
#[derive(Clone, Debug, Default, clap::Args, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenOptions {
    /// A fixed token for every connection (for example the one `portcullis demo` prints).
    #[arg(long)]
    pub token: Option<String>,
    /// PEM private key to sign tokens with (RS*, PS*, ES*, EdDSA).
    #[arg(long)]
    pub jwt_key: Option<std::path::PathBuf>,
    /// Environment variable holding an HMAC secret (HS*).
    #[arg(long)]
    pub jwt_secret_env: Option<String>,
    /// Key id written in the token's header (`kid`), for targets that pick the key by it
    /// (a JWKS).
    #[arg(long)]
    pub kid: Option<String>,
    /// Signing algorithm.
    #[arg(long, default_value = "ES256")]
    #[serde(default = "default_alg")]
    pub alg: String,
    /// Claim templates `name=value`; the value is JSON if it parses, else a string; `{conn}`,
    /// `{conn % N}` are substituted: `sub=user-{conn}`, `agents=["agent-{conn % 100}"]`.
    #[arg(long = "claim")]
    pub claims: Vec<String>,
    /// Token lifetime (`exp` = now + this), unless an `exp` claim is given.
    #[arg(long, default_value = "1h", value_parser = crate::parse_duration)]
    #[serde(default = "default_ttl", deserialize_with = "crate::de_duration", serialize_with = "crate::ser_duration")]
    pub token_ttl: Duration,
    /// Where to put the token: `header`, `query[=param]` (default `access_token`) or
    /// `subprotocol[=prefix]` (default `bearer.`).
    #[arg(long, default_value = "header")]
    #[serde(default = "default_via")]
    pub token_via: String,
}

fn default_alg() -> String {
    "ES256".into()
}
fn default_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_via() -> String {
    "header".into()
}

/// Produces the token for each connection.
pub struct TokenMinter {
    /// Where the token goes.
    pub via: TokenVia,
    /// Fixed token, or a key to sign with.
    source: Source,
}

enum Source {
    Fixed(String),
    Signed { header: Box<Header>, key: Box<EncodingKey>, claims: Vec<(String, String)>, ttl: Duration },
}

impl TokenMinter {
    /// Builds a minter from the options, or `None` when no token is configured.
    pub fn new(o: &TokenOptions) -> anyhow::Result<Option<TokenMinter>> {
        let via = match o.token_via.split_once('=') {
            None if o.token_via == "header" => TokenVia::Header,
            None if o.token_via == "query" => TokenVia::Query("access_token".into()),
            None if o.token_via == "subprotocol" => TokenVia::Subprotocol("bearer.".into()),
            Some(("query", p)) => TokenVia::Query(p.into()),
            Some(("subprotocol", p)) => TokenVia::Subprotocol(p.into()),
            _ => bail!("--token-via is header, query[=param] or subprotocol[=prefix]"),
        };
        let source = if let Some(t) = &o.token {
            Source::Fixed(t.clone())
        } else if o.jwt_key.is_some() || o.jwt_secret_env.is_some() {
            let alg: Algorithm = o.alg.parse().with_context(|| format!("unknown algorithm {}", o.alg))?;
            let key = match (&o.jwt_key, &o.jwt_secret_env) {
                (_, Some(var)) => {
                    let secret =
                        std::env::var(var).with_context(|| format!("environment variable {var} is not set"))?;
                    EncodingKey::from_secret(secret.as_bytes())
                }
                (Some(path), None) => {
                    let pem = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
                    let name = format!("{alg:?}");
                    if name.starts_with("RS") || name.starts_with("PS") {
                        EncodingKey::from_rsa_pem(&pem)?
                    } else if name.starts_with("ES") {
                        EncodingKey::from_ec_pem(&pem)?
                    } else if name == "EdDSA" {
                        EncodingKey::from_ed_pem(&pem)?
                    } else {
                        bail!("{name} is an HMAC algorithm: use --jwt-secret-env")
                    }
                }
                (None, None) => unreachable!("checked above"),
            };
            let mut claims = Vec::new();
            for c in &o.claims {
                let (k, v) = c.split_once('=').context("claims are written name=value")?;
                claims.push((k.trim().to_owned(), v.to_owned()));
            }
            let mut header = Header::new(alg);
            header.kid = o.kid.clone();
            Source::Signed { header: Box::new(header), key: Box::new(key), claims, ttl: o.token_ttl }
        } else {
            return Ok(None);
        };
        Ok(Some(TokenMinter { via, source }))
    }

    /// The token for connection `conn`.
    pub fn mint(&self, conn: u64) -> anyhow::Result<String> {
        match &self.source {
            Source::Fixed(t) => Ok(t.clone()),
            Source::Signed { header, key, claims, ttl } => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
                let mut map = serde_json::Map::new();
                map.insert("iat".into(), now.into());
                map.insert("exp".into(), (now + ttl.as_secs()).into());
                for (k, v) in claims {
                    let v = template::expand(v, conn);
                    let value = serde_json::from_str(&v).unwrap_or(serde_json::Value::String(v));
                    map.insert(k.clone(), value);
                }
                Ok(jsonwebtoken::encode(header, &map, key)?)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hs256_token_carries_templated_claims() {
        std::env::set_var("PCLT_TEST_SECRET", "s3cret");
        let o = TokenOptions {
            jwt_secret_env: Some("PCLT_TEST_SECRET".into()),
            alg: "HS256".into(),
            claims: vec!["sub=user-{conn}".into(), r#"agents=["agent-{conn % 100}"]"#.into()],
            token_ttl: Duration::from_secs(60),
            token_via: "query".into(),
            ..TokenOptions::default()
        };
        let m = TokenMinter::new(&o).unwrap().unwrap();
        assert_eq!(m.via, TokenVia::Query("access_token".into()));
        let t = m.mint(1234).unwrap();
        let mut v = jsonwebtoken::Validation::new(Algorithm::HS256);
        v.validate_aud = false;
        let data =
            jsonwebtoken::decode::<serde_json::Value>(&t, &jsonwebtoken::DecodingKey::from_secret(b"s3cret"), &v)
                .unwrap();
        assert_eq!(data.claims["sub"], "user-1234");
        assert_eq!(data.claims["agents"][0], "agent-34");
    }
}
