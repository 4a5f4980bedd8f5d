#!/usr/bin/env bash
# WebSockets over HTTP/2 (RFC 8441) next to HTTP/1.1, through the same Portcullis, in one run:
# memory per idle wss session and proxy CPU per relayed message.
#
#     loadtest/peers/h2-vs-h1.sh
#
# An echo backend (portcullis-loadtest backend) and Portcullis with one TLS listener (one tokio
# worker, the per-client limits off: the load generator is one address), on loopback. For each
# count in IDLE and each protocol the proxy is started fresh and holds that many idle sessions
# (`idle --pid`: KiB of proxy RSS per session); then, on one proxy, `rate` at RATE msg/s over
# CONNS sessions for DURATION, REPEAT times per protocol, alternating (`--pid`: proxy CPU µs per
# message). HTTP/2 sessions share connections, STREAMS per connection. Every process this
# script starts is stopped by its PID on exit.
#
# Knobs: IDLE ("1000 5000 9900"), STREAMS (100), RATE (20000), CONNS (100), DURATION (10s),
# REPEAT (3), OUT (results directory), SKIP_BUILD=1.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$(dirname "$0")/common.sh"
IDLE=${IDLE-"1000 5000 9900"}
STREAMS=${STREAMS:-100}
RATE=${RATE:-20000}
CONNS=${CONNS:-100}
DURATION=${DURATION:-10s}
REPEAT=${REPEAT:-3}
WORK=$(mktemp -d /tmp/portcullis-h2.XXXXXX)
OUT=${OUT:-$WORK/results}
mkdir -p "$OUT"
BACKEND_PORT=27781 PROXY_PORT=28443 ADMIN_PORT=29190
PATH_T='/agents/agent-{conn}/terminal'

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
# An EXIT trap does not run on a signal that kills the shell: exit on it instead (cleaning up).
trap 'exit 143' TERM
trap 'exit 130' INT

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    (cd "$ROOT" && cargo build --release -q -p portcullis -p portcullis-loadtest)
fi
PC=$ROOT/target/release/portcullis
LT=$ROOT/target/release/portcullis-loadtest

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
cat >"$WORK/portcullis.toml" <<CONF
[server]
worker_threads = 1
drain_timeout = "2s"
drain_spread = "100ms"
max_connections_per_ip = 0
handshake_rate_per_ip = 0
connection_rate_per_ip = 0
token_check_rate_per_ip = 0

[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"

[[listeners]]
addresses = ["127.0.0.1:$PROXY_PORT"]
tls = true

[admin]
address = "127.0.0.1:$ADMIN_PORT"

[http2]
max_concurrent_streams = $STREAMS
max_streams_per_ip = 0

$(terminal_route "$BACKEND_PORT")
CONF
"$PC" check-config "$WORK/portcullis.toml" >/dev/null

"$LT" backend --mode echo --listen "127.0.0.1:$BACKEND_PORT" >"$WORK/backend.log" 2>&1 &
PIDS+=($!)
PROXY_PID=
start_proxy() {
    if [ -n "$PROXY_PID" ]; then
        kill "$PROXY_PID" 2>/dev/null || true
        wait "$PROXY_PID" 2>/dev/null || true
    fi
    RUST_LOG=portcullis=warn "$PC" run --config "$WORK/portcullis.toml" >>"$WORK/portcullis.log" 2>&1 &
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
    wait_port "$PROXY_PORT" || { echo "portcullis did not start" >&2; exit 1; }
}
# The protocol's flags for portcullis-loadtest.
flags() { if [ "$1" = h2 ]; then echo "--h2-streams $STREAMS"; fi; }
field() { grep -o "\"$2\": *[0-9.]*" "$1" | head -n1 | sed 's/.*: *//'; }
TARGET="wss://localhost:$PROXY_PORT$PATH_T"

echo "## idle: KiB of proxy RSS per idle wss session, a fresh proxy per run ($STREAMS streams per h2 connection)" | tee "$OUT/idle.txt"
printf '%-9s %8s %8s %12s %12s %9s\n' protocol sessions held "RSS before" "RSS loaded" KiB/sess | tee -a "$OUT/idle.txt"
for n in $IDLE; do
    for proto in http/1.1 h2; do
        start_proxy
        sleep 1
        json="$OUT/idle-${proto//\//}-$n.json"
        # shellcheck disable=SC2046
        timeout 300 "$LT" idle -q -c "$n" --ramp 2000 --source-addrs 8 -d 5s --pid "$PROXY_PID" --insecure \
            $(flags "$proto") --target "$TARGET" --json "$json" >"${json%.json}.txt" 2>&1 || true
        printf '%-9s %8s %8s %12s %12s %9.2f\n' "$proto" "$n" "$(field "$json" held)" "$(field "$json" rss_before_kib) KiB" \
            "$(field "$json" rss_loaded_kib) KiB" "$(field "$json" kib_per_session)" | tee -a "$OUT/idle.txt"
    done
done

echo | tee -a "$OUT/rate.txt"
echo "## rate: proxy CPU per message at $RATE msg/s over $CONNS wss sessions, 64 B, $DURATION, alternating" | tee -a "$OUT/rate.txt"
printf '%-9s %4s %10s %10s %9s %9s %10s\n' protocol run received "msg/s" "p50 µs" "p99 µs" "cpu µs/msg" | tee -a "$OUT/rate.txt"
start_proxy
for r in $(seq 1 "$REPEAT"); do
    for proto in http/1.1 h2; do
        json="$OUT/rate-${proto//\//}-$r.json"
        # shellcheck disable=SC2046
        timeout 300 "$LT" rate -q -c "$CONNS" --rate "$RATE" --size 64 -d "$DURATION" --pid "$PROXY_PID" --insecure \
            $(flags "$proto") --target "$TARGET" --json "$json" >"${json%.json}.txt" 2>&1 || true
        printf '%-9s %4s %10s %10s %9s %9s %10.2f\n' "$proto" "$r" "$(field "$json" received)" \
            "$(field "$json" msgs_per_s)" "$(field "$json" p50)" "$(field "$json" p99)" \
            "$(field "$json" cpu_us_per_msg)" | tee -a "$OUT/rate.txt"
    done
done
echo
echo "results in $OUT"
