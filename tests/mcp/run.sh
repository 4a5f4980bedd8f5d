#!/usr/bin/env bash
# The official MCP SDK (PyPI `mcp`) through two Portcullis instances: tests/mcp/sdk.py says what
# it checks. Installs the SDK into a virtualenv under target/mcp-sdk on first use (pinned; change
# MCP_SDK to try another release), builds target/debug/portcullis when missing, and exits
# non-zero when a check fails. Loopback only; every process it starts is stopped on exit.
#
#     tests/mcp/run.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
MCP_SDK=${MCP_SDK:-mcp==2.3.0}
VENV=$ROOT/target/mcp-sdk
PC=${PORTCULLIS_BIN:-$ROOT/target/debug/portcullis}
[ -x "$PC" ] || (cd "$ROOT" && cargo build --quiet --bin portcullis -p portcullis)
command -v openssl >/dev/null || { echo "mcp: openssl is required (apt-get install openssl)" >&2; exit 1; }
if [ ! -f "$VENV/.installed-$MCP_SDK" ]; then
    echo "mcp: installing $MCP_SDK into $VENV"
    rm -rf "$VENV"
    if ! python3 -m venv "$VENV" 2>/dev/null; then
        rm -rf "$VENV"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv "$VENV"
    fi
    "$VENV/bin/pip" install -q "$MCP_SDK" uvicorn pyjwt
    touch "$VENV/.installed-$MCP_SDK"
fi
"$VENV/bin/python" -c "import importlib.metadata as m; print('mcp: SDK', m.version('mcp'))"
cd "$ROOT"
PORTCULLIS_BIN=$PC exec "$VENV/bin/python" "$ROOT/tests/mcp/sdk.py"
