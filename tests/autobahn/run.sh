#!/usr/bin/env bash
# Autobahn|TestSuite, the WebSocket conformance suite, through Portcullis.
#
#     tests/autobahn/run.sh [quick|no-compression|full] [ws|wss|both]     (default: quick both)
#
# Installs the suite's fuzzing client and echo server (PyPI autobahntestsuite 25.10.1, Python
# 2.7 from pyenv, in a virtualenv made with virtualenv 20.21.1, the last release that can make
# a 2.7 one) into target/autobahn/ (git-ignored), starts an echo server on the suite's autobahn
# library and Portcullis in front of it (plain and TLS listeners, a self-signed certificate),
# runs the fuzzing client against Portcullis, and prints per listener
# (the echo server is tests/autobahn/echo_server.py: it accepts permessage-deflate and fails
# connections with a close frame, not by dropping TCP)
#
#     autobahn: N passed, M failed
#
# (passed: OK or INFORMATIONAL; failed: anything else, NON-STRICT included). Exits non-zero
# when a case did not pass. Reports: target/autobahn/reports/<ws|wss>/index.html.
#
# Specs: quick leaves out 9.* (performance) and 12.*/13.* (compression): 247 cases;
# no-compression leaves out 12.*/13.*: 301; full runs all 517 (about 20 minutes: 12.*/13.*).
# Portcullis is target/debug/portcullis (built if missing) unless PORTCULLIS_BIN says otherwise;
# use a release build for 9.*. CASES='["6.10.1"]' runs only those cases; KEEP=1 keeps the
# logs of the echo server, Portcullis and the client. Loopback only; every process it starts
# is stopped on exit.
set -euo pipefail

SPEC=${1:-quick}
MODES=${2:-both}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WORK=$ROOT/target/autobahn
ECHO_PORT=${ECHO_PORT:-19411}
PLAIN_PORT=${PLAIN_PORT:-19412}
TLS_PORT=${TLS_PORT:-19413}
ADMIN_PORT=${ADMIN_PORT:-19414}

CASES=${CASES:-'["*"]'}
case $SPEC in
    quick) EXCLUDE='["9.*", "12.*", "13.*"]' ;;
    no-compression) EXCLUDE='["12.*", "13.*"]' ;;
    full) EXCLUDE='[]' ;;
    *) echo "usage: $0 [quick|no-compression|full] [ws|wss|both]" >&2; exit 2 ;;
esac
case $MODES in
    ws | wss) ;;
    both) MODES="ws wss" ;;
    *) echo "usage: $0 [quick|no-compression|full] [ws|wss|both]" >&2; exit 2 ;;
esac

# --- the suite, installed once ------------------------------------------------------------
WSTEST=$WORK/venv/bin/wstest
if [ ! -x "$WSTEST" ]; then
    PY27=${PY27:-}
    if [ -z "$PY27" ]; then
        for candidate in "$(pyenv root 2>/dev/null)/versions/2.7.18/bin/python2.7" "$(command -v python2.7 || true)"; do
            if [ -n "$candidate" ] && [ -x "$candidate" ]; then PY27=$candidate; break; fi
        done
    fi
    if [ -z "$PY27" ]; then
        echo "autobahn: needs Python 2.7 (pyenv's 2.7.18, or set PY27)" >&2
        exit 1
    fi
    echo "installing autobahntestsuite 25.10.1 for $PY27 into $WORK (once)"
    mkdir -p "$WORK"
    # The interpreter itself, not a version manager's shim: pyenv's shim runs `pyenv rehash`
    # after a `pip install`, which fails the install when another rehash's lock is left behind.
    PY3=$(python3 -c 'import sys; print(sys.executable)')
    "$PY3" -m pip install --quiet --disable-pip-version-check --target "$WORK/virtualenv-pkg" virtualenv==20.21.1
    PYTHONPATH=$WORK/virtualenv-pkg "$PY3" -m virtualenv -q -p "$PY27" "$WORK/venv"
    "$WORK/venv/bin/pip" install --quiet --disable-pip-version-check autobahntestsuite==25.10.1 2>&1 \
        | grep -v -e DEPRECATION -e 'pip 21.0' || true
    [ -x "$WSTEST" ] || { echo "autobahn: wstest did not install" >&2; exit 1; }
fi

# --- Portcullis, its certificate and configuration -------------------------------------------
BIN=${PORTCULLIS_BIN:-$ROOT/target/debug/portcullis}
if [ ! -x "$BIN" ]; then
    (cd "$ROOT" && cargo build --quiet --bin portcullis)
