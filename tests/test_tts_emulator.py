"""The TTS emulator: message shapes, the fleet over the real broker, downlink answers, and the
private Mosquitto that enforces ``{app}@{tenant}`` + API key logins."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from emulators import tts as emu
from pipeline import mqtt
from pipeline.config import TtsApplication
from pipeline.events import Uplink
from pipeline.tts import parse_event
from tests.conftest import MQTT_HOST, MQTT_PORT, free_port, serve_app
from tests.wait import within

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
        got = await within(collecting)
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


def _keys(fixture: Path) -> dict[str, list[str]]:
    """The key order of a TTS event fixture: top level and the ``downlink_*`` body."""
    msg = json.loads(fixture.read_bytes())
    kind = next(k for k in msg if k.startswith("downlink_"))
    return {"top": list(msg), kind: list(msg[kind])}


@contextlib.asynccontextmanager
async def answering(answerer: emu.DownlinkAnswerer) -> AsyncIterator[emu.DownlinkAnswerer]:
    serving = asyncio.create_task(answerer.run())
    try:
        await within(answerer.ready.wait())
        yield answerer
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


async def test_downlinks_are_answered_queued_sent_then_ack_or_failed(
    fixture_path: Callable[[str], Path],
) -> None:
    app_id = f"dl-{uuid.uuid4().hex[:6]}"
    answerer = emu.DownlinkAnswerer(MQTT_HOST, MQTT_PORT, app_id, "ttn", max_payload_bytes=4)
    base = f"v3/{app_id}@ttn/devices/dev1"
    async with answering(answerer), mqtt.Session(mqtt.Settings(MQTT_HOST, MQTT_PORT)) as client:
        await client.subscribe([f"{base}/down/+"])
        collecting = asyncio.create_task(_collect(client, 7 + 4))  # ours come back too
        await client.publish(f"{base}/down/push",
                             fixture_path("tts/tts-down-push-02.json").read_bytes())
        await client.publish(f"{base}/down/replace",
                             fixture_path("tts/tts-down-push-01.json").read_bytes())
        await client.publish(f"{base}/down/push", b"not json")
        too_long = {"downlinks": [{"f_port": 2, "frm_payload": base64.b64encode(
            b"0123456789").decode(), "priority": "NORMAL"}]}
        await client.publish(f"{base}/down/push", json.dumps(too_long).encode())
        got = [(t, p) for t, p in await within(collecting)
               if t.endswith(("/queued", "/sent", "/ack", "/nack", "/failed"))]
    kinds = [t.split("/", 4)[4] for t, _ in got]
    # confirmed: queued, sent, ack; unconfirmed: queued, sent and no ack (TTS acks confirmed
    # downlinks only); too long: queued, failed; the bad body: nothing (TTS only logs it)
    assert kinds == ["down/queued", "down/sent", "down/ack", "down/queued", "down/sent",
                     "down/queued", "down/failed"]
    queued, sent, ack = (json.loads(p) for _, p in got[:3])
    assert _keys(fixture_path("tts/tts-down-ack-02.json")) == {
        "top": list(ack), "downlink_ack": list(ack["downlink_ack"])}
    assert list(sent["downlink_sent"]) == list(ack["downlink_ack"])
    assert ack["end_device_ids"]["device_id"] == "dev1"
    assert list(ack["end_device_ids"]) == list(json.loads(fixture_path(
        "tts/tts-down-ack-01.json").read_bytes())["end_device_ids"])
    body = ack["downlink_ack"]
    assert (body["f_port"], body["frm_payload"], body["confirmed"], body["priority"]) == (
        15, "vu8=", True, "HIGH")
    # the downlink's own ids first, then the AS's (fixture tts-down-ack-01)
    assert body["correlation_ids"][0] == "my-correlation-id"
    assert body["correlation_ids"][1].startswith("as:downlink:")
    assert queued["correlation_ids"] == sent["correlation_ids"] == ack["correlation_ids"] == (
        body["correlation_ids"])
    unconfirmed = json.loads(got[3][1])
    assert _keys(fixture_path("tts/tts-down-queued-01.json"))["downlink_queued"] == list(
        unconfirmed["downlink_queued"])
    failed = json.loads(got[6][1])
    assert _keys(fixture_path("tts/tts-down-failed-01.json")) == {
        "top": [k for k in failed if k != "received_at"],
        "downlink_failed": list(failed["downlink_failed"])}
    error = failed["downlink_failed"]["error"]
    fixture_error = json.loads(fixture_path("tts/tts-down-failed-01.json").read_bytes())[
        "downlink_failed"]["error"]
    assert list(error) == list(fixture_error)
    assert {k: v for k, v in error.items() if k != "correlation_id"} == {
        k: v for k, v in fixture_error.items() if k != "correlation_id"}
    assert failed["downlink_failed"]["downlink"]["f_port"] == 2
    assert answerer.invalid == 1
    assert [(r.operation, r.via, r.outcome) for r in answerer.received] == [
        ("push", "mqtt", "ack"), ("replace", "mqtt", "sent"), ("push", "mqtt", "failed")]
    assert answerer.received[0][1]["correlation_ids"] == ["my-correlation-id"]
    assert answerer.counts() == {"ack": 1, "sent": 1, "failed": 1, "received": 3, "invalid": 1,
                                 "unknown_device": 0}
    # The answers parse as downlink outcomes, not uplinks.
    for _, payload in got:
        assert not isinstance(parse_event(payload, APP, received_ts_ms=1), Uplink)


def _blynk_downlink(device_value: Any, cid: str, *, confirmed: bool = True) -> bytes:
    """What Blynk's TTS integration sends (reference 4.1), as a decoded_payload downlink."""
    item: dict[str, Any] = {"f_port": 1, "decoded_payload": {
        "name": "speed", "pin": "v2", "ts": 1721202415068, "value": device_value},
        "priority": "NORMAL", "correlation_ids": [cid]}
    if confirmed:
        item["confirmed"] = True
    return json.dumps({"downlinks": [item]}).encode()


