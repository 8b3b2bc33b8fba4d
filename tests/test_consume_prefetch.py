"""``consume(prefetch=True)``: the next read overlaps the handling of a batch, and every
guarantee of ``consume`` still holds — batches handled in stream order, a failed batch's
successors never handled before it, a stop request finishing the read in flight."""

from __future__ import annotations

import asyncio

from pipeline import events
from pipeline.consumer import Job, consume
from pipeline.errors import Retryable
from pipeline.keys import Keys
from pipeline.streams import Entry, Redis, StreamReader, StreamWriter
from tests.wait import within


class CountingReader(StreamReader):
    """A real reader that counts ``read`` calls, to observe the prefetch."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self.reads = 0
        self._changed = asyncio.Condition()

    async def read(self, *, block: bool = True) -> list[Entry]:
        async with self._changed:
            self.reads += 1
            self._changed.notify_all()
        return await super().read(block=block)

    async def issued(self, n: int) -> None:
        """Wait (at most 10 s) until ``read`` was called ``n`` times."""
        async with self._changed:
            await within(self._changed.wait_for(lambda: self.reads >= n))


def reader(redis: Redis, keys: Keys, batch: int, **kw: int) -> CountingReader:
    opts = {"batch": batch, "block_ms": 100, "claim_idle_ms": 60_000, "max_deliveries": 5} | kw
    return CountingReader(redis, keys, [keys.stream("uplinks")], "g", "c1", stage="test",
                          **opts)


async def fill(redis: Redis, keys: Keys, data: list[bytes]) -> None:
    stream = keys.stream("uplinks")
    await StreamWriter(redis).add_many([(stream, d) for d in data])


async def test_next_read_overlaps_the_handling_and_order_is_kept(redis: Redis,
                                                                 keys: Keys) -> None:
    data = [f"dev{i % 3}:{i}".encode() for i in range(40)]
    await fill(redis, keys, data)
    r = reader(redis, keys, batch=7)
    done: list[bytes] = []
    batches = 0

    async def handle(entries: list[Entry]) -> None:
        nonlocal batches
        batches += 1
        await r.issued(batches + 1)  # the next read is under way while this batch is handled
        done.extend(e.data for e in entries if e.data)
        await r.ack(entries)

    await consume(r, handle, asyncio.Event(), until_idle=True, prefetch=True)
    assert done == data and batches == 6
    assert (await redis.xpending(keys.stream("uplinks"), "g"))["pending"] == 0


async def test_a_failed_batch_is_retried_before_the_prefetched_one(redis: Redis,
                                                                   keys: Keys) -> None:
    data = [b"a", b"b", b"c", b"d", b"e"]
    await fill(redis, keys, data)
    r = reader(redis, keys, batch=2)
    calls: list[list[bytes]] = []
    fail = iter([True])

    async def handle(entries: list[Entry]) -> None:
        batch = [e.data for e in entries if e.data]
        calls.append(batch)
        if len(calls) == 1:
            await r.issued(2)  # the next batch is being read while this one fails
        if next(fail, False):
            raise Retryable("blynk down", retry_after_s=0.01)
        await r.ack(entries)

    await consume(r, handle, asyncio.Event(), until_idle=True, prefetch=True)
    handled = [d for c in calls[1:] for d in c]
    assert calls[0] == [b"a", b"b"]
    assert handled == data  # c, d (read ahead) only after a, b succeeded; each once
    assert (await redis.xpending(keys.stream("uplinks"), "g"))["pending"] == 0


async def test_an_entry_left_pending_is_not_overtaken_by_the_prefetched_batch(
    redis: Redis, keys: Keys
) -> None:
    data = [b"a", b"poison", b"c", b"d"]
    await fill(redis, keys, data)
    r = reader(redis, keys, batch=2, max_deliveries=2)
    done: list[bytes] = []
    seen_poison = 0

    async def handle(entries: list[Entry]) -> None:
        nonlocal seen_poison
        for e in entries:
            if e.data == b"poison":
                seen_poison += 1
                raise ValueError("cannot handle this one")
        done.extend(e.data for e in entries if e.data)
        await r.ack(entries)

    await consume(r, handle, asyncio.Event(), until_idle=True, prefetch=True)
    # c, d were read ahead while the poison failed: dropped, then delivered again in order.
    assert done == [b"a", b"c", b"d"]
    dead = await redis.xrange(keys.dead)
    assert [events.decode_dead(f[events.FIELD]).raw for _, f in dead] == [b"poison"]
    assert (await redis.xpending(keys.stream("uplinks"), "g"))["pending"] == 0


async def test_stop_finishes_the_read_in_flight_and_handles_its_batch(redis: Redis,
                                                                      keys: Keys) -> None:
    data = [b"a", b"b", b"c", b"d", b"e", b"f"]
    await fill(redis, keys, data)
    r = reader(redis, keys, batch=2)
    stop = asyncio.Event()
    done: list[bytes] = []

    async def handle(entries: list[Entry]) -> None:
        if not done:
            await r.issued(2)
            stop.set()  # while the read of c, d is in flight
        done.extend(e.data for e in entries if e.data)
        await r.ack(entries)

    await within(consume(r, handle, stop, prefetch=True))
    assert done == [b"a", b"b", b"c", b"d"]  # the prefetched batch handled, no read after
    assert r.reads == 2
    assert (await redis.xpending(keys.stream("uplinks"), "g"))["pending"] == 0  # e, f unread


async def test_prepare_runs_on_the_batch_read_ahead_and_its_job_replaces_handle(
        redis: Redis, keys: Keys) -> None:
    data = [f"e{i}".encode() for i in range(20)]
    await fill(redis, keys, data)
    r = reader(redis, keys, batch=6)
    prepared: list[list[bytes]] = []
    done: list[bytes] = []
    changed = asyncio.Condition()

    async def handle(entries: list[Entry]) -> None:
        raise AssertionError("every batch had a job")

    async def prepare(entries: list[Entry]) -> Job:
        batch = [e.data for e in entries if e.data]
        async with changed:
            prepared.append(batch)
            changed.notify_all()

        async def job() -> None:
            if len(done) + len(batch) < len(data):  # the next batch is prepared meanwhile
                async with changed:
                    n = len(done) // 6 + 2
                    await within(changed.wait_for(lambda: len(prepared) >= n))
            done.extend(batch)
            await r.ack(entries)
        return job

    await consume(r, handle, asyncio.Event(), until_idle=True, prefetch=True, prepare=prepare)
    assert done == data and [d for b in prepared for d in b] == data
    assert (await redis.xpending(keys.stream("uplinks"), "g"))["pending"] == 0


async def test_a_failed_prepare_or_job_leaves_the_batch_to_handle(redis: Redis,
                                                                   keys: Keys) -> None:
    data = [b"a", b"no-prepare", b"c", b"job-fails", b"e"]
    await fill(redis, keys, data)
    r = reader(redis, keys, batch=2)
    by_job: list[bytes] = []
    by_handle: list[list[bytes]] = []

    async def handle(entries: list[Entry]) -> None:
        by_handle.append([e.data for e in entries if e.data])
        await r.ack(entries)

    async def prepare(entries: list[Entry]) -> Job | None:
        batch = [e.data for e in entries if e.data]
        if b"no-prepare" in batch:
            raise ValueError("a bug in prepare")

        async def job() -> None:
            if b"job-fails" in batch:
                raise ValueError("a bug in the job")
            by_job.extend(batch)
            await r.ack(entries)
        return job

    await consume(r, handle, asyncio.Event(), until_idle=True, prefetch=True, prepare=prepare)
    # The failed prepare: handle takes the batch; the failed job: handle retries it per entry.
    assert by_job == [b"e"]
    assert by_handle == [[b"a", b"no-prepare"], [b"c"], [b"job-fails"]]
    assert (await redis.xpending(keys.stream("uplinks"), "g"))["pending"] == 0
