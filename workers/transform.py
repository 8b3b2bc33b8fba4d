"""transform: uplinks → Blynk writes (registry, de-duplication, mapping, auto-provisioning).

Reads ``Uplink``s from the ``uplinks`` stream (group ``transform``) in batches; after a small
batch the next read lingers ``streams.linger_ms`` so batches fill under moderate load.

**Fast path** (every batch with no undecodable entry, no device to create and no metafield
pending): decode, resolve devices in the registry cache (misses: one ``HMGET`` script call),
map, then ONE script call (:class:`Commit`) that, atomically, checks the registry version is
still the one the cache is in line with (else it does nothing: the stage syncs the registry and
takes the slow path), claims each uplink's ``event_id`` (:mod:`pipeline.dedup`), appends the
outputs — writes, partial and whole dead letters — of the uplinks that are not duplicates, and
acks the batch. Two round trips per batch: the read and the commit — and neither leaves the
worker idle: :meth:`TransformStage.prepare` is :func:`~pipeline.consumer.consume`'s
``prepare`` hook, so the next batch is read (``prefetch``) and prepared — decoded, resolved,
mapped — while this one commits; batches still commit one at a time, in read order. A batch
prepared before this process synced its registry is prepared again before its commit; one
prepared against a registry that moved on elsewhere fails the version check and is redone on
the slow path.

Both paths decide where each uplink goes with the same pure :func:`pipeline.routing.plan`
(skip, dead-letter, create the device, or write); they differ only in how they claim events and
what they do with a device to create or a metafield pending (the fast path leaves those batches
to the slow one).

**Slow path** (anything else; same outcome, more round trips):

1. decode (undecodable → dead letter ``undecodable``);
2. one pipeline: the registry's version check + a de-duplication claim per uplink
   (:mod:`pipeline.dedup`); duplicates are acked and counted;
3. route the uplinks that are not duplicates (:func:`pipeline.routing.plan`): the Particle
   blueprint's ``token`` is the device itself; everything else goes through the registry cache
   (misses: one ``HMGET`` script call);
4. map values (:mod:`pipeline.mapping`) and append every ``BlynkWrite`` — and the partial dead
   letters — and ack, in one script call (:class:`Emit`);
5. unknown devices of integrations with ``provision: true`` are created in Blynk
   (:mod:`pipeline.provision`), then written and acked like the rest — only when one of their
   uplinks maps a value (else those are acked as ``nothing_mapped``) and within the
   integration's limits: past ``provision_max`` they are dead-lettered ``provision_limit``,
   over ``provision_rate`` they stay pending, released without counting a delivery, until a
   replica reclaims them after ``claim_idle_ms``. Any other retryable failure leaves their
   uplinks pending and backs off.

Dead letters (original uplink kept, so ``dead replay`` can resend it): ``unknown_device``,
``device_broken``, ``provision_failed``, ``provision_limit``, ``unknown_integration``,
``undecodable``, and ``type_mismatch`` for the keys whose values do not fit their datastream.
The last is a *partial* dead letter: the uplink's other keys are written, and one
``DeadLetter`` holds the whole original uplink with a detail naming each rejected key, pin and
why. Replaying it rewrites the good keys too, which is harmless (same event time, egress keeps
the newest).

Unmapped keys: counted by :class:`pipeline.unmapped.UnmappedKeys` (bounded per template, with a
TTL), flushed at most once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import msgspec
from redis.exceptions import RedisError

from pipeline import dedup, events, metrics, routing
from pipeline.config import Config
from pipeline.consumer import Job, consume
from pipeline.context import Context
from pipeline.errors import BridgeError, Permanent, Retryable
from pipeline.keys import GROUP_TRANSFORM, UPLINKS, Keys
from pipeline.mapping import (
    Template,
    datastreams_from_platform,
    describe_rejected,
    map_uplink,
    maps_a_value,
)
from pipeline.provision import (
    PROVISION_FAILED,
    PROVISION_RATE,
    Limit,
    Limits,
    Platform,
    Provisioner,
)
from pipeline.registry import Device, Registry
from pipeline.routing import DEAD, SKIP, WRITE, Route
from pipeline.streams import Entry, Redis, StreamReader, now_ms
from pipeline.unmapped import UnmappedKeys

if TYPE_CHECKING:
    from pipeline.blynk.platform import PlatformClient

log = logging.getLogger("blynk_bridge.transform")

STAGE = "transform"
UNDECODABLE = "undecodable"


class Templates:
    """Compiled templates by name; ``pull: true`` ones refreshed from the platform API."""

    def __init__(self, config: Config) -> None:
        self._configs = {t.name: t for t in config.templates}
        self.by_name: dict[str, Template] = {
            t.name: Template.from_config(t) for t in config.templates
        }
        self._untyped: dict[str, Template] = {}

    def get(self, name: str | None, fallback: str) -> Template:
        """The named template, or an untyped one (pins pass through) named ``fallback``."""
        if name is not None:
            t = self.by_name.get(name)
            if t is not None:
                return t
        t = self._untyped.get(fallback)
        if t is None:
            t = self._untyped[fallback] = Template(fallback)
        return t

    @property
    def pulled(self) -> list[str]:
        return [n for n, t in self._configs.items() if t.pull]

    async def refresh(self, platform: Platform | PlatformClient) -> None:
        """Re-read the datastreams of every ``pull: true`` template; a failure keeps the last."""
        for name in self.pulled:
            cfg = self._configs[name]
            if not cfg.id:
                log.error("template %r has `pull: true` but no `id`", name)
                continue
            try:
                rows = await platform.template_datastreams(cfg.id)
            except BridgeError as exc:
                log.warning("pulling datastreams of template %r failed: %s", name, exc.detail)
                continue
            self.by_name[name] = Template.from_config(cfg, datastreams_from_platform(rows))
            log.info("template %r: %d datastreams pulled", name, len(rows))


_EMIT = """
local n = tonumber(ARGV[1])
local group = ARGV[2]
for i = 1, n do
  redis.call('XADD', KEYS[i], '*', 'd', ARGV[2 + i])
