"""The processes the script-driven suites start (tests/browser, tests/mcp): Portcullis run on a
configuration, what its log says it bound (every listener binds port 0), and their end. The
standard library only: each suite imports it whatever its own environment holds."""

import os
import re
import subprocess
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PC = os.environ.get("PORTCULLIS_BIN", os.path.join(ROOT, "target", "debug", "portcullis"))


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


def proxy(procs, config, *patterns, seconds=20):
    """`portcullis run --config CONFIG`; the first group of each pattern, in the order its log
    matches them (listeners and the admin listener bind port 0 and log what they got)."""
    p = subprocess.Popen([PC, "run", "--config", config], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "portcullis=info"})
    procs.append(p)
    found = [read_until(p.stderr, pattern, seconds).group(1) for pattern in patterns]
    threading.Thread(target=drain, args=(p.stderr,), daemon=True).start()
    return found


def stop_all(procs):
    """Ends every process started, by its handle: terminated, killed after 10 s."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
