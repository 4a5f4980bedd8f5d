# Sourced by the peer scripts: what each of them needs the same way.
#
#   peers_setup              WORK (a temporary directory) and pids (processes to stop), both
#                            cleaned up on exit: every process in pids killed, WORK removed
#   LIMITS_OFF               the [server] lines that turn the per-client limits off (the load
#                            comes from one address)
#   wait_port PORT...        waits up to 10 s for each 127.0.0.1:PORT to take a connection (1,
#                            naming the port, if one does not)
#   self_signed DIR          DIR/cert.pem and DIR/key.pem: an ECDSA P-256 certificate for
#                            127.0.0.1, for wss targets the load generator reaches with --insecure
#   terminal_route PORT      the [session] table (no pings, no idle cut, no per-session rates)
#                            and the one WebSocket route, /agents/{agent}/terminal, to
#                            127.0.0.1:PORT, as the single-route benchmark configs write them
#   nginx_ws_location        NGINX's WebSocket `location /` to upstream `agents`, as every
#                            NGINX these scripts start proxies a WebSocket
#   nginx_head WORKERS       an nginx.conf up to inside its `http` block: WORKERS worker
#                            processes, the descriptor limits, pid, logs and temporary paths in
#                            WORK (made here), access log off
#   nginx_ws_conf UP LISTEN  a whole nginx.conf with one worker proxying WebSockets from
#                            127.0.0.1:LISTEN to 127.0.0.1:UP, as the profile scripts run NGINX

peers_setup() {
    WORK=$(mktemp -d)
    pids=()
    trap peers_cleanup EXIT
    # An EXIT trap does not run on a signal that kills the shell: exit on it instead.
    trap 'exit 143' TERM
    trap 'exit 130' INT
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

wait_port() {
    local port
    for port in "$@"; do
        for _ in $(seq 1 100); do
            if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then continue 2; fi
            sleep 0.1
        done
        echo "port $port did not open" >&2
        return 1
    done
}

self_signed() {
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$1/key.pem" \
        -out "$1/cert.pem" -days 2 -subj /CN=localhost -addext subjectAltName=IP:127.0.0.1 2>/dev/null
}

terminal_route() {
    cat <<CONF
[session]
ping_interval = "0s"
idle_timeout = "1h"
client_message_rate = 0
client_byte_rate = "0"

[[routes]]
name = "terminal"
path = "/agents/{agent}/terminal"
backends = ["127.0.0.1:$1"]
CONF
}

nginx_ws_location() {
    cat <<'CONF'
        location / {
            proxy_pass http://agents;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_buffering off;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }
CONF
}

nginx_head() {
    mkdir -p "$WORK/nginx-tmp"
    cat <<CONF
worker_processes $1;
worker_rlimit_nofile 20000;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 19900; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx-tmp/body;
    proxy_temp_path $WORK/nginx-tmp/proxy;
    fastcgi_temp_path $WORK/nginx-tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx-tmp/uwsgi;
    scgi_temp_path $WORK/nginx-tmp/scgi;
CONF
}

nginx_ws_conf() {
    cat <<CONF
$(nginx_head 1)
    upstream agents { server 127.0.0.1:$1; }
    server {
        listen 127.0.0.1:$2;
$(nginx_ws_location)
    }
}
CONF
}
