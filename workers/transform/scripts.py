"""Transform's atomic commits: each writes a batch's outputs and acks its inputs in one step.

* :class:`Commit` (every path of the stage): fenced by the partition lease; the registry
  version check (fast path); outputs; acks; the de-dup block of the new events — atomically:
  on one Redis a fenced transaction (:mod:`pipeline.fenced`), in the cluster layout one script
  call.
* :class:`Emit`: append outputs, ack inputs, unfenced, one script call (the benchmarks'
  two-hop ceiling).

One atomic step per batch: a crash cannot fall between the write and the ack (no duplicate
output on redelivery), and the worker packs one request instead of a command per entry through
redis-py (whose per-command cost in Python outweighs the Redis work).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from pipeline import events, fenced
from pipeline.fenced import bulk
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
        by_stream = _ids_by_stream(acks)
        keys: list[str] = [s for s, _ in outputs]
        keys.extend(by_stream)
        args: list[str | bytes | int] = [len(outputs), self._group]
        args.extend(d for _, d in outputs)
        for ids in by_stream.values():
            args.append(len(ids))
            args.extend(ids)
        await self._script(keys=keys, args=args)


# KEYS = registry version, partition lease, de-dup block, output streams, streams to ack;
# ARGV[1] = msgpack [version (false: not checked), lease token, group, block ttl ms,
# [output stream index per output], [[entry id, ...] per stream to ack]];
# ARGV[2] = the de-dup block (:func:`pipeline.dedup.block`, may be empty);
# ARGV[3...] = each output's data, as separate arguments: Redis 7.0's cmsgpack does not read
# msgpack's bin type, and splitting one concatenated blob of varying widths in Lua costs the
# worker more than it saves (BENCHMARKS.md, transform).
# Replies 1, or -1 (registry version moved on) / -2 (lease not this ownership's): nothing done.
_COMMIT = """
local p = cmsgpack.unpack(ARGV[1])
if p[1] and (redis.call('GET', KEYS[1]) or '0') ~= p[1] then return -1 end
if redis.call('GET', KEYS[2]) ~= p[2] then return -2 end
local blk = ARGV[2]
if #blk > 0 and redis.call('APPEND', KEYS[3], blk) == #blk then
  redis.call('PEXPIRE', KEYS[3], p[4])
end
local group, outputs, acks = p[3], p[5], p[6]
local ns = 0
for j = 1, #outputs do
  local si = outputs[j]
  if si > ns then ns = si end
  redis.call('XADD', KEYS[3 + si], '*', 'd', ARGV[2 + j])
