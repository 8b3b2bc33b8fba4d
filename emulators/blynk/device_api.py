"""Device HTTPS API (``/external/api/…``), answered exactly as ``blynk-api.md`` section 1 says.

Every handler: token → device (``Invalid token.``), region check (308 with ``Location``), limits
(configurable over-limit answer), then the endpoint's own parsing. Errors are HTTP 400 with
``{"error":{"message":"…"}}`` and the documented strings, trailing periods included where the
docs have them. The hot path (``batch/update``) is dict lookups only: no regexes, no copies.

The GET endpoints are plain functions of (query, raw path) returning a :class:`Reply`, so one
code serves both the emulator's own HTTP front (:mod:`emulators.blynk.front`, which writes the
reply itself) and aiohttp (:meth:`DeviceApi.routes` wraps them into ``web.Response``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web
from multidict import MultiMapping

from emulators.blynk.front import Reply
from emulators.blynk.model import (
    PINS,
    Datastream,
    Device,
    Mismatch,
    Value,
    format_value,
    is_id,
)

if TYPE_CHECKING:
    from emulators.blynk.server import BlynkEmulator

# Documented error strings (reference 1.2-1.9). The inconsistent trailing periods are Blynk's.
INVALID_TOKEN = "Invalid token."
WRONG_PIN = "Wrong pin format."
TYPE_MISMATCH = "Value doesn't match the Datastream data type."
TYPE_MISMATCH_NO_PERIOD = "Value doesn't match the Datastream data type"
NO_DATASTREAM = "No datastream setup for that pin."
WRONG_DATASTREAM_ID = "Wrong dataStreamId format."
UNKNOWN_CONTENT_TYPE = "Unknown content type."
TOO_MUCH_DATA = "Too much data in batch. Maximum batch size is {n} points."
NOT_IN_PRODUCT = "Requested dataStream doesn't exist in the product {name}"
EVENT_NOT_PROVIDED = "Event code is not provided."
EVENT_UNKNOWN = "Can't find Event with this code in Product template"
META_FORMAT = "Wrong metaField format."
META_MISSING = "MetaField doesn't exist."
META_FORMAT_UPDATE = "Wrong metaField format"
META_MISSING_UPDATE = "MetaField doesn't exist"
WRONG_VALUE = "Wrong value"
# Not documented (reference section 6): our wording.
TOO_OLD = "Timestamps could be only one month in the past."
IN_FUTURE = "Timestamps in the future are not accepted."
WRONG_BODY = "Wrong body format."

#: A request handler, and one route: (method, path, handler).
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
Route = tuple[str, str, Handler]
#: A GET endpoint of the device API: (query, raw path with query) → reply. Never awaits.
Endpoint = Callable[[MultiMapping[str], str], Reply]

_JSON = "application/json"
_JSON_TYPE = (("Content-Type", _JSON),)
_TEXT_TYPE = (("Content-Type", "text/plain; charset=utf-8"),)
_encode = msgspec.json.encode
_BOOL_PROPS = frozenset({"isDisabled", "isHidden", "isOnPlay"})
#: ``web.Response()``: no Content-Type, empty body.
_EMPTY = Reply(200, b"", ())


def error_reply(message: str, status: int = 400) -> Reply:
    """``{"error":{"message":…}}`` as ``application/json``."""
    return Reply(status, b'{"error":{"message":' + _encode(message) + b"}}", _JSON_TYPE)


def error(message: str, status: int = 400) -> web.Response:
    return error_reply(message, status).response()


def _text(text: str) -> Reply:
    """What ``web.Response(text=…)`` sends."""
    return Reply(200, text.encode("utf-8"), _TEXT_TYPE)


def _wrap(endpoint: Endpoint) -> Handler:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return endpoint(request.query, request.raw_path).response()

    return handler


class _Bad(Exception):
    """A request error found while parsing; carries the documented message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DeviceApi:
    """Route handlers of one region; state lives in the shared :class:`BlynkEmulator`."""

    def __init__(self, emu: BlynkEmulator, region: str) -> None:
        self.emu = emu
        self.region = region
        self.model = emu.model
        self.settings = emu.settings
        self._batch_ok = Reply(200, emu.settings.batch_success_body.encode(),
                               (("Content-Type", "text/plain"),))

    def endpoints(self) -> dict[str, Endpoint]:
        """The GET endpoints by path: plain functions, for the front and for :meth:`routes`."""
        return {
            "/external/api/update": self.update,
            "/external/api/batch/update": self.batch_update,
            "/external/api/get": self.get,
            "/external/api/getAll": self.get_all,
            "/external/api/isHardwareConnected": self.is_connected,
            "/external/api/logEvent": self.log_event,
            "/external/api/update/property": self.update_property,
            "/external/api/device/meta": self.meta,
            "/external/api/device/meta/update": self.meta_update,
        }

    def routes(self) -> list[Route]:
        gets: list[Route] = [("GET", path, _wrap(fn)) for path, fn in self.endpoints().items()]
        return [*gets, ("POST", "/external/api/batch/update", self.upload)]

    # common -----------------------------------------------------------------------------------
    def _device(self, q: MultiMapping[str], raw_path: str, *,
                update: bool = False) -> Device | Reply:
        token = q.get("token")
        dev = self.model.by_token.get(token) if token is not None else None
        if dev is None:
            return error_reply(INVALID_TOKEN)
        if dev.region != self.region:
            if self.settings.wrong_region == "invalid_token":
                return error_reply(INVALID_TOKEN)
            base = self.emu.region_urls.get(dev.region)
            if base is not None:
                return Reply(308, b"", (("Location", base + raw_path),))
        refused = self.emu.admit(dev, update=update)
        if refused is not None:
            return refused
        return dev

    def _values(self, dev: Device, items: Iterable[tuple[str, str]],
                mismatch: str) -> list[tuple[Datastream, Value]]:
        """Parse ``pin=value`` pairs; ``Vn=lon&Vn=lat`` and ``Vn=lon,lat`` for locations."""
        by_pin = dev.template.by_pin
        out: list[tuple[Datastream, Value]] = []
        loc_parts: dict[str, list[str]] | None = None
        bad: _Bad | None = None
        s = self.settings
        decimal_integers = s.decimal_integers
        string_max = s.string_max_bytes
        for key, raw in items:
            if key == "token":
                continue
            pin = PINS.get(key)
            if pin is None:
                bad = bad or _Bad(WRONG_PIN)
                continue
            ds = by_pin.get(pin)
            if ds is None:
                bad = bad or _Bad(NO_DATASTREAM)
                continue
            if ds.type == "location" and "," not in raw:
                if loc_parts is None:
                    loc_parts = {}
                loc_parts.setdefault(pin, []).append(raw)
                continue
            try:
                out.append((ds, ds.coerce_text(raw, decimal_integers=decimal_integers,
                                               string_max=string_max)))
            except Mismatch:
                bad = bad or _Bad(mismatch)
        if loc_parts:
            for pin, parts in loc_parts.items():
                ds = by_pin[pin]
                try:
                    if len(parts) != 2:
                        raise Mismatch(pin)
                    out.append((ds, ds.location(parts[0], parts[1])))
                except Mismatch:
                    bad = bad or _Bad(mismatch)
        if bad is not None:
            if s.batch_partial == "apply_valid" and out:
                self._write(dev, out)
            raise bad
        return out

    def _write(self, dev: Device, values: list[tuple[Datastream, Value]]) -> None:
        now = self.emu.now_ms()
        dev.last_data_ms = now
        self.model.write_current(dev, values, now)

    # writes -----------------------------------------------------------------------------------
    def batch_update(self, q: MultiMapping[str], raw_path: str) -> Reply:
        dev = self._device(q, raw_path, update=True)
        if isinstance(dev, Reply):
            return dev
        try:
            values = self._values(dev, q.items(), TYPE_MISMATCH_NO_PERIOD)
        except _Bad as bad:
            return error_reply(bad.message)
        if not values:
            return error_reply(WRONG_PIN)
        self._write(dev, values)
        return self._batch_ok

    def update(self, q: MultiMapping[str], raw_path: str) -> Reply:
        dev = self._device(q, raw_path, update=True)
        if isinstance(dev, Reply):
            return dev
        try:
            if "dataStreamId" in q:
                values = self._by_datastream_id(dev, q)
            elif "pin" in q:
                pin = q["pin"]
                values = self._values(dev, [(pin, v) for v in q.getall("value", [])] or
                                      [(pin, "")], TYPE_MISMATCH)
            else:
                values = self._values(dev, q.items(), TYPE_MISMATCH)
        except _Bad as bad:
            return error_reply(bad.message)
        if not values:
            return error_reply(WRONG_PIN)
        self._write(dev, values)
        return _EMPTY

    def _by_datastream_id(self, dev: Device,
                          q: MultiMapping[str]) -> list[tuple[Datastream, Value]]:
        raw_id = q["dataStreamId"]
        ds = dev.template.by_id.get(int(raw_id)) if is_id(raw_id) else None
        if ds is None:
            raise _Bad(WRONG_DATASTREAM_ID)
        parts = q.getall("value", [])
        try:
            if ds.type == "location" and len(parts) == 2:
                return [(ds, ds.location(parts[0], parts[1]))]
            if len(parts) != 1:
                raise Mismatch("value")
            s = self.settings
            return [(ds, ds.coerce_text(parts[0], decimal_integers=s.decimal_integers,
                                        string_max=s.string_max_bytes))]
        except Mismatch:
            raise _Bad(TYPE_MISMATCH_NO_PERIOD) from None

    async def upload(self, request: web.BaseRequest) -> web.Response:
        """Timestamped points for one pin: ``POST batch/update?token=&pin=`` + ``[[ts,v],…]``."""
        q = request.query
        dev = self._device(q, request.raw_path, update=False)
        if isinstance(dev, Reply):
            return dev.response()
        pin = PINS.get(q.get("pin", ""))
        if pin is None:
            return error(WRONG_PIN)
        ds = dev.template.by_pin.get(pin)
        if ds is None:
            return error(NO_DATASTREAM)
        if request.content_type != _JSON:
            return error(UNKNOWN_CONTENT_TYPE)
        try:
            points = msgspec.json.decode(await request.read())
        except msgspec.DecodeError:
            return error(WRONG_BODY)
        s = self.settings
        if not isinstance(points, list):
            return error(WRONG_BODY)
        if len(points) > s.max_batch_points:
            return error(TOO_MUCH_DATA.format(n=s.max_batch_points))
        now = self.emu.now_ms()
        oldest = now - s.upload_max_age_s * 1000
        parsed: list[tuple[int, Value]] = []
        for p in points:
            if not (isinstance(p, list) and len(p) == 2 and isinstance(p[0], int)
                    and not isinstance(p[0], bool)):
                return error(WRONG_BODY)
            ts = p[0]
            if ts < oldest:
                return error(TOO_OLD)
            if ts > now and not s.upload_accept_future:
                return error(IN_FUTURE)
            try:
                parsed.append((ts, ds.coerce_json(p[1], string_max=s.string_max_bytes)))
            except Mismatch:
                return error(TYPE_MISMATCH_NO_PERIOD)
        refused = self.emu.admit_import(dev, len(parsed))
        if refused is not None:
            return refused.response()
        newest = max((ts for ts, _ in parsed), default=None)
        for ts, v in sorted(parsed, key=lambda tv: tv[0]):
            current = s.upload_sets_current and ts == newest
            self.model.write(dev, ds, v, ts, current=current, notify=current)
        return web.Response(text=s.upload_success_body)

    # reads ------------------------------------------------------------------------------------
    def _read_pins(self, dev: Device, q: MultiMapping[str]) -> list[Datastream]:
        t = dev.template
        out: list[Datastream] = []
        for key, raw in q.items():
            if key == "token":
                continue
            if key == "dataStreamId":
                ds = t.by_id.get(int(raw)) if is_id(raw) else None
                if ds is None:
                    raise _Bad(WRONG_DATASTREAM_ID)
                out.append(ds)
                continue
            pin = PINS.get(raw if key == "pin" else key)
            if pin is None:
                raise _Bad(WRONG_PIN)
            ds = t.by_pin.get(pin)
            if ds is None:
                raise _Bad(NOT_IN_PRODUCT.format(name=t.name))
            out.append(ds)
        return out

    def get(self, q: MultiMapping[str], raw_path: str) -> Reply:
        dev = self._device(q, raw_path)
        if isinstance(dev, Reply):
            return dev
        try:
            pins = self._read_pins(dev, q)
        except _Bad as bad:
            return error_reply(bad.message)
        if not pins:
            return error_reply(WRONG_PIN)
        if len(pins) == 1:
            v = dev.value(pins[0].pin)
            return _text("" if v is None else format_value(v, self.settings.double_format))
        out: dict[str, Any] = {}
        for ds in pins:
            v = dev.value(ds.pin)
            if v is not None:
                out[ds.pin.lower()] = v
        return Reply(200, _encode(out), _JSON_TYPE)

    def get_all(self, q: MultiMapping[str], raw_path: str) -> Reply:
        dev = self._device(q, raw_path)
        if isinstance(dev, Reply):
            return dev
        out: dict[str, Any] = {}
        for ds in dev.template.datastreams:
            v = dev.value(ds.pin)
            if v is not None:
                out[ds.pin.lower()] = v
        return Reply(200, _encode(out), _JSON_TYPE)

    def is_connected(self, q: MultiMapping[str], raw_path: str) -> Reply:
        dev = self._device(q, raw_path)
        if isinstance(dev, Reply):
            return dev
        online = (self.settings.hardware_connected == "after_data" and dev.last_data_ms > 0
                  and self.emu.now_ms() - dev.last_data_ms
                  <= self.settings.online_window_s * 1000)
        return _text("true" if online else "false")

    def log_event(self, q: MultiMapping[str], raw_path: str) -> Reply:
        dev = self._device(q, raw_path)
        if isinstance(dev, Reply):
            return dev
        code = q.get("code")
        if not code:
            return error_reply(EVENT_NOT_PROVIDED)
        if code not in dev.template.events:
            return error_reply(EVENT_UNKNOWN)
        refused = self.emu.admit_event(dev)
        if refused is not None:
            return refused
        dev.events.append((self.emu.now_ms(), code, q.get("description", "")))
        return _EMPTY

    def update_property(self, q: MultiMapping[str], raw_path: str) -> Reply:
        dev = self._device(q, raw_path)
        if isinstance(dev, Reply):
            return dev
        pin = PINS.get(q.get("pin", ""))
        if pin is None:
            return error_reply(WRONG_PIN)
        if pin not in dev.template.by_pin:
            return error_reply(NO_DATASTREAM)
        props: dict[str, str] = {}
        for key, value in q.items():
            if key in ("token", "pin"):
                continue
            if key in _BOOL_PROPS and value not in ("true", "false"):
                return error_reply(TYPE_MISMATCH_NO_PERIOD)
            props[key] = value
        dev.properties.setdefault(pin, {}).update(props)
        return _EMPTY

    def meta(self, q: MultiMapping[str], raw_path: str) -> Reply:
        dev = self._device(q, raw_path)
        if isinstance(dev, Reply):
            return dev
        ref = q.get("metaFieldId")
        if not ref:
            return error_reply(META_FORMAT)
        m = dev.template.metafield(int(ref) if is_id(ref) else ref)
        if m is None:
            return error_reply(META_MISSING)
        return _text(dev.metafields.get(m.id, ""))

    def meta_update(self, q: MultiMapping[str], raw_path: str) -> Reply:
        dev = self._device(q, raw_path)
        if isinstance(dev, Reply):
            return dev
        ref = q.get("metaFieldId") or q.get("metaFieldName")
        if not ref:
            return error_reply(META_FORMAT_UPDATE)
        m = dev.template.metafield(int(ref) if is_id(ref) and "metaFieldId" in q else ref)
        if m is None:
            return error_reply(META_MISSING_UPDATE)
        value = q.get("value")
        if value is None:
            return error_reply(WRONG_VALUE)
        dev.metafields[m.id] = value
        return _EMPTY
