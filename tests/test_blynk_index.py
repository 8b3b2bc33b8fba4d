"""The reverse index's backfill on the real Redis: registry rows written before the index
existed (an older bridge's provisioned devices) become reachable by downlinks — through the
downlink stage's start-up and through ``blynk-bridge devices reindex``.

On one Redis and on the local Redis Cluster (``cluster_too``), there with three partitions: the
rows are spread over every master, and the backfill scans each."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from blynk_bridge import cli
from pipeline.blynk_index import backfill, id_field, resolve, token_field
from pipeline.keys import Keys
from pipeline.registry import Registry
from pipeline.streams import Redis
from tests.conftest import REDIS_URL
from tests.test_downlink import bridge, token_for
from tests.wait import wait_until

pytestmark = pytest.mark.cluster_too

ROWS = 2_500


def _spread(keys: Keys) -> Keys:
    """The cluster runs' layout: three partitions (rows on every master)."""
    return Keys(keys.prefix, 3, cluster=True) if keys.cluster else keys


def _token(i: int) -> str:
    return f"old{i:05d}".ljust(32, "x")


async def _write_old_rows(redis: Redis, keys: Keys, n: int = ROWS) -> None:
    """Rows as a bridge without the index wrote them: the hash only."""
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.hset(keys.device("tts", "old", f"dev-{i}"), mapping={
                "token": _token(i), "template": "kit", "id": str(10_000 + i),
                "status": "ok", "updated_ms": "1"})
        await pipe.execute()


async def test_backfill_indexes_every_old_row_in_bounded_steps(redis: Redis, keys: Keys) -> None:
    keys = _spread(keys)
    await _write_old_rows(redis, keys)
    registry = Registry(redis, keys)
    who = [(None, _token(i)) for i in range(ROWS)] + [(10_000 + i, None) for i in range(ROWS)]
    assert set(await resolve(redis, registry, keys, who)) == {None}
    # an entry left by a row that has since changed token, and one of a row that still holds
    # the token (a shared token: the row written last keeps it)
    await redis.hset(keys.device("tts", "old", "moved"), mapping={"token": "n" * 32})
    await redis.hset(keys.device("tts", "old", "sharer"), mapping={"token": _token(1)})
    await redis.hset(keys.blynk_index(), mapping={token_field(_token(0)): "tts:old:moved",
                                                  token_field(_token(1)): "tts:old:sharer"})
    written = await backfill(redis, keys, batch=100)
    assert written == 2 * ROWS - 1 + 1  # every token and id, but _token(1)'s; "moved"'s own
    found = await resolve(redis, registry, keys, who)
    assert [d.key if d else None for d in found[:3]] == [
        "tts:old:dev-0", "tts:old:sharer", "tts:old:dev-2"]
    assert all(d is not None and d.key == f"tts:old:dev-{i}"
               for i, d in enumerate(found[ROWS:]))
    assert await redis.hget(keys.blynk_index(), id_field(10_001)) == b"tts:old:dev-1"
    assert await redis.exists(keys.blynk_index_backfilled())
    # a second pass finds everything in place
    assert await backfill(redis, keys, batch=100) == 0


async def test_downlink_stage_backfills_before_reading(redis: Redis, prefix: str) -> None:
    async with bridge(redis, prefix, start_stage=False) as b:
        # dev-c was provisioned by an older run: a registry row with no index entry
        await redis.hset(b.ctx.keys.device("tts", "kit", "dev-c"), mapping={
            "token": token_for("dev-c"), "template": "kit", "status": "ok"})
        ts = int(time.time() * 1000)
        assert (await b.post("dev-c", "v2", "1", ts)).status == 200
        await b.stage.startup()
        stop = asyncio.Event()
        task = asyncio.create_task(b.stage.main_loop(stop))
        try:
            await wait_until(lambda: b.devices.got, what="the command sent down")
            assert b.devices.got[0][0] == "dev-c"
            assert await b.dead() == []
        finally:
            stop.set()
            await task
            await b.stage.shutdown()


async def test_devices_reindex_command(redis: Redis, keys: Keys, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str],
                                       request: pytest.FixtureRequest) -> None:
    keys = _spread(keys)
    await _write_old_rows(redis, keys, 30)
    path = tmp_path / "bridge.yaml"
    url = request.getfixturevalue("cluster_url") if keys.cluster else REDIS_URL
    path.write_text(f"redis:\n  url: '{url}'\n  prefix: '{keys.prefix}'\n"
                    f"  partitions: {keys.partitions}\n")
    rc = await asyncio.to_thread(cli.main, ["devices", "reindex", "-c", str(path)])
    out, _ = capsys.readouterr()
    assert rc == 0
    assert "60 index entries written" in out
    dev, = await resolve(redis, Registry(redis, keys), keys, [(None, _token(7))])
    assert dev is not None and dev.key == "tts:old:dev-7"
