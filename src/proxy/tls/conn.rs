//! A client's TLS connection, driven through rustls's unbuffered API so that it owns no buffer
//! while it is idle.
//!
//! rustls's buffered connection (and `tokio-rustls` over it) keeps a 4 KiB receive buffer and
//! its queues for the connection's whole life. Here the connection owns only the rustls state;
//! its three byte buffers come from the relay's [`pool`] and go back as soon as they are empty:
//!
//! - `rx`: ciphertext read from the socket, decrypted by rustls; taken for a read, returned when
//!   the read finds nothing and no partial record is held;
//! - `tx`: records encrypted for the socket; taken by a write, returned once flushed;
//! - `plain`: decrypted bytes the reader had no room for; returned once read.
//!
//! Reads take up to a whole record buffer from the socket at once, and writes encrypt straight
//! into `tx` (no queue of per-record vectors), so the busy path also copies less. Records a
//! write finds already read are decrypted into `plain` (bounded by one record buffer), so that a
//! reader that has stopped never blocks a writer. A fatal error sends rustls's alert before the
//! error is returned; shutdown sends `close_notify`; a `close_notify` from the peer reads as the
//! end of the stream, and an end without one as `UnexpectedEof`, as with `tokio-rustls`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::proxy::relay::pool;

/// Size of a pooled record buffer: the largest record on the wire (16 KiB of payload, the
/// 2 KiB of expansion TLS 1.2 allows, and the header).
pub const RECORD_BUF: usize = 16_384 + 2_048 + 5;
/// How far `rx` may grow to join one handshake message (at most 64 KiB, in records).
const MAX_RX: usize = 4 * RECORD_BUF;
/// Plaintext encrypted into one record.
const MAX_PLAINTEXT: usize = 16_384;
/// Room a record needs in `tx` beyond its plaintext (header, content type, tag, and a queued
/// key update ahead of it).
const RECORD_OVERHEAD: usize = 256;

/// Bytes in a pooled buffer: `data[start..end]`; no buffer while empty.
#[derive(Default)]
struct Buf {
    data: Option<Box<[u8]>>,
    start: usize,
    end: usize,
}

impl Buf {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn bytes(&mut self) -> &mut [u8] {
        match &mut self.data {
            Some(d) => &mut d[self.start..self.end],
            None => &mut [],
        }
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.end {
            (self.start, self.end) = (0, 0);
        }
    }

    /// Room after the bytes: a buffer is taken from the pool if none is held, and the bytes
    /// are moved to the front when that makes room.
    fn spare(&mut self) -> &mut [u8] {
        let d = self.data.get_or_insert_with(|| pool::take(RECORD_BUF));
        if self.start > 0 && self.end == d.len() {
            d.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        &mut d[self.end..]
    }

    fn capacity(&self) -> usize {
        self.data.as_ref().map_or(0, |d| d.len())
    }

    /// Grows the buffer to hold at least `len` bytes, up to `max`; false when it cannot.
    fn grow(&mut self, len: usize, max: usize) -> bool {
        let size = self.capacity().max(RECORD_BUF).saturating_mul(2).max(len);
        if len > max || self.capacity() >= max {
            return false;
        }
        let mut bigger = pool::take(size.min(max));
        let n = self.end - self.start;
        if let Some(old) = self.data.take() {
            bigger[..n].copy_from_slice(&old[self.start..self.end]);
            pool::give(old);
        }
        (self.data, self.start, self.end) = (Some(bigger), 0, n);
        true
    }

    /// Appends `bytes`, growing the buffer as needed.
    fn push(&mut self, bytes: &[u8]) {
        if self.spare().len() < bytes.len() {
            self.grow(self.end - self.start + bytes.len(), usize::MAX);
        }
        let end = self.end;
        self.spare()[..bytes.len()].copy_from_slice(bytes);
        self.end = end + bytes.len();
    }

    /// Returns the buffer to the pool if it holds nothing.
    fn release_if_empty(&mut self) {
        if self.is_empty() {
            if let Some(d) = self.data.take() {
                pool::give(d);
            }
        }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Some(d) = self.data.take() {
            pool::give(d);
        }
    }
}

/// What a call to [`TlsConn::step`] is for.
enum Want<'a, 'b> {
    /// Finish the handshake.
    Handshake,
    /// Plaintext for this buffer.
    Read(&'a mut ReadBuf<'b>),
    /// Encrypt (a prefix of) these bytes.
    Write(&'a [u8]),
    /// Queue `close_notify`.
    CloseNotify,
}

/// Where [`TlsConn::step`] stopped.
enum Step {
    /// Something was done; step again.
    Progress,
    /// Nothing more can happen without bytes from the peer.
    NeedsRead,
    /// The handshake is over and nothing is owed: application data may be sent.
    Writable,
    /// `tx` must be flushed before this can go on.
    Flush,
    /// This many plaintext bytes were encrypted into `tx` (0 for `close_notify`).
    Wrote(usize),
    /// Both sides sent `close_notify`.
    Closed,
    /// A handshake flight waits for the socket (the waker is registered); not returned.
    Blocked,
    /// The socket failed while a handshake flight was written; not returned.
    Io(io::Error),
}

/// A TLS server connection over TCP that holds no buffer while idle.
pub struct TlsConn {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    rx: Buf,
    tx: Buf,
    plain: Buf,
    /// The peer sent `close_notify`: the stream ends once `plain` is read.
    peer_closed: bool,
    /// The proxy sent `close_notify`: nothing more may be written.
    sent_close: bool,
    /// A fatal error ended the connection (its alert was sent).
    failed: bool,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn").field("tcp", &self.tcp).field("handshaking", &self.conn.is_handshaking()).finish()
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsConn {
    /// Runs the server handshake on `tcp` (unbounded: the caller bounds it). The connection
    /// is returned once the client's `Finished` is in; application data the client sent with
    /// it is kept for the first read.
    pub async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<TlsConn> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut s = TlsConn {
            tcp,
            conn,
            rx: Buf::default(),
            tx: Buf::default(),
            plain: Buf::default(),
            peer_closed: false,
            sent_close: false,
            failed: false,
        };
        std::future::poll_fn(|cx| s.poll_handshake(cx)).await?;
        Ok(s)
    }

