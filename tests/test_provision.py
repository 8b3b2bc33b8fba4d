"""Auto-provisioning against the real Redis and the Blynk emulator's platform API over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from emulators.blynk import (
    BlynkEmulator,
    DatastreamSpec,
    EmulatorSpec,
    MetafieldSpec,
    OAuthClient,
    TemplateSpec,
)
from pipeline import config as config_mod
from pipeline import events
from pipeline.blynk.platform import PlatformClient
from pipeline.context import Context
from pipeline.errors import Retryable
from pipeline.events import Uplink
from pipeline.keys import GROUP_TRANSFORM, Keys
from pipeline.provision import device_name
from pipeline.streams import Redis, StreamWriter
from workers.transform import TransformStage

TEMPLATE = "TMPLbutton01"
META = 3


def emulator() -> BlynkEmulator:
    return BlynkEmulator.from_spec(EmulatorSpec(
        regions={"fra1": 0},
        oauth_clients=[OAuthClient(client_id="bridge", client_secret="s3cret")],
        templates=[TemplateSpec(
            id=TEMPLATE, name="Button",
            datastreams=[DatastreamSpec(id=1, pin="V1", name="pressEvent", type="integer")],
            metafields=[MetafieldSpec(id=1, name="Device Name"),
                        MetafieldSpec(id=META, name="TheThingsNetwork Device")],
        )],
    ))


@pytest.fixture
async def blynk() -> AsyncIterator[tuple[BlynkEmulator, str]]:
    emu = emulator()
    async with emu.serve({"fra1": 0}) as urls:
        yield emu, urls["fra1"]


def make_config(prefix: str, url: str, template_id: str = TEMPLATE, batch: int = 5,
                provision: bool = True) -> config_mod.Config:
    text = f"""
redis: {{prefix: '{prefix}'}}
streams: {{batch: {batch}, block_ms: 100}}
blynk:
  servers: {{fra1: "{url}"}}
  default_server: fra1
  platform: {{url: "{url}", client_id: bridge, client_secret: s3cret}}
templates:
  - name: button
    id: {template_id}
    datastreams: [{{name: pressEvent, pin: V1, type: integer}}]
tts:
  - {{name: app, app_id: starter-kit, template: button, provision: {str(provision).lower()}}}
