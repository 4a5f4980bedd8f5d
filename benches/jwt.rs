//! JWT verification cost per algorithm family, and the verified-token cache hit that a
//! reconnect storm takes instead.
//!
//! `cargo bench --bench jwt`

use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use jsonwebtoken::Algorithm;
use portcullis::auth::Authenticator;

#[path = "../src/mint.rs"]
mod mint;
use portcullis::config::Config;

struct Family {
    name: &'static str,
    alg: Algorithm,
    kid: &'static str,
    private: Vec<u8>,
    public: Vec<u8>,
}

fn families() -> Vec<Family> {
    use rcgen::KeyPair;
    let kp = |alg: &'static rcgen::SignatureAlgorithm| {
        let k = KeyPair::generate_for(alg).expect("key");
        (k.serialize_pem().into_bytes(), k.public_key_pem().into_bytes())
    };
    let (rsa_priv, rsa_pub) = kp(&rcgen::PKCS_RSA_SHA256);
    let (ec_priv, ec_pub) = kp(&rcgen::PKCS_ECDSA_P256_SHA256);
    let (ed_priv, ed_pub) = kp(&rcgen::PKCS_ED25519);
    let secret = b"benchmark-hmac-secret-of-32-bytes!".to_vec();
    vec![
        Family { name: "HS256", alg: Algorithm::HS256, kid: "hs", private: secret.clone(), public: secret },
        Family { name: "RS256", alg: Algorithm::RS256, kid: "rs", private: rsa_priv.clone(), public: rsa_pub.clone() },
        Family { name: "PS256", alg: Algorithm::PS256, kid: "ps", private: rsa_priv, public: rsa_pub },
        Family { name: "ES256", alg: Algorithm::ES256, kid: "es", private: ec_priv, public: ec_pub },
        Family { name: "EdDSA", alg: Algorithm::EdDSA, kid: "ed", private: ed_priv, public: ed_pub },
    ]
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let fams = families();
    let mut toml = String::from("[[listeners]]\naddresses = [\"127.0.0.1:0\"]\n[auth]\ncache_capacity = 0\n");
    for f in &fams {
        let path = dir.path().join(f.name);
        std::fs::write(&path, &f.public).expect("write key");
        let material = if f.alg == Algorithm::HS256 { "secret_file" } else { "public_key" };
        toml.push_str(&format!(
            "[[auth.keys]]\nkid = \"{}\"\nalgorithms = [\"{:?}\"]\n{material} = \"{}\"\n",
            f.kid,
            f.alg,
            path.display()
        ));
    }
    let uncached = Config::parse(&toml, Path::new("bench.toml")).expect("config");
    let cached = Config::parse(&toml.replace("cache_capacity = 0", "cache_capacity = 1000"), Path::new("bench.toml"))
        .expect("config");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (verify_uncached, verify_cached) = rt.block_on(async {
        (
            Authenticator::new(&uncached.auth, Default::default(), None).expect("auth"),
            Authenticator::new(&cached.auth, Default::default(), None).expect("auth"),
        )
    });

    let mut group = c.benchmark_group("jwt_verify");
    for f in &fams {
        let key = mint::encoding_key(f.alg, &f.private).expect("encoding key");
        let mut claims = serde_json::Map::new();
        claims.insert("sub".into(), "alice".into());
        claims.insert("agents".into(), serde_json::json!(["a1", "a2"]));
        let token = mint::mint(f.alg, &key, Some(f.kid), claims, Duration::from_secs(3600)).expect("mint");
        rt.block_on(verify_uncached.verify(&token)).expect("valid token");
        group.bench_function(f.name, |b| b.iter(|| rt.block_on(verify_uncached.verify(&token)).expect("valid")));
        if f.alg == Algorithm::ES256 {
            rt.block_on(verify_cached.verify(&token)).expect("valid token");
            group.bench_function("ES256_cache_hit", |b| {
                b.iter(|| rt.block_on(verify_cached.verify(&token)).expect("valid"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
