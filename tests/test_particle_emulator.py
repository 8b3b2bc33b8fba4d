"""The Particle emulator: webhooks rendered as Particle documents them, the Cloud API endpoint."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest
from aiohttp import web

from emulators.particle import (
    API_USER_FORBIDDEN,
    ARG_TOO_LONG,
    INVALID_TOKEN,
    TIMED_OUT,
    TIMED_OUT_400,
    USER_AGENT,
    CloudBehaviour,
    Device,
    ParticleCloud,
    ParticleFleet,
    Webhook,
    build_request,
    int_arg,
    load_webhook,
    main,
    make_event,
    render,
    returns,
)
from tests.conftest import serve_app
from tests.wait import wait_until

README = Path(__file__).resolve().parent.parent / "README.md"

URL = "https://example.com/hook"
DEVICE = "3f002b000000000000000000"
Fixture = Callable[[str], Path]


def _event(name: str = "demo", data: str = "mydata", **kw: Any) -> Any:
    return make_event(DEVICE, name, data, published_at="2017-02-01T21:08:05.763Z", **kw)


# --- requests as Particle's docs show them (fixtures) --------------------------------------------


def test_default_form_body(fixture_path: Fixture) -> None:
    req = build_request(Webhook(url=URL, event="demo"), _event())
    assert req.method == "POST"
    assert req.body == fixture_path("particle/particle-webhook-01-default-form.txt") \
        .read_bytes().strip()
    assert req.headers == {"User-Agent": USER_AGENT,
                           "Content-Type": "application/x-www-form-urlencoded"}


@pytest.mark.parametrize(("fixture", "hook", "name", "data"), [
    ("particle-webhook-02.json",
     Webhook(url=URL, json={"{{PARTICLE_EVENT_NAME}}": "{{{PARTICLE_EVENT_VALUE}}}"},
             noDefaults=True),
     "Temperature/Kitchen", "20.00"),
    ("particle-webhook-03.json",
     Webhook(url=URL, json={"coordinates": {"lat": "{{{lat}}}", "lng": "{{{lng}}}"}},
             noDefaults=True),
     "Elevation", '{"lat":39.739155, "lng":-104.984703}'),
    ("particle-webhook-05.json",
     Webhook(url=URL, json={"gauges": [{"name": "{{{n}}}", "value": "{{{v}}}",
                                        "source": "{{PARTICLE_DEVICE_ID}}"}]}, noDefaults=True),
     "click", '{"n":"click","v":2}'),
    ("particle-webhook-06.json",
     Webhook(url=URL, json={"value": "{{{PARTICLE_EVENT_VALUE}}}"}, noDefaults=True),
     "flag", "true"),
])
def test_json_templates(fixture: str, hook: Webhook, name: str, data: str,
                        fixture_path: Fixture) -> None:
    req = build_request(hook, _event(name, data))
    assert req.body is not None
    assert json.loads(req.body) == json.loads(fixture_path(f"particle/{fixture}").read_bytes())
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["Accept"] == "application/json"
    assert req.headers["User-Agent"] == USER_AGENT


@pytest.mark.parametrize(("fixture", "body", "data"), [
    ("particle-webhook-04-custom-body.json",
     '{ "coordinates": { "lat": {{{lat}}}, "lng": {{{lng}}} } }',
     '{"lat":39.739155,"lng":-104.984703}'),
    ("particle-webhook-07-custom-body.json", '{ "value": {{{PARTICLE_EVENT_VALUE}}} }', "true"),
    ("particle-webhook-08-custom-body.json",
     '{ "gauges": [{ "name": "{{{n}}}", "value": {{{v}}} }] }', '{"n":"click","v":2}'),
])
def test_body_templates_are_text(fixture: str, body: str, data: str,
                                 fixture_path: Fixture) -> None:
    hook = Webhook(url=URL, body=body, headers={"Content-Type": "application/json"})
    req = build_request(hook, _event("x", data))
    assert req.body == fixture_path(f"particle/{fixture}").read_bytes().strip()
    assert req.headers["Content-Type"] == "application/json"


def test_form_template(fixture_path: Fixture) -> None:
    hook = Webhook(url=URL, form={"Body": "{{{BODY}}}", "To": "TO_PHONE_NUMBER",
                                  "From": "FROM_PHONE_NUMBER"}, noDefaults=True)
    req = build_request(hook, _event("sms", '{"BODY":"Hi there!"}'))
    assert req.body == fixture_path("particle/particle-webhook-09-form.txt").read_bytes().strip()


def test_form_template_keeps_the_default_fields() -> None:
    req = build_request(Webhook(url=URL, form={"extra": "{{{PARTICLE_EVENT_ID}}}"}),
                        _event(event_id="evt1"))
    assert req.body is not None
    assert dict(parse_qsl(req.body.decode())) == {
        "event": "demo", "data": "mydata", "published_at": "2017-02-01T21:08:05.763Z",
        "coreid": DEVICE, "extra": "evt1"}


def test_blynk_blueprint_configuration(fixture_path: Fixture) -> None:
    hook = load_webhook(fixture_path("particle/particle-webhook-template-blynk.json").read_bytes())
    data = {"t": "T" * 32, "v14": 1234, "v15": 3.14159, "v16": 0, "v17": 0}
    req = build_request(hook, _event("blynk_https_get", json.dumps(data)))
    assert req.method == "GET" and req.body is None
    url = urlsplit(req.url)
    assert url.netloc == "ny3.blynk.cloud" and url.path == "/external/api/batch/update"
    assert dict(parse_qsl(url.query)) == {"token": "T" * 32, "V6": "2017-02-01T21:08:05.763Z",
                                          "V14": "1234", "V15": "3.14159", "V16": "0",
                                          "V17": "0"}


def test_mustache_rules() -> None:
    values = {"a": "<b&'\">", "n.0.m": "x"}
    assert render("{{a}}", values) == "&lt;b&amp;&#39;&quot;&gt;"
    assert render("{{{a}}}|{{{ n.0.m }}}|{{missing}}", values) == "<b&'\">|x|"


def test_nested_data_variables_and_product_variables() -> None:
    event = make_event("d1", "env", {"a": {"aa": 1.0}, "c": [{"ca": True}]}, product_id=30301,
                       fw_version=6, user_id="u1", event_id="e1")
    hook = Webhook(url=URL, noDefaults=True, json={
        "aa": "{{{a.aa}}}", "ca": "{{{c.0.ca}}}", "p": "{{{PRODUCT_ID}}}",
        "v": "{{{PRODUCT_VERSION}}}", "u": "{{{PRODUCT_USER_ID}}}", "id": "{{{PARTICLE_EVENT_ID}}}",
        "legacy": "{{{SPARK_CORE_ID}}}"})
    body = build_request(hook, event).body
    assert body is not None
    assert json.loads(body) == {"aa": "1", "ca": "true", "p": "30301", "v": "6", "u": "u1",
                                "id": "e1", "legacy": "d1"}


def test_basic_auth_and_headers_are_rendered() -> None:
    hook = load_webhook(json.dumps({"url": URL, "auth": {"username": "u", "password": "p"},
                                    "headers": {"X-Device": "{{{PARTICLE_DEVICE_ID}}}"},
                                    "responseTemplate": "ignored"}))
    req = build_request(hook, _event())
    assert req.headers["Authorization"] == "Basic dTpw"
    assert req.headers["X-Device"] == DEVICE


# --- sending and retrying ------------------------------------------------------------------------


class Receiver:
    """A webhook target that answers a scripted list of statuses, then 200."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/hook", self.hook)

    async def hook(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, dict(request.headers), await request.read()))
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)


