"""downlink: ``Downlink`` commands (Blynk datastream changes) out to the devices.

Each batch read from the downlinks stream goes through, in order:

1. **resolve** the Blynk device to its source device through the registry's reverse index
   (:mod:`pipeline.blynk_index`, backfilled from older registry rows at the first start-up)
   — unknown: dead letter ``unknown_device`` (unless it is an echo, step 3);
2. **check** the pin against the device's template (``unknown_pin``) and type the value by its
   datastream (``type_mismatch``); a command older than ``downlink.ttl_s`` by its Blynk time is
   dead-lettered ``expired``, never sent late;
3. **echo**: a value the bridge itself wrote to that pin within ``echo.window_ms`` is its own
   uplink coming back (:mod:`pipeline.echo`): acked, counted, not sent;
4. **latest wins**: per device and pin only the newest command (Blynk time) is sent; older ones
   in the batch, held for retry, or older than (or the same as) the last one sent are acked and
   counted (``superseded`` / ``stale`` / ``duplicate``), never sent;
5. **send**: TTS over MQTT (``down/push``/``down/replace`` on a connection of the stage's
   own), TTS over HTTP (webhook downlink API), or a Particle function call;
6. **commit**: one ``MULTI`` records the last sent (pin → Blynk time, forward only), writes the
   dead letters of the batch and acks every entry the batch finished (what outcome matching
   needs was kept under the correlation id in step 3's round trip, before the send). Acked
   only after the publish/call returned: at-least-once. A killed worker's entries are taken
   over by ``XAUTOCLAIM``.

Redis round trips per batch, besides the read: one for the reverse index and the registry's
version check, one for the echo check, the last-sent times and what outcome matching keeps (one
``EVAL`` and plain commands, whatever the batch size), and the commit; registry rows not in the
cache cost one more, as does the last-sent read of held commands retried in a round that read
nothing new. On a Redis Cluster the echo check is one ``EVAL`` per partition (same round trip)
and the commit two: the records per device partition, then the dead letters and acks per
stream partition (docs/DESIGN.md, "Redis Cluster").

A command whose device is offline, whose cloud fails or refuses our credentials is held in
memory and retried with capped jittered backoff (its pending entry kept fresh with ``XCLAIM …
JUSTID`` so no other replica takes it) until its TTL: then ``device_offline`` (or ``expired``).
A newer command for the same pin replaces a held one. 401/403 set the integration Broken.

TTS outcomes (``down/queued|sent|ack|nack|failed``) heard on the stage's connection go to
:mod:`pipeline.downlink_outcomes` (as those of webhook applications do from ingest-http): matched
by correlation id, counted once, failures dead-lettered, the outcome pin written. A Particle
function's ``return_value`` is written back with ``return_pin``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import aiohttp
import msgspec
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from pipeline import downlinks, events, metrics
from pipeline import keys as keynames
from pipeline.blynk_index import backfill, index_static, resolve
from pipeline.config import Config, TemplateConfig, TemplateDownlink
from pipeline.consumer import backoff_s
from pipeline.context import Context
from pipeline.device_clouds import Offline, ParticleApi, TtsHttp, TtsMqtt, Unauthorized
from pipeline.downlink_outcomes import Outcomes, Sent, queue_write_back
from pipeline.echo import Echoes
from pipeline.errors import Permanent, Reason, Retryable
from pipeline.lifecycle import Stage, wait_event
from pipeline.mapping import Datastream, Mismatch, coerce
from pipeline.registry import Device, Registry, split_key
from pipeline.status import StatusBoard
from pipeline.streams import DeadItem, Entry, StreamReader, now_ms

log = logging.getLogger("blynk_bridge.downlink")

#: Record the last sent Blynk time of each pin, forward only. KEYS = one last-sent hash per
#: command; ARGV = ttl ms, then pin, Blynk time, event id per key. Sent by ``EVAL`` in the
#: commit's ``MULTI`` (no ``SCRIPT EXISTS`` round trip, nothing to reload after a restart).
_RECORD = """
for k = 1, #KEYS do
  local pin, ts, id = ARGV[3 * k - 1], ARGV[3 * k], ARGV[3 * k + 1]
  local cur = redis.call('HGET', KEYS[k], pin)
  local older = false
  if cur then
    local last = tonumber(string.match(cur, '^(%d+)'))
    older = last and last > tonumber(ts)
  end
  if not older then
    redis.call('HSET', KEYS[k], pin, ts .. ':' .. id)
    redis.call('PEXPIRE', KEYS[k], ARGV[1])
  end
