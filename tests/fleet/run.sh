#!/usr/bin/env bash
# The fleet on a real Redis: installs redis-server when it is missing (the Debian package), then
# runs the e2e tests that start their own redis-server and several Portcullis processes
# (tests/e2e/fleet.rs, modules `redis` and `directory`): a revoke on one instance closing sessions on all, a
# restart that still refuses, an instance cut off from the store catching up (and `strict`
# refusing meanwhile), locks in force for an instance that starts later, a Redis restart; the
# session directory (every instance listing the fleet, a SIGKILLed instance leaving it within
# the TTL), a session on another instance revoked and a route rebalanced through the store, and
# a subject cap held across three instances (and held exactly against handshakes raced on all
# three with `subject_caps = "reserved"`).
#
#   tests/fleet/run.sh            # from the repository root; .ci/run calls it
set -euo pipefail
cd "$(dirname "$0")/../.."

if ! command -v redis-server >/dev/null; then
    echo "fleet: installing redis-server"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
redis-server --version

cargo test --test e2e -- --ignored fleet:: --test-threads=2