async def test_faults_per_device_and_by_rate() -> None:
    app_id = f"fault-{uuid.uuid4().hex[:6]}"
    fleet = emu.Fleet(MQTT_HOST, MQTT_PORT, app_id, "ttn", devices=4, rate_per_s=float("inf"))
    faults = emu.DownlinkFaults(per_device={"dev0000": "nack", "dev0001": "failed"},
                                nack_rate=1.0)
    answerer = emu.DownlinkAnswerer(
        MQTT_HOST, MQTT_PORT, app_id, "ttn", faults=faults, devices=fleet.state,
        fault_error={"namespace": "pkg/networkserver", "name": "no_device_session",
                     "message_format": "no device session", "code": 9})
    base = f"v3/{app_id}@ttn/devices"
    async with answering(answerer), mqtt.Session(mqtt.Settings(MQTT_HOST, MQTT_PORT)) as client:
        await client.subscribe([f"{base}/+/down/nack", f"{base}/+/down/failed"])
        collecting = asyncio.create_task(_collect(client, 2))
        for device in ("dev0000", "dev0001"):
            await client.publish(f"{base}/{device}/down/push", _blynk_downlink(1, f"bb:{device}"))
        # a confirmed downlink by the nack rate, and an unconfirmed one the device misses
        await client.publish(f"{base}/dev0002/down/push", _blynk_downlink(2, "bb:2"))
        await client.publish(f"{base}/dev0003/down/push",
                             _blynk_downlink(3, "bb:3", confirmed=False))
        await client.publish(f"{base}/ghost/down/push", _blynk_downlink(4, "bb:4"))
        got = dict(await within(collecting))
        await answerer.wait_for(4)
    nack = json.loads(got[f"{base}/dev0000/down/nack"])
    assert nack["downlink_nack"]["correlation_ids"][0] == "bb:dev0000"
    failed = json.loads(got[f"{base}/dev0001/down/failed"])["downlink_failed"]
    assert (failed["error"]["name"], failed["error"]["code"]) == ("no_device_session", 9)
    assert [(r.device, r.outcome) for r in answerer.received] == [
        ("dev0000", "nack"), ("dev0001", "failed"), ("dev0002", "nack"), ("dev0003", "sent")]
    assert fleet.state.state == {}  # nothing reached a device
    assert answerer.unknown_device == 1