end
local a = 3 + n
local acked = 0
for k = n + 1, #KEYS do
  local c = tonumber(ARGV[a])
  a = a + 1
  local j = 0
  while j < c do
    local m = math.min(c - j, 500)
    acked = acked + redis.call('XACK', KEYS[k], group, unpack(ARGV, a + j, a + j + m - 1))
    j = j + m
  end
  a = a + c
end
return acked
"""


class Emit:
    """Append outputs and ack their inputs in ONE script call: atomic, one command per batch.

    This is ``StreamWriter.add_many`` followed by ``StreamReader.ack`` with two differences that
    matter on the hot path: redis-py packs and parses one command instead of one per entry
    (its per-command cost in Python outweighs the Redis work), and a crash can no longer fall
    between the write and the ack (no duplicate output on redelivery). Entries are appended
    with the single field ``d`` (:data:`pipeline.events.FIELD`).
    """

    def __init__(self, redis: Redis, group: str) -> None:
        self._script = redis.register_script(_EMIT)
        self._group = group
        assert events.FIELD == b"d"

    async def run(self, outputs: Sequence[tuple[str, bytes]], acks: Sequence[Entry]) -> None:
        if not outputs and not acks:
            return
        by_stream: dict[str, list[str]] = {}
        for e in acks:
            by_stream.setdefault(e.stream, []).append(e.id)
        keys: list[str] = [s for s, _ in outputs]
        keys.extend(by_stream)
        args: list[str | bytes | int] = [len(outputs), self._group]
        args.extend(d for _, d in outputs)
        for ids in by_stream.values():
            args.append(len(ids))
            args.extend(ids)
        await self._script(keys=keys, args=args)


# KEYS = registry version, de-dup base of each claim's stream, output streams, streams to ack;
# ARGV[1] = msgpack [version, window s, group, number of bases, modes (one letter per claim),
# [base index per claim], [owner, output stream index, ...] per output,
# [[entry id, ...] per stream to ack]];
# ARGV[2] = the claims, fixed width (:func:`pipeline.dedup.pack`);
# ARGV[3...] = each output's data, as separate arguments: Redis 7.0's cmsgpack does not read
# msgpack's bin type, and splitting one concatenated blob of varying widths in Lua costs the
# worker more than it saves (BENCHMARKS.md, transform).
_COMMIT = dedup.LUA + f"""
local v = redis.call('GET', KEYS[1])
local p = cmsgpack.unpack(ARGV[1])
if (v or '0') ~= p[1] then return {{-1}} end
local window, group, nb, modes, cbase = p[2], p[3], p[4], p[5], p[6]
local outputs, acks = p[7], p[8]
local blob = ARGV[2]
local states = {{}}
if nb > 0 then
  local now = dd_now()
  for i = 1, nb do states[i] = dd_open(KEYS[1 + i], window, now) end
