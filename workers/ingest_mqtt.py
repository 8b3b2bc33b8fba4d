"""ingest-mqtt: The Things Stack MQTT uplinks → the uplinks stream.

One MQTT session per configured TTS application, held by one replica at a time through a Redis
lease (TTS has no shared subscriptions: every subscriber gets every message, so three replicas
subscribed at once would triple the data). Standbys retry the lease every ``ttl/4`` and take over
within ``lease_ttl_ms`` (+ ``ttl/4``) of the owner's death; an owner that cannot confirm its lease
stops consuming at once.

The receive loop only decodes and hands off: each message becomes an encoded ``Uplink`` (or a
``DeadLetter``) on a bounded queue, and one appender task writes the queue in batches (one
``XADD``-loop script call per stream, see :class:`Appender`), so a burst never makes the broker
drop messages for a slow reader. TTS is QoS 0: a message is "acknowledged" by nothing, so what
matters is reading fast. If Redis is away long
enough for the queue to fill, new messages are dropped and counted (``bb_ingest_dropped_total``).

Malformed payloads (not JSON, wrong shape, too large, no decoded payload) are dead-lettered with
a reason code and counted; downlink outcomes (``down/queued|sent|ack|nack|failed``) and service
data are counted (``bb_tts_skipped_total``) and logged at debug level.

Status per application (kind ``tts``): Connected after subscribing; a failed connection is
Not Connected (never connected) or Broken (was connected), with ``credentials`` told apart from
``unreachable``; reconnection uses capped, jittered backoff and sets Connected again by itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import RedisError

from pipeline import events, metrics, mqtt
from pipeline.config import TtsApplication
from pipeline.consumer import backoff_s
from pipeline.context import Context
from pipeline.errors import InvalidInput
from pipeline.keys import UPLINKS
from pipeline.lease import Lease, hold
from pipeline.status import ErrorKind, StatusBoard
from pipeline.streams import Redis, StreamWriter, now_ms
from pipeline.tts import Skipped, parse_event

log = logging.getLogger("blynk_bridge.ingest_mqtt")

STAGE = "ingest-mqtt"
STATUS_KIND = "tts"
#: Topic suffixes under ``v3/{app}@{tenant}/devices/+/``.
TOPICS = (
    "up",
    "join",
    "location/solved",
    "service/data",
    "down/queued",
    "down/sent",
    "down/ack",
    "down/nack",
    "down/failed",
)
#: Bytes of a malformed payload kept in its dead letter.
DEAD_RAW_BYTES = 8 * 1024

SettingsFor = Callable[[TtsApplication, str], mqtt.Settings]


def default_settings(app: TtsApplication, consumer: str) -> mqtt.Settings:
    """Connection settings from the configuration: ``{app}@{tenant}``, API key, TLS unless
    ``insecure``. The client id names the replica, so two replicas never kick each other."""
    return mqtt.Settings(
        host=app.host,
        port=app.effective_port,
        username=app.username,
        password=app.api_key.reveal() if app.api_key is not None else None,
        tls=not app.insecure,
        ca_file=app.ca_file,
        client_id=f"blynk-bridge-{app.name}-{consumer}"[:128],
    )


class _Closed:
    pass


_CLOSE = _Closed()
_Item = tuple[str, bytes, Any]  # (stream, encoded entry, counter child to increment or None)


class Appender:
    """A bounded queue drained by one task that appends batches to Redis streams.

    :meth:`offer` never blocks (the receive loop must keep reading); it returns False when the
    queue is full. A batch is written when ``batch`` entries are waiting or ``linger_s`` after
    its first entry arrived, whichever comes first. Redis errors are retried with backoff until
    :meth:`close` and the stage's grace period run out; entries are never reordered.

    A batch goes to Redis through :meth:`pipeline.streams.StreamWriter.add_many` (one Lua call
    per stream, all-or-nothing per stream).
    """

    def __init__(self, redis: Redis, *, batch: int = 1000, queue_max: int = 100_000,
                 linger_s: float = 0.005, max_backoff_s: float = 30.0,
                 on_written: Callable[[int], None] | None = None) -> None:
        self._redis = redis
        self._on_written = on_written
        self._writer = StreamWriter(redis)
        self._batch = batch
        self._linger_s = linger_s
        self._queue: asyncio.Queue[_Item | _Closed] = asyncio.Queue(queue_max)
        self._max_backoff_s = max_backoff_s

    def offer(self, stream: str, data: bytes, counter: Any = None) -> bool:
        try:
            self._queue.put_nowait((stream, data, counter))
        except asyncio.QueueFull:
            return False
        return True

    async def run(self) -> None:
        """Write batches until :meth:`close` was called and everything before it is written."""
        queue = self._queue
        while True:
            first = await queue.get()
            if isinstance(first, _Closed):
                return
            if queue.qsize() < self._batch and self._linger_s:
                # Messages arrive one per loop iteration: without a short linger every round
                # trip would carry one entry, and round trips would set the pace.
                await asyncio.sleep(self._linger_s)
            batch = [first]
            closed = False
            while len(batch) < self._batch and not queue.empty():
                item = queue.get_nowait()
                if isinstance(item, _Closed):
                    closed = True
                    break
                batch.append(item)
            await self._write(batch)
            if closed:
                return

    async def _write(self, batch: list[_Item]) -> None:
        items = [(stream, data) for stream, data, _ in batch]
        failures = 0
        while True:
            try:
                await self._writer.add_many(items)
                break
            except RedisError as exc:
                failures += 1
                delay = backoff_s(failures, self._max_backoff_s)
                log.warning("appending %d entries failed (%s); retry in %.1fs", len(batch), exc,
                            delay)
                await asyncio.sleep(delay)
        counts: dict[int, list[Any]] = {}
        for _, _, counter in batch:
            if counter is not None:
                seen = counts.get(id(counter))
                if seen is None:
                    counts[id(counter)] = [counter, 1]
                else:
                    seen[1] += 1
        for counter, n in counts.values():
            counter.inc(n)
        if self._on_written is not None:
            self._on_written(len(batch))

    async def close(self) -> None:
        """Ask :meth:`run` to return once everything offered so far is written."""
        await self._queue.put(_CLOSE)


class IngestMqtt:
    """The ingest-mqtt stage (see the module docstring for its contract).

    Everything a test needs is injectable: the applications, the consumer (replica) name, the
    lease time, the backoff cap, the connection settings of an application, and
    ``on_appended(n)``, called after each batch of ``n`` entries is in Redis.
    """

    name = STAGE

    def __init__(
        self,
        ctx: Context,
        *,
        apps: Sequence[TtsApplication] | None = None,
        consumer: str | None = None,
        lease_ttl_ms: int | None = None,
        max_backoff_s: float | None = None,
        settings_for: SettingsFor = default_settings,
        on_appended: Callable[[int], None] | None = None,
    ) -> None:
        cfg = ctx.config.ingest_mqtt
        self._ctx = ctx
        self._keys = ctx.keys
        self.apps = list(ctx.config.tts if apps is None else apps)
        self.consumer = consumer or ctx.consumer
        self.lease_ttl_ms = lease_ttl_ms or cfg.lease_ttl_ms
        self._max_backoff_s = max_backoff_s if max_backoff_s is not None else cfg.max_backoff_s
        self._max_payload = cfg.max_payload_bytes
        self._settings_for = settings_for
        self._board = StatusBoard(ctx.redis, ctx.keys)
        self._appender = Appender(ctx.redis, batch=cfg.batch, queue_max=cfg.queue_max,
                                  max_backoff_s=self._max_backoff_s, on_written=on_appended)
        #: Set while this replica owns an application and is subscribed (for tests and tools).
        self.subscribed: dict[str, asyncio.Event] = {a.name: asyncio.Event() for a in self.apps}

    async def startup(self) -> None:
        await self._ctx.redis.ping()

    async def shutdown(self) -> None:
        """Nothing to release: leases are released and the queue drained by ``main_loop``."""

    async def main_loop(self, stop: asyncio.Event) -> None:
        """Hold (or stand by for) every application until ``stop``; then stop reading, write
        what was read, and release the leases."""
        appender = asyncio.create_task(self._appender.run(), name="ingest-mqtt-appender")
        try:
            async with asyncio.TaskGroup() as tg:
                for app in self.apps:
                    tg.create_task(self._run_app(app, stop), name=f"ingest-mqtt:{app.name}")
                if not self.apps:
                    tg.create_task(stop.wait())
        finally:
            await self._appender.close()
            await appender

    async def _run_app(self, app: TtsApplication, stop: asyncio.Event) -> None:
        lease = Lease(self._ctx.redis, self._keys.lease(STATUS_KIND, app.name), self.consumer,
                      self.lease_ttl_ms)
        held = metrics.LEASE_HELD.labels(STATUS_KIND, app.name)

        async def acquired() -> None:
            held.set(1)

        async def lost() -> None:
            held.set(0)
            self.subscribed[app.name].clear()

        await hold(lease, lambda: self._consume(app), stop, on_acquired=acquired, on_lost=lost)

    async def _consume(self, app: TtsApplication) -> None:
        """Connect, subscribe and read until cancelled (the lease is lost or the stage stops)."""
        settings = self._settings_for(app, self.consumer)
        topics = mqtt.app_topics(app.username, TOPICS)
        failures = 0
        while True:
            error: str
            kind: ErrorKind
            try:
                async with mqtt.Session(settings) as session:
                    await session.subscribe(topics)
                    failures = 0
                    metrics.MQTT_CONNECTS.labels(app.name, "ok").inc()
                    log.info("%s: connected to %s:%d as %s", app.name, settings.host,
                             settings.port, settings.username)
                    await self._status(app, None, None)
                    self.subscribed[app.name].set()
                    try:
                        await self._receive(app, session)
                    finally:
                        self.subscribed[app.name].clear()
                continue  # pragma: no cover - _receive only ends by raising
            except mqtt.AuthError as exc:
                error, kind = exc.detail, "credentials"
            except (mqtt.Unreachable, mqtt.ConnectionLost) as exc:
                error, kind = exc.detail, "unreachable"
            except mqtt.MqttError as exc:
                error, kind = exc.detail, "protocol"
            failures += 1
            metrics.MQTT_CONNECTS.labels(app.name, kind).inc()
            delay = backoff_s(failures, self._max_backoff_s)
            log.warning("%s: %s (%s); reconnecting in %.1fs", app.name, error, kind, delay)
            await self._status(app, error, kind)
            await asyncio.sleep(delay)

    async def _status(self, app: TtsApplication, error: str | None,
                      kind: ErrorKind | None) -> None:
        try:
            if error is None or kind is None:
                await self._board.connected(STATUS_KIND, app.name, owner=self.consumer)
            else:
                await self._board.failed(STATUS_KIND, app.name, error, kind, owner=self.consumer)
        except RedisError as exc:
            log.warning("%s: cannot record status (%s)", app.name, exc)

    async def _receive(self, app: TtsApplication, session: mqtt.Session) -> None:
        """The hot loop: decode, hand off, never wait for Redis."""
        received = metrics.MQTT_RECEIVED.labels(app.name)
        dropped = metrics.INGEST_DROPPED.labels("tts", app.name)
        ingested: dict[str, Any] = {}
        stream_for = self._keys.stream_for
        offer = self._appender.offer
        encode = events.encode
        max_bytes = self._max_payload
        unreported = 0
        try:
            async for topic, payload in session.messages():
                # Counted per message, published in steps: a Prometheus inc() per message
                # costs a tenth of parsing it.
                unreported += 1
                if unreported == 64:
                    received.inc(64)
                    unreported = 0
                try:
                    event = parse_event(payload, app, received_ts_ms=now_ms(),
                                        max_bytes=max_bytes)
                except InvalidInput as exc:
                    self._dead_letter(app, topic, payload, exc)
                    continue
                if isinstance(event, Skipped):
                    metrics.TTS_SKIPPED.labels(app.name, event.reason).inc()
                    log.debug("%s: %s from %s %s", app.name, event.reason, event.device,
                              ",".join(event.correlation_ids))
                    continue
                counter = ingested.get(event.kind)
                if counter is None:
                    counter = ingested[event.kind] = metrics.INGESTED.labels(
                        "tts", app.name, event.kind)
                if not offer(stream_for(UPLINKS, "tts", event.device), encode(event), counter):
                    dropped.inc()
        finally:
            received.inc(unreported)

    def _dead_letter(self, app: TtsApplication, topic: str, payload: bytes,
                     exc: InvalidInput) -> None:
        detail = exc.detail if exc.field is None else f"{exc.detail} (field {exc.field})"
        log.warning("%s: %s on %s: %s", app.name, exc.reason, topic, detail[:300])
        metrics.REJECTED.labels("tts", exc.reason).inc()
        dead = events.DeadLetter(
            stream=topic,
            entry_id="",
            raw=payload[:DEAD_RAW_BYTES],
            stage=STAGE,
            reason=exc.reason,
            detail=detail[:2000],
            attempts=1,
            dead_ts_ms=now_ms(),
        )
        if self._appender.offer(self._keys.dead, events.encode(dead),
                                metrics.DEAD.labels(STAGE, exc.reason)):
            return
        metrics.INGEST_DROPPED.labels("tts", app.name).inc()


def build(ctx: Context) -> IngestMqtt:
    return IngestMqtt(ctx)
