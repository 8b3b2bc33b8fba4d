"""De-duplication in the partition owner's memory (:mod:`pipeline.dedup`): the window's claims,
steps and memory cap; and, through transform on the real Redis, the blocks written behind in
the fenced commit — takeover, fencing, replays, and an owner killed with SIGKILL mid-stream."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tracemalloc
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from pipeline import dedup, events, metrics
from pipeline.context import Context
from pipeline.deadletters import DeadRow, replay, scan_dead
from pipeline.errors import Retryable
from pipeline.events import Uplink
from pipeline.keys import GROUP_TRANSFORM, Keys
from pipeline.registry import Registry
from pipeline.streams import Redis, StreamWriter
from tests.conftest import REDIS_URL
from tests.wait import wait_until, within
from workers.transform import TransformStage

WINDOW = 3600
ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
blynk:
  servers: {{default: "http://127.0.0.1:1"}}
streams: {{batch: {batch}, block_ms: 100, claim_idle_ms: 600000}}
transform: {{lease_ttl_ms: 500}}
templates:
  - name: t
    datastreams:
      - {{name: n, pin: V1, type: integer}}
tts:
  - {{name: app, app_id: a, template: t}}
devices:
{devices}
redis: {{url: "{url}", prefix: "{prefix}"}}
"""
DEVICES = [f"d{i}" for i in range(8)]


def config_text(prefix: str, batch: int = 50) -> str:
    rows = "".join(f"  - {{source: tts, integration: app, device: {d}, token: T-{d}, "
                   "template: t}\n"
                   for d in DEVICES)
    return CONFIG.format(batch=batch, devices=rows.rstrip("\n"), url=REDIS_URL, prefix=prefix)


def context(prefix: str, redis: Redis, keys: Keys, consumer: str,
            batch: int = 50) -> Context:
    from pipeline import config as config_mod

    cfg = config_mod.parse(config_text(prefix, batch), "yaml", "test.yaml", env={})
    return Context(config=cfg, redis=redis, keys=keys, consumer=consumer,
                   writer=StreamWriter(redis))


def uplink(event_id: str, n: int = 1, device: str = "d0") -> Uplink:
    return Uplink(event_id=event_id, source="tts", integration="app", device=device,
                  event_ts_ms=1_000 + n, received_ts_ms=2_000 + n, values={"n": n})


async def add(ctx: Context, *uplinks: Uplink) -> None:
    await ctx.writer.add_many([(ctx.keys.stream("uplinks"), events.encode(u)) for u in uplinks])


async def written(ctx: Context) -> list[str]:
    rows = await ctx.redis.xrange(ctx.keys.stream("writes"))
    return [events.decode_write(f[events.FIELD]).event_id for _, f in rows]


async def pending(ctx: Context) -> int:
    info = await ctx.redis.xpending(ctx.keys.stream("uplinks"), GROUP_TRANSFORM)
    return int(info["pending"])


@pytest.fixture
async def a(redis: Redis, keys: Keys, prefix: str) -> AsyncIterator[Context]:
    c = context(prefix, redis, keys, "a")
    yield c
    await c.writer.close()


async def started(ctx: Context, *, keep: bool = True) -> TransformStage:
    stage = TransformStage(ctx, until_idle=True)
    stage.keep_partitions = keep
    await stage.startup()
    return stage


async def burst(stage: TransformStage) -> None:
    await within(stage.main_loop(asyncio.Event()))


# ---- the window, in memory ----------------------------------------------------------------


def test_claim_redelivery_duplicate_forget_and_take() -> None:
    w = dedup.Window(WINDOW)
    w.now()
    d, first, second = dedup.digest("e1"), dedup.mark("s", "1-0"), dedup.mark("s", "2-0")
    assert w.claim(d, first) is None  # new: owned by the first entry
    assert w.claim(d, first) == first  # its redelivery: processed again
    assert w.claim(d, second) == first  # another entry: a duplicate
    w.forget(d, second)  # not its claim: kept
    assert w.find(d) == first
    w.forget(d, first)
    assert w.find(d) is None and w.claim(d, second) is None
    w.take(d, first)  # a replay takes the event whatever owns it
    assert w.find(d) == first


def test_an_event_is_remembered_for_the_window_then_its_step_is_dropped() -> None:
    now = [1_000_000.0]
    w = dedup.Window(64, clock=lambda: now[0])  # 1 s steps
    w.now()
    assert w.claim(dedup.digest("old"), 1) is None
    now[0] += 63.5
    w.now()
    assert w.claim(dedup.digest("new"), 2) is None
    now[0] += 1.0  # "old" is 64.5 s old: still within the window (and one step)
    w.now()
    assert w.find(dedup.digest("old")) == 1
    now[0] += 1.0  # 65.5 s: its step left the window
    w.now()
    assert w.find(dedup.digest("old")) is None and w.find(dedup.digest("new")) == 2
    assert len(w) == 1
    now[0] += 66
    w.now()
    assert len(w) == 0 and len(w.steps) == 1  # memory follows the window


