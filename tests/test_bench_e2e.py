"""The end-to-end bench's own parts: its uplinks parse as TTS uplinks, its load generator
reaches a real broker, its delivery/latency accounting, its Node-RED user directory.

The bench itself (``python -m bench.e2e``) is run by hand; nothing here times anything.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from bench import e2e
from bench.common import Processes, Publisher, percentile, publish_packet, start_mosquitto, table
from bench.nodered import runner
from emulators.tts import rfc3339
from pipeline import mqtt
from pipeline.config import TtsApplication
from pipeline.tts import parse_message


def _values(j: int, base: int = 0, n: int = 1) -> dict[str, bytes]:
    return {"fcnt": str(j // n + 1).encode(), "seq": str(base + j // n).encode(),
            "sent": b"1763771000123.4", "asup": f"RUNID{j:021d}".encode(),
            "temp": f"{20 + j / 100:.2f}".encode(),
            "at": rfc3339(1_763_771_000_123_456_789).encode(),
            "at_up": rfc3339(1_763_771_000_093_456_789).encode()}


def test_template_renders_a_tts_uplink_with_the_fields_of_each_send() -> None:
    topic, parts = e2e.message_template("bench-app", "dev0042")
    assert topic == b"v3/bench-app@ttn/devices/dev0042/up"
    app = TtsApplication(name="bench", app_id="bench-app", host="127.0.0.1", insecure=True)
    received = 1_763_771_000_200  # just after the message's own times (later ones are clamped)
    first = parse_message(e2e.fill(parts, _values(0, base=7)), app, received_ts_ms=received)
    second = parse_message(e2e.fill(parts, _values(1, base=7)), app, received_ts_ms=received)
    assert first is not None and second is not None
    assert first.device == "dev0042"
    assert first.values == {"temperature": 20.0, "seq": 7, "sent_ms": 1763771000123.4}
    assert second.values["seq"] == 8
    assert second.values["temperature"] == 20.01  # every uplink new values (issue 15)
    assert first.event_ts_ms == 1_763_771_000_123
    assert first.radio is not None and first.radio.f_cnt == 1
    assert second.radio is not None and second.radio.f_cnt == 2
    assert first.event_id != second.event_id  # the transform would drop a repeated id


def test_match_counts_coalesced_uplinks_as_delivered_but_not_written() -> None:
    names = ["a", "b"]
    # Send order: a0 b0 a1 b1 a2 b2 (uplink j from device j % 2, seq = base + j // 2).
    sent = [1000.0, 1001.0, 1010.0, 1011.0, 1020.0, 1021.0]
    base = 100
    histories = {
        "a": [(1005, 100), (1030, 102)],  # a1 coalesced into a2
        "b": [(1004, 100), (1016, 101), (1025, 102), (1040, 999)],  # 999: another step
    }
    got = e2e.match(sent, histories, names, base)
    assert got.delivered == 6
    assert got.written == 5
    assert got.latencies_ms == sorted([5, 20, 10, 3, 5, 4])
    assert got.last_arrival_ms == 1030
    # Each delivered uplink's receipt: the first arrival covering it (a1 by a2's at 1030).
    assert sorted(got.arrivals_ms) == sorted([1005, 1030, 1030, 1004, 1016, 1025])


def test_match_sees_loss() -> None:
    got = e2e.match([1.0, 2.0, 3.0], {"a": [(5, 0)]}, ["a"], 0)
    assert (got.delivered, got.written) == (1, 1)


def test_step_ok_needs_no_loss_and_p99_within_limit() -> None:
    def step(delivered: int, latency: float) -> e2e.StepResult:
        return e2e.StepResult("bridge", 100.0, 1.0, 100, 1.0, delivered, delivered, delivered, 0,
                              [latency] * delivered, 1.0, [])

    assert step(100, 20.0).ok
    assert not step(99, 20.0).ok
    assert not step(100, 600.0).ok


def test_all_written_also_refuses_superseded_values(monkeypatch: pytest.MonkeyPatch) -> None:
    coalesced = e2e.StepResult("bridge", 100.0, 1.0, 100, 1.0, 100, 90, 90, 0, [20.0] * 100,
                               1.0, [])
    assert coalesced.ok  # delivered (a newer value of the device landed): ok by default
    monkeypatch.setattr(e2e, "ALL_WRITTEN", True)
    assert not coalesced.ok
    monkeypatch.setattr(e2e, "P99_LIMIT_MS", 10.0)
    monkeypatch.setattr(e2e, "ALL_WRITTEN", False)
    assert not coalesced.ok  # p99 20 ms over a 10 ms limit


def test_issue15_preset_measures_three_systems_on_1000_devices() -> None:
    args = e2e.parse_args(["--issue15"])
    assert (args.devices, args.duration, args.p99_limit, args.find_max) == (1000, 20.0, 1000.0,
                                                                            True)
    assert args.bridges == [["run"], ["ingest-mqtt", "transform", "egress"]]
    assert args.private_redis and args.baseline == "nodered"
    one = e2e.parse_args(["--processes", "run"])
    assert one.bridges == [["run"]] and not one.private_redis


def test_percentile_nearest_rank_and_table() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([], 50) != percentile([], 50)  # NaN
    text = table(["system", "n"], [["bridge", 5], ["node-red", 12]])
    assert text.splitlines()[2] == "bridge     5"


async def test_publisher_puts_every_packet_on_a_private_broker() -> None:
    with Processes() as procs:
        _, port = start_mosquitto(procs)
        settings = mqtt.Settings("127.0.0.1", port, client_id="bench-test-sub")
        async with mqtt.Session(settings) as session:
            await session.subscribe(["bench/test/#"])
            pub = await asyncio.to_thread(Publisher, "127.0.0.1", port, "bench-test-pub")
            packets = b"".join(publish_packet(f"bench/test/{i}".encode(), str(i).encode())
                               for i in range(200))
            await asyncio.to_thread(pub.send, packets)
            got: list[bytes] = []
            async with asyncio.timeout(10):
                async for _topic, payload in session.messages():
                    got.append(payload)
                    if len(got) == 200:
                        break
            pub.close()
    assert got == [str(i).encode() for i in range(200)]


def test_nodered_user_dir_carries_broker_topic_and_tables(tmp_path: Path) -> None:
    runner.write_user_dir(tmp_path, port=1880, mqtt_port=18883, topic="v3/a@ttn/devices/+/up",
                          blynk_url="http://127.0.0.1:9", tokens={"dev0000": "TOKEN"},
                          pins=e2e.PINS)
    flow = json.loads((tmp_path / "flows.json").read_text())
    broker = next(n for n in flow if n["type"] == "mqtt-broker")
    mqtt_in = next(n for n in flow if n["type"] == "mqtt in")
    http = next(n for n in flow if n["type"] == "http request")
    assert broker["port"] == 18883
    assert mqtt_in["topic"] == "v3/a@ttn/devices/+/up" and mqtt_in["datatype"] == "json"
    assert http["method"] == "GET" and http["persist"] is True
    settings = (tmp_path / "settings.js").read_text()
    assert '"dev0000": "TOKEN"' in settings and '"seq": "V2"' in settings
    assert "uiPort: 1880" in settings


def test_read_profile_separates_idle_from_work(tmp_path: Path) -> None:
    path = tmp_path / "egress.txt"
    path.write_text(
        "run (uvloop/__init__.py:92);Runner.run (asyncio/runners.py:118) 50\n"
        "run (uvloop/__init__.py:92);EgressStage._write (workers/egress.py:426);"
        "Pipeline.execute (redis/asyncio/client.py:2262) 30\n"
        "run (uvloop/__init__.py:92);EgressStage._write (workers/egress.py:426) 20\n"
    )
    prof = e2e.read_profile(path)
    assert prof.busy == pytest.approx(0.5)
    assert prof.self_top[0] == (pytest.approx(0.6),
                                "Pipeline.execute (redis/asyncio/client.py:2262)")
    assert prof.own_top == [(pytest.approx(1.0), "EgressStage._write (workers/egress.py:426)")]


def test_variants_merge_config_sections_over_the_bench_config(tmp_path: Path) -> None:
    args = e2e.parse_args(["--baseline", "none", "--variant",
                           'flush_age_ms=100={"egress": {"flush_age_ms": 100}}',
                           "--variant", "default={}"])
    with Processes() as procs:  # nothing started: config() only
        env = e2e.Env(procs, 1883, "http://127.0.0.1:1", [("dev0000", "t")])
        old, new = (e2e.Bridge(env, ["run"], variant=v) for v in args.variant)
        assert (old.name, new.name) == ("bridge flush_age_ms=100", "bridge default")
        assert old.config()["egress"] == {"flush_age_ms": 100}
        assert old.config()["redis"] == new.config()["redis"] | {"prefix": old.prefix}
        assert "egress" not in new.config()
    with pytest.raises(SystemExit):
        e2e.parse_args(["--variant", "no-json"])
