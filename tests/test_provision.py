"""Auto-provisioning against the real Redis and the Blynk emulator's platform API over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from emulators.blynk import BlynkEmulator, DatastreamSpec, MetafieldSpec, TemplateSpec
from pipeline import config as config_mod
from pipeline import events
from pipeline.blynk.platform import PlatformClient
from pipeline.context import Context
from pipeline.errors import Retryable
from pipeline.events import Uplink
from pipeline.keys import GROUP_TRANSFORM, Keys
from pipeline.provision import device_name
from pipeline.streams import Redis, StreamWriter
from tests.rig import add_uplinks, blynk_spec, parse_config, serve_blynk
from tests.rig import writes as written
from tests.wait import wait_until
from workers.transform import TransformStage

TEMPLATE = "TMPLbutton01"
META = 3


@pytest.fixture
async def blynk() -> AsyncIterator[tuple[BlynkEmulator, str]]:
    async with serve_blynk(blynk_spec([TemplateSpec(
            id=TEMPLATE, name="Button",
            datastreams=[DatastreamSpec(id=1, pin="V1", name="pressEvent", type="integer")],
            metafields=[MetafieldSpec(id=1, name="Device Name"),
                        MetafieldSpec(id=META, name="TheThingsNetwork Device")])],
            oauth=True, device_rps=50)) as served:
        yield served


def make_config(prefix: str, url: str, template_id: str = TEMPLATE, batch: int = 5,
                provision: bool = True, limits: str = "",
                streams: str = "") -> config_mod.Config:
    text = f"""
redis: {{prefix: '{prefix}'}}
streams: {{batch: {batch}, block_ms: 100{streams}}}
blynk:
  servers: {{fra1: "{url}"}}
  default_server: fra1
  platform: {{url: "{url}", client_id: bridge, client_secret: s3cret}}
templates:
  - name: button
    id: {template_id}
    datastreams: [{{name: pressEvent, pin: V1, type: integer}}]
tts:
  - {{name: app, app_id: starter-kit, template: button,
      provision: {str(provision).lower()}{limits}}}
