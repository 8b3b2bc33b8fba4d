"""Downlinks to Particle: a Blynk webhook becomes a function call on the Particle emulator over
real HTTP; offline devices are retried (newest value only) until the TTL, then dead-lettered;
a refused token makes the integration Broken; the return value is written back to Blynk.

On one Redis and on the local Redis Cluster (``cluster_too``; three partitions there: the
return value goes on the device's writes stream in the commit of its record)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import pytest
from redis.asyncio.cluster import RedisCluster

from emulators.particle import Device, ParticleCloud
from pipeline import config as config_mod
from pipeline import events
from pipeline.context import Context
from pipeline.status import State, StatusBoard
from pipeline.streams import Redis, StreamWriter
from tests.conftest import REDIS_URL, serve_app
from tests.rig import BODY, PASSWORD
from tests.test_downlink import counted
from tests.wait import wait_until, within
from workers.downlink import DownlinkStage
from workers.ingest_http import IngestHttp

pytestmark = pytest.mark.cluster_too

CORE = "e00fce68aaaabbbbccccdddd"
TOKEN = "particleblynktokenparticleblynk1"


@dataclass
class Rig:
    ctx: Context
    cloud: ParticleCloud
    url: str
    http: aiohttp.ClientSession

    async def post(self, value: str, ts: int) -> int:
        cred = base64.b64encode(f"blynk:{PASSWORD}".encode()).decode()
        body = BODY.format(id=1, token=TOKEN, pin="v2", value=value, ts=ts, name="boron")
        async with self.http.post(f"{self.url}/blynk/app", data=body, headers={
                "Content-Type": "application/json", "Authorization": f"Basic {cred}"}) as r:
            return r.status

    async def dead(self) -> list[events.DeadLetter]:
        return [events.decode_dead(f[events.FIELD]) for key in self.ctx.keys.dead_streams()
                for _, f in await self.ctx.redis.xrange(key)]


@asynccontextmanager
async def rig(redis: Redis, prefix: str, *, token: str = "particle-token", ttl_s: int = 600
              ) -> AsyncIterator[Rig]:
    cloud = ParticleCloud([Device(CORE, functions={"led": lambda arg: 10 + int(arg[-1])})])
    cluster = isinstance(redis, RedisCluster)
    async with serve_app(cloud.app) as api_url:
        cfg = config_mod.parse(f"""
redis: {{url: "{REDIS_URL}", prefix: "{prefix}", cluster: {str(cluster).lower()},
         partitions: {3 if cluster else 1}}}
streams: {{block_ms: 50}}
templates:
  - name: board
    datastreams:
      - {{name: led, pin: V2, type: integer}}
      - {{name: led_state, pin: V5, type: integer}}
    downlink:
      particle: {{V2: {{function: led, arg: "{{name}}={{value}}", return_pin: V5}}}}
particle:
  - {{name: boards, api_url: "{api_url}", access_token: "{token}", template: board, auth: none}}
devices:
  - {{source: particle, integration: boards, device: {CORE}, token: {TOKEN}, template: board}}
blynk_webhooks:
  - {{name: app, auth: {{username: blynk, password: "{PASSWORD}"}}}}
downlink: {{ttl_s: {ttl_s}, max_backoff_s: 0.1}}
""", "yaml", "particle.yaml", env={})
        ctx = Context(config=cfg, redis=redis, keys=cfg.redis.keys(), consumer="p1",
                      writer=StreamWriter(redis))
        ingest = IngestHttp(ctx)
        url = await ingest.serve("127.0.0.1", 0)
        stage = DownlinkStage(ctx)
        await stage.startup()
        stop = asyncio.Event()
        task = asyncio.create_task(stage.main_loop(stop))
        try:
            async with aiohttp.ClientSession() as http:
                yield Rig(ctx, cloud, url, http)
        finally:
            stop.set()
            await within(task)
            await stage.shutdown()
            await ingest.shutdown()


async def _written(r: Rig, pins: dict[str, object]) -> bool:
    rows = [f for s in r.ctx.keys.streams("writes") for _, f in await r.ctx.redis.xrange(s)]
    return pins in [events.decode_write(f).pins for f in (row[events.FIELD] for row in rows)]


async def test_function_called_and_return_value_written_back(redis: Redis, prefix: str) -> None:
    async with rig(redis, prefix) as r:
        assert await r.post("1", int(time.time() * 1000)) == 200
        calls = await r.cloud.wait_for_calls(1)
        assert (calls[0].device, calls[0].function, calls[0].arg) == (CORE, "led", "led=1")
        await wait_until(lambda: _written(r, {"V5": 11}), what="return_value written to V5")


async def test_offline_device_gets_only_the_newest_value_once_back(
        redis: Redis, prefix: str) -> None:
    async with rig(redis, prefix) as r:
        r.cloud.devices[CORE].online = False
        ts = int(time.time() * 1000)
        superseded = counted("superseded", "boards")
        retried = counted("retried", "boards")
        assert await r.post("1", ts) == 200
        await wait_until(lambda: counted("retried", "boards") > retried, what="a retry")
        for i in range(2, 6):
            assert await r.post(str(i), ts + i) == 200
        await wait_until(lambda: counted("superseded", "boards") - superseded == 4,
                         what="older values superseded")
        r.cloud.devices[CORE].online = True
        await wait_until(lambda: any(c.status == 200 for c in r.cloud.calls), what="delivered")
        assert [c.arg for c in r.cloud.calls if c.status == 200] == ["led=5"]


async def test_offline_past_the_ttl_is_a_dead_letter(redis: Redis, prefix: str) -> None:
    async with rig(redis, prefix, ttl_s=1) as r:
        r.cloud.devices[CORE].online = False
        assert await r.post("1", int(time.time() * 1000)) == 200
        await wait_until(lambda: _has_dead(r), what="dead-lettered")
        (dead,) = await r.dead()
        assert dead.reason == "device_offline"
        assert all(c.status == 408 for c in r.cloud.calls)


async def _has_dead(r: Rig) -> bool:
    return bool(await r.dead())


async def test_refused_token_makes_the_integration_broken(redis: Redis, prefix: str) -> None:
    async with rig(redis, prefix, token="wrong") as r:
        board = StatusBoard(redis, r.ctx.keys)
        await board.connected("particle", "boards")
        assert await r.post("1", int(time.time() * 1000)) == 200

        async def broken() -> bool:
            s = await board.get("particle", "boards")
            return s is not None and s.state is State.BROKEN and s.error_kind == "credentials"

        await wait_until(broken, what="Broken with the reason")
