"""What the browser checks beside demo.py share: reading a process's startup lines, starting the
demo agent backend, Portcullis and chromedriver, counting checks, and stopping every process.
Only the Python standard library."""

import os
import re
import subprocess
import threading
import time
import urllib.request

from demo import PC, WebDriver, start_chromedriver


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
    """Reads a process's output to its end, so the process never blocks on a full pipe."""
    for _ in iter(stream.readline, ""):
        pass


def demo_backend(procs, run):
    """`portcullis demo --backend-only` on port 0; its address."""
    agent = subprocess.Popen(
        [PC, "demo", "--backend-only", "--no-npm", "--shell", "/bin/sh", "--backend", "127.0.0.1:0", "--dir", run],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    procs.append(agent)
    backend = read_until(agent.stderr, r"listening on http://(127\.0\.0\.1:\d+)").group(1)
    threading.Thread(target=drain, args=(agent.stderr,), daemon=True).start()
    return backend


def proxy(procs, config, *patterns):
    """`portcullis run --config CONFIG`; the first group of each pattern, in the order its log
    matches them (listeners and the admin listener bind port 0 and log what they got)."""
    p = subprocess.Popen([PC, "run", "--config", config], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "portcullis=info"})
    procs.append(p)
    found = [read_until(p.stderr, pattern).group(1) for pattern in patterns]
    threading.Thread(target=drain, args=(p.stderr,), daemon=True).start()
    return found


def webdriver(procs, driver, profile):
    """chromedriver (on a port it binds itself, see demo.start_chromedriver) and a WebDriver
    session."""
    return WebDriver(start_chromedriver(procs, driver), profile)


class Checks:
    """Named checks, each passed or failed with a line, and the closing count."""

    def __init__(self):
        self.passed, self.failed = [], []

    def check(self, name, fn):
        try:
            detail = fn()
            self.passed.append(name)
            print(f"  ok: {name}{': ' + detail if isinstance(detail, str) else ''}")
        except Exception as e:  # noqa: BLE001 (a check that fails for any reason is a failure)
            self.failed.append(name)
            print(f"  FAILED: {name}: {e}")

    def summary(self, label):
        print(f"{label}: {len(self.passed)} passed, {len(self.failed)} failed")
        return 1 if self.failed else 0


def stop(procs, wd=None):
    """Ends the WebDriver session, then every process started, by its handle."""
    if wd is not None:
        try:
            wd.s("DELETE", "")
        except Exception:  # noqa: BLE001
            pass
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
