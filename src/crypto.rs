//! The one crypto provider every TLS configuration is built with (aws-lc-rs): the listeners'
//! server side, the outbound client (JWKS, registry) and the tests' clients alike.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// A fresh aws-lc-rs provider with its default cipher suites and key exchange groups.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(base())
}

/// The provider itself, for a configuration that narrows it (the listeners keep the cipher
/// suites `[tls] cipher_suites` names).
pub fn base() -> CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}
