#!/usr/bin/env bash
# Where a new plain session's CPU goes, stage by stage: new sessions at one fixed rate (`storm
# --ramp`, open loop, so the proxy is never saturated) against Portcullis's one worker, pinned
# to CPU 1 with the load generator and the backend on CPU 0, and a DWARF call-graph profile of
# the worker over 6 s. Each sample is put in the innermost stage on its stack (the relay, the
# backend's connect, the upgrade handler, hyper, the accept loop, tokio's scheduler, ...) and
# split into user and kernel time; the table gives µs of CPU per session for each. A stage's
# calls into tokio (I/O readiness, timers, registration) are in tokio's row, not the stage's.
#
#     loadtest/peers/profile-stages.sh PORTCULLIS LOADTEST
#     TARGET=nginx loadtest/peers/profile-stages.sh PORTCULLIS LOADTEST   # NGINX's one worker
#
# With TARGET=nginx the same load and profile run against NGINX's one worker; its samples have no
# Portcullis stage, so its table is one row, "other", and the user and kernel totals.
#
# PERF=0 takes no profile: the worker's user and kernel time per session from /proc only (perf
# attached costs a worker that sleeps and wakes often more than one that does not).
#
# Knobs: RATE (2500 sessions/s), FREQ (1000 samples/s), TARGET (portcullis), PERF (1). Needs `perf`
# (Debian: linux-perf), python3 and 2 CPUs, and nginx for TARGET=nginx. Loopback only; every
# process it starts is stopped on exit.
set -euo pipefail
[ $# = 2 ] || { echo "usage: [TARGET=nginx] [PERF=0] $0 PORTCULLIS LOADTEST" >&2; exit 64; }
PC=$1 LT=$2
RATE=${RATE:-2500} FREQ=${FREQ:-1000} TARGET=${TARGET:-portcullis} PERF=${PERF:-1}
. "$(dirname "$0")/common.sh"
peers_setup
taskset -c 0 "$LT" backend --mode echo --listen 127.0.0.1:19531 2>"$WORK/backend.log" &
pids+=($!)
cat >"$WORK/portcullis.toml" <<CONF
[server]
$LIMITS_OFF
worker_threads = 1
[[listeners]]
addresses = ["127.0.0.1:19532"]
[admin]
address = "127.0.0.1:19533"
$(terminal_route 19531)
CONF
nginx_ws_conf 19531 19532 >"$WORK/nginx.conf"
case $TARGET in
    portcullis)
        RUST_LOG=warn taskset -c 1 "$PC" run --config "$WORK/portcullis.toml" >"$WORK/proxy.log" 2>&1 &
        server=$! ;;
    nginx)
        taskset -c 1 "$(command -v nginx || echo /usr/sbin/nginx)" -c "$WORK/nginx.conf" -p "$WORK" 2>"$WORK/nginx.log" &
        server=$! ;;
    *) echo "profile-stages: TARGET is portcullis or nginx" >&2; exit 64 ;;
esac
pids+=($server)
if ! wait_port 19532; then
    echo "profile-stages: $TARGET did not start listening:" >&2
    tail -5 "$WORK"/*.log >&2 || true
    exit 1
fi
# NGINX's master forks the worker that serves.
if [ "$TARGET" = nginx ]; then
    sleep 0.3
    server=$(pgrep -P "$server" | head -1 || true)
    [ -n "$server" ] || { echo "profile-stages: no NGINX worker process" >&2; exit 1; }
fi
taskset -c 0 "$LT" storm -q -c 16 --ramp "$RATE" --source-addrs 8 -d 14s \
    --target "ws://127.0.0.1:19532/agents/agent-{conn}/terminal" >"$WORK/load.txt" 2>&1 &
load=$!
pids+=($load)
sleep 4
TICK=$(getconf CLK_TCK)
read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$server/stat")
if [ "$PERF" = 0 ]; then
    sleep 6
else
    # perf on the load's CPU, not the worker's.
    taskset -c 0 perf record -F "$FREQ" --call-graph dwarf,16384 -p "$server" -o "$WORK/perf.data" -- sleep 6 \
        >"$WORK/perf.log" 2>&1 || { echo "profile-stages: perf record failed:" >&2; tail -5 "$WORK/perf.log" >&2; exit 1; }
fi
read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$server/stat")
wait "$load" || true
grep -E "^sessions" "$WORK/load.txt" || true
# The per-session figures assume the load kept its rate: say so when it did not.
opened=$(awk '/^sessions/ {for (i = 1; i < NF; i++) if ($(i + 1) == "opened") print $i}' "$WORK/load.txt")
[ "${opened:-0}" -ge $((RATE * 14 * 95 / 100)) ] || echo "profile-stages: the load opened ${opened:-no} sessions, short of $RATE a second: the figures per session are too high" >&2
echo "worker CPU over the 6 s: $(( (u1 + s1 - u0 - s0) * 100 / TICK / 6 )) % of a core$([ "$PERF" = 0 ] || echo ' (perf attached)')"
if [ "$PERF" = 0 ]; then
    python3 -c "n = $RATE * 6; print(f'per session, from /proc: user {($u1 - $u0) / $TICK / n * 1e6:.1f} µs, kernel {($s1 - $s0) / $TICK / n * 1e6:.1f} µs')"
    exit 0
fi
perf script -i "$WORK/perf.data" -F ip,sym,dso 2>/dev/null >"$WORK/perf.txt"
python3 - "$WORK/perf.txt" "$RATE" "$FREQ" <<'PY'
import collections, sys
path, rate, freq = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
# Innermost first: a sample belongs to the first of these found walking out from its leaf.
STAGES = [
    ("session teardown", ["drop_in_place<portcullis::proxy::relay::session::Session"]),
    ("relay", ["portcullis::proxy::relay::session::Session<C,B>::"]),
    ("backend connect", ["portcullis::proxy::connect::dial"]),
    ("backend handshake", ["portcullis::proxy::connect::handshake"]),
    ("upgrade handler", ["portcullis::proxy::handle_upgrade", "portcullis::proxy::handle::"]),
    ("hyper (parse, answer, hand-over)", ["hyper::"]),
    ("connection task", ["serve_connection", "portcullis::proxy::accept::connection"]),
    ("accept loop", ["accept_loop"]),
    ("tokio scheduler, timers, I/O driver", ["tokio::runtime"]),
]
samples, cur = [], []
for line in open(path, errors="replace"):
    line = line.strip()
    if not line:
        if cur:
            samples.append(cur)
        cur = []
        continue
    parts = line.split(" ", 1)
    if len(parts) == 2:
        cur.append(parts[1])
if cur:
    samples.append(cur)
user, kernel = collections.Counter(), collections.Counter()
for frames in samples:
    stage = "other"
    for frame in frames:
        hit = next((name for name, pats in STAGES if any(p in frame for p in pats)), None)
        if hit:
            stage = hit
            break
    (kernel if "[kernel" in frames[0] else user)[stage] += 1
# Samples are CPU time at `freq` a second; the load opened `rate` sessions a second for the 6 s.
us = lambda n: n / freq / (rate * 6) * 1e6
print(f"{'stage':38} {'user µs':>8} {'kernel µs':>10}   (per session, {len(samples)} samples)")
for stage in sorted(set(user) | set(kernel), key=lambda s: -(user[s] + kernel[s])):
    print(f"{stage:38} {us(user[stage]):8.1f} {us(kernel[stage]):10.1f}")
print(f"{'all':38} {us(sum(user.values())):8.1f} {us(sum(kernel.values())):10.1f}")
PY
