"""No loop between uplinks and downlinks: the whole bridge against the Blynk emulator, which
fires its webhook on *every* datastream update, device writes included (as Blynk does).

A device's uplink sets V2 through ingest-mqtt → transform → egress → Blynk; Blynk's webhook
brings that change back to ``POST /blynk/app``; the downlink stage must recognise it as the
bridge's own write and send nothing. A change made in the app (a write that did not come from
the bridge) must go down to the device.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time

import aiohttp

from emulators.blynk import (
    BlynkEmulator,
    DatastreamSpec,
    DeviceSpec,
    EmulatorSpec,
    Settings,
    TemplateSpec,
    WebhookSpec,
)
from emulators.blynk.settings import (
    WebhookAuth,
)
from emulators.particle import ParticleCloud, deliver, make_event, webhook_for
from emulators.tts import make_uplink
from pipeline import config as config_mod
from pipeline import events, mqtt
from pipeline.context import Context
from pipeline.lifecycle import run_stages
from pipeline.streams import Redis
from tests.conftest import MQTT_HOST, MQTT_PORT, REDIS_URL, free_port, serve_app
from tests.test_downlink import BODY, PASSWORD, Devices, counted
from tests.wait import wait_until, within
from workers import downlink, egress, ingest_http, ingest_mqtt, transform

TEMPLATE = "TMPLloop0001"
TOKEN = "looptokenlooptokenlooptokenloop1"


async def test_uplink_echo_is_dropped_and_an_app_change_goes_down(
        redis: Redis, prefix: str) -> None:
    app_id = f"loop-{secrets.token_hex(4)}"
    port = free_port()
    hook = WebhookSpec(
        name="switch", url=f"http://127.0.0.1:{port}/blynk/app", template=TEMPLATE,
        datastream="V2", body=BODY.format(id="{device_id}", token="{device_authToken}",
                                          pin="{device_pin}", value="{device_pinValue}",
                                          ts="{timestamp_unix}", name="{device_name}"),
        auth=WebhookAuth(username="blynk", password=PASSWORD))
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
            await within(ready.wait())
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

                await wait_until(uplink_received, what="the uplink written to Blynk")
            await emu.webhooks.drain()
            await wait_until(lambda: counted("echo", "loop") > echoes, what="the echo recognised")
            assert emu.webhooks.stats()["switch"]["ok"] >= 1
            assert devices.got == []
            # the user flips the switch in the app: that change is not the bridge's own
            ds = blynk_dev.template.by_pin["V2"]
            emu.model.write(blynk_dev, ds, 0, int(time.time() * 1000))
            await wait_until(lambda: devices.got, what="the app's change sent down")
            (device, body), = devices.got
            assert device == "sw-1"
            assert body["downlinks"][0]["decoded_payload"]["value"] == 0
        finally:
            stop.set()
            await within(task)
            dev_task.cancel()
            await asyncio.gather(dev_task, return_exceptions=True)
            await ctx.close()


BOARD_TEMPLATE = "TMPLloop0002"
CORE_ROW = "e00fce68aaaabbbbccccdd01"   # in the registry, and sends its token in the event too
CORE_TOKEN_ONLY = "e00fce68aaaabbbbccccdd02"   # known to the bridge only by its event's `t`
TOKEN_ROW = "blueprinttokenblueprinttokenblu1"
TOKEN_ONLY = "blueprinttokenblueprinttokenblu2"
SECRET = "particle-hook-secret"


async def test_echo_of_a_token_carrying_particle_device_is_dropped(
        redis: Redis, prefix: str) -> None:
    """The Particle blueprint puts the Blynk token in the event (``t``): egress keys those writes
    apart from the registry row; their echoes must still be recognised (not called down, and not
    dead-lettered as an unknown device)."""
    port = free_port()
    hook = WebhookSpec(
        name="led", url=f"http://127.0.0.1:{port}/blynk/app", template=BOARD_TEMPLATE,
        datastream="V2", body=BODY.format(id="{device_id}", token="{device_authToken}",
                                          pin="{device_pin}", value="{device_pinValue}",
                                          ts="{timestamp_unix}", name="{device_name}"),
        auth=WebhookAuth(username="blynk", password=PASSWORD))
    emu = BlynkEmulator.from_spec(EmulatorSpec(
        regions={"fra1": 0}, settings=Settings(device_rps=None),
        templates=[TemplateSpec(id=BOARD_TEMPLATE, name="Board", datastreams=[
            DatastreamSpec(id=2, pin="V2", name="led", type="integer", min=0, max=1)])],
        devices=[DeviceSpec(name="board-1", token=TOKEN_ROW, template=BOARD_TEMPLATE, id=1),
                 DeviceSpec(name="board-2", token=TOKEN_ONLY, template=BOARD_TEMPLATE, id=2)],
        webhooks=[hook]))
    cloud = ParticleCloud([CORE_ROW, CORE_TOKEN_ONLY])
    async with emu.serve({"fra1": 0}) as urls, serve_app(cloud.app) as api_url:
        cfg = config_mod.parse(f"""
redis: {{url: "{REDIS_URL}", prefix: "{prefix}"}}
streams: {{block_ms: 100}}
blynk: {{servers: {{fra1: "{urls['fra1']}"}}, default_server: fra1}}
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
""", "yaml", "loop.yaml", env={})
        ctx = Context.create(cfg, consumer="loop")
        stop = asyncio.Event()
        stages = [m.build(ctx) for m in (ingest_http, transform, egress, downlink)]
        task = asyncio.create_task(run_stages(stages, stop=stop, install_signals=False))
        try:
            # the device with a row is counted under its integration, the other under the
            # webhook's name (its integration is not known)
            echoes = counted("echo", "boards"), counted("echo", "app")
            particle_hook = webhook_for("json", f"http://127.0.0.1:{port}/particle/boards")
            particle_hook.headers = {"X-Bridge-Secret": SECRET}
            async with aiohttp.ClientSession() as http:
                await wait_until(lambda: _up(http, port), what="ingest-http listening")
                for core, token in ((CORE_ROW, TOKEN_ROW), (CORE_TOKEN_ONLY, TOKEN_ONLY)):
                    sent = await deliver(http, particle_hook,
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
            dead = [events.decode_dead(f[events.FIELD])
                    for _, f in await redis.xrange(ctx.keys.dead)]
            assert [d.reason for d in dead] == []
        finally:
            stop.set()
            await within(task)
            await ctx.close()


async def _up(http: aiohttp.ClientSession, port: int) -> bool:
    try:
        async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False
