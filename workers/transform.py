"""transform: uplinks → Blynk writes (registry, de-duplication, mapping, auto-provisioning).

Reads ``Uplink``s from the ``uplinks`` stream (group ``transform``) in batches. Per batch:

1. decode (undecodable → dead letter ``undecodable``);
2. one pipeline: the registry's version check + a de-duplication claim per uplink
   (:mod:`pipeline.dedup`); duplicates are acked and counted;
3. resolve devices: the Particle blueprint's ``token`` is the device itself; everything else
   through the registry cache (misses: one pipelined ``HGETALL``);
4. map values (:mod:`pipeline.mapping`) and append every ``BlynkWrite`` — and the partial dead
   letters — with ONE pipelined ``XADD`` (``ctx.writer.add_many``), then ack;
5. unknown devices of integrations with ``provision: true`` are created in Blynk
   (:mod:`pipeline.provision`), then written and acked like the rest; a retryable failure leaves
   their uplinks pending and backs off.

Dead letters (original uplink kept, so ``dead replay`` can resend it): ``unknown_device``,
``device_broken``, ``provision_failed``, ``unknown_integration``, ``undecodable``, and
``type_mismatch`` for the keys whose values do not fit their datastream. The last is a *partial*
dead letter: the uplink's other keys are written, and one ``DeadLetter`` holds the whole
original uplink with a detail naming each rejected key, pin and why. Replaying it rewrites the
good keys too, which is harmless (same event time, egress keeps the newest).

Unmapped keys: ``bb_unmapped_keys_total{template}`` and the Redis hash
``keys.unmapped(template)`` (key → count), flushed at most once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
from redis.exceptions import RedisError

from pipeline import dedup, events, metrics
from pipeline.config import Config, ParticleProduct, TemplateRule, TtsApplication
from pipeline.consumer import consume
from pipeline.context import Context
from pipeline.errors import BridgeError, Permanent, Retryable
from pipeline.keys import GROUP_TRANSFORM, UPLINKS
from pipeline.mapping import Template, datastreams_from_platform, describe_rejected, map_uplink
from pipeline.provision import PROVISION_FAILED, Platform, Provisioner
from pipeline.registry import Device, Registry
from pipeline.streams import Entry, Redis, StreamReader, now_ms

if TYPE_CHECKING:
    from pipeline.blynk.platform import PlatformClient

log = logging.getLogger("blynk_bridge.transform")

STAGE = "transform"
UNKNOWN_DEVICE = "unknown_device"
DEVICE_BROKEN = "device_broken"
UNKNOWN_INTEGRATION = "unknown_integration"
UNDECODABLE = "undecodable"
_SKIP_KINDS = frozenset({"join", "status"})


@dataclass(frozen=True, slots=True)
class _Integration:
    source: str
    name: str
    template: str | None
    rules: tuple[TemplateRule, ...]
    provision: bool

    def choose_template(self, meta: dict[str, str]) -> str | None:
        """First rule whose ``device_meta`` field equals its value, else the default."""
        for rule in self.rules:
            if meta.get(rule.field) == rule.equals:
                return rule.template
        return self.template


@dataclass(slots=True)
class _Item:
    entry: Entry
    uplink: events.Uplink
    integ: _Integration
    key: str


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
    (~10 µs each), and a crash can no longer fall between the write and the ack (no duplicate
    output on redelivery). Entries are appended with the single field ``d``
    (:data:`pipeline.events.FIELD`).
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
        )
        self.registry = Registry(ctx.redis, ctx.keys, cache_size=cfg.transform.cache_size)
        self.templates = Templates(cfg)
        self._integrations: dict[tuple[str, str], _Integration] = {}
        apps: Sequence[TtsApplication | ParticleProduct]
        for source, apps in (("tts", cfg.tts), ("particle", cfg.particle)):
            for a in apps:
                self._integrations[(source, a.name)] = _Integration(
                    source, a.name, a.template, tuple(a.template_rules), a.provision)
        self._platform: Platform | None = platform
        self._own_platform: PlatformClient | None = None
        self.provisioner = Provisioner(ctx.redis, ctx.keys, self.registry, platform,
                                       wait_s=cfg.transform.provision_wait_s)
        self._window = cfg.transform.dedup_window_s
        self._claims = dedup.Claims(ctx.redis, ctx.keys)
        self._emit = Emit(ctx.redis, GROUP_TRANSFORM)
        self._servers = cfg.blynk.servers
        self._default_server = cfg.blynk.servers[cfg.blynk.default_server]
        self._dead_stream = ctx.keys.dead
        self._unmapped: Counter[tuple[str, str]] = Counter()
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
                    wait_s=cfg.transform.provision_wait_s)
        await self.reader.ensure_group()
        await self.registry.start()
        changed = await self.registry.load_static(cfg.devices)
        if changed:
            log.info("registry: %d static devices registered or updated", changed)
        if self._platform is not None and self.templates.pulled:
            await self.templates.refresh(self._platform)

    async def main_loop(self, stop: asyncio.Event) -> None:
        refresher: asyncio.Task[None] | None = None
        if self._platform is not None and self.templates.pulled and not self.until_idle:
            refresher = asyncio.create_task(self._refresh_templates(stop), name="template-pull")
        try:
            await consume(self.reader, self.handle, stop, until_idle=self.until_idle,
                          max_backoff_s=self.ctx.config.egress.max_backoff_s)
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
        ctx = self.ctx
        dead: list[tuple[Entry, str, str]] = []
        uplinks: list[tuple[Entry, events.Uplink]] = []
        decode = events.decode_uplink
        for e in entries:
            if e.data is None:
                dead.append((e, UNDECODABLE, "entry has no `d` field"))
                continue
            try:
                uplinks.append((e, decode(e.data)))
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                dead.append((e, UNDECODABLE, f"not an Uplink: {exc}"))

        # One round trip: registry version check + de-duplication claims.
        marks = [dedup.mark_of(e) for e, _ in uplinks]
        async with ctx.redis.pipeline(transaction=False) as pipe:
            self.registry.sync_queue(pipe)
            if uplinks:
                await self._claims.queue(
                    pipe, [(u.event_id, m) for (_, u), m in zip(uplinks, marks, strict=True)],
                    self._window)
            replies = await pipe.execute()
        if not self.registry.sync_apply(replies[0], replies[1]):
            await self.registry.reset()
        claimed: list[bytes | None] = replies[2] if uplinks else []

        acks: list[Entry] = []
        items: list[_Item] = []
        duplicates: Counter[str] = Counter()
        skipped: Counter[str] = Counter()
        is_dup = dedup.is_duplicate
        integrations = self._integrations
        for (e, u), mark, reply in zip(uplinks, marks, claimed, strict=True):
            if is_dup(reply, mark):
                duplicates[u.source] += 1
                acks.append(e)
                continue
            if u.kind in _SKIP_KINDS or (not u.values and u.radio is None):
                skipped[u.kind if u.kind in _SKIP_KINDS else "empty"] += 1
                acks.append(e)
                continue
            integ = integrations.get((u.source, u.integration))
            if integ is None:
                dead.append((e, UNKNOWN_INTEGRATION,
                             f"{u.source} integration {u.integration!r} is not configured"))
                continue
            items.append(_Item(e, u, integ, f"{u.source}:{u.integration}:{u.device}"))
        for source, n in duplicates.items():
            metrics.DUPLICATES.labels(source).inc(n)
        for reason, n in skipped.items():
            metrics.TRANSFORM_SKIPPED.labels(reason).inc(n)

        # Resolve devices.
        lookups = [it.key for it in items if it.uplink.token is None]
        devices = await self.registry.get_many(lookups, sync=False) if lookups else {}
        ready: list[tuple[_Item, Device]] = []
        to_create: dict[str, list[_Item]] = {}
        for it in items:
            u = it.uplink
            if u.token is not None:
                tname = it.integ.choose_template(u.device_meta)
                ready.append((it, Device(key=it.key, token=u.token, template=tname or "")))
                continue
            dev = devices.get(it.key)
            if dev is None:
                if it.integ.provision:
                    to_create.setdefault(it.key, []).append(it)
                else:
                    dead.append((it.entry, UNKNOWN_DEVICE,
                                 f"no Blynk device registered for {u.source} device "
                                 f"{u.device!r} of integration {u.integration!r} "
                                 "(add it to `devices` or enable `provision`)"))
            elif dev.broken:
                dead.append((it.entry, DEVICE_BROKEN,
                             f"Blynk device of {it.key} is marked broken: {dev.reason}: "
                             f"{dev.detail}"))
            else:
                ready.append((it, dev))

        await self._dead_letter(dead)
        await self._write(ready, acks)
        pending = {dev.key: dev for _, dev in ready if dev.meta_pending}
        for dev in pending.values():
            await self.provisioner.finish(dev)
        if to_create:
            await self._provision(to_create)

    async def _dead_letter(self, dead: list[tuple[Entry, str, str]]) -> None:
        """Dead-letter whole uplinks, forgetting their de-duplication marks first so that a
        replay after a fix is not dropped as a duplicate."""
        if not dead:
            return
        ids: list[str] = []
        for e, _, _ in dead:
            if e.data is not None:
                with contextlib.suppress(msgspec.ValidationError, msgspec.DecodeError):
                    ids.append(events.decode_uplink(e.data).event_id)
        await dedup.forget(self.ctx.redis, self.ctx.keys, ids)
        await self.reader.dead_letter(dead)

    async def _write(self, ready: list[tuple[_Item, Device]], acks: list[Entry]) -> None:
        """Map, append writes + partial dead letters in one pipeline, then ack."""
        ctx = self.ctx
        out: list[tuple[str, bytes]] = []
        transformed: Counter[tuple[str, str]] = Counter()
        firmware: dict[str, str] = {}
        rejected_n: Counter[str] = Counter()
        nothing = 0
        stream_for = ctx.keys.stream_for
        encode = events.encode
        ts = now_ms()
        for it, dev in ready:
            u = it.uplink
            template = self._template_of(dev, it)
            mapped = map_uplink(template, u)
            if mapped.unmapped:
                for k in mapped.unmapped:
                    self._unmapped[(template.name, k)] += 1
            if mapped.firmware is not None and u.token is None and \
                    mapped.firmware != dev.firmware:
                firmware[dev.key] = mapped.firmware
            if mapped.rejected:
                rejected_n[template.name] += len(mapped.rejected)
                out.append((self._dead_stream, encode(events.DeadLetter(
                    stream=it.entry.stream, entry_id=it.entry.id, raw=it.entry.data or b"",
                    stage=STAGE, reason="type_mismatch",
                    detail=describe_rejected(mapped.rejected)[:2000],
                    attempts=it.entry.deliveries, dead_ts_ms=ts))))
            acks.append(it.entry)
            if not mapped.pins:
                nothing += 1
                continue
            hist = template.history_pins
            write = events.BlynkWrite(
                token=dev.token, server=self._server_url(dev.server), device_key=it.key,
                pins=mapped.pins, event_ts_ms=u.event_ts_ms, received_ts_ms=u.received_ts_ms,
                event_id=u.event_id,
                history_pins=[p for p in mapped.pins if p in hist] if hist else [],
            )
            out.append((stream_for("writes", u.source, u.device), encode(write)))
            transformed[(u.source, u.integration)] += 1
        await self._emit.run(out, acks)
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

    def _template_of(self, dev: Device, it: _Item) -> Template:
        name: str | None = dev.template or None
        if name is None or name not in self.templates.by_name:
            name = it.integ.choose_template(it.uplink.device_meta)
        return self.templates.get(name, f"{it.integ.source}:{it.integ.name}")

    def _server_url(self, server: str | None) -> str:
        if not server:
            return self._default_server
        url = self._servers.get(server)
        if url is not None:
            return url
        return server if "://" in server else self._default_server

    async def _provision(self, to_create: dict[str, list[_Item]]) -> None:
        """Create unknown devices (concurrently, one task per device), then write their
        uplinks; raise ``Retryable`` at the end if any must wait."""
        keys = list(to_create)

        async def one(key: str) -> Device:
            first = to_create[key][0]
            tname = first.integ.choose_template(first.uplink.device_meta)
            if tname is None or tname not in self.templates.by_name:
                raise Permanent(f"integration {first.integ.name!r} has no template to create "
                                "devices from", reason=PROVISION_FAILED)
            return await self.provisioner.ensure(key, tname, self.templates.by_name[tname].id)

        results = await asyncio.gather(*(one(k) for k in keys), return_exceptions=True)
        ready: list[tuple[_Item, Device]] = []
        dead: list[tuple[Entry, str, str]] = []
        retry: Retryable | None = None
        for key, res in zip(keys, results, strict=True):
            if isinstance(res, Device):
                ready.extend((it, res) for it in to_create[key])
            elif isinstance(res, Permanent):
                dead.extend((it.entry, PROVISION_FAILED, res.detail) for it in to_create[key])
            elif isinstance(res, Retryable | RedisError):
                retry = res if isinstance(res, Retryable) else Retryable(str(res))
            else:
                raise res
        await self._dead_letter(dead)
        await self._write(ready, [])
        if retry is not None:
            raise retry

    async def flush_unmapped(self) -> None:
        """Add the unmapped-key counts to ``keys.unmapped(template)`` and the metric."""
        counts, self._unmapped = self._unmapped, Counter()
        self._unmapped_flushed = time.monotonic()
        if not counts:
            return
        try:
            async with self.ctx.redis.pipeline(transaction=False) as pipe:
                for (tname, key), n in counts.items():
                    pipe.hincrby(self.ctx.keys.unmapped(tname), key, n)
                await pipe.execute()
        except RedisError as exc:  # statistics only: keep them for the next flush
            self._unmapped.update(counts)
            log.warning("could not record unmapped keys: %s", exc)
        per_template: Counter[str] = Counter()
        for (tname, _), n in counts.items():
            per_template[tname] += n
        for tname, n in per_template.items():
            metrics.UNMAPPED.labels(tname).inc(n)


def build(ctx: Context) -> TransformStage:
    return TransformStage(ctx)
