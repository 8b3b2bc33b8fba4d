"""De-duplication of uplinks by ``event_id`` within a window, in ~32 bytes of Redis per uplink.

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

**Layout** (why: ``SET seen:<event id> <mark> EX`` cost ~160 bytes per uplink — a key, its
expiry entry, two strings — where the information is ~16 bytes; and why not time buckets of
hashes, the scheme before this one: every new event had to be looked up in each bucket of the
window, three calls per claim instead of one, ~3× the Redis CPU of the ``SET``). Events are
kept by a 12-byte BLAKE2b digest of the ``event_id`` in small sorted sets that Redis stores as
listpacks (~24 bytes per event, no per-event key, no per-event expiry), one *shard* per
digest, ``<digest's first three bytes> mod <shards>``:

* ``<base>:<epoch>:<shards>:<shard>`` — sorted set, member = digest, score = ``(TICKS − 1 −
  step) × 2³² + mark`` (step = Redis server time / ``window / STEPS``, modulo :data:`TICKS`),
  so one ``ZADD NX`` claims a new event — the only call it costs — and one
  ``ZREMRANGEBYSCORE`` drops every event of a shard that left the window. The steps count
  *down* so that the newest events score lowest: a listpack insert walks from the head to
  the score's place, so a new claim lands after a few entries instead of walking the whole
  shard (~0.8 µs less Redis CPU per claim at ~48 events a shard, BENCHMARKS.md, goal 5);
* ``<base>`` — the table: epoch, step length (stored negated: the layout before this one
  counted steps up and stored it as is, so neither reads the other's shards as its own — an
  upgrade starts a new epoch, and epochs of this layout are named ``r<time>`` so that no key
  name is shared either), shard counts (current, and old while a resize moves shards),
  live-event count, sweep position.

A claim answers an event as seen while its step is at most ``window / step length`` steps old:
remembered for at least the window, at most one step longer. The *sweep* visits every shard
once per ``window / SWEEPS`` (spread over the calls by the server clock, at most
:data:`MAX_SWEEP` shards a call beyond one per claim), removes the dead events and renews the
shard's TTL, so an event is kept ``1 + 1/(2·STEPS) + 1/(2·SWEEPS)`` windows on average. The
shard count follows the live count so that each set stays a listpack (Redis's
``zset-max-listpack-entries``, default 128): past :data:`PER_SHARD` events per shard the shards
double, below a quarter of it they halve; the old shards are then *moved* into the new ones a
few per call (like Redis's own incremental rehash: an event's shard is the old one until that
one is moved), so a claim still looks at one key only. Every shard key is created with its TTL
(a resize creates the targets with a placeholder member of score -1; one a claim re-creates
after it expired gets its TTL at the next sweep) and the table is renewed each call, so the
state of an idle partition expires whole; the next claim starts a new *epoch* (new key names:
no key left over can be misread). Changing the window starts a new epoch too.

**Exact, not probabilistic.** A digest collision would drop a real reading, so the digest is
96 bits: with 360 million events in the window (100,000/s for an hour) the chance that a new
event collides with any of them is ~5·10⁻²¹, one lost reading in ~10⁷ years at that rate.

``base`` is :meth:`pipeline.keys.Keys.dedup` of the uplink stream the entry came from: the
state of a partition carries that partition's hash tag (one Redis Cluster slot per script).
On a cluster client :class:`Claims` declares every shard key a call touches (read from the
table first, checked by the script), so a call reaching a master while the slot moves is
redirected rather than missing a shard; so does transform's commit script there (it passes
:func:`declared`'s keys; its ``dd_open`` gets the declared set). On one Redis the shared ``LUA``
functions build the shard keys themselves (no table read first).

Replaying a dead letter appends a *new* entry with the same ``event_id``: call :func:`forget`
first (transform does so itself for every uplink it dead-letters whole), or the replay would be
dropped as a duplicate within the window.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster

from pipeline.keys import Keys
from pipeline.streams import Entry, Redis

#: Time steps per window: an event is live for ``window`` to ``window × (1 + 1/STEPS)``. Many,
#: so that a step is one second for windows up to ~68 minutes: events claimed in the same step
#: sort by mark, so a new claim's insert walks past the current step's events of its shard, a
#: few at most with one-second steps (a whole window's events with the 32 steps before).
STEPS = 4096
#: Sweep passes per window: a dead event is dropped within ``window / SWEEPS``. An event is
#: kept ``window × (1 + 1/STEPS + 1/SWEEPS)`` at most, ``1 + 1/(2·STEPS) + 1/(2·SWEEPS)``
#: windows on average; more passes cost more Redis CPU per claim (one call per shard each).
SWEEPS = 8
#: Steps counted modulo this, so that step × 2³² + mark stays an exact double (< 2⁵³).
TICKS = 1 << 20
#: Live events per shard past which the shards double (listpacks hold up to 128 by default);
#: below a quarter of it they halve.
PER_SHARD = 64
#: Shards swept at most per script call, beyond one per new claim (a call after a pause
#: catches up over several calls; a steady rate needs ~0.2 per claim).
MAX_SWEEP = 64
#: Old shards moved into the new generation per new claim (at least ``MIN_MOVES`` per call):
#: a doubling finishes after ``16 × old shards`` claims, long before the next one is due.
CLAIMS_PER_MOVE = 16
MIN_MOVES = 4
DIGEST_BYTES = 12
MARK_BYTES = 4
#: One claim as sent to the scripts: digest, mark, and the mark in 8 hex digits (the scripts
#: write the score as a hex string: no number formatting in Redis, whose ``%.17g`` of each
#: score was a tenth of a claim's cost), fixed width (split in Lua with ``sub``).
CLAIM_BYTES = DIGEST_BYTES + 3 * MARK_BYTES
#: Where the hex mark starts in a claim (1-based, as Lua's ``sub`` counts).
HEX_FROM = DIGEST_BYTES + MARK_BYTES + 1
#: Table reads a declared (Redis Cluster) call makes before it gives up: each retry means
#: another client resized or swept in between.
DECLARED_TRIES = 20

T = TypeVar("T")


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
    return digest(event_id) + mark + mark.hex().encode()


def tick(window_s: int) -> int:
    """Seconds per time step (``window / STEPS``, at least 1): the time unit of the layout."""
    return max(1, -(-window_s // STEPS))


#: Lua functions shared by every script that claims (this module's and transform's commit).
#: ``dd_open(base, window, now)`` reads a base's table once per script call; ``dd_find``,
#: ``dd_claim``, ``dd_forget`` work on its result (one shard key per event: ``ZADD NX`` is the
#: only call a new event costs), ``dd_drop(key, digest)`` removes what ``dd_find`` found;
#: ``dd_close`` moves shards of a resize, sweeps the shards due and writes the table back.
#: Why each step: the module docstring.
LUA = f"""
local DD_STEPS, DD_SWEEPS, DD_TICKS = {STEPS}, {SWEEPS}, {TICKS}
local DD_PER_SHARD, DD_MAX_SWEEP = {PER_SHARD}, {MAX_SWEEP}
local DD_CLAIMS_PER_MOVE, DD_MIN_MOVES, DD_MARK = {CLAIMS_PER_MOVE}, {MIN_MOVES}, {MARK_BYTES}
local DD_2_32 = 4294967296
local DD_MAX_SHARDS = 16777216
local function dd_now()
  return tonumber(redis.call('TIME')[1])
