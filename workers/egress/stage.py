"""The egress stage: its lifecycle, the read loop and flushes, wiring the parts of the package.

``startup()`` → ``main_loop(stop)`` → ``shutdown()`` (see :mod:`workers.egress` for the
contract). The loop reads batches into :class:`~workers.egress.queue.HeldWrites`, asks the
:class:`~workers.egress.scheduler.FlushScheduler` when to flush, prepares each flush in one
script call (:meth:`pipeline.order.LastWritten.prepare`) and hands each device's write to the
:class:`~workers.egress.sender.Sender`, whose result goes to the
:class:`~workers.egress.committer.Committer`.

Every device write is tracked from its flush until the committer resolves it (a future standing
in for it, and any task it uses), so burst mode's "idle" and a stop's "drained" see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from redis.exceptions import RedisError

from pipeline import echo, metrics
from pipeline.blynk.outcomes import Retry
from pipeline.coalesce import DevicePlan, drop_stale, history_only
from pipeline.consumer import backoff_s
from pipeline.context import Context
from pipeline.events import Value
from pipeline.keys import GROUP_EGRESS, WRITES
from pipeline.lifecycle import cancel_and_wait, collect_young_less_often, wait_event
from pipeline.order import LastWritten
from pipeline.ratelimit import RateLimiter
from pipeline.registry import Registry
from pipeline.status import StatusBoard
from pipeline.streams import Entry, StreamReader, now_ms
from workers.egress.committer import Committer
from workers.egress.queue import DeviceQueue, HeldWrites
from workers.egress.scheduler import FlushScheduler, InFlight, Servers
from workers.egress.sender import Pacer, Result, Sender

log = logging.getLogger("blynk_bridge.egress")

#: How long to wait before asking again for a device another replica is writing.
LEASE_RETRY_S = 0.05
#: With ``flush_age_ms`` > 0, after a read that drained the stream the next read waits this
#: long (at most the flush age), so reads come in batches instead of one Redis call per trickle
#: of entries: they wait for a flush anyway. With ``flush_age_ms`` 0 (writes go at once) reads
#: are not paced: a pause would be pure latency.
READ_PACE_S = 0.01
#: How often the superseded values are added to the shared counter (``keys.superseded``).
SUPERSEDED_EVERY_S = 1.0
#: How long abandoned device writes get to unwind after their cancellation.
ABANDON_WAIT_S = 1.0
#: Young-generation threshold of the cyclic garbage collector in an egress process: egress
#: allocates a dozen short-lived objects per device write, none of them in cycles.
GC_GEN0_THRESHOLD = 20_000


class EgressStage:
    """The egress stage (see :mod:`workers.egress`)."""

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
        self.max_held = max(20 * cfg.flush_count, 1000)
        self._tasks: set[asyncio.Future[None]] = set()  # device writes, status updates
        #: Set when a stop gave up on the writes under way: nothing new starts.
        self._closed = False
        self._wake = asyncio.Event()
        self._next_read_at = 0.0
        self._read_pace_s = min(READ_PACE_S, cfg.flush_age_ms / 1000)
        #: Superseded values a failed ``INCRBY`` left for the next one.
        self._superseded = 0
        self.held = HeldWrites(int(cfg.live_window_s * 1000))
        self.servers = Servers(cfg.max_backoff_s, self._report_status)
        self.scheduler = FlushScheduler(self.held, self.servers, flush_count=cfg.flush_count,
                                        flush_bytes=cfg.flush_bytes,
                                        flush_age_ms=cfg.flush_age_ms)
        self.committer = Committer(self.order, self.reader, self.registry,
                                   self.held, self.servers, self._spawn, cfg.max_backoff_s)
        #: With Blynk webhooks configured, writes are announced to echo suppression first.
        self._echo_window_ms = ctx.config.echo.window_ms if ctx.config.blynk_webhooks else 0
        self.sender = Sender(ctx.blynk(), InFlight(cfg.max_in_flight), self.servers,
                             Pacer(self.order, self.limiter), self.committer.finish,
                             self._spawn)

    @property
    def sent_now(self) -> int:
        """``batch/update``s sent without a task (for tests and diagnostics)."""
        return self.sender.sent_now

    # ---- lifecycle ---------------------------------------------------------------------

    async def startup(self) -> None:
        collect_young_less_often(GC_GEN0_THRESHOLD)
        await self.reader.ensure_group()

    async def shutdown(self) -> None:
        """Nothing to release: the Blynk client and Redis belong to the context."""

    async def main_loop(self, stop: asyncio.Event) -> None:
        """Read, hold, flush, until ``stop`` (or, in burst mode, until idle)."""
        await self.reader.ensure_group()
        # The chores end on this event, not only on a cancel: on 3.11 a cancel landing inside
        # redis-py's ``wait_for`` can be lost, and a ``while True`` chore would then run on.
        done = asyncio.Event()
        chores = [asyncio.create_task(self._keep_claimed(done), name="egress-keep-claimed"),
                  asyncio.create_task(self._count_superseded(done), name="egress-superseded")]
        if self.cfg.broken_retry_s > 0:
            chores.append(asyncio.create_task(self._retry_broken(done),
                                              name="egress-retry-broken"))
        try:
            await self._run(stop)
        except BaseException:
            # Cancelled (a stop past the process's grace) or failed: stop waiting for Blynk
            # now; what is not confirmed stays pending in Redis and is delivered again.
            await self._abandon("stopping early")
            raise
        finally:
            done.set()
            await cancel_and_wait(chores, ABANDON_WAIT_S)
        await self._publish_superseded()  # not after a cancel or a failure: it would wait

    async def _run(self, stop: asyncio.Event) -> None:
        read: asyncio.Task[list[Entry]] | None = None
        read_failures = 0
        drained = False  # burst mode: a read found nothing; read again once nothing is held
        stopper = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                if drained and not self.held and not self._tasks:
                    drained = False
                if read is None and not drained and len(self.held) < self.max_held:
                    read = asyncio.create_task(self._read())
                waiter = asyncio.create_task(self._wake.wait())
                waits: set[asyncio.Future[Any]] = {waiter, stopper}
                if read is not None:
                    waits.add(read)
                await asyncio.wait(waits, timeout=self.scheduler.next_deadline(time.monotonic()),
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
                        if not self.held and not self._tasks:
                            return
                        drained = True
                metrics.EGRESS_HELD.set(len(self.held))  # once per wake-up, not per device
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
            # Cluster layout: reads the reader made ahead for other partitions are given back
            # (as consume() does), not left pending with one more delivery counted.
            with contextlib.suppress(RedisError):
                await self.reader.close()
        # Stopping: send what is ready now; devices in backoff stay pending in Redis.
        await self._flush(final=True)
        await self._drain(self.cfg.stop_timeout_s)

    async def _drain(self, timeout_s: float) -> None:
        """Wait for every device write under way, at most ``timeout_s`` (a hanging Blynk must
        not hold a stop for its request timeout times its retries); then abandon the rest."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._tasks:  # a finishing write may start another task (a dead letter)
            left = deadline - loop.time()
            if left <= 0:
                await self._abandon(f"stop deadline ({timeout_s:g}s) passed")
                return
            await asyncio.wait(set(self._tasks), timeout=left)

    async def _abandon(self, why: str) -> None:
        """Stop every device write still under way and start no more. Nothing is acked for
        them: their entries stay pending in Redis and are delivered again (to this consumer
        after a restart, or to another replica by ``XAUTOCLAIM``). An answer arriving later
        is still recorded if the loop runs on, and never raises (the committer checks)."""
        self._closed = True
        self.sender.close()
        left = list(self._tasks)
        if not left:
            return
        log.warning("egress: %s with %d device writes unconfirmed; their entries stay "
                    "pending and are delivered again", why, len(left))
        for task in left:
            task.cancel()
        # Let the cancelled tasks unwind (they end at their next await), bounded all the same.
        await asyncio.wait(left, timeout=ABANDON_WAIT_S)

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
        if len(entries) < self.reader.batch and self._read_pace_s:
            # drained: let the next read gather a batch
            self._next_read_at = time.monotonic() + self._read_pace_s
        return entries

    async def _hold(self, entries: list[Entry]) -> None:
        bad = self.held.hold(entries, time.monotonic())
        metrics.EGRESS_HELD.set(len(self.held))
        if bad:
            await asyncio.shield(self.reader.dead_letter(bad))

    async def _keep_claimed(self, done: asyncio.Event) -> None:
        """Reset the idle time of held entries so no other replica takes them over.

        ``XCLAIM … JUSTID`` keeps the delivery count: holding an entry through an outage does
        not bring it closer to ``max_deliveries``.
        """
        interval = max(0.05, self.reader.claim_idle_ms / 3000)
        while not await wait_event(done, interval):
            by_stream = self.held.ids_by_stream()
            if not by_stream:
                continue
            try:
                async with self.ctx.redis.pipeline(transaction=False) as pipe:
                    for stream, ids in by_stream.items():
                        for i in range(0, len(ids), 1000):
                            pipe.xclaim(stream, GROUP_EGRESS, self.ctx.consumer, 0,
                                        list(ids[i : i + 1000]), justid=True)
                    await pipe.execute()
            except RedisError as exc:
                log.warning("egress: refreshing held entries failed (%s)", exc)

    async def _count_superseded(self, done: asyncio.Event) -> None:
        """Add the superseded values to the counter ``blynk-bridge status`` shows, once a
        second (one ``INCRBY`` per second, not one per flush)."""
        while not await wait_event(done, SUPERSEDED_EVERY_S):
            await self._publish_superseded()

    async def _publish_superseded(self) -> None:
        n, self._superseded = self._superseded + self.committer.take_superseded(), 0
        if not n:
            return
        try:
            await self.ctx.redis.incrby(self.ctx.keys.superseded(), n)
        except RedisError as exc:  # kept for the next try: the metric has them already
            self._superseded += n
            log.warning("egress: counting superseded values failed (%s)", exc)

    async def _retry_broken(self, done: asyncio.Event) -> None:
        """Set devices broken for ``broken_retry_s`` back to ok, so their next uplink tries the
        token again (counted in ``bb_devices_unbroken_total{by="retry"}``)."""
        retry_s = self.cfg.broken_retry_s
        interval = min(60.0, max(0.05, retry_s / 4))
        while not await wait_event(done, interval):
            try:
                await self.registry.retry_broken(int(retry_s * 1000))
            except RedisError as exc:
                log.warning("egress: retrying broken devices failed (%s)", exc)

    # ---- flushing ------------------------------------------------------------------------

    async def _flush(self, *, final: bool) -> None:
        """Start one write per ready device (coalesce; lease, staleness and rate limit of every
        device in one script call)."""
        ready = self.scheduler.ready(time.monotonic(), final=final)
        if not ready:
            return
        wall = now_ms()
        held = self.held
        plans = [(dev, held.start(dev, wall)) for dev in ready]
        try:
            claims = await self.order.prepare(
                [(d.key, {pin: p.ts_ms for pin, p in plan.pins.items()}) for d, plan in plans],
                self.limiter, **self._echo_records(plans, wall))
        except RedisError as exc:
            log.warning("egress: preparing a flush failed (%s); retrying", exc)
            for dev, plan in plans:
                if dev.inflight:
                    held.requeue(dev, not_before=time.monotonic() + backoff_s(1))
                self.servers.release_probe(plan.server)
            return
        now = time.monotonic()
        send = self.sender.send
        for (dev, plan), claim in zip(plans, claims, strict=True):
            # Late history points are dropped with the stale values and counted with them (by
            # the committer, once the write is over: a retried write drops them again).
            if claim.granted:
                dev.claim = claim
                points = history_only(plan)
                plan.stale = len(drop_stale(plan, claim.last)) + points - history_only(plan)
                send(dev, plan, self._pending())
            elif claim.stale:  # Blynk already has newer values: nothing to send, ack them
                plan.stale = len(plan.pins) + history_only(plan)
                self.committer.finish(dev, plan, Result(), self._pending(), leased=False)
            else:  # busy elsewhere, or the device's rate limit says wait
                wait = claim.wait_s or min(LEASE_RETRY_S, claim.busy_ms / 1000)
                held.requeue(dev, not_before=now + wait)
                self.servers.release_probe(plan.server)

    def _echo_records(self, plans: Sequence[tuple[DeviceQueue, DevicePlan]], wall: int
                      ) -> dict[str, Any]:
        """What ``prepare`` records for echo suppression, in its own call, for the devices it
        grants (Blynk fires its webhooks for these writes too: :mod:`pipeline.echo`); nothing
        when no Blynk webhook is configured.

        The newest history point of each pin counts too: an upload may make it the pin's
        current value for a moment (the emulator's default; unconfirmed for Blynk), firing a
        webhook — with superseded values going to history that is every coalesced write of a
        ``history: true`` pin, not only backlog after an outage."""
        if not self._echo_window_ms:
            return {}
        keys = self.ctx.keys
        per_device: list[list[tuple[str, str]]] = []
        for dev, plan in plans:
            records = echo.records(keys, plan.token, plan.current(), wall, dev.key)
            if plan.backlog:
                # The newest point each upload carries: a retried write does not upload again
                # what its earlier try did (workers.egress.sender), so that is the newest point
                # not uploaded yet.
                newest: dict[str, Value] = {}
                for pin, points in plan.history().items():
                    done = dev.history_done.get(pin, ())
                    todo = [v for ts, v in points if ts not in done]
                    if todo:
                        newest[pin] = todo[-1]
                records += echo.records(keys, plan.token, newest, wall, dev.key)
            per_device.append(records)
        return {"echoes": per_device, "echo_window_ms": self._echo_window_ms}

    # ---- tracking ------------------------------------------------------------------------

    def _pending(self) -> asyncio.Future[None]:
        """A future standing in for one device write until the committer resolves it."""
        pending: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks.add(pending)
        pending.add_done_callback(self._task_done)
        return pending

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        if self._closed:  # stopped: nothing new starts; its entries stay pending in Redis
            coro.close()
            return
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[None]) -> None:
        # Leave the set before waking the loop: it decides "idle" from the set.
        self._tasks.discard(task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:
            name = task.get_name() if isinstance(task, asyncio.Task) else "a device write"
            log.error("egress: %s failed", name, exc_info=task.exception())

    def _report_status(self, server_name: str, failure: Retry | None) -> None:
        self._spawn(self._set_status(server_name, failure), "egress-status")

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
