"""blynk-sessions: a Blynk device MQTT session for every live device of a ``downlinks: mqtt``
template, as the device's stand-in (real-time downlinks without the webhooks' 10/min limit, and
the device online in Blynk while its source device is alive).

Parts, each one task:

* **watch** — every replica reads every ``BlynkWrite`` (``XREAD``, no group: an observer that
  must not hold back trimming) and, for devices of ``downlinks: mqtt`` templates, records in
  Redis when their session may close (``keys.sessions_live(p)``: 3 × the observed uplink
  interval, at least ``offline_min_s``) and what opening it needs (``keys.sessions_devices(p)``).
  A device's first uplink thus opens its session; ``offline_after`` without one closes it. A
  device whose token changed is moved out of the old token's partition (and its old session
  closed), keeping one live record per device.
* **own** — devices are hashed by token onto ``partitions``; each partition is owned through a
  :class:`~pipeline.lease.Lease` (``keys.lease("sessions", p)``). A replica holds at most
  ceil(partitions / live replicas) (heartbeats in ``keys.sessions_replicas()``), takes free
  ones up to that, gives extras back (closing their sessions first). A lease not renewed in time
  closes its sessions at once, before Redis lets another replica take it (**fence**, a task that
  needs no Redis, so a hung renewal cannot delay it): never two sessions for one token. A dead
  replica's partitions are taken within ``lease_ttl_ms``.
* **scan** — an owner compares its sessions with its partitions' live devices each
  ``scan_interval_s``: opens the missing, closes the offline.
* **open** — opens are paced: each device waits its jittered backoff, then a slot of the global
  connect rate (GCRA in Redis, shared by all replicas).
* **forward** — ``downlink/ds/<Name>`` of a command pin → a ``Downlink`` on the downlinks
  stream (the webhook receiver's contract; the downlink stage types, de-duplicates, drops
  echoes and routes it), when the value is new for that pin (``keys.sessions_known``: the last
  value that came down, or that the device reported in an uplink — **watch** records those).

On every (re)connect a session publishes ``info/mcu`` (template id, firmware when known) and
asks ``get/ds/all``: what changed in the app while it was down arrives then and is forwarded.
``downlink/redirect`` is followed only to a configured server or ``*.blynk.cloud``
(:class:`pipeline.blynk_sessions.Servers`) and remembered as the token's region, like the
device API client's 308s.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import ssl
import time
from collections import defaultdict
from typing import Any

import msgspec
from redis.exceptions import RedisError

from pipeline import blynk_sessions as rules
from pipeline import keys as keynames
from pipeline.blynk.client import token_hash
from pipeline.blynk.device_mqtt import Keepalive, Session, mcu_info, open_session
from pipeline.blynk_index import token_ref
from pipeline.context import Context
from pipeline.echo import canonical
from pipeline.events import FIELD, Downlink, decode_write, encode
from pipeline.lease import Lease
from pipeline.metrics import SESSION_EVENTS, SESSIONS_HELD
from pipeline.ratelimit import RateLimiter
from pipeline.redact import mask
from pipeline.registry import Registry
from pipeline.streams import now_ms

log = logging.getLogger("blynk_bridge.blynk_sessions")


class LiveDevice(msgspec.Struct, array_like=True):
    """What opening a device's session needs (stored per partition in Redis)."""

    token: str
    server: str
    template: str
    firmware: str | None = None


_live_enc = msgspec.msgpack.Encoder()
_live_dec = msgspec.msgpack.Decoder(LiveDevice)
_REGION_TTL_S = 30 * 86_400
#: The last values known per device session outlive a month offline, not more.
_KNOWN_TTL_S = 30 * 86_400


