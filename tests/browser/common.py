"""What the browser checks beside demo.py share: starting the demo agent backend, Portcullis
(tests/procs.py) and chromedriver, counting checks, and stopping every process. Only the Python
standard library."""

import os
import subprocess
import sys
import threading

from demo import WebDriver, start_chromedriver

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from procs import PC, drain, proxy, read_until, stop_all  # noqa: E402,F401 (proxy: the suites')


def demo_backend(procs, run):
    """`portcullis demo --backend-only` on port 0; its address."""
    agent = subprocess.Popen(
        [PC, "demo", "--backend-only", "--no-npm", "--shell", "/bin/sh", "--backend", "127.0.0.1:0", "--dir", run],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    procs.append(agent)
    backend = read_until(agent.stderr, r"listening on http://(127\.0\.0\.1:\d+)").group(1)
    threading.Thread(target=drain, args=(agent.stderr,), daemon=True).start()
    return backend


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
    stop_all(procs)
