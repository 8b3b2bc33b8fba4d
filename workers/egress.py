"""egress: ``BlynkWrite``s → Blynk, one ``batch/update`` per device per flush, in event-time order.

Contract:

* **Reads** the writes stream (group ``egress``) in batches and holds the entries in memory per
  device. A **flush** happens when the held entries of ready devices reach ``flush_count`` or
  ``flush_bytes``, or the oldest has waited ``flush_age_ms``. A flush coalesces each ready device's
  entries (:mod:`pipeline.coalesce`); one script call for all its devices
  (:meth:`pipeline.order.LastWritten.prepare`) skips devices with nothing newer than Blynk has,
  and takes each other device's lease, last written times and one rate-limit slot
  (:mod:`pipeline.ratelimit`); then it sends per device: history uploads first (backlog with
  true times), then ONE ``batch/update`` with the current values, so the current value lands
  last.
* **Acks** an entry only after Blynk answered 2xx for everything it carried (or its values
  proved stale), or after it was dead-lettered. Acks are shielded from cancellation.
* **Retryable answers** (5xx, timeouts, connection loss, 429) never ack and never re-read: the
  entries stay *in memory* and the device (429) or the whole server (5xx/outage) backs off with
  capped jittered backoff or ``Retry-After``; after a server backoff one device probes before the
  others follow. Because the entries are not read again their delivery count does not grow, so an
  outage of any length cannot push them past ``max_deliveries``. While held, their idle time is
  reset every ``claim_idle_ms / 3`` (``XCLAIM … JUSTID``, which does not count a delivery) so
  other replicas do not take them over. When ``max_held`` entries are held, reading pauses: the
  backlog waits in Redis, not in memory. If the process dies, the entries are pending in Redis
  and another replica takes them over (XAUTOCLAIM): nothing is lost.
* **Permanent answers**: ``invalid_token`` marks the device broken in the registry and
  dead-letters all its entries; any other permanent answer is narrowed down to the pins that
  cause it (the pin Blynk names, else halving the pin set), the rest is written, and the entries
  that carried a failing pin are dead-lettered with the reason (original entry kept for replay).
  A refused history point dead-letters its entry; the current value is still written.
* **Stop**: no more reads; held entries of ready devices are sent and acked, devices in backoff
  are left pending in Redis; then return.
* **Burst mode** (``until_idle=True``): return once nothing is left to read and nothing is held.

Redis work of finished device writes is group-committed: the records and acks of the device
writes that finished while the previous call ran share one script call
(:meth:`pipeline.order.LastWritten.commit_many`); extra rate-limit slots and 429 deferrals
likewise. The Blynk server's integration status (``blynk``/server name) follows outages and
recoveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec
from redis.exceptions import RedisError

from pipeline import echo, metrics
from pipeline.blynk.outcomes import INVALID_TOKEN, Fail, Ok, Outcome, Retry
from pipeline.coalesce import DevicePlan, chunks, coalesce, drop_stale, split
from pipeline.consumer import backoff_s
from pipeline.context import Context
from pipeline.events import BlynkWrite, Value, decode_write
from pipeline.keys import GROUP_EGRESS, WRITES
from pipeline.lifecycle import Stage, collect_young_less_often
from pipeline.order import LastWritten
from pipeline.ratelimit import RateLimiter
from pipeline.redact import mask
from pipeline.registry import Registry
from pipeline.status import StatusBoard
from pipeline.streams import Entry, StreamReader, now_ms

log = logging.getLogger("blynk_bridge.egress")

#: Points per timestamped upload (Blynk's documented maximum).
MAX_UPLOAD_POINTS = 10_000
#: How long to wait before asking again for a device another replica is writing.
LEASE_RETRY_S = 0.05
#: After a read that drained the stream, the next read waits this long, so reads come in
#: batches instead of one Redis call per trickle of entries (entries wait for a flush anyway).
READ_PACE_S = 0.01
#: Device writes finishing within this long share one record-and-ack script call. It delays
#: only the ack and the device's next write, never a Blynk request.
COMMIT_LINGER_S = 0.005


@dataclass(slots=True)
class _Held:
    entry: Entry
    write: BlynkWrite
    arrived: float  # monotonic


@dataclass(slots=True)
class _Device:
    key: str
    queued: list[_Held] = field(default_factory=list)
    inflight: list[_Held] = field(default_factory=list)
    #: Monotonic time before which this device sends nothing (429, rate limit, busy lease).
    not_before: float = 0.0
    #: Consecutive 429s, for the backoff when Blynk gives no ``Retry-After``.
    attempts: int = 0
    #: Pin → newest history point already uploaded for the held entries (no double upload
    #: when a later request of the same write fails and the whole write is retried).
    history_done: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Commit:
    """One device write's record and acks (group-committed: see :meth:`EgressStage._finish`)."""

    #: None: nothing to record, no lease held (only acks).
    device_key: str | None
    written: dict[str, int]
    acks: list[Entry]


