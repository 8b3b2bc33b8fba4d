"""The device registry on the real Redis: rows, bounded cache, invalidation, static devices."""

from __future__ import annotations

from pipeline.config import DeviceEntry
from pipeline.keys import Keys
from pipeline.redact import Secret
from pipeline.registry import Registry
from pipeline.streams import Redis
from tests.wait import wait_until, within

KEY = "tts:app:dev-1"


async def test_register_and_lookup(redis: Redis, keys: Keys) -> None:
    reg = Registry(redis, keys)
    await reg.start()
    assert await reg.get(KEY) is None
    await reg.register(KEY, token="tok-A", template="t", server="fra1", blynk_id=7)
    dev = await reg.get(KEY)
    assert dev is not None and (dev.token, dev.template, dev.server, dev.blynk_id) == (
        "tok-A", "t", "fra1", 7)
    row = await redis.hgetall(keys.device("tts", "app", "dev-1"))
    assert row[b"token"] == b"tok-A" and row[b"status"] == b"ok"
    await reg.close()


async def test_cache_is_bounded(redis: Redis, keys: Keys) -> None:
    writer = Registry(redis, keys)
    await writer.start()
    for i in range(50):
        await writer.register(f"tts:app:d{i}", token=f"t{i}", template="t")
    reader = Registry(redis, keys, cache_size=10)
    await reader.start()
    got = await reader.get_many([f"tts:app:d{i}" for i in range(50)])
    assert all(got[f"tts:app:d{i}"] is not None for i in range(50))
    assert len(reader) == 10
    assert reader.cached("tts:app:d49") is not None and reader.cached("tts:app:d0") is None
    await writer.close()
    await reader.close()


async def test_pubsub_evicts_at_once(redis: Redis, keys: Keys) -> None:
    a, b = Registry(redis, keys), Registry(redis, keys)
    await a.start()
    await b.start()
    await within(b.subscribed.wait())
    await a.register(KEY, token="tok-A", template="t")
    assert (await b.get(KEY)) is not None
    assert b.cached(KEY) is not None
    await a.register(KEY, token="tok-B", template="t")
    # evicted by the pub/sub message, before any sync
    await wait_until(lambda: b.cached(KEY) is None, what="the eviction message")
    dev = await b.get(KEY, sync=False)
    assert dev is not None and dev.token == "tok-B"
    await a.close()
    await b.close()


async def test_version_check_covers_a_missed_message(redis: Redis, keys: Keys) -> None:
    a = Registry(redis, keys)
    b = Registry(redis, keys)  # never subscribes: every message is "missed"
    await a.start()
    await b.reset()
    await a.register(KEY, token="tok-A", template="t")
    assert (await b.get(KEY)).token == "tok-A"  # type: ignore[union-attr]
    await a.mark_broken(KEY, "invalid_token", "Invalid token.")
    # Without a version check the stale row is served from the cache...
    stale = await b.get(KEY, sync=False)
    assert stale is not None and not stale.broken
    # ...the per-batch version check evicts it.
    dev = await b.get(KEY)
    assert dev is not None and dev.broken and dev.reason == "invalid_token"
    await a.close()


async def test_trimmed_change_log_drops_the_whole_cache(redis: Redis, keys: Keys) -> None:
    a, b = Registry(redis, keys), Registry(redis, keys)
    await a.start()
    await b.reset()
    await a.register(KEY, token="tok-A", template="t")
    await a.register("tts:app:other", token="x", template="t")
    await b.get_many([KEY, "tts:app:other"])
    await a.register(KEY, token="tok-B", template="t")
    await redis.delete(keys.registry_changes())  # the log lost the change
    await b.sync()
    assert len(b) == 0
    assert (await b.get(KEY)).token == "tok-B"  # type: ignore[union-attr]
    # After the reset, later changes are followed one by one again.
    await b.get("tts:app:other")
    await a.register(KEY, token="tok-C", template="t")
    await b.sync()
    assert b.cached("tts:app:other") is not None and b.cached(KEY) is None
    await a.close()
    await b.close()


async def test_static_devices_load_idempotently(redis: Redis, keys: Keys) -> None:
    reg = Registry(redis, keys)
    await reg.start()
    devices = [DeviceEntry(source="tts", integration="app", device=f"d{i}",
                           token=Secret(f"tok{i}"), template="t") for i in range(5)]
    assert await reg.load_static(devices) == 5
    version = await redis.get(keys.registry_version())
    assert await reg.load_static(devices) == 0
    assert await redis.get(keys.registry_version()) == version
    # A broken device stays broken across restarts, until its token changes.
    await reg.mark_broken("tts:app:d0", "invalid_token", "Invalid token.")
    assert await reg.load_static(devices) == 0
    assert (await reg.get("tts:app:d0")).broken  # type: ignore[union-attr]
    devices[0] = DeviceEntry(source="tts", integration="app", device="d0",
                             token=Secret("new"), template="t")
    assert await reg.load_static(devices) == 1
    dev = await reg.get("tts:app:d0")
    assert dev is not None and not dev.broken and dev.token == "new"
    await reg.close()


async def test_firmware_is_recorded_without_a_version_bump(redis: Redis, keys: Keys) -> None:
    reg = Registry(redis, keys)
    await reg.start()
    await reg.register(KEY, token="t", template="t")
    version = await redis.get(keys.registry_version())
    await reg.set_firmware({KEY: "ttn-1.0.0"})
    assert await redis.hget(keys.device("tts", "app", "dev-1"), "firmware") == b"ttn-1.0.0"
    assert await redis.get(keys.registry_version()) == version
    assert reg.cached(KEY).firmware == "ttn-1.0.0"  # type: ignore[union-attr]
    await reg.close()
