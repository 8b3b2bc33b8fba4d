"""egress against the real Redis and the Blynk emulator over real HTTP; pipeline.order on Redis."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
import pytest
from redis.exceptions import WatchError

from emulators.blynk.model import DatastreamSpec, Device, DeviceSpec, TemplateSpec
from emulators.blynk.server import BlynkEmulator
from emulators.blynk.settings import EmulatorSpec, Settings
from pipeline import echo, metrics
from pipeline.config import (
    BlynkConfig,
    BlynkWebhook,
    Config,
    EgressConfig,
    RedisConfig,
    StreamsConfig,
)
from pipeline.context import Context
from pipeline.events import FIELD, BlynkWrite, DeadLetter, Value, decode_dead, decode_write, encode
from pipeline.keys import GROUP_EGRESS, WRITES, Keys
from pipeline.lease import Lease
from pipeline.order import LastWritten, PartitionCommit, Record
from pipeline.registry import Registry
from pipeline.status import State, StatusBoard
from pipeline.streams import Redis, StreamWriter, now_ms
from tests.wait import wait_until, within
from workers.egress import EgressStage

pytestmark = pytest.mark.cluster_too

#: Echo records (downlinks) are keyed by token, not by partition: config refuses them with
#: cluster mode (docs/DESIGN.md, "Redis Cluster").

# ---- pipeline.order: records, loaded once and committed behind, fenced by the partition lease --


async def owned_by(redis: Redis, keys: Keys, owner: str, partition: int = 0) -> None:
    """Make ``owner`` the holder of a writes partition's egress lease (as PartitionLeases does)."""
    await redis.set(keys.egress_lease(partition), owner, px=60_000)


def commit_of(keys: Keys, records: dict[str, Record], acks: list[str] | None = None,
              partition: int = 0, token: str = "replica-a") -> dict[int, PartitionCommit]:
    """A commit made under the lease value ``token`` (:func:`owned_by` sets the owner's name)."""
    return {partition: PartitionCommit(keys.stream(WRITES, partition), token,
                                       list(records.items()), acks or [])}


async def test_records_are_loaded_merged_in_memory_and_committed_with_the_acks(
    redis: Redis, keys: Keys
) -> None:
    book = LastWritten(redis, keys)
    await owned_by(redis, keys, "replica-a")
    stream = keys.stream(WRITES)
    await redis.xgroup_create(stream, GROUP_EGRESS, id="0", mkstream=True)
    ids = [await redis.xadd(stream, {"d": b"x"}) for _ in range(3)]
    await redis.xreadgroup(GROUP_EGRESS, "replica-a", {stream: ">"})
    a, b = await book.load(["dev-a", "dev-b"])
    assert a.pins == {} and a.newest == -1
    assert a.merge({"V1": 200, "V2": 100}) and b.merge({"V1": 5})
    assert not a.merge({"V1": 150})  # older: kept at 200
    assert await book.commit(commit_of(keys, {"dev-a": a, "dev-b": b},
                                       [i.decode() for i in ids]), GROUP_EGRESS) == {0: True}
    assert (await redis.xpending(stream, GROUP_EGRESS))["pending"] == 0
    again, = await LastWritten(redis, keys).load(["dev-a"])
    assert again.pins == {"V1": 200, "V2": 100} and again.newest == 200


async def test_a_commit_whose_partition_lease_is_another_replicas_does_nothing(
    redis: Redis, keys: Keys
) -> None:
    """Fencing: a replica that lost its partition (its lease lapsed and another replica took
    it) can neither record nor ack what it wrote meanwhile."""
    stream = keys.stream(WRITES)
    await redis.xgroup_create(stream, GROUP_EGRESS, id="0", mkstream=True)
    entry = (await redis.xadd(stream, {"d": b"x"})).decode()
    await redis.xreadgroup(GROUP_EGRESS, "replica-a", {stream: ">"})
    await owned_by(redis, keys, "replica-b")
    a = LastWritten(redis, keys)
    (record,) = await a.load(["dev"])
    record.merge({"V1": 10})
    assert await a.commit(commit_of(keys, {"dev": record}, [entry]), GROUP_EGRESS) == {0: False}
    assert await a.get("dev") == {}
    assert (await redis.xpending(stream, GROUP_EGRESS))["pending"] == 1
    await redis.delete(keys.egress_lease(0))  # nobody's: still not the caller's
    assert await a.commit(commit_of(keys, {"dev": record}, [entry]), GROUP_EGRESS) == {0: False}


async def test_a_commit_made_under_an_earlier_acquisition_by_the_same_replica_does_nothing(
    redis: Redis, keys: Keys
) -> None:
    """Fencing is by ownership, not by name: a commit made while this replica owned the
    partition that reaches Redis only after it lost the partition and took it again (a new
    ownership, which took the entries over and writes them from the record it read) must
    neither roll the record back nor ack what the new ownership holds."""
    stream = keys.stream(WRITES)
    await redis.xgroup_create(stream, GROUP_EGRESS, id="0", mkstream=True)
    entry = (await redis.xadd(stream, {"d": b"x"})).decode()
    await redis.xreadgroup(GROUP_EGRESS, "replica-a", {stream: ">"})
    lease = Lease(redis, keys.egress_lease(0), "replica-a", ttl_ms=60_000)
    assert await lease.acquire()
    earlier = lease.token
    await redis.delete(keys.egress_lease(0))  # lapsed (the replica was frozen) ...
    assert await lease.acquire()  # ... and taken again by the same replica
    assert await lease.holder() == "replica-a" and lease.token != earlier
    book = LastWritten(redis, keys)
    (record,) = await book.load(["dev"])
    record.merge({"V1": 10})
    late = commit_of(keys, {"dev": record}, [entry], token=earlier)
    assert await book.commit(late, GROUP_EGRESS) == {0: False}
    assert await book.get("dev") == {}
    assert (await redis.xpending(stream, GROUP_EGRESS))["pending"] == 1
    current = commit_of(keys, {"dev": record}, [entry], token=lease.token)
    assert await book.commit(current, GROUP_EGRESS) == {0: True}
    assert await book.get("dev") == {"V1": 10}
    assert (await redis.xpending(stream, GROUP_EGRESS))["pending"] == 0


class _Touching(LastWritten):
    """A ``LastWritten`` whose commit, right after reading the leases it ``WATCH``es, lets a
    test change a lease from another connection (``touch``: on the tries listed)."""

    def __init__(self, redis: Redis, keys: Keys, touch: Callable[[], Any],
                 tries: set[int]) -> None:
        super().__init__(redis, keys)
        self.touch, self.tries, self.reads = touch, tries, 0

    async def _held(self, conn: Any, leases: Any) -> list[Any]:
        held = await super()._held(conn, leases)
        self.reads += 1
        if self.reads in self.tries:
            await self.touch()
        return held


async def pending_one(redis: Redis, keys: Keys, partition: int = 0) -> str:
    """One entry of a writes partition, delivered to ``replica-a`` and pending."""
    stream = keys.stream(WRITES, partition)
    await redis.xgroup_create(stream, GROUP_EGRESS, id="0", mkstream=True)
    entry = (await redis.xadd(stream, {"d": b"x"})).decode()
    await redis.xreadgroup(GROUP_EGRESS, "replica-a", {stream: ">"})
    return entry


async def test_a_lease_taken_between_the_commits_check_and_its_exec_fences_it_off(
    redis: Redis, keys: Keys
) -> None:
    """On one Redis the commit checks the lease under ``WATCH`` and writes in ``MULTI``: a
    lease that another replica takes after the check aborts the ``EXEC`` (nothing written),
    and the retry finds the other token: nothing recorded, nothing acked."""
    if keys.cluster:
        pytest.skip("the cluster layout commits by script (pipeline/order.py): no WATCH")
    entry = await pending_one(redis, keys)
    await owned_by(redis, keys, "replica-a")
    book = _Touching(redis, keys, lambda: owned_by(redis, keys, "replica-b"), {1})
    (record,) = await book.load(["dev"])
    record.merge({"V1": 10})
    assert await book.commit(commit_of(keys, {"dev": record}, [entry]), GROUP_EGRESS) \
        == {0: False}
    assert book.reads == 2  # checked, aborted, checked again
    assert not await redis.exists(keys.records(0))
    assert (await redis.xpending(keys.stream(WRITES), GROUP_EGRESS))["pending"] == 1


async def test_a_lease_renewed_between_the_commits_check_and_its_exec_is_committed_on_retry(
    redis: Redis, keys: Keys
) -> None:
    """A renewal by the owner itself (``PEXPIRE``: same token) aborts the ``EXEC`` too; the
    retry finds the token again and commits. A lease touched on every try raises after a few
    (a ``RedisError``, retried by egress like any other) with nothing written."""
    if keys.cluster:
        pytest.skip("the cluster layout commits by script (pipeline/order.py): no WATCH")
    entry = await pending_one(redis, keys)
    await owned_by(redis, keys, "replica-a")
    lease = keys.egress_lease(0)
    book = _Touching(redis, keys, lambda: redis.pexpire(lease, 60_000), set(range(1, 100)))
    (record,) = await book.load(["dev"])
    record.merge({"V1": 10})
    with pytest.raises(WatchError):
        await book.commit(commit_of(keys, {"dev": record}, [entry]), GROUP_EGRESS)
    assert not await redis.exists(keys.records(0))
    assert (await redis.xpending(keys.stream(WRITES), GROUP_EGRESS))["pending"] == 1
    book.reads, book.tries = 0, {1}
    assert await book.commit(commit_of(keys, {"dev": record}, [entry]), GROUP_EGRESS) \
        == {0: True}
    assert book.reads == 2
    assert await book.get("dev") == {"V1": 10}
    assert (await redis.xpending(keys.stream(WRITES), GROUP_EGRESS))["pending"] == 0


