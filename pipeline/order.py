"""Event-time order across batches and replicas: the last written time per device/pin in Redis.

``keys.last_written(device_key)`` is the device's *record*, one string: its in-flight lease
(expiry and owner), its request rate limit (the GCRA state of :mod:`pipeline.ratelimit`, shared
by every replica) and ``pin → event time (ms)`` of the newest value Blynk has for each pin
(layout: ``_RECORD`` below). Each script reads and writes a device's record with one ``GET``
and one ``SET``, whatever its number of pins. The per-flush scripts (:meth:`LastWritten.prepare`,
:meth:`LastWritten.commit_many`) touch the records of many devices in one call on one Redis; in
the cluster layout (:attr:`pipeline.keys.Keys.cluster`) they run once per partition, pipelined,
each call in its partition's slot.

The protocol of one device write (egress):

1. :meth:`LastWritten.claim` — atomically take the device's lease and read the last written times
   of its pins. If another replica holds a live lease, nothing is taken: the caller keeps the
   entries and tries again shortly. Egress uses :meth:`LastWritten.prepare`, which does the
   same for every device of a flush in one script call, and also skips devices whose every
   value is older than recorded and takes each device's rate-limit slot;
   :meth:`LastWritten.take` takes the slots of a write's extra requests,
   :meth:`LastWritten.defer_many` pushes a device's next slot out after a 429.
2. Drop what is older (:func:`pipeline.coalesce.drop_stale`: equal event times are applied in
   arrival order), send the rest to Blynk.
3. After the 2xx, :meth:`LastWritten.commit` — record ``max(old, new)`` per pin and release the
   lease (:meth:`LastWritten.commit_many` also acks the written entries in the same call; given
   the claim ``prepare`` granted, it stores the merge computed by the caller while the record is
   still the one that claim read).
   After a failure, :meth:`LastWritten.release`.

**Why the lease.** Without it two replicas can both read "last = 5", then send 20 and 10 to
Blynk in that order: Blynk ends at 10 even though the record says 20 — a rollback the record
cannot see. With the lease the second writer of a device waits for the first to commit, then
filters against its record, so Blynk only ever moves forward in event time.

**What remains.** The lease expires after ``lease_ms`` so a crashed replica cannot block a device
forever. A replica that is still sending after its lease expired (a request outliving the lease)
can race again; egress keeps ``lease_ms`` well above the Blynk client's timeout, renews the lease
(:meth:`claim` is re-entrant) before each extra request, and :meth:`commit` reports a lost lease
so it is logged and counted. A request Blynk received whose answer never came back (timeout) is
retried; that re-sends the same or newer values, never older ones.

Records expire ``ttl_ms`` to 5/4 ``ttl_ms`` after a device's last write (default 31 days: Blynk
refuses timestamped points older than a month, and no redelivery lives that long; only a manual
``replay`` of an older dead letter could then write an older value). The expiry is set again
only once a quarter of the ttl has passed: setting it costs Redis more than the write itself.

Redis errors propagate (``RedisError``); callers treat them as retryable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from pipeline.echo import RECORD_LUA as ECHO_RECORD_LUA
from pipeline.keys import Keys
from pipeline.ratelimit import GCRA_LUA, RateLimiter
from pipeline.streams import Redis

_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder().decode
DEFAULT_TTL_MS = 31 * 24 * 3600 * 1000

# Scripts take their arguments as one msgpack blob (ARGV[1]): redis-py packs each argument in
# Python, msgpack packs a whole flush's values in C. What a script decodes only sometimes comes
# as msgpack objects one after another in one more argument, each found by its byte offset
# (Redis's cmsgpack cannot nest binary strings; one argument per device would cost redis-py
# more than the decoding saves).
#
# A device's record (keys.last_written) is one string: a msgpack header [lease expires ms,
# lease owner ('' = free), rate-limit TAT µs, when its expiry was last set (ms), version,
# newest recorded event ms] followed by the msgpack map {pin: event ms} of what Blynk has.
# One GET and one SET per script and device, whatever the number of pins (a hash field per
# pin cost two hash commands per pin and write). The scripts decode only the header in the
# common case: a write whose newest value is at least the newest recorded one is not stale
# (whatever its pins), and a commit whose caller read the record (its version) under the lease
# held since brings the merged map itself; the map is decoded only to check or merge pin by pin
# otherwise. ``version`` counts the changes of the map.
#
# Setting an expiry costs Redis more than the SET itself, so a record's expiry is set to 5/4 ttl
# and kept (KEEPTTL) until a quarter of the ttl has passed since it was set: a record lives ttl
# to 5/4 ttl after the device's last write.
_RECORD = """
local EMPTY = cmsgpack.pack({})
local function load(key)
  local rec = redis.call('GET', key)
  if rec then
    local off, h = cmsgpack.unpack_one(rec)
    if off > 0 then return h, string.sub(rec, off + 1) end
    return h, EMPTY
  end
  return {0, '', 0, 0, 0, -1}, EMPTY
