"""The egress stage: its lifecycle, partition ownership, the read loop and flushes, wiring the
parts of the package.

``startup()`` → ``main_loop(stop)`` → ``shutdown()`` (see :mod:`workers.egress` for the
contract). The stage owns writes partitions through :class:`pipeline.lease.PartitionLeases`
(``keys.egress_lease(p)``) and reads each partition it owns with a
:class:`~pipeline.streams.StreamReader` of its own, after taking the partition's pending
entries over. The loop reads batches into :class:`~workers.egress.queue.HeldWrites`, asks the
:class:`~workers.egress.scheduler.FlushScheduler` when to flush, checks each device of a flush
against its record in memory (read once per partition takeover:
:meth:`pipeline.order.LastWritten.load`) and hands its write to the
:class:`~workers.egress.sender.Sender`, whose result goes to the
:class:`~workers.egress.committer.Committer`.

**The send rule.** A request goes only while the partition's lease is certainly held
(:meth:`pipeline.lease.Lease.remaining_s`, which ends a margin before Redis can expire it)
for longer than ``blynk.timeout_s``: whatever it sent is answered or given up before another
replica can take the partition. ``egress.lease_ttl_ms`` (default 3 × ``blynk.timeout_s``) is
renewed every ttl/4 with a ttl/5 margin, so an owner can always send between renewals when
the ttl is at least 2 × the timeout (config validation refuses less).

Every device write is tracked from its flush until the committer resolves it (a future standing
in for it, and any task it uses), so burst mode's "idle" and a stop's "drained" see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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
from pipeline.lease import PartitionLeases
from pipeline.lifecycle import cancel_and_wait, collect_young_less_often, wait_event
from pipeline.order import LastWritten, Record, wall_us
from pipeline.ratelimit import RateLimiter
from pipeline.registry import Registry
from pipeline.status import StatusBoard
from pipeline.streams import Entry, StreamReader, now_ms
from workers.egress.committer import Committer
from workers.egress.queue import DeviceQueue, HeldWrites
from workers.egress.scheduler import FlushScheduler, InFlight, Servers
from workers.egress.sender import Pacer, Result, Sender

log = logging.getLogger("blynk_bridge.egress")

#: Takes over the pending entries of a stream's group (every consumer's) for ARGV[2], one
#: page from the cursor ARGV[3]: ``{next cursor, how many}`` (``XAUTOCLAIM … JUSTID``, which
#: does not count a delivery).
_TAKE_OVER = """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'COUNT', 1000,
                     'JUSTID')
