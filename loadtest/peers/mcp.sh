#!/usr/bin/env bash
# MCP `tools/call` through Portcullis against direct, in one run: the same load-test MCP server
# (`portcullis-loadtest backend`, its MCP endpoint: sessions issued at `initialize`, every call
# checked for its session) is called directly and through a `kind = "mcp"` route with everything
# an MCP edge does on: the JWT checked (HS256), the body read and parsed, Mcp headers compared,
# the tool authorized from the token's scopes (`tool_scope`), the session pinned by its sealed
# envelope (`[routes.affinity]`: opened on every request), the metrics per method and tool.
# Rounds alternate direct, through a plain `kind = "http"` route (the token checked, the body
# not read: what any HTTP proxy does) and through the MCP route; each reports calls/s, latency,
# and the CPU per call of the proxy (and of the server, for scale).
#
#     loadtest/peers/mcp.sh PORTCULLIS LOADTEST
#
# Knobs: CONNS (32 sessions, one call in flight each), SIZE (512 B calls), DURATION (10s),
# REPEAT (3). The proxy runs one worker thread (TOKIO_WORKER_THREADS=1), as in the other peer
# runs. Loopback only; every process it starts is stopped on exit.
set -euo pipefail
PC=$1 LT=$2
CONNS=${CONNS:-32} SIZE=${SIZE:-512} DURATION=${DURATION:-10s} REPEAT=${REPEAT:-3}
. "$(dirname "$0")/common.sh"
peers_setup
export PCLT_SECRET=mcp-benchmark-secret-of-at-least-32-bytes-long
printf '%s' "$PCLT_SECRET" >"$WORK/secret"
head -c 32 /dev/urandom | base64 >"$WORK/envelope.keys"
"$LT" backend --mode echo --listen 127.0.0.1:19381 2>"$WORK/backend.log" &
BACKEND=$!
pids+=($!)
cat >"$WORK/portcullis.toml" <<CONF
[server]
$LIMITS_OFF
[[listeners]]
addresses = ["127.0.0.1:19382"]
[admin]
address = "127.0.0.1:19383"
[fleet]
state_dir = "$WORK/state"
[[auth.keys]]
algorithms = ["HS256"]
secret_file = "$WORK/secret"
[[routes]]
name = "mcp"
path = "/agents/{agent}/mcp"
kind = "mcp"
backends = ["127.0.0.1:19381"]
[routes.auth]
agent_claim = "agents"
required_claims = ["sub"]
[routes.mcp]
tool_scope = "mcp:{agent}:tools/call:{tool}"
metric_tools = ["echo"]
[routes.affinity]
keys_file = "$WORK/envelope.keys"
# The same requests as plain HTTP (kind = "http", the token checked, nothing read of the body):
# what the MCP stage and the envelope add.
[[routes]]
name = "plain"
path = "/plain/agents/{agent}/mcp"
kind = "http"
backends = ["127.0.0.1:19381"]
[routes.auth]
agent_claim = "agents"
required_claims = ["sub"]
CONF
RUST_LOG=warn TOKIO_WORKER_THREADS=1 "$PC" run --config "$WORK/portcullis.toml" >"$WORK/proxy.log" 2>&1 &
PROXY=$!
pids+=($!)
wait_port 19381 19382
token=(--jwt-secret-env PCLT_SECRET --alg HS256 --claim sub=agent-user-{conn} --claim 'agents=["a1"]'
    --claim 'scope=mcp:a1:tools/call:echo')
echo "## MCP tools/call: $CONNS sessions, one call of $SIZE B in flight each, $DURATION, $REPEAT rounds"
printf '%-6s %-7s %10s %9s %9s %14s %14s\n' round via "calls/s" p50 p99 "proxy µs/call" "server µs/call"
for round in $(seq 1 "$REPEAT"); do
    for via in direct http mcp; do
        case $via in
            direct) target=http://127.0.0.1:19381/agents/a1/mcp pid=$BACKEND ;;
            http) target=http://127.0.0.1:19382/plain/agents/a1/mcp pid=$PROXY ;;
            mcp) target=http://127.0.0.1:19382/agents/a1/mcp pid=$PROXY ;;
        esac
        "$LT" mcp -q -c "$CONNS" --size "$SIZE" -d "$DURATION" "${token[@]}" --target "$target" --pid "$pid" \
            --json "$WORK/$via-$round.json" >"$WORK/$via-$round.txt" 2>&1 || { cat "$WORK/$via-$round.txt"; exit 1; }
        # The server's CPU in the same run, for scale (direct: the target itself).
        python3 - "$WORK/$via-$round.json" "$round" "$via" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
bad = r["integrity"]["lost"] + r["integrity"]["corrupted"] + sum(c for c, _ in r["errors"].values())
assert bad == 0, f"errors or corrupted answers: {r['errors']} {r['integrity']}"
per = r["process"]["cpu_us_per_msg"]
proxy = f"{per:.1f}" if sys.argv[3] != "direct" else "-"
server = f"{per:.1f}" if sys.argv[3] == "direct" else "-"
lat = r["latency_us"]
print(f"{sys.argv[2]:<6} {sys.argv[3]:<7} {r['msgs_per_s']:>10.0f} {lat['p50']:>7}µs {lat['p99']:>7}µs {proxy:>14} {server:>14}")
PY
    done
done
