"""ingest-mqtt: The Things Stack MQTT uplinks → the uplinks stream.

One MQTT session per configured TTS application and replica; one replica at a time *owns* an
application through a Redis lease and appends its messages. TTS has no shared subscriptions
(every subscriber gets every message) and no offline queue (QoS 0), so:

* **Owner.** Appends what it receives. An owner that cannot confirm its lease stops appending at
  once (and releases the lease when it stops), so 3 replicas never triple the data.
* **Warm standby** (``ingest_mqtt.warm_standby``, default on). The other replicas subscribe too
  but append nothing: they keep the raw messages of the last ``lease_ttl_ms`` + the acquisition
  interval (``ttl/4``) + ``standby_margin_ms`` in memory (:class:`StandbyBuffer`, also bounded
  by count and bytes). The standby that acquires the lease (within ``lease_ttl_ms`` + ``ttl/4``
  of the owner's death) first appends that buffer, parsed as usual with each message's own
  receipt time, then goes live on the session it already has: nothing published during the
  failover is lost. The replayed messages the dead owner had already written are duplicates
  with the same ``event_id`` (TTS ``as:up:`` correlation ids, else a hash of the message's own
  fields: never the receipt time), which transform drops. Replayed entries are counted
  (``bb_mqtt_replayed_total``); a buffer that had to let messages go before their time is
  counted too (``bb_mqtt_standby_overflow_total``).
* **Owner cut off from the broker.** Each replica keeps itself in a Redis set of replicas
  whose session of the application is up. An owner whose own connection has been down for
  ``handover_after_ms`` while another replica's is up gives the lease up (counted in
  ``bb_mqtt_handovers_total``); that standby takes over and replays what it kept, so nothing
  published meanwhile is lost. A replica that is not connected never acquires the lease while
  a connected one exists; when none is connected (the broker is down), the owner stays and
  keeps reporting the status.
* **Cold standby** (``warm_standby: false``): standbys neither connect nor subscribe; what is
  published between the owner's death and the new owner's subscription is lost.

The receive loop only decodes and hands off: each message becomes an encoded ``Uplink`` (or a
``DeadLetter``) on a bounded queue, and one appender task writes the queue in batches (one
``XADD``-loop script call per stream, see :class:`Appender`), so a burst never makes the broker
drop messages for a slow reader. TTS is QoS 0: a message is "acknowledged" by nothing, so what
matters is reading fast. If Redis is away long
enough for the queue to fill, new messages are dropped and counted (``bb_ingest_dropped_total``).

Malformed payloads (not JSON, wrong shape, too large, no decoded payload) are dead-lettered with
a reason code and counted; downlink outcomes (``down/queued|sent|ack|nack|failed``) and service
data are counted (``bb_tts_skipped_total``) and logged at debug level.

Status per application (kind ``tts``) is the owner's: Connected after subscribing; a failed
connection is Not Connected (never connected) or Broken (was connected), with ``credentials``
told apart from ``unreachable``; reconnection uses capped, jittered backoff and sets Connected
again by itself. A standby never writes the status (its own connection trouble must not flip
the integration to Broken); it reports itself in its log and in ``bb_mqtt_standby`` /
``bb_mqtt_standby_buffered``, and ``bb_lease_held`` says which replica owns.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import msgspec
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from pipeline import events, metrics, mqtt
from pipeline.batching import Linger
from pipeline.config import TtsApplication
from pipeline.consumer import backoff_s
from pipeline.context import Context
from pipeline.errors import InvalidInput, Reason
from pipeline.keys import UPLINKS
from pipeline.lease import Lease, hold
from pipeline.lifecycle import cancel_and_wait, wait_event
from pipeline.status import ErrorKind, StatusBoard
from pipeline.streams import Redis, StreamWriter, now_ms
from pipeline.tts import Skipped, parse_event

log = logging.getLogger("blynk_bridge.ingest_mqtt")

STAGE = "ingest-mqtt"
STATUS_KIND = "tts"
#: How long a warm application's session and advertiser get to end once it stops (they are
#: cancelled again meanwhile; each ends at its next await).
STOP_REAP_S = 5.0
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

SettingsFor = Callable[[TtsApplication, str], mqtt.Settings]


def default_settings(app: TtsApplication, consumer: str) -> mqtt.Settings:
    """Connection settings from the configuration: ``{app}@{tenant}``, API key, TLS unless
    ``insecure``. The client id names the TTS application (its id, not the local name: two
    bridges on one broker may both call theirs ``lab``) and the replica, so no two sessions kick
    each other off."""
    return mqtt.Settings(
        host=app.host,
        port=app.effective_port,
        username=app.username,
        password=app.api_key.reveal() if app.api_key is not None else None,
        tls=not app.insecure,
        ca_file=app.ca_file,
        client_id=f"blynk-bridge-{app.app_id}-{consumer}"[:128],
    )


class _Closed:
    pass


_CLOSE = _Closed()
_Item = tuple[str, bytes, Any]  # (stream, encoded entry, counter child to increment or None)


class Appender:
    """A bounded queue drained by one task that appends batches to Redis streams.

    :meth:`offer` never blocks (the receive loop must keep reading); it returns False when the
    queue is full. One batch is written at a time: what is waiting when the previous write
    returned (natural batching), at most ``batch`` entries — a lone message after a quiet spell
    is written at once, and a burst arriving during a write goes in the next one. Only while
    more than ``linger_above_per_s`` entries per second arrive (:class:`~pipeline.batching
    .Linger`; 0 = always) does a batch wait ``linger_s`` after its first entry to fill, for
    fewer round trips per entry at high rates. Redis errors are retried with backoff until
    :meth:`close` and the stage's grace period run out; entries are never reordered.

    A batch goes to Redis through :meth:`pipeline.streams.StreamWriter.add_many` (one Lua call
    per stream, all-or-nothing per stream). On a Redis Cluster each stream (partition) has a
    lane of its own instead: a batch is split by stream, and each lane writes its entries in
    order (at most ``batch`` per call, retried as above) without waiting for the others, so a
    master that does not answer holds up only its own partitions' appends. What waits in the
    lanes counts against ``queue_max`` too (then :meth:`offer` refuses).
    """

    def __init__(self, redis: Redis, *, batch: int = 1000, queue_max: int = 100_000,
                 linger_s: float = 0.005, linger_above_per_s: float = 0.0,
                 max_backoff_s: float = 30.0,
                 on_written: Callable[[int], None] | None = None) -> None:
        self._redis = redis
        self._on_written = on_written
        self._writer = StreamWriter(redis)
        self._batch = batch
        self._linger = Linger(linger_s, linger_above_per_s)
        self._queue: asyncio.Queue[_Item | _Closed] = asyncio.Queue(queue_max)
        self._queue_max = queue_max
        self._max_backoff_s = max_backoff_s
        #: Redis Cluster: entries waiting per stream, the task writing each busy lane, and
        #: how many entries wait in all lanes.
        self._lanes: dict[str, collections.deque[_Item]] | None = (
            {} if isinstance(redis, RedisCluster) else None)
        self._lane_tasks: dict[str, asyncio.Task[None]] = {}
        self._in_lanes = 0

    def offer(self, stream: str, data: bytes, counter: Any = None) -> bool:
        if self._in_lanes and self._in_lanes + self._queue.qsize() >= self._queue_max:
            return False
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
                await self._lanes_drained()
                return
            linger = self._linger
            if queue.qsize() < self._batch and linger.active(time.monotonic()):
                # At high rates a write per round trip would carry a few entries each: wait
                # for the batch to fill (CPU per entry), as the rate allows it.
                await asyncio.sleep(linger.linger_s)
            batch = [first]
            closed = False
            while len(batch) < self._batch and not queue.empty():
                item = queue.get_nowait()
                if isinstance(item, _Closed):
                    closed = True
                    break
                batch.append(item)
            linger.note(len(batch), time.monotonic())
            if self._lanes is None:
                await self._write(batch)
            else:
                self._to_lanes(self._lanes, batch)
            if closed:
                await self._lanes_drained()
                return

    def _to_lanes(self, lanes: dict[str, collections.deque[_Item]], batch: list[_Item]) -> None:
        for item in batch:
            lane = lanes.get(item[0])
            if lane is None:
                lane = lanes[item[0]] = collections.deque()
            lane.append(item)
        self._in_lanes += len(batch)
        for stream, lane in lanes.items():
            if lane and stream not in self._lane_tasks:
                self._lane_tasks[stream] = asyncio.create_task(
                    self._drain_lane(stream, lane), name=f"ingest-mqtt-append-{stream}")

    async def _drain_lane(self, stream: str, lane: collections.deque[_Item]) -> None:
        """Write one stream's lane in order until it is empty."""
        try:
            while lane:
                items = [lane.popleft() for _ in range(min(len(lane), self._batch))]
                try:
                    await self._write(items)
                finally:
                    self._in_lanes -= len(items)
        finally:
            del self._lane_tasks[stream]

    async def _lanes_drained(self) -> None:
        """Wait until every lane is written (raising what a lane's task raised: a bug)."""
        while self._lane_tasks:
            await asyncio.gather(*self._lane_tasks.values())

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


