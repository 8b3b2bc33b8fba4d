"""blynk-sessions: a Blynk device MQTT session for every live device of a ``downlinks: mqtt``
template, as the device's stand-in (real-time downlinks without the webhooks' 10/min limit, and
the device online in Blynk while its source device is alive).

Parts, each one task:

* **watch** — every replica reads every ``BlynkWrite`` written after its ``startup`` (``XREAD``,
  no group: an observer that must not hold back trimming) and, for devices of ``downlinks:
  mqtt`` templates, records in Redis when their session may close (``keys.sessions_live(p)``:
  3 × the observed uplink interval, at least ``offline_min_s``) and what opening it needs
  (``keys.sessions_devices(p)``).
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
* **scan** — each ``scan_interval_s`` an owner closes the sessions of devices past their
  deadline and opens those that became live, reading only what changed (an atomic expiry
  script, each partition's changes stream after its cursor; one round trip for all owned
  partitions); the whole live set only on acquiring a partition, every ``_RESYNC_S``, or after
  a full page of changes. A device that left a partition (its token changed) has a change
  entry there too: its record is re-read, and gone means its session there closes.
* **open** — opens are paced: each device waits its jittered backoff, then a slot of the global
  connect rate (GCRA in Redis, shared by all replicas).
* **forward** — ``downlink/ds/<Name>`` of a command pin → a ``Downlink`` on the downlinks
  stream (the webhook receiver's contract; the downlink stage types, de-duplicates, drops
  echoes and routes it), when the value is new for that pin (``keys.sessions_known``: the last
  value that came down, or that the device reported in an uplink — **watch** records those).
  The queue in front of Redis is bounded: at ``forward_queue_max`` it keeps the latest value
  per device and pin (``superseded`` counts the rest), so a Redis outage costs at most
  sessions × command pins.

On every (re)connect a session publishes ``info/mcu`` (template id, firmware when known) and
asks ``get/ds/all``: what changed in the app while it was down arrives then and is forwarded.
``downlink/redirect`` is followed only to a configured server or ``<region>.blynk.cloud``
on a TLS port, never from TLS to plain MQTT (:class:`pipeline.blynk_sessions.Servers`); the
first since a session last lasted at once, the ones after it with backoff; and remembered as
the token's region, like the device API client's 308s.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import ssl
import time
from collections import Counter, defaultdict, deque
from collections.abc import Mapping
from typing import Any

import msgspec
from redis.exceptions import RedisError

from pipeline import blynk_sessions as rules
from pipeline import keys as keynames
from pipeline.backlog import as_str
from pipeline.blynk.client import token_hash
from pipeline.blynk.device_mqtt import Keepalive, Session, mcu_info, open_session
from pipeline.blynk_index import token_ref
from pipeline.context import Context
from pipeline.echo import canonical
from pipeline.events import FIELD, Downlink, decode_write, encode
from pipeline.lease import PartitionLeases
from pipeline.lifecycle import until_stopped, wait_event
from pipeline.metrics import SESSION_EVENTS, SESSIONS_HELD, SESSIONS_PENDING
from pipeline.ratelimit import RateLimiter
from pipeline.redact import mask
from pipeline.registry import Registry
from pipeline.streams import CLUSTER_POLL_MS, now_ms

log = logging.getLogger("blynk_bridge.blynk_sessions")


class LiveDevice(msgspec.Struct, array_like=True):
    """What opening a device's session needs (stored per partition in Redis)."""

    token: str
    server: str
    template: str
    firmware: str | None = None


