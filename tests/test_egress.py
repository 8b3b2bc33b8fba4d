"""egress against the real Redis and the Blynk emulator over real HTTP; pipeline.order on Redis."""

from __future__ import annotations

from pipeline.keys import Keys
from pipeline.order import LastWritten
from pipeline.streams import Redis

# ---- pipeline.order: last written times and the per-device lease ----------------------------


async def test_claim_reads_last_written_and_commit_only_moves_forward(
    redis: Redis, keys: Keys
) -> None:
    book = LastWritten(redis, keys, "replica-a")
    (claim,) = await book.claim([("dev", ["V1", "V2"])])
    assert claim.granted and claim.last == {}
    assert await book.commit("dev", {"V1": 200, "V2": 100})
    (claim,) = await book.claim([("dev", ["V1", "V2", "V3"])])
    assert claim.last == {"V1": 200, "V2": 100}
    assert await book.commit("dev", {"V1": 150, "V2": 300})  # V1 older: kept at 200
    assert await book.get("dev") == {"V1": 200, "V2": 300}


async def test_a_second_replica_waits_for_the_lease(redis: Redis, keys: Keys) -> None:
    a = LastWritten(redis, keys, "replica-a", lease_ms=10_000)
    b = LastWritten(redis, keys, "replica-b", lease_ms=10_000)
    (ca,) = await a.claim([("dev", ["V1"])])
    (cb,) = await b.claim([("dev", ["V1"])])
    assert ca.granted and not cb.granted
    assert 0 < cb.busy_ms <= 10_000
    await a.commit("dev", {"V1": 20})  # A wrote event time 20 and let go
    (cb,) = await b.claim([("dev", ["V1"])])
    assert cb.granted and cb.last == {"V1": 20}  # B now sees 20 and drops its older 10


async def test_claim_is_reentrant_and_release_records_nothing(redis: Redis, keys: Keys) -> None:
    a = LastWritten(redis, keys, "replica-a")
    b = LastWritten(redis, keys, "replica-b")
    await a.claim([("dev", ["V1"])])
    (again,) = await a.claim([("dev", ["V1"])])
    assert again.granted
    await a.release(["dev"])
    (cb,) = await b.claim([("dev", ["V1"])])
    assert cb.granted and cb.last == {}


async def test_an_expired_lease_is_taken_over_and_reported(redis: Redis, keys: Keys) -> None:
    a = LastWritten(redis, keys, "replica-a", lease_ms=1)
    b = LastWritten(redis, keys, "replica-b")
    await a.claim([("dev", ["V1"])])
    # A's 1 ms lease lapses; poll that real condition (bounded) rather than sleeping
    for _ in range(1000):
        (cb,) = await b.claim([("dev", ["V1"])])
        if cb.granted:
            break
    assert cb.granted
    assert not await a.commit("dev", {"V1": 5})  # A learns its lease was gone
    assert await b.commit("dev", {})
    assert await book_of(redis, keys).get("dev") == {"V1": 5}


async def test_claims_are_one_round_trip_for_many_devices(redis: Redis, keys: Keys) -> None:
    book = LastWritten(redis, keys, "replica-a")
    for i in range(3):
        await book.commit(f"d{i}", {"V1": i})
    claims = await book.claim([(f"d{i}", ["V1"]) for i in range(5)])
    assert [c.last for c in claims] == [{"V1": 0}, {"V1": 1}, {"V1": 2}, {}, {}]


def book_of(redis: Redis, keys: Keys) -> LastWritten:
    return LastWritten(redis, keys, "reader")
