#!/usr/bin/env bash
# CPU per new plain session with N workers, as one process or as N: TARGET=threads runs one
# Portcullis with N thread-per-core workers (`worker_model = "thread_per_core"`), TARGET=processes
# runs N single-worker processes sharing the port (`reuse_port`, as NGINX's worker processes do).
# The `storm` load (8 workers, new sessions as fast as they go) runs for 9 s; `perf stat` counts
# the proxies' CPU and context switches over 4 s in the middle, and the admin endpoints'
# `portcullis_connections_total` the sessions in that window. Prints one line: sessions, µs of
# CPU per session, context switches per session.
#
#     TARGET=threads loadtest/peers/workers-vs-processes.sh PORTCULLIS LOADTEST
#     TARGET=processes loadtest/peers/workers-vs-processes.sh PORTCULLIS LOADTEST
#
# Knobs: N (2), TARGET (threads). Needs `perf` (Debian: linux-perf) and curl. Loopback only;
# every process it starts is stopped on exit.
set -euo pipefail
[ $# = 2 ] || { echo "usage: [TARGET=threads|processes] [N=2] $0 PORTCULLIS LOADTEST" >&2; exit 64; }
PC=$1 LT=$2
N=${N:-2} TARGET=${TARGET:-threads}
. "$(dirname "$0")/common.sh"
peers_setup
PORT=19562 BACKEND=19561 ADMIN=19570

config() { # ADMIN_PORT WORKERS MODEL
    cat <<CONF
[server]
$LIMITS_OFF
worker_threads = $2
worker_model = "$3"
[[listeners]]
addresses = ["127.0.0.1:$PORT"]
reuse_port = true
[admin]
address = "127.0.0.1:$1"
$(terminal_route "$BACKEND")
CONF
}

"$LT" backend --mode echo --listen "127.0.0.1:$BACKEND" 2>"$WORK/backend.log" &
pids+=($!)
proxies=() admins=()
case $TARGET in
    threads) counts=(1); config "$ADMIN" "$N" thread_per_core >"$WORK/p0.toml" ;;
    processes) counts=($(seq 1 "$N")); for i in "${!counts[@]}"; do config $((ADMIN + i)) 1 work_stealing >"$WORK/p$i.toml"; done ;;
    *) echo "workers-vs-processes: TARGET is threads or processes" >&2; exit 64 ;;
esac
for i in "${!counts[@]}"; do
    RUST_LOG=warn "$PC" run --config "$WORK/p$i.toml" >"$WORK/p$i.log" 2>&1 &
    pids+=($!) proxies+=($!) admins+=($((ADMIN + i)))
done
for a in "${admins[@]}"; do
    for _ in $(seq 1 100); do curl -sf "127.0.0.1:$a/live" >/dev/null && break; sleep 0.1; done
done
accepted() { # the proxies' connections so far
    local n=0
    for a in "${admins[@]}"; do
        n=$((n + $(curl -s "127.0.0.1:$a/metrics" | awk '/^portcullis_connections_total /{printf "%d", $2}')))
    done
    echo "$n"
}
"$LT" storm -q -c 8 --source-addrs 8 -d 9s --target "ws://127.0.0.1:$PORT/agents/agent-{conn}/terminal" \
    >"$WORK/load.txt" 2>&1 &
load=$!
pids+=($load)
sleep 3
before=$(accepted)
perf stat -e task-clock,context-switches -p "$(IFS=,; echo "${proxies[*]}")" -o "$WORK/stat.txt" -- sleep 4
after=$(accepted)
wait "$load" || true
ms=$(awk '/task-clock/ {gsub(",", "", $1); print $1}' "$WORK/stat.txt")
switches=$(awk '/context-switches/ {gsub(",", "", $1); print $1}' "$WORK/stat.txt")
python3 -c "n = $after - $before; print('$TARGET x$N: %d sessions, %.1f us CPU per session, %.2f context switches per session' % (n, $ms * 1000 / n, $switches / n))"
