"""The stream layer's contract, against the real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap

import pytest
from redis.exceptions import ClusterError, ConnectionError, DataError, TryAgainError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pipeline import events
from pipeline.consumer import consume
from pipeline.errors import Retryable
from pipeline.keys import Keys
from pipeline.streams import Entry, Redis, StreamReader, StreamWriter, connect
from tests.conftest import REDIS_URL
from tests.wait import wait_until, within


def reader(redis: Redis, keys: Keys, consumer: str = "c1", **kw: int) -> StreamReader:
    opts = {"batch": 100, "block_ms": 200, "claim_idle_ms": 60_000, "max_deliveries": 5} | kw
    return StreamReader(
        redis, keys, [keys.stream("uplinks")], "g", consumer, stage="test", **opts
    )


async def test_concurrent_adds_share_a_round_trip_and_all_land(redis: Redis, keys: Keys) -> None:
    writer = StreamWriter(redis)
    stream = keys.stream("uplinks")
    ids = await asyncio.gather(*(writer.add(stream, f"m{i}".encode()) for i in range(250)))
    assert len(set(ids)) == 250
    entries = await redis.xrange(stream)
    assert [f[events.FIELD] for _, f in entries] == [f"m{i}".encode() for i in range(250)]


async def test_reader_returns_new_entries_and_nothing_is_acked_by_reading(
    redis: Redis, keys: Keys
) -> None:
    r = reader(redis, keys)
    await r.ensure_group()
    await r.ensure_group()  # idempotent
    stream = keys.stream("uplinks")
    await StreamWriter(redis).add_many([(stream, b"a"), (stream, b"b")])
    got = await r.read()
    assert [e.data for e in got] == [b"a", b"b"]
    assert all(e.deliveries == 1 for e in got)
    pending = await redis.xpending(keys.stream("uplinks"), "g")
    assert pending["pending"] == 2
    await r.ack(got)
    assert (await redis.xpending(keys.stream("uplinks"), "g"))["pending"] == 0


async def test_own_pending_entries_come_back_before_new_ones(redis: Redis, keys: Keys) -> None:
    stream = keys.stream("uplinks")
    r = reader(redis, keys, batch=2)
    await r.ensure_group()
    await StreamWriter(redis).add_many([(stream, b"1"), (stream, b"2"), (stream, b"3")])
    first = await r.read()
    assert [e.data for e in first] == [b"1", b"2"]
    r.retry_pending()  # e.g. Blynk was down: the batch stays pending
    again = await r.read()
    assert [(e.data, e.deliveries) for e in again] == [(b"1", 2), (b"2", 2)]
    await r.ack(again)
    rest = await r.read()
    assert [e.data for e in rest] == [b"3"]


async def test_own_pending_pass_never_serves_an_entry_twice_while_it_is_held(
    redis: Redis, keys: Keys
) -> None:
    """A consumer that holds entries across reads (egress) gets each pending one once a pass."""
    stream = keys.stream("uplinks")
    first = reader(redis, keys, consumer="w")
    await first.ensure_group()
    await StreamWriter(redis).add_many([(stream, f"{i}".encode()) for i in range(3)])
    assert len(await first.read()) == 3  # then the process dies without acking
    restarted = reader(redis, keys, consumer="w", batch=2)
    assert [e.data for e in await restarted.read()] == [b"0", b"1"]  # held, not acked
    assert [e.data for e in await restarted.read()] == [b"2"]
    await StreamWriter(redis).add_many([(stream, b"new")])
    assert [e.data for e in await restarted.read()] == [b"new"]
    restarted.retry_pending()  # a failure: the whole pending list again, from the oldest
    assert [e.data for e in await restarted.read()] == [b"0", b"1"]


async def test_a_restarted_consumer_reads_what_it_left_pending(redis: Redis, keys: Keys) -> None:
    stream = keys.stream("uplinks")
    r1 = reader(redis, keys, consumer="worker-a")
    await r1.ensure_group()
    await StreamWriter(redis).add_many([(stream, b"x")])
    assert [e.data for e in await r1.read()] == [b"x"]
    r2 = reader(redis, keys, consumer="worker-a")  # same name, new process
    assert [(e.data, e.deliveries) for e in await r2.read()] == [(b"x", 2)]


async def test_consumer_killed_mid_batch_leaves_entries_another_reclaims(
    redis: Redis, keys: Keys, prefix: str
) -> None:
    """A real process reads a batch and is killed with SIGKILL before acking it."""
    stream = keys.stream("uplinks")
    await reader(redis, keys).ensure_group()
    await StreamWriter(redis).add_many([(stream, f"e{i}".encode()) for i in range(10)])
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from pipeline.keys import Keys
        from pipeline.streams import StreamReader, connect
        async def main():
            keys = Keys({prefix!r})
            r = StreamReader(connect({REDIS_URL!r}), keys, [keys.stream("uplinks")], "g",
                             "doomed", stage="test", batch=100, block_ms=100)
            got = await r.read()
            print(len(got), flush=True)
            await asyncio.Event().wait()  # "working" on the batch forever
        asyncio.run(main())
        """
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        assert (await within(proc.stdout.readline())).strip() == b"10"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    assert (await redis.xpending(stream, "g"))["pending"] == 10
    # A live consumer takes over entries idle longer than claim_idle_ms (1 ms here).
    survivor = reader(redis, keys, consumer="survivor", claim_idle_ms=1)
    got = await survivor.read()
    assert sorted(e.data for e in got if e.data) == sorted(f"e{i}".encode() for i in range(10))
    assert all(e.deliveries == 2 for e in got)
    await survivor.ack(got)
    assert (await redis.xpending(stream, "g"))["pending"] == 0


