"""The monitor's status page, served on the metrics port (:mod:`pipeline.metrics_http`).

* ``GET /`` — the page (``pipeline/static/status.html`` + ``status.js`` + ``status.css``,
  shipped in the package: no CDN, no third-party script; the JS draws its plots as SVG);
* ``GET /status.json`` — what the page shows, refetched by it every few seconds: per-stage
  throughput and end-to-end latency over the last 15 minutes (:mod:`pipeline.stats`, so no
  Prometheus is needed), length/lag/pending of every stream partition and group (the monitor's
  last sample), integration statuses with their last error and since when, Blynk answers by
  status, dead letters by reason with the latest few, unmapped keys per template, replicas alive;
* ``POST /dead/replay`` — replays dead letters (``{"ids": [...]}``, at most
  :data:`MAX_REPLAY_IDS`).

Reads need no auth, like ``/metrics`` on the same port (a private port: it names replicas, URLs
and last errors; every error text is redacted). Every route here answers only requests whose
``Host`` is an IP address, ``localhost``, a name of one label (a compose service) or one of
``monitor.allowed_hosts`` (:func:`host_allowed`; others get 421): against DNS rebinding, where
a web site the operator visits points its own name at this port and reads the page as
same-origin — the browser then sends the site's name as ``Host``. ``/metrics``, ``/status`` and
the probes (:mod:`pipeline.metrics_http`) are not held to it: machines read them under names
the bridge cannot know (docs/DESIGN.md says why).

Every part is bounded (latest :data:`LATEST_DEAD` dead letters, :data:`UNMAPPED_TOP` keys per
template) and the JSON is built at most once per :data:`CACHE_S` whatever the number of open
pages. The replay is an action: it needs
``monitor.admin_token`` as ``Authorization: Bearer <token>`` (compared in constant time; no
token configured = refused, 403). A header, never a cookie, so another site cannot make a
browser send it (CSRF); a request whose ``Origin`` is another site is refused besides.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.resources
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import msgspec
from aiohttp import web
from redis.exceptions import RedisError

from pipeline import metrics, stats
from pipeline.backlog import StreamInfo, as_str, snapshot
from pipeline.deadletters import dead_total as count_dead
from pipeline.deadletters import get_dead, letter_summary, replay, scan_dead
from pipeline.errors import Reason
from pipeline.keys import Keys
from pipeline.metrics_http import Handler
from pipeline.redact import Secret, redact_text
from pipeline.status import StatusBoard
from pipeline.streams import Redis, now_ms

log = logging.getLogger("blynk_bridge.status_page")

LATEST_DEAD = 10
UNMAPPED_TOP = 20
MAX_REPLAY_IDS = 100
MAX_BODY = 16 * 1024
CACHE_S = 1.0
_DEAD_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")
#: A ``Host`` header: a bracketed IPv6 literal (with a zone) or a name / IPv4, and a port.
_HOST = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.-]+)?)\]|(?P<name>[A-Za-z0-9_.-]+))"
                   r"(?::[0-9]{1,5})?$")
_ONE_LABEL = re.compile(r"^[a-z0-9_-]+$")
_json = msgspec.json.Encoder()

_STATIC = {
    "/": ("status.html", "text/html; charset=utf-8"),
    "/status.js": ("status.js", "text/javascript; charset=utf-8"),
    "/status.css": ("status.css", "text/css; charset=utf-8"),
}
#: The page loads only its own files and fetches only its own origin; no frame may hold it
#: (a framed replay button could be clicked by a trick).
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _static(name: str) -> bytes:
    return (importlib.resources.files("pipeline") / "static" / name).read_bytes()


def _fold(name: str) -> str:
    return name.lower().removesuffix(".")


def allowed_names(names: Iterable[str]) -> frozenset[str]:
    """``monitor.allowed_hosts`` as :func:`host_allowed` compares them."""
    return frozenset(_fold(n) for n in names)


def host_allowed(host: str, extra: frozenset[str]) -> bool:
    """Whether a ``Host`` header (port optional) names a host the page answers to.

    IP literals and ``localhost`` cannot be rebound by another site; a name of one label is
    resolved by the operator's own search domains (compose service names, ``kubectl
    port-forward`` hosts), not by a name another site owns. Any other name must be listed.
    """
    m = _HOST.match(host)
    if m is None:
        return False
    if m["v6"] is not None:
        try:
            ipaddress.IPv6Address(m["v6"])
        except ValueError:
            return False
        return True
    name = _fold(m["name"])
    if name == "localhost" or _ONE_LABEL.match(name) or name in extra:
        return True
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def history_json(hist: stats.History, backlog: stats.GaugeHistory | None = None
                 ) -> dict[str, Any]:
    """Per-slot series: rates per second per stage, latency p50/p99 in ms (null: none), and
    the backlog (lag + pending) of each group as the monitor sampled it."""
    per_s = 1 / hist.slot_s
    rates = {name: [round(v * per_s, 3) for v in hist.series(name)]
             for name in ("ingested", "transformed", "written", "downlinks")}
    dead = [0] * len(hist.t)
    for name, values in hist.fields.items():
        if name.startswith("dead:"):
            dead = [a + b for a, b in zip(dead, values, strict=True)]
    rates["dead"] = [round(v * per_s, 3) for v in dead]
    p50, p99 = [], []
    for i in range(len(hist.t)):
        buckets = stats.latency_buckets(hist, i)
        p50.append(_ms(stats.quantile(buckets, 0.5)))
        p99.append(_ms(stats.quantile(buckets, 0.99)))
    return {"slot_s": hist.slot_s, "t": hist.t, "rate": rates,
            "latency_ms": {"p50": p50, "p99": p99},
            "backlog": backlog.series(hist.t) if backlog is not None else {}}


def backlog_of(streams: Sequence[StreamInfo]) -> dict[str, float]:
    """Lag + pending per group, summed over the partitions of its stream."""
    out: dict[str, float] = {}
    for s in streams:
        for g in s.groups:
            out[g.name] = out.get(g.name, 0) + g.lag + g.pending
    return out


def streams_json(streams: Sequence[StreamInfo], keys: Keys, now: int) -> list[dict[str, Any]]:
    return [
        {
            "stream": keys.label(s.key),
            "length": s.length,
            "groups": [
                {"group": g.name, "lag": g.lag, "lag_exact": g.lag_exact, "pending": g.pending,
                 "consumers": g.consumers,
                 "oldest_pending_age_s": round(g.oldest_pending_age_s(now), 1)}
                for g in s.groups
            ],
        }
        for s in streams
    ]


class StatusPage:
    """Builds ``/status.json`` and serves the page's routes (see the module docstring)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        templates: Sequence[str],
        admin_token: Secret | None,
        allowed_hosts: Iterable[str] = (),
        latest_streams: Callable[[], Sequence[StreamInfo]] = lambda: (),
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._board = StatusBoard(redis, keys)
        self._templates = list(templates)
        self._token = admin_token.reveal().encode() if admin_token is not None else None
        self._allowed_hosts = allowed_names(allowed_hosts)
        self._latest_streams = latest_streams
        self._cache: tuple[float, bytes] | None = None
        self._lock = asyncio.Lock()
        self.backlog = stats.GaugeHistory()

    def sampled(self, streams: Sequence[StreamInfo], now: int) -> None:
        """The monitor's latest sample: kept for the backlog plot."""
        self.backlog.record(now, backlog_of(streams))

    def routes(self) -> dict[tuple[str, str], Handler]:
        out: dict[tuple[str, str], Handler] = {("GET", p): self._file for p in _STATIC}
        out[("GET", "/status.json")] = self.status_json
        out[("POST", "/dead/replay")] = self.replay
        return {route: self._host_checked(handler) for route, handler in out.items()}

    def _host_checked(self, handler: Handler) -> Handler:
        """``handler``, answering only a ``Host`` that :func:`host_allowed` accepts."""

        async def checked(request: web.BaseRequest) -> web.StreamResponse:
            # No Host at all (HTTP/1.0) is let through: a browser, the rebinding's tool,
            # always sends one.
            host = request.headers.get("Host")
            if host is not None and not host_allowed(host, self._allowed_hosts):
                metrics.REJECTED.labels("status-page", Reason.HOST_NOT_ALLOWED).inc()
                return _error(421, f"the status page does not answer to host {host[:100]!r}: "
                                   "add its name to monitor.allowed_hosts (IP addresses, "
                                   "localhost and one-label names are always allowed)")
            return await handler(request)

        return checked

    async def _file(self, request: web.BaseRequest) -> web.StreamResponse:
        name, ctype = _STATIC[request.path]
        return web.Response(body=_static(name), headers={**_HEADERS, "Content-Type": ctype})

    async def status_json(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            body = await self.cached()
        except RedisError as exc:
            return _error(503, f"redis: {redact_text(str(exc))[:200]}")
        return web.Response(body=body, headers={**_HEADERS,
                                                "Content-Type": "application/json"})

    async def cached(self) -> bytes:
        """The JSON, rebuilt when older than :data:`CACHE_S` (one build at a time)."""
        async with self._lock:
            if self._cache is None or time.monotonic() - self._cache[0] >= CACHE_S:
                self._cache = (time.monotonic(), _json.encode(await self.build()))
            return self._cache[1]

    async def build(self) -> dict[str, Any]:
        now = now_ms()
        hist = await stats.read_history(self._redis, self._keys, now)
        streams = list(self._latest_streams()) or await snapshot(self._redis, self._keys)
        statuses = await self._board.all()
        latest = await scan_dead(self._redis, self._keys, limit=LATEST_DEAD)
        dead_total = await count_dead(self._redis, self._keys)
        unmapped: dict[str, Any] = {}
        for t in self._templates:
            raw = await self._redis.hgetall(self._keys.unmapped(t))
            counts = sorted(((as_str(k), int(v)) for k, v in raw.items()), key=lambda kv: -kv[1])
            unmapped[t] = {"keys": dict(counts[:UNMAPPED_TOP]),
                           "more": max(0, len(counts) - UNMAPPED_TOP)}
        replicas = await stats.replicas_alive(self._redis, self._keys, now)
        return {
            "now_ms": now,
            "history": history_json(hist, self.backlog),
            "streams": streams_json(streams, self._keys, now),
            "integrations": [
                {"kind": s.kind, "name": s.name, "state": s.state, "since_ms": s.since_ms,
                 "updated_ms": s.updated_ms, "owner": s.owner, "error_kind": s.error_kind,
                 "last_error": redact_text(s.last_error)[:300] if s.last_error else None}
                for s in statuses
            ],
            "blynk": {"window_s": stats.HISTORY_S, "by_status": hist.sum_prefix("blynk:")},
            "dead": {
                "total": dead_total,
                "window_s": stats.HISTORY_S,
                "by_reason": hist.sum_prefix("dead:"),
                "latest": [letter_summary(r) for r in latest],
            },
            "unmapped": unmapped,
            "replicas": [{"name": m, "last_seen_ms": ms} for m, ms in replicas],
            "replay_enabled": self._token is not None,
        }

    async def replay(self, request: web.BaseRequest) -> web.StreamResponse:
        refused = self._refuse(request)
        if refused is not None:
            metrics.REJECTED.labels("status-page", refused[1]).inc()
            return refused[0]
        if request.content_length is None or request.content_length > MAX_BODY:
            return _error(413 if request.content_length else 411,
                          f"send a JSON body of at most {MAX_BODY} bytes with its length")
        if request.content_type != "application/json":
            return _error(415, "the body must be application/json")
        try:
            ids = msgspec.json.decode(await request.read(), type=dict[str, list[str]])["ids"]
        except (msgspec.DecodeError, msgspec.ValidationError, KeyError):
            return _error(400, 'the body must be {"ids": ["<dead letter id>", ...]}')
        if not 0 < len(ids) <= MAX_REPLAY_IDS or not all(_DEAD_ID.match(i) for i in ids):
            return _error(400, f"give 1 to {MAX_REPLAY_IDS} dead-letter ids like 1700000000000-0")
        try:
            found = await get_dead(self._redis, self._keys, ids)
            rows = [r for r in found.values() if r is not None]
            done = await replay(self._redis, self._keys, rows)
        except RedisError as exc:
            # At-least-once (pipeline.deadletters.replay): a letter replayed before the error
            # is gone from the dead stream, the others are still there to replay again.
            return _error(503, f"redis: {redact_text(str(exc))[:200]}")
        replayed = {d for d, _, _ in done}
        self._cache = None
        log.info("status page: %s replayed %d of %d dead letters", request.remote, len(done),
                 len(ids))
        return web.json_response({
            "replayed": [{"id": d, "stream": self._keys.label(s), "new_id": n}
                         for d, s, n in done],
            "refused": [{"id": r.id, "why": "truncated, or its origin is not a pipeline stream"}
                        for r in rows if r.id not in replayed],
            "missing": [i for i, r in found.items() if r is None],
        }, headers={"Cache-Control": "no-store"})

    def _refuse(self, request: web.BaseRequest) -> tuple[web.Response, Reason] | None:
        """Why an action request is refused (response, reason), or ``None``."""
        if self._token is None:
            return _error(403, "actions are disabled: set monitor.admin_token"), \
                Reason.ACTIONS_DISABLED
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:
            return _error(403, "cross-origin request refused"), Reason.CROSS_ORIGIN
        auth = request.headers.get("Authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 self._token):
            resp = _error(401, "needs Authorization: Bearer <monitor.admin_token>")
            resp.headers["WWW-Authenticate"] = 'Bearer realm="blynk-bridge"'
            return resp, Reason.UNAUTHORIZED
        return None


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status,
                             headers={"Cache-Control": "no-store"})
