//! Stage: route. Picks the route for a request's host and path from the routing table
//! ([`crate::routing::table`]), with its validated captures; 404 when none matches, 400 when a
//! captured value is not a valid id. The host is the one [`super::host`] parsed. Runs before the upgrade checks: the route decides what
//! the request must be and which auth policy applies.

use std::sync::Arc;

use super::host::Authority;
use crate::config::{Captures, RouteConfig};
use crate::routing::table::RouteTable;

pub use crate::routing::table::RouteError;

/// The route and captures for a request to this (validated) authority and path.
pub(crate) fn find(
    table: &RouteTable,
    authority: Option<&Authority>,
    path: &str,
) -> Result<(Arc<RouteConfig>, Captures), RouteError> {
    table.find(authority.map(Authority::host), path)
}

/// Like [`find`], and the request goes on with the path in its canonical form (the `{agent}`
/// segment lowercased) when that differs from the one it was sent with: the route, the
/// backend, the logs and the recording all see the one spelling that decided the route.
pub(crate) fn find_for<B>(
    table: &RouteTable,
    authority: Option<&Authority>,
    req: &mut http::Request<B>,
) -> Result<(Arc<RouteConfig>, Captures), RouteError> {
    let (route, caps, canonical) = table.find_canonical(authority.map(Authority::host), req.uri().path())?;
    if let Some(path) = canonical {
        let path_and_query = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = path_and_query.parse().ok();
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    Ok((route, caps))
}
