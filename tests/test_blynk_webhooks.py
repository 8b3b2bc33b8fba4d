"""Emulated Blynk webhooks: fired by device-API writes, rendered, rate-limited, logged."""

from __future__ import annotations

import asyncio
import base64
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
    MetafieldSpec,
    Settings,
    TemplateSpec,
    WebhookSpec,
)
from emulators.blynk.settings import WebhookAuth
from emulators.blynk.webhooks import render
from tests.conftest import serve_app
from tests.wait import within

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
            await within(self.changed.wait_for(lambda: len(self.got) >= n))

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
            DatastreamSpec(id=2, pin="V2", name="speed", type="integer", min=0, max=100),
        ], metafields=[MetafieldSpec(id=4, name="Particle Device")])],
        devices=[DeviceSpec(name="boronc", token=TOKEN, template=TEMPLATE, id=5,
                            metafields={"Particle Device": "e00fce68deadbeef00000001"})],
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


# --- dashboard (app) writes ----------------------------------------------------------------------


async def admin_write(s: aiohttp.ClientSession, base: str, device: int,
                      body: dict[str, Any]) -> tuple[int, Any]:
    async with s.post(f"{base}/_admin/devices/{device}/app-write", json=body) as r:
        return r.status, await r.json()


async def test_app_write_validates_like_a_device_write_and_records_its_origin(
        receiver: tuple[Receiver, str]) -> None:
    _, url = receiver
    emu = BlynkEmulator.from_spec(spec(url, []))
    async with emu.serve({"fra1": 0}) as urls, aiohttp.ClientSession() as s:
        base = urls["fra1"]
        assert await admin_write(s, base, 5, {"pin": "x9", "value": 1}) == (
            400, {"error": {"message": "Wrong pin format."}})
        assert await admin_write(s, base, 5, {"pin": "v99", "value": 1}) == (
            400, {"error": {"message": "No datastream setup for that pin."}})
        assert await admin_write(s, base, 5, {"pin": "v2", "value": "fast"}) == (
            400, {"error": {"message": "Value doesn't match the Datastream data type."}})
        assert await admin_write(s, base, 5, {"dataStreamId": 99, "value": 1}) == (
            400, {"error": {"message": "Wrong dataStreamId format."}})
        assert (await admin_write(s, base, 77, {"pin": "v2", "value": 1}))[0] == 404
        async with s.post(f"{base}/_admin/devices/5/app-write", data=b"{") as r:
            assert r.status == 400
        dev = emu.device_by_token(TOKEN)
        assert dev.last_write_origin is None and dev.values == {}
        status, body = await admin_write(s, base, 5, {"pin": "V2", "value": 300})
        assert status == 200
        assert body["value"] == 100  # clamped to max, as a device write would be
        assert (body["pin"], body["dataStreamId"], body["origin"]) == ("v2", 2, "app")
        assert dev.values["V2"] == (100, body["ts_ms"])
        assert (dev.last_write_ms, dev.last_write_origin) == (body["ts_ms"], "app")
        assert dev.messages == 0  # a dashboard write is not a device message
        async with s.get(f"{base}/external/api/get?token={TOKEN}&v2") as r:
            assert await r.text() == "100"
        status, body = await admin_write(s, base, 5, {"dataStreamId": "8", "value": 7})
        assert (status, body["value"]) == (200, 0)  # enum fallback
        async with s.get(f"{base}/external/api/update?token={TOKEN}&v2=4") as r:
            assert r.status == 200
        assert dev.last_write_origin == "device"
        async with s.get(f"{base}/_admin/devices/5") as r:
            state = await r.json()
    assert state["values"]["v2"]["origin"] == "device"
    assert state["values"]["v8"]["origin"] == "app"
    assert state["last_write"]["origin"] == "device"


