"""What the command line prints: ``--json`` is one JSON object for every command that ends; a
reader that goes away (``| head``) costs no traceback; ``lag --watch`` and ``top`` show the
streams live (plain lines off a terminal, JSON lines with ``--json``) and stop on Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blynk_bridge import cli, watch
from pipeline import events
from pipeline.keys import GROUP_EGRESS, GROUP_TRANSFORM, UPLINKS, WRITES, Keys
from pipeline.status import StatusBoard
from pipeline.streams import Redis, now_ms
from tests.conftest import FIXTURES
from tests.test_ops import write_config


@pytest.fixture
def config_file(tmp_path: Path, keys: Keys) -> str:
    return write_config(
        tmp_path, keys,
        "tts:\n  - {name: farm, app_id: starter-kit, api_key: NNSXS.X, template: sensor}\n")


def _letter(i: int) -> bytes:
    return events.encode(events.dead_letter(
        stream="v3/app@ttn/devices/dev-1/up", entry_id="", raw=b"{not json " + b"x" * 40,
        stage="ingest-mqtt", reason="invalid_json", detail=f"letter number {i} " + "y" * 60,
        attempts=1, dead_ts_ms=now_ms()))


@pytest.fixture
async def dead_letters(redis: Redis, keys: Keys) -> list[str]:
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(3000):
            pipe.xadd(keys.dead, {events.FIELD: _letter(i)})
        return [i.decode() for i in await pipe.execute()]


@pytest.mark.parametrize("argv", [
    ["lag"], ["status"], ["dead", "list"], ["dead", "list", "--reason", "none"],
    ["dead", "show", "ID"], ["dead", "purge", "--reason", "none"], ["devices", "list"],
    ["devices", "list", "--all"], ["devices", "reindex"],
    ["map", "--sample", str(FIXTURES / "tts" / "tts-uplink-02.json")],
])
async def test_json_is_one_document_everywhere(
    argv: list[str], config_file: str, dead_letters: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [dead_letters[0] if a == "ID" else a for a in argv]
    await asyncio.to_thread(cli.main, [*argv, "-c", config_file, "--json"])
    out = capsys.readouterr().out
    doc = json.loads(out)  # raises on zero or several documents
    assert isinstance(doc, dict) and doc  # an object, never a bare list


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_piping_into_head_prints_no_traceback(
    json_flag: list[str], config_file: str, dead_letters: list[str]
) -> None:
    # ~400 KB (table or JSON): six times what a pipe holds (64 KiB), so the write meets the
    # closed pipe.
    cmd = [sys.executable, "-m", "blynk_bridge", "dead", "list", "-c", config_file,
           "--limit", "1000", *json_flag]
    script = ' '.join(f"'{a}'" for a in cmd) + ' | head -n 2; echo "rc=${PIPESTATUS[0]}" >&2'
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert len(proc.stdout.splitlines()) == 2
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] in ("rc=141", "rc=0")


async def test_rates_come_from_two_samples(redis: Redis, keys: Keys) -> None:
    uplinks, writes = keys.stream(UPLINKS), keys.stream(WRITES)
    await redis.xgroup_create(uplinks, GROUP_TRANSFORM, id="$", mkstream=True)
    await redis.xgroup_create(writes, GROUP_EGRESS, id="$", mkstream=True)
    await StatusBoard(redis, keys).connected("tts", "farm")
    first = await watch.take(redis, keys)
    for _ in range(10):
        await redis.xadd(uplinks, {events.FIELD: b"x"})
    for _ in range(4):
        await redis.xadd(writes, {events.FIELD: b"x"})
    await redis.xreadgroup(GROUP_TRANSFORM, "c1", {uplinks: ">"}, count=6)
    second = await watch.take(redis, keys)
    rows = {r["stage"]: r for r in watch.stage_rows(second, first)}
    dt = second.at - first.at
    assert rows["ingest"]["out_per_s"] == pytest.approx(10 / dt)
    assert rows["transform"]["in_per_s"] == pytest.approx(6 / dt)
    assert rows["transform"]["out_per_s"] == pytest.approx(4 / dt)
    assert (rows["transform"]["lag"], rows["transform"]["pending"]) == (4, 6)
    assert (rows["egress"]["lag"], rows["egress"]["in_per_s"]) == (4, 0)
    # Without a previous sample no rate is known: shown as "-", not as 0.
    assert watch.stage_rows(first, None)[0]["out_per_s"] is None
    doc = watch.TOP.doc(second, first)
    assert [(i["name"], i["state"]) for i in doc["integrations"]] == [("farm", "Connected")]
    assert watch.top_line(second, first).split()[1:3] == ["ingest", f"{10 / dt:,.0f}/s;"]


async def _live(config_file: str, *argv: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "blynk_bridge", *argv, "-c", config_file, "--interval", "0.2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def test_top_and_lag_watch_off_a_terminal(
    redis: Redis, keys: Keys, config_file: str
) -> None:
    await redis.xgroup_create(keys.stream(UPLINKS), GROUP_TRANSFORM, id="$", mkstream=True)
    proc = await _live(config_file, "top", "--count", "2")
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 2 and all("transform" in line and "lag 0" in line for line in lines)

    proc = await _live(config_file, "lag", "--watch", "--count", "2", "--json")
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    docs = [json.loads(line) for line in out.decode().splitlines()]
    assert len(docs) == 2
    rows = {(r["stream"], r["group"]) for r in docs[1]["streams"]}
    assert (keys.stream(UPLINKS), GROUP_TRANSFORM) in rows


async def test_ctrl_c_ends_top_cleanly(config_file: str) -> None:
    proc = await _live(config_file, "top")
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 60)  # it is running
    assert b"ingest" in first
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and b"Traceback" not in err
