"""A short shared history of every process's counters, for the status page (no Prometheus needed).

Each process runs one :class:`StatsPublisher` (a stage of its own: the CLI adds it next to the
process's stages). At each :data:`SLOT_S` boundary it reads a fixed set of this process's
Prometheus metrics and adds their increase over the slot that just ended to that slot's hash,
``<prefix>stats:<slot>`` (``HINCRBY``), which expires :data:`HISTORY_S` + 2 slots later; and it
marks itself alive in ``<prefix>replicas`` (a sorted set: member ``<stages>@<consumer>``, score
the time in ms), removing members silent for ``_REPLICA_FORGET_S``; the set expires that long
after the last process was heard from. So Redis holds at most
``HISTORY_S / SLOT_S + 2`` small hashes and one member per live process, whatever the load;
nothing is added to any hot path (collectors are read once a slot).

:func:`read_history` (the monitor) reads the slots of the last :data:`HISTORY_S` back into
per-slot series; :func:`quantile` turns a slot's latency buckets into a percentile. Fields:
``ingested``, ``transformed``, ``written`` (values), ``downlinks`` (sent),
``dead:<stage>:<reason>``, ``blynk:<status>``, ``e2e:count``, ``e2e:le:<bound>`` (cumulative
buckets, as Prometheus's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client.metrics import MetricWrapperBase
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from pipeline import metrics
from pipeline.keys import Keys
from pipeline.lifecycle import wait_event
from pipeline.streams import Redis

log = logging.getLogger("blynk_bridge.stats")

#: Resolution of the history (seconds per slot).
SLOT_S = 5
#: How far back the history goes.
HISTORY_S = 900
#: A replica silent this long is gone (three missed slots).
REPLICA_GONE_S = 3 * SLOT_S
#: Members of the replicas set older than this are removed.
_REPLICA_FORGET_S = 60


def slot_of(ms: int) -> int:
    return ms // (SLOT_S * 1000)


def _samples(metric: MetricWrapperBase) -> Iterable[tuple[str, dict[str, str], float]]:
    for family in metric.collect():
        for s in family.samples:
            yield s.name, s.labels, s.value


def counters_now() -> dict[str, float]:
    """This process's totals of the fields the history keeps (see the module docstring)."""
    out: dict[str, float] = {}

    def add(name: str, value: float) -> None:
        out[name] = out.get(name, 0.0) + value

    for metric, field_name, wanted in (
        (metrics.INGESTED, "ingested", None),
        (metrics.TRANSFORMED, "transformed", None),
        (metrics.WRITTEN, "written", None),
        (metrics.DOWNLINKS, "downlinks", ("outcome", "sent")),
    ):
        for name, labels, value in _samples(metric):
            if name.endswith("_total") and (wanted is None or labels.get(wanted[0]) == wanted[1]):
                add(field_name, value)
    for name, labels, value in _samples(metrics.DEAD):
        if name.endswith("_total"):
            add(f"dead:{labels['stage']}:{labels['reason']}", value)
    for name, labels, value in _samples(metrics.BLYNK_REQUESTS):
        if name.endswith("_total"):
            add(f"blynk:{labels['status']}", value)
    for name, labels, value in _samples(metrics.LATENCY):
        if name.endswith("_bucket"):
            add(f"e2e:le:{labels['le']}", value)
        elif name.endswith("_count"):
            add("e2e:count", value)
    return out


def increase(before: dict[str, float], now: dict[str, float]) -> dict[str, int]:
    """What grew since ``before`` (whole numbers; counters never shrink within a process)."""
    out = {}
    for name, value in now.items():
        grew = round(value - before.get(name, 0.0))
        if grew > 0:
            out[name] = grew
    return out


