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