async def test_poison_entry_is_dead_lettered_and_does_not_block_the_others(
    redis: Redis, keys: Keys
) -> None:
    stream = keys.stream("uplinks")
    r = reader(redis, keys, max_deliveries=3)
    await StreamWriter(redis).add_many(
        [(stream, b"good-1"), (stream, b"poison"), (stream, b"good-2")]
    )
    delivered: list[bytes] = []
    calls: list[int] = []

    async def handle(entries: list[Entry]) -> None:
        calls.append(len(entries))
        for e in entries:
            if e.data == b"poison":
                raise ValueError("cannot handle this one")
        delivered.extend(e.data for e in entries if e.data)
        await r.ack(entries)

    await consume(r, handle, asyncio.Event(), until_idle=True)
    assert sorted(delivered) == [b"good-1", b"good-2"]
    dead = await redis.xrange(keys.dead)
    assert len(dead) == 1
    letter = events.decode_dead(dead[0][1][events.FIELD])
    assert (letter.raw, letter.reason, letter.stage, letter.stream) == (
        b"poison", "max_deliveries", "test", stream
    )
    assert letter.attempts == 4
    assert (await redis.xpending(stream, "g"))["pending"] == 0


async def test_retryable_failure_keeps_the_batch_and_delivers_it_later(
    redis: Redis, keys: Keys
) -> None:
    stream = keys.stream("uplinks")
    r = reader(redis, keys)
    await StreamWriter(redis).add_many([(stream, b"a"), (stream, b"b")])
    outcomes = iter([Retryable("blynk down", retry_after_s=0.01), None])
    done: list[bytes] = []

    async def handle(entries: list[Entry]) -> None:
        exc = next(outcomes)
        if exc is not None:
            raise exc
        done.extend(e.data for e in entries if e.data)
        await r.ack(entries)

    await consume(r, handle, asyncio.Event(), until_idle=True)
    assert done == [b"a", b"b"]
    assert await redis.xlen(keys.dead) == 0


async def test_a_batch_redis_refused_more_often_than_max_deliveries_is_not_dead(
    redis: Redis, keys: Keys
) -> None:
    """A commit Redis refuses for a while (``TRYAGAIN`` while a Redis Cluster slot moves, a
    connection lost) says nothing about the entries: their retries do not count as deliveries,
    so the batch is written once Redis takes it, not dead-lettered for ``max_deliveries``."""
    stream = keys.stream("uplinks")
    r = reader(redis, keys, max_deliveries=2)
    await StreamWriter(redis).add_many([(stream, b"a"), (stream, b"b")])
    refusals = iter([TryAgainError("slot moving"), ConnectionError("lost"),
                     ClusterError("TTL exhausted."), TryAgainError("slot moving")])
    done: list[bytes] = []

    async def handle(entries: list[Entry]) -> None:
        refused = next(refusals, None)
        if refused is not None:
            raise refused
        done.extend(e.data for e in entries if e.data)
        await r.ack(entries)

    await consume(r, handle, asyncio.Event(), until_idle=True, max_backoff_s=0.01)
    assert done == [b"a", b"b"]
    assert await redis.xlen(keys.dead) == 0
    assert (await redis.xpending(stream, "g"))["pending"] == 0