end
local function store(key, h, pins, now, ttl)
  if now - h[4] < ttl / 4 then
    redis.call('SET', key, cmsgpack.pack(h) .. pins, 'KEEPTTL')
  else
    h[4] = now
    redis.call('SET', key, cmsgpack.pack(h) .. pins, 'PX', ttl + math.floor(ttl / 4))
  end
end
local function clock()
  local t = redis.call('TIME')
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  return now_us, math.floor(now_us / 1000)
end
local function busy(h, owner, now)
  if h[2] ~= owner and h[2] ~= '' and h[1] > now then return h[1] - now end
  return 0
end
"""

# KEYS = records; ARGV[1] = msgpack [owner, lease ms, ttl ms]. Per device: {0, busy ms} another
# owner's live lease, else {1, pin map} (the lease taken or renewed).
_CLAIM = _RECORD + """
local _, now = clock()
local p = cmsgpack.unpack(ARGV[1])
local owner, lease_ms, ttl = p[1], p[2], p[3]
local out = {}
for d = 1, #KEYS do
  local h, pins = load(KEYS[d])
  local wait = busy(h, owner, now)
  if wait > 0 then
    out[d] = {0, wait}
  else
    h[1], h[2] = now + lease_ms, owner
    store(KEYS[d], h, pins, now, ttl)
    out[d] = {1, pins}
  end
end
return out
"""

# KEYS = records, then streams; ARGV[1] = msgpack [owner, ttl ms, group, [[read version, newest
# of the merged map, offset of written in ARGV[2], offset and length of the merged map in
# ARGV[3]] per record], [[entry id, ...] per stream]] (XACKed in the same call); ARGV[2] = the
# msgpack {pin: event ms} written of each record, ARGV[3] = the merged maps (length 0 = nothing
# newer). Read version -1 when the caller did not read the record. Per record: 1 when the lease
# was this owner's (it is released), else 0.
_COMMIT = _RECORD + """
local _, now = clock()
local p = cmsgpack.unpack(ARGV[1])
local owner, ttl, group, writes, acks = p[1], p[2], p[3], p[4], p[5]
local out = {}
for d = 1, #writes do
  local key, w = KEYS[d], writes[d]
  local h, pins = load(key)
  local changed = false
  out[d] = 0
  if h[2] == owner and h[5] == w[1] then
    -- the map is what the caller read under this lease: its merge stands
    if w[5] > 0 then
      pins = string.sub(ARGV[3], w[4] + 1, w[4] + w[5])
      h[5], h[6], changed = h[5] + 1, w[2], true
    end
  else
    local _, written = cmsgpack.unpack_one(ARGV[2], w[3])
    if next(written) then
      local map = cmsgpack.unpack(pins)
      for pin, ts in pairs(written) do
        local last = map[pin]
        if not last or ts > last then
          map[pin] = ts
          if ts > h[6] then h[6] = ts end
          changed = true
        end
      end
      if changed then pins, h[5] = cmsgpack.pack(map), h[5] + 1 end
    end
  end
  if h[2] == owner then
    h[1], h[2], changed = 0, '', true
    out[d] = 1
  end
  if changed then store(key, h, pins, now, ttl) end
