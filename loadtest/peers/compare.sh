#!/usr/bin/env bash
# Compare Portcullis with NGINX and HAProxy (and a direct connection) using portcullis-loadtest.
#
# Everything runs on loopback: an echo backend, Portcullis, NGINX and HAProxy (plain WebSocket,
# 1 worker/thread each), HAProxy once more in `mode tcp` (haproxy-tcp: a pure byte splice with no
# WebSocket or HTTP awareness, the floor of a user-space relay on this kernel), then `portcullis-loadtest compare` over several scenarios. Every process
# this script starts is stopped by its PID on exit. NGINX and HAProxy are installed from the
# distribution's packages if missing (needs root or sudo).
#
# Knobs (environment): DURATION (5s), REPEAT (3), CONNS (50), RATE (10000), STORM_RATE (2500),
# SCENARIOS ("latency echo64 echo16k rate idle1000 idle5000 idle9900 storm stormjwt rest restget sse
# sse1000"; latency is one session with one 64 B message in flight, for added latency; idleN holds N
# sessions; stormjwt is the storm with an ES256 token per session, verified by Portcullis only;
# stormrate is the storm at a fixed STORM_RATE new sessions per second (2500), open loop, so that
# every proxy does the same work in the same time and CPU per session compares at one load; rest
# is POSTs of 256 B echoed back over CONNS kept-alive connections, restget GETs of 1 KiB; sse is CONNS
# event streams as fast as they go, sse1000 is 1000 streams of 10 events/s each; dashboards is 20
# agents × 50 WebSocket watchers, 200 events per agent at 20/s, every event checked in order),
# PEER_WORKERS (1: NGINX worker_processes and HAProxy nbthread; 2 for the two-worker variant),
# FRESH_IDLE ("1000 5000 9900": idle sessions held by a freshly started proxy, for KiB/session),
# PORTCULLIS_THREADS (1: tokio worker threads, to match the peers' single worker; "" = one per core),
# PORTCULLIS_MODEL (work_stealing: `[server] worker_model` with more than one thread; thread_per_core),
# TLS (0; 1 = every target over wss:// with one self-signed ECDSA P-256 certificate, clients use
# --insecure; the direct baseline is a second, TLS, echo backend; adds the target nginx-tls12, an NGINX
# limited to TLS 1.2 as Debian's NGINX 1.22 is by default), PIN (0; 1 = every proxy pinned alone
# on core 1 with `taskset`, the echo backends and the load generator on core 0), OUT (results
# directory), SKIP_BUILD=1, PORTCULLIS (the proxy binary: target/release/portcullis; a profile-guided
# build from loadtest/pgo-build.sh, say).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
. "$(dirname "$0")/common.sh"
DURATION=${DURATION:-5s}
REPEAT=${REPEAT:-3}
CONNS=${CONNS:-50}
RATE=${RATE:-10000}
STORM_RATE=${STORM_RATE:-2500}
SCENARIOS=${SCENARIOS:-"latency echo64 echo16k rate idle1000 idle5000 idle9900 storm stormjwt rest restget sse sse1000 dashboards"}
FRESH_IDLE=${FRESH_IDLE-"1000 5000 9900"}
PORTCULLIS_THREADS=${PORTCULLIS_THREADS-1}
PORTCULLIS_MODEL=${PORTCULLIS_MODEL:-work_stealing}
# NGINX worker_processes / HAProxy nbthread (1 or 2 on this machine).
PEER_WORKERS=${PEER_WORKERS:-1}
TLS=${TLS:-0}
PIN=${PIN:-0}
# Command prefixes (taskset execs the program, so `$!` stays the proxy's own PID).
PROXY_CORE=() LOAD_CORE=()
if [ "$PIN" = 1 ]; then
    PROXY_CORE=(taskset -c 1) LOAD_CORE=(taskset -c 0)
fi
WORK=$(mktemp -d /tmp/portcullis-peers.XXXXXX)
OUT=${OUT:-$WORK/results}
mkdir -p "$OUT"

BACKEND_PORT=27681 DIRECT_TLS_PORT=27682 PORTCULLIS_PORT=28080 ADMIN_PORT=29090 NGINX_PORT=28081 HAPROXY_PORT=28082 NGINX12_PORT=28083 HAPROXY_TCP_PORT=28084
PATH_T='/agents/agent-{conn}/terminal'

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
# An EXIT trap does not run on a signal that kills the shell: exit on it instead (cleaning up).
trap 'exit 143' TERM
trap 'exit 130' INT

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# --- install peers ---------------------------------------------------------------------------
if ! command -v nginx >/dev/null || ! command -v haproxy >/dev/null || ! command -v openssl >/dev/null; then
    echo "installing nginx, haproxy and openssl from the distribution packages"
    # Keep the packages' own services from starting (we run our own instances).
    created_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod +x /usr/sbin/policy-rc.d
        created_policy=1
    fi
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx haproxy openssl >/dev/null
    if [ "$created_policy" = 1 ]; then as_root rm -f /usr/sbin/policy-rc.d; fi