def test_the_memory_cap_drops_the_oldest_steps_and_counts_them() -> None:
    now = [1_000_000.0]
    budget = dedup.Budget(max_events=100)
    w1 = dedup.Window(64, budget, clock=lambda: now[0])
    w2 = dedup.Window(64, budget, clock=lambda: now[0])
    evicted = metrics.DEDUP_EVICTED._value.get()
    w1.now()
    for i in range(60):
        w1.claim(dedup.digest(f"a{i}"), 1)
    now[0] += 1
    w2.now()
    for i in range(60):
        w2.claim(dedup.digest(f"b{i}"), 1)
    budget.enforce()
    # The oldest step (w1's 60 events) went: a duplicate of them passes now, as a new event.
    assert metrics.DEDUP_EVICTED._value.get() - evicted == 60
    assert len(w1) == 0 and len(w2) == 60
    w1.now()
    assert w1.claim(dedup.digest("a0"), 2) is None
    budget.enforce()  # within the cap: nothing more
    assert metrics.DEDUP_EVICTED._value.get() - evicted == 60
    w1.close()
    assert budget.windows == {w2}


def test_memory_per_event_is_what_the_docs_say() -> None:
    w = dedup.Window(WINDOW)
    w.now()
    n = 100_000
    tracemalloc.start()
    try:
        for i in range(n):
            w.claim(dedup.digest(f"ev-{i}"), i)
        used = tracemalloc.get_traced_memory()[0] / n
    finally:
        tracemalloc.stop()
    assert dedup.BYTES_PER_EVENT / 2 < used < dedup.BYTES_PER_EVENT * 1.3, used


# ---- through transform, on Redis ----------------------------------------------------------


async def test_duplicates_are_dropped_acked_and_counted_and_known_to_the_next_owner(
        a: Context, redis: Redis, keys: Keys, prefix: str) -> None:
    before = metrics.DUPLICATES.labels("tts")._value.get()
    await add(a, uplink("e1"), uplink("e2"), uplink("e1"))
    stage = await started(a)
    await burst(stage)
    await add(a, uplink("e2"))  # later, same owner: in its memory
    await burst(stage)
    assert await written(a) == ["e1", "e2"] and await pending(a) == 0
    assert metrics.DUPLICATES.labels("tts")._value.get() - before == 2
    await stage.shutdown()
    # The owner stops: another replica takes the partition over and knows both events from
    # the blocks, without a Redis command per event.
    b = context(prefix, redis, keys, "b")
    await add(b, uplink("e1"), uplink("e3"))
    other = await started(b, keep=False)
    await burst(other)
    await other.shutdown()
    assert await written(a) == ["e1", "e2", "e3"] and await pending(a) == 0
    stream = keys.stream("uplinks")
    assert await dedup.committed(redis, keys, stream, WINDOW, "e3") is not None
    await b.writer.close()


async def test_a_commit_after_the_lease_moved_is_refused_and_the_new_owner_does_it(
        a: Context, redis: Redis, keys: Keys, prefix: str) -> None:
    stage = await started(a)
    await burst(stage)  # owns the partition
    await add(a, uplink("e1"), uplink("e2"))
    entries = await stage.reader.read(block=False)
    # The lease lapsed meanwhile (a frozen owner) and another replica took it.
    lease = keys.transform_lease(0)
    await redis.set(lease, "b elsewhere")
    fenced = metrics.TRANSFORM_FENCED._value.get()
    with pytest.raises(Retryable):
        await stage.handle(entries)
    assert metrics.TRANSFORM_FENCED._value.get() - fenced == 1
    assert await written(a) == [] and await pending(a) == 2  # nothing written, nothing acked
    assert 0 not in stage.owned  # given up at once
    assert await dedup.committed(redis, keys, keys.stream("uplinks"), WINDOW, "e1") is None
    # The new owner (its lease released here for the test) takes the entries over.
    await redis.delete(lease)
    b = context(prefix, redis, keys, "b")
    await add(b, uplink("e1"))  # and a duplicate of one of them
    other = await started(b, keep=False)
    await burst(other)
    await other.shutdown()
    assert sorted(await written(a)) == ["e1", "e2"] and await pending(a) == 0
    await b.writer.close()
    await stage.shutdown()