end
local base = 3 + ns
for s = 1, #acks do
  local ids = acks[s]
  for i = 1, #ids, 500 do
    redis.call('XACK', KEYS[base + s], group, unpack(ids, i, math.min(i + 499, #ids)))
  end
end
return 1
"""

#: :meth:`Commit.run`'s refusals.
VERSION_MOVED = -1
FENCED = -2


class Commit:
    """One partition's batch committed in one atomic step, fenced by the partition lease:
    (registry version check,) outputs, acks and the de-dup block of the committed new events
    (:mod:`pipeline.dedup`: marked with the write).

    ``stream`` is the uplinks partition's (its registry version is checked). Returns 1,
    :data:`VERSION_MOVED` (``version`` given and no longer the registry's: nothing
    done) or :data:`FENCED` (the lease no longer holds ``token``: nothing done, the entries stay
    pending for the partition's new owner). Every key is in the partition's slot (cluster
    layout), the output streams' included: a device's writes and dead letters share it.

    **On one Redis** a fenced transaction (:func:`pipeline.fenced.transact`): ``WATCH`` the
    lease (and the registry version when it is checked) + ``MGET`` them, decide here, then
    ``MULTI``, ``SET`` the block ``''`` ``NX PX`` ttl + ``APPEND`` it (the ``SET`` creates it
    with its expiry only when it is new: the script's "``PEXPIRE`` when the ``APPEND`` created
    it", whose reply a transaction cannot see before ``EXEC``), ``XADD`` per output, ``XACK``
    per stream acked, ``EXEC``; a lease renewed or taken, or a registry changed, between the
    read and the ``EXEC`` aborts it, and it is decided again. Redis then spends no Lua on
    converting the arguments (BENCHMARKS.md, "Transform commit: WATCH + MULTI"). **Redis
    Cluster**: the ``_COMMIT`` script (a cluster client runs a ``WATCH`` transaction far more
    slowly: :mod:`pipeline.fenced`).
    """

    def __init__(self, redis: Redis, keys: Keys, group: str) -> None:
        self._redis = redis
        self._script = redis.register_script(_COMMIT)
        self._keys = keys
        self._group = group
        self._pack = msgspec.msgpack.Encoder().encode
        assert events.FIELD == b"d"

    async def run(self, version: int | None, stream: str, lease: str, token: str,
                  block_key: str,
                  block: bytes, block_ttl_ms: int, outputs: Sequence[tuple[str, bytes]],
                  acks: Sequence[Entry]) -> int:
        if self._keys.cluster:
            return await self._run_script(version, stream, lease, token, block_key, block,
                                          block_ttl_ms, outputs, acks)
        watch = [lease] if version is None else [lease, self._keys.registry_version_for(stream)]
        want = None if version is None else str(version).encode()
        held = token.encode()

        def plan(values: list[Any]) -> tuple[list[tuple[Any, ...] | bytes], int]:
            if want is not None and (values[1] or b"0") != want:
                return [], VERSION_MOVED
            if values[0] != held:
                return [], FENCED
            # The XADDs packed here (fenced.pack): one bytes format per output, ~1/4 of
            # hiredis's packing of five arguments through the connection.
            commands: list[tuple[Any, ...] | bytes] = []
            if block:
                commands += (("SET", block_key, b"", "NX", "PX", block_ttl_ms),
                             ("APPEND", block_key, block))
            heads: dict[str, bytes] = {}
            for s, d in outputs:
                head = heads.get(s)
                if head is None:
                    head = heads[s] = b"*5\r\n$4\r\nXADD\r\n%b$1\r\n*\r\n$1\r\nd\r\n" % bulk(s)
                commands.append(b"%b$%d\r\n%b\r\n" % (head, len(d), d))
            for s, ids in _ids_by_stream(acks).items():
                commands.append(("XACK", s, self._group, *ids))
            return commands, 1

        return await fenced.transact(self._redis, watch, plan, read=self._held,
                                     what="transform lease/registry version")

    async def _held(self, conn: Any, watch: Sequence[str]) -> list[Any]:
        """``WATCH`` ``watch`` on ``conn`` and read them (one round trip; a test's hook)."""
        return await fenced.held(conn, watch)

    async def _run_script(self, version: int | None, stream: str, lease: str, token: str,
                          block_key: str, block: bytes, block_ttl_ms: int,
                          outputs: Sequence[tuple[str, bytes]], acks: Sequence[Entry]) -> int:
        """:meth:`run` in one ``_COMMIT`` script call (the cluster layout)."""
        # Everything but the keys, the block and the outputs' data is one msgpack argument:
        # redis-py packs each argument in Python, msgpack packs the whole structure in C.
        keys: list[str] = [self._keys.registry_version_for(stream), lease, block_key]
        streams: dict[str, int] = {}
        flat_out: list[int] = []
        data: list[bytes] = []
        for out, d in outputs:
            si = streams.get(out)
            if si is None:
                si = streams[out] = len(streams) + 1
            flat_out.append(si)
            data.append(d)
        keys.extend(streams)
        by_stream = _ids_by_stream(acks)
        keys.extend(by_stream)
        head = [False if version is None else str(version), token, self._group, block_ttl_ms,
                flat_out, list(by_stream.values())]
        reply = await self._script(keys=keys, args=[self._pack(head), block, *data])
        return int(reply)


def _ids_by_stream(acks: Sequence[Entry]) -> dict[str, list[str]]:
    """The ids of ``acks`` per stream, in order (one ``XACK`` per stream)."""
    by_stream: dict[str, list[str]] = {}
    for e in acks:
        ids = by_stream.get(e.stream)
        if ids is None:
            ids = by_stream[e.stream] = []
        ids.append(e.id)
    return by_stream