fi
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY_BIN=$(command -v haproxy || echo /usr/sbin/haproxy)

# --- build -----------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    if [ -n "${PORTCULLIS:-}" ]; then
        (cd "$ROOT" && cargo build --release -p portcullis-loadtest)
    else
        (cd "$ROOT" && cargo build --release -p portcullis -p portcullis-loadtest)
    fi
fi
LT="$ROOT/target/release/portcullis-loadtest"
PC=${PORTCULLIS:-$ROOT/target/release/portcullis}
[ -x "$PC" ] || { echo "compare: no Portcullis binary at $PC" >&2; exit 1; }

ulimit -n "$(ulimit -Hn)" || true

# --- configs ---------------------------------------------------------------------------------
SCHEME=ws
LT_TLS=()
PC_TLS="" PC_LISTENER_TLS="" NGINX_SSL="" NGINX_SSL_FILES="" HAPROXY_SSL=""
if [ "$TLS" = 1 ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 -subj /CN=localhost \
        -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
    cat "$WORK/cert.pem" "$WORK/key.pem" >"$WORK/combined.pem"
    SCHEME=wss
    LT_TLS=(--insecure)
    PC_TLS=$(printf '[tls]\ncert = "%s"\nkey = "%s"\n' "$WORK/cert.pem" "$WORK/key.pem")
    PC_LISTENER_TLS="tls = true"
    NGINX_SSL=" ssl"
    # Every proxy speaks TLS 1.3 (NGINX 1.22 offers only up to TLS 1.2 unless told) with the same
    # suite preference, server order first (Portcullis's default: AES-128-GCM, whose SHA-256 key
    # schedule runs on the CPU's SHA extensions).
    SUITES=TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256
    NGINX_SSL_FILES="ssl_certificate $WORK/cert.pem; ssl_certificate_key $WORK/key.pem; ssl_protocols TLSv1.2 TLSv1.3; ssl_prefer_server_ciphers on; ssl_conf_command Ciphersuites $SUITES;"
    HAPROXY_SSL="ssl crt $WORK/combined.pem alpn http/1.1 ciphersuites $SUITES"
fi
# An ES256 key pair for the stormjwt scenario: every session carries a fresh token that
# Portcullis verifies (the peers, which have no JWT support, get the same request and ignore it).
openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl pkcs8 -topk8 -nocrypt -out "$WORK/jwt-private.pem"
openssl ec -in "$WORK/jwt-private.pem" -pubout -out "$WORK/jwt-public.pem" 2>/dev/null
cat >"$WORK/portcullis.toml" <<CONF
$PC_TLS
[server]
drain_timeout = "2s"
drain_spread = "100ms"
# The load generator is one address opening thousands of sessions: the per-client limits (an
# internet-facing edge's by default) are off, as NGINX and HAProxy have none here.
$LIMITS_OFF
worker_model = "$PORTCULLIS_MODEL"

[[listeners]]
name = "plain"
addresses = ["127.0.0.1:$PORTCULLIS_PORT"]
$PC_LISTENER_TLS

[admin]
address = "127.0.0.1:$ADMIN_PORT"

$(terminal_route "$BACKEND_PORT")

[[auth.keys]]
algorithms = ["ES256"]
public_key = "$WORK/jwt-public.pem"

[[routes]]
name = "jwt"
path = "/jwt/{agent}/terminal"
backends = ["127.0.0.1:$BACKEND_PORT"]
[routes.auth]
agent_claim = "agents"

# Dashboards: every watcher of an agent gets the agent's events (the dashboards scenario).
[[routes]]
name = "broadcast"
path = "/agents/{agent}/broadcast"
backends = ["127.0.0.1:$BACKEND_PORT"]

# The agent's REST API and SSE streams (the rest and sse scenarios).
[[routes]]
name = "api"
path = "/agents/{agent}/api/{*rest}"
kind = "http"
backends = ["127.0.0.1:$BACKEND_PORT"]
CONF

cat >"$WORK/nginx.conf" <<CONF
$(nginx_head "$PEER_WORKERS")
    upstream agents { server 127.0.0.1:$BACKEND_PORT; }
    # Plain requests (rest, sse) reuse kept-alive upstream connections, as Portcullis's pool does.
    upstream agents_http { server 127.0.0.1:$BACKEND_PORT; keepalive 64; }
    server {
        listen 127.0.0.1:$NGINX_PORT$NGINX_SSL;
        $NGINX_SSL_FILES
        location ~ ^/agents/[^/]+/api/ {
            proxy_pass http://agents_http;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 1h;
        }
$(nginx_ws_location)
    }
}
CONF
if [ "$TLS" = 1 ]; then
    # A second NGINX as Debian's 1.22 ships it: TLS 1.2 only (TLS 1.3 joined NGINX's default
    # ssl_protocols in 1.23.4), so the table shows both protocol versions side by side.
    mkdir -p "$WORK/nginx12"
    sed -e "s|127.0.0.1:$NGINX_PORT|127.0.0.1:$NGINX12_PORT|" -e "s|ssl_protocols TLSv1.2 TLSv1.3;|ssl_protocols TLSv1.2;|" \
        -e "s|pid $WORK/nginx.pid|pid $WORK/nginx12.pid|" -e "s|$WORK/nginx-tmp|$WORK/nginx12|g" "$WORK/nginx.conf" >"$WORK/nginx12.conf"
