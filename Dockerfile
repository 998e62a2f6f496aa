# postback-bridge: a slim, non-root image. Build: docker build -t postback-bridge .
# Run:   docker run -p 8080:8080 -e POSTBACK_TOKEN=... -v bridge-data:/var/lib/postback-bridge postback-bridge
# Own config: mount it and point BRIDGE_CONFIG at it (-v ./config.yaml:/etc/postback-bridge/config.yaml:ro).
#
# The base image is pinned to a full version (Python 3.11.16, Debian 12 "bookworm", the Debian the
# project is tested on). For a byte-for-byte reproducible build, add its digest:
#   docker buildx imagetools inspect python:3.11.16-slim-bookworm   # -> FROM python:...@sha256:...
# The runtime dependencies come from requirements.lock (every version pinned, every file hashed:
# pip refuses anything else); after changing them in pyproject.toml, regenerate it with
#   pip-compile --generate-hashes --strip-extras --allow-unsafe --no-emit-index-url \
#       --output-file requirements.lock pyproject.toml
# (tests/test_deploy.py fails while pyproject.toml and the lock disagree). .dockerignore keeps
# .venv, bridge.db* (texters' numbers and messages), .git and the tests out of the build context.

FROM python:3.11.16-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY requirements.lock ./
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY bridge ./bridge
# the project itself only: its dependencies are the locked ones above (pip check says they suffice)
RUN /opt/venv/bin/pip install . --no-deps && /opt/venv/bin/pip check

FROM python:3.11.16-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /var/lib/postback-bridge --create-home bridge
COPY --from=build /opt/venv /opt/venv
COPY deploy/container-config.yaml /etc/postback-bridge/config.yaml
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BRIDGE_CONFIG=/etc/postback-bridge/config.yaml
USER bridge
WORKDIR /var/lib/postback-bridge
VOLUME ["/var/lib/postback-bridge"]
EXPOSE 8080
# asks the address and port in $BRIDGE_CONFIG's server.listen, so a config that moves the port
# keeps a working healthcheck
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["postback-bridge", "healthcheck", "--path", "/healthz"]
# exec form: the bridge is PID 1 and gets SIGTERM itself (finishes requests, returns leases)
CMD ["postback-bridge", "serve"]
