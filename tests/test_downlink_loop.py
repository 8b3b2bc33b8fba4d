"""No loop between uplinks and downlinks: the whole bridge against the Blynk emulator, which
fires its webhook on *every* datastream update, device writes included (as Blynk does).

A device's uplink sets V2 through ingest-mqtt → transform → egress → Blynk; Blynk's webhook
brings that change back to ``POST /blynk/app``; the downlink stage must recognise it as the
bridge's own write and send nothing. A change made in the app (a write that did not come from
the bridge) must go down to the device.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time

from emulators.blynk import (
    BlynkEmulator,
    DatastreamSpec,
    DeviceSpec,
    EmulatorSpec,
    Settings,
    TemplateSpec,
    WebhookSpec,
)
from emulators.tts import make_uplink
from pipeline import config as config_mod
from pipeline import mqtt
from pipeline.context import Context
from pipeline.lifecycle import run_stages
from pipeline.streams import Redis
from tests.conftest import MQTT_HOST, MQTT_PORT, REDIS_URL, free_port
from tests.test_downlink import BODY, PASSWORD, Devices, counted, wait_for
from workers import downlink, egress, ingest_http, ingest_mqtt, transform

TEMPLATE = "TMPLloop0001"
TOKEN = "looptokenlooptokenlooptokenloop1"


async def test_uplink_echo_is_dropped_and_an_app_change_goes_down(
        redis: Redis, prefix: str) -> None:
    app_id = f"loop-{secrets.token_hex(4)}"
    port = free_port()
    auth = base64.b64encode(f"blynk:{PASSWORD}".encode()).decode()
    hook = WebhookSpec(
        name="switch", url=f"http://127.0.0.1:{port}/blynk/app", template=TEMPLATE,
        datastream="V2", body=BODY.format(id="{device_id}", token="{device_authToken}",
                                          pin="{device_pin}", value="{device_pinValue}",
                                          ts="{timestamp_unix}", name="{device_name}"),
        headers={"Authorization": f"Basic {auth}"})
    emu = BlynkEmulator.from_spec(EmulatorSpec(
        regions={"fra1": 0}, settings=Settings(device_rps=None),
        templates=[TemplateSpec(id=TEMPLATE, name="Loop", datastreams=[
            DatastreamSpec(id=2, pin="V2", name="switch", type="integer", min=0, max=1)])],
        devices=[DeviceSpec(name="sw-1", token=TOKEN, template=TEMPLATE, id=1)],
        webhooks=[hook]))
    async with emu.serve({"fra1": 0}) as urls:
        cfg = config_mod.parse(f"""
redis: {{url: "{REDIS_URL}", prefix: "{prefix}"}}
streams: {{block_ms: 100}}
blynk: {{servers: {{fra1: "{urls['fra1']}"}}, default_server: fra1}}
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
""", "yaml", "loop.yaml", env={})
        ctx = Context.create(cfg, consumer="loop")
        stop = asyncio.Event()
        stages = [m.build(ctx) for m in (ingest_http, ingest_mqtt, transform, egress, downlink)]
        task = asyncio.create_task(run_stages(stages, stop=stop, install_signals=False))
        devices = Devices(app_id)
        ready = asyncio.Event()
        dev_task = asyncio.create_task(devices.run(ready))
        try:
            await asyncio.wait_for(ready.wait(), 10)
            echoes = counted("echo", "loop")
            settings = mqtt.Settings(host=MQTT_HOST, port=MQTT_PORT)
            blynk_dev = emu.device_by_token(TOKEN)
            async with mqtt.Session(settings) as session:
                async def uplink_received() -> bool:
                    # ingest-mqtt subscribes asynchronously: publish until the value lands
                    if blynk_dev.value("V2") == 1:
                        return True
                    up = make_uplink(app_id, "ttn", "sw-1", 1, {"switch": 1})
                    await session.publish(f"v3/{app_id}@ttn/devices/sw-1/up",
                                          json.dumps(up).encode())
                    await asyncio.sleep(0.2)
                    return False

                await wait_for(uplink_received, "the uplink written to Blynk")
            await emu.webhooks.drain()
            await wait_for(lambda: counted("echo", "loop") > echoes, "the echo recognised")
            assert emu.webhooks.stats()["switch"]["ok"] >= 1
            assert devices.got == []
            # the user flips the switch in the app: that change is not the bridge's own
            ds = blynk_dev.template.by_pin["V2"]
            emu.model.write(blynk_dev, ds, 0, int(time.time() * 1000))
            await wait_for(lambda: devices.got, "the app's change sent down")
            (device, body), = devices.got
            assert device == "sw-1"
            assert body["downlinks"][0]["decoded_payload"]["value"] == 0
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            dev_task.cancel()
            await asyncio.gather(dev_task, return_exceptions=True)
            await ctx.close()
