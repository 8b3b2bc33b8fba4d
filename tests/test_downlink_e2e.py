"""Downlinks end to end through the real stages and emulators, started by a change in the app.

Each test changes a datastream the way a Blynk user does (``POST /_admin/devices/{id}/app-write``
on the running Blynk emulator, over HTTP); the emulator's webhook posts it to ingest-http, the
downlink stage sends it, and the emulated device cloud takes it over real HTTP or MQTT:

* TTS over HTTP (``downlink_via: http``, the webhook downlink API with the Bearer API key): the
  exact body Blynk's TTS integration sends; its outcome reported by TTS webhook, matched and
  written to the outcome pin; the simulated device applies it and its next uplink
  (a TTS webhook to ``POST /tts/…``) writes the new value to Blynk — whose webhook fires again for
  that write and is recognised as the bridge's own echo (nothing sent twice);
* encode rules: the value packed into ``frm_payload`` bytes per pin (type, endianness, f_port),
  a value that does not fit dead-lettered ``encode_failed``;
* a Particle function's ``arg`` built from its template.

On one Redis and on the local Redis Cluster (``cluster_too``, three partitions there).
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from prometheus_client import REGISTRY

from emulators.blynk import DatastreamSpec, DeviceSpec
from emulators.particle import Device, ParticleCloud
from emulators.tts import DownlinkAnswerer, Received, SimulatedDevices
from pipeline.keys import DOWNLINKS, GROUP_DOWNLINK
from tests.conftest import MQTT_HOST, MQTT_PORT, free_port, serve_app
from tests.rig import (
    PASSWORD,
    Running,
    app_write,
    blynk_hook,
    blynk_spec,
    blynk_value,
    counted,
    parse_config,
    run_bridge,
    serve_blynk,
    switch_template,
    tts_uplink_body,
)
from tests.wait import wait_until
from workers import downlink, egress, ingest_http, transform

pytestmark = pytest.mark.cluster_too

TEMPLATE = "TMPLdown0e2e"
TOKEN = "e2etokene2etokene2etokene2etoke1"
API_KEY = "NNSXS.E2E-DOWNLINK-KEY"
WEBHOOK_ID = "blynk-bridge"
UPLINK_SECRET = "tts-webhook-secret"


def _config(redis_yaml: str, port: int, blynk_url: str, *, templates: str, integrations: str,
            device: str) -> str:
    return f"""
redis: {redis_yaml}
streams: {{block_ms: 100}}
blynk: {{servers: {{fra1: "{blynk_url}"}}, default_server: fra1}}
ingest_http: {{host: 127.0.0.1, port: {port}}}
templates:
{templates}
{integrations}
devices:
  - {device}
blynk_webhooks:
  - {{name: app, auth: {{username: blynk, password: "{PASSWORD}"}}}}
