"""The monitor stage against the real Redis (and the Redis Cluster): gauges, safe trimming, idle
consumers."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from pipeline.backlog import StreamInfo, inspect_stream
from pipeline.config import Config, MonitorConfig, RedisConfig
from pipeline.context import Context
from pipeline.keys import UPLINKS, WRITES, Keys
from pipeline.status import StatusBoard
from pipeline.streams import Redis, StreamWriter, now_ms
from tests.wait import within
from workers.monitor import MonitorStage, build

pytestmark = pytest.mark.cluster_too


def _stage(redis: Redis, keys: Keys, **monitor: float) -> MonitorStage:
    cfg = Config(redis=RedisConfig(prefix=keys.prefix), monitor=MonitorConfig(**monitor))  # type: ignore[arg-type]
    ctx = Context(config=cfg, redis=redis, keys=keys, consumer="test", writer=StreamWriter(redis))
    stage = build(ctx)
    assert isinstance(stage, MonitorStage)
    return stage


async def _fill(redis: Redis, key: str, n: int) -> list[str]:
    return [(await redis.xadd(key, {b"d": str(i).encode()})).decode() for i in range(n)]


async def _read(redis: Redis, key: str, group: str, consumer: str, n: int) -> list[str]:
    reply = await redis.xreadgroup(group, consumer, {key: ">"}, count=n)
    return [i.decode() for _, msgs in reply for i, _ in msgs] if reply else []


async def _ids(redis: Redis, key: str) -> list[str]:
    return [i.decode() for i, _ in await redis.xrange(key)]


def _gauge(metric: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(metric, labels)


async def test_gauges_match_a_constructed_backlog(redis: Redis, keys: Keys) -> None:
    up, writes = keys.stream(UPLINKS), keys.stream(WRITES)
    await _fill(redis, up, 10)
    await redis.xgroup_create(up, "transform", id="0")
    await redis.xgroup_create(up, "audit", id="0")
    got = await _read(redis, up, "transform", "c1", 6)
    await redis.xack(up, "transform", *got[:2])
    await redis.xgroup_create(writes, "egress", id="0", mkstream=True)
    await redis.xadd(keys.dead, {b"d": b"x"})
    await StatusBoard(redis, keys).connected("tts", "monitor-test-app")

    streams = await _stage(redis, keys).sample_once()

    assert [s.key for s in streams] == [up, writes, keys.stream("downlinks"),
                                        *keys.dead_streams()]
    assert _gauge("bb_stream_length", stream="uplinks") == 10
    assert _gauge("bb_stream_lag", stream="uplinks", group="transform") == 4
    assert _gauge("bb_stream_pending", stream="uplinks", group="transform") == 4
    assert _gauge("bb_stream_consumers", stream="uplinks", group="transform") == 1
    assert _gauge("bb_stream_lag", stream="uplinks", group="audit") == 10
    assert _gauge("bb_stream_pending", stream="uplinks", group="audit") == 0
    assert _gauge("bb_stream_oldest_pending_seconds", stream="uplinks", group="audit") == 0
    oldest = _gauge("bb_stream_oldest_pending_seconds", stream="uplinks", group="transform")
    assert oldest is not None and oldest >= 0
    assert _gauge("bb_stream_length", stream="writes") == 0
    assert _gauge("bb_stream_lag", stream="writes", group="egress") == 0
    assert _gauge("bb_stream_length", stream="dead") == 1
    state = {s: _gauge("bb_integration_status", kind="tts", integration="monitor-test-app",
                       state=s) for s in ("Not Connected", "Connected", "Broken")}
    assert state == {"Not Connected": 0, "Connected": 1, "Broken": 0}
    transform = next(g for g in streams[0].groups if g.name == "transform")
    assert transform.oldest_pending_id == got[2]


async def test_lag_is_counted_when_redis_cannot_tell(redis: Redis, keys: Keys) -> None:
    up = keys.stream(UPLINKS)
    ids = await _fill(redis, up, 10)
    await redis.xgroup_create(up, "transform", id="0")
    await _read(redis, up, "transform", "c1", 3)
    await redis.xdel(up, ids[6])  # a deletion past the group's position: Redis reports nil lag
    assert (await redis.xinfo_groups(up))[0]["lag"] is None

    info = await inspect_stream(redis, UPLINKS, up)

    assert info.groups[0].lag == 6 and info.groups[0].lag_exact


async def test_trim_keeps_everything_a_group_still_needs(redis: Redis, keys: Keys) -> None:
    up = keys.stream(UPLINKS)
    ids = await _fill(redis, up, 10)
    await redis.xgroup_create(up, "transform", id="0")
    await redis.xgroup_create(up, "audit", id="0")
    a = await _read(redis, up, "transform", "c1", 6)
    await redis.xack(up, "transform", a[0], a[1], a[2], a[4])  # ids[3] and ids[5] stay pending
    b = await _read(redis, up, "audit", "c2", 8)
    await redis.xack(up, "audit", *b)  # audit acked 0..7; 8, 9 undelivered
    stage = _stage(redis, keys)

    removed = await stage.trim_once()

    assert removed[up] == 3
    assert await _ids(redis, up) == ids[3:]
    label = keys.label(up)  # "uplinks" ("uplinks:0" in the cluster layout)
    assert label.startswith("uplinks")
    trimmed_before = _gauge("bb_stream_trimmed_total", stream=label) or 0

    await redis.xack(up, "transform", ids[3], ids[5])
    await redis.xack(up, "transform", *await _read(redis, up, "transform", "c1", 10))
    removed = await stage.trim_once()

    assert removed[up] == 5  # only up to what the slower group (audit) acknowledged
    assert await _ids(redis, up) == ids[8:]
    assert await _read(redis, up, "audit", "c2", 10) == ids[8:]
    # Labelled by stream name, not key: the prefix (random per test, as the demo's) stays out.
    assert _gauge("bb_stream_trimmed_total", stream=label) == trimmed_before + 5


async def test_trim_spares_undelivered_entries_and_groupless_streams(
    redis: Redis, keys: Keys
) -> None:
    up, writes = keys.stream(UPLINKS), keys.stream(WRITES)
    ids = await _fill(redis, up, 5)
    await redis.xgroup_create(up, "transform", id="0")
    await redis.xack(up, "transform", *await _read(redis, up, "transform", "c1", 5))
    await redis.xgroup_create(up, "late", id="0")  # a group that has read nothing yet
    await _fill(redis, writes, 4)  # no group at all

    removed = await _stage(redis, keys).trim_once()

    assert removed[up] == 0 and removed[writes] == 0
    assert await _ids(redis, up) == ids
    assert await redis.xlen(writes) == 4


async def test_trim_boundary_is_exact_on_large_sequence_numbers(redis: Redis, keys: Keys) -> None:
    up = keys.stream(UPLINKS)
    for entry_id in ("5-18446744073709551615", "6-0", "9-9", "9-10"):
        await redis.xadd(up, {b"d": b"x"}, id=entry_id)
    await redis.xgroup_create(up, "transform", id="0")
    stage = _stage(redis, keys)

    await redis.xack(up, "transform", *await _read(redis, up, "transform", "c1", 1))
    assert (await stage.trim_once())[up] == 1
    assert await _ids(redis, up) == ["6-0", "9-9", "9-10"]

    await redis.xack(up, "transform", *await _read(redis, up, "transform", "c1", 2))
    assert (await stage.trim_once())[up] == 2
    assert await _ids(redis, up) == ["9-10"]


async def test_dead_stream_is_trimmed_by_age(redis: Redis, keys: Keys) -> None:
    old = f"{now_ms() - 8 * 86_400_000}-0"
    await redis.xadd(keys.dead, {b"d": b"old"}, id=old)
    fresh = (await redis.xadd(keys.dead, {b"d": b"fresh"})).decode()

    removed = await _stage(redis, keys).trim_once()

    assert removed[keys.dead] == 1
    assert await _ids(redis, keys.dead) == [fresh]


async def test_dead_stream_is_capped_in_length_oldest_first(redis: Redis, keys: Keys) -> None:
    ids = await _fill(redis, keys.dead, 7)

    removed = await _stage(redis, keys, dead_max_len=3).trim_once()

    assert removed[keys.dead] == 4
    assert await _ids(redis, keys.dead) == ids[-3:]


async def test_idle_consumers_without_pending_are_removed(redis: Redis, keys: Keys) -> None:
    up = keys.stream(UPLINKS)
    await _fill(redis, up, 3)
    await redis.xgroup_create(up, "transform", id="0")
    await _read(redis, up, "transform", "busy", 1)
    await redis.xgroup_createconsumer(up, "transform", "gone")

    removed = await _stage(redis, keys, consumer_idle_s=0).remove_idle_consumers()

    assert removed == [f"{up} transform/gone"]
    consumers = await redis.xinfo_consumers(up, "transform")
    assert [c["name"] for c in consumers] == [b"busy"]


async def test_partitions_are_each_sampled_and_trimmed(redis: Redis, prefix: str,
                                                       keys: Keys) -> None:
    keys = Keys(prefix, partitions=3, cluster=keys.cluster)
    for key in keys.streams(UPLINKS):
        await _fill(redis, key, 2)
        await redis.xgroup_create(key, "transform", id="0")
        await redis.xack(key, "transform", *await _read(redis, key, "transform", "c", 2))
    stage = _stage(redis, keys)

    streams = await stage.sample_once()
    removed = await stage.trim_once()

    assert {s.key for s in streams} >= set(keys.streams(UPLINKS))
    assert _gauge("bb_stream_length", stream=keys.label(keys.stream(UPLINKS, 2))) == 2
    assert all(removed[k] == 2 for k in keys.streams(UPLINKS))


async def test_lag_is_a_gauge_per_partition_and_per_node_summing_to_the_total(
        redis: Redis, prefix: str, keys: Keys) -> None:
    """What dashboards and the KEDA example (``deploy/keda-scaledobject.yaml``: the sum of
    ``bb_stream_lag`` of a group) read: one series per partition, and per Redis node."""
    keys = Keys(prefix, partitions=6, cluster=keys.cluster)
    for p, key in enumerate(keys.streams(UPLINKS)):
        await _fill(redis, key, p + 1)
        await redis.xgroup_create(key, "transform", id="0")

    streams = await _stage(redis, keys).sample_once()

    lags = [_gauge("bb_stream_lag", stream=keys.label(k), group="transform")
            for k in keys.streams(UPLINKS)]
    assert lags == [1, 2, 3, 4, 5, 6]
    nodes = {s.node for s in streams if s.key in keys.streams(UPLINKS)}
    if keys.cluster:
        assert len(nodes) >= 2  # the partitions spread over the masters
    per_node = {n: _gauge("bb_node_lag", node=n, group="transform") for n in nodes}
    for node, lag in per_node.items():
        assert lag == sum(s.length for s in streams
                          if s.node == node and s.key in keys.streams(UPLINKS))
    assert sum(v or 0 for v in per_node.values()) == 21


async def test_main_loop_samples_until_stopped(redis: Redis, keys: Keys) -> None:
    up = keys.stream(UPLINKS)
    await _fill(redis, up, 7)
    stage = _stage(redis, keys, interval_s=0.01)
    cycles: list[int] = []
    second_cycle = asyncio.Event()
    sample = stage.sample_once

    async def counting_sample() -> list[StreamInfo]:
        out = await sample()
        cycles.append(len(out))
        if len(cycles) == 2:
            second_cycle.set()
        return out

    stage.sample_once = counting_sample  # type: ignore[method-assign]
    stop = asyncio.Event()
    await stage.startup()
    task = asyncio.create_task(stage.main_loop(stop))
    try:
        await within(second_cycle.wait())
    finally:
        stop.set()
        await within(task)
        await stage.shutdown()
    assert _gauge("bb_stream_length", stream="uplinks") == 7


@pytest.mark.parametrize(("entry_id", "ms"), [("1700000000000-3", 1700000000000), ("0-0", 0)])
def test_id_ms(entry_id: str, ms: int) -> None:
    from pipeline.backlog import id_ms

    assert id_ms(entry_id) == ms
