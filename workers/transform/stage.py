"""The transform stage: lifecycle, partition ownership, and each batch through the fast or the
slow path (:mod:`workers.transform` says what both do).

**Ownership.** The stage owns uplinks partitions through :class:`pipeline.lease.PartitionLeases`
(``keys.transform_lease(p)``), as egress owns writes partitions: ``redis.partitions`` is
transform's unit of parallelism (replicas beyond it are warm standbys). Each owned partition
has a :class:`~pipeline.streams.StreamReader` of its own, run by its own
:func:`~pipeline.consumer.consume` loop (batches of every partition are handled one at a time,
as one loop over every partition did), and its de-duplication window in memory
(:class:`pipeline.dedup.Window`). A partition taken loads its de-dup blocks and takes its
pending entries over before its first read; every commit (:class:`.scripts.Commit`) is fenced by
the token of the ownership it was claimed under: refused, nothing is written or acked, the
partition is given up and its entries stay pending for the new owner. A partition handed over
(rebalance, stop) finishes the batch under way first.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
from redis.exceptions import RedisError

from pipeline import dedup, events, metrics, routing
from pipeline.consumer import Job, backoff_s, consume
from pipeline.context import Context
from pipeline.errors import Reason, Retryable
from pipeline.keys import GROUP_TRANSFORM, UPLINKS
from pipeline.lease import PartitionLeases
from pipeline.lifecycle import cancel_and_wait, until_stopped, wait_event
from pipeline.provision import Limit, Limits, Platform, Provisioner
from pipeline.registry import Registry
from pipeline.routing import DEAD, SKIP, WRITE, Route
from pipeline.streams import DeadItem, Entry, StreamReader, now_ms
from pipeline.unmapped import UnmappedKeys
from workers.transform.creating import Creator
from workers.transform.outputs import STAGE, Mapped, Outputs
from workers.transform.scripts import FENCED, VERSION_MOVED, Commit
from workers.transform.templates import Templates

if TYPE_CHECKING:
    from pipeline.blynk.platform import PlatformClient

log = logging.getLogger("blynk_bridge.transform")



@dataclass(slots=True)
class _Prepared:
    """A batch prepared for the fast path's commit (:meth:`TransformStage._prepare_fast`)."""

    entries: list[Entry]
    version: int
    #: The indices of the duplicate uplinks (acked, nothing written).
    dups: list[int]
    #: The de-dup records the commit adds to the partition's block (the new events).
    records: list[tuple[bytes, int]]
    #: Each uplink's source (for the duplicates metric).
    sources: list[str]
    #: The routes of the uplinks acked without output (``SKIP``) and dead-lettered whole.
    skips: list[tuple[Route, int]]
    dead: list[tuple[Route, int]]
    outputs: list[tuple[str, bytes]]
    mapped: list[Mapped]


class _Owned:
    """An uplinks partition this replica owns: its reader, its de-dup window, its loop."""

    __slots__ = ("loaded", "p", "reader", "stop", "stream", "task", "token", "unsaved",
                 "window")

    def __init__(self, p: int, stream: str, reader: StreamReader, window: dedup.Window,
                 token: str) -> None:
        self.p = p
        self.stream = stream
        self.reader = reader
        self.window = window
        #: The lease token of this ownership: every commit is fenced by it.
        self.token = token
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        #: The de-dup blocks were loaded and the pending entries taken over.
        self.loaded = False
        #: Entry id → the de-dup record its commit adds (the slow path's batch under way:
        #: claimed, not committed; emptied when the batch is over).
        self.unsaved: dict[str, tuple[bytes, int]] = {}