async def test_stop_request_lets_the_in_flight_batch_finish_and_ack(
    redis: Redis, keys: Keys
) -> None:
    stream = keys.stream("uplinks")
    r = reader(redis, keys)
    await StreamWriter(redis).add_many([(stream, b"a"), (stream, b"b")])
    stop = asyncio.Event()
    in_handler = asyncio.Event()
    release = asyncio.Event()

    async def handle(entries: list[Entry]) -> None:
        in_handler.set()
        await release.wait()
        await r.ack(entries)

    task = asyncio.create_task(consume(r, handle, stop))
    await in_handler.wait()
    stop.set()
    release.set()
    await within(task)
    assert (await redis.xpending(stream, "g"))["pending"] == 0


@pytest.mark.parametrize("partitions", [1, 4])
def test_partition_keys_are_stable_and_cluster_tagged(partitions: int) -> None:
    keys = Keys("bb:", partitions)
    s = keys.stream_for("uplinks", "tts", "dev-1")
    assert s == keys.stream_for("uplinks", "tts", "dev-1")
    assert s in keys.streams("uplinks")
    if partitions > 1:
        assert s.startswith("bb:{uplinks:") and s.endswith("}")
        spread = {keys.partition_of("tts", f"d{i}") for i in range(200)}
        assert spread == set(range(partitions))
    else:
        assert s == "bb:uplinks"


async def test_a_read_after_a_small_batch_goes_at_once_below_the_linger_rate(
    redis: Redis, keys: Keys
) -> None:
    # An hour's linger: were the read after a small batch to wait, wait_for would give up.
    r = reader(redis, keys, linger_ms=3_600_000)
    await r.ensure_group()
    writer = StreamWriter(redis)
    stream = keys.stream("uplinks")
    await writer.add(stream, b"a")
    assert [e.data for e in await asyncio.wait_for(r.read(), 60)] == [b"a"]
    await writer.add(stream, b"b")
    assert [e.data for e in await asyncio.wait_for(r.read(), 60)] == [b"b"]


async def test_cluster_reader_hands_out_one_partition_at_a_time_and_gives_back_reads_ahead(
        cluster_redis: Redis, prefix: str) -> None:
    """Cluster layout: each partition read on its own, one partition's batch per read; a retry
    gives back the other partitions' reads ahead (their delivery counts as before) and every
    partition's entries come again in stream order; a close gives back what is in flight."""
    keys = Keys(prefix, partitions=3, cluster=True)
    streams = keys.streams("uplinks")
    r = StreamReader(cluster_redis, keys, streams, "g", "c1", stage="test", batch=2,
                     block_ms=200)
    await r.ensure_group()
    await StreamWriter(cluster_redis).add_many(
        [(s, f"{p}-{i}".encode()) for p, s in enumerate(streams) for i in range(3)])

    first = await r.read(block=False)
    assert len(first) == 2 and len({e.stream for e in first}) == 1
    r.retry_pending()  # the batch failed: it, then the rest, again, partition by partition
    got: dict[str, list[tuple[bytes | None, int]]] = {s: [] for s in streams}
    while batch := await r.read(block=False):
        assert len({e.stream for e in batch}) == 1
        got[batch[0].stream].extend((e.data, e.deliveries) for e in batch)
        await r.ack(batch)
    for p, s in enumerate(streams):
        failed = 2 if s == first[0].stream else 1  # read ahead and given back: not counted
        assert got[s] == [(f"{p}-0".encode(), failed), (f"{p}-1".encode(), failed),
                          (f"{p}-2".encode(), 1)], got

    await StreamWriter(cluster_redis).add_many([(s, b"late") for s in streams])
    batch = await r.read()
    await r.ack(batch)
    await r.close()  # the other partitions' reads: given back, pending, not counted
    left = [row for s in streams
            for row in await cluster_redis.xpending_range(s, "g", min="-", max="+", count=10)]
    assert len(left) == 2 and all(row["times_delivered"] == 0 for row in left), left
    again = StreamReader(cluster_redis, keys, streams, "g", "c1", stage="test", batch=2)
    assert sorted(e.data for e in await again.read(block=False)
                  + await again.read(block=False)) == [b"late", b"late"]


