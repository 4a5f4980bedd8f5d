#!/usr/bin/env bash
# 100,000 concurrent idle sessions on one machine whose processes may hold 20,000 descriptors
# each: PROXIES Portcullis processes on one port (`reuse_port = true`, the kernel spreads new
# connections over them), BACKENDS echo backends behind them, and the harness's `idle` scenario
# split over LOADGENS worker processes (`--procs`) and SOURCES loopback source addresses.
#
#     loadtest/peers/many-processes.sh PORTCULLIS LOADTEST
#
# Knobs (environment): SESSIONS (100000), PROXIES (12), BACKENDS (6), LOADGENS (8), SOURCES (64),
# PROXY_SOURCES (16: the proxies connect to the backends from 127.0.1.1 … 127.0.1.N, `[backend]
# source_addresses`; 0 leaves it to the kernel, which runs out of ports here),
# RAMP (1000 new sessions per second), HOLD (40s: sessions held after the ramp; each proxy process is read SAMPLE_AFTER, 20 s, after the ramp). Prints the harness's report (KiB per session
# over every proxy process, from --pid) and a line per proxy process: sessions it holds, its
# resident memory, and KiB per session. Loopback only; every process it starts is stopped on
# exit.
set -euo pipefail
PC=$1 LT=$2
SESSIONS=${SESSIONS:-100000} PROXIES=${PROXIES:-12} BACKENDS=${BACKENDS:-6} LOADGENS=${LOADGENS:-8}
SOURCES=${SOURCES:-64} PROXY_SOURCES=${PROXY_SOURCES:-16} RAMP=${RAMP:-1000} HOLD=${HOLD:-40s}
PORT=19700 BACKEND_BASE=19740 ADMIN_BASE=19710
WORK=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; if [ -n "${KEEP:-}" ]; then echo "logs: $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"

members=""
for b in $(seq 1 "$BACKENDS"); do
    "$LT" backend --mode echo --listen "127.0.0.1:$((BACKEND_BASE + b))" 2>"$WORK/backend$b.log" &
    pids+=($!)
    members+="\"127.0.0.1:$((BACKEND_BASE + b))\","
done
proxy_pids=()
sources=""
for s in $(seq 1 "$PROXY_SOURCES"); do sources+="\"127.0.1.$s\","; done
for p in $(seq 1 "$PROXIES"); do
    cat >"$WORK/proxy$p.toml" <<CONF
# One address (the load generators) opening every session: the per-client limits are off.
[server]
max_connections_per_ip = 0
connection_rate_per_ip = 0
handshake_rate_per_ip = 0
worker_threads = 1

[[listeners]]
name = "shared"
addresses = ["127.0.0.1:$PORT"]
reuse_port = true

[admin]
address = "127.0.0.1:$((ADMIN_BASE + p))"

[session]
ping_interval = "0s"
idle_timeout = "1h"

[backend]
source_addresses = [${sources%,}]

[[routes]]
name = "terminal"
path = "/agents/{agent}/terminal"
backends = [${members%,}]
[routes.balance]
policy = "round_robin"
CONF
    RUST_LOG=warn "$PC" run --config "$WORK/proxy$p.toml" >"$WORK/proxy$p.log" 2>&1 &
    pids+=($!)
    proxy_pids+=($!)
done
sleep 2
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
declare -A before
for pid in "${proxy_pids[@]}"; do before[$pid]=$(rss_kib "$pid"); done
pid_list=$(IFS=,; echo "${proxy_pids[*]}")
echo "## idle$SESSIONS over $PROXIES processes: idle -c $SESSIONS --ramp $RAMP --procs $LOADGENS --source-addrs $SOURCES -d $HOLD"
# The per-process figures are read while the sessions are held, before the harness closes them.
(
    sleep_s=$(( SESSIONS / RAMP + ${SAMPLE_AFTER:-20} ))
    sleep "$sleep_s"
    total_s=0 total_d=0
    for i in "${!proxy_pids[@]}"; do
        pid=${proxy_pids[$i]}
        s=$(curl -s "http://127.0.0.1:$((ADMIN_BASE + i + 1))/metrics" | awk '/^portcullis_sessions_active / {print $2}')
        r=$(rss_kib "$pid")
        d=$(( r - ${before[$pid]} ))
        total_s=$(( total_s + ${s%.*} )) total_d=$(( total_d + d ))
        awk -v n="$((i + 1))" -v s="$s" -v r="$r" -v d="$d" \
            'BEGIN { printf "proxy %2d: %6d sessions, RSS %7d KiB (+%7d), %.2f KiB/session\n", n, s, r, d, (s > 0 ? d / s : 0) }'
    done
    awk -v s="$total_s" -v d="$total_d" 'BEGIN { printf "all:      %6d sessions, +%d KiB, %.2f KiB/session\n", s, d, d / s }'
) >"$WORK/per-process.txt" &
sampler=$!
timeout 900 "$LT" idle --target "ws://127.0.0.1:$PORT/agents/agent-{conn}/terminal" -q -c "$SESSIONS" --ramp "$RAMP" \
    --procs "$LOADGENS" --source-addrs "$SOURCES" -d "$HOLD" --pid "$pid_list"
wait "$sampler" || true
cat "$WORK/per-process.txt"
