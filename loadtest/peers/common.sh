# Sourced by the peer scripts: what each of them needs the same way.
#
#   peers_setup              WORK (a temporary directory) and pids (processes to stop), both
#                            cleaned up on exit: every process in pids killed, WORK removed
#   LIMITS_OFF               the [server] lines that turn the per-client limits off (the load
#                            comes from one address)
#   self_signed DIR          DIR/cert.pem and DIR/key.pem: an ECDSA P-256 certificate for
#                            127.0.0.1, for wss targets the load generator reaches with --insecure

peers_setup() {
    WORK=$(mktemp -d)
    pids=()
    trap peers_cleanup EXIT
}

peers_cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}

LIMITS_OFF='max_connections_per_ip = 0
handshake_rate_per_ip = 0
connection_rate_per_ip = 0
token_check_rate_per_ip = 0'

self_signed() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$1/key.pem" \
        -out "$1/cert.pem" -days 2 -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1 2>/dev/null
}
