"""Event-time order: per device, the event time of the newest value Blynk has per pin.

**Who orders.** Each writes partition (``redis.partitions``) has one egress owner at a time,
through a partition lease (:class:`pipeline.lease.PartitionLeases`, ``keys.egress_lease(p)``),
and a device's entries are all in its partition: one replica writes a device at any time, one
write of it at a time (:mod:`workers.egress`). That replica keeps the device's
:class:`Record` in memory — the event time per pin of the newest value Blynk has, and the
device's rate-limit state (GCRA TAT, :func:`pipeline.ratelimit.gcra`) — and writes it behind to
Redis, into its partition's hash (``keys.records(p)``: field = device key, value = the record),
so the next owner of the partition starts from it.

The protocol of one device write (egress):

1. The first time the owner needs a device after taking its partition, :meth:`LastWritten.load`
   reads its record (``HMGET``: one call for the devices a flush sees first, per partition
   and page of ``_LOAD_PAGE``; a field missing is read from the per-device key of versions
   before the hash, ``keys.last_written``, in the same call, so an upgrade keeps every
   record). After that the record lives in memory (a bounded number of them:
   :mod:`workers.egress.stage`): no Redis call before a write.
2. Drop what is older than recorded (:func:`pipeline.coalesce.drop_stale`: equal event times
   are applied in arrival order; :meth:`Record.stale`: nothing newer at all), take a rate
   slot (:meth:`Record.take`), send the rest to Blynk.
3. After the 2xx, :meth:`Record.merge` records ``max(old, new)`` per pin in memory, and
   :meth:`LastWritten.commit` — once per flush of commits — ``HSET``s the changed records (one
   command per partition, whatever their number) and ``XACK``s the written entries, **after
   checking that the partition's lease still holds the token of the ownership the writes were
   made under** (fencing; :attr:`pipeline.lease.Lease.token`, one per acquisition). A partition
   whose lease holds another token — another owner's, or this replica's own later
   acquisition — has nothing recorded and nothing acked: its entries stay pending and its new
   owner, which took them over, writes them again from the record it read.

**The commit's check and writes are one atomic step.** On one Redis: ``WATCH`` of the flush's
partitions' leases + ``MGET`` of them, then ``MULTI``, the writes of the partitions holding
their token, ``EXEC`` — two round trips on one connection, and no Lua converting the
arguments (device key, record, entry id per write), about half of what a commit script cost
Redis; a lease touched in between (even renewed) aborts the ``EXEC`` and the commit is tried
again (:meth:`LastWritten._commit_multi`, :mod:`pipeline.fenced`). **Redis Cluster**: one
``_COMMIT`` script call per partition, pipelined (a partition's lease, records hash and writes
stream share its slot): redis-py's cluster client runs a ``WATCH`` transaction with a thread
per command, ~14× the script's CPU in the worker.

**Why this is safe.** Without a single writer two replicas can both read "last = 5", then send
20 and 10 in that order: Blynk ends at 10 although the record says 20. With the partition lease
a new owner starts only after the old one stopped sending (an owner sends only while its lease
is certainly held for longer than the Blynk request timeout: :mod:`workers.egress`), and reads
the record only after taking the lease, so it sees every commit the old owner made; what the
old owner sent but could not commit is re-sent (same or newer values, never older ones):
at-least-once, and Blynk only ever moves forward in event time.

**The record** (one hash field's value, the layout of the per-device keys before it, so
records survive an upgrade): a msgpack header ``[0, '', rate-limit TAT µs, when it was last
stored (wall ms), version, newest recorded event ms]`` (the first two were a per-device lease,
always free now; the stamp was "when its expiry was last set" in a per-device key) followed by
the msgpack map ``{pin: event ms}``.

**Expiry.** A record lives ``ttl_ms`` after it was last stored (default 31 days: Blynk refuses
timestamped points older than a month, and no redelivery lives that long; only a manual
``replay`` of an older dead letter could then write an older value), plus up to one pass of
the sweep. Redis 7.0 has no per-field expiry, so the partition's owner sweeps its hash
(:meth:`LastWritten.sweep`: ``HSCAN`` a page at a time, in the background) and deletes the
fields whose stamp is older than the ttl, each only while it still holds the value read (one
script call per page): a record stored meanwhile — by this owner, or by a next owner after the
partition moved — has a new stamp and is kept, so a sweep run by a replica that is no longer
the owner deletes nothing but what any owner would, and needs no fencing. The hash itself
expires 5/4 ``ttl_ms`` after its expiry was last set, set again by a commit once a quarter of
the ttl has passed (per process), so it outlives every record stored in it by the ttl at least
and a partition nobody writes any more leaves nothing behind.

Redis errors propagate (``RedisError``); callers treat them as retryable.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from pipeline import fenced
from pipeline.keys import Keys
from pipeline.ratelimit import gcra
from pipeline.streams import Redis

_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder().decode
DEFAULT_TTL_MS = 31 * 24 * 3600 * 1000

# The cluster layout's commit (one Redis: a WATCHed transaction, LastWritten._commit_multi,
# cheaper for Redis; a cluster client runs such a transaction far more slowly: "Redis Cluster"
# in the module docstring). KEYS = a partition's lease, its records hash, its writes stream;
# ARGV = lease token, group, the hash's expiry (ms), whether to set it ('1'/'0'), records n,
# then n (device key, record) pairs and the entry ids (one argument each: no decoding, no
# cutting, nothing per record in Lua). 1 (recorded and acked) or 0 (the lease does not hold
# the token: nothing done).
_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local last = 5 + 2 * tonumber(ARGV[5])
for j = 6, last, 1000 do
  redis.call('HSET', KEYS[2], unpack(ARGV, j, math.min(j + 999, last)))
end
if ARGV[4] == '1' then
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
for j = last + 1, #ARGV, 1000 do
  redis.call('XACK', KEYS[3], ARGV[2], unpack(ARGV, j, math.min(j + 999, #ARGV)))
end
return 1
"""
#: Tries of a commit whose ``EXEC`` a lease touched meanwhile aborted (``_commit_multi``).
_COMMIT_TRIES = fenced.TRIES

