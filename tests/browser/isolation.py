#!/usr/bin/env python3
"""Agent pages cannot reach other agents' credentials: headless Chromium over WebDriver.

    tests/browser/isolation.py       (tests/browser/run.sh runs it after its own cases)

One origin serves everything, as the demo does: Portcullis (TLS, every port 0, read back from
its log) at https://app.localhost:<port> (Chromium resolves *.localhost to loopback), with

  - `[auth.cookie_login]`: the user signs in through the proxy's login page with a token that
    grants agents `a` and `b`; the proxy sets it as an HttpOnly cookie;
  - agent `b`'s terminal and API, taking the token from that cookie (origin policy:
    https://*.localhost);
  - agent `a`'s content, an HTML page the agent controls (a test page server plays the
    compromised agent), on two routes: `unsafe` as it is, and `files` with `sandbox = true`.

The agent's page tries what a prompt-injected agent would: read the token from
`document.cookie`, call agent `b`'s API with the user's cookie, open `b`'s terminal. Checks:

  - the proxy's cookie is HttpOnly (WebDriver's cookie list) and the login left no token in the
    address bar;
  - control, on the unsafe route: the token is not readable (HttpOnly), but the page *does*
    reach `b`'s API and terminal with the user's cookie: the attack the sandbox is for;
  - on the sandboxed route: the token is not readable, `b`'s API call fails and `b`'s terminal
    does not open;
  - the agent's page sending the browser to the login page with the attacker's token (login
    CSRF): the login page asks instead of signing in, and the user's cookie stays;
  - the login's `next` stays on the proxy's origin, whatever tab, newline or backslash tricks
    it carries.

Prints `isolation: N passed, M failed`; exits non-zero on a failure. Only the Python standard
library; chromium, chromedriver and openssl from Debian's packages.
"""

import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Checks, demo_backend, proxy, stop, webdriver  # noqa: E402
from demo import CHROMIUM, DRIVER, PC, ROOT  # noqa: E402

EVIL_PAGE = """<!doctype html><html><body><pre id="out">pending</pre><script>
const out = {};
try { out.cookie = document.cookie.includes("eyJ") ? "token readable" : "no token"; }
catch (e) { out.cookie = "blocked:" + e.name; }
const api = fetch("/agents/b/api/status", { credentials: "include" })
  .then((r) => "status:" + r.status, (e) => "error:" + e.name);
const ws = new Promise((done) => {
  const w = new WebSocket("wss://" + location.host + "/agents/b/terminal");
  w.onopen = () => { done("opened"); w.close(); };
  w.onerror = () => done("refused");
  setTimeout(() => done("timeout"), 5000);
});
Promise.all([api, ws]).then(([a, w]) => {
  out.api = a; out.ws = w;
  document.getElementById("out").textContent = JSON.stringify(out);
});
</script></body></html>"""


