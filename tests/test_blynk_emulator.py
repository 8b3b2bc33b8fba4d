"""Contract tests of the Blynk emulator over real HTTP; the reference's examples are expectations.

Every documented error string of ``docs/reference/blynk-api.md`` appears here verbatim.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from emulators.blynk import (
    BlynkEmulator,
    DatastreamSpec,
    DeviceSpec,
    EmulatorSpec,
    MetafieldSpec,
    OAuthClient,
    Settings,
    TemplateSpec,
)
from emulators.blynk.cli import _regions
from emulators.blynk.settings import SpecError, load_spec

TOKEN = "xw7ITVneg1DifRRQuPGcA7fJvV8-FAVl"  # the docs' example token shape (32 chars)
NY_TOKEN = "P-0ekUL3EjrEkE_UnIIzsIggqyQXYd0z"
TEMPLATE = "TMPL84aMXD6vd"


def spec(**settings: Any) -> EmulatorSpec:
    template = TemplateSpec(
        id=TEMPLATE, name="ESP32 QA",
        datastreams=[
            DatastreamSpec(id=1, pin="V1", name="Temperature", type="double", min=-100, max=100),
            DatastreamSpec(id=2, pin="V2", name="Level", type="integer", min=0, max=100),
            DatastreamSpec(id=3, pin="V3", name="Location", type="location"),
            DatastreamSpec(id=4, pin="V4", name="Text", type="string"),
            DatastreamSpec(id=5, pin="V5", name="Speed", type="enum",
                           options={1: "low", 2: "mid", 3: "high"}, fallback=1),
            DatastreamSpec(id=6, pin="V6", name="WithDefault", type="integer", default=5),
        ],
        metafields=[MetafieldSpec(id=1, name="Device Name"),
                    MetafieldSpec(id=3, name="TheThingsNetwork Device")],
        events=["firmware_update"],
    )
    return EmulatorSpec(
        regions={"fra1": 0, "ny3": 0},
        settings=Settings(**settings),
        templates=[template],
        devices=[DeviceSpec(name="Dev A", token=TOKEN, template=TEMPLATE, id=1),
                 DeviceSpec(name="Dev NY", token=NY_TOKEN, template=TEMPLATE, id=2,
                            region="ny3")],
        oauth_clients=[OAuthClient(client_id="oa2-client-id_zmNtW", client_secret="s3cret")],
    )


class Api:
    """A tiny HTTP helper: ``(status, headers, text)`` of each request."""

    def __init__(self, session: aiohttp.ClientSession, urls: dict[str, str]) -> None:
        self.s = session
        self.urls = urls
        self.base = urls["fra1"]

    async def get(self, path: str, base: str | None = None) -> tuple[int, Any, str]:
        async with self.s.get((base or self.base) + path, allow_redirects=False) as r:
            return r.status, r.headers, await r.text()

    async def post(self, path: str, data: Any = None, **kw: Any) -> tuple[int, Any, str]:
        async with self.s.post(self.base + path, data=data, allow_redirects=False, **kw) as r:
            return r.status, r.headers, await r.text()


async def start(emu: BlynkEmulator) -> AsyncIterator[tuple[BlynkEmulator, Api]]:
    async with emu.serve({"fra1": 0, "ny3": 0}) as urls, aiohttp.ClientSession() as session:
        yield emu, Api(session, urls)


@pytest.fixture
async def env() -> AsyncIterator[tuple[BlynkEmulator, Api]]:
    async for pair in start(BlynkEmulator.from_spec(spec())):
        yield pair


def err(message: str) -> str:
    return '{"error":{"message":"' + message + '"}}'


# --- update -------------------------------------------------------------------------------------


async def test_update_pin_form_and_clamping(env: tuple[BlynkEmulator, Api]) -> None:
    _emu, api = env
    assert (await api.get(f"/external/api/update?token={TOKEN}&v2=50"))[::2] == (200, "")
    assert (await api.get(f"/external/api/get?token={TOKEN}&v2"))[2] == "50"
    await api.get(f"/external/api/update?token={TOKEN}&V2=314")
    assert (await api.get(f"/external/api/get?token={TOKEN}&v2"))[2] == "100"
    await api.get(f"/external/api/update?token={TOKEN}&v2=-2")
    assert (await api.get(f"/external/api/get?token={TOKEN}&V2"))[2] == "0"


async def test_update_errors_exact(env: tuple[BlynkEmulator, Api]) -> None:
    _, api = env
    cases = {
        "/external/api/update?token=nope&v1=1": "Invalid token.",
        "/external/api/update?v1=1": "Invalid token.",
        f"/external/api/update?token={TOKEN}&x1=1": "Wrong pin format.",
        f"/external/api/update?token={TOKEN}&v2=abc": "Value doesn't match the Datastream data "
                                                      "type.",
        f"/external/api/update?token={TOKEN}&v2=1.5": "Value doesn't match the Datastream data "
                                                      "type.",
        f"/external/api/update?token={TOKEN}&v99=1": "No datastream setup for that pin.",
        f"/external/api/update?token={TOKEN}&dataStreamId=x&value=1": "Wrong dataStreamId "
                                                                      "format.",
        # a digit to str.isdigit, not to int(): was a 500
        f"/external/api/update?token={TOKEN}&dataStreamId=%C2%B2&value=1": "Wrong dataStreamId "
                                                                           "format.",
        f"/external/api/update?token={TOKEN}&dataStreamId=2&value=z": "Value doesn't match the "
                                                                      "Datastream data type",
    }
    for path, message in cases.items():
        status, headers, body = await api.get(path)
        assert (status, body) == (400, err(message)), path
        assert headers["Content-Type"].startswith("application/json")


async def test_update_datastream_id_and_location_forms(env: tuple[BlynkEmulator, Api]) -> None:
    emu, api = env
    assert (await api.get(f"/external/api/update?token={TOKEN}&dataStreamId=1&value=24.5"))[0] \
        == 200
    assert (await api.get(f"/external/api/update?token={TOKEN}&dataStreamId=3"
                          "&value=-73.8731&value=40.8414"))[0] == 200
    assert emu.device_by_token(TOKEN).values["V3"][0] == [-73.8731, 40.8414]
    assert (await api.get(f"/external/api/update?token={TOKEN}&pin=V3&value=1.5&value=2.5"))[0] \
        == 200
    assert emu.device_by_token(TOKEN).value("V3") == [1.5, 2.5]
    assert emu.device_by_token(TOKEN).value("V1") == 24.5


async def test_enum_fallback_and_string_limit(env: tuple[BlynkEmulator, Api]) -> None:
    emu, api = env
    await api.get(f"/external/api/update?token={TOKEN}&v5=3")
    assert emu.device_by_token(TOKEN).value("V5") == 3
    await api.get(f"/external/api/update?token={TOKEN}&v5=9")
    assert emu.device_by_token(TOKEN).value("V5") == 1  # fallback
    status, _, body = await api.get(f"/external/api/update?token={TOKEN}&v4={'x' * 1025}")
    assert (status, body) == (400, err("Value doesn't match the Datastream data type."))


# --- batch/update -------------------------------------------------------------------------------


async def test_batch_update_one_message_one_timestamp(env: tuple[BlynkEmulator, Api]) -> None:
    emu, api = env
    status, _, body = await api.get(
        f"/external/api/batch/update?token={TOKEN}&V1=24.1&v2=54&V3=-73.8731,40.8414&v4=hi%20there")
    assert (status, body) == (200, "")
    dev = emu.device_by_token(TOKEN)
    stamps = {dev.values[p][1] for p in ("V1", "V2", "V3", "V4")}
    assert len(stamps) == 1
    assert dev.messages == 1
    assert emu.counts()["organization"]["messages"] == 1
    status, headers, body = await api.get(f"/external/api/get?token={TOKEN}&v1&v2&v3&v4")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert body == '{"v1":24.1,"v2":54,"v3":[-73.8731,40.8414],"v4":"hi there"}'


async def test_batch_update_location_as_two_params(env: tuple[BlynkEmulator, Api]) -> None:
    emu, api = env
    assert (await api.get(f"/external/api/batch/update?token={TOKEN}&V3=-73.8731&V3=40.8414"))[0] \
        == 200
    assert emu.device_by_token(TOKEN).value("V3") == [-73.8731, 40.8414]


async def test_batch_update_errors_and_reject_all(env: tuple[BlynkEmulator, Api]) -> None:
    emu, api = env
    cases = {
        "/external/api/batch/update?token=nope&v1=1": "Invalid token.",
        f"/external/api/batch/update?token={TOKEN}&foo=1": "Wrong pin format.",
        f"/external/api/batch/update?token={TOKEN}&v1=2&v2=x": "Value doesn't match the "
                                                               "Datastream data type",
    }
    for path, message in cases.items():
        assert (await api.get(path))[::2] == (400, err(message)), path
    assert "V1" not in emu.device_by_token(TOKEN).values  # rejected as a whole


async def test_batch_partial_apply_valid_and_ok_body() -> None:
    async for emu, api in start(BlynkEmulator.from_spec(
            spec(batch_partial="apply_valid", batch_success_body="OK"))):
        status, _, body = await api.get(f"/external/api/batch/update?token={TOKEN}&v1=2&v2=x")
        assert (status, body) == (400, err("Value doesn't match the Datastream data type"))
        assert emu.device_by_token(TOKEN).value("V1") == 2.0
        assert (await api.get(f"/external/api/batch/update?token={TOKEN}&v1=3"))[::2] == (200, "OK")


# --- timestamped upload -------------------------------------------------------------------------


async def test_upload_history(env: tuple[BlynkEmulator, Api]) -> None:
    emu, api = env
    now = int(time.time() * 1000)
    body = f"[[{now - 120_000},1.0],[{now - 60_000},2.0],[{now},3.0]]"
    path = f"/external/api/batch/update?token={TOKEN}&pin=v1"
    status, _, text = await api.post(path, body, headers={"Content-Type": "application/json"})
    assert (status, text) == (200, "OK")
    dev = emu.device_by_token(TOKEN)
    assert [v for _, v in dev.history["V1"]] == [1.0, 2.0, 3.0]
    assert dev.value("V1") == 3.0
    status, _, text = await api.post(path, body, headers={"Content-Type": "text/plain"})
    assert (status, text) == (400, err("Unknown content type."))
    too_many = "[" + ",".join(f"[{now},1]" for _ in range(10_001)) + "]"
    status, _, text = await api.post(path, too_many, headers={"Content-Type": "application/json"})
    assert (status, text) == (400, err("Too much data in batch. Maximum batch size is 10000 "
                                       "points."))
    old = f"[[{now - 40 * 86_400_000},1.0]]"
    assert (await api.post(path, old, headers={"Content-Type": "application/json"}))[0] == 400
    bad_pin = f"/external/api/batch/update?token={TOKEN}&pin=zz"
    status, _, text = await api.post(bad_pin, body, headers={"Content-Type": "application/json"})
    assert (status, text) == (400, err("Wrong pin format."))
    status, _, text = await api.post("/external/api/batch/update?token=nope&pin=v1", body,
                                     headers={"Content-Type": "application/json"})
    assert (status, text) == (400, err("Invalid token."))
    loc = f"/external/api/batch/update?token={TOKEN}&pin=v3"
    assert (await api.post(loc, f"[[{now},[32.12396,49.109466]]]",
                           headers={"Content-Type": "application/json"}))[0] == 200
    assert dev.value("V3") == [32.12396, 49.109466]


# --- reads --------------------------------------------------------------------------------------


async def test_get_forms_and_errors(env: tuple[BlynkEmulator, Api]) -> None:
    _, api = env
    await api.get(f"/external/api/batch/update?token={TOKEN}&v1=100&v4=string%20pin&v3=12,11")
    assert (await api.get(f"/external/api/get?token={TOKEN}&v1"))[::2] == (200, "100.0")
    assert (await api.get(f"/external/api/get?token={TOKEN}&dataStreamId=1"))[::2] == (200, "100.0")
    assert (await api.get(f"/external/api/get?token={TOKEN}&pin=V4"))[::2] == (200, "string pin")
    assert (await api.get(f"/external/api/get?token={TOKEN}&v6"))[::2] == (200, "5")  # default
    assert (await api.get(f"/external/api/get?token={TOKEN}&v2"))[::2] == (200, "")  # no value
    assert (await api.get(f"/external/api/getAll?token={TOKEN}"))[::2] == (
        200, '{"v1":100.0,"v3":[12.0,11.0],"v4":"string pin","v6":5}')
    assert (await api.get(f"/external/api/get?token={TOKEN}&v9"))[::2] == (
        400, err("Requested dataStream doesn't exist in the product ESP32 QA"))
    assert (await api.get(f"/external/api/get?token={TOKEN}&bogus"))[::2] == (
        400, err("Wrong pin format."))
    assert (await api.get("/external/api/get?token=nope&v1"))[::2] == (400, err("Invalid token."))
    assert (await api.get("/external/api/getAll?token=nope"))[::2] == (400, err("Invalid token."))


async def test_double_format_setting() -> None:
    async for _, api in start(BlynkEmulator.from_spec(spec(double_format="{:.5f}"))):
        await api.get(f"/external/api/update?token={TOKEN}&v1=100")
        assert (await api.get(f"/external/api/get?token={TOKEN}&v1"))[2] == "100.00000"


async def test_is_hardware_connected_and_log_event(env: tuple[BlynkEmulator, Api]) -> None:
    emu, api = env
    assert (await api.get(f"/external/api/isHardwareConnected?token={TOKEN}"))[::2] == (
        200, "false")
    assert (await api.get("/external/api/isHardwareConnected?token=nope"))[::2] == (
        400, err("Invalid token."))
    assert (await api.get(f"/external/api/logEvent?token={TOKEN}&code=firmware_update"
                          "&description=test"))[::2] == (200, "")
    assert emu.device_by_token(TOKEN).events[0][1:] == ("firmware_update", "test")
    assert (await api.get(f"/external/api/logEvent?token={TOKEN}"))[::2] == (
        400, err("Event code is not provided."))
    assert (await api.get(f"/external/api/logEvent?token={TOKEN}&code=nope"))[::2] == (
        400, err("Can't find Event with this code in Product template"))


async def test_update_property(env: tuple[BlynkEmulator, Api]) -> None:
    emu, api = env
    assert (await api.get(f"/external/api/update/property?token={TOKEN}&pin=v1"
                          "&isDisabled=true&label=Hot"))[::2] == (200, "")
    assert emu.device_by_token(TOKEN).properties["V1"] == {"isDisabled": "true", "label": "Hot"}
    assert (await api.get(f"/external/api/update/property?token={TOKEN}&pin=q1&label=x"))[::2] \
        == (400, err("Wrong pin format."))
    assert (await api.get(f"/external/api/update/property?token={TOKEN}&pin=v1"
                          "&isDisabled=maybe"))[::2] == (
        400, err("Value doesn't match the Datastream data type"))
    assert (await api.get("/external/api/update/property?token=nope&pin=v1&label=x"))[::2] == (
        400, err("Invalid token."))


async def test_device_meta(env: tuple[BlynkEmulator, Api]) -> None:
    _, api = env
    assert (await api.get(f"/external/api/device/meta/update?token={TOKEN}&metaFieldId=3"
                          "&value=Sample+value"))[0] == 200
    assert (await api.get(f"/external/api/device/meta?token={TOKEN}&metaFieldId=3"))[::2] == (
        200, "Sample value")
    assert (await api.get(f"/external/api/device/meta/update?token={TOKEN}"
                          "&metaFieldName=Device%20Name&value=x"))[0] == 200
    assert (await api.get(f"/external/api/device/meta?token={TOKEN}&metaFieldId=Device%20Name")
            )[2] == "x"
    assert (await api.get(f"/external/api/device/meta?token={TOKEN}"))[::2] == (
        400, err("Wrong metaField format."))
    assert (await api.get(f"/external/api/device/meta?token={TOKEN}&metaFieldId=99"))[::2] == (
        400, err("MetaField doesn't exist."))
    assert (await api.get("/external/api/device/meta?token=nope&metaFieldId=3"))[::2] == (
        400, err("Invalid token."))
    assert (await api.get(f"/external/api/device/meta/update?token={TOKEN}&value=1"))[::2] == (
        400, err("Wrong metaField format"))
    assert (await api.get(f"/external/api/device/meta/update?token={TOKEN}&metaFieldId=99"
                          "&value=1"))[::2] == (400, err("MetaField doesn't exist"))
    assert (await api.get(f"/external/api/device/meta/update?token={TOKEN}&metaFieldId=3"))[::2] \
        == (400, err("Wrong value"))


# --- regions ------------------------------------------------------------------------------------


async def test_wrong_region_308_with_location(env: tuple[BlynkEmulator, Api]) -> None:
    emu, api = env
    path = f"/external/api/isHardwareConnected?token={NY_TOKEN}"
    status, headers, body = await api.get(path)
    assert (status, body) == (308, "")
    assert headers["Location"] == api.urls["ny3"] + path
    assert headers["Content-Length"] == "0"
    assert (await api.get(path, base=api.urls["ny3"]))[::2] == (200, "false")
    batch = f"/external/api/batch/update?token={NY_TOKEN}&v1=1&v2=2"
    status, headers, _ = await api.get(batch)
    assert (status, headers["Location"]) == (308, api.urls["ny3"] + batch)
    assert emu.device_by_token(NY_TOKEN).values == {}


async def test_wrong_region_as_invalid_token_setting() -> None:
    async for _, api in start(BlynkEmulator.from_spec(spec(wrong_region="invalid_token"))):
        assert (await api.get(f"/external/api/get?token={NY_TOKEN}&v1"))[::2] == (
            400, err("Invalid token."))


# --- limits -------------------------------------------------------------------------------------


async def test_rate_limit_429_json_retry_after() -> None:
    async for emu, api in start(BlynkEmulator.from_spec(spec(device_rps=3))):
        statuses = [(await api.get(f"/external/api/update?token={TOKEN}&v2=1"))
                    for _ in range(6)]
        refused = [r for r in statuses if r[0] == 429]
        assert refused, "a burst past the per-device rate must be refused"
        _status, headers, body = refused[0]
        assert body == err("Too many requests.") and headers["Retry-After"] == "1"
        assert emu.counts()["refused"]["rate"] == len(refused)
        assert emu.device_by_token(TOKEN).messages == 6 - len(refused)


async def test_daily_and_monthly_quotas_configurable_answer() -> None:
    emu = BlynkEmulator.from_spec(spec(device_rps=None, daily_updates=2, monthly_messages=3,
                                       over_limit_status=403, over_limit_message="Quota."))
    async for _, api in start(emu):
        r = [(await api.get(f"/external/api/update?token={TOKEN}&v2=1"))[0] for _ in range(3)]
        assert r == [200, 200, 403]
        assert (await api.get(f"/external/api/get?token={TOKEN}&v2"))[0] == 200  # 3rd message
        assert (await api.get(f"/external/api/get?token={TOKEN}&v2"))[::2] == (403, err("Quota."))
        counts = emu.counts()
        assert counts["organization"]["messages"] == 3
        assert counts["devices"]["1"]["messages"] == 3


async def test_request_size_limit() -> None:
    async for _, api in start(BlynkEmulator.from_spec(spec(max_request_bytes=4096))):
        big = "[" + ",".join(f"[{int(time.time() * 1000)},1]" for _ in range(400)) + "]"
        status, _, _ = await api.post(f"/external/api/batch/update?token={TOKEN}&pin=v2", big,
                                      headers={"Content-Type": "application/json"})
        assert status == 413


# --- platform API -------------------------------------------------------------------------------


def basic(user: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


async def platform_token(api: Api) -> str:
    status, _, body = await api.post("/oauth2/token?grant_type=client_credentials",
                                     headers=basic("oa2-client-id_zmNtW", "s3cret"))
    assert status == 200
    data = json.loads(body)
    assert data["token_type"] == "Bearer" and data["expires_in"] == 300
    assert set(data) == {"access_token", "token_type", "expires_in", "refresh_token"}
    return str(data["access_token"])


async def test_oauth_token_forms_and_errors(env: tuple[BlynkEmulator, Api]) -> None:
    _, api = env
    await platform_token(api)
    status, _, body = await api.post("/oauth2/token?grant_type=client_credentials"
                                     "&client_id=oa2-client-id_zmNtW&client_secret=s3cret")
    assert status == 200
    refresh = json.loads(body)["refresh_token"]
    status, _, _ = await api.post(f"/oauth2/token?grant_type=refresh_token&refresh_token={refresh}",
                                  headers=basic("oa2-client-id_zmNtW", "s3cret"))
    assert status == 200
    status, _, body = await api.post("/oauth2/token?grant_type=client_credentials",
                                     headers=basic("oa2-client-id_zmNtW", "wrong"))
    assert (status, body) == (400, '{"error":"invalid_client","error_description":"Client ID is '
                                   'not found or password is wrong."}')
    status, _, body = await api.post("/oauth2/token?grant_type=password",
                                     headers=basic("oa2-client-id_zmNtW", "s3cret"))
    assert status == 400 and '"unsupported_grant_type"' in body


async def test_platform_devices(env: tuple[BlynkEmulator, Api]) -> None:
    emu, api = env
    bearer = {"Authorization": f"Bearer {await platform_token(api)}"}
    org = "/api/v1/organization"
    assert (await api.get(f"{org}/device?deviceId=1"))[0] == 401
    status, _, body = await api.post(f"{org}/device/create", headers=bearer,
                                     json={"templateId": TEMPLATE, "orgId": 1,
                                           "name": "API Test Device", "ownerId": 1})
    assert status == 201
    created = json.loads(body)
    assert len(created["token"]) == 32 and created["name"] == "API Test Device"
    assert created["hardwareInfo"]["templateId"] == TEMPLATE
    assert isinstance(created["templateId"], int)
    dev_id = created["id"]
    status, _, body = await api.post(f"{org}/device/create", headers=bearer,
                                     json={"templateId": "TMPLnope", "name": "x"})
    assert (status, body) == (404, err("Template is not found."))
    async with api.s.get(api.base + f"{org}/device?deviceId=999", headers=bearer) as r:
        assert (r.status, await r.text()) == (
            404, err("Device with identifier 999 is not found or belong to another organization."))
    async with api.s.get(api.base + f"{org}/template/metafields?templateId={TEMPLATE}",
                         headers=bearer) as r:
        fields = await r.json()
    assert [f["name"] for f in fields] == ["Device Name", "TheThingsNetwork Device"]
    status, _, _ = await api.post(f"{org}/device/metafield", headers=bearer,
                                  json={"deviceId": dev_id, "metaFieldId": 3,
                                        "newValue": "eui-526973696e671256"})
    assert status == 204
    status, _, body = await api.post(f"{org}/device/metafield", headers=bearer,
                                     json={"deviceId": dev_id, "metaFieldId": 77, "newValue": 1})
    assert (status, body) == (404, err("Meta field is not found."))
    status, _, _ = await api.post(f"{org}/device/datastream", headers=bearer,
                                  json={"deviceId": dev_id, "dataStreamId": 2, "value": 5})
    assert status == 204
    status, _, body = await api.post(f"{org}/device/datastream", headers=bearer,
                                     json={"deviceId": dev_id, "dataStreamId": 42, "value": 5})
    assert (status, body) == (404, err("Data stream with identifier 42 is not found!"))
    status, _, _ = await api.post(f"{org}/device/datastreams", headers=bearer,
                                  json={"deviceId": dev_id, "values": {"1": 5, "4": "new value"}})
    assert status == 204
    async with api.s.get(api.base + f"{org}/device/datastreams?deviceId={dev_id}&pins=v1,v2,v4",
                         headers=bearer) as r:
        assert await r.json() == {"v1": 5.0, "v2": 5, "v4": "new value"}
    async with api.s.get(api.base + f"{org}/device?deviceId={dev_id}", headers=bearer) as r:
        full = await r.json()
    assert {v["pin"] for v in full["dataStreamValues"]} == {"v1", "v2", "v4"}
    assert {"id": 3, "name": "TheThingsNetwork Device",
            "value": {"type": "Text", "value": "eui-526973696e671256"}} in full["metaFieldValues"]
    async with api.s.get(api.base + f"{org}/device/metafield?deviceId={dev_id}",
                         headers=bearer) as r:
        assert {"id": 3, "name": "TheThingsNetwork Device",
                "value": "eui-526973696e671256"} in await r.json()
    async with api.s.get(api.base + f"{org}/devices?page=0&size=20", headers=bearer) as r:
        assert (await r.json())["totalElements"] == 3
    async with api.s.get(api.base + f"{org}/search/devices?query=api+test", headers=bearer) as r:
        found = await r.json()
    assert [d["id"] for d in found["content"]] == [dev_id]
    async with api.s.get(api.base + f"{org}/template/datastreams?templateId={TEMPLATE}",
                         headers=bearer) as r:
        ds = await r.json()
    assert ds[0] == {"id": 1, "label": "Temperature", "alias": "Temperature", "units": None,
                     "type": "DOUBLE", "defaultValue": None, "pin": 1, "pinType": "VIRTUAL",
                     "min": -100.0, "max": 100.0}
    async with api.s.get(api.base + f"{org}/template/datastreams?templateId=TMPLx",
                         headers=bearer) as r:
        assert (r.status, await r.text()) == (
            404, err("Template is not found or you don't have access to it."))
    # the new device answers on the device API with its token
    assert (await api.get(f"/external/api/get?token={created['token']}&v2"))[2] == "5"
    assert emu.model.devices[dev_id].metafields[3] == "eui-526973696e671256"


async def test_platform_token_expiry_and_rate_limit() -> None:
    now = [1_000_000.0]
    emu = BlynkEmulator.from_spec(spec(platform_rpm=2), clock=lambda: now[0])
    async for _, api in start(emu):
        bearer = {"Authorization": f"Bearer {await platform_token(api)}"}
        url = api.base + "/api/v1/organization/devices"
        async with api.s.get(url, headers=bearer) as r:
            assert r.status == 200
        async with api.s.get(url, headers=bearer) as r:
            assert r.status == 200
        async with api.s.get(url, headers=bearer) as r:
            assert r.status == 429 and int(r.headers["Retry-After"]) >= 1
        now[0] += 301  # past expires_in
        async with api.s.get(url, headers=bearer) as r:
            assert r.status == 401


# --- faults and inspection ----------------------------------------------------------------------


async def test_faults_switchable_at_run_time(env: tuple[BlynkEmulator, Api]) -> None:
    _emu, api = env
    status, _, _ = await api.post("/_admin/faults", json={"error_rate": 1.0, "error_status": 502})
    assert status == 200
    assert (await api.get(f"/external/api/get?token={TOKEN}&v1"))[0] == 502
    await api.post("/_admin/faults", json={"storm_429_s": 60, "retry_after_s": 7})
    status, headers, _ = await api.get(f"/external/api/get?token={TOKEN}&v1")
    assert (status, headers["Retry-After"]) == (429, "7")
    await api.post("/_admin/faults", json={"outage_s": 60})
    assert (await api.get(f"/external/api/get?token={TOKEN}&v1"))[0] == 503
    await api.post("/_admin/faults", json={"drop_rate": 1.0})
    with pytest.raises(aiohttp.ClientError):
        await api.get(f"/external/api/get?token={TOKEN}&v1")
    async with api.s.delete(api.base + "/_admin/faults") as r:
        assert r.status == 200
    assert (await api.get(f"/external/api/get?token={TOKEN}&v1"))[0] == 200
    async with api.s.get(api.base + "/_admin/faults") as r:
        injected = (await r.json())["injected"]
    # aiohttp's client may retry a GET once on a dropped keep-alive connection
    assert injected["502"] == injected["429"] == injected["outage"] == 1
    assert injected["drop"] >= 1


async def test_inspection_masks_tokens_and_reset(env: tuple[BlynkEmulator, Api]) -> None:
    emu, api = env
    await api.get(f"/external/api/batch/update?token={TOKEN}&v1=1")
    async with api.s.get(api.base + "/_admin/requests") as r:
        text = await r.text()
    assert TOKEN not in text and "token=…FAVl" in text
    async with api.s.get(api.base + "/_admin/devices/1") as r:
        state = await r.json()
    assert TOKEN not in str(state)
    assert state["values"]["v1"]["value"] == 1.0 and len(state["history"]["v1"]) == 1
    async with api.s.get(api.base + "/_admin/counts") as r:
        assert (await r.json())["devices"]["1"]["messages"] == 1
    await api.post("/_admin/reset")
    assert emu.device_by_token(TOKEN).values == {} and emu.recorded() == []


def test_example_file_loads_and_regions_flag(fixture_path: Any, tmp_path: Any) -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    example = root / "blynk_bridge" / "examples" / "blynk-emulator.yaml"
    emu = BlynkEmulator.from_spec(load_spec(example, {"BLYNK_WEBHOOK_SECRET": "0123abcd"}))
    assert emu.model.templates and emu.model.devices
    # The demo's webhook (the valve switch to ingest-http) follows Blynk's form rules; without
    # BRIDGE_URL it posts to the bridge on this machine.
    hook = emu.webhooks.hooks["valve to bridge"].spec
    assert hook.headers == {"X-Blynk-Secret": "0123abcd"}
    assert hook.url == "http://127.0.0.1:8080/blynk/demo"
    assert _regions("fra1=8081,ny3=8082") == {"fra1": 8081, "ny3": 8082}


SUBSTITUTED = """
regions: {fra1: "${FRA1_PORT:-8081}"}
webhooks:
  - name: hook
    trigger: template_datastream
    template: TMPL1
    datastream: V1
    url: ${BRIDGE_URL:-http://127.0.0.1:8080}/blynk/demo
    headers: {X-Secret: "${HOOK_SECRET}"}
    body: $${not a variable}
"""


def test_spec_takes_variables_from_the_environment(tmp_path: Any) -> None:
    path = tmp_path / "emu.yaml"
    path.write_text(SUBSTITUTED)
    env = {"BRIDGE_URL": "http://ingest-http:8080", "HOOK_SECRET": "s3cr3t", "FRA1_PORT": "9001"}
    loaded = load_spec(path, env)
    (hook,) = loaded.webhooks
    assert hook.url == "http://ingest-http:8080/blynk/demo"
    assert hook.headers == {"X-Secret": "s3cr3t"}
    assert hook.body == "${not a variable}"  # $${ is a literal ${, as in the bridge's file
    assert loaded.regions == {"fra1": 9001}  # a number spelled by a variable is read as one


def test_spec_variable_defaults_apply_when_unset(tmp_path: Any) -> None:
    path = tmp_path / "emu.yaml"
    path.write_text(SUBSTITUTED)
    loaded = load_spec(path, {"HOOK_SECRET": "s3cr3t"})
    assert loaded.webhooks[0].url == "http://127.0.0.1:8080/blynk/demo"
    assert loaded.regions == {"fra1": 8081}


def test_spec_unset_variable_without_default_names_it_the_key_and_file(tmp_path: Any) -> None:
    path = tmp_path / "emu.yaml"
    path.write_text(SUBSTITUTED)
    with pytest.raises(SpecError) as err:
        load_spec(path, {})
    message = str(err.value)
    assert str(path) in message
    assert "${HOOK_SECRET}" in message and "webhooks[0].headers.X-Secret" in message
    assert "BRIDGE_URL" not in message and "FRA1_PORT" not in message  # those have defaults



async def test_app_for_serve_app_shares_state_and_redirects() -> None:
    from tests.conftest import serve_app

    emu = BlynkEmulator.from_spec(spec())
    async with serve_app(emu.app("fra1")) as fra1, serve_app(emu.app("ny3")) as ny3, \
            aiohttp.ClientSession() as s:
        emu.bind_region("ny3", ny3)
        async with s.get(f"{fra1}/external/api/batch/update?token={NY_TOKEN}&v1=2",
                         allow_redirects=False) as r:
            assert (r.status, r.headers["Location"]) == (
                308, f"{ny3}/external/api/batch/update?token={NY_TOKEN}&v1=2")
        async with s.get(f"{ny3}/external/api/batch/update?token={NY_TOKEN}&v1=2") as r:
            assert r.status == 200
        async with s.get(f"{fra1}/external/api/nothing?token={TOKEN}") as r:
            assert (r.status, await r.text()) == (404, err("Not found."))
    assert emu.device_by_token(NY_TOKEN).value("V1") == 2.0


def test_write_current_is_write_per_value() -> None:
    """The device API's one-call write gives what ``Model.write`` per value gives."""
    got: dict[str, list[tuple[Any, ...]]] = {"loop": [], "once": []}
    states = []
    for how in ("loop", "once"):
        emu = BlynkEmulator.from_spec(spec())
        model = emu.model
        model.listeners.append(lambda d, ds, v, ts, how=how: got[how].append((d.id, ds.pin, v, ts)))
        dev = emu.device_by_token(TOKEN)
        by_pin = dev.template.by_pin
        batches = [[("V1", 1.5), ("V3", [1.0, 2.0]), ("V1", 2.5)], [("V2", 7)], [("V1", 0.5)]]
        for ts, values in zip((2000, 1000, 3000), batches, strict=True):
            pairs = [(by_pin[p], v) for p, v in values]
            if how == "loop":
                for ds, v in pairs:
                    model.write(dev, ds, v, ts)
            else:
                model.write_current(dev, pairs, ts)
        states.append((dev.values, {p: list(h) for p, h in dev.history.items()}))
    assert states[0] == states[1]
    assert got["loop"] == got["once"] and len(got["once"]) == 5



def test_from_file_refuses_a_header_value_blynk_would_not_take(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A secret from the environment with a sign Blynk's webhook form refuses: a SpecError
    naming the file (the CLI's one-line error), not a traceback."""
    path = tmp_path / "emu.yaml"
    path.write_text(SUBSTITUTED.replace("TMPL1", TEMPLATE) + f"""
templates:
  - {{id: {TEMPLATE}, name: t, datastreams: [{{id: 1, pin: V1, name: v, type: integer}}]}}
""")
    monkeypatch.setenv("HOOK_SECRET", "abc123")
    assert BlynkEmulator.from_file(path).webhooks.hooks["hook"].spec.headers == {
        "X-Secret": "abc123"}
    monkeypatch.setenv("HOOK_SECRET", "a+b=c")
    with pytest.raises(SpecError, match=r"emu\.yaml: .*X-Secret.*Blynk allows only"):
        BlynkEmulator.from_file(path)
