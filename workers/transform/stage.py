"""The transform stage: lifecycle, and each batch through the fast or the slow path
(:mod:`workers.transform` says what both do)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from pipeline import dedup, events, metrics, routing
from pipeline.consumer import Job, consume
from pipeline.context import Context
from pipeline.errors import Reason
from pipeline.keys import GROUP_TRANSFORM, UPLINKS
from pipeline.lifecycle import cancel_and_wait, wait_event
from pipeline.provision import Limit, Limits, Platform, Provisioner
from pipeline.registry import Registry
from pipeline.routing import DEAD, SKIP, WRITE, Route
from pipeline.streams import DeadItem, Entry, StreamReader, now_ms
from pipeline.unmapped import UnmappedKeys
from workers.transform.creating import Creator
from workers.transform.outputs import STAGE, Mapped, Outputs
from workers.transform.scripts import CHECK_AND_FORGET, CLAIM, Commit, Emit
from workers.transform.templates import Templates

if TYPE_CHECKING:
    from pipeline.blynk.platform import PlatformClient

log = logging.getLogger("blynk_bridge.transform")



@dataclass(slots=True)
class _Prepared:
    """A batch prepared for the fast path's commit (:meth:`TransformStage._prepare_fast`);
    claim ``i`` is uplink ``i``'s."""

    entries: list[Entry]
    version: int
    claims: list[tuple[str, str, bytes, str]]
    #: Each uplink's source (for the duplicates metric).
    sources: list[str]
    #: The routes of the uplinks acked without output (``SKIP``) and dead-lettered whole.
    skips: list[tuple[Route, int]]
    dead: list[tuple[Route, int]]
    outputs: list[tuple[str, int, bytes]]
    #: Each mapped uplink with the index of its claim.
    mapped: list[tuple[Mapped, int]]


