//! Stage: mcp. What a `kind = "mcp"` route reads and checks of each request before the request
//! stage forwards it (`[routes.mcp]`, `docs/mcp.md`).
//!
//! - The method: `POST` (a JSON-RPC message or batch), `GET` (the server's event stream) and
//!   `DELETE` (the end of a session); any other is 405.
//! - `MCP-Protocol-Version` must name a configured revision (400); a request without it is taken
//!   as 2025-03-26, as the specification says.
//! - A `POST` body must be `application/json` in UTF-8 with no content coding (415), and is read
//!   whole up to `max_message` (413), stalling no longer than `idle_body_timeout` and all of it
//!   within `read_timeout` (408).
//! - Each message is read far enough to learn its method and, for `tools/call`, the tool (for
//!   `prompts/get` the prompt, for `resources/read` the URI). A body that is not JSON-RPC is
//!   refused (400), as is one whose object repeats a key the proxy reads: the backend's parser
//!   may keep another copy than ours, so a repeated key could show the proxy one tool and the
//!   server another.
//! - The `Mcp-Method` and `Mcp-Name` headers (2026-07-28), when present, must say what the body
//!   says (400): an intermediary that routes or authorizes by header must not be shown one
//!   method while the server runs another.
//! - With `method_scope` or `tool_scope`, each message must be granted by the token's scopes;
//!   a refusal is a JSON-RPC error for each request of the body, and nothing is forwarded.
//!
//! The body is forwarded unchanged, and no result is ever read or rewritten.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::Value;

use crate::auth::Claims;
use crate::config::{render_path, Captures, McpSettings};

/// The header that names the protocol revision of a request.
pub const PROTOCOL_VERSION: &str = "mcp-protocol-version";
/// The 2026-07-28 header that repeats a message's method.
pub const METHOD_HEADER: &str = "mcp-method";
/// The 2026-07-28 header that repeats a message's tool, prompt or resource.
pub const NAME_HEADER: &str = "mcp-name";
/// The revision of a request without `MCP-Protocol-Version` (the specification's default).
const DEFAULT_REVISION: &str = "2025-03-26";

/// The revision that removed sessions and made `Mcp-Method` and `Mcp-Name` required.
const STATELESS_REVISION: &str = "2026-07-28";

/// The JSON-RPC error codes the proxy answers with: JSON-RPC's own, and the MCP specification's
/// (2026-07-28, `basic/index`). A refused authorization is answered as MCP answers an unknown
/// tool or method (-32602, -32601), with HTTP 403 and the scope that would grant it.
mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    /// `HeaderMismatch`: `Mcp-Method`/`Mcp-Name` missing or not what the body says.
    pub const HEADER_MISMATCH: i64 = -32020;
    /// `UnsupportedProtocolVersionError`, with the supported and requested revisions.
    pub const UNSUPPORTED_VERSION: i64 = -32022;
}

