"""Transform's two Redis scripts: each writes a batch's outputs and acks its inputs in ONE call.

* :class:`Emit` (the slow path): append outputs, ack inputs.
* :class:`Commit` (the fast path): registry version check, de-duplication claims, outputs of
  the non-duplicates, acks — atomically.

One call per batch matters on the hot path: redis-py packs and parses one command instead of
one per entry, and a crash cannot fall between the write and the ack (no duplicate output on
redelivery).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from pipeline import events
from pipeline.keys import Keys
from pipeline.streams import Entry, Redis

_EMIT = """
local n = tonumber(ARGV[1])
local group = ARGV[2]
for i = 1, n do
  redis.call('XADD', KEYS[i], '*', 'd', ARGV[2 + i])
end
local a = 3 + n
local acked = 0
for k = n + 1, #KEYS do
  local c = tonumber(ARGV[a])
  a = a + 1
  local j = 0
  while j < c do
    local m = math.min(c - j, 500)
    acked = acked + redis.call('XACK', KEYS[k], group, unpack(ARGV, a + j, a + j + m - 1))
    j = j + m
  end
  a = a + c
end
return acked
"""


class Emit:
    """Append outputs and ack their inputs in ONE script call: atomic, one command per batch.

    This is ``StreamWriter.add_many`` followed by ``StreamReader.ack`` with two differences that
    matter on the hot path: redis-py packs and parses one command instead of one per entry
    (its per-command cost in Python outweighs the Redis work), and a crash can no longer fall
    between the write and the ack (no duplicate output on redelivery). Entries are appended
    with the single field ``d`` (:data:`pipeline.events.FIELD`).
    """

    def __init__(self, redis: Redis, group: str) -> None:
        self._script = redis.register_script(_EMIT)
        self._group = group
        assert events.FIELD == b"d"

    async def run(self, outputs: Sequence[tuple[str, bytes]], acks: Sequence[Entry]) -> None:
        if not outputs and not acks:
            return
        by_stream: dict[str, list[str]] = {}
        for e in acks:
            by_stream.setdefault(e.stream, []).append(e.id)
        keys: list[str] = [s for s, _ in outputs]
        keys.extend(by_stream)
        args: list[str | bytes | int] = [len(outputs), self._group]
        args.extend(d for _, d in outputs)
        for ids in by_stream.values():
            args.append(len(ids))
            args.extend(ids)
        await self._script(keys=keys, args=args)


# KEYS = registry version, seen key of each claim, output streams, streams to ack;
# ARGV[1] = msgpack [version, window s, group, [mode, mark, ...] per claim,
# [owner, output stream index, ...] per output, [[entry id, ...] per stream to ack]];
# ARGV[2...] = each output's data, as separate arguments: Redis 7.0's cmsgpack does not read
# msgpack's bin type, and splitting one concatenated blob in Lua costs the worker more than it
# saves (BENCHMARKS.md, transform).
_COMMIT = """
local v = redis.call('GET', KEYS[1])
local p = cmsgpack.unpack(ARGV[1])
if (v or '0') ~= p[1] then return {-1} end
local window, group, claims, outputs, acks = p[2], p[3], p[4], p[5], p[6]
local pos = 2
local m = #claims / 2
local dup, out = {}, {1}
for i = 1, m do
  local mode, key = claims[2 * i - 1], KEYS[1 + i]
  local mark = claims[2 * i]
  local old
  if mode == 'c' then
    old = redis.call('SET', key, mark, 'NX', 'EX', window, 'GET')
  else
    old = redis.call('GET', key)
  end
  if old and old ~= mark then
    dup[i] = true
    out[#out + 1] = i
  elseif old and mode == 'f' then
    redis.call('DEL', key)
  end
end
local ns = 0
for j = 1, #outputs, 2 do
  local owner, si = outputs[j], outputs[j + 1]
  if si > ns then ns = si end
  if owner == 0 or not dup[owner] then
    redis.call('XADD', KEYS[1 + m + si], '*', 'd', ARGV[pos])
  end
  pos = pos + 1
end
local base = 1 + m + ns
for s = 1, #acks do
  local ids = acks[s]
  for i = 1, #ids, 500 do
    redis.call('XACK', KEYS[base + s], group, unpack(ids, i, math.min(i + 499, #ids)))
  end
end
return out
"""

#: :meth:`Commit.run` modes: claim the event (``SET NX GET``), or — for an uplink about to be
#: dead-lettered whole — only check it (a duplicate is acked as one) and forget the entry's own
#: claim, so a replay of the dead letter is not dropped (what the slow path does with
#: :func:`pipeline.dedup.forget`).
CLAIM = "c"
CHECK_AND_FORGET = "f"


class Commit:
    """The fast path's one call per batch: registry version check, de-duplication claims,
    outputs of the non-duplicates, acks — atomically, in one script.

    ``claims`` are ``(event_id, mark, mode)``; each output names its *owner*, the 1-based index
    of the claim it belongs to (0 = unconditional); an output whose owner turns out to be a
    duplicate is not appended. Returns the 0-based indices of the duplicate claims, or ``None``
    when the registry version is no longer ``version`` (nothing was done).
    """

    def __init__(self, redis: Redis, keys: Keys, group: str) -> None:
        self._script = redis.register_script(_COMMIT)
        self._keys = keys
        self._group = group
        self._pack = msgspec.msgpack.Encoder().encode
        assert events.FIELD == b"d"

    async def run(self, version: int, window_s: int,
                  claims: Sequence[tuple[str, bytes, str]],
                  outputs: Sequence[tuple[str, int, bytes]],
                  acks: Sequence[Entry]) -> list[int] | None:
        # Everything but the keys and the outputs' data is one msgpack argument: redis-py packs
        # each argument in Python, msgpack packs the whole structure in C.
        seen = self._keys.seen
        keys: list[str] = [self._keys.registry_version()]
        keys.extend([seen(e) for e, _, _ in claims])
        flat_claims: list[str | int] = []
        blob: list[bytes] = []
        for _, mark, mode in claims:
            flat_claims.append(mode)
            flat_claims.append(mark.decode())
        streams: dict[str, int] = {}
        flat_out: list[int] = []
        for stream, owner, data in outputs:
            si = streams.get(stream)
            if si is None:
                si = streams[stream] = len(streams) + 1
            flat_out.append(owner)
            flat_out.append(si)
            blob.append(data)
        keys.extend(streams)
        by_stream: dict[str, list[str]] = {}
        for e in acks:
            ids = by_stream.get(e.stream)
            if ids is None:
                ids = by_stream[e.stream] = []
            ids.append(e.id)
        keys.extend(by_stream)
        arg = self._pack([str(version), window_s, self._group, flat_claims, flat_out,
                          list(by_stream.values())])
        reply = await self._script(keys=keys, args=[arg, *blob])
        if reply[0] == -1:
            return None
        return [int(i) - 1 for i in reply[1:]]
