#!/usr/bin/env bash
# Fan-out against one backend connection per client: the dashboards scenario (20 agents × 50
# watchers, every event checked in order) through two Portcullis processes on the same backend,
# one whose broadcast route has `[routes.fanout]` (one backend connection per agent) and one
# without (one per watcher), interleaved by `portcullis-loadtest compare`, plus a direct baseline.
#
#     loadtest/peers/fanout.sh [target/release/portcullis] [target/release/portcullis-loadtest]
#
# Knobs: REPEAT (2), EVENTS (200 per agent), RATE (20 events/s per agent), SIZE (payload bytes,
# 0: the harness's minimum), QUEUE (the fan-out route's queue, 1024 frames), STALL (0; N > 0 adds
# a target `fanout-stalled`: the fan-out route again with N watchers that never read, one on each
# of the first N agents, left out of the figures; compare its latency with `fanout`'s),
# START_AFTER (the backend's wait for an agent's watchers, 30s), DURATION (the bound of one run,
# 60s), TARGETS (which of direct, per-client, fanout, fanout-stalled to run, in the order given;
# all by default, fanout-stalled only with STALL), OUT (results directory), OLD (another
# Portcullis binary: adds a target `fanout-old`, the same fan-out route served by it, for an
# old-against-new run in the same interleaved rounds).
#
# The backend starts an agent's events once `watchers` of its connections joined, or
# START_AFTER after the first: through the fan-out route it sees one connection per agent, so
# that agent's events start START_AFTER in (the watchers have all joined by then).
# Loopback only; every process it starts is stopped by its PID on exit.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PC=${1:-$ROOT/target/release/portcullis}
LT=${2:-$ROOT/target/release/portcullis-loadtest}
REPEAT=${REPEAT:-2}
EVENTS=${EVENTS:-200}
RATE=${RATE:-20}
SIZE=${SIZE:-0}
QUEUE=${QUEUE:-1024}
STALL=${STALL:-0}
START_AFTER=${START_AFTER:-30s}
DURATION=${DURATION:-60s}
OUT=${OUT:-$ROOT/target/fanout-bench}
mkdir -p "$OUT"
. "$(dirname "$0")/common.sh"
peers_setup
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BACKEND=$(port) PER_CLIENT=$(port) FANOUT=$(port) ADMIN1=$(port) ADMIN2=$(port) FANOUT_OLD=$(port) ADMIN3=$(port)
OLD=${OLD:-}

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
config "$FANOUT" "$ADMIN2" "$(printf '[routes.fanout]\nqueue = %s' "$QUEUE")" >"$WORK/fanout.toml"
config "$FANOUT_OLD" "$ADMIN3" "$(printf '[routes.fanout]\nqueue = %s' "$QUEUE")" >"$WORK/fanout-old.toml"

"$LT" backend --mode echo --start-after "$START_AFTER" --listen "127.0.0.1:$BACKEND" 2>"$WORK/backend.log" &
pids+=($!)
RUST_LOG=warn TOKIO_WORKER_THREADS=1 "$PC" run --config "$WORK/per-client.toml" 2>"$WORK/per-client.log" &
P1=$!
pids+=($P1)
RUST_LOG=warn TOKIO_WORKER_THREADS=1 "$PC" run --config "$WORK/fanout.toml" 2>"$WORK/fanout.log" &
P2=$!
pids+=($P2)
P3=
if [ -n "$OLD" ]; then
    RUST_LOG=warn TOKIO_WORKER_THREADS=1 "$OLD" run --config "$WORK/fanout-old.toml" 2>"$WORK/fanout-old.log" &
    P3=$!
    pids+=($P3)
fi
wait_port "$BACKEND" "$PER_CLIENT" "$FANOUT" ${OLD:+"$FANOUT_OLD"}
Q="watchers=50&events=$EVENTS&rate=$RATE&size=$SIZE"
echo "## dashboards, fan-out against one backend connection per client (REPEAT=$REPEAT EVENTS=$EVENTS RATE=$RATE SIZE=$SIZE QUEUE=$QUEUE STALL=$STALL START_AFTER=$START_AFTER TARGETS=${TARGETS:-all})" | tee "$OUT/fanout.txt"
P="/agents/agent-{conn / 50}/broadcast?$Q"
TARGETS=${TARGETS:-direct per-client fanout $([ "$STALL" -gt 0 ] && echo fanout-stalled) ${OLD:+fanout-old}}
targets=(--pid-of "per-client=$P1" --pid-of "fanout=$P2" --pid-of "fanout-stalled=$P2" --stall-of "fanout-stalled=$STALL")
[ -n "$P3" ] && targets+=(--pid-of "fanout-old=$P3")
for t in $TARGETS; do
    case $t in
    direct) targets+=("direct=ws://127.0.0.1:$BACKEND$P") ;;
    per-client) targets+=("per-client=ws://127.0.0.1:$PER_CLIENT$P") ;;
    fanout | fanout-stalled) targets+=("$t=ws://127.0.0.1:$FANOUT$P") ;;
    fanout-old) targets+=("fanout-old=ws://127.0.0.1:$FANOUT_OLD$P") ;;
    *) echo "unknown target $t" >&2; exit 64 ;;
    esac
done
timeout 3000 "$LT" compare --repeat "$REPEAT" --json "$OUT/fanout.json" \
    --scenario watch -q -c 1000 --watchers 50 --events "$EVENTS" --ramp 2000 --source-addrs 8 -d "$DURATION" \
    "${targets[@]}" 2>"$OUT/fanout.log" | tee -a "$OUT/fanout.txt"
echo "backend connections accepted by the fan-out proxy's route: $(curl -s "http://127.0.0.1:$ADMIN2/metrics" | grep '^portcullis_fanout_streams_total' || true)" | tee -a "$OUT/fanout.txt"
curl -s "http://127.0.0.1:$ADMIN2/metrics" | grep '^portcullis_fanout_drops_total' | tee -a "$OUT/fanout.txt" || true
if [ "$STALL" -gt 0 ]; then
    python3 - "$OUT/fanout.json" <<'PY' | tee -a "$OUT/fanout.txt"
import json, sys
for row in json.load(open(sys.argv[1])):
    for i, run in enumerate(row["runs"]):
        w = run.get("watch") or {}
        if w.get("stalled"):
            print(f"{row['name']} run {i + 1}: {w['stalled']} stalled watchers ended {w['stalled_ends']}; "
                  f"{w['complete']} of {w['watchers']} others got every event in order")
PY
fi