end
local dup, out = {{}}, {{1}}
for i = 1, #cbase do
  local st = states[cbase[i]]
  local o = (i - 1) * {dedup.CLAIM_BYTES}
  local d = string.sub(blob, o + 1, o + {dedup.DIGEST_BYTES})
  local mark = string.sub(blob, o + {dedup.DIGEST_BYTES + 1}, o + {dedup.CLAIM_BYTES})
  local old, k
  if string.byte(modes, i) == 99 then  -- 'c'
    old = dd_claim(st, d, mark)
  else
    old, k = dd_find(st, d, false)
  end
  if old and old ~= mark then
    dup[i] = true
    out[#out + 1] = i
  elseif old and k then
    redis.call('HDEL', k, d)
  end
end
for i = 1, nb do dd_close(states[i]) end
local pos = 3
local ns = 0
local base = 1 + nb
for j = 1, #outputs, 2 do
  local owner, si = outputs[j], outputs[j + 1]
  if si > ns then ns = si end
  if owner == 0 or not dup[owner] then
    redis.call('XADD', KEYS[base + si], '*', 'd', ARGV[pos])
  end
  pos = pos + 1
end
base = base + ns
for s = 1, #acks do
  local ids = acks[s]
  for i = 1, #ids, 500 do
    redis.call('XACK', KEYS[base + s], group, unpack(ids, i, math.min(i + 499, #ids)))
  end
end
return out
"""

#: :meth:`Commit.run` modes: claim the event (``SET NX GET``), or — for an uplink about to be
#: dead-lettered whole — only check it (a duplicate is acked as one) and forget the entry's own
#: claim, so a replay of the dead letter is not dropped (what the slow path does with
#: :func:`pipeline.dedup.forget`).
CLAIM = "c"
CHECK_AND_FORGET = "f"


class Commit:
    """The fast path's one call per batch: registry version check, de-duplication claims,
    outputs of the non-duplicates, acks — atomically, in one script.

    ``claims`` are ``(stream, event_id, mark, mode)`` (the stream the uplink came from:
    its partition's de-dup state is used, :meth:`pipeline.keys.Keys.dedup`); each output
    names its *owner*, the 1-based index of the claim it belongs to (0 = unconditional); an
    output whose owner turns out to be a
    duplicate is not appended. Returns the 0-based indices of the duplicate claims, or ``None``
    when the registry version is no longer ``version`` (nothing was done).
    """

    def __init__(self, redis: Redis, keys: Keys, group: str) -> None:
        self._script = redis.register_script(_COMMIT)
        self._keys = keys
        self._group = group
        self._pack = msgspec.msgpack.Encoder().encode
        assert events.FIELD == b"d"

    async def run(self, version: int, window_s: int,
                  claims: Sequence[tuple[str, str, bytes, str]],
                  outputs: Sequence[tuple[str, int, bytes]],
                  acks: Sequence[Entry]) -> list[int] | None:
        # Everything but the keys, the claims and the outputs' data is one msgpack argument:
        # redis-py packs each argument in Python, msgpack packs the whole structure in C.
        dedup_base = self._keys.dedup
        pack = dedup.pack
        # One partition's batch in the cluster layout (StreamReader): one slot.
        keys: list[str] = [self._keys.registry_version_for(acks[0].stream if acks else "")]
        bases: dict[str, int] = {}
        claim_base: list[int] = []
        claim_bytes: list[bytes] = []
        modes: list[str] = []
        for stream, event_id, mark, mode in claims:
            base = dedup_base(stream)
            bi = bases.get(base)
            if bi is None:
                bi = bases[base] = len(bases) + 1
            claim_base.append(bi)
            claim_bytes.append(pack(event_id, mark))
            modes.append(mode)
        keys.extend(bases)
        streams: dict[str, int] = {}
        flat_out: list[int] = []
        blob: list[bytes] = []
        for stream, owner, data in outputs:
            si = streams.get(stream)
            if si is None:
                si = streams[stream] = len(streams) + 1
            flat_out.append(owner)
            flat_out.append(si)
            blob.append(data)
        keys.extend(streams)
        by_stream: dict[str, list[str]] = {}
        for e in acks:
            ids = by_stream.get(e.stream)
            if ids is None:
                ids = by_stream[e.stream] = []
            ids.append(e.id)
        keys.extend(by_stream)
        arg = self._pack([str(version), window_s, self._group, len(bases), "".join(modes),
                          claim_base, flat_out, list(by_stream.values())])
        reply = await self._script(keys=keys, args=[arg, b"".join(claim_bytes), *blob])
        if reply[0] == -1:
            return None
        return [int(i) - 1 for i in reply[1:]]


@dataclass(slots=True)
class _Mapped:
    """One ready uplink, mapped: its outputs and what to account for once it is written."""

    entry: Entry
    route: Route
    template: str
    stream: str
    write: bytes | None
    dead: bytes | None
    unmapped: tuple[str, ...]
    rejected: int
    firmware: str | None


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
    mapped: list[tuple[_Mapped, int]]


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
            linger_ms=cfg.streams.linger_ms,
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
        self._servers = cfg.blynk.servers
        self._default_server = cfg.blynk.servers[cfg.blynk.default_server]
        self._dead_stream = ctx.keys.dead_for
        self._unmapped = UnmappedKeys(ctx.redis, ctx.keys,
                                      max_keys=cfg.transform.unmapped_max_keys,
                                      ttl_s=cfg.transform.unmapped_ttl_s)
        self._unmapped_flushed = time.monotonic()

    # ---- lifecycle -------------------------------------------------------------------------

    def _needs_platform(self) -> bool:
        return any(i.provision for i in self._integrations.values()) or bool(
            self.templates.pulled)

    async def startup(self) -> None:
        cfg = self.ctx.config
        if self._platform is None and self._needs_platform():
            if cfg.blynk.platform is None:
                log.error("auto-provisioning or template pulls need `blynk.platform`: "
                          "unknown devices will be dead-lettered %s", PROVISION_FAILED)
            else:
                from pipeline.blynk.platform import PlatformClient

                self._own_platform = PlatformClient(cfg.blynk.platform, self.ctx.blynk())
                self._platform = self._own_platform
                self.provisioner = Provisioner(
                    self.ctx.redis, self.ctx.keys, self.registry, self._platform,
                    wait_s=cfg.transform.provision_wait_s, limits=self._limits)
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
                          max_backoff_s=self.ctx.config.egress.max_backoff_s, prefetch=True,
                          prepare=self.prepare)
        finally:
            if refresher is not None:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher
            await self.flush_unmapped()

    async def shutdown(self) -> None:
        await self.registry.close()
        if self._own_platform is not None:
            await self._own_platform.close()

    async def _refresh_templates(self, stop: asyncio.Event) -> None:
        period = self.ctx.config.transform.template_refresh_s
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period)
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
        mapped = self._map(ready, ts)
        outputs: list[tuple[str, int, bytes]] = []
        for m, ci in zip(mapped, ready_ci, strict=True):
            if m.dead is not None:
                outputs.append((self._dead_stream(m.entry.stream), ci + 1, m.dead))
            if m.write is not None:
                outputs.append((m.stream, ci + 1, m.write))
        for r, ci in dead:
            outputs.append((self._dead_stream(entries[ci].stream), ci + 1,
                            self._dead_letter_of(entries[ci], r.reason, r.detail, ts)))
        return _Prepared(entries, version, claims, [u.source for u in uplinks], skips, dead,
                         outputs, list(zip(mapped, ready_ci, strict=True)))

    async def _commit_fast(self, p: _Prepared) -> bool:
        """The fast path's commit; ``False`` = nothing was done, take the slow path."""
        version = self.registry.version_for(p.entries[0].stream)
        assert version is not None  # _finish: the registry is in line with p.version
        dups = await self._commit.run(version, self._window, p.claims, p.outputs, p.entries)
        if dups is None:  # the registry changed since the cache was last in line with it
            await self.registry.sync()
            return False

        duplicate = set(dups)
        duplicates: Counter[str] = Counter()
        for i in dups:
            duplicates[p.sources[i]] += 1
        skipped: Counter[str] = Counter(r.reason for r, ci in p.skips if ci not in duplicate)
        for source, n in duplicates.items():
            metrics.DUPLICATES.labels(source).inc(n)
        for reason, n in skipped.items():
            metrics.TRANSFORM_SKIPPED.labels(reason).inc(n)
        for r, ci in p.dead:
            if ci not in duplicate:
                metrics.DEAD.labels(STAGE, r.reason).inc()
        await self._account([m for m, ci in p.mapped if ci not in duplicate])
        return True

    async def _handle_slow(self, entries: list[Entry]) -> None:
        """The slow path: every case (module docstring, steps 1-5)."""
        ctx = self.ctx
        dead: list[tuple[Entry, str, str]] = []
        decoded: list[tuple[Entry, events.Uplink]] = []
        decode = events.decode_uplink
        for e in entries:
            if e.data is None:
                dead.append((e, UNDECODABLE, "entry has no `d` field"))
                continue
            try:
                decoded.append((e, decode(e.data)))
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                dead.append((e, UNDECODABLE, f"not an Uplink: {exc}"))

        # One round trip: registry version check + de-duplication claims.
        marks = [dedup.mark_of(e) for e, _ in decoded]
        async with ctx.redis.pipeline(transaction=False) as pipe:
            self.registry.sync_queue(pipe)
            if decoded:
                await self._claims.queue(
                    pipe, [(e.stream, u.event_id, m)
                           for (e, u), m in zip(decoded, marks, strict=True)],
                    self._window)
            replies = await pipe.execute()
        synced = self.registry.sync_replies
        if not self.registry.sync_apply(*replies[:synced]):
            await self.registry.reset()
        claimed: list[bytes | None] = replies[synced] if decoded else []

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
                skipped[r.reason] += 1
                acks.append(e)
            elif r.kind == DEAD:
                dead.append((e, r.reason, r.detail))
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
            await self._provision(to_create)

    async def _dead_letter(self, dead: list[tuple[Entry, str, str]]) -> None:
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

    def _dead_letter_of(self, e: Entry, reason: str, detail: str, ts: int) -> bytes:
        """The encoded dead letter of a whole decodable uplink (as the reader writes it)."""
        return events.encode(events.dead_letter(
            stream=e.stream, entry_id=e.id, raw=e.data or b"", stage=STAGE, reason=reason,
            detail=detail, attempts=e.deliveries, dead_ts_ms=ts))

    def _map(self, ready: Sequence[tuple[Entry, Route]], ts: int) -> list[_Mapped]:
        """Map each ``WRITE``-routed uplink onto its template: its write, partial dead letter,
        counts."""
        out: list[_Mapped] = []
        stream_for = self.ctx.keys.stream_for
        encode = events.encode
        for e, r in ready:
            u, dev = r.uplink, r.device
            assert dev is not None
            template = self._template_of(r)
            mapped = map_uplink(template, u)
            dead: bytes | None = None
            if mapped.rejected:
                dead = encode(events.dead_letter(
                    stream=e.stream, entry_id=e.id, raw=e.data or b"",
                    stage=STAGE, reason="type_mismatch",
                    detail=describe_rejected(mapped.rejected),
                    attempts=e.deliveries, dead_ts_ms=ts))
            write: bytes | None = None
            if mapped.pins:
                hist = template.history_pins
                write = encode(events.BlynkWrite(
                    token=dev.token, server=self._server_url(dev.server), device_key=dev.key,
                    pins=mapped.pins, event_ts_ms=u.event_ts_ms,
                    received_ts_ms=u.received_ts_ms, event_id=u.event_id,
                    history_pins=[p for p in mapped.pins if p in hist] if hist else [],
                ))
            firmware = mapped.firmware if (
                mapped.firmware is not None and u.token is None
                and mapped.firmware != dev.firmware) else None
            out.append(_Mapped(e, r, template.name, stream_for("writes", u.source, u.device),
                               write, dead, tuple(mapped.unmapped), len(mapped.rejected),
                               firmware))
        return out

    async def _account(self, written: Sequence[_Mapped]) -> None:
        """After the outputs are in Redis: metrics, unmapped keys, firmware versions."""
        transformed: Counter[tuple[str, str]] = Counter()
        firmware: dict[str, str] = {}
        rejected_n: Counter[str] = Counter()
        nothing = 0
        unmapped = self._unmapped
        for m in written:
            if m.unmapped:
                unmapped.add(m.template, m.unmapped)
            if m.firmware is not None:
                firmware[m.route.key] = m.firmware
            if m.rejected:
                rejected_n[m.template] += m.rejected
            if m.write is None:
                nothing += 1
            else:
                u = m.route.uplink
                transformed[(u.source, u.integration)] += 1
        for (source, integration), n in transformed.items():
            metrics.TRANSFORMED.labels(source, integration).inc(n)
        for tname, n in rejected_n.items():
            metrics.REJECTED_VALUES.labels(tname, "type_mismatch").inc(n)
            metrics.DEAD.labels(STAGE, "type_mismatch").inc()
        if nothing:
            metrics.TRANSFORM_SKIPPED.labels("nothing_mapped").inc(nothing)
        if firmware:
            await self.registry.set_firmware(firmware)
        if self._unmapped and time.monotonic() - self._unmapped_flushed >= 1.0:
            await self.flush_unmapped()

    async def _write(self, ready: list[tuple[Entry, Route]], acks: list[Entry]) -> None:
        """Map, append writes + partial dead letters and ack, in one script call."""
        mapped = self._map(ready, now_ms())
        out: list[tuple[str, bytes]] = []
        for m in mapped:
            if m.dead is not None:
                out.append((self._dead_stream(m.entry.stream), m.dead))
            if m.write is not None:
                out.append((m.stream, m.write))
            acks.append(m.entry)
        await self._emit.run(out, acks)
        await self._account(mapped)

    def _template_of(self, r: Route) -> Template:
        integ = r.integration
        assert r.device is not None and integ is not None
        name: str | None = r.device.template or None
        if name is None or name not in self.templates.by_name:
            name = integ.choose_template(r.uplink.device_meta)
        return self.templates.get(name, f"{integ.source}:{integ.name}")

    def _server_url(self, server: str | None) -> str:
        if not server:
            return self._default_server
        url = self._servers.get(server)
        if url is not None:
            return url
        return server if "://" in server else self._default_server

    async def _provision(self, to_create: dict[str, list[tuple[Entry, Route]]]) -> None:
        """Create unknown devices (concurrently, one task per device) whose uplinks map at
        least one value, then write their uplinks; uplinks of devices over the provisioning
        rate stay pending (released); raise ``Retryable`` at the end if any other must wait."""
        await self._drop_unmappable(to_create)
        keys = list(to_create)

        async def one(key: str) -> Device:
            first = to_create[key][0][1]
            integ = first.integration
            assert integ is not None
            tname = integ.choose_template(first.uplink.device_meta)
            if tname is None or tname not in self.templates.by_name:
                raise Permanent(f"integration {integ.name!r} has no template to create "
                                "devices from", reason=PROVISION_FAILED)
            return await self.provisioner.ensure(key, tname, self.templates.by_name[tname].id)

        results = await asyncio.gather(*(one(k) for k in keys), return_exceptions=True)
        ready: list[tuple[Entry, Route]] = []
        dead: list[tuple[Entry, str, str]] = []
        parked: list[Entry] = []
        retry: Retryable | None = None
        for key, res in zip(keys, results, strict=True):
            if isinstance(res, Device):
                ready.extend((e, replace(r, kind=WRITE, device=res)) for e, r in to_create[key])
            elif isinstance(res, Permanent):
                dead.extend((e, res.reason, res.detail) for e, _ in to_create[key])
            elif isinstance(res, Retryable) and res.reason == PROVISION_RATE:
                parked.extend(e for e, _ in to_create[key])
            elif isinstance(res, Retryable | RedisError):
                retry = res if isinstance(res, Retryable) else Retryable(str(res))
            else:
                raise res
        await self._dead_letter(dead)
        await self._write(ready, [])
        if parked:
            # Left pending without counting a delivery; any replica reclaims them after
            # claim_idle_ms, when the rate allows more devices (the stream is not held up).
            await self.reader.release(parked)
            log.info("%d uplinks wait for the provisioning rate of their integration",
                     len(parked))
        if retry is not None:
            raise retry

    async def _drop_unmappable(self, to_create: dict[str, list[tuple[Entry, Route]]]) -> None:
        """No device is created for uplinks none of whose values would be written: they are
        acked and counted (``nothing_mapped``, unmapped keys), as for a known device."""
        acks: list[Entry] = []
        for key, items in list(to_create.items()):
            integ = items[0][1].integration
            assert integ is not None
            tname = integ.choose_template(items[0][1].uplink.device_meta)
            template = self.templates.by_name.get(tname or "")
            if template is None or any(maps_a_value(template, r.uplink) for _, r in items):
                continue  # no template: dead-lettered as provision_failed by _provision
            del to_create[key]
            for e, r in items:
                acks.append(e)
                self._unmapped.add(template.name, map_uplink(template, r.uplink).unmapped)
        if acks:
            await self._emit.run([], acks)
            metrics.TRANSFORM_SKIPPED.labels("nothing_mapped").inc(len(acks))

    async def flush_unmapped(self) -> None:
        """Write the unmapped-key counts (:class:`pipeline.unmapped.UnmappedKeys`)."""
        self._unmapped_flushed = time.monotonic()
        await self._unmapped.flush()


def build(ctx: Context) -> TransformStage:
    return TransformStage(ctx)
