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
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from demo import CHROMIUM, DRIVER, PC, ROOT, WebDriver, free_port  # noqa: E402


def read_until(proc_out, pattern, seconds=20):
    """The first match of `pattern` in the lines a process writes (its output is read on)."""
    deadline = time.time() + seconds
    seen = []
    while time.time() < deadline:
        line = proc_out.readline()
        if not line:
            time.sleep(0.05)
            continue
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    raise AssertionError(f"no {pattern!r} in: {''.join(seen)[-2000:]}")


def drain(stream):
    for _ in iter(stream.readline, ""):
        pass


def main():
    if not CHROMIUM or not DRIVER:
        raise SystemExit("cors: chromium and chromedriver are required (apt-get install chromium chromium-driver)")
    if not os.access(PC, os.X_OK):
        subprocess.run(["cargo", "build", "--quiet", "--bin", "portcullis"], cwd=ROOT, check=True)
    run = tempfile.mkdtemp(prefix="portcullis-cors-")
    procs = []
    passed, failed = [], []

    def check(name, fn):
        try:
            detail = fn()
            passed.append(name)
            print(f"  ok: {name}{': ' + detail if isinstance(detail, str) else ''}")
        except Exception as e:  # noqa: BLE001 (a check that fails for any reason is a failure)
            failed.append(name)
            print(f"  FAILED: {name}: {e}")

    try:
        # The page's origin: its own server on a port of its own.
        page_dir = os.path.join(run, "page")
        os.makedirs(page_dir)
        handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=page_dir, **k)  # noqa: E731
        http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
        pages = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=pages.serve_forever, daemon=True).start()
        page_origin = f"http://127.0.0.1:{pages.server_address[1]}"

        agent = subprocess.Popen(
            [PC, "demo", "--backend-only", "--no-npm", "--shell", "/bin/sh", "--backend", "127.0.0.1:0", "--dir", run],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(agent)
        backend = read_until(agent.stderr, r"listening on http://(127\.0\.0\.1:\d+)").group(1)
        threading.Thread(target=drain, args=(agent.stderr,), daemon=True).start()

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
        proxy = subprocess.Popen([PC, "run", "--config", config], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "portcullis=info"})
        procs.append(proxy)
        listen = read_until(proxy.stderr, r"listening.*listener=plain.*addr=(127\.0\.0\.1:\d+)").group(1)
        admin = read_until(proxy.stderr, r"admin listening.*addr=(127\.0\.0\.1:\d+)").group(1)
        threading.Thread(target=drain, args=(proxy.stderr,), daemon=True).start()
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

        # chromedriver cannot report a port it chose: a free one, as demo.py does.
        driver_port = free_port()
        driver = subprocess.Popen([DRIVER, f"--port={driver_port}"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        procs.append(driver)
        deadline = time.time() + 15
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{driver_port}/status", timeout=1).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        wd = WebDriver(driver_port, os.path.join(run, "profile"))
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
        try:
            wd.s("DELETE", "")
        except Exception:  # noqa: BLE001
            pass
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    print(f"cors: {len(passed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