end
local function dd_h(d)
  local a, b, c = string.byte(d, 1, 3)
  return a * 65536 + b * 256 + c
end
-- Live: claimed at most ``k`` steps ago (so less than the window is never forgotten).
local function dd_live(st, score)
  return (math.floor(score / DD_2_32) - st.r) % DD_TICKS <= st.k
end
local function dd_mark(score)
  local m = score % DD_2_32
  return string.char(math.floor(m / 16777216), math.floor(m / 65536) % 256,
                     math.floor(m / 256) % 256, m % 256)
end
local function dd_prefixes(st)
  st.np = st.pre .. st.n .. ':'
  st.op = st.pre .. st.o .. ':'
end
local function dd_open(base, window, now, declared, epoch)
  local q = math.max(1, math.ceil(window / DD_STEPS))
  local tick = math.floor(now / q) % DD_TICKS
  local r = DD_TICKS - 1 - tick
  local st = {{base = base, now = now, q = q, k = math.ceil(window / q), tick = tick, r = r,
    hex = string.format('0x%x', r), new = 0,
    pass = math.max(1, math.ceil(window / DD_SWEEPS))}}
  st.ttl = window + q + 3 * st.pass
  st.wrapped = math.ceil(st.ttl / q) + st.k + 2
  local got = redis.call('HMGET', base, 'e', 'q', 'n', 'o', 'm', 'c', 'w', 't')
  if got[1] and tonumber(got[2]) == -q then
    st.e, st.n, st.o, st.m = got[1], tonumber(got[3]), tonumber(got[4]), tonumber(got[5])
    st.c, st.w, st.t = tonumber(got[6]), tonumber(got[7]), tonumber(got[8])
  else
    -- No state (first start, or idle past the TTL), another window or the layout before
    -- (its q is positive): a new epoch, whose key names no earlier key can share; the old
    -- keys expire on their own.
    st.e, st.n, st.o, st.m, st.c, st.w, st.t = epoch or ('r' .. now), 1, 0, 0, 0, 0, now
    local k = base .. ':' .. st.e .. ':1:0'
    redis.call('ZADD', k, -1, '')
    redis.call('EXPIRE', k, st.ttl)
  end
  st.pre = base .. ':' .. st.e .. ':'
  st.declared = declared
  dd_prefixes(st)
  return st