class TransformStage:
    """The transform stage (see the module docstring); ``until_idle`` = burst mode."""

    name = STAGE

    def __init__(self, ctx: Context, *, until_idle: bool = False,
                 platform: Platform | None = None) -> None:
        cfg = ctx.config
        self.ctx = ctx
        self.until_idle = until_idle
        self.reader = StreamReader(
            ctx.redis, ctx.keys, ctx.keys.streams(UPLINKS), GROUP_TRANSFORM, ctx.consumer,
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
        self._claims = dedup.Claims(ctx.redis, ctx.keys)
        self._emit = Emit(ctx.redis, GROUP_TRANSFORM)
        self._commit = Commit(ctx.redis, ctx.keys, GROUP_TRANSFORM)
        self._dead_stream = ctx.keys.dead_for
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
        refresher: asyncio.Task[None] | None = None
        if self._platform is not None and self.templates.pulled and not self.until_idle:
            refresher = asyncio.create_task(self._refresh_templates(stop), name="template-pull")
        try:
            await consume(self.reader, self.handle, stop, until_idle=self.until_idle,
                          max_backoff_s=self.ctx.config.transform.max_backoff_s, prefetch=True,
                          prepare=self.prepare)
        finally:
            if refresher is not None:
                await cancel_and_wait([refresher])
            await self.flush_unmapped()

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
        contract); raises ``Retryable`` after the rest of the batch is done when some uplinks
        wait for a device being created, so they stay pending and are retried."""
        await self._finish(entries, await self._prepare_fast(entries))

    async def prepare(self, entries: list[Entry]) -> Job | None:
        """The :func:`~pipeline.consumer.consume` ``prepare`` hook: the fast path up to its
        commit, done as soon as the batch is read — while the batch before it is still being
        committed. Nothing here touches Redis except registry cache misses; the commit's
        registry version check catches a cache that moved on meanwhile."""
        prepared = await self._prepare_fast(entries)
        if prepared is None:
            return None
        return functools.partial(self._finish, entries, prepared)

    async def _finish(self, entries: list[Entry], prepared: _Prepared | None) -> None:
        """Commit a prepared batch, or take the slow path. A batch prepared before this process
        last synced its registry is prepared again first: its commit would fail the version
        check."""
        if prepared is not None and prepared.version != self.registry.version:
            prepared = await self._prepare_fast(entries)
        if prepared is None or not await self._commit_fast(prepared):
            await self._handle_slow(entries)

    async def _prepare_fast(self, entries: list[Entry]) -> _Prepared | None:
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

        mark_of = dedup.mark_of
        claims: list[tuple[str, str, bytes, str]] = []
        skips: list[tuple[Route, int]] = []
        dead: list[tuple[Route, int]] = []
        ready: list[tuple[Entry, Route]] = []
        ready_ci: list[int] = []
        for ci, (e, r) in enumerate(zip(entries, routes, strict=True)):
            kind = r.kind
            if kind == WRITE:
                assert r.device is not None
                if r.device.meta_pending:
                    return None
                ready.append((e, r))
                ready_ci.append(ci)
                claims.append((e.stream, r.uplink.event_id, mark_of(e), CLAIM))
            elif kind == SKIP:
                skips.append((r, ci))
                claims.append((e.stream, r.uplink.event_id, mark_of(e), CLAIM))
            elif kind == DEAD:
                dead.append((r, ci))
                claims.append((e.stream, r.uplink.event_id, mark_of(e), CHECK_AND_FORGET))
            else:  # CREATE
                return None

        ts = now_ms()
        mapped = self.outputs.map(ready, ts)
        outputs: list[tuple[str, int, bytes]] = []
        for m, ci in zip(mapped, ready_ci, strict=True):
            if m.dead is not None:
                outputs.append((self._dead_stream(m.entry.stream), ci + 1, m.dead))
            if m.write is not None:
                outputs.append((m.stream, ci + 1, m.write))
        for r, ci in dead:
            outputs.append((self._dead_stream(entries[ci].stream), ci + 1,
                            self.outputs.dead_letter_of(entries[ci], r.why(), r.detail, ts)))
        return _Prepared(entries, version, claims, [u.source for u in uplinks], skips, dead,
                         outputs, list(zip(mapped, ready_ci, strict=True)))

    async def _commit_fast(self, p: _Prepared) -> bool:
        """The fast path's commit; ``False`` = nothing was done, take the slow path."""
        version = self.registry.version_for(p.entries[0].stream)
        assert version is not None  # _finish: the registry is in line with p.version
        dups = await self._commit.run(version, self._window, p.claims, p.outputs, p.entries)
        if dups is None:  # the registry changed since the cache was last in line with it
            await self.registry.sync(p.entries[0].stream)  # the batch's partition only
            return False

        duplicate = set(dups)
        duplicates: Counter[str] = Counter()
        for i in dups:
            duplicates[p.sources[i]] += 1
        skipped: Counter[str] = Counter(r.why() for r, ci in p.skips if ci not in duplicate)
        for source, n in duplicates.items():
            metrics.DUPLICATES.labels(source).inc(n)
        for reason, n in skipped.items():
            metrics.TRANSFORM_SKIPPED.labels(reason).inc(n)
        for r, ci in p.dead:
            if ci not in duplicate:
                metrics.DEAD.labels(STAGE, r.reason).inc()
        await self.outputs.account([m for m, ci in p.mapped if ci not in duplicate])
        return True

    async def _handle_slow(self, entries: list[Entry]) -> None:
        """The slow path: every case (module docstring, steps 1-5)."""
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

        # One round trip: registry version check (of the batch's partition: its rows are
        # the only ones read) + de-duplication claims (on a cluster the claims declare their
        # shard keys, which needs the table read first: their own call).
        marks = [dedup.mark_of(e) for e, _ in decoded]
        claims = [(e.stream, u.event_id, m) for (e, u), m in zip(decoded, marks, strict=True)]
        queued = bool(decoded) and not self._claims.declares
        parts = self.registry.parts_for(entries[0].stream)
        async with ctx.redis.pipeline(transaction=False) as pipe:
            self.registry.sync_queue(pipe, parts)
            if queued:
                await self._claims.queue(pipe, claims, self._window)
            replies = await pipe.execute()
        synced = 2 * len(parts)
        if not self.registry.sync_apply(*replies[:synced], parts=parts):
            await self.registry.reset(parts)
        claimed: list[bytes | None] = (
            replies[synced] if queued
            else await self._claims.run(claims, self._window) if decoded else [])

        acks: list[Entry] = []
        fresh: list[tuple[Entry, events.Uplink]] = []
        duplicates: Counter[str] = Counter()
        is_dup = dedup.is_duplicate
        for (e, u), mark, reply in zip(decoded, marks, claimed, strict=True):
            if is_dup(reply, mark):
                duplicates[u.source] += 1
                acks.append(e)
            else:
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

    async def _dead_letter(self, dead: list[DeadItem]) -> None:
        """Dead-letter whole uplinks, forgetting their de-duplication marks first so that a
        replay after a fix is not dropped as a duplicate."""
        if not dead:
            return
        ids: list[tuple[str, str]] = []
        for e, _, _ in dead:
            if e.data is not None:
                with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                    ids.append((e.stream, events.decode_uplink(e.data).event_id))
        await self._claims.forget(ids, self._window)
        await self.reader.dead_letter(dead)

    async def _write(self, ready: list[tuple[Entry, Route]], acks: list[Entry]) -> None:
        """Map, append writes + partial dead letters and ack, in one script call."""
        mapped = self.outputs.map(ready, now_ms())
        out: list[tuple[str, bytes]] = []
        for m in mapped:
            if m.dead is not None:
                out.append((self._dead_stream(m.entry.stream), m.dead))
            if m.write is not None:
                out.append((m.stream, m.write))
            acks.append(m.entry)
        await self._emit.run(out, acks)
        await self.outputs.account(mapped)

    async def flush_unmapped(self) -> None:
        await self.outputs.flush_unmapped()
