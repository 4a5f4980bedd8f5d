#!/usr/bin/env bash
# Two Portcullis binaries side by side in one run, for a change that must not cost performance:
# the fixed-rate `rate` scenario (CPU per message at a set load) and 64 B closed-loop echo,
# interleaved and repeated by `portcullis-loadtest compare`, one worker thread each (WORKERS), against
# the same echo backend, with a direct (no proxy) target as the floor.
#
#     loadtest/peers/old-vs-new.sh OLD_PORTCULLIS NEW_PORTCULLIS LOADTEST
#
# Knobs (environment): WORKERS (1: each proxy's worker threads), DURATION (5s), REPEAT (3), CONNS (50), RATE (10000), IDLE (1000: sessions
# held by the idle round, for KiB per session; 0 skips it), ROUNDS ("rate echo idle": which
# rounds, in order, of "rate echo storm idle"; storm is new sessions, for CPU per session; "idle" alone measures memory on freshly started processes), OLD_SERVER / NEW_SERVER and
# OLD_SESSION / NEW_SESSION and OLD_LISTENER / NEW_LISTENER (TOML lines added to each one's
# [server], [session] and [[listeners]] tables: the same binary twice with and without a setting), OLD_EXTRA / NEW_EXTRA (TOML appended after the
# route: more tables, such as [fleet]), TLS (0; 1: both proxies serve wss with one self-signed
# certificate, the load generator trusts it with --insecure; the direct floor stays ws), H2_STREAMS
# (0; N with TLS=1: WebSockets over HTTP/2, N sessions per connection, without the direct floor), LT_ARGS (more
# arguments for every `compare`, such as the token flags `--jwt-secret-env VAR --alg HS256 --claim ...`). The per-client limits are on by default and
# sized for an internet-facing edge, which this load from one address would trip: state them
# in both (docs/benchmarks-history.md has the command with every limit off for one and configured, above
# the load, for the other). Loopback only; every process it starts is stopped on exit.
set -euo pipefail
OLD=$1 NEW=$2 LT=$3
ROUNDS=${ROUNDS:-rate echo idle}
DURATION=${DURATION:-5s} REPEAT=${REPEAT:-3} CONNS=${CONNS:-50} RATE=${RATE:-10000} IDLE=${IDLE:-1000}
OLD_SERVER=${OLD_SERVER:-} NEW_SERVER=${NEW_SERVER:-} OLD_SESSION=${OLD_SESSION:-} NEW_SESSION=${NEW_SESSION:-}
OLD_EXTRA=${OLD_EXTRA:-} NEW_EXTRA=${NEW_EXTRA:-} OLD_LISTENER=${OLD_LISTENER:-} NEW_LISTENER=${NEW_LISTENER:-}
TLS=${TLS:-0} H2_STREAMS=${H2_STREAMS:-0} WORKERS=${WORKERS:-1}
# Many streams share one address here: the per-address stream cap (256 by default) is off, as
# the per-address limits are in LIM.
H2_TABLE=
[ "$H2_STREAMS" -gt 0 ] && H2_TABLE=$'[http2]\nmax_streams_per_ip = 0'

read -r -a LT_ARGS <<<"${LT_ARGS:-}"
if [ "$H2_STREAMS" -gt 0 ] && [ "$TLS" != 1 ]; then echo "H2_STREAMS needs TLS=1" >&2; exit 64; fi
. "$(dirname "$0")/common.sh"
peers_setup

"$LT" backend --mode echo --listen 127.0.0.1:19301 2>"$WORK/backend.log" &
pids+=($!)
SCHEME=ws TLS_LISTENER="" TLS_TABLE="" INSECURE=()
if [ "$TLS" = 1 ]; then
    self_signed "$WORK"
    SCHEME=wss TLS_LISTENER="tls = true" INSECURE=(--insecure)
    TLS_TABLE=$(printf '[tls]\ncert = "%s"\nkey = "%s"' "$WORK/cert.pem" "$WORK/key.pem")
fi
start() { # name binary port admin server-lines session-lines extra-tables listener-lines
    cat >"$WORK/$1.toml" <<CONF
$TLS_TABLE
[server]
$5
[[listeners]]
addresses = ["127.0.0.1:$3"]
$TLS_LISTENER
$8
$H2_TABLE
[admin]
address = "127.0.0.1:$4"
[session]
ping_interval = "0s"
idle_timeout = "1h"
$6
[[routes]]
name = "terminal"
path = "/agents/{agent}/terminal"
backends = ["127.0.0.1:19301"]
$7
CONF
    RUST_LOG=warn TOKIO_WORKER_THREADS=$WORKERS "$2" run --config "$WORK/$1.toml" >"$WORK/$1.log" 2>&1 &
    pids+=($!)
    eval "${1}_PID=$!"
}
start old "$OLD" 19302 19312 "$OLD_SERVER" "$OLD_SESSION" "$OLD_EXTRA" "$OLD_LISTENER"
start new "$NEW" 19303 19313 "$NEW_SERVER" "$NEW_SESSION" "$NEW_EXTRA" "$NEW_LISTENER"
wait_port 19301 19302 19303
TARGETS=(direct=ws://127.0.0.1:19301/agents/a1/terminal old=$SCHEME://127.0.0.1:19302/agents/a1/terminal
    new=$SCHEME://127.0.0.1:19303/agents/a1/terminal)
PIDS=(--pid-of "old=$old_PID" --pid-of "new=$new_PID" ${INSECURE[@]+"${INSECURE[@]}"} ${LT_ARGS[@]+"${LT_ARGS[@]}"})
if [ "$H2_STREAMS" -gt 0 ]; then
    TARGETS=("${TARGETS[@]:1}")
    PIDS+=(--h2-streams "$H2_STREAMS")
fi
if [[ " $ROUNDS " == *" rate "* ]]; then
echo "## rate: compare --scenario rate -q -c $CONNS --rate $RATE --size 64 -d $DURATION --repeat $REPEAT"
timeout 600 "$LT" compare --repeat "$REPEAT" "${PIDS[@]}" --scenario rate -q -c "$CONNS" --rate "$RATE" --size 64 \
    -d "$DURATION" "${TARGETS[@]}"
echo
fi
if [[ " $ROUNDS " == *" echo "* ]]; then
echo "## echo64: compare --scenario echo -q -c $CONNS --window 4 --size 64 -d $DURATION --repeat $REPEAT"
timeout 600 "$LT" compare --repeat "$REPEAT" "${PIDS[@]}" --scenario echo -q -c "$CONNS" --window 4 --size 64 \
    -d "$DURATION" "${TARGETS[@]}"
echo
fi
if [[ " $ROUNDS " == *" storm "* ]]; then
echo "## storm: compare --scenario storm -q -c 8 --source-addrs 8 -d $DURATION --repeat $REPEAT"
timeout 600 "$LT" compare --repeat "$REPEAT" "${PIDS[@]}" --scenario storm -q -c 8 --source-addrs 8 \
    -d "$DURATION" "${TARGETS[@]}"
echo
fi
if [ "$IDLE" -gt 0 ] && [[ " $ROUNDS " == *" idle "* ]]; then
    echo "## idle$IDLE: compare --scenario idle -q -c $IDLE --ramp 2000 --source-addrs 8 -d $DURATION --repeat $REPEAT"
    timeout 600 "$LT" compare --repeat "$REPEAT" "${PIDS[@]}" --scenario idle -q -c "$IDLE" --ramp 2000 \
        --source-addrs 8 -d "$DURATION" "${TARGETS[@]}"
fi
