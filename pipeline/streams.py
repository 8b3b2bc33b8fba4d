"""Redis Streams: a batching writer, a consumer-group reader, and the dead-letter sink.

Contract (every stage relies on it):

* :meth:`StreamWriter.add` returns only after ``XADD`` returned: once it has, the entry is in
  Redis. Concurrent ``add`` calls are group-committed into one pipeline (no added latency at low
  load, one round trip per burst at high load); on a Redis Cluster, one group commit per
  stream, so a stopped master holds up only the appends to its partitions.
* :meth:`StreamReader.read` returns a batch of entries for this consumer, in this order of
  preference: its own pending entries (left by a crash or a retryable failure), entries idle past
  ``claim_idle_ms`` in other consumers' pending lists (``XAUTOCLAIM`` — dead consumers), then new
  entries, blocking up to ``block_ms``. An empty list means nothing arrived in that time.
* Nothing is acknowledged by reading. The caller acks with :meth:`StreamReader.ack` after the
  next hop has the output, or hands the entry to :meth:`StreamReader.dead_letter`, which writes a
  :class:`~pipeline.events.DeadLetter` and then acks (:meth:`StreamReader.dead_letter_fenced`:
  both in one script, only while a lease holds the caller's token).
* New entries are read at once: a batch holds what arrived while the caller handled the
  previous one (natural batching), so at low load an entry waits for no timer. Only while more
  than ``linger_above_per_s`` new entries per second are read (:class:`~pipeline.batching
  .Linger`; 0 = always), a blocking read that follows a *small* batch of new entries (fewer
  than ``batch``) first waits until ``linger_ms`` after that batch was read, so that at high
  rates batches fill instead of carrying a few entries each (every batch costs the caller round
  trips and CPU). It adds at most ``linger_ms`` to an entry's latency, none below that rate,
  none after an idle period and none under full load (full batches).
* Entries delivered more than ``max_deliveries`` times are dead-lettered by the reader itself
  (reason ``max_deliveries``) and never returned, so a poison entry cannot block a stream.
* Redis errors propagate as ``redis.exceptions.RedisError``; callers treat them as retryable.
* In the cluster layout (:attr:`pipeline.keys.Keys.cluster`) each partition (one slot) is read
  on its own: at most one read in flight per partition (own pending, reclaimed or new entries,
  as above, each partition on its own; new ones with its own ``XREADGROUP … BLOCK``), and
  :meth:`StreamReader.read` hands out the batch of ONE partition — the first ready, taking
  turns — so the caller commits each batch in one slot and a master that does not answer
  holds up only its own partitions' batches. A batch read and not handed out yet waits, pending
  for this consumer, for a later :meth:`StreamReader.read` (at most one per partition), or is
  given back by :meth:`StreamReader.close` (:meth:`StreamReader.release`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.utils import HIREDIS_AVAILABLE

from pipeline import events, metrics
from pipeline.batching import DEFAULT_LINGER_ABOVE_PER_S, GroupCommit, Linger
from pipeline.errors import Reason
from pipeline.keys import Keys

if HIREDIS_AVAILABLE:
    from hiredis import pack_command as _hiredis_pack

Redis = aioredis.Redis


@dataclass(slots=True)
class Entry:
    """One stream entry as read by a consumer."""

    stream: str
    id: str
    #: The encoded event (the ``d`` field); ``None`` when the entry has no such field.
    data: bytes | None
    #: How many times this entry has been delivered, this delivery included.
    deliveries: int = 1
    fields: dict[bytes, bytes] = field(default_factory=dict)

    def __repr__(self) -> str:
        # The raw event holds the device's Blynk token in clear: show its size only.
        size = "None" if self.data is None else f"<{len(self.data)} bytes>"
        return (f"Entry(stream={self.stream!r}, id={self.id!r}, data={size}, "
                f"deliveries={self.deliveries}, fields=<{len(self.fields)}>)")


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def now_ms() -> int:
    return time.time_ns() // 1_000_000


#: Append every ARGV as one entry (field ``d``) of the stream KEYS[1]; returns the ids in order.
_APPEND = """
local ids = {}
for i = 1, #ARGV do
  ids[i] = redis.call('XADD', KEYS[1], '*', 'd', ARGV[i])