    /// The protocol ALPN settled on, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match ready!(self.step(cx, Want::Handshake))? {
                Step::Writable if !self.conn.is_handshaking() => {
                    ready!(self.poll_flush_tx(cx))?;
                    self.rx.release_if_empty();
                    return Poll::Ready(Ok(()));
                }
                Step::Flush => ready!(self.poll_flush_tx(cx))?,
                Step::Closed => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Step::Writable | Step::NeedsRead => {
                    // A TLS 1.3 server may send after its own Finished; the handshake is over
                    // only once the client's is in.
                    ready!(self.poll_flush_tx(cx))?;
                    if ready!(self.poll_fill_rx(cx))? == 0 {
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof")));
                    }
                }
                Step::Progress | Step::Wrote(_) | Step::Blocked | Step::Io(_) => {}
            }
        }
    }

    /// One call into rustls with the ciphertext held, and whatever the state it returns asks
    /// for; `Pending` only while a handshake flight waits for the socket.
    fn step(&mut self, cx: &mut Context<'_>, want: Want<'_, '_>) -> Poll<io::Result<Step>> {
        if self.failed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, "tls connection failed")));
        }
        let TlsConn { tcp, conn, rx, tx, plain, peer_closed, sent_close, .. } = self;
        let UnbufferedStatus { mut discard, state } = conn.process_tls_records(rx.bytes());
        let result = match state {
            Err(e) => Err(e),
            Ok(ConnectionState::ReadTraffic(mut records)) => {
                let mut out = match want {
                    Want::Read(buf) => Some(buf),
                    _ => None,
                };
                let mut result = Ok(Step::Progress);
                while let Some(record) = records.next_record() {
                    match record {
                        Ok(record) => {
                            discard += record.discard;
                            let mut payload = record.payload;
                            if let Some(out) = out.as_mut().filter(|_| plain.is_empty()) {
                                let n = payload.len().min(out.remaining());
                                out.put_slice(&payload[..n]);
                                payload = &payload[n..];
                            }
                            if !payload.is_empty() {
                                plain.push(payload);
                            }
                        }
                        Err(e) => {
                            result = Err(e);
                            break;
                        }
                    }
                }
                result
            }
            Ok(ConnectionState::EncodeTlsData(mut data)) => match data.encode(tx.spare()) {
                Ok(n) => {
                    tx.end += n;
                    Ok(Step::Progress)
                }
                Err(EncodeError::InsufficientSize(need)) if tx.is_empty() => {
                    if tx.grow(need.required_size, MAX_RX) {
                        Ok(Step::Progress)
                    } else {
                        Err(rustls::Error::General("handshake flight too large".into()))
                    }
                }
                Err(EncodeError::InsufficientSize(_)) => Ok(Step::Flush),
                Err(EncodeError::AlreadyEncoded) => Err(rustls::Error::General("record encoded twice".into())),
            },
            Ok(ConnectionState::TransmitTlsData(transmit)) => {
                let mut sent = Poll::Ready(Ok(()));
                while !tx.is_empty() {
                    match Pin::new(&mut *tcp).poll_write(cx, tx.bytes()) {
                        Poll::Ready(Ok(n)) if n > 0 => tx.consume(n),
                        Poll::Ready(Ok(_)) => sent = Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                        Poll::Ready(Err(e)) => sent = Poll::Ready(Err(e)),
                        Poll::Pending => sent = Poll::Pending,
                    }
                    if !matches!(sent, Poll::Ready(Ok(()))) {
                        break;
                    }
                }
                match sent {
                    Poll::Ready(Ok(())) => {
                        tx.release_if_empty();
                        transmit.done();
                        Ok(Step::Progress)
                    }
                    Poll::Ready(Err(e)) => Ok(Step::Io(e)),
                    Poll::Pending => Ok(Step::Blocked),
                }
            }
            Ok(ConnectionState::BlockedHandshake) => Ok(Step::NeedsRead),
            Ok(ConnectionState::PeerClosed) => {
                *peer_closed = true;
                Ok(Step::Progress)
            }
            Ok(ConnectionState::Closed) => {
                *peer_closed = true;
                Ok(Step::Closed)
            }
            Ok(ConnectionState::WriteTraffic(mut traffic)) => match want {
                Want::Handshake | Want::Read(_) => Ok(Step::Writable),
                Want::Write(_) | Want::CloseNotify if *sent_close => Ok(Step::Closed),
                Want::Write(data) => {
                    let room = tx.spare().len();
                    if room < RECORD_OVERHEAD + 1 {
                        Ok(Step::Flush)
                    } else {
                        let n = data.len().min(MAX_PLAINTEXT).min(room - RECORD_OVERHEAD);
                        match traffic.encrypt(&data[..n], tx.spare()) {
                            Ok(written) => {
                                tx.end += written;
                                Ok(Step::Wrote(n))
                            }
                            Err(EncryptError::InsufficientSize(_)) if !tx.is_empty() => Ok(Step::Flush),
                            Err(e) => Err(rustls::Error::General(e.to_string())),
                        }
                    }
                }
                Want::CloseNotify => match traffic.queue_close_notify(tx.spare()) {
                    Ok(written) => {
                        tx.end += written;
                        *sent_close = true;
                        Ok(Step::Wrote(0))
                    }
                    Err(EncryptError::InsufficientSize(_)) if !tx.is_empty() => Ok(Step::Flush),
                    Err(e) => Err(rustls::Error::General(e.to_string())),
                },
            },
            Ok(ConnectionState::ReadEarlyData(_)) => Err(rustls::Error::General("early data is not accepted".into())),
            Ok(_) => Err(rustls::Error::General("unexpected tls connection state".into())),
        };
        rx.consume(discard);
        match result {
            Ok(Step::Blocked) => Poll::Pending,
            Ok(Step::Io(e)) => Poll::Ready(Err(e)),
            Ok(step) => Poll::Ready(Ok(step)),
            Err(e) => Poll::Ready(Err(self.fail(e))),
        }
    }

    /// Ends the connection on a fatal error: the alert rustls queued for it is sent if the
    /// socket takes it at once, and nothing more is read or written.
    fn fail(&mut self, e: rustls::Error) -> io::Error {
        self.failed = true;
        loop {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            match state {
                Ok(ConnectionState::EncodeTlsData(mut data)) => match data.encode(self.tx.spare()) {
                    Ok(n) => self.tx.end += n,
                    Err(_) => break,
                },
                _ => break,
            }
        }
        while !self.tx.is_empty() {
            match self.tcp.try_write(self.tx.bytes()) {
                Ok(n) if n > 0 => self.tx.consume(n),
                _ => break,
            }
        }
        self.tx = Buf::default();
        self.rx = Buf::default();
        tls_error(e)
    }

    /// Reads ciphertext into `rx`; the number of bytes read (0 at the end of the stream).
    fn poll_fill_rx(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.rx.spare().is_empty() && !self.rx.grow(self.rx.capacity() + 1, MAX_RX) {
            return Poll::Ready(Err(self.fail(rustls::Error::General("tls message too large".into()))));
        }
        let mut rb = ReadBuf::new(self.rx.spare());
        match Pin::new(&mut self.tcp).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                self.rx.end += n;
                self.rx.release_if_empty();
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                self.rx.release_if_empty();
                Poll::Pending
            }
        }
    }

    /// Sends `close_notify` (once) and flushes it: the end of this side's stream, short of the
    /// TCP shutdown (closing the socket sends the FIN).
    pub fn poll_close_notify(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.sent_close && !self.failed {
            match ready!(self.step(cx, Want::CloseNotify)) {
                Ok(Step::Flush) => ready!(self.poll_flush_tx(cx))?,
                Ok(Step::Wrote(_)) | Ok(Step::Closed) => break,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if self.failed {
            return Poll::Ready(Ok(()));
        }
        self.poll_flush_tx(cx)
    }

    /// Writes `tx` out; its buffer goes back to the pool once empty.
    fn poll_flush_tx(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.tx.is_empty() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, self.tx.bytes()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.tx.consume(n);
        }
        self.tx.release_if_empty();
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.plain.is_empty() {
                let bytes = this.plain.bytes();
                let n = bytes.len().min(buf.remaining());
                buf.put_slice(&bytes[..n]);
                this.plain.consume(n);
                this.plain.release_if_empty();
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            // Every record already read is decrypted before the read returns (rustls yields
            // them one per call): a client's burst of small records, read by one system call,
            // reaches the relay as one read and leaves for the backend as one write, not one
            // write per record. What would need the socket, or a full `buf`, ends the read.
            let got = |buf: &ReadBuf<'_>| buf.filled().len() > before;
            let step = match this.step(cx, Want::Read(buf)) {
                Poll::Pending if got(buf) => return Poll::Ready(Ok(())),
                polled => ready!(polled)?,
            };
            match step {
                _ if got(buf) && (buf.remaining() == 0 || !this.plain.is_empty()) => return Poll::Ready(Ok(())),
                Step::Closed => return Poll::Ready(Ok(())),
                Step::Flush if got(buf) => match this.poll_flush_tx(cx) {
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => {}
                    Poll::Pending => return Poll::Ready(Ok(())),
                },
                Step::Flush => ready!(this.poll_flush_tx(cx))?,
                Step::NeedsRead | Step::Writable if got(buf) => return Poll::Ready(Ok(())),
                Step::NeedsRead | Step::Writable => {
                    if this.peer_closed {
                        continue;
                    }
                    if ready!(this.poll_fill_rx(cx))? == 0 {
                        let why = if this.rx.is_empty() {
                            "peer closed the connection without sending close_notify"
                        } else {
                            "peer closed the connection in the middle of a record"
                        };
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, why)));
                    }
                }
                Step::Progress | Step::Wrote(_) | Step::Blocked | Step::Io(_) => {}
            }
        }
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            match ready!(this.step(cx, Want::Write(data)))? {
                Step::Wrote(n) => {
                    // Coalesced with what follows until the caller flushes, or `tx` is full.
                    return Poll::Ready(Ok(n));
                }
                Step::Flush => ready!(this.poll_flush_tx(cx))?,
                Step::Closed => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                Step::NeedsRead | Step::Writable => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::NotConnected, "tls handshake not complete")))
                }
                Step::Progress | Step::Blocked | Step::Io(_) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_tx(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_close_notify(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::TlsConn;

    /// A client's burst of small records, in the socket together, is one read: the relay then
    /// sends it to the backend in one write, not one per record (which doubled the system calls
    /// per message at TLS saturation).
    #[tokio::test]
    async fn records_already_read_are_decrypted_into_one_read() {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        let cert = CertificateDer::from(ck.cert.der().to_vec());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
        let server = rustls::ServerConfig::builder_with_provider(crate::crypto::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(crate::crypto::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
        let client_task = tokio::spawn(async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let name = ServerName::try_from("localhost").expect("name");
            let mut tls =
                tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, tcp).await.expect("handshake");
            for i in 0..4u8 {
                // One record each: written and flushed one by one.
                tls.write_all(&[i; 64]).await.expect("write");
                tls.flush().await.expect("flush");
            }
            let _ = sent_tx.send(());
            let mut rest = Vec::new();
            let _ = tls.read_to_end(&mut rest).await;
        });
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut conn = TlsConn::accept(Arc::new(server), tcp).await.expect("server handshake");
        sent_rx.await.expect("the client wrote its four records");
        // And they are all in: on a loaded machine loopback can deliver after the send returns.
        // (5 + 64 + 1 + 16 bytes a TLS 1.3 record; what the handshake read already is in `rx`.)
        let queued = async {
            loop {
                let mut probe = [0u8; 1024];
                let peeked = conn.tcp.peek(&mut probe).await.expect("peek");
                if peeked + (conn.rx.end - conn.rx.start) >= 4 * (5 + 64 + 1 + 16) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), queued).await.expect("the records arrive");
        let mut buf = vec![0u8; 16 * 1024];
        let n = conn.read(&mut buf).await.expect("read");
        assert_eq!(n, 4 * 64, "the four records in one read");
        assert!(buf[..n].chunks(64).enumerate().all(|(i, c)| c.iter().all(|b| usize::from(*b) == i)));
        drop(conn);
        let _ = client_task.await;
    }
}
