//! Test configurations as TOML tables: built, merged and edited as data (values written with
//! `serde_json::json!`, Rust values interpolated), rendered to text only for the parser under
//! test. [`TestConfig::parse`] is for tests whose subject is the configuration text itself.

use std::fmt;

pub use serde_json::json;
use toml::{Table, Value};

use super::certs;

/// A configuration under construction.
#[derive(Debug, Clone)]
pub struct TestConfig(Table);

impl TestConfig {
    /// The base for most tests: one TLS and one plain listener on port 0 (in that order), an
    /// admin listener, short timeouts, and the route `terminal` (`/agents/{agent}/terminal`) to
    /// `backends`.
    pub fn base(backends: &[String]) -> TestConfig {
        let c = certs();
        TestConfig(table(json!({
            "server": {
                "tls_handshake_timeout": "2s",
                "header_read_timeout": "2s",
                "drain_timeout": "10s",
                "drain_spread": "200ms",
            },
            "listeners": [
                {"name": "tls", "addresses": ["127.0.0.1:0"], "tls": true},
                {"name": "plain", "addresses": ["127.0.0.1:0"]},
            ],
            "admin": {"address": "127.0.0.1:0"},
            "session": {
                "ping_interval": "0s",
                "close_timeout": "1s",
                "max_frame_size": "2MiB",
                "max_message_size": "4MiB",
            },
            "backend": {"connect_timeout": "1s", "handshake_timeout": "1s"},
            "routes": [{"name": "terminal", "path": "/agents/{agent}/terminal", "backends": backends}],
            "tls": {"cert": c.cert.display().to_string(), "key": c.key.display().to_string()},
        })))
    }

    /// A configuration from TOML text: for tests whose subject is the text (a file read back from
    /// disk, the parser's own cases); everything else builds typed values.
    pub fn parse(text: &str) -> TestConfig {
        TestConfig(text.parse().unwrap_or_else(|e| panic!("test config is not TOML: {e}\n{text}")))
    }

    /// Merges `extra` (a table, or a `json!` object) into the table at `section` ("" for the top
    /// level): a table merges key by key, `extra`'s value replacing the base's; an array of
    /// tables (`[[routes]]`) is appended to.
    pub fn merge(mut self, section: &str, extra: impl IntoTable) -> TestConfig {
        let extra = extra.into_table();
        let target = if section.is_empty() { &mut self.0 } else { table_at(&mut self.0, section) };
        merge_into(target, extra);
        self
    }

    /// Sets the value at a dotted path (`session.idle_timeout`, `routes.0.name`), creating tables
    /// on the way.
    pub fn set(mut self, path: &str, value: impl Into<Value>) -> TestConfig {
        let (parent, key) = path.rsplit_once('.').unwrap_or(("", path));
        let value = value.into();
        match (parent.is_empty(), key.parse::<usize>()) {
            (false, Ok(i)) => array_at(&mut self.0, parent)[i] = value,
            (true, _) => {
                self.0.insert(key.to_owned(), value);
            }
            (false, Err(_)) => {
                table_at(&mut self.0, parent).insert(key.to_owned(), value);
            }
        }
        self
    }

    /// Removes the value at a dotted path.
    pub fn remove(mut self, path: &str) -> TestConfig {
        let (parent, key) = path.rsplit_once('.').unwrap_or(("", path));
        let table = if parent.is_empty() { &mut self.0 } else { table_at(&mut self.0, parent) };
        table.remove(key).unwrap_or_else(|| panic!("no {path} in the test config"));
        self
    }

    /// One more plain listener `name` on port 0 that requires the PROXY protocol from `from`
    /// (CIDRs); its address is the next of the proxy's `more` addresses.
    pub fn proxy_protocol_listener(self, name: &str, from: &[&str]) -> TestConfig {
        self.merge(
            "",
            json!({"listeners": [{
                "name": name,
                "addresses": ["127.0.0.1:0"],
                "proxy_protocol": true,
                "proxy_protocol_from": from,
            }]}),
        )
    }

    /// Per-client limits off, for tests that play many clients from 127.0.0.1: the defaults are
    /// an internet-facing edge's, and one address opening hundreds of sessions a second is
    /// exactly what they refuse.
    pub fn one_address_load(self) -> TestConfig {
        self.merge(
            "server",
            json!({
                "max_connections_per_ip": 0,
                "handshake_rate_per_ip": 0,
                "connection_rate_per_ip": 0,
                "token_check_rate_per_ip": 0,
            }),
        )
    }

    /// The configuration as TOML text.
    pub fn text(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for TestConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&toml::to_string(&self.0).map_err(|_| fmt::Error)?)
    }
}

/// What [`TestConfig::merge`] takes: a TOML table, or a JSON object written with
/// `serde_json::json!` (converted by [`table`]).
pub trait IntoTable {
    fn into_table(self) -> Table;
}

impl IntoTable for Table {
    fn into_table(self) -> Table {
        self
    }
}

impl IntoTable for serde_json::Value {
    fn into_table(self) -> Table {
        table(self)
    }
}

/// The TOML table of a JSON object (`json!({"max_connections": 5000})`): numbers stay integers
/// or floats, strings stay strings (durations and sizes are strings, "2s", "4KiB", as the
/// configuration format expects); `null` has no TOML form and is refused.
pub fn table(value: serde_json::Value) -> Table {
    match Value::try_from(&value) {
        Ok(Value::Table(t)) => t,
        Ok(other) => panic!("a test config fragment must be an object, not {other}"),
        Err(e) => panic!("test config fragment has no TOML form ({e}): {value}"),
    }
}

fn merge_into(base: &mut Table, extra: Table) {
    for (k, v) in extra {
        match (base.get_mut(&k), v) {
            (Some(Value::Table(b)), Value::Table(e)) => merge_into(b, e),
            (Some(Value::Array(b)), Value::Array(e)) if e.iter().all(Value::is_table) => b.extend(e),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// The table at a dotted path; numeric parts index arrays of tables. Missing tables are made.
fn table_at<'t>(root: &'t mut Table, path: &str) -> &'t mut Table {
    let mut t = root;
    let mut parts = path.split('.').peekable();
    while let Some(part) = parts.next() {
        let next = match parts.peek().and_then(|p| p.parse::<usize>().ok()) {
            Some(i) => {
                parts.next();
                t.get_mut(part).and_then(Value::as_array_mut).and_then(|a| a.get_mut(i))
            }
            None => Some(t.entry(part).or_insert_with(|| Value::Table(Table::new()))),
        };
        t = next.and_then(Value::as_table_mut).unwrap_or_else(|| panic!("no table {path} in the test config"));
    }
    t
}

fn array_at<'t>(root: &'t mut Table, path: &str) -> &'t mut Vec<Value> {
    let (parent, key) = path.rsplit_once('.').unwrap_or(("", path));
    let table = if parent.is_empty() { root } else { table_at(root, parent) };
    table.get_mut(key).and_then(Value::as_array_mut).unwrap_or_else(|| panic!("no array {path} in the test config"))
}