/// Why an MCP request was refused before it reached the server.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// Not `POST`, `GET` or `DELETE` (405).
    #[error("an MCP endpoint takes POST, GET and DELETE")]
    Method,
    /// `MCP-Protocol-Version` names a revision the route does not serve (400).
    #[error("unsupported MCP-Protocol-Version")]
    Version {
        /// The revisions the route serves.
        supported: Vec<String>,
        /// What the request named (`None`: not readable, or sent twice).
        requested: Option<String>,
    },
    /// A JSON-RPC batch under a revision without batches (2025-06-18 and later) (400).
    #[error("MCP message: JSON-RPC batches are not part of revision {0}")]
    Batch(String),
    /// The body is not `application/json` in UTF-8 without a content coding (415).
    #[error("an MCP message is application/json, in UTF-8, without Content-Encoding")]
    ContentType,
    /// The body is larger than `max_message` (413).
    #[error("MCP message over the limit of {0} bytes")]
    TooLarge(u64),
    /// The body stalled for `idle_body_timeout` (408).
    #[error("MCP message stalled for {0:?}")]
    Stalled(Duration),
    /// The body was still arriving after `read_timeout` (408).
    #[error("MCP message not read within {0:?}")]
    ReadTimeout(Duration),
    /// The client's body failed (400).
    #[error("MCP message: the body could not be read")]
    Body,
    /// Not JSON (400, JSON-RPC -32700).
    #[error("MCP message: not valid JSON")]
    Parse,
    /// JSON, but not a JSON-RPC message or batch the proxy can read (400, -32600).
    #[error("MCP message: {0}")]
    Invalid(&'static str),
    /// A `tools/call`, `prompts/get` or `resources/read` without its name (400, -32602).
    #[error("MCP message: {0} needs its params.{1}")]
    MissingName(String, &'static str),
    /// `Mcp-Method` or `Mcp-Name` says something else than the body, or is missing where the
    /// revision requires it (400, -32020).
    #[error("the {0} header does not match the message body")]
    HeaderMismatch(&'static str),
    /// The token does not grant the method or tool (403, and -32601 or -32602).
    #[error("{0}")]
    Denied(Denial),
}

/// What the token was not granted.
#[derive(Debug)]
pub struct Denial {
    /// The method refused.
    pub method: String,
    /// The tool refused, for a `tools/call`.
    pub tool: Option<String>,
    /// The scope that would have granted it; `None` when the name cannot be part of a scope
    /// (RFC 6749 §3.3: no space, `"` or `\`; and no `*`, the wildcard), so only the wildcard
    /// grants it and no challenge names a scope the client did not ask about.
    pub scope: Option<String>,
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.tool {
            Some(tool) => write!(f, "the token does not grant the tool {:?}", clip(tool)),
            None => write!(f, "the token does not grant the method {:?}", clip(&self.method)),
        }?;
        match &self.scope {
            Some(scope) => write!(f, " (scope {scope:?})"),
            None => Ok(()),
        }
    }
}

impl McpError {
    /// The HTTP status answered.
    pub fn status(&self) -> StatusCode {
        match self {
            McpError::Method => StatusCode::METHOD_NOT_ALLOWED,
            McpError::ContentType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            McpError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            McpError::Stalled(_) | McpError::ReadTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            McpError::Denied(_) => StatusCode::FORBIDDEN,
            McpError::Version { .. }
            | McpError::Batch(_)
            | McpError::Body
            | McpError::Parse
            | McpError::Invalid(_)
            | McpError::MissingName(..)
            | McpError::HeaderMismatch(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// Bounded label for metrics and the access log.
    pub fn label(&self) -> &'static str {
        match self {
            McpError::Method => "mcp_method_not_allowed",
            McpError::Version { .. } => "mcp_version",
            McpError::Batch(_) => "mcp_invalid",
            McpError::ContentType => "mcp_content_type",
            McpError::TooLarge(_) => "mcp_too_large",
            McpError::Stalled(_) => "mcp_body_timeout",
            McpError::ReadTimeout(_) => "mcp_read_timeout",
            McpError::Body => "mcp_body_error",
            McpError::Parse => "mcp_parse_error",
            McpError::Invalid(_) | McpError::MissingName(..) => "mcp_invalid",
            McpError::HeaderMismatch(_) => "mcp_header_mismatch",
            McpError::Denied(_) => "mcp_denied",
        }
    }

    fn code(&self) -> i64 {
        match self {
            McpError::Parse => code::PARSE_ERROR,
            McpError::MissingName(..) => code::INVALID_PARAMS,
            McpError::HeaderMismatch(_) => code::HEADER_MISMATCH,
            McpError::Version { .. } => code::UNSUPPORTED_VERSION,
            McpError::Denied(Denial { tool: Some(_), .. }) => code::INVALID_PARAMS,
            McpError::Denied(Denial { tool: None, .. }) => code::METHOD_NOT_FOUND,
            _ => code::INVALID_REQUEST,
        }
    }
}

/// A refusal with the ids of the requests it answers: one JSON-RPC error each (a batch gets an
/// array), or one with a null id when the body could not be read.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Refusal {
    /// Why.
    pub error: McpError,
    /// Whom the answer addresses.
    ids: Ids,
}

/// The requests a refusal answers.
#[derive(Debug, Default)]
enum Ids {
    /// The body was not read: one error, with a null id.
    #[default]
    Unknown,
    /// One message: its id when it was a request, else a null id.
    One(Option<Value>),
    /// A batch: each request's id, and whether it is the one refused (its error says why; the
    /// others' say only that they were refused with it, so a long name is not repeated for
    /// every request of the batch).
    Batch(Vec<(Value, bool)>),
}

/// The most of a client's name (a tool, a method) the proxy repeats, in answers and logs.
const ECHO_MAX: usize = 128;

/// `name`, cut to [`ECHO_MAX`] bytes at a character boundary, marked when cut.
pub fn clip(name: &str) -> std::borrow::Cow<'_, str> {
    if name.len() <= ECHO_MAX {
        return name.into();
    }
    let mut end = ECHO_MAX;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &name[..end]).into()
}

impl From<McpError> for Refusal {
    fn from(error: McpError) -> Self {
        Refusal { error, ids: Ids::Unknown }
    }
}

impl Refusal {
    /// The answer: the status, and a JSON-RPC error for each request of the body. The message
    /// is the proxy's own sentence (a denied tool's name is the client's, quoted as JSON).
    pub fn response(&self) -> Response<Full<Bytes>> {
        let error = |id: Value| {
            let mut e = serde_json::json!({ "code": self.error.code(), "message": self.error.to_string() });
            match &self.error {
                McpError::Denied(Denial { scope: Some(scope), .. }) => {
                    e["data"] = serde_json::json!({ "scope": scope })
                }
                McpError::Version { supported, requested } => {
                    e["data"] = serde_json::json!({ "supported": supported, "requested": requested })
                }
                _ => {}
            }
            serde_json::json!({ "jsonrpc": "2.0", "id": id, "error": e })
        };
        let with_it = |id: Value| {
            let e =
                serde_json::json!({ "code": code::INVALID_REQUEST, "message": "refused with the batch it came in" });
            serde_json::json!({ "jsonrpc": "2.0", "id": id, "error": e })
        };
        let body = match &self.ids {
            Ids::Unknown | Ids::One(None) => error(Value::Null),
            Ids::One(Some(id)) => error(id.clone()),
            Ids::Batch(ids) if ids.is_empty() => error(Value::Null),
            Ids::Batch(ids) => Value::Array(
                ids.iter().map(|(id, cause)| if *cause { error(id.clone()) } else { with_it(id.clone()) }).collect(),
            ),
        };
        let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
        *resp.status_mut() = self.error.status();
        let h = resp.headers_mut();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match &self.error {
            McpError::Method => {
                h.insert(http::header::ALLOW, HeaderValue::from_static("GET, POST, DELETE"));
            }
            // RFC 6750 §3.1: the scope the request needs, for a client that can ask for it; only
            // a scope made of scope-token characters is ever written (a name with a quote or a
            // space would otherwise write the client's text into the header).
            McpError::Denied(d) => {
                let value = match d.scope.as_deref().filter(|s| scope_token(s)) {
                    Some(scope) => format!("Bearer error=\"insufficient_scope\", scope=\"{scope}\""),
                    None => "Bearer error=\"insufficient_scope\"".to_owned(),
                };
                if let Ok(v) = HeaderValue::from_str(&value) {
                    h.insert(http::header::WWW_AUTHENTICATE, v);
                }
            }
            _ => {}
        }
        resp
    }
}

