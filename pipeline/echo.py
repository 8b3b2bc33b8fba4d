"""Echo suppression: a Blynk webhook fired by the bridge's *own* uplink write is not a command.

Blynk fires "Device Datastream Update" webhooks for device writes too, so every value egress
writes to a watched pin comes back through ``POST /blynk/…``; sent down, it would loop.
Egress calls :func:`record` before it sends a write (so the record always precedes the webhook);
the downlink stage calls :func:`take` for each command. A command is an echo when the bridge
wrote the same value (compared by :func:`canonical`) to the same device and pin within
``window_ms``; each record answers one echo (it is removed), so a user who sets the same value
again later is heard.

One Redis list per device and pin (``keys.echo``) of ``<written ms>|<value>``, newest first, at
most :data:`KEEP` long, expiring ``window_ms`` after the last write.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pipeline.events import Value
from pipeline.keys import Keys
from pipeline.streams import Redis

#: Records kept per device and pin (Blynk drops webhooks past 10/min, so some are never
#: answered; they age out of the window or fall off the end).
KEEP = 32

_TAKE = """
local floor = tonumber(ARGV[2]) - tonumber(ARGV[3])
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for _, item in ipairs(items) do
  local sep = string.find(item, '|', 1, true)
  if sep and string.sub(item, sep + 1) == ARGV[1]
      and tonumber(string.sub(item, 1, sep - 1)) >= floor then
    redis.call('LREM', KEYS[1], 1, item)
    return 1
  end
end
return 0
"""


def canonical(value: Value) -> str:
    """One text per value whatever its spelling: ``1``, ``1.0``, ``"1"`` and ``True`` are the
    same; a location is ``lon,lat``; other text is itself."""
    if isinstance(value, list):
        return ",".join(canonical(v) for v in value)
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 2**53:
            return str(int(value))
        return repr(value)
    if value is None:
        return ""
    text = value.strip()
    if "," in text:
        parts = text.split(",")
        if len(parts) == 2:
            try:
                return ",".join(canonical(float(p)) for p in parts)
            except ValueError:
                return value
    try:
        number = float(text)
    except ValueError:
        return value
    return canonical(number) if math.isfinite(number) else value


async def record(redis: Redis, keys: Keys, writes: Sequence[tuple[str, Mapping[str, Value]]],
                 now_ms: int, window_ms: int) -> None:
    """Remember each ``(device_key, pin → value)`` about to be written (one round trip)."""
    if not writes:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for device_key, pins in writes:
            for pin, value in pins.items():
                key = keys.echo(device_key, pin.upper())
                pipe.lpush(key, f"{now_ms}|{canonical(value)}")
                pipe.ltrim(key, 0, KEEP - 1)
                pipe.pexpire(key, window_ms)
        await pipe.execute()


class Echoes:
    """The downlink stage's side: is a command an echo of an uplink write?"""

    def __init__(self, redis: Redis, keys: Keys, window_ms: int) -> None:
        self._redis = redis
        self._keys = keys
        self.window_ms = window_ms
        self._take = redis.register_script(_TAKE)

    async def take(self, commands: Sequence[tuple[str, str, Value]], now_ms: int) -> list[bool]:
        """For each ``(device_key, pin, value)``: was it an echo (its record is consumed)."""
        if not commands:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for device_key, pin, value in commands:
                await self._take(keys=[self._keys.echo(device_key, pin)],
                                 args=[canonical(value), now_ms, self.window_ms], client=pipe)
            replies = await pipe.execute()
        return [bool(int(r)) for r in replies]