async def test_app_write_fires_custom_json_with_header_secret_and_placeholders(
        receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    hook = WebhookSpec(
        name="speed to bridge", url=f"{url}/blynk/downlink", template=TEMPLATE, datastream="V2",
        content_type="json",
        body='{"id":{device_id},"name":"{device_name}","pin":"{device_pin}",'
             '"value":"{device_pinValue}","ts":{timestamp_unix},"token":"{device_authToken}",'
             '"particle":"{device_metadata_4}"}',
        headers={"X-Bridge-Secret": "s3cr3t-Value_01"})
    emu = BlynkEmulator.from_spec(spec(url, [hook]))
    async with emu.serve({"fra1": 0}) as urls, aiohttp.ClientSession() as s:
        status, body = await admin_write(s, urls["fra1"], 5, {"pin": "v2", "value": 3})
        assert (status, body["webhooks_fired"]) == (200, 1)
        await rec.wait_for(1)
        await emu.webhooks.drain()
        async with s.get(f"{urls['fra1']}/_admin/webhooks") as r:
            admin = await r.json()
    got = rec.got[0]
    assert (got["method"], got["path"]) == ("POST", "/blynk/downlink")
    assert got["headers"]["Content-Type"] == "application/json"
    assert got["headers"]["X-Bridge-Secret"] == "s3cr3t-Value_01"
    assert json.loads(got["body"]) == {
        "id": 5, "name": "boronc", "pin": "v2", "value": "3", "ts": body["ts_ms"],
        "token": TOKEN, "particle": "e00fce68deadbeef00000001"}
    (entry,) = admin["log"]
    assert (entry["webhook"], entry["device"], entry["pin"], entry["value"], entry["origin"],
            entry["status"], entry["code"]) == ("speed to bridge", 5, "v2", "3", "app", "OK", 200)
    assert admin["totals"]["fired"] == admin["totals"]["ok"] == 1


async def test_app_writes_over_ten_a_minute_are_dropped_and_counted(
        receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    hooks = [
        WebhookSpec(name="form", url=f"{url}/form", template=TEMPLATE, datastream=2,
                    content_type="form", method="PUT",
                    fields={"pin": "{device_pin}", "value": "{device_pinValue}"},
                    auth=WebhookAuth(username="blynk", password="pa:ss")),
        WebhookSpec(name="plain", url=f"{url}/plain", trigger="device_datastream", device=5,
                    datastream="v2", content_type="plain", body="{device_pinValue}"),
    ]
    emu = BlynkEmulator.from_spec(spec(url, hooks))  # default limit: 10 per minute
    async with emu.serve({"fra1": 0}) as urls, aiohttp.ClientSession() as s:
        for value in range(12):
            assert (await admin_write(s, urls["fra1"], 5, {"pin": "v2", "value": value}))[0] == 200
        await rec.wait_for(20)
        await emu.webhooks.drain()
        async with s.get(f"{urls['fra1']}/_admin/webhooks") as r:
            admin = await r.json()
    assert len(rec.got) == 20
    form = [g for g in rec.got if g["path"] == "/form"]
    assert form[0]["method"] == "PUT"
    assert form[0]["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert form[0]["headers"]["Authorization"] == "Basic " + base64.b64encode(
        b"blynk:pa:ss").decode()
    assert sorted(g["body"] for g in form) == sorted(f"pin=v2&value={v}" for v in range(10))
    plain = [g for g in rec.got if g["path"] == "/plain"]
    assert plain[0]["headers"]["Content-Type"] == "text/plain"
    for name in ("form", "plain"):
        assert admin["stats"][name]["fired"] == 12
        assert admin["stats"][name]["sent"] == 10
        assert admin["stats"][name]["dropped_rate"] == 2
    assert admin["totals"]["dropped_rate"] == 4
    dropped = [e for e in admin["log"] if e["status"] == "dropped"]
    assert sorted((e["webhook"], e["value"]) for e in dropped) == [
        ("form", "10"), ("form", "11"), ("plain", "10"), ("plain", "11")]
    assert all(e["error"] == "rate limit" and e["origin"] == "app" for e in dropped)


@pytest.mark.parametrize(("change", "complaint"), [
    ({"headers": {"X-Secret": "a+b="}}, "header 'X-Secret'"),
    ({"name": "bad/name"}, "name must be"),
    ({"url": "http://x/" + "a" * 1024}, "url longer"),
    ({"headers": {"authorization": "Bearer x"}, "auth": WebhookAuth(username="u", password="p")},
     "not both"),
])
def test_webhook_config_follows_blynk_form_rules(change: dict[str, Any], complaint: str) -> None:
    base = {"name": "ok", "url": "http://127.0.0.1:1/x", "template": TEMPLATE, "datastream": 2}
    with pytest.raises(ValueError, match=complaint):
        BlynkEmulator.from_spec(spec("http://127.0.0.1:1", [WebhookSpec(**{**base, **change})]))
