"""Event-time order across batches and replicas: the last written time per device/pin in Redis.

``keys.last_written(device_key)`` is a hash ``pin → event time (ms)`` of the newest value Blynk
has for that pin, plus one field ``~lease`` (``"<expires_ms>|<owner>"``): the device's in-flight
lease. Both live in one key. The per-flush scripts (:meth:`LastWritten.prepare`,
:meth:`LastWritten.commit_many`) touch the keys of many devices in one call on one Redis; in
the cluster layout (:attr:`pipeline.keys.Keys.cluster`) they run once per partition, pipelined,
each call in its partition's slot.

The protocol of one device write (egress):

1. :meth:`LastWritten.claim` — atomically take the device's lease and read the last written times
   of its pins. If another replica holds a live lease, nothing is taken: the caller keeps the
   entries and tries again shortly. Egress uses :meth:`LastWritten.prepare`, which does the
   same for every device of a flush in one script call, and also skips devices whose every
   value is older than recorded and takes each device's rate-limit slot (:mod:`pipeline.ratelimit`).
2. Drop what is older (:func:`pipeline.coalesce.drop_stale`: equal event times are applied in
   arrival order), send the rest to Blynk.
3. After the 2xx, :meth:`LastWritten.commit` — record ``max(old, new)`` per pin and release the
   lease (:meth:`LastWritten.commit_many` also acks the written entries in the same call).
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

Records expire ``ttl_ms`` after a device's last write (default 31 days: Blynk refuses timestamped
points older than a month, and no redelivery lives that long; only a manual ``replay`` of an older
dead letter could then write an older value).

Redis errors propagate (``RedisError``); callers treat them as retryable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import msgspec

from pipeline.echo import RECORD_LUA as ECHO_RECORD_LUA
from pipeline.keys import Keys
from pipeline.ratelimit import GCRA_TAKE_LUA, RateLimiter
from pipeline.streams import Redis

LEASE_FIELD = "~lease"
_pack = msgspec.msgpack.Encoder().encode
DEFAULT_TTL_MS = 31 * 24 * 3600 * 1000

# KEYS[1] = last-written hash; ARGV = owner, lease ms, ttl ms, pins...
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = redis.call('HGET', KEYS[1], '~lease')
if lease then
  local sep = string.find(lease, '|', 1, true)
  local expires = tonumber(string.sub(lease, 1, sep - 1))
  if string.sub(lease, sep + 1) ~= ARGV[1] and expires > now then
    return {0, tostring(expires - now)}
  end
end
local expires = string.format('%.0f', now + tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], '~lease', expires .. '|' .. ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local out = {1}
for i = 4, #ARGV do
  out[#out + 1] = redis.call('HGET', KEYS[1], ARGV[i]) or ''
end
return out
"""

# Per-flush scripts take their arguments as one msgpack blob (ARGV[1]): redis-py packs each
# argument in Python, msgpack packs a whole flush's values in C.

# KEYS = last-written hashes, then streams; ARGV[1] = msgpack [owner, ttl ms, group,
# [[pin, event ms, ...] per hash], [[entry id, ...] per stream]] (XACKed in the same call)
_COMMIT = """
local p = cmsgpack.unpack(ARGV[1])
local owner, ttl, group, writes, acks = p[1], p[2], p[3], p[4], p[5]
local out = {}
for d = 1, #writes do
  local lw, w = KEYS[d], writes[d]
  for i = 1, #w, 2 do
    local last = tonumber(redis.call('HGET', lw, w[i]) or '-1')
    if w[i + 1] > last then
      redis.call('HSET', lw, w[i], string.format('%.0f', w[i + 1]))
    end
  end
  local held = 0
  local lease = redis.call('HGET', lw, '~lease')
  if lease then
    local sep = string.find(lease, '|', 1, true)
    if string.sub(lease, sep + 1) == owner then
      redis.call('HDEL', lw, '~lease')
      held = 1
    end
  end
  if #w > 0 then
    redis.call('PEXPIRE', lw, ttl)
  end
  out[d] = held
end
for s = 1, #acks do
  local ids = acks[s]
  for i = 1, #ids, 1000 do
    redis.call('XACK', KEYS[#writes + s], group, unpack(ids, i, math.min(i + 999, #ids)))
  end
end
return out
"""