@dataclass(slots=True)
class _Server:
    """Server-wide backoff: an outage or 5xx holds every device of the server back."""

    failures: int = 0
    not_before: float = 0.0
    probing: bool = False


class _Again(Exception):
    """A retryable answer: the device's write is retried later, from memory."""

    def __init__(self, outcome: Retry) -> None:
        super().__init__(outcome.detail)
        self.outcome = outcome


class _InvalidToken(Exception):
    def __init__(self, outcome: Fail) -> None:
        super().__init__(outcome.detail)
        self.outcome = outcome


@dataclass(slots=True)
class _Result:
    """What one device write achieved."""

    written: dict[str, int] = field(default_factory=dict)  # pin → event time now in Blynk
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # pin → (reason, detail)
    #: pin → (reason, detail, event times of the history points Blynk refused)
    history_failed: dict[str, tuple[str, str, set[int]]] = field(default_factory=dict)
    values: int = 0
    again: Retry | None = None
    invalid_token: Fail | None = None
    last_ok_server: str | None = None


T = TypeVar("T")
R = TypeVar("R")


class _Batch(Generic[T, R]):
    """Group commit: calls made while the previous ``run`` was busy, or within ``linger_s`` of
    the first, share one ``run`` (one round trip).

    Device writes finish independently; without this each would need its own Redis round trips
    (and connections) to record, ack and rate-limit. ``run`` gets the items in call order and
    returns one result per item; its exception is handed to every caller of that batch.
    """

    def __init__(self, run: Callable[[list[T]], Awaitable[Sequence[R]]], max_batch: int = 1000,
                 linger_s: float = 0.0):
        self._run = run
        self._max = max_batch
        self._linger = linger_s
        self._items: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def __call__(self, item: T) -> R:
        return await self.submit(item)

    def submit(self, item: T) -> asyncio.Future[R]:
        """Queue ``item``; the future gets its result (``asyncio.shield`` it without a task)."""
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._items.append((item, fut))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="egress-group-commit")
        return fut

    async def _flush(self) -> None:
        try:
            while self._items:
                await asyncio.sleep(self._linger)  # let the callers of this moment join
                batch, self._items = self._items[: self._max], self._items[self._max :]
                try:
                    results = await self._run([item for item, _ in batch])
                except Exception as exc:  # handed to every waiter, who decides
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), result in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result(result)
        finally:
            self._flusher = None