async def test_fleet_sends_at_least_once_and_retries_then_drops() -> None:
    receiver = Receiver([500, 429, 404, 500, 500])
    async with serve_app(receiver.app) as base:
        fleet = ParticleFleet(f"{base}/hook", ["d1"], 1000.0, retry_delays_s=(0.01, 0.01),
                              max_in_flight=1)
        stats = await fleet.run(count=2)
    # event 1: 500, 429, 404 → dropped after two retries; event 2: 500, 500, 200
    assert (stats.sent, stats.delivered, stats.dropped, stats.retries) == (2, 1, 1, 4)
    assert [d.statuses for d in fleet.deliveries] == [[500, 429, 404], [500, 500, 200]]
    first = [r for r in receiver.requests[:3]]
    assert len({body for _, _, body in first}) == 1  # a retry is the same request
    assert all(h["User-Agent"] == USER_AGENT for _, h, _ in receiver.requests)


async def test_fleet_counts_transport_errors() -> None:
    fleet = ParticleFleet("http://127.0.0.1:1/hook", 2, 1000.0, retry_delays_s=(0.0,))
    stats = await fleet.run(count=2)
    assert stats.dropped == 2 and stats.delivered == 0
    assert all(s == "ClientConnectorError" for s in stats.statuses)


async def test_fleet_rate_and_duration() -> None:
    receiver = Receiver([])
    async with serve_app(receiver.app) as base:
        stats = await ParticleFleet(f"{base}/hook", 5, 200.0).run(duration_s=0.1)
    assert stats.sent == len(receiver.requests) >= 1


async def test_command_line_send() -> None:
    receiver = Receiver([])
    async with serve_app(receiver.app) as base:
        rc = await asyncio.to_thread(main, ["send", "--url", f"{base}/hook", "--devices", "2",
                                            "--rate", "500", "--count", "4", "--format", "json",
                                            "--header", "X-Secret: s3"])
    assert rc == 0
    assert len(receiver.requests) == 4
    assert all(h["X-Secret"] == "s3" for _, h, _ in receiver.requests)
    assert {json.loads(b)["coreid"] for _, _, b in receiver.requests} == {
        "e00fce680000000000000000", "e00fce680000000000000001"}


