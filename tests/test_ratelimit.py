"""pipeline.ratelimit against the real Redis: one GCRA budget per device shared by replicas.

The waits checked here are the values the script computes from its own state, not measured
durations: no test times anything.
"""

from __future__ import annotations

import pytest

from pipeline.keys import Keys
from pipeline.ratelimit import RateLimiter
from pipeline.streams import Redis


async def test_burst_then_denied_with_the_wait_to_the_next_slot(redis: Redis, keys: Keys) -> None:
    limiter = RateLimiter(redis, keys, rps=10, burst=5)
    waits = await limiter.take(["dev"] * 5)
    assert waits == [0.0] * 5
    (wait,) = await limiter.take(["dev"])
    assert 0 < wait <= 0.1  # one emission interval at most


async def test_burst_one_spaces_every_request(redis: Redis, keys: Keys) -> None:
    limiter = RateLimiter(redis, keys, rps=50)
    first, second = await limiter.take(["dev", "dev"])
    assert first == 0.0
    assert 0 < second <= 0.02


async def test_devices_have_separate_budgets(redis: Redis, keys: Keys) -> None:
    limiter = RateLimiter(redis, keys, rps=1)
    assert await limiter.take(["a", "b", "c"]) == [0.0, 0.0, 0.0]
    assert all(w > 0 for w in await limiter.take(["a", "b", "c"]))


async def test_replicas_share_one_budget(redis: Redis, keys: Keys) -> None:
    replica_a = RateLimiter(redis, keys, rps=10, burst=3)
    replica_b = RateLimiter(redis, keys, rps=10, burst=3)
    assert await replica_a.take(["dev"] * 3) == [0.0] * 3
    (wait,) = await replica_b.take(["dev"])
    assert wait > 0


async def test_acquire_counts_the_request(redis: Redis, keys: Keys) -> None:
    fast = RateLimiter(redis, keys, rps=1000, burst=2)
    for _ in range(3):  # the third waits for the next slot, then takes it
        await fast.acquire("fast")
    # A slot every 100 s: what acquire counted is still there however slow the machine is
    # (at 1000/s the key expired within milliseconds, before a loaded test could look).
    slow = RateLimiter(redis, keys, rps=0.01, burst=2)
    await slow.acquire("dev")
    await slow.acquire("dev")
    (wait,) = await slow.take(["dev"])
    assert wait > 0  # both acquired requests were counted: the burst is used up
    assert await redis.exists(keys.rate("dev")) == 1


def test_rejects_nonsense(redis: Redis, keys: Keys) -> None:
    with pytest.raises(ValueError):
        RateLimiter(redis, keys, rps=0)
    with pytest.raises(ValueError):
        RateLimiter(redis, keys, rps=1, burst=0)
