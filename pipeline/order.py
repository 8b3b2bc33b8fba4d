"""Event-time order across batches and replicas: the last written time per device/pin in Redis.

``keys.last_written(device_key)`` is a hash ``pin → event time (ms)`` of the newest value Blynk
has for that pin, plus one field ``~lease`` (``"<expires_ms>|<owner>"``): the device's in-flight
lease. Both live in one key so each script touches one key (Redis Cluster safe).

The protocol of one device write (egress):

1. :meth:`LastWritten.claim` — atomically take the device's lease and read the last written times
   of its pins. If another replica holds a live lease, nothing is taken: the caller keeps the
   entries and tries again shortly.
2. Drop what is not newer (:func:`pipeline.coalesce.drop_stale`), send the rest to Blynk.
3. After the 2xx, :meth:`LastWritten.commit` — record ``max(old, new)`` per pin and release the
   lease. After a failure, :meth:`LastWritten.release`.

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

from pipeline.keys import Keys
from pipeline.streams import Redis

LEASE_FIELD = "~lease"
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

# KEYS[1] = last-written hash; ARGV = owner, ttl ms, then pin, event ms pairs
_COMMIT = """
for i = 3, #ARGV, 2 do
  local last = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '-1')
  if tonumber(ARGV[i + 1]) > last then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
local held = 0
local lease = redis.call('HGET', KEYS[1], '~lease')
if lease then
  local sep = string.find(lease, '|', 1, true)
  if string.sub(lease, sep + 1) == ARGV[1] then
    redis.call('HDEL', KEYS[1], '~lease')
    held = 1
  end
end
if #ARGV > 2 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return held
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

    async def commit_many(self, items: Sequence[tuple[str, Mapping[str, int]]]) -> list[bool]:
        """:meth:`commit` for many devices in one round trip; an empty mapping only releases."""
        if not items:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for device_key, written in items:
                args: list[str | int] = [self.owner, self.ttl_ms]
                for pin, ts in written.items():
                    args += [pin, ts]
                await self._commit(keys=[self._keys.last_written(device_key)], args=args,
                                   client=pipe)
            replies = await pipe.execute()
        return [bool(r) for r in replies]

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