end
return ids
"""


class StreamWriter:
    """Appends entries with pipelined ``XADD``; concurrent callers share one round trip.

    On a Redis Cluster each stream (partition) has a group commit of its own, so a master that
    does not answer holds up only the appends to its own partitions: one shared group commit
    runs one batch at a time, and a batch waiting for that master would hold up every append
    behind it."""

    def __init__(self, redis: Redis, *, max_batch: int = 1000) -> None:
        self._redis = redis
        self._append = redis.register_script(_APPEND)
        self._max_batch = max_batch
        # Concurrent add() calls of one loop iteration share one add_many().
        self._adds: GroupCommit[tuple[str, bytes], str] = GroupCommit(
            self.add_many, max_batch=max_batch, name="stream-writer-flush")
        self._per_stream: dict[str, GroupCommit[tuple[str, bytes], str]] | None = (
            {} if isinstance(redis, RedisCluster) else None)

    def add(self, stream: str, data: bytes) -> Awaitable[str]:
        """Append one entry; awaiting it gives its id once ``XADD`` returned, or raises
        ``RedisError``. (A plain function returning the group commit's future: one coroutine
        less per webhook on ingest-http's hot path.)"""
        if self._per_stream is None:
            return self._adds.submit((stream, data))
        adds = self._per_stream.get(stream)
        if adds is None:
            adds = self._per_stream[stream] = GroupCommit(
                self.add_many, max_batch=self._max_batch, name="stream-writer-flush")
        return adds.submit((stream, data))

    async def add_many(self, items: Sequence[tuple[str, bytes]]) -> list[str]:
        """Append many entries (one Lua call per stream, pipelined); returns ids in order.

        One script call that loops over ``XADD`` instead of one command per entry: redis-py's
        cost of building each command outweighs the Redis work (figures: BENCHMARKS.md,
        ``bench/ingest_mqtt.py``). The script touches one key (Redis Cluster safe), so a batch is
        all-or-nothing per stream. (Packing a batch into two arguments would save redis-py ~0.6
        µs per entry but cost Redis ~0.3-0.5 µs more per entry to cut them apart: Redis is the
        ceiling of a deployment, ingest is not. BENCHMARKS.md, ingest-http.)
        """
        if not items:
            return []
        first = items[0][0]
        if all(stream == first for stream, _ in items):  # the usual batch: one partition
            reply = await self._append(keys=[first], args=[d for _, d in items])
            return [_s(entry_id) for entry_id in reply]
        by_stream: dict[str, list[int]] = {}
        for i, (stream, _) in enumerate(items):
            by_stream.setdefault(stream, []).append(i)
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream, idx in by_stream.items():
                await self._append(keys=[stream], args=[items[i][1] for i in idx], client=pipe)
            replies = await pipe.execute()
        ids = [""] * len(items)
        for idx, reply in zip(by_stream.values(), replies, strict=True):
            for i, entry_id in zip(idx, reply, strict=True):
                ids[i] = _s(entry_id)
        return ids

    async def close(self) -> None:
        """Wait until every buffered entry was written."""
        await self._adds.close()
        for adds in list((self._per_stream or {}).values()):
            await adds.close()


#: An entry to dead-letter: ``(entry, reason, detail)``.
DeadItem = tuple[Entry, Reason, str]
#: Cluster layout: how long one round of blocking per-partition reads waits before the next
#: round, for a reader that polls the partitions in rounds (blynk-sessions' ``XREAD``s; one
#: ``BLOCK`` cannot span slots). :class:`StreamReader` blocks on each partition on its own.
CLUSTER_POLL_MS = 50


@dataclass(slots=True, eq=False)
class _Pass:
    """Where :class:`StreamReader` stands in reading some streams: the whole set on one Redis,
    one partition's stream on a cluster (:class:`_Partition`)."""

    #: This consumer's pending list is to be read (a pass, :meth:`StreamReader.retry_pending`;
    #: at start: entries a previous run left behind).
    own_pending: bool = True
    #: When idle entries of other consumers are next claimed (monotonic clock).
    next_claim: float = 0.0
    #: When the last small (0 < n < batch) batch of new entries was read, if the next read
    #: should linger after it.
    linger_from: float | None = None


@dataclass(slots=True, eq=False)
class _Partition(_Pass):
    """Cluster layout: what :class:`StreamReader` keeps of one partition's reads."""

    stream: str = ""
    #: The read in flight, or done and not handed out yet: at most one per partition.
    read: asyncio.Task[list[Entry]] | None = None
    #: Its entries are to be given back, not handed out (a retry was asked for meanwhile).
    stale: bool = False


# KEYS = the fence (a lease), the dead stream, the stream; ARGV = token, group, field, letters
# n, the n letters, then the entry ids. 1: dead-lettered and acked; 0: the fence does not hold
# the token, nothing done.
_DEAD_FENCED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local n = tonumber(ARGV[4])
for i = 5, 4 + n do
  redis.call('XADD', KEYS[2], '*', ARGV[3], ARGV[i])
end
local last = #ARGV
for j = 5 + n, last, 1000 do
  redis.call('XACK', KEYS[3], ARGV[2], unpack(ARGV, j, math.min(j + 999, last)))
end
return 1
"""


#: :meth:`StreamReader.take_over`'s page from the cursor ARGV[3]: ``{next cursor, how many}``
#: (redis-py's reply parser drops the cursor of ``XAUTOCLAIM … JUSTID``).
_TAKE_OVER = """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'COUNT', 1000,
                     'JUSTID')
