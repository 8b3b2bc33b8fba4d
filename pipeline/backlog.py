"""Backlog of the pipeline's streams: length, and per consumer group lag and pending.

The one place stream lag is computed (monitor gauges, ``blynk-bridge lag``, the demo's table,
ingest-http's back-pressure), with each stream's partition and the Redis node serving it, and
the sums per node (:func:`by_node`: what a Redis Cluster master carries). Lag is what
``XINFO GROUPS`` reports; when Redis cannot tell (deletions inside the unread range)
:func:`inspect_stream` counts the undelivered entries up to :data:`LAG_COUNT_CAP`, and cheaper
readers may take the stream's length as the bound. Reads only: nothing here writes to Redis.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from pipeline.keys import DOWNLINKS, UPLINKS, WRITES, Keys
from pipeline.streams import Redis

#: The pipeline's streams, in data-flow order.
STREAM_NAMES = (UPLINKS, WRITES, DOWNLINKS)

#: When Redis cannot tell a group's lag, count at most this many undelivered entries.
LAG_COUNT_CAP = 10_000


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """One consumer group as ``XINFO GROUPS``/``XPENDING`` see it."""

    name: str
    consumers: int
    pending: int
    #: Entries not yet delivered to the group; counted (up to a cap) when Redis cannot tell.
    lag: int
    #: False when ``lag`` was counted (Redis answered nil) and hit :data:`LAG_COUNT_CAP`.
    lag_exact: bool
    last_delivered_id: str
    oldest_pending_id: str | None
    #: Entries ever delivered to the group (``entries-read``; Redis >= 7, else ``None``): its
    #: difference between two samples is the group's read rate.
    entries_read: int | None = None

    def oldest_pending_age_s(self, now: int) -> float:
        """Seconds since the oldest pending entry was appended (0 when nothing is pending)."""
        if self.oldest_pending_id is None:
            return 0.0
        return max(0.0, (now - id_ms(self.oldest_pending_id)) / 1000)


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """One stream key (a partition) with its groups."""

    name: str
    key: str
    length: int
    groups: list[GroupInfo]
    #: Entries ever appended (``entries-added``; Redis >= 7, else ``None``): the append rate
    #: between two samples, whatever trimming did meanwhile.
    entries_added: int | None = None
    #: The stream's partition (``None``: unpartitioned).
    partition: int | None = None
    #: ``host:port`` of the Redis (Cluster master) holding the stream.
    node: str = ""


@dataclass(frozen=True, slots=True)
class NodeTotals:
    """One Redis node's streams summed per group (:func:`by_node`)."""

    node: str
    group: str
    streams: int
    length: int
    lag: int
    pending: int


def node_of(redis: Redis, key: str) -> str:
    """``host:port`` of the node serving ``key``: its Cluster master (from the client's slot
    map), or the one Redis."""
    from_key = getattr(redis, "get_node_from_key", None)
    if from_key is not None:
        return str(from_key(key).name)
    kw = redis.connection_pool.connection_kwargs
    if "path" in kw:
        return str(kw["path"])
    return f"{kw.get('host', 'localhost')}:{kw.get('port', 6379)}"


def by_node(streams: list[StreamInfo]) -> list[NodeTotals]:
    """Length, lag and pending summed per node and group, over the streams with that group."""
    sums: dict[tuple[str, str], list[int]] = {}
    for s in streams:
        for g in s.groups:
            row = sums.setdefault((s.node, g.name), [0, 0, 0, 0])
            row[0] += 1
            row[1] += s.length
            row[2] += g.lag
            row[3] += g.pending
    return [NodeTotals(node, group, *row) for (node, group), row in sorted(sums.items())]


def id_ms(entry_id: str) -> int:
    """The millisecond part of a stream id (``1700000000000-3`` → ``1700000000000``)."""
    return int(entry_id.partition("-")[0])


def as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def inspect_stream(redis: Redis, name: str, key: str,
                         partition: int | None = None) -> StreamInfo:
    """Length and groups of one stream; a missing stream is empty with no groups."""
    try:
        info = await redis.xinfo_stream(key)
        groups = await redis.xinfo_groups(key)
    except ResponseError as exc:
        if "no such key" not in str(exc).lower():
            raise
        return StreamInfo(name, key, 0, [], partition=partition, node=node_of(redis, key))
    # After a command: a cluster client has no slot map before its first one.
    node = node_of(redis, key)
    last_generated = as_str(info["last-generated-id"])
    out: list[GroupInfo] = []
    for g in groups:
        group = as_str(g["name"])
        last = as_str(g["last-delivered-id"])
        pending = int(g["pending"])
        oldest = None
        if pending:
            summary = await redis.xpending(key, group)
            oldest = as_str(summary["min"]) if summary["min"] is not None else None
        lag, exact = await _lag(redis, key, reported_lag(g), last, last_generated)
        read = g.get("entries-read")
        out.append(GroupInfo(group, int(g["consumers"]), pending, lag, exact, last, oldest,
                             read if isinstance(read, int) else None))
    added = info.get("entries-added")
    return StreamInfo(name, key, int(info["length"]), out,
                      added if isinstance(added, int) else None, partition, node)


def reported_lag(group: Mapping[Any, Any]) -> int | None:
    """A group's lag as ``XINFO GROUPS`` reports it (Redis >= 7), or None when Redis cannot
    tell (entries deleted from the range the group has not read yet)."""
    lag = group.get("lag")
    return lag if isinstance(lag, int) else None


async def _lag(
    redis: Redis, key: str, reported: int | None, last_delivered: str, last_generated: str
) -> tuple[int, bool]:
    """The reported lag, or else the undelivered entries counted, up to a cap."""
    if reported is not None:
        return reported, True
    if _id_key(last_delivered) >= _id_key(last_generated):
        return 0, True
    rows = await redis.xrange(key, min=f"({last_delivered}", max="+", count=LAG_COUNT_CAP) or []
    return len(rows), len(rows) < LAG_COUNT_CAP


async def _dead_info(redis: Redis, key: str) -> StreamInfo:
    """The dead stream: length and entries ever added (it has no groups)."""
    try:
        info = await redis.xinfo_stream(key)
    except ResponseError as exc:
        if "no such key" not in str(exc).lower():
            raise
        return StreamInfo("dead", key, 0, [], node=node_of(redis, key))
    added = info.get("entries-added")
    return StreamInfo("dead", key, int(info["length"]), [],
                      added if isinstance(added, int) else None, node=node_of(redis, key))


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def snapshot(redis: Redis, keys: Keys) -> list[StreamInfo]:
    """Every partition of every pipeline stream, then the dead streams (no groups; one per
    partition besides ``keys.dead`` in the cluster layout)."""
    out: list[StreamInfo] = []
    for name in STREAM_NAMES:
        for key in keys.streams(name):
            out.append(await inspect_stream(redis, name, key, keys.partition_of_stream(key)))
    for key in keys.dead_streams():
        out.append(await _dead_info(redis, key))
    return out
