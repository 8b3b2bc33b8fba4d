"""Emulated Blynk webhooks: fired by device-API writes, rendered, rate-limited, logged."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from emulators.blynk import (
    BlynkEmulator,
    DatastreamSpec,
    DeviceSpec,
    EmulatorSpec,
    Settings,
    TemplateSpec,
    WebhookSpec,
)
from emulators.blynk.webhooks import render
from tests.conftest import serve_app

TOKEN = "xw7ITVneg1DifRRQuPGcA7fJvV8-FAVl"
TEMPLATE = "TMPL84aMXD6vd"


class Receiver:
    """A real HTTP endpoint that records what it gets and can hold answers back."""

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.changed = asyncio.Condition()
        self.release = asyncio.Event()
        self.release.set()

    async def handle(self, request: web.Request) -> web.Response:
        await self.release.wait()
        async with self.changed:
            self.got.append({"method": request.method, "path": request.path,
                             "query": dict(request.query),
                             "headers": dict(request.headers), "body": await request.text()})
            self.changed.notify_all()
        return web.Response(text="ok")

    async def wait_for(self, n: int) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: len(self.got) >= n), 5)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    r = Receiver()
    async with serve_app(r.app()) as url:
        yield r, url
    r.release.set()


def spec(url: str, hooks: list[WebhookSpec]) -> EmulatorSpec:
    return EmulatorSpec(
        regions={"fra1": 0},
        settings=Settings(device_rps=None),
        templates=[TemplateSpec(id=TEMPLATE, name="LED board", datastreams=[
            DatastreamSpec(id=7, pin="V7", name="LED", type="integer", min=0, max=1),
            DatastreamSpec(id=8, pin="V8", name="Mode", type="enum", options={0: "off", 1: "on"},
                           fallback=0),
            DatastreamSpec(id=3, pin="V3", name="Where", type="location"),
        ])],
        devices=[DeviceSpec(name="boronc", token=TOKEN, template=TEMPLATE, id=5)],
        webhooks=hooks,
    )


async def test_webhook_fires_on_device_api_write_and_is_rate_limited(
        receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    hook = WebhookSpec(name="led", url=f"{url}/v1/devices/e00fce68/blynk_led", template=TEMPLATE,
                       datastream="V7", method="POST", content_type="json",
                       body='{"args":"{device_pinValue}","pin":"{device_pin}",'
                            '"token":"{device_authToken}","ts":{timestamp_unix},'
                            '"id":{device_id},"name":"{device_name}","mode":"{device_dataStream_8}"}',
                       headers={"Authorization": "Bearer 0123456789abcdef"}, rate_per_min=3)
    emu = BlynkEmulator.from_spec(spec(url, [hook]))
    async with emu.serve({"fra1": 0}) as urls, aiohttp.ClientSession() as s:
        async with s.get(f"{urls['fra1']}/external/api/update?token={TOKEN}&v8=1") as r:
            assert r.status == 200  # V8 is not watched: no trigger
        for value in (1, 0, 1, 0, 1):
            async with s.get(f"{urls['fra1']}/external/api/batch/update?token={TOKEN}"
                             f"&V7={value}") as r:
                assert r.status == 200
        await rec.wait_for(3)
        await emu.webhooks.drain()
    assert len(rec.got) == 3
    first = rec.got[0]
    assert first["method"] == "POST" and first["path"] == "/v1/devices/e00fce68/blynk_led"
    assert first["headers"]["Content-Type"] == "application/json"
    assert first["headers"]["Authorization"] == "Bearer 0123456789abcdef"
    body = json.loads(first["body"])
    ts = emu.device_by_token(TOKEN).history["V7"][0][0]
    assert body == {"args": "1", "pin": "v7", "token": TOKEN, "ts": ts, "id": 5,
                    "name": "boronc", "mode": "1"}
    assert [json.loads(g["body"])["args"] for g in rec.got] == ["1", "0", "1"]
    stats = emu.webhooks.stats()["led"]
    assert stats == {"fired": 5, "sent": 3, "ok": 3, "failed": 0, "dropped_rate": 2,
                     "dropped_queue": 0}
    statuses = [entry["status"] for entry in emu.webhooks.log]
    assert statuses.count("OK") == 3 and statuses.count("dropped") == 2
    assert all(TOKEN not in entry["url"] for entry in emu.webhooks.log)


async def test_form_and_get_webhooks_per_device(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    hooks = [
        WebhookSpec(name="form", url=f"{url}/form", trigger="device_datastream", device=5,
                    datastream=3, content_type="form",
                    fields={"lon": "{device_pinValue[0]}", "lat": "{device_pinValue[1]}"}),
        WebhookSpec(name="get", url=f"{url}/get", template=TEMPLATE, datastream=3, method="GET",
                    query={"v": "{device_pinValue}", "unknown": "{no_such_thing}"}),
    ]
    emu = BlynkEmulator.from_spec(spec(url, hooks))
    async with emu.serve({"fra1": 0}) as urls, aiohttp.ClientSession() as s:
        async with s.get(f"{urls['fra1']}/external/api/batch/update?token={TOKEN}"
                         "&V3=-73.8731,40.8414") as r:
            assert r.status == 200
        await rec.wait_for(2)
    by_path = {g["path"]: g for g in rec.got}
    form = by_path["/form"]
    assert form["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert form["body"] == "lon=-73.8731&lat=40.8414"
    assert by_path["/get"]["method"] == "GET"
    assert by_path["/get"]["query"] == {"v": "-73.8731,40.8414", "unknown": "{no_such_thing}"}


async def test_slow_receiver_never_slows_the_device_api(receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    rec.release.clear()  # the receiver holds every answer back
    hook = WebhookSpec(name="slow", url=f"{url}/slow", template=TEMPLATE, datastream=7,
                       body="{device_pinValue}", content_type="plain", rate_per_min=100)
    emu = BlynkEmulator.from_spec(spec(url, [hook]))
    async with emu.serve({"fra1": 0}) as urls, aiohttp.ClientSession() as s:
        for value in range(10):
            async with s.get(f"{urls['fra1']}/external/api/update?token={TOKEN}"
                             f"&v7={value % 2}") as r:
                assert r.status == 200  # answered while every webhook call is still pending
        assert rec.got == []
        rec.release.set()
        await rec.wait_for(10)
        await emu.webhooks.drain()
    assert rec.got[0]["headers"]["Content-Type"] == "text/plain"
    assert [g["body"] for g in rec.got] == [str(v % 2) for v in range(10)]


def test_render_placeholders() -> None:
    fields = {"device_pinValue": 'a"b', "device_pinValue[0]": "1"}
    assert render('{"v":"{device_pinValue}"}', fields) == '{"v":"a"b"}'
    assert render('{"v":"{device_pinValue}"}', fields, json_escape=True) == '{"v":"a\\"b"}'
    assert render("{device_pinValue[0]}-{nope}", fields) == "1-{nope}"
