"""End to end: TTS uplinks published to the real Mosquitto reach the emulated Blynk.

The real stages (ingest-mqtt, transform, egress) run against the real Redis; values are checked
through the emulator's device API ``get`` over HTTP, as a Blynk user would see them.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from emulators.blynk import BlynkEmulator, DatastreamSpec, DeviceSpec, Model, TemplateSpec
from emulators.tts import Fleet
from pipeline import config as config_mod
from pipeline import events, mqtt
from pipeline.context import Context
from pipeline.lifecycle import run_stages
from pipeline.status import StatusBoard
from pipeline.streams import Redis
from tests.conftest import MQTT_HOST, MQTT_PORT, REDIS_URL
from tests.wait import wait_until, within
from workers import egress, ingest_mqtt, transform

TEMPLATE = "TMPLe2e00001"
DATASTREAMS = [
    ("batteryVoltage", "V1", "double"),
    ("sensorTemperature", "V2", "double"),
    ("pressEvent", "V3", "integer"),
    ("singlePressEventCounter", "V4", "integer"),
    ("thermistorProperlyConnected", "V5", "integer"),
    ("RSSI", "V6", "integer"),
    ("SNR", "V7", "double"),
    ("occupied", "V8", "integer"),
    ("type", "V9", "string"),
    ("temperature", "V10", "double"),
    ("humidity", "V11", "double"),
    ("battery", "V12", "integer"),
    ("door_open", "V13", "integer"),
]
FIXTURE_DEVICES = ["eui-70b3d52dd600035a", "dev1"]
FLEET_DEVICES = [f"fleet{i:04d}" for i in range(8)]
#: Uplinks preloaded for the SIGTERM test: enough that a stop after the first write leaves some.
BACKLOG = 5000


def token_for(device: str) -> str:
    return (device.replace("-", "") + "x" * 32)[:32]


def emulator() -> BlynkEmulator:
    model = Model()
    model.add_template(TemplateSpec(
        id=TEMPLATE, name="E2E",
        datastreams=[DatastreamSpec(id=i + 1, pin=pin, name=name, type=t,  # type: ignore[arg-type]
                                    **({"min": -110, "max": 0} if name == "RSSI" else {}))
                     for i, (name, pin, t) in enumerate(DATASTREAMS)]))
    for i, dev in enumerate(FIXTURE_DEVICES + FLEET_DEVICES):
        model.add_device_spec(DeviceSpec(id=i + 1, name=dev, token=token_for(dev),
                                         template=TEMPLATE))
    return BlynkEmulator(model, regions={"fra1": 0})


def bridge_config(blynk_url: str, prefix: str, app_id: str, batch: int = 500) -> config_mod.Config:
    datastreams = "\n".join(
        f"      - {{name: {n}, pin: {p}, type: {t}"
        + (", min: -110, max: 0" if n == "RSSI" else "") + "}"
        for n, p, t in DATASTREAMS
    )
    devices = "\n".join(
        f"  - {{source: tts, integration: kit, device: {d}, token: {token_for(d)}, "
        "template: kit}"
        for d in FIXTURE_DEVICES + FLEET_DEVICES
    )
    text = f"""
redis: {{url: "{REDIS_URL}", prefix: "{prefix}"}}
streams: {{block_ms: 200, batch: {batch}}}
blynk:
  servers: {{fra1: "{blynk_url}"}}
  default_server: fra1
templates:
  - name: kit
    id: {TEMPLATE}
    datastreams:
{datastreams}
tts:
  - name: kit
    app_id: {app_id}
    host: {MQTT_HOST}
    port: {MQTT_PORT}
    insecure: true
    api_key: NNSXS.E2E
    template: kit