#: Buffered messages replayed per step before yielding to the event loop (lease renewals and
#: the broker connection must not wait for a long replay).
REPLAY_CHUNK = 500


class StandbyBuffer:
    """A warm standby's memory: the raw messages of the last ``window_s`` seconds, oldest
    first, bounded by count and bytes (pure: the caller passes the clock).

    :meth:`add` forgets messages older than the window (unless ``expire=False``: while a replay
    drains the buffer nothing may age out) and, past a bound, the oldest ones; it returns how
    many it let go because of a bound (still inside the window: a failover then could lose them).
    """

    def __init__(self, window_s: float, max_messages: int, max_bytes: int) -> None:
        self.window_s = window_s
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        #: Payload and topic bytes held.
        self.bytes = 0
        self._items: collections.deque[tuple[float, int, str, bytes]] = collections.deque()

    def __len__(self) -> int:
        return len(self._items)

    def add(self, now_s: float, received_ts_ms: int, topic: str, payload: bytes, *,
            expire: bool = True) -> int:
        items = self._items
        items.append((now_s, received_ts_ms, topic, payload))
        self.bytes += len(topic) + len(payload)
        if expire:
            self.expire(now_s)
        overflow = 0
        while items and (len(items) > self.max_messages or self.bytes > self.max_bytes):
            self._pop()
            overflow += 1
        return overflow

    def expire(self, now_s: float) -> None:
        """Forget messages received more than ``window_s`` before ``now_s``."""
        items, horizon = self._items, now_s - self.window_s
        while items and items[0][0] < horizon:
            self._pop()

    def take(self, n: int) -> list[tuple[int, str, bytes]]:
        """Remove and return up to ``n`` of the oldest messages as
        ``(received_ts_ms, topic, payload)``; empty when the buffer is."""
        items = self._items
        out: list[tuple[int, str, bytes]] = []
        while items and len(out) < n:
            _, received_ts_ms, topic, payload = items.popleft()
            self.bytes -= len(topic) + len(payload)
            out.append((received_ts_ms, topic, payload))
        return out

    def _pop(self) -> None:
        _, _, topic, payload = self._items.popleft()
        self.bytes -= len(topic) + len(payload)


