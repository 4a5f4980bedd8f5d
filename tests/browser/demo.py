#!/usr/bin/env python3
"""The demo's web page in a real browser: headless Chromium driven over WebDriver.

    tests/browser/demo.py            (tests/browser/run.sh runs it after its own cases)

Starts `portcullis demo` on free loopback ports (it installs xterm.js with npm once, into its
own directory), opens the page with the token in the URL fragment as the demo banner prints it,
and checks, through Portcullis:

  - the token leaves the address bar and appears in no log line of the proxy;
  - the login page turns the token into the proxy's HttpOnly cookie: it leaves the address bar
    and is in neither document.cookie nor web storage;
  - the terminal opens with that cookie;
  - typing `echo portcullis-<random>` shows the real shell's output;
  - a window resize reaches the PTY: `stty size` prints the terminal's rows and columns;
  - the events WebSocket (cookie source) ticks;
  - the agent status (REST, cookie source) loads;
  - a task's SSE output appears line by line;
  - the terminal's TCP connection is cut (through a forwarder the test controls): the page
    reconnects with its resume id within the window and the same shell is there (`echo $$`
    prints the same PID), with the output it printed during the gap; after the window, a
    reconnect gets a new shell (another PID) and the proxy's notice;
  - a token that expires closes the terminal with 1008, and the page says so.

Saves a screenshot (path printed). Prints `demo page: N passed, M failed`; exits non-zero on a
failure. Only the Python standard library; chromium and chromedriver from Debian's packages.
"""

import base64
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import struct
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PC = os.environ.get("PORTCULLIS_BIN", os.path.join(ROOT, "target", "debug", "portcullis"))
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
OUT = os.path.join(ROOT, "target", "browser")


