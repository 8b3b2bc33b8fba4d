"""Echo suppression: a Blynk webhook fired by the bridge's *own* uplink write is not a command.

Blynk fires "Device Datastream Update" webhooks for device writes too, so every value egress
writes to a watched pin comes back through ``POST /blynk/…``; sent down, it would loop.
Egress records each write before it sends it (so the record always precedes the webhook): one
script call per flush for the devices it is about to write (:func:`record`; one per partition
in the cluster layout), only when Blynk webhooks are configured. The downlink stage
queues :meth:`Echoes.queue_take` for a whole batch in its own pipeline (one script call; one
per partition on a cluster, below).
A command is an echo when the bridge
wrote the same value (compared by :func:`canonical`) to the same Blynk device and pin within
``window_ms``; each record answers one echo (it is removed), so a user who sets the same value
again later is heard.

Records are keyed by the Blynk device as Blynk names it — its token — not by the bridge's
device key: the writes of a device whose uplinks carry their own token (the Particle
blueprint's ``t``) are keyed apart from its registry row, or have no row at all, and their
echoes must still be recognised.

One Redis list per Blynk device and pin (``keys.echo``, the token hashed by
:func:`pipeline.blynk_index.token_ref`) of ``<written ms>|<value>``, newest first, at most
:data:`KEEP` long, expiring ``window_ms`` after the last write.

In the cluster layout (:attr:`pipeline.keys.Keys.cluster`) a list carries the hash tag of the
partition of the device key that wrote it (egress records per partition), and
the check runs one script call per partition, pipelined: a command of a resolved device is
looked for in its device's partition; one whose token has no registry row (the writer's
device key is unknown here) in every partition.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from redis.asyncio.client import Pipeline

from pipeline.blynk_index import token_ref
from pipeline.events import Value
from pipeline.keys import Keys
from pipeline.streams import Redis

#: Records kept per device and pin (Blynk drops webhooks past 10/min, so some are never
#: answered; they age out of the window or fall off the end).
KEEP = 32

# KEYS = one echo list per command; ARGV = now ms, window ms, then one canonical value per key.
# Returns 1 (an echo: its record consumed) or 0 per key.
_TAKE = """
local floor = tonumber(ARGV[1]) - tonumber(ARGV[2])
local out = {}
for k = 1, #KEYS do
  out[k] = 0
  local want = ARGV[k + 2]
  local items = redis.call('LRANGE', KEYS[k], 0, -1)
  for _, item in ipairs(items) do
    local sep = string.find(item, '|', 1, true)
    if sep and string.sub(item, sep + 1) == want
        and tonumber(string.sub(item, 1, sep - 1)) >= floor then
      redis.call('LREM', KEYS[k], 1, item)
      out[k] = 1
      break
    end
  end
end
return out
"""

# KEYS = echo lists; ARGV = window ms, then one item (:func:`item`) per key: each recorded on
# its list, the list kept at KEEP and expiring after the window.
_RECORD = f"""
local window = tonumber(ARGV[1])
for k = 1, #KEYS do
  redis.call('LPUSH', KEYS[k], ARGV[k + 1])
  redis.call('LTRIM', KEYS[k], 0, {KEEP - 1})
  redis.call('PEXPIRE', KEYS[k], window)
end
return #KEYS
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


def item(now_ms: int, value: Value) -> str:
    """One record: ``<written ms>|<canonical value>``."""
    return f"{now_ms}|{canonical(value)}"


def records(keys: Keys, token: str, pins: Mapping[str, Value], now_ms: int,
            device_key: str | None = None) -> list[tuple[str, str]]:
    """The ``(echo list key, item)`` of each value of one write about to be sent by
    ``device_key`` (which the cluster layout needs: the list is in its partition)."""
    ref = token_ref(token)
    return [(keys.echo(ref, pin.upper(), device_key), item(now_ms, value))
            for pin, value in pins.items()]


async def record(redis: Redis, per_partition: Mapping[int, Sequence[tuple[str, str]]],
                 window_ms: int, *, cluster: bool) -> None:
    """Record ``(echo list key, item)`` pairs (:func:`records`) of writes about to be sent: one
    script call (``EVAL``) on one Redis, one per partition in the cluster layout, pipelined."""
    groups = ([list(x for items in per_partition.values() for x in items)] if not cluster
              else [list(items) for items in per_partition.values()])
    async with redis.pipeline(transaction=False) as pipe:
        for items in groups:
            if items:
                pipe.eval(_RECORD, len(items), *(k for k, _ in items), window_ms,
                          *(i for _, i in items))
        await pipe.execute()


#: One command to check: ``(token, pin, value, device key)``; the device key ``None`` when the
#: token has no registry row.
Check = tuple[str, str, Value, str | None]


@dataclass(frozen=True, slots=True)
class Take:
    """What :meth:`Echoes.queue_take` queued: :attr:`replies` script calls, answered by
    :meth:`answer`."""

    #: Per call queued, the command index of each of its keys.
    calls: tuple[tuple[int, ...], ...]
    commands: int

    @property
    def replies(self) -> int:
        return len(self.calls)

    def answer(self, replies: Sequence[Sequence[int | bytes]]) -> list[bool]:
        """Per command: was it an echo (a record consumed)."""
        out = [False] * self.commands
        for call, reply in zip(self.calls, replies, strict=True):
            for i, r in zip(call, reply, strict=True):
                if int(r):
                    out[i] = True
        return out


class Echoes:
    """The downlink stage's side: is a command an echo of an uplink write?"""

    def __init__(self, redis: Redis, keys: Keys, window_ms: int) -> None:
        self._redis = redis
        self._keys = keys
        self.window_ms = window_ms

    def queue_take(self, pipe: Pipeline, commands: Sequence[Check], now_ms: int) -> Take:
        """Queue the check of each command in ``pipe`` as one script call (``EVAL``: no
        ``SCRIPT EXISTS`` round trip, nothing to reload after a Redis restart) — one per
        partition in the cluster layout; :meth:`Take.answer` reads the replies."""
        keys = self._keys
        calls: dict[int | None, tuple[list[int], list[str], list[str]]] = {}
        for i, (token, pin, value, device_key) in enumerate(commands):
            ref, pin, text = token_ref(token), pin.upper(), canonical(value)
            if not keys.cluster:
                parts: Sequence[int | None] = [None]
            elif device_key is not None:
                parts = [keys.partition_of_device_key(device_key)]
            else:
                parts = range(keys.partitions)
            for part in parts:
                idx, names, wants = calls.setdefault(part, ([], [], []))
                idx.append(i)
                names.append(keys.echo(ref, pin, partition=part))  # untagged off a cluster
                wants.append(text)
        for _, names, wants in calls.values():
            pipe.eval(_TAKE, len(names), *names, now_ms, self.window_ms, *wants)
        return Take(tuple(tuple(idx) for idx, _, _ in calls.values()), len(commands))

    async def take(self, commands: Sequence[Check], now_ms: int) -> list[bool]:
        """For each command: was it an echo (its record is consumed)."""
        if not commands:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            taken = self.queue_take(pipe, commands, now_ms)
            replies = await pipe.execute()
        return taken.answer(replies)