return {r[1], #r[2]}
"""


class StreamReader:
    """Reads one consumer group over one or more streams (the partitions of one stream)."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        streams: Sequence[str],
        group: str,
        consumer: str,
        *,
        stage: str,
        batch: int = 500,
        block_ms: int = 2000,
        claim_idle_ms: int = 30_000,
        max_deliveries: int = 5,
        linger_ms: int = 0,
        linger_above_per_s: float = DEFAULT_LINGER_ABOVE_PER_S,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.streams = list(streams)
        self.group = group
        self.consumer = consumer
        self.stage = stage
        self.batch = batch
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.linger_ms = linger_ms
        self._linger = Linger(linger_ms / 1000, linger_above_per_s)
        #: One Redis: where reading all the streams together stands.
        self._pass = _Pass()
        #: Where the next own-pending read starts, per stream: entries before it were served
        #: in this pass (they may still be held, unacked, by the caller).
        self._pending_cursor = dict.fromkeys(self.streams, "0-0")
        self._claim_cursor = {s: "0-0" for s in self.streams}
        #: Cluster layout: each partition read on its own (module docstring).
        self._parts: list[_Partition] | None = (
            [_Partition(stream=s) for s in self.streams] if keys.cluster and len(self.streams) > 1
            else None)
        #: Cluster layout: the partition whose ready batch goes first (they take turns).
        self._turn = 0
        self._dead_fenced: Any = None  # the script, registered on first use
        self._take_over: Any = None  # the script, registered on first use

    async def ensure_group(self) -> None:
        """Create the group (from the start of the stream) unless it exists. Idempotent."""
        for stream in self.streams:
            try:
                await self._redis.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def retry_pending(self) -> None:
        """Ask the next :meth:`read` to deliver this consumer's pending entries again, from
        the oldest (after a retryable failure left a batch unacked)."""
        self._pass.own_pending = True
        self._pending_cursor = dict.fromkeys(self.streams, "0-0")
        for p in self._parts or ():
            p.own_pending = True
            # A batch read ahead (in flight or ready) is given back, not handed out: its
            # entries come again in this partition's pass, after the ones before them.
            p.stale = p.read is not None

    async def read(self, *, block: bool = True) -> list[Entry]:
        """One batch: own pending, then reclaimed, then new entries (see module docstring).
        Not to be called again before it returned."""
        if self._parts is not None:
            return await self._read_partitions(self._parts, block)
        return await self._read(block)

    async def close(self) -> None:
        """Cluster layout: finish the reads still in flight and give back what they read
        (:meth:`release`: pending for this consumer, the delivery count as before), so the
        next :meth:`read` — or another consumer's claim, after ``claim_idle_ms`` — delivers
        them. Waits for a partition whose master does not answer (up to the client's socket
        timeout)."""
        reads = [p.read for p in self._parts or () if p.read is not None]
        if not reads:
            return
        await asyncio.wait(reads)
        back: list[Entry] = []
        for p in self._parts or ():
            if p.read is not None:
                back.extend(self._take_back(p))
        await self.release(back)

    def _take_back(self, p: _Partition) -> list[Entry]:
        """Cluster layout: what ``p``'s finished read got, taken off it to be given back
        (:meth:`release`), not handed out. The partition's pass starts over: the read may have
        moved the cursor, or ended a pass begun before a retry."""
        read, p.read, p.stale, p.own_pending = p.read, None, False, True
        self._pending_cursor[p.stream] = "0-0"
        assert read is not None
        return _result_of(read)

    def _start_read(self, p: _Partition, block: bool) -> None:
        """Cluster layout: ``p``'s next read, in flight."""
        p.read = asyncio.create_task(self._read_partition(p, block), name=f"read-{p.stream}")

    async def _read_partitions(self, parts: list[_Partition], block: bool) -> list[Entry]:
        """Cluster layout: the next ready batch of one partition, a read kept in flight for
        every other; blocking up to ``block_ms`` for one (module docstring)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.block_ms / 1000
        answered: set[int] = set()  # partitions found empty in this call
        while True:
            for i, p in enumerate(parts):
                if p.read is None and (block or i not in answered):
                    self._start_read(p, block)
                elif p.stale and p.read is not None and p.read.done():
                    await self.release(self._take_back(p))
                    self._start_read(p, block)
            failed: BaseException | None = None
            n = len(parts)
            for k in range(n):
                i = (self._turn + k) % n
                p = parts[i]
                if p.stale or p.read is None or not p.read.done():
                    continue
                done, p.read = p.read, None
                if done.cancelled():
                    continue
                if done.exception() is not None:
                    failed = failed or done.exception()
                    continue
                entries = done.result()
                if entries:
                    self._turn = i + 1
                    return entries
                answered.add(i)
            if failed is not None:  # no other partition has a batch ready
                raise failed
            waiting = [p.read for p in parts if p.read is not None]
            timeout = deadline - loop.time() if block else None
            if timeout is not None and timeout <= 0:
                return []
            if not waiting:
                # Every read ended empty in this pass (e.g. each partition's BLOCK expired a
                # moment before our deadline): without blocking that is the answer; with it,
                # the next pass reads every partition again.
                if not block:
                    return []
                continue
            await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)

    async def _read_partition(self, p: _Partition, block: bool) -> list[Entry]:
        """Cluster layout: one partition's next batch."""
        return await self._read_pass(p, [p.stream], block)

    async def _read(self, block: bool) -> list[Entry]:
        return await self._read_pass(self._pass, self.streams, block)

    async def _read_pass(self, at: _Pass, streams: list[str], block: bool) -> list[Entry]:
        """The next batch of ``streams``: own pending first (one pass), then idle entries of
        other consumers (every claim_idle_ms / 2), then new ones (lingering if ``at`` says)."""
        while at.own_pending:
            entries, exhausted = await self._read_own_pending(streams)
            if entries:
                return entries
            if exhausted:
                at.own_pending = False
        if time.monotonic() >= at.next_claim:
            at.next_claim = time.monotonic() + self.claim_idle_ms / 2000
            entries = await self._claim_idle(streams)
            if entries:
                return entries
        if block and at.linger_from is not None:
            wait = at.linger_from + self._linger.linger_s - time.monotonic()
            at.linger_from = None
            if wait > 0:
                await asyncio.sleep(wait)
        entries, linger = await self._new_entries(streams, block)
        if linger:
            at.linger_from = time.monotonic()
        return entries

    async def _xreadgroup(self, streams: dict[str, str], block: int | None) -> Any:
        return await self._redis.xreadgroup(
            self.group, self.consumer, streams,  # type: ignore[arg-type]
            count=self.batch, block=block)

    async def _read_own_pending(self, streams: Sequence[str]) -> tuple[list[Entry], bool]:
        """The next batch of one pass over this consumer's pending list of ``streams`` (a
        cursor, so entries the caller still holds are not served again within the pass), and
        whether the pass is over. A batch may come back empty but not over (all of it
        dead-lettered)."""
        reply = await self._xreadgroup({s: self._pending_cursor[s] for s in streams}, None)
        raw: list[tuple[str, str, dict[bytes, bytes]]] = []
        cursors: dict[str, Any] = {}
        exhausted = True
        for s, msgs in _streams_of(reply):
            if msgs:
                cursors[s] = msgs[-1][0]
                exhausted = False
            raw.extend((s, i, f) for i, f in msgs if f is not None)
        entries = await self._with_counts(raw)
        # Only now past them: if the counts could not be read (Redis error), the next pass
        # reads the same entries again instead of skipping them until XAUTOCLAIM.
        self._pending_cursor.update(cursors)
        return entries, exhausted

    async def _claim_idle(self, streams: Sequence[str]) -> list[Entry]:
        raw: list[tuple[str, str, dict[bytes, bytes]]] = []
        for stream in streams:
            reply = await self._redis.xautoclaim(
                stream,
                self.group,
                self.consumer,
                min_idle_time=self.claim_idle_ms,
                start_id=self._claim_cursor[stream],
                count=self.batch,
            )
            self._claim_cursor[stream] = _s(reply[0])
            raw.extend((stream, _s(i), f) for i, f in reply[1] if f is not None)
        if raw:
            metrics.RECLAIMED.labels(self.stage).inc(len(raw))
        return await self._with_counts(raw)

    async def _new_entries(self, streams: Sequence[str],
                           block: bool) -> tuple[list[Entry], bool]:
        """New entries of ``streams`` (blocking up to ``block_ms``), and whether the next
        blocking read should linger after them (module docstring)."""
        reply = await self._xreadgroup(dict.fromkeys(streams, ">"),
                                       self.block_ms if block else None)
        entries = [
            Entry(s, i, f.get(events.FIELD), 1, f)
            for s, msgs in _streams_of(reply)
            for i, f in msgs
            if f is not None
        ]
        linger = False
        if entries:
            now = time.monotonic()
            self._linger.note(len(entries), now)
            linger = len(entries) < self.batch and self._linger.active(now)
        return entries, linger

    async def _with_counts(self, raw: list[tuple[str, str, dict[bytes, bytes]]]) -> list[Entry]:
        """Attach delivery counts (``XPENDING``) and dead-letter entries past the limit."""
        if not raw:
            return []
        counts: dict[tuple[str, str], int] = {}
        by_stream: dict[str, list[str]] = {}
        for s, i, _ in raw:
            by_stream.setdefault(s, []).append(i)
        async with self._redis.pipeline(transaction=False) as pipe:
            for s, ids in by_stream.items():
                pipe.xpending_range(s, self.group, min=ids[0], max=ids[-1], count=len(ids) * 2)
            replies = await pipe.execute()
        for s, rows in zip(by_stream, replies, strict=True):
            for row in rows:
                counts[(s, _s(row["message_id"]))] = int(row["times_delivered"])
        entries = [
            Entry(s, i, f.get(events.FIELD), counts.get((s, i), 1), f) for s, i, f in raw
        ]
        live = [e for e in entries if e.deliveries <= self.max_deliveries]
        poison = [e for e in entries if e.deliveries > self.max_deliveries]
        if poison:
            await self.dead_letter(
                [(e, Reason.MAX_DELIVERIES, f"delivered {e.deliveries - 1} times") for e in poison]
            )
        return live

    async def take_over(self, stream: str) -> int:
        """Make every pending entry of ``stream``'s group (any consumer's) this consumer's,
        without counting a delivery (``XAUTOCLAIM … JUSTID``): a partition's new owner does so
        before reading it, so a dead owner's entries need not wait for ``claim_idle_ms``. Its
        next own-pending pass reads them. How many were taken."""
        if self._take_over is None:
            self._take_over = self._redis.register_script(_TAKE_OVER)
        cursor: bytes | str = "0-0"
        taken = 0
        while True:
            reply = await self._take_over(keys=[stream], args=[self.group, self.consumer, cursor])
            cursor, taken = reply[0], taken + int(reply[1])
            if _s(cursor) == "0-0":
                break
        self.retry_pending()
        return taken

    async def release(self, entries: Sequence[Entry]) -> None:
        """Give back entries that were read but never handed to a handler (a batch read ahead
        behind one that failed): they stay pending for this consumer, and their delivery count
        is set back to what it was before this read (``XCLAIM … RETRYCOUNT JUSTID``), so being
        read ahead and dropped again and again never makes an entry reach ``max_deliveries``.
        """
        if not entries:
            return
        groups: dict[tuple[str, int], list[bytes | str | int | memoryview]] = {}
        for e in entries:
            groups.setdefault((e.stream, e.deliveries - 1), []).append(e.id)
        async with self._redis.pipeline(transaction=False) as pipe:
            for (s, count), ids in groups.items():
                pipe.xclaim(s, self.group, self.consumer, 0, ids, retrycount=count,
                            justid=True)
            await pipe.execute()

    async def ack(self, entries: Sequence[Entry]) -> None:
        """Acknowledge entries (one pipelined ``XACK`` per stream)."""
        if not entries:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            self.queue_ack(pipe, entries)
            await pipe.execute()

    def queue_ack(self, pipe: Pipeline, entries: Sequence[Entry]) -> None:
        """Queue the ``XACK`` of ``entries`` (one per stream) in a caller's pipeline."""
        by_stream: dict[str, list[str]] = {}
        for e in entries:
            by_stream.setdefault(e.stream, []).append(e.id)
        for s, ids in by_stream.items():
            pipe.xack(s, self.group, *ids)

    async def dead_letter(self, items: Sequence[DeadItem]) -> None:
        """Write each ``(entry, reason, detail)`` to the dead stream, then ack the entries."""
        if not items:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            self.queue_dead_letter(pipe, items, now_ms())
            await pipe.execute()
        await self.ack([e for e, _, _ in items])
        self.count_dead(items)

    async def dead_letter_fenced(self, items: Sequence[DeadItem], fence: str,
                                 token: str) -> bool:
        """:meth:`dead_letter`, only while the key ``fence`` holds ``token`` (an ownership's
        lease token, :attr:`pipeline.lease.Lease.token`): per stream one script call checks
        it, writes the dead letters and acks the entries — or does nothing. ``False`` once a
        call found another token (the streams after it are not tried). In the cluster layout
        ``fence`` must be in the slot of the entries' stream (as a partition's lease is)."""
        if self._dead_fenced is None:
            self._dead_fenced = self._redis.register_script(_DEAD_FENCED)
        by_stream: dict[str, list[DeadItem]] = {}
        for item in items:
            by_stream.setdefault(item[0].stream, []).append(item)
        ts = now_ms()
        for stream, its in by_stream.items():
            letters = [self._letter(entry, reason, detail, ts) for entry, reason, detail in its]
            if not await self._dead_fenced(
                    keys=[fence, self._keys.dead_for(stream), stream],
                    args=[token, self.group, events.FIELD, len(letters), *letters,
                          *(entry.id for entry, _, _ in its)]):
                return False
            self.count_dead(its)
        return True

    def queue_dead_letter(self, pipe: Pipeline, items: Sequence[DeadItem],
                          ts: int) -> None:
        """Queue the dead letters of ``items`` (not their acks: a caller acking in the same
        pipeline makes it a ``MULTI``, so an entry is never acked without its dead letter);
        :meth:`count_dead` once it ran."""
        for entry, reason, detail in items:
            pipe.xadd(self._keys.dead_for(entry.stream),
                      {events.FIELD: self._letter(entry, reason, detail, ts)})

    def _letter(self, entry: Entry, reason: Reason, detail: str, ts: int) -> bytes:
        """The encoded dead letter of ``entry``."""
        return events.encode(events.dead_letter(
            stream=entry.stream,
            entry_id=entry.id,
            raw=entry.data if entry.data is not None else _encode_fields(entry.fields),
            stage=self.stage,
            reason=reason,
            detail=detail,
            attempts=entry.deliveries,
            dead_ts_ms=ts,
        ))

    def count_dead(self, items: Sequence[tuple[Entry, str, str]]) -> None:
        for _, reason, _ in items:
            metrics.DEAD.labels(self.stage, reason).inc()


def _encode_fields(fields: dict[bytes, bytes]) -> bytes:
    import msgspec

    return msgspec.msgpack.encode({k.decode(errors="replace"): v for k, v in fields.items()})


def _result_of(read: asyncio.Task[list[Entry]]) -> list[Entry]:
    """What a finished read got; nothing when it failed (a Redis error: whatever it may have
    read stays pending for this consumer) or was cancelled."""
    if read.cancelled() or read.exception() is not None:
        return []
    return read.result()


def _streams_of(reply: Any) -> list[tuple[str, list[tuple[str, dict[bytes, bytes] | None]]]]:
    """Normalize an ``XREADGROUP`` reply (RESP2, see :func:`connect`) to (stream, messages)."""
    if not reply:
        return []
    return [(_s(stream), [(_s(i), f) for i, f in msgs]) for stream, msgs in reply]


#: URL scheme of a Redis Cluster: ``redis+cluster://host:port,host:port,...`` (any subset of
#: the nodes; the client discovers the rest).
CLUSTER_SCHEME = "redis+cluster://"


def connect(
    url: str, *, max_connections: int = 256, timeout_s: float = 30.0, cluster: bool = False,
    **kwargs: Any,
) -> Redis:
    """A client speaking RESP2 with bytes replies (the shape every reply parser here expects).

    Its pool *waits* for a free connection (up to ``timeout_s``) rather than failing: every
    stage of a process shares it, and a burst of concurrent Blynk writes in egress must queue,
    not turn into errors.

    A ``redis+cluster://`` URL (or ``cluster=True`` with a ``redis://`` one) gives redis-py's
    asyncio ``RedisCluster`` instead, which follows ``MOVED``/``ASK`` redirections and
    re-reads the slot map. It is typed as :data:`Redis`: it offers the commands the bridge
    uses, and the bridge's keys carry their partition's hash tag so each script and
    transaction stays in one slot (:mod:`pipeline.keys`).
    """
    if url.startswith(CLUSTER_SCHEME) or cluster:
        return _connect_cluster(url, max_connections=max_connections, **kwargs)
    pool = _Pool.from_url(
        url, max_connections=max_connections, timeout=timeout_s,
        decode_responses=False, protocol=2, **kwargs,
    )
    pool.connection_class = _lean(pool.connection_class)
    return aioredis.Redis(connection_pool=pool)


class _Pool(aioredis.BlockingConnectionPool):
    """redis-py's blocking pool, with a shortcut for the usual case: a connection is idle and
    no one waits for one.

    Every command takes a connection from the pool and gives it back. redis-py does both
    under the pool's condition and lock (and an ``asyncio.timeout``), whether or not anyone
    waits: ~13 µs of a ~45 µs ``PING``. When a connection is idle, neither the condition nor
    the lock is held and no caller waits, :meth:`get_connection` takes it at once, checked as
    redis-py checks it (:meth:`ensure_connection`: connected, no unread data), and
    :meth:`release` puts it back at once, with redis-py's bookkeeping after it
    (``_finish_release``). Every other case — no idle connection, someone waiting (who must
    not be overtaken), a connection to be reconnected, one not from this pool — is redis-py's
    own path, unchanged.
    """

    def _uncontended(self) -> bool:
        condition = self._condition
        return not (condition.locked() or condition._waiters or self._lock.locked())

    async def get_connection(
        self, command_name: Any = None, *keys: Any, **options: Any
    ) -> AbstractConnection:
        get = cast(Any, super().get_connection)
        if command_name is not None or keys or options:  # redis-py's deprecated form
            return cast(AbstractConnection, await get(command_name, *keys, **options))
        available = self._available_connections
        if not available or not self._uncontended():
            return cast(AbstractConnection, await get())
        connection = available.pop()
        self._in_use_connections.add(connection)
        try:
            await self.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def release(self, connection: AbstractConnection) -> None:
        if (connection not in self._in_use_connections
                or cast(Any, connection).should_reconnect() or not self._uncontended()):
            await super().release(connection)
            return
        self._in_use_connections.remove(connection)
        self._available_connections.append(connection)
        await self._finish_release(connection)


def _lean(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` (the connection class the URL chose: TCP, TLS or Unix socket) with a cheaper
    way to pack and to send a command; what goes over the wire, errors and timeouts are as
    before. (Figures: BENCHMARKS.md, "Goal 2: one-process CPU per uplink".)

    * **Packing.** redis-py's hiredis packer walks the arguments twice in Python (a memoryview
      check, then its encoder) before ``hiredis.pack_command``; that call alone takes
      ``bytes``, ``str`` (as UTF-8), ``int``, ``float`` (as ``repr``) and ``memoryview`` and
      packs them as the encoder would, and raises ``TypeError`` for anything else (``bool``,
      ``None``, ``bytearray``…). Those, a command name with a space (``"SCRIPT LOAD"``:
      redis-py splits it into words) and a connection with another encoding go to redis-py's
      packer, which encodes or refuses them as before.
    * **Sending.** redis-py writes every command inside ``asyncio.wait_for(…,
      socket_timeout)``: a task, a timer and two trips through the event loop per command,
      for a write that almost always goes to the kernel at once. Here the bytes are written
      to the transport directly; only when some stay buffered (the socket is full) does
      redis-py's own send run, with nothing more to write, to wait for the buffer to drain
      under the socket timeout, with its error handling. A connection not connected yet, one
      closing, and health checks take redis-py's path as before.

    Without hiredis, packing is redis-py's own.
    """

    def pack_command(self: AbstractConnection, *args: Any) -> list[bytes]:
        name = args[0]
        if (HIREDIS_AVAILABLE and (" " if isinstance(name, str) else b" ") not in name
                and self.encoder.encoding == "utf-8"):
            try:
                return [_hiredis_pack(args)]
            except TypeError:
                pass
        return cls.pack_command(self, *args)

    async def send_packed_command(self: AbstractConnection,
                                  command: bytes | str | Iterable[bytes],
                                  check_health: bool = True) -> None:
        writer = self._writer
        if (writer is not None and self._reader is not None and isinstance(command, list)
                and not self.health_check_interval and not writer.transport.is_closing()):
            try:
                writer.writelines(command)
            except OSError as exc:
                await self.disconnect(nowait=True)
                raise RedisConnectionError(f"Error while writing to socket. {exc}") from exc
            except BaseException:
                await self.disconnect(nowait=True)
                raise
            if not writer.transport.get_write_buffer_size():
                return
            command = []  # written: redis-py's send only waits for the buffer to drain
        await cls.send_packed_command(self, command, check_health)

    return type(f"Lean{cls.__name__}", (cls,), {
        "pack_command": pack_command, "send_packed_command": send_packed_command})


def _connect_cluster(url: str, *, max_connections: int, **kwargs: Any) -> Redis:
    from urllib.parse import urlsplit

    from redis.asyncio.cluster import ClusterNode

    rest = url.split("://", 1)[1] if "://" in url else url
    auth, _, hosts = rest.rpartition("@")
    hosts = hosts.split("/", 1)[0]
    nodes = []
    for hp in hosts.split(","):
        parts = urlsplit(f"//{hp}")
        nodes.append(ClusterNode(parts.hostname or "127.0.0.1", parts.port or 6379))
    user, _, password = auth.partition(":") if auth else ("", "", "")
    client = _ScriptedCluster(startup_nodes=nodes, decode_responses=False, protocol=2,
                          max_connections=max_connections, username=user or None,
                          password=password or None, **kwargs)
    return cast(Redis, client)


def single_connection_client(redis: Redis) -> Redis:
    """A client of its own, with one connection, to the same server as ``redis`` (for pub/sub:
    a cancelled pub/sub read must never hand a connection still in subscribe mode back to the
    pool every other command uses). On a cluster: to one of its nodes (the client's default
    one; a classic ``PUBLISH`` reaches the subscribers on every node)."""
    if isinstance(redis, RedisCluster):
        node = redis.get_default_node()
        return aioredis.Redis(connection_pool=aioredis.ConnectionPool(
            connection_class=node.connection_class, max_connections=1,
            **node.connection_kwargs))
    pool = redis.connection_pool
    return aioredis.Redis(connection_pool=type(pool)(
        connection_class=pool.connection_class, max_connections=1, **pool.connection_kwargs))


class _ScriptedCluster(RedisCluster):
    """redis-py's asyncio ``RedisCluster`` whose pipelines load scripts.

    A cluster pipeline sends ``EVALSHA`` without loading the script first (redis-py loads
    scripts for single calls and single-node pipelines only), so every pipeline of this client
    first loads, on every master (``SCRIPT LOAD`` goes to all primaries), the registered
    scripts not loaded yet; a ``NOSCRIPT`` (a master restarted or replaced) forgets what was
    loaded, so the caller's retry loads them again."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bb_scripts: dict[str, Any] = {}
        self.bb_loaded: set[str] = set()

    def register_script(self, script: Any) -> Any:
        registered = super().register_script(script)
        self.bb_scripts[registered.sha] = registered.script
        return registered

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        return _ScriptedPipeline(self, transaction)  # type: ignore[abstract]

    async def bb_load_scripts(self) -> None:
        for sha, text in list(self.bb_scripts.items()):
            if sha not in self.bb_loaded:
                await self.script_load(text)
                self.bb_loaded.add(sha)


class _ScriptedPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True,
                      allow_redirections: bool = True) -> list[Any]:
        client = self.cluster_client
        assert isinstance(client, _ScriptedCluster)
        await client.bb_load_scripts()
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except ResponseError as exc:
            if "NOSCRIPT" in str(exc):
                client.bb_loaded.clear()
            raise