def start_chromedriver(procs, driver=None):
    """chromedriver on a port it binds itself: it cannot bind port 0, so a random high port is
    tried, and another when chromedriver exits because that one is taken (never a port bound,
    released and hoped to stay free). Returns the port once /status answers."""
    for _ in range(20):
        port = random.randint(20000, 49999)
        p = subprocess.Popen([driver or DRIVER, f"--port={port}"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        deadline = time.time() + 15
        while p.poll() is None and time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=1).close()
                procs.append(p)
                return port
            except OSError:
                time.sleep(0.1)
        p.kill()
        p.wait()
    raise SystemExit("chromedriver did not start on any port tried")


def wait_port(port, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"demo page: nothing listens on {port}")


class Forwarder:
    """A TCP forwarder in front of the demo whose connections the test can cut: `cut(hold)`
    resets every connection through it, then resets new ones for `hold` seconds, as a network
    that drops for a while would."""

    def __init__(self, target):
        self.target = target
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.conns = []
        self.refuse_until = 0.0
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if time.time() < self.refuse_until:
                self.reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                self.reset(client)
                continue
            with self.lock:
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    @staticmethod
    def reset(s):
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def cut(self, hold):
        self.refuse_until = time.time() + hold
        with self.lock:
            conns, self.conns = self.conns, []
        for s in conns:
            self.reset(s)
        return len(conns)


class WebDriver:
    def __init__(self, port, profile):
        self.base = f"http://127.0.0.1:{port}"
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "acceptInsecureCerts": True,
                    "goog:chromeOptions": {
                        "binary": CHROMIUM,
                        "args": [
                            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            "--ignore-certificate-errors", "--window-size=1000,700", f"--user-data-dir={profile}",
                        ],
                    },
                }
            }
        }
        self.session = self.call("POST", "/session", caps)["sessionId"]

    def call(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.load(r)["value"]

    def s(self, method, path, body=None):
        return self.call(method, f"/session/{self.session}{path}", body)

    def js(self, script, *args):
        return self.s("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css):
        el = self.s("POST", "/element", {"using": "css selector", "value": css})
        return next(iter(el.values()))

    def type(self, css, text):
        self.s("POST", f"/element/{self.find(css)}/value", {"text": text})

    def wait(self, what, fn, seconds=15):
        deadline = time.time() + seconds
        last = None
        while time.time() < deadline:
            last = fn()
            if last:
                return last
            time.sleep(0.1)
        raise AssertionError(f"{what}: timed out (last: {last!r})")


TERMINAL_TEXT = """
const t = window.portcullisTerminal;
if (t && t.buffer) {
  const b = t.buffer.active, lines = [];
  for (let i = 0; i < b.length; i++) lines.push(b.getLine(i).translateToString(true));
  return lines.join("\\n");
}
const f = document.getElementById("fallback");
return f ? f.textContent : "";
"""


def text_of(wd, element_id):
    return wd.js("const e = document.getElementById(arguments[0]); return e ? e.textContent : null;", element_id)


def main():
    if not CHROMIUM or not DRIVER:
        raise SystemExit("demo page: chromium and chromedriver are required (apt-get install chromium chromium-driver)")
    if not os.access(PC, os.X_OK):
        subprocess.run(["cargo", "build", "--quiet", "--bin", "portcullis"], cwd=ROOT, check=True)
    os.makedirs(OUT, exist_ok=True)
    run = tempfile.mkdtemp(prefix="portcullis-demo-page-")
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
        # The page is also opened through a forwarder, whose connections the resume check cuts.
        # It listens first (its port is the page's allowed origin); its target is the demo's
        # port, once the demo has named it.
        forwarder = Forwarder(None)
        resume_window = 4
        # The npm packages are kept across runs (the demo installs them once).
        demo_dir = os.path.join(ROOT, "target", "browser-demo")
        log = open(os.path.join(run, "demo.log"), "w")
        env = dict(os.environ, RUST_LOG="portcullis=info", NO_COLOR="1")
        # The shell is /bin/sh with no start-up file ($ENV unset), not bash: an interactive bash
        # reads the machine's ~/.bashrc, whose hooks (a version manager's) kept its prompt from
        # coming for longer than the checks wait. What is checked is the proxy's relay of a real
        # shell on a PTY, whichever shell.
        env.pop("ENV", None)
        demo = subprocess.Popen(
            # Port 0 everywhere: the demo binds what the kernel gives and names it in its banner.
            [PC, "demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
             "--backend", "127.0.0.1:0", "--dir", demo_dir, "--shell", "/bin/sh",
             "--resume-window", f"{resume_window}s", "--origin", f"https://localhost:{forwarder.port}"],
            stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        procs.append(demo)
        banner = []
        deadline = time.time() + 180
        while time.time() < deadline:
            line = demo.stdout.readline()
            if not line:
                break
            banner.append(line)
            if "Ctrl-C drains" in line:
                break
        banner = "".join(banner)
        url = re.search(r"(https://localhost:\d+/\.portcullis/login#token=\S+)", banner)
        token = re.search(r"TOKEN=(\S+)", banner)
        if not url or not token:
            raise SystemExit(f"demo page: no page URL in the banner:\n{banner}")
        url, token = url.group(1), token.group(1)
        port = int(re.search(r"https://localhost:(\d+)/", url).group(1))
        admin = int(re.search(r"admin +http://127\.0\.0\.1:(\d+)/metrics", banner).group(1))
        forwarder.target = port
        xterm = "xterm.js installed" in banner
        print(f"demo page: {'xterm.js' if xterm else 'fallback terminal (no npm)'}; {url.split('#')[0]}")
        wait_port(port)

        driver_port = start_chromedriver(procs)
        wd = WebDriver(driver_port, os.path.join(run, "profile"))
        wd.s("POST", "/url", {"url": url})

        def token_leaves_the_url():
            wd.wait("page loaded", lambda: text_of(wd, "auth-state"))
            href = wd.js("return location.href;")
            assert "#token" not in href and token not in href, href
            assert href.endswith("/agents/demo/"), href
            return href

        check("the login page takes the token out of the address bar and goes on to the page", token_leaves_the_url)

        def token_only_in_an_http_only_cookie():
            cookies = {c["name"]: c for c in wd.s("GET", "/cookie")}
            c = cookies.get("portcullis_token")
            assert c and c.get("httpOnly") is True and c.get("sameSite") == "Strict", cookies
            assert token not in (wd.js("return document.cookie;") or ""), "a page script can read the token"
            stored = wd.js("return JSON.stringify(Object.assign({}, sessionStorage, localStorage));")
            assert token not in stored, "the token is in web storage"
            return "HttpOnly, SameSite=Strict; not in document.cookie nor web storage"

        check("the token is only in the proxy's HttpOnly cookie", token_only_in_an_http_only_cookie)

        def terminal_opens():
            state = wd.wait("terminal open", lambda: (s := text_of(wd, "term-state")) and s != "connecting" and s)
            assert state == "open", state
            return state

        check("the terminal opens with the cookie the proxy set", terminal_opens)

        def websockets_over_h2():
            # The page came over HTTP/2 (ALPN h2), and Chromium opened its WebSockets on that
            # connection as RFC 8441 extended CONNECTs: the proxy lists them with http "h2".
            page = wd.js("return performance.getEntriesByType('navigation')[0].nextHopProtocol;")
            assert page == "h2", f"page loaded over {page}"
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/sessions", timeout=5) as r:
                sessions = json.load(r)["sessions"]
            ws = [x for x in sessions if x["kind"] == "websocket"]
            assert ws and all(x["http"] == "h2" for x in ws), sessions
            return f"page over {page}; {len(ws)} WebSocket session(s) over {', '.join(sorted({x['http'] for x in ws}))}"

        check("the page and its WebSockets come over HTTP/2 (RFC 8441)", websockets_over_h2)

        word = f"portcullis-{random.randint(0, 10**9)}"
        css = ".xterm-helper-textarea" if xterm else "#fallback"

        def shell_output():
            wd.type(css, f"echo {word}\ue007")
            wd.wait("the shell's output", lambda: wd.js(TERMINAL_TEXT).count(word) >= 2)
            return f"{word} echoed by the shell"

        check("typing a command shows the real shell's output", shell_output)

        def resize_reaches_the_pty():
            before = text_of(wd, "term-size")
            wd.s("POST", "/window/rect", {"width": 1400, "height": 950})
            size = wd.wait("new size", lambda: (s := text_of(wd, "term-size")) != before and s)
            rows, cols = size.split("x")
            wd.type(css, "stty size\ue007")
            wd.wait(f"stty size = {rows} {cols}", lambda: f"{rows} {cols}" in wd.js(TERMINAL_TEXT))
            return f"{before} -> {size}, stty says {rows} {cols}"

        if xterm:
            check("a window resize reaches the PTY (stty size)", resize_reaches_the_pty)
        else:
            failed.append("resize")
            print("  FAILED: a window resize reaches the PTY: needs xterm.js (npm)")

        def events_tick():
            first = int(wd.wait("an event", lambda: int(text_of(wd, "events-count") or 0) > 0 and text_of(wd, "events-count")))
            wd.wait("more events", lambda: int(text_of(wd, "events-count") or 0) >= first + 2, seconds=10)
            assert text_of(wd, "events-state") == "open"
            return f"seq {text_of(wd, 'events-seq')}"

        check("the events WebSocket (cookie source) ticks", events_tick)

        def status_loads():
            s = wd.wait("status", lambda: (t := text_of(wd, "agent-status")) and "running" in t and t)
            return s

        check("the agent status loads over REST (cookie source)", status_loads)

        def task_streams():
            wd.s("POST", f"/element/{wd.find('#run-task')}/click", {})
            counts = set()
            deadline = time.time() + 15
            while time.time() < deadline:
                out = text_of(wd, "task-output") or ""
                counts.add(out.count("step "))
                if "done" in (text_of(wd, "task-state") or ""):
                    break
                time.sleep(0.05)
            # The last line may have landed between the read of the output and of the state.
            counts.add((text_of(wd, "task-output") or "").count("step "))
            assert "done" in text_of(wd, "task-state"), text_of(wd, "task-state")
            assert max(counts) == 6, counts
            partial = sorted(c for c in counts if 0 < c < 6)
            assert len(partial) >= 3, f"lines did not arrive one by one: counts seen {sorted(counts)}"
            return f"line counts seen while streaming: {sorted(counts)}"

        check("a task's SSE output appears line by line", task_streams)

        shot = os.path.join(OUT, "demo.png")
        with open(shot, "wb") as f:
            f.write(base64.b64decode(wd.s("GET", "/screenshot")))
        print(f"  screenshot: {shot}")

        def pid_now(tag):
            wd.type(css, f"echo {tag}-$$\ue007")
            text = wd.wait(f"{tag} pid", lambda: (t := wd.js(TERMINAL_TEXT)) and re.search(rf"^{tag}-(\d+)", t, re.M) and t)
            return re.findall(rf"^{tag}-(\d+)", text, re.M)[-1]

        def metric_value(series):
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith(series + " "):
                        return float(line.split()[-1])
            return 0.0

        def resume_after_a_cut():
            forwarded = url.replace(f"localhost:{port}/", f"localhost:{forwarder.port}/")
            wd.s("POST", "/url", {"url": "about:blank"})
            wd.s("POST", "/url", {"url": forwarded})
            wd.wait("terminal open", lambda: (text_of(wd, "term-state") or "").startswith("open"))
            before = pid_now("PIDA")
            resumed_before = metric_value('portcullis_resume_resumed_total{route="terminal"}')
            # A command whose output comes while the network is down: typed, echoed by the
            # PTY, then the cut; it prints one second later.
            wd.type(css, "sleep 1; echo GAP-$((6*7))-done\ue007")
            wd.wait("the command echoed", lambda: "GAP-$((6*7))-done" in wd.js(TERMINAL_TEXT))
            cut = forwarder.cut(hold=2.0)
            wd.wait("the page sees the drop", lambda: "reconnecting" in (text_of(wd, "term-state") or ""), seconds=5)
            wd.wait("the page reconnects", lambda: (text_of(wd, "term-state") or "").startswith("open"), seconds=15)
            wd.wait("the gap's output shown", lambda: "GAP-42-done" in wd.js(TERMINAL_TEXT), seconds=5)
            after = pid_now("PIDB")
            assert after == before, f"another shell after the resume: {before} then {after}"
            resumed = metric_value('portcullis_resume_resumed_total{route="terminal"}')
            assert resumed >= resumed_before + 1, f"resumed_total {resumed_before} -> {resumed}"
            return f"{cut} connection(s) cut for 2 s; same shell (PID {after}), the gap's output shown"

        check("a cut connection resumes: same shell, the gap's output shown", resume_after_a_cut)

        def fresh_after_the_window():
            before = pid_now("PIDC")
            forwarder.cut(hold=resume_window + 2.0)
            wd.wait("the page sees the drop", lambda: "reconnecting" in (text_of(wd, "term-state") or ""), seconds=5)
            wd.wait("the page reconnects", lambda: (text_of(wd, "term-state") or "").startswith("open"), seconds=20)
            wd.wait("the proxy's notice", lambda: "[portcullis] new terminal session" in wd.js(TERMINAL_TEXT), seconds=5)
            after = pid_now("PIDD")
            assert after != before, f"the same shell after the window: {before}"
            expired = metric_value('portcullis_resume_expired_total{route="terminal",reason="window"}')
            assert expired >= 1, f"resume_expired_total {expired}"
            return f"PID {before} -> {after} after a {resume_window + 2:.0f} s cut (window {resume_window} s)"

        check("after the window, a reconnect gets a new shell and the notice", fresh_after_the_window)

        def admin_call(method, path, body=None):
            data = json.dumps(body).encode() if body is not None else None
            req = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read().decode()

        def terminal_session():
            _, body = admin_call("GET", "/sessions")
            live = [x for x in json.loads(body)["sessions"] if x["route"] == "terminal" and x["kind"] == "websocket"]
            return live[-1]["id"] if live else None

        def real_click(css):
            # A real pointer: moved to the element's centre, pressed and released there. Whatever
            # lies on top at that point gets the click, as with a person's mouse.
            element = {"element-6066-11e4-a52e-4f735466cecf": wd.find(css)}
            wd.s("POST", "/actions", {"actions": [{
                "type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
                "actions": [{"type": "pointerMove", "origin": element, "x": 0, "y": 0},
                            {"type": "pointerDown", "button": 0}, {"type": "pointerUp", "button": 0}]}]})

        def terminal_fits_and_the_button_takes_a_real_click():
            wd.s("POST", "/window/rect", {"width": 1400, "height": 1000})
            layout = """
              const t = document.getElementById("terminal"), sec = t.closest("section");
              const screen = t.querySelector(".xterm-screen") || t.firstElementChild || t;
              const sr = sec.getBoundingClientRect(), xr = screen.getBoundingClientRect();
              const b = document.getElementById("run-task").getBoundingClientRect();
              const hit = document.elementFromPoint(b.x + b.width / 2, b.y + b.height / 2);
              return {screen: Math.round(xr.right), panel: Math.round(sr.right), hit: hit ? hit.id : null,
                      size: document.getElementById("term-size").textContent};
            """
            fitted = wd.wait("the terminal inside its panel", lambda: (l := wd.js(layout)) and l["screen"] <= l["panel"] and l)
            assert fitted["hit"] == "run-task", f"the button is covered by {fitted['hit']!r}: {fitted}"
            # Long event lines must not widen the grid past the panel: the fit follows the panel.
            time.sleep(2.5)
            again = wd.js(layout)
            assert again["screen"] <= again["panel"], f"the terminal outgrew its panel: {again}"
            real_click("#run-task")
            wd.wait("the task started by the click", lambda: "task " in (text_of(wd, "task-state") or ""), seconds=10)
            return f"1400x1000: terminal {fitted['size']} ends at x={fitted['screen']} in a panel ending at x={fitted['panel']}; the button took a real click"

        if xterm:
            check("at 1400x1000 the terminal fits its panel and the task button takes a real click",
                  terminal_fits_and_the_button_takes_a_real_click)

        def events_are_formatted():
            log = wd.wait("an event line", lambda: text_of(wd, "events-log"))
            first = log.splitlines()[0]
            assert "#" in first and "agent.event" in first and "{" not in first, first
            return first

        check("events show as time, sequence and type, not raw JSON", events_are_formatted)

        def favicon_is_no_404():
            icon = wd.js("const l = document.querySelector('link[rel=icon]'); return l ? l.href : null;")
            assert icon and icon.startswith("data:image/svg+xml"), icon
            return "inline SVG icon"

        check("the page has a favicon (no 404)", favicon_is_no_404)

        def rebalance_reconnects():
            before = terminal_session()
            wd.js("window.portcullisTermStates.length = 0;")
            status, body = admin_call("POST", "/sessions/rebalance", {"route": "terminal", "fraction": 1.0})
            assert status == 200, body
            wd.wait("a new terminal session", lambda: (now := terminal_session()) and now != before, seconds=15)
            wd.wait("the page open again", lambda: text_of(wd, "term-state") == "open", seconds=10)
            states = wd.js("return window.portcullisTermStates;")
            assert any(x.startswith("reconnecting (rebalance)") for x in states), states
            return f"session {before} -> {terminal_session()}; states {states}"

        check("a 1001 (rebalance, as a drain) reconnects the terminal by itself", rebalance_reconnects)

        def revoke_shows_the_overlay_and_a_reconnect_is_refused():
            # The operator revokes the page's user: their sessions close, and their tokens are refused.
            _, body = admin_call("GET", "/sessions")
            subject = next(x["subject"] for x in json.loads(body)["sessions"] if x["route"] == "terminal")
            status, body = admin_call("POST", "/sessions/revoke", {"subject": subject})
            assert status == 200, (status, body)
            state = wd.wait("closed", lambda: (x := text_of(wd, "term-state")) and x.startswith("closed") and x, seconds=10)
            assert state == "closed 1008: session revoked", state
            overlay = wd.js("const o = document.getElementById('term-overlay'); return o.hidden ? null : o.textContent;")
            assert overlay and "revoked" in overlay, overlay
            # The revocation denies the subject's tokens: the page's reconnect is refused, and the
            # page says why (not "reconnecting" for ever).
            real_click("#term-reconnect")
            refused = wd.wait("refused", lambda: (x := text_of(wd, "term-state")) and x.startswith("refused") and x, seconds=10)
            assert "401" in refused, refused
            return f"{state}; overlay: {overlay.strip()}; then {refused}"

        check("a revoked session shows the overlay; a refused reconnect shows the proxy's reason",
              revoke_shows_the_overlay_and_a_reconnect_is_refused)

        def expiry_closes_with_1008():
            key = os.path.join(demo_dir, "jwt-private.pem")
            short = subprocess.run(
                [PC, "token", "mint", "--key", key, "--alg", "ES256", "--sub", "expiring", "--claim",
                 'agents=["demo"]', "--ttl", "3s"], capture_output=True, text=True, check=True).stdout.strip()
            started = time.time()
            # Signed in again through the login page: the cookie now holds the short token.
            wd.s("POST", "/url", {"url": "about:blank"})
            wd.s("POST", "/url", {"url": url.split("#")[0] + "#token=" + short + "&next=/agents/demo/"})
            wd.wait("terminal open", lambda: (text_of(wd, "term-state") or "").startswith("open"))
            state = wd.wait("terminal closed", lambda: (s := text_of(wd, "term-state")) and s.startswith("closed") and s, seconds=20)
            assert state.startswith("closed 1008"), state
            took = time.time() - started
            assert took >= 2.5, f"closed after {took:.1f}s, before the token expired"
            return f"{state} after {took:.1f}s"

        check("a token that expires closes the terminal with 1008, and the page says so", expiry_closes_with_1008)

        wd.s("DELETE", "")
        demo.terminate()
        demo.wait(timeout=20)
        log.close()
        logged = open(os.path.join(run, "demo.log")).read()

        def no_token_in_logs():
            assert token not in logged, "the page's token appears in the proxy's log"
            assert "access" in logged, "no access-log lines at all (is the log filter right?)"
            return f"{logged.count('portcullis::access')} access-log lines, none with the token"

        check("the token appears in no log line", no_token_in_logs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(timeout=20)
        shutil.rmtree(run, ignore_errors=True)

    print(f"demo page: {len(passed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