async def test_a_dead_lettered_uplink_forgets_its_claim_and_its_replay_takes_the_event(
        a: Context, redis: Redis, keys: Keys) -> None:
    stage = await started(a)
    await add(a, uplink("e1", device="stranger"), uplink("e2"))
    await burst(stage)
    assert await written(a) == ["e2"]
    rows: list[DeadRow] = await scan_dead(redis, keys)
    assert [r.letter.reason for r in rows if r.letter] == ["unknown_device"]
    # A plain copy of the written event is a duplicate; the dead one was never committed.
    await add(a, uplink("e2"))
    await burst(stage)
    assert await written(a) == ["e2"]
    assert await dedup.committed(redis, keys, keys.stream("uplinks"), WINDOW, "e1") is None
    # Fixed, then replayed: written, by the owner still running with its memory.
    await Registry(redis, keys).register("tts:app:stranger", token="T-x", template="t")
    await replay(redis, keys, rows)
    # A replay of a written event is processed too (the operator asked for it).
    await redis.xadd(keys.stream("uplinks"), {events.FIELD: events.encode(uplink("e2", 7)),
                                              events.REPLAY: b"1"})
    await burst(stage)
    assert await written(a) == ["e2", "e1", "e2"] and await pending(a) == 0
    await stage.shutdown()


