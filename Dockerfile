# syntax=docker/dockerfile:1
# ProxyPal: multi-stage build, small non-root final image.
#
#   docker build -t proxypal .
#   docker run --rm -p 8080:8080 -e PROXYPAL_KEYS=nvapi-…,nvapi-… \
#     -e PROXYPAL_AUTH__TOKENS=change-me proxypal
#
# The image listens on 0.0.0.0:8080, so the server insists on client tokens
# (auth.tokens / PROXYPAL_AUTH__TOKENS) — see docs/security.md.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# ring needs a C compiler; rust:*-slim has gcc. No other system deps.
# --no-default-features: the production image leaves out the simulated
# upstream behind --dev (the `dev` feature); CI checks that this build links
# no proxypal-nim-sim.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p proxypal-server --no-default-features \
 && cp target/release/proxypal-server /proxypal-server

FROM debian:bookworm-slim
# ca-certificates is not needed (webpki roots are compiled in); curl is for the health check.
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin proxypal \
 && mkdir -p /etc/proxypal /var/lib/proxypal && chown proxypal /etc/proxypal /var/lib/proxypal
COPY --from=build /proxypal-server /usr/local/bin/proxypal-server
COPY config/proxypal.docker.yaml /etc/proxypal/proxypal.yaml
# The quota state store (state.path): mount a volume here so windows, cooldowns
# and disabled keys survive a new container.
VOLUME /var/lib/proxypal
USER proxypal
ENV PROXYPAL_CONFIG=/etc/proxypal/proxypal.yaml
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/health || exit 1
# SIGTERM drains in-flight requests for up to shutdown_grace (30 s by default).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/proxypal-server"]
