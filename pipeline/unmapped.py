"""Decoded keys with no datastream, counted per template — bounded in memory and in Redis.

Keys that a template does not map are not dropped silently: :class:`UnmappedKeys` counts them in
``bb_unmapped_keys_total{template}`` and in the Redis hash ``keys.unmapped(template)`` (key →
count; ``blynk-bridge status`` shows it). A sender controls those keys, so both stores are
bounded:

* at most ``max_keys`` distinct keys per template — in the process between flushes and in the
  hash; the counts of further keys go to the field :data:`OTHER`, so the hash's counts still
  add up to every unmapped key seen;
* a key is stored by its first :data:`KEY_CHARS` characters;
* the hash expires ``ttl_s`` after the last flush that touched it.

:meth:`UnmappedKeys.flush` writes everything counted in one script call per flush; a Redis
error keeps the counts for the next flush (statistics, never a reason to fail a batch).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from redis.exceptions import RedisError

from pipeline import metrics
from pipeline.keys import Keys
from pipeline.streams import Redis

log = logging.getLogger("blynk_bridge.unmapped")

#: The field that counts the keys past a template's ``max_keys``.
OTHER = "(other keys)"
KEY_CHARS = 200

# KEYS = one hash per template; ARGV = max keys, ttl s, OTHER, then per hash: n, n (key, count)
_FLUSH = """
local cap, ttl, other, a = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], 4
for i = 1, #KEYS do
  local h, n = KEYS[i], tonumber(ARGV[a])
  a = a + 1
  for j = 1, n do
    local k, c = ARGV[a], tonumber(ARGV[a + 1])
    a = a + 2
    if redis.call('HEXISTS', h, k) == 0 and redis.call('HLEN', h) >= cap then
      k = other
    end
    redis.call('HINCRBY', h, k, c)
  end
  redis.call('EXPIRE', h, ttl)
end
return 0
"""


class UnmappedKeys:
    """Counts unmapped keys per template (module docstring); not safe across threads."""

    def __init__(self, redis: Redis, keys: Keys, *, max_keys: int, ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self.max_keys = max(1, max_keys)
        self.ttl_s = ttl_s
        self._flush = redis.register_script(_FLUSH)
        self._counts: dict[str, Counter[str]] = {}

    def __bool__(self) -> bool:
        return bool(self._counts)

    def add(self, template: str, keys: Iterable[str]) -> None:
        """Count one occurrence of each key for ``template``."""
        counts = self._counts.get(template)
        if counts is None:
            counts = self._counts[template] = Counter()
        for k in keys:
            if k not in counts:
                if len(k) > KEY_CHARS:
                    k = k[:KEY_CHARS]
                if k not in counts and len(counts) >= self.max_keys:
                    k = OTHER
            counts[k] += 1

    async def flush(self) -> None:
        """Add what was counted since the last flush to Redis and the metric."""
        counts, self._counts = self._counts, {}
        if not counts:
            return
        # One hash per call (one slot: Redis Cluster), pipelined: one round trip either way.
        calls: list[tuple[str, list[str | int]]] = []
        for tname, c in counts.items():
            args: list[str | int] = [self.max_keys, self.ttl_s, OTHER, len(c)]
            for k, n in c.items():
                args.extend((k, n))
            calls.append((self._keys.unmapped(tname), args))
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key, args in calls:
                    await self._flush(keys=[key], args=args, client=pipe)
                await pipe.execute()
        except RedisError as exc:  # statistics only: keep them for the next flush
            for tname, c in counts.items():
                self.add_counts(tname, c)
            log.warning("could not record unmapped keys: %s", exc)
            return
        for tname, c in counts.items():
            metrics.UNMAPPED.labels(tname).inc(c.total())

    def add_counts(self, template: str, counts: Counter[str]) -> None:
        """Put counts back (a failed flush), keeping the bound."""
        mine = self._counts.setdefault(template, Counter())
        for k, n in counts.items():
            if k not in mine and len(mine) >= self.max_keys:
                k = OTHER
            mine[k] += n