async def test_a_killed_owner_loses_nothing_and_its_committed_events_stay_unique(
        redis: Redis, keys: Keys, prefix: str, tmp_path: Path) -> None:
    # Small batches so that the owner is surely mid-stream when it is killed.
    cfg = tmp_path / "a.yaml"
    cfg.write_text(config_text(prefix, batch=10))
    b = context(prefix, redis, keys, "b")
    distinct = 6000
    ups = [uplink(f"ev-{i}", i, DEVICES[i % len(DEVICES)]) for i in range(distinct)]
    await add(b, *ups, *ups[: distinct // 2])  # every other event twice, the copy much later
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "blynk_bridge", "--log-format", "text", "transform",
        "-c", str(cfg), cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_until(lambda: _at_least(redis, keys, 1000), timeout_s=60,
                         what="the owner writing")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    at_kill = await redis.xlen(keys.stream("writes"))
    assert at_kill < distinct, "the owner finished before the kill: nothing was tested"
    # The next owner waits for the dead one's lease to lapse, loads its blocks, takes its
    # pending entries over and reads on.
    other = await started(b, keep=False)
    await burst(other)
    await other.shutdown()
    got = await written(b)
    assert sorted(got) == sorted(u.event_id for u in ups)  # each exactly once
    assert await pending(b) == 0
    await b.writer.close()


async def _at_least(redis: Redis, keys: Keys, n: int) -> bool:
    return int(await redis.xlen(keys.stream("writes"))) >= n


async def test_a_replica_joining_takes_a_partition_over_and_no_duplicate_leaks(
        redis: Redis, prefix: str) -> None:
    from pipeline import config as config_mod

    text = config_text(prefix).replace("redis: {", "redis: {partitions: 2, ")
    cfg = config_mod.parse(text, "yaml", "test.yaml", env={})
    keys = cfg.redis.keys()
    assert {keys.partition_of("tts", d) for d in DEVICES} == {0, 1}
    ctxs = [Context(config=cfg, redis=redis, keys=keys, consumer=n, writer=StreamWriter(redis))
            for n in ("a", "b")]
    stages = [TransformStage(c) for c in ctxs]
    stops = [asyncio.Event(), asyncio.Event()]

    async def add_to_partitions(ups: list[Uplink]) -> None:
        await ctxs[0].writer.add_many([(keys.stream_for("uplinks", u.source, u.device),
                                        events.encode(u)) for u in ups])

    async def writes() -> list[str]:
        return [events.decode_write(f[events.FIELD]).event_id
                for s in keys.streams("writes") for _, f in await redis.xrange(s)]

    first = [uplink(f"ev-{i}", i, DEVICES[i % len(DEVICES)]) for i in range(200)]
    second = [uplink(f"ev-{i}", i, DEVICES[i % len(DEVICES)]) for i in range(200, 400)]
    await stages[0].startup()
    runs = [asyncio.create_task(stages[0].main_loop(stops[0]))]
    try:
        await wait_until(lambda: len(stages[0].owned) == 2, what="A owning both partitions")
        await add_to_partitions(first)
        await wait_until(lambda: _count(writes(), 200), what="A writing the first events")
        await stages[1].startup()
        runs.append(asyncio.create_task(stages[1].main_loop(stops[1])))
        await wait_until(lambda: len(stages[0].owned) == 1 and len(stages[1].owned) == 1,
                         what="one partition each")
        # Copies of every event A wrote, in both partitions (one of them B's now), and new ones.
        await add_to_partitions(first + second + second)
        await wait_until(lambda: _count(writes(), 400), what="the new events written")
        for s in keys.streams("uplinks"):
            await wait_until(lambda s=s: _settled(redis, s), what=f"{s} acked")
    finally:
        for stop in stops:
            stop.set()
        await within(asyncio.gather(*runs))
        for stage in stages:
            await stage.shutdown()
        for c in ctxs:
            await c.writer.close()
    assert sorted(await writes()) == sorted(u.event_id for u in first + second)


async def _count(got: Awaitable[list[str]], n: int) -> bool:
    return len(await got) >= n


async def _settled(redis: Redis, stream: str) -> bool:
    groups = await redis.xinfo_groups(stream)
    return all(int(g["pending"]) == 0 and int(g.get("lag") or 0) == 0 for g in groups)


async def test_a_slow_path_batch_of_an_ownership_lost_and_taken_again_is_fenced(
        a: Context, redis: Redis, keys: Keys) -> None:
    stage = await started(a)
    await burst(stage)  # owns the partition
    old = stage.owned[0]
    await add(a, uplink("e1"), uplink("e2"))
    entries = await old.reader.read(block=False)
    # The lease lapses mid-batch and this very replica takes the partition again: a new
    # ownership (token, window, reader) while the old one's batch is still under way.
    await stage.ownership.drop(0, "lease_lost")
    await redis.delete(keys.transform_lease(0))
    await stage.ownership.balance()
    assert stage.owned[0] is not old
    with pytest.raises(Retryable):  # the slow path's commit, under the old token
        await stage._finish(old, entries, None)
    assert await written(a) == [] and await pending(a) == 2
    # The new ownership writes them, and records them in its blocks.
    await burst(stage)
    assert await written(a) == ["e1", "e2"] and await pending(a) == 0
    assert await dedup.committed(redis, keys, keys.stream("uplinks"), WINDOW, "e1") is not None
    await stage.shutdown()


async def test_a_takeover_loads_the_newest_events_up_to_the_cap(
        a: Context, redis: Redis, keys: Keys, prefix: str) -> None:
    await add(a, *(uplink(f"e{i}", i) for i in range(40)))
    stage = await started(a, keep=False)
    await burst(stage)
    await stage.shutdown()
    b = context(prefix, redis, keys, "b")
    other = await started(b)
    other.budget.max_events = 10
    evicted = metrics.DEDUP_EVICTED._value.get()
    await burst(other)  # 40 events in the blocks, nothing to commit
    # Only the newest 10 are loaded: a takeover never holds more than the cap in memory.
    window = other.owned[0].window
    assert other.budget.total() == 10
    assert REGISTRY.get_sample_value("bb_dedup_events") == 10
    assert window.find(dedup.digest("e39")) is not None
    assert window.find(dedup.digest("e29")) is None
    assert metrics.DEDUP_EVICTED._value.get() - evicted == 30
    await other.shutdown()
    await b.writer.close()


async def test_a_takeover_fetches_the_newest_steps_only_up_to_the_cap(
        redis: Redis, keys: Keys) -> None:
    window_s = 640  # ten-second steps
    now = [1_000_000.0]
    stream = keys.stream("uplinks")
    probe = dedup.Window(window_s, clock=lambda: now[0])
    step = probe.step()
    # 30 steps of the window, 5 events each, written as a committing owner would.
    steps = range(step - 29, step + 1)
    for s in steps:
        await redis.set(dedup.block_key(keys, stream, window_s, s),
                        dedup.block((dedup.digest(f"s{s}e{i}"), 7) for i in range(5)),
                        px=dedup.block_ttl_ms(window_s))
    budget = dedup.Budget(max_events=12)
    window = dedup.Window(window_s, budget, clock=lambda: now[0])
    evicted = metrics.DEDUP_EVICTED._value.get()
    await dedup.load(redis, keys, stream, window_s, window)
    # The newest 12 events are held; the 138 others are counted, fetched or not.
    assert len(window) == 12
    assert window.find(dedup.digest(f"s{step}e4")) == 7
    assert window.find(dedup.digest(f"s{step - 2}e3")) == 7
    assert window.find(dedup.digest(f"s{step - 3}e4")) is None
    assert window.find(dedup.digest(f"s{step - 29}e0")) is None
    assert metrics.DEDUP_EVICTED._value.get() - evicted == 150 - 12
    window.close()