/// One message of a body, as far as the proxy reads it. Each field is read once: serde refuses
/// an object that repeats one (`duplicate field`), which is what keeps the proxy and the server
/// reading the same method and name.
#[derive(Deserialize)]
struct Wire {
    jsonrpc: Option<String>,
    /// `Some` whenever the member is there, `null` included: a message with an `id` of `null` is
    /// a request to the server's parser, not a notification.
    #[serde(default, deserialize_with = "present")]
    id: Option<Value>,
    method: Option<String>,
    params: Option<Box<serde_json::value::RawValue>>,
    result: Option<serde::de::IgnoredAny>,
    error: Option<serde::de::IgnoredAny>,
}

/// A member that is there, whatever its value (`null` included).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// The members of a JSON-RPC message. A key spelled like one of them in another case (`Id`,
/// `METHOD`, `param\u{17f}`) is refused: a server whose parser matches keys without regard to
/// case (Go's `encoding/json`, and go-sdk before 1.3.1: CVE-2026-27896) would read it as the
/// member the proxy did not check.
const MEMBERS: [&str; 6] = ["jsonrpc", "id", "method", "params", "result", "error"];

/// `key` folded for a comparison that ignores case: each character to the upper case of its
/// lower case. Go's `encoding/json` matches a key to the rune set of `unicode.SimpleFold`
/// (`ſ`, U+017F, matches `s`; the Kelvin sign `k`); for the names compared here (ASCII
/// letters) this fold finds every key Go would match, and a few more it would not (`ı`,
/// U+0131, for `i`), which are refused too: the safe side.
fn folded(key: &str) -> impl Iterator<Item = char> + '_ {
    key.chars().flat_map(char::to_lowercase).flat_map(char::to_uppercase)
}

/// Whether `key` is not `member` but a parser that ignores case would read it as `member`.
fn spelled_otherwise(key: &str, member: &str) -> bool {
    key != member && folded(key).eq(folded(member))
}

/// One message's keys, checked against [`MEMBERS`] (its values are skipped).
struct Keys;

impl<'de> Deserialize<'de> for Keys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Keys, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Keys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON-RPC message")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if MEMBERS.iter().any(|m| spelled_otherwise(&key, m)) {
                        return Err(serde::de::Error::custom("a member spelled in another case"));
                    }
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
                Ok(Keys)
            }
        }
        d.deserialize_map(Visit)
    }
}

/// The parameters that name what a method acts on: `name` and `uri`, each given once and
/// spelled as MCP spells it (`{"name": "echo", "Name": "shell"}` is refused: a server that
/// ignores case would run `shell`, the last of the two, where the proxy checked `echo`).
/// Other parameters are the tool's, and skipped.
#[derive(Default)]
struct NamedParams {
    name: Option<String>,
    uri: Option<String>,
    /// A `name` or `uri` spelled in another case, or given twice: why the params are refused.
    ambiguous: Option<&'static str>,
}

/// Why a method's params are refused when [`NamedParams::ambiguous`].
const AMBIGUOUS_PARAM: &str = "params.name and params.uri are given once each, spelled as MCP spells them";

impl<'de> Deserialize<'de> for NamedParams {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<NamedParams, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = NamedParams;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a method's params")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<NamedParams, A::Error> {
                let mut params = NamedParams::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let slot = match key.as_ref() {
                        "name" => &mut params.name,
                        "uri" => &mut params.uri,
                        k => {
                            if spelled_otherwise(k, "name") || spelled_otherwise(k, "uri") {
                                params.ambiguous = Some(AMBIGUOUS_PARAM);
                            }
                            map.next_value::<serde::de::IgnoredAny>()?;
                            continue;
                        }
                    };
                    if slot.replace(map.next_value()?).is_some() {
                        params.ambiguous = Some(AMBIGUOUS_PARAM);
                    }
                }
                Ok(params)
            }
        }
        d.deserialize_map(Visit)
    }
}

/// One message of a body: a request or notification (with its method), or a response to the
/// server's own request.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// The request's id (`None`: a notification or a response).
    pub id: Option<Value>,
    /// The method (`None`: a response).
    pub method: Option<String>,
    /// The tool of a `tools/call`, the prompt of a `prompts/get`, the URI of a
    /// `resources/read`, `subscribe` or `unsubscribe`.
    pub name: Option<String>,
}

/// What a `POST` body holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Messages {
    /// The messages, in order.
    pub all: Vec<Message>,
    /// Whether they came as a batch (a JSON array, 2025-03-26).
    pub batch: bool,
}

/// The parameter that names what a method acts on (`Mcp-Name`'s value), for the methods that
/// have one.
fn named_param(method: &str) -> Option<&'static str> {
    match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => Some("uri"),
        _ => None,
    }
}