def test_applied_values_table() -> None:
    blynk = {"decoded_payload": {"name": "speed", "pin": "v2", "ts": 1, "value": 3}}
    assert emu.applied_values(blynk) == {"speed": 3}
    assert emu.applied_values(blynk, report_key="pin") == {"v2": 3}
    assert emu.applied_values({"decoded_payload": {"pin": "v7", "value": "on"}}) == {"v7": "on"}
    assert emu.applied_values({"decoded_payload": {"led": 1, "mode": "eco"}}) == {
        "led": 1, "mode": "eco"}
    as_bytes = base64.b64encode(b'{"name":"speed","pin":"v2","value":2}').decode()
    assert emu.applied_values({"f_port": 9, "frm_payload": as_bytes}) == {"speed": 2}
    assert emu.applied_values({"f_port": 7, "frm_payload": "//8="}, port_keys={7: "temp"}) == {
        "temp": -1}
    assert emu.applied_values({"f_port": 8, "frm_payload": "//8="}, port_keys={7: "temp"}) == {}
    assert emu.applied_values({"f_port": 7, "frm_payload": "%%"}, port_keys={7: "t"}) == {}


def test_report_once_reports_an_applied_value_in_the_next_uplink_only() -> None:
    sticky, once = emu.SimulatedDevices(), emu.SimulatedDevices(port_keys={8: "valve"},
                                                                report_once=True)
    for devices in (sticky, once):
        devices.register(["d"])
        devices.apply("d", {"f_port": 8, "frm_payload": base64.b64encode(b"\x01").decode(),
                            "decoded_payload": {"name": "valve", "pin": "v8", "value": 1}})
    assert [sticky.report("d"), sticky.report("d")] == [{"valve": 1}, {"valve": 1}]
    assert [once.report("d"), once.report("d")] == [{"valve": 1}, {}]


async def test_simulated_devices_apply_downlinks_and_report_them_in_their_next_uplink() -> None:
    app_id = f"apply-{uuid.uuid4().hex[:6]}"
    fleet = emu.Fleet(MQTT_HOST, MQTT_PORT, app_id, "ttn", devices=3, rate_per_s=float("inf"))
    fleet.state.port_keys[7] = "led"
    answerer = emu.DownlinkAnswerer(MQTT_HOST, MQTT_PORT, app_id, "ttn", devices=fleet.state)
    base = f"v3/{app_id}@ttn/devices"
    async with answering(answerer), mqtt.Session(mqtt.Settings(MQTT_HOST, MQTT_PORT)) as client:
        await client.publish(f"{base}/dev0000/down/push",
                             _blynk_downlink(3, "bb:1", confirmed=False))
        await client.publish(f"{base}/dev0001/down/replace", json.dumps({"downlinks": [
            {"f_port": 7, "frm_payload": base64.b64encode(b"\x01").decode()}]}).encode())
        received = await answerer.wait_for(2)
        assert [r.applied for r in received] == [{"speed": 3}, {"led": 1}]
        await client.subscribe([f"{base}/+/up"])
        collecting = asyncio.create_task(_collect(client, 3))
        await fleet.run(count=3)
        ups = {json.loads(p)["end_device_ids"]["device_id"]: json.loads(p)["uplink_message"]
               for _, p in await within(collecting)}
    assert ups["dev0000"]["decoded_payload"]["speed"] == 3
    assert ups["dev0001"]["decoded_payload"]["led"] == 1
    assert "speed" not in ups["dev0002"]["decoded_payload"]
    assert fleet.sent["dev0000"][0] == ups["dev0000"]["decoded_payload"]