end
return #KEYS
"""


@dataclass(slots=True)
class _Finish:
    """What one batch finished without sending: acked and dead-lettered in the commit."""

    acks: list[Entry] = field(default_factory=list)
    dead: list[DeadItem] = field(default_factory=list)
    #: Last sent ``"<Blynk ms>:<event id>"`` (or ``None``) per (device key, pin), read with
    #: the echo check.
    lasts: dict[tuple[str, str], bytes | None] = field(default_factory=dict)


@dataclass(slots=True)
class _Command:
    entry: Entry
    down: events.Downlink
    device: Device
    template: TemplateConfig
    ds: Datastream | None
    value: events.Value
    attempts: int = 0
    not_before: float = 0.0
    #: Entries this command superseded while held: acked with it.
    carried: list[Entry] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str]:
        return self.device.key, self.down.pin


class DownlinkStage:
    """The downlink stage (see the module docstring)."""

    name = "downlink"

    def __init__(self, ctx: Context, *, until_idle: bool = False) -> None:
        self.ctx = ctx
        cfg: Config = ctx.config
        self.cfg = cfg.downlink
        self.until_idle = until_idle
        s = cfg.streams
        self.reader = StreamReader(
            ctx.redis, ctx.keys, ctx.keys.streams(keynames.DOWNLINKS), keynames.GROUP_DOWNLINK,
            ctx.consumer, stage=self.name, batch=min(s.batch, 500), block_ms=s.block_ms,
            claim_idle_ms=s.claim_idle_ms, max_deliveries=s.max_deliveries)
        self.registry = Registry(ctx.redis, ctx.keys, cache_size=self.cfg.cache_size)
        self.echoes = Echoes(ctx.redis, ctx.keys, cfg.echo.window_ms)
        self.outcomes = Outcomes(ctx.redis, ctx.keys, {t.name: t for t in cfg.templates},
                                 self.cfg.outcome_ttl_s)
        self.board = StatusBoard(ctx.redis, ctx.keys)
        self.templates = {t.name: t for t in cfg.templates}
        self.datastreams = {t.name: {d.pin.upper(): Datastream.from_config(d)
                                     for d in t.datastreams} for t in cfg.templates}
        self.tts_apps = {a.name: a for a in cfg.tts}
        self.particle = {p.name: p for p in cfg.particle}
        self._mqtt: dict[str, TtsMqtt] = {}
        self._http: aiohttp.ClientSession | None = None
        self.ttl_ms = self.cfg.ttl_s * 1000
        #: Commands waiting for a retry, by (device key, pin).
        self.held: dict[tuple[str, str], _Command] = {}
        self._last_keep = time.monotonic()
        self._servers = cfg.blynk.servers
        self._default_server = cfg.blynk.servers[cfg.blynk.default_server]
        #: Particle products whose credentials were refused (set Connected on the next call).
        self._broken: set[str] = set()
        self._status_tasks: set[asyncio.Future[None]] = set()

    # ---- lifecycle ---------------------------------------------------------------------------

    async def startup(self) -> None:
        await self.registry.start()
        # Idempotent (transform does the same): this stage may run alone.
        await self.registry.load_static(self.ctx.config.devices)
        await index_static(self.ctx.redis, self.ctx.keys, self.ctx.config.devices)
        # Rows from before the index existed: indexed once, before the first command is read
        # (else their commands would be dead-lettered as unknown devices).
        if not await self.ctx.redis.exists(self.ctx.keys.blynk_index_backfilled()):
            await backfill(self.ctx.redis, self.ctx.keys)
        await self.reader.ensure_group()
        # Listen to TTS outcomes from the start (not only once a command was sent).
        for app in self.tts_apps.values():
            if app.downlink_via == "mqtt":
                sender = self._tts_mqtt(app.name)
                with contextlib.suppress(Retryable):
                    await sender._connect()

    async def shutdown(self) -> None:
        for sender in self._mqtt.values():
            await sender.close()
        self._mqtt.clear()
        if self._http is not None:
            await self._http.close()
            self._http = None
        await self.registry.close()

    async def main_loop(self, stop: asyncio.Event) -> None:
        """Read, prepare, send, commit until ``stop`` (or, ``until_idle``, until nothing is
        left to read or hold). Held commands stay pending on stop (another replica or the next
        run takes them over)."""
        failures = 0
        while not stop.is_set():
            self.reader.block_ms = self._block_ms()
            try:
                entries = await self.reader.read(block=not self.until_idle or bool(self.held))
                await self.handle(entries)
                failures = 0
            except (RedisError, Retryable) as exc:
                failures += 1
                self.reader.retry_pending()
                log.warning("downlink: batch left pending (%s)", exc)
                await _sleep(backoff_s(failures, self.cfg.max_backoff_s), stop)
                continue
            if self.until_idle and not entries and not self.held:
                return

    def _block_ms(self) -> int:
        base = self.ctx.config.streams.block_ms
        if not self.held:
            return base
        due = min(c.not_before for c in self.held.values()) - time.monotonic()
        return max(1, min(base, int(due * 1000) + 1))

    # ---- one round -------------------------------------------------------------------------

    async def handle(self, entries: list[Entry]) -> None:
        """Prepare new entries, merge them with held commands, send what is due, commit."""
        batch = _Finish()
        fresh = await self._prepare(entries, batch) if entries else []
        self._merge(fresh)
        await self._keep_held_claimed()
        now = time.monotonic()
        due = [c for c in self.held.values() if c.not_before <= now]
        for c in due:
            del self.held[c.key]
        due = await self._drop_stale(due, batch)
        results = await asyncio.gather(*(self._send(c) for c in due), return_exceptions=True)
        ok: list[tuple[_Command, events.Value | None]] = []
        for c, result in zip(due, results, strict=True):
            if isinstance(result, BaseException):
                self._failed(c, result, batch.dead)
            else:
                ok.append((c, result))
        await self._commit(ok, batch)

    async def _prepare(self, entries: list[Entry], batch: _Finish) -> list[_Command]:
        """Decode, resolve, check and de-echo new entries; what they finish goes to ``batch``.

        Two round trips: the reverse index with the registry's version check, then the echo
        check with the last-sent times of these commands and of the held ones.
        """
        dead = batch.dead
        decoded: list[tuple[Entry, events.Downlink]] = []
        for e in entries:
            try:
                decoded.append((e, events.decode_downlink(e.data or b"")))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                dead.append((e, Reason.INVALID_ENTRY, str(exc)))
        devices = await resolve(self.ctx.redis, self.registry, self.ctx.keys,
                                [(d.blynk_id, d.token) for _, d in decoded])
        wall = now_ms()
        commands: list[_Command] = []
        #: Not in the registry but named by token: an echo of a write whose uplink carried the
        #: token itself (the Particle blueprint), or a command nobody can route.
        strangers: list[tuple[Entry, events.Downlink]] = []
        for (e, d), dev in zip(decoded, devices, strict=True):
            if dev is None:
                if d.token is not None:
                    strangers.append((e, d))
                else:
                    dead.append((e, Reason.UNKNOWN_DEVICE, _unknown(d)))
                continue
            template = self.templates.get(dev.template)
            if template is None:
                dead.append((e, Reason.UNKNOWN_TEMPLATE, f"{dev.key}: template {dev.template!r}"))
                continue
            by_pin = self.datastreams[template.name]
            ds = by_pin.get(d.pin)
            if ds is None and by_pin:
                dead.append((e, Reason.UNKNOWN_PIN, f"{dev.key}: template {template.name!r} "
                             f"has no datastream on {d.pin}"))
                continue
            try:
                value = coerce(ds, d.value) if ds is not None else d.value
            except Mismatch as exc:
                dead.append((e, Reason.TYPE_MISMATCH, f"{dev.key} {d.pin}: {exc}"))
                continue
            if wall - d.ts_ms > self.ttl_ms:
                dead.append((e, Reason.EXPIRED, f"{dev.key} {d.pin}: Blynk time {d.ts_ms} is older "
                             f"than downlink.ttl_s ({self.cfg.ttl_s})"))
                continue
            route = _route(dev, template.downlink, d.pin)
            if route is not None:
                dead.append((e, route, f"{dev.key} {d.pin}: no way to reach the device "
                             "(a Particle device needs downlink.particle for the pin)"))
                continue
            commands.append(_Command(e, d, dev, template, ds, value))
        checks = ([(c.down.token or c.device.token, c.down.pin, c.down.value, c.device.key)
                   for c in commands]
                  + [(d.token or "", d.pin, d.value, None) for _, d in strangers])
        last_keys = list(dict.fromkeys([*(c.key for c in commands), *self.held]))
        async with self.ctx.redis.pipeline(transaction=False) as pipe:
            taken = self.echoes.queue_take(pipe, checks, wall)
            queued = taken.replies
            for device_key, pin in last_keys:
                pipe.hget(self.ctx.keys.down_last(device_key), pin)
            self._keep_for_outcomes(pipe, commands)
            replies = await pipe.execute() if queued or last_keys or commands else []
        echoes = taken.answer(replies[:queued])
        batch.lasts.update(zip(last_keys, replies[queued:queued + len(last_keys)], strict=True))
        fresh: list[_Command] = []
        for c, echo in zip(commands, echoes, strict=False):
            if echo:
                batch.acks.append(c.entry)
                self._count(c, "echo")
            else:
                fresh.append(c)
        for (e, d), echo in zip(strangers, echoes[len(commands):], strict=True):
            if echo:
                batch.acks.append(e)
                metrics.DOWNLINKS.labels(d.origin, "echo").inc()
            else:
                dead.append((e, Reason.UNKNOWN_DEVICE, _unknown(d)))
        return fresh

    def _keep_for_outcomes(self, pipe: Pipeline, commands: list[_Command]) -> None:
        """Keep what outcome matching needs of each TTS command under its correlation id,
        before it can be sent: TTS may report an outcome (``failed`` at once, or over a webhook
        while the downlink call is still open) before the send returns. Kept for commands that
        end up not sent too (echoes, superseded): no outcome ever names them, and they expire."""
        for c in commands:
            if not c.device.key.startswith("tts:"):
                continue
            sent = Sent(device_key=c.device.key, template=c.template.name, pin=c.down.pin,
                        stream=c.entry.stream, entry_id=c.entry.id, raw=c.entry.data or b"",
                        token=c.device.token, server=self._server_url(c.device.server))
            pipe.set(self.ctx.keys.down_command(c.down.event_id), msgspec.msgpack.encode(sent),
                     ex=self.cfg.outcome_ttl_s)

    def _merge(self, fresh: list[_Command]) -> None:
        """Latest wins between new commands and those held, per (device, pin)."""
        pending = [downlinks.Pending(c.device.key, c.down.pin, c.down.ts_ms, c.entry.id, c)
                   for c in [*self.held.values(), *fresh]]
        kept, superseded = downlinks.latest_wins(pending)
        new_held = {p.item.key: p.item for p in kept}
        for p in superseded:
            winner = new_held[p.item.key]
            winner.carried += [p.item.entry, *p.item.carried]
            self._count(p.item, "superseded")
        for c in new_held.values():
            old = self.held.get(c.key)
            if old is not None and old is not c:
                c.not_before, c.attempts = old.not_before, old.attempts
        self.held = new_held

    async def _drop_stale(self, due: list[_Command], batch: _Finish) -> list[_Command]:
        """Finish commands older than (or the same as) the last one sent to their pin, by the
        times read with the echo check (a round trip only for keys it did not read)."""
        missing = [c.key for c in due if c.key not in batch.lasts]
        if missing:
            async with self.ctx.redis.pipeline(transaction=False) as pipe:
                for device_key, pin in missing:
                    pipe.hget(self.ctx.keys.down_last(device_key), pin)
                batch.lasts.update(zip(missing, await pipe.execute(), strict=True))
        keep: list[_Command] = []
        for c in due:
            last = batch.lasts[c.key]
            if last:
                ts_text, _, last_id = last.decode().partition(":")
                if last_id == c.down.event_id:
                    self._count(c, "duplicate")
                    batch.acks += [c.entry, *c.carried]
                    continue
                if int(ts_text) > c.down.ts_ms:
                    self._count(c, "stale")
                    batch.acks += [c.entry, *c.carried]
                    continue
            keep.append(c)
        return keep

    # ---- sending ---------------------------------------------------------------------------

    async def _send(self, c: _Command) -> events.Value | None:
        """Deliver one command; the Particle function's return value, else ``None``."""
        source, integration, device = split_key(c.device.key)
        d = c.down
        name = c.ds.name if c.ds is not None else d.pin
        if source == "tts":
            app = self.tts_apps.get(integration)
            if app is None:
                raise Permanent(f"no TTS application {integration!r} configured",
                                reason=Reason.UNKNOWN_INTEGRATION)
            rules = c.template.downlink.encode if c.template.downlink else []
            body = downlinks.tts_body(
                name=name, pin=d.pin, ts_ms=d.ts_ms, value=c.value, f_port=app.downlink_f_port,
                correlation_id=d.event_id, encode=downlinks.encode_rule(rules, d.pin))
            if app.downlink_via == "http":
                await TtsHttp(app, self._client()).send(device, body)
            else:
                await self._tts_mqtt(integration).send(device, body)
            return None
        product = self.particle.get(integration)
        if product is None:
            raise Permanent(f"no Particle product {integration!r} configured",
                            reason=Reason.UNKNOWN_INTEGRATION)
        assert c.template.downlink is not None  # _route checked it
        fn = c.template.downlink.particle[d.pin]
        arg = downlinks.particle_arg(fn.arg, name=name, pin=d.pin, value=c.value, ts_ms=d.ts_ms)
        result = await ParticleApi(product, self._client()).call(device, fn.function, arg)
        if product.name in self._broken:
            self._broken.discard(product.name)
            await self.board.connected("particle", product.name, owner=self.ctx.consumer)
        return result

    def _tts_mqtt(self, name: str) -> TtsMqtt:
        sender = self._mqtt.get(name)
        if sender is None:
            sender = self._mqtt[name] = TtsMqtt(self.tts_apps[name], self.ctx.consumer,
                                                self._outcome)
        return sender

    def _client(self) -> aiohttp.ClientSession:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s))
        return self._http

    def _failed(self, c: _Command, exc: BaseException, dead: list[DeadItem]
                ) -> None:
        """Dead-letter a refused command, or hold a retryable one (until its TTL)."""
        entries = [c.entry, *c.carried]
        if isinstance(exc, Permanent):
            dead += [(e, exc.reason, exc.detail) for e in entries]
            return
        if not isinstance(exc, Retryable):
            log.error("downlink: sending %s failed", c.down.event_id, exc_info=exc)
            exc = Retryable(f"{type(exc).__name__}: {exc}", reason=Reason.ERROR)
        assert isinstance(exc, Retryable)
        if isinstance(exc, Unauthorized):
            source, integration, _ = split_key(c.device.key)
            self._broken.add(integration)
            task = asyncio.ensure_future(self._mark_broken(source, integration, exc.detail))
            self._status_tasks.add(task)
            task.add_done_callback(self._status_tasks.discard)
        c.attempts += 1
        delay = backoff_s(c.attempts, self.cfg.max_backoff_s)
        if now_ms() + delay * 1000 - c.down.ts_ms > self.ttl_ms:
            reason = Reason.DEVICE_OFFLINE if isinstance(exc, Offline) else Reason.EXPIRED
            detail = (f"not delivered within downlink.ttl_s ({self.cfg.ttl_s}) after "
                      f"{c.attempts} attempts; last: {exc.detail}")
            dead += [(e, reason, detail) for e in entries]
            return
        self._count(c, "retried")
        c.not_before = time.monotonic() + delay
        # Due commands left ``held`` before sending and nothing was merged since: no clash.
        self.held[c.key] = c

    async def _mark_broken(self, source: str, integration: str, detail: str) -> None:
        try:
            await self.board.failed(source, integration, f"downlink: {detail}", "credentials",
                                    owner=self.ctx.consumer)
        except RedisError as exc:
            log.warning("downlink: cannot record the status of %s (%s)", integration, exc)

    # ---- committing ------------------------------------------------------------------------

    async def _commit(self, ok: list[tuple[_Command, events.Value | None]], batch: _Finish
                      ) -> None:
        """Record what was sent, keep its correlation, write return values and the batch's dead
        letters, ack — one ``MULTI`` (all or nothing: no entry is acked without its dead letter
        or record).

        In the cluster layout a ``MULTI`` spans one slot: first one per device partition
        recording what was sent (and the return values, on the device's writes stream), then
        one per stream partition writing the dead letters and acking — each phase concurrent.
        A failure between leaves records without acks: the entries come again and are finished
        as ``duplicate`` by those records, never sent twice.

        A failure here leaves the entries pending: they are sent again (at-least-once).
        """
        if not ok and not batch.acks and not batch.dead:
            return
        wall = now_ms()
        acks = list(batch.acks)
        for c, _ in ok:
            acks += (c.entry, *c.carried)
        acks += (e for e, _, _ in batch.dead)
        keys = self.ctx.keys
        if not keys.cluster:
            async with self.ctx.redis.pipeline(transaction=True) as pipe:
                self._queue_records(pipe, ok=ok, wall=wall)
                self.reader.queue_dead_letter(pipe, batch.dead, wall)
                self.reader.queue_ack(pipe, acks)
                await pipe.execute()
        else:
            sent: dict[int, list[tuple[_Command, events.Value | None]]] = {}
            for item in ok:
                sent.setdefault(keys.partition_of_device_key(item[0].device.key), []).append(item)
            finished: dict[int, tuple[list[DeadItem], list[Entry]]] = {}
            for d in batch.dead:
                finished.setdefault(keys.partition_of_stream(d[0].stream) or 0,
                                    ([], []))[0].append(d)
            for e in acks:
                finished.setdefault(keys.partition_of_stream(e.stream) or 0, ([], []))[1].append(e)
            await asyncio.gather(*(self._multi(partial(self._queue_records, ok=part, wall=wall))
                                   for part in sent.values()))
            await asyncio.gather(*(self._multi(partial(self._queue_finish, dead=dead,
                                                       acks=done, wall=wall))
                                   for dead, done in finished.values()))
        self.reader.count_dead(batch.dead)
        for c, _ in ok:
            self._count(c, "sent")
            metrics.DOWNLINK_LATENCY.observe(max(0, wall - c.down.received_ts_ms) / 1000)

    async def _multi(self, queue: Callable[[Pipeline], None]) -> None:
        """One ``MULTI`` of what ``queue(pipe)`` queues (one slot)."""
        async with self.ctx.redis.pipeline(transaction=True) as pipe:
            queue(pipe)
            await pipe.execute()

    def _queue_finish(self, pipe: Pipeline, *, dead: list[DeadItem], acks: list[Entry],
                      wall: int) -> None:
        self.reader.queue_dead_letter(pipe, dead, wall)
        self.reader.queue_ack(pipe, acks)

    def _queue_records(self, pipe: Pipeline, *,
                       ok: list[tuple[_Command, events.Value | None]], wall: int) -> None:
        """Queue the last-sent records of ``ok`` (one ``EVAL``) and the Particle functions'
        return values."""
        if not ok:
            return
        keys = self.ctx.keys
        record_ms = max(self.ttl_ms * 2, 60_000)
        args: list[str | int] = [record_ms]
        for c, _ in ok:
            args += (c.down.pin, c.down.ts_ms, c.down.event_id)
        pipe.eval(_RECORD, len(ok), *(keys.down_last(c.device.key) for c, _ in ok), *args)
        for c, result in ok:
            ret_pin = _return_pin(c.template.downlink, c.down.pin)
            if result is not None and ret_pin is not None:
                queue_write_back(pipe, keys, device_key=c.device.key, token=c.device.token,
                                 server=self._server_url(c.device.server), pin=ret_pin,
                                 value=result, wall=wall, event_id=f"{c.down.event_id}:ret")

    def _server_url(self, server: str | None) -> str:
        if not server:
            return self._default_server
        return self._servers.get(server) or (server if "://" in server
                                             else self._default_server)

    async def _keep_held_claimed(self) -> None:
        """Reset the idle time of held entries so other replicas do not take them over."""
        if not self.held or time.monotonic() - self._last_keep < self.reader.claim_idle_ms / 3000:
            return
        self._last_keep = time.monotonic()
        async with self.ctx.redis.pipeline(transaction=False) as pipe:
            for c in self.held.values():
                for e in (c.entry, *c.carried):
                    pipe.xclaim(e.stream, keynames.GROUP_DOWNLINK, self.ctx.consumer, 0, [e.id],
                                justid=True)
            await pipe.execute()

    # ---- TTS outcomes ----------------------------------------------------------------------

    async def _outcome(self, integration: str, outcome: str, payload: bytes) -> None:
        """One ``down/<outcome>`` message heard on the stage's MQTT connection."""
        await self.outcomes.handle(integration, outcome, payload)

    def _count(self, c: _Command, outcome: str) -> None:
        metrics.DOWNLINKS.labels(split_key(c.device.key)[1], outcome).inc()


#: TTS outcomes that fail a downlink → their dead-letter reason.


def _unknown(d: events.Downlink) -> str:
    who = f"Blynk device {d.blynk_id}" if d.blynk_id is not None else "Blynk token"
    return (f"{who} is not in the registry: no source device is known for it (devices whose "
            "uplinks carry their own token have no registry row)")


def _route(dev: Device, downlink: TemplateDownlink | None, pin: str) -> Reason | None:
    """``None`` when the device can be reached for ``pin``, else the dead-letter reason."""
    if dev.key.startswith("particle:") and (downlink is None or pin not in
                                            {p.upper() for p in downlink.particle}):
        return Reason.NO_FUNCTION
    return None


def _return_pin(downlink: TemplateDownlink | None, pin: str) -> str | None:
    if downlink is None:
        return None
    for p, fn in downlink.particle.items():
        if p.upper() == pin:
            return fn.return_pin
    return None


async def _sleep(delay: float, stop: asyncio.Event) -> None:
    await wait_event(stop, delay)


def build(ctx: Context) -> Stage:
    return DownlinkStage(ctx)
