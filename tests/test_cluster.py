"""On a real 3-master Redis Cluster: the client, partitions spread over the masters, the
de-duplication blocks (transform's fenced commit) through a slot moving between masters while
commits run and through a master stopped (SIGSTOP, on a private cluster the test starts), and
lag per node.

The stages on the cluster (cluster key layout): ``tests/test_cluster_pipeline.py`` and the
``cluster_too`` tests (``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from pipeline import dedup
from pipeline.backlog import by_node, snapshot
from pipeline.keys import GROUP_TRANSFORM, Keys
from pipeline.registry import Registry
from pipeline.streams import Redis, connect
from tests.wait import wait_until, within
from workers.ingest_mqtt import Appender
from workers.transform.scripts import Commit

WINDOW = 3600
TOKEN = "t1 tok"


async def _own(redis: Redis, keys: Keys, streams: list[str]) -> None:
    """This test's transform owns every partition (the lease its commits are fenced by)."""
    for s in streams:
        await redis.set(keys.transform_lease(keys.partition_of_stream(s) or 0), TOKEN)


async def _commit(commit: Commit, keys: Keys, stream: str, event_ids: list[str],
                  mark: int) -> int:
    """Commit ``event_ids`` as new events claimed by ``mark`` (their de-dup block only)."""
    step = dedup.Window(WINDOW).now()
    return await commit.run(None, stream,
                            keys.transform_lease(keys.partition_of_stream(stream) or 0),
                            TOKEN, dedup.block_key(keys, stream, WINDOW, step),
                            dedup.block((dedup.digest(e), mark) for e in event_ids),
                            dedup.block_ttl_ms(WINDOW), [], [])


async def _known(redis: Redis, keys: Keys, stream: str, event_ids: list[str]) -> list[int | None]:
    """What the partition's next owner knows of ``event_ids`` (its takeover load)."""
    window = dedup.Window(WINDOW)
    await dedup.load(redis, keys, stream, WINDOW, window)
    return [window.find(dedup.digest(e)) for e in event_ids]


def _port(node_name: str) -> int:
    return int(node_name.rsplit(":", 1)[1])


async def test_partitions_spread_over_the_masters_and_commit_in_one_slot_each(
        cluster_redis: Redis, prefix: str) -> None:
    keys = Keys(prefix, partitions=6, cluster=True)
    streams = keys.streams("uplinks")
    nodes = {cluster_redis.get_node_from_key(keys.dedup(s)).name  # type: ignore[attr-defined]
             for s in streams}
    assert len(nodes) >= 2, nodes
    await _own(cluster_redis, keys, streams)
    commit = Commit(cluster_redis, keys, GROUP_TRANSFORM)
    mark = dedup.mark(streams[0], "1-0")
    for p, s in enumerate(streams):
        assert await _commit(commit, keys, s, [f"ev-{p}-{i}" for i in range(20)], mark) == 1
    for p, s in enumerate(streams):
        assert await _known(cluster_redis, keys, s, [f"ev-{p}-{i}" for i in range(20)]) == [
            mark] * 20
        assert await _known(cluster_redis, keys, s, [f"ev-{p + 1}-0"]) == [None]
    # Every key of a partition's state lives in that partition's slot.
    for s in streams:
        slot = cluster_redis.keyslot(keys.dedup(s))  # type: ignore[attr-defined]
        assert cluster_redis.keyslot(s) == slot  # type: ignore[attr-defined]
        async for k in cluster_redis.scan_iter(match=f"{keys.dedup(s)}*"):
            assert cluster_redis.keyslot(k) == slot  # type: ignore[attr-defined]


async def begin_move(src: Redis, dst: Redis, slot: int) -> tuple[str, str]:
    """Mark ``slot`` IMPORTING on ``dst`` and MIGRATING on ``src`` (the first step of a move,
    as ``redis-cli --cluster reshard`` takes it); returns the two node ids."""
    src_id = (await src.execute_command("CLUSTER", "MYID")).decode()
    dst_id = (await dst.execute_command("CLUSTER", "MYID")).decode()
    await dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
    await src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
    return src_id, dst_id


async def _six_partitions(url: str, prefix: str) -> tuple[Redis, Keys, list[str], dict[str, int]]:
    """A client of the cluster at ``url``, its 6-partition key layout, the uplinks streams and
    the port of the master holding each."""
    client = connect(url, socket_timeout=120)
    await client.ping()
    keys = Keys(prefix, partitions=6, cluster=True)
    streams = keys.streams("uplinks")
    node = {s: _port(client.get_node_from_key(s).name)  # type: ignore[attr-defined]
            for s in streams}
    return client, keys, streams, node


