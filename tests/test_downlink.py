"""Downlinks end to end: Blynk webhook → ingest-http → Redis → downlink → TTS ``down/push`` on
the real Mosquitto (and a Particle function call on the Particle emulator), with the real Redis.

Each guarantee of DESIGN.md "Downlinks" has a test here: the exact body Blynk's integration
sends, 2xx only with the command in Redis, latest wins, duplicates removed, TTL, unknown
device/pin/type as dead letters, a killed worker's entries taken over, echo suppression, TTS
outcomes matched by correlation id.

Every test runs on one Redis and on the local Redis Cluster (``cluster_too``), there with three
partitions: a device's commands, echo records and last-sent times in its partition, the
downlinks stream partitioned by Blynk token — a batch's commit spans several slots.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY
from redis.asyncio.cluster import RedisCluster

from emulators.tts import DownlinkAnswerer
from pipeline import config as config_mod
from pipeline import events, mqtt
from pipeline.context import Context
from pipeline.keys import DOWNLINKS, GROUP_DOWNLINK, Keys
from pipeline.streams import Redis, StreamReader, StreamWriter
from tests import rig
from tests.conftest import MQTT_HOST, MQTT_PORT, REDIS_URL
from tests.rig import BODY, PASSWORD
from tests.wait import wait_until, within
from workers.downlink import DownlinkStage
from workers.ingest_http import IngestHttp

pytestmark = pytest.mark.cluster_too

DEVICES = ["dev-a", "dev-b"]
#: Partitions of the cluster runs (one Redis keeps the unpartitioned names).
CLUSTER_PARTITIONS = 3


def token_for(device: str) -> str:
    """Tokens whose partition (the downlinks stream's) is not their device's on the cluster:
    a batch read from one partition records what it sent in another."""
    return (device.replace("-", "") + "w" * 32)[:32]


def make_config(prefix: str, app_id: str, extra: str = "", ttl_s: int = 600,
                claim_idle_ms: int = 30_000,
                webhook_auth: str = f'{{username: blynk, password: "{PASSWORD}"}}',
                cluster: bool = False) -> config_mod.Config:
    devices = "\n".join(
        f"  - {{source: tts, integration: kit, device: {d}, token: {token_for(d)}, "
        "template: kit}" for d in DEVICES)
    text = f"""
redis: {{url: "{REDIS_URL}", prefix: "{prefix}", cluster: {str(cluster).lower()},
         partitions: {CLUSTER_PARTITIONS if cluster else 1}}}
streams: {{block_ms: 100, claim_idle_ms: {claim_idle_ms}}}
templates:
  - name: kit
    datastreams:
      - {{name: switch, pin: V2, type: integer, min: 0, max: 1}}
      - {{name: setpoint, pin: V3, type: double}}
      - {{name: label, pin: V4, type: string}}
      - {{name: outcome, pin: V9, type: integer}}
    downlink: {{outcome_pin: V9}}
tts:
  - name: kit
    app_id: {app_id}
    host: {MQTT_HOST}
    port: {MQTT_PORT}
    insecure: true
    api_key: NNSXS.DOWN
    template: kit
    downlink_f_port: 7
devices:
{devices}
blynk_webhooks:
  - {{name: app, auth: {webhook_auth}}}
downlink: {{ttl_s: {ttl_s}, max_backoff_s: 0.2}}
{extra}
"""
    return config_mod.parse(text, "yaml", "down.yaml", env={})


@dataclass
class Devices:
    """A subscriber standing in for the devices: every ``down/push`` body it receives."""

    app_id: str
    got: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    async def run(self, ready: asyncio.Event) -> None:
        settings = mqtt.Settings(host=MQTT_HOST, port=MQTT_PORT,
                                 client_id=f"devices-{secrets.token_hex(4)}")
        async with mqtt.Session(settings) as session:
            await session.subscribe([f"v3/{self.app_id}@ttn/devices/+/down/push"])
            ready.set()
            async for topic, payload in session.messages():
                self.got.append((topic.split("/")[3], json.loads(payload)))


@dataclass
class Bridge:
    ctx: Context
    url: str
    stage: DownlinkStage
    devices: Devices
    http: aiohttp.ClientSession

    async def post(self, device: str, pin: str, value: str, ts: int, *,
                   body: str | None = None, auth: bool = True,
                   content_type: str = "application/json") -> aiohttp.ClientResponse:
        data = body if body is not None else BODY.format(
            id=DEVICES.index(device) + 1 if device in DEVICES else 99, token=token_for(device),
            pin=pin, value=value, ts=ts, name=device)
        headers = {"Content-Type": content_type}
        if auth:
            cred = base64.b64encode(f"blynk:{PASSWORD}".encode()).decode()
            headers["Authorization"] = f"Basic {cred}"
        async with self.http.post(f"{self.url}/blynk/app", data=data.encode(),
                                  headers=headers) as resp:
            await resp.read()
            return resp

    async def dead(self) -> list[events.DeadLetter]:
        return [events.decode_dead(f[events.FIELD]) for key in self.ctx.keys.dead_streams()
                for _, f in await self.ctx.redis.xrange(key)]

    async def queued(self) -> int:
        """Entries on the downlinks stream (every partition)."""
        return sum([await self.ctx.redis.xlen(s) for s in self.ctx.keys.streams(DOWNLINKS)])


@asynccontextmanager
async def bridge(redis: Redis, prefix: str, *, start_stage: bool = True, consumer: str = "d1",
                 **kw: Any) -> AsyncIterator[Bridge]:
    app_id = f"down-{secrets.token_hex(4)}"
    cfg = make_config(prefix, app_id, cluster=isinstance(redis, RedisCluster), **kw)
    ctx = Context(config=cfg, redis=redis, keys=cfg.redis.keys(), consumer=consumer,
                  writer=StreamWriter(redis))
    ingest = IngestHttp(ctx)
    url = await ingest.serve("127.0.0.1", 0)
    devices = Devices(app_id)
    ready = asyncio.Event()
    dev_task = asyncio.create_task(devices.run(ready))
    await within(ready.wait())
    stage = DownlinkStage(ctx)
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    if start_stage:
        await stage.startup()
        task = asyncio.create_task(stage.main_loop(stop))
    try:
        async with aiohttp.ClientSession() as http:
            yield Bridge(ctx, url, stage, devices, http)
    finally:
        stop.set()
        if task is not None:
            await within(task)
            await stage.shutdown()
        dev_task.cancel()
        await asyncio.gather(dev_task, return_exceptions=True)
        await ingest.shutdown()


def counted(outcome: str, integration: str = "kit") -> float:
    return rig.counted(outcome, integration)


async def test_webhook_becomes_the_exact_tts_push(redis: Redis, prefix: str) -> None:
    async with bridge(redis, prefix) as b:
        keys = b.ctx.keys
        if keys.cluster:  # the entry's partition and the device's differ (token_for)
            assert (keys.partition_of("blynk", token_for("dev-a"))
                    != keys.partition_of_device_key("tts:kit:dev-a"))
        ts = int(time.time() * 1000)
        resp = await b.post("dev-a", "v2", "1", ts)
        assert resp.status == 200
        entry_id = resp.headers["X-Entry-Id"]
        # 2xx only once Redis has it
        stream = b.ctx.keys.stream_for(DOWNLINKS, "blynk", token_for("dev-a"))
        assert await redis.xrange(stream, min=entry_id, max=entry_id)
        await wait_until(lambda: b.devices.got, what="a down/push")
        device, body = b.devices.got[0]
        assert device == "dev-a"
        cid = resp.headers["X-Event-Id"]
        assert body == {"downlinks": [{
            "f_port": 7,
            "decoded_payload": {"name": "switch", "pin": "v2", "ts": ts, "value": 1},
            "priority": "NORMAL", "correlation_ids": [cid]}]}
        await wait_until(lambda: _acked(redis, b.ctx.keys), what="the entry acked")


async def _acked(redis: Redis, keys: Keys) -> bool:
    for stream in keys.streams(DOWNLINKS):
        info = await redis.xpending(stream, GROUP_DOWNLINK)
        if int(info["pending"]):
            return False
    return True


async def test_latest_wins_and_duplicates_and_stale_are_not_sent(
        redis: Redis, prefix: str) -> None:
    async with bridge(redis, prefix, start_stage=False) as b:
        ts = int(time.time() * 1000)
        # a slider dragged through 40 positions while no worker runs, one webhook repeated
        for i in range(40):
            assert (await b.post("dev-a", "v3", f"{i}.5", ts + i)).status == 200
        assert (await b.post("dev-a", "v3", "39.5", ts + 39)).status == 200
        assert (await b.post("dev-b", "v2", "0", ts)).status == 200
        superseded = counted("superseded")
        await b.stage.startup()
        stop = asyncio.Event()
        task = asyncio.create_task(b.stage.main_loop(stop))
        try:
            await wait_until(lambda: len(b.devices.got) >= 2, what="two pushes")
            await wait_until(lambda: _acked(redis, b.ctx.keys), what="everything acked")
            values = {(d, json.dumps(body["downlinks"][0]["decoded_payload"]["value"]))
                      for d, body in b.devices.got}
            assert values == {("dev-a", "39.5"), ("dev-b", "0")}
            assert len(b.devices.got) == 2
            assert counted("superseded") - superseded == 40
            # older than what was sent, and the same command again: neither is sent
            stale, dup = counted("stale"), counted("duplicate")
            assert (await b.post("dev-a", "v3", "3.5", ts + 3)).status == 200
            assert (await b.post("dev-a", "v3", "39.5", ts + 39)).status == 200
            await wait_until(lambda: counted("stale") - stale == 1, what="the stale one counted")
            await wait_until(lambda: counted("duplicate") - dup == 1, what="the repeat counted")
            assert len(b.devices.got) == 2
        finally:
            stop.set()
            await task
            await b.stage.shutdown()


async def test_bad_commands_are_dead_letters_with_a_reason(redis: Redis, prefix: str) -> None:
    async with bridge(redis, prefix, ttl_s=60) as b:
        now = int(time.time() * 1000)
        assert (await b.post("stranger", "v2", "1", now)).status == 200
        assert (await b.post("dev-a", "v7", "1", now)).status == 200
        assert (await b.post("dev-a", "v2", "on", now)).status == 200
        assert (await b.post("dev-a", "v2", "1", now - 61_000)).status == 200
        await wait_until(lambda: _dead_count(b, 4), what="four dead letters")
        reasons = sorted(d.reason for d in await b.dead())
        assert reasons == ["expired", "type_mismatch", "unknown_device", "unknown_pin"]
        assert b.devices.got == []


async def _dead_count(b: Bridge, n: int) -> bool:
    return len(await b.dead()) >= n


async def test_a_header_secret_authenticates_a_blynk_webhook(redis: Redis, prefix: str) -> None:
    """Blynk's webhook form takes custom headers: a shared secret there works like Basic auth
    (compared in constant time by the same authenticator), a wrong or missing one is 401."""
    secret = "s3cret-" + secrets.token_hex(8)
    async with bridge(redis, prefix, webhook_auth=f'{{header: X-Bridge-Secret, secret: "{secret}"}}'
                      ) as b:
        now = int(time.time() * 1000)
        body = BODY.format(id=1, token=token_for("dev-a"), pin="v2", value="1", ts=now,
                           name="dev-a").encode()
        for given in (None, "wrong-" + secret, secret[:-1]):
            headers = {"Content-Type": "application/json"}
            if given is not None:
                headers["X-Bridge-Secret"] = given
            async with b.http.post(f"{b.url}/blynk/app", data=body, headers=headers) as resp:
                assert resp.status == 401, given
        assert await b.queued() == 0
        async with b.http.post(f"{b.url}/blynk/app", data=body, headers={
                "Content-Type": "application/json", "X-Bridge-Secret": secret}) as resp:
            assert resp.status == 200
        await wait_until(lambda: b.devices.got, what="the command sent down")
        (device, sent), = b.devices.got
        assert device == "dev-a" and sent["downlinks"][0]["decoded_payload"]["value"] == 1


async def test_receiver_refuses_bodies_blynk_did_not_fill(redis: Redis, prefix: str) -> None:
    async with bridge(redis, prefix, start_stage=False) as b:
        now = int(time.time() * 1000)
        r = await b.post("dev-a", "v2", "1", now, auth=False)
        assert r.status == 401
        cases = {
            '{"device_id": "1", "device_pin": "v2", "device_pinValue": "1"}': "timestamp_unix",
            '{"device_pin": "v2", "device_pinValue": "1", "timestamp_unix": "1"}': "device_id",
            ('{"device_id": "1", "device_pin": "{device_pin}", "device_pinValue": "1", '
             '"timestamp_unix": "1"}'): "device_pin",
            ('{"device_id": "1", "device_pin": "x9", "device_pinValue": "1", '
             '"timestamp_unix": "1"}'): "device_pin",
            "not json {": "$",
        }
        for body, fld in cases.items():
            async with b.http.post(f"{b.url}/blynk/app", data=body.encode(), headers={
                    "Content-Type": "application/json",
                    "Authorization": "Basic " + base64.b64encode(
                        f"blynk:{PASSWORD}".encode()).decode()}) as resp:
                assert resp.status == 400, body
                assert (await resp.json())["error"]["field"] == fld, body
        async with b.http.post(f"{b.url}/blynk/nope", data=b"{}") as resp:
            assert resp.status == 404
        # the web-form and plain-text variants are accepted
        form = f"device_id=1&device_pin=v2&device_pinValue=1&timestamp_unix={now // 1000}"
        r = await b.post("dev-a", "", "", 0, body=form,
                         content_type="application/x-www-form-urlencoded")
        assert r.status == 200
        r = await b.post("dev-a", "", "", 0, body=form.replace("&", "\n"),
                         content_type="text/plain")
        assert r.status == 200
        assert await b.queued() == 2


async def test_a_webhook_at_blynks_limit_is_counted(redis: Redis, prefix: str) -> None:
    """Blynk drops a webhook's requests past 10 a minute; the bridge counts each request that
    brings the webhook's last minute to that limit (what it can see of it)."""
    async with bridge(redis, prefix, start_stage=False) as b:
        before = REGISTRY.get_sample_value("bb_blynk_webhook_at_limit_total",
                                           {"integration": "app"}) or 0.0
        ts = int(time.time() * 1000)
        for i in range(12):
            assert (await b.post("dev-a", "v3", f"{i}", ts + i)).status == 200
        after = REGISTRY.get_sample_value("bb_blynk_webhook_at_limit_total", {"integration": "app"})
        assert after is not None and after - before == 3


async def test_a_killed_workers_commands_are_taken_over(redis: Redis, prefix: str) -> None:
    async with bridge(redis, prefix, start_stage=False, claim_idle_ms=200) as b:
        ts = int(time.time() * 1000)
        assert (await b.post("dev-a", "v2", "1", ts)).status == 200
        # a worker that read the command and died before publishing it
        dead_worker = StreamReader(redis, b.ctx.keys, b.ctx.keys.streams(DOWNLINKS),
                                   GROUP_DOWNLINK, "killed", stage="downlink")
        await dead_worker.ensure_group()
        assert len(await dead_worker.read(block=False)) == 1
        await b.stage.startup()
        stop = asyncio.Event()
        task = asyncio.create_task(b.stage.main_loop(stop))
        try:
            await wait_until(lambda: b.devices.got, what="the command taken over and sent")
            await wait_until(lambda: _acked(redis, b.ctx.keys), what="acked")
        finally:
            stop.set()
            await task
            await b.stage.shutdown()


async def test_the_bridges_own_write_coming_back_is_not_sent(redis: Redis, prefix: str) -> None:
    async with bridge(redis, prefix) as b:
        echoes = counted("echo")
        now = int(time.time() * 1000)
        # what egress records before writing V2=1 and V3=21.5 to dev-a
        await rig.record_echoes(redis, b.ctx.keys,
                                [(token_for("dev-a"), "tts:kit:dev-a", {"V2": 1, "V3": 21.5})],
                                now, 60_000)
        assert (await b.post("dev-a", "v2", "1", now + 5)).status == 200
        assert (await b.post("dev-a", "v3", "21.50", now + 5)).status == 200
        await wait_until(lambda: counted("echo") - echoes == 2, what="two echoes")
        # the user sets the same value again: each record answers one echo only
        assert (await b.post("dev-a", "v2", "1", now + 10)).status == 200
        await wait_until(lambda: b.devices.got, what="the genuine command sent")
        assert len(b.devices.got) == 1


@pytest.mark.parametrize("limit,outcome,written", [(200, "sent", 1), (20, "failed", 0)])
async def test_tts_outcomes_are_matched_and_written_back(
        redis: Redis, prefix: str, limit: int, outcome: str, written: int) -> None:
    async with bridge(redis, prefix) as b:
        answerer = DownlinkAnswerer(MQTT_HOST, MQTT_PORT, b.devices.app_id, "ttn",
                                    max_payload_bytes=limit)
        run = asyncio.create_task(answerer.run())
        try:
            await within(answerer.ready.wait())
            resp = await b.post("dev-b", "v2", "1", int(time.time() * 1000))
            cid = resp.headers["X-Event-Id"]
            await wait_until(lambda: _outcome(b, cid, outcome), what=f"the {outcome} matched")
            await wait_until(lambda: _written(b, {"V9": written}), what="the outcome written back")
            dead = [d for d in await b.dead() if d.reason == "tts_failed"]
            if outcome == "failed":
                assert len(dead) == 1
                assert "application_downlink_too_long" in dead[0].detail
                assert events.decode_downlink(dead[0].raw).event_id == cid
            else:
                assert dead == []
        finally:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)


async def _written(b: Bridge, pins: dict[str, Any]) -> bool:
    writes = [f for s in b.ctx.keys.streams("writes") for _, f in await b.ctx.redis.xrange(s)]
    return pins in [events.decode_write(f[events.FIELD]).pins for f in writes]


async def _outcome(b: Bridge, cid: str, outcome: str) -> bool:
    return bool(await b.ctx.redis.exists(b.ctx.keys.down_outcome(cid, outcome)))
