"""Operator commands end to end: the real CLI on the real Redis and on the Redis Cluster (lag,
status, dead).

The CLI runs its own event loop, so each call runs in a thread (``asyncio.to_thread``) while the
test's loop prepares and checks Redis.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from blynk_bridge import cli
from pipeline import events
from pipeline.deadletters import dead_id
from pipeline.keys import DOWNLINKS, UPLINKS, WRITES, Keys
from pipeline.status import StatusBoard
from pipeline.streams import Redis, StreamReader, now_ms
from tests.conftest import REDIS_URL

pytestmark = pytest.mark.cluster_too

TOKEN = "Xq9sECRETtokenABCDEFGHIJKLmnop42"
TOPIC = "v3/app-ops@ttn/devices/dev-9/up"
#: The de-duplication window of the config below (the default).


def write_config(tmp_path: Path, keys: Keys, extra: str = "", url: str = REDIS_URL) -> str:
    """A bridge.yaml for the operator commands: the test's Redis (``url``), prefix and
    partitions, one ``sensor`` template (V1 temperature), then ``extra`` YAML; returns its
    path."""
    path = tmp_path / "bridge.yaml"
    path.write_text(
        f"redis:\n  url: '{url}'\n  prefix: '{keys.prefix}'\n"
        f"  partitions: {keys.partitions}\n"
        "templates:\n  - name: sensor\n    datastreams:\n"
        "      - {name: temperature, pin: V1, type: double}\n" + extra
    )
    return str(path)


@pytest.fixture
def config_file(tmp_path: Path, keys: Keys, backend: str,
                request: pytest.FixtureRequest) -> str:
    url = request.getfixturevalue("cluster_url") if backend == "cluster" else REDIS_URL
    return write_config(tmp_path, keys, url=url)


async def _cli(*argv: str) -> int:
    return await asyncio.to_thread(cli.main, list(argv))


def _uplink(device: str) -> events.Uplink:
    ts = now_ms()
    return events.Uplink(event_id=f"e-{device}", source="tts", integration="app-ops",
                         device=device, event_ts_ms=ts, received_ts_ms=ts,
                         values={"temperature": 21.5})


def _write() -> events.BlynkWrite:
    ts = now_ms()
    return events.BlynkWrite(token=TOKEN, server="default", device_key="k1", pins={"V1": "hot"},
                             event_ts_ms=ts, received_ts_ms=ts, event_id="e-w")


async def _dead_letter(redis: Redis, keys: Keys, stream: str, group: str, data: bytes,
                       reason: str) -> str:
    """Put ``data`` on ``stream`` and dead-letter it the way a stage does; returns the dead id."""
    reader = StreamReader(redis, keys, [stream], group, "c1", stage=group)
    await reader.ensure_group()
    await redis.xadd(stream, {events.FIELD: data})
    entries = await reader.read(block=False)
    assert len(entries) == 1
    await reader.dead_letter([(entries[0], reason, f"{reason} at {group}")])
    last = await redis.xrevrange(keys.dead_for(stream), count=1)
    return dead_id(keys, keys.dead_for(stream), last[0][0].decode())


@pytest.fixture
async def letters(redis: Redis, keys: Keys) -> dict[str, str]:
    """Three dead letters: an uplink, a Blynk write (with a token), an MQTT payload from ingest."""
    up = await _dead_letter(redis, keys, keys.stream(UPLINKS), "transform",
                            events.encode(_uplink("dev-1")), "unknown_device")
    wr = await _dead_letter(redis, keys, keys.stream(WRITES), "egress", events.encode(_write()),
                            "type_mismatch")
    mqtt = events.DeadLetter(stream=TOPIC, entry_id="", raw=b"{not json", stage="ingest-mqtt",
                             reason="malformed", detail="not JSON", attempts=1,
                             dead_ts_ms=now_ms())
    mq = (await redis.xadd(keys.dead, {events.FIELD: events.encode(mqtt)})).decode()
    return {"uplink": up, "write": wr, "mqtt": mq}


async def _dead_ids(redis: Redis, keys: Keys) -> set[str]:
    return {dead_id(keys, key, i.decode()) for key in keys.dead_streams()
            for i, _ in await redis.xrange(key)}


async def test_lag_lists_every_stream_and_group(
    redis: Redis, keys: Keys, config_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    up, writes, down = (keys.stream(n) for n in (UPLINKS, WRITES, DOWNLINKS))
    for _ in range(5):
        await redis.xadd(up, {b"d": b"x"})
    await redis.xgroup_create(up, "transform", id="0")
    await redis.xgroup_create(up, "audit", id="$")
    await redis.xreadgroup("transform", "c1", {up: ">"}, count=2)
    await redis.xgroup_create(writes, "egress", id="0", mkstream=True)

    assert await _cli("lag", "-c", config_file) == 0
    out = capsys.readouterr().out
    for name in (up, writes, down, *keys.dead_streams(), "transform", "audit", "egress"):
        assert name in out

    assert await _cli("lag", "-c", config_file, "--json") == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)["streams"]}
    assert set(rows) == {up, writes, down, *keys.dead_streams()}
    groups = {g["group"]: g for g in rows[up]["groups"]}
    assert rows[up]["length"] == 5
    assert (groups["transform"]["lag"], groups["transform"]["pending"]) == (3, 2)
    assert (groups["audit"]["lag"], groups["audit"]["pending"]) == (0, 0)
    assert groups["transform"]["oldest_pending_id"] is not None
    if keys.cluster:  # partition 0's streams, on the master holding its slot
        node = redis.get_node_from_key(up).name  # type: ignore[attr-defined]
        assert rows[up]["partition"] == 0 and rows[up]["node"] == node
    else:
        node = "127.0.0.1:6379"
        assert rows[up]["partition"] is None and rows[up]["node"] == node

    # The same per Redis node: one node here, each group summed over its streams.
    assert await _cli("lag", "-c", config_file, "--json", "--nodes") == 0
    nodes = {(r["node"], r["group"]): r for r in json.loads(capsys.readouterr().out)["nodes"]}
    assert set(nodes) == {(node, g) for g in ("transform", "audit", "egress")}
    assert (nodes[(node, "transform")]["lag"], nodes[(node, "transform")]["pending"]) == (3, 2)


async def test_lag_reports_each_partition_and_sums_them_per_node(
    redis: Redis, keys: Keys, tmp_path: Path, backend: str, request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str]
) -> None:
    keys = Keys(keys.prefix, partitions=6, cluster=keys.cluster)
    url = request.getfixturevalue("cluster_url") if backend == "cluster" else REDIS_URL
    config_file = write_config(tmp_path, keys, url=url)
    for p, stream in enumerate(keys.streams(UPLINKS)):
        for _ in range(p + 1):
            await redis.xadd(stream, {b"d": b"x"})
        await redis.xgroup_create(stream, "transform", id="0")

    assert await _cli("lag", "-c", config_file, "--json") == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out)["streams"]}
    uplinks = [rows[s] for s in keys.streams(UPLINKS)]
    assert [r["partition"] for r in uplinks] == list(range(6))
    assert [r["groups"][0]["lag"] for r in uplinks] == [1, 2, 3, 4, 5, 6]
    if keys.cluster:  # each partition on the master holding its slot, spread over them
        assert [r["node"] for r in uplinks] == [
            redis.get_node_from_key(s).name  # type: ignore[attr-defined]
            for s in keys.streams(UPLINKS)]
        assert len({r["node"] for r in uplinks}) >= 2

    assert await _cli("lag", "-c", config_file, "--json", "--nodes") == 0
    nodes = [r for r in json.loads(capsys.readouterr().out)["nodes"] if r["group"] == "transform"]
    assert {r["node"] for r in nodes} == {r["node"] for r in uplinks}
    for row in nodes:
        assert row["lag"] == sum(r["length"] for r in uplinks if r["node"] == row["node"])
    assert sum(r["lag"] for r in nodes) == 21


async def test_status_shows_integrations_and_unmapped_keys(
    redis: Redis, keys: Keys, config_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    board = StatusBoard(redis, keys)
    await board.connected("tts", "app-ops")
    await board.failed("tts", "app-ops", f"401 from https://x/?token={TOKEN}\n"
                       f"Authorization: Bearer {TOKEN[::-1]}", "credentials")
    await redis.hset(keys.unmapped("sensor"), mapping={"humidity": 7, "battery": 2})
    await redis.set(keys.superseded(), 12)  # what egress counts

    assert await _cli("status", "-c", config_file) == 0
    out = capsys.readouterr().out
    assert "app-ops" in out and "Broken" in out and "credentials" in out
    assert "humidity" in out and "7" in out and "battery" in out
    assert TOKEN not in out and TOKEN[::-1] not in out
    assert "superseded values" in out and ": 12" in out

    assert await _cli("status", "-c", config_file, "--json") == 0
    text = capsys.readouterr().out
    assert TOKEN not in text and TOKEN[::-1] not in text
    data = json.loads(text)
    assert data["integrations"][0]["state"] == "Broken"
    assert data["unmapped"] == {"sensor": {"battery": 2, "humidity": 7}}
    assert data["superseded_values"] == 12
    assert data["partition_owners"] == {"transform": [""] * keys.partitions,
                                        "egress": [""] * keys.partitions}


async def test_status_shows_which_replica_owns_each_partition(
    redis: Redis, keys: Keys, config_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    await redis.set(keys.transform_lease(0), "worker-7 5f1c", px=60_000)
    await redis.set(keys.egress_lease(keys.partitions - 1), "worker-9 a2b4", px=60_000)
    assert await _cli("status", "-c", config_file, "--json") == 0
    owners = json.loads(capsys.readouterr().out)["partition_owners"]
    assert owners["transform"][0] == "worker-7"  # the name, not the acquisition's nonce
    assert owners["egress"][-1] == "worker-9"
    assert owners["transform"][1:] == [""] * (keys.partitions - 1)
    assert await _cli("status", "-c", config_file) == 0
    out = capsys.readouterr().out
    assert "partition owners" in out and "worker-7" in out and "5f1c" not in out


async def test_dead_list_and_filter(
    letters: dict[str, str], config_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _cli("dead", "list", "-c", config_file) == 0
    out = capsys.readouterr().out
    for reason in ("unknown_device", "type_mismatch", "malformed"):
        assert reason in out
    assert all(i in out for i in letters.values())

    assert await _cli("dead", "list", "-c", config_file, "--reason", "type_mismatch",
                      "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["total"] == 3
    rows = listed["dead_letters"]
    assert [(r["id"], r["stage"], r["attempts"]) for r in rows] == [(letters["write"], "egress", 1)]


async def test_dead_show_decodes_the_original_and_masks_tokens(
    letters: dict[str, str], config_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _cli("dead", "show", "-c", config_file, letters["write"], letters["uplink"]) == 0
    out = capsys.readouterr().out
    assert TOKEN not in out
    write, uplink = json.loads(out)["dead_letters"]
    assert write["entry"]["pins"] == {"V1": "hot"} and write["entry"]["token"].endswith("op42")
    assert write["replayable"] is True
    assert uplink["entry"]["device"] == "dev-1" and uplink["reason"] == "unknown_device"

    assert await _cli("dead", "show", "-c", config_file, letters["mqtt"]) == 0
    (mqtt,) = json.loads(capsys.readouterr().out)["dead_letters"]
    assert mqtt["replayable"] is False and "not json" in mqtt["entry"]

    assert await _cli("dead", "show", "-c", config_file, "1-1") == 1
    assert "no dead letter 1-1" in capsys.readouterr().err


async def test_dead_replay_puts_the_entry_back_for_its_group(
    redis: Redis, keys: Keys, letters: dict[str, str], config_file: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Transform saw the event once: the replay must not be dropped as a duplicate of it, so
    # it is marked as a replay (transform lets it take the event over: tests/test_dedup.py).
    assert await _cli("dead", "replay", "-c", config_file, letters["uplink"]) == 0
    assert "replayed 1 of 1" in capsys.readouterr().out
    assert letters["uplink"] not in await _dead_ids(redis, keys)

    reader = StreamReader(redis, keys, [keys.stream(UPLINKS)], "transform", "c2",
                          stage="transform")
    entries = await reader.read(block=False)
    assert [events.decode_uplink(e.data or b"").device for e in entries] == ["dev-1"]
    assert [e.fields.get(events.REPLAY) for e in entries] == [b"1"]

    assert await _cli("dead", "replay", "-c", config_file, letters["mqtt"]) == 1
    captured = capsys.readouterr()
    assert "cannot replay" in captured.err and TOPIC in captured.err
    assert letters["mqtt"] in await _dead_ids(redis, keys)


async def test_a_truncated_dead_letter_is_shown_with_its_size_and_not_replayed(
    redis: Redis, keys: Keys, config_file: str, capsys: pytest.CaptureFixture[str],
) -> None:
    big = events.Uplink(event_id="e-big", source="tts", integration="app-ops", device="dev-big",
                        event_ts_ms=1, received_ts_ms=1, values={"note": "x" * 60_000})
    dead_id = await _dead_letter(redis, keys, keys.stream(UPLINKS), "transform",
                                 events.encode(big), "type_mismatch")
    letter = events.decode_dead((await redis.xrange(keys.dead_for(keys.stream(UPLINKS))))[0][1][
        events.FIELD])
    assert letter.truncated and letter.raw_size > 60_000

    assert await _cli("dead", "show", "-c", config_file, "--json", dead_id) == 0
    (shown,) = json.loads(capsys.readouterr().out)["dead_letters"]
    assert shown["replayable"] is False and shown["raw_size"] == letter.raw_size

    assert await _cli("dead", "replay", "-c", config_file, dead_id) == 1
    err = capsys.readouterr().err
    assert "cannot replay" in err and str(letter.raw_size) in err and letter.raw_digest in err
    assert dead_id in await _dead_ids(redis, keys)
    assert await redis.xlen(keys.stream(UPLINKS)) == 1  # only the original entry


async def test_dead_purge_by_id_reason_and_all(
    redis: Redis, keys: Keys, letters: dict[str, str], config_file: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert await _cli("dead", "purge", "-c", config_file) == 2
    assert await _cli("dead", "purge", "-c", config_file, "--reason", "malformed") == 0
    assert "purged 1 dead letters" in capsys.readouterr().out
    assert await _dead_ids(redis, keys) == {letters["uplink"], letters["write"]}

    assert await _cli("dead", "purge", "-c", config_file, letters["write"]) == 0
    assert await _dead_ids(redis, keys) == {letters["uplink"]}

    assert await _cli("dead", "purge", "-c", config_file, "--all") == 0
    assert "purged 1 dead letters" in capsys.readouterr().out
    assert await _dead_ids(redis, keys) == set()