# --- the client's connections (pipeline.streams.connect) ------------------------------------


@pytest.mark.parametrize("args", [
    ("SET", "k", b"v"),
    (b"XADD", "s", "*", "d", b"\x00\xff" * 3000),  # past redis-py's 6,000-byte chunking
    ("EVALSHA", "ab" * 20, 2, "k1", "k2", 1, -7, 2**63, 1.5, 0.1 + 0.2, 1e20, float("inf")),
    ("SET", "é-ü", "ö" * 10),
    ("SET", "k", memoryview(b"mv")),
    ("SET", "k", bytearray(b"ba")),  # not taken by hiredis: redis-py's packer, as before
    ("SCRIPT LOAD", "return 1"),  # a name with a space: split into words, as before
    (b"CLIENT SETNAME", b"n"),
])
def test_commands_go_on_the_wire_as_redis_py_packs_them(args: tuple[object, ...]) -> None:
    import redis.asyncio as aioredis

    lean = connect(REDIS_URL).connection_pool.connection_class()
    stock = aioredis.Connection()
    assert type(lean) is not aioredis.Connection  # the lean class is in use
    assert b"".join(lean.pack_command(*args)) == b"".join(stock.pack_command(*args))


@pytest.mark.parametrize("bad", [True, None, object()])
def test_arguments_redis_py_refuses_are_still_refused(bad: object) -> None:
    lean = connect(REDIS_URL).connection_pool.connection_class()
    with pytest.raises(DataError):
        lean.pack_command("SET", "k", bad)


async def test_a_command_larger_than_the_socket_buffers_is_written_whole(
    redis: Redis, keys: Keys
) -> None:
    # 16 MB: most of it is still in the transport's buffer when the write call returns, so
    # the send waits for it to drain (redis-py's path) before reading the answer.
    value = os.urandom(8 * 1024 * 1024) * 2
    await redis.set(keys.stream("big"), value)
    assert await redis.get(keys.stream("big")) == value
    await redis.delete(keys.stream("big"))


async def test_a_redis_that_stops_reading_gives_an_error_not_a_hang_then_serves_again() -> None:
    from bench.common import Processes, start_redis

    with Processes() as procs:
        port = start_redis(procs)
        pid = procs.procs[-1].popen.pid
        client = connect(f"redis://127.0.0.1:{port}/0", socket_timeout=0.5)
        await client.set("k", b"before")
        os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises((RedisTimeoutError, ConnectionError)):
                # Deadline: redis-py retries a timed-out command a few times (reconnecting).
                await asyncio.wait_for(client.set("k", os.urandom(32 * 1024 * 1024)), 60)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await client.get("k") == b"before"
        await client.aclose()


async def test_a_busy_pool_serves_every_waiting_command(prefix: str) -> None:
    # More concurrent commands than connections: the ones that wait get a connection as others
    # give theirs back (none is overtaken until its timeout), and every answer is its own.
    client = connect(REDIS_URL, max_connections=2, timeout_s=30)
    key = f"{prefix}busy"
    try:
        n = await asyncio.gather(*(client.incr(key) for _ in range(200)))
        assert sorted(n) == list(range(1, 201))
        assert len(client.connection_pool._in_use_connections) == 0
        assert len(client.connection_pool._available_connections) == 2
    finally:
        await client.delete(key)
        await client.aclose()


async def test_a_connection_given_back_with_an_unread_answer_is_not_used_as_it_is(
    prefix: str
) -> None:
    # A command whose answer was never read (a caller cancelled mid-command) must not hand
    # that answer to the next command on the same connection.
    client = connect(REDIS_URL, max_connections=1)
    key = f"{prefix}unread"
    try:
        await client.set(key, b"mine")
        pool = client.connection_pool
        conn = await pool.get_connection()
        await conn.send_command("PING")  # its +PONG stays unread
        await wait_until(conn.can_read)  # the answer is there, unread
        await pool.release(conn)
        assert await client.get(key) == b"mine"
    finally:
        await client.delete(key)
        await client.aclose()