devices:
{devices}
egress: {{flush_age_ms: 20}}
"""
    return config_mod.parse(text, "yaml", "e2e.yaml", env={})


@asynccontextmanager
async def pipeline(cfg: config_mod.Config) -> AsyncIterator[Context]:
    """The three stages of the thin path, running until the block ends."""
    ctx = Context.create(cfg)
    stop = asyncio.Event()
    stages = [ingest_mqtt.build(ctx), transform.build(ctx), egress.build(ctx)]
    task = asyncio.create_task(run_stages(stages, stop=stop, install_signals=False))
    try:
        await wait_until(lambda: status_connected(ctx, cfg.tts[0].name),
                         what="ingest-mqtt connected")
        yield ctx
    finally:
        stop.set()
        await within(task)
        await ctx.close()


async def status_connected(ctx: Context, name: str) -> bool:
    status = await StatusBoard(ctx.redis, ctx.keys).get("tts", name)
    return status is not None and status.state == "Connected"


async def blynk_get(http: aiohttp.ClientSession, url: str, device: str, pins: list[str]) -> Any:
    """Several pins: Blynk answers typed JSON (one pin would be raw text)."""
    assert len(pins) > 1
    query = "&".join(p.lower() for p in pins)
    async with http.get(f"{url}/external/api/get?token={token_for(device)}&{query}") as resp:
        assert resp.status == 200, await resp.text()
        return json.loads(await resp.text())


async def test_fixture_and_fleet_uplinks_reach_blynk(
    fixture_path: Callable[[str], Path], prefix: str, redis: Redis
) -> None:
    app_id = f"e2e-{secrets.token_hex(4)}"
    emu = emulator()
    async with emu.serve() as urls:
        cfg = bridge_config(urls["fra1"], prefix, app_id)
        async with pipeline(cfg) as ctx, aiohttp.ClientSession() as http:
            settings = mqtt.Settings(MQTT_HOST, MQTT_PORT, client_id=f"e2e-pub-{app_id}")
            async with mqtt.Session(settings) as pub:
                topic = f"v3/{app_id}@ttn/devices/{{}}/up"
                up = fixture_path("tts/tts-uplink-02.json").read_bytes()
                await pub.publish(topic.format("eui-70b3d52dd600035a"), up)
                # Storage API export: the newer uplink (occupied=false) comes first.
                storage = fixture_path("tts/tts-storage-02-simulated.json").read_text()
                for msg in json.loads(storage):
                    await pub.publish(topic.format("dev1"), json.dumps(msg).encode())
                # Invalid JSON as published in the docs: dead-lettered, nothing else disturbed.
                await pub.publish(topic.format("dev1"),
                                  fixture_path("tts/tts-uplink-10-invalid.json").read_bytes())
            fleet = Fleet(MQTT_HOST, MQTT_PORT, app_id, "ttn", devices=len(FLEET_DEVICES),
                          rate_per_s=200, device_prefix="fleet", seed=7)
            await fleet.run(count=len(FLEET_DEVICES) * 5)

            async def fleet_landed() -> bool:
                for device, sent in fleet.sent.items():
                    last = next((d for d in reversed(sent) if d is not None), None)
                    if last is None:
                        continue
                    got = await blynk_get(http, urls["fra1"], device, ["V10", "V11"])
                    if got.get("v10") != pytest.approx(last["temperature"]):
                        return False
                return True

            async def fixtures_landed() -> bool:
                kit = await blynk_get(http, urls["fra1"], "eui-70b3d52dd600035a", ["V2", "V8"])
                dev1 = await blynk_get(http, urls["fra1"], "dev1", ["V8", "V9"])
                return "v2" in kit and "v9" in dev1

            await wait_until(fixtures_landed, what="fixture values in Blynk")
            await wait_until(fleet_landed, what="fleet values in Blynk")

            kit = await blynk_get(http, urls["fra1"], "eui-70b3d52dd600035a",
                                  ["V1", "V2", "V3", "V4", "V5", "V6", "V7"])
            assert kit == {"v1": 3.4, "v2": 21.5, "v3": 1, "v4": 16, "v5": 1, "v6": -31,
                           "v7": 9.5}
            dev1 = await blynk_get(http, urls["fra1"], "dev1", ["V8", "V9"])
            # Event-time order: the older uplink (occupied=true), read second, must not win.
            assert dev1 == {"v8": 0, "v9": "parking status"}

            async def dead_lettered() -> bool:
                return bool(await redis.xlen(ctx.keys.dead))

            await wait_until(dead_lettered, what="the invalid fixture in the dead stream")
            dead = [events.decode_dead(f[events.FIELD]) for _, f in
                    await redis.xrange(ctx.keys.dead)]
            assert [d.reason for d in dead] == ["invalid_json"]
            assert dead[0].raw.startswith(b"{")


async def test_sigterm_drains_without_loss(prefix: str, redis: Redis, tmp_path: Path) -> None:
    """``blynk-bridge run`` stops on SIGTERM with exit 0; a restart finishes what was left."""
    app_id = f"e2e-{secrets.token_hex(4)}"
    emu = emulator()
    async with emu.serve() as urls:
        # Small batches, so a stop leaves entries unread as well as in flight.
        cfg = bridge_config(urls["fra1"], prefix, app_id, batch=10)
        path = tmp_path / "bridge.yaml"
        path.write_text(_yaml_of(cfg))
        ctx = Context.create(cfg)
        try:
            # A backlog already in Redis, as after an outage: uplinks over the fleet devices.
            uplinks = []
            for n in range(BACKLOG):
                device = FLEET_DEVICES[n % len(FLEET_DEVICES)]
                uplinks.append(events.Uplink(
                    event_id=f"sig-{n}", source="tts", integration="kit", device=device,
                    event_ts_ms=1_700_000_000_000 + n, received_ts_ms=int(time.time() * 1000),
                    values={"battery": n}))
            await ctx.writer.add_many(
                [(ctx.keys.stream("uplinks"), events.encode(u)) for u in uplinks])

            async def run_once(stop_after_first_write: bool) -> int:
                log = (tmp_path / "bridge.log").open("ab")
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "blynk_bridge", "run", "-c", str(path),
                    "--skip", "ingest-http", "--skip", "monitor",
                    env=os.environ | {"PYTHONPATH": str(Path.cwd())}, stderr=log)
                try:
                    return await _drive(proc, stop_after_first_write)
                except BaseException:
                    print((tmp_path / "bridge.log").read_text()[-5000:])  # shown on failure
                    raise
                finally:
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
                    log.close()

            async def _drive(proc: asyncio.subprocess.Process, stop_after_first_write: bool) -> int:
                async def consuming() -> bool:
                    stream = ctx.keys.stream("writes")
                    if not await redis.exists(stream):
                        return False
                    names = [c["name"] for c in await redis.xinfo_consumers(stream, "egress")]
                    return any(n.endswith(f"-{proc.pid}".encode()) for n in names)

                await wait_until(consuming, what="the bridge process to consume")
                if stop_after_first_write:
                    start = emu.org_messages

                    async def some_written() -> bool:
                        return emu.org_messages > start

                    await wait_until(some_written, what="first Blynk writes")
                else:
                    async def all_written() -> bool:
                        return all(_last_battery(emu, d) == _expected_last(d)
                                   for d in FLEET_DEVICES)

                    await wait_until(all_written, what="every device's newest value")
                proc.send_signal(signal.SIGTERM)
                return await within(proc.wait(), timeout_s=40)

            assert await run_once(stop_after_first_write=True) == 0
            # The stop really left work behind (else this test would prove nothing).
            left = sum(int(g["lag"] or 0) + int(g["pending"])
                       for g in await redis.xinfo_groups(ctx.keys.stream("uplinks")))
            assert left > 0
            # Whatever the first run had not finished is still in Redis: pending or unread.
            assert await run_once(stop_after_first_write=False) == 0
            for group in await redis.xinfo_groups(ctx.keys.stream("uplinks")):
                assert group["pending"] == 0
            assert await redis.xlen(ctx.keys.dead) == 0
        finally:
            await ctx.close()


def _expected_last(device: str) -> int:
    return max(n for n in range(BACKLOG) if FLEET_DEVICES[n % len(FLEET_DEVICES)] == device)


def _last_battery(emu: BlynkEmulator, device: str) -> Any:
    return emu.device_by_token(token_for(device)).value("V12")


def _yaml_of(cfg: config_mod.Config) -> str:
    """A configuration as a file for a subprocess (JSON is YAML)."""
    return json.dumps(msgspec.to_builtins(cfg, enc_hook=str))