end
for s = 1, #acks do
  local ids = acks[s]
  for i = 1, #ids, 1000 do
    redis.call('XACK', KEYS[#writes + s], group, unpack(ids, i, math.min(i + 999, #ids)))
  end
end
return out
"""

# KEYS = records, then the echo lists of every device in order; ARGV[1] = msgpack [owner,
# lease ms, ttl ms, rate interval µs, burst, [newest event ms per device], echo window ms,
# [[echo item, ...] per device], [offset in ARGV[2] per device]], ARGV[2] = msgpack {pin:
# newest event ms} of each device: a granted device's echo items are recorded (pipeline.echo)
# before its write is sent.
# Per device: {3} every value older than recorded (stale: nothing taken), {0, busy ms} another
# owner's live lease, {2, wait µs} rate-limited (nothing taken), {1, pin map, version} lease
# and one rate slot taken.
_PREPARE = _RECORD + GCRA_LUA + ECHO_RECORD_LUA + """
local now_us, now = clock()
local p = cmsgpack.unpack(ARGV[1])
local owner, lease_ms, ttl, interval, burst, devices = p[1], p[2], p[3], p[4], p[5], p[6]
local echo_window, echoes, offsets = p[7], p[8], p[9]
local echo_key = #devices
local out = {}
for d = 1, #devices do
  local key, w = KEYS[d], devices[d]
  local h, pins = load(key)
  local newer = w >= h[6]
  if not newer then
    local map = cmsgpack.unpack(pins)
    local _, newest = cmsgpack.unpack_one(ARGV[2], offsets[d])
    for pin, ts in pairs(newest) do
      local last = map[pin]
      if not last or ts >= last then
        newer = true
        break
      end
    end
  end
  local wait = busy(h, owner, now)
  if not newer then
    out[d] = {3}
  elseif wait > 0 then
    out[d] = {0, wait}
  else
    local rate_wait, tat = gcra(h[3], now_us, interval, burst, 1)
    if rate_wait > 0 then
      out[d] = {2, rate_wait}
    else
      h[1], h[2], h[3] = now + lease_ms, owner, tat
      store(key, h, pins, now, ttl)
      if echoes then
        for i, item in ipairs(echoes[d]) do
          echo_record(KEYS[echo_key + i], item, echo_window)
        end
      end
      out[d] = {1, pins, h[5]}
    end
  end
  if echoes then echo_key = echo_key + #echoes[d] end
end
return out
"""

# KEYS = records (one per request asked, repeats allowed); ARGV[1] = msgpack [interval µs,
# burst, ttl ms]. Per key: 0 (a request granted and counted) or µs to wait (nothing counted).
_TAKE = _RECORD + GCRA_LUA + """
local now_us, now = clock()
local p = cmsgpack.unpack(ARGV[1])
local interval, burst, ttl = p[1], p[2], p[3]
local out = {}
for d = 1, #KEYS do
  local h, pins = load(KEYS[d])
  local wait, tat = gcra(h[3], now_us, interval, burst, 1)
  if wait == 0 then
    h[3] = tat
    store(KEYS[d], h, pins, now, ttl)
  end
  out[d] = wait
end
return out
"""

# KEYS[1] = a record → its pin map.
_GET = _RECORD + """
local _, pins = load(KEYS[1])
return pins
"""

# KEYS = records; ARGV[1] = msgpack [ttl ms, [µs from now before the device's next request,
# per record]].
_DEFER = _RECORD + """
local now_us, now = clock()
local p = cmsgpack.unpack(ARGV[1])
local ttl, delays = p[1], p[2]
local out = {}
for d = 1, #KEYS do
  local h, pins = load(KEYS[d])
  if h[3] < now_us + delays[d] then
    h[3] = now_us + delays[d]
    store(KEYS[d], h, pins, now, ttl)
  end
  out[d] = 0
end
return out
"""


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer of :meth:`LastWritten.claim` for one device."""

    #: ``True``: this replica holds the lease and ``last`` is current.
    granted: bool
    #: Pin → event time (ms) of the value Blynk has; pins never written are absent.
    #: (:meth:`LastWritten.prepare`: every recorded pin of the device, not only those asked.)
    last: dict[str, int]
    #: When not granted: milliseconds until the other holder's lease expires at the latest.
    busy_ms: int = 0
    #: :meth:`LastWritten.prepare` only — not granted because the device's rate limit says
    #: wait this long (seconds; nothing was taken).
    wait_s: float = 0.0
    #: :meth:`LastWritten.prepare` only — not granted because every value is older than what
    #: Blynk has (stale; nothing was taken, nothing needs sending).
    stale: bool = False
    #: :meth:`LastWritten.prepare` only, when granted — the version of the record ``last`` was
    #: read from; given back to :meth:`LastWritten.commit_many` (``read``), the commit merges
    #: in Python instead of in the script. -1: unknown.
    version: int = -1


def _pins(raw: bytes) -> dict[str, int]:
    """A record's pin map (the scripts write an empty one as an empty array)."""
    pins = _unpack(raw)
    return pins if isinstance(pins, dict) else {}


class LastWritten:
    """Last written event time per device/pin, the per-device in-flight lease and rate limit."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        owner: str,
        *,
        lease_ms: int = 60_000,
        ttl_ms: int = DEFAULT_TTL_MS,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.owner = owner
        self.lease_ms = lease_ms
        self.ttl_ms = ttl_ms
        self._claim = redis.register_script(_CLAIM)
        self._commit = redis.register_script(_COMMIT)
        self._prepare = redis.register_script(_PREPARE)
        self._take = redis.register_script(_TAKE)
        self._defer = redis.register_script(_DEFER)
        self._get = redis.register_script(_GET)

    @property
    def _ttl(self) -> int:
        """How long a record lives after its last write or lease (at least one lease)."""
        return max(self.ttl_ms, self.lease_ms)

    async def _per_partition(self, script: Any, device_keys: Sequence[str],
                             call: Callable[[list[int]], tuple[list[str], list[bytes]]]
                             ) -> list[Any]:
        """One reply per device of ``script``: one call for all of them (one Redis), or one call
        per partition, pipelined (cluster layout: each call in its partition's slot).
        ``call(indices)`` gives the keys and arguments of the call for those devices."""
        if not self._keys.cluster:
            return list(await script(*call(list(range(len(device_keys))))))
        parts: dict[int, list[int]] = {}
        for i, device_key in enumerate(device_keys):
            parts.setdefault(self._keys.partition_of_device_key(device_key), []).append(i)
        async with self._redis.pipeline(transaction=False) as pipe:
            for idx in parts.values():
                await script(*call(idx), client=pipe)
            got = await pipe.execute()
        replies: list[Any] = [None] * len(device_keys)
        for idx, reply in zip(parts.values(), got, strict=True):
            for i, r in zip(idx, reply, strict=True):
                replies[i] = r
        return replies

    async def claim(self, devices: Sequence[tuple[str, Sequence[str]]]) -> list[Claim]:
        """Take the lease of each ``(device_key, pins)`` and read its pins (one round trip).

        Re-entrant: claiming a device this owner already holds renews the lease.
        """
        if not devices:
            return []
        lw = self._keys.last_written
        args = [_pack([self.owner, self.lease_ms, self._ttl])]

        def call(idx: list[int]) -> tuple[list[str], list[bytes]]:
            return [lw(devices[i][0]) for i in idx], args

        replies = await self._per_partition(self._claim, [d for d, _ in devices], call)
        claims: list[Claim] = []
        for (_, pins), reply in zip(devices, replies, strict=True):
            if int(reply[0]) == 0:
                claims.append(Claim(False, {}, int(reply[1])))
                continue
            recorded = _pins(reply[1])
            claims.append(Claim(True, {pin: recorded[pin] for pin in pins if pin in recorded}))
        return claims

    async def commit(self, device_key: str, written: Mapping[str, int]) -> bool:
        """Record ``written`` (pin → event time; only ever moves forward) and release the lease.

        Returns ``False`` when the lease was no longer ours (it expired mid-write).
        """
        (held,) = await self.commit_many([(device_key, written)])
        return held

    async def commit_many(self, items: Sequence[tuple[str, Mapping[str, int]]],
                          acks: Mapping[str, Sequence[str]] | None = None,
                          group: str = "",
                          read: Sequence[Claim | None] | None = None) -> list[bool]:
        """:meth:`commit` for many devices in one script call; an empty mapping only releases.

        ``acks`` (stream → entry ids) are acknowledged for ``group`` in the same call, after
        the records: a write's entries are acked exactly when what it wrote is recorded.
        (One call on one Redis; in the cluster layout one per partition, each in one slot.)
        ``read`` (one per item, optional): the granted :meth:`prepare` claim each write was
        sent under. While the record is still that version under this owner's lease, the
        merge computed here from its ``last`` is stored as is (the script decodes no pins).
        """
        if not items and not acks:
            return []
        reads: Sequence[Claim | None] = [None] * len(items) if read is None else read
        if not self._keys.cluster:
            keys, args = self._commit_call(items, reads, acks or {}, group)
            return [bool(r) for r in await self._commit(keys=keys, args=args)]
        # Cluster layout: one call per partition (a device's records and its writes stream
        # share the partition's hash tag), pipelined.
        parts: dict[int, tuple[list[int], dict[str, Sequence[str]]]] = {}
        for i, (device_key, _) in enumerate(items):
            parts.setdefault(self._keys.partition_of_device_key(device_key), ([], {}))[0].append(i)
        for stream, ids in (acks or {}).items():
            if ids:
                part = self._keys.partition_of_stream(stream) or 0
                parts.setdefault(part, ([], {}))[1][stream] = ids
        async with self._redis.pipeline(transaction=False) as pipe:
            for idx, part_acks in parts.values():
                keys, args = self._commit_call([items[i] for i in idx],
                                               [reads[i] for i in idx], part_acks, group)
                await self._commit(keys=keys, args=args, client=pipe)
            replies = await pipe.execute()
        held = [False] * len(items)
        for (idx, _), reply in zip(parts.values(), replies, strict=True):
            for i, r in zip(idx, reply, strict=True):
                held[i] = bool(r)
        return held

    def _commit_call(self, items: Sequence[tuple[str, Mapping[str, int]]],
                     reads: Sequence[Claim | None],
                     acks: Mapping[str, Sequence[str]], group: str
                     ) -> tuple[list[str], list[bytes]]:
        """Keys and arguments of one ``_COMMIT`` call."""
        lw = self._keys.last_written
        keys = [lw(device_key) for device_key, _ in items]
        writes: list[tuple[int, int, int, int, int]] = []
        written_maps = bytearray()
        merged_maps = bytearray()
        for (_, written), claim in zip(items, reads, strict=True):
            at = len(written_maps)
            written_maps += _pack(written)
            if claim is None or claim.version < 0:
                writes.append((-1, 0, at, 0, 0))
                continue
            merged = dict(claim.last)
            changed = False
            for pin, ts in written.items():
                last = merged.get(pin)
                if last is None or ts > last:
                    merged[pin] = ts
                    changed = True
            start = len(merged_maps)
            if changed:
                merged_maps += _pack(merged)
            writes.append((claim.version, max(merged.values(), default=-1), at, start,
                           len(merged_maps) - start))
        streams: list[list[str]] = []
        for stream, ids in acks.items():
            if ids:
                keys.append(stream)
                streams.append(list(ids))
        return keys, [_pack([self.owner, self._ttl, group, writes, streams]),
                      bytes(written_maps), bytes(merged_maps)]

    async def prepare(self, devices: Sequence[tuple[str, Mapping[str, int]]],
                      limiter: RateLimiter, *,
                      echoes: Sequence[Sequence[tuple[str, str]]] | None = None,
                      echo_window_ms: int = 0) -> list[Claim]:
        """Everything a flush asks before sending, for all its devices in one script call.

        ``devices`` are ``(device_key, pin → newest event time to send)``. Per device, in this
        order: every value older than recorded → ``Claim(stale=True)`` (nothing taken); another
        owner's live lease → ``busy_ms``; the device's rate limit (``limiter``'s rate and
        burst, kept in the device's record) says wait → ``wait_s`` (nothing taken); else the
        lease and one request are taken and ``last`` is read (``granted``). Re-entrant like
        :meth:`claim`.

        ``echoes`` (one list per device of :func:`pipeline.echo.records`): recorded for the
        granted devices only, in the same call — the echo records of the writes about to be
        sent cost no round trip of their own, and a device not written now records nothing.
        """
        if not devices:
            return []
        def call(idx: list[int]) -> tuple[list[str], list[bytes]]:
            # On a cluster, echo lists carry the partition of the device key that records
            # them (pipeline.echo.records): each device's go with it.
            return self._prepare_call([devices[i] for i in idx], limiter,
                                      None if echoes is None else [echoes[i] for i in idx],
                                      echo_window_ms)

        replies = await self._per_partition(self._prepare, [d for d, _ in devices], call)
        claims: list[Claim] = []
        for reply in replies:
            code = int(reply[0])
            if code == 1:
                claims.append(Claim(True, _pins(reply[1]), version=int(reply[2])))
            elif code == 0:
                claims.append(Claim(False, {}, int(reply[1])))
            elif code == 2:
                claims.append(Claim(False, {}, wait_s=int(reply[1]) / 1_000_000))
            else:
                claims.append(Claim(False, {}, stale=True))
        return claims

    def _prepare_call(self, devices: Sequence[tuple[str, Mapping[str, int]]],
                      limiter: RateLimiter,
                      echoes: Sequence[Sequence[tuple[str, str]]] | None,
                      echo_window_ms: int) -> tuple[list[str], list[bytes]]:
        """Keys and arguments of one ``_PREPARE`` call."""
        lw = self._keys.last_written
        keys: list[str] = []
        per_device: list[int] = []
        offsets: list[int] = []
        maps = bytearray()
        for device_key, newest in devices:
            keys.append(lw(device_key))
            per_device.append(max(newest.values(), default=-2))
            offsets.append(len(maps))
            maps += _pack(newest)
        items: list[list[str]] | None = None
        if echoes is not None:
            items = []
            for records in echoes:
                keys += (key for key, _ in records)
                items.append([text for _, text in records])
        return keys, [_pack([self.owner, self.lease_ms, self._ttl, limiter.interval_us,
                             limiter.burst, per_device, echo_window_ms, items, offsets]),
                      bytes(maps)]

    async def take(self, device_keys: Sequence[str], limiter: RateLimiter) -> list[float]:
        """One request of each device's rate limit (the extra requests of a write: history
        uploads, isolating a bad pin): ``0.0`` = granted and counted, else seconds to wait
        (nothing counted). A device listed twice asks for two requests."""
        if not device_keys:
            return []
        lw = self._keys.last_written

        def call(idx: list[int]) -> tuple[list[str], list[bytes]]:
            return ([lw(device_keys[i]) for i in idx],
                    [_pack([limiter.interval_us, limiter.burst, self._ttl])])

        return [int(r) / 1_000_000 for r in
                await self._per_partition(self._take, device_keys, call)]

    async def defer_many(self, items: Sequence[tuple[str, float]]) -> None:
        """No request of each ``(device_key, seconds)`` for that long from now, on any replica
        (a 429: its ``Retry-After`` is about the device's budget)."""
        if not items:
            return
        lw = self._keys.last_written

        def call(idx: list[int]) -> tuple[list[str], list[bytes]]:
            return ([lw(items[i][0]) for i in idx],
                    [_pack([self._ttl, [max(0, int(items[i][1] * 1_000_000)) for i in idx]])])

        await self._per_partition(self._defer, [k for k, _ in items], call)

    async def release(self, device_keys: Sequence[str]) -> None:
        """Give up the leases of devices whose write did not happen (nothing recorded)."""
        await self.commit_many([(key, {}) for key in device_keys])

    async def get(self, device_key: str) -> dict[str, int]:
        """Every recorded pin of a device (for tests and the CLI)."""
        return _pins(await self._get(keys=[self._keys.last_written(device_key)]))
