"""Platform (organization) API subset: OAuth2 client credentials and device/template calls.

Shapes and messages follow ``blynk-api.md`` section 3. Access tokens expire after
``settings.token_expires_in`` seconds (401 afterwards); more than ``settings.platform_rpm``
requests a minute answer 429 with ``Retry-After``. Identifiers travel as query parameters, bodies
are JSON. Writes made here are datastream updates like any other: they fire webhooks.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from emulators.blynk.device_api import Route, error
from emulators.blynk.model import Device, Mismatch, Template, canonical_pin, is_id

if TYPE_CHECKING:
    from emulators.blynk.server import BlynkEmulator

_JSON = "application/json"
_NAME = re.compile(r"[A-Za-z0-9 '_-]{1,50}")

TEMPLATE_NOT_FOUND = "Template is not found."
TEMPLATE_NO_ACCESS = "Template is not found or you don't have access to it."
DEVICE_NOT_FOUND = "Device with identifier {id} is not found or belong to another organization."
DATASTREAM_NOT_FOUND = "Data stream with identifier {id} is not found!"
META_NOT_FOUND = "Meta field is not found."
META_INVALID = "The provided value for metafield is invalid."
BAD_CLIENT = "Client ID is not found or password is wrong."


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(data), content_type=_JSON)


def _oauth_error(code: str, description: str) -> web.Response:
    return _json({"error": code, "error_description": description}, 400)


class PlatformApi:
    def __init__(self, emu: BlynkEmulator) -> None:
        self.emu = emu
        self.model = emu.model
        self.settings = emu.settings
        #: access token → (client id, expiry epoch s); refresh token → client id.
        self.access: dict[str, tuple[str, float]] = {}
        self.refresh: dict[str, str] = {}
        self.clients = {c.client_id: c.client_secret for c in emu.spec_clients}
        self.tokens_issued = 0
        self._minute = 0
        self._minute_count = 0

    def routes(self) -> list[Route]:
        base = "/api/v1/organization"
        return [
            ("POST", "/oauth2/token", self.token),
            ("POST", f"{base}/device/create", self.create_device),
            ("GET", f"{base}/device", self.get_device),
            ("PUT", f"{base}/device", self.put_device),
            ("GET", f"{base}/devices", self.list_devices),
            ("GET", f"{base}/search/devices", self.search_devices),
            ("GET", f"{base}/device/datastreams", self.device_datastreams),
            ("POST", f"{base}/device/datastream", self.write_datastream),
            ("POST", f"{base}/device/datastreams", self.write_datastreams),
            ("POST", f"{base}/device/import/batch", self.import_batch),
            ("GET", f"{base}/device/metafield", self.get_metafields),
            ("POST", f"{base}/device/metafield", self.set_metafield),
            ("GET", f"{base}/template/datastreams", self.template_datastreams),
            ("GET", f"{base}/template/metafields", self.template_metafields),
        ]

    # OAuth2 ----------------------------------------------------------------------------------
    async def token(self, request: web.BaseRequest) -> web.Response:
        q = request.query
        grant = q.get("grant_type")
        client_id, secret = q.get("client_id"), q.get("client_secret")
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            try:
                client_id, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return _oauth_error("invalid_request", "Malformed Basic authorization.")
        if grant is None:
            return _oauth_error("invalid_request", "grant_type is missing.")
        if grant not in ("client_credentials", "refresh_token"):
            return _oauth_error("unsupported_grant_type", f"Unsupported grant type {grant}.")
        if client_id is None or self.clients.get(client_id) != secret:
            return _oauth_error("invalid_client", BAD_CLIENT)
        if grant == "refresh_token":
            owner = self.refresh.pop(q.get("refresh_token", ""), None)
            if owner != client_id:
                return _oauth_error("invalid_grant", "Refresh token is invalid.")
        access, refresh = secrets.token_urlsafe(30), secrets.token_urlsafe(30)
        expires = self.settings.token_expires_in
        self.access[access] = (client_id, self.emu.clock() + expires)
        self.refresh[refresh] = client_id
        self.tokens_issued += 1
        return _json({"access_token": access, "token_type": "Bearer", "expires_in": expires,
                      "refresh_token": refresh})

    def expire_tokens(self) -> None:
        """Make every issued access token expired (tests: the client must refresh)."""
        self.access.clear()

    def _guard(self, request: web.BaseRequest) -> web.Response | None:
        auth = request.headers.get("Authorization", "")
        got = self.access.get(auth[7:]) if auth.startswith("Bearer ") else None
        now = self.emu.clock()
        if got is None or got[1] <= now:
            return error("Unauthorized.", 401)
        rpm = self.settings.platform_rpm
        if rpm is not None:
            minute = int(now // 60)
            if minute != self._minute:
                self._minute, self._minute_count = minute, 0
            if self._minute_count >= rpm:
                resp = error("Too Many Requests", 429)
                resp.headers["Retry-After"] = str(max(1, int(60 - now % 60)))
                return resp
            self._minute_count += 1
        return None

    def _device(self, raw: Any) -> Device | web.Response:
        if isinstance(raw, str) and is_id(raw):
            raw = int(raw)
        dev = self.model.devices.get(raw) if isinstance(raw, int) else None
        if dev is None:
            return error(DEVICE_NOT_FOUND.format(id=raw), 404)
        return dev

    async def _device_call(
        self, request: web.BaseRequest
    ) -> tuple[dict[str, Any], Device] | web.Response:
        """The preamble of every device call with a JSON body: token, body, ``deviceId``."""
        if (denied := self._guard(request)) is not None:
            return denied
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        d = self._device(body.get("deviceId"))
        if isinstance(d, web.Response):
            return d
        return body, d

    async def _body(self, request: web.BaseRequest) -> dict[str, Any] | web.Response:
        try:
            body = msgspec.json.decode(await request.read())
        except msgspec.DecodeError:
            return error("Body is not valid JSON.")
        if not isinstance(body, dict):
            return error("Body must be a JSON object.")
        return body

    # devices ---------------------------------------------------------------------------------
    def device_json(self, d: Device, full: bool = False) -> dict[str, Any]:
        s = self.settings
        out: dict[str, Any] = {
            "id": d.id, "templateId": d.template.num, "orgId": s.org_id, "name": d.name,
            "token": d.token,
            "lifecycleStatus": {"name": "Offline", "icon": "icon", "color": "#334455"},
            "activatedAt": d.activated_at, "firstConnectTime": 0, "firmwareUpdatedAt": 0,
            "connectTime": 0, "disconnectTime": 0, "ownerUserId": s.owner_id,
            "hardwareInfo": {"version": "1.0.0", "fwType": d.template.id,
                             "blynkVersion": "1.0.0", "boardType": "Other", "build": "1",
                             "templateId": d.template.id},
            "ip": "127.0.0.1", "isLocked": False, "lastReceivedEventAt": d.last_data_ms,
        }
        if full:
            out["dataStreamValues"] = [
                {"dataStreamId": ds.id, "pin": ds.pin.lower(), "dataStreamLabel": ds.name,
                 "dataStreamAlias": ds.alias, "value": d.values[ds.pin][0],
                 "updatedAt": d.values[ds.pin][1]}
                for ds in d.template.datastreams if ds.pin in d.values]
            out["metaFieldValues"] = [
                {"id": m.id, "name": m.name,
                 "value": {"type": m.type, "value": d.metafields.get(m.id, "")}}
                for m in d.template.metafields]
        return out

    async def create_device(self, request: web.BaseRequest) -> web.Response:
        if (denied := self._guard(request)) is not None:
            return denied
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        t = self.model.template(str(body.get("templateId", "")))
        if t is None:
            return error(TEMPLATE_NOT_FOUND, 404)
        name = body.get("name")
        if not isinstance(name, str) or (self.settings.validate_device_names
                                         and not _NAME.fullmatch(name)):
            return error("Device name is invalid.")
        d = self.model.add_device(t.id, name, now_ms=self.emu.now_ms())
        return _json(self.device_json(d), 201)

    async def get_device(self, request: web.BaseRequest) -> web.Response:
        if (denied := self._guard(request)) is not None:
            return denied
        d = self._device(request.query.get("deviceId"))
        return d if isinstance(d, web.Response) else _json(self.device_json(d, full=True))

    async def put_device(self, request: web.BaseRequest) -> web.Response:
        if (denied := self._guard(request)) is not None:
            return denied
        d = self._device(request.query.get("deviceId"))
        if isinstance(d, web.Response):
            return d
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        if isinstance(body.get("name"), str):
            d.name = body["name"]
        return _json(self.device_json(d))

    def _page(self, request: web.BaseRequest, devices: list[Device]) -> web.Response:
        try:
            page = int(request.query.get("page", "0"))
            size = min(int(request.query.get("size", "50")), 1000)
        except ValueError:
            return error("Wrong page or size.")
        chunk = devices[page * size:(page + 1) * size]
        return _json({"content": [self.device_json(d) for d in chunk],
                      "totalElements": len(devices)})

    async def list_devices(self, request: web.BaseRequest) -> web.Response:
        if (denied := self._guard(request)) is not None:
            return denied
        return self._page(request, list(self.model.devices.values()))

    async def search_devices(self, request: web.BaseRequest) -> web.Response:
        if (denied := self._guard(request)) is not None:
            return denied
        query = request.query.get("query", "")[:255]
        found = self.model.search(query, metafields=self.settings.search_matches_metafields)
        return self._page(request, found)

    async def device_datastreams(self, request: web.BaseRequest) -> web.Response:
        if (denied := self._guard(request)) is not None:
            return denied
        d = self._device(request.query.get("deviceId"))
        if isinstance(d, web.Response):
            return d
        wanted = [p for p in request.query.get("pins", "").split(",") if p]
        pins = [canonical_pin(p) for p in wanted] if wanted else list(d.template.by_pin)
        out = {}
        for pin in pins:
            v = d.value(pin) if pin else None
            if pin and v is not None:
                out[pin.lower()] = v
        return _json(out)

    def _write(self, d: Device, ref: Any, value: Any) -> web.Response | None:
        ds = d.template.by_id.get(ref) if isinstance(ref, int) else None
        if ds is None and isinstance(ref, str) and is_id(ref):
            ds = d.template.by_id.get(int(ref))
        if ds is None:
            return error(DATASTREAM_NOT_FOUND.format(id=ref), 404)
        try:
            v = ds.coerce_json(value, string_max=self.settings.string_max_bytes)
        except Mismatch:
            return error("Value doesn't match the Datastream data type")
        self.model.write(d, ds, v, self.emu.now_ms(), origin="platform")
        return None

    async def write_datastream(self, request: web.BaseRequest) -> web.Response:
        got = await self._device_call(request)
        if isinstance(got, web.Response):
            return got
        body, d = got
        failed = self._write(d, body.get("dataStreamId"), body.get("value"))
        return failed or web.Response(status=204)

    async def write_datastreams(self, request: web.BaseRequest) -> web.Response:
        got = await self._device_call(request)
        if isinstance(got, web.Response):
            return got
        body, d = got
        values = body.get("values")
        if not isinstance(values, dict):
            return error("values must be an object.")
        for ref, value in values.items():
            failed = self._write(d, ref, value)
            if failed is not None:
                return failed
        return web.Response(status=204)

    async def import_batch(self, request: web.BaseRequest) -> web.Response:
        got = await self._device_call(request)
        if isinstance(got, web.Response):
            return got
        body, d = got
        ref = body.get("dataStreamId")
        ds = d.template.by_id.get(ref) if isinstance(ref, int) else None
        if ds is None:
            return error(DATASTREAM_NOT_FOUND.format(id=ref), 404)
        points = body.get("values")
        if not isinstance(points, list):
            return error("values must be a list.")
        try:
            parsed = sorted((int(p["ts"]), ds.coerce_json(p["value"])) for p in points)
        except (KeyError, TypeError, ValueError):
            return error("Value doesn't match the Datastream data type")
        for ts, v in parsed:
            self.model.write(d, ds, v, ts, notify=False, origin="platform")
        return web.Response(status=204)

    async def get_metafields(self, request: web.BaseRequest) -> web.Response:
        if (denied := self._guard(request)) is not None:
            return denied
        d = self._device(request.query.get("deviceId"))
        if isinstance(d, web.Response):
            return d
        return _json([{"id": m.id, "name": m.name, "value": d.metafields.get(m.id, "")}
                      for m in d.template.metafields])

    async def set_metafield(self, request: web.BaseRequest) -> web.Response:
        got = await self._device_call(request)
        if isinstance(got, web.Response):
            return got
        body, d = got
        ref = body.get("metaFieldId")
        m = d.template.metafield(ref) if isinstance(ref, int) else None
        if m is None:
            return error(META_NOT_FOUND, 404)
        value = body.get("newValue")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            return error(META_INVALID)
        d.metafields[m.id] = str(value)
        return web.Response(status=204)

    def _template(self, request: web.BaseRequest) -> Template | web.Response:
        t = self.model.template(request.query.get("templateId", ""))
        return t if t is not None else error(TEMPLATE_NO_ACCESS, 404)

    async def template_datastreams(self, request: web.BaseRequest) -> web.Response:
        if (denied := self._guard(request)) is not None:
            return denied
        t = self._template(request)
        if isinstance(t, web.Response):
            return t
        out = []
        for ds in t.datastreams:
            item: dict[str, Any] = {
                "id": ds.id, "label": ds.name, "alias": ds.alias, "units": ds.units,
                "type": ds.platform_type(), "defaultValue": ds.default,
                "pin": int(ds.pin[1:]),
                "pinType": {"V": "VIRTUAL", "A": "ANALOG", "D": "DIGITAL"}[ds.pin[0]],
                "min": ds.min, "max": ds.max,
            }
            if ds.options is not None:
                item["options"] = {str(k): v for k, v in ds.options.items()}
                item["fallback"] = ds.fallback
            out.append(item)
        return _json(out)

    async def template_metafields(self, request: web.BaseRequest) -> web.Response:
        if (denied := self._guard(request)) is not None:
            return denied
        t = self._template(request)
        if isinstance(t, web.Response):
            return t
        return _json([{"id": m.id, "name": m.name, "type": m.type} for m in t.metafields])