class _Feed:
    """One application's intake on this replica: parses and hands messages to the appender
    (:meth:`handle`), or keeps them in :attr:`buffer` while standing by."""

    def __init__(self, app: TtsApplication, stage: IngestMqtt, buffer: StandbyBuffer) -> None:
        self.app = app
        self.buffer = buffer
        #: Owner, buffer replayed: messages are parsed and appended as they come.
        self.live = False
        #: Owner, draining the buffer: new messages queue behind it and may not age out.
        self.replaying = False
        #: The MQTT session is subscribed.
        self.connected = False
        #: Monotonic time the session was last lost (or the feed made): None while connected.
        self.disconnected_at: float | None = time.monotonic()
        #: Events set on every change of ``connected`` (:meth:`watch`).
        self._watchers: list[asyncio.Event] = []
        self._keys = stage._keys
        self._offer = stage._appender.offer
        self._max_bytes = stage._max_payload
        self._ingested: dict[str, Any] = {}
        self._dropped = metrics.INGEST_DROPPED.labels("tts", app.name)

    @property
    def owner(self) -> bool:
        return self.live or self.replaying

    @contextlib.contextmanager
    def watch(self) -> Iterator[asyncio.Event]:
        """An event set on every change of ``connected`` while the block runs (the waiter
        clears it)."""
        event = asyncio.Event()
        self._watchers.append(event)
        try:
            yield event
        finally:
            self._watchers.remove(event)

    def set_connected(self, connected: bool) -> None:
        self.connected = connected
        self.disconnected_at = None if connected else time.monotonic()
        for event in self._watchers:
            event.set()

    def handle(self, topic: str, payload: bytes, received_ts_ms: int) -> None:
        """Parse one message and hand it to the appender; never blocks, never raises."""
        app = self.app
        try:
            event = parse_event(payload, app, received_ts_ms=received_ts_ms,
                                max_bytes=self._max_bytes)
        except InvalidInput as exc:
            self._dead_letter(topic, payload, exc)
            return
        except Exception as exc:
            # A parser bug must not stop the application's intake (nor hand the lease around):
            # the message is dead-lettered, counted and logged with its traceback.
            log.exception("%s: parsing a message on %s failed", app.name, topic)
            self._dead_letter(topic, payload, InvalidInput(
                f"{type(exc).__name__}: {exc}", reason=Reason.PARSE_FAILED))
            return
        if isinstance(event, Skipped):
            metrics.TTS_SKIPPED.labels(app.name, event.reason).inc()
            log.debug("%s: %s from %s %s", app.name, event.reason, event.device,
                      ",".join(event.correlation_ids))
            return
        if event.event_ts_clamped:
            metrics.EVENT_TIME_CLAMPED.labels("tts", app.name).inc()
        counter = self._ingested.get(event.kind)
        if counter is None:
            counter = self._ingested[event.kind] = metrics.INGESTED.labels(
                "tts", app.name, event.kind)
        try:
            data = events.encode(event)
        except (OverflowError, msgspec.EncodeError) as exc:  # e.g. an f_cnt past 64 bits
            self._dead_letter(topic, payload, InvalidInput(
                f"message holds a value that cannot be stored: {exc}", reason=Reason.UNENCODABLE))
            return
        if not self._offer(self._keys.stream_for(UPLINKS, "tts", event.device), data, counter):
            self._dropped.inc()

    def _dead_letter(self, topic: str, payload: bytes, exc: InvalidInput) -> None:
        detail = exc.detail if exc.field is None else f"{exc.detail} (field {exc.field})"
        log.warning("%s: %s on %s: %s", self.app.name, exc.reason, topic, detail[:300])
        metrics.REJECTED.labels("tts", exc.reason).inc()
        dead = events.dead_letter(stream=topic, entry_id="", raw=payload, stage=STAGE,
                                  reason=exc.reason, detail=detail, attempts=1,
                                  dead_ts_ms=now_ms())
        if not self._offer(self._keys.dead, events.encode(dead),
                           metrics.DEAD.labels(STAGE, exc.reason)):
            self._dropped.inc()