def main():
    if not CHROMIUM or not DRIVER:
        raise SystemExit("isolation: chromium and chromedriver are required (apt-get install chromium chromium-driver)")
    if not os.access(PC, os.X_OK):
        subprocess.run(["cargo", "build", "--quiet", "--bin", "portcullis"], cwd=ROOT, check=True)
    run = tempfile.mkdtemp(prefix="portcullis-isolation-")
    procs, wd = [], None
    checks = Checks()
    check = checks.check
    try:
        cert, key = os.path.join(run, "cert.pem"), os.path.join(run, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=app.localhost",
                        "-addext", "subjectAltName=DNS:app.localhost"], check=True, capture_output=True)

        # The compromised agent's content server.
        page_dir = os.path.join(run, "agent-a")
        os.makedirs(page_dir)
        with open(os.path.join(page_dir, "report.html"), "w") as f:
            f.write(EVIL_PAGE)
        # Login CSRF: the agent's page sends the browser to the login page with its own token.
        fixate = os.path.join(page_dir, "fixate.html")
        handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=page_dir, **k)  # noqa: E731
        http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
        pages = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=pages.serve_forever, daemon=True).start()
        content = f"127.0.0.1:{pages.server_address[1]}"

        backend = demo_backend(procs, run)

        secret = "isolation-browser-test-secret-0123456789"
        with open(os.path.join(run, "hmac"), "w") as f:
            f.write(secret)
        cookie_route = """[routes.auth]
sources = ["cookie:portcullis_token"]
agent_claim = "agents"
[routes.origin]
allow = ["https://*.localhost"]
"""
        config = os.path.join(run, "portcullis.toml")
        with open(config, "w") as f:
            f.write(f"""
[[listeners]]
name = "tls"
addresses = ["127.0.0.1:0"]
tls = true
[tls]
cert = "{cert}"
key = "{key}"
[admin]
address = "127.0.0.1:0"
[[auth.keys]]
algorithms = ["HS256"]
secret_file = "{os.path.join(run, 'hmac')}"
[auth.cookie_login]

[[routes]]
name = "terminal"
path = "/agents/{{agent}}/terminal"
backends = ["{backend}"]
{cookie_route}
[[routes]]
name = "api"
path = "/agents/{{agent}}/api/{{*rest}}"
kind = "http"
backends = ["{backend}"]
backend_path = "/agents/{{agent}}/api/{{rest}}"
{cookie_route}
[[routes]]
name = "unsafe"
path = "/agents/{{agent}}/unsafe/{{*rest}}"
kind = "http"
backends = ["{content}"]
backend_path = "/{{rest}}"

[[routes]]
name = "files"
path = "/agents/{{agent}}/files/{{*rest}}"
kind = "http"
backends = ["{content}"]
backend_path = "/{{rest}}"
sandbox = true
""")
        (port,) = proxy(procs, config, r"listening.*listener=tls.*addr=127\.0\.0\.1:(\d+)")
        base = f"https://app.localhost:{port}"
        def mint(sub, agents):
            return subprocess.run(
                [PC, "token", "mint", "--secret-env", "ISOLATION_SECRET", "--alg", "HS256", "--sub", sub,
                 "--claim", f"agents={json.dumps(agents)}", "--ttl", "10m"],
                env={**os.environ, "ISOLATION_SECRET": secret}, check=True, capture_output=True, text=True).stdout.strip()
        token = mint("user", ["a", "b"])
        attacker = mint("mallory", ["a"])
        with open(fixate, "w") as f:
            f.write(f"""<!doctype html><html><body><script>
location.href = "/.portcullis/login#token={attacker}&next=/agents/a/files/report.html";
</script></body></html>""")

        wd = webdriver(procs, DRIVER, os.path.join(run, "profile"))

        def visit(path):
            wd.s("POST", "/url", {"url": base + path})
            got = wd.wait(f"{path} reports", lambda: (lambda t: t if t not in (None, "pending") else None)(
                wd.js("const e = document.getElementById('out'); return e ? e.textContent : null;")))
            return json.loads(got)

        # Sign in through the proxy, landing on agent a's unsafe page.
        wd.s("POST", "/url", {"url": f"{base}/.portcullis/login#token={token}&next=/agents/a/unsafe/report.html"})
        wd.wait("the login goes on to the agent's page", lambda: "/agents/a/unsafe/" in wd.s("GET", "/url"))

        def cookie_is_http_only():
            cookies = {c["name"]: c for c in wd.s("GET", "/cookie")}
            c = cookies.get("portcullis_token")
            assert c is not None, f"no portcullis_token cookie: {list(cookies)}"
            assert c.get("httpOnly") is True and c.get("secure") is True, c
            assert c.get("sameSite") == "Strict", c
            assert token not in wd.s("GET", "/url")
            return "HttpOnly, Secure, SameSite=Strict; no token in the address bar"
        check("the proxy sets the token as an HttpOnly cookie", cookie_is_http_only)

        unsafe = visit("/agents/a/unsafe/report.html")
        check("control: without the sandbox, agent a's page reaches agent b with the user's cookie",
              lambda: json.dumps(unsafe) if unsafe == {"cookie": "no token", "api": "status:200", "ws": "opened"}
              else (_ for _ in ()).throw(AssertionError(unsafe)))

        sandboxed = visit("/agents/a/files/report.html")

        def isolated():
            assert sandboxed["cookie"] != "token readable", sandboxed
            assert sandboxed["api"] != "status:200", sandboxed
            assert sandboxed["ws"] != "opened", sandboxed
            return json.dumps(sandboxed)
        check("sandboxed, agent a's page can neither read the token nor reach agent b's API or terminal", isolated)
        def no_login_csrf():
            wd.s("POST", "/url", {"url": base + "/agents/a/files/fixate.html"})
            said = wd.wait("the login page asks", lambda: (lambda t: t if t and "Another page" in t else None)(
                wd.js("const e = document.getElementById('state'); return e ? e.textContent : null;")))
            time.sleep(1)  # what an auto-submitting page would have done by now
            cookies = {c["name"]: c for c in wd.s("GET", "/cookie")}
            assert cookies["portcullis_token"]["value"] == token, "the agent swapped the user's credential"
            return said
        check("an agent's page sending the browser to the login page cannot sign the user in as someone else",
              no_login_csrf)

        def next_stays_on_this_origin():
            # `/.//evil.example/` and `/a/..//evil.example/`: paths the URL parser makes `//evil.example/`,
            # which a path alone would follow off the origin (an attacker review, 2026-12-07).
            for trick in ["/%09/evil.example/", "/%0a/evil.example", "/%5c%5cevil.example", "https://evil.example/",
                          "/.//evil.example/", "/a/..//evil.example/x", "//evil.example/"]:
                # A new document each time (a fragment change alone would not reload the page).
                wd.s("POST", "/url", {"url": "about:blank"})
                wd.s("POST", "/url", {"url": f"{base}/.portcullis/login#token={token}&next={trick}"})
                where = wd.wait("the login goes on", lambda: (u := wd.s("GET", "/url")) and "/.portcullis/login" not in u and u)
                assert where.startswith(base + "/"), f"next={trick} led to {where}"
            return "tab, newline, backslash, dot-segment and absolute URLs all stay on the proxy's origin"
        check("the login's next never leaves the proxy's origin", next_stays_on_this_origin)
    finally:
        stop(procs, wd)
    return checks.summary("isolation")


if __name__ == "__main__":
    sys.exit(main())
