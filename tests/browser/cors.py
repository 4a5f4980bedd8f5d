#!/usr/bin/env python3
"""CORS from a real browser: a platform UI on another origin calls an agent's API through
Portcullis, in headless Chromium driven over WebDriver.

    tests/browser/cors.py            (tests/browser/run.sh runs it after its own cases)

Starts the demo agent backend and Portcullis (plain HTTP listener, every port 0: the ports are
read back from what each process prints), and a page server on another origin
(http://127.0.0.1:<its own port>). Portcullis has two routes to the same agent API, both
requiring a bearer token and both with an origin policy that admits the page's origin:

  - `console-api`, whose `[routes.cors]` allows the page's origin with credentials;
  - `other-api`, whose `[routes.cors]` allows only another origin.

The page calls each with `fetch(url, {credentials: "include", headers: {Authorization}})`,
which makes Chromium send a preflight first. Checks:

  - the allowed route: the preflight is answered by the proxy (no token), the call returns the
    agent's status and the page reads it;
  - the other route: Chromium refuses the call (TypeError), the page reads nothing;
  - the preflights are counted (`portcullis_cors_preflights_total`), one allowed, one refused.

Prints `cors: N passed, M failed`; exits non-zero on a failure. Only the Python standard
library; chromium and chromedriver from Debian's packages.
"""

import http.server
import os
import subprocess
import sys
import tempfile
import threading
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Checks, demo_backend, proxy, stop, webdriver  # noqa: E402
from demo import CHROMIUM, DRIVER, PC, ROOT  # noqa: E402


def main():
    if not CHROMIUM or not DRIVER:
        raise SystemExit("cors: chromium and chromedriver are required (apt-get install chromium chromium-driver)")
    if not os.access(PC, os.X_OK):
        subprocess.run(["cargo", "build", "--quiet", "--bin", "portcullis"], cwd=ROOT, check=True)
    run = tempfile.mkdtemp(prefix="portcullis-cors-")
    procs, wd = [], None
    checks = Checks()
    check = checks.check
    try:
        # The page's origin: its own server on a port of its own.
        page_dir = os.path.join(run, "page")
        os.makedirs(page_dir)
        handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=page_dir, **k)  # noqa: E731
        http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
        pages = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=pages.serve_forever, daemon=True).start()
        page_origin = f"http://127.0.0.1:{pages.server_address[1]}"

        backend = demo_backend(procs, run)

        secret = os.path.join(run, "hmac")
        with open(secret, "w") as f:
            f.write("cors-browser-test-secret-0123456789")
        routes = ""
        for name, prefix, cors_origin in [("console-api", "agents", page_origin),
                                          ("other-api", "other", "https://elsewhere.example")]:
            routes += f"""
[[routes]]
name = "{name}"
path = "/{prefix}/{{agent}}/api/{{*rest}}"
kind = "http"
backends = ["{backend}"]
backend_path = "/agents/{{agent}}/api/{{rest}}"
[routes.auth]
sources = ["bearer"]
agent_claim = "agents"
[routes.origin]
allow = ["{page_origin}"]
[routes.cors]
allow_origins = ["{cors_origin}"]
allow_credentials = true
"""
        config = os.path.join(run, "portcullis.toml")
        with open(config, "w") as f:
            f.write(f"""
[[listeners]]
name = "plain"
addresses = ["127.0.0.1:0"]
[admin]
address = "127.0.0.1:0"
[[auth.keys]]
algorithms = ["HS256"]
secret_file = "{secret}"
{routes}""")
        listen, admin = proxy(procs, config, r"listening.*listener=plain.*addr=(127\.0\.0\.1:\d+)",
                              r"admin listening.*addr=(127\.0\.0\.1:\d+)")
        token = subprocess.run(
            [PC, "token", "mint", "--secret-env", "CORS_SECRET", "--alg", "HS256", "--sub", "console-user",
             "--claim", 'agents=["demo"]', "--ttl", "10m"],
            env={**os.environ, "CORS_SECRET": "cors-browser-test-secret-0123456789"},
            check=True, capture_output=True, text=True).stdout.strip()

        with open(os.path.join(page_dir, "index.html"), "w") as f:
            f.write(f"""<!doctype html><html><body><pre id="out">pending</pre><script>
async function call(url) {{
  try {{
    const r = await fetch(url, {{credentials: "include", headers: {{Authorization: "Bearer {token}"}}}});
    return "status:" + r.status + ":" + (await r.text()).slice(0, 60);
  }} catch (e) {{ return "error:" + e.name; }}
}}
Promise.all([call("http://{listen}/agents/demo/api/status"), call("http://{listen}/other/demo/api/status")])
  .then(([a, b]) => {{ document.getElementById("out").textContent = a + "|" + b; }});
</script></body></html>""")

        wd = webdriver(procs, DRIVER, os.path.join(run, "profile"))
        wd.s("POST", "/url", {"url": page_origin + "/index.html"})
        got = wd.wait("the page's two calls", lambda: (lambda t: t if t != "pending" else None)(
            wd.js("return document.getElementById('out').textContent")))
        allowed, other = got.split("|", 1)

        check("the allowed origin's credentialed call passes its preflight and reads the answer",
              lambda: allowed if allowed.startswith("status:200:") and '"agent":"demo"' in allowed
              else (_ for _ in ()).throw(AssertionError(allowed)))
        check("a route whose policy does not list the origin: Chromium refuses the call",
              lambda: other if other == "error:TypeError" else (_ for _ in ()).throw(AssertionError(other)))

        def counted():
            with urllib.request.urlopen(f"http://{admin}/metrics", timeout=5) as r:
                body = r.read().decode()
            want = ['portcullis_cors_preflights_total{route="console-api",result="allowed"} 1',
                    'portcullis_cors_preflights_total{route="other-api",result="refused"} 1']
            missing = [w for w in want if w not in body]
            if missing:
                raise AssertionError(f"missing {missing}")
            return "one allowed, one refused"
        check("the preflights were answered by the proxy and counted", counted)
    finally:
        stop(procs, wd)
    return checks.summary("cors")


if __name__ == "__main__":
    sys.exit(main())