end
-- Whether k may be touched: every key when the caller declares none (one Redis), else only
-- the declared ones (Redis Cluster: a slot being moved redirects on declared keys only).
local function dd_may(st, k)
  return st.declared == nil or st.declared[k] ~= nil
end
-- The one shard that holds d: the old generation's while its shard is not moved yet.
local function dd_key(st, h)
  -- ``%d``: Lua's own number-to-string is ``%.14g``, a floating-point formatting.
  if st.o > 0 and h % st.o >= st.m then return st.op .. string.format('%d', h % st.o) end
  return st.np .. string.format('%d', h % st.n)
end
-- The live mark of d and the key holding it (for ``dd_drop``), or nil.
local function dd_find(st, d)
  local k = dd_key(st, dd_h(d))
  local s = redis.call('ZSCORE', k, d)
  if s then
    s = tonumber(s)
    if dd_live(st, s) then return dd_mark(s), k end
  end
  return nil, nil
end
local function dd_drop(k, d)
  redis.call('ZREM', k, d)
end
-- ``hex``: the claiming mark in 8 hex digits. The score goes to ZADD as the hex string
-- r × 2³² + mark (Redis parses scores with strtod, which reads hex): no number formatting.
local function dd_claim(st, d, hex)
  local score = st.hex .. hex
  local k = dd_key(st, dd_h(d))
  if redis.call('ZADD', k, 'NX', score, d) == 1 then
    st.new = st.new + 1
    return nil
  end
  local old = tonumber(redis.call('ZSCORE', k, d))
  if dd_live(st, old) then return dd_mark(old) end
  redis.call('ZADD', k, score, d)  -- claimed before the window: new again
  return nil
end
local function dd_forget(st, d)
  local old, k = dd_find(st, d)
  if k then dd_drop(k, d) end
  return old
