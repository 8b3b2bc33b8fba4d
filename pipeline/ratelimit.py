"""Request rate limits shared by every replica: GCRA in Redis (one Lua call per batch).

Replicas share one budget per name through a key ``keys.rate(name)`` holding its *theoretical
arrival time* (TAT, µs) of the generic cell rate algorithm (blynk-sessions' connects;
provisioning runs :data:`GCRA_TAKE_LUA` in its own script). The scripts read the clock with
``TIME`` on the Redis server, so replicas with skewed clocks still share one timeline.
Egress's per-device budget (Blynk allows 50 requests per second per device) runs the same
algorithm, :func:`gcra`, in the memory of the device's one writer (the owner of its writes
partition), on a TAT kept in the device's record (:mod:`pipeline.order`).

* :meth:`RateLimiter.take` asks for one request for each of many devices in one script call;
  each answer is ``0.0`` (granted and counted) or the seconds to wait before asking again
  (nothing counted).
* :meth:`RateLimiter.acquire` waits for one request.

Redis errors propagate (``RedisError``): callers treat them as retryable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from pipeline.keys import Keys
from pipeline.streams import Redis

#: GCRA on a TAT value, as a pure Lua function (the base of :data:`GCRA_TAKE_LUA`; egress runs
#: :func:`gcra` in Python on the TAT in each device's record, :mod:`pipeline.order`):
#: ``gcra(tat_us, now_us, interval_us, burst, n)`` → 0 and the new TAT (granted), or the µs to
#: wait and the TAT unchanged.
GCRA_LUA = """
local function gcra(tat, now, interval, burst, n)
  if tat < now then tat = now end
  local new_tat = tat + n * interval
  local allow_at = new_tat - burst * interval
  if allow_at > now then
    return allow_at - now, tat
  end
  return 0, new_tat
end
"""



def gcra(tat: int, now: int, interval: int, burst: int, n: int = 1) -> tuple[int, int]:
    """:data:`GCRA_LUA` in Python: ``(0, new TAT)`` granted, or ``(µs to wait, TAT)``."""
    tat = max(tat, now)
    new_tat = tat + n * interval
    allow_at = new_tat - burst * interval
    if allow_at > now:
        return allow_at - now, tat
    return 0, new_tat


#: GCRA on a rate key: ``gcra_take(key, now_us, interval_us, burst, n)`` → 0 (granted and
#: counted) or µs to wait.
GCRA_TAKE_LUA = GCRA_LUA + """
local function gcra_take(key, now, interval, burst, n)
  local wait, new_tat = gcra(tonumber(redis.call('GET', key) or '0'), now, interval, burst, n)
  if wait > 0 then
    return wait
  end
  redis.call('SET', key, string.format('%.0f', new_tat), 'PX',
             math.floor((new_tat - now) / 1000) + 1)
  return 0
end
"""

# KEYS = rate keys (one per request asked, repeats allowed); ARGV = interval µs, burst
_TAKE = GCRA_TAKE_LUA + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local out = {}
for i = 1, #KEYS do
  out[i] = gcra_take(KEYS[i], now, interval, burst, 1)
end
return out
"""


class RateLimiter:
    """At most ``rps`` requests per second per device across all replicas (burst ``burst``).

    With ``burst=1`` requests of one device are spaced by at least ``1/rps`` seconds, so no
    one-second window holds more than ``rps`` of them.
    """

    def __init__(self, redis: Redis, keys: Keys, rps: float, *, burst: int = 1) -> None:
        if rps <= 0 or burst < 1:
            raise ValueError("rps must be > 0 and burst >= 1")
        self._redis = redis
        self._keys = keys
        self.rps = rps
        self.burst = burst
        self.interval_us = int(1_000_000 / rps)
        self._take = redis.register_script(_TAKE)

    async def take(self, device_keys: Sequence[str]) -> list[float]:
        """One request for each device: ``0.0`` = granted now, else seconds to wait first.

        One script call for all of them (a device listed twice asks for two requests).
        """
        if not device_keys:
            return []
        rate = self._keys.rate
        if not self._keys.cluster:
            replies = await self._take(keys=[rate(k) for k in device_keys],
                                       args=[self.interval_us, self.burst])
            return [int(r) / 1_000_000 for r in replies]
        # Cluster layout: one call per partition (one slot each), pipelined.
        parts: dict[int, list[int]] = {}
        for i, k in enumerate(device_keys):
            parts.setdefault(self._keys.partition_of_device_key(k), []).append(i)
        async with self._redis.pipeline(transaction=False) as pipe:
            for idx in parts.values():
                await self._take(keys=[rate(device_keys[i]) for i in idx],
                                 args=[self.interval_us, self.burst], client=pipe)
            got = await pipe.execute()
        out = [0.0] * len(device_keys)
        for idx, reply in zip(parts.values(), got, strict=True):
            for i, r in zip(idx, reply, strict=True):
                out[i] = int(r) / 1_000_000
        return out

    async def acquire(self, device_key: str) -> None:
        """Wait until one request of ``device_key`` may go, and count it."""
        while True:
            (wait,) = await self.take([device_key])
            if wait <= 0:
                return
            # Pacing: the wait is the exact time to the next free slot, not a guess.
            await asyncio.sleep(wait)