async def test_one_commit_of_several_partitions_writes_those_whose_lease_holds_the_token(
    redis: Redis, prefix: str, backend: str
) -> None:
    """Partitions of one commit are fenced one by one: a partition another replica took has
    nothing recorded or acked, the others in the same commit are written."""
    keys = Keys(prefix, 2, cluster=backend == "cluster")
    entries = [await pending_one(redis, keys, p) for p in (0, 1)]
    await owned_by(redis, keys, "replica-a", 0)
    await owned_by(redis, keys, "replica-b", 1)
    book = LastWritten(redis, keys)
    records = await book.load(["dev-0", "dev-1"], [0, 1])
    for r in records:
        r.merge({"V1": 5})
    parts = {p: commit_of(keys, {f"dev-{p}": records[p]}, [entries[p]], p)[p] for p in (0, 1)}
    assert await book.commit(parts, GROUP_EGRESS) == {0: True, 1: False}
    assert [r.pins for r in await book.load(["dev-0", "dev-1"], [0, 1])] == [{"V1": 5}, {}]
    assert [(await redis.xpending(keys.stream(WRITES, p), GROUP_EGRESS))["pending"]
            for p in (0, 1)] == [0, 1]

async def test_a_commit_of_more_records_and_acks_than_one_lua_unpack_takes_writes_them_all(
    redis: Redis, keys: Keys
) -> None:
    """The cluster layout's script cuts its arguments into ``unpack``s of 1,000 (Lua's limit):
    a commit of 1,201 writes records and acks every one (and so does the transaction)."""
    stream = keys.stream(WRITES)
    await redis.xgroup_create(stream, GROUP_EGRESS, id="0", mkstream=True)
    async with redis.pipeline(transaction=False) as pipe:
        for _ in range(1_201):
            pipe.xadd(stream, {"d": b"x"})
        ids = [i.decode() for i in await pipe.execute()]
    await redis.xreadgroup(GROUP_EGRESS, "replica-a", {stream: ">"})
    await owned_by(redis, keys, "replica-a")
    book = LastWritten(redis, keys)
    records = {f"dev-{i}": Record({"V1": i}, newest=i) for i in range(1_201)}
    assert await book.commit(commit_of(keys, records, ids), GROUP_EGRESS) == {0: True}
    assert await redis.hlen(keys.records(0)) == 1_201
    assert (await book.load(["dev-1200"]))[0].pins == {"V1": 1_200}
    assert (await redis.xpending(stream, GROUP_EGRESS))["pending"] == 0

async def test_records_live_in_one_hash_per_partition_which_a_next_owner_reads(
    redis: Redis, keys: Keys
) -> None:
    """A commit stores every changed record as a field of its partition's hash (no per-device
    key), stamped with when it was stored; the partition's next owner reads them there."""
    await owned_by(redis, keys, "replica-a")
    book = LastWritten(redis, keys)
    a, b = await book.load(["tts:app:a", "tts:app:b"])
    a.merge({"V1": 7})
    b.merge({"V1": 8, "V2": 9})
    assert await book.commit(commit_of(keys, {"tts:app:a": a, "tts:app:b": b}), GROUP_EGRESS,
                             now_ms=1_234) == {0: True}
    assert sorted(await redis.hkeys(keys.records(0))) == [b"tts:app:a", b"tts:app:b"]
    assert not await redis.exists(keys.last_written("tts:app:a"))
    await owned_by(redis, keys, "replica-b")  # taken over
    again = await LastWritten(redis, keys).load(["tts:app:b", "tts:app:a", "tts:app:never"])
    assert [r.pins for r in again] == [{"V1": 8, "V2": 9}, {"V1": 7}, {}]
    assert again[0].stored_ms == 1_234 and again[0].newest == 9


async def test_an_upgrade_reads_the_per_device_records_of_the_version_before(
    redis: Redis, keys: Keys
) -> None:
    """An upgrade keeps what Blynk has: a device with no field in its partition's hash is read
    from its per-device key (here one written by the per-device lease's scripts: cmsgpack in
    Lua, a lease owner in its header); what is committed over it goes to the hash, keeping
    the layout, and is what is read from then on."""
    key = keys.last_written("dev")
    await redis.eval("redis.call('SET', KEYS[1], cmsgpack.pack({1700000000000, 'egress-9', "
                     "1700000000000000, 1700000000000, 7, 55}) .. cmsgpack.pack({V1=55, V2=3}))",
                     1, key)
    (record,) = await LastWritten(redis, keys).load(["dev"])
    assert record == Record({"V1": 55, "V2": 3}, tat_us=1700000000000000,
                            stored_ms=1700000000000, version=7, newest=55)
    await owned_by(redis, keys, "replica-a")
    record.merge({"V2": 60})
    await LastWritten(redis, keys).commit(commit_of(keys, {"dev": record}), GROUP_EGRESS)
    header = await redis.eval("local _, h = cmsgpack.unpack_one(redis.call('HGET', KEYS[1], "
                              "ARGV[1])) return {h[1], h[2], h[5], h[6]}", 1,
                              keys.records(0), "dev")
    assert header == [0, b"", 8, 60]
    assert await LastWritten(redis, keys).get("dev") == {"V1": 55, "V2": 60}  # the hash's


async def test_a_partitions_hash_keeps_its_expiry_until_a_quarter_of_the_ttl_has_passed(
    redis: Redis, keys: Keys
) -> None:
    """The hash expires 5/4 of the ttl after its expiry was set (so it outlives every record
    stored in it by the ttl at least, and a partition nobody writes leaves nothing behind);
    a commit sets it again only once a quarter of the ttl has passed since it last did."""
    day = 24 * 3600 * 1000
    book = LastWritten(redis, keys, ttl_ms=8 * day)
    await owned_by(redis, keys, "replica-a")
    hash_key = keys.records(0)
    (record,) = await book.load(["dev"])
    t = now_ms()
    record.merge({"V1": 1})
    await book.commit(commit_of(keys, {"dev": record}), GROUP_EGRESS, now_ms=t)
    assert 9 * day < await redis.pttl(hash_key) <= 10 * day
    await redis.pexpire(hash_key, 5 * day)  # as if set 5 days ago
    record.merge({"V1": 2})
    await book.commit(commit_of(keys, {"dev": record}), GROUP_EGRESS, now_ms=t + day)
    assert await redis.pttl(hash_key) <= 5 * day  # kept
    record.merge({"V1": 3})
    await book.commit(commit_of(keys, {"dev": record}), GROUP_EGRESS, now_ms=t + 2 * day)
    assert 9 * day < await redis.pttl(hash_key) <= 10 * day  # set again
    assert await book.get("dev") == {"V1": 3}


async def test_the_sweep_deletes_records_stored_longer_than_the_ttl_ago(
    redis: Redis, keys: Keys
) -> None:
    """Redis 7.0 has no per-field expiry: a sweep, a page at a time, deletes the fields last
    stored more than the ttl ago and keeps the others."""
    ttl = 1_000_000
    book = LastWritten(redis, keys, ttl_ms=ttl)
    await owned_by(redis, keys, "replica-a")
    t = 10 * ttl
    old = {f"tts:app:old-{i}": Record({"V1": i}, newest=i) for i in range(600)}
    fresh = {f"tts:app:new-{i}": Record({"V1": i}, newest=i) for i in range(600)}
    await book.commit(commit_of(keys, old), GROUP_EGRESS, now_ms=t - ttl - 1)
    await book.commit(commit_of(keys, fresh), GROUP_EGRESS, now_ms=t - ttl)
    cursor, deleted, steps = 0, 0, 0
    while True:
        cursor, n = await book.sweep(0, cursor, count=50, now_ms=t)
        deleted, steps = deleted + n, steps + 1
        if not cursor:
            break
    assert deleted == 600 and steps > 1  # more than a listpack holds: paged
    left = {k.decode() for k in await redis.hkeys(keys.records(0))}
    assert left == set(fresh)
    assert await book.sweep(0, 0, count=1000, now_ms=t) == (0, 0)


async def test_the_sweep_keeps_a_record_stored_again_after_it_was_found_expired(
    redis: Redis, keys: Keys
) -> None:
    """A field is deleted only while it holds the value the sweep read: a record stored
    between the read and the delete (by this owner, or by a next owner after the partition
    moved) is kept, so a sweep needs no fencing — whoever runs it deletes only what the ttl
    says is expired."""
    ttl = 1_000_000
    book = LastWritten(redis, keys, ttl_ms=ttl)
    await owned_by(redis, keys, "replica-a")
    records = {"tts:app:a": Record({"V1": 1}, newest=1), "tts:app:b": Record({"V1": 2},
                                                                               newest=2)}
    t = 10 * ttl
    await book.commit(commit_of(keys, records), GROUP_EGRESS, now_ms=t - 2 * ttl)
    cursor, found = await book.expired(0, now_ms=t)
    assert cursor == 0 and sorted(f for f, _ in found) == [b"tts:app:a", b"tts:app:b"]
    await owned_by(redis, keys, "replica-b")  # a next owner stores one of them meanwhile
    records["tts:app:a"].merge({"V1": 5})
    await LastWritten(redis, keys, ttl_ms=ttl).commit(
        commit_of(keys, {"tts:app:a": records["tts:app:a"]}, token="replica-b"), GROUP_EGRESS,
        now_ms=t)
    assert await book.drop_expired(0, found) == 1  # the old owner's sweep, late
    assert await book.get("tts:app:a") == {"V1": 5}
    assert await book.get("tts:app:b") == {}


def test_a_record_says_stale_only_when_every_value_is_older_pin_by_pin() -> None:
    record = Record()
    record.merge({"V1": 100, "V2": 50})
    assert record.stale({"V1": 99})
    assert not record.stale({"V1": 100})  # equal: applied in arrival order
    assert not record.stale({"V2": 60})  # older than the newest pin, newer than its own
    assert not record.stale({"V1": 10, "V3": 1})  # a pin never written
    assert record.stale({"V1": 10, "V2": 49})