end
-- Moves old shard i into the shards of the new generation it maps to (every one of them is
-- created here, with a placeholder member and its TTL, so no shard key lives without one).
-- Dead events move too (the sweep drops them): checking each would cost more than moving it.
local function dd_move(st, i)
  local src = st.op .. i
  local n = st.n
  if n == 2 * st.o then
    -- A doubling: shard i splits into new shards i and i + o. Copied whole (no score goes
    -- through a reply and back: formatting and parsing each cost more than the move) and
    -- each copy drops the other's events. The general way below when a target exists
    -- already (a claim re-created one) or the shard is no listpack (it grew past Redis's
    -- limit before it was moved: a copy would stay a skiplist, ~3x the memory).
    local a, b = st.np .. i, st.np .. (i + st.o)
    if redis.call('EXISTS', a, b) == 0
        and redis.call('OBJECT', 'ENCODING', src) == 'listpack' then
      local all = redis.call('ZRANGE', src, 0, -1)
      local not_a, not_b = {{'ZREM', a}}, {{'ZREM', b}}
      for j = 1, #all do
        local f = all[j]
        if f ~= '' then
          local x, y, z = string.byte(f, 1, 3)
          if (x * 65536 + y * 256 + z) % n == i then
            not_b[#not_b + 1] = f
          else
            not_a[#not_a + 1] = f
          end
        end
      end
      redis.call('COPY', src, a)
      redis.call('RENAME', src, b)
      for _, rm in ipairs({{not_a, not_b}}) do
        if #rm > 2 then redis.call(unpack(rm)) end
        redis.call('ZADD', rm[2], -1, '')  -- the placeholder, if src had none
        redis.call('EXPIRE', rm[2], st.ttl)
      end
      return
    end
  end
  local all = redis.call('ZRANGE', src, 0, -1, 'WITHSCORES')
  local out = {{}}
  local step = st.o
  if n < step then step = n end
  for j = i % n, n - 1, step do out[j] = {{'ZADD', st.np .. j, -1, ''}} end
  -- Highest scores first: each member then goes in at the head of its target (a listpack
  -- insert walks from the head to the score's place).
  for j = #all - 1, 1, -2 do
    local s = all[j + 1]
    if s ~= '-1' then
      local f = all[j]
      local a, b, c = string.byte(f, 1, 3)
      local t = out[(a * 65536 + b * 256 + c) % n]
      t[#t + 1] = s  -- the reply's string: no number formatting back
      t[#t + 1] = f
    end
  end
  for _, a in pairs(out) do
    redis.call(unpack(a))
    redis.call('EXPIRE', a[2], st.ttl)
  end
  redis.call('DEL', src)
end
-- Drops the events of shard key k claimed before the window, and renews its TTL. Scores
-- count steps down (``r``, :func:`dd_open`): the live ones are ``r`` to ``r + k`` (modulo
-- DD_TICKS), the dead ones above them, and below ``r`` once the steps wrapped (the
-- placeholder scores -1 and stays).
-- The bounds go as hex strings, like the claims' scores (no floating-point formatting).
local function dd_sweep(st, k)
  local hi = (st.r + st.k) % DD_TICKS  -- the oldest live reversed step
  local dead
  if hi >= st.r then
    dead = redis.call('ZREMRANGEBYSCORE', k, string.format('0x%x', (hi + 1) * DD_2_32),
                      '+inf')
    -- Steps below now are from before the steps wrapped: only shortly after a wrap (a key
    -- lives at most its TTL), so the second call is made only then.
    if st.tick <= st.wrapped then
      dead = dead + redis.call('ZREMRANGEBYSCORE', k, 0, '(' .. st.hex .. '00000000')
    end
  else
    dead = redis.call('ZREMRANGEBYSCORE', k, string.format('0x%x', (hi + 1) * DD_2_32),
                      '(' .. st.hex .. '00000000')
  end
  st.c = st.c - dead
  redis.call('EXPIRE', k, st.ttl)
end
local function dd_close(st)
  st.c = st.c + st.new
  if st.o > 0 then
    -- A resize in progress: moved at a pace of the claims, so it ends long before the next.
    local steps = math.max(DD_MIN_MOVES, math.ceil(st.new / DD_CLAIMS_PER_MOVE))
    while steps > 0 and st.m < st.o and dd_may(st, st.op .. st.m) do
      dd_move(st, st.m)
      st.m = st.m + 1
      steps = steps - 1
    end
    if st.m >= st.o then st.o, st.m = 0, 0 end
  end
  -- Sweep: one pass over the shards every ``pass`` seconds, spread over the calls by the
  -- clock.
  if st.w >= st.n then st.w, st.t = 0, st.now end
  local due = math.min(st.n, math.floor(st.n * (st.now - st.t) / st.pass))
  local last = math.min(due, st.w + DD_MAX_SWEEP + st.new)
  while st.w < last and dd_may(st, st.np .. st.w) do
    dd_sweep(st, st.np .. st.w)
    st.w = st.w + 1
  end
  if st.w >= st.n then st.w, st.t = 0, st.now end
  if st.c < 0 then st.c = 0 end
  if st.o == 0 then
    local n = st.n
    if st.c > n * DD_PER_SHARD and n < DD_MAX_SHARDS then
      n = n * 2
    elseif n > 1 and st.c * 4 < n * DD_PER_SHARD then
      n = n / 2
    end
    if n ~= st.n then
      st.o, st.m, st.n, st.w, st.t = st.n, 0, n, 0, st.now
      dd_prefixes(st)
    end
  end
  redis.call('HSET', st.base, 'e', st.e, 'q', -st.q, 'n', st.n, 'o', st.o, 'm', st.m,
             'c', st.c, 'w', st.w, 't', st.t)
  redis.call('EXPIRE', st.base, st.ttl)
end
"""

# KEYS = the de-dup base of each claim's stream; ARGV[1] = window s, ARGV[2] = claims
# (:func:`pack` each), ARGV[3] = mode (c = claim, f = forget), ARGV[4] = the 1-based base of
# each claim, one byte each (one argument, not one per claim: Redis and Lua pay per argument).
# Replies: the old mark of each claim (false where there was none).
_SCRIPT = LUA + f"""
local window, blob, mode, which = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local now = dd_now()
local states = {{}}
for i = 1, #KEYS do states[i] = dd_open(KEYS[i], window, now) end
local out = {{}}
local claim = dd_claim
if mode ~= 'c' then claim = function(st, d) return dd_forget(st, d) end end
local o = 0
for i = 1, #which do
  out[i] = claim(states[string.byte(which, i)], string.sub(blob, o + 1, o + {DIGEST_BYTES}),
                 string.sub(blob, o + {HEX_FROM}, o + {CLAIM_BYTES})) or false
  o = o + {CLAIM_BYTES}
end
for i = 1, #KEYS do dd_close(states[i]) end
return out
"""


# Redis Cluster: KEYS[1] = the de-dup base of every claim, KEYS[2...] = every shard key the call
# may touch, computed by the client from the table (:meth:`Claims._declared`); ARGV[1] =
# window s, ARGV[2] = claims, ARGV[3] = mode, ARGV[4] = the epoch the client saw (or proposes,
# when there is no state). Replies the old marks as ``_SCRIPT`` does, or -1 when a claim's
# shard is not declared (the table moved on since the client read it: read it again).
_DECLARED = LUA + f"""
local window, blob, mode = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local declared = {{}}
for i = 2, #KEYS do declared[KEYS[i]] = true end
local st = dd_open(KEYS[1], window, dd_now(), declared, ARGV[4])
for o = 0, #blob - 1, {CLAIM_BYTES} do
  if not declared[dd_key(st, dd_h(string.sub(blob, o + 1, o + 3)))] then return -1 end
end
local out = {{}}
local i = 1
for o = 0, #blob - 1, {CLAIM_BYTES} do
  local d = string.sub(blob, o + 1, o + {DIGEST_BYTES})
  if mode == 'c' then
    out[i] = dd_claim(st, d, string.sub(blob, o + {HEX_FROM}, o + {CLAIM_BYTES})) or false
  else
    out[i] = dd_forget(st, d) or false
  end
  i = i + 1
end
dd_close(st)
return out
"""


def _shard_keys(base: str, row: Sequence[bytes | str | None], window_s: int,
                digests: Sequence[bytes]) -> tuple[str, list[str]]:
    """The epoch and every shard key a declared call may touch, from the table ``row`` (``e q n
    o m w``): each claim's shard, the shards the sweep may visit, the shards a resize may move
    and their targets — as the scripts compute them."""
    e, q_, n_, o_, m_, w_ = (v.decode() if isinstance(v, bytes) else v for v in row)
    if e is None or q_ is None or int(q_) != -tick(window_s):
        e, n, o, m, w = f"r{int(time.time())}", 1, 0, 0, 0
    else:
        n, o, m, w = int(n_ or 1), int(o_ or 0), int(m_ or 0), int(w_ or 0)
    pre = f"{base}:{e}:"
    keys: dict[str, None] = {}
    for d in digests:
        h = int.from_bytes(d[:3], "big")
        keys[f"{pre}{o}:{h % o}" if o and h % o >= m else f"{pre}{n}:{h % n}"] = None
    if o:
        steps = max(MIN_MOVES, -(-len(digests) // CLAIMS_PER_MOVE))
        for i in range(m, min(o, m + steps)):
            keys[f"{pre}{o}:{i}"] = None
            for t in (range(i % n, n, o) if n > o else [i % n]):
                keys[f"{pre}{n}:{t}"] = None
    sweep_from = 0 if w >= n else w
    for j in range(sweep_from, min(n, sweep_from + MAX_SWEEP + len(digests))):
        keys[f"{pre}{n}:{j}"] = None
    return e, list(keys)


async def declared(redis: Redis, base: str, window_s: int, digests: Sequence[bytes],
                   call: Callable[[str, list[str]], Awaitable[T]],
                   moved_on: Callable[[T], bool]) -> T:
    """``call(epoch, shard keys)``'s reply, given every shard key a call claiming ``digests``
    may touch (:func:`_shard_keys`), read from the table of ``base`` first (one round trip).
    The script must answer "read again" when a claim's shard is not among them (the table
    moved on meanwhile): while ``moved_on(reply)``, the table is read again and the call made
    again, at most :data:`DECLARED_TRIES` times."""
    for _ in range(DECLARED_TRIES):
        row = await redis.hmget(base, ["e", "q", "n", "o", "m", "w"])
        reply = await call(*_shard_keys(base, row, window_s, digests))
        if not moved_on(reply):
            return reply
    raise RuntimeError(f"de-dup table of {base} kept changing over {DECLARED_TRIES} reads")


def _args(keys: Keys, window_s: int, mode: str,
          claims: Sequence[tuple[str, str, bytes]]) -> tuple[list[str], list[bytes | str | int]]:
    bases: dict[str, int] = {}
    blob: list[bytes] = []
    which = bytearray()
    for stream, event_id, m in claims:
        base = keys.dedup(stream)
        bi = bases.get(base)
        if bi is None:
            bi = bases[base] = len(bases) + 1
            if bi > 255:
                raise ValueError("more than 255 de-dup partitions in one call")
        blob.append(pack(event_id, m))
        which.append(bi)
    return list(bases), [window_s, b"".join(blob), mode, bytes(which)]


class Claims:
    """The batched claim script, registered once per client."""

    def __init__(self, redis: Redis, keys: Keys, declare_keys: bool | None = None) -> None:
        """``declare_keys``: declare every shard key a call touches (default: on Redis Cluster
        clients, where a slot move needs it; it costs a table read per call)."""
        self._redis = redis
        self._script = redis.register_script(_SCRIPT)
        self._declared_script = redis.register_script(_DECLARED)
        self._keys = keys
        # On Redis Cluster every key a script touches is declared, so that a call reaching a
        # master while its slot moves is redirected (ASK/TRYAGAIN) rather than missing a shard.
        self._cluster = isinstance(redis, RedisCluster) if declare_keys is None else declare_keys

    @property
    def declares(self) -> bool:
        """Whether calls declare their shard keys (then :meth:`queue` is refused: use
        :meth:`run`, which reads the table first)."""
        return self._cluster

    async def queue(self, pipe: Pipeline, claims: Sequence[tuple[str, str, bytes]],
                    window_s: int) -> None:
        """Queue the claims of ``(stream, event_id, mark)``; the reply is a list of old marks
        (``None`` where the event was new), in order. One script call for every partition:
        one Redis only (:meth:`run` keeps to one slot per call and declares its keys)."""
        if self._cluster:
            raise ValueError("Claims.queue builds its shard keys in Lua: use run() on a "
                             "cluster (a slot move would hide shards not moved yet)")
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
        for base, idx in by_base.items():
            part = [claims[i] for i in idx]
            if self._cluster:
                replies = await self._declared(mode, base, part, window_s)
            else:
                keys, args = _args(self._keys, window_s, mode, part)
                replies = await self._script(keys=keys, args=args)
            for i, r in zip(idx, replies, strict=True):
                out[i] = r or None
        return out

    async def _declared(self, mode: str, base: str, claims: Sequence[tuple[str, str, bytes]],
                        window_s: int) -> list[bytes | None]:
        """One partition's claims with every shard key declared: the table is read first (one
        more round trip), and read again when the script finds it moved on meanwhile."""
        blob = [pack(e, m) for _, e, m in claims]
        digests = [c[:DIGEST_BYTES] for c in blob]
        claimed = b"".join(blob)

        async def call(epoch: str, shards: list[str]) -> Any:
            return await self._declared_script(keys=[base, *shards],
                                               args=[window_s, claimed, mode, epoch])

        reply = await declared(self._redis, base, window_s, digests, call, lambda r: r == -1)
        return reply  # type: ignore[no-any-return]


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
    q = tick(window_s)
    row = [v.encode() if isinstance(v, str) else v
           for v in await redis.hmget(base, ["e", "q", "n", "o", "m"])]
    e, q_, n_, o_, m_ = row
    if e is None or q_ is None or int(q_) != -q:
        return None
    d = digest(event_id)
    h = int.from_bytes(d[:3], "big")
    n, o, m = int(n_ or 1), int(o_ or 0), int(m_ or 0)
    gen, shard = (o, h % o) if o and h % o >= m else (n, h % n)
    score = await redis.zscore(f"{base}:{e.decode()}:{gen}:{shard}", d)
    if score is None:
        return None
    now = int((await redis.time())[0])
    step, value = divmod(int(score), 1 << 32)
    if (step - (TICKS - 1 - now // q % TICKS)) % TICKS > -(-window_s // q):
        return None
    return value.to_bytes(MARK_BYTES, "big")
