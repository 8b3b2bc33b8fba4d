"""The parts of egress on their own: held entries and coalescing (no I/O), flush scheduling and
the in-flight cap (no I/O), the committer against the real Redis, the sender against the Blynk
emulator over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest

from emulators.blynk.server import BlynkEmulator
from pipeline.batching import GroupCommit
from pipeline.blynk.client import BlynkClient
from pipeline.blynk.outcomes import Ok, Retry
from pipeline.coalesce import DevicePlan
from pipeline.config import BlynkConfig
from pipeline.events import FIELD, BlynkWrite, Value, decode_dead, encode
from pipeline.keys import GROUP_EGRESS, WRITES, Keys
from pipeline.lease import Lease
from pipeline.order import LastWritten, Record
from pipeline.ratelimit import RateLimiter
from pipeline.registry import Registry
from pipeline.streams import Entry, Redis, StreamReader
from tests.test_egress import emulator_spec, token
from tests.wait import within
from workers.egress.committer import Committer
from workers.egress.queue import DeviceQueue, HeldWrites
from workers.egress.scheduler import FlushScheduler, InFlight, Servers
from workers.egress.sender import Pacer, Result, Sender

NOW_MS = 1_700_000_000_000


def bw(dev: str, ts: int, pins: dict[str, Value], *, server: str = "s1",
       tok: str | None = None) -> BlynkWrite:
    return BlynkWrite(token=tok or f"tok-{dev}", server=server, device_key=dev, pins=pins,
                      event_ts_ms=ts, received_ts_ms=ts, event_id=f"{dev}-{ts}")


def entry(n: int, write: BlynkWrite | None, stream: str = "w") -> Entry:
    return Entry(stream, f"{n}-0", None if write is None else encode(write))


# ---- queue: held entries per device, coalescing (pure) -------------------------------------


def test_hold_groups_by_device_skips_repeats_and_returns_the_undecodable() -> None:
    held = HeldWrites(live_window_ms=60_000)
    e1, e2 = entry(1, bw("a", NOW_MS, {"V1": 1})), entry(2, bw("b", NOW_MS, {"V1": 2}))
    garbage, empty = Entry("w", "3-0", b"\x00not msgpack"), entry(4, None)
    bad = held.hold([e1, e2, garbage, empty, e1], now=5.0)
    assert [(e.id, reason) for e, reason, _ in bad] == [("3-0", "undecodable"),
                                                       ("4-0", "undecodable")]
    assert len(held) == 2
    assert list(held.waiting) == ["a", "b"]
    assert held.ids_by_stream() == {"w": ["1-0", "2-0"]}


def test_start_coalesces_requeue_keeps_order_and_drop_forgets() -> None:
    held = HeldWrites(live_window_ms=60_000)
    held.hold([entry(1, bw("a", NOW_MS, {"V1": 1, "V2": 5})),
               entry(2, bw("a", NOW_MS + 1, {"V1": 2}))], now=0.0)
    dev = held.devices["a"]
    plan = held.start(dev, NOW_MS + 10)
    assert plan.current() == {"V1": 2, "V2": 5}
    assert "a" not in held.waiting and len(dev.inflight) == 2
    held.hold([entry(3, bw("a", NOW_MS + 2, {"V1": 3}))], now=1.0)
    assert "a" not in held.waiting  # in flight: a second write of the device must wait
    held.requeue(dev, not_before=9.0)
    assert [h.entry.id for h in dev.queued] == ["1-0", "2-0", "3-0"]
    assert dev.not_before == 9.0 and "a" in held.waiting
    held.start(dev, NOW_MS + 20)
    held.drop(dev, now=10.0)
    assert len(held) == 0 and "a" not in held.devices


# ---- scheduler: readiness, server backoff, the in-flight cap (pure) ------------------------


def _scheduler(**kw: int) -> tuple[HeldWrites, Servers, FlushScheduler, list[tuple[str, bool]]]:
    reports: list[tuple[str, bool]] = []
    held = HeldWrites(live_window_ms=60_000)
    servers = Servers(30.0, lambda name, failure: reports.append((name, failure is None)),
                      clock=lambda: 100.0)
    opts = {"flush_count": 3, "flush_bytes": 1 << 20, "flush_age_ms": 100, **kw}
    return held, servers, FlushScheduler(held, servers, **opts), reports


def test_a_flush_is_due_by_count_age_size_or_stop() -> None:
    held, _, sched, _ = _scheduler()
    held.hold([entry(1, bw("a", NOW_MS, {"V1": 1})), entry(2, bw("b", NOW_MS, {"V1": 1}))],
              now=100.0)
    assert sched.ready(100.0, final=False) == []
    assert sched.next_deadline(100.0) == pytest.approx(0.1)
    assert [d.key for d in sched.ready(100.0, final=True)] == ["a", "b"]
    assert [d.key for d in sched.ready(100.2, final=False)] == ["a", "b"]  # the age
    held.hold([entry(3, bw("c", NOW_MS, {"V1": 1}))], now=100.0)
    assert len(sched.ready(100.0, final=False)) == 3  # the count
    held2, _, by_size, _ = _scheduler(flush_bytes=10)
    held2.hold([entry(1, bw("a", NOW_MS, {"V1": "x" * 20}))], now=100.0)
    assert len(by_size.ready(100.0, final=False)) == 1


def test_by_default_a_device_goes_at_once_unless_in_flight_or_held_back() -> None:
    held, _, sched, _ = _scheduler(flush_age_ms=0, flush_count=500)
    held.hold([entry(1, bw("a", NOW_MS, {"V1": 1})), entry(2, bw("b", NOW_MS, {"V1": 1}))],
              now=100.0)
    assert sched.next_deadline(100.0) == 0.0
    (a, b) = sched.ready(100.0, final=False)  # no waiting for company
    held.start(a, NOW_MS)  # a's write is under way
    held.requeue(b, not_before=100.02)  # b's rate limit says: in 20 ms
    held.hold([entry(3, bw("a", NOW_MS + 1, {"V1": 2})), entry(4, bw("a", NOW_MS + 2, {"V1": 3})),
               entry(5, bw("b", NOW_MS + 1, {"V1": 2}))], now=100.01)
    assert sched.ready(100.01, final=False) == []  # both collect what arrives meanwhile
    assert sched.next_deadline(100.01) == pytest.approx(0.01)
    held.drop(a, 100.01)  # a's write finished: its two new values go as one
    (a2,) = sched.ready(100.01, final=False)
    assert a2.key == "a" and len(a2.queued) == 2
    assert {d.key for d in sched.ready(100.02, final=False)} == {"a", "b"}


def test_a_failing_server_holds_its_devices_then_sends_one_probe() -> None:
    held, servers, sched, reports = _scheduler()
    held.hold([entry(n, bw(f"d{n}", NOW_MS, {"V1": n})) for n in range(3)], now=0.0)
    servers.note("s1", Retry("unavailable", "503", retry_after_s=5, status=503))
    servers.note("s1", Retry("unavailable", "503", retry_after_s=5, status=503))
    assert reports == [("s1", False)]  # one report per transition
    assert sched.ready(104.0, final=True) == []  # backing off until 105
    assert sched.next_deadline(104.0) == pytest.approx(1.0)
    probe = sched.ready(105.0, final=True)
    assert len(probe) == 1
    assert sched.ready(105.0, final=True) == []  # the others wait for the probe's answer
    assert sched.next_deadline(105.0) is None
    servers.note("s1", Ok(200))
    servers.release_probe("s1")
    assert len(sched.ready(105.0, final=True)) == 3
    assert reports == [("s1", False), ("s1", True)]
    servers.note("s1", Retry("rate", "429", status=429))
    assert "s1" not in servers.failing  # a 429 is about a device, not the server


async def test_in_flight_cap_serves_waiting_coroutines_before_queued_sends() -> None:
    cap = InFlight(1)
    order: list[str] = []
    assert cap.free()
    cap.take()
    assert not cap.free()

    def start() -> None:
        order.append("queued")
        cap.take()

    cap.queue(start)
    waiter = asyncio.create_task(cap.acquire())
    await asyncio.sleep(0)  # let it queue up behind the taken slot
    cap.release()  # the coroutine gets the slot, the queued send does not start
    await waiter
    order.append("coroutine")
    assert cap.count == 1
    cap.release()  # now the queued send starts, taking the slot
    assert order == ["coroutine", "queued"] and cap.count == 1
    cap.untake()
    assert cap.free()


# ---- the shared group commit (pure asyncio) ------------------------------------------------


async def test_group_commit_batches_callers_of_one_moment_and_hands_errors_to_each() -> None:
    calls: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        calls.append(items)
        if -1 in items:
            raise ValueError("refused")
        return [i * 10 for i in items]

    group: GroupCommit[int, int] = GroupCommit(run, max_batch=3)
    assert await asyncio.gather(*[group(i) for i in range(5)]) == [0, 10, 20, 30, 40]
    assert calls == [[0, 1, 2], [3, 4]]
    failed = await asyncio.gather(group(7), group(-1), return_exceptions=True)
    assert [type(r) for r in failed] == [ValueError, ValueError]
    dropped = group.submit(8)
    dropped.cancel()  # the caller stopped waiting: the item still runs
    await group.close()
    assert calls[-1] == [8]


# ---- committer: the one finish, against the real Redis --------------------------------------


@pytest.fixture
async def written(redis: Redis, keys: Keys) -> AsyncIterator[tuple[StreamReader, HeldWrites]]:
    """Writes of devices a, b, c on the real stream, read into held entries (in flight)."""
    stream = keys.stream(WRITES)
    reader = StreamReader(redis, keys, [stream], GROUP_EGRESS, "c1", stage="egress")
    await reader.ensure_group()
    for n, dev in enumerate("aabc"):
        await redis.xadd(stream, {FIELD: encode(bw(dev, NOW_MS + n, {"V1": n, "V2": 9}))})
    held = HeldWrites(live_window_ms=10**12)
    held.hold(await reader.read(block=False), now=0.0)
    yield reader, held


def _committer(
    redis: Redis, keys: Keys, reader: StreamReader, held: HeldWrites, *,
    lost: Callable[[int], None] = lambda p: None,
    before: Callable[[], Awaitable[None]] | None = None,
) -> tuple[Committer, LastWritten, list[asyncio.Task[None]], Lease]:
    """A committer of partition 0, whose lease (returned, not acquired) is c1's; ``before``
    runs before each task the committer spawns (dead-lettering) starts."""
    tasks: list[asyncio.Task[None]] = []
    order = LastWritten(redis, keys)
    servers = Servers(30.0, lambda name, failure: None)
    lease = Lease(redis, keys.egress_lease(0), "c1")

    async def spawned(coro: Coroutine[Any, Any, None]) -> None:
        if before is not None:
            await before()
        await coro

    committer = Committer(order, reader, Registry(redis, keys),
                          held, servers, lambda coro, name: tasks.append(
                              asyncio.create_task(spawned(coro), name=name)), 30.0,
                          stream_of=lambda p: keys.stream(WRITES, p), lease_of=lambda p: lease,
                          lost=lost)
    return committer, order, tasks, lease


def _started(held: HeldWrites, key: str) -> tuple[DeviceQueue, DevicePlan]:
    dev = held.devices[key]
    dev.record = Record()  # nothing written yet (as egress read it)
    return dev, held.start(dev, NOW_MS + 100)


async def test_finishes_share_one_commit_that_records_and_acks(
    redis: Redis, keys: Keys, written: tuple[StreamReader, HeldWrites]
) -> None:
    reader, held = written
    committer, order, _, lease = _committer(redis, keys, reader, held)
    assert await lease.acquire()  # the writes partition is c1's
    pendings = []
    for key in "ab":
        dev, plan = _started(held, key)
        pending = asyncio.get_running_loop().create_future()
        committer.finish(dev, plan, Result(written={"V1": plan.pins["V1"].ts_ms}, values=1),
                         pending)
        pendings.append(pending)
    await within(asyncio.gather(*pendings))
    assert await order.get("a") == {"V1": NOW_MS + 1}
    assert await order.get("b") == {"V1": NOW_MS + 2}
    info = await redis.xpending(keys.stream(WRITES), GROUP_EGRESS)
    assert info["pending"] == 1  # only c's entry, never finished
    assert list(held.devices) == ["c"]


async def test_a_refused_pin_dead_letters_its_entries_and_a_retry_keeps_them(
    redis: Redis, keys: Keys, written: tuple[StreamReader, HeldWrites]
) -> None:
    reader, held = written
    committer, _, tasks, lease = _committer(redis, keys, reader, held)
    assert await lease.acquire()  # the writes partition is c1's
    dev_a, plan_a = _started(held, "a")
    dev_b, plan_b = _started(held, "b")
    ids_a = sorted(h.entry.id for h in dev_a.inflight)
    done_a = asyncio.get_running_loop().create_future()
    done_b = asyncio.get_running_loop().create_future()
    committer.finish(dev_a, plan_a, Result(written={"V1": NOW_MS + 1},
                                           failed={"V2": ("type_mismatch", "bad V2")}), done_a)
    committer.finish(dev_b, plan_b, Result(again=Retry("unavailable", "503", status=503)),
                     done_b)
    await within(asyncio.gather(done_a, done_b, *tasks))
    dead = [decode_dead(f[FIELD]) for _, f in await redis.xrange(keys.dead)]
    assert sorted(d.entry_id for d in dead) == ids_a  # both of a's entries carried V2
    assert {d.reason for d in dead} == {"type_mismatch"}
    assert "a" not in held.devices
    assert [h.write.device_key for h in dev_b.queued] == ["b"]  # kept in memory, not acked
    assert dev_b.not_before > 0 and "b" in held.waiting
    info = await redis.xpending(keys.stream(WRITES), GROUP_EGRESS)
    assert info["pending"] == 2  # b's (retried later) and c's


@pytest.mark.cluster_too
async def test_a_dead_letter_reaching_redis_after_its_partition_moved_does_nothing(
    redis: Redis, keys: Keys, written: tuple[StreamReader, HeldWrites]
) -> None:
    """Dead letters are fenced like commits, by ownership: a write's refused entries whose
    dead-lettering starts only after the partition was lost and taken again (by this same
    replica: a new ownership, which took the entries over) write no dead letter and ack
    nothing — the new ownership writes or dead-letters them itself, once — and the partition
    is given up."""
    reader, held = written
    lost: list[int] = []

    async def moved() -> None:
        await redis.delete(keys.egress_lease(0))  # lapsed ...
        assert await lease.acquire()  # ... and taken again

    committer, order, _, lease = _committer(redis, keys, reader, held, lost=lost.append,
                                            before=moved)
    assert await lease.acquire()
    dev_a, plan_a = _started(held, "a")
    done_a = asyncio.get_running_loop().create_future()
    committer.finish(dev_a, plan_a, Result(written={"V1": NOW_MS + 1},
                                           failed={"V2": ("type_mismatch", "bad V2")}), done_a)
    await within(done_a)  # resolved once the dead-lettering ended
    assert await order.get("a") == {"V1": NOW_MS + 1}  # committed before the partition moved
    assert await redis.xlen(keys.dead_for(keys.stream(WRITES))) == 0
    info = await redis.xpending(keys.stream(WRITES), GROUP_EGRESS)
    assert info["pending"] == 4  # a's two (both carried V2) still pending, b's and c's
    assert lost == [0]


# ---- sender: one result per write, against the emulator -------------------------------------


async def test_the_sender_isolates_a_refused_pin_and_reports_one_result(
    redis: Redis, keys: Keys
) -> None:
    emu = BlynkEmulator.from_spec(emulator_spec(devices=1))
    async with emu.serve({"fra1": 0}) as urls:
        client = BlynkClient(BlynkConfig(servers={"fra1": urls["fra1"]}, default_server="fra1"),
                             redis, keys)
        results: list[Result] = []
        finished = asyncio.Event()
        tasks: list[asyncio.Task[None]] = []

        def finish(dev: DeviceQueue, plan: DevicePlan, result: Result,
                   pending: asyncio.Future[None]) -> None:
            results.append(result)
            pending.set_result(None)
            finished.set()

        sender = Sender(client, InFlight(4), Servers(30.0, lambda n, f: None),
                        Pacer(RateLimiter(redis, keys, 1000)), finish,
                        lambda coro, name: tasks.append(asyncio.create_task(coro, name=name)),
                        lambda partition: True)
        held = HeldWrites(live_window_ms=60_000)
        held.hold([entry(1, bw("d0", NOW_MS, {"V1": 1.5, "V2": "not a number", "V3": "ok"},
                                server="fra1", tok=token(0)))], now=0.0)
        dev, plan = _started(held, "d0")
        try:
            sender.send(dev, plan, asyncio.get_running_loop().create_future())
            await within(finished.wait())
            await asyncio.gather(*tasks)
        finally:
            await client.close()
    (result,) = results
    assert set(result.failed) == {"V2"} and result.failed["V2"][0] == "type_mismatch"
    assert result.written == {"V1": NOW_MS, "V3": NOW_MS}
    assert result.again is None and result.invalid_token is None
    assert emu.device_by_token(token(0)).values["V3"][0] == "ok"

