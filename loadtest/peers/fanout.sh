#!/usr/bin/env bash
# Fan-out against one backend connection per client: the dashboards scenario (20 agents × 50
# watchers, every event checked in order) through two Portcullis processes on the same backend,
# one whose broadcast route has `[routes.fanout]` (one backend connection per agent) and one
# without (one per watcher), interleaved by `portcullis-loadtest compare`, plus a direct baseline.
#
#     loadtest/peers/fanout.sh [target/release/portcullis] [target/release/portcullis-loadtest]
#
# Knobs: REPEAT (2), EVENTS (200 per agent), RATE (20 events/s per agent), SIZE (payload bytes,
# 0: the harness's minimum), OUT (results directory).
#
# The backend starts an agent's events once `watchers` of its connections joined, or 30 s after
# the first: through the fan-out route it sees one connection per agent, so that agent's events
# start 30 s in (the watchers have all joined by then) and the scenario runs for 60 s.
# Loopback only; every process it starts is stopped by its PID on exit.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PC=${1:-$ROOT/target/release/portcullis}
LT=${2:-$ROOT/target/release/portcullis-loadtest}
REPEAT=${REPEAT:-2}
EVENTS=${EVENTS:-200}
RATE=${RATE:-20}
SIZE=${SIZE:-0}
OUT=${OUT:-$ROOT/target/fanout-bench}
mkdir -p "$OUT"
WORK=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BACKEND=$(port) PER_CLIENT=$(port) FANOUT=$(port) ADMIN1=$(port) ADMIN2=$(port)

config() { # listen admin extra
    cat <<CONF
[server]
drain_timeout = "2s"
max_connections_per_ip = 0
handshake_rate_per_ip = 0
connection_rate_per_ip = 0
token_check_rate_per_ip = 0
[[listeners]]
addresses = ["127.0.0.1:$1"]
[admin]
address = "127.0.0.1:$2"
[session]
ping_interval = "0s"
idle_timeout = "1h"
[[routes]]
name = "broadcast"
path = "/agents/{agent}/broadcast"
backends = ["127.0.0.1:$BACKEND"]
$3
CONF
}
config "$PER_CLIENT" "$ADMIN1" "" >"$WORK/per-client.toml"
config "$FANOUT" "$ADMIN2" $'[routes.fanout]\nqueue = 1024' >"$WORK/fanout.toml"

"$LT" backend --mode echo --listen "127.0.0.1:$BACKEND" 2>"$WORK/backend.log" &
pids+=($!)
RUST_LOG=warn TOKIO_WORKER_THREADS=1 "$PC" run --config "$WORK/per-client.toml" 2>"$WORK/per-client.log" &
P1=$!
pids+=($P1)
RUST_LOG=warn TOKIO_WORKER_THREADS=1 "$PC" run --config "$WORK/fanout.toml" 2>"$WORK/fanout.log" &
P2=$!
pids+=($P2)
for p in "$BACKEND" "$PER_CLIENT" "$FANOUT"; do
    for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && break; sleep 0.1; done
done
Q="watchers=50&events=$EVENTS&rate=$RATE&size=$SIZE"
echo "## dashboards, fan-out against one backend connection per client (REPEAT=$REPEAT EVENTS=$EVENTS RATE=$RATE SIZE=$SIZE)" | tee "$OUT/fanout.txt"
timeout 900 "$LT" compare --repeat "$REPEAT" --json "$OUT/fanout.json" \
    --pid-of "per-client=$P1" --pid-of "fanout=$P2" \
    --scenario watch -q -c 1000 --watchers 50 --events "$EVENTS" --ramp 2000 --source-addrs 8 -d 60s \
    "direct=ws://127.0.0.1:$BACKEND/agents/agent-{conn / 50}/broadcast?$Q" \
    "per-client=ws://127.0.0.1:$PER_CLIENT/agents/agent-{conn / 50}/broadcast?$Q" \
    "fanout=ws://127.0.0.1:$FANOUT/agents/agent-{conn / 50}/broadcast?$Q" 2>"$OUT/fanout.log" | tee -a "$OUT/fanout.txt"
echo "backend connections accepted by the fan-out proxy's route: $(curl -s "http://127.0.0.1:$ADMIN2/metrics" | grep '^portcullis_fanout_streams_total' || true)" | tee -a "$OUT/fanout.txt"
curl -s "http://127.0.0.1:$ADMIN2/metrics" | grep '^portcullis_fanout_drops_total' | tee -a "$OUT/fanout.txt" || true
