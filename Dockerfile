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
# With nothing mounted, the image starts: its default configuration (config/container.toml at
# /etc/portcullis/portcullis.toml) listens on 8080 (plain), routes nothing (404 to everything)
# and needs no file, so the container is healthy and says what to do next. The annotated
# reference (config/portcullis.toml) ships at /etc/portcullis/reference.toml: start your own
# from it, mount it over /etc/portcullis/portcullis.toml with your certificates and keys, and
# check it first: `docker run --rm -v ... portcullis check-config /etc/portcullis/portcullis.toml`
# (every certificate and key it names too; `--syntax-only`: the file alone).

# ---- build ---------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS build
# llvm-profdata, for the profile-guided build below: a layer of its own, kept across source changes.
RUN rustup component add llvm-tools
WORKDIR /src
# The whole workspace (see .dockerignore): the manifest names workspace members and benches,
# so they must be present even though only the proxy binary is built.
COPY . .
# A profile-guided build (loadtest/pgo-build.sh: an instrumented build serves the bundled load
# generator's training load on loopback, then the release build uses that profile; about three
# times a release build's time, for less CPU per message and per new session: BENCHMARKS.md,
# "A profile-guided build"). `--build-arg PGO=0`: a plain `cargo build --release` (for a
# cross-architecture build under emulation, say, where the training would run emulated).
# Cache mounts keep the registry and build artifacts between builds; the binary is copied out
# of the cached target directory in the same step.
ARG PGO=1
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    if [ "$PGO" = 1 ]; then loadtest/pgo-build.sh /out/portcullis; \
    else cargo build --release --locked -p portcullis && install -D -m 0755 target/release/portcullis /out/portcullis; fi \
    && install -d -m 0700 /out/state

# ---- runtime -------------------------------------------------------------------------------
# Distroless: glibc and libgcc (the binary links them; aws-lc is static), CA certificates, no
# shell, no package manager, no curl. The health check is the binary's own `health` command.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/portcullis /usr/local/bin/portcullis
# The local store's state directory ([fleet] state_dir): the revocations that outlive a restart.
COPY --from=build --chown=10001:10001 /out/state /var/lib/portcullis
COPY config/container.toml /etc/portcullis/portcullis.toml
COPY config/portcullis.toml /etc/portcullis/reference.toml
# Numeric, so it needs no passwd entry; the Kubernetes manifests run as the same user.
USER 10001:10001

# 8080: the default configuration's plain listener; 8443: the reference configuration's TLS
# listener (wss://); 9090: admin (/metrics, /live, /ready, /sessions).
# Both configurations bind admin to 127.0.0.1:9090, which is enough for the HEALTHCHECK below
# (it runs inside the container). For Kubernetes probes (livenessProbe on /live, readinessProbe
# on /ready) set `[admin] address = "0.0.0.0:9090"` in your config, with `admin.token_file`
# for the session API, and keep the port off the public network.
EXPOSE 8080 8443 9090

# /live answers 200 while the process runs. /ready turns 503 during a drain, which is what a
# load balancer should watch; it would mark a draining container unhealthy here, so not used.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/portcullis", "health", "--url", "http://127.0.0.1:9090/live", "--timeout-ms", "2000"]

# `docker stop` sends SIGTERM: sessions are closed with 1001 over drain_spread and the process
# exits by drain_timeout (keep it below the stop timeout, `docker stop -t`, default 10s).
ENTRYPOINT ["/usr/local/bin/portcullis"]
CMD ["run", "--config", "/etc/portcullis/portcullis.toml"]
