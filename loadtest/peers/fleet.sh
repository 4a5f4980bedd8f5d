#!/usr/bin/env bash
# The fleet on one redis-server: how fast a revocation made on one instance closes the matching
# sessions on the others, with SESSIONS live sessions spread over INSTANCES Portcullis processes,
# and what the directory costs Redis at rest.
#
#     loadtest/peers/fleet.sh PORTCULLIS LOADTEST
#
# Each instance holds SESSIONS/INSTANCES idle sessions (the `idle` scenario) whose tokens name
# one of SUBJECTS subjects. After the ramp, Redis's command count over QUIET seconds gives the
# directory's and the readers' operations per second at rest. Then REVOKES subjects are revoked
# one by one, GAP apart, each on the next instance in turn: every instance logs when it applied a
# lock made on another ("fleet lock applied", latency_ms from the lock's creation to the cut of
# its sessions, whose 1008 is queued then), and the script reports their p50, p99 and max, and
# the revoke calls' own duration (the local cut plus the write to Redis).
#
# Knobs: SESSIONS (10000), INSTANCES (3), SUBJECTS (100), REVOKES (60), GAP (0.2), QUIET (20).
# Needs redis-server (tests/fleet/run.sh installs it). Loopback only; every process it starts is
# stopped on exit.
set -euo pipefail
PC=$1 LT=$2
SESSIONS=${SESSIONS:-10000} INSTANCES=${INSTANCES:-3} SUBJECTS=${SUBJECTS:-100} REVOKES=${REVOKES:-60}
GAP=${GAP:-0.2} QUIET=${QUIET:-20}
WORK=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
export PCLT_SECRET=fleet-benchmark-secret-of-at-least-32-bytes-long
printf '%s' "$PCLT_SECRET" >"$WORK/secret"
REDIS_PORT=19390
redis-server --port $REDIS_PORT --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" >"$WORK/redis.log" 2>&1 &
pids+=($!)
"$LT" backend --mode echo --listen 127.0.0.1:19391 2>"$WORK/backend.log" &
pids+=($!)
sleep 0.5
per=$((SESSIONS / INSTANCES))
for i in $(seq 1 "$INSTANCES"); do
    cat >"$WORK/edge-$i.toml" <<CONF
[server]
max_connections_per_ip = 0
connection_rate_per_ip = 0
handshake_rate_per_ip = 0
token_check_rate_per_ip = 0
max_connections = 20000
[[listeners]]
addresses = ["127.0.0.1:$((19400 + i))"]
[admin]
address = "127.0.0.1:$((19410 + i))"
[session]
ping_interval = "0s"
idle_timeout = "1h"
[[auth.keys]]
algorithms = ["HS256"]
secret_file = "$WORK/secret"
[[routes]]
name = "terminal"
path = "/agents/{agent}/terminal"
backends = ["127.0.0.1:19391"]
[routes.auth]
agent_claim = "agents"
[fleet]
store = "redis"
redis_url = "redis://127.0.0.1:$REDIS_PORT"
instance = "edge-$i"
CONF
    RUST_LOG=portcullis=info TOKIO_WORKER_THREADS=1 "$PC" run --config "$WORK/edge-$i.toml" >"$WORK/edge-$i.log" 2>&1 &
    pids+=($!)
done
sleep 1
hold=$((QUIET + REVOKES + 60))
for i in $(seq 1 "$INSTANCES"); do
    "$LT" idle -q -c "$per" --ramp 1500 --source-addrs 8 -d "${hold}s" --jwt-secret-env PCLT_SECRET --alg HS256 \
        --claim "sub=user-{conn % $SUBJECTS}" --claim 'agents=["a1"]' \
        --target "ws://127.0.0.1:$((19400 + i))/agents/a1/terminal" >"$WORK/idle-$i.txt" 2>&1 &
    pids+=($!)
done
active() {
    local total=0 n
    for i in $(seq 1 "$INSTANCES"); do
        n=$(curl -s "http://127.0.0.1:$((19410 + i))/metrics" | awk '$1 == "portcullis_sessions_active" {print int($2)}')
        total=$((total + ${n:-0}))
    done
    echo $total
}
for _ in $(seq 1 120); do
    [ "$(active)" -ge $((per * INSTANCES)) ] && break
    sleep 1
done
held=$(active)
dir=$(curl -s "http://127.0.0.1:19411/sessions?scope=fleet" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["sessions"]))')
calls() { redis-cli -p $REDIS_PORT info commandstats | awk -F'[=,:]' '/^cmdstat_/ {s += $3} END {print s}'; }
c0=$(calls)
sleep "$QUIET"
c1=$(calls)
echo "## fleet: $INSTANCES instances, $held sessions held ($dir in edge-1's fleet-wide /sessions), $SUBJECTS subjects"
echo "directory and readers at rest: $(( (c1 - c0) / QUIET )) Redis commands/s over ${QUIET}s"
: >"$WORK/calls.txt"
for k in $(seq 0 $((REVOKES - 1))); do
    i=$((k % INSTANCES + 1))
    curl -s -o /dev/null -w '%{time_total}\n' -X POST -H 'Content-Type: application/json' \
        -d "{\"subject\":\"user-$k\"}" "http://127.0.0.1:$((19410 + i))/sessions/revoke" >>"$WORK/calls.txt"
    sleep "$GAP"
done
sleep 2
cat "$WORK"/edge-*.log | grep -o 'fleet lock applied.*' | grep -o 'latency_ms=[0-9]*' | cut -d= -f2 >"$WORK/lat.txt" || true
python3 - "$WORK/lat.txt" "$WORK/calls.txt" "$REVOKES" "$INSTANCES" "$held" "$(active)" <<'PY'
import sys
lat = sorted(int(l) for l in open(sys.argv[1]) if l.strip())
calls = sorted(float(l) * 1000 for l in open(sys.argv[2]) if l.strip())
revokes, instances, held, left = map(int, sys.argv[3:7])
def q(v, p):
    return v[min(len(v) - 1, int(round(p * (len(v) - 1))))] if v else float("nan")
print(f"locks applied on another instance: {len(lat)} of {revokes * (instances - 1)} expected")
print(f"lock creation to sessions cut elsewhere: p50 {q(lat, .5)} ms, p99 {q(lat, .99)} ms, max {lat[-1] if lat else 'n/a'} ms")
print(f"revoke call (local cut + write to Redis): p50 {q(calls, .5):.1f} ms, p99 {q(calls, .99):.1f} ms")
print(f"sessions: {held} held before, {left} left after revoking {revokes} of the subjects")
PY
