"""Event-time order: per device, the event time of the newest value Blynk has per pin.

**Who orders.** Each writes partition (``redis.partitions``) has one egress owner at a time,
through a partition lease (:class:`pipeline.lease.PartitionLeases`, ``keys.egress_lease(p)``),
and a device's entries are all in its partition: one replica writes a device at any time, one
write of it at a time (:mod:`workers.egress`). That replica keeps the device's
:class:`Record` in memory — the event time per pin of the newest value Blynk has, and the
device's rate-limit state (GCRA TAT, :func:`pipeline.ratelimit.gcra`) — and writes it behind to
Redis (``keys.last_written(device_key)``), so the next owner of the partition starts from it.

The protocol of one device write (egress):

1. The first time the owner needs a device after taking its partition, :meth:`LastWritten.load`
   reads its record (``MGET``: one call for the devices a flush sees first, per page of
   ``_LOAD_PAGE`` and, on a cluster, per partition). After that the record lives in memory (a
   bounded number of them: :mod:`workers.egress.stage`): no Redis call before a write.
2. Drop what is older than recorded (:func:`pipeline.coalesce.drop_stale`: equal event times
   are applied in arrival order; :meth:`Record.stale`: nothing newer at all), take a rate
   slot (:meth:`Record.take`), send the rest to Blynk.
3. After the 2xx, :meth:`Record.merge` records ``max(old, new)`` per pin in memory, and
   :meth:`LastWritten.commit` — one script call per flush of commits (one per partition on a
   cluster) — ``SET``s the changed records and ``XACK``s the written entries, **after checking
   that the partition's lease still holds the token of the ownership the writes were made
   under** (fencing; :attr:`pipeline.lease.Lease.token`, one per acquisition). A partition
   whose lease holds another token — another owner's, or this replica's own later
   acquisition — has nothing recorded and nothing acked: its entries stay pending and its new
   owner, which took them over, writes them again from the record it read.

**Why this is safe.** Without a single writer two replicas can both read "last = 5", then send
20 and 10 in that order: Blynk ends at 10 although the record says 20. With the partition lease
a new owner starts only after the old one stopped sending (an owner sends only while its lease
is certainly held for longer than the Blynk request timeout: :mod:`workers.egress`), and reads
the record only after taking the lease, so it sees every commit the old owner made; what the
old owner sent but could not commit is re-sent (same or newer values, never older ones):
at-least-once, and Blynk only ever moves forward in event time.

**The record** (one string, the layout of the per-device lease design before it, so records
survive an upgrade): a msgpack header ``[0, '', rate-limit TAT µs, when its expiry was last
set (ms), version, newest recorded event ms]`` (the first two were a per-device lease, always
free now) followed by the msgpack map ``{pin: event ms}``. Records expire ``ttl_ms`` to 5/4
``ttl_ms`` after a device's last write (default 31 days: Blynk refuses timestamped points
older than a month, and no redelivery lives that long; only a manual ``replay`` of an older
dead letter could then write an older value). The expiry is set again only once a quarter of
the ttl has passed (``KEEPTTL`` otherwise): setting it costs Redis more than the ``SET``.

Redis errors propagate (``RedisError``); callers treat them as retryable.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from pipeline.keys import Keys
from pipeline.ratelimit import gcra
from pipeline.streams import Redis

_pack = msgspec.msgpack.Encoder().encode
_unpack = msgspec.msgpack.Decoder().decode
DEFAULT_TTL_MS = 31 * 24 * 3600 * 1000

# KEYS = per partition: its lease, its records, its writes stream; ARGV[1] = msgpack [group,
# px, [[records, [the 1-based indices of the records to SET with PX px, ascending], entry ids,
# lease token] per partition]]; ARGV[2…] = per partition its records' values, then its entry
# ids (one argument each: no decoding, no cutting in Lua). The other records are SET with
# KEEPTTL. Per partition: 1 (recorded and acked) or 0 (the lease does not hold the token:
# nothing done).
_COMMIT = """
local p = cmsgpack.unpack(ARGV[1])
local group, px, parts = p[1], p[2], p[3]
local k, a, out = 1, 2, {}
for i = 1, #parts do
  local n, expire, ids, token = parts[i][1], parts[i][2], parts[i][3], parts[i][4]
  if redis.call('GET', KEYS[k]) == token then
    local e = 1
    for r = 1, n do
      if expire[e] == r then
        redis.call('SET', KEYS[k + r], ARGV[a + r - 1], 'PX', px)
        e = e + 1
      else
        redis.call('SET', KEYS[k + r], ARGV[a + r - 1], 'KEEPTTL')
      end
    end
    local last = a + n + ids - 1
    for j = a + n, last, 1000 do
      redis.call('XACK', KEYS[k + n + 1], group, unpack(ARGV, j, math.min(j + 999, last)))
    end
    out[i] = 1
  else
    out[i] = 0
  end
  k, a = k + n + 2, a + n + ids