class StatsPublisher:
    """Adds this process's counter increases to the shared history at every slot boundary."""

    name = "stats"

    def __init__(self, redis: Redis, keys: Keys, member: str) -> None:
        self._redis = redis
        self._keys = keys
        self.member = member
        self._last = counters_now()

    async def startup(self) -> None:
        self._last = counters_now()
        with contextlib.suppress(RedisError):
            await self._alive()

    async def main_loop(self, stop: asyncio.Event) -> None:
        """Publish at every slot boundary, and once more (the partial slot) when stopped."""
        while not stop.is_set():
            now = time.time_ns() // 1_000_000
            boundary = (slot_of(now) + 1) * SLOT_S * 1000
            await wait_event(stop, (boundary - now) / 1000)
            try:
                # The slot is named by the boundary, not the clock read after the wake-up,
                # which may be a little early or late.
                await self.publish_once(None if stop.is_set() else boundary)
            except RedisError as exc:
                # Not lost: self._last is unchanged, so the increase goes out with the next slot.
                log.warning("stats: publishing failed (%s)", exc)

    async def shutdown(self) -> None:
        with contextlib.suppress(RedisError):
            await self._redis.zrem(self._keys.replicas(), self.member)

    async def publish_once(self, now_ms: int | None = None) -> dict[str, int]:
        """Add what grew since the last call to the slot that just ended; returns it."""
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        current = counters_now()
        grew = increase(self._last, current)
        # Published right after a boundary: the increase belongs to the slot that ended.
        key = self._keys.stats(slot_of(now_ms - 1))
        async with self._redis.pipeline(transaction=False) as pipe:
            for name, value in grew.items():
                pipe.hincrby(key, name, value)
            if grew:
                pipe.expire(key, HISTORY_S + 2 * SLOT_S)
            self._queue_alive(pipe, now_ms)
            await pipe.execute()
        self._last = current
        return grew

    async def _alive(self) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            self._queue_alive(pipe, time.time_ns() // 1_000_000)
            await pipe.execute()

    def _queue_alive(self, pipe: Pipeline, now_ms: int) -> None:
        replicas = self._keys.replicas()
        pipe.zadd(replicas, {self.member: now_ms})
        pipe.zremrangebyscore(replicas, "-inf", now_ms - _REPLICA_FORGET_S * 1000)
        # Kept alive by every live process; a crashed last one's set goes by itself.
        pipe.expire(replicas, _REPLICA_FORGET_S)


class GaugeHistory:
    """The monitor's own samples of gauges (backlog per group), the last value per slot, in
    memory and bounded to :data:`HISTORY_S`: they are read by one process only (a restarted
    monitor starts an empty plot; the stream tables are always current)."""

    def __init__(self) -> None:
        self._slots: dict[int, dict[str, float]] = {}

    def record(self, now_ms: int, values: dict[str, float]) -> None:
        slot = slot_of(now_ms)
        self._slots[slot] = dict(values)
        oldest = slot - HISTORY_S // SLOT_S
        for old in [s for s in self._slots if s < oldest]:
            del self._slots[old]

    def series(self, t: Sequence[int]) -> dict[str, list[float | None]]:
        """One value per slot start in ``t`` (ms); ``None`` where nothing was sampled."""
        names = sorted({n for v in self._slots.values() for n in v})
        rows = [self._slots.get(slot_of(ms), {}) for ms in t]
        return {n: [r.get(n) for r in rows] for n in names}


@dataclass
class History:
    """The last :data:`HISTORY_S` as per-slot series (oldest first; a slot nobody wrote is 0)."""

    slot_s: int
    #: Slot start times (ms).
    t: list[int]
    #: Per field, one value per slot.
    fields: dict[str, list[int]] = field(default_factory=dict)

    def series(self, name: str) -> list[int]:
        return self.fields.get(name, [0] * len(self.t))

    def sum_prefix(self, prefix: str) -> dict[str, int]:
        """Totals over the whole window of the fields starting with ``prefix`` (prefix cut)."""
        out: dict[str, int] = {}
        for name, values in sorted(self.fields.items()):
            total = sum(values)
            if name.startswith(prefix) and total:
                out[name[len(prefix):]] = total
        return out


async def read_history(redis: Redis, keys: Keys, now_ms: int | None = None) -> History:
    """The completed slots of the last :data:`HISTORY_S` (the current one is still filling)."""
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    last = slot_of(now_ms) - 1
    slots = list(range(last - HISTORY_S // SLOT_S + 1, last + 1))
    async with redis.pipeline(transaction=False) as pipe:
        for s in slots:
            pipe.hgetall(keys.stats(s))
        rows = await pipe.execute()
    hist = History(SLOT_S, [s * SLOT_S * 1000 for s in slots])
    for i, row in enumerate(rows):
        for k, v in row.items():
            name = k.decode() if isinstance(k, bytes) else str(k)
            hist.fields.setdefault(name, [0] * len(slots))[i] = int(v)
    return hist


def latency_buckets(hist: History, i: int) -> list[tuple[float, int]]:
    """Slot ``i``'s cumulative latency buckets as ``(upper bound s, count)``, ascending."""
    out = []
    for name, values in hist.fields.items():
        if name.startswith("e2e:le:"):
            out.append((float(name[len("e2e:le:"):]), values[i]))
    return sorted(out)


def quantile(buckets: Sequence[tuple[float, int]], q: float) -> float | None:
    """The ``q`` quantile of cumulative buckets, interpolated inside a bucket as Prometheus's
    ``histogram_quantile`` does; ``None`` with no observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


async def replicas_alive(redis: Redis, keys: Keys, now_ms: int | None = None
                         ) -> list[tuple[str, int]]:
    """``(member, last seen ms)`` of the processes heard from within :data:`REPLICA_GONE_S`."""
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    rows = await redis.zrangebyscore(
        keys.replicas(), now_ms - REPLICA_GONE_S * 1000, "+inf", withscores=True)
    out = []
    for row in rows:
        member, score = row[0], row[1]
        out.append((member.decode() if isinstance(member, bytes) else str(member), int(score)))
    return out
