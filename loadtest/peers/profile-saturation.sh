#!/usr/bin/env bash
# Where Portcullis's worker goes at saturation: the `echo64` load (50 sessions, 4 messages of
# 64 B in flight each, closed loop) against one Portcullis worker, plain or TLS, and three
# readings of the proxy over the middle of the run: how much of its core it used (from /proc),
# a system-call and context-switch census (`perf stat`), and where its CPU went (`perf record
# -g`, the top symbols by self time, kernel and user).
#
#     loadtest/peers/profile-saturation.sh PORTCULLIS LOADTEST          # TLS=1 for wss
#
# Knobs: TLS (0), DURATION (20s; the readings take the middle 10 s), TOP (25). Needs `perf`
# (Debian: linux-perf). Loopback only; every process it starts is stopped on exit.
set -euo pipefail
PC=$1 LT=$2
TLS=${TLS:-0} DURATION=${DURATION:-20s} TOP=${TOP:-25}
. "$(dirname "$0")/common.sh"
peers_setup
"$LT" backend --mode echo --listen 127.0.0.1:19501 2>"$WORK/backend.log" &
pids+=($!)
scheme=ws tls_lines=""
if [ "$TLS" = 1 ]; then
    scheme=wss
    self_signed "$WORK"
    tls_lines="tls = true"
fi
cat >"$WORK/portcullis.toml" <<CONF
[server]
$LIMITS_OFF
[[listeners]]
addresses = ["127.0.0.1:19502"]
$tls_lines
$([ "$TLS" = 1 ] && printf '[tls]\ncert = "%s"\nkey = "%s"\n' "$WORK/cert.pem" "$WORK/key.pem")
[admin]
address = "127.0.0.1:19503"
$(terminal_route 19501)
CONF
RUST_LOG=warn TOKIO_WORKER_THREADS=1 "$PC" run --config "$WORK/portcullis.toml" >"$WORK/proxy.log" 2>&1 &
PROXY=$!
pids+=($!)
wait_port 19501 19502
"$LT" echo -q -c 50 --window 4 --size 64 -d "$DURATION" --insecure \
    --target "$scheme://127.0.0.1:19502/agents/agent-{conn}/terminal" >"$WORK/load.txt" 2>&1 &
LOAD=$!
pids+=($!)
secs=${DURATION%s}
sleep $(( (secs - 10) / 2 ))
ticks() { awk '{print $14 + $15}' "/proc/$PROXY/stat"; }
TICK=$(getconf CLK_TCK)
t0=$(ticks)
perf stat -e 'syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_writev,syscalls:sys_enter_sched_yield,context-switches' \
    -p "$PROXY" -o "$WORK/stat.txt" -- sleep 5 >/dev/null 2>&1 || true
perf record -F 2000 -g -p "$PROXY" -o "$WORK/perf.data" -- sleep 5 >/dev/null 2>&1 || true
t1=$(ticks)
wait "$LOAD" || true
echo "## saturation profile: echo64 over $scheme, one worker, $DURATION"
grep -E "^messages|^latency" "$WORK/load.txt" || cat "$WORK/load.txt"
python3 -c "print(f'proxy CPU over the 10 s of readings: {($t1 - $t0) / $TICK / 10:.2f} of a core')"
echo "### system calls and switches (5 s)"
grep -E "syscalls|context-switches" "$WORK/stat.txt" | awk '{printf "%14s  %s\n", $1, $2}'
echo "### top $TOP symbols by self time (5 s, perf record -g)"
perf report -i "$WORK/perf.data" --no-children --sort symbol --stdio 2>/dev/null | grep -E '^ +[0-9]' \
    | sed 's/  \+/ /g' | cut -c1-120 | awk -v n="$TOP" 'NR <= n'
