# postback-bridge: a slim, non-root image. Build: docker build -t postback-bridge .
# Run:   docker run -p 8080:8080 -e POSTBACK_TOKEN=... -v bridge-data:/var/lib/postback-bridge postback-bridge
# Own config: mount it and point BRIDGE_CONFIG at it (-v ./config.yaml:/etc/postback-bridge/config.yaml:ro).

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN python -m venv /opt/venv && /opt/venv/bin/pip install .

FROM python:3.11-slim
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
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
# exec form: the bridge is PID 1 and gets SIGTERM itself (finishes requests, returns leases)
CMD ["postback-bridge", "serve"]
