"""Broken devices (issue 10, item 1): only a refusal of the token *stored* for a device breaks it;
uplinks carrying their own token are keyed apart; broken devices are retried after
``egress.broken_retry_s``. End to end: ingest-http → transform → egress → the Blynk emulator, on
the real Redis, over real HTTP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from prometheus_client import REGISTRY

from emulators.blynk.server import BlynkEmulator
from pipeline import config as config_mod
from pipeline.context import Context
from pipeline.events import FIELD, decode_dead, decode_write
from pipeline.keys import Keys
from pipeline.registry import Registry
from pipeline.streams import Redis, StreamWriter
from tests.conftest import REDIS_URL
from tests.test_egress import Rig, emulator_spec, token, write
from tests.wait import wait_until, within
from workers.egress import EgressStage
from workers.ingest_http import build as build_ingest
from workers.transform import TransformStage

COREID = "e00fce68aaaabbbbccccdddd"
KEY = f"particle:prod:{COREID}"
WRONG = "A" * 32


def config(prefix: str, blynk_url: str, **egress: Any) -> config_mod.Config:
    text = f"""
redis: {{url: "{REDIS_URL}", prefix: "{prefix}"}}
streams: {{block_ms: 100}}
blynk: {{servers: {{fra1: "{blynk_url}"}}, default_server: fra1}}
templates:
  - name: sensor
    datastreams:
      - {{name: temperature, pin: V1, type: double}}
particle:
  - {{name: prod, template: sensor, auth: none}}
devices:
  - {{source: particle, integration: prod, device: {COREID}, token: {token(0)},
     template: sensor}}
egress: {json.dumps({"flush_age_ms": 10, **egress})}
"""
    return config_mod.parse(text, "yaml", "broken.yaml", env={})


class Bridge:
    """ingest-http serving; transform and egress run in burst mode on demand."""

    def __init__(self, ctx: Context, url: str, emu: BlynkEmulator) -> None:
        self.ctx, self.url, self.emu = ctx, url, emu

    async def post(self, published_at: str, data: dict[str, Any]) -> None:
        body = {"event": "reading", "data": json.dumps(data), "coreid": COREID,
                "published_at": published_at}
        async with aiohttp.ClientSession() as s, s.post(f"{self.url}/particle/prod",
                                                        json=body) as resp:
            assert resp.status == 200, await resp.text()

    async def deliver(self) -> None:
        """Transform, then egress, each until it has nothing left."""
        for stage in (TransformStage(self.ctx, until_idle=True),
                      EgressStage(self.ctx, until_idle=True)):
            await stage.startup()
            await within(stage.main_loop(asyncio.Event()))
            await stage.shutdown()

    async def dead_reasons(self) -> list[str]:
        rows = await self.ctx.redis.xrange(self.ctx.keys.dead)
        return [decode_dead(f[FIELD]).reason for _, f in rows]

    def value(self) -> Any:
        got = self.emu.device_by_token(token(0)).values.get("V1")
        return None if got is None else got[0]


@pytest.fixture
async def bridge(redis: Redis, keys: Keys, prefix: str) -> AsyncIterator[Bridge]:
    emu = BlynkEmulator.from_spec(emulator_spec(devices=1))
    async with emu.serve({"fra1": 0}) as urls:
        ctx = Context(config=config(prefix, urls["fra1"]), redis=redis, keys=keys,
                      consumer="b1", writer=StreamWriter(redis))
        ingest = build_ingest(ctx)
        base = await ingest.serve("127.0.0.1", 0)
        try:
            yield Bridge(ctx, base, emu)
        finally:
            await ingest.shutdown()
            await ctx.blynk().close()
            await ctx.writer.close()


async def test_a_wrong_token_in_the_body_does_not_break_the_registered_device(
    bridge: Bridge,
) -> None:
    await bridge.post("2024-05-13T10:55:40.000Z", {"t": WRONG, "temperature": 1.5})
    await bridge.deliver()
    assert await bridge.dead_reasons() == ["invalid_token"]  # that uplink: refused, visibly
    row = await Registry(bridge.ctx.redis, bridge.ctx.keys).get(KEY)
    assert row is not None and not row.broken
    # the device's next genuine uplinks are written, not dead-lettered `device_broken`
    await bridge.post("2024-05-13T10:55:41.000Z", {"temperature": 2.5})
    await bridge.deliver()
    assert bridge.value() == 2.5
    assert await bridge.dead_reasons() == ["invalid_token"]


async def test_token_carrying_writes_are_keyed_apart_from_the_registry_row(
    bridge: Bridge,
) -> None:
    await bridge.post("2024-05-13T10:55:40.000Z", {"t": WRONG, "temperature": 1.5})
    stage = TransformStage(bridge.ctx, until_idle=True)
    await stage.startup()
    await stage.main_loop(asyncio.Event())
    rows = await bridge.ctx.redis.xrange(bridge.ctx.keys.stream("writes"))
    [w] = [decode_write(f[FIELD]) for _, f in rows]
    assert w.token == WRONG
    assert w.device_key != KEY and w.device_key.startswith(KEY)
    assert WRONG not in w.device_key  # keys end up in logs and dead letters


async def test_the_stored_token_refused_breaks_the_device_and_a_retry_unbreaks_it(
    redis: Redis, keys: Keys, prefix: str,
) -> None:
    emu = BlynkEmulator.from_spec(emulator_spec(devices=1))
    registry = Registry(redis, keys)
    await registry.register(KEY, token=WRONG, template="sensor")  # a token Blynk does not know
    broken_before = counter("bb_devices_broken_total", reason="invalid_token")
    retried_before = counter("bb_devices_unbroken_total", by="retry")
    async with emu.serve({"fra1": 0}) as urls:
        ctx = Context(config=config(prefix, urls["fra1"], broken_retry_s=0.05), redis=redis,
                      keys=keys, consumer="b1", writer=StreamWriter(redis))
        rig = Rig(emu, urls["fra1"], redis, keys, prefix)
        await rig.add(msgspec.structs.replace(write(0, 1_700_000_000_000, {"V1": 1.0},
                                                    tok=WRONG), device_key=KEY))
        stage = EgressStage(ctx)
        await stage.startup()
        stop = asyncio.Event()
        loop = asyncio.create_task(stage.main_loop(stop))
        try:
            await wait_until(lambda: counter("bb_devices_unbroken_total", by="retry")
                             > retried_before, what="the device unbroken by the retry")
        finally:
            stop.set()
            await within(loop)
            await ctx.blynk().close()
    assert counter("bb_devices_broken_total", reason="invalid_token") == broken_before + 1
    assert counter("bb_devices_unbroken_total", by="retry") == retried_before + 1
    row = await registry.get(KEY)
    assert row is not None and not row.broken  # tried again with its next uplink
    assert [d.reason for d in await rig.dead()] == ["invalid_token"]


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0
