"""``blynk-bridge tail``: the real command on the real Redis, as a subprocess. It shows entries
appended after it started (every partition), filters by device, masks tokens, and takes no
work from the stages' consumer groups."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import pytest

from pipeline import events
from pipeline.keys import DEAD, UPLINKS, WRITES, Keys
from pipeline.streams import Redis, now_ms
from tests.conftest import REDIS_URL
from tests.wait import wait_until

TOKEN = "Xq9sECRETtokenABCDEFGHIJKLmnop42"


@pytest.fixture
def pkeys(prefix: str) -> Keys:
    return Keys(prefix, partitions=2)


@pytest.fixture
def config_file(tmp_path: Path, pkeys: Keys) -> str:
    path = tmp_path / "bridge.yaml"
    path.write_text(f"redis:\n  url: {REDIS_URL}\n  prefix: '{pkeys.prefix}'\n"
                    "  partitions: 2\n")
    return str(path)


def _uplink(device: str, temp: float) -> bytes:
    ts = now_ms()
    return events.encode(events.Uplink(
        event_id=f"e-{device}-{temp}", source="tts", integration="farm", device=device,
        event_ts_ms=ts, received_ts_ms=ts, values={"temperature": temp}))


class Tail:
    """``blynk-bridge tail …`` running, its output collected line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [asyncio.create_task(self._collect(proc.stdout, self.out)),
                         asyncio.create_task(self._collect(proc.stderr, self.err))]

    @staticmethod
    async def _collect(stream: asyncio.StreamReader | None, into: list[str]) -> None:
        assert stream is not None
        async for line in stream:
            into.append(line.decode())

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        rc = await asyncio.wait_for(self.proc.wait(), 60)
        await asyncio.gather(*self._readers)
        return rc


async def _tail(config: str, *argv: str) -> Tail:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "blynk_bridge", "tail", "-c", config, *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    tail = Tail(proc)
    # It says so once it has taken the streams' ends: entries appended from now on show.
    await wait_until(lambda: any("new entries" in line for line in tail.err)
                     or proc.returncode is not None, what="tail to start")
    assert proc.returncode is None, "".join(tail.err)
    return tail


async def test_tail_uplinks_of_one_device_without_taking_work(
    redis: Redis, pkeys: Keys, config_file: str
) -> None:
    for stream in pkeys.streams(UPLINKS):
        await redis.xgroup_create(stream, "transform", id="$", mkstream=True)
    before = pkeys.stream_for(UPLINKS, "tts", "dev-2")
    await redis.xadd(before, {events.FIELD: _uplink("dev-2", 1.0)})  # before the tail: not shown

    tail = await _tail(config_file, "uplinks", "--device", "dev-2")
    devices = [f"dev-{i}" for i in range(8)]  # spread over both partitions
    assert {pkeys.stream_for(UPLINKS, "tts", d) for d in devices} == set(pkeys.streams(UPLINKS))
    for i, device in enumerate(devices):
        await redis.xadd(pkeys.stream_for(UPLINKS, "tts", device),
                         {events.FIELD: _uplink(device, 20.0 + i)})
    await wait_until(lambda: any("temperature=22.0" in line for line in tail.out),
                     what="dev-2's uplink on tail's stdout")
    other = pkeys.stream_for(UPLINKS, "tts", "dev-3")
    await redis.xadd(other, {events.FIELD: _uplink("dev-3", 99.0)})
    await redis.xadd(before, {events.FIELD: _uplink("dev-2", 23.5)})
    await wait_until(lambda: any("temperature=23.5" in line for line in tail.out),
                     what="dev-2's second uplink")
    assert await tail.stop() == 0
    assert len(tail.out) == 2 and all("tts:farm dev-2 uplink" in line for line in tail.out)
    assert "Traceback" not in "".join(tail.err)

    # The group saw nothing delivered: every entry is still there for transform.
    for stream in pkeys.streams(UPLINKS):
        (group,) = await redis.xinfo_groups(stream)
        assert group["pending"] == 0 and group["lag"] == await redis.xlen(stream)


async def test_tail_writes_and_dead_as_json_lines_with_tokens_masked(
    redis: Redis, pkeys: Keys, config_file: str
) -> None:
    tail = await _tail(config_file, "writes", "--json")
    ts = now_ms()
    write = events.BlynkWrite(token=TOKEN, server="https://fra1.blynk.cloud",
                              device_key="tts:farm:dev-5", pins={"V1": 21.5}, event_ts_ms=ts,
                              received_ts_ms=ts, event_id="e-w")
    await redis.xadd(pkeys.stream_for(WRITES, "tts", "dev-5"), {events.FIELD: events.encode(write)})
    await wait_until(lambda: tail.out, what="the write on tail's stdout")
    assert await tail.stop() == 0
    (doc,) = [json.loads(line) for line in tail.out]
    assert doc["stream"] == WRITES and doc["entry"]["pins"] == {"V1": 21.5}
    assert TOKEN not in tail.out[0] and doc["entry"]["token"].endswith(TOKEN[-4:])

    tail = await _tail(config_file, DEAD, "--device", "dev-7")
    for device in ("dev-6", "dev-7"):
        letter = events.dead_letter(stream=pkeys.stream_for(UPLINKS, "tts", device),
                                    entry_id="1-1", raw=_uplink(device, 5.0), stage="transform",
                                    reason="unknown_device",
                                    detail=f"no Blynk device; Authorization: Bearer {TOKEN}",
                                    attempts=1, dead_ts_ms=now_ms())
        await redis.xadd(pkeys.dead, {events.FIELD: events.encode(letter)})
    await wait_until(lambda: tail.out, what="dev-7's dead letter")
    assert await tail.stop() == 0
    assert len(tail.out) == 1
    assert "transform unknown_device" in tail.out[0] and "dev-7" in tail.out[0]
    assert TOKEN not in tail.out[0] and "Authorization: …" in tail.out[0]