# KEYS = a partition's records hash, then the per-device keys of the fields (versions before
# the hash: an upgrade); ARGV = the fields → their values (nil: none), the hash's first.
_LOAD = """
local got = redis.call('HMGET', KEYS[1], unpack(ARGV))
local miss, old = {}, {}
for i = 1, #got do
  if not got[i] then
    miss[#miss + 1] = i
    old[#old + 1] = KEYS[i + 1]
  end
end
if #old > 0 then
  local was = redis.call('MGET', unpack(old))
  for j = 1, #miss do
    got[miss[j]] = was[j]
  end
end
return got
"""
#: Records read per call (Lua's unpack has a limit of a few thousand values).
_LOAD_PAGE = 1000

# KEYS[1] = a records hash; ARGV = (field, value) pairs: each field is deleted only while it
# still holds that value (a store since, by whichever owner, changed it).
_SWEEP = """
local n = 0
for i = 1, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    n = n + redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
return n
"""


def wall_us() -> int:
    """The wall clock in µs: the rate-limit state's timeline (kept in records, so a new owner
    of the partition goes on from it)."""
    return time.time_ns() // 1000


@dataclass(slots=True)
class Record:
    """One device's record, as its writer holds it (module docstring)."""

    #: Pin → event time (ms) of the value Blynk has; pins never written are absent.
    pins: dict[str, int] = field(default_factory=dict)
    #: The rate limit's theoretical arrival time (µs, wall clock).
    tat_us: int = 0
    #: When the record was last stored (wall ms; 0 = never; with per-device keys: when its
    #: expiry was last set).
    stored_ms: int = 0
    #: How often the pin map changed.
    version: int = 0
    #: The newest event time in ``pins`` (-1: none).
    newest: int = -1
    #: Changed in memory since it was last handed to a commit (not stored).
    dirty: bool = False

    def stale(self, newest: Mapping[str, int]) -> bool:
        """Every value (``pin → newest event time to send``) older than recorded: nothing to
        send (equal times are sent: applied in arrival order)."""
        if max(newest.values(), default=-2) >= self.newest:
            return False
        pins = self.pins
        return all(pin in pins and ts < pins[pin] for pin, ts in newest.items())

    def merge(self, written: Mapping[str, int]) -> bool:
        """Record ``written`` (pin → event time now in Blynk; only ever moves forward); True
        when something changed."""
        changed = False
        pins = self.pins
        for pin, ts in written.items():
            last = pins.get(pin)
            if last is None or ts > last:
                pins[pin] = ts
                if ts > self.newest:
                    self.newest = ts
                changed = True
        if changed:
            self.version += 1
        return changed

    def take(self, interval_us: int, burst: int, now_us: int | None = None) -> float:
        """One request of the device's rate limit: ``0.0`` granted and counted, else seconds
        to wait (nothing counted)."""
        wait, self.tat_us = gcra(self.tat_us, wall_us() if now_us is None else now_us,
                                 interval_us, burst)
        return wait / 1_000_000

    def defer(self, seconds: float) -> None:
        """No request for ``seconds`` from now (a 429's ``Retry-After``)."""
        self.tat_us = max(self.tat_us, wall_us() + int(seconds * 1_000_000))