fn message(wire: Wire) -> Result<Message, McpError> {
    if wire.jsonrpc.as_deref() != Some("2.0") {
        return Err(McpError::Invalid("jsonrpc must be \"2.0\""));
    }
    // A method spelled like one of the specification's but not as it (`Tools/Call`, `tools/call `)
    // is refused: a server that folded it would run what the proxy did not authorize.
    if let Some(m) = wire.method.as_deref() {
        if m.is_empty() || m.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(McpError::Invalid("a method name has no space or control character"));
        }
        if method_label(m) == "other" && method_label(&m.to_ascii_lowercase()) != "other" {
            return Err(McpError::Invalid("a method name is spelled as the specification spells it"));
        }
    }
    match (&wire.method, wire.result.is_some() || wire.error.is_some()) {
        (Some(_), true) => return Err(McpError::Invalid("a message is a request or a response, not both")),
        (None, false) => return Err(McpError::Invalid("a message needs a method, a result or an error")),
        _ => {}
    }
    let name = match wire.method.as_deref().and_then(|m| named_param(m).map(|p| (m, p))) {
        None => None,
        Some((method, param)) => {
            // MCP's params are an object; serde would also read a struct from an array, which
            // the server would not.
            let params: Option<NamedParams> = match &wire.params {
                Some(raw) if raw.get().trim_start().starts_with('{') => Some(
                    serde_json::from_str(raw.get())
                        .map_err(|_| McpError::MissingName(clip(method).into_owned(), param))?,
                ),
                Some(_) => return Err(McpError::MissingName(clip(method).into_owned(), param)),
                None => None,
            };
            if let Some(why) = params.as_ref().and_then(|p| p.ambiguous) {
                return Err(McpError::Invalid(why));
            }
            let name = params.and_then(|p| if param == "name" { p.name } else { p.uri });
            Some(name.ok_or_else(|| McpError::MissingName(clip(method).into_owned(), param))?)
        }
    };
    Ok(Message { id: wire.id, method: wire.method, name })
}

/// Why a message with a member spelled in another case is refused.
const SPELLED: &str = "a member is spelled as JSON-RPC spells it (jsonrpc, id, method, params, result, error)";

/// Reads a body: one JSON-RPC message, or a batch of them.
pub fn parse(body: &[u8]) -> Result<Messages, McpError> {
    // One pass: the first byte says message or batch; what is not JSON at all is told apart
    // from JSON of the wrong shape by serde's error category.
    let refused = |e: serde_json::Error, shape: &'static str| match e.classify() {
        serde_json::error::Category::Data => McpError::Invalid(shape),
        _ => McpError::Parse,
    };
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let wires: Vec<Wire> = serde_json::from_slice(body).map_err(|e| refused(e, "a batch of messages"))?;
        serde_json::from_slice::<Vec<Keys>>(body).map_err(|_| McpError::Invalid(SPELLED))?;
        if wires.is_empty() {
            return Err(McpError::Invalid("an empty batch"));
        }
        let all = wires.into_iter().map(message).collect::<Result<_, _>>()?;
        Ok(Messages { all, batch: true })
    } else {
        let wire: Wire = serde_json::from_slice(body).map_err(|e| refused(e, "not a JSON-RPC message"))?;
        serde_json::from_slice::<Keys>(body).map_err(|_| McpError::Invalid(SPELLED))?;
        Ok(Messages { all: vec![message(wire)?], batch: false })
    }
}

/// The request's `MCP-Protocol-Version`, if the route serves it.
pub fn check_version<'a>(settings: &'a McpSettings, headers: &HeaderMap) -> Result<&'a str, McpError> {
    let refused = |requested: Option<&str>| McpError::Version {
        supported: settings.protocol_versions.clone(),
        requested: requested.map(str::to_owned),
    };
    let mut values = headers.get_all(PROTOCOL_VERSION).iter();
    let asked = match (values.next(), values.next()) {
        (None, _) => DEFAULT_REVISION,
        (Some(v), None) => v.to_str().map_err(|_| refused(None))?.trim(),
        (Some(_), Some(_)) => return Err(refused(None)),
    };
    settings.protocol_versions.iter().find(|v| *v == asked).map(String::as_str).ok_or_else(|| refused(Some(asked)))
}

/// Whether the content type is JSON in UTF-8 and there is no content coding.
fn check_content(headers: &HeaderMap) -> Result<(), McpError> {
    if headers.get_all(http::header::CONTENT_ENCODING).iter().any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity")) {
        return Err(McpError::ContentType);
    }
    let mut types = headers.get_all(http::header::CONTENT_TYPE).iter();
    let (Some(ct), None) = (types.next(), types.next()) else { return Err(McpError::ContentType) };
    let ct = ct.to_str().map_err(|_| McpError::ContentType)?.to_ascii_lowercase();
    let mut parts = ct.split(';').map(str::trim);
    if parts.next() != Some("application/json") {
        return Err(McpError::ContentType);
    }
    for p in parts {
        if let Some(charset) = p.strip_prefix("charset=") {
            if !matches!(charset.trim_matches('"'), "utf-8" | "utf8") {
                return Err(McpError::ContentType);
            }
        }
    }
    Ok(())
}

/// Reads a `POST` body whole: at most `limit` bytes, none of its waits longer than `idle`, all
/// of it within `total`.
pub async fn read_body(
    headers: &HeaderMap,
    body: Incoming,
    limit: u64,
    idle: Duration,
    total: Duration,
) -> Result<Bytes, McpError> {
    check_content(headers)?;
    match tokio::time::timeout(total, read_all(body, limit, idle)).await {
        Ok(read) => read,
        Err(_) => Err(McpError::ReadTimeout(total)),
    }
}

