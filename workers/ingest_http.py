"""ingest-http: Particle and TTS webhooks in, ``Uplink`` entries on the uplinks stream out.

Routes (one dict-routed handler on aiohttp's low-level server):

* ``POST|PUT|GET /particle/{integration}`` — a configured Particle product
  (:func:`pipeline.particle.parse_webhook`; GET is the Blynk blueprint's query-only webhook);
* ``POST /tts/{integration}`` — TTS webhook uplinks, joins, locations
  (:func:`pipeline.tts.parse_message`), for applications that configure ``webhook_auth``;
* ``POST|PUT|GET /blynk/{name}`` — a Blynk webhook (``blynk_webhooks``): one datastream change,
  a ``Downlink`` on the downlinks stream (:func:`pipeline.blynk_webhook.parse`); 2xx once it is
  in Redis, 400 naming the field of a body Blynk did not fill;
* ``GET /healthz`` (the process answers), ``GET /readyz`` (Redis answers a PING: 200, else 503).
  They reveal nothing; ``/status`` and ``/metrics`` are served on the metrics port only
  (:mod:`pipeline.metrics_http`), where :meth:`IngestHttp.describe` adds the uplinks backlog.

Contract of a webhook request: **2xx only after the entry is in Redis** (``XADD`` returned:
:meth:`pipeline.streams.StreamWriter.add`, group-committed). The answer carries ``X-Entry-Id`` and
``X-Event-Id`` and an empty body, because Particle turns a non-empty body into a ``hook-response``
event. A valid TTS message that is not an uplink (downlink outcome, service data, skipped simulated
uplink) gets 202 and is not stored (a downlink outcome is first matched to the bridge's command:
:mod:`pipeline.downlink_outcomes`); a TTS uplink without ``decoded_payload`` (that device's
formatter failed) gets 202 and becomes a dead letter ``no_decoded_payload``, as on MQTT. Every
refusal is counted in ``bb_rejected_total{reason}`` and answered with ``{"error": {"reason",
"field", "message"}}``: 404 unknown integration, 401 bad credentials (429 + ``Retry-After`` past
``auth_failures_per_minute`` from one peer), 413 body over ``max_body_bytes``, 408 a body not
received within ``body_timeout_s``, 415 a content type Particle/TTS does not send, 400 a body
that cannot be parsed (the field named), 503 + ``Retry-After`` when the uplinks backlog is past
``backlog_high_water`` (entries) or ``backlog_high_water_bytes``, or Redis does not answer.
Particle and TTS retry refused deliveries, so a retried message arrives again and transform
drops the duplicate by ``event_id``.

Connections are bounded in number and time (:class:`Connection`): at most
``max_connections_per_peer`` open per peer address (more are closed at once), a request head
must arrive within ``header_timeout_s``, an idle keep-alive connection lives
``keepalive_timeout_s``; after an answer that left part of a body unread (a 408, a 413) the rest is
read and dropped for at most ``lingering_s``, then the connection is closed. A malformed request
gets a fixed 400 that echoes none of its bytes. Refusals of a peer are logged at most once a
minute per peer and kind, with a count.

Integration status (kind ``particle``): **Connected** while webhooks are accepted; **Broken**
after ``broken_after_failures`` refusals in a row of *authenticated* requests (400/415/413/408:
``protocol`` — the webhook template sends bodies we cannot read); **Not Connected** if that
happens before any webhook was accepted. The next accepted webhook sets Connected again.
Requests with bad credentials never change a status — anyone can send them — they are counted
(``bb_rejected_total{reason=Reason.UNAUTHORIZED}``); a webhook whose secret is wrong shows as an
integration that stays Not Connected (or stops being refreshed) while that counter grows.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import gc
import hmac
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import msgspec
from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from prometheus_client import Counter
from redis.exceptions import RedisError

from pipeline import keys as keynames
from pipeline import metrics
from pipeline.backlog import as_str, reported_lag
from pipeline.config import HttpAuth, IngestHttpConfig, NoAuth, ParticleProduct, TtsApplication
from pipeline.context import Context
from pipeline.downlink_outcomes import OUTCOMES, Outcomes
from pipeline.errors import ConfigError, InvalidInput, Reason
from pipeline.events import Uplink, dead_letter, encode
from pipeline.lifecycle import cancel_and_wait, collect_young_less_often
from pipeline.logs import ThrottledLog
from pipeline.particle import body_style, parse_webhook
from pipeline.status import ErrorKind, StatusBoard
from pipeline.streams import Redis, now_ms

log = logging.getLogger("blynk_bridge.ingest_http")

Source = Literal["particle", "tts", "blynk"]
Handler = Callable[[web.BaseRequest], Awaitable["Answer"]]

_PARTICLE_METHODS = ("GET", "POST", "PUT")
_PROBE_METHODS = ("GET", "HEAD")
#: ``bb_rejected_total{source}`` of a request that matches no route, by its first path segment.
_ROUTE_SOURCES = {"particle": "particle", "tts": "tts", "blynk": "blynk"}

#: Seconds a client is asked to wait (``Retry-After``) when the backlog or Redis refuses input.
RETRY_AFTER_S = 5
#: Requests a minute Blynk sends per webhook (its documented limit; the rest it drops).
BLYNK_WEBHOOK_RATE = 10
#: How often the uplinks backlog is read from Redis (never per request).
BACKLOG_REFRESH_S = 1.0
#: ``MEMORY USAGE … SAMPLES``: Redis estimates a stream's bytes from this many of its nodes.
MEMORY_SAMPLES = 5
#: A peer's refusals of one kind are logged at most once per this many seconds (with a count).
LOG_INTERVAL_S = 60.0
#: Peers remembered for auth budgets and log throttling (oldest forgotten first).
MAX_PEERS = 100_000
#: An integration already Connected is re-marked at most this often (other replicas may have
#: marked it Broken meanwhile).
STATUS_REFRESH_S = 10.0
#: The garbage collector's first threshold while serving (CPython's default: 700). A webhook
#: allocates a few hundred objects that live until its answer, so with 128 requests in flight the
#: default ran a young collection every few requests, each traversing every in-flight request:
#: ~7 CPU µs per webhook (``bench/ingest_http.py``). At this threshold the young generation is
#: still collected, every few hundred requests.
GC_THRESHOLD0 = 5000

_json = msgspec.json.Encoder()
#: What may be echoed in a response header (a TTS event id comes from the sender).
_HEADER_SAFE = re.compile(r"[!-~]{1,256}")


class Refused(Exception):
    """A request answered with an error (status, machine reason, field, human message)."""

    def __init__(
        self,
        status: int,
        reason: Reason,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.field = field
        self.headers = dict(headers or {})
        #: Close the connection after answering (its request stream can no longer be trusted).
        self.close = close


# --- auth ----------------------------------------------------------------------------------------


class Authenticator:
    """Checks one integration's shared-secret header and/or HTTP basic credentials.

    Every configured check must pass; each compare is constant-time (``hmac.compare_digest``)
    and nothing secret — neither ours nor what the client sent — appears in a refusal.
    """

    def __init__(self, auth: HttpAuth | NoAuth | None, where: str) -> None:
        self.open = auth == "none"
        self._header: tuple[str, bytes] | None = None
        self._basic: tuple[bytes, bytes] | None = None
        if auth == "none":
            return
        if auth is None:
            raise ConfigError(f"`{where}` is missing: set it, or `none` to accept anyone")
        if auth.header is not None or auth.secret is not None:
            if not auth.header or not auth.secret:
                raise ConfigError(f"`{where}`: `header` and `secret` go together")
            self._header = (auth.header, _bytes(auth.secret))
        if auth.username is not None or auth.password is not None:
            if not auth.username or not auth.password:
                raise ConfigError(f"`{where}`: `username` and `password` go together")
            self._basic = (_bytes(auth.username), _bytes(auth.password))
        if self._header is None and self._basic is None:
            raise ConfigError(f"`{where}`: set `header` + `secret` or `username` + `password`")

    def check(self, headers: Mapping[str, str]) -> Refused | None:
        """``None`` when the request may pass, else the 401 to answer."""
        if self._header is not None:
            name, secret = self._header
            given = headers.get(name)
            if given is None:
                return _unauthorized(f"header {name} missing", name)
            if not hmac.compare_digest(_bytes(given), secret):
                return _unauthorized(f"header {name} does not match", name)
        if self._basic is not None:
            user, password = self._basic
            creds = _basic_credentials(headers.get("Authorization"))
            if creds is None:
                return _unauthorized("HTTP basic credentials missing or malformed", "Authorization",
                                     basic=True)
            ok_user = hmac.compare_digest(creds[0], user)
            ok_password = hmac.compare_digest(creds[1], password)
            if not (ok_user and ok_password):
                return _unauthorized("HTTP basic credentials do not match", "Authorization",
                                     basic=True)
        return None


def _bytes(text: str) -> bytes:
    # Header values may hold undecodable bytes (aiohttp keeps them as surrogates).
    return str.__str__(text).encode("utf-8", "surrogateescape")


def _basic_credentials(header: str | None) -> tuple[bytes, bytes] | None:
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        raw = base64.b64decode(_bytes(encoded.strip()), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = raw.partition(b":")
    return (user, password) if sep else None


def _unauthorized(message: str, field: str, *, basic: bool = False) -> Refused:
    headers = {"WWW-Authenticate": 'Basic realm="blynk-bridge"'} if basic else None
    return Refused(401, Reason.UNAUTHORIZED, message, field=field, headers=headers)


# --- peers ---------------------------------------------------------------------------------------


class AuthBudget:
    """Requests with bad credentials answered 401 per peer address: a token bucket of
    ``per_minute`` tokens refilled over a minute. Remembers at most ``max_peers`` peers."""

    def __init__(self, per_minute: int, max_peers: int = MAX_PEERS) -> None:
        self.per_minute = max(1, per_minute)
        self._max_peers = max_peers
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, peer: str) -> float:
        """0.0 when the peer may get one more 401 (and it is counted), else the seconds until
        it may."""
        now = time.monotonic()
        rate = self.per_minute / 60.0
        tokens, at = self._buckets.pop(peer, (float(self.per_minute), now))
        tokens = min(float(self.per_minute), tokens + (now - at) * rate)
        if len(self._buckets) >= self._max_peers:
            del self._buckets[next(iter(self._buckets))]
        if tokens >= 1.0:
            self._buckets[peer] = (tokens - 1.0, now)
            return 0.0
        self._buckets[peer] = (tokens, now)
        return (1.0 - tokens) / rate


class ConnectionGuard:
    """What every :class:`Connection` of one server shares: open connections per peer, the
    deadlines, and the counting and logging of what it refuses."""

    def __init__(self, cfg: IngestHttpConfig, log_: ThrottledLog) -> None:
        self.max_per_peer = cfg.max_connections_per_peer
        self.header_timeout_s = cfg.header_timeout_s
        self.open: dict[str, int] = {}
        self._log = log_

    def admit(self, peer: str) -> bool:
        count = self.open.get(peer, 0)
        if self.max_per_peer > 0 and count >= self.max_per_peer:
            self.refused(peer, Reason.TOO_MANY_CONNECTIONS,
                         f"{count} connections open (limit {self.max_per_peer})")
            return False
        self.open[peer] = count + 1
        return True

    def release(self, peer: str) -> None:
        count = self.open.get(peer, 0) - 1
        if count > 0:
            self.open[peer] = count
        else:
            self.open.pop(peer, None)

    def refused(self, peer: str, reason: Reason, detail: str) -> None:
        """Count (``bb_rejected_total{source="-"}``) and log (throttled) a refused connection."""
        metrics.REJECTED.labels("-", reason).inc()
        self._log.warning((peer, reason), "closed a connection from %s: %s (%s)", peer, reason,
                          detail)


def _peer_of(transport: asyncio.BaseTransport) -> str:
    peername = transport.get_extra_info("peername")
    if isinstance(peername, (tuple, list)) and peername:
        return str(peername[0])
    return "?"


class Connection(web.RequestHandler):
    """aiohttp's connection protocol with the limits it lacks: a per-peer connection cap and a
    deadline on each request head.

    The head deadline starts when the connection opens and again at the first byte after a
    finished request; it is met when aiohttp hands over a parsed head (:meth:`head_arrived`,
    called from the stage's request factory). Trickling header bytes does not extend it. The
    body's deadline is the handler's (``body_timeout_s``); idle keep-alive connections are
    aiohttp's ``keepalive_timeout``.

    The deadline is a number, checked by at most one timer per connection that re-arms itself
    when it fires early: a timer scheduled and cancelled per request cost ~2% of ingest-http's
    CPU per webhook on keep-alive connections (``bench/ingest_http.py``).
    """

    def __init__(self, manager: web.Server, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._peer: str | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        #: ``time.monotonic()`` by which a request head must arrive; None while none is awaited.
        self._head_deadline: float | None = None
        self._in_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = _peer_of(transport)
        if not self._guard.admit(peer):
            assert isinstance(transport, asyncio.Transport)
            transport.abort()  # connection_lost follows; nothing was counted for this peer
            return
        self._peer = peer
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        peer, self._peer = self._peer, None
        if peer is not None:
            self._guard.release(peer)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_deadline is None and not self._in_request and self._peer is not None:
            self._arm()
        _data_received(self, data)  # not super(): this runs per packet

    def head_arrived(self) -> None:
        # The timer stays: when it fires it finds no deadline (or a later one) and re-arms.
        self._head_deadline = None
        self._in_request = True

    def handled(self) -> None:
        """The handler returned: bytes from now on belong to a next request (or to the rest of
        a body nobody read, which aiohttp drains: that too must not take forever)."""
        self._in_request = False

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A request aiohttp could not parse: a fixed answer. aiohttp's own echoes the bytes
        around the error (credential headers included) into the body and the log."""
        if status >= 500:
            return super().handle_error(request, status, exc, None)
        peer = self._peer or "?"
        self._guard.refused(peer, Reason.MALFORMED_REQUEST,
                            f"{status} {type(exc).__name__ if exc else 'error'}")
        resp = _error_response(Refused(status, Reason.MALFORMED_REQUEST,
                                       "the request is not valid HTTP/1.1", close=True))
        return resp

    def _arm(self) -> None:
        self._head_deadline = time.monotonic() + self._guard.header_timeout_s
        if self._head_timer is None:
            self._head_timer = asyncio.get_running_loop().call_later(
                self._guard.header_timeout_s, self._head_late)

    def _disarm(self) -> None:
        self._head_deadline = None
        timer, self._head_timer = self._head_timer, None
        if timer is not None:
            timer.cancel()

    def _head_late(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None or self._in_request or self.transport is None:
            return  # no head awaited now: the next request's first byte arms a timer again
        left = deadline - time.monotonic()
        if left > 0:  # the deadline moved on since this timer was set (a later request)
            self._head_timer = asyncio.get_running_loop().call_later(left, self._head_late)
            return
        self._guard.refused(self._peer or "?", Reason.HEADER_TIMEOUT,
                            f"no complete request head within {self._guard.header_timeout_s}s")
        self.force_close()


_data_received = web.RequestHandler.data_received


class GuardedServer(web.Server):
    """``web.Server`` whose connections are :class:`Connection`."""

    def __init__(self, handler: Any, *, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._guard = guard

    def __call__(self) -> Connection:
        # aiohttp's own __call__ builds a RequestHandler from the same two attributes.
        return Connection(self, loop=self._loop, guard=self._guard, **self._kwargs)


# --- backlog -------------------------------------------------------------------------------------


class Backlog:
    """The uplinks stream's lag for the transform group, read every ``BACKLOG_REFRESH_S``.

    Lag is ``XINFO GROUPS``' ``lag`` summed over partitions; a partition without the group
    (transform never started) counts its whole length, since nothing will trim it. ``bytes`` is
    what the partitions hold in Redis (``MEMORY USAGE``, sampled: Redis's estimate), acknowledged
    entries the monitor has not trimmed yet included. Until the first read, and while Redis
    fails, the last known values hold (0 at start).
    """

    def __init__(self, redis: Redis, streams: list[str], group: str,
                 interval_s: float = BACKLOG_REFRESH_S) -> None:
        self._redis = redis
        self.interval_s = interval_s
        self.streams = streams
        self.group = group
        self.by_stream: dict[str, int] = dict.fromkeys(streams, 0)
        self.total = 0
        self.bytes = 0
        self.read_ms: int | None = None

    async def refresh(self) -> int:
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream in self.streams:
                pipe.xlen(stream)
                pipe.xinfo_groups(stream)
                pipe.memory_usage(stream, samples=MEMORY_SAMPLES)
            replies = await pipe.execute(raise_on_error=False)
        size = 0
        for i, stream in enumerate(self.streams):
            length, groups, used = replies[3 * i: 3 * i + 3]
            if isinstance(length, Exception):
                raise length
            if isinstance(used, Exception):  # MEMORY disabled (some hosted Redis): say so
                raise used
            self.by_stream[stream] = _lag(length, groups, self.group)
            size += used or 0
        self.total = sum(self.by_stream.values())
        self.bytes = size
        self.read_ms = now_ms()
        return self.total

    async def run(self) -> None:
        """Refresh forever (cancel to stop); a Redis failure keeps the last value and logs."""
        failing = False
        while True:
            try:
                await self.refresh()
                failing = False
            except RedisError as exc:
                if not failing:
                    log.warning("cannot read the uplinks backlog: %s", exc)
                failing = True
            await asyncio.sleep(self.interval_s)


def _lag(length: int, groups: object, group: str) -> int:
    """The group's lag in one partition; its whole length when Redis cannot tell the lag or
    the group does not exist yet (nothing will trim the partition)."""
    if not isinstance(groups, list):  # "no such key": the stream does not exist yet
        return 0
    for g in groups:
        if as_str(g.get("name")) == group:
            lag = reported_lag(g)
            return int(length) if lag is None else lag
    return int(length)


# --- Blynk's webhook rate ---------------------------------------------------------------------


class WebhookRate:
    """Blynk sends at most :data:`BLYNK_WEBHOOK_RATE` requests a minute per webhook and drops the
    rest; the bridge cannot see what was dropped, but it sees when a webhook runs at the limit:
    each request that makes a webhook's last minute reach it is counted
    (``bb_blynk_webhook_at_limit_total``) and logged, so an operator knows changes are being
    lost upstream (and that fleets need the device-session channel)."""

    def __init__(self) -> None:
        self._recent: dict[str, collections.deque[float]] = {}

    def seen(self, name: str) -> None:
        now = time.monotonic()
        recent = self._recent.setdefault(name, collections.deque())
        while recent and now - recent[0] >= 60.0:
            recent.popleft()
        recent.append(now)
        if len(recent) >= BLYNK_WEBHOOK_RATE:
            metrics.BLYNK_WEBHOOK_AT_LIMIT.labels(name).inc()
            if len(recent) == BLYNK_WEBHOOK_RATE:
                log.warning("blynk/%s: %d requests in the last minute, Blynk's limit per "
                            "webhook: further changes are dropped by Blynk", name, len(recent))


# --- integration status --------------------------------------------------------------------------


class InboundStatus:
    """Integration status of inbound webhooks, written to Redis off the request path."""

    def __init__(self, board: StatusBoard, kind: str, broken_after: int) -> None:
        self._board = board
        self._kind = kind
        self._broken_after = max(1, broken_after)
        self._connected_at: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def accepted(self, name: str) -> None:
        self._failures[name] = 0
        last = self._connected_at.get(name)
        now = time.monotonic()
        if last is None or now - last >= STATUS_REFRESH_S:
            self._connected_at[name] = now
            self._spawn(self._board.connected(self._kind, name))

    def refused(self, name: str, error: str, error_kind: ErrorKind) -> None:
        count = self._failures.get(name, 0) + 1
        self._failures[name] = count
        if count >= self._broken_after and (count - self._broken_after) % 100 == 0:
            self._connected_at.pop(name, None)
            self._spawn(self._board.failed(self._kind, name, error, error_kind))

    def _spawn(self, aw: Awaitable[object]) -> None:
        async def write() -> None:
            try:
                await aw
            except RedisError as exc:
                log.warning("cannot write integration status: %s", exc)

        task = asyncio.create_task(write(), name="ingest-http-status")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


# --- the stage -----------------------------------------------------------------------------------


class IngestHttp:
    """The ingest-http stage: one dict-routed handler (:meth:`handle`) on aiohttp's
    low-level server (:meth:`serve`)."""

    name = "ingest-http"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.cfg: IngestHttpConfig = ctx.config.ingest_http
        self.particle: dict[str, tuple[ParticleProduct, Authenticator]] = {}
        for i, product in enumerate(ctx.config.particle):
            self.particle[product.name] = (product, Authenticator(product.auth,
                                                                  f"particle[{i}].auth"))
        self.tts: dict[str, tuple[TtsApplication, Authenticator]] = {}
        for i, app in enumerate(ctx.config.tts):
            if app.webhook_auth is not None:
                self.tts[app.name] = (app, Authenticator(app.webhook_auth,
                                                         f"tts[{i}].webhook_auth"))
        self.blynk: dict[str, Authenticator] = {
            w.name: Authenticator(w.auth, f"blynk_webhooks[{i}].auth")
            for i, w in enumerate(ctx.config.blynk_webhooks)}
        self.blynk_rate = WebhookRate()
        self.outcomes = Outcomes(ctx.redis, ctx.keys, {t.name: t for t in ctx.config.templates},
                                 ctx.config.downlink.outcome_ttl_s)
        self.appender = ctx.writer
        self.board = StatusBoard(ctx.redis, ctx.keys)
        self.status = InboundStatus(self.board, "particle", self.cfg.broken_after_failures)
        self.backlog = Backlog(ctx.redis, ctx.keys.streams(keynames.UPLINKS),
                               keynames.GROUP_TRANSFORM)
        #: The uplinks stream when it has one partition (else each uplink's partition is asked).
        self._uplinks = (ctx.keys.stream(keynames.UPLINKS) if ctx.keys.partitions == 1
                         else None)
        #: Requests being handled right now (graceful stop waits for them).
        self.in_flight = 0
        self._ingested: dict[tuple[str, str, str], Counter] = {}
        self._rejections: dict[tuple[str, str], Counter] = {}
        self._probes: dict[str, Handler] = {"/healthz": self.healthz, "/readyz": self.readyz}
        self._log = ThrottledLog(log, LOG_INTERVAL_S, MAX_PEERS)
        self.auth_budget = AuthBudget(self.cfg.auth_failures_per_minute)
        self.guard = ConnectionGuard(self.cfg, self._log)
        self._runner: web.ServerRunner | None = None
        self._backlog_task: asyncio.Task[None] | None = None
        self._gc_threshold: tuple[int, int, int] | None = None
        self._loop: asyncio.AbstractEventLoop  # set by serve(), before any request
        #: The base URL once serving (``serve``/``startup``).
        self.url = ""

    # lifecycle

    async def startup(self) -> None:
        for name, (_, auth) in self.particle.items():
            if auth.open:
                log.warning("particle integration %r has no auth: anyone can post to it", name)
        self.url = await self.serve(self.cfg.host, self.cfg.port)
        self._tune_gc()
        log.info("ingest-http listening on %s:%d (particle: %s; tts webhooks: %s)",
                 self.cfg.host, self.cfg.port, ", ".join(self.particle) or "-",
                 ", ".join(self.tts) or "-")

    async def main_loop(self, stop: asyncio.Event) -> None:
        """Serve until ``stop``; then stop accepting, let requests in flight finish (up to
        ``shutdown_timeout_s``) and return."""
        await stop.wait()
        await self._close()

    async def shutdown(self) -> None:
        await self._close()

    def _tune_gc(self) -> None:
        """Collect the young generation less often while serving (:data:`GC_THRESHOLD0`), and
        freeze what startup built (config, modules, pools) so full collections skip it.
        :meth:`_close` restores the threshold (what is frozen stays: it lives as long as the
        process anyway)."""
        if self._gc_threshold is None:
            self._gc_threshold = collect_young_less_often(GC_THRESHOLD0)

    async def _close(self) -> None:
        threshold, self._gc_threshold = self._gc_threshold, None
        if threshold is not None:
            gc.set_threshold(*threshold)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        task, self._backlog_task = self._backlog_task, None
        if task is not None:
            await cancel_and_wait([task])
        await self.appender.close()
        await self.status.drain()

    # serving

    def _request(self, message: Any, payload: Any, protocol: Any, writer: Any,
                 task: Any) -> web.BaseRequest:
        if isinstance(protocol, Connection):
            protocol.head_arrived()
        return web.BaseRequest(message, payload, protocol, writer, task, self._loop,
                               client_max_size=self.cfg.max_body_bytes)

    async def serve(self, host: str, port: int) -> str:
        """Listen on ``host:port`` (0: an unused port) and start the backlog refresher; returns
        the base URL. :meth:`main_loop`/:meth:`shutdown` stop it gracefully."""
        # The request factory runs per request; asking for the running loop there cost more
        # than keeping it.
        self._loop = asyncio.get_running_loop()
        server = GuardedServer(self.handle, guard=self.guard, request_factory=self._request,
                               access_log=None, keepalive_timeout=self.cfg.keepalive_timeout_s,
                               lingering_time=self.cfg.lingering_s)
        self._runner = web.ServerRunner(server, shutdown_timeout=self.cfg.shutdown_timeout_s)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=1024)
        await site.start()
        self._backlog_task = asyncio.create_task(self.backlog.run(), name="ingest-http-backlog")
        bound = self._runner.addresses[0]
        return f"http://{host}:{bound[1]}"

    async def handle(self, request: web.BaseRequest) -> Answer:
        """Every request: a dict lookup instead of aiohttp's router and middlewares (they cost
        more than parsing and storing a webhook, ``bench/ingest_http.py``); every refusal
        answered as ``{"error": …}`` and counted."""
        self.in_flight += 1
        try:
            path = request.path
            method = request.method
            if path.startswith("/particle/"):
                name = path[10:]
                if name and "/" not in name:
                    if method in _PARTICLE_METHODS:
                        return await self.particle_webhook(request, name)
                    raise self._not_allowed("particle", method, _PARTICLE_METHODS)
            elif path.startswith("/blynk/"):
                name = path[7:]
                if name and "/" not in name:
                    if method in _PARTICLE_METHODS:
                        return await self.blynk_webhook(request, name)
                    raise self._not_allowed("blynk", method, _PARTICLE_METHODS)
            elif path.startswith("/tts/"):
                name = path[5:]
                if name and "/" not in name:
                    if method == "POST":
                        return await self.tts_webhook(request, name)
                    raise self._not_allowed("tts", method, ("POST",))
            else:
                probe = self._probes.get(path)
                if probe is not None:
                    if method in _PROBE_METHODS:
                        return await probe(request)
                    raise self._not_allowed(path[1:], method, _PROBE_METHODS)
            # Not the first path segment as a label: unbounded series from anyone's typos.
            self._rejected(_ROUTE_SOURCES.get(path.split("/")[1], "-"), Reason.NOT_FOUND)
            raise Refused(404, Reason.NOT_FOUND, f"no route {path[:100]}")
        except Refused as refused:
            return _error_response(refused)
        finally:
            self.in_flight -= 1
            protocol = request.protocol
            if isinstance(protocol, Connection):
                protocol.handled()

    def _not_allowed(self, source: str, method: str, allowed: tuple[str, ...]) -> Refused:
        self._rejected(source, Reason.METHOD_NOT_ALLOWED)
        return Refused(405, Reason.METHOD_NOT_ALLOWED, f"{method[:16]} is not allowed here",
                       headers={"Allow": ", ".join(sorted(allowed))})

    def _rejected(self, source: str, reason: Reason) -> None:
        counter = self._rejections.get((source, reason))
        if counter is None:
            counter = self._rejections[(source, reason)] = metrics.REJECTED.labels(source, reason)
        counter.inc()

    # webhooks

    async def particle_webhook(self, request: web.BaseRequest, name: str) -> Answer:
        entry = self.particle.get(name)
        if entry is None:
            raise self._unknown("particle", f"no Particle integration named {name[:64]!r}")
        product, auth = entry
        self._admit(request, "particle", name, auth)
        body = await self._body(request, "particle", name)
        received = now_ms()
        try:
            uplink = parse_webhook(body, request.content_type, product, received_ts_ms=received,
                                   query=_query(request))
        except InvalidInput as exc:
            raise self._invalid("particle", name, exc) from None
        return await self._append(request, uplink, name)

    async def tts_webhook(self, request: web.BaseRequest, name: str) -> Answer:
        from pipeline.tts import Skipped, parse_event

        entry = self.tts.get(name)
        if entry is None:
            raise self._unknown(
                "tts", f"no TTS application named {name[:64]!r} takes webhooks (set webhook_auth)")
        app, auth = entry
        self._admit(request, "tts", name, auth)
        if body_style(request.content_type) != "json":
            raise self._refuse("tts", name, Refused(
                415, Reason.UNSUPPORTED_MEDIA_TYPE,
                f"TTS webhooks are JSON, got {request.content_type[:64]!r}", field="Content-Type"))
        body = await self._body(request, "tts", name)
        try:
            uplink = parse_event(body, app, received_ts_ms=now_ms())
        except UnicodeDecodeError:
            raise self._invalid("tts", name, InvalidInput(
                "JSON body is not UTF-8", reason=Reason.INVALID_ENCODING, field="$")) from None
        except InvalidInput as exc:
            if exc.reason == Reason.NO_DECODED_PAYLOAD:
                return await self._dead_letter("tts", name, request.path, body, exc)
            raise self._invalid("tts", name, exc) from None
        if isinstance(uplink, Skipped):
            metrics.TTS_SKIPPED.labels(app.name, uplink.reason).inc()
            await self._tts_outcome(name, uplink.reason, body)
            return web.Response(status=202, headers={"X-Skipped": "not an uplink"})
        return await self._append(request, uplink, name)

    async def _tts_outcome(self, name: str, reason: str, body: bytes) -> None:
        """A downlink outcome by webhook (``downlink_sent``…) is matched to the bridge's command
        before the answer (:mod:`pipeline.downlink_outcomes`, as the downlink stage does with
        those heard over MQTT); TTS retries a webhook that failed."""
        outcome = reason.removeprefix("downlink_")
        if outcome not in OUTCOMES:
            return
        try:
            await self.outcomes.handle(name, outcome, body)
        except RedisError as exc:
            log.warning("tts/%s: cannot match a downlink %s: %s", name, outcome, exc)
            raise self._refuse("tts", None, Refused(
                503, Reason.REDIS_UNAVAILABLE, "the bridge cannot store messages right now",
                headers={"Retry-After": str(RETRY_AFTER_S)})) from None

    async def blynk_webhook(self, request: web.BaseRequest, name: str) -> Answer:
        """A Blynk datastream change → one ``Downlink`` (see :mod:`pipeline.blynk_webhook`)."""
        from pipeline.blynk_webhook import parse

        auth = self.blynk.get(name)
        if auth is None:
            raise self._unknown("blynk", f"no Blynk webhook named {name[:64]!r}")
        self._admit(request, "blynk", name, auth)
        body = await self._body(request, "blynk", name)
        try:
            down = parse(body, request.content_type, _query(request), origin=name,
                         received_ts_ms=now_ms())
        except InvalidInput as exc:
            raise self._invalid("blynk", name, exc) from None
        who = down.token if down.token is not None else str(down.blynk_id)
        stream = self.ctx.keys.stream_for(keynames.DOWNLINKS, "blynk", who)
        try:
            entry_id = await self.appender.add(stream, encode(down))
        except RedisError as exc:
            log.warning("blynk/%s: cannot append to %s: %s", name, stream, exc)
            raise self._refuse("blynk", None, Refused(
                503, Reason.REDIS_UNAVAILABLE, "the bridge cannot store messages right now",
                headers={"Retry-After": str(RETRY_AFTER_S)})) from None
        metrics.INGESTED.labels("blynk", name, "downlink").inc()
        self.blynk_rate.seen(name)
        return _stored(request, entry_id, down.event_id)

    def _admit(self, request: web.BaseRequest, source: Source, name: str,
               auth: Authenticator) -> None:
        """Auth, declared size, content type and backlog: everything decided before reading."""
        refused = auth.check(request.headers)
        if refused is not None:
            # Not fed to the integration's status: anyone can send a request with bad
            # credentials, and that must not raise an alert.
            peer = request.remote or "?"
            wait = self.auth_budget.take(peer)
            if wait > 0:
                refused = Refused(
                    429, Reason.TOO_MANY_AUTH_FAILURES,
                    f"too many requests with bad credentials from {peer}; retry later",
                    headers={"Retry-After": str(max(1, math.ceil(wait)))}, close=True)
            self._log.warning((peer, "unauthorized"), "%s/%s: refused a request from %s: %s",
                              source, name, peer, refused.message)
            self._rejected(source, refused.reason)
            raise refused
        length = request.content_length
        if length is not None and length > self.cfg.max_body_bytes:
            raise self._refuse(source, name, _too_large(length, self.cfg.max_body_bytes))
        if request.body_exists and body_style(request.content_type) is None:
            raise self._refuse(source, name, Refused(
                415, Reason.UNSUPPORTED_MEDIA_TYPE,
                f"content type {request.content_type[:64]!r} is not JSON, form or text",
                field="Content-Type"))
        if self.backlog.total > self.cfg.backlog_high_water:
            raise self._refuse(source, None, Refused(
                503, Reason.BACKLOG,
                f"{self.backlog.total} uplinks wait for transform (limit "
                f"{self.cfg.backlog_high_water}); retry later",
                headers={"Retry-After": str(RETRY_AFTER_S)}))
        if self.backlog.bytes > self.cfg.backlog_high_water_bytes:
            raise self._refuse(source, None, Refused(
                503, Reason.BACKLOG,
                f"the uplinks stream holds {self.backlog.bytes} bytes (limit "
                f"{self.cfg.backlog_high_water_bytes}); retry later",
                headers={"Retry-After": str(RETRY_AFTER_S)}))

    async def _body(self, request: web.BaseRequest, source: Source, name: str) -> bytes:
        """The whole body, at most ``max_body_bytes`` (else 413), within ``body_timeout_s``
        (else 408 and the connection is closed)."""
        content = request.content
        if content.is_eof():
            # The usual webhook: the body came with the headers; take it without
            # ``request.read()``'s readany rounds and copy.
            body = content.read_nowait()
            if len(body) > self.cfg.max_body_bytes:
                raise self._refuse(source, name, _too_large(len(body), self.cfg.max_body_bytes))
            return body
        try:
            async with asyncio.timeout(self.cfg.body_timeout_s):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise self._refuse(source, name, _too_large(None, self.cfg.max_body_bytes)) from None
        except TimeoutError:
            raise self._refuse(source, name, Refused(
                408, Reason.BODY_TIMEOUT, f"body not received within {self.cfg.body_timeout_s}s",
                field="$", close=True)) from None

    async def _append(self, request: web.BaseRequest, uplink: Uplink, name: str) -> Answer:
        source: Source = uplink.source
        try:
            data = encode(uplink)
        except (OverflowError, ValueError, TypeError, UnicodeError) as exc:
            raise self._refuse(source, name, Refused(
                400, Reason.UNENCODABLE, f"message holds a value that cannot be stored: {exc}"
            )) from None
        stream = self._uplinks or self.ctx.keys.stream_for(keynames.UPLINKS, source,
                                                           uplink.device)
        try:
            entry_id = await self.appender.add(stream, data)
        except RedisError as exc:
            log.warning("%s/%s: cannot append to %s: %s", source, name, stream, exc)
            raise self._refuse(source, None, Refused(
                503, Reason.REDIS_UNAVAILABLE, "the bridge cannot store messages right now",
                headers={"Retry-After": str(RETRY_AFTER_S)})) from None
        counter = self._ingested.get((source, name, uplink.kind))
        if counter is None:
            counter = self._ingested[(source, name, uplink.kind)] = metrics.INGESTED.labels(
                source, name, uplink.kind)
        counter.inc()
        if uplink.event_ts_clamped:
            metrics.EVENT_TIME_CLAMPED.labels(source, name).inc()
        if source == "particle":
            self.status.accepted(name)
        # A Particle event id is header-safe by construction (pipeline.particle); a TTS one
        # comes from the sender.
        safe = source == "particle" or _HEADER_SAFE.fullmatch(uplink.event_id)
        return _stored(request, entry_id, uplink.event_id if safe else None)

    async def _dead_letter(self, source: Source, name: str, path: str, body: bytes,
                           exc: InvalidInput) -> web.Response:
        """Keep a valid message we cannot map (a device without a working payload formatter)
        as a dead letter and answer 202, so one device never makes the whole webhook look
        unhealthy to TTS."""
        dead = dead_letter(stream=path, entry_id="", raw=body, stage=self.name,
                           reason=exc.reason, detail=exc.detail, attempts=1,
                           dead_ts_ms=now_ms())
        try:
            entry_id = await self.appender.add(self.ctx.keys.dead, encode(dead))
        except RedisError as err:
            log.warning("%s/%s: cannot dead-letter: %s", source, name, err)
            raise self._refuse(source, None, Refused(
                503, Reason.REDIS_UNAVAILABLE, "the bridge cannot store messages right now",
                headers={"Retry-After": str(RETRY_AFTER_S)})) from None
        self._rejected(source, exc.reason)
        metrics.DEAD.labels(self.name, exc.reason).inc()
        return web.Response(status=202, headers={"X-Dead-Letter-Id": entry_id,
                                                 "X-Skipped": exc.reason})

    def _invalid(self, source: Source, name: str, exc: InvalidInput) -> Refused:
        status = {Reason.UNSUPPORTED_MEDIA_TYPE: 415, Reason.TOO_LARGE: 413}.get(exc.reason, 400)
        log.info("%s/%s: refused body (%s at %s): %s", source, name, exc.reason, exc.field,
                 exc.detail[:200])
        return self._refuse(source, name, Refused(status, exc.reason, exc.detail,
                                                  field=exc.field))

    def _unknown(self, source: Source, message: str) -> Refused:
        """A webhook path naming no configured integration: 404, counted like any refusal."""
        return self._refuse(source, None, Refused(404, Reason.UNKNOWN_INTEGRATION, message,
                                                  field="integration"))

    def _refuse(self, source: Source, name: str | None, refused: Refused,
                error_kind: ErrorKind = "protocol") -> Refused:
        """Count a refusal; for a known Particle integration, feed its status."""
        self._rejected(source, refused.reason)
        if source == "particle" and name is not None:
            self.status.refused(name, f"{refused.status} {refused.reason}: {refused.message}",
                                error_kind)
        return refused

    # probes

    async def healthz(self, request: web.BaseRequest) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(self, request: web.BaseRequest) -> web.Response:
        try:
            await asyncio.wait_for(self.ctx.redis.ping(), timeout=1.0)
        except (RedisError, TimeoutError, OSError) as exc:
            return web.json_response({"ready": False, "redis": str(exc)[:200]}, status=503)
        return web.json_response({"ready": True, "redis": "ok", "config": "loaded"})

    def describe(self) -> dict[str, object]:
        """This stage's part of the metrics port's ``/status``: the uplinks backlog."""
        return {"uplinks": {
            "group": self.backlog.group,
            "lag": self.backlog.total,
            "lag_by_stream": self.backlog.by_stream,
            "high_water": self.cfg.backlog_high_water,
            "bytes": self.backlog.bytes,
            "high_water_bytes": self.cfg.backlog_high_water_bytes,
            "read_ms": self.backlog.read_ms,
        }}


def _query(request: web.BaseRequest) -> dict[str, str]:
    if not request.query_string:
        return {}
    return {k: v for k, v in request.query.items()}


def _too_large(size: int | None, limit: int) -> Refused:
    what = f"body of {size} bytes" if size is not None else "body"
    return Refused(413, Reason.TOO_LARGE, f"{what} is over the {limit}-byte limit", field="$")


class Stored:
    """The answer to a webhook whose entry is in Redis: ``200`` with ``X-Entry-Id`` (and
    ``X-Event-Id``), no body, on a keep-alive HTTP/1.1 connection, written as one byte string.

    aiohttp answers with any object that has ``prepare``, ``write_eof`` and ``keep_alive``
    (``RequestHandler.finish_response``). This one skips what a ``web.Response`` builds per
    request — a header multidict, the checks of each header, the header serializer, four
    coroutines — for a status line and headers known in advance but for the two ids
    (~2 µs of ~70 per webhook, ``bench/ingest_http.py``). The bytes go through the request's own
    writer (``write_eof``), which refuses a closing transport and waits while the client does
    not read (backpressure), as for any aiohttp response. The headers are those aiohttp would
    send: ``Content-Length: 0``, ``Date``, ``Server``. (aiohttp's access log, which would read
    a response's status and headers, is off: :meth:`IngestHttp.serve`.)
    """

    __slots__ = ("_head",)

    #: Read by aiohttp after the answer: the connection stays open (only keep-alive requests
    #: are answered this way, :func:`_stored`).
    keep_alive = True

    def __init__(self, head: bytes) -> None:
        self._head = head

    async def prepare(self, request: web.BaseRequest) -> None:
        await request.writer.write_eof(self._head)

    async def write_eof(self) -> None:
        pass


#: What a handler returns: aiohttp's response, or the precomputed :class:`Stored`.
Answer = web.StreamResponse | Stored


def _stored(request: web.BaseRequest, entry_id: str, event_id: str | None) -> Answer:
    """``200`` for an entry in Redis: ``entry_id`` is Redis's (digits and a dash), ``event_id``
    is header-safe or ``None`` (not sent). Nothing here checks header values as aiohttp's
    writer would: Particle and Blynk event ids are safe by construction
    (:func:`pipeline.ids.event_id`, :func:`pipeline.blynk_webhook.event_id`), a TTS one is
    checked by the caller (:data:`_HEADER_SAFE`)."""
    if not request.keep_alive or request.version != HttpVersion11:
        # aiohttp decides the Connection header of the rare HTTP/1.0 or closing request.
        headers = {"X-Entry-Id": entry_id}
        if event_id is not None:
            headers["X-Event-Id"] = event_id
        return web.Response(status=200, headers=headers)
    event = "" if event_id is None else f"X-Event-Id: {event_id}\r\n"
    return Stored(f"HTTP/1.1 200 OK\r\nX-Entry-Id: {entry_id}\r\n{event}Content-Length: 0\r\n"
                  f"Date: {rfc822_formatted_time()}\r\nServer: {SERVER_SOFTWARE}\r\n\r\n"
                  .encode())


def _error_response(refused: Refused) -> web.Response:
    body = {"error": {"reason": refused.reason, "field": refused.field,
                      "message": refused.message}}
    resp = web.Response(status=refused.status, body=_json.encode(body),
                        content_type="application/json", headers=refused.headers)
    if refused.close:
        resp.force_close()
    return resp


def build(ctx: Context) -> IngestHttp:
    return IngestHttp(ctx)
