#!/usr/bin/env bash
# Observers, old against new: the same owners and the same observers on two Portcullis
# processes at once, against one echo backend, so the machine's noise falls on both alike.
# Each round starts both proxies afresh; OWNERS sessions per proxy carry RATE messages/s in all
# (the `rate` scenario, 64 B), and OBSERVERS observers per session watch them (`?observe=<id>`,
# a token with the observe scope; the `idle` scenario reads and drops what they get). Over the
# middle of the run, each proxy's CPU time is read from /proc: CPU per owner message (which
# includes handing each message's output to every observer), and how many observers were still
# watching at the end (a dropped one would show here).
#
#     loadtest/peers/observers.sh OLD_PORTCULLIS NEW_PORTCULLIS LOADTEST
#
# Knobs: OWNERS (10), OBSERVERS (4, per owner), RATE (5000), DURATION (20s), REPEAT (3).
# Loopback only; every process it starts is stopped on exit.
set -euo pipefail
OLD=$1 NEW=$2 LT=$3
OWNERS=${OWNERS:-10} OBSERVERS=${OBSERVERS:-4} RATE=${RATE:-5000} DURATION=${DURATION:-20s} REPEAT=${REPEAT:-3}
SECS=${DURATION%s}
. "$(dirname "$0")/common.sh"
peers_setup
export PCLT_SECRET=observers-benchmark-secret-of-at-least-32-bytes
printf '%s' "$PCLT_SECRET" >"$WORK/secret"
"$LT" backend --mode echo --listen 127.0.0.1:19351 2>"$WORK/backend.log" &
pids+=($!)
config() { # port admin
    cat <<CONF
[server]
$LIMITS_OFF
[[listeners]]
addresses = ["127.0.0.1:$1"]
[admin]
address = "127.0.0.1:$2"
[session]
ping_interval = "0s"
idle_timeout = "1h"
[[auth.keys]]
algorithms = ["HS256"]
secret_file = "$WORK/secret"
[[routes]]
name = "terminal"
path = "/agents/{agent}/terminal"
backends = ["127.0.0.1:19351"]
[routes.auth]
agent_claim = "agents"
required_claims = ["sub"]
[routes.observe]
scope = "observe:{agent}"
max_observers = 16
queue = 4096
CONF
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
port_of() { [ "$1" = old ] && echo 19352 || echo 19353; }
admin_of() { [ "$1" = old ] && echo 19362 || echo 19363; }
# Waits up to 10 s for the proxy whose admin port is $1 to hold $2 sessions; prints the least id.
first_session() {
    for _ in $(seq 1 100); do
        curl -s "http://127.0.0.1:$1/sessions" | python3 -c 'import json,sys
s = [x["id"] for x in json.load(sys.stdin)["sessions"]]
if len(s) < int(sys.argv[1]): sys.exit(1)
print(min(s))' "$2" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "the proxy with admin port $1 did not hold $2 sessions" >&2
    return 1
}
TICK=$(getconf CLK_TCK)
token=(--jwt-secret-env PCLT_SECRET --alg HS256)
echo "## observers: $OWNERS owners x $OBSERVERS observers per proxy, $RATE msg/s of 64 B, $DURATION, $REPEAT rounds (both proxies at once)"
printf '%-6s %-5s %12s %12s %10s\n' round proxy "cpu ms/s" "µs/msg" watching
for round in $(seq 1 "$REPEAT"); do
    procs=()
    declare -A PID
    for name in old new; do
        bin=$([ $name = old ] && echo "$OLD" || echo "$NEW")
        config "$(port_of $name)" "$(admin_of $name)" >"$WORK/$name.toml"
        RUST_LOG=warn TOKIO_WORKER_THREADS=1 "$bin" run --config "$WORK/$name.toml" >"$WORK/$name.log" 2>&1 &
        PID[$name]=$!
        pids+=($!)
        procs+=($!)
    done
    wait_port 19351 "$(port_of old)" "$(port_of new)"
    for name in old new; do
        port=$(port_of $name)
        "$LT" rate -q -c "$OWNERS" --rate "$RATE" --size 64 -d "$((SECS + 4))s" "${token[@]}" --claim sub=owner \
            --claim 'agents=["a1"]' --target "ws://127.0.0.1:$port/agents/a1/terminal" >"$WORK/owners-$name.txt" 2>&1 &
        pids+=($!)
        procs+=($!)
    done
    for name in old new; do
        port=$(port_of $name) admin=$(admin_of $name)
        base=$(first_session "$admin" "$OWNERS")
        "$LT" idle -q -c "$((OWNERS * OBSERVERS))" --ramp 1000 -d "$((SECS + 1))s" "${token[@]}" --claim sub=watcher \
            --claim scope=observe:a1 --target "ws://127.0.0.1:$port/agents/a1/terminal?observe={conn % $OWNERS + $base}" \
            >"$WORK/observers-$name.txt" 2>&1 &
        pids+=($!)
        procs+=($!)
    done
    sleep 2
    declare -A T0
    for name in old new; do T0[$name]=$(cpu_ticks "${PID[$name]}"); done
    window=$((SECS - 4))
    sleep "$window"
    for name in old new; do
        t1=$(cpu_ticks "${PID[$name]}")
        ms=$(( (t1 - T0[$name]) * 1000 / TICK ))
        admin=$(admin_of $name)
        watching=$(curl -s "http://127.0.0.1:$admin/metrics" | awk '/^portcullis_observers_active/ {s += $2} END {print s + 0}')
        python3 -c "print(f'{$round:<6} {\"$name\":<5} {$ms / $window:>12.1f} {$ms * 1000 / ($window * $RATE):>12.2f} {$watching:>10}')"
    done
    for p in "${procs[@]}"; do kill "$p" 2>/dev/null || true; done
    wait "${procs[@]}" 2>/dev/null || true
done