async fn read_all(mut body: Incoming, limit: u64, idle: Duration) -> Result<Bytes, McpError> {
    if hyper::body::Body::size_hint(&body).lower() > limit {
        return Err(McpError::TooLarge(limit));
    }
    // The usual body is one frame, kept as it came; only a body in pieces is copied together.
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut len = 0u64;
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(McpError::Stalled(idle)),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(McpError::Body),
            Ok(Some(Ok(f))) => f,
        };
        if let Ok(data) = frame.into_data() {
            len += data.len() as u64;
            if len > limit {
                return Err(McpError::TooLarge(limit));
            }
            match (&mut joined, first.take()) {
                (Some(j), _) => j.extend_from_slice(&data),
                (None, None) => first = Some(data),
                (None, Some(f)) => {
                    let mut j = BytesMut::with_capacity(f.len() + data.len());
                    j.extend_from_slice(&f);
                    j.extend_from_slice(&data);
                    joined = Some(j);
                }
            }
        }
    }
    Ok(joined.map(BytesMut::freeze).or(first).unwrap_or_default())
}

/// A header value as 2026-07-28 sends it: plain, or `=?base64?<UTF-8 in base64>?=` for a value
/// that is not plain ASCII (decoded before it is compared).
fn header_text(v: &HeaderValue) -> Option<String> {
    let text = v.to_str().ok()?;
    match text.strip_prefix("=?base64?").and_then(|t| t.strip_suffix("?=")) {
        Some(b64) => {
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
            String::from_utf8(bytes).ok()
        }
        None => Some(text.to_owned()),
    }
}

/// Whether the body fits the revision and the headers agree with it: `Mcp-Method` names the
/// method of the (one) message, `Mcp-Name` its tool, prompt or URI. A header sent twice, or on
/// a batch, or on a message without a method, disagrees; under 2026-07-28 a request without
/// them (where that revision requires them) does too.
pub fn check_headers(headers: &HeaderMap, revision: &str, messages: &Messages) -> Result<(), McpError> {
    if messages.batch && revision != DEFAULT_REVISION {
        return Err(McpError::Batch(revision.to_owned()));
    }
    let one = |name: &'static str, label: &'static str| -> Result<Option<String>, McpError> {
        let mut values = headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (None, _) => Ok(None),
            (Some(v), None) => header_text(v).map(Some).ok_or(McpError::HeaderMismatch(label)),
            (Some(_), Some(_)) => Err(McpError::HeaderMismatch(label)),
        }
    };
    let (method, name) = (one(METHOD_HEADER, "Mcp-Method")?, one(NAME_HEADER, "Mcp-Name")?);
    let single = match messages.all.as_slice() {
        [m] if !messages.batch => Some(m),
        _ => None,
    };
    // 2026-07-28 requires both on every request (a message with an id and a method); what a
    // notification carries is not defined there, so it is compared only when sent.
    let request = single.filter(|m| m.id.is_some() && m.method.is_some());
    if let (STATELESS_REVISION, Some(m)) = (revision, request) {
        if method.is_none() {
            return Err(McpError::HeaderMismatch("Mcp-Method"));
        }
        if m.name.is_some() && name.is_none() {
            return Err(McpError::HeaderMismatch("Mcp-Name"));
        }
    }
    if let Some(h) = method {
        if single.and_then(|m| m.method.as_deref()) != Some(h.as_str()) {
            return Err(McpError::HeaderMismatch("Mcp-Method"));
        }
    }
    if let Some(h) = name {
        if single.and_then(|m| m.name.as_deref()) != Some(h.as_str()) {
            return Err(McpError::HeaderMismatch("Mcp-Name"));
        }
    }
    Ok(())
}

/// Whether `s` is a non-empty RFC 6749 scope-token: `%x21 / %x23-5B / %x5D-7E`.
fn scope_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| matches!(b, 0x21 | 0x23..=0x5B | 0x5D..=0x7E))
}

/// Messages every token may send: the session's start and liveness, and notifications. A
/// request (it has an `id`) under `notifications/` is no notification: it needs its scope
/// (an attacker review, 2026-12-06: `notifications/../tools/call` with an id went through).
fn always_granted(m: &Message, method: &str) -> bool {
    matches!(method, "initialize" | "ping") || (m.id.is_none() && method.starts_with("notifications/"))
}

/// A scope template split at its placeholder, the route's captures rendered.
struct Grant {
    prefix: String,
    suffix: String,
}

impl Grant {
    fn new(template: &str, placeholder: &str, caps: &Captures) -> Grant {
        let (prefix, suffix) = template.split_once(placeholder).unwrap_or((template, ""));
        Grant { prefix: render_path(prefix, caps), suffix: render_path(suffix, caps) }
    }

    fn scope(&self, value: &str) -> String {
        format!("{}{value}{}", self.prefix, self.suffix)
    }

    /// Whether the token holds the scope for `value`, or the one with `*` for any. A value that
    /// cannot be part of a scope (see [`Denial::scope`]) is granted by the wildcard only.
    fn holds(&self, claims: Option<&Claims>, value: &str) -> Result<(), Option<String>> {
        let has = |s: &str| claims.is_some_and(|c| c.contains("scope", s) || c.contains("scp", s));
        if has(&self.scope("*")) {
            return Ok(());
        }
        if value.contains('*') || !scope_token(value) {
            return Err(None);
        }
        let scope = self.scope(value);
        if has(&scope) {
            Ok(())
        } else {
            Err(Some(scope))
        }
    }
}