# --- the Cloud API function endpoint -------------------------------------------------------------


@pytest.fixture
async def cloud() -> AsyncIterator[tuple[ParticleCloud, str]]:
    cloud = ParticleCloud(
        [Device("dev1", name="boronc", functions={"blynk_led": lambda a: 1 if a in ("on", "1")
                                                   else 0}),
         Device("dev2"), Device("off1", online=False), Device("p1", product="30301")],
        tokens=["tok"], api_user_tokens=["apiuser"],
    )
    async with serve_app(cloud.app) as base:
        yield cloud, base


async def call(base: str, path: str, token: str | None = "tok", **kw: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.post(f"{base}{path}", headers=headers,
                                                    **kw) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if resp.content_type == "application/json" else text


async def test_function_call_answers(cloud: tuple[ParticleCloud, str]) -> None:
    emu, base = cloud
    assert await call(base, "/v1/devices/dev1/blynk_led", data={"arg": "on"}) == (
        200, {"id": "dev1", "connected": True, "return_value": 1, "name": "boronc"})
    assert await call(base, "/v1/devices/dev1/blynk_led", json={"args": "off"}) == (
        200, {"id": "dev1", "connected": True, "return_value": 0, "name": "boronc"})
    assert await call(base, "/v1/devices/dev2/any?format=raw", data={"arg": "x"}) == (200, "1")
    assert await call(base, "/v1/products/30301/devices/p1/f", data={"arg": "1"}) == (
        200, {"id": "p1", "connected": True, "return_value": 1})
    assert (await call(base, "/v1/devices/dev1/blynk_led", token=None))[0] == 401
    assert (await call(base, "/v1/devices/dev1/blynk_led", token="bad"))[0] == 401
    assert await call(base, "/v1/devices/dev2/f", token="apiuser") == (403, API_USER_FORBIDDEN)
    assert (await call(base, "/v1/products/30301/devices/p1/f", token="apiuser"))[0] == 200
    assert (await call(base, "/v1/devices/ghost/f"))[0] == 404
    assert (await call(base, "/v1/products/999/devices/p1/f"))[0] == 404
    assert await call(base, "/v1/devices/dev1/nope") == (
        404, {"ok": False, "error": "Function nope not found"})
    assert await call(base, "/v1/devices/off1/f") == (408, TIMED_OUT)
    assert (await call(base, "/v1/devices/dev2/f", data={"arg": "x" * 1025}))[0] == 400
    emu.fail_next(500)
    assert (await call(base, "/v1/devices/dev2/f"))[0] == 500
    assert (await call(base, "/v1/devices/dev2/f"))[0] == 200
    calls = await emu.wait_for_calls(len(emu.calls))
    assert calls[0].device == "dev1" and calls[0].function == "blynk_led"
    assert calls[0].arg == "on" and calls[0].status == 200
    assert calls[3].product == "30301"


async def test_timeout_body_is_the_fixture(fixture_path: Fixture) -> None:
    assert json.loads(
        fixture_path("particle/particle-error-timeout-01.json").read_bytes()) == TIMED_OUT
    assert json.loads(
        fixture_path("particle/particle-error-apiuser-01.json").read_bytes()) == API_USER_FORBIDDEN


async def test_wait_for_calls_wakes_on_a_call(cloud: tuple[ParticleCloud, str]) -> None:
    emu, base = cloud
    waiter = asyncio.create_task(emu.wait_for_calls(1))
    await call(base, "/v1/devices/dev2/f", data={"arg": "1"})
    assert len(await waiter) == 1
    with pytest.raises(TimeoutError):
        await emu.wait_for_calls(5, timeout_s=0.05)


async def _raw_call(base: str, path: str, token: str | None = "tok",
                    **kw: Any) -> tuple[int, list[tuple[str, Any]]]:
    """Status and the JSON body as ordered (key, value) pairs: the fixtures' exact shape."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.post(f"{base}{path}", headers=headers,
                                                    **kw) as resp:
        return resp.status, json.loads(await resp.text(), object_pairs_hook=list)


async def test_function_responses_have_the_fixture_shapes(fixture_path: Fixture) -> None:
    legacy = json.loads(fixture_path("particle/particle-function-response-02.json").read_bytes(),
                        object_pairs_hook=list)
    current = json.loads(fixture_path("particle/particle-function-response-01.json").read_bytes(),
                         object_pairs_hook=list)
    cloud = ParticleCloud([Device("0123456789abcdef01234567", name="prototype99",
                                  functions={"led": returns(42)}),
                           Device("1f0030001647353236343033", functions={"led": int_arg})],
                          tokens=["tok"])
    async with serve_app(cloud.app) as base:
        assert await _raw_call(base, "/v1/devices/0123456789abcdef01234567/led",
                               data={"arg": "x"}) == (200, legacy)
        assert await _raw_call(base, "/v1/devices/1f0030001647353236343033/led",
                               json={"arg": "1"}) == (200, current)
        assert await _raw_call(base, "/v1/devices/1f0030001647353236343033/led",
                               token="wrong") == (401, list(INVALID_TOKEN.items()))
        assert await _raw_call(base, "/v1/devices/1f0030001647353236343033/led",
                               token=None) == (401, list(INVALID_TOKEN.items()))
    assert [c.return_value for c in cloud.calls] == [42, 1, None, None]


def test_int_arg_firmware_function() -> None:
    assert (int_arg("3"), int_arg(" -7 "), int_arg("on"), int_arg("")) == (3, -7, -1, -1)


@pytest.mark.parametrize(("offline", "answer"), [
    ("timeout_408", (408, TIMED_OUT)),
    ("timed_out_400", (400, TIMED_OUT_400)),
    ("not_connected_404", (404, {"ok": False, "error": "Device is not connected"})),
])
async def test_an_offline_device_is_answered_as_configured(
        offline: Any, answer: tuple[int, Any]) -> None:
    cloud = ParticleCloud([Device("d1", functions={"led": int_arg})], tokens=["tok"],
                          behaviour=CloudBehaviour(offline=offline))
    async with serve_app(cloud.app) as base, aiohttp.ClientSession() as s:
        assert await call(base, "/v1/devices/d1/led", data={"arg": "1"}) == (
            200, {"id": "d1", "connected": True, "return_value": 1})
        async with s.post(f"{base}/_admin/devices/d1", json={"online": False}) as r:
            assert (r.status, await r.json()) == (200, {"id": "d1", "online": False})
        assert await call(base, "/v1/devices/d1/led", data={"arg": "0"}) == answer
        async with s.post(f"{base}/_admin/devices/d1", json={"online": "no"}) as r:
            assert r.status == 400
        async with s.post(f"{base}/_admin/devices/ghost", json={"online": True}) as r:
            assert r.status == 404
        cloud.set_online("d1", True)
        assert await call(base, "/v1/devices/d1/led", data={"arg": "0"}) == (
            200, {"id": "d1", "connected": True, "return_value": 0})
        async with s.get(f"{base}/_admin/calls") as r:
            admin = await r.json()
    assert admin["counts"] == {"200": 2, str(answer[0]): 1}
    assert [c["arg"] for c in admin["calls"]] == ["1", "0", "0"]
    assert admin["devices"]["d1"] == {"online": True, "applied": {"led": "0"}}


async def test_argument_length_and_unknown_device_answers_are_configurable() -> None:
    cloud = ParticleCloud(["d1"], tokens=["tok"], behaviour=CloudBehaviour(
        max_arg_len=63, arg_too_long_status=408, unknown_device="permission_denied_403"))
    async with serve_app(cloud.app) as base:
        assert (await call(base, "/v1/devices/d1/f", data={"arg": "x" * 63}))[0] == 200
        assert await call(base, "/v1/devices/d1/f", data={"arg": "x" * 64}) == (
            408, ARG_TOO_LONG)
        status, body = await call(base, "/v1/devices/nobody/f", data={"arg": "1"})
    assert (status, body["error"]) == (403, "Permission Denied")
    assert cloud.devices["d1"].applied == {"f": "x" * 63}


async def test_the_readme_send_example_runs_until_ctrl_c() -> None:
    """README's ``emulate particle send`` line, as written (only the URL points at a local
    receiver): it sends with the bridge's secret header until Ctrl-C, then prints its counts."""
    found = re.search(r"^blynk-bridge (emulate particle send .*?)\s+#", README.read_text(),
                      re.M)
    assert found, "README has no `emulate particle send` example"
    receiver = Receiver([])
    async with serve_app(receiver.app) as base:
        line = found.group(1).replace("http://127.0.0.1:8080/particle/trackers", f"{base}/hook")
        assert line != found.group(1)
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", f"exec '{sys.executable}' -m blynk_bridge {line}",
            env=os.environ | {"PARTICLE_WEBHOOK_SECRET": "s3cret-from-env"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await wait_until(lambda: receiver.requests or proc.returncode is not None,
                         what="the first webhook")
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    counts = json.loads(out)
    assert counts["sent"] >= 1 and counts["dropped"] == 0
    assert all(h["X-Bridge-Secret"] == "s3cret-from-env" for _, h, _ in receiver.requests)
    assert all(h["Content-Type"] == "application/json" for _, h, _ in receiver.requests)