fi

cat >"$WORK/haproxy.cfg" <<CONF
global
    nbthread $PEER_WORKERS
    maxconn 9900
defaults
    mode http
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
frontend ws
    bind 127.0.0.1:$HAPROXY_PORT $HAPROXY_SSL
    default_backend agents
backend agents
    server b1 127.0.0.1:$BACKEND_PORT
CONF
# The floor: the same HAProxy splicing bytes in TCP mode (TLS terminated the same way with TLS=1).
cat >"$WORK/haproxy-tcp.cfg" <<CONF
global
    nbthread $PEER_WORKERS
    maxconn 9900
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend ws
    bind 127.0.0.1:$HAPROXY_TCP_PORT $HAPROXY_SSL
    default_backend agents
backend agents
    server b1 127.0.0.1:$BACKEND_PORT
CONF

# --- start -----------------------------------------------------------------------------------
start_portcullis() {
    if [ -n "$PORTCULLIS_THREADS" ]; then
        RUST_LOG=warn TOKIO_WORKER_THREADS=$PORTCULLIS_THREADS ${PROXY_CORE[@]+"${PROXY_CORE[@]}"} "$PC" run --config "$WORK/portcullis.toml" >>"$WORK/portcullis.log" 2>&1 &
    else
        RUST_LOG=warn ${PROXY_CORE[@]+"${PROXY_CORE[@]}"} "$PC" run --config "$WORK/portcullis.toml" >>"$WORK/portcullis.log" 2>&1 &
    fi
    PORTCULLIS_PID=$!
    PIDS+=("$PORTCULLIS_PID")
    wait_port $PORTCULLIS_PORT
}
# NGINX relays in its workers, not its master: sample every worker. Prints the master's children
# as comma-separated pids (portcullis-loadtest sums them), once all PEER_WORKERS have started.
nginx_workers() {
    for _ in $(seq 1 50); do
        [ "$(pgrep -c -P "$1")" -ge "$PEER_WORKERS" ] && break
        sleep 0.1
    done
    pgrep -P "$1" | paste -sd,
}
# Starts NGINX with $WORK/$1.conf and waits for port $2; sets STARTED_PID and STARTED_WORKERS.
launch_nginx() {
    ${PROXY_CORE[@]+"${PROXY_CORE[@]}"} "$NGINX_BIN" -c "$WORK/$1.conf" -p "$WORK" 2>>"$WORK/$1.log" &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    wait_port "$2"
    STARTED_WORKERS=$(nginx_workers "$STARTED_PID")
}
start_nginx() {
    launch_nginx nginx $NGINX_PORT
    NGINX_PID=$STARTED_PID NGINX_WORKERS=$STARTED_WORKERS
}
start_haproxy() {
    ${PROXY_CORE[@]+"${PROXY_CORE[@]}"} "$HAPROXY_BIN" -db -f "$WORK/haproxy.cfg" >>"$WORK/haproxy.log" 2>&1 &
    HAPROXY_PID=$!
    PIDS+=("$HAPROXY_PID")
    wait_port $HAPROXY_PORT
}
start_haproxy_tcp() {
    ${PROXY_CORE[@]+"${PROXY_CORE[@]}"} "$HAPROXY_BIN" -db -f "$WORK/haproxy-tcp.cfg" >>"$WORK/haproxy-tcp.log" 2>&1 &
    HAPROXY_TCP_PID=$!
    PIDS+=("$HAPROXY_TCP_PID")
    wait_port $HAPROXY_TCP_PORT
}
stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    local keep=() p
    for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

