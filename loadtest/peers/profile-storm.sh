#!/usr/bin/env bash
# Where a new plain session's CPU goes, in Portcullis and in NGINX side by side: the `storm` load
# (8 workers connect, upgrade, exchange one 64 B message and close, as fast as they can) against
# each proxy's one worker in turn, and three readings over the middle of each run: the worker's
# CPU per session (from /proc), a system-call census (`perf stat`) and where its CPU went
# (`perf record -g`, top symbols by self time), with the TCP sockets left in TIME-WAIT.
#
#     loadtest/peers/profile-storm.sh PORTCULLIS LOADTEST
#
# Knobs: DURATION (16s, at least 12s; the readings take 8 s in its middle), TOP (30), TARGETS ("portcullis
# nginx"). Needs `perf` (Debian: linux-perf) and nginx. Loopback only; every process it starts is
# stopped on exit.
set -euo pipefail
PC=$1 LT=$2
DURATION=${DURATION:-16s} TOP=${TOP:-30} TARGETS=${TARGETS:-"portcullis nginx"}
secs=${DURATION%s}
[ "$secs" -ge 12 ] || { echo "profile-storm: DURATION must be at least 12s (the readings take 8 s)" >&2; exit 64; }
. "$(dirname "$0")/common.sh"
peers_setup
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
"$LT" backend --mode echo --listen 127.0.0.1:19521 2>"$WORK/backend.log" &
backend=$!
pids+=($!)
cat >"$WORK/portcullis.toml" <<CONF
[server]
$LIMITS_OFF
[[listeners]]
addresses = ["127.0.0.1:19522"]
[admin]
address = "127.0.0.1:19523"
$(terminal_route 19521)
CONF
nginx_ws_conf 19521 19524 >"$WORK/nginx.conf"
TICK=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
tw() { ss -Htan state time-wait | wc -l; }

left=$(wc -w <<<"$TARGETS")
for target in $TARGETS; do
    left=$((left - 1))
    case $target in
        portcullis)
            RUST_LOG=warn TOKIO_WORKER_THREADS=1 "$PC" run --config "$WORK/portcullis.toml" >"$WORK/proxy.log" 2>&1 &
            server=$!
            worker=$server port=19522 ;;
        nginx)
            "$NGINX_BIN" -c "$WORK/nginx.conf" -p "$WORK" 2>"$WORK/nginx.log" &
            server=$!
            port=19524 ;;
    esac
    pids+=("$server")
    wait_port "$port"
    [ "$target" = nginx ] && { sleep 0.3; worker=$(pgrep -P "$server" | head -1); }
    "$LT" storm -q -c 8 --source-addrs 8 -d "$DURATION" \
        --target "ws://127.0.0.1:$port/agents/agent-{conn}/terminal" >"$WORK/$target-load.txt" 2>&1 &
    load=$!
    sleep $(( (secs - 8) / 2 ))
    t0=$(ticks "$worker") tw0=$(tw) l0=$(ticks "$load") b0=$(ticks "$backend")
    nstat -n >/dev/null
    perf stat -e 'syscalls:sys_enter_accept4,syscalls:sys_enter_connect,syscalls:sys_enter_close,syscalls:sys_enter_epoll_ctl,syscalls:sys_enter_shutdown,context-switches' \
        -p "$worker" -o "$WORK/$target-stat.txt" -- sleep 4 >/dev/null 2>&1 || true
    perf record -F 2000 -g -p "$worker" -o "$WORK/$target-perf.data" -- sleep 4 >/dev/null 2>&1 || true
    t1=$(ticks "$worker") tw1=$(tw) l1=$(ticks "$load") b1=$(ticks "$backend")
    nstat TcpOutSegs TcpActiveOpens >"$WORK/$target-nstat.txt"
    wait "$load" || true
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    echo "## $target: storm, one worker, $DURATION"
    grep -E "^sessions|^opened|^messages|^connections" "$WORK/$target-load.txt" || head -5 "$WORK/$target-load.txt"
    python3 -c "print(f'over the 8 s of readings, of a core: worker {($t1 - $t0) / $TICK / 8:.2f}, load generator {($l1 - $l0) / $TICK / 8:.2f}, backend {($b1 - $b0) / $TICK / 8:.2f}; TIME-WAIT sockets: {$tw0} then {$tw1}')"
    awk '/TcpOutSegs|TcpActiveOpens/ {printf "%14s  %s (8 s, the whole host)\n", $2, $1}' "$WORK/$target-nstat.txt"
    echo "### system calls (4 s)"
    grep -E "syscalls|context-switches" "$WORK/$target-stat.txt" | awk '{printf "%14s  %s\n", $1, $2}'
    echo "### top $TOP symbols by self time (4 s, perf record -g)"
    perf report -i "$WORK/$target-perf.data" --no-children --sort symbol --stdio 2>/dev/null | grep -E '^ +[0-9]' \
        | sed 's/  \+/ /g' | cut -c1-120 | head -n "$TOP" || true
    # Let the TIME-WAIT sockets of this run age out before the next target's (60 s on Linux).
    [ "$left" = 0 ] || sleep 62
done
