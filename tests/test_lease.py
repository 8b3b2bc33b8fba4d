"""pipeline.lease: PartitionLeases on the real Redis (Lease, hold: tests/test_ingest_mqtt.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from pipeline.lease import PartitionLeases
from pipeline.streams import Redis, now_ms
from tests.wait import wait_until, within


async def test_a_slow_hand_over_does_not_hold_up_renewing_the_partitions_kept(
    redis: Redis, prefix: str
) -> None:
    """A rebalance's hand-over may wait (egress waits for the partition's writes under way, up
    to the Blynk timeout, and for its read in flight). Meanwhile the partitions kept must still
    be renewed: were the ownership round blocked, several hand-overs in a row would outlast the
    kept leases' validity (the send rule stops sending on them, then the fence drops them)."""
    owners = f"{prefix}replicas"
    handing, handed = asyncio.Event(), asyncio.Event()
    dropped: list[tuple[int, str]] = []

    async def on_acquired(p: int) -> None:
        pass

    async def on_dropped(p: int, why: str) -> None:
        dropped.append((p, why))
        if why == "rebalance":
            handing.set()
            await handed.wait()

    leases = PartitionLeases(redis, lease_key=lambda p: f"{prefix}lease:{p}", owners_key=owners,
                             owner="a", partitions=2, ttl_ms=1000,
                             on_acquired=on_acquired, on_dropped=on_dropped)
    stop = asyncio.Event()
    run = asyncio.create_task(leases.run(stop, name="test"))
    try:
        await wait_until(lambda: leases.owned == {0, 1}, what="both partitions taken")
        await redis.zadd(owners, {"b": now_ms() + 60_000})  # another live replica: share 1
        await within(handing.wait(), what="partition 1 being handed over")
        assert leases.owned == {0} and dropped == [(1, "rebalance")]
        kept = leases.leases[0]

        def valid_until() -> float:  # when partition 0's lease stops being certainly held
            return time.monotonic() + kept.remaining_s() if kept.valid() else 0.0

        before = valid_until()
        # renewed every ttl/4 = 0.25 s: half of that is no rounding error
        await wait_until(lambda: valid_until() > before + 0.125,
                         what="partition 0 renewed while partition 1's hand-over waits")
        # released only once handed over
        assert await redis.get(f"{prefix}lease:1") == leases.leases[1].token.encode()
        assert 1 not in leases.owned  # and not taken again meanwhile
        handed.set()
        await wait_until(lambda: _gone(redis, f"{prefix}lease:1"),
                         what="partition 1's lease released after its hand-over")
        assert leases.owned == {0} and not leases.handing
    finally:
        handed.set()
        stop.set()
        await within(run)


async def _gone(redis: Redis, key: str) -> bool:
    return not await redis.exists(key)


async def test_a_replica_whose_clock_is_ahead_still_counts_the_others(
    redis: Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heartbeats are scored on Redis's clock: a replica whose own clock is ahead by more than
    the ttl must not remove the others' heartbeats, count itself alone and take every
    partition (a fair share it would then never give back)."""
    owners = f"{prefix}replicas"
    secs, micros = await redis.time()
    await redis.zadd(owners, {"b": secs * 1000 + micros // 1000 + 60_000})  # alive a minute
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 600)  # this replica: 10 minutes ahead

    async def noop(*_: object) -> None:
        pass

    leases = PartitionLeases(redis, lease_key=lambda p: f"{prefix}lease:{p}", owners_key=owners,
                             owner="a", partitions=2, ttl_ms=1000,
                             on_acquired=noop, on_dropped=noop)
    await leases.balance()
    assert leases.replicas == 2 and len(leases.owned) == 1
    assert await redis.zscore(owners, "b") is not None