def decode(raw: bytes | str | None) -> Record:
    """A record as stored (``None``: the device was never written)."""
    if not raw:
        return Record()
    if isinstance(raw, str):  # a client decoding replies (the bridge's do not)
        raw = raw.encode("utf-8", "surrogateescape")
    header, pins = _split(raw)
    return Record(pins={_s(k): int(v) for k, v in pins.items()},
                  tat_us=int(header[2]), stored_ms=int(header[3]), version=int(header[4]),
                  newest=int(header[5]))


def encode(record: Record, *, stored_ms: int | None = None) -> bytes:
    """A record as stored (module docstring); ``stored_ms`` instead of its own."""
    stored = record.stored_ms if stored_ms is None else stored_ms
    return _pack([0, "", record.tat_us, stored, record.version, record.newest]) \
        + _pack(record.pins)


_INT_SIZES = {0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8, 0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8,
              0xca: 4, 0xcb: 8}


def _split(raw: bytes) -> tuple[list[int], dict[str | bytes, int]]:
    """A stored record's header and pin map (an empty map may be stored as an empty array).

    msgpack has no length for a whole object, so the header's end is found by stepping over
    its items: a fixarray of numbers and one (empty or short) string."""
    if not raw or not 0x90 <= raw[0] <= 0x9f:
        raise ValueError("not a record")
    at = 1
    for _ in range(raw[0] & 0x0F):
        b = raw[at]
        if b <= 0x7f or b >= 0xe0 or b == 0xc0:
            at += 1
        elif b in _INT_SIZES:
            at += 1 + _INT_SIZES[b]
        elif 0xa0 <= b <= 0xbf:
            at += 1 + (b & 0x1F)
        elif b in (0xd9, 0xc4):
            at += 2 + raw[at + 1]
        else:
            raise ValueError(f"not a record (byte {b:#x} in its header)")
    header = _unpack(raw[:at])
    pins = _unpack(raw[at:]) if at < len(raw) else {}
    return list(header), pins if isinstance(pins, dict) else {}