"""
    return config_mod.parse(text, "yaml", "test.yaml", env={})


def uplink(i: int, device: str = "eui-70b3d52dd600035a") -> Uplink:
    return Uplink(event_id=f"as:up:{i}", source="tts", integration="app", device=device,
                  event_ts_ms=1_000 + i, received_ts_ms=2_000 + i, values={"pressEvent": i})


async def fill(redis: Redis, keys: Keys, uplinks: list[Uplink]) -> None:
    async with redis.pipeline(transaction=False) as pipe:
        for u in uplinks:
            pipe.xadd(keys.stream("uplinks"), {events.FIELD: events.encode(u)})
        await pipe.execute()


async def stage_for(cfg: config_mod.Config, redis: Redis, keys: Keys, name: str,
                    platform: PlatformClient) -> TransformStage:
    ctx = Context(config=cfg, redis=redis, keys=keys, consumer=name, writer=StreamWriter(redis))
    stage = TransformStage(ctx, until_idle=True, platform=platform)
    await stage.startup()
    return stage


async def written(redis: Redis, keys: Keys) -> list[events.BlynkWrite]:
    return [events.decode_write(f[events.FIELD])
            for _, f in await redis.xrange(keys.stream("writes"))]


async def test_fifty_concurrent_first_uplinks_create_one_device(
        redis: Redis, keys: Keys, prefix: str, blynk: tuple[BlynkEmulator, str]) -> None:
    emu, url = blynk
    # Slow creation down so the three stages surely overlap while the device is being created.
    emu.faults.set(latency_ms=200, path_prefix="/api/v1/organization/device/create")
    cfg = make_config(prefix, url)
    await fill(redis, keys, [uplink(i) for i in range(50)])
    clients = [PlatformClient(cfg.blynk.platform) for _ in range(3)]  # type: ignore[arg-type]
    stages = [await stage_for(cfg, redis, keys, f"w{i}", c) for i, c in enumerate(clients)]
    try:
        await asyncio.gather(*(s.main_loop(asyncio.Event()) for s in stages))
    finally:
        for s in stages:
            await s.shutdown()
        for c in clients:
            await c.close()
    created = [d for d in emu.model.devices.values() if d.template.id == TEMPLATE]
    assert len(created) == 1
    dev = created[0]
    assert dev.name == "eui-70b3d52dd600035a"
    assert dev.metafields[META] == "eui-70b3d52dd600035a"
    writes = await written(redis, keys)
    assert sorted(w.pins["V1"] for w in writes) == list(range(50))  # type: ignore[type-var]
    assert {w.token for w in writes} == {dev.token}
    assert {w.server for w in writes} == {url}
    info = await redis.xpending(keys.stream("uplinks"), GROUP_TRANSFORM)
    assert info["pending"] == 0
    row = await redis.hgetall(keys.device("tts", "app", "eui-70b3d52dd600035a"))
    assert row[b"id"] == str(dev.id).encode() and b"meta_pending" not in row
    assert await redis.xlen(keys.dead) == 0


async def test_platform_outage_keeps_uplinks_pending(
        redis: Redis, keys: Keys, prefix: str, blynk: tuple[BlynkEmulator, str]) -> None:
    emu, url = blynk
    cfg = make_config(prefix, url, batch=10)
    await fill(redis, keys, [uplink(i, device="dev-2") for i in range(3)])
    client = PlatformClient(cfg.blynk.platform)  # type: ignore[arg-type]
    stage = await stage_for(cfg, redis, keys, "w", client)
    try:
        emu.faults.set(outage_s=600, path_prefix="/api/v1/organization/device")
        entries = await stage.reader.read(block=False)
        with pytest.raises(Retryable):
            await stage.handle(entries)
        info = await redis.xpending(keys.stream("uplinks"), GROUP_TRANSFORM)
        assert info["pending"] == 3 and await written(redis, keys) == []
        emu.faults.clear()
        stage.reader.retry_pending()
        await stage.main_loop(asyncio.Event())
    finally:
        await stage.shutdown()
        await client.close()
    assert len(await written(redis, keys)) == 3
    assert len([d for d in emu.model.devices.values() if d.name == "dev-2"]) == 1


@pytest.mark.parametrize(("template_id", "provision", "reason"), [
    ("TMPLnope", True, "provision_failed"),
    (TEMPLATE, False, "unknown_device"),
])
async def test_devices_that_cannot_be_created_are_dead_lettered(
        redis: Redis, keys: Keys, prefix: str, blynk: tuple[BlynkEmulator, str],
        template_id: str, provision: bool, reason: str) -> None:
    emu, url = blynk
    cfg = make_config(prefix, url, template_id=template_id, provision=provision)
    await fill(redis, keys, [uplink(1, device="dev-3")])
    client = PlatformClient(cfg.blynk.platform)  # type: ignore[arg-type]
    stage = await stage_for(cfg, redis, keys, "w", client)
    try:
        await stage.main_loop(asyncio.Event())
    finally:
        await stage.shutdown()
        await client.close()
    [raw] = await redis.xrange(keys.dead)
    dead = events.decode_dead(raw[1][events.FIELD])
    assert dead.reason == reason and "dev-3" in dead.detail
    assert emu.model.devices == {}


def test_device_names_are_blynk_valid() -> None:
    assert device_name("eui-70b3d52dd600035a") == "eui-70b3d52dd600035a"
    assert device_name("a.b:c/d") == "a-b-c-d"
    assert len(device_name("x" * 80)) == 50


async def test_pulled_datastreams(redis: Redis, keys: Keys, prefix: str,
                                  blynk: tuple[BlynkEmulator, str]) -> None:
    _, url = blynk
    cfg = make_config(prefix, url)
    data: dict[str, Any] = {"name": "button", "id": TEMPLATE, "pull": True}
    cfg.templates[0] = config_mod.TemplateConfig(**data)
    client = PlatformClient(cfg.blynk.platform)  # type: ignore[arg-type]
    stage = await stage_for(cfg, redis, keys, "w", client)
    try:
        t = stage.templates.by_name["button"]
        assert t.by_pin["V1"].name == "pressEvent" and t.by_pin["V1"].type == "integer"
    finally:
        await stage.shutdown()
        await client.close()
