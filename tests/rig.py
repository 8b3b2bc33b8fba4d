"""The tests' shared rig: the bridge's stages run against the emulators over real HTTP/MQTT.

One home for what the whole-bridge tests (downlink loop and round trips, auto-provisioning) all
build: a configuration parsed from YAML text, a Blynk emulator from a few specs and served on a
free port, a Blynk webhook posting the README's Custom JSON body to ingest-http, stages running
until the test ends, a change made "in the app" (``POST /_admin/devices/{id}/app-write`` on the
running emulator, as a dashboard user causes it), and the reads of the bridge's Redis streams
the tests assert on. Every rig uses the test's own Redis prefix (``conftest.prefix``) and free
ports; every wait goes through :func:`tests.wait.wait_until`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import aiohttp
from prometheus_client import REGISTRY

from emulators.blynk import (
    BlynkEmulator,
    DatastreamSpec,
    DeviceSpec,
    EmulatorSpec,
    OAuthClient,
    Settings,
    TemplateSpec,
    WebhookSpec,
)
from emulators.blynk.settings import WebhookAuth
from pipeline import config as config_mod
from pipeline import echo, events
from pipeline.context import Context
from pipeline.keys import Keys
from pipeline.lifecycle import run_stages
from pipeline.streams import Redis

#: The Basic auth password of the ``app`` Blynk webhook the rigs configure.
PASSWORD = "hook-pass-9Qx"
#: The README's Custom JSON body, as Blynk renders it (``str.format`` fields).
BODY = ('{{"device_id": "{id}", "device_authToken": "{token}", "device_pin": "{pin}", '
        '"device_pinValue": "{value}", "timestamp_unix": "{ts}", "device_name": "{name}"}}')
#: The same body with Blynk's placeholders: what a Blynk (emulator) webhook is configured with.
PLACEHOLDER_BODY = BODY.format(id="{device_id}", token="{device_authToken}", pin="{device_pin}",
                               value="{device_pinValue}", ts="{timestamp_unix}",
                               name="{device_name}")


def parse_config(text: str) -> config_mod.Config:
    """A bridge configuration from YAML text (no environment substitution)."""
    return config_mod.parse(text, "yaml", "test.yaml", env={})


# ---- the Blynk emulator -------------------------------------------------------------------------


def blynk_spec(templates: Sequence[TemplateSpec], devices: Sequence[DeviceSpec] = (),
               webhooks: Sequence[WebhookSpec] = (), *, oauth: bool = False,
               **settings: Any) -> EmulatorSpec:
    """One region (``fra1``), no device rate limit unless ``settings`` say otherwise; with
    ``oauth`` the platform API client ``bridge`` / ``s3cret``."""
    return EmulatorSpec(
        regions={"fra1": 0}, settings=Settings(**({"device_rps": None} | settings)),
        oauth_clients=[OAuthClient(client_id="bridge", client_secret="s3cret")] if oauth else [],
        templates=list(templates), devices=list(devices), webhooks=list(webhooks))


def switch_template(template_id: str, name: str, *datastreams: DatastreamSpec) -> TemplateSpec:
    """A template; by default one switch on V2 (integer 0..1)."""
    return TemplateSpec(id=template_id, name=name, datastreams=list(datastreams) or [
        DatastreamSpec(id=2, pin="V2", name="switch", type="integer", min=0, max=1)])


def blynk_hook(name: str, port: int, template: str, datastream: str) -> WebhookSpec:
    """A "Device Datastream Update" webhook of every device of ``template`` posting the README
    body to ingest-http's ``POST /blynk/app`` on ``port``, Basic auth."""
    return WebhookSpec(name=name, url=f"http://127.0.0.1:{port}/blynk/app", template=template,
                       datastream=datastream, body=PLACEHOLDER_BODY,
                       auth=WebhookAuth(username="blynk", password=PASSWORD))


@asynccontextmanager
async def serve_blynk(spec: EmulatorSpec) -> AsyncIterator[tuple[BlynkEmulator, str]]:
    """The emulator served on a free port: ``(emulator, base URL)``."""
    emu = BlynkEmulator.from_spec(spec)
    async with emu.serve({"fra1": 0}) as urls:
        yield emu, urls["fra1"]