async def _move_slot(slot: int, source: int, target: int, step: int = 20,
                     between: Callable[[], Awaitable[object]] | None = None) -> int:
    """Move one slot's keys from the master on port ``source`` to the one on ``target`` as
    ``redis-cli --cluster reshard`` does (IMPORTING, MIGRATING, MIGRATE ``step`` keys at a
    time, NODE); returns how many keys moved. ``between()`` is awaited after each step (the
    caller's work progressing while the slot is half-moved)."""
    src = connect(f"redis://127.0.0.1:{source}/0")
    dst = connect(f"redis://127.0.0.1:{target}/0")
    try:
        _, dst_id = await begin_move(src, dst, slot)
        moved = 0
        while True:
            batch = await src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, step)
            if not batch:
                break
            # REPLACE: a key the target created while the slot was half-moved (a claim sent
            # there by ASK) gives way to the source's, which holds every earlier claim.
            await src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 10_000,
                                      "REPLACE", "KEYS", *batch)
            moved += len(batch)
            await asyncio.sleep(0)  # let the claims run between steps
            if between is not None:
                await between()
        for port in {target, source}:
            node = dst if port == target else src
            await node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return moved
    finally:
        await src.aclose()
        await dst.aclose()


async def test_commits_lose_nothing_while_their_slot_moves(cluster_redis: Redis,
                                                           prefix: str) -> None:
    keys = Keys(prefix, partitions=3, cluster=True)
    stream = keys.stream("uplinks", 1)
    base = keys.dedup(stream)
    slot = cluster_redis.keyslot(base)  # type: ignore[attr-defined]
    source = _port(cluster_redis.get_node_from_key(base).name)  # type: ignore[attr-defined]
    target = next(_port(n.name) for n in cluster_redis.get_primaries()  # type: ignore[attr-defined]
                  if _port(n.name) != source)
    await _own(cluster_redis, keys, [stream])
    commit = Commit(cluster_redis, keys, GROUP_TRANSFORM)
    mark = dedup.mark(stream, "1-0")
    committed: list[str] = []
    retried: Counter[str] = Counter()
    stop = asyncio.Event()

    async def committer() -> None:
        i = 0
        while not stop.is_set():
            batch = [f"ev-{j}" for j in range(i, i + 50)]
            try:
                assert await _commit(commit, keys, stream, batch, mark) == 1
            except RedisError as exc:
                # A script caught between two masters (a key already moved): it is retried,
                # as transform's consume loop retries a batch.
                retried[type(exc).__name__] += 1
                continue
            committed.extend(batch)
            i += 50

    task = asyncio.create_task(committer())
    try:
        await wait_until(lambda: len(committed) >= 2000, what="commits before the move")
        before = list(committed)
        moved = await _move_slot(slot, source, target)
        after_move = len(committed)
        await wait_until(lambda: len(committed) >= after_move + 1000,
                         what="commits after the move")
    finally:
        stop.set()
        await task
    assert moved > 0
    assert _port(cluster_redis.get_node_from_key(base).name) == target  # type: ignore[attr-defined]
    # Nothing lost: every event committed before the move is in the blocks a next owner loads,
    # as its own entry's, and so is every one committed after it.
    assert await _known(cluster_redis, keys, stream, before) == [mark] * len(before)
    late = committed[after_move:]
    assert await _known(cluster_redis, keys, stream, late) == [mark] * len(late)
    print(f"slot {slot}: {moved} keys moved {source} -> {target}; commits retried: "
          f"{dict(retried)}")
    await _move_slot(slot, target, source)  # the shared cluster as it was


async def test_lag_reports_each_partition_and_the_master_holding_it(cluster_redis: Redis,
                                                                   prefix: str) -> None:
    keys = Keys(prefix, partitions=6)
    for p, stream in enumerate(keys.streams("uplinks")):
        for _ in range(p + 1):
            await cluster_redis.xadd(stream, {b"d": b"x"})
        await cluster_redis.xgroup_create(stream, "transform", id="0")
    streams = await snapshot(cluster_redis, keys)
    uplinks = [s for s in streams if s.name == "uplinks"]
    assert [s.partition for s in uplinks] == list(range(6))
    masters = {n.name for n in cluster_redis.get_primaries()}  # type: ignore[attr-defined]
    assert {s.node for s in uplinks} <= masters and len({s.node for s in uplinks}) >= 2
    totals = {t.node: t for t in by_node(streams) if t.group == "transform"}
    assert sum(t.lag for t in totals.values()) == sum(range(1, 7))
    for node, t in totals.items():
        assert t.lag == sum(s.length for s in uplinks if s.node == node)


