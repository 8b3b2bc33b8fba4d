"""De-duplication of uplinks by ``event_id`` within a window, in ~25 bytes of Redis per uplink.

**Contract.** A *claim* of ``(event_id, mark)`` answers the mark that owns the event within the
window, or ``None`` when the event is new (it is then owned by ``mark``). The *mark* names the
stream entry that claimed the event (:func:`mark_of`: 4 bytes of CRC-32 of
``<stream>/<entry id>``), which is what makes marking before writing safe:

* the reply is ``None`` → the event is new; this entry now owns it;
* the reply is this entry's own mark → this is a *redelivery* of the entry that claimed the
  event (it crashed or failed between marking and writing), so it is processed again — a crash
  between marking and the ``XADD`` of the outputs loses nothing;
* any other mark → another entry carries the same event: a duplicate, acked and counted.

So the check costs no extra round trip and never drops the only copy of an event: a second
entry with the same event is dropped only because the first one owns it, and the first stays
pending until its outputs are written. Two marks that collide (CRC-32) only make a duplicate
look like a redelivery: it is processed again (a duplicate write, which egress's event-time
ordering makes a no-op), never dropped. The one duplicate write left otherwise is at-least-once
itself: an entry whose outputs landed but whose ack did not is processed again on redelivery.

**Layout** (why: ``SET seen:<event id> <mark> EX`` cost ~180 bytes per uplink — a key, its
expiry entry, two strings — where the information is ~16 bytes). Events are kept by a 12-byte
BLAKE2b digest of the ``event_id`` in small hashes that Redis stores as listpacks (~20 bytes
per field and value, no per-event key, no per-event expiry), grouped in *time buckets* of
``window / BUCKETS`` seconds each, sharded by the digest's first three bytes:

* ``<base>:<bucket start s>:<shards>:<shard>`` — hash digest → mark, one of ``<shards>`` in
  a generation of the bucket; expires as a whole
  ``window + bucket`` after its bucket started (``EXPIREAT``), so an event is remembered for at
  least the window and at most ``window × (1 + 1/BUCKETS)``;
* ``<base>`` — the bucket table: ``g:<start>`` = the bucket's shard counts (one per
  *generation*, ``"64,512"``), ``n:<start>`` = events claimed in it.

A claim looks the digest up in every shard generation of the current bucket and the
``BUCKETS`` before it (a miss — a new event — costs ``BUCKETS + 1`` lookups in steady state)
and adds it to the current one. The shard count follows the rate so that each hash stays a
listpack (Redis's ``hash-max-listpack-entries``, default 128): a bucket starts with as many
shards as the previous bucket needed for ~:data:`PER_SHARD` events each, and when it fills
past that, a new generation with ``GROWTH`` times the shards takes the further claims (a
ramp-up costs a few extra lookups for one bucket, never correctness). Bucket times are the
Redis server's clock (``TIME``), so replicas never disagree on the bucket. Changing the window
starts new buckets (the old ones are not consulted).

**Exact, not probabilistic.** A digest collision would drop a real reading, so the digest is
96 bits: with 360 million events in the window (100,000/s for an hour) the chance that a new
event collides with any of them is ~5·10⁻²¹, one lost reading in ~10⁷ years at that rate.

``base`` is :meth:`pipeline.keys.Keys.dedup` of the uplink stream the entry came from: the
state of a partition carries that partition's hash tag (one Redis Cluster slot per script).

Replaying a dead letter appends a *new* entry with the same ``event_id``: call :func:`forget`
first (transform does so itself for every uplink it dead-letters whole), or the replay would be
dropped as a duplicate within the window.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Sequence

from redis.asyncio.client import Pipeline

from pipeline.keys import Keys
from pipeline.streams import Entry, Redis

#: Buckets per window: more buckets keep less beyond the window (at most ``1/BUCKETS`` of a
#: window's events) but cost more lookups per claim (``BUCKETS + 1``).
BUCKETS = 2
#: Events per shard a new bucket is sized for (listpacks hold up to 128 by default: 2× room).
PER_SHARD = 64
#: A bucket past ``PER_SHARD`` events per shard opens a generation with this many times the
#: shards.
GROWTH = 8
DIGEST_BYTES = 12
MARK_BYTES = 4
#: One claim as sent to the scripts: digest + mark, fixed width (split in Lua with ``sub``).
CLAIM_BYTES = DIGEST_BYTES + MARK_BYTES


def digest(event_id: str) -> bytes:
    return hashlib.blake2b(event_id.encode(), digest_size=DIGEST_BYTES).digest()


def mark(stream: str, entry_id: str) -> bytes:
    """The mark of one stream entry."""
    return zlib.crc32(f"{stream}/{entry_id}".encode()).to_bytes(MARK_BYTES, "big")


def mark_of(entry: Entry) -> bytes:
    return mark(entry.stream, entry.id)


def pack(event_id: str, mark: bytes) -> bytes:
    """One claim's bytes in a script's claims argument."""
    assert len(mark) == MARK_BYTES
    return digest(event_id) + mark


#: Lua functions shared by every script that claims (this module's and transform's commit).
#: ``dd_open(base, window, now)`` reads a base's bucket table once per script call;
#: ``dd_find``, ``dd_claim`` (which opens a new shard generation when the bucket fills up),
#: ``dd_forget`` work on its result; ``dd_close`` writes the count and generations back.
LUA = f"""
local DD_BUCKETS, DD_PER_SHARD, DD_GROWTH = {BUCKETS}, {PER_SHARD}, {GROWTH}
local DD_MAX_SHARDS = 16777216
local function dd_gens(s)
  local out = {{}}
  if s then for n in string.gmatch(s, '%d+') do out[#out + 1] = tonumber(n) end end
  return out
end
local function dd_open(base, window, now)
  local blen = math.max(1, math.ceil(window / DD_BUCKETS))
  local start = now - now % blen
  local fields = {{}}
  for j = 0, DD_BUCKETS do fields[#fields + 1] = 'g:' .. (start - j * blen) end
  fields[#fields + 1] = 'n:' .. start
  fields[#fields + 1] = 'n:' .. (start - blen)
  local got = redis.call('HMGET', base, unpack(fields))
  local st = {{base = base, blen = blen, start = start, gens = {{}}, new = 0, touched = {{}},
    count = tonumber(got[DD_BUCKETS + 2]) or 0, room = 0, grown = false,
    expire_at = start + blen + window}}
  st.prefixes = {{}}
  for j = 0, DD_BUCKETS do
    st.gens[j + 1] = dd_gens(got[j + 1])
    st.prefixes[j + 1] = base .. ':' .. (start - j * blen) .. ':'
  end
  local cur = st.gens[1]
  if #cur == 0 then
    -- A new bucket: sized for the previous bucket's events; the stale table rows go.
    local prev = tonumber(got[DD_BUCKETS + 3]) or 0
    local n = 1
    while n * DD_PER_SHARD < prev and n < DD_MAX_SHARDS do n = n * 2 end
    cur[1] = n
    redis.call('HSET', base, 'g:' .. start, n)
    -- Rows of buckets past the window go (all of them: traffic may have paused for several).
    local keep_from, old = start - DD_BUCKETS * blen, {{}}
    for _, f in ipairs(redis.call('HKEYS', base)) do
      local t = tonumber(string.match(f, '^[gn]:(%d+)$'))
      if t and t < keep_from then old[#old + 1] = f end
    end
    if #old > 0 then redis.call('HDEL', base, unpack(old)) end
    redis.call('EXPIREAT', base, st.expire_at + blen)
  end
  for g = 1, #cur do st.room = st.room + cur[g] * DD_PER_SHARD end
  return st
end
local function dd_shard(d)
  local a, b, c = string.byte(d, 1, 3)
  return a * 65536 + b * 256 + c
end
-- The key of shard h % n of generation n in the bucket j buckets back.
local function dd_key(st, j, n, h)
  return st.prefixes[j + 1] .. n .. ':' .. (h % n)
end
-- Looks d up in every generation of every bucket but the current bucket's newest generation
-- (``skip_newest``) or all of them: the mark and the key holding it, or nil.
local function dd_find(st, d, skip_newest)
  local h = dd_shard(d)
  for j = 0, DD_BUCKETS do
    local gens = st.gens[j + 1]
    local last = #gens
    if j == 0 and skip_newest then last = last - 1 end
    for g = last, 1, -1 do
      local k = dd_key(st, j, gens[g], h)
      local v = redis.call('HGET', k, d)
      if v then return v, k end
    end
  end
  return nil, nil
end
local function dd_claim(st, d, mark)
  -- Older buckets and generations first: the current one is then written with HSETNX, which
  -- also says whether it held the event already (one call for a new event, not two).
  local old = dd_find(st, d, true)
  if old then return old end
  local cur = st.gens[1]
  local shards = cur[#cur]
  local k = dd_key(st, 0, shards, dd_shard(d))
  if redis.call('HSETNX', k, d, mark) == 0 then return redis.call('HGET', k, d) end
  if not st.touched[k] then
    st.touched[k] = true
    redis.call('EXPIREAT', k, st.expire_at)
  end
  st.new = st.new + 1
  st.count = st.count + 1
  if st.count > st.room and shards < DD_MAX_SHARDS then
    -- The bucket filled its shards: further claims go to a generation with more of them.
    shards = math.min(shards * DD_GROWTH, DD_MAX_SHARDS)
    cur[#cur + 1] = shards
    st.room = st.room + shards * DD_PER_SHARD
    st.grown = true
  end
  return nil
end
local function dd_forget(st, d)
  local old, k = dd_find(st, d, false)
  if k then redis.call('HDEL', k, d) end
  return old
end
local function dd_close(st)
  if st.new > 0 then redis.call('HINCRBY', st.base, 'n:' .. st.start, st.new) end
  if st.grown then redis.call('HSET', st.base, 'g:' .. st.start, table.concat(st.gens[1], ',')) end
end
local function dd_now()
  return tonumber(redis.call('TIME')[1])
end
"""

# KEYS = the de-dup base of each claim's stream; ARGV[1] = window s, ARGV[2] = claims (digest +
# mark each), ARGV[3] = mode (c = claim, f = forget), ARGV[4...] = the 1-based base of each
# claim. Replies: the old mark of each claim (false where there was none).
_SCRIPT = LUA + f"""
local window, blob, mode = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local now = dd_now()
local states = {{}}
for i = 1, #KEYS do states[i] = dd_open(KEYS[i], window, now) end
local out = {{}}
for i = 1, #ARGV - 3 do
  local st = states[tonumber(ARGV[3 + i])]
  local o = (i - 1) * {CLAIM_BYTES}
  local d = string.sub(blob, o + 1, o + {DIGEST_BYTES})
  if mode == 'c' then
    out[i] = dd_claim(st, d, string.sub(blob, o + {DIGEST_BYTES + 1}, o + {CLAIM_BYTES})) or false
  else
    out[i] = dd_forget(st, d) or false
  end
end
for i = 1, #KEYS do dd_close(states[i]) end
return out
"""


def _args(keys: Keys, window_s: int, mode: str,
          claims: Sequence[tuple[str, str, bytes]]) -> tuple[list[str], list[bytes | str | int]]:
    bases: dict[str, int] = {}
    blob: list[bytes] = []
    which: list[bytes | str | int] = []
    for stream, event_id, m in claims:
        base = keys.dedup(stream)
        bi = bases.get(base)
        if bi is None:
            bi = bases[base] = len(bases) + 1
        blob.append(pack(event_id, m))
        which.append(bi)
    return list(bases), [window_s, b"".join(blob), mode, *which]


class Claims:
    """The batched claim script, registered once per client."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._script = redis.register_script(_SCRIPT)
        self._keys = keys

    async def queue(self, pipe: Pipeline, claims: Sequence[tuple[str, str, bytes]],
                    window_s: int) -> None:
        """Queue the claims of ``(stream, event_id, mark)``; the reply is a list of old marks
        (``None`` where the event was new), in order. One script call for every partition:
        one Redis only (:meth:`run` keeps to one slot per call)."""
        keys, args = _args(self._keys, window_s, "c", claims)
        await self._script(keys=keys, args=args, client=pipe)

    async def run(self, claims: Sequence[tuple[str, str, bytes]],
                  window_s: int) -> list[bytes | None]:
        """The claims of ``(stream, event_id, mark)`` on their own: the old marks, in order.
        One script call per partition, so each stays in one Redis Cluster slot."""
        return await self._per_base("c", claims, window_s)

    async def forget(self, claims: Sequence[tuple[str, str]], window_s: int) -> None:
        """Forget the events ``(stream, event_id)`` (one script call per partition)."""
        await self._per_base("f", [(s, e, b"\0" * MARK_BYTES) for s, e in claims], window_s)

    async def _per_base(self, mode: str, claims: Sequence[tuple[str, str, bytes]],
                        window_s: int) -> list[bytes | None]:
        by_base: dict[str, list[int]] = {}
        for i, (stream, _, _) in enumerate(claims):
            by_base.setdefault(self._keys.dedup(stream), []).append(i)
        out: list[bytes | None] = [None] * len(claims)
        for idx in by_base.values():
            keys, args = _args(self._keys, window_s, mode, [claims[i] for i in idx])
            for i, r in zip(idx, await self._script(keys=keys, args=args), strict=True):
                out[i] = r or None
        return out


def is_duplicate(reply: bytes | None, mark: bytes) -> bool:
    """Whether a claim's reply says another entry owns the event."""
    return reply is not None and reply != mark


async def forget(redis: Redis, keys: Keys, window_s: int,
                 events: Iterable[tuple[str, str]]) -> None:
    """Forget events ``(uplink stream, event_id)``, so re-appended (replayed) uplinks carrying
    them are processed again."""
    await Claims(redis, keys).forget(list(events), window_s)


async def owner(redis: Redis, keys: Keys, window_s: int, stream: str,
                event_id: str) -> bytes | None:
    """The mark that owns an event now (``None``: not seen within the window); for tests and
    operators. Read-only: a claim immediately forgotten would lose a real one, so this looks
    the digest up from Python with the same layout as the scripts."""
    base = keys.dedup(stream)
    d = digest(event_id)
    h = int.from_bytes(d[:3], "big")
    now = int((await redis.time())[0])
    blen = max(1, -(-window_s // BUCKETS))
    start = now - now % blen
    for j in range(BUCKETS + 1):
        s = start - j * blen
        gens: bytes = await redis.hget(base, f"g:{s}") or b""  # type: ignore[assignment]
        for g in reversed(gens.split(b",")):
            if g:
                v: bytes | None = await redis.hget(  # type: ignore[assignment]
                    f"{base}:{s}:{int(g)}:{h % int(g)}", d)
                if v is not None:
                    return v
    return None