${LOAD_CORE[@]+"${LOAD_CORE[@]}"} "$LT" backend --mode echo --listen "127.0.0.1:$BACKEND_PORT" 2>"$WORK/backend.log" &
BACKEND_PID=$!
PIDS+=("$BACKEND_PID")
wait_port $BACKEND_PORT
DIRECT_PORT=$BACKEND_PORT
if [ "$TLS" = 1 ]; then
    ${LOAD_CORE[@]+"${LOAD_CORE[@]}"} "$LT" backend --mode echo --listen "127.0.0.1:$DIRECT_TLS_PORT" --tls-cert "$WORK/cert.pem" \
        --tls-key "$WORK/key.pem" 2>"$WORK/backend-tls.log" &
    PIDS+=($!)
    wait_port $DIRECT_TLS_PORT
    DIRECT_PORT=$DIRECT_TLS_PORT
fi
start_portcullis
start_nginx
start_haproxy
start_haproxy_tcp

TARGETS=(
    "direct=$SCHEME://127.0.0.1:$DIRECT_PORT$PATH_T"
    "portcullis=$SCHEME://127.0.0.1:$PORTCULLIS_PORT$PATH_T"
    "nginx=$SCHEME://127.0.0.1:$NGINX_PORT$PATH_T"
    "haproxy=$SCHEME://127.0.0.1:$HAPROXY_PORT$PATH_T"
    "haproxy-tcp=$SCHEME://127.0.0.1:$HAPROXY_TCP_PORT$PATH_T"
)
PIDOF=(--pid-of "portcullis=$PORTCULLIS_PID" --pid-of "nginx=$NGINX_WORKERS" --pid-of "haproxy=$HAPROXY_PID"
    --pid-of "haproxy-tcp=$HAPROXY_TCP_PID")
if [ "$TLS" = 1 ]; then
    launch_nginx nginx12 $NGINX12_PORT
    TARGETS+=("nginx-tls12=$SCHEME://127.0.0.1:$NGINX12_PORT$PATH_T")
    PIDOF+=(--pid-of "nginx-tls12=$STARTED_WORKERS")
fi

{
    echo "# portcullis-loadtest compare, $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "machine: $(nproc) cores, kernel $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    echo "versions: $("$PC" --version 2>/dev/null || echo portcullis), $("$NGINX_BIN" -v 2>&1), $("$HAPROXY_BIN" -v | head -n1)"
    echo "duration $DURATION, repeat $REPEAT (interleaved, medians), connections $CONNS, $SCHEME, portcullis threads ${PORTCULLIS_THREADS:-one per core} ($PORTCULLIS_MODEL), peer workers $PEER_WORKERS"
} | tee "$OUT/header.txt"

run_compare() {
    local name=$1
    shift
    echo
    echo "## $name: portcullis-loadtest compare $*" | tee "$OUT/$name.txt"
    timeout 900 ${LOAD_CORE[@]+"${LOAD_CORE[@]}"} "$LT" compare --repeat "$REPEAT" --json "$OUT/$name.json" "${PIDOF[@]}" ${LT_TLS[@]+"${LT_TLS[@]}"} "$@" "${TARGETS[@]}" \
        2>"$OUT/$name.log" | tee -a "$OUT/$name.txt" || echo "($name exited non-zero: see $OUT/$name.log)"
}

