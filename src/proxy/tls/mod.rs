//! Stage: tls. Terminates TLS with rustls (aws-lc-rs provider): SNI picks a certificate, with a
//! default for clients that send no SNI or an unknown name; ALPN offers `h2` when HTTP/2 is
//! enabled and `http/1.1` always; the handshake is bounded by `tls_handshake_timeout`. The
//! connection is driven by [`conn`], which holds no buffer while idle. Also defines
//! [`ClientStream`], the stream every later stage works on, plain or TLS.

pub mod conn;

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SupportedCipherSuite};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub use conn::TlsConn;

use crate::config::TlsSettings;
#[cfg(test)]
use crate::config::CIPHER_SUITES;

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A certificate file could not be read or holds no certificate.
    #[error("certificate {path}: {message}")]
    Cert {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A key file could not be read or does not match its certificate.
    #[error("private key {path}: {message}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Why a TLS handshake failed; each maps to a metric reason.
#[derive(Debug, thiserror::Error)]
pub enum TlsHandshakeError {
    /// The client did not finish the handshake in time.
    #[error("tls handshake timed out after {0:?}")]
    Timeout(Duration),
    /// The client closed the connection during the handshake.
    #[error("client closed the connection during the tls handshake")]
    Eof,
    /// The client sent something that is not acceptable TLS (or an alert).
    #[error("tls handshake failed: {0}")]
    Protocol(io::Error),
}

impl TlsHandshakeError {
    /// Bounded label for `portcullis_tls_handshake_failures_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            TlsHandshakeError::Timeout(_) => "timeout",
            TlsHandshakeError::Eof => "eof",
            TlsHandshakeError::Protocol(_) => "protocol",
        }
    }
}

/// The rustls suite of a [`crate::config::CIPHER_SUITES`] name.
fn cipher_suite(name: &str) -> Option<SupportedCipherSuite> {
    rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES.iter().copied().find(|s| format!("{:?}", s.suite()) == name)
}

/// The ALPN protocol id of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// Builds the server configuration from PEM files; ALPN offers `h2` when `http2` is set, and
/// HTTP/1.1 always (also to a client that sends no ALPN).
pub fn server_config(settings: &TlsSettings, http2: bool) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let mut provider = crate::crypto::base();
    provider.cipher_suites = settings
        .cipher_suites
        .iter()
        .map(|name| {
            cipher_suite(name)
                .ok_or_else(|| TlsConfigError::Rustls(rustls::Error::General(format!("cipher suite {name}"))))
        })
        .collect::<Result<_, _>>()?;
    let provider = Arc::new(provider);
    let default = Arc::new(load_certified_key(&settings.cert, &settings.key, &provider)?);
    let mut by_name = HashMap::new();
    for sni in &settings.sni {
        let key = Arc::new(load_certified_key(&sni.cert, &sni.key, &provider)?);
        for name in &sni.server_names {
            by_name.insert(name.to_ascii_lowercase(), key.clone());
        }
    }
    let resolver = Arc::new(CertResolver { default, by_name });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = if http2 { vec![ALPN_H2.to_vec()] } else { Vec::new() };
    config.alpn_protocols.push(b"http/1.1".to_vec());
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

fn load_certified_key(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsConfigError> {
    let chain = load_chain(cert)?;
    let der = load_key(key)?;
    CertifiedKey::from_der(chain, der, provider)
        .map_err(|e| TlsConfigError::Key { path: key.display().to_string(), message: e.to_string() })
}

fn load_chain(cert: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let cert_err = |message: String| TlsConfigError::Cert { path: cert.display().to_string(), message };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| cert_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(e.to_string()))?;
    if chain.is_empty() {
        return Err(cert_err("no certificate found".into()));
    }
    Ok(chain)
}

fn load_key(key: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsConfigError::Key { path: key.display().to_string(), message: e.to_string() })
}

/// Reads every certificate and key `[tls]` names, as `run` would load them: one error for each
/// file that fails (a chain and its key are both read even when one of them fails) and for each
/// pair that does not match; when there is none, the configuration rustls refuses, if it does.
pub fn check_files(settings: &TlsSettings) -> Vec<TlsConfigError> {
    let provider = crate::crypto::base();
    let pairs = std::iter::once((&settings.cert, &settings.key)).chain(settings.sni.iter().map(|s| (&s.cert, &s.key)));
    let mut problems = Vec::new();
    for (cert, key) in pairs {
        match (load_chain(cert), load_key(key)) {
            (Ok(chain), Ok(der)) => {
                if let Err(e) = CertifiedKey::from_der(chain, der, &provider) {
                    problems.push(TlsConfigError::Key { path: key.display().to_string(), message: e.to_string() });
                }
            }
            (chain, der) => problems.extend(chain.err().into_iter().chain(der.err())),
        }
    }
    if problems.is_empty() {
        problems.extend(server_config(settings, true).err());
    }
    problems
}

/// Picks a certificate by SNI, falling back to the default one.
#[derive(Debug)]
struct CertResolver {
    default: Arc<CertifiedKey>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let key = hello.server_name().and_then(|n| self.by_name.get(&n.to_ascii_lowercase())).unwrap_or(&self.default);
        Some(key.clone())
    }
}

/// Runs the TLS handshake within `limit`.
pub async fn accept(config: &Arc<ServerConfig>, tcp: TcpStream, limit: Duration) -> Result<TlsConn, TlsHandshakeError> {
    match tokio::time::timeout(limit, TlsConn::accept(config.clone(), tcp)).await {
        Err(_) => Err(TlsHandshakeError::Timeout(limit)),
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Err(TlsHandshakeError::Eof),
        Ok(Err(e)) => Err(TlsHandshakeError::Protocol(e)),
    }
}

/// A client connection after the tls stage: plain TCP or TLS.
#[derive(Debug)]
pub enum ClientStream {
    /// A plain TCP connection (`ws://`, `http://`).
    Plain(TcpStream),
    /// A TLS connection (`wss://`, `https://`; boxed: the TLS state is large).
    Tls(Box<TlsConn>),
}

impl ClientStream {
    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, ClientStream::Tls(_))
    }

    /// Whether the client chose HTTP/2 by ALPN.
    pub fn is_h2(&self) -> bool {
        matches!(self, ClientStream::Tls(s) if s.alpn_protocol() == Some(ALPN_H2))
    }
}

impl crate::proxy::relay::FinishStream for ClientStream {
    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            ClientStream::Plain(_) => Poll::Ready(Ok(())),
            ClientStream::Tls(s) => s.poll_close_notify(cx),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_configurable_cipher_suite_name_is_a_rustls_suite() {
        for name in CIPHER_SUITES {
            assert!(cipher_suite(name).is_some(), "{name}");
        }
        assert_eq!(CIPHER_SUITES.len(), rustls::crypto::aws_lc_rs::ALL_CIPHER_SUITES.len());
    }
}