def test_a_records_rate_limit_paces_requests_and_a_429_defers_it() -> None:
    record = Record()
    interval = 20_000  # 50/s
    assert record.take(interval, 1, now_us=1_000_000) == 0
    assert record.take(interval, 1, now_us=1_000_000) == pytest.approx(0.02)
    assert record.take(interval, 1, now_us=1_020_000) == 0
    record.defer(100.0)
    assert record.take(interval, 1) > 99


# ---- egress against the Blynk emulator over real HTTP ------------------------------------------

TEMPLATE_ID = "TMPLegress001"
HISTORY_PINS = [f"V{n}" for n in range(10, 25)]


def token(n: int) -> str:
    return f"egress{n:026d}"


def device_key(n: int) -> str:
    return f"tts:app:dev-{n}"


def emulator_spec(devices: int = 5, **settings: Any) -> EmulatorSpec:
    datastreams = [
        DatastreamSpec(id=1, pin="V1", name="temperature", type="double"),
        DatastreamSpec(id=2, pin="V2", name="count", type="integer"),
        DatastreamSpec(id=3, pin="V3", name="state", type="string"),
    ] + [DatastreamSpec(id=n, pin=f"V{n}", name=f"h{n}", type="double") for n in range(10, 25)]
    return EmulatorSpec(
        regions={"fra1": 0},
        settings=Settings(**settings),
        templates=[TemplateSpec(id=TEMPLATE_ID, name="Egress", datastreams=datastreams)],
        devices=[DeviceSpec(name=f"Device {n}", token=token(n), template=TEMPLATE_ID, id=n)
                 for n in range(devices)],
    )


@dataclass
class Rig:
    """The emulator on a real port, the real Redis, and a way to run egress stages on them."""

    emu: BlynkEmulator
    url: str
    redis: Redis
    keys: Keys
    prefix: str
    contexts: list[Context] = field(default_factory=list)
    #: More ``blynk.servers`` than fra1 (a 308 is followed only to a configured server).
    servers: dict[str, str] = field(default_factory=dict)

    async def add(self, *writes: BlynkWrite) -> None:
        """Append each write to its device's writes partition (as transform does)."""
        stream = self.keys.stream
        part = self.keys.partition_of_device_key
        await StreamWriter(self.redis).add_many(
            [(stream(WRITES, part(w.device_key)), encode(w)) for w in writes])

    def stage(self, *, consumer: str = "egress-1", until_idle: bool = True,
              streams: dict[str, Any] | None = None, blynk_timeout_s: float = 5,
              webhooks: bool = False, **egress: Any) -> EgressStage:
        cfg = Config(
            redis=RedisConfig(prefix=self.prefix),
            blynk=BlynkConfig(servers={"fra1": self.url, **self.servers}, default_server="fra1",
                              timeout_s=blynk_timeout_s),
            egress=EgressConfig(**egress),
            # Short blocking reads, as in the other stages' tests: a stop waits for the read in
            # flight (pipeline.consumer), which the default 2 s would add to every stop.
            streams=StreamsConfig(**({"block_ms": 100} | (streams or {}))),
            # with a Blynk webhook configured, egress records its writes for echo suppression
            blynk_webhooks=[BlynkWebhook(name="down")] if webhooks else [],
        )
        ctx = Context(config=cfg, redis=self.redis, keys=self.keys, consumer=consumer,
                      writer=StreamWriter(self.redis))
        self.contexts.append(ctx)
        return EgressStage(ctx, until_idle=until_idle)

    async def drain(self, stage: EgressStage, limit_s: float = 30) -> None:
        """Run a burst-mode stage until it has nothing left (bounded, never a timing check)."""
        await stage.startup()
        await within(stage.main_loop(asyncio.Event()), timeout_s=limit_s)

    def device(self, n: int) -> Device:
        return self.emu.device_by_token(token(n))

    async def dead(self) -> list[DeadLetter]:
        out: list[DeadLetter] = []
        for stream in self.keys.dead_streams():  # one per partition in the cluster layout
            rows = await self.redis.xrange(stream)
            out += [decode_dead(fields[FIELD]) for _, fields in rows]
        return out

    async def pending(self) -> int:
        """Entries read and not acked, over every writes partition."""
        n = 0
        for stream in self.keys.streams(WRITES):
            n += int((await self.redis.xpending(stream, GROUP_EGRESS))["pending"])
        return n

    def with_partitions(self, partitions: int) -> Rig:
        """The same emulator and Redis under a key layout of ``partitions`` writes partitions
        (a prefix of its own)."""
        prefix = f"{self.prefix}p{partitions}:"
        return Rig(self.emu, self.url, self.redis,
                   Keys(prefix, partitions, cluster=self.keys.cluster), prefix,
                   self.contexts, self.servers)

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        async with aiohttp.ClientSession() as s, s.request(
            method, f"{self.url}/_admin/{path}", json=body
        ) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


@pytest.fixture
async def rig(redis: Redis, keys: Keys, prefix: str) -> AsyncIterator[Rig]:
    emu = BlynkEmulator.from_spec(emulator_spec())
    async with emu.serve({"fra1": 0}) as urls:
        rig = Rig(emu, urls["fra1"], redis, keys, prefix)
        yield rig
        for ctx in rig.contexts:
            await ctx.blynk().close()


@asynccontextmanager
async def two_regions() -> AsyncIterator[tuple[BlynkEmulator, dict[str, str]]]:
    """One Blynk emulator served as two regions, fra1 and ny3: yields it and the region URLs."""
    spec = emulator_spec()
    spec.regions = {"fra1": 0, "ny3": 0}
    emu = BlynkEmulator.from_spec(spec)
    async with emu.serve({"fra1": 0, "ny3": 0}) as urls:
        yield emu, urls


def write(n: int, ts: int, pins: dict[str, Value], *, received: int | None = None,
          history: list[str] | None = None, tok: str | None = None) -> BlynkWrite:
    return BlynkWrite(token=tok or token(n), server="fra1", device_key=device_key(n), pins=pins,
                      event_ts_ms=ts, received_ts_ms=received or ts,
                      event_id=f"{n}-{ts}-{sorted(pins)}", history_pins=history or [])


def value(rig: Rig, n: int, pin: str) -> Any:
    got = rig.device(n).values.get(pin)
    return None if got is None else got[0]


def injected(rig: Rig, fault: str) -> int:
    """How often the Blynk emulator has injected ``fault`` (``"429"``, ``"hang"``, ...)."""
    return int(rig.emu.faults.state()["injected"].get(fault, 0))


async def until_injected(rig: Rig, fault: str, at_least: int, what: str) -> None:
    await wait_until(lambda: injected(rig, fault) >= at_least, what=what)


async def test_bursts_become_one_message_per_device(rig: Rig) -> None:
    t0 = now_ms()
    await rig.add(*[write(n, t0 + i, {"V1": i + 0.5, "V2": n}) for i in range(5)
                    for n in range(5)])
    await rig.drain(rig.stage())
    for n in range(5):
        assert rig.device(n).messages == 1
        assert value(rig, n, "V1") == 4.5
        assert value(rig, n, "V2") == n
    assert await rig.pending() == 0
    assert await rig.dead() == []


async def test_late_and_redelivered_entries_never_roll_back(rig: Rig) -> None:
    t0 = now_ms()
    stream = rig.keys.stream(WRITES)
    # E1 (older) is read by a consumer that then dies holding it
    await rig.add(write(0, t0, {"V1": 1.0}))
    await rig.redis.xgroup_create(stream, GROUP_EGRESS, id="0", mkstream=True)
    await rig.redis.xreadgroup(GROUP_EGRESS, "dead-consumer", {stream: ">"}, count=10)
    # E2 (newer) is written by a live replica
    await rig.add(write(0, t0 + 100, {"V1": 2.0}))
    await rig.drain(rig.stage())
    assert value(rig, 0, "V1") == 2.0
    messages = rig.device(0).messages
    # a late entry, and the same newer entry redelivered, both arrive afterwards
    await rig.add(write(0, t0 + 50, {"V1": 1.5}), write(0, t0 + 100, {"V1": 2.0}))
    await rig.drain(rig.stage())
    # E1 is reclaimed from the dead consumer (XAUTOCLAIM) by another replica
    await rig.drain(rig.stage(consumer="egress-2", streams={"claim_idle_ms": 1}))
    assert value(rig, 0, "V1") == 2.0
    # the late (older) values are not even sent; the redelivered entry, equal in event time to
    # what Blynk has, is sent once more (equal times are applied in arrival order): same value
    assert rig.device(0).messages == messages + 1
    assert await rig.pending() == 0
    assert await LastWritten(rig.redis, rig.keys).get(device_key(0)) == {"V1": t0 + 100}


async def test_after_an_upgrade_a_devices_per_device_record_keeps_it_from_going_backwards(
    rig: Rig,
) -> None:
    """A device whose record is still in the per-device key of the version before the hash:
    an older value is not sent; a newer one is, and its record then lives in the partition's
    hash (the old key untouched, left to expire)."""
    t0 = now_ms()
    old_key = rig.keys.last_written(device_key(0))
    await rig.redis.set(old_key, encode_record({"V1": t0 + 100}), px=60_000)
    await rig.add(write(0, t0 + 50, {"V1": 1.0}))
    await rig.drain(rig.stage())
    assert rig.device(0).messages == 0  # older than Blynk has: not sent
    await rig.add(write(0, t0 + 200, {"V1": 2.0}))
    await rig.drain(rig.stage())
    assert value(rig, 0, "V1") == 2.0
    p = rig.keys.partition_of_device_key(device_key(0))
    assert await rig.redis.hexists(rig.keys.records(p), device_key(0))
    assert await LastWritten(rig.redis, rig.keys).get(device_key(0)) == {"V1": t0 + 200}
    assert await rig.redis.pttl(old_key) > 0
    assert await rig.pending() == 0


