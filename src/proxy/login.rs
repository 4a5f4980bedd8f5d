//! Stage: the cookie login (`[auth.cookie_login]`), served by the proxy on one path before routing.
//! It turns a token a user was handed (in a URL fragment, which no server sees) into an `HttpOnly`
//! cookie the proxy sets, so no page script, the agents' own pages included, can ever read the
//! token (`docs/security.md`, "Agent pages and the user's credentials": content served by an agent
//! never runs with the user's credentials for other agents).
//!
//! - `GET {path}#token=<jwt>&next=/agents/a1/`: a fixed page of the proxy's own (a strict CSP
//!   admits only its one inline script, by hash) that takes the token out of the address bar,
//!   posts it back, and goes on to `next` (resolved by the browser's URL parser, a place on
//!   this origin only). When another site or page sent the browser there (`Sec-Fetch-Site`
//!   other than `none` or `same-origin`), it says whose token it is and waits for a click: no
//!   page can swap the user's credential behind their back (login CSRF);
//! - `POST {path}` with `Authorization: Bearer <jwt>`, from this origin only (`Origin` must be
//!   the request's own, `Sec-Fetch-Site` if sent must be `same-origin`): the token is verified
//!   as any other, then `Set-Cookie: <cookie>=<jwt>; HttpOnly; Secure; SameSite=Strict; Path=/;
//!   Max-Age=<until exp>` and 204; a refused token gets the auth stage's 401;
//! - `DELETE {path}` (this origin only): the cookie is cleared, 204.
//!
//! The routes that take the token from that cookie list `cookie:<cookie>` as a source, and
//! need an origin policy as every cookie route does.

use std::sync::OnceLock;

use base64::Engine;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use sha2::Digest;

use crate::auth::{AuthError, Authenticator, SignatureGate};
use crate::config::CookieLogin;

/// The login page's one script: it never stores the token, and `next` may only be a path on
/// this origin.
const SCRIPT: &str = r#"
"use strict";
const params = new URLSearchParams(location.hash.slice(1));
const token = params.get("token");
// `next` as the browser will read it (tabs and newlines stripped, backslashes as slashes):
// only a place on this origin, followed as the whole URL the check read (its path alone may
// start with `//`, from `/.//host`, and would name another host).
let next = location.origin + "/";
try {
  const u = new URL(params.get("next") || "/", location.origin);
  if (u.origin === location.origin) next = u.href;
} catch (e) { next = location.origin + "/"; }
history.replaceState(null, "", location.pathname);
const say = (t) => { document.getElementById("state").textContent = t; };
function signIn() {
  fetch(location.pathname, { method: "POST", headers: { Authorization: "Bearer " + token }, credentials: "same-origin" })
    .then((r) => {
      if (r.ok) { say("signed in"); location.replace(next); }
      else { r.text().then((why) => say("refused (" + r.status + "): " + why.trim())); }
    })
    .catch((e) => say("the proxy could not be reached: " + e));
}
if (!token) {
  say("no token: open the link you were given");
} else if (document.body.dataset.confirm === "1") {
  // Brought here by another site or page: a page must not sign the user in as someone else
  // behind their back. Say who, and wait for the user.
  let who = "this token's subject";
  try { who = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/"))).sub || who; } catch (e) {}
  say("Another page sent you here to sign in as \u201c" + who + "\u201d.");
  const b = document.getElementById("go");
  b.hidden = false;
  b.addEventListener("click", () => { b.disabled = true; signIn(); });
} else {
  signIn();
}
"#;

/// The page around [`SCRIPT`]; with `confirm`, the sign-in waits for the user's click.
fn page(confirm: bool) -> String {
    let confirm = if confirm { "1" } else { "0" };
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Signing in</title></head>\
         <body data-confirm=\"{confirm}\"><p id=\"state\">signing in...</p>\
         <button id=\"go\" hidden>Sign in</button><script>{SCRIPT}</script></body></html>"
    )
}

/// The page's CSP: nothing but its own inline script (by hash) and a request to this origin.
fn page_policy() -> &'static str {
    static POLICY: OnceLock<String> = OnceLock::new();
    POLICY.get_or_init(|| {
        let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(SCRIPT.as_bytes()));
        format!(
            "default-src 'none'; script-src 'sha256-{hash}'; connect-src 'self'; base-uri 'none'; \
             form-action 'none'; frame-ancestors 'none'"
        )
    })
}

/// Why a login request was not served.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// Not `GET`, `POST` or `DELETE` (405).
    #[error("the login path takes GET, POST and DELETE")]
    Method,
    /// A `POST` or `DELETE` from another origin, or with no `Origin` (403).
    #[error("cross-origin login requests are refused")]
    CrossOrigin,
    /// The token was refused (the auth stage's 401 or 403).
    #[error(transparent)]
    Auth(AuthError),
}

/// Serves `req` on the login path. `https` says whether the listener is TLS (the cookie is
/// `Secure` then) and `origin` is the request's own origin (`https://host[:port]`).
pub(crate) async fn serve<B>(
    login: &CookieLogin,
    authenticator: Option<&Authenticator>,
    gate: SignatureGate<'_>,
    req: &Request<B>,
    https: bool,
    origin: &str,
) -> Result<Response<Full<Bytes>>, LoginError> {
    let method = req.method();
    if method == Method::GET || method == Method::HEAD {
        // Typed or pasted (`none`), or from this origin: sign in at once. From anywhere else
        // (a link on another site, an agent's sandboxed page navigating itself): ask first, so
        // no page can swap the user's credential for its own (login CSRF).
        let own = req.headers().get("sec-fetch-site").is_none_or(|s| matches!(s.as_bytes(), b"none" | b"same-origin"));
        let mut resp = Response::new(Full::new(Bytes::from(page(!own))));
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
        h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
        if let Ok(v) = HeaderValue::from_str(page_policy()) {
            h.insert(header::CONTENT_SECURITY_POLICY, v);
        }
        return Ok(resp);
    }
    if method != Method::POST && method != Method::DELETE {
        return Err(LoginError::Method);
    }
    let headers = req.headers();
    let same_site = headers.get("sec-fetch-site").is_none_or(|s| s.as_bytes() == b"same-origin");
    let same_origin = headers.get(header::ORIGIN).is_some_and(|o| o.as_bytes().eq_ignore_ascii_case(origin.as_bytes()));
    if !same_site || !same_origin {
        return Err(LoginError::CrossOrigin);
    }
    let secure = if https { "; Secure" } else { "" };
    let cookie = if method == Method::DELETE {
        format!("{}=; HttpOnly{secure}; SameSite=Strict; Path=/; Max-Age=0", login.cookie)
    } else {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(LoginError::Auth(AuthError::Missing))?;
        let authenticator = authenticator.ok_or(LoginError::Auth(AuthError::UnknownKey))?;
        if token.len() > authenticator.max_token_size() {
            return Err(LoginError::Auth(AuthError::TooLarge));
        }
        // A token is a JWT: base64url and dots only, so it is a valid cookie value as it is.
        if !token.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
            return Err(LoginError::Auth(AuthError::Malformed));
        }
        let claims = authenticator.verify_gated(token, gate).await.map_err(LoginError::Auth)?;
        let max_age = claims.exp().saturating_sub(crate::auth::now_secs());
        format!("{}={token}; HttpOnly{secure}; SameSite=Strict; Path=/; Max-Age={max_age}", login.cookie)
    };
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        h.insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}