for s in $SCENARIOS; do
    case $s in
        latency) run_compare latency --scenario echo -q -c 1 --window 1 --size 64 -d "$DURATION" ;;
        echo64) run_compare echo64 --scenario echo -q -c "$CONNS" --window 4 --size 64 -d "$DURATION" ;;
        echo16k) run_compare echo16k --scenario echo -q -c "$CONNS" --window 2 --size 16384 -d "$DURATION" ;;
        rate) run_compare rate --scenario rate -q -c "$CONNS" --rate "$RATE" --size 64 -d "$DURATION" ;;
        idle*) run_compare "$s" --scenario idle -q -c "${s#idle}" --ramp 2000 --source-addrs 8 -d "$DURATION" ;;
        storm) run_compare storm --scenario storm -q -c 8 --source-addrs 8 -d "$DURATION" ;;
        stormrate) run_compare stormrate --scenario storm -q -c 16 --ramp "$STORM_RATE" --source-addrs 8 -d "$DURATION" ;;
        stormjwt)
            # Same storm, but on /jwt/...: Portcullis verifies an ES256 token minted per session
            # and checks that it grants the agent; the peers proxy the same request unauthenticated.
            saved=("${TARGETS[@]}")
            TARGETS=("${TARGETS[@]//\/agents\//\/jwt\/}")
            run_compare stormjwt --scenario storm -q -c 8 --source-addrs 8 -d "$DURATION" \
                --jwt-key "$WORK/jwt-private.pem" --alg ES256 --claim 'sub=user-{conn}' --claim 'agents=["agent-{conn}"]'
            TARGETS=("${saved[@]}")
            ;;
        dashboards)
            saved=("${TARGETS[@]}")
            TARGETS=("${TARGETS[@]//agent-\{conn\}\/terminal/agent-\{conn \/ 50\}\/broadcast?watchers=50\&events=200\&rate=20}")
            run_compare dashboards --scenario watch -q -c 1000 --watchers 50 --events 200 --ramp 2000 \
                --source-addrs 8 -d 60s
            TARGETS=("${saved[@]}")
            ;;
        rest | restget | sse | sse1000)
            # Plain HTTP on the agent API path: the same URLs with http(s):// and .../api/...
            saved=("${TARGETS[@]}")
            HTTP_SCHEME=http
            [ "$TLS" = 1 ] && HTTP_SCHEME=https
            TARGETS=()
            for t in "${saved[@]}"; do
                name=${t%%=*} url=${t#*=}
                base=${url%%/agents/*}
                base=$HTTP_SCHEME${base#"$SCHEME"}
                case $s in
                    rest | restget) TARGETS+=("$name=$base/agents/agent-{conn}/api/echo") ;;
                    sse) TARGETS+=("$name=$base/agents/agent-{conn}/api/sse?rate=0") ;;
                    sse1000) TARGETS+=("$name=$base/agents/agent-{conn}/api/sse?rate=10") ;;
                esac
            done
            case $s in
                rest) run_compare rest --scenario http -q -c "$CONNS" --size 256 -d "$DURATION" ;;
                restget) run_compare restget --scenario http -q -c "$CONNS" --method GET -d "$DURATION" ;;
                sse) run_compare sse --scenario sse -q -c "$CONNS" -d "$DURATION" ;;
                sse1000) run_compare sse1000 --scenario sse -q -c 1000 --ramp 2000 --source-addrs 8 -d "$DURATION" ;;
            esac
            TARGETS=("${saved[@]}")
            ;;
        *) echo "unknown scenario $s" >&2 ;;
    esac
done
# KiB per idle session on a freshly started proxy: a process that already served load keeps
# freed memory, which hides the growth. One run per proxy and count, restarted each time.
if [ -n "$FRESH_IDLE" ]; then
    echo
    echo "## idle-fresh: KiB per idle session, each proxy freshly started, one run per count" | tee "$OUT/idle-fresh.txt"
    printf '%-12s %8s %10s %12s %12s %10s\n' target sessions held "RSS before" "RSS loaded" "KiB/sess" | tee -a "$OUT/idle-fresh.txt"
    for n in $FRESH_IDLE; do
        for name in portcullis nginx haproxy haproxy-tcp; do
            case $name in
                portcullis) stop_pid "$PORTCULLIS_PID"; start_portcullis; pid=$PORTCULLIS_PID port=$PORTCULLIS_PORT ;;
                nginx) stop_pid "$NGINX_PID"; start_nginx; pid=$NGINX_WORKERS port=$NGINX_PORT ;;
                haproxy) stop_pid "$HAPROXY_PID"; start_haproxy; pid=$HAPROXY_PID port=$HAPROXY_PORT ;;
                haproxy-tcp) stop_pid "$HAPROXY_TCP_PID"; start_haproxy_tcp; pid=$HAPROXY_TCP_PID port=$HAPROXY_TCP_PORT ;;
            esac
            sleep 1
            json="$OUT/idle-fresh-$name-$n.json"
            timeout 300 ${LOAD_CORE[@]+"${LOAD_CORE[@]}"} "$LT" idle -q -c "$n" --ramp 2000 --source-addrs 8 -d "$DURATION" --pid "$pid" \
                ${LT_TLS[@]+"${LT_TLS[@]}"} --target "$SCHEME://127.0.0.1:$port$PATH_T" --json "$json" >"$OUT/idle-fresh-$name-$n.txt" 2>&1 || true
            field() { grep -o "\"$1\": *[0-9.]*" "$json" | head -n1 | sed 's/.*: *//'; }
            printf '%-12s %8s %10s %12s %12s %10.2f\n' "$name" "$n" "$(field held)" "$(field rss_before_kib) KiB" \
                "$(field rss_loaded_kib) KiB" "$(field kib_per_session)" | tee -a "$OUT/idle-fresh.txt"
        done
    done
fi
echo
echo "results in $OUT"