def _s(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass(slots=True)
class PartitionCommit:
    """What one commit call writes for one partition."""

    #: The partition's writes stream (its entries are acked there).
    stream: str
    #: The partition's lease token of the ownership the writes were made under
    #: (:attr:`pipeline.lease.Lease.token`): nothing is done unless the lease still holds it.
    token: str
    records: list[tuple[str, Record]] = field(default_factory=list)
    acks: list[str] = field(default_factory=list)


class LastWritten:
    """Records in Redis: loading them, committing them with the acks (fenced by the partition
    lease's token), sweeping the expired ones, and reading one (tools)."""

    def __init__(self, redis: Redis, keys: Keys, *, ttl_ms: int = DEFAULT_TTL_MS) -> None:
        self._redis = redis
        self._keys = keys
        self.ttl_ms = ttl_ms
        self._commit = redis.register_script(_COMMIT)
        self._load = redis.register_script(_LOAD)
        self._sweep = redis.register_script(_SWEEP)
        #: Partition → when (wall ms) this process last set its hash's expiry.
        self._expiry_set: dict[int, int] = {}

    async def load(self, device_keys: Sequence[str], partitions: Sequence[int] | None = None
                   ) -> list[Record]:
        """The records of ``device_keys`` (in ``partitions``, the writes partitions their
        entries came from; default: each key's own): per partition and page of up to
        ``_LOAD_PAGE``, one script call (``HMGET`` of the partition's hash, then ``MGET`` of
        the per-device keys of the fields missing: an upgrade), pipelined."""
        if not device_keys:
            return []
        keys = self._keys
        if partitions is None:
            partitions = [keys.partition_of_device_key(k) for k in device_keys]
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(partitions):
            groups.setdefault(p, []).append(i)
        calls = [(p, idx[i:i + _LOAD_PAGE]) for p, idx in groups.items()
                 for i in range(0, len(idx), _LOAD_PAGE)]
        lw = keys.last_written
        got = await self._calls(self._load, [
            ([keys.records(p), *(lw(device_keys[i]) for i in idx)],
             [device_keys[i] for i in idx]) for p, idx in calls])
        out: list[Record] = [Record()] * len(device_keys)
        for (_, idx), raws in zip(calls, got, strict=True):
            for i, r in zip(idx, raws, strict=True):
                out[i] = decode(r)
        return out

    async def commit(self, parts: Mapping[int, PartitionCommit], group: str, *,
                     now_ms: int | None = None) -> dict[int, bool]:
        """Per partition ``p``: if ``keys.egress_lease(p)`` holds its ``token``, ``HSET`` its
        records (one command) into ``keys.records(p)``, stamped now, and ``XACK`` its entries
        for ``group`` — on one Redis one ``WATCH``ed transaction for all of them
        (:meth:`_commit_multi`), in the cluster layout one ``_COMMIT`` script call per
        partition, pipelined. Returns per partition whether it was done (``False``: fenced off,
        nothing written or acked). ``now_ms``: the wall clock (ms) stamped (default: now).
        """
        if not parts:
            return {}
        now = int(time.time() * 1000) if now_ms is None else now_ms
        if self._keys.cluster:
            order = list(parts)
            replies = await self._calls(self._commit, [self._commit_call(p, parts[p], group, now)
                                                       for p in order])
            done = {p: bool(r) for p, r in zip(order, replies, strict=True)}
        else:
            done = await self._commit_multi(parts, group, now)
        for p, ok in done.items():
            if ok:
                if self._expire_due(p, now):
                    self._expiry_set[p] = now
                for _, rec in parts[p].records:
                    rec.stored_ms = now
        return done

    def _expire_due(self, p: int, now: int) -> bool:
        """A commit of partition ``p`` now sets its hash's expiry (module docstring)."""
        expire_every = self.ttl_ms // 4
        return now - self._expiry_set.get(p, -expire_every) >= expire_every

    async def _commit_multi(self, parts: Mapping[int, PartitionCommit], group: str, now: int
                            ) -> dict[int, bool]:
        """:meth:`commit` on one Redis: a fenced transaction (:func:`pipeline.fenced.transact`)
        that ``WATCH``es every partition's lease and reads them (:meth:`_held`), then runs, in
        ``MULTI``, per partition whose lease holds its token ``HSET`` + ``PEXPIRE`` when due +
        ``XACK`` (:meth:`_writes`): two round trips, the arguments never converted by Lua.

        A lease touched between the read and the ``EXEC`` aborts it and the commit is tried
        again: a renewal by this owner (``PEXPIRE``) keeps the token, so the retry commits; a
        new ownership's token fences the partition off. Renewals come every ttl/4 per
        partition, so a second abort in a row means the lease keeps changing: after
        ``_COMMIT_TRIES`` a ``WatchError`` (a ``RedisError``) goes to the caller, as any Redis
        error, with nothing written. Raw commands on a pooled connection: a redis-py
        pipeline's ``WATCH`` mode cost the worker ~2–2.5× the script's CPU per small commit,
        this ~1.3× (BENCHMARKS.md, "Egress commit: WATCH + MULTI instead of a script")."""
        order = list(parts)

        def plan(held: list[Any]) -> tuple[list[tuple[Any, ...]], dict[int, bool]]:
            done = {p: h is not None and _s(h) == parts[p].token
                    for p, h in zip(order, held, strict=True)}
            return self._writes(parts, done, group, now), done

        return await fenced.transact(self._redis, [self._keys.egress_lease(p) for p in order],
                                     plan, tries=_COMMIT_TRIES, read=self._held,
                                     what="egress leases")

    async def _held(self, conn: Any, leases: Sequence[str]) -> list[Any]:
        """``WATCH`` ``leases`` on ``conn`` and read them (one round trip; a test's hook)."""
        return await fenced.held(conn, leases)

    def _writes(self, parts: Mapping[int, PartitionCommit], done: Mapping[int, bool],
                group: str, now: int) -> list[tuple[Any, ...]]:
        """The commands of the partitions ``done`` says hold their token (none: nothing to
        do)."""
        px = self.ttl_ms + self.ttl_ms // 4
        commands: list[tuple[Any, ...]] = []
        for p, ok in done.items():
            part = parts[p]
            if not ok:
                continue
            if part.records:
                records = self._keys.records(p)
                fields: list[bytes | str] = []
                for device_key, rec in part.records:
                    fields += (device_key, encode(rec, stored_ms=now))
                commands.append(("HSET", records, *fields))
                if self._expire_due(p, now):
                    commands.append(("PEXPIRE", records, px))
            if part.acks:
                commands.append(("XACK", part.stream, group, *part.acks))
        return commands

    def _commit_call(self, p: int, part: PartitionCommit, group: str, now: int
                     ) -> tuple[list[str], list[bytes | str]]:
        """Keys and arguments of one ``_COMMIT`` call (the cluster layout)."""
        keys = self._keys
        args: list[bytes | str] = [part.token, group, str(self.ttl_ms + self.ttl_ms // 4),
                                   "1" if self._expire_due(p, now) else "0",
                                   str(len(part.records))]
        for device_key, rec in part.records:
            args += (device_key, encode(rec, stored_ms=now))
        args += part.acks
        return [keys.egress_lease(p), keys.records(p), part.stream], args

    async def sweep(self, partition: int, cursor: int = 0, *, count: int = 1000,
                    now_ms: int | None = None) -> tuple[int, int]:
        """One step of the sweep of a partition's records (:meth:`expired` then
        :meth:`drop_expired`): the next cursor (0: the pass is over) and how many were
        deleted."""
        cursor, found = await self.expired(partition, cursor, count=count, now_ms=now_ms)
        return cursor, await self.drop_expired(partition, found)

    async def expired(self, partition: int, cursor: int = 0, *, count: int = 1000,
                      now_ms: int | None = None) -> tuple[int, list[tuple[Any, Any]]]:
        """``HSCAN`` of a partition's records from ``cursor`` (about ``count`` fields): the
        next cursor (0: the pass is over) and the ``(field, value)`` of those last stored
        more than ``ttl_ms`` before ``now_ms`` (default: now)."""
        cursor, fields = await self._redis.hscan(self._keys.records(partition), cursor,
                                                 count=count)
        oldest = (int(time.time() * 1000) if now_ms is None else now_ms) - self.ttl_ms
        found: list[tuple[Any, Any]] = []
        for name, raw in (fields.items() if isinstance(fields, dict) else ()):
            try:
                stored = int(_split(raw if isinstance(raw, bytes) else raw.encode(
                    "utf-8", "surrogateescape"))[0][3])
            except (ValueError, IndexError, TypeError, msgspec.DecodeError):
                continue  # not a record: left alone
            if stored < oldest:
                found.append((name, raw))
        return int(cursor), found

    async def drop_expired(self, partition: int, found: Sequence[tuple[Any, Any]]) -> int:
        """Delete the fields :meth:`expired` found, each only while it still holds the value
        it had then (one script call); how many were deleted."""
        if not found:
            return 0
        return int(await self._sweep(keys=[self._keys.records(partition)],
                                     args=[x for pair in found for x in pair]))

    async def _calls(self, script: Any, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
                     ) -> list[Any]:
        """The replies of ``script`` for each ``(keys, args)``: one call on its own (no
        pipeline: a pipeline asks ``SCRIPT EXISTS`` first), several pipelined."""
        if len(calls) == 1:
            keys, args = calls[0]
            return [await script(keys=keys, args=args)]
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                await script(keys=keys, args=args, client=pipe)
            return list(await pipe.execute())

    async def get(self, device_key: str) -> dict[str, int]:
        """Every recorded pin of a device (for tests and the CLI)."""
        return (await self.load([device_key]))[0].pins
