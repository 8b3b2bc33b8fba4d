"""De-duplication state on the real Redis: claims, redeliveries, forgetting, buckets, shards."""

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


async def test_a_bucket_grows_its_shards_and_every_hash_stays_small(redis: Redis,
                                                                    keys: Keys) -> None:
    stream = keys.stream("uplinks")
    claims = dedup.Claims(redis, keys)
    n = 5000
    ids = [f"ev-{i}" for i in range(n)]
    for i in range(0, n, 500):  # transform's batches
        got = await claims.run([(stream, e, dedup.mark(stream, e)) for e in ids[i:i + 500]],
                               WINDOW)
        assert got == [None] * len(got)
    # Every one is known afterwards, across the shard generations.
    again = await claims.run([(stream, e, b"\0\0\0\0") for e in ids], WINDOW)
    assert again == [dedup.mark(stream, e) for e in ids]
    base = keys.dedup(stream)
    shards = [k async for k in redis.scan_iter(match=f"{base}:*", count=1000)]
    assert len(shards) > n // dedup.PER_SHARD // 2
    encodings = {await redis.object("encoding", k) for k in shards}
    assert encodings == {b"listpack"}
    # Each expires a bucket after the window at the latest, and not before it.
    ttl = await redis.ttl(shards[0])
    assert WINDOW - 5 <= ttl <= WINDOW + WINDOW // dedup.BUCKETS


async def test_an_event_of_the_previous_bucket_is_still_a_duplicate(redis: Redis,
                                                                    keys: Keys) -> None:
    window = 20  # buckets of 10 s
    blen = window // dedup.BUCKETS
    stream = keys.stream("uplinks")
    claims = dedup.Claims(redis, keys)
    mark = dedup.mark(stream, "1-0")

    async def bucket() -> int:
        now = int((await redis.time())[0])
        return now - now % blen

    async def moved_on() -> bool:
        return await bucket() > claimed_in

    assert await claims.run([(stream, "late", mark)], window) == [None]
    claimed_in = await bucket()  # or later: then the wait is one bucket longer
    await wait_until(moved_on, 6 * blen, "the next bucket", interval=0.2)
    assert await claims.run([(stream, "late", dedup.mark(stream, "2-0"))], window) == [mark]


async def test_buckets_past_the_window_expire_whole_and_leave_the_table(redis: Redis,
                                                                        keys: Keys) -> None:
    # Buckets of 3 s: the shard keys must still be there when the test looks for them right
    # after the claim, however slow a loaded machine makes that step.
    window = 6
    stream = keys.stream("uplinks")
    base = keys.dedup(stream)
    claims = dedup.Claims(redis, keys)
    mark = dedup.mark(stream, "1-0")

    async def now() -> int:
        return int((await redis.time())[0])

    assert await claims.run([(stream, "old", mark)], window) == [None]
    first = await now()
    old_keys = [k async for k in redis.scan_iter(match=f"{base}:*")]
    assert old_keys
    # Once the window and a bucket have passed, a claim in a new bucket drops the old rows...
    # A row goes once its bucket (which began at or before `first`) is more than BUCKETS
    # buckets behind the current one, and its shard keys expire a bucket past the window.
    blen = -(-window // dedup.BUCKETS)
    passed = first + (dedup.BUCKETS + 1) * blen + 1

    async def window_passed() -> bool:
        return await now() >= passed

    await wait_until(window_passed, 60, "the window to pass", interval=0.2)
    assert await claims.run([(stream, "new", mark)], window) == [None]
    table = await redis.hgetall(base)
    assert table and all(int(f.split(b":")[1]) > first for f in table), table
    # ...its shard keys expired whole, and the old event is new again.
    assert await redis.exists(*old_keys) == 0
    assert await claims.run([(stream, "old", dedup.mark(stream, "2-0"))], window) == [None]