#: Records one partition's live devices (ARGV[1]: the changes stream's cap, then triples of
#: device key, deadline, record): each deadline and record, and a change entry only for a device
#: not live before, so owners read new devices, not every deadline extension.
_MARK = """
local added = 0
for i = 2, #ARGV, 3 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 2])
  if redis.call('ZADD', KEYS[1], ARGV[i + 1], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], '*', 'k', ARGV[i])
    added = added + 1
  end
end
return added
"""
#: Removes devices from one partition (ARGV[1]: the changes stream's cap, then device keys):
#: their token changed, so they now live under another partition. A change entry for each one
#: that was live, so the owner re-reads it, finds no record and closes its session there.
_UNMARK = """
local removed = 0
for i = 2, #ARGV do
  redis.call('HDEL', KEYS[2], ARGV[i])
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[1], '*', 'k', ARGV[i])
    removed = removed + 1
  end
end
return removed
"""
#: Removes up to ARGV[2] devices whose deadline (<= ARGV[1]) passed and returns them; atomic,
#: so a device made live again between reading and removing stays.
_EXPIRE = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('HDEL', KEYS[2], unpack(gone))
end
return gone
"""
#: Entries kept per partition's changes stream, and read per scan (a full page = maybe more
#: were trimmed: the owner reads the whole live set instead).
_CHANGES_MAX = 10_000
_EXPIRE_MAX = 5_000
#: Each owned partition's whole live set is re-read this often anyway (it catches what no
#: change entry says, e.g. a device removed by the partition's previous owner).
_RESYNC_S = 300.0
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
        self.registry = Registry(ctx.redis, ctx.keys, cache_size=cfg.blynk_sessions.cache_size)
        self.replica = ctx.consumer
        self.ownership = PartitionLeases(
            ctx.redis, lease_key=lambda p: ctx.keys.lease("sessions", str(p)),
            owners_key=ctx.keys.sessions_replicas(), owner=self.replica,
            partitions=self.cfg.partitions, ttl_ms=self.cfg.lease_ttl_ms,
            on_acquired=self._acquired, on_dropped=self._drop)
        self.leases = self.ownership.leases
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
        #: Commands waiting for the downlinks stream, in arrival order: (device key, topic,
        #: value, arrival ms). Bounded by :meth:`_compact` (see there).
        self._pending: deque[tuple[str, str, bytes, int]] = deque()
        self._compact_at = self.cfg.forward_queue_max
        self._pending_wake = asyncio.Event()
        self._mark = ctx.redis.register_script(_MARK)
        self._unmark = ctx.redis.register_script(_UNMARK)
        self._expire = ctx.redis.register_script(_EXPIRE)
        #: Owned partition → last changes-stream id read, and when to read the whole set again.
        self._cursor: dict[int, str] = {}
        self._resync_at: dict[int, float] = {}
        #: Owned partition → device keys to re-read at its next scan: another partition let
        #: go of their record in memory (``_release``), and this one may hold the current one.
        self._recheck: dict[int, set[str]] = defaultdict(set)
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
        #: Writes stream → the id the watch reads after (set by :meth:`startup`).
        self._watch_from: dict[str, str] = {}

    @property
    def owned(self) -> set[int]:
        """The partitions this replica owns."""
        return self.ownership.owned

    @owned.setter
    def owned(self, partitions: set[int]) -> None:
        self.ownership.owned = partitions

    # lifecycle --------------------------------------------------------------------------------
    async def startup(self) -> None:
        await self.registry.start()
        # The watch starts where the writes streams stand now: every write after startup is
        # seen. (Reading from "$" started at the watch's first read, which on a busy machine
        # came after the first uplinks: their devices stayed without a session.)
        watch_from = {s: "$" for s in self.keys.streams(keynames.WRITES)}
        await self._tails(watch_from)
        self._watch_from = watch_from

    async def main_loop(self, stop: asyncio.Event) -> None:
        if not self.templates:
            log.info("no template has `downlinks: mqtt`: blynk-sessions idles")
            await stop.wait()
            return
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._watch(stop), name="sessions-watch")
                tg.create_task(self._own(stop), name="sessions-own")
                tg.create_task(self.ownership.fence(stop), name="sessions-fence")
                tg.create_task(self._scan(stop), name="sessions-scan")
                tg.create_task(self._open(stop), name="sessions-open")
                tg.create_task(self._forwarder(stop), name="sessions-forward")
                tg.create_task(self.keepalive.run(stop), name="sessions-keepalive")
        finally:
            for p in list(self.owned):
                await self.ownership.drop(p, "shutdown")
                await self.ownership.release(p)

    async def shutdown(self) -> None:
        await self.registry.close()

    # watch: which devices are live ------------------------------------------------------------
    async def _watch(self, stop: asyncio.Event) -> None:
        streams = dict(self._watch_from) or {s: "$" for s in self.keys.streams(keynames.WRITES)}
        prune_at = time.monotonic() + 60
        while not stop.is_set():
            try:
                if "$" in streams.values():
                    await self._tails(streams)
                # Cut short by a stop: an observer's read (no group) leaves nothing pending.
                reply: Any = await until_stopped(self._read_writes(streams), stop)
            except RedisError as exc:
                log.warning("cannot read writes: %s", exc)
                await wait_event(stop, 1.0)
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

    async def _tails(self, streams: dict[str, str]) -> None:
        """Start each stream still at ``$`` after its last entry now (one round trip): ``$``
        itself would be resolved afresh by every ``XREAD``, skipping what was appended between
        two reads (on a cluster the per-partition polls leave such gaps all the time)."""
        todo = [s for s, i in streams.items() if i == "$"]
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in todo:
                pipe.xrevrange(stream, count=1)
            last = await pipe.execute()
        for stream, rows in zip(todo, last, strict=True):
            streams[stream] = as_str(rows[0][0]) if rows else "0-0"

    async def _read_writes(self, streams: dict[str, str]) -> Any:
        """New entries of the writes streams after ``streams``' ids (blocking up to 1 s). In
        the cluster layout one ``XREAD`` per partition (one ``BLOCK`` cannot span slots),
        concurrently, each blocking :data:`~pipeline.streams.CLUSTER_POLL_MS`."""
        if not self.keys.cluster or len(streams) == 1:
            return await self.redis.xread(streams, count=1000, block=1000)  # type: ignore[arg-type]
        replies = await asyncio.gather(*(
            self.redis.xread({s: i}, count=1000, block=CLUSTER_POLL_MS)
            for s, i in streams.items()))
        return [row for reply in replies if reply for row in reply]

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
        per_partition: dict[int, list[Any]] = defaultdict(list)
        moved: dict[int, list[str]] = defaultdict(list)
        known: dict[str, dict[str, str]] = {}
        undo: dict[str, str | None] = {}
        for key, (ts, live) in batch.items():
            dev = devs.get(key)
            if dev is None or dev.template not in self.templates:
                continue
            commands = set(self.pins[dev.template].values())
            own = {pin.upper(): canonical(v) for pin, v in written.get(key, {}).items()
                   if pin.upper() in commands}
            if own:
                known.setdefault(self.keys.sessions_known(token_ref(live.token)), {}).update(own)
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
            undo[key] = was
            p = rules.partition_of(live.token, self.cfg.partitions)
            if was is not None and was != live.token:
                # Out of the old token's partition (a change entry tells its owner to close
                # the old session); removed first, so even when both tokens share a partition
                # the new record is a change its owner reads.
                moved[rules.partition_of(was, self.cfg.partitions)].append(key)
            record = LiveDevice(live.token, live.server, dev.template, dev.firmware)
            per_partition[p] += [key, deadline, _live_enc.encode(record)]
        if not (per_partition or known):
            return
        try:
            await self._record_live(per_partition, moved, known)
        except RedisError as exc:
            log.warning("cannot record live devices: %s", exc)
            for key in batch:
                self._deadline_ms.pop(key, None)
            for key, was in undo.items():  # the old token's record may still be there
                if was is None:
                    self._recorded.pop(key, None)
                else:
                    self._recorded[key] = was

    async def _record_live(self, per_partition: dict[int, list[Any]],
                           moved: Mapping[int, list[str]] | None = None,
                           known: Mapping[str, dict[str, str]] | None = None) -> None:
        """In one round trip: partition → flat ``[device key, deadline ms, LiveDevice record,
        …]`` recorded (a script per partition: see :data:`_MARK`), after the devices in
        ``moved`` (partition → device keys) left their old partition (:data:`_UNMARK`), and
        the ``known`` values (``sessions_known`` key → pin → value) the devices reported."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for q, gone in (moved or {}).items():
                await self._unmark(keys=[self.keys.sessions_live(q),
                                         self.keys.sessions_devices(q),
                                         self.keys.sessions_changes(q)],
                                   args=[_CHANGES_MAX, *gone], client=pipe)
            for p, args in per_partition.items():
                await self._mark(keys=[self.keys.sessions_live(p), self.keys.sessions_devices(p),
                                       self.keys.sessions_changes(p)],
                                 args=[_CHANGES_MAX, *args], client=pipe)
            for known_key, values in (known or {}).items():
                pipe.hset(known_key, mapping=values)  # type: ignore[arg-type]
                pipe.expire(known_key, _KNOWN_TTL_S)
            await pipe.execute()

    # own: partition leases --------------------------------------------------------------------
    async def _own(self, stop: asyncio.Event) -> None:
        """The partition leases (:class:`pipeline.lease.PartitionLeases`), balanced every
        ``lease_ttl_ms / 4``."""
        await self.ownership.run(stop, name="sessions",
                                 after=lambda: SESSIONS_HELD.set(len(self.sessions)))

    async def _acquired(self, p: int) -> None:
        SESSION_EVENTS.labels("partition_acquired").inc()
        await self._scan_partition(p)

    async def _drop(self, p: int, why: str) -> None:
        """A partition no longer owned (:class:`~pipeline.lease.PartitionLeases` took it out
        of ``owned``): its sessions are closed at once (before the lease may pass to another
        replica)."""
        self._cursor.pop(p, None)
        self._recheck.pop(p, None)
        for key in list(self.by_partition.pop(p, ())):
            self._release(key, p, why)
        SESSION_EVENTS.labels(f"partition_{why}").inc()

    # scan: open what is live, close what went offline ----------------------------------------
    async def _scan(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self._scan_owned()
            except RedisError as exc:
                log.warning("sessions scan: %s", exc)
            await wait_event(stop, self.cfg.scan_interval_s)

    async def _scan_owned(self) -> None:
        """Close the sessions whose devices went offline; open those that came live. Reads
        only what changed since the last scan — devices past their deadline (removed by an
        atomic script) and the changes stream after each partition's cursor — for every owned
        partition in one round trip; a partition's whole live set only on acquiring it, every
        ``_RESYNC_S``, or when more changed than its stream keeps."""
        now, mono = now_ms(), time.monotonic()
        parts = sorted(self.owned)
        full = [p for p in parts if p not in self._cursor or mono >= self._resync_at[p]]
        changed = [p for p in parts if p not in full]
        if changed:
            async with self.redis.pipeline(transaction=False) as pipe:
                for p in changed:
                    await self._expire(keys=[self.keys.sessions_live(p),
                                             self.keys.sessions_devices(p)],
                                       args=[now, _EXPIRE_MAX], client=pipe)
                    pipe.xrange(self.keys.sessions_changes(p), min=f"({self._cursor[p]}",
                                count=_CHANGES_MAX)
                reply = await pipe.execute()
            for i, p in enumerate(changed):
                gone, entries = reply[2 * i], reply[2 * i + 1]
                if len(entries) >= _CHANGES_MAX:  # may have lost entries to the cap
                    SESSION_EVENTS.labels("scan_resync").inc()
                    full.append(p)
                    entries = []  # the whole live set is read below
                elif entries and p in self.owned:
                    self._cursor[p] = as_str(entries[-1][0])
                await self._apply(p, {as_str(k) for k in gone},
                                  {as_str(fields[b"k"]) for _, fields in entries}, full=False)
        for p in full:
            await self._scan_partition(p)

    async def _scan_partition(self, p: int) -> None:
        """Read a partition's whole live set (and set its changes cursor)."""
        now = now_ms()
        live_key, dev_key = self.keys.sessions_live(p), self.keys.sessions_devices(p)
        async with self.redis.pipeline(transaction=True) as pipe:
            await self._expire(keys=[live_key, dev_key], args=[now, _EXPIRE_MAX], client=pipe)
            # Cursor and live set read atomically: a change after them is read next time.
            pipe.xrevrange(self.keys.sessions_changes(p), count=1)
            pipe.zrangebyscore(live_key, now, "+inf")
            gone, last, members = await pipe.execute()
        if p not in self.owned:
            return
        self._cursor[p] = as_str(last[0][0]) if last else "0-0"
        self._resync_at[p] = time.monotonic() + _RESYNC_S
        live = {as_str(k) for k in members}
        await self._apply(p, {as_str(k) for k in gone} | (self.by_partition[p] - live), live,
                          full=True)

    async def _apply(self, p: int, gone: set[str], live: set[str], *, full: bool) -> None:
        """Close the sessions of ``gone`` devices and open those of ``live`` ones not held.
        ``full``: ``live`` is the whole live set, else the devices with a change entry — each
        re-read, since one may have left the partition (its token changed: no record)."""
        if p not in self.owned:
            return
        mine = self.by_partition[p]
        for key in gone & mine:
            if self._release(key, p, "offline"):
                SESSION_EVENTS.labels("offline").inc()
        mine -= gone
        if full:
            # Also a key of ours without a record in memory: another partition that listed it
            # under an older token let it go (``_release``), and this record is the current one.
            live = {k for k in live if k not in mine or k not in self.wanted}
        new = sorted((live | self._recheck.pop(p, set())) - gone)
        if not new:
            return
        raws = await self.redis.hmget(self.keys.sessions_devices(p), new)
        if p not in self.owned:
            return
        for key, raw in zip(new, raws, strict=True):
            if raw is None:
                # Not live here (any more): its token changed, the record is elsewhere now.
                if key in mine:
                    mine.discard(key)
                    if self._release(key, p, "token_changed"):
                        SESSION_EVENTS.labels("token_changed").inc()
                continue
            try:
                record = _live_dec.decode(raw.encode() if isinstance(raw, str) else raw)
            except msgspec.DecodeError:
                continue
            mine.add(key)
            if self.wanted.get(key) == record:
                continue  # as held (a connect on its way keeps its record)
            self.wanted[key] = record
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
            for q in self.owned:  # another partition listing the key may hold its record
                if q != p and key in self.by_partition.get(q, ()):
                    self._recheck[q].add(key)
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
            addr = self.servers.address(as_str(raw))
            if addr is not None:
                return addr
        return self.servers.address(live.server)

    def _retry(self, key: str, *, cap: bool = False) -> None:
        if key not in self.wanted:
            return
        n = self.attempts.get(key, 0)
        self.attempts[key] = n + 1
        delay = self.cfg.max_backoff_s if cap else rules.backoff_s(
            n, self.cfg.max_backoff_s, base_s=self.cfg.backoff_base_s)
        self._schedule(key, delay)

    # Session handler (callbacks on the loop) --------------------------------------------------
    def session_ready(self, session: Session) -> None:
        session.publish("get/ds/all", b"")
        SESSION_EVENTS.labels("ready").inc()
        SESSIONS_HELD.set(len(self.sessions))

    def session_message(self, session: Session, topic: str, payload: bytes) -> None:
        if topic.startswith("downlink/ds/"):
            self._enqueue(session.key, topic, payload, now_ms())
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
    def _enqueue(self, key: str, topic: str, payload: bytes, at_ms: int) -> None:
        live = self.wanted.get(key)
        if live is None:  # closing: its next owner's get/ds/all brings the value
            SESSION_EVENTS.labels("not_owned").inc()
            return
        if topic[12:] not in self.pins.get(live.template, {}):
            # Not a command pin (a sensor value): never queued, so the queue's bound holds.
            SESSION_EVENTS.labels("not_a_command").inc()
            return
        self._pending.append((key, topic, payload, at_ms))
        if len(self._pending) >= self._compact_at:
            self._compact()
        SESSIONS_PENDING.set(len(self._pending))
        self._pending_wake.set()

    def _compact(self) -> None:
        """Keep only the latest value per device and pin (commands are latest-wins downstream
        too; the older ones are counted ``superseded``, never silently gone). What is left is
        at most sessions × command pins; the next compaction waits until the queue doubled, so
        a large fleet behind a Redis outage costs amortized O(1) per command."""
        seen: set[tuple[str, str]] = set()
        kept: list[tuple[str, str, bytes, int]] = []
        for item in reversed(self._pending):
            ident = (item[0], item[1])
            if ident not in seen:
                seen.add(ident)
                kept.append(item)
        kept.reverse()
        SESSION_EVENTS.labels("superseded").inc(len(self._pending) - len(kept))
        self._pending = deque(kept)
        self._compact_at = max(self.cfg.forward_queue_max, 2 * len(kept))

    def _take(self, n: int) -> list[tuple[str, str, bytes, int]]:
        out = [self._pending.popleft() for _ in range(min(n, len(self._pending)))]
        if not self._pending:
            self._compact_at = self.cfg.forward_queue_max
        SESSIONS_PENDING.set(len(self._pending))
        return out

    def _requeue(self, items: list[tuple[str, str, bytes, int]]) -> None:
        """Put a batch that did not go out back in front, in its order."""
        self._pending.extendleft(reversed(items))
        if len(self._pending) >= self._compact_at:
            self._compact()
        SESSIONS_PENDING.set(len(self._pending))

    async def _forwarder(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not self._pending:
                self._pending_wake.clear()
                await _wait_any(stop, self._pending_wake, None)
                continue
            items = self._take(1000)
            try:
                await self._forward_batch(items)
            except RedisError as exc:
                log.warning("cannot forward %d commands (retrying): %s", len(items), exc)
                self._requeue(items)
                await wait_event(stop, 1.0)

    async def _forward_batch(self, items: list[tuple[str, str, bytes, int]]) -> None:
        """Forward a batch; each item is counted once it is settled (a batch that raises is
        requeued whole and counted on its retry, never twice)."""
        counts: Counter[str] = Counter()
        downs: list[Downlink] = []
        for key, topic, payload, at in items:
            live = self.wanted.get(key)
            if live is None:
                # No longer this replica's device: its next owner's get/ds/all brings the
                # value (it was never recorded as known).
                counts["not_owned"] += 1
                continue
            try:
                down = rules.command(live.token, self.pins.get(live.template, {}), topic,
                                     payload, at)
            except (ValueError, UnicodeDecodeError):
                counts["bad_value"] += 1
                continue
            if down is None:
                counts["not_a_command"] += 1
                continue
            downs.append(down)
        if downs:
            await self._forward_new(downs, counts)
        for event, n in counts.items():
            SESSION_EVENTS.labels(event).inc(n)

    async def _forward_new(self, downs: list[Downlink], counts: Counter[str]) -> None:
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
                    counts["unchanged"] += 1
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
                counts["forwarded"] += len(out)


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, wait_s: float | None) -> None:
    """Wait for ``stop``, ``wake`` or ``wait_s``."""
    waiters = {asyncio.create_task(stop.wait()), asyncio.create_task(wake.wait())}
    try:
        await asyncio.wait(waiters, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


def build(ctx: Context) -> SessionsStage:
    return SessionsStage(ctx)