fi
RUN=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [ -n "${KEEP:-}" ]; then echo "logs kept in $RUN"; else rm -rf "$RUN"; fi
}
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -keyout "$RUN/key.pem" -out "$RUN/cert.pem" 2>/dev/null
cat >"$RUN/portcullis.toml" <<CONF
# The suite is one address opening a connection per case, hundreds a minute: the per-address
# limits (an internet-facing edge's by default) are off. The session rates keep their defaults.
[server]
max_connections_per_ip = 0
handshake_rate_per_ip = 0
connection_rate_per_ip = 0

[tls]
cert = "$RUN/cert.pem"
key = "$RUN/key.pem"

[[listeners]]
name = "plain"
addresses = ["127.0.0.1:$PLAIN_PORT"]

[[listeners]]
name = "tls"
addresses = ["127.0.0.1:$TLS_PORT"]
tls = true

[admin]
address = "127.0.0.1:$ADMIN_PORT"

[session]
ping_interval = "0s"
idle_timeout = "1h"
close_timeout = "5s"
# 9.* sends messages of up to 16 MiB in frames of up to 16 MiB.
max_frame_size = "32MiB"
max_message_size = "64MiB"

[[routes]]
name = "autobahn"
path = "/agents/{agent}/terminal"
backends = ["127.0.0.1:$ECHO_PORT"]
CONF

"$WORK/venv/bin/python" "$ROOT/tests/autobahn/echo_server.py" "ws://127.0.0.1:$ECHO_PORT" >"$RUN/echoserver.log" 2>&1 &
pids+=($!)
RUST_LOG=${RUST_LOG:-warn} "$BIN" run --config "$RUN/portcullis.toml" >"$RUN/portcullis.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$ECHO_PORT") 2>/dev/null && (exec 3<>"/dev/tcp/127.0.0.1/$PLAIN_PORT") 2>/dev/null; then
        break
    fi
    sleep 0.1
done

# --- the fuzzing client, once per listener ----------------------------------------------------
status=0
for mode in $MODES; do
    port=$PLAIN_PORT
    [ "$mode" = wss ] && port=$TLS_PORT
    out=$WORK/reports/$mode
    rm -rf "$out"
    mkdir -p "$out"
    cat >"$RUN/spec-$mode.json" <<SPECJSON
{
    "outdir": "$out",
    "servers": [{"agent": "portcullis-$mode", "url": "$mode://127.0.0.1:$port/agents/autobahn/terminal"}],
    "cases": $CASES,
    "exclude-cases": $EXCLUDE,
    "exclude-agent-cases": {}
}
SPECJSON
    echo "autobahn $SPEC over $mode: $mode://127.0.0.1:$port (reports in $out)"
    (cd "$RUN" && timeout 3600 "$WSTEST" -m fuzzingclient -s "$RUN/spec-$mode.json" >"$RUN/fuzzingclient-$mode.log" 2>&1) || {
        echo "autobahn: the fuzzing client failed; its log:" >&2
        tail -30 "$RUN/fuzzingclient-$mode.log" >&2
        status=1
        continue
    }
    python3 - "$out/index.json" "$mode" <<'PY' || status=1
import json, os, sys
index = json.load(open(sys.argv[1]))
passed, failed, by_behavior = 0, [], {}
for agent, cases in index.items():
    for case, r in cases.items():
        b = r["behavior"]
        by_behavior[b] = by_behavior.get(b, 0) + 1
        if b in ("OK", "INFORMATIONAL") and r.get("behaviorClose") in ("OK", "INFORMATIONAL"):
            passed += 1
        else:
            # What the client saw, to tell a proxy fault from a slow machine without a rerun.
            try:
                d = json.load(open(os.path.join(os.path.dirname(sys.argv[1]), r["reportfile"].replace(".html", ".json"))))
                seen = " (received %s, close code %s, clean %s, dropped by client %s, %s ms)" % (
                    json.dumps(d.get("received"))[:120], d.get("remoteCloseCode"), d.get("wasClean"),
                    d.get("droppedByMe"), d.get("duration"))
            except (IOError, OSError, ValueError, KeyError):
                seen = ""
            failed.append("%s %s/%s%s" % (case, b, r.get("behaviorClose"), seen))
key = lambda c: [int(x) for x in c.split()[0].split(".")]
for f in sorted(failed, key=key):
    print("  not passed: " + f)
print("  by behavior (%s): %s" % (sys.argv[2], ", ".join("%s %d" % kv for kv in sorted(by_behavior.items()))))
print("autobahn: %d passed, %d failed" % (passed, len(failed)))
sys.exit(1 if failed else 0)
PY
done
exit $status
