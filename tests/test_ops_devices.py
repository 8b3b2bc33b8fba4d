"""``blynk-bridge devices list|show|unbreak`` end to end: the real CLI on the real Redis."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from blynk_bridge import cli
from pipeline.keys import Keys
from pipeline.order import Record, encode
from pipeline.registry import Registry
from pipeline.streams import Redis
from tests.conftest import REDIS_URL

TOKEN = "Xq9sECRETtokenABCDEFGHIJKLmnop42"
BROKEN = "tts:app:dev-broken"
FINE = "tts:app:dev-fine"


@pytest.fixture
def config_file(tmp_path: Path, keys: Keys) -> str:
    path = tmp_path / "bridge.yaml"
    path.write_text(f"redis:\n  url: {REDIS_URL}\n  prefix: '{keys.prefix}'\n")
    return str(path)


@pytest.fixture
async def registry(redis: Redis, keys: Keys) -> Registry:
    reg = Registry(redis, keys)
    await reg.register(BROKEN, token=TOKEN, template="sensor")
    await reg.register(FINE, token="T" * 32, template="sensor")
    await reg.mark_broken(BROKEN, "invalid_token", "Invalid token.")
    await redis.hset(keys.records(keys.partition_of_device_key(BROKEN)), BROKEN,
                     encode(Record({"V1": 1234}, newest=1234)))
    return reg


async def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


async def test_list_shows_broken_devices_with_why_and_since(
    registry: Registry, config_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = await _cli(capsys, "devices", "list", "-c", config_file, "--json")
    assert rc == 0
    rows = json.loads(out)["devices"]
    assert [r["key"] for r in rows] == [BROKEN]
    assert rows[0]["status"] == "broken" and rows[0]["reason"] == "invalid_token"
    assert rows[0]["broken_since"] and TOKEN not in out
    rc, out, _ = await _cli(capsys, "devices", "list", "-c", config_file, "--all", "--json")
    assert rc == 0
    assert sorted(r["key"] for r in json.loads(out)["devices"]) == [BROKEN, FINE]
    rc, out, _ = await _cli(capsys, "devices", "list", "-c", config_file)
    assert rc == 0 and BROKEN in out and "invalid_token" in out and TOKEN not in out


async def test_show_and_unbreak(
    registry: Registry, redis: Redis, keys: Keys, config_file: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc, out, _ = await _cli(capsys, "devices", "show", "-c", config_file, BROKEN, "--json")
    assert rc == 0
    shown = json.loads(out)["devices"]
    assert shown[0]["key"] == BROKEN and shown[0]["status"] == "broken"
    assert shown[0]["last_written"] == {"V1": 1234}
    assert TOKEN not in out and shown[0]["token"].endswith(TOKEN[-4:])
    rc, out, err = await _cli(capsys, "devices", "unbreak", "-c", config_file, BROKEN,
                              "tts:app:nobody")
    assert rc == 1 and "tts:app:nobody" in err
    row = await Registry(redis, keys).get(BROKEN)
    assert row is not None and not row.broken
    rc, out, _ = await _cli(capsys, "devices", "list", "-c", config_file, "--json")
    assert rc == 0 and json.loads(out) == {"devices": [], "broken": 0}
    rc, _, err = await _cli(capsys, "devices", "unbreak", "-c", config_file)
    assert rc == 2 and "--all" in err