# KEYS = last-written hash, rate key for each device, then the echo lists of every device in
# order; ARGV[1] = msgpack [owner, lease ms, ttl ms, rate interval µs, burst,
# [[pin, newest event ms, ...] per device], echo window ms, [[echo item, ...] per device]]:
# a granted device's echo items are recorded (pipeline.echo) before its write is sent.
# Per device: {3} every value older than recorded (stale: nothing taken), {0, busy ms} another
# owner's live lease, {2, wait µs} rate-limited (nothing taken), {1, last...} lease and one
# rate slot taken, last written time per pin ('' = never written).
_PREPARE = GCRA_TAKE_LUA + ECHO_RECORD_LUA + """
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(now_us / 1000)
local p = cmsgpack.unpack(ARGV[1])
local owner, lease_ms, ttl, interval, burst, devices = p[1], p[2], p[3], p[4], p[5], p[6]
local echo_window, echoes = p[7], p[8]
local echo_key = 2 * #devices
local out = {}
for d = 1, #devices do
  local lw, w = KEYS[2 * d - 1], devices[d]
  local n = #w / 2
  local fields = {'~lease'}
  for i = 1, n do
    fields[i + 1] = w[2 * i - 1]
  end
  local got = redis.call('HMGET', lw, unpack(fields))
  local reply = {1}
  local newer = false
  for i = 1, n do
    local last = got[i + 1]
    if last then
      reply[i + 1] = last
      if w[2 * i] >= tonumber(last) then newer = true end
    else
      reply[i + 1] = ''
      newer = true
    end
  end
  local lease = got[1]
  local busy = 0
  if lease then
    local sep = string.find(lease, '|', 1, true)
    local expires = tonumber(string.sub(lease, 1, sep - 1))
    if string.sub(lease, sep + 1) ~= owner and expires > now then busy = expires - now end
  end
  if not newer then
    out[d] = {3}
  elseif busy > 0 then
    out[d] = {0, busy}
  else
    local wait = gcra_take(KEYS[2 * d], now_us, interval, burst, 1)
    if wait > 0 then
      out[d] = {2, wait}
    else
      redis.call('HSET', lw, '~lease', string.format('%.0f', now + lease_ms) .. '|' .. owner)
      redis.call('PEXPIRE', lw, ttl)
      if echoes then
        for i, item in ipairs(echoes[d]) do
          echo_record(KEYS[echo_key + i], item, echo_window)
        end
      end
      out[d] = reply
    end
  end
  if echoes then echo_key = echo_key + #echoes[d] end
end
return out
"""


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer of :meth:`LastWritten.claim` for one device."""

    #: ``True``: this replica holds the lease and ``last`` is current.
    granted: bool
    #: Pin → event time (ms) of the value Blynk has; pins never written are absent.
    last: dict[str, int]
    #: When not granted: milliseconds until the other holder's lease expires at the latest.
    busy_ms: int = 0
    #: :meth:`LastWritten.prepare` only — not granted because the device's rate limit says
    #: wait this long (seconds; nothing was taken).
    wait_s: float = 0.0
    #: :meth:`LastWritten.prepare` only — not granted because every value is older than what
    #: Blynk has (stale; nothing was taken, nothing needs sending).
    stale: bool = False


class LastWritten:
    """Last written event time per device/pin, and the per-device in-flight lease."""

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

    async def claim(self, devices: Sequence[tuple[str, Sequence[str]]]) -> list[Claim]:
        """Take the lease of each ``(device_key, pins)`` and read its pins (one round trip).

        Re-entrant: claiming a device this owner already holds renews the lease.
        """
        if not devices:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for device_key, pins in devices:
                await self._claim(
                    keys=[self._keys.last_written(device_key)],
                    args=[self.owner, self.lease_ms, max(self.ttl_ms, self.lease_ms), *pins],
                    client=pipe,
                )
            replies = await pipe.execute()
        claims: list[Claim] = []
        for (_, pins), reply in zip(devices, replies, strict=True):
            if int(reply[0]) == 0:
                claims.append(Claim(False, {}, int(reply[1])))
                continue
            last = {pin: int(v) for pin, v in zip(pins, reply[1:], strict=True) if v}
            claims.append(Claim(True, last))
        return claims

    async def commit(self, device_key: str, written: Mapping[str, int]) -> bool:
        """Record ``written`` (pin → event time; only ever moves forward) and release the lease.

        Returns ``False`` when the lease was no longer ours (it expired mid-write).
        """
        (held,) = await self.commit_many([(device_key, written)])
        return held

    async def commit_many(self, items: Sequence[tuple[str, Mapping[str, int]]],
                          acks: Mapping[str, Sequence[str]] | None = None,
                          group: str = "") -> list[bool]:
        """:meth:`commit` for many devices in one script call; an empty mapping only releases.

        ``acks`` (stream → entry ids) are acknowledged for ``group`` in the same call, after
        the records: a write's entries are acked exactly when what it wrote is recorded.
        (One call on one Redis; in the cluster layout one per partition, each in one slot.)
        """
        if not items and not acks:
            return []
        if not self._keys.cluster:
            keys, args = self._commit_call(items, acks or {}, group)
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
                keys, args = self._commit_call([items[i] for i in idx], part_acks, group)
                await self._commit(keys=keys, args=args, client=pipe)
            replies = await pipe.execute()
        held = [False] * len(items)
        for (idx, _), reply in zip(parts.values(), replies, strict=True):
            for i, r in zip(idx, reply, strict=True):
                held[i] = bool(r)
        return held

    def _commit_call(self, items: Sequence[tuple[str, Mapping[str, int]]],
                     acks: Mapping[str, Sequence[str]], group: str
                     ) -> tuple[list[str], list[bytes]]:
        """Keys and arguments of one ``_COMMIT`` call."""
        lw = self._keys.last_written
        keys = [lw(device_key) for device_key, _ in items]
        writes: list[list[str | int]] = []
        for _, written in items:
            flat: list[str | int] = []
            for pin, ts in written.items():
                flat += (pin, ts)
            writes.append(flat)
        streams: list[list[str]] = []
        for stream, ids in acks.items():
            if ids:
                keys.append(stream)
                streams.append(list(ids))
        return keys, [_pack([self.owner, self.ttl_ms, group, writes, streams])]

    async def prepare(self, devices: Sequence[tuple[str, Mapping[str, int]]],
                      limiter: RateLimiter, *,
                      echoes: Sequence[Sequence[tuple[str, str]]] | None = None,
                      echo_window_ms: int = 0) -> list[Claim]:
        """Everything a flush asks before sending, for all its devices in one script call.

        ``devices`` are ``(device_key, pin → newest event time to send)``. Per device, in this
        order: every value older than recorded → ``Claim(stale=True)`` (nothing taken); another
        owner's live lease → ``busy_ms``; the rate limit says wait → ``wait_s`` (nothing
        taken); else the lease and one request of ``limiter`` are taken and ``last`` is read
        (``granted``). Re-entrant like :meth:`claim`.

        ``echoes`` (one list per device of :func:`pipeline.echo.records`): recorded for the
        granted devices only, in the same call — the echo records of the writes about to be
        sent cost no round trip of their own, and a device not written now records nothing.
        """
        if not devices:
            return []
        if not self._keys.cluster:
            keys, args = self._prepare_call(devices, limiter, echoes, echo_window_ms)
            replies = await self._prepare(keys=keys, args=args)
        else:
            parts: dict[int, list[int]] = {}
            for i, (device_key, _) in enumerate(devices):
                parts.setdefault(self._keys.partition_of_device_key(device_key), []).append(i)
            async with self._redis.pipeline(transaction=False) as pipe:
                for idx in parts.values():
                    # Echo lists carry the partition of the device key that records them
                    # (pipeline.echo.records): each device's go with it.
                    keys, args = self._prepare_call(
                        [devices[i] for i in idx], limiter,
                        None if echoes is None else [echoes[i] for i in idx], echo_window_ms)
                    await self._prepare(keys=keys, args=args, client=pipe)
                got = await pipe.execute()
            replies = [None] * len(devices)
            for idx, reply in zip(parts.values(), got, strict=True):
                for i, r in zip(idx, reply, strict=True):
                    replies[i] = r
        claims: list[Claim] = []
        for (_, newest), reply in zip(devices, replies, strict=True):
            code = int(reply[0])
            if code == 1:
                claims.append(Claim(True, {pin: int(v) for pin, v in
                                           zip(newest, reply[1:], strict=True) if v}))
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
        lw, rate = self._keys.last_written, self._keys.rate
        keys: list[str] = []
        per_device: list[list[str | int]] = []
        for device_key, newest in devices:
            keys += (lw(device_key), rate(device_key))
            flat: list[str | int] = []
            for pin, ts in newest.items():
                flat += (pin, ts)
            per_device.append(flat)
        items: list[list[str]] | None = None
        if echoes is not None:
            items = []
            for records in echoes:
                keys += (key for key, _ in records)
                items.append([text for _, text in records])
        return keys, [_pack([self.owner, self.lease_ms, max(self.ttl_ms, self.lease_ms),
                             limiter.interval_us, limiter.burst, per_device, echo_window_ms,
                             items])]

    async def release(self, device_keys: Sequence[str]) -> None:
        """Give up the leases of devices whose write did not happen (nothing recorded)."""
        await self.commit_many([(key, {}) for key in device_keys])

    async def get(self, device_key: str) -> dict[str, int]:
        """Every recorded pin of a device (for tests and the CLI)."""
        raw = await self._redis.hgetall(self._keys.last_written(device_key))
        return {
            (k.decode() if isinstance(k, bytes) else str(k)): int(v)
            for k, v in raw.items()
            if k not in (LEASE_FIELD, LEASE_FIELD.encode())
        }
