#!/usr/bin/env bash
# Several Portcullis builds side by side in one run (two or more: allocators, build profiles),
# each with one worker thread and every per-client limit off, interleaved and repeated by
# `portcullis-loadtest compare`, with the direct connection as the floor. One proxy serves both
# a WebSocket route (`storm`, `echo`, `rate`: old-vs-new.sh's rows) and a plain HTTP route
# (`http`: http-old-vs-new.sh's POSTs echoed back, the token checked on each).
#
#     loadtest/peers/builds.sh LOADTEST NAME=PORTCULLIS NAME=PORTCULLIS...
#
# Knobs: ROUNDS ("storm echo rate http", in that order), DURATION (5s), REPEAT (3), CONNS (32:
# the http round's connections), SIZE (256: its body). Run it again with the builds in the other
# order: the order within a round moves the figures. Memory per idle session wants a freshly
# started process per build (compare.sh's FRESH_IDLE), which this does not do. Loopback only;
# every process it starts is stopped on exit.
set -euo pipefail
usage() { echo "usage: $0 LOADTEST NAME=PORTCULLIS NAME=PORTCULLIS... ($1)" >&2; exit 64; }
[ $# -ge 3 ] || usage "two builds at least"
LT=$1
shift
declare -A seen=([direct]=1)
for build in "$@"; do
    [[ $build =~ ^[A-Za-z0-9_-]+=.+ ]] || usage "not NAME=PORTCULLIS: $build"
    name=${build%%=*}
    [ -z "${seen[$name]:-}" ] || usage "the name $name is taken"
    seen[$name]=1
    [ -x "${build#*=}" ] || usage "not an executable: ${build#*=}"
done
ROUNDS=${ROUNDS:-storm echo rate http}
for round in $ROUNDS; do
    case $round in storm | echo | rate | http) ;; *) usage "unknown round $round (storm echo rate http)" ;; esac
done
DURATION=${DURATION:-5s} REPEAT=${REPEAT:-3} CONNS=${CONNS:-32} SIZE=${SIZE:-256}
. "$(dirname "$0")/common.sh"
peers_setup
export PCLT_SECRET=builds-benchmark-secret-of-at-least-32-bytes-long
printf '%s' "$PCLT_SECRET" >"$WORK/secret"
"$LT" backend --mode echo --listen 127.0.0.1:19661 2>"$WORK/backend.log" &
pids+=($!)

port=19662
ports=(19661)
pid_of=()
ws=(direct=ws://127.0.0.1:19661/agents/a1/terminal)
http=(direct=http://127.0.0.1:19661/agents/a1/echo)
for build in "$@"; do
    name=${build%%=*} bin=${build#*=}
    cat >"$WORK/$name.toml" <<CONF
[server]
$LIMITS_OFF
[[listeners]]
addresses = ["127.0.0.1:$port"]
[admin]
address = "127.0.0.1:$((port + 30))"
[fleet]
state_dir = "$WORK/state-$name"
[[auth.keys]]
algorithms = ["HS256"]
secret_file = "$WORK/secret"
$(terminal_route 19661)
[[routes]]
name = "api"
path = "/agents/{agent}/{*rest}"
kind = "http"
backends = ["127.0.0.1:19661"]
[routes.auth]
agent_claim = "agents"
CONF
    RUST_LOG=warn TOKIO_WORKER_THREADS=1 "$bin" run --config "$WORK/$name.toml" >"$WORK/$name.log" 2>&1 &
    pids+=($!)
    pid_of+=(--pid-of "$name=$!")
    ws+=("$name=ws://127.0.0.1:$port/agents/a1/terminal")
    http+=("$name=http://127.0.0.1:$port/agents/a1/echo")
    ports+=("$port")
    port=$((port + 1))
done
if ! wait_port "${ports[@]}"; then
    for build in "$@"; do
        echo "== ${build%%=*}:" >&2
        tail -n 5 "$WORK/${build%%=*}.log" >&2 || true
    done
    exit 1
fi
token=(--jwt-secret-env PCLT_SECRET --alg HS256 --claim sub=user-{conn} --claim 'agents=["a1"]')
for round in $ROUNDS; do
    case $round in
    storm) args=(--scenario storm -c 8 --source-addrs 8) targets=("${ws[@]}") ;;
    echo) args=(--scenario echo -c 50 --window 4 --size 64) targets=("${ws[@]}") ;;
    rate) args=(--scenario rate -c 50 --rate 10000 --size 64) targets=("${ws[@]}") ;;
    http) args=(--scenario http -c "$CONNS" --size "$SIZE" "${token[@]}") targets=("${http[@]}") ;;
    esac
    echo "## $round: compare ${args[*]} -d $DURATION --repeat $REPEAT"
    timeout 900 "$LT" compare -q --repeat "$REPEAT" "${pid_of[@]}" "${args[@]}" -d "$DURATION" "${targets[@]}"
    echo
done