class TransformStage:
    """The transform stage (see the module docstring); ``until_idle`` = burst mode."""

    name = STAGE

    def __init__(self, ctx: Context, *, until_idle: bool = False,
                 platform: Platform | None = None) -> None:
        cfg = ctx.config
        self.ctx = ctx
        self.until_idle = until_idle
        self._streams = ctx.keys.streams(UPLINKS)  # partition → its stream
        # Over every partition: the group, dead letters, releases; each owned partition is
        # read by a reader of its own (_Owned).
        self.reader = StreamReader(
            ctx.redis, ctx.keys, self._streams, GROUP_TRANSFORM, ctx.consumer,
            stage=STAGE, batch=cfg.streams.batch, block_ms=cfg.streams.block_ms,
            claim_idle_ms=cfg.streams.claim_idle_ms, max_deliveries=cfg.streams.max_deliveries,
            linger_ms=cfg.streams.linger_ms, linger_above_per_s=cfg.streams.linger_above_per_s,
        )
        self.registry = Registry(ctx.redis, ctx.keys, cache_size=cfg.transform.cache_size)
        self.templates = Templates(cfg)
        self._integrations = routing.integrations_of(cfg)
        self._platform: Platform | None = platform
        self._own_platform: PlatformClient | None = None
        self._limits = Limits(ctx.redis, ctx.keys, {
            (source, a.name): Limit(a.provision_rate, a.provision_burst, a.provision_max)
            for source, apps in (("tts", cfg.tts), ("particle", cfg.particle))
            for a in apps if a.provision})
        self.provisioner = Provisioner(ctx.redis, ctx.keys, self.registry, platform,
                                       wait_s=cfg.transform.provision_wait_s,
                                       limits=self._limits)
        self._window = cfg.transform.dedup_window_s
        self._block_ttl_ms = dedup.block_ttl_ms(self._window)
        self.budget = dedup.Budget(cfg.transform.dedup_max_events)
        metrics.DEDUP_EVENTS.set_function(self.budget.total)
        self._commit = Commit(ctx.redis, ctx.keys, GROUP_TRANSFORM)
        self._dead_stream = ctx.keys.dead_for
        self.ownership = PartitionLeases(
            ctx.redis, lease_key=ctx.keys.transform_lease,
            owners_key=ctx.keys.owners(STAGE), owner=ctx.consumer,
            partitions=len(self._streams), ttl_ms=cfg.transform.lease_ttl_ms,
            on_acquired=self._acquired, on_dropped=self._dropped)
        #: Partition → what this replica keeps of it while it owns it; by its stream too.
        self.owned: dict[int, _Owned] = {}
        self._by_stream: dict[str, _Owned] = {}
        #: Loops of partitions lost (not waited for when dropped) that have not ended yet.
        self._ending: set[asyncio.Task[None]] = set()
        #: Burst mode: keep the partitions (and their windows) when ``main_loop`` returns, as
        #: a running replica would between passes (the benchmarks' successive passes).
        self.keep_partitions = False
        self._running = False
        #: One batch handled at a time over every partition (the registry cache, the
        #: provisioner and the unmapped counts are the process's).
        self._handling = asyncio.Lock()
        #: The ownership whose batch the slow path is handling (under ``_handling``): its
        #: commits, the Creator's included, are fenced by that ownership's token, not by the
        #: partition's current one (it may have been lost and taken again meanwhile).
        self._slow: _Owned | None = None
        self.outputs = Outputs(
            ctx.keys, self.templates, self.registry,
            UnmappedKeys(ctx.redis, ctx.keys, max_keys=cfg.transform.unmapped_max_keys,
                         ttl_s=cfg.transform.unmapped_ttl_s),
            cfg.blynk.servers, cfg.blynk.servers[cfg.blynk.default_server])
        self.creator = Creator(self.templates, self.provisioner, self.outputs, self.reader,
                               self._emit, dead_letter=self._dead_letter, write=self._write)

    # ---- lifecycle -------------------------------------------------------------------------

    def _needs_platform(self) -> bool:
        return any(i.provision for i in self._integrations.values()) or bool(
            self.templates.pulled)

    async def startup(self) -> None:
        cfg = self.ctx.config
        if self._platform is None and self._needs_platform():
            if cfg.blynk.platform is None:
                log.error("auto-provisioning or template pulls need `blynk.platform`: "
                          "unknown devices will be dead-lettered %s", Reason.PROVISION_FAILED)
            else:
                from pipeline.blynk.platform import PlatformClient

                self._own_platform = PlatformClient(cfg.blynk.platform, self.ctx.blynk())
                self._platform = self._own_platform
                self.provisioner = Provisioner(
                    self.ctx.redis, self.ctx.keys, self.registry, self._platform,
                    wait_s=cfg.transform.provision_wait_s, limits=self._limits)
                self.creator.provisioner = self.provisioner
        await self.reader.ensure_group()
        await self.registry.start()
        changed = await self.registry.load_static(cfg.devices)
        if changed:
            log.info("registry: %d static devices registered or updated", changed)
            await self.registry.sync()  # in line with our own changes: the first batch is fast
        if self._platform is not None and self.templates.pulled:
            await self.templates.refresh(self._platform)

    async def main_loop(self, stop: asyncio.Event) -> None:
        """Own partitions and run each one's loop until ``stop`` (burst mode: until every
        owned partition is idle)."""
        refresher: asyncio.Task[None] | None = None
        if self._platform is not None and self.templates.pulled and not self.until_idle:
            refresher = asyncio.create_task(self._refresh_templates(stop), name="template-pull")
        await self.reader.ensure_group()
        if self.until_idle:
            await self.ownership.take_share(stop, STAGE)
        done = asyncio.Event()
        report = functools.partial(self.ownership.report, STAGE, "uplinks", "transforms")
        chores = [asyncio.create_task(self.ownership.run(done, name=STAGE, after=report),
                                      name="transform-own"),
                  asyncio.create_task(self.ownership.fence(done), name="transform-fence")]
        self._running = True
        try:
            for part in self.owned.values():
                self._start(part)
            if self.until_idle:
                await self._parts_ended(raising=True)
            else:
                await stop.wait()
        except BaseException:
            # Cancelled (a stop past the process's grace) or failed: the loops stop now; what
            # they read stays pending, and the partitions' next owner takes it over.
            for part in self.owned.values():
                if part.task is not None:
                    part.task.cancel()
            raise
        finally:
            self._running = False
            for part in self.owned.values():
                part.stop.set()
            # Each loop finishes its read in flight and the batch under way (consume).
            await self._parts_ended()
            done.set()
            await cancel_and_wait(chores)
            if refresher is not None:
                await cancel_and_wait([refresher])
            await self.flush_unmapped()
        if not (self.until_idle and self.keep_partitions):
            for p in list(self.owned):
                await self.ownership.drop(p, "stopped")
                await self.ownership.release(p)

    async def _parts_ended(self, *, raising: bool = False) -> None:
        """Wait for every partition's loop (``raising``: a failed one's error is raised)."""
        while True:
            tasks = {t for t in (part.task for part in self.owned.values())
                     if t is not None and not t.done()} | self._ending
            if not tasks:
                break
            await asyncio.wait(tasks)
        for part in self.owned.values():
            t = part.task
            if raising and t is not None and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]

    # ---- ownership -------------------------------------------------------------------------

    async def _acquired(self, p: int) -> None:
        stream = self._streams[p]
        r = self.reader
        part = _Owned(p, stream, StreamReader(
            self.ctx.redis, self.ctx.keys, [stream], GROUP_TRANSFORM, self.ctx.consumer,
            stage=STAGE, batch=r.batch, block_ms=r.block_ms, claim_idle_ms=r.claim_idle_ms,
            max_deliveries=r.max_deliveries, linger_ms=r.linger_ms,
            linger_above_per_s=self.ctx.config.streams.linger_above_per_s),
            dedup.Window(self._window, self.budget), self.ownership.leases[p].token)
        self.owned[p] = part
        self._by_stream[stream] = part
        metrics.PARTITIONS_OWNED.labels(STAGE).set(len(self.owned))
        log.info("transform: partition %d taken", p)
        if self._running:
            self._start(part)

    async def _dropped(self, p: int, why: str) -> bool:
        """Stop the partition's loop; a hand-over (rebalance, stop) waits for the batch under
        way, committed under the lease still held. ``False``: it did not end in time (its
        commit may still land), the lease must lapse rather than be released."""
        part = self.owned.pop(p, None)
        if part is None:
            return True
        self._by_stream.pop(part.stream, None)
        part.stop.set()
        metrics.PARTITIONS_OWNED.labels(STAGE).set(len(self.owned))
        log.info("transform: partition %d given up (%s)", p, why)
        ended = True
        task = part.task
        if task is not None and not task.done():
            if why in ("rebalance", "stopped") and task is not asyncio.current_task():
                finished, _ = await asyncio.wait({task}, timeout=self.ownership.ttl_ms / 2000)
                ended = bool(finished)
            if not task.done():
                self._ending.add(task)
                task.add_done_callback(self._ending.discard)
        part.window.close()
        return ended

    def _start(self, part: _Owned) -> None:
        if part.task is None or part.task.done():
            part.stop = asyncio.Event()
            part.task = asyncio.create_task(self._run_partition(part),
                                            name=f"transform-{part.p}")

    async def _run_partition(self, part: _Owned) -> None:
        """Load the partition's de-dup blocks and take its pending entries over, then consume it
        until its loop is stopped (burst mode: until it is idle)."""
        failures = 0
        while not part.stop.is_set():
            try:
                if not part.loaded:
                    n = await dedup.load(self.ctx.redis, self.ctx.keys, part.stream,
                                         self._window, part.window)
                    taken = await part.reader.take_over(part.stream)
                    part.loaded = True
                    log.info("transform: partition %d: %d de-dup events loaded, %d pending "
                             "entries taken over", part.p, n, taken)
                await consume(part.reader, functools.partial(self._handle, part), part.stop,
                              until_idle=self.until_idle,
                              max_backoff_s=self.ctx.config.transform.max_backoff_s,
                              prefetch=True, prepare=functools.partial(self._prepare, part))
                if self.until_idle:
                    return
            except RedisError as exc:
                failures += 1
                log.warning("transform: partition %d: taking it over failed (%s); retrying",
                            part.p, exc)
                await until_stopped(asyncio.sleep(backoff_s(failures)), part.stop)
            except Exception:  # a defect: logged, and the partition's loop starts again
                if self.until_idle:
                    raise
                failures += 1
                log.exception("transform: partition %d: its loop failed", part.p)
                await until_stopped(asyncio.sleep(backoff_s(failures)), part.stop)

    async def _fenced(self, part: _Owned) -> None:
        """A commit found the lease not holding this ownership's token: give it up at once
        (nothing was written or acked) and leave the batch pending for the new owner."""
        metrics.TRANSFORM_FENCED.inc()
        log.warning("transform: partition %d: the lease is no longer this ownership's; "
                    "nothing written or acked, the partition is given up", part.p)
        if self.owned.get(part.p) is part:
            await self.ownership.drop(part.p, "fenced")
        part.stop.set()
        raise Retryable("the partition's lease moved to another owner")

    def _part_of(self, entries: list[Entry]) -> _Owned:
        part = self._by_stream.get(entries[0].stream)
        if part is None:
            raise Retryable(f"partition of {entries[0].stream} not owned")
        return part

    async def shutdown(self) -> None:
        await self.registry.close()
        if self._own_platform is not None:
            await self._own_platform.close()

    async def _refresh_templates(self, stop: asyncio.Event) -> None:
        period = self.ctx.config.transform.template_refresh_s
        while not stop.is_set():
            await wait_event(stop, period)
            if not stop.is_set() and self._platform is not None:
                await self.templates.refresh(self._platform)

    # ---- one batch -------------------------------------------------------------------------

    async def handle(self, entries: list[Entry]) -> None:
        """Write, ack or dead-letter every entry (the :func:`~pipeline.consumer.consume`
        contract) of an owned partition; raises ``Retryable`` after the rest of the batch is
        done when some uplinks wait for a device being created, so they stay pending and are
        retried."""
        await self._handle(self._part_of(entries), entries)

    async def prepare(self, entries: list[Entry]) -> Job | None:
        return await self._prepare(self._part_of(entries), entries)

    async def _handle(self, part: _Owned, entries: list[Entry]) -> None:
        await self._finish(part, entries, await self._prepare_fast(part, entries))

    async def _prepare(self, part: _Owned, entries: list[Entry]) -> Job | None:
        """The :func:`~pipeline.consumer.consume` ``prepare`` hook: the fast path up to its
        commit, done as soon as the batch is read — while the batch before it is still being
        committed. Nothing here touches Redis except registry cache misses (its de-dup claims
        are in memory: a batch released unhandled is a redelivery of its own claims); the
        commit's registry version check catches a cache that moved on meanwhile."""
        prepared = await self._prepare_fast(part, entries)
        if prepared is None:
            return None
        return functools.partial(self._finish, part, entries, prepared)

    async def _finish(self, part: _Owned, entries: list[Entry],
                      prepared: _Prepared | None) -> None:
        """Commit a prepared batch, or take the slow path. A batch prepared before this process
        last synced its registry is prepared again first: its commit would fail the version
        check."""
        async with self._handling:
            if prepared is not None and prepared.version != self.registry.version:
                prepared = await self._prepare_fast(part, entries)
            if prepared is None or not await self._commit_fast(part, prepared):
                await self._handle_slow(part, entries)

    async def _prepare_fast(self, part: _Owned, entries: list[Entry]) -> _Prepared | None:
        """The fast path up to its commit (module docstring); ``None`` = take the slow one."""
        version = self.registry.version
        if version is None:
            return None
        decode = events.decode_uplink
        uplinks: list[events.Uplink] = []
        for e in entries:
            if e.data is None:
                return None
            try:
                uplinks.append(decode(e.data))
            except (msgspec.ValidationError, msgspec.DecodeError):
                return None
        integrations = self._integrations
        keys = routing.lookups(uplinks, integrations)
        devices = await self.registry.get_many(keys, sync=False) if keys else {}
        routes = routing.plan(uplinks, devices, integrations)
        for r in routes:
            if r.kind != WRITE and r.kind != SKIP and r.kind != DEAD:  # CREATE
                return None
            if r.kind == WRITE and r.device is not None and r.device.meta_pending:
                return None

        window = part.window
        window.now()
        digest, mark_of, replay = dedup.digest, dedup.mark_of, events.REPLAY
        dups: list[int] = []
        records: list[tuple[bytes, int]] = []
        skips: list[tuple[Route, int]] = []
        dead: list[tuple[Route, int]] = []
        ready: list[tuple[Entry, Route]] = []
        for ci, (e, r) in enumerate(zip(entries, routes, strict=True)):
            d, m = digest(r.uplink.event_id), mark_of(e)
            if r.kind == DEAD:
                # Checked, and forgotten when this entry owns it: a replay of the dead letter
                # must not be dropped; never committed in a block.
                old = window.find(d)
                if old is not None and old != m and replay not in e.fields:
                    dups.append(ci)
                else:
                    window.forget(d, m)
                    dead.append((r, ci))
                continue
            if replay in e.fields:
                window.take(d, m)
            else:
                old = window.claim(d, m)
                if old is not None and old != m:
                    dups.append(ci)
                    continue
            records.append((d, m))
            if r.kind == WRITE:
                ready.append((e, r))
            else:
                skips.append((r, ci))

        ts = now_ms()
        mapped = self.outputs.map(ready, ts)
        outputs = self._outputs_of(mapped)
        for r, ci in dead:
            outputs.append((self._dead_stream(entries[ci].stream),
                            self.outputs.dead_letter_of(entries[ci], r.why(), r.detail, ts)))
        return _Prepared(entries, version, dups, records, [u.source for u in uplinks], skips,
                         dead, outputs, mapped)

    async def _commit_fast(self, part: _Owned, p: _Prepared) -> bool:
        """The fast path's commit; ``False`` = nothing was done, take the slow path."""
        stream = part.stream
        version = self.registry.version_for(stream)
        assert version is not None  # _finish: the registry is in line with p.version
        reply = await self._commit.run(
            version, stream, self.ownership.leases[part.p].key, part.token,
            dedup.block_key(self.ctx.keys, stream, self._window, part.window.now()),
            dedup.block(p.records), self._block_ttl_ms, p.outputs, p.entries)
        if reply == FENCED:
            await self._fenced(part)
        if reply == VERSION_MOVED:  # the registry changed since the cache was in line with it
            await self.registry.sync(stream)  # the batch's partition only
            return False
        self.budget.enforce()
        duplicates: Counter[str] = Counter(p.sources[i] for i in p.dups)
        for source, n in duplicates.items():
            metrics.DUPLICATES.labels(source).inc(n)
        skipped: Counter[str] = Counter(r.why() for r, _ in p.skips)
        for reason, n in skipped.items():
            metrics.TRANSFORM_SKIPPED.labels(reason).inc(n)
        for r, _ in p.dead:
            metrics.DEAD.labels(STAGE, r.reason).inc()
        await self.outputs.account(p.mapped)
        return True

    async def _handle_slow(self, part: _Owned, entries: list[Entry]) -> None:
        """The slow path: every case (module docstring, steps 1-5)."""
        self._slow = part
        try:
            await self._slow_path(part, entries)
        finally:
            self._slow = None
            # An entry left pending is claimed again (as its own) when redelivered; whatever
            # else acks it (the fast path, max_deliveries) must not find a record kept here.
            part.unsaved.clear()

    async def _slow_path(self, part: _Owned, entries: list[Entry]) -> None:
        ctx = self.ctx
        dead: list[DeadItem] = []
        decoded: list[tuple[Entry, events.Uplink]] = []
        decode = events.decode_uplink
        for e in entries:
            if e.data is None:
                dead.append((e, Reason.UNDECODABLE, "entry has no `d` field"))
                continue
            try:
                decoded.append((e, decode(e.data)))
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                dead.append((e, Reason.UNDECODABLE, f"not an Uplink: {exc}"))

        # The registry version check of the batch's partition (its rows are the only ones
        # read), then the de-duplication claims, in memory (marked, not yet committed).
        parts = self.registry.parts_for(part.stream)
        async with ctx.redis.pipeline(transaction=False) as pipe:
            self.registry.sync_queue(pipe, parts)
            replies = await pipe.execute()
        if not self.registry.sync_apply(*replies, parts=parts):
            await self.registry.reset(parts)

        acks: list[Entry] = []
        fresh: list[tuple[Entry, events.Uplink]] = []
        duplicates: Counter[str] = Counter()
        window = part.window
        window.now()
        for e, u in decoded:
            d, m = dedup.digest(u.event_id), dedup.mark_of(e)
            if events.REPLAY in e.fields:
                window.take(d, m)
            else:
                old = window.claim(d, m)
                if old is not None and old != m:
                    duplicates[u.source] += 1
                    acks.append(e)
                    continue
            part.unsaved[e.id] = (d, m)
            fresh.append((e, u))
        for source, n in duplicates.items():
            metrics.DUPLICATES.labels(source).inc(n)

        uplinks = [u for _, u in fresh]
        keys = routing.lookups(uplinks, self._integrations)
        devices = await self.registry.get_many(keys, sync=False) if keys else {}
        skipped: Counter[str] = Counter()
        ready: list[tuple[Entry, Route]] = []
        to_create: dict[str, list[tuple[Entry, Route]]] = {}
        routes = routing.plan(uplinks, devices, self._integrations)
        for (e, _), r in zip(fresh, routes, strict=True):
            if r.kind == WRITE:
                ready.append((e, r))
            elif r.kind == SKIP:
                skipped[r.why()] += 1
                acks.append(e)
            elif r.kind == DEAD:
                dead.append((e, r.why(), r.detail))
            else:  # CREATE
                to_create.setdefault(r.key, []).append((e, r))
        for reason, n in skipped.items():
            metrics.TRANSFORM_SKIPPED.labels(reason).inc(n)

        await self._dead_letter(dead)
        await self._write(ready, acks)
        pending = {r.key: r.device for _, r in ready if r.device and r.device.meta_pending}
        for dev in pending.values():
            await self.provisioner.finish(dev)
        if to_create:
            await self.creator.create(to_create)
        self.budget.enforce()

    async def _dead_letter(self, dead: list[DeadItem]) -> None:
        """Dead-letter whole uplinks, forgetting their de-duplication claims first so that a
        replay after a fix is not dropped as a duplicate (they were never committed). Not
        fenced: an owner that lost the partition may still add these letters (as egress's
        dead letters of a read)."""
        if not dead:
            return
        part = self._slow
        if part is not None:
            for e, _, _ in dead:
                claim = part.unsaved.pop(e.id, None)
                if claim is not None:
                    part.window.forget(*claim)
        await self.reader.dead_letter(dead)

    async def _write(self, ready: list[tuple[Entry, Route]], acks: list[Entry]) -> None:
        """Map, append writes + partial dead letters and ack, in one commit."""
        mapped = self.outputs.map(ready, now_ms())
        acks.extend(m.entry for m in mapped)
        await self._emit(self._outputs_of(mapped), acks)
        await self.outputs.account(mapped)

    def _outputs_of(self, mapped: list[Mapped]) -> list[tuple[str, bytes]]:
        """The stream entries of mapped uplinks: each one's partial dead letter, then its
        write."""
        out: list[tuple[str, bytes]] = []
        for m in mapped:
            if m.dead is not None:
                out.append((self._dead_stream(m.entry.stream), m.dead))
            if m.write is not None:
                out.append((m.stream, m.write))
        return out

    async def _emit(self, outputs: list[tuple[str, bytes]], acks: list[Entry]) -> None:
        """The slow path's commit (:class:`.scripts.Commit`, no registry version check): the
        outputs, the acks, and the de-dup records of the acked entries claimed as new."""
        if not outputs and not acks:
            return
        part = self._slow
        assert part is not None  # called by the slow path only
        unsaved = part.unsaved
        records = [unsaved.pop(e.id) for e in acks if e.id in unsaved]
        reply = await self._commit.run(
            None, part.stream, self.ownership.leases[part.p].key, part.token,
            dedup.block_key(self.ctx.keys, part.stream, self._window, part.window.now()),
            dedup.block(records), self._block_ttl_ms, outputs, acks)
        if reply == FENCED:
            await self._fenced(part)

    async def flush_unmapped(self) -> None:
        await self.outputs.flush_unmapped()