async def test_the_owner_of_a_partition_sweeps_its_expired_records(rig: Rig) -> None:
    """A running replica deletes, in the background, the records of its partitions stored
    longer than the ttl ago, and keeps the others."""
    book = LastWritten(rig.redis, rig.keys)
    await owned_by(rig.redis, rig.keys, "setup")
    t = now_ms()
    await book.commit(commit_of(rig.keys, {device_key(0): Record({"V1": 1}, newest=1)},
                                token="setup"), GROUP_EGRESS, now_ms=t - book.ttl_ms - 1)
    await book.commit(commit_of(rig.keys, {device_key(1): Record({"V1": 2}, newest=2)},
                                token="setup"), GROUP_EGRESS, now_ms=t)
    await rig.redis.delete(rig.keys.egress_lease(0))
    stage = rig.stage(until_idle=False)
    stage.sweep_every_s = 0.05  # a page of the sweep every 5 s in production
    stop = asyncio.Event()
    loop = await running(rig, stage, stop)
    try:
        async def swept() -> bool:
            return not await rig.redis.hexists(rig.keys.records(0), device_key(0))

        await wait_until(swept, what="the expired record swept")
    finally:
        stop.set()
        await within(loop)
    assert await book.get(device_key(1)) == {"V1": 2}


async def test_replicas_never_write_a_device_backwards(rig: Rig) -> None:
    """Three replicas run on one writes partition (one owns it, two stand by) with shuffled
    event times, jittery Blynk latency and waves of entries: every value Blynk receives is
    newer than the one before."""
    await rig.admin("POST", "faults", {"jitter_ms": 30})
    stop = asyncio.Event()
    replicas = [rig.stage(consumer=c, until_idle=False, streams={"batch": 4}, flush_count=4)
                for c in ("a", "b", "c")]
    for r in replicas:
        await r.startup()
    running = [asyncio.create_task(r.main_loop(stop)) for r in replicas]
    t0 = now_ms()
    rnd = random.Random(7)
    book = LastWritten(rig.redis, rig.keys)
    for wave in range(12):
        values = list(range(wave * 12, wave * 12 + 12))
        rnd.shuffle(values)
        await rig.add(*[write(0, t0 + v, {"V2": v}) for v in values])
        newest = t0 + wave * 12 + 11

        async def wave_written(newest: int = newest) -> bool:
            return ((await book.get(device_key(0))).get("V2") == newest
                    and not await rig.pending())

        await wait_until(wave_written, what=f"wave {wave} fully written")
    stop.set()
    await within(asyncio.gather(*running))
    written = [v for _, v in rig.device(0).history["V2"]]
    assert written == sorted(written)  # Blynk only ever moved forward in event time
    assert written[-1] == 143
    assert len(written) >= 12


@pytest.mark.parametrize("how", ["killed", "stopped"])
async def test_replicas_split_the_partitions_and_a_gone_ones_are_taken_over(
    rig: Rig, how: str
) -> None:
    """Two replicas share four writes partitions, two each; one is killed (cancelled: its
    leases lapse, its entries stay pending) or stopped (it writes what it holds and releases
    its leases), and the other takes its partitions and their pending entries over. Nothing
    is lost and every device's values reach Blynk in event-time order."""
    prig = rig.with_partitions(4)
    await prig.admin("POST", "faults", {"jitter_ms": 20})
    timing = {"blynk_timeout_s": 1, "lease_ttl_ms": 2000}
    a = prig.stage(consumer="a", until_idle=False, **timing)
    b = prig.stage(consumer="b", until_idle=False, **timing)
    stop, stop_b = asyncio.Event(), asyncio.Event()
    run_a = await running(prig, a, stop)
    run_b = await running(prig, b, stop_b)
    await wait_until(lambda: len(a.owned) == 2 and len(b.owned) == 2,
                     what="the four partitions split two and two")
    assert not a.owned.keys() & b.owned.keys()
    t0 = now_ms()
    rnd = random.Random(5)

    async def wave(w: int) -> None:
        values = list(range(w * 10, w * 10 + 10))
        rnd.shuffle(values)
        await prig.add(*[write(n, t0 + v, {"V2": v}) for v in values for n in range(5)])

    def all_written(w: int) -> Callable[[], Any]:
        async def check() -> bool:
            return (all(value(prig, n, "V2") == w * 10 + 9 for n in range(5))
                    and not await prig.pending())
        return check

    await wave(0)
    await wait_until(all_written(0), what="wave 0 written by both replicas")
    await wave(1)
    if how == "killed":
        run_b.cancel()  # maybe holding entries of wave 1
        with contextlib.suppress(asyncio.CancelledError):
            await run_b
    else:
        stop_b.set()
        await within(run_b)
    await wait_until(lambda: len(a.owned) == 4, what=f"A taking B's partitions over ({how})")
    await wait_until(all_written(1), what="wave 1 written, B's share by A")
    await wave(2)
    await wait_until(all_written(2), what="wave 2 written by A alone")
    stop.set()
    await within(run_a)
    for n in range(5):
        written = [v for _, v in prig.device(n).history["V2"]]
        assert written == sorted(written)  # Blynk only ever moved forward in event time
        assert written[-1] == 29
    assert await prig.dead() == []


async def test_a_partition_handed_over_records_and_acks_its_writes_under_way_first(
    rig: Rig,
) -> None:
    """A rebalance hands a partition over while a write of it is under way. The write ends
    before the lease is released, and — the lease being still this replica's — it is recorded
    and acked: forgotten, it would be sent again by the next owner (a duplicate message, and
    duplicate history points, at every scale-out)."""
    prig = rig.with_partitions(2)
    a = prig.stage(consumer="a", until_idle=False, lease_ttl_ms=60_000)  # renewal far
    stop = asyncio.Event()
    run = await running(prig, a, stop)
    try:
        await wait_until(lambda: set(a.owned) == {0, 1}, what="A owning both partitions")
        n = next(n for n in range(5)
                 if prig.keys.partition_of_device_key(device_key(n)) == 1)
        await prig.admin("POST", "faults", {"latency_ms": 500})
        t0 = now_ms()
        await prig.add(write(n, t0, {"V1": 1.0}))
        await wait_until(lambda: any(d.pending is not None and not d.pending.done()
                                     for d in a.held.devices.values()),
                         what="the write under way")
        await prig.redis.zadd(prig.keys.owners("egress"), {"b": now_ms() + 60_000})
        await a.ownership.balance()  # another live replica: A hands partition 1 over

        async def released() -> bool:
            return not await prig.redis.exists(prig.keys.egress_lease(1))

        await wait_until(released, what="partition 1 handed over")
        assert set(a.owned) == {0}
        assert await prig.pending() == 0  # acked before the hand-over: not written again
        assert await LastWritten(prig.redis, prig.keys).get(device_key(n)) == {"V1": t0}
        assert value(prig, n, "V1") == 1.0 and prig.device(n).messages == 1
    finally:
        await prig.admin("POST", "faults", {})
        stop.set()
        await within(run)


async def test_a_hand_over_whose_write_a_stop_abandoned_leaves_the_lease_to_lapse(
    rig: Rig,
) -> None:
    """A partition is being handed over while its write hangs in Blynk; a stop abandons the
    write (its request may still land). The partition's lease is then left to lapse, as after
    any abandoning stop — released, the next owner could write the device while that request
    is still out, and Blynk could take the older value last."""
    prig = rig.with_partitions(2)
    a = prig.stage(consumer="a", until_idle=False, blynk_timeout_s=600, stop_timeout_s=0.5,
                   lease_ttl_ms=1_800_000)
    stop = asyncio.Event()
    await prig.admin("POST", "faults", {"hang_rate": 1.0})
    run = await running(prig, a, stop)
    try:
        await wait_until(lambda: set(a.owned) == {0, 1}, what="A owning both partitions")
        n = next(n for n in range(5)
                 if prig.keys.partition_of_device_key(device_key(n)) == 1)
        await prig.add(write(n, now_ms(), {"V1": 1.0}))
        await until_injected(prig, "hang", 1, what="the write hanging in Blynk")
        await prig.redis.zadd(prig.keys.owners("egress"), {"b": now_ms() + 60_000})
        balance = asyncio.create_task(a.ownership.balance())  # hands partition 1 over
        await wait_until(lambda: 1 not in a.owned, what="partition 1 being handed over")
        stop.set()
        await within(run)
        await within(balance)
        await within(asyncio.gather(*a.ownership.handing.values()))
        # left to lapse, under the token A took it with
        assert await prig.redis.get(prig.keys.egress_lease(1)) == \
            a.ownership.leases[1].token.encode()
        assert await prig.pending() == 1
    finally:
        await prig.admin("POST", "faults", {})
        stop.set()


async def test_a_replica_whose_lease_was_taken_has_its_commit_refused_and_stops_sending(
    rig: Rig,
) -> None:
    """Fencing: the partition's lease is overwritten (another owner) while a write is in
    flight. The write's commit is refused: nothing recorded, nothing acked; the replica gives
    the partition up and sends nothing more for it. Once the lease is free again it takes the
    partition back and writes what was left pending."""
    stage = rig.stage(until_idle=False, blynk_timeout_s=1, lease_ttl_ms=60_000)  # renewal far
    stop = asyncio.Event()
    loop = await running(rig, stage, stop)
    t0 = now_ms()
    await rig.add(write(0, t0, {"V1": 1.0}))
    await settled(rig)  # warm: the next write goes out on the task-free path
    await rig.admin("POST", "faults", {"latency_ms": 500})
    before = stage.sent_now
    fenced = metrics.EGRESS_FENCED._value.get()
    await rig.add(write(0, t0 + 1, {"V1": 2.0}))
    await wait_until(lambda: stage.sent_now > before, what="the write going out")
    await rig.redis.set(rig.keys.egress_lease(0), "intruder", px=60_000)
    await wait_until(lambda: metrics.EGRESS_FENCED._value.get() > fenced,
                     what="the write's commit refused")
    assert 0 not in stage.owned and not stage.ownership.owned
    assert await rig.pending() == 1  # not acked: the partition's next owner writes it again
    assert await LastWritten(rig.redis, rig.keys).get(device_key(0)) == {"V1": t0}
    await rig.add(write(0, t0 + 2, {"V1": 3.0}))
    await stage.ownership.balance()  # an ownership round: the intruder's lease stands
    assert 0 not in stage.owned
    await rig.admin("POST", "faults", {})
    await rig.redis.delete(rig.keys.egress_lease(0))
    await stage.ownership.balance()  # free again: taken back, its pending entries with it
    assert 0 in stage.owned
    await settled(rig)
    assert value(rig, 0, "V1") == 3.0
    assert await LastWritten(rig.redis, rig.keys).get(device_key(0)) == {"V1": t0 + 2}
    written = [v for _, v in rig.device(0).history["V1"]]
    assert written == sorted(written)
    stop.set()
    await within(loop)