/// Whether the token grants every message of the body (`method_scope`, `tool_scope`).
#[cfg(test)]
fn authorize(
    settings: &McpSettings,
    caps: &Captures,
    claims: Option<&Claims>,
    messages: &Messages,
) -> Result<(), McpError> {
    messages.all.iter().try_for_each(|m| authorize_one(settings, caps, claims, m))
}

/// Whether the token grants one message: its method, and for a `tools/call` its tool.
pub fn authorize_one(
    settings: &McpSettings,
    caps: &Captures,
    claims: Option<&Claims>,
    m: &Message,
) -> Result<(), McpError> {
    let Some(method) = m.method.as_deref() else { return Ok(()) };
    if always_granted(m, method) {
        return Ok(());
    }
    let denied = |scope, tool: Option<&String>| {
        McpError::Denied(Denial { method: method.to_owned(), tool: tool.cloned(), scope })
    };
    if let Some(t) = settings.method_scope.as_deref() {
        Grant::new(t, "{method}", caps).holds(claims, method).map_err(|scope| denied(scope, None))?;
    }
    if let (Some(t), "tools/call", Some(tool)) = (settings.tool_scope.as_deref(), method, m.name.as_ref()) {
        Grant::new(t, "{tool}", caps).holds(claims, tool).map_err(|scope| denied(scope, Some(tool)))?;
    }
    Ok(())
}

/// The refusal of a read body: answered with one error per request in it; `cause` is the
/// message refused (`None`: the body as a whole, every request gets the error).
pub fn refuse(error: McpError, messages: &Messages, cause: Option<usize>) -> Refusal {
    let ids = match messages.batch {
        true => Ids::Batch(
            messages
                .all
                .iter()
                .enumerate()
                .filter_map(|(i, m)| Some((m.method.as_ref().and(m.id.clone())?, cause.is_none_or(|c| c == i))))
                .collect(),
        ),
        false => Ids::One(messages.all.first().and_then(|m| m.id.clone())),
    };
    Refusal { error, ids }
}

/// Each message's grant, and the first refused (its index and why): what the stage answers and
/// what the metrics count, from one pass.
pub fn grants(
    settings: &McpSettings,
    caps: &Captures,
    claims: Option<&Claims>,
    messages: &Messages,
) -> (Vec<bool>, Option<(usize, McpError)>) {
    let mut granted = Vec::with_capacity(messages.all.len());
    let mut first = None;
    for (i, m) in messages.all.iter().enumerate() {
        match authorize_one(settings, caps, claims, m) {
            Ok(()) => granted.push(true),
            Err(e) => {
                granted.push(false);
                first.get_or_insert((i, e));
            }
        }
    }
    (granted, first)
}

/// The headers some frameworks take as the request's real method: a `GET` that says it is a
/// `POST` would reach them unread.
const METHOD_OVERRIDES: &[&str] = &["x-http-method-override", "x-http-method", "x-method-override"];

/// Checks what comes before the body: the method, that a `GET` or `DELETE` has no body (only a
/// `POST` is read, so nothing else may carry a message), no method override, and the revision.
pub fn check_head<'a>(
    settings: &'a McpSettings,
    method: &Method,
    headers: &HeaderMap,
    has_body: bool,
) -> Result<&'a str, McpError> {
    if !matches!(*method, Method::POST | Method::GET | Method::DELETE) {
        return Err(McpError::Method);
    }
    if *method != Method::POST && has_body {
        return Err(McpError::Invalid("only a POST carries a message: a GET or DELETE has no body"));
    }
    if METHOD_OVERRIDES.iter().any(|h| headers.contains_key(*h)) {
        return Err(McpError::Invalid("method override headers are refused on MCP endpoints"));
    }
    check_version(settings, headers)
}

/// The method's metric label: the methods of the specification by name, any other `other`.
pub fn method_label(method: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "initialize",
        "ping",
        "tools/list",
        "tools/call",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "prompts/list",
        "prompts/get",
        "completion/complete",
        "logging/setLevel",
        "tasks/get",
        "tasks/list",
        "tasks/result",
        "tasks/cancel",
        "notifications/initialized",
        "notifications/cancelled",
        "notifications/progress",
        "notifications/roots/list_changed",
    ];
    KNOWN.iter().find(|k| **k == method).copied().unwrap_or("other")
}

