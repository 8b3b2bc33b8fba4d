"""The TTS emulator: message shapes, the fleet over the real broker, downlink answers, and the
private Mosquitto that enforces ``{app}@{tenant}`` + API key logins."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from emulators import tts as emu
from pipeline import mqtt
from pipeline.config import TtsApplication
from pipeline.events import Uplink
from pipeline.tts import parse_event
from tests.conftest import MQTT_HOST, MQTT_PORT

APP = TtsApplication(name="lab", app_id="app1", raw_payload_key="raw")


def _parse(msg: dict[str, Any]) -> Uplink:
    # Received after every time the emulator sends (later times would be clamped).
    up = parse_event(json.dumps(msg).encode(), APP, received_ts_ms=1_800_000_000_000)
    assert isinstance(up, Uplink)
    return up


def test_make_uplink_has_the_tts_shape_and_traps() -> None:
    first = emu.make_uplink("app1", "ttn", "dev1", 0, {"t": 1.5}, gateways=3, packet_broker=1,
                            received_at=1_700_000_000_123_456_789)
    up = first["uplink_message"]
    assert "f_cnt" not in up  # zero is omitted, as TTS does
    assert isinstance(up["settings"]["frequency"], str)
    assert first["received_at"] == "2023-11-14T22:13:20.123456789Z"
    assert first["correlation_ids"][0].startswith("as:up:")
    assert len(first["correlation_ids"][0]) == len("as:up:") + 26
    pb = up["rx_metadata"][-1]
    assert pb["gateway_ids"] == {"gateway_id": "packetbroker"} and "packet_broker" in pb
    assert base64.b64decode(up["frm_payload"]) == b'{"t":1.5}'
    parsed = _parse(first)
    assert parsed.values == {"t": 1.5}
    assert parsed.event_id == "tts:lab:" + first["correlation_ids"][0]
    assert parsed.event_ts_ms == 1_700_000_000_123
    assert parsed.radio is not None
    assert (parsed.radio.f_cnt, parsed.radio.f_port, parsed.radio.gateways) == (0, 1, 3)
    assert parsed.radio.data_rate is not None and parsed.radio.data_rate.endswith("BW125")


def test_make_uplink_simulated_and_without_decoded_payload() -> None:
    sim = emu.make_uplink("app1", "ttn", "dev1", 5, {"x": True}, simulated=True)
    assert sim["simulated"] is True
    assert sim["uplink_message"]["received_at"] == "0001-01-01T00:00:00Z"
    assert "frequency" not in sim["uplink_message"]["settings"]
    parsed = _parse(sim)
    assert parsed.simulated and parsed.radio is not None and parsed.radio.snr == 4.2
    raw = emu.make_uplink("app1", "ttn", "dev1", 5, None, frm_payload=b"\x01\x02")
    assert "decoded_payload" not in raw["uplink_message"]
    assert _parse(raw).values == {"raw": "0102"}


def test_make_join_parses_as_a_join() -> None:
    join = emu.make_join("app1", "ttn", "dev9")
    up = _parse(join)
    assert (up.kind, up.device, up.values) == ("join", "dev9", {})


async def _collect(session: mqtt.Session, n: int) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    async for item in session.messages():
        out.append(item)
        if len(out) == n:
            break
    return out


async def test_fleet_publishes_over_the_broker_and_remembers_what_it_sent() -> None:
    app_id = f"fleet-{uuid.uuid4().hex[:6]}"
    fleet = emu.Fleet(MQTT_HOST, MQTT_PORT, app_id, "ttn", devices=3, rate_per_s=float("inf"),
                      join_first=True, packet_broker_ratio=0.5, seed=7)
    async with mqtt.Session(mqtt.Settings(MQTT_HOST, MQTT_PORT)) as sub:
        await sub.subscribe([f"v3/{app_id}@ttn/devices/+/#"])
        collecting = asyncio.create_task(_collect(sub, 3 + 9))
        assert await fleet.run(count=9) == 9
        got = await asyncio.wait_for(collecting, 10)
    assert [t.rsplit("/", 1)[1] for t, _ in got[:3]] == ["join"] * 3
    ups = [json.loads(p) for _, p in got[3:]]
    assert "f_cnt" not in ups[0]["uplink_message"]  # each device starts at f_cnt 0
    assert [u["uplink_message"].get("f_cnt", 0) for u in ups] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert fleet.published == 12
    for i in range(3):
        device = fleet.device_id(i)
        mine = [u["uplink_message"]["decoded_payload"] for u in ups
                if u["end_device_ids"]["device_id"] == device]
        assert fleet.sent[device] == mine == [emu.default_decoded(i, f) for f in range(3)]


async def test_fleet_paces_by_duration() -> None:
    fleet = emu.Fleet(MQTT_HOST, MQTT_PORT, f"pace-{uuid.uuid4().hex[:6]}", "ttn", devices=2,
                      rate_per_s=50, record=False)
    sent = await fleet.run(duration_s=0.2)
    assert 1 <= sent <= 50  # paced, not a flood (loose: tests never time things tightly)


async def test_downlinks_are_answered_queued_then_ack_or_failed(
    fixture_path: Callable[[str], Path],
) -> None:
    app_id = f"dl-{uuid.uuid4().hex[:6]}"
    answerer = emu.DownlinkAnswerer(MQTT_HOST, MQTT_PORT, app_id, "ttn", max_payload_bytes=4)
    serving = asyncio.create_task(answerer.run())
    base = f"v3/{app_id}@ttn/devices/dev1"
    try:
        await asyncio.wait_for(answerer.ready.wait(), 10)
        async with mqtt.Session(mqtt.Settings(MQTT_HOST, MQTT_PORT)) as client:
            await client.subscribe([f"{base}/down/queued", f"{base}/down/ack",
                                    f"{base}/down/failed"])
            collecting = asyncio.create_task(_collect(client, 6))
            await client.publish(f"{base}/down/push",
                                 fixture_path("tts/tts-down-push-02.json").read_bytes())
            await client.publish(f"{base}/down/replace",
                                 fixture_path("tts/tts-down-push-01.json").read_bytes())
            await client.publish(f"{base}/down/push", b"not json")
            too_long = {"downlinks": [{"f_port": 2, "frm_payload": base64.b64encode(
                b"0123456789").decode(), "priority": "NORMAL"}]}
            await client.publish(f"{base}/down/push", json.dumps(too_long).encode())
            got = await asyncio.wait_for(collecting, 10)
    finally:
        serving.cancel()
    kinds = [t.split("/", 4)[4] for t, _ in got]
    assert kinds == ["down/queued", "down/ack", "down/queued", "down/ack", "down/queued",
                     "down/failed"]
    first_ack = json.loads(got[1][1])
    assert first_ack["end_device_ids"]["device_id"] == "dev1"
    ack = first_ack["downlink_ack"]
    assert (ack["f_port"], ack["frm_payload"], ack["confirmed"], ack["priority"]) == (
        15, "vu8=", True, "HIGH")
    assert ack["correlation_ids"][0].startswith("as:downlink:")
    assert "my-correlation-id" in ack["correlation_ids"]
    assert json.loads(got[2][1])["downlink_queued"]["priority"] == "NORMAL"
    failed = json.loads(got[5][1])["downlink_failed"]
    assert failed["error"]["name"] == "application_downlink_too_long"
    assert failed["error"]["code"] == 3
    assert failed["downlink"]["f_port"] == 2
    assert answerer.invalid == 1
    assert answerer.received[0][1]["correlation_ids"] == ["my-correlation-id"]
    # The answers parse as downlink outcomes, not uplinks.
    for _, payload in got:
        assert not isinstance(parse_event(payload, APP, received_ts_ms=1), Uplink)


async def test_private_broker_enforces_the_tts_login() -> None:
    user = f"app-{uuid.uuid4().hex[:6]}@acme"
    with emu.Mosquitto(users={user: "NNSXS.KEY"}) as broker:
        with pytest.raises(mqtt.AuthError):
            async with mqtt.Session(mqtt.Settings(broker.host, broker.port, username=user,
                                                  password="NNSXS.NOPE")):
                pass
        with pytest.raises(mqtt.AuthError):
            async with mqtt.Session(mqtt.Settings(broker.host, broker.port)):
                pass
        admin, admin_pw = broker.admin_credentials
        async with mqtt.Session(mqtt.Settings(broker.host, broker.port, username=user,
                                              password="NNSXS.KEY")) as app_session:
            await app_session.subscribe([f"v3/{user}/devices/+/up", "v3/other@acme/#"])
            collecting = asyncio.create_task(_collect(app_session, 1))
            fleet_other = emu.Fleet(broker.host, broker.port, "other", "acme", devices=1,
                                    rate_per_s=1e9, username=admin, password=admin_pw)
            await fleet_other.run(count=1)  # the ACL keeps this from the app's session
            app_id, tenant = user.split("@")
            fleet = emu.Fleet(broker.host, broker.port, app_id, tenant, devices=1,
                              rate_per_s=1e9, username=admin, password=admin_pw)
            await fleet.run(count=1)
            ((topic, _),) = await asyncio.wait_for(collecting, 10)
        assert topic == f"v3/{user}/devices/dev0000/up"


def test_command_line_runs_a_fleet() -> None:
    rc = emu.main(["--host", MQTT_HOST, "--port", str(MQTT_PORT), "--app",
                   f"cli-{uuid.uuid4().hex[:6]}", "--devices", "2", "--rate", "1000",
                   "--count", "4", "--join"])
    assert rc == 0