async def test_a_write_of_a_partition_lost_then_taken_back_sends_nothing_more(
    rig: Rig,
) -> None:
    """A device write of several requests (history uploads, then the batch/update, paced by
    the device's rate limit) is under way when its partition is lost (its lease taken) and then
    taken back by the same replica. The old write must send nothing more: the partition's new
    ownership writes the device again from the entries it took over, and two writes of one
    device under way at once could land in either order (and upload history points twice)."""
    stage = rig.stage(until_idle=False, lease_ttl_ms=60_000, per_device_rps=1)  # paced 1 s
    stop = asyncio.Event()
    t0 = now_ms() - 5000
    await rig.add(*[write(0, t0 + i * 200, {"V10": float(i), "V11": float(i)},
                          history=["V10", "V11"]) for i in range(3)])
    uploaded = asyncio.Event()

    def on_value(device: Device, ds: Any, value: Any, ts: int) -> None:
        uploaded.set()  # the write's first request (V10's upload) landed

    rig.emu.model.listeners.append(on_value)
    loop = await running(rig, stage, stop)
    try:
        await within(uploaded.wait(), what="the first upload")
        # While the write waits for its next rate-limit slot: the lease is taken (the ownership
        # round gives the partition up), then free again (the next round takes it back).
        await rig.redis.set(rig.keys.egress_lease(0), "intruder", px=60_000)
        await stage.ownership.balance()
        assert 0 not in stage.owned
        await rig.redis.delete(rig.keys.egress_lease(0))
        await stage.ownership.balance()
        assert 0 in stage.owned
        await settled(rig)
        await within(asyncio.gather(*stage._tasks), what="the old write ending")
    finally:
        stop.set()
        await within(loop)
    # V11 went once, by the new ownership only: its points uploaded (event times), then the
    # current value (the emulator records a batch/update at the time it lands)
    v11 = [ts - t0 for ts, _ in rig.device(0).history["V11"]]
    assert sorted(ts for ts in v11 if ts < 1000) == [0, 200] and len(v11) == 3, v11
    assert value(rig, 0, "V10") == 2.0 and value(rig, 0, "V11") == 2.0


async def test_a_commit_of_a_write_whose_partition_was_given_up_records_nothing(
    rig: Rig,
) -> None:
    """A write's commit is queued (behind a slow commit call, say) when its partition is lost;
    another replica writes the device further; the partition comes back to this replica before
    the queued commit runs. That commit must record nothing: the lease check alone passes (the
    lease is this replica's again), and its record — read before the other replica's writes —
    would roll the device's record back, so an older value could then be written over a newer
    one."""
    stage = rig.stage(until_idle=False, lease_ttl_ms=60_000)
    stop = asyncio.Event()
    t0 = now_ms()
    lw = LastWritten(rig.redis, rig.keys)
    run_commits = stage.committer.commits._run  # the group commit's call, wrapped

    async def lost_and_back_meanwhile(items: list[Any]) -> list[bool]:
        if any(c.device_key == device_key(0) for c in items) and 0 in stage.owned:
            stage._lose(0, "lease_lost")  # the fence: not renewed in time
            await rig.redis.hset(rig.keys.records(0), device_key(0),
                                 encode_record({"V1": t0 + 20}))  # another owner wrote more
            await rig.redis.delete(rig.keys.egress_lease(0))  # ... and is gone
            await stage.ownership.balance()  # taken back
            assert 0 in stage.owned
        return await run_commits(items)

    stage.committer.commits._run = lost_and_back_meanwhile
    loop = await running(rig, stage, stop)
    try:
        await rig.add(write(0, t0 + 10, {"V1": 1.0}))
        await settled(rig)  # the entry: written again by the partition's new ownership
    finally:
        stop.set()
        await within(loop)
    assert await lw.get(device_key(0)) == {"V1": t0 + 20}


def encode_record(pins: dict[str, int]) -> bytes:
    from pipeline.order import encode

    return encode(Record(pins=pins, newest=max(pins.values())))


async def test_a_replica_resumed_after_its_lease_lapsed_does_not_take_back_held_entries(
    rig: Rig,
) -> None:
    """A replica holding entries (its write hangs in Blynk) is frozen past its lease; another
    replica takes the partition and its pending entries over. Resumed, the frozen one's chore
    that keeps held entries claimed may run before its fence drops the partition: it must not
    take them back (the new owner would see them only after an idle claim)."""
    stage = rig.stage(until_idle=False, blynk_timeout_s=600, stop_timeout_s=0.5)
    stop = asyncio.Event()
    loop = await hanging_writes(rig, stage, stop, n=1)
    try:
        stream = rig.keys.stream(WRITES, rig.keys.partition_of_device_key(device_key(0)))
        # The freeze: the lease lapses in Redis and another replica takes the entries over.
        await rig.redis.delete(rig.keys.egress_lease(0))
        await rig.redis.xautoclaim(stream, GROUP_EGRESS, "b", 0, "0-0", justid=True)
        stage.ownership.leases[0]._valid_until = 0.0  # resumed: the lease not certainly held
        await stage._claim_held()  # ... and this chore first, before the fence
        (row,) = await rig.redis.xpending_range(stream, GROUP_EGRESS, "-", "+", 10)
        assert row["consumer"] == b"b"
    finally:
        await rig.admin("POST", "faults", {})
        stop.set()
        await within(loop)


async def test_a_read_answered_after_its_partition_was_lost_does_not_take_entries_back(
    rig: Rig,
) -> None:
    """A read of a partition comes back after the partition was lost (the replica was frozen
    past its lease) and a new owner took its pending entries over: the entries it read are
    left to the new owner, not claimed back to give them back."""
    stage = rig.stage(until_idle=False, lease_ttl_ms=60_000)
    stop = asyncio.Event()
    loop = await running(rig, stage, stop)
    try:
        await wait_until(lambda: 0 in stage.owned, what="the partition owned")
        part = stage.owned[0]
        stream = rig.keys.stream(WRITES, 0)
        await rig.admin("POST", "faults", {"hang_rate": 1.0})
        await rig.add(write(0, now_ms(), {"V1": 1.0}))
        await until_injected(rig, "hang", 1, what="the write hanging (its entry read)")
        (row,) = await rig.redis.xpending_range(stream, GROUP_EGRESS, "-", "+", 10)
        entry = stage.held.entries[(stream, row["message_id"].decode())].entry
        # The freeze: the lease lapses and another replica takes the entry over.
        await rig.redis.delete(rig.keys.egress_lease(0))
        await rig.redis.xautoclaim(stream, GROUP_EGRESS, "b", 0, "0-0", justid=True)
        stage.ownership.leases[0]._valid_until = 0.0  # resumed: the lease not certainly held
        await stage._give_back(part, [entry])  # what a read answered now is given
        (row,) = await rig.redis.xpending_range(stream, GROUP_EGRESS, "-", "+", 10)
        assert row["consumer"] == b"b"
    finally:
        await rig.admin("POST", "faults", {})
        stop.set()
        await within(loop)


