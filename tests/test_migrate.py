"""``blynk-bridge migrate-to-cluster`` from the real one Redis (the test's prefix) to the real
local Redis Cluster: what is copied, under which names, and the refusal while streams are not
drained."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from blynk_bridge import cli
from pipeline import blynk_index
from pipeline.errors import Reason
from pipeline.keys import UPLINKS, Keys
from pipeline.order import LastWritten, Record, encode
from pipeline.registry import Registry
from pipeline.streams import Redis
from tests.conftest import REDIS_URL

TOKEN = "MigrateTokenABCDEFGHIJKLmnopq001"


def _config(tmp_path: Path, prefix: str) -> str:
    path = tmp_path / "bridge.yaml"
    path.write_text(f"redis: {{prefix: '{prefix}', partitions: 6}}\n"
                    "templates:\n  - name: sensor\n    datastreams:\n"
                    "      - {name: temperature, pin: V1, type: double}\n")
    return str(path)


async def _migrate(config: str, cluster_url: str, *extra: str) -> int:
    return await asyncio.to_thread(cli.main, [
        "migrate-to-cluster", "-c", config, "--from", REDIS_URL, "--to", cluster_url,
        "--from-partitions", "1", *extra])


async def _drained_uplinks(redis: Redis, keys: Keys) -> None:
    """An uplinks stream transform has read and acknowledged: length 1, lag 0, pending 0."""
    stream = keys.stream(UPLINKS)
    await redis.xadd(stream, {b"d": b"x"})
    await redis.xgroup_create(stream, "transform", id="0")
    reply = await redis.xreadgroup("transform", "c1", {stream: ">"})
    await redis.xack(stream, "transform", *[i for _, msgs in reply for i, _ in msgs])


async def test_copies_rows_and_last_written_times_to_their_partitions(
        redis: Redis, cluster_redis: Redis, cluster_url: str, prefix: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    old, new = Keys(prefix), Keys(prefix, partitions=6, cluster=True)
    registry = Registry(redis, old)
    await registry.register("tts:app:dev-1", token=TOKEN, template="sensor", blynk_id=7)
    await registry.register("tts:app:dev-2", token=TOKEN[::-1], template="sensor")
    await registry.mark_broken("tts:app:dev-2", Reason.INVALID_TOKEN, "401")
    record = Record()
    record.merge({"V1": 1_700_000_000_000})
    await redis.set(old.last_written("tts:app:dev-1"), encode(record), px=86_400_000)
    # egress records as this version keeps them: fields of the writes partition's hash
    stored = Record()
    stored.merge({"V2": 1_700_000_000_500})
    await redis.hset(old.records(0), "tts:app:dev-2", encode(stored))
    await redis.pexpire(old.records(0), 86_400_000)
    await redis.set(old.provisioned("tts", "app"), 2)
    await _drained_uplinks(redis, old)

    assert await _migrate(_config(tmp_path, prefix), cluster_url) == 0
    out = capsys.readouterr().out
    assert "registry rows: 2" in out and "last-written times: 2" in out

    # Rows under their partition's tag, read back by the bridge's own code on the cluster.
    for key in ("tts:app:dev-1", "tts:app:dev-2"):
        assert await cluster_redis.exists(new.device(*key.split(":")))
    moved = Registry(cluster_redis, new)
    assert await moved.get("tts:app:dev-1") == await registry.get("tts:app:dev-1")
    dev2 = await moved.get("tts:app:dev-2")
    assert dev2 is not None and dev2.broken
    assert [k for k, _ in await moved.broken()] == ["tts:app:dev-2"]
    assert await cluster_redis.hget(new.blynk_index(), blynk_index.token_field(TOKEN)) == (
        b"tts:app:dev-1")
    moved_order = LastWritten(cluster_redis, new)
    assert await moved_order.get("tts:app:dev-1") == {"V1": 1_700_000_000_000}
    assert await cluster_redis.pttl(new.last_written("tts:app:dev-1")) > 0  # its TTL kept
    assert await moved_order.get("tts:app:dev-2") == {"V2": 1_700_000_000_500}
    moved_hash = new.records(new.partition_of_device_key("tts:app:dev-2"))
    assert await cluster_redis.hkeys(moved_hash) == [b"tts:app:dev-2"]
    assert 0 < await cluster_redis.pttl(moved_hash) <= 86_400_000  # its TTL kept
    assert await cluster_redis.get(new.provisioned("tts", "app")) == b"2"

    # Again: harmless (REPLACE), the same counts.
    assert await _migrate(_config(tmp_path, prefix), cluster_url, "--json") == 0
    out = capsys.readouterr().out
    assert '"registry rows": 2' in out and '"last-written times": 2' in out
    assert await moved_order.get("tts:app:dev-2") == {"V2": 1_700_000_000_500}


async def test_refuses_while_a_stream_is_not_drained(
        redis: Redis, cluster_redis: Redis, cluster_url: str, prefix: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    old, new = Keys(prefix), Keys(prefix, partitions=6, cluster=True)
    await Registry(redis, old).register("tts:app:dev-1", token=TOKEN, template="sensor")
    stream = old.stream(UPLINKS)
    await redis.xgroup_create(stream, "transform", id="0", mkstream=True)
    await redis.xadd(stream, {b"d": b"x"})  # not delivered yet: lag 1

    assert await _migrate(_config(tmp_path, prefix), cluster_url) == 2
    err = capsys.readouterr().err
    assert "not drained" in err and "lag 1" in err and "blynk-bridge lag" in err
    assert not await cluster_redis.exists(new.device("tts", "app", "dev-1"))

    # Read but not acknowledged: still refused (pending).
    await redis.xreadgroup("transform", "c1", {stream: ">"})
    assert await _migrate(_config(tmp_path, prefix), cluster_url) == 2
    assert "pending 1" in capsys.readouterr().err