async def test_webhook_downlink_api_over_http() -> None:
    app_id = f"http-{uuid.uuid4().hex[:6]}"
    fleet = emu.Fleet(MQTT_HOST, MQTT_PORT, app_id, "ttn", devices=1, rate_per_s=1.0)
    answerer = emu.DownlinkAnswerer(MQTT_HOST, MQTT_PORT, app_id, "ttn", devices=fleet.state,
                                    api_keys={"NNSXS.GOOD"}, webhook_ids={"blynk"})
    key = {"Authorization": "Bearer NNSXS.GOOD"}
    path = f"/api/v3/as/applications/{app_id}/webhooks/blynk/devices/dev0000/down/push"
    async with answering(answerer), serve_app(answerer.http_app()) as url, \
            mqtt.Session(mqtt.Settings(MQTT_HOST, MQTT_PORT)) as client, \
            aiohttp.ClientSession() as http:
        await client.subscribe([f"v3/{app_id}@ttn/devices/+/down/+"])
        collecting = asyncio.create_task(_collect(client, 3))

        async def post(p: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
            async with http.post(url + p, data=body, headers=headers) as resp:
                text = await resp.text()
                return resp.status, json.loads(text) if text else None

        good = _blynk_downlink(3, "bb:http")
        assert (await post(path, good, {}))[0] == 401
        status, err = await post(path, good, {"Authorization": "Bearer NNSXS.BAD"})
        assert (status, err["code"], err["details"][0]["name"]) == (401, 16, "unauthenticated")
        assert err["message"] == "error:pkg/auth:unauthenticated (unauthenticated)"
        other_app = path.replace(app_id, "someone-else")
        assert (await post(other_app, good, key))[0] == 403
        assert (await post(path.replace("/blynk/", "/other/"), good, key))[0] == 404
        status, err = await post(path.replace("dev0000", "ghost"), good, key)
        assert (status, err["details"][0]["name"]) == (404, "device_not_found")
        assert (await post(path, b"{}", key))[0] == 400
        assert (await post(path, b'{"downlinks":[{"f_port":300}]}', key))[0] == 400
        assert await post(path, good, key) == (200, None)
        got = await within(collecting)
        async with http.post(url + "/_admin/faults",
                             json={"per_device": {"dev0000": "failed"}}) as resp:
            assert resp.status == 200
        assert await post(path.replace("/push", "/replace"), good, key) == (200, None)
        await answerer.wait_for(2)
        async with http.get(url + "/_admin/downlinks") as resp:
            admin = await resp.json()
    assert [t.rsplit("/", 1)[1] for t, _ in got] == ["queued", "sent", "ack"]
    assert json.loads(got[2][1])["downlink_ack"]["correlation_ids"][0] == "bb:http"
    assert admin["counts"] == {"ack": 1, "failed": 1, "received": 2, "invalid": 2,
                               "unknown_device": 1}
    assert [(r["via"], r["operation"], r["outcome"]) for r in admin["received"]] == [
        ("http", "push", "ack"), ("http", "replace", "failed")]
    assert admin["state"] == {"dev0000": {"speed": 3}}


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
            ((topic, _),) = await within(collecting)
        assert topic == f"v3/{user}/devices/dev0000/up"


def test_command_line_runs_a_fleet() -> None:
    rc = emu.main(["--host", MQTT_HOST, "--port", str(MQTT_PORT), "--app",
                   f"cli-{uuid.uuid4().hex[:6]}", "--devices", "2", "--rate", "1000",
                   "--count", "4", "--join", "--http-port", str(free_port()),
                   "--fail-rate", "0.5"])
    assert rc == 0
