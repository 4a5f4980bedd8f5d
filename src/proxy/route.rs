//! Stage: route. Picks the route for a request's host and path from the routing table
//! ([`crate::routing::table`]), with its validated captures; 404 when none matches, 400 when a
//! captured value is not a valid id. Runs before the upgrade checks: the route decides what
//! the request must be and which auth policy applies.

use std::sync::Arc;

use http::header::HOST;
use http::HeaderMap;

use crate::config::{Captures, RouteConfig};
use crate::routing::table::RouteTable;

pub use crate::routing::table::RouteError;

/// The route and captures for a request with these headers and path.
pub(crate) fn find(
    table: &RouteTable,
    headers: &HeaderMap,
    path: &str,
) -> Result<(Arc<RouteConfig>, Captures), RouteError> {
    let host = headers.get(HOST).and_then(|h| h.to_str().ok()).map(strip_port);
    table.find(host, path)
}

/// The host of a `Host` header value, without its port (`[::1]:8443` gives `::1`).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map(|(h, _)| &h[1..]).unwrap_or(host);
    }
    host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::strip_port;

    #[test]
    fn host_port_is_stripped() {
        assert_eq!(strip_port("a.example.com:8443"), "a.example.com");
        assert_eq!(strip_port("a.example.com"), "a.example.com");
        assert_eq!(strip_port("[::1]:8443"), "::1");
    }
}