class EgressStage:
    """The egress stage (see module docstring)."""

    name = "egress"

    def __init__(self, ctx: Context, *, until_idle: bool = False) -> None:
        self.ctx = ctx
        self.until_idle = until_idle
        cfg = ctx.config.egress
        streams = ctx.config.streams
        self.cfg = cfg
        self.reader = StreamReader(
            ctx.redis, ctx.keys, ctx.keys.streams(WRITES), GROUP_EGRESS, ctx.consumer,
            stage=self.name, batch=max(streams.batch, cfg.flush_count),
            block_ms=streams.block_ms, claim_idle_ms=streams.claim_idle_ms,
            max_deliveries=streams.max_deliveries,
        )
        timeout_s = ctx.config.blynk.timeout_s
        self.order = LastWritten(
            ctx.redis, ctx.keys, ctx.consumer, lease_ms=int(max(15.0, 3 * timeout_s) * 1000)
        )
        self.limiter = RateLimiter(ctx.redis, ctx.keys, cfg.per_device_rps)
        self.registry = Registry(ctx.redis, ctx.keys)
        self.status = StatusBoard(ctx.redis, ctx.keys)
        self._up: set[str] = set()  # Blynk servers last seen answering
        self.max_held = max(20 * cfg.flush_count, 1000)
        #: Blynk requests in flight (at most ``max_in_flight``) and callers waiting for a slot.
        self._in_flight = 0
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        #: Device writes waiting for a slot to be sent without a task (:meth:`_send_soon`).
        self._queued_sends: deque[tuple[_Device, DevicePlan, asyncio.Future[None]]] = deque()
        #: ``batch/update``s sent without a task (for tests and diagnostics).
        self.sent_now = 0
        self._devices: dict[str, _Device] = {}
        #: Devices that may have queued entries and nothing in flight: the only ones a flush
        #: or a deadline looks at (scanning every held device per wake-up was O(in flight)).
        self._waiting: dict[str, _Device] = {}
        self._written: dict[str, Any] = {}  # server → its bb_written counter child
        self._servers: dict[str, _Server] = {}
        self._held: dict[tuple[str, str], _Held] = {}
        self._tasks: set[asyncio.Future[None]] = set()  # device writes, status updates
        self._wake = asyncio.Event()
        self._client = ctx.blynk()
        self._commits: _Batch[_Commit, bool] = _Batch(self._commit_many, linger_s=COMMIT_LINGER_S)
        self._next_read_at = 0.0
        self._renewals = _Batch(self.order.claim)
        self._takes = _Batch(self.limiter.take)
        self._defers: _Batch[tuple[str, float], None] = _Batch(self._defer_many)
        self._live_ms = int(cfg.live_window_s * 1000)
        #: With Blynk webhooks configured, writes are announced to echo suppression first.
        self._echo_window_ms = (ctx.config.downlink.echo_window_ms
                                if ctx.config.blynk_webhooks else 0)

    # ---- lifecycle ---------------------------------------------------------------------

    async def startup(self) -> None:
        collect_young_less_often(GC_GEN0_THRESHOLD)
        await self.reader.ensure_group()

    async def shutdown(self) -> None:
        """Nothing to release: the Blynk client and Redis belong to the context."""

    async def main_loop(self, stop: asyncio.Event) -> None:
        """Read, hold, flush, until ``stop`` (or, in burst mode, until idle)."""
        await self.reader.ensure_group()
        keeper = asyncio.create_task(self._keep_claimed(), name="egress-keep-claimed")
        try:
            await self._run(stop)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, stop: asyncio.Event) -> None:
        read: asyncio.Task[list[Entry]] | None = None
        read_failures = 0
        drained = False  # burst mode: a read found nothing; read again once nothing is held
        stopper = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                if drained and not self._held and not self._tasks:
                    drained = False
                if read is None and not drained and len(self._held) < self.max_held:
                    read = asyncio.create_task(self._read())
                waiter = asyncio.create_task(self._wake.wait())
                waits: set[asyncio.Future[Any]] = {waiter, stopper}
                if read is not None:
                    waits.add(read)
                await asyncio.wait(waits, timeout=self._next_deadline(),
                                   return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                self._wake.clear()
                if read is not None and read.done():
                    done, read = read, None
                    try:
                        entries = done.result()
                        read_failures = 0
                    except RedisError as exc:
                        read_failures += 1
                        log.warning("egress: reading failed (%s); retrying", exc)
                        await asyncio.wait({stopper}, timeout=backoff_s(read_failures))
                        continue
                    if entries:
                        await self._hold(entries)
                    elif self.until_idle:
                        if not self._held and not self._tasks:
                            return
                        drained = True
                metrics.EGRESS_HELD.set(len(self._held))  # once per wake-up, not per device
                await self._flush(final=False)
        finally:
            stopper.cancel()
            if read is not None:
                # Finish a read in flight (it returns within block_ms) rather than cancel it:
                # entries Redis already delivered would stay pending under this consumer's
                # name, which a restarted process does not have (see pipeline.consumer).
                with contextlib.suppress(RedisError):
                    entries = await read
                    if entries:
                        await self._hold(entries)
        # Stopping: send what is ready now; devices in backoff stay pending in Redis.
        await self._flush(final=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _read(self) -> list[Entry]:
        """One batch: own pending entries first (one pass, after a restart), then new ones.

        Held entries stay pending until their write lands; the reader's own-pending pass uses a
        cursor, so it never serves an entry egress still holds.
        """
        if not self.until_idle:
            pause = self._next_read_at - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
        entries = await self.reader.read(block=not self.until_idle)
        if len(entries) < self.reader.batch:  # drained: let the next read gather a batch
            self._next_read_at = time.monotonic() + READ_PACE_S
        return entries

    def _next_deadline(self) -> float | None:
        """Seconds until the next flush or backoff expiry; ``None`` when nothing is due."""
        now = time.monotonic()
        deadline: float | None = None
        for dev in self._waiting.values():
            if not dev.queued or dev.inflight:
                continue
            server = self._servers.get(dev.queued[-1].write.server)
            if server is not None and server.failures and server.probing:
                continue  # the probe's answer wakes the loop
            at = max(dev.queued[0].arrived + self.cfg.flush_age_ms / 1000, dev.not_before,
                     server.not_before if server and server.failures else 0.0)
            deadline = at if deadline is None else min(deadline, at)
        return None if deadline is None else max(0.0, deadline - now)

    # ---- reading and holding -------------------------------------------------------------

    async def _hold(self, entries: list[Entry]) -> None:
        now = time.monotonic()
        bad: list[tuple[Entry, str, str]] = []
        for entry in entries:
            if (entry.stream, entry.id) in self._held:
                continue  # our own entry handed back by XAUTOCLAIM: already held
            try:
                if entry.data is None:
                    raise msgspec.DecodeError("no 'd' field")
                write = decode_write(entry.data)
            except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
                bad.append((entry, "undecodable", str(exc)))
                continue
            held = _Held(entry, write, now)
            self._held[(entry.stream, entry.id)] = held
            dev = self._devices.get(write.device_key)
            if dev is None:
                dev = self._devices[write.device_key] = _Device(write.device_key)
            dev.queued.append(held)
            if not dev.inflight:
                self._waiting[dev.key] = dev
        metrics.EGRESS_HELD.set(len(self._held))
        if bad:
            await asyncio.shield(self.reader.dead_letter(bad))

    async def _keep_claimed(self) -> None:
        """Reset the idle time of held entries so no other replica takes them over.

        ``XCLAIM … JUSTID`` keeps the delivery count: holding an entry through an outage does
        not bring it closer to ``max_deliveries``.
        """
        interval = max(0.05, self.reader.claim_idle_ms / 3000)
        while True:
            await asyncio.sleep(interval)
            by_stream: dict[str, list[Any]] = {}
            for stream, entry_id in list(self._held):
                by_stream.setdefault(stream, []).append(entry_id)
            if not by_stream:
                continue
            try:
                async with self.ctx.redis.pipeline(transaction=False) as pipe:
                    for stream, ids in by_stream.items():
                        for i in range(0, len(ids), 1000):
                            pipe.xclaim(stream, GROUP_EGRESS, self.ctx.consumer, 0,
                                        ids[i : i + 1000], justid=True)
                    await pipe.execute()
            except RedisError as exc:
                log.warning("egress: refreshing held entries failed (%s)", exc)

    # ---- flushing ------------------------------------------------------------------------

    def _ready(self, final: bool) -> list[_Device]:
        """Devices whose held entries may be sent now (a server in backoff sends one probe)."""
        now = time.monotonic()
        ready: list[_Device] = []
        count = 0
        oldest = now
        probes: set[str] = set()
        gone: list[str] = []
        for dev in self._waiting.values():
            if not dev.queued or dev.inflight:
                gone.append(dev.key)
                continue
            if dev.not_before > now:
                continue
            server_name = dev.queued[-1].write.server
            server = self._servers.get(server_name)
            if server is not None and server.failures:
                if server.probing or server.not_before > now or server_name in probes:
                    continue
                probes.add(server_name)
            ready.append(dev)
            count += len(dev.queued)
            oldest = min(oldest, dev.queued[0].arrived)
        for key in gone:
            del self._waiting[key]
        if not ready:
            return []
        due = (
            final
            or count >= self.cfg.flush_count
            or now - oldest >= self.cfg.flush_age_ms / 1000
        )
        if not due:  # the byte size only matters when nothing else made the flush due
            size = sum(len(h.entry.data or b"") for dev in ready for h in dev.queued)
            due = size >= self.cfg.flush_bytes
        if not due:
            return []
        for name in probes:
            self._servers[name].probing = True
        return ready

    async def _flush(self, *, final: bool) -> None:
        """Start one write per ready device (coalesce; lease, staleness and rate limit of every
        device in one script call)."""
        ready = self._ready(final)
        if not ready:
            return
        wall = now_ms()
        plans: list[tuple[_Device, DevicePlan]] = []
        for dev in ready:
            dev.inflight, dev.queued = dev.queued, []
            del self._waiting[dev.key]
            items = [(i, h.write) for i, h in enumerate(dev.inflight)]
            by_device = coalesce(items, now_ms=wall, live_window_ms=self._live_ms)
            plans.append((dev, by_device[dev.key]))
        try:
            claims = await self.order.prepare(
                [(d.key, {pin: p.ts_ms for pin, p in plan.pins.items()}) for d, plan in plans],
                self.limiter)
        except RedisError as exc:
            log.warning("egress: preparing a flush failed (%s); retrying", exc)
            for dev, _ in plans:
                if dev.inflight:
                    self._requeue(dev, not_before=time.monotonic() + backoff_s(1))
            self._release_probes(plans)
            return
        if self._echo_window_ms:
            await self._record_echoes(plans, claims, wall)
        now = time.monotonic()
        stale_values = coalesced = 0
        for (dev, plan), claim in zip(plans, claims, strict=True):
            if claim.granted:
                stale_values += len(drop_stale(plan, claim.last))
                coalesced += sum(len(h.write.pins) for h in dev.inflight) - len(plan.pins)
                if plan.backlog:
                    self._spawn(self._write(dev, plan), dev)
                else:
                    self._send_soon(dev, plan)
            elif claim.stale:  # Blynk already has newer values: nothing to send, ack them
                stale_values += len(plan.pins)
                self._spawn(self._finish(dev, plan, _Result(), wall, leased=False), dev)
            else:  # busy elsewhere, or the device's rate limit says wait
                wait = claim.wait_s or min(LEASE_RETRY_S, claim.busy_ms / 1000)
                self._requeue(dev, not_before=now + wait)
                self._release_probes([(dev, plan)])
        if stale_values:
            metrics.EGRESS_DROPPED.labels("stale").inc(stale_values)
        if coalesced:
            metrics.EGRESS_DROPPED.labels("coalesced").inc(coalesced)

    async def _record_echoes(self, plans: Sequence[tuple[_Device, DevicePlan]],
                             claims: Sequence[Any], wall: int) -> None:
        """Tell the downlink stage what is about to be written, before it is (Blynk fires its
        webhooks for these writes too: :mod:`pipeline.echo`). A failure only risks an echo."""
        writes = [(dev.key, plan.current()) for (dev, plan), claim in zip(plans, claims,
                                                                            strict=True)
                  if claim.granted]
        try:
            await echo.record(self.ctx.redis, self.ctx.keys, writes, wall, self._echo_window_ms)
        except RedisError as exc:
            log.warning("egress: recording echoes failed (%s)", exc)

    def _spawn(self, coro: Coroutine[Any, Any, None], dev: _Device | None) -> None:
        task = asyncio.create_task(coro, name=f"egress-{dev.key if dev else 'status'}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[None]) -> None:
        # Leave the set before waking the loop: it decides "idle" from the set.
        self._tasks.discard(task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            name = task.get_name() if isinstance(task, asyncio.Task) else "a device write"
            log.error("egress: %s failed", name, exc_info=task.exception())

    def _requeue(self, dev: _Device, *, not_before: float) -> None:
        dev.queued = dev.inflight + dev.queued
        dev.inflight = []
        if dev.queued:
            self._waiting[dev.key] = dev
        dev.not_before = max(dev.not_before, not_before)

    def _release_probes(self, plans: Sequence[tuple[_Device, DevicePlan]]) -> None:
        for _, plan in plans:
            server = self._servers.get(plan.server)
            if server is not None:
                server.probing = False

    # ---- writing one device --------------------------------------------------------------

    async def _write(self, dev: _Device, plan: DevicePlan, answer: Outcome | None = None) -> None:
        """Send one device's plan; then ack, dead-letter or requeue its entries.

        ``answer``: Blynk's answer to the plan's ``batch/update``, already sent by
        :meth:`_send_now` (its slot and server bookkeeping done there); used instead of sending
        the first request again.
        """
        result = _Result()
        claimed_at = time.monotonic()

        async def renew() -> None:
            nonlocal claimed_at
            while True:  # one more request of this device: wait for its next free slot
                wait = await self._takes(dev.key)
                if wait <= 0:
                    break
                await asyncio.sleep(wait)  # pacing: the exact time to the slot, not a guess
            if time.monotonic() - claimed_at > self.order.lease_ms / 3000:
                await self._renewals((dev.key, []))
                claimed_at = time.monotonic()

        first = True

        async def request(call: Callable[[], Awaitable[Outcome]]) -> Outcome:
            nonlocal first, answer
            if answer is not None:
                given, answer, first = answer, None, False
                return given
            if not first:
                await renew()
            first = False
            return await self._request(plan.server, call)

        try:
            if plan.backlog:
                await self._upload_history(dev, plan, result, request)
            await self._put(plan, plan.current(), result, request)
        except _Again as again:
            result.again = again.outcome
        except _InvalidToken as bad:
            result.invalid_token = bad.outcome
        except RedisError as exc:
            result.again = Retry("redis", str(exc))
        await self._finish(dev, plan, result, now_ms())

    def _send_soon(self, dev: _Device, plan: DevicePlan) -> None:
        """The common case of :meth:`_write` (no backlog) without a task per device: one
        ``batch/update`` sent from a ready keep-alive connection as soon as the in-flight cap
        allows (queued until then, in order), finished from callbacks when Blynk takes it.

        Falls back to :meth:`_write` when it cannot send that way (the token's region is not
        known here, no idle connection, nothing to send), and hands any answer but a 2xx to
        :meth:`_write`, which does what the coroutine path always does. A future stands in
        ``_tasks`` for the write until it is resolved (idle and stop decisions look at it).
        """
        pending: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks.add(pending)
        pending.add_done_callback(self._task_done)
        if self._in_flight >= self.cfg.max_in_flight or self._slot_waiters:
            self._queued_sends.append((dev, plan, pending))
        else:
            self._send_now(dev, plan, pending)

    def _send_now(self, dev: _Device, plan: DevicePlan, pending: asyncio.Future[None]) -> None:
        pins = plan.current()

        def answered(outcome: Outcome | None) -> None:
            self._free_slot()
            if outcome is not None:
                self._note(plan.server, outcome)
            if isinstance(outcome, Ok):
                result = _Result(values=len(pins))
                for pin in pins:
                    result.written[pin] = plan.pins[pin].ts_ms
                self._finish_now(dev, plan, result, pending)
                return
            # A refusal, an outage, a redirect, a stale connection: the coroutine path takes
            # over with this answer.
            self._write_instead(dev, plan, pending, outcome)

        self._in_flight += 1
        if self._client.batch_update_nowait(plan.server, plan.token, pins, answered):
            self.sent_now += 1
            return
        self._in_flight -= 1
        self._write_instead(dev, plan, pending, None)

    def _write_instead(self, dev: _Device, plan: DevicePlan, pending: asyncio.Future[None],
                       answer: Outcome | None) -> None:
        """Hand a task-free write to :meth:`_write` (its task is tracked before ``pending``
        resolves, so the stage never looks idle in between)."""
        self._spawn(self._write(dev, plan, answer), dev)
        pending.set_result(None)

    def _finish_now(self, dev: _Device, plan: DevicePlan, result: _Result,
                    pending: asyncio.Future[None]) -> None:
        """:meth:`_finish` of a device write that Blynk took whole, from callbacks."""
        self._release_probes([(dev, plan)])
        self._count_written(plan.server, result.values)
        ok = dev.inflight

        def committed(f: asyncio.Future[bool]) -> None:
            try:
                exc = asyncio.CancelledError() if f.cancelled() else f.exception()
                if exc is None:
                    self._check_lease(dev, f.result())
                    dev.attempts = 0
                    dev.history_done.clear()
                    self._observe_latency(ok, now_ms())
                    self._drop(dev)
                    return
                if not isinstance(exc, RedisError):
                    log.error("egress: recording %s failed", dev.key, exc_info=exc)
                else:
                    log.warning("egress: recording %s failed (%s); its write is retried",
                                dev.key, exc)
                self._back_off(dev, Retry("redis", str(exc)))
            finally:
                pending.set_result(None)

        commit = self._commits.submit(_Commit(dev.key, result.written, [h.entry for h in ok]))
        commit.add_done_callback(committed)

    async def _upload_history(
        self, dev: _Device, plan: DevicePlan, result: _Result,
        request: Callable[[Callable[[], Awaitable[Outcome]]], Awaitable[Outcome]],
    ) -> None:
        for pin, points in plan.history().items():
            done = dev.history_done.get(pin, -1)
            todo = [(ts, v) for ts, v in points if ts > done]
            for chunk in chunks(todo, MAX_UPLOAD_POINTS):
                outcome = await request(
                    functools.partial(self._client.upload_history, plan.server, plan.token,
                                      pin, chunk)
                )
                match outcome:
                    case Ok():
                        dev.history_done[pin] = chunk[-1][0]
                        result.values += len(chunk)
                    case Retry():
                        raise _Again(outcome)
                    case Fail(reason=reason) if reason == INVALID_TOKEN:
                        raise _InvalidToken(outcome)
                    case Fail():
                        # The current value still goes; the refused points are dead-lettered.
                        uploaded = dev.history_done.get(pin, -1)
                        refused = {ts for ts, _ in todo if ts > uploaded}
                        result.history_failed[pin] = (
                            outcome.reason, f"history upload: {outcome.detail}", refused
                        )
                        break

    async def _put(
        self, plan: DevicePlan, pins: dict[str, Value], result: _Result,
        request: Callable[[Callable[[], Awaitable[Outcome]]], Awaitable[Outcome]],
    ) -> None:
        """One ``batch/update``; on a permanent answer narrow it down to the failing pins."""
        if not pins:
            return
        outcome = await request(lambda: self._client.batch_update(plan.server, plan.token, pins))
        match outcome:
            case Ok():
                for pin in pins:
                    result.written[pin] = plan.pins[pin].ts_ms
                result.values += len(pins)
            case Retry():
                raise _Again(outcome)
            case Fail(reason=reason) if reason == INVALID_TOKEN:
                raise _InvalidToken(outcome)
            case Fail() if len(pins) == 1:
                (pin,) = pins
                result.failed[pin] = (outcome.reason, outcome.detail)
            case Fail(pin=named) if named is not None and _canon(named) in _canon_map(pins):
                bad = _canon_map(pins)[_canon(named)]
                result.failed[bad] = (outcome.reason, outcome.detail)
                await self._put(plan, {p: v for p, v in pins.items() if p != bad}, result,
                                request)
            case Fail():
                left, right = split(pins)
                await self._put(plan, left, result, request)
                await self._put(plan, right, result, request)

    async def _request(self, server_name: str, call: Callable[[], Awaitable[Outcome]]) -> Outcome:
        """One Blynk request under the global in-flight cap; updates the server's backoff."""
        if self._in_flight >= self.cfg.max_in_flight:
            await self._slot()
        self._in_flight += 1
        try:
            outcome = await call()
        finally:
            self._free_slot()
        self._note(server_name, outcome)
        return outcome

    def _free_slot(self) -> None:
        """A request finished: its slot goes to a waiting coroutine, else to the next queued
        :meth:`_send_soon`."""
        self._in_flight -= 1
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        if self._queued_sends and self._in_flight < self.cfg.max_in_flight:
            self._send_now(*self._queued_sends.popleft())

    def _note(self, server_name: str, outcome: Outcome) -> None:
        """The server's backoff and status after one of its answers."""
        server = self._servers.get(server_name)
        if isinstance(outcome, Retry) and outcome.status != 429:
            if server is None:
                server = self._servers[server_name] = _Server()
            now = time.monotonic()
            if now >= server.not_before:  # one failure per backoff period, not per request
                server.failures += 1
                delay = outcome.retry_after_s or backoff_s(server.failures,
                                                           self.cfg.max_backoff_s)
                server.not_before = now + delay
                log.warning("egress: Blynk server %s failing (%s: %s); backing off %.1fs",
                            server_name, outcome.reason, outcome.detail, delay)
                if server.failures == 1:
                    self._up.discard(server_name)
                    self._spawn(self._set_status(server_name, outcome), None)
        elif not isinstance(outcome, Retry):
            if server is not None:
                log.info("egress: Blynk server %s answers again", server_name)
                del self._servers[server_name]
            if server_name not in self._up:
                self._up.add(server_name)
                self._spawn(self._set_status(server_name, None), None)

    async def _slot(self) -> None:
        """Wait until fewer than ``max_in_flight`` requests are out (waiters woken in order)."""
        while self._in_flight >= self.cfg.max_in_flight:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # pass the slot on
                    while self._slot_waiters:
                        nxt = self._slot_waiters.popleft()
                        if not nxt.done():
                            nxt.set_result(None)
                            break
                raise

    async def _set_status(self, server_name: str, failure: Retry | None) -> None:
        """Blynk server status (Connected / Broken) for ``status`` and ``/status``."""
        try:
            if failure is None:
                await self.status.connected("blynk", server_name, owner=self.ctx.consumer)
            else:
                await self.status.failed("blynk", server_name,
                                         f"{failure.reason}: {failure.detail}", "unreachable",
                                         owner=self.ctx.consumer)
        except RedisError as exc:
            log.warning("egress: recording the status of %s failed (%s)", server_name, exc)

    async def _finish(self, dev: _Device, plan: DevicePlan, result: _Result, wall: int, *,
                      leased: bool = True) -> None:
        """Record, then resolve every in-flight entry of the device: ack, dead-letter, requeue.

        The record (what Blynk now has; it also releases the lease) and the acks of the
        entries fully written are one script call, group-committed with other devices.
        ``leased=False``: nothing was sent and no lease taken (every value was stale).
        """
        self._release_probes([(dev, plan)])
        self._count_written(plan.server, result.values)
        dead: list[tuple[Entry, str, str]] = []
        ok: list[_Held] = []
        if result.invalid_token is not None or result.again is not None:
            pass
        elif not result.failed and not result.history_failed:
            ok = dev.inflight
        else:
            for h in dev.inflight:
                bad = [(pin, *result.failed[pin]) for pin in h.write.pins if pin in result.failed]
                for pin in h.write.pins:
                    refused = result.history_failed.get(pin)
                    if refused is not None and h.write.event_ts_ms in refused[2]:
                        bad.append((pin, refused[0], refused[1]))
                if bad:
                    detail = "; ".join(f"{pin}: {reason}: {text}" for pin, reason, text in bad)
                    dead.append((h.entry, bad[0][1], detail[:2000]))
                else:
                    ok.append(h)
        try:
            held = await asyncio.shield(self._commits.submit(
                _Commit(dev.key if leased else None, result.written, [h.entry for h in ok])))
            self._check_lease(dev, held)
        except RedisError as exc:
            log.warning("egress: recording %s failed (%s); its write is retried", dev.key, exc)
            result.again = result.again or Retry("redis", str(exc))
        if result.invalid_token is not None:
            await self._invalid_token(dev, plan, result.invalid_token)
            return
        if result.again is not None:
            self._back_off(dev, result.again)
            return
        dev.attempts = 0
        dev.history_done.clear()
        if dead:
            try:
                await asyncio.shield(self.reader.dead_letter(dead))
            except RedisError as exc:
                # Not acked: the entries stay pending and come back (then dead again).
                log.warning("egress: dead-lettering %d entries failed (%s)", len(dead), exc)
        self._observe_latency(ok, wall)
        self._drop(dev)

    def _count_written(self, server: str, values: int) -> None:
        if values:
            counter = self._written.get(server)
            if counter is None:
                counter = self._written[server] = metrics.WRITTEN.labels(server)
            counter.inc(values)

    @staticmethod
    def _check_lease(dev: _Device, held: bool) -> None:
        """The record of a write found its device's lease gone (expired mid-write)."""
        if not held:
            metrics.EGRESS_LEASE_LOST.inc()
            log.warning("egress: lease of %s expired during its write", dev.key)

    @staticmethod
    def _observe_latency(ok: Sequence[_Held], wall: int) -> None:
        for h in ok:
            metrics.LATENCY.observe(max(0, wall - h.write.received_ts_ms) / 1000)

    async def _commit_many(self, items: list[_Commit]) -> list[bool]:
        acks: dict[str, list[str]] = {}
        for item in items:
            for e in item.acks:
                acks.setdefault(e.stream, []).append(e.id)
        writes = [(c.device_key, c.written) for c in items if c.device_key is not None]
        held = iter(await self.order.commit_many(writes, acks, GROUP_EGRESS))
        return [True if c.device_key is None else next(held) for c in items]

    async def _defer_many(self, items: list[tuple[str, float]]) -> list[None]:
        await self.limiter.defer_many(items)
        return [None] * len(items)

    async def _invalid_token(self, dev: _Device, plan: DevicePlan, outcome: Fail) -> None:
        log.warning("egress: device %s: invalid token %s; marked broken, %d entries dead",
                    dev.key, mask(plan.token), len(dev.inflight))
        try:
            await self.registry.mark_broken(dev.key, INVALID_TOKEN, outcome.detail)
            await asyncio.shield(self.reader.dead_letter(
                [(h.entry, INVALID_TOKEN, outcome.detail) for h in dev.inflight]))
        except RedisError as exc:
            log.warning("egress: dead-lettering %s failed (%s); retried", dev.key, exc)
            self._requeue(dev, not_before=time.monotonic() + backoff_s(1))
            return
        self._drop(dev)

    def _back_off(self, dev: _Device, outcome: Retry) -> None:
        """Keep the entries in memory and try again later (never re-read, never acked)."""
        if outcome.status == 429:
            dev.attempts += 1
            delay = outcome.retry_after_s or backoff_s(dev.attempts, self.cfg.max_backoff_s)
            self._spawn(self._defer(dev.key, delay), dev)
        else:
            server = self._servers.get(dev.inflight[-1].write.server) if dev.inflight else None
            delay = max(0.0, server.not_before - time.monotonic()) if server else backoff_s(1)
        self._requeue(dev, not_before=time.monotonic() + delay)

    async def _defer(self, device_key: str, delay: float) -> None:
        """Tell every replica to hold this device back (a 429 is about the device's budget)."""
        try:
            await self._defers((device_key, delay))
        except RedisError as exc:
            log.warning("egress: sharing the 429 backoff of %s failed (%s)", device_key, exc)

    def _drop(self, dev: _Device) -> None:
        """Forget the resolved in-flight entries; forget the device when nothing is left."""
        for h in dev.inflight:
            self._held.pop((h.entry.stream, h.entry.id), None)
        dev.inflight = []
        if dev.queued:
            self._waiting[dev.key] = dev
        elif dev.not_before <= time.monotonic():
            self._devices.pop(dev.key, None)


#: Young-generation threshold of the cyclic garbage collector in an egress process (egress
#: allocates a dozen short-lived objects per device write: 237 -> 183 µs per entry at 20,000).
GC_GEN0_THRESHOLD = 20_000


def _canon(pin: str) -> str:
    return pin.upper()


def _canon_map(pins: dict[str, Value]) -> dict[str, str]:
    return {_canon(p): p for p in pins}


def build(ctx: Context) -> Stage:
    return EgressStage(ctx)
