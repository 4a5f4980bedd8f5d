#!/usr/bin/env bash
# Two Portcullis binaries side by side on the plain HTTP path (REST and SSE), for a change to the
# request or stream stages: `http` (POSTs of SIZE bytes echoed back on CONNS kept-alive
# connections, the token checked on each) and `sse` (CONNS event streams as fast as they go),
# interleaved and repeated by `portcullis-loadtest compare`, one worker thread each, against the
# same backend, with the direct connection as the floor.
#
#     loadtest/peers/http-old-vs-new.sh OLD_PORTCULLIS NEW_PORTCULLIS LOADTEST
#
# Knobs: DURATION (5s), REPEAT (3), CONNS (32), SIZE (256), OLD_BACKEND / NEW_BACKEND (lines for
# each proxy's `[backend]` table, e.g. 'max_idle_per_member = 32': the same binary twice then
# compares two settings). Loopback only; every process it starts is stopped on exit.
set -euo pipefail
OLD=$1 NEW=$2 LT=$3
DURATION=${DURATION:-5s} REPEAT=${REPEAT:-3} CONNS=${CONNS:-32} SIZE=${SIZE:-256}
. "$(dirname "$0")/common.sh"
peers_setup
export PCLT_SECRET=http-benchmark-secret-of-at-least-32-bytes-long
printf '%s' "$PCLT_SECRET" >"$WORK/secret"
"$LT" backend --mode echo --listen 127.0.0.1:19401 2>"$WORK/backend.log" &
pids+=($!)
config() { # port admin backend-lines
    cat <<CONF
[server]
$LIMITS_OFF
[backend]
$3
[[listeners]]
addresses = ["127.0.0.1:$1"]
[admin]
address = "127.0.0.1:$2"
[fleet]
state_dir = "$WORK/state-$1"
[[auth.keys]]
algorithms = ["HS256"]
secret_file = "$WORK/secret"
[[routes]]
name = "api"
path = "/agents/{agent}/{*rest}"
kind = "http"
backends = ["127.0.0.1:19401"]
[routes.auth]
agent_claim = "agents"
CONF
}
declare -A PID
for name in old new; do
    bin=$([ $name = old ] && echo "$OLD" || echo "$NEW")
    port=$([ $name = old ] && echo 19402 || echo 19403)
    lines=$([ $name = old ] && echo "${OLD_BACKEND:-}" || echo "${NEW_BACKEND:-}")
    config "$port" "$((port + 10))" "$lines" >"$WORK/$name.toml"
    RUST_LOG=warn TOKIO_WORKER_THREADS=1 "$bin" run --config "$WORK/$name.toml" >"$WORK/$name.log" 2>&1 &
    PID[$name]=$!
    pids+=($!)
done
wait_port 19401 19402 19403
token=(--jwt-secret-env PCLT_SECRET --alg HS256 --claim sub=user-{conn} --claim 'agents=["a1"]')
for scenario in http sse; do
    path=$([ $scenario = http ] && echo echo || echo sse)
    echo "## $scenario: compare --scenario $scenario -c $CONNS --size $SIZE -d $DURATION --repeat $REPEAT"
    "$LT" compare --scenario "$scenario" -q -c "$CONNS" --size "$SIZE" -d "$DURATION" --repeat "$REPEAT" "${token[@]}" \
        --pid-of "old=${PID[old]}" --pid-of "new=${PID[new]}" \
        "direct=http://127.0.0.1:19401/agents/a1/$path" "old=http://127.0.0.1:19402/agents/a1/$path" \
        "new=http://127.0.0.1:19403/agents/a1/$path"
done
