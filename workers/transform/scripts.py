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
from redis.asyncio.cluster import RedisCluster

from pipeline import dedup, events
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


# KEYS = registry version, de-dup base of each claim's stream, output streams, streams to ack,
# then (Redis Cluster) every de-dup shard key the call may touch (pipeline.dedup.declared);
# ARGV[1] = msgpack [version, window s, group, number of bases, modes (one letter per claim),
# [base index per claim], [owner, output stream index, ...] per output,
# [[entry id, ...] per stream to ack], number of declared shard keys (absent: none, one
# Redis), epoch the client saw or proposes (with declared keys)];
# ARGV[2] = the claims, fixed width (:func:`pipeline.dedup.pack`);
# ARGV[3...] = each output's data, as separate arguments: Redis 7.0's cmsgpack does not read
# msgpack's bin type, and splitting one concatenated blob of varying widths in Lua costs the
# worker more than it saves (BENCHMARKS.md, transform).
_COMMIT = dedup.LUA + f"""
local v = redis.call('GET', KEYS[1])
local p = cmsgpack.unpack(ARGV[1])
if (v or '0') ~= p[1] then return {{-1}} end
local window, group, nb, modes, cbase = p[2], p[3], p[4], p[5], p[6]
local outputs, acks, nd = p[7], p[8], p[9] or 0
local blob = ARGV[2]
local declared = nil
if nd > 0 then
  declared = {{}}
  for i = #KEYS - nd + 1, #KEYS do declared[KEYS[i]] = true end
end
local states = {{}}
if nb > 0 then
  local now = dd_now()
  for i = 1, nb do states[i] = dd_open(KEYS[1 + i], window, now, declared, p[10]) end
end
if declared then
  -- Every claim's shard must be declared (a slot move redirects on declared keys only);
  -- one that is not means the table moved on since the client read it: read it again.
  for i = 1, #cbase do
    local o = (i - 1) * {dedup.CLAIM_BYTES}
    if not declared[dd_key(states[cbase[i]], dd_h(string.sub(blob, o + 1, o + 3)))] then
      return {{-2}}
    end
  end
end
local dup, out = {{}}, {{1}}
for i = 1, #cbase do
  local st = states[cbase[i]]
  local o = (i - 1) * {dedup.CLAIM_BYTES}
  local d = string.sub(blob, o + 1, o + {dedup.DIGEST_BYTES})
  local old, k
  if string.byte(modes, i) == 99 then  -- 'c'
    old = dd_claim(st, d, string.sub(blob, o + {dedup.HEX_FROM}, o + {dedup.CLAIM_BYTES}))
  else
    old, k = dd_find(st, d, false)
  end
  if old then
    if old ~= string.sub(blob, o + {dedup.DIGEST_BYTES + 1}, o + {dedup.HEX_FROM - 1}) then
      dup[i] = true
      out[#out + 1] = i
    elseif k then
      dd_drop(k, d)
    end
  end
end
for i = 1, nb do dd_close(states[i]) end
local pos = 3
local ns = 0
local base = 1 + nb
for j = 1, #outputs, 2 do
  local owner, si = outputs[j], outputs[j + 1]
  if si > ns then ns = si end
  if owner == 0 or not dup[owner] then
    redis.call('XADD', KEYS[base + si], '*', 'd', ARGV[pos])
  end
  pos = pos + 1
end
base = base + ns
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

    ``claims`` are ``(stream, event_id, mark, mode)`` (the stream the uplink came from:
    its partition's de-dup state is used, :meth:`pipeline.keys.Keys.dedup`). On a Redis
    Cluster client the call declares every de-dup shard key it may touch
    (:func:`pipeline.dedup.declared`: one table read first), so a call reaching a master while
    the partition's slot moves is redirected (``ASK``/``TRYAGAIN``) instead of missing a shard
    not moved yet; on one Redis the script builds them (one round trip). Each output
    names its *owner*, the 1-based index of the claim it belongs to (0 = unconditional); an
    output whose owner turns out to be a
    duplicate is not appended. Returns the 0-based indices of the duplicate claims, or ``None``
    when the registry version is no longer ``version`` (nothing was done).
    """

    def __init__(self, redis: Redis, keys: Keys, group: str) -> None:
        self._redis = redis
        self._script = redis.register_script(_COMMIT)
        self._declare = isinstance(redis, RedisCluster)
        self._keys = keys
        self._group = group
        self._pack = msgspec.msgpack.Encoder().encode
        assert events.FIELD == b"d"

    async def run(self, version: int, window_s: int,
                  claims: Sequence[tuple[str, str, bytes, str]],
                  outputs: Sequence[tuple[str, int, bytes]],
                  acks: Sequence[Entry]) -> list[int] | None:
        # Everything but the keys, the claims and the outputs' data is one msgpack argument:
        # redis-py packs each argument in Python, msgpack packs the whole structure in C.
        dedup_base = self._keys.dedup
        pack = dedup.pack
        # One partition's batch in the cluster layout (StreamReader): one slot.
        keys: list[str] = [self._keys.registry_version_for(acks[0].stream if acks else "")]
        bases: dict[str, int] = {}
        claim_base: list[int] = []
        claim_bytes: list[bytes] = []
        modes: list[str] = []
        for stream, event_id, mark, mode in claims:
            base = dedup_base(stream)
            bi = bases.get(base)
            if bi is None:
                bi = bases[base] = len(bases) + 1
            claim_base.append(bi)
            claim_bytes.append(pack(event_id, mark))
            modes.append(mode)
        keys.extend(bases)
        streams: dict[str, int] = {}
        flat_out: list[int] = []
        blob: list[bytes] = []
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
        head = [str(version), window_s, self._group, len(bases), "".join(modes),
                claim_base, flat_out, list(by_stream.values())]
        claimed = b"".join(claim_bytes)
        if self._declare and bases:
            reply = await self._declared(keys, head, claimed, blob, list(bases), window_s,
                                         [c[:dedup.DIGEST_BYTES] for c in claim_bytes])
        else:
            reply = await self._script(keys=keys, args=[self._pack(head), claimed, *blob])
        if reply[0] == -1:
            return None
        return [int(i) - 1 for i in reply[1:]]

    async def _declared(self, keys: list[str], head: list[object], claimed: bytes,
                        blob: list[bytes], bases: list[str], window_s: int,
                        digests: list[bytes]) -> list[int]:
        """The call with every shard key declared (Redis Cluster: one partition's batch, one
        de-dup base): the table is read first, and again when the script says it moved on."""
        base, = bases

        async def call(epoch: str, shards: list[str]) -> list[int]:
            arg = self._pack([*head, len(shards), epoch])
            reply: list[int] = await self._script(keys=[*keys, *shards],
                                                  args=[arg, claimed, *blob])
            return reply

        return await dedup.declared(self._redis, base, window_s, digests, call,
                                    lambda r: r[0] == -2)
