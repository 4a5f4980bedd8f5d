//! Generated certificates and the TLS client that trusts them.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

pub struct Certs {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A self-signed certificate for localhost/127.0.0.1, generated once per test process.
pub fn certs() -> &'static Certs {
    static CERTS: OnceLock<Certs> = OnceLock::new();
    CERTS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("portcullis-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).expect("cert");
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).expect("write cert");
        std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
        Certs { dir, cert, key }
    })
}

pub(crate) fn tls_connector() -> tokio_rustls::TlsConnector {
    tls_connector_with(portcullis::crypto::provider())
}

/// A client trusting the test certificate, offering the suites of `provider` in its order.
pub fn tls_connector_with(provider: Arc<rustls::crypto::CryptoProvider>) -> tokio_rustls::TlsConnector {
    tokio_rustls::TlsConnector::from(Arc::new(tls_client_config(provider)))
}

/// The configuration of [`tls_connector_with`], for tests that change it.
pub fn tls_client_config(provider: Arc<rustls::crypto::CryptoProvider>) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&certs().cert).expect("read cert") {
        roots.add(c.expect("cert")).expect("add root");
    }
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}
