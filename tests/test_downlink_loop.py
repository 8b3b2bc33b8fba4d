"""No loop between uplinks and downlinks: the whole bridge against the Blynk emulator, which
fires its webhook on *every* datastream update, device writes included (as Blynk does).

A device's uplink sets V2 through ingest-mqtt → transform → egress → Blynk; Blynk's webhook
brings that change back to ``POST /blynk/app``; the downlink stage must recognise it as the
bridge's own write and send nothing. A change made in the app (``POST /_admin/devices/{id}/
app-write`` on the running emulator, as a dashboard user causes it) must go down to the device.

On one Redis and on the local Redis Cluster (``cluster_too``; three partitions there: echo
records and last-sent times in the device's partition, the downlinks stream by token).
"""

from __future__ import annotations

import asyncio
import secrets

import pytest

from emulators.blynk import DatastreamSpec, DeviceSpec
from emulators.particle import ParticleCloud, deliver, make_event, webhook_for
from pipeline import mqtt
from tests.conftest import MQTT_HOST, MQTT_PORT, free_port, serve_app
from tests.rig import (
    PASSWORD,
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
from tests.test_downlink import Devices
from tests.wait import wait_until
from workers import downlink, egress, ingest_http, ingest_mqtt, transform

pytestmark = pytest.mark.cluster_too

TEMPLATE = "TMPLloop0001"
TOKEN = "looptokenlooptokenlooptokenloop1"


async def test_uplink_echo_is_dropped_and_an_app_change_goes_down(
        redis_yaml: str) -> None:
    app_id = f"loop-{secrets.token_hex(4)}"
    port = free_port()
    spec = blynk_spec([switch_template(TEMPLATE, "Loop")],
                      [DeviceSpec(name="sw-1", token=TOKEN, template=TEMPLATE, id=1)],
                      [blynk_hook("switch", port, TEMPLATE, "V2")])
    async with serve_blynk(spec) as (emu, blynk_url):
        cfg = parse_config(f"""
redis: {redis_yaml}
streams: {{block_ms: 100}}
blynk: {{servers: {{fra1: "{blynk_url}"}}, default_server: fra1}}
ingest_http: {{host: 127.0.0.1, port: {port}}}
templates:
  - name: loop
    datastreams: [{{name: switch, pin: V2, type: integer, min: 0, max: 1}}]
tts:
  - {{name: loop, app_id: {app_id}, host: {MQTT_HOST}, port: {MQTT_PORT}, insecure: true,
      api_key: NNSXS.LOOP, template: loop}}
devices:
  - {{source: tts, integration: loop, device: sw-1, token: {TOKEN}, template: loop}}
blynk_webhooks:
  - {{name: app, auth: {{username: blynk, password: "{PASSWORD}"}}}}
egress: {{flush_age_ms: 10}}
""")
        devices = Devices(app_id)
        ready = asyncio.Event()
        dev_task = asyncio.create_task(devices.run(ready))
        try:
            async with run_bridge(cfg, (ingest_http, ingest_mqtt, transform, egress, downlink)
                                  ) as bridge:
                await asyncio.wait_for(ready.wait(), 10)
                echoes = counted("echo", "loop")
                settings = mqtt.Settings(host=MQTT_HOST, port=MQTT_PORT)
                async with mqtt.Session(settings) as session:
                    async def uplink_received() -> bool:
                        # ingest-mqtt subscribes asynchronously: publish until the value lands
                        now = await blynk_value(bridge.http, blynk_url, 1, "v2")
                        if now is not None and now["value"] == 1:
                            return True
                        await session.publish(f"v3/{app_id}@ttn/devices/sw-1/up",
                                              tts_uplink_body(app_id, "sw-1", 1, {"switch": 1}))
                        await asyncio.sleep(0.2)
                        return False

                    await wait_until(uplink_received, what="the uplink written to Blynk")
                await emu.webhooks.drain()
                await wait_until(lambda: counted("echo", "loop") > echoes,
                                 what="the echo recognised")
                assert emu.webhooks.stats()["switch"]["ok"] >= 1
                assert devices.got == []
                # the user flips the switch in the app: that change is not the bridge's own
                await app_write(bridge.http, blynk_url, 1, "v2", 0)
                await wait_until(lambda: devices.got, what="the app's change sent down")
                (device, body), = devices.got
                assert device == "sw-1"
                assert body["downlinks"][0]["decoded_payload"]["value"] == 0
        finally:
            dev_task.cancel()
            await asyncio.gather(dev_task, return_exceptions=True)


BOARD_TEMPLATE = "TMPLloop0002"
CORE_ROW = "e00fce68aaaabbbbccccdd01"   # in the registry, and sends its token in the event too
CORE_TOKEN_ONLY = "e00fce68aaaabbbbccccdd02"   # known to the bridge only by its event's `t`
TOKEN_ROW = "blueprinttokenblueprinttokenblu1"
TOKEN_ONLY = "blueprinttokenblueprinttokenblu2"
SECRET = "particle-hook-secret"


async def test_echo_of_a_token_carrying_particle_device_is_dropped(
        redis_yaml: str) -> None:
    """The Particle blueprint puts the Blynk token in the event (``t``): egress keys those writes
    apart from the registry row; their echoes must still be recognised (not called down, and not
    dead-lettered as an unknown device)."""
    port = free_port()
    spec = blynk_spec([switch_template(BOARD_TEMPLATE, "Board", DatastreamSpec(
                          id=2, pin="V2", name="led", type="integer", min=0, max=1))],
                      [DeviceSpec(name="board-1", token=TOKEN_ROW, template=BOARD_TEMPLATE,
                                  id=1),
                       DeviceSpec(name="board-2", token=TOKEN_ONLY, template=BOARD_TEMPLATE,
                                  id=2)],
                      [blynk_hook("led", port, BOARD_TEMPLATE, "V2")])
    cloud = ParticleCloud([CORE_ROW, CORE_TOKEN_ONLY])
    async with serve_blynk(spec) as (emu, blynk_url), serve_app(cloud.app) as api_url:
        cfg = parse_config(f"""
redis: {redis_yaml}
streams: {{block_ms: 100}}
blynk: {{servers: {{fra1: "{blynk_url}"}}, default_server: fra1}}
ingest_http: {{host: 127.0.0.1, port: {port}}}
templates:
  - name: board
    datastreams: [{{name: led, pin: V2, type: integer, min: 0, max: 1}}]
    downlink: {{particle: {{V2: {{function: led}}}}}}
particle:
  - {{name: boards, api_url: "{api_url}", access_token: particle-token, template: board,
      auth: {{header: X-Bridge-Secret, secret: {SECRET}}}}}
devices:
  - {{source: particle, integration: boards, device: {CORE_ROW}, token: {TOKEN_ROW},
      template: board}}
blynk_webhooks:
  - {{name: app, auth: {{username: blynk, password: "{PASSWORD}"}}}}
egress: {{flush_age_ms: 10}}
""")
        async with run_bridge(cfg, (ingest_http, transform, egress, downlink)) as bridge:
            # the device with a row is counted under its integration, the other under the
            # webhook's name (its integration is not known)
            echoes = counted("echo", "boards"), counted("echo", "app")
            particle_hook = webhook_for("json", f"{bridge.ingest_url}/particle/boards")
            particle_hook.headers = {"X-Bridge-Secret": SECRET}
            for core, token in ((CORE_ROW, TOKEN_ROW), (CORE_TOKEN_ONLY, TOKEN_ONLY)):
                sent = await deliver(bridge.http, particle_hook,
                                     make_event(core, data={"t": token, "led": 1}),
                                     retry_delays_s=())
                assert sent.ok, sent.statuses
            for token in (TOKEN_ROW, TOKEN_ONLY):
                dev = emu.device_by_token(token)
                await wait_until(lambda d=dev: d.value("V2") == 1,
                                 what="the uplink written to Blynk")
            await emu.webhooks.drain()
            assert emu.webhooks.stats()["led"]["ok"] == 2
            await wait_until(lambda: (counted("echo", "boards") - echoes[0],
                                      counted("echo", "app") - echoes[1]) == (1, 1),
                             what="both echoes recognised")
            assert cloud.calls == []
            assert [d.reason for d in await bridge.dead()] == []