async def test_a_stopped_master_delays_its_partitions_only_and_loses_nothing(
        private_cluster: tuple[str, dict[int, int]], prefix: str) -> None:
    url, pids = private_cluster
    client = connect(url, socket_timeout=120)
    await client.ping()  # reads the slot map
    keys = Keys(prefix, partitions=6, cluster=True)
    streams = keys.streams("uplinks")
    node = {s: _port(client.get_node_from_key(keys.dedup(s)).name)  # type: ignore[attr-defined]
            for s in streams}
    stopped = node[streams[0]]
    elsewhere = [s for s in streams if node[s] != stopped]
    assert elsewhere, node
    await _own(client, keys, streams)
    commit = Commit(client, keys, GROUP_TRANSFORM)
    mark = dedup.mark(streams[0], "1-0")
    # Every master runs the script once first: redis-py's cluster client loads a script on
    # every master (SCRIPT LOAD to all primaries) at its first NOSCRIPT, so a stopped master
    # would hold up a script's first use on any partition (a process starting during the stop).
    for s in streams:
        assert await _commit(commit, keys, s, ["warm-up"], mark) == 1
    done_elsewhere: list[tuple[str, str]] = []
    try:
        os.kill(pids[stopped], signal.SIGSTOP)
        # A commit for a partition of the stopped master waits for it...
        held = asyncio.create_task(_commit(commit, keys, streams[0], ["held"], mark))
        # ...while the partitions of the other masters go on.
        for i in range(20):
            s = elsewhere[i % len(elsewhere)]
            assert await _commit(commit, keys, s, [f"ev-{i}"], mark) == 1
            done_elsewhere.append((s, f"ev-{i}"))
        assert not held.done()
    finally:
        os.kill(pids[stopped], signal.SIGCONT)
    # Delayed, not refused: it completes once the master runs again, and nothing is lost.
    assert await held == 1
    assert await _known(client, keys, streams[0], ["held"]) == [mark]
    for s, e in done_elsewhere:
        assert await _known(client, keys, s, [e]) == [mark]
    await client.aclose()


async def test_a_stopped_master_holds_up_only_its_partitions_registry_checks(
        private_cluster: tuple[str, dict[int, int]], prefix: str) -> None:
    """Transform checks the registry version of its batch's partition only
    (:meth:`Registry.sync` with a stream): a check of a running master's partition — here
    applying a change made before the stop — goes on while another master is stopped; a
    check of every partition waits for it."""
    url, pids = private_cluster
    client, keys, streams, node = await _six_partitions(url, prefix)
    stopped = node[streams[0]]
    elsewhere = next(s for s in streams if node[s] != stopped)
    device = next(f"dev-{i}" for i in range(1000)
                  if keys.stream_for("uplinks", "tts", f"dev-{i}") == elsewhere)
    registry = Registry(client, keys)
    await registry.start()
    changer = Registry(client, keys)
    await changer.start()
    await changer.register(f"tts:app:{device}", token="T" * 32, template="t")
    before = registry.version_for(elsewhere)
    every: asyncio.Task[None] | None = None
    try:
        os.kill(pids[stopped], signal.SIGSTOP)
        every = asyncio.create_task(registry.sync())
        await within(registry.sync(elsewhere), "the check of a running master's partition")
        assert registry.version_for(elsewhere) == (before or 0) + 1
        assert not every.done()
    finally:
        os.kill(pids[stopped], signal.SIGCONT)
    await within(every, "the check of every partition, once the master runs again")
    await registry.close()
    await changer.close()
    await client.aclose()


async def test_a_stopped_master_holds_up_only_its_partitions_mqtt_appends(
        private_cluster: tuple[str, dict[int, int]], prefix: str) -> None:
    """ingest-mqtt's appender on a cluster: a lane per stream, so the other masters'
    partitions take their entries while one master is stopped; the stopped one's come, in
    order, once it runs again."""
    url, pids = private_cluster
    client, _, streams, node = await _six_partitions(url, prefix)
    stopped = node[streams[0]]
    elsewhere = [s for s in streams if node[s] != stopped]
    appender = Appender(client, batch=4)
    writing = asyncio.create_task(appender.run())
    sent = {s: [b"warm-up"] + [f"{p}-{i}".encode() for i in range(10)]
            for p, s in enumerate(streams)}
    # The append script's first use loads it on every master (test above): before the stop.
    for s in streams:
        assert appender.offer(s, b"warm-up")

    async def appended(stream: str) -> list[bytes]:
        return [f[b"d"] for _, f in await client.xrange(stream)]

    async def elsewhere_done() -> bool:
        return all([await appended(s) == sent[s] for s in elsewhere])

    async def all_at(n: int) -> bool:
        return all([len(await appended(s)) == n for s in streams])

    await wait_until(lambda: all_at(1), what="the warm-up appended")
    try:
        os.kill(pids[stopped], signal.SIGSTOP)
        for i in range(1, 11):
            for s in streams:
                assert appender.offer(s, sent[s][i])
            await asyncio.sleep(0)  # batches of a few entries, as messages arrive
        await wait_until(elsewhere_done, what="the other masters' partitions appended")
    finally:
        os.kill(pids[stopped], signal.SIGCONT)
    await appender.close()
    await within(writing, "the appender, once the master runs again")
    for s in streams:
        assert await appended(s) == sent[s]
    await client.aclose()