/// The tool's metric label: the tool when `metric_tools` lists it, else `other`.
pub fn tool_label<'a>(settings: &'a McpSettings, tool: &str) -> &'a str {
    settings.metric_tools.iter().find(|t| *t == tool).map_or("other", String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> McpSettings {
        McpSettings {
            protocol_versions: crate::config::MCP_REVISIONS.iter().map(|v| (*v).to_owned()).collect(),
            max_message: 1 << 20,
            read_timeout: Duration::from_secs(30),
            method_scope: None,
            tool_scope: Some("mcp:{agent}:tools/call:{tool}".into()),
            metric_tools: vec!["echo".into()],
        }
    }

    fn claims(scope: &str) -> Claims {
        let all = serde_json::json!({ "exp": u64::MAX, "sub": "alice", "scope": scope });
        Claims::from_value(all).expect("claims")
    }

    fn caps() -> Captures {
        Captures::from_pairs(&[("agent", "a1")])
    }

    #[test]
    fn a_message_reads_its_method_and_tool() {
        let m = parse(br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"echo","arguments":{}}}"#)
            .expect("parse");
        assert_eq!(m.all[0].method.as_deref(), Some("tools/call"));
        assert_eq!(m.all[0].name.as_deref(), Some("echo"));
        assert_eq!(m.all[0].id, Some(serde_json::json!(7)));
        let r = parse(br#"{"jsonrpc":"2.0","id":"x","result":{}}"#).expect("response");
        assert_eq!(r.all[0].method, None);
        let b = parse(
            br#"[{"jsonrpc":"2.0","method":"notifications/initialized"},{"jsonrpc":"2.0","id":1,"method":"ping"}]"#,
        )
        .expect("batch");
        assert!(b.batch);
        assert_eq!(b.all.len(), 2);
    }

    #[test]
    fn a_repeated_key_is_refused_wherever_it_is() {
        // The server's parser may keep the last copy: the proxy must not check the first.
        for body in [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call","params":{"name":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","name":"secret"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","m\u0065thod":"tools/call","params":{"name":"x"}}"#,
            r#"[{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call","params":{"name":"x"}}]"#,
        ] {
            assert!(parse(body.as_bytes()).is_err(), "{body}");
        }
    }

    #[test]
    fn what_is_not_json_rpc_is_refused() {
        for body in [
            "",
            "{",
            "[]",
            "42",
            r#"{"id":1,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":1}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"ping","result":{}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":7}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"ping"} {}"#,
        ] {
            assert!(parse(body.as_bytes()).is_err(), "{body}");
        }
    }

    #[test]
    fn the_headers_must_say_what_the_body_says() {
        let call = parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}}"#).expect("p");
        let old = "2025-11-25";
        let mut h = HeaderMap::new();
        assert!(check_headers(&h, old, &call).is_ok());
        assert!(check_headers(&h, STATELESS_REVISION, &call).is_err(), "2026-07-28 requires them");
        h.insert(METHOD_HEADER, HeaderValue::from_static("tools/call"));
        assert!(check_headers(&h, STATELESS_REVISION, &call).is_err(), "and Mcp-Name for a tool");
        h.insert(NAME_HEADER, HeaderValue::from_static("echo"));
        assert!(check_headers(&h, old, &call).is_ok());
        assert!(check_headers(&h, STATELESS_REVISION, &call).is_ok());
        h.insert(NAME_HEADER, HeaderValue::from_static("=?base64?ZWNobw==?="));
        assert!(check_headers(&h, STATELESS_REVISION, &call).is_ok(), "base64 of echo");
        h.insert(NAME_HEADER, HeaderValue::from_static("secret"));
        assert!(matches!(check_headers(&h, old, &call), Err(McpError::HeaderMismatch("Mcp-Name"))));
        h.insert(NAME_HEADER, HeaderValue::from_static("echo"));
        h.insert(METHOD_HEADER, HeaderValue::from_static("tools/list"));
        assert!(matches!(check_headers(&h, old, &call), Err(McpError::HeaderMismatch("Mcp-Method"))));
        h.remove(NAME_HEADER);
        h.append(METHOD_HEADER, HeaderValue::from_static("tools/call"));
        assert!(check_headers(&h, old, &call).is_err(), "a header sent twice");
        let batch = parse(br#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#).expect("p");
        assert!(check_headers(&HeaderMap::new(), "2025-03-26", &batch).is_ok());
        assert!(matches!(check_headers(&HeaderMap::new(), old, &batch), Err(McpError::Batch(_))));
    }

    #[test]
    fn a_tool_needs_its_scope_or_the_wildcard() {
        let s = settings();
        let call = parse(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo"}}"#).expect("p");
        let list = parse(br#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#).expect("p");
        assert!(authorize(&s, &caps(), Some(&claims("mcp:a1:tools/call:echo")), &call).is_ok());
        assert!(authorize(&s, &caps(), Some(&claims("mcp:a1:tools/call:*")), &call).is_ok());
        assert!(authorize(&s, &caps(), Some(&claims("mcp:a2:tools/call:echo")), &call).is_err(), "another agent");
        match authorize(&s, &caps(), Some(&claims("mcp:a1:tools/call:other")), &call) {
            Err(McpError::Denied(d)) => assert_eq!(d.scope.as_deref(), Some("mcp:a1:tools/call:echo")),
            other => panic!("{other:?}"),
        }
        assert!(authorize(&s, &caps(), Some(&claims("")), &list).is_ok(), "no method scope configured");
        let mut strict = settings();
        strict.method_scope = Some("mcp:{method}".into());
        assert!(authorize(&strict, &caps(), Some(&claims("mcp:tools/list")), &list).is_ok());
        assert!(authorize(&strict, &caps(), Some(&claims("mcp:tools/call")), &list).is_err());
        let init = parse(br#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{}}"#).expect("p");
        assert!(authorize(&strict, &caps(), Some(&claims("")), &init).is_ok());
        let note = parse(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).expect("p");
        assert!(authorize(&strict, &caps(), Some(&claims("")), &note).is_ok(), "a notification");
        let disguised =
            parse(br#"{"jsonrpc":"2.0","id":1,"method":"notifications/../tools/call","params":{"name":"x"}}"#)
                .expect("p");
        assert!(authorize(&strict, &caps(), Some(&claims("")), &disguised).is_err(), "a request is no notification");
        let null_id = parse(br#"{"jsonrpc":"2.0","id":null,"method":"notifications/x"}"#).expect("p");
        assert!(authorize(&strict, &caps(), Some(&claims("")), &null_id).is_err(), "an id of null is an id");
        for spelled in [
            r#"{"jsonrpc":"2.0","Id":1,"method":"notifications/x","Method":"tools/call","params":{"name":"rm"}}"#,
            r#"{"jsonrpc":"2.0","ID":1,"Method":"tools/call","method":"notifications/x"}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/x","Method":"resources/list"}"#,
            r#"[{"jsonrpc":"2.0","method":"notifications/x","PARAMS":{}}]"#,
            // As Go folds them (an attacker review, 2026-12-07): `ſ` is an `s` to it; and the
            // tool's name in another case, or twice.
            "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\",\"param\u{17f}\":{}}",
            "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/list\",\"param\\u017f\":{}}",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","Name":"shell"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"Name":"shell","name":"echo"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","name":"shell"}}"#,
            r#"[{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"a","URI":"b"}}]"#,
            "{\"jsonrpc\":\"2.0\",\"j\u{17f}onrpc\":\"1.0\",\"id\":1,\"method\":\"tools/list\"}",
        ] {
            assert!(matches!(parse(spelled.as_bytes()), Err(McpError::Invalid(_))), "{spelled}");
        }
        // A tool's own arguments may be spelled as the tool likes.
        let args = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"Name":"x"},"NAMES":1}}"#;
        assert_eq!(parse(args.as_bytes()).expect("parsed").all[0].name.as_deref(), Some("echo"));
    }

    #[test]
    fn a_name_that_cannot_be_a_scope_is_granted_by_the_wildcard_only_and_never_written_in_a_challenge() {
        let s = settings();
        for tool in [r#"x", resource_metadata="https://evil.example/x"#, "x mcp:a1:tools/call:*", "*", "a\\b"] {
            let body = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool}});
            let call = parse(body.to_string().as_bytes()).expect("parse");
            // The rendered scope as one entry of an array claim: still not a grant.
            let exact =
                serde_json::json!({"exp": u64::MAX, "sub": "a", "scope": [format!("mcp:a1:tools/call:{tool}")]});
            let exact = Claims::from_value(exact).expect("claims");
            if tool != "*" {
                assert!(authorize(&s, &caps(), Some(&exact), &call).is_err(), "{tool}");
            }
            let e = authorize(&s, &caps(), Some(&claims("")), &call).expect_err("not granted");
            let resp = refuse(e, &call, Some(0)).response();
            let h = resp.headers()[http::header::WWW_AUTHENTICATE].to_str().expect("ascii").to_owned();
            assert_eq!(h, "Bearer error=\"insufficient_scope\"", "{tool}");
            assert!(authorize(&s, &caps(), Some(&claims("mcp:a1:tools/call:*")), &call).is_ok(), "{tool}");
        }
    }

    #[test]
    fn a_lookalike_method_and_positional_params_are_refused() {
        for body in [
            r#"{"jsonrpc":"2.0","id":1,"method":"Tools/Call","params":{"name":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call ","params":{"name":"x"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["echo",null]}"#,
        ] {
            assert!(parse(body.as_bytes()).is_err(), "{body}");
        }
        assert!(parse(br#"{"jsonrpc":"2.0","id":1,"method":"vendor/Custom","params":[1]}"#).is_ok(), "others pass");
    }

    #[test]
    fn only_a_post_carries_a_message_and_no_method_is_overridden() {
        let s = settings();
        let h = HeaderMap::new();
        assert!(check_head(&s, &Method::GET, &h, false).is_ok());
        assert!(check_head(&s, &Method::GET, &h, true).is_err(), "a GET with a body");
        assert!(check_head(&s, &Method::DELETE, &h, true).is_err(), "a DELETE with a body");
        assert!(check_head(&s, &Method::POST, &h, true).is_ok());
        let mut o = HeaderMap::new();
        o.insert("x-http-method-override", HeaderValue::from_static("POST"));
        assert!(check_head(&s, &Method::GET, &o, false).is_err());
        assert!(check_head(&s, &Method::PUT, &h, false).is_err());
    }

    #[test]
    fn a_refused_batch_answers_each_request() {
        let b = parse(br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}},{"jsonrpc":"2.0","method":"notifications/initialized"},{"jsonrpc":"2.0","id":"b","method":"ping"}]"#).expect("p");
        let e = authorize(&settings(), &caps(), Some(&claims("")), &b).expect_err("x is not granted");
        let resp = refuse(e, &b, Some(0)).response();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        let h = resp.headers().get(http::header::WWW_AUTHENTICATE).expect("challenge");
        assert!(h.to_str().expect("ascii").contains("insufficient_scope"));
    }

    #[test]
    fn the_revision_is_checked() {
        let s = settings();
        let mut h = HeaderMap::new();
        assert_eq!(check_version(&s, &h).expect("default"), "2025-03-26");
        h.insert(PROTOCOL_VERSION, HeaderValue::from_static("2026-07-28"));
        assert!(check_version(&s, &h).is_ok());
        h.insert(PROTOCOL_VERSION, HeaderValue::from_static("2024-11-05"));
        assert!(check_version(&s, &h).is_err());
        let mut only_new = settings();
        only_new.protocol_versions = vec!["2026-07-28".into()];
        assert!(check_version(&only_new, &HeaderMap::new()).is_err(), "no header is 2025-03-26");
    }

    #[test]
    fn a_body_must_be_plain_json() {
        let mut h = HeaderMap::new();
        assert!(check_content(&h).is_err());
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(check_content(&h).is_ok());
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=UTF-8"));
        assert!(check_content(&h).is_ok());
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-16"));
        assert!(check_content(&h).is_err());
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(check_content(&h).is_err());
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(http::header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert!(check_content(&h).is_err(), "a compressed body cannot be read, so it cannot pass");
    }
}