async def test_records_in_memory_are_bounded_and_a_forgotten_one_is_read_again(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past RECORDS_MAX, records of devices with nothing held are forgotten; a forgotten
    device's next write reads its record again, so an older value is still refused."""
    import workers.egress.stage as stage_mod

    monkeypatch.setattr(stage_mod, "RECORDS_MAX", 2)
    stage = rig.stage()
    stage.keep_partitions = True  # one owner throughout: its memory is what is tested
    t0 = now_ms()
    await rig.add(write(0, t0, {"V1": 1.0}), write(1, t0, {"V1": 1.0}))
    await rig.drain(stage)
    await rig.add(write(2, t0, {"V1": 1.0}))
    await rig.drain(stage)
    assert set(stage.owned[0].records) == {device_key(2)}  # 0 and 1 forgotten
    messages = rig.device(0).messages
    await rig.add(write(0, t0 - 1, {"V1": 0.5}))
    await rig.drain(stage)
    assert value(rig, 0, "V1") == 1.0 and rig.device(0).messages == messages
    assert await rig.pending() == 0


async def test_outage_loses_nothing_and_backlog_keeps_true_times(rig: Rig) -> None:
    """The emulator's real outage switch (every request 503), shortened from 30 s to 1.5 s
    (five times the claim idle time: long enough for a thief to claim what sat idle)."""
    await rig.admin("POST", "faults", {"outage_s": 1.5})
    t0 = now_ms()
    points = {n: [(t0 - 3000 + i * 150, float(i)) for i in range(20)] for n in range(3)}
    await rig.add(*[write(n, ts, {"V10": v, "V2": int(v)}, history=["V10"])
                    for n in range(3) for ts, v in points[n]])
    # max_deliveries=2: re-reading during the outage would dead-letter everything
    limits = {"max_deliveries": 2, "claim_idle_ms": 300}
    stage = rig.stage(streams=limits, live_window_s=1, max_backoff_s=0.75)
    stolen: list[Any] = []
    board = StatusBoard(rig.redis, rig.keys)
    seen: set[State] = set()

    async def watch() -> None:
        # during the outage: nothing re-delivered, nothing taken over by another replica
        while rig.emu.faults.state()["outage_left_s"] > 0:
            _, claimed, *_ = await rig.redis.xautoclaim(
                rig.keys.stream(WRITES), GROUP_EGRESS, "thief", min_idle_time=300, start_id="0-0"
            )
            stolen.extend(claimed)
            rows = await rig.redis.xpending_range(rig.keys.stream(WRITES), GROUP_EGRESS,
                                                  min="-", max="+", count=100)
            assert all(r["times_delivered"] == 1 for r in rows)
            status = await board.get("blynk", "fra1")
            if status is not None:
                seen.add(status.state)
            await asyncio.sleep(0.1)

    await asyncio.gather(rig.drain(stage), watch())
    assert stolen == []
    assert State.NOT_CONNECTED in seen  # the status showed the outage...
    final = await board.get("blynk", "fra1")
    assert final is not None and final.state is State.CONNECTED  # ...and the recovery
    outages = injected(rig, "outage")
    assert 0 < outages <= 25  # backed off and probed; did not spin
    assert await rig.dead() == []
    assert await rig.pending() == 0
    for n in range(3):
        history = set(rig.device(n).history["V10"])
        assert set(points[n]) <= history  # every backlog point, at its true time
        assert value(rig, n, "V10") == 19.0
        assert value(rig, n, "V2") == 19


async def test_429_storm_is_ridden_out_within_the_limits(rig: Rig) -> None:
    await rig.admin("POST", "faults", {"storm_429_s": 2, "retry_after_s": 1})
    t0 = now_ms()
    await rig.add(*[write(n, t0 + i, {"V1": float(i)}) for i in range(5) for n in range(5)])
    await rig.drain(rig.stage())
    storm = injected(rig, "429")
    assert storm > 0
    assert storm <= 5 * 4  # Retry-After honoured: a few tries per device, not a hammering
    # four superseded values per device, counted once however often its write was retried
    assert int(await rig.redis.get(rig.keys.superseded()) or 0) == 5 * 4
    assert rig.emu.refused.get("rate", 0) == 0  # the emulator's own 50 req/s never tripped
    assert await rig.dead() == []
    assert [value(rig, n, "V1") for n in range(5)] == [4.0] * 5


async def test_many_requests_of_one_device_stay_under_its_rate(
    redis: Redis, keys: Keys, prefix: str
) -> None:
    """15 history uploads + 1 update for one device, with Blynk's limit set to 10 req/s."""
    emu = BlynkEmulator.from_spec(emulator_spec(devices=1, device_rps=10))
    async with emu.serve({"fra1": 0}) as urls:
        rig = Rig(emu, urls["fra1"], redis, keys, prefix)
        old = now_ms() - 120_000
        await rig.add(write(0, old, {p: 1.0 for p in HISTORY_PINS}, history=HISTORY_PINS))
        await rig.drain(rig.stage(per_device_rps=10))
        await rig.contexts[0].blynk().close()
    assert emu.refused.get("rate", 0) == 0
    assert emu.device_by_token(token(0)).messages == len(HISTORY_PINS) + 1
    for pin in HISTORY_PINS:
        assert (old, 1.0) in emu.device_by_token(token(0)).history[pin]


async def test_invalid_token_marks_the_device_broken_and_dead_letters(rig: Rig) -> None:
    registry = Registry(rig.redis, rig.keys)
    await registry.register(device_key(9), token="x" * 32, template=TEMPLATE_ID)
    t0 = now_ms()
    bad = [write(9, t0 + i, {"V1": 1.0}, tok="x" * 32) for i in range(3)]
    await rig.add(*bad, write(0, t0, {"V1": 7.0}))
    await rig.drain(rig.stage())
    dead = await rig.dead()
    assert sorted(d.reason for d in dead) == ["invalid_token"] * 3
    assert sorted(decode_write(d.raw).event_ts_ms for d in dead) == [w.event_ts_ms for w in bad]
    row = await Registry(rig.redis, rig.keys).get(device_key(9))
    assert row is not None and row.broken and row.reason == "invalid_token"
    assert value(rig, 0, "V1") == 7.0  # the other device is unaffected
    assert await rig.pending() == 0


@pytest.mark.parametrize(
    ("bad_pins", "reason"),
    [
        pytest.param({"V2": "not a number"}, "type_mismatch", id="type mismatch"),
        pytest.param({"V99": 1}, "no_datastream", id="no datastream"),
    ],
)
async def test_a_bad_pin_is_isolated_and_the_rest_written(
    rig: Rig, bad_pins: dict[str, Value], reason: str
) -> None:
    t0 = now_ms()
    carrier = write(0, t0, {"V1": 1.5, "V3": "ok", **bad_pins})
    await rig.add(carrier, write(0, t0 + 1, {"V1": 2.5}), write(1, t0, {"V1": 9.0}))
    await rig.drain(rig.stage())
    dead = await rig.dead()
    assert [d.reason for d in dead] == [reason]
    assert decode_write(dead[0].raw) == carrier  # the original entry, ready for replay
    assert next(iter(bad_pins)) in dead[0].detail
    assert value(rig, 0, "V1") == 2.5
    assert value(rig, 0, "V3") == "ok"
    assert value(rig, 1, "V1") == 9.0
    assert await rig.pending() == 0


async def test_a_restart_resumes_its_own_pending_entries_once(rig: Rig) -> None:
    """A replica that crashed holding entries restarts under the same name (a fixed consumer
    name, e.g. a StatefulSet): it writes them, without re-reading them into max_deliveries."""
    t0 = now_ms()
    stream = rig.keys.stream(WRITES)
    await rig.add(*[write(n, t0 + i, {"V1": float(i)}) for i in range(3) for n in range(4)])
    await rig.redis.xgroup_create(stream, GROUP_EGRESS, id="0", mkstream=True)
    await rig.redis.xreadgroup(GROUP_EGRESS, "egress-1", {stream: ">"}, count=100)  # then dies
    await rig.drain(rig.stage(consumer="egress-1", streams={"max_deliveries": 2}))
    assert await rig.dead() == []
    assert await rig.pending() == 0
    assert [value(rig, n, "V1") for n in range(4)] == [2.0] * 4


async def test_refused_history_points_are_dead_lettered_and_the_value_still_written(
    redis: Redis, keys: Keys, prefix: str
) -> None:
    """Blynk refuses points older than a month (the emulator: older than 60 s here)."""
    emu = BlynkEmulator.from_spec(emulator_spec(devices=1, upload_max_age_s=60))
    async with emu.serve({"fra1": 0}) as urls:
        rig = Rig(emu, urls["fra1"], redis, keys, prefix)
        t0 = now_ms()
        too_old = write(0, t0 - 120_000, {"V10": 1.0}, history=["V10"])
        await rig.add(too_old, write(0, t0, {"V10": 2.0}, history=["V10"]))
        await rig.drain(rig.stage(live_window_s=30))
        await rig.contexts[0].blynk().close()
        dead = await rig.dead()
        assert [decode_write(d.raw) for d in dead] == [too_old]
        assert "history upload" in dead[0].detail
        assert value(rig, 0, "V10") == 2.0
        assert await rig.pending() == 0


async def test_stop_finishes_and_acks_what_it_holds(rig: Rig) -> None:
    """SIGTERM (the stop event): no more reads, held entries are sent and acked, then return."""
    await rig.admin("POST", "faults", {"latency_ms": 200})
    stage = rig.stage(until_idle=False, flush_age_ms=60_000)  # nothing would flush by age
    await stage.startup()
    stop = asyncio.Event()
    loop = asyncio.create_task(stage.main_loop(stop))
    t0 = now_ms()
    await rig.add(*[write(n, t0, {"V1": 3.0}) for n in range(5)])

    async def all_held() -> bool:
        return await rig.pending() == 5

    await wait_until(all_held, what="every entry delivered to (and held by) the stage")
    stop.set()
    await within(loop)
    assert await rig.pending() == 0
    assert [value(rig, n, "V1") for n in range(5)] == [3.0] * 5


async def test_a_value_goes_at_once_and_what_arrives_meanwhile_is_coalesced(rig: Rig) -> None:
    """The default (flush_age_ms 0): a device's first value is written at once; four more
    arriving while that write is under way become ONE next write, newest value; the three
    superseded values are counted, in the metric and in the counter ``status`` shows."""
    stage = rig.stage(until_idle=False)
    stop = asyncio.Event()
    loop = await running(rig, stage, stop)
    try:
        t0 = now_ms()
        await rig.add(write(0, t0, {"V1": 0.5}))
        await settled(rig)  # warm: the token's region known, a keep-alive connection idle
        await rig.admin("POST", "faults", {"hold": True})  # a write stays under way until…
        before, messages = stage.sent_now, rig.device(0).messages
        superseded = metrics.SUPERSEDED._value.get()
        await rig.add(write(0, t0 + 1, {"V1": 1.0}))

        async def sent() -> bool:
            return stage.sent_now > before

        await wait_until(sent, what="the first value going out at once")
        await rig.add(*[write(0, t0 + i, {"V1": float(i)}) for i in range(2, 6)])

        async def all_held() -> bool:
            return len(stage.held) == 5

        await wait_until(all_held, what="the four values read while the first is under way")
        assert rig.device(0).messages == messages  # (else the write was not under way)
        await rig.admin("POST", "faults", {})  # …released here
        await settled(rig)
    finally:
        stop.set()
        await asyncio.wait_for(loop, 30)
    assert rig.device(0).messages - messages == 2
    assert [v for _, v in rig.device(0).history["V1"]][-2:] == [1.0, 5.0]
    assert metrics.SUPERSEDED._value.get() - superseded == 3
    assert int(await rig.redis.get(rig.keys.superseded()) or 0) == 3
    assert await rig.dead() == []


async def test_superseded_values_of_a_history_pin_go_to_history_at_their_times(
    rig: Rig,
) -> None:
    """One flush holds five values of V10 (history: true) and of V1 (no history): Blynk's
    history gets all five V10 points at their event times (timestamped upload), then one
    batch/update carries the newest of each; the four V1 values are counted as superseded."""
    t0 = now_ms() - 5000
    await rig.add(*[write(0, t0 + i * 100, {"V10": float(i), "V1": float(i)},
                          history=["V10"]) for i in range(5)])
    await rig.drain(rig.stage(flush_age_ms=100))
    dev = rig.device(0)
    assert dev.messages == 2  # one timestamped upload, one batch/update
    points = list(dev.history["V10"])
    assert points[:4] == [(t0 + i * 100, float(i)) for i in range(4)]  # true times, in order
    assert points[4][1] == 4.0 and value(rig, 0, "V10") == 4.0  # the current value, last
    assert [v for _, v in dev.history["V1"]] == [4.0]
    assert int(await rig.redis.get(rig.keys.superseded()) or 0) == 4
    assert await rig.pending() == 0
    assert await rig.dead() == []


async def test_the_newest_history_point_is_recorded_as_an_echo(rig: Rig) -> None:
    """An upload may make its newest point current for a moment, and Blynk's webhook would
    bring it back as a command: the downlink stage must find it recorded as the bridge's own."""
    t0 = now_ms() - 5000
    await rig.add(*[write(0, t0 + i, {"V10": float(i)}, history=["V10"]) for i in range(3)])
    await rig.drain(rig.stage(flush_age_ms=100, webhooks=True))
    assert [v for _, v in rig.device(0).history["V10"]] == [0.0, 1.0, 2.0]
    echoes = echo.Echoes(rig.redis, rig.keys, 60_000)
    assert await echoes.take([(token(0), "V10", v, device_key(0)) for v in ("1", "2", "0")],
                             now_ms()) == [True, True, False]


async def running(rig: Rig, stage: EgressStage, stop: asyncio.Event) -> asyncio.Task[None]:
    await stage.startup()
    return asyncio.create_task(stage.main_loop(stop))


async def hanging_writes(rig: Rig, stage: EgressStage, stop: asyncio.Event,
                         n: int = 5) -> asyncio.Task[None]:
    """A stage whose first write of each of ``n`` devices hangs in Blynk (no answer)."""
    await rig.admin("POST", "faults", {"hang_rate": 1.0})
    loop = await running(rig, stage, stop)
    await rig.add(*[write(i, now_ms(), {"V1": 7.0}) for i in range(n)])

    await until_injected(rig, "hang", n,
                         what="every device's write reaching Blynk and hanging there")
    return loop


async def delivered_again(rig: Rig, n: int = 5) -> None:
    """Once Blynk answers again, another replica writes the entries the stopped one left
    pending. The stopped replica's partition leases lapse by themselves (``egress.lease_ttl_ms``:
    a request sent may still land); here they are removed at once instead."""
    await rig.admin("POST", "faults", {})
    assert await rig.pending() == n  # nothing acked, nothing lost
    assert await rig.dead() == []
    await rig.redis.delete(*(rig.keys.egress_lease(p) for p in range(rig.keys.partitions)))
    stage = rig.stage(consumer="egress-2", until_idle=False, streams={"claim_idle_ms": 100})
    stop = asyncio.Event()
    loop = await running(rig, stage, stop)
    try:
        await settled(rig)
    finally:
        stop.set()
        await asyncio.wait_for(loop, 30)
    assert [value(rig, i, "V1") for i in range(n)] == [7.0] * n
    assert await rig.dead() == []


async def test_a_stop_gives_up_on_hanging_writes_after_its_deadline_and_loses_nothing(
    rig: Rig,
) -> None:
    """Blynk never answers (its timeout: 10 minutes): the stop returns after stop_timeout_s,
    not after Blynk's timeout; the unconfirmed entries stay pending and are written later."""
    stage = rig.stage(until_idle=False, blynk_timeout_s=600, stop_timeout_s=0.5)
    stop = asyncio.Event()
    loop = await hanging_writes(rig, stage, stop)
    stop.set()
    await asyncio.wait_for(loop, 60)  # generous: unbounded would be 600 s
    await delivered_again(rig)


async def test_a_cancelled_stage_returns_at_once_and_loses_nothing(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelling the stage (a stop past the process's grace) does not wait for Blynk; late
    answers to the abandoned writes raise nothing and log no token."""
    stage = rig.stage(until_idle=False, blynk_timeout_s=600)
    loop = await hanging_writes(rig, stage, asyncio.Event())
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(loop, 60)  # generous: unbounded would be 600 s
    await delivered_again(rig)  # releases the hanging requests: their answers come back late
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not any(token(i) in caplog.text for i in range(5))


async def test_an_answer_after_its_write_was_abandoned_is_recorded_and_raises_nothing(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop gives up on a slow write (its stand-in cancelled); Blynk's 200 arrives later and
    is recorded and acked all the same. The finish must not ``set_result`` on the cancelled
    stand-in: asyncio would log InvalidStateError with the callback's repr, holding the token."""
    stage = rig.stage(until_idle=False, stop_timeout_s=0.1)
    stop = asyncio.Event()
    loop = await running(rig, stage, stop)
    await rig.add(write(0, now_ms(), {"V1": 1.0}))
    await settled(rig)  # warm: the token's region known, a keep-alive connection idle
    await rig.admin("POST", "faults", {"latency_ms": 1500})
    before = stage.sent_now
    await rig.add(write(0, now_ms() + 1, {"V1": 2.0}))

    async def sent() -> bool:
        return stage.sent_now > before

    await wait_until(sent, what="the write going out on the task-free path")
    stop.set()
    await asyncio.wait_for(loop, 60)
    await settled(rig)  # the late answer: recorded and acked although the stage stopped
    assert value(rig, 0, "V1") == 2.0
    assert "InvalidStateError" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert token(0) not in caplog.text


def test_reprs_of_objects_holding_tokens_mask_them() -> None:
    from pipeline.coalesce import coalesce
    from pipeline.downlink_outcomes import Sent
    from pipeline.events import Downlink, Uplink
    from pipeline.registry import Device as RegistryDevice
    from pipeline.streams import Entry
    from workers.egress.queue import HeldWrites

    w = write(3, 1000, {"V1": 1.0})
    held = HeldWrites(60_000)
    held.hold([Entry("s", "1-0", encode(w))], 0.0)
    dev = held.devices[w.device_key]
    shown = [
        w, dev, held.start(dev, 2000), coalesce([(0, w)], now_ms=2000, live_window_ms=10),
        Uplink(event_id="e", source="particle", integration="i", device="d", event_ts_ms=1,
               received_ts_ms=1, token=token(3)),
        Downlink(event_id="e", origin="o", pin="V1", value=1, ts_ms=1, received_ts_ms=1,
                 token=token(3)),
        RegistryDevice(key="k", token=token(3), template="t"),
        Sent(device_key="k", template="t", pin="V1", stream="s", entry_id="1-0",
             raw=token(3).encode(), token=token(3), server="fra1"),
    ]
    for obj in shown:
        text = repr(obj)
        assert token(3) not in text, text
        assert token(3)[-4:] in text  # still tells tokens apart


# ---- the task-free path: a warm connection pool sends from callbacks -------------------------


async def settled(rig: Rig) -> None:
    """The egress group has read and resolved (acked) every entry."""

    async def resolved() -> bool:
        for stream in rig.keys.streams(WRITES):
            groups = await rig.redis.xinfo_groups(stream)
            g = next((g for g in groups if g["name"] == GROUP_EGRESS.encode()), None)
            if g is None or g["pending"] or g["lag"]:
                return False
        return True

    await wait_until(resolved, what="egress resolving every entry")


async def after_warm_up(rig: Rig, *writes: BlynkWrite, between: Callable[[], Any] = lambda: None,
                        **egress: Any) -> int:
    """Run a stage that has written every device once (its connection is open, the tokens'
    regions known), call ``between`` (awaited when it returns an awaitable), then give it
    ``writes``; returns how many ``batch/update``s went out on the task-free path meanwhile.
    One request in flight at a time: the others queue for the slot and the connection it
    frees, so every write can take that path."""
    stage = rig.stage(until_idle=False, flush_age_ms=10, max_in_flight=1, **egress)
    await stage.startup()
    stop = asyncio.Event()
    loop = asyncio.create_task(stage.main_loop(stop))
    try:
        t0 = now_ms() - 1000
        await rig.add(*[write(n, t0, {"V1": 0.5}) for n in range(5)])
        await settled(rig)
        changed = between()
        if inspect.isawaitable(changed):
            await changed
        before = stage.sent_now
        await rig.add(*writes)
        await settled(rig)
        return stage.sent_now - before
    finally:
        stop.set()
        await within(loop)


async def test_warm_writes_are_sent_without_tasks_and_land(rig: Rig) -> None:
    t0 = now_ms()
    sent = await after_warm_up(rig, *[write(n, t0, {"V1": 2.5, "V2": n}) for n in range(5)])
    assert sent == 5
    assert [value(rig, n, "V1") for n in range(5)] == [2.5] * 5
    assert [value(rig, n, "V2") for n in range(5)] == list(range(5))
    assert [rig.device(n).messages for n in range(5)] == [2] * 5
    assert await rig.dead() == []


async def test_a_bad_pin_on_the_task_free_path_is_isolated(rig: Rig) -> None:
    t0 = now_ms()
    carrier = write(0, t0, {"V1": 1.5, "V2": "not a number"})
    sent = await after_warm_up(rig, carrier, write(1, t0, {"V1": 9.0}))
    assert sent == 2  # the refusal came back to the callback, the coroutine path took over
    dead = await rig.dead()
    assert [d.reason for d in dead] == ["type_mismatch"]
    assert decode_write(dead[0].raw) == carrier
    assert value(rig, 0, "V1") == 1.5
    assert value(rig, 1, "V1") == 9.0


async def test_an_invalid_token_on_the_task_free_path_is_marked_broken(rig: Rig) -> None:
    await Registry(rig.redis, rig.keys).register(device_key(3), token=token(3),
                                                 template=TEMPLATE_ID)
    t0 = now_ms()
    sent = await after_warm_up(rig, write(3, t0, {"V1": 1.0}), write(4, t0, {"V1": 4.0}),
                               between=lambda: rig.emu.model.by_token.pop(token(3)))
    assert sent == 2
    assert [d.reason for d in await rig.dead()] == ["invalid_token"]
    row = await Registry(rig.redis, rig.keys).get(device_key(3))
    assert row is not None and row.broken
    assert value(rig, 4, "V1") == 4.0


async def test_a_429_on_the_task_free_path_is_retried_after_its_retry_after(rig: Rig) -> None:
    t0 = now_ms()
    sent = await after_warm_up(
        rig, *[write(n, t0, {"V1": 7.0}) for n in range(5)],
        between=lambda: rig.admin("POST", "faults", {"storm_429_s": 1, "retry_after_s": 1}))
    storm = injected(rig, "429")
    assert 0 < storm <= 5 * 3  # Retry-After honoured
    assert sent == 5 + storm  # every try, first or retry, went out on the task-free path
    assert [value(rig, n, "V1") for n in range(5)] == [7.0] * 5
    assert await rig.dead() == []


async def test_a_device_moved_to_another_region_follows_the_308(
    redis: Redis, keys: Keys, prefix: str
) -> None:
    async with two_regions() as (emu, urls):
        rig = Rig(emu, urls["fra1"], redis, keys, prefix, servers={"ny3": urls["ny3"]})
        t0 = now_ms()
        # after the warm-up (region of the token known: the configured server), Blynk moves
        # device 2; its next batch/update gets a 308 and must land in ny3 all the same
        sent = await after_warm_up(rig, write(2, t0, {"V1": 3.5}),
                                   between=lambda: setattr(emu.model.by_token[token(2)],
                                                           "region", "ny3"))
        for ctx in rig.contexts:
            await ctx.blynk().close()
    assert sent == 1
    assert emu.model.by_token[token(2)].values["V1"][0] == 3.5
    assert await rig.dead() == []


async def test_equal_event_times_of_different_events_are_applied_in_arrival_order(
    rig: Rig,
) -> None:
    """Two events of one device at the same event time: only strictly older values are stale,
    so the later arrival wins — across flushes (the record says "written at t0") as within one."""
    t0 = now_ms()
    first = write(0, t0, {"V1": 1.0, "V2": 1})
    await rig.add(first)
    await rig.drain(rig.stage())
    second = msgspec.structs.replace(write(0, t0, {"V1": 2.0}), event_id="another event")
    await rig.add(second)
    await rig.drain(rig.stage())
    assert value(rig, 0, "V1") == 2.0
    assert value(rig, 0, "V2") == 1
    older = msgspec.structs.replace(write(0, t0 - 1, {"V1": 0.5}), event_id="an older event")
    await rig.add(older)
    await rig.drain(rig.stage())
    assert value(rig, 0, "V1") == 2.0  # strictly older: stale, as before
    assert await rig.dead() == []
    assert await rig.pending() == 0


async def test_a_refused_token_the_registry_does_not_hold_breaks_nothing(rig: Rig) -> None:
    """Blynk refused a token, but not the one the device's row holds (one an uplink carried, or
    one replaced since): the entries are dead-lettered, the device is not marked broken."""
    registry = Registry(rig.redis, rig.keys)
    await registry.register(device_key(0), token=token(0), template=TEMPLATE_ID)
    t0 = now_ms()
    await rig.add(write(0, t0, {"V1": 1.0}, tok="y" * 32))
    await rig.drain(rig.stage())
    assert [d.reason for d in await rig.dead()] == ["invalid_token"]
    row = await Registry(rig.redis, rig.keys).get(device_key(0))
    assert row is not None and not row.broken
    assert await registry.broken() == []


async def test_a_308_to_a_server_not_configured_is_dead_lettered_not_followed(
    redis: Redis, keys: Keys, prefix: str
) -> None:
    async with two_regions() as (emu, urls):
        rig = Rig(emu, urls["fra1"], redis, keys, prefix)  # ny3 is not in blynk.servers
        emu.model.by_token[token(2)].region = "ny3"
        await rig.add(write(2, now_ms(), {"V1": 3.5}))
        await rig.drain(rig.stage())
    assert [d.reason for d in await rig.dead()] == ["redirect_refused"]
    assert [r["status"] for r in emu.recorded()] == [308]  # ny3 never asked
    assert await rig.pending() == 0


async def late_point_joins_a_retry(rig: Rig, **stage: Any) -> int:
    """A write uploads V10's superseded points (t0, t0 + 200), then its batch/update gets a 503.
    A late V10 point (t0 + 100: older than those uploaded, newer than anything Blynk's record
    has) arrives while the write waits to be retried, and joins it. Returns t0."""
    t0 = now_ms() - 5000
    await rig.add(*[write(0, t0 + i * 200, {"V10": float(i * 2)}, history=["V10"])
                    for i in range(3)])
    seen: list[int] = []

    def fail_after_the_upload(device: Device, ds: Any, value: Any, ts: int) -> None:
        if not seen:  # the upload's newest point (it comes first): fail what follows
            rig.emu.faults.set(error_rate=1.0)
        seen.append(ts)

    rig.emu.model.listeners.append(fail_after_the_upload)
    egress = rig.stage(until_idle=False, max_backoff_s=0.5, **stage)
    stop = asyncio.Event()
    loop = await running(rig, egress, stop)
    try:
        await until_injected(rig, "503", 1, what="the batch/update after the upload failing")
        await rig.add(write(0, t0 + 100, {"V10": 1.0}, history=["V10"]))

        async def all_held() -> bool:
            return len(egress.held) == 4

        await wait_until(all_held, what="the late point held with the write being retried")
        rig.emu.faults.clear()
        await settled(rig)
    finally:
        stop.set()
        await asyncio.wait_for(loop, 30)
    return t0


async def test_a_late_history_point_joining_a_retried_write_is_uploaded(rig: Rig) -> None:
    """The late point goes to history too: not taken for one already uploaded and acked
    unwritten."""
    t0 = await late_point_joins_a_retry(rig)
    points = sorted(ts for ts, _ in rig.device(0).history["V10"])
    assert t0 + 100 in points  # the late point, at its true time
    assert points.count(t0) == 1 and points.count(t0 + 200) == 1  # nothing uploaded twice
    assert value(rig, 0, "V10") == 4.0
    assert await rig.dead() == []


async def test_the_late_history_point_of_a_retried_write_is_recorded_as_an_echo(
    rig: Rig,
) -> None:
    """The retry uploads only the late point, so it is that upload's newest point (which may
    fire Blynk's webhook): it must be recorded as the bridge's own, not the newest point of
    the write, uploaded (and recorded) by the first try."""
    await late_point_joins_a_retry(rig, webhooks=True)
    echoes = echo.Echoes(rig.redis, rig.keys, 60_000)
    assert await echoes.take([(token(0), "V10", "1", device_key(0))], now_ms()) == [True]


@pytest.mark.parametrize("with_newer", [False, True], ids=["all late", "late and newer"])
async def test_late_history_points_dropped_as_stale_are_counted(rig: Rig, with_newer: bool
                                                                ) -> None:
    """V10 (history: true) was written at t0 + 1000. Late points at t0 and t0 + 100 are older
    than what Blynk has: dropped (no history point written twice), but each one counted, none
    silently — whether the whole write is stale or a newer value goes with them."""
    t0 = now_ms() - 5000
    await rig.add(write(0, t0 + 1000, {"V10": 9.0}, history=["V10"]))
    await rig.drain(rig.stage())
    stale = metrics.EGRESS_DROPPED.labels("stale")._value.get()
    superseded = metrics.SUPERSEDED._value.get()
    late = [write(0, t0 + i * 100, {"V10": float(i)}, history=["V10"]) for i in range(2)]
    newer = [write(0, t0 + 2000, {"V10": 10.0}, history=["V10"])] if with_newer else []
    await rig.add(*late, *newer)
    await rig.drain(rig.stage())
    assert metrics.EGRESS_DROPPED.labels("stale")._value.get() - stale == 2
    assert metrics.SUPERSEDED._value.get() - superseded == 0
    assert value(rig, 0, "V10") == (10.0 if with_newer else 9.0)
    assert await rig.pending() == 0


async def test_a_stale_value_is_counted_once_however_often_its_write_is_retried(
    rig: Rig,
) -> None:
    """An entry carries V1 (older than what Blynk has: stale) and V2 (new). Its write meets a
    429 storm and is retried: V1 is dropped each time, but counted once, when the write is
    over — as superseded values are."""
    t0 = now_ms() - 5000
    await rig.add(write(0, t0 + 1000, {"V1": 9.0}))
    await rig.drain(rig.stage())
    stale = metrics.EGRESS_DROPPED.labels("stale")._value.get()
    rig.emu.faults.set(error_rate=1.0, error_status=429)
    stage = rig.stage(until_idle=False, max_backoff_s=0.2)
    stop = asyncio.Event()
    loop = await running(rig, stage, stop)
    try:
        await rig.add(write(0, t0, {"V1": 1.0, "V2": 2}))

        await until_injected(rig, "429", 3, what="the write refused with 429 three times")
        rig.emu.faults.clear()
        await settled(rig)
    finally:
        stop.set()
        await asyncio.wait_for(loop, 30)
    assert metrics.EGRESS_DROPPED.labels("stale")._value.get() - stale == 1
    assert value(rig, 0, "V1") == 9.0 and value(rig, 0, "V2") == 2
    assert await rig.pending() == 0