class SessionsStage:
    name = "blynk-sessions"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        cfg = ctx.config
        self.cfg = cfg.blynk_sessions
        self.keys = ctx.keys
        self.redis = ctx.redis
        self.servers = rules.Servers(cfg.blynk, self.cfg)
        self.templates = {t.name: t for t in cfg.templates if t.downlinks == "mqtt"}
        self.pins = {name: rules.command_pins(t) for name, t in self.templates.items()}
        self.registry = Registry(ctx.redis, ctx.keys, cache_size=cfg.transform.cache_size)
        self.replica = ctx.consumer
        P = self.cfg.partitions
        self.leases = [Lease(ctx.redis, ctx.keys.lease("sessions", str(p)), self.replica,
                             ttl_ms=self.cfg.lease_ttl_ms) for p in range(P)]
        self.owned: set[int] = set()
        #: Device key → its open (or opening) session.
        self.sessions: dict[str, Session] = {}
        self.by_partition: dict[int, set[str]] = defaultdict(set)
        self.wanted: dict[str, LiveDevice] = {}
        self.attempts: dict[str, int] = {}
        #: Device key → address it was redirected to (until its session closes for good).
        self.redirected: dict[str, rules.Address] = {}
        self._due: list[tuple[float, str]] = []
        self._queued: set[str] = set()
        self._wake = asyncio.Event()
        self._forward: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()
        self._seen_ms: dict[str, int] = {}
        self._deadline_ms: dict[str, int] = {}
        #: Device key → the token its live record was last written with (a new token moves it).
        self._recorded: dict[str, str] = {}
        self.keepalive = Keepalive(self.cfg.keepalive_s)
        self.rate = RateLimiter(ctx.redis, ctx.keys, self.cfg.connect_rate,
                                burst=self.cfg.connect_burst)
        self._tls = ssl.create_default_context()
        self._opening = asyncio.Semaphore(100)
        self._tasks: set[asyncio.Task[None]] = set()

    # lifecycle --------------------------------------------------------------------------------
    async def startup(self) -> None:
        await self.registry.start()

    async def main_loop(self, stop: asyncio.Event) -> None:
        if not self.templates:
            log.info("no template has `downlinks: mqtt`: blynk-sessions idles")
            await stop.wait()
            return
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watch(stop), name="sessions-watch")
                tg.create_task(self._own(stop), name="sessions-own")
                tg.create_task(self._fence(stop), name="sessions-fence")
                tg.create_task(self._scan(stop), name="sessions-scan")
                tg.create_task(self._open(stop), name="sessions-open")
                tg.create_task(self._forwarder(stop), name="sessions-forward")
                tg.create_task(self.keepalive.run(stop), name="sessions-keepalive")
        finally:
            for p in list(self.owned):
                await self._drop(p, "shutdown")
                with contextlib.suppress(RedisError):
                    await self.leases[p].release()

    async def shutdown(self) -> None:
        await self.registry.close()

    # watch: which devices are live ------------------------------------------------------------
    async def _watch(self, stop: asyncio.Event) -> None:
        streams = {s: "$" for s in self.keys.streams(keynames.WRITES)}
        prune_at = time.monotonic() + 60
        while not stop.is_set():
            try:
                reply: Any = await self.redis.xread(
                    streams, count=1000, block=1000)  # type: ignore[arg-type]
            except RedisError as exc:
                log.warning("cannot read writes: %s", exc)
                await _sleep(stop, 1.0)
                continue
            batch: dict[str, tuple[int, LiveDevice]] = {}
            written: dict[str, dict[str, Any]] = defaultdict(dict)
            for stream, entries in reply or []:
                name = stream.decode() if isinstance(stream, bytes) else stream
                for entry_id, fields in entries:
                    streams[name] = entry_id
                    raw = fields.get(FIELD)
                    if raw is None:
                        continue
                    try:
                        w = decode_write(raw)
                    except msgspec.DecodeError:
                        continue  # egress dead-letters it; nothing for sessions
                    batch[w.device_key] = (w.received_ts_ms, LiveDevice(w.token, w.server, ""))
                    written[w.device_key].update(w.pins)
            if batch:
                await self._mark_live(batch, written)
            if time.monotonic() >= prune_at:
                prune_at = time.monotonic() + 60
                self._prune(now_ms())

    def _prune(self, now: int) -> None:
        """Forget the uplink times of devices past their offline deadline (bounded memory)."""
        for key in [k for k, d in self._deadline_ms.items() if d < now]:
            del self._deadline_ms[key]
            self._seen_ms.pop(key, None)
            self._recorded.pop(key, None)

    async def _mark_live(self, batch: dict[str, tuple[int, LiveDevice]],
                         written: dict[str, dict[str, Any]]) -> None:
        """Record the devices as live, and the command-pin values they reported themselves as
        the last known ones (a command setting that pin back is then new: see ``_forward``)."""
        devs = await self.registry.get_many(batch)
        now = now_ms()
        pipe = self.redis.pipeline(transaction=False)
        n = 0
        for key, (ts, live) in batch.items():
            dev = devs.get(key)
            if dev is None or dev.template not in self.templates:
                continue
            commands = set(self.pins[dev.template].values())
            own = {pin.upper(): canonical(v) for pin, v in written.get(key, {}).items()
                   if pin.upper() in commands}
            if own:
                known_key = self.keys.sessions_known(token_ref(live.token))
                pipe.hset(known_key, mapping=own)  # type: ignore[arg-type]
                pipe.expire(known_key, _KNOWN_TTL_S)
                n += 1
            prev = self._seen_ms.get(key)
            self._seen_ms[key] = ts
            deadline = rules.offline_deadline_ms(now, prev, self.cfg.offline_min_s)
            old = self._deadline_ms.get(key)
            was = self._recorded.get(key)
            # Rewrite only when the deadline moved by a tenth of the minimum: a busy device
            # costs no Redis write per uplink. A new token always: the session must move.
            if (old is not None and deadline - old < self.cfg.offline_min_s * 100
                    and was == live.token):
                continue
            self._deadline_ms[key] = deadline
            self._recorded[key] = live.token
            p = rules.partition_of(live.token, self.cfg.partitions)
            if was is not None and was != live.token:
                # Out of the old token's partition: its session closes at that owner's scan.
                q = rules.partition_of(was, self.cfg.partitions)
                pipe.zrem(self.keys.sessions_live(q), key)
                pipe.hdel(self.keys.sessions_devices(q), key)
            record = LiveDevice(live.token, live.server, dev.template, dev.firmware)
            pipe.zadd(self.keys.sessions_live(p), {key: deadline})
            pipe.hset(self.keys.sessions_devices(p), key, _live_enc.encode(record))
            n += 1
        if n:
            try:
                await pipe.execute()
            except RedisError as exc:
                log.warning("cannot record live devices: %s", exc)
                for key in batch:
                    self._deadline_ms.pop(key, None)
                    self._recorded.pop(key, None)

    # own: partition leases --------------------------------------------------------------------
    async def _own(self, stop: asyncio.Event) -> None:
        interval = self.cfg.lease_ttl_ms / 4000
        rng = random.Random()
        while not stop.is_set():
            try:
                await self._balance(rng)
            except RedisError as exc:
                log.warning("sessions ownership: %s", exc)
            await _sleep(stop, interval)
        with contextlib.suppress(RedisError):  # else its heartbeat simply expires
            await self.redis.zrem(self.keys.sessions_replicas(), self.replica)

    async def _fence(self, stop: asyncio.Event) -> None:
        """Drop a partition the moment its lease is no longer certainly held. A task of its own
        and no Redis call: ``_own`` may hang in a renewal (Redis frozen, a partition without
        resets) while Redis expires the lease and another replica takes it."""
        # Wake at least twice per margin, so a lease acquired meanwhile is not overslept.
        cap = self.leases[0].margin_ms / 2000
        while not stop.is_set():
            for p in list(self.owned):
                if not self.leases[p].valid():
                    await self._drop(p, "lease_lost")
            wait = min((self.leases[p].remaining_s() for p in self.owned), default=cap)
            await _sleep(stop, min(cap, wait) + 0.001)

    async def _balance(self, rng: random.Random) -> None:
        now = now_ms()
        key = self.keys.sessions_replicas()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {self.replica: now + self.cfg.lease_ttl_ms})
            pipe.zremrangebyscore(key, "-inf", now)
            pipe.zcard(key)
            replicas = int((await pipe.execute())[2])
        for p in list(self.owned):
            if not await self.leases[p].renew():
                await self._drop(p, "lease_taken")
        share = rules.fair_share(self.cfg.partitions, replicas)
        while len(self.owned) > share:
            p = max(self.owned)
            await self._drop(p, "rebalance")
            await self.leases[p].release()
        free = [p for p in range(self.cfg.partitions) if p not in self.owned]
        rng.shuffle(free)
        for p in free:
            if len(self.owned) >= share:
                break
            if await self.leases[p].acquire():
                self.owned.add(p)
                SESSION_EVENTS.labels("partition_acquired").inc()
                await self._scan_partition(p)
        SESSIONS_HELD.set(len(self.sessions))

    async def _drop(self, p: int, why: str) -> None:
        """Stop owning a partition: its sessions are closed at once (before the lease may pass
        to another replica)."""
        self.owned.discard(p)
        for key in list(self.by_partition.pop(p, ())):
            self._release(key, p, why)
        SESSION_EVENTS.labels(f"partition_{why}").inc()

    # scan: open what is live, close what went offline ----------------------------------------
    async def _scan(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for p in list(self.owned):
                try:
                    await self._scan_partition(p)
                except RedisError as exc:
                    log.warning("sessions scan of partition %d: %s", p, exc)
            await _sleep(stop, self.cfg.scan_interval_s)

    async def _scan_partition(self, p: int) -> None:
        now = now_ms()
        live_key, dev_key = self.keys.sessions_live(p), self.keys.sessions_devices(p)
        expired = await self.redis.zrangebyscore(live_key, "-inf", now)
        if expired:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zremrangebyscore(live_key, "-inf", now)
                pipe.hdel(dev_key, *expired)
                await pipe.execute()
        live = {_text(k) for k in await self.redis.zrangebyscore(live_key, now, "+inf")}
        if p not in self.owned:
            return
        mine = self.by_partition[p]
        for key in mine - live:
            if self._release(key, p, "offline"):
                SESSION_EVENTS.labels("offline").inc()
        mine &= live
        # Also a key of ours without a record in memory: another partition that listed it under
        # an older token let it go (``_release``), and this record is the current one.
        new = sorted(k for k in live if k not in mine or k not in self.wanted)
        if not new:
            return
        raws = await self.redis.hmget(dev_key, new)
        for key, raw in zip(new, raws, strict=True):
            if raw is None:
                continue
            try:
                record = _live_dec.decode(raw.encode() if isinstance(raw, str) else raw)
            except msgspec.DecodeError:
                continue
            self.wanted[key] = record
            mine.add(key)
            s = self.sessions.get(key)
            if s is not None and s.token != record.token:
                # The device has a new token: its old token's session ends here.
                del self.sessions[key]
                s.close("token_changed")
            self._schedule(key, 0.0)

    def _release(self, key: str, p: int, why: str) -> bool:
        """Stop keeping ``key``'s session *for partition* ``p``; what the device has under
        another partition (its token changed) stays. True when a session was closed."""
        P = self.cfg.partitions
        live = self.wanted.get(key)
        if live is None or rules.partition_of(live.token, P) == p:
            self._forget(key)
        s = self.sessions.get(key)
        if s is None or rules.partition_of(s.token, P) != p:
            return False
        del self.sessions[key]
        s.close(why)
        return True

    def _forget(self, key: str) -> None:
        """This replica no longer keeps a session for ``key`` (offline, or not its partition)."""
        self.wanted.pop(key, None)
        self.attempts.pop(key, None)
        self.redirected.pop(key, None)

    # open: paced connects ---------------------------------------------------------------------
    def _schedule(self, key: str, delay_s: float) -> None:
        if key in self._queued or key in self.sessions:
            return
        self._queued.add(key)
        heapq.heappush(self._due, (time.monotonic() + delay_s, key))
        self._wake.set()

    async def _open(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not self._due:
                self._wake.clear()
                await _wait_any(stop, self._wake, None)
                continue
            at, key = self._due[0]
            wait = at - time.monotonic()
            if wait > 0:
                self._wake.clear()
                await _wait_any(stop, self._wake, wait)
                continue
            heapq.heappop(self._due)
            self._queued.discard(key)
            live = self.wanted.get(key)
            if live is None or key in self.sessions:
                continue
            try:
                await self.rate.acquire("blynk-sessions:connect")
            except RedisError as exc:
                log.warning("connect rate limit unavailable: %s", exc)
                self._schedule(key, 1.0)
                continue
            await self._opening.acquire()
            if self.wanted.get(key) is not live or key in self.sessions:
                self._opening.release()
                continue
            task = asyncio.create_task(self._connect(key, live))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, key: str, live: LiveDevice) -> None:
        try:
            addr = self.redirected.get(key) or await self._address(live)
            if addr is None:
                SESSION_EVENTS.labels("no_server").inc()
                log.warning("device %s: server %s has no known MQTT address", key, live.server)
                self._retry(key, cap=True)
                return
            # The partition may have been dropped while the address was looked up: its new
            # owner may already hold the session, so not a byte with the token from here.
            p = rules.partition_of(live.token, self.cfg.partitions)
            if self.wanted.get(key) is not live or not self.leases[p].valid():
                return
            template = self.templates.get(live.template)
            info = mcu_info(template.id or live.template if template else live.template,
                            live.firmware)
            s = Session(key, live.token, self, keepalive_s=self.cfg.keepalive_s, info=info)
            self.sessions[key] = s
            try:
                await open_session(s, addr.host, addr.port,
                                   tls=self._tls if addr.tls else None)
            except (OSError, TimeoutError, ValueError) as exc:
                # ValueError: a host the resolver or TLS refuses outright (a label over 63
                # bytes, a NUL) — a failed connect too, never a session left half-registered.
                if self.sessions.get(key) is s:
                    del self.sessions[key]
                SESSION_EVENTS.labels("connect_failed").inc()
                log.info("device %s: cannot connect to %s: %s", key, addr, exc)
                self._retry(key)
                return
            # The partition may have been dropped while connecting: never keep such a session.
            if self.wanted.get(key) is not live:
                s.close("not_owned")
                return
            self.keepalive.add(s)
            SESSION_EVENTS.labels("connected").inc()
        finally:
            self._opening.release()

    async def _address(self, live: LiveDevice) -> rules.Address | None:
        try:
            raw = await self.redis.get(self.keys.region(token_hash(live.token)))
        except RedisError:
            raw = None
        if raw:
            addr = self.servers.address(_text(raw))
            if addr is not None:
                return addr
        return self.servers.address(live.server)

    def _retry(self, key: str, *, cap: bool = False) -> None:
        if key not in self.wanted:
            return
        n = self.attempts.get(key, 0)
        self.attempts[key] = n + 1
        delay = self.cfg.max_backoff_s if cap else rules.backoff_s(n, self.cfg.max_backoff_s)
        self._schedule(key, delay)

    # Session handler (callbacks on the loop) --------------------------------------------------
    def session_ready(self, session: Session) -> None:
        session.publish("get/ds/all", b"")
        SESSION_EVENTS.labels("ready").inc()
        SESSIONS_HELD.set(len(self.sessions))

    def session_message(self, session: Session, topic: str, payload: bytes) -> None:
        if topic.startswith("downlink/ds/"):
            self._forward.put_nowait((session.key, topic, payload))
        elif topic == "downlink/redirect":
            self._redirect(session, payload)
        else:
            SESSION_EVENTS.labels("ignored").inc()

    def session_closed(self, session: Session, reason: str) -> None:
        key = session.key
        self.keepalive.discard(session)
        if self.sessions.get(key) is session:
            del self.sessions[key]
        SESSIONS_HELD.set(len(self.sessions))
        label = reason.split(":")[0]
        SESSION_EVENTS.labels(f"closed_{label}").inc()
        # Only a session that lasted resets the backoff: one kicked at once (the token in use
        # elsewhere too) must not reconnect within a second, forever.
        if session.ready_at and time.monotonic() - session.ready_at >= self.cfg.keepalive_s:
            self.attempts.pop(key, None)
        if label == "redirect" and key in self.wanted and not self.attempts.get(key):
            # Followed at once, but counted: a redirect loop waits a growing backoff.
            self.attempts[key] = 1
            self._schedule(key, 0.0)
        elif key in self.wanted:
            if label == "bad_credentials":
                log.warning("device %s: Blynk refused token %s (CONNACK 4)", key,
                            mask(session.token))
            self._retry(key, cap=label == "bad_credentials")

    def _redirect(self, session: Session, payload: bytes) -> None:
        t = session.transport
        tls = t is not None and t.get_extra_info("ssl_object") is not None
        target = self.servers.redirect(payload, tls=tls)
        if target is None:
            SESSION_EVENTS.labels("redirect_refused").inc()
            log.warning("device %s: redirect to %r refused (not a Blynk server)", session.key,
                        payload[:100])
            session.close("redirect_refused")
            return
        addr, base = target
        self.redirected[session.key] = addr
        SESSION_EVENTS.labels("redirected").inc()
        task = asyncio.create_task(self._remember(session.token, base))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        session.close("redirect")

    async def _remember(self, token: str, base: str) -> None:
        try:
            await self.redis.set(self.keys.region(token_hash(token)), base.encode(),
                                 ex=_REGION_TTL_S)
        except RedisError as exc:
            log.warning("could not store region of token %s: %s", mask(token), exc)

    # forward: commands onto the downlinks stream ----------------------------------------------
    async def _forwarder(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            got = await _wait_any(stop, None, None, queue=self._forward)
            if got is None:
                return
            items = [got]
            while not self._forward.empty() and len(items) < 1000:
                items.append(self._forward.get_nowait())
            while True:
                try:
                    await self._forward_batch(items)
                    break
                except RedisError as exc:
                    log.warning("cannot forward commands (retrying): %s", exc)
                    if await _sleep(stop, 1.0):
                        return

    async def _forward_batch(self, items: list[tuple[str, str, bytes]]) -> None:
        now = now_ms()
        downs: list[Downlink] = []
        for key, topic, payload in items:
            live = self.wanted.get(key)
            if live is None:
                continue
            try:
                down = rules.command(live.token, self.pins.get(live.template, {}), topic,
                                     payload, now)
            except (ValueError, UnicodeDecodeError):
                SESSION_EVENTS.labels("bad_value").inc()
                continue
            if down is None:
                SESSION_EVENTS.labels("not_a_command").inc()
                continue
            downs.append(down)
        if not downs:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for d in downs:
                pipe.hget(self.keys.sessions_known(token_ref(d.token or "")), d.pin)
            known = await pipe.execute()
        out: list[tuple[str, bytes]] = []
        async with self.redis.pipeline(transaction=False) as pipe:
            last: dict[tuple[str, str], str] = {}
            for d, k in zip(downs, known, strict=True):
                value = str(d.value)
                ident = (d.token or "", d.pin)
                prev = last.get(ident, k.decode() if k is not None else None)
                if not rules.is_new(value, prev):
                    SESSION_EVENTS.labels("unchanged").inc()
                    continue
                last[ident] = canonical(value)
                known_key = self.keys.sessions_known(token_ref(ident[0]))
                pipe.hset(known_key, d.pin, last[ident])
                pipe.expire(known_key, _KNOWN_TTL_S)
                out.append((self.keys.stream_for(keynames.DOWNLINKS, "blynk", ident[0]),
                            encode(d)))
            if out:
                # The command first: a crash between the two re-sends it (repeats are dropped
                # downstream), never loses it.
                await self.ctx.writer.add_many(out)
                await pipe.execute()
                SESSION_EVENTS.labels("forwarded").inc(len(out))


async def _sleep(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep unless stopped; True when ``stop`` was set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event | None, wait_s: float | None, *,
                    queue: asyncio.Queue[tuple[str, str, bytes]] | None = None
                    ) -> tuple[str, str, bytes] | None:
    """Wait for ``stop``, ``wake``, an item of ``queue`` or ``wait_s``; the item if one came."""
    waiters: set[asyncio.Task[object]] = {asyncio.create_task(stop.wait())}
    if wake is not None:
        waiters.add(asyncio.create_task(wake.wait()))
    getter: asyncio.Task[object] | None = None
    if queue is not None:
        getter = asyncio.create_task(queue.get())
        waiters.add(getter)
    try:
        await asyncio.wait(waiters, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    if getter is not None and getter.done() and not getter.cancelled():
        return getter.result()  # type: ignore[return-value]
    return None


def build(ctx: Context) -> SessionsStage:
    return SessionsStage(ctx)
