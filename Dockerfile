# deid-router node image: `docker build -t deid-router .`
# Runs as an unprivileged user; the holding area, quarantine, SQLite queue (if used) and the
# HMAC secret live in the volume /var/lib/deid-router. Mount your config at
# /etc/deid-router/router.toml (the built-in one writes to a folder destination in the volume).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package needs: keeps the layer cache valid when tests or docs change.
WORKDIR /build
COPY pyproject.toml README.md ./
COPY deid_router ./deid_router
COPY migrations ./migrations
RUN pip install ".[codecs]" \
    && rm -rf /build

# curl for the health check (GET /readyz on the node's HTTP port, loopback)
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 deid \
    && useradd --system --uid 10001 --gid deid --home-dir /var/lib/deid-router --shell /usr/sbin/nologin deid \
    && mkdir -p /var/lib/deid-router /etc/deid-router \
    && chown deid:deid /var/lib/deid-router \
    && chmod 0750 /var/lib/deid-router
COPY config/examples/docker.toml /etc/deid-router/router.toml

USER deid
WORKDIR /var/lib/deid-router
VOLUME ["/var/lib/deid-router"]
EXPOSE 11112

# SIGTERM: the router stops accepting, finishes or releases in-flight jobs and exits within 30 s.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8080/readyz"]

ENTRYPOINT ["deid-router"]
CMD ["serve", "--config", "/etc/deid-router/router.toml"]
