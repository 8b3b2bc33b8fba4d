"""De-duplication state on the real Redis: claims, redeliveries, forgetting, the window, the
sweep, shards doubling and halving, idle expiry."""

from __future__ import annotations

from pipeline import dedup
from pipeline.keys import Keys
from pipeline.streams import Redis
from tests.wait import wait_until

WINDOW = 3600


async def test_claim_redelivery_duplicate_and_forget(redis: Redis, keys: Keys) -> None:
    stream = keys.stream("uplinks")
    claims = dedup.Claims(redis, keys)
    first, second = dedup.mark(stream, "1-0"), dedup.mark(stream, "2-0")
    assert await claims.run([(stream, "e1", first), (stream, "e2", first)], WINDOW) == [None,
                                                                                         None]
    # The owner's redelivery answers its own mark (processed again); another entry is a dup.
    got = await claims.run([(stream, "e1", first), (stream, "e1", second)], WINDOW)
    assert got == [first, first]
    assert not dedup.is_duplicate(got[0], first) and dedup.is_duplicate(got[1], second)
    await dedup.forget(redis, keys, WINDOW, [(stream, "e1")])
    assert await dedup.owner(redis, keys, WINDOW, stream, "e1") is None
    assert await dedup.owner(redis, keys, WINDOW, stream, "e2") == first
    assert await claims.run([(stream, "e1", second)], WINDOW) == [None]


async def test_partitions_keep_their_state_under_their_hash_tag(redis: Redis,
                                                                prefix: str) -> None:
    keys = Keys(prefix, partitions=3)
    s0, s2 = keys.stream("uplinks", 0), keys.stream("uplinks", 2)
    claims = dedup.Claims(redis, keys)
    mark = dedup.mark(s0, "1-0")
    await claims.run([(s0, "e1", mark), (s2, "e2", mark)], WINDOW)
    names = sorted([k.decode() async for k in redis.scan_iter(match=f"{prefix}*")])
    assert names and all(n.startswith((f"{prefix}dd:{{uplinks:0}}", f"{prefix}dd:{{uplinks:2}}"))
                         for n in names)
    assert await dedup.owner(redis, keys, WINDOW, s2, "e2") == mark
    assert await dedup.owner(redis, keys, WINDOW, s0, "e2") is None


async def _now(redis: Redis) -> int:
    return int((await redis.time())[0])


async def _shard_count(redis: Redis, base: str) -> int:
    return int(await redis.hget(base, "n") or 0)


async def _shards(redis: Redis, keys: Keys, stream: str) -> list[bytes]:
    return [k async for k in redis.scan_iter(match=f"{keys.dedup(stream)}:*", count=1000)]


