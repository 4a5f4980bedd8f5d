# syntax=docker/dockerfile:1
#
# Portcullis container image.
#
#   docker build -t portcullis .
#   docker run --rm -p 8443:8443 \
#       -v "$PWD/my-portcullis.toml:/etc/portcullis/portcullis.toml:ro" \
#       -v "$PWD/tls:/etc/portcullis/tls:ro" \
#       portcullis
#
# The image ships config/portcullis.toml (the annotated reference) at
# /etc/portcullis/portcullis.toml as an example; mount your own configuration and certificates
# over it. `docker run --rm portcullis check-config /etc/portcullis/portcullis.toml` checks one.

# ---- build ---------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
WORKDIR /src
# The whole workspace (see .dockerignore): the manifest names workspace members and benches,
# so they must be present even though only the proxy binary is built.
COPY . .
# Cache mounts keep the registry and build artifacts between builds; the binary is copied out
# of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p portcullis \
    && install -D -m 0755 target/release/portcullis /out/portcullis

# ---- runtime -------------------------------------------------------------------------------
# Debian slim rather than scratch or distroless: the binary links glibc and libgcc (aws-lc-rs),
# and the HEALTHCHECK below needs curl.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd -r -u 10001 -d /nonexistent -s /usr/sbin/nologin portcullis
COPY --from=build /out/portcullis /usr/local/bin/portcullis
COPY config/portcullis.toml /etc/portcullis/portcullis.toml
USER 10001

# 8443: client listener (wss://); 9090: admin (/metrics, /live, /ready).
# The reference config binds admin to 127.0.0.1:9090, which is enough for the HEALTHCHECK below
# (it runs inside the container). For Kubernetes probes (livenessProbe on /live, readinessProbe
# on /ready) set `[admin] address = "0.0.0.0:9090"` in your config, and keep the port private:
# the admin listener has no authentication.
EXPOSE 8443 9090

# /live answers 200 while the process runs. /ready turns 503 during a drain, which is what a
# load balancer should watch; it would mark a draining container unhealthy here, so not used.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD curl -fsS http://127.0.0.1:9090/live || exit 1

# `docker stop` sends SIGTERM: sessions are closed with 1001 over drain_spread and the process
# exits by drain_timeout (keep it below the stop timeout, `docker stop -t`, default 10s).
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["run", "--config", "/etc/portcullis/portcullis.toml"]