return {r[1], #r[2]}
"""
#: With ``flush_age_ms`` > 0, after a read that drained the stream the next read waits this
#: long (at most the flush age), so reads come in batches instead of one Redis call per trickle
#: of entries: they wait for a flush anyway. With ``flush_age_ms`` 0 (writes go at once) reads
#: are not paced: a pause would be pure latency.
READ_PACE_S = 0.01
#: How often the superseded values are added to the shared counter (``keys.superseded``).
SUPERSEDED_EVERY_S = 1.0
#: How long abandoned device writes get to unwind after their cancellation.
ABANDON_WAIT_S = 1.0
#: Device records kept in memory at most (over every owned partition): past it, records of
#: devices with nothing held and nothing left to store are forgotten (read again when needed).
RECORDS_MAX = 200_000
#: The sweep of expired records (:meth:`pipeline.order.LastWritten.sweep`): one page of about
#: ``SWEEP_COUNT`` fields of one owned partition every ``SWEEP_EVERY_S``, the partitions in
#: turn: 100 records a second. A page costs Redis ~0.5 ms (an ``HSCAN`` returning 500 records),
#: ~0.01% of its CPU whatever the uplink rate; a pass over a million records takes ~3 hours,
#: over ten million ~28, against a ttl of 31 days.
SWEEP_EVERY_S = 5.0
SWEEP_COUNT = 500
#: Young-generation threshold of the cyclic garbage collector in an egress process: egress
#: allocates a dozen short-lived objects per device write, none of them in cycles.
GC_GEN0_THRESHOLD = 20_000


class _Owned:
    """A writes partition this replica owns: its reader and its devices' records."""

    __slots__ = ("next_read_at", "reader", "records", "sweep_cursor", "taken_over")

    def __init__(self, reader: StreamReader) -> None:
        self.reader = reader
        #: Device key → its record (read once after the partition was taken).
        self.records: dict[str, Record] = {}
        #: The partition's pending entries were taken over (before anything is read).
        self.taken_over = False
        self.next_read_at = 0.0
        #: Where the sweep of the partition's records goes on (0: a new pass).
        self.sweep_cursor = 0


class EgressStage:
    """The egress stage (see :mod:`workers.egress`)."""

    name = "egress"

    def __init__(self, ctx: Context, *, until_idle: bool = False) -> None:
        self.ctx = ctx
        self.until_idle = until_idle
        cfg = ctx.config.egress
        streams = ctx.config.streams
        self.cfg = cfg
        # Over every partition: the group, dead letters; each owned partition is read by a
        # reader of its own (_Owned).
        self.reader = StreamReader(
            ctx.redis, ctx.keys, ctx.keys.streams(WRITES), GROUP_EGRESS, ctx.consumer,
            stage=self.name, batch=max(streams.batch, cfg.flush_count),
            block_ms=streams.block_ms, claim_idle_ms=streams.claim_idle_ms,
            max_deliveries=streams.max_deliveries,
        )
        self._streams = ctx.keys.streams(WRITES)  # partition → its stream
        self._partition_of = {s: p for p, s in enumerate(self._streams)}
        timeout_s = ctx.config.blynk.timeout_s
        #: The Blynk request timeout: a request goes only while the partition's lease is
        #: certainly held this much longer (the send rule), and a hand-over waits this long
        #: for the writes under way.
        self._timeout_s = timeout_s
        self.order = LastWritten(ctx.redis, ctx.keys)
        self.ownership = PartitionLeases(
            ctx.redis, lease_key=ctx.keys.egress_lease, owners_key=ctx.keys.owners("egress"),
            owner=ctx.consumer, partitions=len(self._streams),
            ttl_ms=cfg.partition_lease_ms(timeout_s),
            on_acquired=self._acquired, on_dropped=self._dropped)
        #: Partition → what this replica keeps of it while it owns it.
        self.owned: dict[int, _Owned] = {}
        #: Partition → the read in flight of it (and the _Owned it reads for).
        self._reads: dict[int, tuple[_Owned, asyncio.Task[list[Entry]]]] = {}
        #: Burst mode: keep the partitions (and records) when ``main_loop`` returns, as a
        #: running replica would between passes (the benchmarks' successive passes).
        self.keep_partitions = False
        self._take_over = ctx.redis.register_script(_TAKE_OVER)
        self.sweep_every_s = SWEEP_EVERY_S
        self.limiter = RateLimiter(ctx.redis, ctx.keys, cfg.per_device_rps)
        self.registry = Registry(ctx.redis, ctx.keys)
        self.status = StatusBoard(ctx.redis, ctx.keys)
        self.max_held = max(20 * cfg.flush_count, 1000)
        self._tasks: set[asyncio.Future[None]] = set()  # device writes, status updates
        #: Set when a stop gave up on the writes under way: nothing new starts.
        self._closed = False
        #: Writes were abandoned (their requests may still land): leases are left to lapse.
        self._abandoned = False
        self._wake = asyncio.Event()
        self._read_pace_s = min(READ_PACE_S, cfg.flush_age_ms / 1000)
        #: Superseded values a failed ``INCRBY`` left for the next one.
        self._superseded = 0
        self.held = HeldWrites(int(cfg.live_window_s * 1000),
                               lambda stream: self._partition_of.get(stream, 0))
        self.servers = Servers(cfg.max_backoff_s, self._report_status)
        self.scheduler = FlushScheduler(self.held, self.servers, flush_count=cfg.flush_count,
                                        flush_bytes=cfg.flush_bytes,
                                        flush_age_ms=cfg.flush_age_ms)
        self.committer = Committer(self.order, self.reader, self.registry,
                                   self.held, self.servers, self._spawn, cfg.max_backoff_s,
                                   stream_of=self._streams.__getitem__,
                                   lease_of=self.ownership.leases.__getitem__,
                                   lost=self._fenced)
        #: With Blynk webhooks configured, writes are announced to echo suppression first.
        self._echo_window_ms = ctx.config.echo.window_ms if ctx.config.blynk_webhooks else 0
        self.sender = Sender(ctx.blynk(), InFlight(cfg.max_in_flight), self.servers,
                             Pacer(self.limiter), self.committer.finish, self._spawn,
                             self._may_send)

    @property
    def sent_now(self) -> int:
        """``batch/update``s sent without a task (for tests and diagnostics)."""
        return self.sender.sent_now

    # ---- lifecycle ---------------------------------------------------------------------

    async def startup(self) -> None:
        collect_young_less_often(GC_GEN0_THRESHOLD)
        await self.reader.ensure_group()
        n = len(self._streams)
        log.info("egress: %d writes partition%s (redis.partitions): at most %d replica%s write "
                 "at once, any others are warm standbys; partition lease %d ms",
                 n, "s" if n != 1 else "", n, "s" if n != 1 else "", self.ownership.ttl_ms)

    async def shutdown(self) -> None:
        """Nothing to release: the Blynk client and Redis belong to the context."""

    async def main_loop(self, stop: asyncio.Event) -> None:
        """Own partitions, read, hold, flush, until ``stop`` (or, in burst mode, until idle)."""
        await self.reader.ensure_group()
        if self.until_idle:
            await self.ownership.take_share(stop, self.name)
        # The chores end on this event, not only on a cancel: on 3.11 a cancel landing inside
        # redis-py's ``wait_for`` can be lost, and a ``while True`` chore would then run on.
        done = asyncio.Event()
        report = functools.partial(self.ownership.report, self.name, "writes", "writes")
        chores = [asyncio.create_task(self._keep_claimed(done), name="egress-keep-claimed"),
                  asyncio.create_task(self._count_superseded(done), name="egress-superseded"),
                  asyncio.create_task(self.ownership.run(done, name="egress", after=report),
                                      name="egress-own"),
                  asyncio.create_task(self.ownership.fence(done), name="egress-fence"),
                  asyncio.create_task(self._sweep_records(done), name="egress-sweep")]
        if self.cfg.broken_retry_s > 0:
            chores.append(asyncio.create_task(self._retry_broken(done),
                                              name="egress-retry-broken"))
        try:
            await self._run(stop)
        except BaseException:
            # Cancelled (a stop past the process's grace) or failed: stop waiting for Blynk
            # now; what is not confirmed stays pending in Redis and is delivered again. The
            # partition leases lapse by themselves (no Redis call here: it would wait).
            await self._abandon("stopping early")
            raise
        finally:
            done.set()
            await cancel_and_wait(chores, ABANDON_WAIT_S)
        await self._publish_superseded()  # not after a cancel or a failure: it would wait
        if not (self.until_idle and self.keep_partitions):
            await self._hand_back()

    async def _hand_back(self) -> None:
        """After a stop: give the partitions up and release their leases — unless writes were
        abandoned: a request sent may still land, so the leases lapse by themselves, and an
        answer arriving meanwhile is still committed (fenced like any other)."""
        if self._abandoned:
            return
        for p in list(self.owned):
            await self.ownership.drop(p, "stopped")
            await self.ownership.release(p)

    # ---- ownership -----------------------------------------------------------------------

    def _may_send(self, dev: DeviceQueue) -> bool:
        """The send rule (module docstring), for a write of ``dev`` — not if its partition was
        given up since the write started (``gone``), even if taken back meanwhile."""
        p = dev.partition
        return not dev.gone and p in self.owned and \
            self.ownership.leases[p].remaining_s() > self._timeout_s

    async def _acquired(self, p: int) -> None:
        self.owned[p] = _Owned(StreamReader(
            self.ctx.redis, self.ctx.keys, [self._streams[p]], GROUP_EGRESS,
            self.ctx.consumer, stage=self.name, batch=self.reader.batch,
            block_ms=self.reader.block_ms, claim_idle_ms=self.reader.claim_idle_ms,
            max_deliveries=self.reader.max_deliveries))
        metrics.PARTITIONS_OWNED.labels(self.name).set(len(self.owned))
        log.info("egress: partition %d taken", p)
        self._wake.set()

    async def _dropped(self, p: int, why: str) -> bool:
        """``False``: the lease must lapse, not be released (a write may still land)."""
        if why != "rebalance":
            self._lose(p, why)
            return True
        # Handed to another replica once this returns (its lease released). Nothing more is
        # read or sent for it from now on; the writes under way end first — and, the lease
        # being still this replica's, are recorded and acked as usual: forgotten at once, a
        # write that landed would be sent again by the next owner (a duplicate, history points
        # included, at every rebalance) —, and a read in flight is given back first — else its
        # entries, pending under this consumer after the new owner took the partition's over,
        # would wait for an idle claim.
        # A write that did not end in time, or that a stop abandoned (its stand-in cancelled),
        # may still land: then the lease lapses instead, as after an abandoning stop.
        if self.owned.pop(p, None) is None:
            return True
        self._wake.set()
        try:
            waits = {d.pending for d in self.held.devices.values()
                     if d.partition == p and d.pending is not None and not d.pending.done()}
            if waits:
                await asyncio.wait(waits, timeout=self._timeout_s)
            read = self._reads.pop(p, None)
            if read is not None:
                part, task = read
                with contextlib.suppress(RedisError):
                    await self._give_back(part, await task)
        finally:
            self._forget(p, why)
        return not self._abandoned and all(w.done() and not w.cancelled() for w in waits)

    def _fenced(self, p: int) -> None:
        """A commit of the partition's current ownership found the lease not holding its token
        (lost meanwhile): give it up at once."""
        if p in self.owned:
            metrics.EGRESS_FENCED.inc()
            log.warning("egress: partition %d: the lease is no longer this ownership's; "
                        "nothing recorded or acked, the partition is given up", p)
            self._lose(p, "fenced")

    def _lose(self, p: int, why: str) -> list[DeviceQueue]:
        """Stop owning ``p`` now: nothing more is sent, read, recorded or acked for it; its
        held entries stay pending in Redis for the next owner. Returns its devices with a
        write under way."""
        self.ownership.owned.discard(p)
        if self.owned.pop(p, None) is None:
            return []
        return self._forget(p, why)

    def _forget(self, p: int, why: str) -> list[DeviceQueue]:
        """Forget ``p``'s held entries (pending in Redis for the next owner); its devices with
        a write under way are returned."""
        busy = self.held.forget_partition(p)
        metrics.PARTITIONS_OWNED.labels(self.name).set(len(self.owned))
        metrics.EGRESS_HELD.set(len(self.held))
        log.info("egress: partition %d given up (%s)", p, why)
        self._wake.set()
        return busy

    async def _taken_over(self, p: int, part: _Owned) -> None:
        """Take the partition's pending entries over (every consumer's) before reading it:
        they become this consumer's, and its reader's first pass reads them."""
        cursor: bytes | str = "0-0"
        taken = 0
        while True:
            reply = await self._take_over(keys=[self._streams[p]],
                                          args=[GROUP_EGRESS, self.ctx.consumer, cursor])
            cursor, n = reply[0], int(reply[1])
            taken += n
            if cursor in (b"0-0", "0-0"):
                break
        part.taken_over = True
        if taken:
            log.info("egress: partition %d: %d pending entries taken over", p, taken)

    # ---- reading -------------------------------------------------------------------------

    async def _run(self, stop: asyncio.Event) -> None:
        reads = self._reads
        read_failures = 0
        # Burst mode: a partition whose read found nothing is read again once nothing is
        # held (drained), or not at all when nothing was held then (idle).
        drained: set[int] = set()
        idle: set[int] = set()
        stopper = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                if drained and not self.held and not self._tasks:
                    drained.clear()
                if len(self.held) < self.max_held:
                    for p, part in self.owned.items():
                        if p not in reads and p not in drained and p not in idle:
                            reads[p] = (part, asyncio.create_task(self._read(p, part)))
                waiter = asyncio.create_task(self._wake.wait())
                waits: set[asyncio.Future[Any]] = {waiter, stopper}
                waits.update(task for _, task in reads.values())
                await asyncio.wait(waits, timeout=self.scheduler.next_deadline(time.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                self._wake.clear()
                for p, (part, task) in list(reads.items()):
                    if not task.done() or reads.get(p, (part, None))[1] is not task:
                        continue
                    del reads[p]
                    try:
                        entries = task.result()
                        read_failures = 0
                    except RedisError as exc:
                        read_failures += 1
                        log.warning("egress: reading failed (%s); retrying", exc)
                        await asyncio.wait({stopper}, timeout=backoff_s(read_failures))
                        continue
                    if await self._landed(p, part, entries) and self.until_idle:
                        (idle if not self.held and not self._tasks else drained).add(p)
                if self.until_idle and self.owned.keys() <= idle and not self.held \
                        and not self._tasks:
                    return
                metrics.EGRESS_HELD.set(len(self.held))  # once per wake-up, not per device
                await self._flush(final=False)
        finally:
            stopper.cancel()
            while reads:
                p, (part, task) = reads.popitem()
                # Finish a read in flight (it returns within block_ms) rather than cancel it:
                # entries Redis already delivered would stay pending under this consumer's
                # name, which a restarted process does not have (see pipeline.consumer).
                with contextlib.suppress(RedisError):
                    await self._landed(p, part, await task)
        # Stopping: send what is ready now; devices in backoff stay pending in Redis.
        await self._flush(final=True)
        await self._drain(self.cfg.stop_timeout_s)

    async def _landed(self, p: int, part: _Owned, entries: list[Entry]) -> bool:
        """A finished read of partition ``p`` for ``part``: its entries held, or given back when
        the partition was given up meanwhile. True when it is still owned and read nothing."""
        if self.owned.get(p) is not part:  # given up meanwhile
            await self._give_back(part, entries)
        elif entries:
            await self._hold(entries)
        else:
            return True
        return False

    async def _give_back(self, part: _Owned, entries: list[Entry]) -> None:
        """Entries read for a partition given up meanwhile: pending for this consumer with
        their delivery count as before, for the next owner to take over — only while the
        partition's lease is certainly held (handed over, stopping). A partition lost may have
        a new owner already, which took them over: ``XCLAIM`` would take them back from it
        (seen by it only after an idle claim). Left alone they are its, or pending under this
        consumer until its takeover (their delivery count one higher)."""
        if not entries or not self.ownership.leases[
                self._partition_of.get(entries[0].stream, 0)].valid():
            return
        with contextlib.suppress(RedisError):
            await part.reader.release(entries)

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
        after a restart, or to the partition's next owner). An answer arriving later is still
        recorded if the loop runs on, and never raises (the committer checks)."""
        self._closed = True
        self.sender.close()
        left = list(self._tasks)
        if not left:
            return
        self._abandoned = True
        log.warning("egress: %s with %d device writes unconfirmed; their entries stay "
                    "pending and are delivered again", why, len(left))
        for task in left:
            task.cancel()
        # Let the cancelled tasks unwind (they end at their next await), bounded all the same.
        await asyncio.wait(left, timeout=ABANDON_WAIT_S)

    async def _read(self, p: int, part: _Owned) -> list[Entry]:
        """One batch of partition ``p``: after taking its pending entries over, own pending
        entries first (one pass), then new ones.

        Held entries stay pending until their write lands; the reader's own-pending pass uses a
        cursor, so it never serves an entry egress still holds.
        """
        if not part.taken_over:
            await self._taken_over(p, part)
        if not self.until_idle:
            pause = part.next_read_at - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
        entries = await part.reader.read(block=not self.until_idle)
        if len(entries) < part.reader.batch and self._read_pace_s:
            # drained: let the next read gather a batch
            part.next_read_at = time.monotonic() + self._read_pace_s
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
            try:
                await self._claim_held()
            except RedisError as exc:
                log.warning("egress: refreshing held entries failed (%s)", exc)

    async def _claim_held(self) -> None:
        """One round of :meth:`_keep_claimed`: only the entries of partitions whose lease is
        certainly held. ``XCLAIM`` takes an entry from whichever consumer has it: run by a
        replica resumed after a freeze before its fence dropped the partition, it would take
        back what the new owner took over, and that owner would see those entries only after
        an idle claim (late: their history points then dropped as stale)."""
        leases = self.ownership.leases
        by_stream = {stream: ids for stream, ids in self.held.ids_by_stream().items()
                     if leases[self._partition_of.get(stream, 0)].valid()}
        if not by_stream:
            return
        async with self.ctx.redis.pipeline(transaction=False) as pipe:
            for stream, ids in by_stream.items():
                for i in range(0, len(ids), 1000):
                    pipe.xclaim(stream, GROUP_EGRESS, self.ctx.consumer, 0,
                                list(ids[i : i + 1000]), justid=True)
            await pipe.execute()

    async def _sweep_records(self, done: asyncio.Event) -> None:
        """Delete the expired records of the owned partitions, a page at a time, the
        partitions in turn (``sweep_every_s``: :data:`SWEEP_EVERY_S`)."""
        turn = 0
        while not await wait_event(done, self.sweep_every_s):
            owned = sorted(self.owned)
            if not owned:
                continue
            p = owned[turn % len(owned)]
            part = self.owned[p]
            try:
                part.sweep_cursor, deleted = await self.order.sweep(
                    p, part.sweep_cursor, count=SWEEP_COUNT)
            except RedisError as exc:
                log.warning("egress: sweeping expired records failed (%s)", exc)
                continue
            if deleted:
                log.debug("egress: partition %d: %d expired records deleted", p, deleted)
            if not part.sweep_cursor:
                turn += 1

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
        """Start one write per ready device: coalesce; check it against its record in memory
        (stale, rate limit; records not known yet are read in one call); record echoes when
        configured (one call); send."""
        ready = self.scheduler.ready(time.monotonic(), final=final)
        if not ready:
            return
        wall = now_ms()
        held = self.held
        plans = [(dev, held.start(dev, wall)) for dev in ready]
        unknown: list[DeviceQueue] = []
        for dev, _ in plans:
            part = self.owned.get(dev.partition)
            dev.record = part.records.get(dev.key) if part is not None else None
            if dev.record is None and part is not None:
                unknown.append(dev)
        if unknown and not await self._load(unknown, plans):
            return
        now = time.monotonic()
        now_us = wall_us()
        interval, burst = self.limiter.interval_us, self.limiter.burst
        go: list[tuple[DeviceQueue, DevicePlan]] = []
        for dev, plan in plans:
            record = dev.record
            if dev.gone or record is None:  # its partition was given up (or is handed over)
                self.servers.release_probe(plan.server)
                continue
            if record.stale({pin: p.ts_ms for pin, p in plan.pins.items()}):
                # Blynk already has newer values: nothing to send, ack them. (Late history
                # points are dropped with the stale values and counted with them, by the
                # committer once the write is over: a retried write drops them again.)
                plan.stale = len(plan.pins) + history_only(plan)
                self.committer.finish(dev, plan, Result(), self._pending(dev))
                continue
            wait = record.take(interval, burst, now_us)
            if wait > 0:  # the device's rate limit says wait
                held.requeue(dev, not_before=now + wait)
                self.servers.release_probe(plan.server)
                continue
            points = history_only(plan)
            plan.stale = len(drop_stale(plan, record.pins)) + points - history_only(plan)
            go.append((dev, plan))
        if go and self._echo_window_ms:
            try:
                await echo.record(self.ctx.redis, self._echo_records(go, wall),
                                  self._echo_window_ms, cluster=self.ctx.keys.cluster)
            except RedisError as exc:
                log.warning("egress: recording echoes failed (%s); retrying", exc)
                self._retry_later(go)
                return
        send = self.sender.send
        for dev, plan in go:
            if dev.gone:
                self.servers.release_probe(plan.server)
                continue
            send(dev, plan, self._pending(dev))

    async def _load(self, unknown: list[DeviceQueue],
                    plans: list[tuple[DeviceQueue, DevicePlan]]) -> bool:
        """Read the records of devices first seen since their partition was taken (one call);
        False (the flush retried later) when Redis failed."""
        try:
            records = await self.order.load([d.key for d in unknown],
                                            [d.partition for d in unknown])
        except RedisError as exc:
            log.warning("egress: reading device records failed (%s); retrying", exc)
            self._retry_later(plans)
            return False
        for dev, record in zip(unknown, records, strict=True):
            part = self.owned.get(dev.partition)
            if part is not None and not dev.gone:
                dev.record = part.records.setdefault(dev.key, record)
        if sum(len(part.records) for part in self.owned.values()) > RECORDS_MAX:
            self._forget_records()
        return True

    def _forget_records(self) -> None:
        """Bound the records in memory: forget the oldest-read ones whose device has nothing
        held and nothing to store, down to 3/4 of :data:`RECORDS_MAX`."""
        excess = sum(len(part.records) for part in self.owned.values()) - RECORDS_MAX * 3 // 4
        devices = self.held.devices
        for part in self.owned.values():
            records = part.records
            for key in [k for k, r in records.items()
                        if k not in devices and not r.dirty][:max(0, excess)]:
                del records[key]
                excess -= 1
            if excess <= 0:
                return

    def _retry_later(self, plans: Sequence[tuple[DeviceQueue, DevicePlan]]) -> None:
        for dev, plan in plans:
            if dev.inflight:
                self.held.requeue(dev, not_before=time.monotonic() + backoff_s(1))
            self.servers.release_probe(plan.server)

    def _echo_records(self, plans: Sequence[tuple[DeviceQueue, DevicePlan]], wall: int
                      ) -> dict[int, list[tuple[str, str]]]:
        """What is recorded for echo suppression before these writes are sent (Blynk fires
        its webhooks for these writes too: :mod:`pipeline.echo`), per partition.

        The newest history point of each pin counts too: an upload may make it the pin's
        current value for a moment (the emulator's default; unconfirmed for Blynk), firing a
        webhook — with superseded values going to history that is every coalesced write of a
        ``history: true`` pin, not only backlog after an outage."""
        keys = self.ctx.keys
        per_partition: dict[int, list[tuple[str, str]]] = {}
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
            per_partition.setdefault(dev.partition, []).extend(records)
        return per_partition

    # ---- tracking ------------------------------------------------------------------------

    def _pending(self, dev: DeviceQueue) -> asyncio.Future[None]:
        """A future standing in for one device write until the committer resolves it."""
        pending: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        dev.pending = pending
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