async def app_write(http: aiohttp.ClientSession, blynk_url: str, device_id: int, pin: str,
                    value: Any) -> dict[str, Any]:
    """A user changes a datastream in the Blynk app: the emulator's admin call over HTTP (it
    stores the value and fires the webhooks watching it). Returns its answer (``ts_ms``…)."""
    async with http.post(f"{blynk_url}/_admin/devices/{device_id}/app-write",
                         json={"pin": pin, "value": value}) as resp:
        body: dict[str, Any] = await resp.json()
        assert resp.status == 200, body
        return body


async def blynk_value(http: aiohttp.ClientSession, blynk_url: str, device_id: int,
                      pin: str) -> dict[str, Any] | None:
    """``{"value", "ts_ms", "origin"}`` of a device's datastream, read over the admin API."""
    async with http.get(f"{blynk_url}/_admin/devices/{device_id}") as resp:
        state: dict[str, Any] = await resp.json()
    found: dict[str, Any] | None = state["values"].get(pin.lower())
    return found


# ---- the bridge ---------------------------------------------------------------------------------


@dataclass
class Running:
    """Stages of the bridge running in this process until the ``run_bridge`` block ends."""

    ctx: Context
    http: aiohttp.ClientSession
    #: ingest-http's base URL (when it is one of the stages).
    ingest_url: str

    async def dead(self) -> list[events.DeadLetter]:
        return await dead_letters(self.ctx.redis, self.ctx.keys)

    async def writes(self) -> list[events.BlynkWrite]:
        return await writes(self.ctx.redis, self.ctx.keys)


@asynccontextmanager
async def run_bridge(cfg: config_mod.Config, stages: Sequence[ModuleType], *,
                     consumer: str = "rig") -> AsyncIterator[Running]:
    """Build each of ``stages`` (``workers.*`` modules) on one context and run them; once they
    all started (ingest-http listening), yield; stop them and wait for them on the way out."""
    ctx = Context.create(cfg, consumer=consumer)
    stop = asyncio.Event()
    started = asyncio.Event()
    task = asyncio.create_task(run_stages([m.build(ctx) for m in stages], stop=stop,
                                          install_signals=False, on_started=started.set))
    try:
        waiter = asyncio.ensure_future(started.wait())
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task in done:
            task.result()  # a stage failed to start: raise its error
            raise AssertionError("the stages ended before they all started")
        async with aiohttp.ClientSession() as http:
            yield Running(ctx, http, f"http://127.0.0.1:{cfg.ingest_http.port}")
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await ctx.close()


# ---- reads --------------------------------------------------------------------------------------


async def add_uplinks(redis: Redis, keys: Keys, uplinks: Sequence[events.Uplink]) -> None:
    """Put uplinks on the uplinks stream (as ingest would)."""
    async with redis.pipeline(transaction=False) as pipe:
        for u in uplinks:
            pipe.xadd(keys.stream("uplinks"), {events.FIELD: events.encode(u)})
        await pipe.execute()


async def record_echoes(redis: Redis, keys: Keys,
                        writes: Sequence[tuple[str, str, dict[str, events.Value]]],
                        now_ms: int, window_ms: int) -> None:
    """The echo records egress makes before writing each ``(token, device key, pin → value)``
    (:func:`pipeline.echo.record`; a device's records are in its partition), for tests that
    start where Blynk's webhook comes back."""
    for token, device_key, pins in writes:
        await echo.record(redis, {0: echo.records(keys, token, pins, now_ms, device_key)},
                          window_ms, cluster=keys.cluster)


async def writes(redis: Redis, keys: Keys) -> list[events.BlynkWrite]:
    """Every ``BlynkWrite`` on the (unpartitioned) writes stream."""
    return [events.decode_write(f[events.FIELD])
            for _, f in await redis.xrange(keys.stream("writes"))]


async def dead_letters(redis: Redis, keys: Keys) -> list[events.DeadLetter]:
    """Every dead letter (each partition's dead stream too, in the cluster layout)."""
    return [events.decode_dead(f[events.FIELD]) for key in keys.dead_streams()
            for _, f in await redis.xrange(key)]


def counted(outcome: str, integration: str) -> float:
    """``bb_downlinks_total{integration, outcome}`` in this process."""
    return REGISTRY.get_sample_value(
        "bb_downlinks_total", {"integration": integration, "outcome": outcome}) or 0.0


def tts_uplink_body(app_id: str, device: str, f_cnt: int, decoded: dict[str, Any]) -> bytes:
    """A TTS v3 uplink message (as TTS sends it by webhook or MQTT)."""
    from emulators.tts import make_uplink

    return json.dumps(make_uplink(app_id, "ttn", device, f_cnt, decoded)).encode()
