#!/usr/bin/env bash
# A profile-guided (PGO) release build of Portcullis, as the container image is built: an
# instrumented build serves a training load from the bundled load generator, then the release
# build is made again with that profile.
#
#     loadtest/pgo-build.sh [OUT]       # OUT: where the binary goes (target/pgo/portcullis)
#
# The training runs the proxy twice, with one worker (tokio's current-thread runtime) and with
# two (work stealing), each over plain TCP and TLS: WebSocket new sessions and echo (a token
# checked on every upgrade, HTTP/1.1 and HTTP/2), echo at a fixed rate and with 4 KiB
# messages, plain HTTP requests and SSE (HTTP/1.1 and HTTP/2), MCP tools/call, and dashboards
# (watchers of one agent's events). Each load checks what it receives, and the script fails
# when one fails, when the proxy does not exit cleanly or when the profile holds none of the
# proxy's functions. Code the training does not run (recordings, observers, fan-out, the Redis
# fleet, registries) is laid out as cold: BENCHMARKS.md ("A profile-guided build") has what
# the profile changes and what it costs.
#
# Knobs: TRAIN (3s: the length of each load). Needs rustup's `llvm-tools` component (added when
# missing), openssl and about three times a release build's time. Loopback only (ports
# 19601-19604); every process it starts is stopped on exit.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(realpath -m "${1:-$ROOT/target/pgo/portcullis}")
cd "$ROOT"
TRAIN=${TRAIN:-3s}
command -v openssl >/dev/null || { echo "pgo-build: openssl is needed for the TLS training certificate" >&2; exit 1; }
HOST=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA="$(rustc --print sysroot)/lib/rustlib/$HOST/bin/llvm-profdata"
if [ ! -x "$PROFDATA" ]; then
    command -v rustup >/dev/null || { echo "pgo-build: llvm-profdata missing and rustup is not available to add llvm-tools" >&2; exit 1; }
    rustup component add llvm-tools
    [ -x "$PROFDATA" ] || { echo "pgo-build: no $PROFDATA after adding llvm-tools" >&2; exit 1; }
fi
. loadtest/peers/common.sh
peers_setup
# The caller's flags would be mixed with (or, encoded, replace) the profile's.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS
PGO=$ROOT/target/pgo
RAW=$PGO/raw
rm -rf "$RAW"
mkdir -p "$RAW"

echo "pgo-build: the instrumented build" >&2
# The load generator is an ordinary build: its own runs must not count in the proxy's profile.
cargo build --release --locked -p portcullis-loadtest
# --target: the flags reach the proxy's code and its dependencies, not build scripts and
# proc-macros (which would write profiles of their own while building). A fixed path, so that
# a second run rebuilds nothing that did not change.
CARGO_TARGET_DIR=$PGO/instrumented RUSTFLAGS="-Cprofile-generate=$RAW" \
    cargo build --release --locked --target "$HOST" -p portcullis
PC=$PGO/instrumented/$HOST/release/portcullis LT=${CARGO_TARGET_DIR:-target}/release/portcullis-loadtest

self_signed "$WORK"
export PCLT_SECRET=pgo-training-secret-of-at-least-32-bytes-long
printf '%s' "$PCLT_SECRET" >"$WORK/secret"
"$LT" backend --mode echo --listen 127.0.0.1:19601 2>"$WORK/backend.log" &
pids+=($!)
cat >"$WORK/portcullis.toml" <<CONF
[tls]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
[server]
$LIMITS_OFF
[[listeners]]
addresses = ["127.0.0.1:19602"]
[[listeners]]
addresses = ["127.0.0.1:19603"]
tls = true
[http2]
max_streams_per_ip = 0
[admin]
address = "127.0.0.1:19604"
[fleet]
state_dir = "$WORK/state"
[[auth.keys]]
algorithms = ["HS256"]
secret_file = "$WORK/secret"
[session]
ping_interval = "0s"
client_message_rate = 0
client_byte_rate = "0"
[[routes]]
name = "terminal"
path = "/agents/{agent}/terminal"
backends = ["127.0.0.1:19601"]
[routes.auth]
agent_claim = "agents"
[[routes]]
name = "broadcast"
path = "/agents/{agent}/broadcast"
backends = ["127.0.0.1:19601"]
[[routes]]
name = "api"
path = "/api/{agent}/{*rest}"
kind = "http"
backends = ["127.0.0.1:19601"]
[routes.auth]
agent_claim = "agents"
[[routes]]
name = "mcp"
path = "/agents/{agent}/mcp"
kind = "mcp"
backends = ["127.0.0.1:19601"]
[routes.auth]
agent_claim = "agents"
required_claims = ["sub"]
[routes.mcp]
tool_scope = "mcp:{agent}:tools/call:{tool}"
CONF
wait_port 19601

