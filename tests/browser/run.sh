#!/usr/bin/env bash
# WebSocket sessions from a real browser (headless Chromium) through Portcullis.
#
#     tests/browser/run.sh
#
# Starts an echo backend that selects no subprotocol (portcullis-loadtest), Portcullis with a route that takes the token
# from a `bearer.` subprotocol entry, and a page that opens a WebSocket the way a browser app
# does, then drives headless Chromium over WebDriver (Debian's `chromium` and `chromium-driver`;
# .ci/run installs them when missing) to run the page and read what it saw. Cases:
#
#   - ["bearer.<token>", "portcullis"]: the 101 answers the marker, the echo comes back;
#   - ["bearer.<token>"] alone: Chromium fails the handshake (1006), because the backend selects
#     no subprotocol; this is why the marker exists (docs/security.md);
#   - a wrong token with the marker: no session (1006 in the browser, 401 at the proxy);
#
# then runs tests/browser/demo.py: the demo's page (xterm.js terminal on a real PTY, events,
# REST, a task's SSE output, token expiry), with a screenshot in target/browser/demo.png; and
# tests/browser/cors.py: a page on another origin calling an agent's API under [routes.cors];
# tests/browser/isolation.py: an agent's page (sandboxed) cannot reach another agent's terminal
# or API with the user's HttpOnly cookie, nor read the token.
#
# Prints `browser: N passed, M failed`; exits non-zero when a case fails. Loopback only; every
# process it starts is stopped on exit. Binaries: target/debug/{portcullis,portcullis-loadtest}
# (built if missing).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
[ -n "$CHROMIUM" ] || { echo "browser: chromium not found (apt-get install chromium)" >&2; exit 1; }
PC=${PORTCULLIS_BIN:-$ROOT/target/debug/portcullis}
LT=$ROOT/target/debug/portcullis-loadtest
[ -x "$PC" ] && [ -x "$LT" ] || (cd "$ROOT" && cargo build --quiet --bin portcullis -p portcullis -p portcullis-loadtest)
BACKEND_PORT=${BACKEND_PORT:-19511}
PROXY_PORT=${PROXY_PORT:-19512}
ADMIN_PORT=${ADMIN_PORT:-19513}
for port in "$BACKEND_PORT" "$PROXY_PORT" "$ADMIN_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "browser: something already listens on 127.0.0.1:$port (set BACKEND_PORT, PROXY_PORT, ADMIN_PORT)" >&2
        exit 1
    fi
done

RUN=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$RUN"
}
trap cleanup EXIT

openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl pkcs8 -topk8 -nocrypt -out "$RUN/jwt.pem"
openssl ec -in "$RUN/jwt.pem" -pubout -out "$RUN/jwt.pub.pem" 2>/dev/null
cat >"$RUN/portcullis.toml" <<CONF
[[listeners]]
addresses = ["127.0.0.1:$PROXY_PORT"]
[admin]
address = "127.0.0.1:$ADMIN_PORT"
[session]
ping_interval = "0s"
[[auth.keys]]
algorithms = ["ES256"]
public_key = "$RUN/jwt.pub.pem"
[[routes]]
name = "terminal"
path = "/agents/{agent}/terminal"
backends = ["127.0.0.1:$BACKEND_PORT"]
[routes.auth]
sources = ["subprotocol:bearer."]
agent_claim = "agents"
CONF

# An agent backend that selects no subprotocol, as most do.
"$LT" backend --mode echo --no-subprotocol --listen "127.0.0.1:$BACKEND_PORT" >"$RUN/backend.log" 2>&1 &
pids+=($!)
RUST_LOG=portcullis=info "$PC" run --config "$RUN/portcullis.toml" >"$RUN/portcullis.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PROXY_PORT") 2>/dev/null && break
    sleep 0.1
done
TOKEN=$("$PC" token mint --key "$RUN/jwt.pem" --sub browser-test --claim 'agents=["a1"]' --ttl 10m)

# One page per case: it opens the WebSocket and writes the outcome into the DOM.
page() { # file protocols-js
    cat >"$RUN/$1" <<HTML
<!doctype html><html><body><pre id="out">pending</pre><script>
const out = document.getElementById("out");
const ws = new WebSocket("ws://127.0.0.1:$PROXY_PORT/agents/a1/terminal", $2);
ws.onopen = () => ws.send("hello from chromium");
ws.onmessage = (m) => { out.textContent = "echo:" + ws.protocol + ":" + m.data; ws.close(1000); };
ws.onclose = (e) => { if (!out.textContent.startsWith("echo:")) out.textContent = "closed:" + e.code; };
</script></body></html>
HTML
}
page marker.html "[\"bearer.$TOKEN\", \"portcullis\"]"
page token-only.html "[\"bearer.$TOKEN\"]"
page wrong-token.html "[\"bearer.not-a-token\", \"portcullis\"]"

