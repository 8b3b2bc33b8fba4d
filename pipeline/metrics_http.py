"""The metrics port (``metrics.host``/``metrics.port``): what operators and Prometheus read.

* ``GET /metrics`` — every ``bb_`` metric of this process (Prometheus text format);
* ``GET /status`` — integration statuses (with their last errors) and what the process's stages
  add (:class:`Describes`: ingest-http's uplinks backlog), JSON;
* ``GET /healthz`` (the event loop answers), ``GET /readyz`` (Redis answers a PING);
* what the process's stages add (:class:`Serves`): the monitor's status page at ``/``
  (:mod:`pipeline.status_page`), whose one action needs a token.

Reads need no auth: these name replicas, Blynk URLs and last errors, so this port belongs on a
private network (the example binds 127.0.0.1; compose publishes it on the host's loopback;
Kubernetes reaches it in-cluster only). The public webhook port serves ``/healthz`` and
``/readyz`` only.
Served on the process's event loop, so a stuck loop fails the probes too: liveness probes use
``/healthz`` here, never ``/metrics`` (prometheus-client's own server answers from a thread).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Protocol, runtime_checkable

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from pipeline.redact import redact_text
from pipeline.status import StatusBoard
from pipeline.streams import Redis

log = logging.getLogger("blynk_bridge.metrics_http")

_json = msgspec.json.Encoder()


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@runtime_checkable
class Describes(Protocol):
    """A stage that adds sections to ``/status``."""

    def describe(self) -> dict[str, object]: ...


@runtime_checkable
class Serves(Protocol):
    """A stage that serves routes of its own on the metrics port, by ``(method, path)``."""

    def routes(self) -> Mapping[tuple[str, str], Handler]: ...


class MetricsServer:
    """Serves the metrics port until :meth:`close`."""

    def __init__(self, redis: Redis, board: StatusBoard, stages: Iterable[object] = ()) -> None:
        self._redis = redis
        self._board = board
        self._describers = [s for s in stages if isinstance(s, Describes)]
        self._routes: dict[str, Callable[[], Awaitable[web.Response]]] = {
            "/metrics": self.metrics, "/status": self.status, "/healthz": self.healthz,
            "/readyz": self.readyz,
        }
        self._extra: dict[tuple[str, str], Handler] = {}
        for stage in stages:
            if isinstance(stage, Serves):
                self._extra.update(stage.routes())
        self._runner: web.ServerRunner | None = None

    async def start(self, host: str, port: int) -> str:
        """Listen on ``host:port`` (0: an unused port); returns the base URL."""
        self._runner = web.ServerRunner(web.Server(self._handle, access_log=None))
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound = self._runner.addresses[0]
        log.info("metrics port on %s:%d (/metrics, /status, /healthz, /readyz%s)", host, bound[1],
                 ", / status page" if ("GET", "/") in self._extra else "")
        return f"http://{host}:{bound[1]}"

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        method = "GET" if request.method == "HEAD" else request.method
        extra = self._extra.get((method, request.path))
        if extra is not None:
            return await extra(request)
        route = self._routes.get(request.path)
        allowed = sorted({m for m, p in self._extra if p == request.path}
                         | ({"GET"} if route is not None else set()))
        if not allowed:
            return web.json_response({"error": "not found"}, status=404)
        if route is None or method != "GET":
            allow = ", ".join(allowed + (["HEAD"] if "GET" in allowed else []))
            return web.json_response({"error": "method not allowed"}, status=405,
                                     headers={"Allow": allow})
        return await route()

    async def metrics(self) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(self) -> web.Response:
        try:
            integrations = await self._board.all()
        except RedisError as exc:
            return web.json_response({"error": f"redis: {redact_text(str(exc))[:200]}"},
                                     status=503)
        body: dict[str, object] = {"integrations": integrations}
        for stage in self._describers:
            body.update(stage.describe())
        return web.Response(body=_json.encode(body), content_type="application/json")

    async def healthz(self) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(self) -> web.Response:
        try:
            await asyncio.wait_for(self._redis.ping(), timeout=1.0)
        except (RedisError, TimeoutError, OSError) as exc:
            return web.json_response({"ready": False, "redis": redact_text(str(exc))[:200]},
                                     status=503)
        return web.json_response({"ready": True, "redis": "ok"})