"""
    return parse_config(text)


def uplink(i: int, device: str = "eui-70b3d52dd600035a") -> Uplink:
    return Uplink(event_id=f"as:up:{i}", source="tts", integration="app", device=device,
                  event_ts_ms=1_000 + i, received_ts_ms=2_000 + i, values={"pressEvent": i})


async def stage_for(cfg: config_mod.Config, redis: Redis, keys: Keys, name: str,
                    platform: PlatformClient) -> TransformStage:
    ctx = Context(config=cfg, redis=redis, keys=keys, consumer=name, writer=StreamWriter(redis))
    stage = TransformStage(ctx, until_idle=True, platform=platform)
    await stage.startup()
    return stage


async def run_stages(cfg: config_mod.Config, redis: Redis, keys: Keys, n: int = 1) -> None:
    """Run ``n`` transform stages (replicas, each with its own platform client) until idle."""
    clients = [PlatformClient(cfg.blynk.platform) for _ in range(n)]  # type: ignore[arg-type]
    stages = [await stage_for(cfg, redis, keys, f"w{i}", c) for i, c in enumerate(clients)]
    try:
        await asyncio.gather(*(s.main_loop(asyncio.Event()) for s in stages))
    finally:
        for s in stages:
            await s.shutdown()
        for c in clients:
            await c.close()


async def test_fifty_concurrent_first_uplinks_create_one_device(
        redis: Redis, keys: Keys, prefix: str, blynk: tuple[BlynkEmulator, str]) -> None:
    emu, url = blynk
    # Slow creation down so the three stages surely overlap while the device is being created.
    emu.faults.set(latency_ms=200, path_prefix="/api/v1/organization/device/create")
    cfg = make_config(prefix, url)
    await add_uplinks(redis, keys, [uplink(i) for i in range(50)])
    await run_stages(cfg, redis, keys, 3)
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
    await add_uplinks(redis, keys, [uplink(i, device="dev-2") for i in range(3)])
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
    await add_uplinks(redis, keys, [uplink(1, device="dev-3")])
    await run_stages(cfg, redis, keys)
    [raw] = await redis.xrange(keys.dead)
    dead = events.decode_dead(raw[1][events.FIELD])
    assert dead.reason == reason and "dev-3" in dead.detail
    assert emu.model.devices == {}


def test_device_names_are_blynk_valid_and_distinct() -> None:
    import re

    assert device_name("eui-70b3d52dd600035a") == "eui-70b3d52dd600035a"
    ids = ["a.b", "a:b", "a-b", "a/b", "x" * 80, "x" * 81, " lead", "lead", "é", "", "°"]
    names = [device_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    assert names == [device_name(i) for i in ids]  # deterministic
    assert all(re.fullmatch(r"[A-Za-z0-9 '_-]{1,50}", n) for n in names), names
    assert names[0].startswith("a-b-") and names[2] == "a-b"


async def test_ids_that_read_the_same_once_cleaned_make_distinct_blynk_devices(
        redis: Redis, keys: Keys, prefix: str, blynk: tuple[BlynkEmulator, str]) -> None:
    emu, url = blynk
    cfg = make_config(prefix, url)
    await add_uplinks(redis, keys, [uplink(1, device="node.1"), uplink(2, device="node:1"),
                             uplink(3, device="node-1")])
    await run_stages(cfg, redis, keys)
    names = sorted(d.name for d in emu.model.devices.values())
    assert len(names) == 3 and len(set(names)) == 3 and "node-1" in names
    assert len({w.token for w in await written(redis, keys)}) == 3


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


# Issue 10, item 6: auto-provisioning is capped per integration, across replicas.


def _sample(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_provision_max_caps_devices_and_dead_letters_the_rest(
        redis: Redis, keys: Keys, prefix: str, blynk: tuple[BlynkEmulator, str]) -> None:
    emu, url = blynk
    cfg = make_config(prefix, url, batch=50,
                      limits=", provision_max: 5, provision_rate: 1000, provision_burst: 1000")
    before = _sample("bb_dead_letters_total", stage="transform", reason="provision_limit")
    await add_uplinks(redis, keys, [uplink(i, device=f"core{i:03d}") for i in range(100)])
    await run_stages(cfg, redis, keys, 2)
    assert len(emu.model.devices) == 5
    assert len(await written(redis, keys)) == 5
    dead = [events.decode_dead(f[events.FIELD]) for _, f in await redis.xrange(keys.dead)]
    assert len(dead) == 95 and {d.reason for d in dead} == {"provision_limit"}
    assert "provision_max of 5" in dead[0].detail
    assert _sample("bb_dead_letters_total", stage="transform",
                   reason="provision_limit") - before == 95
    assert (await redis.xpending(keys.stream("uplinks"), GROUP_TRANSFORM))["pending"] == 0


async def test_provision_rate_holds_across_replicas_and_the_rest_waits_uncounted(
        redis: Redis, keys: Keys, prefix: str, blynk: tuple[BlynkEmulator, str]) -> None:
    emu, url = blynk
    cfg = make_config(prefix, url, batch=10,
                      limits=", provision_rate: 0.001, provision_burst: 4")
    await add_uplinks(redis, keys, [uplink(i, device=f"core{i:03d}") for i in range(40)])
    await run_stages(cfg, redis, keys, 2)
    assert len(emu.model.devices) == 4  # the burst, shared by both replicas
    assert len(await written(redis, keys)) == 4
    assert await redis.xlen(keys.dead) == 0
    rows = await redis.xpending_range(keys.stream("uplinks"), GROUP_TRANSFORM, min="-",
                                      max="+", count=100)
    assert len(rows) == 36
    assert {r["times_delivered"] for r in rows} == {0}  # waiting is not a failed delivery


async def test_uplinks_waiting_for_the_rate_are_written_once_it_allows(
        redis: Redis, keys: Keys, prefix: str, blynk: tuple[BlynkEmulator, str]) -> None:
    emu, url = blynk
    cfg = make_config(prefix, url, batch=10, streams=", claim_idle_ms: 200",
                      limits=", provision_rate: 20, provision_burst: 2")
    await add_uplinks(redis, keys, [uplink(i, device=f"core{i:03d}") for i in range(10)])
    client = PlatformClient(cfg.blynk.platform)  # type: ignore[arg-type]
    stage = await stage_for(cfg, redis, keys, "w", client)
    stage.until_idle = False
    stop = asyncio.Event()
    task = asyncio.create_task(stage.main_loop(stop))
    try:
        async def all_written() -> bool:
            return len(await written(redis, keys)) == 10

        await wait_until(all_written, 30, "every uplink written")
    finally:
        stop.set()
        await task
        await stage.shutdown()
        await client.close()
    assert len(emu.model.devices) == 10
    assert await redis.xlen(keys.dead) == 0
    assert (await redis.xpending(keys.stream("uplinks"), GROUP_TRANSFORM))["pending"] == 0


async def test_no_device_is_created_for_uplinks_that_map_nothing(
        redis: Redis, keys: Keys, prefix: str, blynk: tuple[BlynkEmulator, str]) -> None:
    emu, url = blynk
    cfg = make_config(prefix, url)
    junk = [Uplink(event_id=f"j{i}", source="tts", integration="app", device=f"junk{i}",
                   event_ts_ms=1, received_ts_ms=2, values={"nope": i},
                   radio=events.Radio(rssi=-40, snr=5.0)) for i in range(3)]
    await add_uplinks(redis, keys, [*junk, uplink(1, device="real")])
    await run_stages(cfg, redis, keys)
    assert [d.name for d in emu.model.devices.values()] == ["real"]
    assert await redis.xlen(keys.dead) == 0
    assert (await redis.xpending(keys.stream("uplinks"), GROUP_TRANSFORM))["pending"] == 0
    assert await redis.hgetall(keys.unmapped("button")) == {b"nope": b"3"}


async def test_uplinks_left_waiting_leave_only_their_claims_in_the_owners_memory(
        redis: Redis, keys: Keys, prefix: str, blynk: tuple[BlynkEmulator, str]) -> None:
    _, url = blynk
    cfg = make_config(prefix, url, batch=10,
                      limits=", provision_rate: 0.001, provision_burst: 1")
    await add_uplinks(redis, keys, [uplink(i, device=f"core{i:03d}") for i in range(5)])
    client = PlatformClient(cfg.blynk.platform)  # type: ignore[arg-type]
    stage = await stage_for(cfg, redis, keys, "w", client)
    stage.keep_partitions = True
    try:
        await stage.main_loop(asyncio.Event())
        assert len(await written(redis, keys)) == 1  # the others wait for the rate
        part = stage.owned[0]
        # Each waiting uplink's claim stays in the window (its redelivery is its own), and
        # nothing else of the batch: whatever later acks it (the fast path once its device
        # exists, max_deliveries) would otherwise leave it behind for good.
        assert part.unsaved == {}
        assert len(part.window) == 5
    finally:
        stage.keep_partitions = False
        await stage.shutdown()
        await client.close()
