# blynk-bridge: one image for every stage and emulator; the command picks which.
#   docker build -t blynk-bridge .
#   docker run --rm -v $PWD/bridge.yaml:/etc/blynk-bridge/bridge.yaml:ro blynk-bridge transform
# Stages read their configuration from /etc/blynk-bridge/bridge.yaml unless -c says otherwise.

# --- build: the project's wheel, by the locked build backend (nothing unpinned is fetched) -----
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY requirements/build.lock requirements/
RUN pip install --require-hashes -r requirements/build.lock
COPY pyproject.toml README.md LICENSE ./
COPY pipeline/ pipeline/
COPY workers/ workers/
COPY emulators/ emulators/
COPY blynk_bridge/ blynk_bridge/
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# --- run: the locked dependencies (hash-checked; requirements/runtime.lock holds the wheels of
# every platform, so amd64 and arm64 both build without a compiler), then the project itself --
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
COPY requirements/runtime.lock /tmp/runtime.lock
RUN pip install --require-hashes -r /tmp/runtime.lock && rm /tmp/runtime.lock
COPY --from=build /wheels /wheels
RUN pip install --no-deps /wheels/*.whl \
 && rm -rf /wheels \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin bridge \
 && mkdir -p /etc/blynk-bridge
USER 10001:10001
WORKDIR /tmp
# ingest-http (webhooks, /healthz, /readyz); 9100 is the conventional metrics port
# (metrics.port in the configuration) of the other stages.
EXPOSE 8080 9100
# The stages drain on SIGTERM (stop reading, finish and ack in-flight work) within --grace
# seconds (20 by default): give the container longer than that (compose: stop_grace_period).
STOPSIGNAL SIGTERM
# No HEALTHCHECK here: what "healthy" means depends on the stage. Probe ingest-http's
# /healthz, or any stage's metrics endpoint when metrics.port is set; docker-compose.yml
# and deploy/k8s-example.yaml show both. `python -c` is enough (no curl in the image):
#   python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9100/metrics')"
ENTRYPOINT ["blynk-bridge"]
CMD ["run", "-c", "/etc/blynk-bridge/bridge.yaml"]