end
return out
"""


# KEYS = records → their values (nil: none).
_LOAD = "return redis.call('MGET', unpack(KEYS))"
#: Records read per call (Lua's unpack has a limit of a few thousand values).
_LOAD_PAGE = 1000


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
    #: When the record's expiry was last set (wall ms; 0 = never).
    expiry_ms: int = 0
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
                  tat_us=int(header[2]), expiry_ms=int(header[3]), version=int(header[4]),
                  newest=int(header[5]))


def encode(record: Record, *, expiry_ms: int | None = None) -> bytes:
    """A record as stored (module docstring); ``expiry_ms`` instead of its own."""
    expiry = record.expiry_ms if expiry_ms is None else expiry_ms
    return _pack([0, "", record.tat_us, expiry, record.version, record.newest]) \
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
    lease's token), and reading one (tools)."""

    def __init__(self, redis: Redis, keys: Keys, *, ttl_ms: int = DEFAULT_TTL_MS) -> None:
        self._redis = redis
        self._keys = keys
        self.ttl_ms = ttl_ms
        self._commit = redis.register_script(_COMMIT)
        self._load = redis.register_script(_LOAD)

    async def load(self, device_keys: Sequence[str]) -> list[Record]:
        """The records of ``device_keys``: ``MGET``s of up to ``_LOAD_PAGE`` keys, pipelined
        (in the cluster layout each in one partition's slot, through a script: a cluster
        pipeline refuses ``MGET``)."""
        if not device_keys:
            return []
        lw = self._keys.last_written
        groups: dict[int, list[int]] = {}
        if self._keys.cluster:
            for i, k in enumerate(device_keys):
                groups.setdefault(self._keys.partition_of_device_key(k), []).append(i)
        else:
            groups[0] = list(range(len(device_keys)))
        calls = [idx[i:i + _LOAD_PAGE] for idx in groups.values()
                 for i in range(0, len(idx), _LOAD_PAGE)]
        got = await self._calls(self._load, [([lw(device_keys[i]) for i in idx], [])
                                             for idx in calls])
        out: list[Record] = [Record()] * len(device_keys)
        for idx, raws in zip(calls, got, strict=True):
            for i, r in zip(idx, raws, strict=True):
                out[i] = decode(r)
        return out

    async def commit(self, parts: Mapping[int, PartitionCommit], group: str
                     ) -> dict[int, bool]:
        """Per partition ``p``: if ``keys.egress_lease(p)`` holds its ``token``, ``SET`` its
        records and ``XACK`` its entries for ``group`` (one script call for all of them on one
        Redis; one per partition, pipelined, in the cluster layout). Returns per partition
        whether it was done (``False``: fenced off, nothing written or acked)."""
        if not parts:
            return {}
        now = int(time.time() * 1000)
        order = list(parts)
        calls = [order] if not self._keys.cluster else [[p] for p in order]
        replies = await self._calls(self._commit, [self._commit_call(call, parts, group, now)
                                                   for call in calls])
        done: dict[int, bool] = {}
        for call, reply in zip(calls, replies, strict=True):
            for p, r in zip(call, reply, strict=True):
                done[p] = bool(r)
                if r:
                    for _, rec in parts[p].records:
                        if self._expire_again(rec, now):
                            rec.expiry_ms = now
        return done

    def _commit_call(self, call: Sequence[int], parts: Mapping[int, PartitionCommit],
                     group: str, now: int) -> tuple[list[str], list[bytes | str]]:
        """Keys and arguments of one ``_COMMIT`` call."""
        lw = self._keys.last_written
        keys: list[str] = []
        values: list[bytes | str] = []
        spec: list[tuple[int, list[int], int, str]] = []
        for p in call:
            part = parts[p]
            keys.append(self._keys.egress_lease(p))
            expire: list[int] = []
            for r, (device_key, rec) in enumerate(part.records, 1):
                keys.append(lw(device_key))
                if self._expire_again(rec, now):
                    expire.append(r)
                    values.append(encode(rec, expiry_ms=now))
                else:
                    values.append(encode(rec))
            keys.append(part.stream)
            values += part.acks
            spec.append((len(part.records), expire, len(part.acks), part.token))
        return keys, [_pack([group, self.ttl_ms + self.ttl_ms // 4, spec]), *values]

    def _expire_again(self, record: Record, now: int) -> bool:
        """The record's expiry is set again by this commit (and stored so): a quarter of the
        ttl has passed since it last was (module docstring; ``KEEPTTL`` otherwise)."""
        return now - record.expiry_ms >= self.ttl_ms // 4

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
        return decode(await self._redis.get(self._keys.last_written(device_key))).pins