egress: {{flush_age_ms: 10}}
"""


@asynccontextmanager
async def tts_cloud(app_id: str, devices: SimulatedDevices | None = None,
                    outcome_webhook: str | None = None
                    ) -> AsyncIterator[tuple[DownlinkAnswerer, str]]:
    """The emulated TTS downlink side: answers on the real broker (and, given
    ``outcome_webhook``, posts the outcomes there as a TTS webhook), downlink API over HTTP."""
    answerer = DownlinkAnswerer(MQTT_HOST, MQTT_PORT, app_id, "ttn", devices=devices,
                                api_keys={API_KEY}, webhook_ids={WEBHOOK_ID},
                                outcome_webhook=outcome_webhook,
                                outcome_headers={"X-Downlink-Apikey": UPLINK_SECRET})
    run = asyncio.create_task(answerer.run())
    try:
        await asyncio.wait_for(answerer.ready.wait(), 30)
        async with serve_app(answerer.http_app()) as url:
            yield answerer, url
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


@pytest.mark.parametrize("queue", ["push", "replace"])
async def test_tts_over_http_round_trip_with_the_devices_echoed_state(
        redis_yaml: str, queue: str) -> None:
    app_id = f"e2e-{secrets.token_hex(4)}"
    port = free_port()
    spec = blynk_spec([switch_template(
        TEMPLATE, "Valve",
        DatastreamSpec(id=2, pin="V2", name="switch", type="integer", min=0, max=1),
        DatastreamSpec(id=9, pin="V9", name="delivered", type="integer", min=0, max=1))],
                      [DeviceSpec(name="valve-1", token=TOKEN, template=TEMPLATE, id=1)],
                      [blynk_hook("switch", port, TEMPLATE, "V2")])
    field = SimulatedDevices()
    field.register(["valve-1"])
    # TTS reports the outcomes to the application's webhook (no MQTT anywhere on the bridge)
    outcomes = f"http://127.0.0.1:{port}/tts/farm"
    async with serve_blynk(spec) as (emu, blynk_url), \
            tts_cloud(app_id, field, outcomes) as (tts, api):
        cfg = parse_config(_config(
            redis_yaml, port, blynk_url,
            templates="""  - name: valve
    datastreams:
      - {name: switch, pin: V2, type: integer, min: 0, max: 1}
      - {name: delivered, pin: V9, type: integer, min: 0, max: 1}
    downlink: {outcome_pin: V9}""",
            integrations=f"""tts:
  - {{name: farm, app_id: {app_id}, api_key: "{API_KEY}", template: valve,
      downlink_via: http, api_url: "{api}", downlink_webhook_id: {WEBHOOK_ID},
      downlink_f_port: 5, downlink_queue: {queue},
      webhook_auth: {{header: X-Downlink-Apikey, secret: {UPLINK_SECRET}}}}}""",
            device=f"{{source: tts, integration: farm, device: valve-1, token: {TOKEN}, "
                   "template: valve}"))
        async with run_bridge(cfg, (ingest_http, transform, egress, downlink)) as bridge:
            sent, echoes = counted("sent", "farm"), counted("echo", "farm")
            delivered = _outcome_counted("farm", "sent")
            written = await app_write(bridge.http, blynk_url, 1, "v2", 1)
            got: list[Received] = await wait_until(lambda: tts.received,
                                                   what="the downlink at TTS's HTTP API")
            (r,) = got
            assert (r.device, r.operation, r.via) == ("valve-1", queue, "http")
            (cid,) = r.downlink["correlation_ids"]
            assert cid.startswith("bb:down:")
            assert r.downlink == {
                "f_port": 5,
                "decoded_payload": {"name": "switch", "pin": "v2", "ts": written["ts_ms"],
                                    "value": 1},
                "priority": "NORMAL", "correlation_ids": [cid]}
            assert r.applied == {"switch": 1}
            await wait_until(lambda: counted("sent", "farm") - sent == 1, what="counted sent")
            # down/sent came back by webhook: matched by correlation id, written to the outcome
            # pin (TTS answered before the bridge's downlink call returned)
            await wait_until(lambda: _outcome_counted("farm", "sent") - delivered == 1,
                             what="the webhook's down/sent matched")

            async def outcome_in_blynk() -> bool:
                v = await blynk_value(bridge.http, blynk_url, 1, "v9")
                return v is not None and v["value"] == 1

            await wait_until(outcome_in_blynk, what="the outcome pin written")
            # the device's next uplink reports what it applied (TTS webhook → Blynk)
            async with bridge.http.post(
                    f"{bridge.ingest_url}/tts/farm",
                    data=tts_uplink_body(app_id, "valve-1", 1, field.report("valve-1")),
                    headers={"X-Downlink-Apikey": UPLINK_SECRET,
                             "Content-Type": "application/json"}) as resp:
                assert resp.status == 200, await resp.text()

            async def echoed_by_the_device() -> dict[str, Any] | None:
                v = await blynk_value(bridge.http, blynk_url, 1, "v2")
                return v if v is not None and v["origin"] == "device" else None

            state = await wait_until(echoed_by_the_device, what="the device's state in Blynk")
            assert state["value"] == 1 and state["ts_ms"] > written["ts_ms"]
            # Blynk's webhook fired for that write too: the bridge's own echo, not sent again
            await emu.webhooks.drain()
            assert emu.webhooks.stats()["switch"]["ok"] == 2
            await wait_until(lambda: counted("echo", "farm") - echoes == 1,
                             what="the echo recognised")
            assert len(tts.received) == 1
            assert [d.reason for d in await bridge.dead()] == []


ENCODE_TEMPLATE = "TMPLencode001"


async def test_encode_rules_pack_the_apps_values_into_frm_payload(
        redis_yaml: str) -> None:
    app_id = f"enc-{secrets.token_hex(4)}"
    port = free_port()
    spec = blynk_spec(
        [switch_template(ENCODE_TEMPLATE, "Pump",
                         DatastreamSpec(id=2, pin="V2", name="switch", type="integer", min=0,
                                        max=1),
                         DatastreamSpec(id=3, pin="V3", name="level", type="integer",
                                        min=-50000, max=50000),
                         DatastreamSpec(id=4, pin="V4", name="setpoint", type="double",
                                        min=-100, max=100))],
        [DeviceSpec(name="pump-1", token=TOKEN, template=ENCODE_TEMPLATE, id=1)],
        [blynk_hook(f"hook {pin}", port, ENCODE_TEMPLATE, pin) for pin in ("V2", "V3", "V4")])
    async with serve_blynk(spec) as (_, blynk_url), tts_cloud(app_id) as (tts, _api):
        cfg = parse_config(_config(
            redis_yaml, port, blynk_url,
            templates="""  - name: pump
    datastreams:
      - {name: switch, pin: V2, type: integer, min: 0, max: 1}
      - {name: level, pin: V3, type: integer}
      - {name: setpoint, pin: V4, type: double}
    downlink:
      encode:
        - {pin: V2, type: uint8, f_port: 8}
        - {pin: V3, type: int16, endian: little, f_port: 9}
        - {pin: V4, type: float32}""",
            integrations=f"""tts:
  - {{name: pumps, app_id: {app_id}, host: {MQTT_HOST}, port: {MQTT_PORT}, insecure: true,
      api_key: NNSXS.ENC, template: pump, downlink_f_port: 5}}""",
            device=f"{{source: tts, integration: pumps, device: pump-1, token: {TOKEN}, "
                   "template: pump}"))
        async with run_bridge(cfg, (ingest_http, downlink)) as bridge:
            for pin, value in (("v2", 1), ("v3", -300), ("v4", 21.5)):
                await app_write(bridge.http, blynk_url, 1, pin, value)
            await wait_until(lambda: len(tts.received) >= 3, what="three downlinks")
            by_port = {r.downlink["f_port"]: r.downlink for r in tts.received}
            assert {p: base64.b64decode(d["frm_payload"]) for p, d in by_port.items()} == {
                8: b"\x01", 9: struct.pack("<h", -300), 5: struct.pack(">f", 21.5)}
            assert all("decoded_payload" not in d for d in by_port.values())
            # a value the rule's type cannot hold is refused with the reason, never truncated
            await app_write(bridge.http, blynk_url, 1, "v3", 40000)
            dead = await wait_until(bridge.dead, what="the dead letter")
            assert [(d.reason, "does not fit int16" in d.detail) for d in dead] == [
                ("encode_failed", True)]
            assert len(tts.received) == 3


async def test_a_particle_function_gets_its_arg_template(redis_yaml: str) -> None:
    core = "e00fce68e2e0e2e0e2e0e2e0"
    port = free_port()
    spec = blynk_spec(
        [switch_template(ENCODE_TEMPLATE, "Heater",
                         DatastreamSpec(id=4, pin="V4", name="setpoint", type="double",
                                        min=-100, max=100))],
        [DeviceSpec(name="heater-1", token=TOKEN, template=ENCODE_TEMPLATE, id=1)],
        [blynk_hook("setpoint", port, ENCODE_TEMPLATE, "V4")])
    cloud = ParticleCloud([Device(core, functions={"set": lambda arg: len(arg)})])
    async with serve_blynk(spec) as (_, blynk_url), serve_app(cloud.app) as api_url:
        cfg = parse_config(_config(
            redis_yaml, port, blynk_url,
            templates="""  - name: heater
    datastreams: [{name: setpoint, pin: V4, type: double}]
    downlink: {particle: {V4: {function: set, arg: "{pin}={value};{name}"}}}""",
            integrations=f"""particle:
  - {{name: heaters, api_url: "{api_url}", access_token: particle-token, template: heater,
      auth: none}}""",
            device=f"{{source: particle, integration: heaters, device: {core}, "
                   f"token: {TOKEN}, template: heater}}"))
        async with run_bridge(cfg, (ingest_http, downlink)) as bridge:
            first = await app_write(bridge.http, blynk_url, 1, "v4", 21.0)
            # The emulator's webhook workers send concurrently, so the two may arrive swapped;
            # only Blynk time orders them, in ms: the second write must be a later ms than the
            # first (ties go to the later arrival: pipeline.downlinks.latest_wins).
            await wait_until(lambda: time.time() * 1000 > first["ts_ms"] + 1,
                             what="the next Blynk millisecond")
            await app_write(bridge.http, blynk_url, 1, "v4", 19.5)
            calls = await cloud.wait_for_calls(1, timeout_s=30)
            await _sent_all(bridge, cloud)
            args = [c.arg for c in cloud.calls if c.status == 200]
            # the newest value always arrives; an older one only if it went before it
            assert args[-1] == "v4=19.5;setpoint"
            assert set(args) <= {"v4=21;setpoint", "v4=19.5;setpoint"}
            assert calls[0].function == "set" and calls[0].device == core


async def _sent_all(bridge: Running, cloud: ParticleCloud) -> None:
    async def settled() -> bool:
        redis, streams = bridge.ctx.redis, bridge.ctx.keys.streams(DOWNLINKS)
        pending = [int((await redis.xpending(s, GROUP_DOWNLINK))["pending"]) for s in streams]
        return sum(pending) == 0 and sum([await redis.xlen(s) for s in streams]) == 2
    await wait_until(settled, what="both commands finished")


def _outcome_counted(integration: str, outcome: str) -> float:
    return REGISTRY.get_sample_value("bb_downlink_outcomes_total",
                                     {"integration": integration, "outcome": outcome}) or 0.0