# Chromium driven over WebDriver (chromedriver, plain HTTP): open the page, then read what it
# wrote until it is no longer "pending" (the WebSocket is asynchronous; at most 10 s).
DRIVER=${CHROMEDRIVER:-$(command -v chromedriver || true)}
[ -n "$DRIVER" ] || { echo "browser: chromedriver not found (apt-get install chromium-driver)" >&2; exit 1; }
# chromedriver cannot bind port 0: a random high port is tried, and another when chromedriver
# exits because that one is taken (as demo.py's start_chromedriver does).
DRIVER_PORT=
for _ in $(seq 1 20); do
    port=$((20000 + RANDOM % 30000))
    "$DRIVER" --port="$port" >"$RUN/chromedriver.log" 2>&1 &
    driver_pid=$!
    for _ in $(seq 1 150); do
        kill -0 "$driver_pid" 2>/dev/null || break
        if curl -sf "http://127.0.0.1:$port/status" >/dev/null 2>&1; then
            DRIVER_PORT=$port
            break
        fi
        sleep 0.1
    done
    if [ -n "$DRIVER_PORT" ]; then
        pids+=("$driver_pid")
        break
    fi
    kill "$driver_pid" 2>/dev/null || true
    wait "$driver_pid" 2>/dev/null || true
done
[ -n "$DRIVER_PORT" ] || { echo "browser: chromedriver did not start on any port tried" >&2; exit 1; }
wd() { # method path [json]
    curl -s -X "$1" -H 'Content-Type: application/json' ${3:+-d "$3"} "http://127.0.0.1:$DRIVER_PORT$2"
}
caps='{"capabilities":{"alwaysMatch":{"browserName":"chrome","goog:chromeOptions":{"binary":"'"$CHROMIUM"'","args":["--headless","--no-sandbox","--disable-gpu","--disable-quic","--no-first-run","--disable-background-networking","--disable-component-update","--disable-sync","--user-data-dir='"$RUN"'/profile"]}}}}'
SESSION=$(wd POST /session "$caps" | python3 -c 'import json,sys; print(json.load(sys.stdin)["value"]["sessionId"])')

run_page() { # file -> what the page wrote
    wd POST "/session/$SESSION/url" '{"url":"file://'"$RUN/$1"'"}' >/dev/null
    local got=pending
    for _ in $(seq 1 100); do
        got=$(wd POST "/session/$SESSION/execute/sync" '{"script":"return document.getElementById(\"out\").textContent","args":[]}' \
            | python3 -c 'import json,sys; print(json.load(sys.stdin)["value"])')
        [ "$got" != pending ] && break
        sleep 0.1
    done
    echo "$got"
}

passed=0 failed=0
check() { # name page expected
    got=$(run_page "$2")
    if [ "$got" = "$3" ]; then
        passed=$((passed + 1))
        echo "  ok: $1: $got"
    else
        failed=$((failed + 1))
        echo "  FAILED: $1: expected '$3', the page saw '$got'"
    fi
}
check "token in a subprotocol entry, with the marker" marker.html "echo:portcullis:hello from chromium"
check "token in a subprotocol entry, without the marker" token-only.html "closed:1006"
check "a wrong token" wrong-token.html "closed:1006"
# The token never reaches the backend's logs or the proxy's.
if grep -q "$TOKEN" "$RUN/portcullis.log" "$RUN/backend.log"; then
    failed=$((failed + 1))
    echo "  FAILED: the token appears in a log"
else
    passed=$((passed + 1))
    echo "  ok: the token appears in no log"
fi
wd DELETE "/session/$SESSION" >/dev/null
echo "browser: $passed passed, $failed failed"
# The demo's page: terminal, events, REST, SSE, expiry (tests/browser/demo.py).
demo_ok=0
PORTCULLIS_BIN="$PC" CHROMIUM="$CHROMIUM" CHROMEDRIVER="$DRIVER" python3 "$ROOT/tests/browser/demo.py" || demo_ok=1
# CORS from a page on another origin (tests/browser/cors.py).
cors_ok=0
PORTCULLIS_BIN="$PC" CHROMIUM="$CHROMIUM" CHROMEDRIVER="$DRIVER" python3 "$ROOT/tests/browser/cors.py" || cors_ok=1
# An agent's page cannot reach another agent with the user's credentials (tests/browser/isolation.py).
isolation_ok=0
PORTCULLIS_BIN="$PC" CHROMIUM="$CHROMIUM" CHROMEDRIVER="$DRIVER" python3 "$ROOT/tests/browser/isolation.py" || isolation_ok=1
[ "$failed" -eq 0 ] && [ "$demo_ok" -eq 0 ] && [ "$cors_ok" -eq 0 ] && [ "$isolation_ok" -eq 0 ]