class IngestMqtt:
    """The ingest-mqtt stage (see the module docstring for its contract).

    Everything a test needs is injectable: the applications, the consumer (replica) name, the
    lease time, the backoff cap, warm or cold standby, the connection settings of an
    application, and ``on_appended(n)``, called after each batch of ``n`` entries is in Redis.
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
        warm_standby: bool | None = None,
        settings_for: SettingsFor = default_settings,
        on_appended: Callable[[int], None] | None = None,
    ) -> None:
        cfg = ctx.config.ingest_mqtt
        self._ctx = ctx
        self._keys = ctx.keys
        self.apps = list(ctx.config.tts if apps is None else apps)
        self.consumer = consumer or ctx.consumer
        self.lease_ttl_ms = lease_ttl_ms or cfg.lease_ttl_ms
        self.handover_after_s = cfg.handover_after_ms / 1000
        self.warm_standby = cfg.warm_standby if warm_standby is None else warm_standby
        self._max_backoff_s = max_backoff_s if max_backoff_s is not None else cfg.max_backoff_s
        self._max_payload = cfg.max_payload_bytes
        self._settings_for = settings_for
        self._board = StatusBoard(ctx.redis, ctx.keys)
        self._appender = Appender(ctx.redis, batch=cfg.batch, queue_max=cfg.queue_max,
                                  linger_s=cfg.linger_ms / 1000,
                                  linger_above_per_s=cfg.linger_above_per_s,
                                  max_backoff_s=self._max_backoff_s, on_written=on_appended)
        # The longest a failover can take: the lease runs out, then one acquisition interval;
        # or the owner's broker connection is down past handover_after_ms, then one check and
        # one acquisition interval.
        window_s = (self.lease_ttl_ms * 1.25 + cfg.handover_after_ms
                    + cfg.standby_margin_ms) / 1000
        self._feeds = {
            a.name: _Feed(a, self, StandbyBuffer(window_s, cfg.standby_max_messages,
                                                 cfg.standby_max_bytes))
            for a in self.apps
        }
        #: Set while this replica owns an application, has replayed its standby buffer and is
        #: subscribed (for tests and tools).
        self.subscribed: dict[str, asyncio.Event] = {a.name: asyncio.Event() for a in self.apps}
        #: Set while this replica's session of an application is subscribed, owner or standby.
        self.connected: dict[str, asyncio.Event] = {a.name: asyncio.Event() for a in self.apps}

    async def startup(self) -> None:
        for app in self.apps:
            if app.insecure:
                log.warning("%s: insecure: true — the TTS API key goes to %s:%d in clear text "
                            "(plain MQTT, no TLS); anyone on the path can read it",
                            app.name, app.host, app.effective_port)
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
        feed = self._feeds[app.name]
        if not self.warm_standby:
            await hold(lease, lambda: self._own_cold(app, feed), stop)
            return
        # Warm: the session lives as long as the stage; the lease only decides what the
        # receive loop does with a message (append it, or keep it in the standby buffer).
        async with asyncio.TaskGroup() as tg:
            session = tg.create_task(self._consume(app, feed),
                                     name=f"ingest-mqtt-session:{app.name}")
            advertiser = tg.create_task(self._advertise(app, feed),
                                        name=f"ingest-mqtt-advertise:{app.name}")

            async def may_acquire() -> bool:
                # Not connected: leave the application to a replica whose session is up.
                return feed.connected or not await self._others_connected(app)

            await hold(lease, lambda: self._own(app, feed), stop, may_acquire=may_acquire)
            # Cancelled again until they end: a cancel lost in a Redis call (the advertiser
            # writes every lease_ttl/4) would otherwise keep the group, and the stop, waiting.
            await cancel_and_wait([session, advertiser], STOP_REAP_S)

    async def _advertise(self, app: TtsApplication, feed: _Feed) -> None:
        """Keep this replica in the application's set of connected replicas while its session
        is up (an entry expires by itself after the lease time), out of it otherwise."""
        key = self._keys.connected_replicas(STATUS_KIND, app.name)
        redis = self._ctx.redis
        interval = self.lease_ttl_ms / 4000
        try:
            with feed.watch() as changed:
                while True:
                    changed.clear()
                    try:
                        if feed.connected:
                            now = now_ms()
                            async with redis.pipeline(transaction=False) as pipe:
                                pipe.zadd(key, {self.consumer: now + self.lease_ttl_ms})
                                pipe.zremrangebyscore(key, "-inf", now)
                                pipe.pexpire(key, 10 * self.lease_ttl_ms)
                                await pipe.execute()
                        else:
                            await redis.zrem(key, self.consumer)
                    except RedisError as exc:
                        log.warning("%s: cannot record the session's state (%s)", app.name, exc)
                    await wait_event(changed, interval)
        finally:
            with contextlib.suppress(RedisError):
                await asyncio.shield(redis.zrem(key, self.consumer))

    async def _others_connected(self, app: TtsApplication) -> bool:
        """Another replica says its session of ``app`` is up (Redis trouble: False)."""
        key = self._keys.connected_replicas(STATUS_KIND, app.name)
        try:
            members = await self._ctx.redis.zrangebyscore(key, now_ms(), "+inf")
        except RedisError:
            return False
        me = self.consumer.encode()
        return any(m != me for m in members)

    async def _own(self, app: TtsApplication, feed: _Feed) -> None:
        """While the lease is held (warm): replay the standby buffer, go live, report; until
        cancelled (lease lost, or stop), then stand by again at once."""
        held = metrics.LEASE_HELD.labels(STATUS_KIND, app.name)
        held.set(1)
        feed.replaying = True
        self._sync(app, feed)
        try:
            replayed = await self._replay(app, feed)
            feed.replaying, feed.live = False, True
            log.info("%s: owner now; %d buffered messages appended first", app.name, replayed)
            if feed.connected:
                await self._status(app, None, None)
            self._sync(app, feed)
            await self._until_handover(app, feed)
        finally:
            # Synchronous, before the lease is released: no message is appended from now on.
            feed.live = feed.replaying = False
            held.set(0)
            self._sync(app, feed)
            log.info("%s: standing by", app.name)

    async def _until_handover(self, app: TtsApplication, feed: _Feed) -> None:
        """Own until cancelled; return (and so give the lease up) once this replica's broker
        connection has been down for ``handover_after_ms`` while another replica's is up."""
        interval = self.lease_ttl_ms / 4000
        with feed.watch() as changed:
            while True:
                changed.clear()
                down_since = feed.disconnected_at
                if down_since is None:
                    await changed.wait()
                    continue
                wait = down_since + self.handover_after_s - time.monotonic()
                if wait <= 0 and await self._others_connected(app):
                    log.warning("%s: broker connection down for %.1fs and a standby's is up: "
                                "handing the application over", app.name,
                                time.monotonic() - down_since)
                    metrics.MQTT_HANDOVERS.labels(app.name).inc()
                    return
                await wait_event(changed, wait if wait > 0 else interval)

    async def _replay(self, app: TtsApplication, feed: _Feed) -> int:
        """Append what the standby buffer holds, oldest first, in chunks; messages arriving
        meanwhile queue behind it, so the order is kept and nothing ages out."""
        buffer = feed.buffer
        buffer.expire(time.monotonic())
        counter = metrics.MQTT_REPLAYED.labels(app.name)
        replayed = 0
        while chunk := buffer.take(REPLAY_CHUNK):
            for received_ts_ms, topic, payload in chunk:
                feed.handle(topic, payload, received_ts_ms)
            counter.inc(len(chunk))
            replayed += len(chunk)
            await asyncio.sleep(0)  # let renewals and the broker connection run
        return replayed

    async def _own_cold(self, app: TtsApplication, feed: _Feed) -> None:
        """While the lease is held (cold): connect, subscribe and append until cancelled."""
        held = metrics.LEASE_HELD.labels(STATUS_KIND, app.name)
        held.set(1)
        feed.live = True
        try:
            await self._consume(app, feed)
        finally:
            feed.live = False
            held.set(0)
            self._sync(app, feed)

    def _sync(self, app: TtsApplication, feed: _Feed) -> None:
        """Bring the events and gauges in line with ``feed``."""
        for event, on in ((self.subscribed[app.name], feed.live and feed.connected),
                          (self.connected[app.name], feed.connected)):
            if on:
                event.set()
            else:
                event.clear()
        metrics.MQTT_STANDBY.labels(app.name).set(int(feed.connected and not feed.owner))
        metrics.MQTT_STANDBY_BUFFERED.labels(app.name).set(len(feed.buffer))

    async def _consume(self, app: TtsApplication, feed: _Feed) -> None:
        """Connect, subscribe and read until cancelled; reconnect with backoff."""
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
                    log.info("%s: connected to %s:%d as %s (%s)", app.name, settings.host,
                             settings.port, settings.username,
                             "owner" if feed.owner else "warm standby")
                    feed.set_connected(True)
                    try:
                        if feed.live:
                            await self._status(app, None, None)
                        self._sync(app, feed)
                        await self._receive(app, session, feed)
                    finally:
                        feed.set_connected(False)
                        self._sync(app, feed)
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
            role = "" if feed.owner else "standby: "
            log.warning("%s: %s%s (%s); reconnecting in %.1fs", app.name, role, error, kind,
                        delay)
            if feed.owner:
                # A standby's own trouble is not the integration's: the owner's status stands.
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

    async def _receive(self, app: TtsApplication, session: mqtt.Session, feed: _Feed) -> None:
        """The hot loop: hand off (owner) or keep (standby), never wait for Redis."""
        received = metrics.MQTT_RECEIVED.labels(app.name)
        overflow = metrics.MQTT_STANDBY_OVERFLOW.labels(app.name)
        buffered = metrics.MQTT_STANDBY_BUFFERED.labels(app.name)
        handle = feed.handle
        keep = feed.buffer.add
        monotonic = time.monotonic
        unreported = kept = 0
        try:
            async for topic, payload in session.messages():
                if feed.live:
                    # Counted per message, published in steps: a Prometheus inc() per message
                    # costs a tenth of parsing it.
                    unreported += 1
                    if unreported == 64:
                        received.inc(64)
                        unreported = 0
                    handle(topic, payload, now_ms())
                    continue
                lost = keep(monotonic(), now_ms(), topic, payload, expire=not feed.replaying)
                if lost:
                    overflow.inc(lost)
                kept += 1
                if kept == 64:
                    buffered.set(len(feed.buffer))
                    kept = 0
        finally:
            received.inc(unreported)


def build(ctx: Context) -> IngestMqtt:
    return IngestMqtt(ctx)
