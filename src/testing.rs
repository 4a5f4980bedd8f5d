//! Helpers of the crate's unit tests that open real sockets.

use std::net::SocketAddr;
use std::time::Duration;

/// A listener on 127.0.0.1 whose accept queue is full, with the connection that fills it:
/// the kernel drops every further SYN, so a connect to it stays in SYN-SENT until it times out.
pub(crate) fn black_hole() -> (std::net::TcpListener, std::net::TcpStream) {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("an address");
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
    socket.bind(&addr.into()).expect("bind");
    socket.listen(0).expect("listen");
    let listener: std::net::TcpListener = socket.into();
    let at = listener.local_addr().expect("its address");
    let filler = std::net::TcpStream::connect_timeout(&at, Duration::from_secs(1)).expect("the filler");
    (listener, filler)
}

/// Sockets in SYN-SENT towards `port` in this network namespace, from `/proc/net/tcp` (IPv4
/// sockets) or `/proc/net/tcp6` (IPv6 ones, v4-mapped addresses included).
pub(crate) fn syn_sent_to(table: &str, port: u16) -> usize {
    let port = format!(":{port:04X}");
    std::fs::read_to_string(format!("/proc/net/{table}"))
        .expect("the socket table")
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<_> = l.split_whitespace().collect();
            // remote address, then the state: 02 is SYN-SENT.
            f.len() > 3 && f[2].ends_with(&port) && f[3] == "02"
        })
        .count()
}
