//! `portcullis connect`: a minimal interactive WebSocket client, so the demo can be tried with
//! nothing but this binary.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::header::WWW_AUTHENTICATE;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use portcullis::session::close::code;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufReader};
use tokio::net::TcpStream;

/// What `connect` trusts for wss://.
pub struct Trust<'a> {
    /// A PEM file of CA certificates, or of the server's own (self-signed) certificate.
    pub ca: Option<&'a Path>,
    /// The operating system's trust store too.
    pub system_roots: bool,
}

/// What ends each line read from stdin before it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Eol {
    /// A carriage return for a URL whose path ends in `/terminal` (a terminal runs a command on
    /// Enter, which is CR), nothing otherwise.
    Auto,
    /// Nothing: the line's text alone.
    None,
    /// `\r`.
    Cr,
    /// `\n`.
    Lf,
    /// `\r\n`.
    Crlf,
}

impl Eol {
    fn bytes(self, path: &str) -> &'static [u8] {
        match self {
            Eol::Auto if path.split('?').next().is_some_and(|p| p.ends_with("/terminal")) => b"\r",
            Eol::Auto | Eol::None => b"",
            Eol::Cr => b"\r",
            Eol::Lf => b"\n",
            Eol::Crlf => b"\r\n",
        }
    }
}

/// Connects to `url` and bridges stdin/stdout until either side closes.
pub async fn run(url: &str, trust: Trust<'_>, eol: Eol, headers: &[String]) -> anyhow::Result<()> {
    let uri: hyper::Uri = url.parse().context("invalid URL")?;
    let tls = match uri.scheme_str() {
        Some("wss") => true,
        Some("ws") => false,
        _ => bail!("the URL must start with ws:// or wss://"),
    };
    let host = uri.host().context("the URL has no host")?.to_owned();
    let eol = eol.bytes(uri.path());
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let tcp =
        TcpStream::connect((host.as_str(), port)).await.with_context(|| format!("cannot connect to {host}:{port}"))?;
    let _ = tcp.set_nodelay(true);
    let mut req = Request::get(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header("host", format!("{host}:{port}"))
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header("sec-websocket-key", fastwebsockets::handshake::generate_key())
        .header("sec-websocket-version", "13");
    for h in headers {
        let (name, value) = h.split_once(':').context("headers are written `Name: value`")?;
        req = req.header(name.trim(), value.trim());
    }
    let req = req.body(Empty::<Bytes>::new())?;
    if tls {
        let config = tls_config(&trust)?;
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let stream = connector.connect(ServerName::try_from(host)?, tcp).await.context("tls handshake failed")?;
        bridge(stream, req, eol).await
    } else {
        bridge(tcp, req, eol).await
    }
}

/// The TLS client configuration for `trust`: its CA file's certificates as roots, each also
/// trusted as itself when the server presents it (a self-signed certificate), and the system's
/// roots when asked.
fn tls_config(trust: &Trust<'_>) -> anyhow::Result<rustls::ClientConfig> {
    if trust.ca.is_none() && !trust.system_roots {
        bail!("wss:// needs --ca FILE (the demo prints its certificate path) or --system-roots");
    }
    let mut roots = rustls::RootCertStore::empty();
    let mut pinned = Vec::new();
    if let Some(ca) = trust.ca {
        for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("cannot read {}", ca.display()))? {
            let cert = cert?;
            roots.add(cert.clone())?;
            pinned.push(cert);
        }
    }
    if trust.system_roots {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            eprintln!("warning: system trust store: {e}");
        }
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            bail!("--system-roots: no certificate found in the system trust store");
        }
    }
    let provider = portcullis::crypto::provider();
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("no usable trust root")?;
    let verifier = Arc::new(Pinned { webpki, pinned });
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// The WebPKI verifier, and one exception OpenSSL (curl) makes too: a server certificate that
/// is itself one of the certificates the user gave with `--ca` is trusted as such, even when
/// WebPKI refuses it as an end entity (a self-signed certificate from `openssl req -x509` has
/// CA:TRUE: `CaUsedAsEndEntity`). Its names must still cover the server's name, and the
/// handshake's signatures are checked as always.
#[derive(Debug)]
struct Pinned {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let refused = match self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Ok(ok) => return Ok(ok),
            Err(e) => e,
        };
        // Only WebPKI's refusals of a certificate *as an end entity* are reconsidered: a
        // self-signed one is its own unknown issuer, and a CA:TRUE one is refused as a CA. An
        // expired, not yet valid or otherwise broken certificate stays refused (WebPKI checks
        // dates first).
        let as_end_entity = match &refused {
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => true,
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
                other.0.downcast_ref::<webpki::Error>() == Some(&webpki::Error::CaUsedAsEndEntity)
            }
            _ => false,
        };
        if !as_end_entity || !self.pinned.iter().any(|p| p.as_ref() == end_entity.as_ref()) {
            return Err(refused);
        }
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| refused.clone())?;
        cert.verify_is_valid_for_subject_name(server_name)
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))?;
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

async fn bridge<S>(stream: S, req: Request<Empty<Bytes>>, eol: &[u8]) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // The handshake by hand (hyper), so that a refusal shows the proxy's reason: its status,
    // its body and its `WWW-Authenticate`.
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.context("websocket handshake failed")?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let resp = sender.send_request(req).await.context("websocket handshake failed")?;
    let status = resp.status();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(|v| format!(" (WWW-Authenticate: {v})"))
            .unwrap_or_default();
        let body = Limited::new(resp.into_body(), 4096).collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let reason = String::from_utf8_lossy(&body).trim().to_owned();
        bail!("the proxy refused the WebSocket: {status}: {reason}{challenge}");
    }
    let upgraded = hyper::upgrade::on(resp).await.context("websocket handshake failed")?;
    eprintln!("connected ({status})");
    let ws = fastwebsockets::WebSocket::after_handshake(TokioIo::new(upgraded), fastwebsockets::Role::Client);
    let mut ws = fastwebsockets::FragmentCollector::new(ws);
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdin_open = true;
    loop {
        tokio::select! {
            line = lines.next_line(), if stdin_open => match line? {
                Some(l) => {
                    let mut line = l.into_bytes();
                    line.extend_from_slice(eol);
                    ws.write_frame(Frame::text(Payload::Owned(line))).await?
                }
                None => {
                    stdin_open = false;
                    ws.write_frame(Frame::close(code::NORMAL, b"bye")).await?;
                }
            },
            frame = ws.read_frame() => {
                let frame = match frame {
                    Ok(f) => f,
                    // Our close was sent: the peer ending the connection is the end.
                    Err(_) if !stdin_open => return Ok(()),
                    Err(e) => return Err(e.into()),
                };
                match frame.opcode {
                    OpCode::Text | OpCode::Binary => println!("{}", String::from_utf8_lossy(&frame.payload)),
                    OpCode::Close => {
                        let p = &frame.payload;
                        match p.get(..2) {
                            Some(c) => eprintln!(
                                "closed: {} {}",
                                u16::from_be_bytes([c[0], c[1]]),
                                String::from_utf8_lossy(p.get(2..).unwrap_or_default())
                            ),
                            None => eprintln!("closed (no status code)"),
                        }
                        return Ok(());
                    }
                    _ => {}
                }
            }
        }
    }
}