load() {
    timeout 300 "$LT" "$@" >>"$WORK/train.log" 2>&1 || {
        echo "pgo-build: the training load \`$1\` failed:" >&2
        tail -20 "$WORK/train.log" >&2
        exit 1
    }
}
token=(--jwt-secret-env PCLT_SECRET --alg HS256 --claim sub=user-{conn} --claim 'agents=["a1"]'
    --claim 'scope=mcp:a1:tools/call:echo')
train() { # worker threads
    echo "pgo-build: the training load, $1 worker(s)" >&2
    LLVM_PROFILE_FILE="$RAW/portcullis-%p-%m.profraw" RUST_LOG=warn TOKIO_WORKER_THREADS=$1 \
        "$PC" run --config "$WORK/portcullis.toml" >"$WORK/proxy.log" 2>&1 &
    local proxy=$!
    pids+=($proxy)
    wait_port 19602 || { tail -5 "$WORK/proxy.log" >&2; exit 1; }
    for scheme in ws wss; do
        local base=$scheme://127.0.0.1:19602 tls=() h2=()
        [ $scheme = wss ] && base=wss://127.0.0.1:19603 tls=(--insecure) h2=(--h2-streams 10)
        local ws=$base/agents/a1/terminal http=${base/ws/http}
        load storm -q -c 8 --source-addrs 8 -d "$TRAIN" --target "$ws" "${token[@]}" "${tls[@]}"
        load echo -q -c 50 --window 4 --size 64 -d "$TRAIN" --target "$ws" "${token[@]}" "${tls[@]}"
        load rate -q -c 50 --rate 10000 --size 64 -d "$TRAIN" --target "$ws" "${token[@]}" "${tls[@]}"
        load echo -q -c 20 --window 2 --size 4096 -d "$TRAIN" --target "$ws" "${token[@]}" "${tls[@]}"
        load http -q -c 32 --size 256 -d "$TRAIN" --target "$http/api/a1/echo" "${token[@]}" "${tls[@]}"
        load sse -q -c 32 -d "$TRAIN" --target "$http/api/a1/sse" "${token[@]}" "${tls[@]}"
        load mcp -q -c 16 --size 256 -d "$TRAIN" --target "$http/agents/a1/mcp" "${token[@]}" "${tls[@]}"
        # -d bounds it: it ends once its 40 events reached every watcher.
        load watch -q -c 100 --watchers 50 --events 40 --ramp 2000 -d 20s "${tls[@]}" \
            --target "$base/agents/agent-{conn / 50}/broadcast?watchers=50&events=40&rate=200"
        if [ $scheme = wss ]; then
            load echo -q -c 50 --window 4 --size 64 -d "$TRAIN" --target "$ws" "${token[@]}" "${tls[@]}" "${h2[@]}"
            load http -q -c 32 --size 256 -d "$TRAIN" --target "$http/api/a1/echo" "${token[@]}" "${tls[@]}" "${h2[@]}"
        fi
    done
    # A clean exit writes the profile: one that ends otherwise fails the build.
    kill -TERM "$proxy"
    wait "$proxy" || { echo "pgo-build: the instrumented proxy exited with $?" >&2; tail -5 "$WORK/proxy.log" >&2; exit 1; }
    local p rest=()
    for p in "${pids[@]}"; do [ "$p" = "$proxy" ] || rest+=("$p"); done
    pids=("${rest[@]}")
}
train 1
train 2

"$PROFDATA" merge -o "$WORK/merged.profdata" "$RAW"/portcullis-*.profraw
shown=$("$PROFDATA" show --function=portcullis "$WORK/merged.profdata") || {
    echo "pgo-build: llvm-profdata could not read the merged profile" >&2
    exit 1
}
functions=$(sed -n 's/^Functions shown: //p' <<<"$shown")
if [ "${functions:-0}" -lt 100 ]; then
    echo "pgo-build: the profile holds ${functions:-no} functions of the proxy's own; not using it" >&2
    exit 1
fi
# The profile's path names its contents: cargo does not look into the file, and a profile
# that changed under the same path would leave crates built with the old one.
sum=$(sha256sum "$WORK/merged.profdata" | cut -c1-16)
PROFILE=$PGO/portcullis-$sum.profdata
rm -f "$PGO"/portcullis-*.profdata
cp "$WORK/merged.profdata" "$PROFILE"

echo "pgo-build: the optimised build ($functions of the proxy's functions profiled)" >&2
CARGO_TARGET_DIR=$PGO/release RUSTFLAGS="-Cprofile-use=$PROFILE" \
    cargo build --release --locked --target "$HOST" -p portcullis
install -D -m 0755 "$PGO/release/$HOST/release/portcullis" "$OUT"
echo "pgo-build: $OUT" >&2