async def test_shards_double_with_the_events_and_every_shard_stays_small(redis: Redis,
                                                                        keys: Keys) -> None:
    stream = keys.stream("uplinks")
    claims = dedup.Claims(redis, keys)
    n = 5000
    ids = [f"ev-{i}" for i in range(n)]
    for i in range(0, n, 500):  # transform's batches
        got = await claims.run([(stream, e, dedup.mark(stream, e)) for e in ids[i:i + 500]],
                               WINDOW)
        assert got == [None] * len(got)
        # Every event so far is known, whichever shards are half moved.
        assert await claims.run([(stream, e, b"\0\0\0\0") for e in ids[:i + 500]],
                                WINDOW) == [dedup.mark(stream, e) for e in ids[:i + 500]]
    base = keys.dedup(stream)
    assert await _shard_count(redis, base) >= n // dedup.PER_SHARD
    shards = await _shards(redis, keys, stream)
    assert {await redis.object("encoding", k) for k in shards} == {b"listpack"}
    # Every shard key has a TTL from its creation: the window and a few sweep passes.
    step, sweep = dedup.tick(WINDOW), -(-WINDOW // dedup.SWEEPS)
    for k in shards:
        assert WINDOW - 5 <= await redis.ttl(k) <= WINDOW + step + 3 * sweep


async def test_an_event_is_a_duplicate_for_the_whole_window(redis: Redis, keys: Keys) -> None:
    window = 3
    stream = keys.stream("uplinks")
    claims = dedup.Claims(redis, keys)
    mark = dedup.mark(stream, "1-0")
    assert await claims.run([(stream, "late", mark)], window) == [None]
    claimed_at = await _now(redis)  # or later: then the check below runs earlier in its window
    i = 0

    async def near_the_end() -> bool:
        nonlocal i  # other claims meanwhile, so the sweeps run as in production
        i += 1
        await claims.run([(stream, f"other-{i}", mark)], window)
        return await _now(redis) >= claimed_at + window - 1

    await wait_until(near_the_end, 60, "the end of the window", interval=0.2)
    assert await claims.run([(stream, "late", dedup.mark(stream, "2-0"))], window) == [mark]


async def test_events_past_the_window_are_swept_and_new_again(redis: Redis,
                                                              keys: Keys) -> None:
    window = 2
    stream = keys.stream("uplinks")
    claims = dedup.Claims(redis, keys)
    mark = dedup.mark(stream, "1-0")
    assert await claims.run([(stream, "old", mark)], window) == [None]
    step, sweep = dedup.tick(window), -(-window // dedup.SWEEPS)
    gone_after = await _now(redis) + window + step + sweep + 1
    d = dedup.digest("old")
    i = 0

    async def swept() -> bool:
        nonlocal i  # claims of other events drive the sweep
        i += 1
        await claims.run([(stream, f"new-{i}", mark)], window)
        if await _now(redis) < gone_after:
            return False
        return all([await redis.zscore(k, d) is None for k in await _shards(redis, keys, stream)])

    await wait_until(swept, 60, "the old event swept out of its shard", interval=0.2)
    assert await dedup.owner(redis, keys, window, stream, "old") is None
    assert await claims.run([(stream, "old", dedup.mark(stream, "2-0"))], window) == [None]


async def test_shards_halve_when_the_events_thin_out(redis: Redis, keys: Keys) -> None:
    window = 2
    stream = keys.stream("uplinks")
    base = keys.dedup(stream)
    claims = dedup.Claims(redis, keys)
    mark = dedup.mark(stream, "1-0")
    burst = [(stream, f"burst-{i}", mark) for i in range(3000)]
    for i in range(0, len(burst), 500):
        await claims.run(burst[i:i + 500], window)
    grown = await _shard_count(redis, base)
    assert grown >= 32
    i = 0

    async def halved() -> bool:
        nonlocal i  # a trickle of claims: the burst leaves the window, the count falls
        i += 1
        assert await claims.run([(stream, f"trickle-{i}", mark)], window) == [None]
        return await _shard_count(redis, base) < grown

    await wait_until(halved, 90, "the shards to halve", interval=0.1)
    # The recent events are still known across the move.
    recent = [(stream, f"trickle-{j}", dedup.mark(stream, "2-0")) for j in range(max(1, i - 5),
                                                                             i + 1)]
    assert await claims.run(recent, window) == [mark] * len(recent)


async def test_idle_state_expires_whole_and_starts_again(redis: Redis, keys: Keys) -> None:
    window = 1
    stream = keys.stream("uplinks")
    base = keys.dedup(stream)
    claims = dedup.Claims(redis, keys)
    mark = dedup.mark(stream, "1-0")
    assert await claims.run([(stream, "e", mark)], window) == [None]
    assert await _shards(redis, keys, stream)

    async def all_gone() -> bool:
        return not await redis.exists(base) and not await _shards(redis, keys, stream)

    await wait_until(all_gone, 90, "every de-dup key to expire")
    assert await claims.run([(stream, "e", dedup.mark(stream, "2-0"))], window) == [None]


async def test_declared_keys_claim_grow_sweep_and_forget_like_the_plain_calls(
        redis: Redis, keys: Keys) -> None:
    # What Redis Cluster clients use (every shard key declared, computed from the table), on one
    # Redis: the same answers through resizes, sweeps and forgetting.
    window = 2
    stream = keys.stream("uplinks")
    claims = dedup.Claims(redis, keys, declare_keys=True)
    mark = dedup.mark(stream, "1-0")
    ids = [f"ev-{i}" for i in range(3000)]
    for i in range(0, len(ids), 500):
        batch = [(stream, e, mark) for e in ids[i:i + 500]]
        assert await claims.run(batch, window) == [None] * 500
        assert await claims.run([(stream, e, b"\0\0\0\0") for e in ids[:i + 500]],
                                window) == [mark] * (i + 500)
    assert await _shard_count(redis, keys.dedup(stream)) >= 32
    await claims.forget([(stream, "ev-1")], window)
    assert await claims.run([(stream, "ev-1", b"\0\0\0\1"), (stream, "ev-2", b"\0\0\0\1")],
                            window) == [None, mark]
    gone_after = await _now(redis) + window + dedup.tick(window) + -(-window // dedup.SWEEPS) + 1
    i = 0

    async def swept() -> bool:
        nonlocal i
        i += 1
        await claims.run([(stream, f"new-{i}", mark)], window)
        return await _now(redis) >= gone_after and await dedup.owner(
            redis, keys, window, stream, "ev-5") is None

    await wait_until(swept, 60, "the first events to leave the window", interval=0.1)
    assert await claims.run([(stream, "ev-5", mark)], window) == [None]


async def test_newest_events_sort_first_in_their_shard(redis: Redis, keys: Keys) -> None:
    # Scores count the steps down, so a new claim is inserted near the head of its listpack
    # (a ZADD walks from the head to the score's place: at the tail it walked every event).
    stream = keys.stream("uplinks")
    claims = dedup.Claims(redis, keys)
    mark = dedup.mark(stream, "1-0")
    assert await claims.run([(stream, "older", mark)], WINDOW) == [None]
    shard, = await _shards(redis, keys, stream)  # one shard until 64 events
    older = dedup.digest("older")
    score = await redis.zscore(shard, older)
    assert score is not None
    await redis.zadd(shard, {older: score + (1 << 32)})  # claimed one step earlier
    assert await dedup.owner(redis, keys, WINDOW, stream, "older") == mark  # still live
    assert await claims.run([(stream, "newer", mark)], WINDOW) == [None]
    members = await redis.zrange(shard, 0, -1)
    assert members == [b"", dedup.digest("newer"), older]  # the placeholder, newest first


async def test_state_of_the_layout_before_is_not_read(redis: Redis, keys: Keys) -> None:
    # The layout before counted steps up and stored the step length as is: a table of it must
    # not be read as this layout's (its scores would be misread), a new epoch starts instead.
    stream = keys.stream("uplinks")
    base = keys.dedup(stream)
    q = dedup.tick(WINDOW)
    step = int((await redis.time())[0]) // q % dedup.TICKS
    d = dedup.digest("seen-before")
    await redis.hset(base, mapping={"e": "100", "q": q, "n": 1, "o": 0, "m": 0, "c": 1, "w": 0,
                                    "t": 0})
    await redis.zadd(f"{base}:100:1:0", {d: step * (1 << 32) + 7})
    assert await dedup.owner(redis, keys, WINDOW, stream, "seen-before") is None
    mark = dedup.mark(stream, "1-0")
    claims = dedup.Claims(redis, keys)
    assert await claims.run([(stream, "seen-before", mark)], WINDOW) == [None]
    epoch = (await redis.hget(base, "e") or b"").decode()
    assert epoch.startswith("r") and int(await redis.hget(base, "q") or 0) == -q
    assert await dedup.owner(redis, keys, WINDOW, stream, "seen-before") == mark


async def test_a_doubling_leaves_each_event_in_its_own_shard_only(redis: Redis,
                                                                  keys: Keys) -> None:
    # Small calls keep every shard a listpack, so the doublings copy shards whole and drop
    # the other half from each copy: every event must end up in exactly its own shard.
    stream = keys.stream("uplinks")
    base = keys.dedup(stream)
    claims = dedup.Claims(redis, keys)
    ids = [f"ev-{i}" for i in range(1200)]
    for i in range(0, len(ids), 40):
        await claims.run([(stream, e, dedup.mark(stream, e)) for e in ids[i:i + 40]], WINDOW)
    extra = 0
    while int(await redis.hget(base, "o") or 0):  # let the last doubling finish
        extra += 1
        await claims.run([(stream, f"more-{extra}", dedup.mark(stream, "x"))], WINDOW)
    n = await _shard_count(redis, base)
    assert n >= 16
    epoch = (await redis.hget(base, "e") or b"").decode()
    seen = 0
    for k in await _shards(redis, keys, stream):
        gen, shard = (int(p) for p in k.decode().removeprefix(f"{base}:{epoch}:").split(":"))
        assert gen == n and await redis.object("encoding", k) == b"listpack"
        for d in await redis.zrange(k, 0, -1):
            if d:
                assert int.from_bytes(d[:3], "big") % n == shard
                seen += 1
    assert seen == len(ids) + extra  # every event once: no copy left in the other half
    assert await claims.run([(stream, e, b"\0\0\0\0") for e in ids],
                            WINDOW) == [dedup.mark(stream, e) for e in ids]
